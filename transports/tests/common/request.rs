//! Messages the raw test client sends, built field by field from the spec's layouts
//! (vfio-user.rst, "Header" and each command's request), independently of the
//! transport's codec: [`Request::new`] plus `u16`/`u32`/`u64`/`bytes` for anything, and
//! one constructor per command layout for the usual case.

use std::os::fd::RawFd;

use super::{Msg, F_ERROR, F_REPLY};

/// Little-endian bytes under construction (payloads, and register data such as the
/// test device's doorbell).
#[derive(Clone, Debug, Default)]
pub struct LeBytes(pub Vec<u8>);

impl LeBytes {
    /// Empty.
    pub fn new() -> LeBytes {
        LeBytes(Vec::new())
    }
    /// Append a u16.
    pub fn u16(mut self, v: u16) -> LeBytes {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u32.
    pub fn u32(mut self, v: u32) -> LeBytes {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u64.
    pub fn u64(mut self, v: u64) -> LeBytes {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append bytes.
    pub fn bytes(mut self, b: &[u8]) -> LeBytes {
        self.0.extend_from_slice(b);
        self
    }
    /// The bytes.
    pub fn done(self) -> Vec<u8> {
        self.0
    }
}

/// A 16-byte header: id u16, command u16, size u32, flags u32, error u32.
pub fn header(id: u16, command: u16, size: u32, flags: u32, error: u32) -> Vec<u8> {
    LeBytes::new()
        .u16(id)
        .u16(command)
        .u32(size)
        .u32(flags)
        .u32(error)
        .done()
}

/// One message for the client to send: a command, or the client's reply to a command
/// the server sent (DMA_READ/DMA_WRITE). Fields are appended to the payload in order;
/// the header is written when the message is sent.
#[derive(Clone, Debug)]
pub struct Request {
    /// Command number.
    pub command: u16,
    /// Message ID; `None` takes the client's next one.
    pub id: Option<u16>,
    /// Header flags (type, No_reply, Error).
    pub flags: u32,
    /// Header error field.
    pub error: u32,
    /// The payload.
    pub payload: Vec<u8>,
    /// Fds sent with the message.
    pub fds: Vec<RawFd>,
}

impl Request {
    /// A command with an empty payload.
    pub fn new(command: u16) -> Request {
        Request {
            command,
            id: None,
            flags: 0,
            error: 0,
            payload: Vec::new(),
            fds: Vec::new(),
        }
    }

    /// A success reply to `m` (same ID and command), payload to follow.
    pub fn reply_to(m: &Msg) -> Request {
        Request {
            id: Some(m.id),
            flags: F_REPLY,
            ..Request::new(m.command)
        }
    }

    /// An error reply to `m` carrying `errno` (header only).
    pub fn error_reply_to(m: &Msg, errno: u32) -> Request {
        Request {
            flags: F_REPLY | F_ERROR,
            error: errno,
            ..Request::reply_to(m)
        }
    }

    /// Append a u16.
    pub fn u16(mut self, v: u16) -> Request {
        self.payload.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u32.
    pub fn u32(mut self, v: u32) -> Request {
        self.payload.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u64.
    pub fn u64(mut self, v: u64) -> Request {
        self.payload.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append bytes.
    pub fn bytes(mut self, b: &[u8]) -> Request {
        self.payload.extend_from_slice(b);
        self
    }

    /// Overwrite the u32 at payload offset `off`.
    #[track_caller]
    pub fn patch_u32(mut self, off: usize, v: u32) -> Request {
        self.payload[off..off + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
    /// Overwrite the u64 at payload offset `off`.
    #[track_caller]
    pub fn patch_u64(mut self, off: usize, v: u64) -> Request {
        self.payload[off..off + 8].copy_from_slice(&v.to_le_bytes());
        self
    }
    /// Overwrite `argsz` (the first u32 of every payload that has one).
    #[track_caller]
    pub fn argsz(self, v: u32) -> Request {
        self.patch_u32(0, v)
    }

    /// Send `fds` with the message.
    pub fn fds(mut self, fds: &[RawFd]) -> Request {
        self.fds = fds.to_vec();
        self
    }
    /// Use message ID `id`.
    pub fn id(mut self, id: u16) -> Request {
        self.id = Some(id);
        self
    }
    /// Set No_reply.
    pub fn no_reply(mut self) -> Request {
        self.flags |= super::F_NO_REPLY;
        self
    }

    /// Header and payload as sent with message ID `id`.
    pub fn to_bytes(&self, id: u16) -> Vec<u8> {
        let size = 16 + self.payload.len() as u32;
        let mut m = header(id, self.command, size, self.flags, self.error);
        m.extend_from_slice(&self.payload);
        m
    }

    // -----------------------------------------------------------------------------------
    // One constructor per command layout.

    /// VERSION: major, minor, no capabilities.
    pub fn version(major: u16, minor: u16) -> Request {
        Request::new(super::cmd::VERSION).u16(major).u16(minor)
    }

    /// VERSION: major, minor, then `json` NUL-terminated.
    pub fn version_json(major: u16, minor: u16, json: &[u8]) -> Request {
        Request::version(major, minor).bytes(json).bytes(&[0])
    }

    /// DMA_MAP: argsz 32, flags, offset, address, size.
    pub fn dma_map(flags: u32, offset: u64, address: u64, size: u64) -> Request {
        Request::new(super::cmd::DMA_MAP)
            .u32(32)
            .u32(flags)
            .u64(offset)
            .u64(address)
            .u64(size)
    }

    /// DMA_UNMAP: argsz 24, flags, address, size.
    pub fn dma_unmap(flags: u32, address: u64, size: u64) -> Request {
        Request::new(super::cmd::DMA_UNMAP)
            .u32(24)
            .u32(flags)
            .u64(address)
            .u64(size)
    }

    /// DEVICE_GET_INFO: argsz, then flags, num_regions, num_irqs all 0.
    pub fn device_info(argsz: u32) -> Request {
        Request::new(super::cmd::DEVICE_GET_INFO)
            .u32(argsz)
            .u32(0)
            .u32(0)
            .u32(0)
    }

    /// DEVICE_GET_REGION_INFO: argsz, flags 0, index, cap_offset 0, size 0, offset 0.
    pub fn region_info(argsz: u32, index: u32) -> Request {
        Request::new(super::cmd::DEVICE_GET_REGION_INFO)
            .u32(argsz)
            .u32(0)
            .u32(index)
            .u32(0)
            .u64(0)
            .u64(0)
    }

    /// DEVICE_GET_REGION_IO_FDS: argsz, flags, index, count 0.
    pub fn region_io_fds(argsz: u32, flags: u32, index: u32) -> Request {
        Request::new(super::cmd::DEVICE_GET_REGION_IO_FDS)
            .u32(argsz)
            .u32(flags)
            .u32(index)
            .u32(0)
    }

    /// DEVICE_GET_IRQ_INFO: argsz, flags 0, index, count 0.
    pub fn irq_info(argsz: u32, index: u32) -> Request {
        Request::new(super::cmd::DEVICE_GET_IRQ_INFO)
            .u32(argsz)
            .u32(0)
            .u32(index)
            .u32(0)
    }

    /// DEVICE_SET_IRQS: argsz 20 + data, flags, index, start, count, then `data`.
    pub fn set_irqs(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Request {
        Request::new(super::cmd::DEVICE_SET_IRQS)
            .u32(20 + data.len() as u32)
            .u32(flags)
            .u32(index)
            .u32(start)
            .u32(count)
            .bytes(data)
    }

    /// REGION_READ or REGION_WRITE (`command`): offset, region, count, then `data`, which
    /// need not match `count`.
    pub fn region_access(
        command: u16,
        region: u32,
        offset: u64,
        count: u32,
        data: &[u8],
    ) -> Request {
        Request::new(command)
            .u64(offset)
            .u32(region)
            .u32(count)
            .bytes(data)
    }

    /// REGION_READ of `count` bytes.
    pub fn region_read(region: u32, offset: u64, count: u32) -> Request {
        Request::region_access(super::cmd::REGION_READ, region, offset, count, &[])
    }

    /// REGION_WRITE of `data`.
    pub fn region_write(region: u32, offset: u64, data: &[u8]) -> Request {
        Request::region_access(
            super::cmd::REGION_WRITE,
            region,
            offset,
            data.len() as u32,
            data,
        )
    }

    /// REGION_WRITE_MULTI: wr_cnt, then each entry as offset u64, region u32, count u32
    /// and 8 data bytes (`data` zero-padded to 8).
    #[track_caller]
    pub fn write_multi(entries: &[MultiEntry]) -> Request {
        let mut r = Request::new(super::cmd::REGION_WRITE_MULTI).u64(entries.len() as u64);
        for e in entries {
            let mut data = [0u8; 8];
            data[..e.data.len()].copy_from_slice(&e.data);
            r = r.u64(e.offset).u32(e.region).u32(e.count).bytes(&data);
        }
        r
    }
}

/// One REGION_WRITE_MULTI entry (see [`Request::write_multi`]).
#[derive(Clone, Debug)]
pub struct MultiEntry {
    /// Region index.
    pub region: u32,
    /// Offset in the region.
    pub offset: u64,
    /// The entry's count field (need not match `data`).
    pub count: u32,
    /// Up to 8 data bytes.
    pub data: Vec<u8>,
}

/// A REGION_WRITE_MULTI entry.
pub fn multi_entry(region: u32, offset: u64, count: u32, data: &[u8]) -> MultiEntry {
    MultiEntry {
        region,
        offset,
        count,
        data: data.to_vec(),
    }
}
