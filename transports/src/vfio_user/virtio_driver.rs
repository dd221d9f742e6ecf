//! An in-process virtio-pci driver on top of [`VfioUserClient`]: drive any virtio-pci
//! device exported over vfio-user without a VMM (virtio 1.2, section 4.1 "Virtio Over PCI
//! Bus", modern interface only; split virtqueues, section 2.7).
//!
//! **Experimental**: a tool for tests and benchmarks; its API may change in any 0.y release
//! (`docs/api-stability.md`).
//!
//! What it does, in the order a driver does it:
//!
//! 1. **Probe** ([`VirtioPciDriver::attach`]): reads PCI config space (region 7), walks the
//!    capability list ([`walk_capabilities`], testable through [`ConfigSource`]) for the
//!    virtio vendor capabilities (common, notify, ISR, device, PCI_CFG) and MSI-X, checks
//!    every structure against the size of the BAR it names, and enables memory space and
//!    bus mastering in the command register.
//! 2. **Memory** ([`DriverMemory`]): one memfd mapped here (`MAP_SHARED`) and DMA_MAPped to
//!    the device with its fd at an IOVA base, so the device reads and writes it directly;
//!    or mapped without an fd, in which case the device's accesses arrive as
//!    DMA_READ/DMA_WRITE and the client serves them from the same memory. A first-fit
//!    allocator hands out aligned chunks for rings and data buffers.
//! 3. **Interrupts**: one eventfd per MSI-X vector (vector 0 for configuration changes,
//!    vector `i + 1` for queue `i`), attached with SET_IRQS; the MSI-X table entries are
//!    programmed and unmasked and MSI-X is enabled in the capability's message control.
//! 4. **Initialization** ([`VirtioPciDriver::init`], spec 3.1.1): reset, ACKNOWLEDGE,
//!    DRIVER, feature negotiation, FEATURES_OK (checked), per-queue set-up, DRIVER_OK.
//!    [`reset`](VirtioPciDriver::reset) and a later `init` re-initialize on the same
//!    connection.
//! 5. **Queues** ([`Virtqueue`]): split rings with a shadow free list, EVENT_IDX or flag
//!    based notification suppression in both directions, and checks of everything the
//!    device writes into the used ring.
//!
//! Notifications are REGION_WRITEs of the queue index at the queue's notify address:
//! posted (No_reply, as QEMU does for MMIO BARs), acknowledged, or stored straight into
//! the notify area when the device makes it mappable ([`NotifyMode`]).
//!
//! The device is as untrusted as any client: every offset and length read from config
//! space or the rings is checked, and surprises become [`DriverError`]s, never panics.
//!
//! A [`VirtioBlkRequest`] helper builds virtio-blk request chains (virtio 1.2 5.2.6) and
//! [`VirtioPciDriver::blk_request`] runs one to completion, for tests and benchmarks.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{debug, warn};
use virtio_bindings::virtio_blk;
use virtio_bindings::virtio_config;
use virtio_bindings::virtio_ring;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion, VolatileMemory, VolatileSlice,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::client::{ClientError, DmaTarget, VfioUserClient};
use super::codec::{REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE};

// ---------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------

/// vfio-user region index of PCI config space.
pub const CONFIG_REGION: u32 = 7;
/// vfio-user irq index of MSI-X.
pub const MSIX_IRQ_INDEX: u32 = 2;
/// Size of the standard PCI config space the capability list lives in.
pub const PCI_CONFIG_SIZE: usize = 256;

/// PCI command register.
const PCI_COMMAND: u16 = 0x04;
/// PCI status register.
const PCI_STATUS: u16 = 0x06;
/// Capabilities pointer.
const PCI_CAPABILITY_LIST: u16 = 0x34;
/// Command: memory space enable.
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master enable.
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Status: a capability list is present.
const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
/// First byte after the standard header, where capabilities may start.
const PCI_STD_HEADER_END: u16 = 0x40;
/// Capability ID: vendor specific.
pub const PCI_CAP_ID_VNDR: u8 = 0x09;
/// Capability ID: MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// MSI-X message control: MSI-X enable.
const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// MSI-X message control: function mask.
const MSIX_CONTROL_MASKALL: u16 = 1 << 14;
/// MSI-X message control: table size minus one.
const MSIX_CONTROL_QSIZE: u16 = 0x7ff;
/// Bytes per MSI-X table entry.
const MSIX_ENTRY_SIZE: u64 = 16;
/// Message address programmed into MSI-X entries (the x86 interrupt window; the device
/// only keeps it, delivery goes through the eventfds).
const MSIX_MESSAGE_ADDRESS: u32 = 0xfee0_0000;

/// Virtio structure type: common configuration.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// Virtio structure type: notifications.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// Virtio structure type: ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// Virtio structure type: device-specific configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// Virtio structure type: PCI configuration access window.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
/// Size of `struct virtio_pci_cap`.
const VIRTIO_PCI_CAP_LEN: usize = 16;
/// Size of `struct virtio_pci_notify_cap` and `struct virtio_pci_cfg_cap`.
const VIRTIO_PCI_CAP_EXT_LEN: usize = 20;

/// "No MSI-X vector" in `config_msix_vector` / `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// Largest split virtqueue (virtio 1.2 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
/// VIRTIO_RING_F_EVENT_IDX.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// VIRTIO_RING_F_INDIRECT_DESC.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// Transport features this driver does not implement; removed from every wanted set
/// (packed rings, notification data, admin queues).
pub const UNSUPPORTED_FEATURES: u64 = (1 << virtio_config::VIRTIO_F_RING_PACKED)
    | (1 << virtio_config::VIRTIO_F_NOTIFICATION_DATA)
    | (1 << virtio_config::VIRTIO_F_NOTIF_CONFIG_DATA)
    | (1 << virtio_config::VIRTIO_F_ADMIN_VQ);

/// Device status bits (virtio 1.2 2.1).
pub mod status {
    use virtio_bindings::virtio_config as c;
    /// The driver noticed the device.
    pub const ACKNOWLEDGE: u8 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    /// The driver knows how to drive it.
    pub const DRIVER: u8 = c::VIRTIO_CONFIG_S_DRIVER as u8;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = c::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = c::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    /// The device needs a reset.
    pub const DEVICE_NEEDS_RESET: u8 = c::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    /// The driver gave up.
    pub const FAILED: u8 = c::VIRTIO_CONFIG_S_FAILED as u8;
}

/// Offsets in the common configuration structure (virtio 1.2 4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Smallest common configuration this driver can use (up to `queue_device`).
    pub const MIN_LEN: u64 = 0x38;
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The vfio-user client failed.
    #[error("vfio-user: {0}")]
    Client(#[from] ClientError),
    /// A local system call failed (memfd, mmap, eventfd, poll).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The status register does not announce a capability list.
    #[error("the device has no PCI capability list")]
    NoCapabilityList,
    /// The capability list is malformed (loop, pointer or length out of range).
    #[error("capability at {offset:#x}: {why}")]
    BadCapability {
        /// Config space offset of the capability (or of the pointer to it).
        offset: u16,
        /// What is wrong.
        why: String,
    },
    /// A capability the driver needs is absent.
    #[error("the device has no {0} capability")]
    MissingCapability(&'static str),
    /// A structure does not fit in the BAR it names, or the BAR is not usable.
    #[error("BAR {bar}: {why}")]
    BadRegion {
        /// The BAR.
        bar: u8,
        /// What is wrong.
        why: String,
    },
    /// The device did not read back 0 after a reset within the timeout.
    #[error("device status still {0:#x} after reset")]
    ResetTimeout(u8),
    /// The device does not offer VIRTIO_F_VERSION_1 (legacy-only device).
    #[error("device does not offer VIRTIO_F_VERSION_1 (offered {offered:#x})")]
    NotModern {
        /// What the device offered.
        offered: u64,
    },
    /// The device cleared FEATURES_OK: it refused the negotiated features.
    #[error("device refused features {features:#x} (status {status:#x})")]
    FeaturesRefused {
        /// The features written.
        features: u64,
        /// The status read back.
        status: u8,
    },
    /// The device set DEVICE_NEEDS_RESET.
    #[error("device needs reset (status {0:#x})")]
    NeedsReset(u8),
    /// The device has no queue with this index.
    #[error("no queue {0}")]
    NoSuchQueue(u16),
    /// The device reports a maximum size of 0 for a queue.
    #[error("queue {0} is unavailable (size 0)")]
    QueueSizeZero(u16),
    /// The device answered NO_VECTOR when given an MSI-X vector.
    #[error("device rejected MSI-X vector {vector} for {what}")]
    VectorRejected {
        /// "config" or "queue N".
        what: String,
        /// The vector.
        vector: u16,
    },
    /// Fewer MSI-X vectors than config + queues.
    #[error("{needed} MSI-X vectors needed, the device has {available}")]
    NotEnoughVectors {
        /// Vectors needed.
        needed: u32,
        /// Vectors offered (the smaller of the capability's table size and the irq count).
        available: u32,
    },
    /// The queue has fewer free descriptors than the chain needs.
    #[error("queue {queue} full: chain needs {needed} descriptors, {free} free")]
    QueueFull {
        /// The queue.
        queue: u16,
        /// Descriptors the chain needs.
        needed: usize,
        /// Free descriptors.
        free: u16,
    },
    /// A chain the caller built is not acceptable.
    #[error("invalid chain: {0}")]
    InvalidChain(String),
    /// The device wrote something into a ring that breaks the protocol.
    #[error("queue {queue}: device protocol violation: {why}")]
    Device {
        /// The queue.
        queue: u16,
        /// What the device did.
        why: String,
    },
    /// Nothing happened within the timeout.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// Driver memory: out of space, out of range, bad free.
    #[error("driver memory: {0}")]
    Memory(String),
    /// The driver runs without interrupts (`msix: false`).
    #[error("interrupts are not set up")]
    NoInterrupts,
    /// `NotifyMode::Mmap` was asked for but the notify area is not mappable.
    #[error("notify area not mappable: {0}")]
    NotifyNotMappable(String),
    /// An option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The device is not initialized (call `init`).
    #[error("device not initialized")]
    NotInitialized,
}

/// Result of driver operations.
pub type DriverResult<T> = Result<T, DriverError>;

fn bad_cap(offset: u16, why: impl Into<String>) -> DriverError {
    DriverError::BadCapability {
        offset,
        why: why.into(),
    }
}

fn mem_err(e: impl std::fmt::Display) -> DriverError {
    DriverError::Memory(e.to_string())
}

// ---------------------------------------------------------------------------------------
// Config space and capabilities
// ---------------------------------------------------------------------------------------

/// Where the capability walker reads PCI config space from.
pub trait ConfigSource {
    /// Fill `buf` from config space at `offset`.
    fn read_config(&mut self, offset: u16, buf: &mut [u8]) -> DriverResult<()>;
}

impl ConfigSource for VfioUserClient {
    fn read_config(&mut self, offset: u16, buf: &mut [u8]) -> DriverResult<()> {
        Ok(self.region_read(CONFIG_REGION, u64::from(offset), buf)?)
    }
}

/// A config space snapshot; reads past its end fail.
impl ConfigSource for [u8] {
    fn read_config(&mut self, offset: u16, buf: &mut [u8]) -> DriverResult<()> {
        let start = usize::from(offset);
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| bad_cap(offset, "read beyond the config space snapshot"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fn cfg_u16(src: &mut (impl ConfigSource + ?Sized), offset: u16) -> DriverResult<u16> {
    let mut b = [0u8; 2];
    src.read_config(offset, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// One virtio vendor capability (`struct virtio_pci_cap`, virtio 1.2 4.1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    /// Config space offset of the capability.
    pub cap_offset: u8,
    /// `cfg_type`.
    pub cfg_type: u8,
    /// The BAR the structure lives in (region index).
    pub bar: u8,
    /// `id` (distinguishes several structures of one type).
    pub id: u8,
    /// Offset of the structure in the BAR.
    pub offset: u32,
    /// Length of the structure.
    pub length: u32,
}

/// The notification capability (`struct virtio_pci_notify_cap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyCap {
    /// The structure.
    pub cap: VirtioCap,
    /// `notify_off_multiplier`.
    pub multiplier: u32,
}

/// The MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    /// Config space offset of the capability.
    pub cap_offset: u8,
    /// Message control as found.
    pub control: u16,
    /// Number of table entries (vectors).
    pub table_size: u16,
    /// BAR of the table.
    pub table_bar: u8,
    /// Offset of the table in its BAR.
    pub table_offset: u32,
    /// BAR of the pending bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR.
    pub pba_offset: u32,
}

/// What the capability walk found: the first usable capability of each kind, in list
/// order (the device's order of preference, virtio 1.2 4.1.4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PciCaps {
    /// Common configuration.
    pub common: Option<VirtioCap>,
    /// Notifications.
    pub notify: Option<NotifyCap>,
    /// ISR status.
    pub isr: Option<VirtioCap>,
    /// Device-specific configuration.
    pub device: Option<VirtioCap>,
    /// PCI configuration access window.
    pub pci_cfg: Option<VirtioCap>,
    /// MSI-X.
    pub msix: Option<MsixCap>,
    /// Config space offsets of every capability visited, with their IDs.
    pub visited: Vec<(u8, u8)>,
}

/// Walk the PCI capability list of `src` (standard 256-byte config space) and collect the
/// virtio and MSI-X capabilities. Fails on a malformed list (pointers into the header or
/// past the end, loops, capabilities running past the end); ignores vendor capabilities
/// that are too short, name a reserved BAR, or have an unknown type.
pub fn walk_capabilities(src: &mut (impl ConfigSource + ?Sized)) -> DriverResult<PciCaps> {
    let status = cfg_u16(src, PCI_STATUS)?;
    if status & PCI_STATUS_CAP_LIST == 0 {
        return Err(DriverError::NoCapabilityList);
    }
    let mut ptr_byte = [0u8; 1];
    src.read_config(PCI_CAPABILITY_LIST, &mut ptr_byte)?;
    let mut caps = PciCaps::default();
    let mut ptr = u16::from(ptr_byte[0]) & !3;
    let mut from = PCI_CAPABILITY_LIST;
    let mut seen = [false; PCI_CONFIG_SIZE / 4];
    while ptr != 0 {
        if ptr < PCI_STD_HEADER_END || usize::from(ptr) + 2 > PCI_CONFIG_SIZE {
            return Err(bad_cap(from, format!("points to {ptr:#x}")));
        }
        let slot = usize::from(ptr / 4);
        if seen[slot] {
            return Err(bad_cap(ptr, "capability list loops"));
        }
        seen[slot] = true;
        let mut hdr = [0u8; 2];
        src.read_config(ptr, &mut hdr)?;
        let (id, next) = (hdr[0], u16::from(hdr[1]) & !3);
        caps.visited.push((ptr as u8, id));
        match id {
            PCI_CAP_ID_VNDR => walk_vendor(src, ptr, &mut caps)?,
            PCI_CAP_ID_MSIX if caps.msix.is_none() => {
                if usize::from(ptr) + 12 > PCI_CONFIG_SIZE {
                    return Err(bad_cap(ptr, "MSI-X capability runs past config space"));
                }
                let mut b = [0u8; 12];
                src.read_config(ptr, &mut b)?;
                let control = u16::from_le_bytes([b[2], b[3]]);
                let table = le_u32(&b, 4);
                let pba = le_u32(&b, 8);
                caps.msix = Some(MsixCap {
                    cap_offset: ptr as u8,
                    control,
                    table_size: (control & MSIX_CONTROL_QSIZE) + 1,
                    table_bar: (table & 7) as u8,
                    table_offset: table & !7,
                    pba_bar: (pba & 7) as u8,
                    pba_offset: pba & !7,
                });
            }
            _ => {}
        }
        from = ptr + 1;
        ptr = next;
    }
    Ok(caps)
}

fn walk_vendor(
    src: &mut (impl ConfigSource + ?Sized),
    ptr: u16,
    caps: &mut PciCaps,
) -> DriverResult<()> {
    let mut lenb = [0u8; 2];
    src.read_config(ptr + 2, &mut lenb)?;
    let (cap_len, cfg_type) = (usize::from(lenb[0]), lenb[1]);
    if usize::from(ptr) + cap_len > PCI_CONFIG_SIZE {
        return Err(bad_cap(
            ptr,
            format!("cap_len {cap_len} runs past config space"),
        ));
    }
    let need = match cfg_type {
        VIRTIO_PCI_CAP_NOTIFY_CFG | VIRTIO_PCI_CAP_PCI_CFG => VIRTIO_PCI_CAP_EXT_LEN,
        VIRTIO_PCI_CAP_COMMON_CFG | VIRTIO_PCI_CAP_ISR_CFG | VIRTIO_PCI_CAP_DEVICE_CFG => {
            VIRTIO_PCI_CAP_LEN
        }
        _ => return Ok(()), // Reserved or not ours (shared memory, vendor data): ignore.
    };
    if cap_len < need {
        warn!(
            "virtio capability at {ptr:#x} (type {cfg_type}): cap_len {cap_len} < {need}; ignored"
        );
        return Ok(());
    }
    let mut b = [0u8; VIRTIO_PCI_CAP_EXT_LEN];
    src.read_config(ptr, &mut b[..need])?;
    let cap = VirtioCap {
        cap_offset: ptr as u8,
        cfg_type,
        bar: b[4],
        id: b[5],
        offset: le_u32(&b, 8),
        length: le_u32(&b, 12),
    };
    if cfg_type != VIRTIO_PCI_CAP_PCI_CFG && cap.bar > 5 {
        warn!(
            "virtio capability at {ptr:#x}: reserved BAR {}; ignored",
            cap.bar
        );
        return Ok(());
    }
    match cfg_type {
        VIRTIO_PCI_CAP_COMMON_CFG => {
            caps.common.get_or_insert(cap);
        }
        VIRTIO_PCI_CAP_NOTIFY_CFG => {
            caps.notify.get_or_insert(NotifyCap {
                cap,
                multiplier: le_u32(&b, 16),
            });
        }
        VIRTIO_PCI_CAP_ISR_CFG => {
            caps.isr.get_or_insert(cap);
        }
        VIRTIO_PCI_CAP_DEVICE_CFG => {
            caps.device.get_or_insert(cap);
        }
        _ => {
            caps.pci_cfg.get_or_insert(cap);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Driver memory
// ---------------------------------------------------------------------------------------

/// A chunk of driver memory handed out by [`DriverMemory::alloc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaBuffer {
    /// Its IOVA (the address the device uses).
    pub iova: u64,
    /// Its length.
    pub len: u64,
}

/// First-fit allocator over `[base, base + size)` with coalescing frees.
#[derive(Debug)]
struct Allocator {
    /// Free ranges, start -> length.
    free: BTreeMap<u64, u64>,
    /// Allocated ranges, start -> length.
    used: BTreeMap<u64, u64>,
}

impl Allocator {
    fn new(base: u64, size: u64) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(base, size);
        }
        Allocator {
            free,
            used: BTreeMap::new(),
        }
    }

    fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        if len == 0 || !align.is_power_of_two() {
            return None;
        }
        let (start, flen, at) = self.free.iter().find_map(|(&start, &flen)| {
            let at = start.checked_next_multiple_of(align)?;
            let end = start + flen;
            (at.checked_add(len)? <= end).then_some((start, flen, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        let tail = start + flen - (at + len);
        if tail > 0 {
            self.free.insert(at + len, tail);
        }
        self.used.insert(at, len);
        Some(at)
    }

    /// Free the chunk at `start`; returns its length.
    fn free(&mut self, start: u64) -> Option<u64> {
        let len = self.used.remove(&start)?;
        let (mut s, mut l) = (start, len);
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                s = ps;
                l += pl;
            }
        }
        if let Some(nl) = self.free.remove(&(start + len)) {
            l += nl;
        }
        self.free.insert(s, l);
        Some(len)
    }

    fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }
}

struct MemoryInner {
    mem: GuestMemoryMmap,
    file: File,
    base: u64,
    size: u64,
    alloc: Mutex<Allocator>,
}

/// Driver memory: a memfd mapped into this process (`MAP_SHARED`) and visible to the
/// device at `[iova_base, iova_base + size)`. Cheap to clone (shared).
///
/// Every access is bounds-checked through vm-memory. Ring fields are accessed with
/// atomic loads and stores; buffer contents with plain (volatile) copies.
#[derive(Clone)]
pub struct DriverMemory {
    inner: Arc<MemoryInner>,
}

impl std::fmt::Debug for DriverMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverMemory")
            .field("iova_base", &format_args!("{:#x}", self.inner.base))
            .field("size", &self.inner.size)
            .finish()
    }
}

fn memfd(name: &str, size: u64) -> io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: memfd_create with a valid NUL-terminated name; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

const PAGE_SIZE: u64 = 4096;

impl DriverMemory {
    /// Create `size` bytes (a multiple of 4 KiB) of memory at `iova_base` (4 KiB aligned).
    pub fn new(size: u64, iova_base: u64) -> DriverResult<Self> {
        if size == 0 || size % PAGE_SIZE != 0 || iova_base % PAGE_SIZE != 0 {
            return Err(DriverError::InvalidOption(format!(
                "memory size {size:#x} / IOVA base {iova_base:#x} must be non-zero multiples of 4 KiB"
            )));
        }
        if iova_base.checked_add(size).is_none() || usize::try_from(size).is_err() {
            return Err(DriverError::InvalidOption(format!(
                "memory {iova_base:#x}+{size:#x} overflows"
            )));
        }
        let file = memfd("unidev-virtio-driver", size)?;
        let region = MmapRegion::from_file(FileOffset::new(file.try_clone()?, 0), size as usize)
            .map_err(mem_err)?;
        let region = GuestRegionMmap::new(region, GuestAddress(iova_base))
            .ok_or_else(|| mem_err("region overflows"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(mem_err)?;
        Ok(DriverMemory {
            inner: Arc::new(MemoryInner {
                mem,
                file,
                base: iova_base,
                size,
                alloc: Mutex::new(Allocator::new(iova_base, size)),
            }),
        })
    }

    /// The IOVA of the first byte.
    pub fn iova_base(&self) -> u64 {
        self.inner.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The memfd behind it (offset 0 is `iova_base`).
    pub fn file(&self) -> &File {
        &self.inner.file
    }

    /// The memory as vm-memory guest memory (addresses are IOVAs).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.inner.mem
    }

    fn allocator(&self) -> MutexGuard<'_, Allocator> {
        self.inner.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocate `len` zeroed bytes aligned to `align` (a power of two).
    pub fn alloc(&self, len: u64, align: u64) -> DriverResult<DmaBuffer> {
        if !align.is_power_of_two() || len == 0 {
            return Err(DriverError::Memory(format!(
                "cannot allocate {len} bytes aligned to {align}"
            )));
        }
        // The allocator's guard must be gone before the error path asks it again.
        let got = self.allocator().alloc(len, align);
        let iova = got.ok_or_else(|| {
            DriverError::Memory(format!(
                "no room for {len} bytes aligned to {align} ({} bytes free)",
                self.free_bytes()
            ))
        })?;
        let buf = DmaBuffer { iova, len };
        self.fill(iova, len, 0)?;
        Ok(buf)
    }

    /// Return a buffer from [`alloc`](Self::alloc).
    pub fn free(&self, buf: DmaBuffer) -> DriverResult<()> {
        let mut a = self.allocator();
        match a.used.get(&buf.iova) {
            Some(&len) if len == buf.len => {
                a.free(buf.iova);
                Ok(())
            }
            _ => Err(DriverError::Memory(format!(
                "free of {:#x}+{:#x}, which is not an allocation",
                buf.iova, buf.len
            ))),
        }
    }

    /// Bytes not allocated (possibly fragmented).
    pub fn free_bytes(&self) -> u64 {
        self.allocator().free_bytes()
    }

    /// Whether `[iova, iova + len)` lies inside this memory.
    pub fn contains(&self, iova: u64, len: u64) -> bool {
        iova >= self.inner.base
            && iova
                .checked_add(len)
                .is_some_and(|end| end <= self.inner.base + self.inner.size)
    }

    fn check(&self, iova: u64, len: u64) -> DriverResult<()> {
        if self.contains(iova, len) {
            Ok(())
        } else {
            Err(DriverError::Memory(format!(
                "{iova:#x}+{len:#x} is outside {:#x}+{:#x}",
                self.inner.base, self.inner.size
            )))
        }
    }

    /// Store `data` at `iova`.
    pub fn write(&self, iova: u64, data: &[u8]) -> DriverResult<()> {
        self.check(iova, data.len() as u64)?;
        self.inner
            .mem
            .write_slice(data, GuestAddress(iova))
            .map_err(mem_err)
    }

    /// Fill `buf` from `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> DriverResult<()> {
        self.check(iova, buf.len() as u64)?;
        self.inner
            .mem
            .read_slice(buf, GuestAddress(iova))
            .map_err(mem_err)
    }

    /// Set `len` bytes at `iova` to `byte`.
    pub fn fill(&self, iova: u64, len: u64, byte: u8) -> DriverResult<()> {
        self.volatile_slice(iova, len)?.copy_from(&[byte; 0][..]);
        let chunk = [byte; 4096];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(chunk.len() as u64);
            self.write(iova + off, &chunk[..n as usize])?;
            off += n;
        }
        Ok(())
    }

    /// Volatile access to `[iova, iova + len)`.
    pub fn volatile_slice(&self, iova: u64, len: u64) -> DriverResult<VolatileSlice<'_, ()>> {
        self.check(iova, len)?;
        self.inner
            .mem
            .get_slice(GuestAddress(iova), len as usize)
            .map_err(mem_err)
    }

    /// The bytes of `[iova, iova + len)` as a plain slice.
    ///
    /// # Safety
    ///
    /// The device may read and write this memory at any time. The caller must make sure
    /// that no device access to the range is in flight (the buffer is not part of a chain
    /// the device still owns) and that no other reference to the range exists while the
    /// slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self, iova: u64, len: u64) -> DriverResult<&mut [u8]> {
        let s = self.volatile_slice(iova, len)?;
        let ptr = s.ptr_guard_mut().as_ptr();
        // SAFETY: `ptr` points to `len` bytes of our mapping (checked above), which lives as
        // long as `self`; exclusivity is the caller's contract (see `# Safety`).
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) })
    }

    fn load_u16(&self, iova: u64) -> DriverResult<u16> {
        self.inner
            .mem
            .load::<u16>(GuestAddress(iova), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(mem_err)
    }

    fn store_u16(&self, iova: u64, v: u16) -> DriverResult<()> {
        self.inner
            .mem
            .store(v.to_le(), GuestAddress(iova), Ordering::Release)
            .map_err(mem_err)
    }
}

/// Serves the device's DMA_READ/DMA_WRITE (maps without an fd) from this memory.
impl DmaTarget for DriverMemory {
    fn read(&mut self, address: u64, buf: &mut [u8]) -> Result<(), i32> {
        DriverMemory::read(self, address, buf).map_err(|_| libc::EFAULT)
    }

    fn write(&mut self, address: u64, data: &[u8]) -> Result<(), i32> {
        DriverMemory::write(self, address, data).map_err(|_| libc::EFAULT)
    }
}

// ---------------------------------------------------------------------------------------
// Split virtqueues
// ---------------------------------------------------------------------------------------

/// Sizes and field offsets of a split virtqueue's three parts (virtio 1.2 2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitRingLayout {
    /// Queue size (descriptors).
    pub size: u16,
}

impl SplitRingLayout {
    /// Alignment of the descriptor table.
    pub const DESC_ALIGN: u64 = virtio_ring::VRING_DESC_ALIGN_SIZE as u64;
    /// Alignment of the available (driver) ring.
    pub const AVAIL_ALIGN: u64 = virtio_ring::VRING_AVAIL_ALIGN_SIZE as u64;
    /// Alignment of the used (device) ring.
    pub const USED_ALIGN: u64 = virtio_ring::VRING_USED_ALIGN_SIZE as u64;
    /// Bytes per descriptor.
    pub const DESC_SIZE: u64 = 16;
    /// Bytes per used element.
    pub const USED_ELEM_SIZE: u64 = 8;

    /// The layout of a queue of `size` descriptors (a power of two, at most 32768).
    pub fn new(size: u16) -> DriverResult<Self> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(DriverError::InvalidOption(format!(
                "queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}"
            )));
        }
        Ok(SplitRingLayout { size })
    }

    /// Bytes of the descriptor table.
    pub fn desc_table_size(&self) -> u64 {
        Self::DESC_SIZE * u64::from(self.size)
    }

    /// Bytes of the available ring: flags, idx, `ring[size]`, used_event.
    pub fn avail_ring_size(&self) -> u64 {
        6 + 2 * u64::from(self.size)
    }

    /// Bytes of the used ring: flags, idx, `ring[size]` (id, len), avail_event.
    pub fn used_ring_size(&self) -> u64 {
        6 + Self::USED_ELEM_SIZE * u64::from(self.size)
    }

    /// Offset of descriptor `i` in the table.
    pub fn desc_offset(&self, i: u16) -> u64 {
        Self::DESC_SIZE * u64::from(i)
    }

    /// Offset of `avail.ring[slot]`.
    pub fn avail_entry_offset(&self, slot: u16) -> u64 {
        4 + 2 * u64::from(slot)
    }

    /// Offset of `avail.used_event`.
    pub fn used_event_offset(&self) -> u64 {
        4 + 2 * u64::from(self.size)
    }

    /// Offset of `used.ring[slot]`.
    pub fn used_entry_offset(&self, slot: u16) -> u64 {
        4 + Self::USED_ELEM_SIZE * u64::from(slot)
    }

    /// Offset of `used.avail_event`.
    pub fn avail_event_offset(&self) -> u64 {
        4 + Self::USED_ELEM_SIZE * u64::from(self.size)
    }
}

/// Offset of the `flags` field in both rings.
const RING_FLAGS: u64 = 0;
/// Offset of the `idx` field in both rings.
const RING_IDX: u64 = 2;
/// Rings are placed on cache-line boundaries (more than the spec's alignment).
const RING_PLACEMENT_ALIGN: u64 = 64;

/// `vring_need_event` (virtio 1.2 2.7.10): with EVENT_IDX, whether moving an index from
/// `old` to `new` passes `event` (the other side asked to be told when the entry at
/// `event` is filled). All arithmetic is modulo 2^16.
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A chain in flight: its length and the bytes the device may write.
#[derive(Clone, Copy, Debug, Default)]
struct InFlight {
    len: u16,
    writable: u64,
}

/// The driver side of one split virtqueue in [`DriverMemory`].
///
/// The descriptor free list and the chains in flight are kept in driver-private shadow
/// state, never read back from shared memory, so a misbehaving device cannot corrupt
/// them; what the device writes (used entries, used index) is checked before use.
#[derive(Debug)]
pub struct Virtqueue {
    index: u16,
    layout: SplitRingLayout,
    mem: DriverMemory,
    desc: DmaBuffer,
    avail: DmaBuffer,
    used: DmaBuffer,
    event_idx: bool,
    interrupts: bool,
    /// Shadow `next` links: the free list, and the chains in flight.
    next: Vec<u16>,
    free_head: u16,
    num_free: u16,
    in_flight: Vec<InFlight>,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    notify_offset: u64,
}

impl Virtqueue {
    /// Allocate and zero the rings of queue `index` with `size` descriptors in `mem`.
    /// `event_idx` says whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub fn new(mem: &DriverMemory, index: u16, size: u16, event_idx: bool) -> DriverResult<Self> {
        let layout = SplitRingLayout::new(size)?;
        let desc = mem.alloc(
            layout.desc_table_size(),
            RING_PLACEMENT_ALIGN.max(SplitRingLayout::DESC_ALIGN),
        )?;
        let avail = match mem.alloc(
            layout.avail_ring_size(),
            RING_PLACEMENT_ALIGN.max(SplitRingLayout::AVAIL_ALIGN),
        ) {
            Ok(b) => b,
            Err(e) => {
                let _ = mem.free(desc);
                return Err(e);
            }
        };
        let used = match mem.alloc(
            layout.used_ring_size(),
            RING_PLACEMENT_ALIGN.max(SplitRingLayout::USED_ALIGN),
        ) {
            Ok(b) => b,
            Err(e) => {
                let _ = mem.free(desc);
                let _ = mem.free(avail);
                return Err(e);
            }
        };
        let n = usize::from(size);
        Ok(Virtqueue {
            index,
            layout,
            mem: mem.clone(),
            desc,
            avail,
            used,
            event_idx,
            interrupts: true,
            next: (1..=n).map(|i| (i % n) as u16).collect(),
            free_head: 0,
            num_free: size,
            in_flight: vec![InFlight::default(); n],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            notify_offset: 0,
        })
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Ring layout.
    pub fn layout(&self) -> SplitRingLayout {
        self.layout
    }

    /// IOVA of the descriptor table.
    pub fn desc_iova(&self) -> u64 {
        self.desc.iova
    }

    /// IOVA of the available (driver) ring.
    pub fn avail_iova(&self) -> u64 {
        self.avail.iova
    }

    /// IOVA of the used (device) ring.
    pub fn used_iova(&self) -> u64 {
        self.used.iova
    }

    /// Whether EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains the device has not returned yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|c| c.len > 0).count()
    }

    /// The driver's available index (chains published so far, modulo 2^16).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The next used index the driver will consume.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Offset of this queue's notify address in the notify BAR.
    pub fn notify_offset(&self) -> u64 {
        self.notify_offset
    }

    /// Give the rings back to `mem` (after the device stopped using them).
    fn release(self) {
        for b in [self.desc, self.avail, self.used] {
            let _ = self.mem.free(b);
        }
    }

    /// Put a chain of `(iova, len, device_writable)` buffers on the available ring and
    /// publish it; returns its head descriptor. Device-readable buffers must come before
    /// device-writable ones (virtio 1.2 2.7.4.2) and lie inside driver memory. Does not
    /// notify: see [`kick_prepare`](Self::kick_prepare) / [`VirtioPciDriver::kick`].
    pub fn add_chain(&mut self, chain: &[(u64, u32, bool)]) -> DriverResult<u16> {
        if chain.is_empty() {
            return Err(DriverError::InvalidChain("empty chain".into()));
        }
        if chain.len() > usize::from(self.layout.size) {
            return Err(DriverError::InvalidChain(format!(
                "{} buffers, the queue has {} descriptors",
                chain.len(),
                self.layout.size
            )));
        }
        if chain.len() > usize::from(self.num_free) {
            return Err(DriverError::QueueFull {
                queue: self.index,
                needed: chain.len(),
                free: self.num_free,
            });
        }
        let mut writable = 0u64;
        let mut seen_writable = false;
        for &(iova, len, w) in chain {
            if !w && seen_writable {
                return Err(DriverError::InvalidChain(
                    "a device-readable buffer follows a device-writable one".into(),
                ));
            }
            seen_writable |= w;
            if !self.mem.contains(iova, u64::from(len)) {
                return Err(DriverError::InvalidChain(format!(
                    "buffer {iova:#x}+{len:#x} is outside driver memory"
                )));
            }
            if w {
                writable += u64::from(len);
            }
        }
        let head = self.free_head;
        let mut d = head;
        for (i, &(iova, len, w)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let next = self.next[usize::from(d)];
            let mut flags = 0u16;
            if !last {
                flags |= virtio_ring::VRING_DESC_F_NEXT as u16;
            }
            if w {
                flags |= virtio_ring::VRING_DESC_F_WRITE as u16;
            }
            let mut e = [0u8; 16];
            e[0..8].copy_from_slice(&iova.to_le_bytes());
            e[8..12].copy_from_slice(&len.to_le_bytes());
            e[12..14].copy_from_slice(&flags.to_le_bytes());
            e[14..16].copy_from_slice(&(if last { 0 } else { next }).to_le_bytes());
            self.mem
                .write(self.desc.iova + self.layout.desc_offset(d), &e)?;
            if !last {
                d = next;
            }
        }
        // `d` is the chain's last descriptor; the free list continues after it.
        self.free_head = self.next[usize::from(d)];
        self.num_free -= chain.len() as u16;
        self.in_flight[usize::from(head)] = InFlight {
            len: chain.len() as u16,
            writable,
        };
        let slot = self.avail_idx & (self.layout.size - 1);
        self.mem
            .store_u16(self.avail.iova + self.layout.avail_entry_offset(slot), head)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Descriptors and the ring entry before the index (release store).
        fence(Ordering::Release);
        self.mem
            .store_u16(self.avail.iova + RING_IDX, self.avail_idx)?;
        Ok(head)
    }

    /// Decide whether the device wants a notification for the chains published since
    /// the last call: with EVENT_IDX, `vring_need_event(avail_event, new, old)`; without,
    /// unless the device set VIRTQ_USED_F_NO_NOTIFY.
    pub fn kick_prepare(&mut self) -> DriverResult<bool> {
        // The avail index store must be visible before we read the device's suppression
        // state (store -> load ordering).
        fence(Ordering::SeqCst);
        let (old, new) = (self.kicked_idx, self.avail_idx);
        self.kicked_idx = new;
        if old == new {
            return Ok(false);
        }
        if self.event_idx {
            let event = self
                .mem
                .load_u16(self.used.iova + self.layout.avail_event_offset())?;
            Ok(vring_need_event(event, new, old))
        } else {
            let flags = self.mem.load_u16(self.used.iova + RING_FLAGS)?;
            Ok(flags & virtio_ring::VRING_USED_F_NO_NOTIFY as u16 == 0)
        }
    }

    fn used_idx(&self) -> DriverResult<u16> {
        self.mem.load_u16(self.used.iova + RING_IDX)
    }

    /// Whether the device has returned chains not consumed yet.
    pub fn has_used(&self) -> DriverResult<bool> {
        Ok(self.used_idx()? != self.last_used)
    }

    /// Take the next used chain: `(head, len)` with `len` the bytes the device says it
    /// wrote. Its descriptors go back to the free list. Fails, after recycling what it
    /// safely can, if the device returned something it does not own.
    pub fn poll_used(&mut self) -> DriverResult<Option<(u16, u32)>> {
        let used_idx = self.used_idx()?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let outstanding = self.layout.size - self.num_free;
        if used_idx.wrapping_sub(self.last_used) > outstanding {
            return Err(self.device_error(format!(
                "used index moved from {} to {used_idx} with {outstanding} descriptors out",
                self.last_used
            )));
        }
        // The element is read after the index (the load above is an acquire).
        fence(Ordering::Acquire);
        let slot = self.last_used & (self.layout.size - 1);
        let mut e = [0u8; 8];
        self.mem
            .read(self.used.iova + self.layout.used_entry_offset(slot), &mut e)?;
        let id = le_u32(&e, 0);
        let len = le_u32(&e, 4);
        self.last_used = self.last_used.wrapping_add(1);
        if self.interrupts && self.event_idx {
            // Ask for an interrupt when the next entry is used.
            self.mem.store_u16(
                self.avail.iova + self.layout.used_event_offset(),
                self.last_used,
            )?;
            fence(Ordering::SeqCst);
        }
        let head = match u16::try_from(id) {
            Ok(h) if h < self.layout.size && self.in_flight[usize::from(h)].len > 0 => h,
            _ => return Err(self.device_error(format!("used id {id} is not a chain in flight"))),
        };
        let chain = std::mem::take(&mut self.in_flight[usize::from(head)]);
        let mut last = head;
        for _ in 1..chain.len {
            last = self.next[usize::from(last)];
        }
        self.next[usize::from(last)] = self.free_head;
        self.free_head = head;
        self.num_free += chain.len;
        if u64::from(len) > chain.writable {
            return Err(self.device_error(format!(
                "used len {len} for head {head} exceeds its {} writable bytes",
                chain.writable
            )));
        }
        Ok(Some((head, len)))
    }

    fn device_error(&self, why: String) -> DriverError {
        DriverError::Device {
            queue: self.index,
            why,
        }
    }

    /// Ask the device for used-buffer notifications again (VRING_AVAIL_F_NO_INTERRUPT
    /// cleared; with EVENT_IDX, `used_event` set to the next entry). Returns whether
    /// used chains are already waiting, in which case no interrupt may come for them.
    pub fn enable_interrupts(&mut self) -> DriverResult<bool> {
        self.interrupts = true;
        if self.event_idx {
            self.mem.store_u16(
                self.avail.iova + self.layout.used_event_offset(),
                self.last_used,
            )?;
        } else {
            self.mem.store_u16(self.avail.iova + RING_FLAGS, 0)?;
        }
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// Ask the device not to interrupt (a hint: it may still do so). With EVENT_IDX
    /// `used_event` is moved as far back as it goes.
    pub fn disable_interrupts(&mut self) -> DriverResult<()> {
        self.interrupts = false;
        if self.event_idx {
            self.mem.store_u16(
                self.avail.iova + self.layout.used_event_offset(),
                self.last_used.wrapping_sub(1),
            )
        } else {
            self.mem.store_u16(
                self.avail.iova + RING_FLAGS,
                virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16,
            )
        }
    }
}

// ---------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------

/// How notifications (kicks) reach the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NotifyMode {
    /// REGION_WRITE with No_reply, as QEMU does for MMIO BARs.
    #[default]
    Posted,
    /// REGION_WRITE waiting for the server's acknowledgement.
    Acknowledged,
    /// A store into the notify area mmapped from the region fd (the device must make the
    /// notify range mappable, through sparse-mmap areas or the whole region).
    Mmap,
}

/// Options of [`VirtioPciDriver`].
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Features the driver wants; it negotiates `wanted & offered`. VIRTIO_F_VERSION_1
    /// is always added, and [`UNSUPPORTED_FEATURES`] always removed.
    pub features: u64,
    /// Queue size to use (a power of two; capped at the device maximum). 0: the device
    /// maximum (rounded down to a power of two).
    pub queue_size: u16,
    /// How many queues to set up, from 0. `None`: all the device has.
    pub num_queues: Option<u16>,
    /// How notifications are sent.
    pub notify: NotifyMode,
    /// Use MSI-X (an eventfd per vector). Without it the rings must be polled.
    pub msix: bool,
    /// Size of driver memory in bytes.
    pub memory_size: u64,
    /// IOVA of driver memory.
    pub iova_base: u64,
    /// DMA_MAP with the memfd (the device accesses memory directly). Without, the device
    /// reaches memory through DMA_READ/DMA_WRITE messages served by the client.
    pub map_with_fd: bool,
    /// How long a reset may take.
    pub reset_timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            features: VIRTIO_F_VERSION_1,
            queue_size: 256,
            num_queues: None,
            notify: NotifyMode::Posted,
            msix: true,
            memory_size: 64 << 20,
            iova_base: 0x1_0000_0000,
            map_with_fd: true,
            reset_timeout: Duration::from_secs(1),
        }
    }
}

/// `wanted & offered`, with VERSION_1 added to what is wanted and unsupported features
/// removed. Fails when the device does not offer VERSION_1.
pub fn negotiate_features(wanted: u64, offered: u64) -> DriverResult<u64> {
    if offered & VIRTIO_F_VERSION_1 == 0 {
        return Err(DriverError::NotModern { offered });
    }
    Ok((wanted | VIRTIO_F_VERSION_1) & !UNSUPPORTED_FEATURES & offered)
}

/// The queue size to use: `requested` (0 = as large as possible) capped at the device's
/// `max`, rounded down to a power of two.
pub fn choose_queue_size(queue: u16, requested: u16, max: u16) -> DriverResult<u16> {
    if max == 0 {
        return Err(DriverError::QueueSizeZero(queue));
    }
    if requested != 0 && !requested.is_power_of_two() {
        return Err(DriverError::InvalidOption(format!(
            "queue size {requested} is not a power of two"
        )));
    }
    let want = if requested == 0 {
        MAX_QUEUE_SIZE
    } else {
        requested
    };
    let n = want.min(max).min(MAX_QUEUE_SIZE);
    Ok(1 << (15 - n.leading_zeros().min(15)))
}

/// A structure in a BAR, bounds-checked.
#[derive(Clone, Copy, Debug)]
struct Window {
    bar: u8,
    offset: u64,
    length: u64,
}

impl Window {
    fn at(&self, off: u64, len: usize) -> DriverResult<u64> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.length => Ok(self.offset + off),
            _ => Err(DriverError::BadRegion {
                bar: self.bar,
                why: format!(
                    "access {off:#x}+{len} outside the {:#x}-byte structure",
                    self.length
                ),
            }),
        }
    }
}

/// A mapped piece of the notify region.
struct NotifyMap {
    /// Region offset of the first mapped byte.
    start: u64,
    map: MmapRegion,
}

/// A virtio-pci driver bound to one vfio-user connection.
pub struct VirtioPciDriver {
    client: VfioUserClient,
    opts: DriverOptions,
    caps: PciCaps,
    vendor_id: u16,
    device_id: u16,
    common: Window,
    notify: Window,
    notify_multiplier: u32,
    isr: Window,
    device_cfg: Option<Window>,
    notify_maps: Vec<NotifyMap>,
    /// Per queue: index into `notify_maps` and offset in that map.
    notify_slots: Vec<Option<(usize, usize)>>,
    memory: DriverMemory,
    irq_fds: Vec<EventFd>,
    features: u64,
    queues: Vec<Virtqueue>,
    device_queues: u16,
    initialized: bool,
}

impl std::fmt::Debug for VirtioPciDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDriver")
            .field("vendor_id", &format_args!("{:#06x}", self.vendor_id))
            .field("device_id", &format_args!("{:#06x}", self.device_id))
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues.len())
            .field("initialized", &self.initialized)
            .finish()
    }
}

fn region_window(
    client: &mut VfioUserClient,
    sizes: &mut [Option<(u32, u64)>; 6],
    what: &str,
    cap: &VirtioCap,
) -> DriverResult<Window> {
    let bar = cap.bar;
    let (flags, size) = match sizes[usize::from(bar)] {
        Some(v) => v,
        None => {
            let r = client.region_info(u32::from(bar))?;
            let v = (r.info.flags, r.info.size);
            sizes[usize::from(bar)] = Some(v);
            v
        }
    };
    let need = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE;
    if flags & need != need {
        return Err(DriverError::BadRegion {
            bar,
            why: format!("{what} structure in a BAR that is not read/write (flags {flags:#x})"),
        });
    }
    let (offset, length) = (u64::from(cap.offset), u64::from(cap.length));
    if offset + length > size {
        return Err(DriverError::BadRegion {
            bar,
            why: format!("{what} structure {offset:#x}+{length:#x} past the BAR's {size:#x} bytes"),
        });
    }
    Ok(Window {
        bar,
        offset,
        length,
    })
}

fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl VirtioPciDriver {
    /// Probe, map memory and fully initialize the device (reset to DRIVER_OK).
    pub fn new(client: VfioUserClient, opts: DriverOptions) -> DriverResult<Self> {
        let mut d = Self::attach(client, opts)?;
        d.init()?;
        Ok(d)
    }

    /// Probe the device and map driver memory, without touching the virtio status:
    /// walk the capabilities, check the structures against their BARs, enable memory
    /// space and bus mastering, create and DMA_MAP the memory. Call [`init`](Self::init)
    /// next.
    pub fn attach(mut client: VfioUserClient, opts: DriverOptions) -> DriverResult<Self> {
        let cfg = client.region_info(CONFIG_REGION)?;
        if cfg.info.size < PCI_CONFIG_SIZE as u64 {
            return Err(DriverError::BadRegion {
                bar: CONFIG_REGION as u8,
                why: format!("config space of {} bytes", cfg.info.size),
            });
        }
        let mut ids = [0u8; 4];
        client.read_config(0, &mut ids)?;
        let vendor_id = u16::from_le_bytes([ids[0], ids[1]]);
        let device_id = u16::from_le_bytes([ids[2], ids[3]]);
        let caps = walk_capabilities(&mut client)?;
        debug!("virtio-pci {vendor_id:04x}:{device_id:04x}: {caps:?}");

        let mut sizes = [None; 6];
        let c = caps
            .common
            .ok_or(DriverError::MissingCapability("common configuration"))?;
        let common = region_window(&mut client, &mut sizes, "common", &c)?;
        if common.length < common::MIN_LEN {
            return Err(DriverError::BadRegion {
                bar: common.bar,
                why: format!("common configuration of {} bytes", common.length),
            });
        }
        let n = caps
            .notify
            .ok_or(DriverError::MissingCapability("notification"))?;
        let notify = region_window(&mut client, &mut sizes, "notify", &n.cap)?;
        let i = caps.isr.ok_or(DriverError::MissingCapability("ISR"))?;
        let isr = region_window(&mut client, &mut sizes, "ISR", &i)?;
        if isr.length < 1 {
            return Err(DriverError::BadRegion {
                bar: isr.bar,
                why: "empty ISR structure".into(),
            });
        }
        let device_cfg = match caps.device {
            Some(d) => Some(region_window(&mut client, &mut sizes, "device", &d)?),
            None => None,
        };

        // Memory space and bus mastering.
        let cmd = cfg_u16(&mut client, PCI_COMMAND)?;
        let cmd = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        client.region_write(CONFIG_REGION, u64::from(PCI_COMMAND), &cmd.to_le_bytes())?;

        let memory = DriverMemory::new(opts.memory_size, opts.iova_base)?;
        if opts.map_with_fd {
            client.dma_map(
                memory.iova_base(),
                memory.size(),
                true,
                true,
                Some((memory.file().as_raw_fd(), 0)),
            )?;
        } else {
            client.set_dma_target(Box::new(memory.clone()));
            client.dma_map(memory.iova_base(), memory.size(), true, true, None)?;
        }

        Ok(VirtioPciDriver {
            client,
            opts,
            caps,
            vendor_id,
            device_id,
            common,
            notify,
            notify_multiplier: n.multiplier,
            isr,
            device_cfg,
            notify_maps: Vec::new(),
            notify_slots: Vec::new(),
            memory,
            irq_fds: Vec::new(),
            features: 0,
            queues: Vec::new(),
            device_queues: 0,
            initialized: false,
        })
    }

    /// The options in use.
    pub fn options(&self) -> &DriverOptions {
        &self.opts
    }

    /// Change the options for the next [`init`](Self::init) (memory options are fixed at
    /// [`attach`](Self::attach)).
    pub fn options_mut(&mut self) -> &mut DriverOptions {
        &mut self.opts
    }

    /// The capabilities found.
    pub fn caps(&self) -> &PciCaps {
        &self.caps
    }

    /// PCI vendor ID.
    pub fn vendor_id(&self) -> u16 {
        self.vendor_id
    }

    /// PCI device ID.
    pub fn device_id(&self) -> u16 {
        self.device_id
    }

    /// The virtio device type (modern IDs: device ID - 0x1040; transitional IDs
    /// 0x1000-0x103f are not decoded and give `None`).
    pub fn virtio_device_type(&self) -> Option<u16> {
        self.device_id.checked_sub(0x1040).filter(|&t| t < 0x40)
    }

    /// The negotiated features (valid after `init`).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Queues the device has (`num_queues`, read at `init`).
    pub fn device_num_queues(&self) -> u16 {
        self.device_queues
    }

    /// The vfio-user client.
    pub fn client_mut(&mut self) -> &mut VfioUserClient {
        &mut self.client
    }

    /// Driver memory (allocate data buffers here).
    pub fn memory(&self) -> &DriverMemory {
        &self.memory
    }

    /// The queues set up by `init`.
    pub fn queues(&self) -> &[Virtqueue] {
        &self.queues
    }

    /// Queue `q`.
    pub fn queue(&mut self, q: u16) -> DriverResult<&mut Virtqueue> {
        self.queues
            .get_mut(usize::from(q))
            .ok_or(DriverError::NoSuchQueue(q))
    }

    // ---- common configuration access ----

    fn common_read<const N: usize>(&mut self, off: u64) -> DriverResult<[u8; N]> {
        let at = self.common.at(off, N)?;
        let mut b = [0u8; N];
        self.client
            .region_read(u32::from(self.common.bar), at, &mut b)?;
        Ok(b)
    }

    fn common_write(&mut self, off: u64, data: &[u8]) -> DriverResult<()> {
        let at = self.common.at(off, data.len())?;
        Ok(self
            .client
            .region_write(u32::from(self.common.bar), at, data)?)
    }

    fn read8(&mut self, off: u64) -> DriverResult<u8> {
        Ok(self.common_read::<1>(off)?[0])
    }

    fn read16(&mut self, off: u64) -> DriverResult<u16> {
        Ok(u16::from_le_bytes(self.common_read(off)?))
    }

    fn read32(&mut self, off: u64) -> DriverResult<u32> {
        Ok(u32::from_le_bytes(self.common_read(off)?))
    }

    fn write16(&mut self, off: u64, v: u16) -> DriverResult<()> {
        self.common_write(off, &v.to_le_bytes())
    }

    fn write32(&mut self, off: u64, v: u32) -> DriverResult<()> {
        self.common_write(off, &v.to_le_bytes())
    }

    /// 64-bit fields as two 32-bit writes, low half first (virtio 1.2 4.1.3.1).
    fn write64(&mut self, off: u64, v: u64) -> DriverResult<()> {
        self.write32(off, v as u32)?;
        self.write32(off + 4, (v >> 32) as u32)
    }

    /// The device status byte.
    pub fn device_status(&mut self) -> DriverResult<u8> {
        self.read8(common::DEVICE_STATUS)
    }

    /// Write the device status byte.
    pub fn set_device_status(&mut self, status: u8) -> DriverResult<()> {
        self.common_write(common::DEVICE_STATUS, &[status])
    }

    fn add_status(&mut self, bits: u8) -> DriverResult<u8> {
        let s = self.device_status()? | bits;
        self.set_device_status(s)?;
        Ok(s)
    }

    /// `config_generation`.
    pub fn config_generation(&mut self) -> DriverResult<u8> {
        self.read8(common::CONFIG_GENERATION)
    }

    /// Read (and thereby clear) the ISR status byte.
    pub fn read_isr(&mut self) -> DriverResult<u8> {
        let at = self.isr.at(0, 1)?;
        let mut b = [0u8; 1];
        self.client
            .region_read(u32::from(self.isr.bar), at, &mut b)?;
        Ok(b[0])
    }

    /// The features the device offers (all 64 bits).
    pub fn device_features(&mut self) -> DriverResult<u64> {
        self.write32(common::DEVICE_FEATURE_SELECT, 0)?;
        let lo = self.read32(common::DEVICE_FEATURE)?;
        self.write32(common::DEVICE_FEATURE_SELECT, 1)?;
        let hi = self.read32(common::DEVICE_FEATURE)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }

    // ---- device configuration ----

    fn device_window(&self) -> DriverResult<Window> {
        self.device_cfg
            .ok_or(DriverError::MissingCapability("device configuration"))
    }

    /// Device accesses split into naturally aligned 1/2/4-byte pieces.
    fn config_pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize)> {
        let end = offset + len as u64;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let left = end - at;
            let n = if at % 4 == 0 && left >= 4 {
                4
            } else if at % 2 == 0 && left >= 2 {
                2
            } else {
                1
            };
            let piece = (at, n);
            at += n as u64;
            Some(piece)
        })
    }

    /// Read device-specific configuration at `offset` into `buf`, retried until
    /// `config_generation` is stable around it (virtio 1.2 4.1.4.3.1). Accesses are
    /// naturally aligned pieces of at most 4 bytes.
    pub fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> DriverResult<()> {
        let w = self.device_window()?;
        w.at(u64::from(offset), buf.len())?;
        for _ in 0..100 {
            let before = self.config_generation()?;
            let mut pos = 0;
            for (at, n) in Self::config_pieces(u64::from(offset), buf.len()) {
                self.client
                    .region_read(u32::from(w.bar), w.offset + at, &mut buf[pos..pos + n])?;
                pos += n;
            }
            if self.config_generation()? == before {
                return Ok(());
            }
        }
        Err(DriverError::Timeout(
            "a stable config_generation".to_string(),
        ))
    }

    /// Write device-specific configuration at `offset` (naturally aligned pieces of at
    /// most 4 bytes, acknowledged).
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> DriverResult<()> {
        let w = self.device_window()?;
        w.at(u64::from(offset), data.len())?;
        let mut pos = 0;
        for (at, n) in Self::config_pieces(u64::from(offset), data.len()) {
            self.client
                .region_write(u32::from(w.bar), w.offset + at, &data[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    // ---- reset and initialization ----

    /// Reset the device (device_status 0, then wait until it reads 0) and drop the
    /// queues. Interrupt eventfds stay attached (and are drained).
    pub fn reset(&mut self) -> DriverResult<()> {
        self.set_device_status(0)?;
        let deadline = Instant::now() + self.opts.reset_timeout;
        loop {
            let s = self.device_status()?;
            if s == 0 {
                break;
            }
            if Instant::now() >= deadline {
                return Err(DriverError::ResetTimeout(s));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for q in self.queues.drain(..) {
            q.release();
        }
        self.notify_slots.clear();
        for fd in &self.irq_fds {
            let _ = fd.read();
        }
        self.features = 0;
        self.initialized = false;
        Ok(())
    }

    /// Initialize the device (virtio 1.2 3.1.1): reset, ACKNOWLEDGE, DRIVER, feature
    /// negotiation, FEATURES_OK, MSI-X and queue set-up, DRIVER_OK. Works again after
    /// [`reset`](Self::reset) (or on a running device: it resets first). On failure the
    /// FAILED status bit is set (best effort).
    pub fn init(&mut self) -> DriverResult<()> {
        match self.init_inner() {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Ok(s) = self.device_status() {
                    let _ = self.set_device_status(s | status::FAILED);
                }
                Err(e)
            }
        }
    }

    fn init_inner(&mut self) -> DriverResult<()> {
        self.reset()?;
        self.add_status(status::ACKNOWLEDGE)?;
        self.add_status(status::DRIVER)?;

        let offered = self.device_features()?;
        let features = negotiate_features(self.opts.features, offered)?;
        self.write32(common::DRIVER_FEATURE_SELECT, 0)?;
        self.write32(common::DRIVER_FEATURE, features as u32)?;
        self.write32(common::DRIVER_FEATURE_SELECT, 1)?;
        self.write32(common::DRIVER_FEATURE, (features >> 32) as u32)?;
        self.add_status(status::FEATURES_OK)?;
        let s = self.device_status()?;
        if s & status::FEATURES_OK == 0 {
            return Err(DriverError::FeaturesRefused {
                features,
                status: s,
            });
        }
        self.features = features;
        debug!("features offered {offered:#x}, negotiated {features:#x}");

        self.device_queues = self.read16(common::NUM_QUEUES)?;
        let nq = match self.opts.num_queues {
            Some(n) if n > self.device_queues => return Err(DriverError::NoSuchQueue(n - 1)),
            Some(n) => n,
            None => self.device_queues,
        };

        if self.opts.msix {
            self.setup_msix(u32::from(nq) + 1)?;
            self.write16(common::CONFIG_MSIX_VECTOR, 0)?;
            let v = self.read16(common::CONFIG_MSIX_VECTOR)?;
            if v == VIRTIO_MSI_NO_VECTOR {
                return Err(DriverError::VectorRejected {
                    what: "config".into(),
                    vector: 0,
                });
            }
        }

        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in 0..nq {
            self.setup_queue(q, event_idx)?;
        }

        self.add_status(status::DRIVER_OK)?;
        let s = self.device_status()?;
        if s & status::DEVICE_NEEDS_RESET != 0 {
            return Err(DriverError::NeedsReset(s));
        }
        self.initialized = true;
        Ok(())
    }

    fn setup_queue(&mut self, q: u16, event_idx: bool) -> DriverResult<()> {
        self.write16(common::QUEUE_SELECT, q)?;
        let max = self.read16(common::QUEUE_SIZE)?;
        let size = choose_queue_size(q, self.opts.queue_size, max)?;
        if size != max {
            self.write16(common::QUEUE_SIZE, size)?;
        }
        let notify_off = self.read16(common::QUEUE_NOTIFY_OFF)?;
        let rel = u64::from(notify_off) * u64::from(self.notify_multiplier);
        let notify_at = self.notify.at(rel, 2).map_err(|_| DriverError::BadRegion {
            bar: self.notify.bar,
            why: format!(
                "queue {q}: notify offset {notify_off} * {} outside the {}-byte notify structure",
                self.notify_multiplier, self.notify.length
            ),
        })?;
        let mut vq = Virtqueue::new(&self.memory, q, size, event_idx)?;
        vq.notify_offset = notify_at;
        let r = self.program_queue(q, &vq);
        if r.is_err() {
            vq.release();
            return r;
        }
        let slot = if self.opts.notify == NotifyMode::Mmap {
            match self.map_notify(notify_at) {
                Ok(s) => Some(s),
                Err(e) => {
                    vq.release();
                    return Err(e);
                }
            }
        } else {
            None
        };
        self.notify_slots.push(slot);
        self.queues.push(vq);
        Ok(())
    }

    fn program_queue(&mut self, q: u16, vq: &Virtqueue) -> DriverResult<()> {
        self.write64(common::QUEUE_DESC, vq.desc_iova())?;
        self.write64(common::QUEUE_DRIVER, vq.avail_iova())?;
        self.write64(common::QUEUE_DEVICE, vq.used_iova())?;
        if self.opts.msix {
            let vector = q + 1;
            self.write16(common::QUEUE_MSIX_VECTOR, vector)?;
            if self.read16(common::QUEUE_MSIX_VECTOR)? == VIRTIO_MSI_NO_VECTOR {
                return Err(DriverError::VectorRejected {
                    what: format!("queue {q}"),
                    vector,
                });
            }
        }
        self.write16(common::QUEUE_ENABLE, 1)
    }

    /// Find (or make) a mapping of the notify region covering `at..at + 2`.
    fn map_notify(&mut self, at: u64) -> DriverResult<(usize, usize)> {
        for (i, m) in self.notify_maps.iter().enumerate() {
            if at >= m.start && at + 2 <= m.start + m.map.size() as u64 {
                return Ok((i, (at - m.start) as usize));
            }
        }
        let bar = self.notify.bar;
        let r = self.client.region_info(u32::from(bar))?;
        let not = |why: String| DriverError::NotifyNotMappable(format!("BAR {bar}: {why}"));
        if r.info.flags & REGION_INFO_FLAG_MMAP == 0 {
            return Err(not("region is not mappable".into()));
        }
        let file =
            r.fd.ok_or_else(|| not("no fd with the region info".into()))?;
        let areas = r.sparse_areas.unwrap_or_else(|| vec![(0, r.info.size)]);
        let (start, size) = areas
            .into_iter()
            .find(|&(o, s)| {
                at >= o
                    && o.checked_add(s)
                        .is_some_and(|e| e <= r.info.size && at + 2 <= e)
            })
            .ok_or_else(|| not(format!("no mmap area covers notify offset {at:#x}")))?;
        let file_off = r
            .info
            .offset
            .checked_add(start)
            .filter(|o| o % PAGE_SIZE == 0)
            .ok_or_else(|| not(format!("area {start:#x} has an unaligned file offset")))?;
        let len = usize::try_from(size).map_err(|e| not(e.to_string()))?;
        let map = MmapRegion::build(
            Some(FileOffset::new(file, file_off)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| not(e.to_string()))?;
        self.notify_maps.push(NotifyMap { start, map });
        Ok((self.notify_maps.len() - 1, (at - start) as usize))
    }

    // ---- MSI-X ----

    fn setup_msix(&mut self, vectors: u32) -> DriverResult<()> {
        let cap = self
            .caps
            .msix
            .ok_or(DriverError::MissingCapability("MSI-X"))?;
        let irq_count = self.client.irq_info(MSIX_IRQ_INDEX)?.count;
        let available = irq_count.min(u32::from(cap.table_size));
        if vectors > available {
            return Err(DriverError::NotEnoughVectors {
                needed: vectors,
                available,
            });
        }
        if self.irq_fds.len() != vectors as usize {
            let mut fds = Vec::with_capacity(vectors as usize);
            for _ in 0..vectors {
                fds.push(EventFd::new(EFD_NONBLOCK)?);
            }
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            self.client.set_irq_eventfds(MSIX_IRQ_INDEX, 0, &raw)?;
            self.irq_fds = fds;
        }
        // Program and unmask the table entries the driver uses.
        let tbar = cap.table_bar;
        if tbar > 5 {
            return Err(DriverError::BadRegion {
                bar: tbar,
                why: "MSI-X table in a reserved BAR".into(),
            });
        }
        let tsize = self.client.region_info(u32::from(tbar))?.info.size;
        let table_end = u64::from(cap.table_offset) + MSIX_ENTRY_SIZE * u64::from(cap.table_size);
        if table_end > tsize {
            return Err(DriverError::BadRegion {
                bar: tbar,
                why: format!("MSI-X table ends at {table_end:#x}, past the BAR's {tsize:#x}"),
            });
        }
        for v in 0..vectors {
            let mut e = [0u8; MSIX_ENTRY_SIZE as usize];
            e[0..4].copy_from_slice(&MSIX_MESSAGE_ADDRESS.to_le_bytes());
            e[8..12].copy_from_slice(&v.to_le_bytes());
            // e[12..16]: vector control 0 = unmasked.
            let at = u64::from(cap.table_offset) + MSIX_ENTRY_SIZE * u64::from(v);
            self.client.region_write(u32::from(tbar), at, &e)?;
        }
        let ctl_at = u16::from(cap.cap_offset) + 2;
        let ctl = cfg_u16(&mut self.client, ctl_at)?;
        let ctl = (ctl | MSIX_CONTROL_ENABLE) & !MSIX_CONTROL_MASKALL;
        self.client
            .region_write(CONFIG_REGION, u64::from(ctl_at), &ctl.to_le_bytes())?;
        Ok(())
    }

    /// The eventfd of MSI-X vector `vector` (0: configuration changes, `q + 1`: queue
    /// `q`), for callers that poll it themselves (benchmarks).
    pub fn vector_fd(&self, vector: u16) -> Option<RawFd> {
        self.irq_fds.get(usize::from(vector)).map(|f| f.as_raw_fd())
    }

    /// The eventfd of queue `q`'s vector.
    pub fn queue_irq_fd(&self, q: u16) -> Option<RawFd> {
        self.vector_fd(q.checked_add(1)?)
    }

    /// The eventfd of the configuration-change vector.
    pub fn config_irq_fd(&self) -> Option<RawFd> {
        self.vector_fd(0)
    }

    /// If the server has sent something (a DMA_READ/DMA_WRITE, with memory mapped
    /// without an fd), serve it now. Needed when polling the rings without waiting
    /// through this driver: the device may be blocked on such a request.
    pub fn service_dma(&mut self) -> DriverResult<()> {
        let mut p = [libc::pollfd {
            fd: self.client.socket_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        poll_fds(&mut p, Duration::ZERO)?;
        if p[0].revents != 0 {
            // Any acknowledged call serves the requests that arrive before its reply.
            self.config_generation()?;
        }
        Ok(())
    }

    fn wait_vector(&mut self, vector: u16, timeout: Duration) -> DriverResult<()> {
        let deadline = Instant::now() + timeout;
        let Some(efd) = self.irq_fds.get(usize::from(vector)) else {
            return Err(DriverError::NoInterrupts);
        };
        let efd_raw = efd.as_raw_fd();
        loop {
            if self.irq_fds[usize::from(vector)].read().is_ok() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DriverError::Timeout(format!("MSI-X vector {vector}")));
            }
            let mut p = [
                libc::pollfd {
                    fd: efd_raw,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.client.socket_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let n = if self.opts.map_with_fd { 1 } else { 2 };
            poll_fds(&mut p[..n], deadline - now)?;
            if n == 2 && p[1].revents != 0 {
                self.config_generation()?;
            }
        }
    }

    /// Wait until queue `q`'s MSI-X vector fires (poll(2) on its eventfd, which is then
    /// cleared). With memory mapped without an fd, the device's DMA requests are served
    /// meanwhile.
    pub fn wait_queue_irq(&mut self, q: u16, timeout: Duration) -> DriverResult<()> {
        if usize::from(q) >= self.queues.len() {
            return Err(DriverError::NoSuchQueue(q));
        }
        self.wait_vector(q + 1, timeout)
    }

    /// Wait for the configuration-change vector.
    pub fn wait_config_irq(&mut self, timeout: Duration) -> DriverResult<()> {
        self.wait_vector(0, timeout)
    }

    // ---- data path ----

    /// Put a chain on queue `q` (see [`Virtqueue::add_chain`]).
    pub fn add_chain(&mut self, q: u16, chain: &[(u64, u32, bool)]) -> DriverResult<u16> {
        self.queue(q)?.add_chain(chain)
    }

    /// Take a used chain from queue `q` (see [`Virtqueue::poll_used`]).
    pub fn poll_used(&mut self, q: u16) -> DriverResult<Option<(u16, u32)>> {
        self.queue(q)?.poll_used()
    }

    /// Notify the device about queue `q` if it wants to be (see
    /// [`Virtqueue::kick_prepare`]); returns whether a notification was sent.
    pub fn kick(&mut self, q: u16) -> DriverResult<bool> {
        if !self.queue(q)?.kick_prepare()? {
            return Ok(false);
        }
        self.notify(q)?;
        Ok(true)
    }

    /// Send queue `q`'s notification unconditionally.
    pub fn notify(&mut self, q: u16) -> DriverResult<()> {
        let at = self.queue(q)?.notify_offset;
        let value = q.to_le_bytes();
        let bar = u32::from(self.notify.bar);
        match self.opts.notify {
            NotifyMode::Posted => self.client.region_write_posted(bar, at, &value)?,
            NotifyMode::Acknowledged => self.client.region_write(bar, at, &value)?,
            NotifyMode::Mmap => {
                let (m, off) = self
                    .notify_slots
                    .get(usize::from(q))
                    .copied()
                    .flatten()
                    .ok_or(DriverError::NotInitialized)?;
                fence(Ordering::SeqCst);
                self.notify_maps[m]
                    .map
                    .as_volatile_slice()
                    .store(q.to_le(), off, Ordering::Release)
                    .map_err(mem_err)?;
            }
        }
        Ok(())
    }

    /// Wait up to `timeout` for a used chain on queue `q`: polls the ring, re-arms
    /// interrupts and sleeps on the queue's vector (or spins without MSI-X).
    pub fn wait_used(&mut self, q: u16, timeout: Duration) -> DriverResult<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        let use_irq = !self.irq_fds.is_empty();
        loop {
            if let Some(u) = self.poll_used(q)? {
                return Ok(u);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DriverError::Timeout(format!("a used buffer on queue {q}")));
            }
            if use_irq {
                if self.queue(q)?.enable_interrupts()? {
                    continue;
                }
                match self.wait_queue_irq(q, deadline - now) {
                    Ok(()) | Err(DriverError::Timeout(_)) => {}
                    Err(e) => return Err(e),
                }
            } else {
                if !self.opts.map_with_fd {
                    self.service_dma()?;
                }
                std::thread::yield_now();
            }
        }
    }

    /// Reset the device, withdraw driver memory from it and give the client back.
    pub fn shutdown(mut self) -> DriverResult<VfioUserClient> {
        self.reset()?;
        self.client
            .dma_unmap(self.memory.iova_base(), self.memory.size())?;
        Ok(self.client)
    }

    // ---- virtio-blk ----

    /// Run one virtio-blk request on queue `q` to completion: allocate its buffer in
    /// driver memory, submit, kick, wait up to `timeout`, and return the status byte and
    /// the data the device wrote (reads, GET_ID). No other request may be outstanding on
    /// `q`.
    pub fn blk_request(
        &mut self,
        q: u16,
        req: &VirtioBlkRequest,
        timeout: Duration,
    ) -> DriverResult<BlkCompletion> {
        let buf = self.memory.alloc(req.buffer_len(), 64)?;
        let r = self.blk_request_in(q, req, buf.iova, timeout);
        if matches!(r, Err(DriverError::Timeout(_))) {
            // The device may still write the buffer: keep it allocated.
            return r;
        }
        let _ = self.memory.free(buf);
        r
    }

    fn blk_request_in(
        &mut self,
        q: u16,
        req: &VirtioBlkRequest,
        iova: u64,
        timeout: Duration,
    ) -> DriverResult<BlkCompletion> {
        let placed = req.place(&self.memory, iova)?;
        let head = self.add_chain(q, &placed.chain)?;
        self.kick(q)?;
        let (used_head, used_len) = self.wait_used(q, timeout)?;
        if used_head != head {
            return Err(DriverError::Device {
                queue: q,
                why: format!("completed head {used_head}, expected {head}"),
            });
        }
        placed.complete(&self.memory, used_len)
    }
}

// ---------------------------------------------------------------------------------------
// virtio-blk requests
// ---------------------------------------------------------------------------------------

/// virtio-blk request types this helper builds (virtio 1.2 5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkRequestType {
    /// Read sectors.
    In,
    /// Write sectors.
    Out,
    /// Flush the write cache.
    Flush,
    /// Read the 20-byte device ID string.
    GetId,
    /// Discard ranges.
    Discard,
    /// Write zeroes to ranges.
    WriteZeroes,
}

impl BlkRequestType {
    /// The `type` field value.
    pub fn code(self) -> u32 {
        match self {
            BlkRequestType::In => virtio_blk::VIRTIO_BLK_T_IN,
            BlkRequestType::Out => virtio_blk::VIRTIO_BLK_T_OUT,
            BlkRequestType::Flush => virtio_blk::VIRTIO_BLK_T_FLUSH,
            BlkRequestType::GetId => virtio_blk::VIRTIO_BLK_T_GET_ID,
            BlkRequestType::Discard => virtio_blk::VIRTIO_BLK_T_DISCARD,
            BlkRequestType::WriteZeroes => virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES,
        }
    }
}

/// Status byte: success.
pub const VIRTIO_BLK_S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
/// Status byte: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
/// Status byte: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
/// Bytes of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: u32 = virtio_blk::VIRTIO_BLK_ID_BYTES;
/// WRITE_ZEROES segment flag: the device may unmap.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
/// Size of the request header.
pub const BLK_HEADER_SIZE: u64 = 16;

/// One DISCARD / WRITE_ZEROES range (`struct virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (WRITE_ZEROES: [`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`]).
    pub flags: u32,
}

impl BlkSegment {
    /// The 16 bytes on the wire.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// A virtio-blk request: 16-byte header (type, reserved/ioprio, sector), data buffers,
/// and a 1-byte status the device writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioBlkRequest {
    /// Request type.
    pub kind: BlkRequestType,
    /// The header's `reserved` (ioprio) field.
    pub ioprio: u32,
    /// The header's sector (0 where the type does not use it).
    pub sector: u64,
    /// Bytes the driver sends (OUT data, DISCARD/WRITE_ZEROES segments).
    pub out: Vec<u8>,
    /// Bytes the device writes besides the status (IN length, GET_ID's 20).
    pub in_len: u32,
}

/// A request laid out in driver memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedBlkRequest {
    /// The chain to submit: header, data, status.
    pub chain: Vec<(u64, u32, bool)>,
    /// IOVA of the device-writable data (IN, GET_ID).
    pub in_iova: u64,
    /// Its length.
    pub in_len: u32,
    /// IOVA of the status byte.
    pub status_iova: u64,
}

/// How a request completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkCompletion {
    /// The status byte.
    pub status: u8,
    /// The device-writable data (IN, GET_ID), empty otherwise.
    pub data: Vec<u8>,
    /// The used length the device reported.
    pub used_len: u32,
}

impl VirtioBlkRequest {
    fn new(kind: BlkRequestType, sector: u64, out: Vec<u8>, in_len: u32) -> Self {
        VirtioBlkRequest {
            kind,
            ioprio: 0,
            sector,
            out,
            in_len,
        }
    }

    /// Read `len` bytes from `sector`.
    pub fn read(sector: u64, len: u32) -> Self {
        Self::new(BlkRequestType::In, sector, Vec::new(), len)
    }

    /// Write `data` at `sector`.
    pub fn write(sector: u64, data: &[u8]) -> Self {
        Self::new(BlkRequestType::Out, sector, data.to_vec(), 0)
    }

    /// Flush.
    pub fn flush() -> Self {
        Self::new(BlkRequestType::Flush, 0, Vec::new(), 0)
    }

    /// Get the device ID string.
    pub fn get_id() -> Self {
        Self::new(BlkRequestType::GetId, 0, Vec::new(), VIRTIO_BLK_ID_BYTES)
    }

    fn segments(kind: BlkRequestType, segs: &[BlkSegment]) -> Self {
        let out = segs.iter().flat_map(|s| s.to_bytes()).collect();
        Self::new(kind, 0, out, 0)
    }

    /// Discard `segs`.
    pub fn discard(segs: &[BlkSegment]) -> Self {
        Self::segments(BlkRequestType::Discard, segs)
    }

    /// Write zeroes to `segs`.
    pub fn write_zeroes(segs: &[BlkSegment]) -> Self {
        Self::segments(BlkRequestType::WriteZeroes, segs)
    }

    /// The 16-byte header.
    pub fn header(&self) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&self.kind.code().to_le_bytes());
        h[4..8].copy_from_slice(&self.ioprio.to_le_bytes());
        h[8..16].copy_from_slice(&self.sector.to_le_bytes());
        h
    }

    /// Bytes of driver memory the request needs: header, data, status.
    pub fn buffer_len(&self) -> u64 {
        BLK_HEADER_SIZE + self.out.len() as u64 + u64::from(self.in_len) + 1
    }

    /// The chain for a request laid out contiguously at `iova`: header, out data, in
    /// data, status.
    pub fn chain(&self, iova: u64) -> DriverResult<Vec<(u64, u32, bool)>> {
        let out_len = u32::try_from(self.out.len())
            .map_err(|_| DriverError::InvalidChain("data over 4 GiB".into()))?;
        let mut chain = vec![(iova, BLK_HEADER_SIZE as u32, false)];
        let mut at = iova + BLK_HEADER_SIZE;
        if out_len > 0 {
            chain.push((at, out_len, false));
            at += u64::from(out_len);
        }
        if self.in_len > 0 {
            chain.push((at, self.in_len, true));
            at += u64::from(self.in_len);
        }
        chain.push((at, 1, true));
        Ok(chain)
    }

    /// Write header and out data at `iova` in `mem` (status preset to 0xff) and return
    /// the chain.
    pub fn place(&self, mem: &DriverMemory, iova: u64) -> DriverResult<PlacedBlkRequest> {
        let chain = self.chain(iova)?;
        mem.write(iova, &self.header())?;
        if !self.out.is_empty() {
            mem.write(iova + BLK_HEADER_SIZE, &self.out)?;
        }
        let in_iova = iova + BLK_HEADER_SIZE + self.out.len() as u64;
        let status_iova = in_iova + u64::from(self.in_len);
        mem.write(status_iova, &[0xff])?;
        Ok(PlacedBlkRequest {
            chain,
            in_iova,
            in_len: self.in_len,
            status_iova,
        })
    }
}

impl PlacedBlkRequest {
    /// Read the outcome after the device returned the chain with `used_len`.
    pub fn complete(&self, mem: &DriverMemory, used_len: u32) -> DriverResult<BlkCompletion> {
        let mut status = [0u8; 1];
        mem.read(self.status_iova, &mut status)?;
        let mut data = vec![0u8; self.in_len as usize];
        if !data.is_empty() {
            mem.read(self.in_iova, &mut data)?;
        }
        Ok(BlkCompletion {
            status: status[0],
            data,
            used_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- capability walker ----

    /// A config space that records every read and fails reads past 256 bytes.
    struct MockConfig {
        bytes: [u8; 256],
        reads: Vec<(u16, usize)>,
    }

    impl ConfigSource for MockConfig {
        fn read_config(&mut self, offset: u16, buf: &mut [u8]) -> DriverResult<()> {
            self.reads.push((offset, buf.len()));
            let end = usize::from(offset) + buf.len();
            assert!(
                end <= 256,
                "read {offset:#x}+{} past config space",
                buf.len()
            );
            buf.copy_from_slice(&self.bytes[usize::from(offset)..end]);
            Ok(())
        }
    }

    fn vendor(cfg_type: u8, bar: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
        let mut v = vec![PCI_CAP_ID_VNDR, 0, 0, cfg_type, bar, 0, 0, 0];
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&length.to_le_bytes());
        v.extend_from_slice(extra);
        v[2] = v.len() as u8;
        v
    }

    /// Lay out capabilities at the given offsets, chained in order.
    fn config_with(caps: &[(u8, Vec<u8>)]) -> MockConfig {
        let mut b = [0u8; 256];
        b[0..4].copy_from_slice(&[0xf4, 0x1a, 0x42, 0x10]);
        b[6] = PCI_STATUS_CAP_LIST as u8;
        b[0x34] = caps.first().map(|c| c.0).unwrap_or(0);
        for (i, (at, bytes)) in caps.iter().enumerate() {
            let at = usize::from(*at);
            // A capability that runs past the end is cut there (that is the point of
            // some tests).
            let n = bytes.len().min(b.len() - at);
            b[at..at + n].copy_from_slice(&bytes[..n]);
            if at + 1 < b.len() {
                b[at + 1] = caps.get(i + 1).map(|c| c.0).unwrap_or(0);
            }
        }
        MockConfig {
            bytes: b,
            reads: Vec::new(),
        }
    }

    fn msix_cap(table_size: u16, table: u32, pba: u32) -> Vec<u8> {
        let mut v = vec![PCI_CAP_ID_MSIX, 0];
        v.extend_from_slice(&(table_size - 1).to_le_bytes());
        v.extend_from_slice(&table.to_le_bytes());
        v.extend_from_slice(&pba.to_le_bytes());
        v
    }

    fn standard_config() -> MockConfig {
        config_with(&[
            (0x40, msix_cap(3, 1, 0x1001)),
            (0x50, vendor(1, 4, 0, 0x40, &[])),
            (0x60, vendor(2, 4, 0x3000, 0x1000, &4u32.to_le_bytes())),
            (0x78, vendor(3, 4, 0x1000, 1, &[])),
            (0x88, vendor(4, 4, 0x2000, 0x1000, &[])),
            (0x98, vendor(5, 0, 0, 0, &[0; 4])),
        ])
    }

    #[test]
    fn walker_finds_virtio_and_msix_caps() {
        let mut c = standard_config();
        let caps = walk_capabilities(&mut c).unwrap();
        assert_eq!(
            caps.common,
            Some(VirtioCap {
                cap_offset: 0x50,
                cfg_type: 1,
                bar: 4,
                id: 0,
                offset: 0,
                length: 0x40
            })
        );
        let n = caps.notify.unwrap();
        assert_eq!(
            (n.cap.offset, n.cap.length, n.multiplier),
            (0x3000, 0x1000, 4)
        );
        assert_eq!(caps.isr.unwrap().offset, 0x1000);
        assert_eq!(caps.device.unwrap().length, 0x1000);
        assert_eq!(caps.pci_cfg.unwrap().cap_offset, 0x98);
        let m = caps.msix.unwrap();
        assert_eq!(
            (
                m.table_size,
                m.table_bar,
                m.table_offset,
                m.pba_bar,
                m.pba_offset
            ),
            (3, 1, 0, 1, 0x1000)
        );
        assert_eq!(caps.visited.len(), 6);
        assert!(c.reads.iter().all(|&(o, l)| usize::from(o) + l <= 256));
    }

    #[test]
    fn walker_prefers_the_first_usable_capability() {
        let mut c = config_with(&[
            (0x40, vendor(1, 9, 0, 0x40, &[])), // reserved BAR: ignored
            (0x50, vendor(1, 2, 0x100, 0x40, &[])),
            (0x60, vendor(1, 4, 0x200, 0x40, &[])), // second choice
            (0x70, vendor(2, 4, 0, 0x10, &[])),     // notify without multiplier: too short
            (0x80, vendor(7, 4, 0, 0x10, &[])),     // unknown type
        ]);
        let caps = walk_capabilities(&mut c).unwrap();
        assert_eq!(caps.common.unwrap().bar, 2);
        assert_eq!(caps.common.unwrap().offset, 0x100);
        assert!(caps.notify.is_none());
        assert!(caps.msix.is_none());
    }

    #[test]
    fn walker_rejects_malformed_lists() {
        // No capability list bit.
        let mut c = standard_config();
        c.bytes[6] = 0;
        assert!(matches!(
            walk_capabilities(&mut c),
            Err(DriverError::NoCapabilityList)
        ));
        // A loop.
        let mut c = standard_config();
        c.bytes[0x99] = 0x50;
        assert!(matches!(
            walk_capabilities(&mut c),
            Err(DriverError::BadCapability { offset: 0x50, .. })
        ));
        // A pointer into the header.
        let mut c = standard_config();
        c.bytes[0x51] = 0x10;
        assert!(matches!(
            walk_capabilities(&mut c),
            Err(DriverError::BadCapability { .. })
        ));
        // A vendor capability running past the end.
        let mut c = config_with(&[(0xf8, vendor(1, 4, 0, 0x40, &[]))]);
        c.bytes[0xfa] = 16;
        assert!(c.bytes.len() == 256);
        assert!(matches!(
            walk_capabilities(&mut c),
            Err(DriverError::BadCapability { offset: 0xf8, .. })
        ));
        // An MSI-X capability running past the end.
        let mut c = config_with(&[(0xf8, vec![PCI_CAP_ID_MSIX, 0, 0, 0])]);
        assert!(matches!(
            walk_capabilities(&mut c),
            Err(DriverError::BadCapability { offset: 0xf8, .. })
        ));
        // A pointer to the last byte is masked to the last dword (0xfc), where an empty
        // header ends the list.
        let mut c = standard_config();
        c.bytes[0x34] = 0xff;
        assert_eq!(walk_capabilities(&mut c).unwrap().visited, vec![(0xfc, 0)]);
        // Empty list.
        let mut c = config_with(&[]);
        assert_eq!(walk_capabilities(&mut c).unwrap(), PciCaps::default());
    }

    #[test]
    fn walker_reads_a_plain_snapshot() {
        let c = standard_config();
        let mut bytes = c.bytes.to_vec();
        let caps = walk_capabilities(bytes.as_mut_slice()).unwrap();
        assert!(caps.common.is_some() && caps.msix.is_some());
        assert!(bytes.as_mut_slice().read_config(250, &mut [0; 8]).is_err());
    }

    // ---- memory ----

    #[test]
    fn allocator_aligns_splits_and_coalesces() {
        let mut a = Allocator::new(0x1000, 0x1000);
        let x = a.alloc(10, 1).unwrap();
        assert_eq!(x, 0x1000);
        let y = a.alloc(16, 64).unwrap();
        assert_eq!(y, 0x1040);
        assert_eq!(a.free_bytes(), 0x1000 - 10 - 16);
        assert!(a.alloc(0x1000, 1).is_none());
        assert!(a.alloc(0, 1).is_none());
        assert!(a.alloc(1, 3).is_none());
        assert_eq!(a.free(x), Some(10));
        assert_eq!(a.free(x), None, "double free");
        assert_eq!(a.free(y), Some(16));
        assert_eq!(a.free.len(), 1, "coalesced: {:?}", a.free);
        assert_eq!(a.alloc(0x1000, 0x1000), Some(0x1000));
        assert!(a.alloc(1, 1).is_none());
    }

    #[test]
    fn allocator_reuses_holes_first_fit() {
        let mut a = Allocator::new(0, 0x400);
        let v: Vec<u64> = (0..4).map(|_| a.alloc(0x100, 0x100).unwrap()).collect();
        assert_eq!(v, [0, 0x100, 0x200, 0x300]);
        a.free(0x100);
        a.free(0x300);
        assert!(a.alloc(0x200, 1).is_none(), "fragmented");
        a.free(0x200);
        assert_eq!(a.alloc(0x300, 1), Some(0x100));
    }

    #[test]
    fn driver_memory_access_and_bounds() {
        let m = DriverMemory::new(0x10000, 0x1_0000_0000).unwrap();
        assert!(DriverMemory::new(0x1001, 0).is_err());
        assert!(DriverMemory::new(0x1000, 0x10).is_err());
        assert!(DriverMemory::new(0x2000, u64::MAX - 0xfff).is_err());
        let b = m.alloc(100, 4096).unwrap();
        assert_eq!(b.iova % 4096, 0);
        assert!(m.contains(b.iova, 100));
        m.write(b.iova, b"hello").unwrap();
        let mut out = [0u8; 5];
        m.read(b.iova, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        // The memfd sees the same bytes (what the device maps).
        let mut f = [0u8; 5];
        std::os::unix::fs::FileExt::read_exact_at(m.file(), &mut f, b.iova - m.iova_base())
            .unwrap();
        assert_eq!(&f, b"hello");
        // SAFETY: no device; nothing else references this range.
        let s = unsafe { m.as_mut_slice(b.iova, 5) }.unwrap();
        s[0] = b'j';
        m.read(b.iova, &mut out).unwrap();
        assert_eq!(&out, b"jello");
        assert_eq!(m.volatile_slice(b.iova, 100).unwrap().len(), 100);
        assert!(m.write(m.iova_base() + 0x10000 - 2, &[0; 4]).is_err());
        assert!(m.read(m.iova_base() - 1, &mut [0; 1]).is_err());
        assert!(m.volatile_slice(u64::MAX, 2).is_err());
        // Freed memory comes back zeroed.
        m.free(b).unwrap();
        assert!(m.free(b).is_err());
        let c = m.alloc(100, 4096).unwrap();
        assert_eq!(c.iova, b.iova);
        m.read(c.iova, &mut out).unwrap();
        assert_eq!(out, [0; 5]);
        assert!(m.alloc(0x20000, 1).is_err());
    }

    #[test]
    fn driver_memory_serves_dma_requests() {
        let m = DriverMemory::new(0x2000, 0x4000).unwrap();
        let mut t: Box<dyn DmaTarget + Send> = Box::new(m.clone());
        t.write(0x4100, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        t.read(0x4100, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        m.read(0x4100, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert_eq!(t.read(0x3fff, &mut b), Err(libc::EFAULT));
        assert_eq!(t.write(0x5fff, &[0, 0]), Err(libc::EFAULT));
    }

    // ---- rings ----

    #[test]
    fn split_ring_layout() {
        for (n, d, a, u) in [
            (1u16, 16u64, 8u64, 14u64),
            (256, 4096, 518, 2054),
            (32768, 524288, 65542, 262150),
        ] {
            let l = SplitRingLayout::new(n).unwrap();
            assert_eq!(l.desc_table_size(), d);
            assert_eq!(l.avail_ring_size(), a);
            assert_eq!(l.used_ring_size(), u);
            assert_eq!(l.used_event_offset(), a - 2);
            assert_eq!(l.avail_event_offset(), u - 2);
        }
        let l = SplitRingLayout::new(8).unwrap();
        assert_eq!(l.desc_offset(3), 48);
        assert_eq!(l.avail_entry_offset(7), 18);
        assert_eq!(l.used_entry_offset(7), 60);
        assert!(SplitRingLayout::new(0).is_err());
        assert!(SplitRingLayout::new(6).is_err());
        assert_eq!(
            (
                SplitRingLayout::DESC_ALIGN,
                SplitRingLayout::AVAIL_ALIGN,
                SplitRingLayout::USED_ALIGN
            ),
            (16, 2, 4)
        );
        let m = DriverMemory::new(0x100000, 0x1_0000_0000).unwrap();
        let q = Virtqueue::new(&m, 0, 256, false).unwrap();
        assert_eq!(q.desc_iova() % 16, 0);
        assert_eq!(q.avail_iova() % 2, 0);
        assert_eq!(q.used_iova() % 4, 0);
        let ranges = [
            (q.desc_iova(), l.desc_table_size()),
            (q.avail_iova(), 6 + 2 * 256),
            (q.used_iova(), 6 + 8 * 256),
        ];
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "rings overlap");
            }
        }
    }

    #[test]
    fn need_event_arithmetic() {
        // event inside (old, new]: notify.
        assert!(vring_need_event(0, 1, 0));
        assert!(vring_need_event(5, 10, 5));
        assert!(vring_need_event(9, 10, 5));
        // event already passed before old, or not reached yet.
        assert!(!vring_need_event(4, 10, 5));
        assert!(!vring_need_event(10, 10, 5));
        assert!(!vring_need_event(11, 10, 5));
        // Nothing new.
        assert!(!vring_need_event(5, 5, 5));
        // Wrap-around.
        assert!(vring_need_event(0xffff, 2, 0xfffe));
        assert!(vring_need_event(0, 2, 0xfffe));
        assert!(vring_need_event(1, 2, 0xfffe));
        assert!(!vring_need_event(2, 2, 0xfffe));
        assert!(!vring_need_event(0xfffd, 2, 0xfffe));
    }

    /// A descriptor as the device sees it: addr, len, flags, next.
    type RawDesc = (u64, u32, u16, u16);

    /// A minimal device side: pops avail entries and returns them.
    struct FakeDevice<'a> {
        q: &'a Virtqueue,
        next_avail: u16,
        used_idx: u16,
    }

    impl FakeDevice<'_> {
        fn pop(&mut self) -> Option<(u16, Vec<RawDesc>)> {
            let m = &self.q.mem;
            let idx = m.load_u16(self.q.avail_iova() + 2).unwrap();
            if idx == self.next_avail {
                return None;
            }
            let l = self.q.layout();
            let slot = self.next_avail % l.size;
            let head = m
                .load_u16(self.q.avail_iova() + l.avail_entry_offset(slot))
                .unwrap();
            self.next_avail = self.next_avail.wrapping_add(1);
            let mut descs = Vec::new();
            let mut d = head;
            loop {
                let mut e = [0u8; 16];
                m.read(self.q.desc_iova() + l.desc_offset(d), &mut e)
                    .unwrap();
                let addr = u64::from_le_bytes(e[0..8].try_into().unwrap());
                let len = le_u32(&e, 8);
                let flags = u16::from_le_bytes([e[12], e[13]]);
                let next = u16::from_le_bytes([e[14], e[15]]);
                descs.push((addr, len, flags, next));
                if flags & 1 == 0 {
                    break;
                }
                d = next;
            }
            Some((head, descs))
        }

        fn push(&mut self, id: u32, len: u32) {
            let m = &self.q.mem;
            let l = self.q.layout();
            let at = self.q.used_iova() + l.used_entry_offset(self.used_idx % l.size);
            let mut e = [0u8; 8];
            e[0..4].copy_from_slice(&id.to_le_bytes());
            e[4..8].copy_from_slice(&len.to_le_bytes());
            m.write(at, &e).unwrap();
            self.used_idx = self.used_idx.wrapping_add(1);
            m.store_u16(self.q.used_iova() + 2, self.used_idx).unwrap();
        }
    }

    fn test_queue(size: u16, event_idx: bool) -> (DriverMemory, Virtqueue, DmaBuffer) {
        let m = DriverMemory::new(0x100000, 0x1_0000_0000).unwrap();
        let q = Virtqueue::new(&m, 3, size, event_idx).unwrap();
        let data = m.alloc(0x10000, 4096).unwrap();
        (m, q, data)
    }

    #[test]
    fn free_list_fills_and_recycles_out_of_order() {
        let (_m, mut q, data) = test_queue(8, false);
        let b = data.iova;
        let h1 = q
            .add_chain(&[(b, 16, false), (b + 16, 512, true), (b + 528, 1, true)])
            .unwrap();
        let h2 = q.add_chain(&[(b, 16, false), (b + 16, 1, true)]).unwrap();
        let h3 = q
            .add_chain(&[(b, 16, false), (b + 16, 1, true), (b + 17, 1, true)])
            .unwrap();
        assert_eq!((h1, h2, h3), (0, 3, 5));
        assert_eq!(q.num_free(), 0);
        assert!(matches!(
            q.add_chain(&[(b, 1, false)]),
            Err(DriverError::QueueFull {
                queue: 3,
                needed: 1,
                free: 0
            })
        ));
        assert_eq!(q.avail_idx(), 3);

        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 0,
        };
        let (head, descs) = dev.pop().unwrap();
        assert_eq!(head, 0);
        assert_eq!(
            descs,
            vec![(b, 16, 1, 1), (b + 16, 512, 3, 2), (b + 528, 1, 2, 0)]
        );
        assert_eq!(dev.pop().unwrap().0, 3);
        assert_eq!(dev.pop().unwrap().0, 5);
        assert!(dev.pop().is_none());
        // Complete the middle one first.
        dev.push(3, 1);
        assert_eq!(q.poll_used().unwrap(), Some((3, 1)));
        assert_eq!(q.poll_used().unwrap(), None);
        assert_eq!(q.num_free(), 2);
        assert_eq!(q.in_flight(), 2);
        // The freed descriptors are reused.
        let h4 = q.add_chain(&[(b, 4, false), (b, 4, true)]).unwrap();
        assert_eq!(h4, 3);
        assert_eq!(q.num_free(), 0);
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 3,
            used_idx: 1,
        };
        assert_eq!(dev.pop().unwrap().1.len(), 2);
        dev.push(5, 2);
        dev.push(0, 513);
        dev.push(3, 0);
        assert_eq!(q.poll_used().unwrap(), Some((5, 2)));
        assert_eq!(q.poll_used().unwrap(), Some((0, 513)));
        assert_eq!(q.poll_used().unwrap(), Some((3, 0)));
        assert_eq!(q.num_free(), 8);
        assert_eq!(q.in_flight(), 0);
        // The whole queue in one chain.
        let whole: Vec<_> = (0..8).map(|i| (b + i * 8, 8, i >= 4)).collect();
        q.add_chain(&whole).unwrap();
        assert_eq!(q.num_free(), 0);
    }

    #[test]
    fn chains_are_validated() {
        let (m, mut q, data) = test_queue(4, false);
        let b = data.iova;
        let inv = |r: DriverResult<u16>| matches!(r, Err(DriverError::InvalidChain(_)));
        assert!(inv(q.add_chain(&[])));
        assert!(inv(q.add_chain(&[(b, 1, true), (b, 1, false)])));
        assert!(inv(q.add_chain(&[(b, 1, false); 5])));
        assert!(inv(q.add_chain(&[(
            m.iova_base() + m.size() - 1,
            2,
            false
        )])));
        assert!(inv(q.add_chain(&[(0, 1, false)])));
        assert_eq!(q.num_free(), 4);
        assert_eq!(q.avail_idx(), 0);
    }

    #[test]
    fn used_ring_from_a_bad_device_is_rejected() {
        let (_m, mut q, data) = test_queue(4, false);
        let b = data.iova;
        q.add_chain(&[(b, 16, false), (b + 16, 8, true)]).unwrap();
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 0,
        };
        dev.push(7, 0); // id out of range
        assert!(matches!(
            q.poll_used(),
            Err(DriverError::Device { queue: 3, .. })
        ));
        // id in range but not in flight
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 1,
        };
        dev.push(1, 0);
        assert!(matches!(q.poll_used(), Err(DriverError::Device { .. })));
        // len larger than the writable part: the chain is still recycled.
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 2,
        };
        dev.push(0, 9);
        assert!(matches!(q.poll_used(), Err(DriverError::Device { .. })));
        assert_eq!(q.num_free(), 4);
        // The used index jumps past what is in flight.
        q.mem.store_u16(q.used_iova() + 2, 100).unwrap();
        assert!(matches!(q.poll_used(), Err(DriverError::Device { .. })));
    }

    #[test]
    fn kick_suppression_without_event_idx() {
        let (m, mut q, data) = test_queue(8, false);
        assert!(!q.kick_prepare().unwrap(), "nothing added");
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(q.kick_prepare().unwrap());
        assert!(!q.kick_prepare().unwrap(), "already kicked");
        m.store_u16(q.used_iova(), virtio_ring::VRING_USED_F_NO_NOTIFY as u16)
            .unwrap();
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(
            !q.kick_prepare().unwrap(),
            "device asked for no notifications"
        );
        // Interrupt suppression through the avail flags.
        q.disable_interrupts().unwrap();
        assert_eq!(m.load_u16(q.avail_iova()).unwrap(), 1);
        assert!(!q.enable_interrupts().unwrap());
        assert_eq!(m.load_u16(q.avail_iova()).unwrap(), 0);
    }

    #[test]
    fn kick_and_interrupt_suppression_with_event_idx() {
        let (m, mut q, data) = test_queue(8, true);
        let l = q.layout();
        let avail_event = q.used_iova() + l.avail_event_offset();
        let used_event = q.avail_iova() + l.used_event_offset();
        // avail_event 0: the device wants to hear about entry 0.
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(q.kick_prepare().unwrap());
        // The device has not caught up (still waits for entry 0 = already notified).
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(!q.kick_prepare().unwrap());
        // The device now asks for entry 2.
        m.store_u16(avail_event, 2).unwrap();
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(q.kick_prepare().unwrap());
        // Entry 10 is far ahead.
        m.store_u16(avail_event, 10).unwrap();
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(!q.kick_prepare().unwrap());

        // used_event follows consumption.
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 0,
        };
        let heads: Vec<u16> = (0..5).map(|_| dev.pop().unwrap().0).collect();
        dev.push(u32::from(heads[0]), 0);
        dev.push(u32::from(heads[1]), 0);
        q.poll_used().unwrap().unwrap();
        assert_eq!(m.load_u16(used_event).unwrap(), 1);
        q.poll_used().unwrap().unwrap();
        assert_eq!(m.load_u16(used_event).unwrap(), 2);
        q.disable_interrupts().unwrap();
        assert_eq!(m.load_u16(used_event).unwrap(), 1);
        assert!(!q.enable_interrupts().unwrap());
        assert_eq!(m.load_u16(used_event).unwrap(), 2);
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 5,
            used_idx: 2,
        };
        dev.push(u32::from(heads[2]), 0);
        assert!(
            q.enable_interrupts().unwrap(),
            "a used entry is already waiting"
        );
    }

    #[test]
    fn queue_size_and_feature_choice() {
        assert_eq!(choose_queue_size(0, 256, 1024).unwrap(), 256);
        assert_eq!(choose_queue_size(0, 256, 128).unwrap(), 128);
        assert_eq!(choose_queue_size(0, 0, 1000).unwrap(), 512);
        assert_eq!(choose_queue_size(0, 0, 0xffff).unwrap(), 32768);
        assert_eq!(choose_queue_size(0, 1024, 1).unwrap(), 1);
        assert!(matches!(
            choose_queue_size(2, 256, 0),
            Err(DriverError::QueueSizeZero(2))
        ));
        assert!(choose_queue_size(0, 100, 256).is_err());

        let offered = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 0b101 | UNSUPPORTED_FEATURES;
        let f = negotiate_features(
            VIRTIO_RING_F_EVENT_IDX | 0b110 | UNSUPPORTED_FEATURES,
            offered,
        )
        .unwrap();
        assert_eq!(f, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 0b100);
        assert!(matches!(
            negotiate_features(u64::MAX, 0xffff_ffff),
            Err(DriverError::NotModern { .. })
        ));
    }

    #[test]
    fn config_pieces_are_naturally_aligned() {
        let p: Vec<_> = VirtioPciDriver::config_pieces(1, 9).collect();
        assert_eq!(p, vec![(1, 1), (2, 2), (4, 4), (8, 2)]);
        let p: Vec<_> = VirtioPciDriver::config_pieces(0, 8).collect();
        assert_eq!(p, vec![(0, 4), (4, 4)]);
        assert_eq!(VirtioPciDriver::config_pieces(3, 0).count(), 0);
    }

    // ---- virtio-blk ----

    #[test]
    fn blk_request_bytes_and_chains() {
        let r = VirtioBlkRequest::read(0x1122_3344_5566_7788, 4096);
        assert_eq!(
            r.header(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(
            r.chain(0x1000).unwrap(),
            vec![(0x1000, 16, false), (0x1010, 4096, true), (0x2010, 1, true)]
        );
        assert_eq!(r.buffer_len(), 16 + 4096 + 1);

        let w = VirtioBlkRequest::write(8, &[0xab; 512]);
        assert_eq!(&w.header()[..4], &1u32.to_le_bytes());
        assert_eq!(&w.header()[8..], &8u64.to_le_bytes());
        assert_eq!(
            w.chain(0).unwrap(),
            vec![(0, 16, false), (16, 512, false), (528, 1, true)]
        );

        let f = VirtioBlkRequest::flush();
        assert_eq!(f.header(), {
            let mut h = [0u8; 16];
            h[0] = 4;
            h
        });
        assert_eq!(f.chain(0).unwrap(), vec![(0, 16, false), (16, 1, true)]);

        let id = VirtioBlkRequest::get_id();
        assert_eq!(id.header()[0], 8);
        assert_eq!(
            id.chain(0).unwrap(),
            vec![(0, 16, false), (16, 20, true), (36, 1, true)]
        );

        let seg = BlkSegment {
            sector: 0x10,
            num_sectors: 0x20,
            flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        };
        assert_eq!(
            seg.to_bytes(),
            [0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 1, 0, 0, 0]
        );
        let d = VirtioBlkRequest::discard(&[seg, seg]);
        assert_eq!(d.header()[0], 11);
        assert_eq!(d.out.len(), 32);
        assert_eq!(
            d.chain(0).unwrap(),
            vec![(0, 16, false), (16, 32, false), (48, 1, true)]
        );
        let z = VirtioBlkRequest::write_zeroes(&[seg]);
        assert_eq!(z.header()[0], 13);
        assert_eq!(z.out, seg.to_bytes());
    }

    #[test]
    fn blk_request_placed_and_completed_in_memory() {
        let (m, mut q, data) = test_queue(8, false);
        let w = VirtioBlkRequest::write(3, b"abcd");
        let p = w.place(&m, data.iova).unwrap();
        let mut img = [0u8; 21];
        m.read(data.iova, &mut img).unwrap();
        assert_eq!(&img[..16], &w.header());
        assert_eq!(&img[16..20], b"abcd");
        assert_eq!(img[20], 0xff, "status preset");
        let head = q.add_chain(&p.chain).unwrap();

        let r = VirtioBlkRequest::read(0, 8);
        let base = data.iova + 64;
        let pr = r.place(&m, base).unwrap();
        q.add_chain(&pr.chain).unwrap();
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 0,
        };
        assert_eq!(dev.pop().unwrap().0, head);
        let (rh, descs) = dev.pop().unwrap();
        m.write(descs[1].0, b"datadata").unwrap();
        m.write(descs[2].0, &[VIRTIO_BLK_S_OK]).unwrap();
        dev.push(u32::from(rh), 9);
        let (h, len) = q.poll_used().unwrap().unwrap();
        assert_eq!(h, rh);
        let c = pr.complete(&m, len).unwrap();
        assert_eq!(
            c,
            BlkCompletion {
                status: VIRTIO_BLK_S_OK,
                data: b"datadata".to_vec(),
                used_len: 9
            }
        );
    }
}
