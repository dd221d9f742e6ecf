//! The VDUSE user API: the structures, constants and ioctl numbers of Linux's
//! `include/uapi/linux/vduse.h` as of kernel 6.12 (API version 0), written out by hand.
//!
//! No Rust crate covers VDUSE (neither `vhost`, `vhost-user-backend` nor any `*-bindings`
//! crate has it), so this module is the binding. Every structure is `#[repr(C)]` with its
//! padding spelled out as explicit fields, so that each one is plain bytes (`ByteValued`)
//! and can be read from and written to the kernel as such. The unions of the header
//! (`vduse_dev_request`'s and `vduse_dev_response`'s payloads, `vduse_vq_info`'s ring
//! state) are byte arrays here, read and written through accessor methods.
//!
//! Two files carry the API:
//! * `/dev/vduse/control` takes [`VDUSE_GET_API_VERSION`], [`VDUSE_SET_API_VERSION`],
//!   [`VDUSE_CREATE_DEV`] (a [`VduseDevConfig`] followed by the device's config space) and
//!   [`VDUSE_DESTROY_DEV`].
//! * `/dev/vduse/NAME` takes the per-device ioctls and carries the request channel:
//!   `read(2)` returns one [`VduseDevRequest`], `write(2)` takes one [`VduseDevResponse`].
//!
//! Later kernels extend some structures (virtqueue groups and address spaces, API
//! version 1) inside their reserved fields without changing any size; this module
//! implements version 0, which every kernel with VDUSE accepts.

use vm_memory::ByteValued;

/// The ioctl type byte of every VDUSE ioctl (`VDUSE_BASE`).
pub const VDUSE_BASE: u32 = 0x81;

/// The API version this module implements (`VDUSE_API_VERSION`).
pub const VDUSE_API_VERSION: u64 = 0;

/// Length of a device name buffer, terminating NUL included (`VDUSE_NAME_MAX`).
pub const VDUSE_NAME_MAX: usize = 256;

/// IOTLB permission: the device may read (`VDUSE_ACCESS_RO`).
pub const VDUSE_ACCESS_RO: u8 = 0x1;
/// IOTLB permission: the device may write (`VDUSE_ACCESS_WO`).
pub const VDUSE_ACCESS_WO: u8 = 0x2;
/// IOTLB permission: the device may read and write (`VDUSE_ACCESS_RW`).
pub const VDUSE_ACCESS_RW: u8 = 0x3;

/// `vduse_vq_eventfd.fd` value that removes the kick eventfd (`VDUSE_EVENTFD_DEASSIGN`).
pub const VDUSE_EVENTFD_DEASSIGN: i32 = -1;

/// `vduse_iova_info.capability` bit: the region can be backed by registered user memory.
pub const VDUSE_IOVA_CAP_UMEM: u64 = 1 << 0;

/// Request type: report a virtqueue's state (`VDUSE_GET_VQ_STATE`).
pub const VDUSE_GET_VQ_STATE: u32 = 0;
/// Request type: the driver wrote the device status (`VDUSE_SET_STATUS`).
pub const VDUSE_SET_STATUS: u32 = 1;
/// Request type: re-read the IOTLB for an IOVA range (`VDUSE_UPDATE_IOTLB`).
pub const VDUSE_UPDATE_IOTLB: u32 = 2;

/// Response result: the request succeeded (`VDUSE_REQ_RESULT_OK`).
pub const VDUSE_REQ_RESULT_OK: u32 = 0x00;
/// Response result: the request failed (`VDUSE_REQ_RESULT_FAILED`).
pub const VDUSE_REQ_RESULT_FAILED: u32 = 0x01;

/// `struct vduse_dev_config`: what `VDUSE_CREATE_DEV` creates. The device's config space
/// (`config_size` bytes) follows it in the same buffer (`__u8 config[]`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VduseDevConfig {
    /// Device name, NUL terminated: the device appears as `/dev/vduse/NAME`.
    pub name: [u8; VDUSE_NAME_MAX],
    /// Virtio vendor id.
    pub vendor_id: u32,
    /// Virtio device id (2 = block, ...).
    pub device_id: u32,
    /// Device feature bits.
    pub features: u64,
    /// Number of virtqueues.
    pub vq_num: u32,
    /// Alignment of the virtqueues' rings (at most the page size).
    pub vq_align: u32,
    /// Zero.
    pub reserved: [u32; 13],
    /// Length of the config space that follows.
    pub config_size: u32,
}

impl Default for VduseDevConfig {
    fn default() -> Self {
        VduseDevConfig {
            name: [0; VDUSE_NAME_MAX],
            vendor_id: 0,
            device_id: 0,
            features: 0,
            vq_num: 0,
            vq_align: 0,
            reserved: [0; 13],
            config_size: 0,
        }
    }
}

/// `struct vduse_iotlb_entry`: one IOVA region `[start, last]`, in and out of
/// `VDUSE_IOTLB_GET_FD`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VduseIotlbEntry {
    /// Offset in the returned file of the region's first byte.
    pub offset: u64,
    /// First IOVA of the region.
    pub start: u64,
    /// Last IOVA of the region (inclusive).
    pub last: u64,
    /// `VDUSE_ACCESS_*`.
    pub perm: u8,
    /// The C structure's tail padding.
    pub padding: [u8; 7],
}

/// `struct vduse_config_data` (header only): `VDUSE_DEV_SET_CONFIG` writes `length` bytes
/// that follow it into the config space at `offset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VduseConfigData {
    /// Offset in the config space.
    pub offset: u32,
    /// Number of bytes that follow.
    pub length: u32,
}

/// `struct vduse_vq_config`: `VDUSE_VQ_SETUP`'s argument.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VduseVqConfig {
    /// Virtqueue index.
    pub index: u32,
    /// Largest size the driver may give the queue.
    pub max_size: u16,
    /// Zero.
    pub reserved: [u16; 13],
}

/// `struct vduse_vq_info`: `VDUSE_VQ_GET_INFO`'s argument and result.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VduseVqInfo {
    /// Virtqueue index (set by the caller).
    pub index: u32,
    /// Queue size the driver chose.
    pub num: u32,
    /// Descriptor area address (IOVA).
    pub desc_addr: u64,
    /// Driver (available) area address.
    pub driver_addr: u64,
    /// Device (used) area address.
    pub device_addr: u64,
    /// The union of `vduse_vq_state_split` and `vduse_vq_state_packed` (four `__u16`).
    pub state: [u16; 4],
    /// Whether the driver made the queue ready.
    pub ready: u8,
    /// The C structure's tail padding.
    pub padding: [u8; 7],
}

impl VduseVqInfo {
    /// `split.avail_index`: the next available index the device should process.
    pub fn split_avail_index(&self) -> u16 {
        self.state[0]
    }
}

/// `struct vduse_vq_eventfd`: `VDUSE_VQ_SETUP_KICKFD`'s argument.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VduseVqEventfd {
    /// Virtqueue index.
    pub index: u32,
    /// The eventfd, or [`VDUSE_EVENTFD_DEASSIGN`].
    pub fd: i32,
}

/// `struct vduse_iova_umem`: `VDUSE_IOTLB_REG_UMEM` / `VDUSE_IOTLB_DEREG_UMEM`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VduseIovaUmem {
    /// Start of the user memory (page aligned).
    pub uaddr: u64,
    /// Start of the IOVA region.
    pub iova: u64,
    /// Size of the region.
    pub size: u64,
    /// Zero.
    pub reserved: [u64; 3],
}

/// `struct vduse_iova_info`: `VDUSE_IOTLB_GET_INFO`'s argument and result.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct VduseIovaInfo {
    /// First IOVA of the region.
    pub start: u64,
    /// Last IOVA of the region.
    pub last: u64,
    /// `VDUSE_IOVA_CAP_*`.
    pub capability: u64,
    /// Zero.
    pub reserved: [u64; 3],
}

/// Size of the payload union of requests and responses (`__u32 padding[32]`).
pub const PAYLOAD_SIZE: usize = 128;

/// `struct vduse_dev_request`: one message `read(2)` from `/dev/vduse/NAME` returns.
///
/// The payload union holds `vduse_vq_state` (GET_VQ_STATE: only the index is set),
/// `vduse_dev_status` (SET_STATUS) or `vduse_iova_range` (UPDATE_IOTLB).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VduseDevRequest {
    /// `VDUSE_GET_VQ_STATE`, `VDUSE_SET_STATUS` or `VDUSE_UPDATE_IOTLB`.
    pub req_type: u32,
    /// Echoed in the response.
    pub request_id: u32,
    /// Reserved.
    pub reserved: [u32; 4],
    /// The union, as 8-byte words (the union holds `__u64` fields).
    pub payload: [u64; PAYLOAD_SIZE / 8],
}

impl Default for VduseDevRequest {
    fn default() -> Self {
        VduseDevRequest {
            req_type: 0,
            request_id: 0,
            reserved: [0; 4],
            payload: [0; PAYLOAD_SIZE / 8],
        }
    }
}

impl VduseDevRequest {
    fn payload_bytes(&self) -> [u8; PAYLOAD_SIZE] {
        let mut out = [0u8; PAYLOAD_SIZE];
        for (chunk, word) in out.chunks_exact_mut(8).zip(self.payload.iter()) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        out
    }

    fn set_payload_bytes(&mut self, bytes: &[u8]) {
        let mut all = self.payload_bytes();
        all[..bytes.len()].copy_from_slice(bytes);
        for (word, chunk) in self.payload.iter_mut().zip(all.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            *word = u64::from_ne_bytes(w);
        }
    }

    /// `vq_state.index` (GET_VQ_STATE).
    pub fn vq_index(&self) -> u32 {
        let b = self.payload_bytes();
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
    }

    /// `s.status` (SET_STATUS).
    pub fn status(&self) -> u8 {
        self.payload_bytes()[0]
    }

    /// `iova.start` and `iova.last` (UPDATE_IOTLB).
    pub fn iova_range(&self) -> (u64, u64) {
        (self.payload[0], self.payload[1])
    }

    /// A GET_VQ_STATE request (what the kernel sends; for tests and tools).
    pub fn get_vq_state(request_id: u32, index: u32) -> Self {
        let mut r = VduseDevRequest {
            req_type: VDUSE_GET_VQ_STATE,
            request_id,
            ..Default::default()
        };
        r.set_payload_bytes(&index.to_ne_bytes());
        r
    }

    /// A SET_STATUS request.
    pub fn set_status(request_id: u32, status: u8) -> Self {
        let mut r = VduseDevRequest {
            req_type: VDUSE_SET_STATUS,
            request_id,
            ..Default::default()
        };
        r.set_payload_bytes(&[status]);
        r
    }

    /// An UPDATE_IOTLB request for `[start, last]`.
    pub fn update_iotlb(request_id: u32, start: u64, last: u64) -> Self {
        let mut r = VduseDevRequest {
            req_type: VDUSE_UPDATE_IOTLB,
            request_id,
            ..Default::default()
        };
        r.payload[0] = start;
        r.payload[1] = last;
        r
    }
}

/// `struct vduse_dev_response`: one message `write(2)` to `/dev/vduse/NAME` takes.
///
/// The payload union holds `vduse_vq_state` (the answer to GET_VQ_STATE).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VduseDevResponse {
    /// The request's id.
    pub request_id: u32,
    /// `VDUSE_REQ_RESULT_OK` or `VDUSE_REQ_RESULT_FAILED`.
    pub result: u32,
    /// Must be zero (the kernel refuses the response otherwise).
    pub reserved: [u32; 4],
    /// The union, as 4-byte words (its members hold at most `__u32` fields).
    pub payload: [u32; PAYLOAD_SIZE / 4],
}

impl VduseDevResponse {
    /// A response with `result` and an empty payload.
    pub fn new(request_id: u32, result: u32) -> Self {
        VduseDevResponse {
            request_id,
            result,
            reserved: [0; 4],
            payload: [0; PAYLOAD_SIZE / 4],
        }
    }

    /// A successful GET_VQ_STATE answer: `vq_state.index` and `vq_state.split.avail_index`.
    pub fn vq_state(request_id: u32, index: u32, avail_index: u16) -> Self {
        let mut r = Self::new(request_id, VDUSE_REQ_RESULT_OK);
        r.payload[0] = index;
        // `split.avail_index` is the first __u16 of the union at offset 4.
        r.payload[1] = u32::from_ne_bytes({
            let a = avail_index.to_ne_bytes();
            [a[0], a[1], 0, 0]
        });
        r
    }

    /// `vq_state.split.avail_index`.
    pub fn split_avail_index(&self) -> u16 {
        let b = self.payload[1].to_ne_bytes();
        u16::from_ne_bytes([b[0], b[1]])
    }
}

// The impls below: each type is `#[repr(C)]`, made only of integers and arrays of integers
// with every padding byte spelled out as a field, so it has no implicit padding and every
// bit pattern is a valid value.
// SAFETY: as said above.
unsafe impl ByteValued for VduseDevConfig {}
// SAFETY: see above.
unsafe impl ByteValued for VduseIotlbEntry {}
// SAFETY: see above.
unsafe impl ByteValued for VduseConfigData {}
// SAFETY: see above.
unsafe impl ByteValued for VduseVqConfig {}
// SAFETY: see above.
unsafe impl ByteValued for VduseVqInfo {}
// SAFETY: see above.
unsafe impl ByteValued for VduseVqEventfd {}
// SAFETY: see above.
unsafe impl ByteValued for VduseIovaUmem {}
// SAFETY: see above.
unsafe impl ByteValued for VduseIovaInfo {}
// SAFETY: see above.
unsafe impl ByteValued for VduseDevRequest {}
// SAFETY: see above.
unsafe impl ByteValued for VduseDevResponse {}

/// `char[VDUSE_NAME_MAX]`, `VDUSE_DESTROY_DEV`'s argument.
pub type VduseName = [u8; VDUSE_NAME_MAX];

/// The ioctl request numbers, one function per macro of the header, named as there
/// (each returns its `_IOR`/`_IOW`/`_IOWR`/`_IO` encoding).
#[allow(missing_docs)]
mod ioctl_numbers {
    use super::*;

    // Control device (/dev/vduse/control).
    vmm_sys_util::ioctl_ior_nr!(VDUSE_GET_API_VERSION, VDUSE_BASE, 0x00, u64);
    vmm_sys_util::ioctl_iow_nr!(VDUSE_SET_API_VERSION, VDUSE_BASE, 0x01, u64);
    vmm_sys_util::ioctl_iow_nr!(VDUSE_CREATE_DEV, VDUSE_BASE, 0x02, VduseDevConfig);
    vmm_sys_util::ioctl_iow_nr!(VDUSE_DESTROY_DEV, VDUSE_BASE, 0x03, VduseName);

    // Device (/dev/vduse/NAME).
    vmm_sys_util::ioctl_iowr_nr!(VDUSE_IOTLB_GET_FD, VDUSE_BASE, 0x10, VduseIotlbEntry);
    vmm_sys_util::ioctl_ior_nr!(VDUSE_DEV_GET_FEATURES, VDUSE_BASE, 0x11, u64);
    vmm_sys_util::ioctl_iow_nr!(VDUSE_DEV_SET_CONFIG, VDUSE_BASE, 0x12, VduseConfigData);
    vmm_sys_util::ioctl_io_nr!(VDUSE_DEV_INJECT_CONFIG_IRQ, VDUSE_BASE, 0x13);
    vmm_sys_util::ioctl_iow_nr!(VDUSE_VQ_SETUP, VDUSE_BASE, 0x14, VduseVqConfig);
    vmm_sys_util::ioctl_iowr_nr!(VDUSE_VQ_GET_INFO, VDUSE_BASE, 0x15, VduseVqInfo);
    vmm_sys_util::ioctl_iow_nr!(VDUSE_VQ_SETUP_KICKFD, VDUSE_BASE, 0x16, VduseVqEventfd);
    vmm_sys_util::ioctl_iow_nr!(VDUSE_VQ_INJECT_IRQ, VDUSE_BASE, 0x17, u32);
    vmm_sys_util::ioctl_iow_nr!(VDUSE_IOTLB_REG_UMEM, VDUSE_BASE, 0x18, VduseIovaUmem);
    vmm_sys_util::ioctl_iow_nr!(VDUSE_IOTLB_DEREG_UMEM, VDUSE_BASE, 0x19, VduseIovaUmem);
    vmm_sys_util::ioctl_iowr_nr!(VDUSE_IOTLB_GET_INFO, VDUSE_BASE, 0x1a, VduseIovaInfo);
}

pub use ioctl_numbers::*;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    /// `_IOC(dir, type, nr, size)` of `asm-generic/ioctl.h`, written out independently of
    /// vmm-sys-util: nr in bits 0-7, type in 8-15, size in 16-29, direction in 30-31.
    fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
        (dir << 30) | (size << 16) | (0x81 << 8) | nr
    }
    const NONE: u64 = 0;
    const WRITE: u64 = 1;
    const READ: u64 = 2;

    #[test]
    fn ioctl_numbers_match_the_header() {
        // Sizes are the C sizeof() of each argument type, from vduse.h.
        let expected: [(&str, u64, u64); 15] = [
            (
                "GET_API_VERSION",
                VDUSE_GET_API_VERSION(),
                ioc(READ, 0x00, 8),
            ),
            (
                "SET_API_VERSION",
                VDUSE_SET_API_VERSION(),
                ioc(WRITE, 0x01, 8),
            ),
            ("CREATE_DEV", VDUSE_CREATE_DEV(), ioc(WRITE, 0x02, 336)),
            ("DESTROY_DEV", VDUSE_DESTROY_DEV(), ioc(WRITE, 0x03, 256)),
            (
                "IOTLB_GET_FD",
                VDUSE_IOTLB_GET_FD(),
                ioc(READ | WRITE, 0x10, 32),
            ),
            (
                "DEV_GET_FEATURES",
                VDUSE_DEV_GET_FEATURES(),
                ioc(READ, 0x11, 8),
            ),
            (
                "DEV_SET_CONFIG",
                VDUSE_DEV_SET_CONFIG(),
                ioc(WRITE, 0x12, 8),
            ),
            (
                "DEV_INJECT_CONFIG_IRQ",
                VDUSE_DEV_INJECT_CONFIG_IRQ(),
                ioc(NONE, 0x13, 0),
            ),
            ("VQ_SETUP", VDUSE_VQ_SETUP(), ioc(WRITE, 0x14, 32)),
            (
                "VQ_GET_INFO",
                VDUSE_VQ_GET_INFO(),
                ioc(READ | WRITE, 0x15, 48),
            ),
            (
                "VQ_SETUP_KICKFD",
                VDUSE_VQ_SETUP_KICKFD(),
                ioc(WRITE, 0x16, 8),
            ),
            ("VQ_INJECT_IRQ", VDUSE_VQ_INJECT_IRQ(), ioc(WRITE, 0x17, 4)),
            (
                "IOTLB_REG_UMEM",
                VDUSE_IOTLB_REG_UMEM(),
                ioc(WRITE, 0x18, 48),
            ),
            (
                "IOTLB_DEREG_UMEM",
                VDUSE_IOTLB_DEREG_UMEM(),
                ioc(WRITE, 0x19, 48),
            ),
            (
                "IOTLB_GET_INFO",
                VDUSE_IOTLB_GET_INFO(),
                ioc(READ | WRITE, 0x1a, 48),
            ),
        ];
        for (name, got, want) in expected {
            assert_eq!(got, want, "VDUSE_{name}: {got:#x} != {want:#x}");
        }
        // Spot-check two against the literal values a C program prints.
        assert_eq!(VDUSE_CREATE_DEV() as u64, 0x4150_8102);
        assert_eq!(VDUSE_VQ_GET_INFO() as u64, 0xc030_8115);
    }

    #[test]
    fn dev_config_layout() {
        assert_eq!(size_of::<VduseDevConfig>(), 336);
        assert_eq!(align_of::<VduseDevConfig>(), 8);
        assert_eq!(offset_of!(VduseDevConfig, name), 0);
        assert_eq!(offset_of!(VduseDevConfig, vendor_id), 256);
        assert_eq!(offset_of!(VduseDevConfig, device_id), 260);
        assert_eq!(offset_of!(VduseDevConfig, features), 264);
        assert_eq!(offset_of!(VduseDevConfig, vq_num), 272);
        assert_eq!(offset_of!(VduseDevConfig, vq_align), 276);
        assert_eq!(offset_of!(VduseDevConfig, reserved), 280);
        assert_eq!(offset_of!(VduseDevConfig, config_size), 332);
    }

    #[test]
    fn iotlb_entry_layout() {
        assert_eq!(size_of::<VduseIotlbEntry>(), 32);
        assert_eq!(offset_of!(VduseIotlbEntry, offset), 0);
        assert_eq!(offset_of!(VduseIotlbEntry, start), 8);
        assert_eq!(offset_of!(VduseIotlbEntry, last), 16);
        assert_eq!(offset_of!(VduseIotlbEntry, perm), 24);
    }

    #[test]
    fn small_structs_layout() {
        assert_eq!(size_of::<VduseConfigData>(), 8);
        assert_eq!(offset_of!(VduseConfigData, length), 4);

        assert_eq!(size_of::<VduseVqConfig>(), 32);
        assert_eq!(offset_of!(VduseVqConfig, index), 0);
        assert_eq!(offset_of!(VduseVqConfig, max_size), 4);
        assert_eq!(offset_of!(VduseVqConfig, reserved), 6);

        assert_eq!(size_of::<VduseVqEventfd>(), 8);
        assert_eq!(offset_of!(VduseVqEventfd, fd), 4);

        assert_eq!(size_of::<VduseIovaUmem>(), 48);
        assert_eq!(offset_of!(VduseIovaUmem, iova), 8);
        assert_eq!(offset_of!(VduseIovaUmem, size), 16);
        assert_eq!(offset_of!(VduseIovaUmem, reserved), 24);

        assert_eq!(size_of::<VduseIovaInfo>(), 48);
        assert_eq!(offset_of!(VduseIovaInfo, last), 8);
        assert_eq!(offset_of!(VduseIovaInfo, capability), 16);
        assert_eq!(offset_of!(VduseIovaInfo, reserved), 24);
    }

    #[test]
    fn vq_info_layout() {
        assert_eq!(size_of::<VduseVqInfo>(), 48);
        assert_eq!(align_of::<VduseVqInfo>(), 8);
        assert_eq!(offset_of!(VduseVqInfo, index), 0);
        assert_eq!(offset_of!(VduseVqInfo, num), 4);
        assert_eq!(offset_of!(VduseVqInfo, desc_addr), 8);
        assert_eq!(offset_of!(VduseVqInfo, driver_addr), 16);
        assert_eq!(offset_of!(VduseVqInfo, device_addr), 24);
        // The split/packed union, then `ready`.
        assert_eq!(offset_of!(VduseVqInfo, state), 32);
        assert_eq!(offset_of!(VduseVqInfo, ready), 40);
        let mut info = VduseVqInfo::default();
        info.as_mut_slice()[32..34].copy_from_slice(&0x1234u16.to_ne_bytes());
        assert_eq!(info.split_avail_index(), 0x1234);
    }

    #[test]
    fn request_layout_and_payload() {
        assert_eq!(size_of::<VduseDevRequest>(), 152);
        assert_eq!(align_of::<VduseDevRequest>(), 8);
        assert_eq!(offset_of!(VduseDevRequest, req_type), 0);
        assert_eq!(offset_of!(VduseDevRequest, request_id), 4);
        assert_eq!(offset_of!(VduseDevRequest, reserved), 8);
        assert_eq!(offset_of!(VduseDevRequest, payload), 24);

        // Bytes as the kernel lays them out, decoded by the accessors.
        let mut raw = [0u8; 152];
        raw[0..4].copy_from_slice(&VDUSE_UPDATE_IOTLB.to_ne_bytes());
        raw[4..8].copy_from_slice(&7u32.to_ne_bytes());
        raw[24..32].copy_from_slice(&0x1000u64.to_ne_bytes()); // iova.start
        raw[32..40].copy_from_slice(&0x1fffu64.to_ne_bytes()); // iova.last
                                                               // (Copied into an aligned value: the byte array has no 8-byte alignment.)
        let decode = |raw: &[u8; 152]| {
            let mut r = VduseDevRequest::default();
            r.as_mut_slice().copy_from_slice(raw);
            r
        };
        let req = decode(&raw);
        assert_eq!(req.req_type, VDUSE_UPDATE_IOTLB);
        assert_eq!(req.request_id, 7);
        assert_eq!(req.iova_range(), (0x1000, 0x1fff));

        let mut raw = [0u8; 152];
        raw[24] = 0x0f; // s.status
        assert_eq!(decode(&raw).status(), 0x0f);
        raw[24..28].copy_from_slice(&3u32.to_ne_bytes()); // vq_state.index
        assert_eq!(decode(&raw).vq_index(), 3);

        // The constructors produce the same bytes.
        let r = VduseDevRequest::get_vq_state(1, 3);
        assert_eq!(&r.as_slice()[24..28], &3u32.to_ne_bytes());
        let r = VduseDevRequest::set_status(1, 0x8f);
        assert_eq!(r.as_slice()[24], 0x8f);
        let r = VduseDevRequest::update_iotlb(1, 5, 9);
        assert_eq!(&r.as_slice()[32..40], &9u64.to_ne_bytes());
    }

    #[test]
    fn response_layout_and_payload() {
        assert_eq!(size_of::<VduseDevResponse>(), 152);
        assert_eq!(offset_of!(VduseDevResponse, request_id), 0);
        assert_eq!(offset_of!(VduseDevResponse, result), 4);
        assert_eq!(offset_of!(VduseDevResponse, reserved), 8);
        assert_eq!(offset_of!(VduseDevResponse, payload), 24);
        let r = VduseDevResponse::vq_state(9, 2, 0xabcd);
        let b = r.as_slice();
        assert_eq!(&b[0..4], &9u32.to_ne_bytes());
        assert_eq!(&b[4..8], &VDUSE_REQ_RESULT_OK.to_ne_bytes());
        assert!(b[8..24].iter().all(|&x| x == 0), "reserved must be zero");
        // vq_state.index at 24, vq_state.split.avail_index at 28.
        assert_eq!(&b[24..28], &2u32.to_ne_bytes());
        assert_eq!(&b[28..30], &0xabcdu16.to_ne_bytes());
        assert_eq!(r.split_avail_index(), 0xabcd);
    }
}
