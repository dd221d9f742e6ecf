//! The vfio-user wire format: the 16-byte header, command numbers, flag bits, and the
//! fixed payloads of every command (QEMU `docs/interop/vfio-user.rst`, "Protocol
//! Specification").
//!
//! Hand-written because no crate offers a server-side codec that validates every field
//! of untrusted input: rust-vmm's `vfio-user` crate casts raw structs and trusts sizes.
//! Everything here parses from byte slices with explicit bounds checks and encodes into
//! `Vec<u8>`; nothing panics on short or malformed input (`WireError` instead). All
//! integers are little-endian (the spec says host order; unidev runs on x86-64 and
//! little-endian arm64/riscv hosts).

use std::fmt;

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;

/// Header flag: message type mask.
pub const FLAG_TYPE_MASK: u32 = 0xf;
/// Header type: command.
pub const FLAG_TYPE_COMMAND: u32 = 0x0;
/// Header type: reply.
pub const FLAG_TYPE_REPLY: u32 = 0x1;
/// Header flag: the sender wants no reply.
pub const FLAG_NO_REPLY: u32 = 0x10;
/// Header flag: the reply carries an error.
pub const FLAG_ERROR: u32 = 0x20;

/// vfio-user commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    /// Version and capability negotiation.
    Version = 1,
    /// Client memory becomes reachable.
    DmaMap = 2,
    /// Client memory is withdrawn.
    DmaUnmap = 3,
    /// Device flags and counts.
    DeviceGetInfo = 4,
    /// One region's description.
    DeviceGetRegionInfo = 5,
    /// ioeventfd/ioregionfd sub-regions of a region.
    DeviceGetRegionIoFds = 6,
    /// One interrupt kind's description.
    DeviceGetIrqInfo = 7,
    /// Interrupt eventfds, masks, triggers.
    DeviceSetIrqs = 8,
    /// Read from a region.
    RegionRead = 9,
    /// Write to a region.
    RegionWrite = 10,
    /// Server reads client memory.
    DmaRead = 11,
    /// Server writes client memory.
    DmaWrite = 12,
    /// Device reset.
    DeviceReset = 13,
    /// Removed from the protocol (dirty page logging, old form).
    DirtyPages = 14,
    /// Several small writes in one message.
    RegionWriteMulti = 15,
    /// VFIO_DEVICE_FEATURE.
    DeviceFeature = 16,
    /// Migration data read.
    MigDataRead = 17,
    /// Migration data write.
    MigDataWrite = 18,
}

impl Command {
    /// The command with number `n`.
    pub fn from_u16(n: u16) -> Option<Command> {
        use Command::*;
        Some(match n {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            14 => DirtyPages,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }
}

/// A payload that is too short or otherwise unparseable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct WireError {
    /// Which structure.
    pub what: &'static str,
    /// What is wrong.
    pub why: String,
}

impl WireError {
    fn short(what: &'static str, need: usize, got: usize) -> Self {
        WireError {
            what,
            why: format!("needs {need} bytes, got {got}"),
        }
    }
}

/// The 16-byte message header.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Message ID, echoed in the reply.
    pub id: u16,
    /// Command number.
    pub command: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    /// Type, No_reply and Error bits.
    pub flags: u32,
    /// errno of a failed command (replies only).
    pub error: u32,
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Header {{ id: {}, command: {:?}, size: {}, flags: {:#x}, error: {} }}",
            self.id,
            Command::from_u16(self.command)
                .map(|c| format!("{c:?}"))
                .unwrap_or_else(|| self.command.to_string()),
            self.size,
            self.flags,
            self.error
        )
    }
}

impl Header {
    /// Decode a header.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        Header {
            id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// Encode a header.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    /// A command header for `payload_len` bytes of payload.
    pub fn command(id: u16, command: Command, payload_len: usize, no_reply: bool) -> Header {
        Header {
            id,
            command: command as u16,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: FLAG_TYPE_COMMAND | if no_reply { FLAG_NO_REPLY } else { 0 },
            error: 0,
        }
    }

    /// A success reply to `self` carrying `payload_len` bytes.
    pub fn reply(&self, payload_len: usize) -> Header {
        Header {
            id: self.id,
            command: self.command,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: FLAG_TYPE_REPLY,
            error: 0,
        }
    }

    /// An error reply to `self` (header only, as the spec requires).
    pub fn error_reply(&self, errno: i32) -> Header {
        Header {
            id: self.id,
            command: self.command,
            size: HEADER_SIZE as u32,
            flags: FLAG_TYPE_REPLY | FLAG_ERROR,
            error: errno as u32,
        }
    }

    /// Whether this is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_TYPE_REPLY
    }

    /// Whether this is a command.
    pub fn is_command(&self) -> bool {
        self.flags & FLAG_TYPE_MASK == FLAG_TYPE_COMMAND
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    /// Whether this reply reports an error.
    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }
}

/// Bounds-checked little-endian reader over a payload.
#[derive(Debug)]
pub struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Read `buf`, naming it `what` in errors.
    pub fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Reader { what, buf, pos: 0 }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                WireError::short(self.what, self.pos.saturating_add(n), self.buf.len())
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos.min(self.buf.len())..];
        self.pos = self.buf.len();
        s
    }
}

/// Little-endian writer building a payload.
#[derive(Debug, Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// An empty payload with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Writer(Vec::with_capacity(n))
    }
    /// Append a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// The payload.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// DMA_MAP flag: readable.
pub const DMA_MAP_READ: u32 = 1 << 0;
/// DMA_MAP flag: writeable.
pub const DMA_MAP_WRITE: u32 = 1 << 1;
/// DMA_UNMAP flag: return a dirty bitmap (needs migration support).
pub const DMA_UNMAP_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// DMA_UNMAP flag: remove every map.
pub const DMA_UNMAP_ALL: u32 = 1 << 1;

/// DEVICE_GET_INFO flag: the device supports reset.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// DEVICE_GET_INFO flag: a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// Region info flag: readable.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// Region info flag: writable.
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// Region info flag: mappable (an fd comes with the reply).
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// Region info flag: capabilities follow.
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// Region capability: sparse mmap areas.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;

/// IRQ info flag: eventfd signalling.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// IRQ info flag: MASK/UNMASK supported.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// IRQ info flag: masks itself after firing.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// IRQ info flag: vectors are set up as a set.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// SET_IRQS data: none.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// SET_IRQS data: one bool byte per line.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// SET_IRQS data: eventfds (SCM_RIGHTS).
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// SET_IRQS action: mask.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// SET_IRQS action: unmask.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// SET_IRQS action: trigger.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// All SET_IRQS data bits.
pub const IRQ_SET_DATA_MASK: u32 = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
/// All SET_IRQS action bits.
pub const IRQ_SET_ACTION_MASK_ALL: u32 =
    IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;

/// Number of PCI region indices (BAR0-5, ROM, CONFIG, VGA).
pub const PCI_NUM_REGIONS: u32 = 9;
/// Number of PCI irq indices (INTx, MSI, MSI-X, ERR, REQ).
pub const PCI_NUM_IRQS: u32 = 5;

/// Entries a REGION_WRITE_MULTI may carry.
pub const WRITE_MULTI_MAX: u64 = 200;
/// Data bytes in one REGION_WRITE_MULTI entry.
pub const WRITE_MULTI_DATA: usize = 8;
/// Size of one REGION_WRITE_MULTI entry.
pub const WRITE_MULTI_ENTRY: usize = 24;

/// DMA_MAP payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaMapRequest {
    /// Size of this structure.
    pub argsz: u32,
    /// READ/WRITE bits.
    pub flags: u32,
    /// Offset into the fd.
    pub offset: u64,
    /// DMA address.
    pub address: u64,
    /// Length.
    pub size: u64,
}

impl DmaMapRequest {
    /// Encoded size.
    pub const SIZE: usize = 32;

    /// Parse.
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("DMA_MAP", p);
        Ok(DmaMapRequest {
            argsz: r.u32()?,
            flags: r.u32()?,
            offset: r.u64()?,
            address: r.u64()?,
            size: r.u64()?,
        })
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(self.argsz)
            .u32(self.flags)
            .u64(self.offset)
            .u64(self.address)
            .u64(self.size);
        w.finish()
    }
}

/// DMA_UNMAP payload (request and reply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaUnmapRequest {
    /// Maximum reply size.
    pub argsz: u32,
    /// GET_DIRTY_BITMAP / UNMAP_ALL.
    pub flags: u32,
    /// DMA address.
    pub address: u64,
    /// Length.
    pub size: u64,
}

impl DmaUnmapRequest {
    /// Encoded size.
    pub const SIZE: usize = 24;

    /// Parse.
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("DMA_UNMAP", p);
        Ok(DmaUnmapRequest {
            argsz: r.u32()?,
            flags: r.u32()?,
            address: r.u64()?,
            size: r.u64()?,
        })
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(self.argsz)
            .u32(self.flags)
            .u64(self.address)
            .u64(self.size);
        w.finish()
    }
}

/// DEVICE_GET_INFO payload (request and reply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Maximum (request) or needed (reply) size.
    pub argsz: u32,
    /// RESET/PCI bits.
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of irq kinds.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Parse.
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("DEVICE_GET_INFO", p);
        Ok(DeviceInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            num_regions: r.u32()?,
            num_irqs: r.u32()?,
        })
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(self.argsz)
            .u32(self.flags)
            .u32(self.num_regions)
            .u32(self.num_irqs);
        w.finish()
    }
}

/// DEVICE_GET_REGION_INFO fixed payload (`struct vfio_region_info`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionInfoWire {
    /// Maximum (request) or needed (reply) size, capabilities included.
    pub argsz: u32,
    /// READ/WRITE/MMAP/CAPS bits.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability from the start of this structure, or 0.
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// mmap offset of the region in the fd sent with the reply.
    pub offset: u64,
}

impl RegionInfoWire {
    /// Encoded size.
    pub const SIZE: usize = 32;

    /// Parse.
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("DEVICE_GET_REGION_INFO", p);
        Ok(RegionInfoWire {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            cap_offset: r.u32()?,
            size: r.u64()?,
            offset: r.u64()?,
        })
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(self.argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.cap_offset)
            .u64(self.size)
            .u64(self.offset);
        w.finish()
    }
}

/// Encode a sparse-mmap capability (`vfio_region_info_cap_sparse_mmap`) with `next` = 0.
pub fn encode_sparse_mmap_cap(areas: &[(u64, u64)]) -> Vec<u8> {
    let mut w = Writer::with_capacity(16 + 16 * areas.len());
    w.u16(REGION_INFO_CAP_SPARSE_MMAP)
        .u16(1)
        .u32(0)
        .u32(areas.len() as u32)
        .u32(0);
    for (offset, size) in areas {
        w.u64(*offset).u64(*size);
    }
    w.finish()
}

/// Walk the capability chain of a region-info reply (`buf` starts at the fixed struct)
/// and return the sparse mmap areas, if any. Used by clients and tests.
pub fn decode_sparse_mmap(buf: &[u8], first: u32) -> Result<Option<Vec<(u64, u64)>>, WireError> {
    let mut off = first as usize;
    let mut hops = 0;
    while off != 0 {
        hops += 1;
        if hops > 64 {
            return Err(WireError {
                what: "region capabilities",
                why: "capability chain loops".into(),
            });
        }
        let mut r = Reader::new("region capability", buf.get(off..).unwrap_or(&[]));
        let id = r.u16()?;
        let _version = r.u16()?;
        let next = r.u32()?;
        if id == REGION_INFO_CAP_SPARSE_MMAP {
            let n = r.u32()? as usize;
            let _reserved = r.u32()?;
            let mut areas = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                areas.push((r.u64()?, r.u64()?));
            }
            return Ok(Some(areas));
        }
        off = next as usize;
    }
    Ok(None)
}

/// GET_REGION_IO_FDS fixed payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionIoFds {
    /// Maximum (request) or needed (reply) size.
    pub argsz: u32,
    /// Must be 0.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Number of sub-regions that follow (reply).
    pub count: u32,
}

impl RegionIoFds {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Parse.
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("DEVICE_GET_REGION_IO_FDS", p);
        Ok(RegionIoFds {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        })
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(self.argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.count);
        w.finish()
    }
}

/// DEVICE_GET_IRQ_INFO payload (request and reply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfoWire {
    /// Maximum (request) or needed (reply) size.
    pub argsz: u32,
    /// EVENTFD/MASKABLE/AUTOMASKED/NORESIZE bits.
    pub flags: u32,
    /// Irq index.
    pub index: u32,
    /// Number of lines.
    pub count: u32,
}

impl IrqInfoWire {
    /// Encoded size.
    pub const SIZE: usize = 16;

    /// Parse.
    pub fn decode(p: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new("DEVICE_GET_IRQ_INFO", p);
        Ok(IrqInfoWire {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        })
    }

    /// Encode.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE);
        w.u32(self.argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.count);
        w.finish()
    }
}

/// DEVICE_SET_IRQS fixed payload; `data` (bools) follows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqSet {
    /// Size of the payload including data.
    pub argsz: u32,
    /// One DATA bit and one ACTION bit.
    pub flags: u32,
    /// Irq index.
    pub index: u32,
    /// First line.
    pub start: u32,
    /// Number of lines.
    pub count: u32,
}

impl IrqSet {
    /// Encoded size of the fixed part.
    pub const SIZE: usize = 20;

    /// Parse the fixed part; returns it and the data bytes after it.
    pub fn decode(p: &[u8]) -> Result<(Self, &[u8]), WireError> {
        let mut r = Reader::new("DEVICE_SET_IRQS", p);
        let s = IrqSet {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            start: r.u32()?,
            count: r.u32()?,
        };
        Ok((s, r.rest()))
    }

    /// Encode the fixed part followed by `data`.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE + data.len());
        w.u32(self.argsz)
            .u32(self.flags)
            .u32(self.index)
            .u32(self.start)
            .u32(self.count)
            .bytes(data);
        w.finish()
    }
}

/// REGION_READ/REGION_WRITE fixed payload; data follows for writes and read replies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes to transfer.
    pub count: u32,
}

impl RegionAccess {
    /// Encoded size of the fixed part.
    pub const SIZE: usize = 16;

    /// Parse the fixed part; returns it and the bytes after it.
    pub fn decode(p: &[u8]) -> Result<(Self, &[u8]), WireError> {
        let mut r = Reader::new("REGION_READ/WRITE", p);
        let a = RegionAccess {
            offset: r.u64()?,
            region: r.u32()?,
            count: r.u32()?,
        };
        Ok((a, r.rest()))
    }

    /// Encode the fixed part followed by `data`.
    pub fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut w = Writer::with_capacity(Self::SIZE + data.len());
        w.u64(self.offset)
            .u32(self.region)
            .u32(self.count)
            .bytes(data);
        w.finish()
    }
}

/// One entry of REGION_WRITE_MULTI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteMultiEntry {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes used of `data` (at most 8).
    pub count: u32,
    /// The data.
    pub data: [u8; WRITE_MULTI_DATA],
}

/// Parse REGION_WRITE_MULTI: `wr_cnt` then that many 24-byte entries.
pub fn decode_write_multi(p: &[u8]) -> Result<Vec<WriteMultiEntry>, WireError> {
    let mut r = Reader::new("REGION_WRITE_MULTI", p);
    let n = r.u64()?;
    if n > WRITE_MULTI_MAX {
        return Err(WireError {
            what: "REGION_WRITE_MULTI",
            why: format!("{n} writes, at most {WRITE_MULTI_MAX} allowed"),
        });
    }
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let offset = r.u64()?;
        let region = r.u32()?;
        let count = r.u32()?;
        let mut data = [0u8; WRITE_MULTI_DATA];
        data.copy_from_slice(r.bytes(WRITE_MULTI_DATA)?);
        if count as usize > WRITE_MULTI_DATA {
            return Err(WireError {
                what: "REGION_WRITE_MULTI",
                why: format!("entry count {count} exceeds {WRITE_MULTI_DATA}"),
            });
        }
        out.push(WriteMultiEntry {
            offset,
            region,
            count,
            data,
        });
    }
    Ok(out)
}

/// Encode REGION_WRITE_MULTI.
pub fn encode_write_multi(entries: &[WriteMultiEntry]) -> Vec<u8> {
    let mut w = Writer::with_capacity(8 + WRITE_MULTI_ENTRY * entries.len());
    w.u64(entries.len() as u64);
    for e in entries {
        w.u64(e.offset).u32(e.region).u32(e.count).bytes(&e.data);
    }
    w.finish()
}

/// How DMA_READ/DMA_WRITE payloads are laid out.
///
/// The spec (vfio-user.rst, "VFIO_USER_DMA_READ") gives `address: u64, count: u64`, data
/// at offset 16. QEMU's client (`hw/vfio-user/protocol.h`, `VFIOUserDMARW`) uses
/// `offset: u64, count: u32`, data at offset 12, sizes its replies as
/// `sizeof(VFIOUserDMARW) + count` (4 bytes of tail padding included), and answers
/// DMA_WRITE with a header-only reply. unidev speaks QEMU's layout by default, since QEMU
/// is the client that serves these messages in practice, and the spec's on request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DmaRwLayout {
    /// `u64 address, u32 count`, data at 12 (QEMU 10+/11).
    #[default]
    Qemu,
    /// `u64 address, u64 count`, data at 16 (the spec text, libvfio-user).
    Spec,
}

impl DmaRwLayout {
    /// Offset of the data in the payload.
    pub fn data_offset(self) -> usize {
        match self {
            DmaRwLayout::Qemu => 12,
            DmaRwLayout::Spec => 16,
        }
    }

    /// Encode a DMA_READ/DMA_WRITE request (or a DMA_READ reply) header plus `data`.
    pub fn encode(self, address: u64, count: u32, data: &[u8]) -> Vec<u8> {
        let mut w = Writer::with_capacity(16 + data.len() + 4);
        w.u64(address);
        match self {
            DmaRwLayout::Qemu => w.u32(count),
            DmaRwLayout::Spec => w.u64(count as u64),
        };
        w.bytes(data);
        if self == DmaRwLayout::Qemu {
            // QEMU sizes these messages as sizeof(VFIOUserDMARW) + count: 4 tail bytes.
            w.u32(0);
        }
        w.finish()
    }

    /// Parse `(address, count, data)` of a DMA_READ/DMA_WRITE payload. `data` is
    /// whatever follows the fixed part (callers check it against `count`).
    pub fn decode(self, p: &[u8]) -> Result<(u64, u64, &[u8]), WireError> {
        let mut r = Reader::new("DMA_READ/WRITE", p);
        let address = r.u64()?;
        let count = match self {
            DmaRwLayout::Qemu => r.u32()? as u64,
            DmaRwLayout::Spec => r.u64()?,
        };
        Ok((address, count, r.rest()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_reply_flags() {
        let h = Header::command(7, Command::RegionWrite, 20, true);
        let d = Header::decode(&h.encode());
        assert_eq!(d, h);
        assert!(d.is_command() && d.no_reply() && !d.is_reply());
        assert_eq!(d.size, 36);
        let r = d.reply(4);
        assert!(r.is_reply() && !r.is_error());
        assert_eq!((r.id, r.command, r.size), (7, 10, 20));
        let e = d.error_reply(libc::EINVAL);
        assert!(e.is_reply() && e.is_error());
        assert_eq!((e.size, e.error), (16, libc::EINVAL as u32));
        // Bytes on the wire are little-endian at fixed offsets.
        assert_eq!(&h.encode()[..4], &[7, 0, 10, 0]);
    }

    #[test]
    fn short_payloads_are_errors_not_panics() {
        for len in 0..DmaMapRequest::SIZE {
            assert!(DmaMapRequest::decode(&vec![0xff; len]).is_err());
        }
        assert!(IrqSet::decode(&[0; 19]).is_err());
        assert!(RegionAccess::decode(&[0; 15]).is_err());
        assert!(decode_write_multi(&[1, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(decode_write_multi(&201u64.to_le_bytes()).is_err());
        let mut r = Reader::new("x", &[1, 2]);
        assert!(r.bytes(usize::MAX).is_err());
    }

    #[test]
    fn payload_round_trips() {
        let m = DmaMapRequest {
            argsz: 32,
            flags: 3,
            offset: 0x1000,
            address: 0xfeed_0000,
            size: 0x2000,
        };
        assert_eq!(DmaMapRequest::decode(&m.encode()).unwrap(), m);
        let a = RegionAccess {
            offset: 4,
            region: 2,
            count: 2,
        };
        let enc = a.encode(&[9, 8]);
        assert_eq!(RegionAccess::decode(&enc).unwrap(), (a, &[9u8, 8][..]));
        let e = WriteMultiEntry {
            offset: 1,
            region: 7,
            count: 4,
            data: [1, 2, 3, 4, 0, 0, 0, 0],
        };
        assert_eq!(
            decode_write_multi(&encode_write_multi(&[e, e])).unwrap(),
            vec![e, e]
        );
    }

    #[test]
    fn sparse_mmap_cap_round_trip() {
        let mut buf = RegionInfoWire {
            argsz: 0,
            flags: REGION_INFO_FLAG_CAPS,
            index: 0,
            cap_offset: 32,
            size: 0x4000,
            offset: 0,
        }
        .encode();
        buf.extend(encode_sparse_mmap_cap(&[
            (0x1000, 0x1000),
            (0x3000, 0x1000),
        ]));
        assert_eq!(
            decode_sparse_mmap(&buf, 32).unwrap(),
            Some(vec![(0x1000, 0x1000), (0x3000, 0x1000)])
        );
        assert!(decode_sparse_mmap(&buf[..40], 32).is_err());
    }

    #[test]
    fn dma_rw_layouts() {
        let q = DmaRwLayout::Qemu.encode(0x1000, 3, &[1, 2, 3]);
        assert_eq!(q.len(), 8 + 4 + 3 + 4);
        assert_eq!(&q[12..15], &[1, 2, 3]);
        let (a, c, d) = DmaRwLayout::Qemu.decode(&q).unwrap();
        assert_eq!((a, c, &d[..3]), (0x1000, 3, &[1u8, 2, 3][..]));
        let s = DmaRwLayout::Spec.encode(0x1000, 3, &[1, 2, 3]);
        assert_eq!(s.len(), 16 + 3);
        assert_eq!(
            DmaRwLayout::Spec.decode(&s).unwrap(),
            (0x1000, 3, &[1u8, 2, 3][..])
        );
    }
}
