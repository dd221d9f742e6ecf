//! The vfio-user wire format: the 16-byte header, command numbers, flag bits, and the
//! fixed payloads of every command (QEMU `docs/interop/vfio-user.rst`, "Protocol
//! Specification": "Header" and the request/reply layouts under "Commands").
//!
//! Why not a crate: no crate offers a server-side codec that validates every field of
//! untrusted input (rust-vmm's `vfio-user` crate casts raw structs and trusts sizes).
//!
//! How: every fixed layout — the header and each command's fixed payload — is declared
//! once with `wire_struct!`, as a struct whose fields appear in wire order with
//! fixed-width integer or byte-array types, plus the size the spec gives it (checked at
//! compile time). The macro generates the field-by-field read and write and, for a
//! command payload, `SIZE`, `decode` and `encode`. Variable parts (capability chains,
//! REGION_WRITE_MULTI's entry list, the data after a fixed part) are walked by hand on
//! top of those layouts.
//!
//! Bounds: every read goes through [`Reader::bytes`], the one place lengths are
//! checked. A layout is read one field at a time, so a short payload fails at the first
//! field that does not fit, as a [`WireError`] naming the command and the bytes that
//! field needs ("needs 16 bytes, got 10"); nothing panics on short or malformed input.
//! Bytes after a fixed payload are ignored or handed back as its data.
//!
//! Endianness: the spec gives integers in host byte order; unidev runs on little-endian
//! hosts (x86-64, and little-endian arm64/riscv), where that is little-endian, and QEMU
//! is the peer on the same host. Every integer is converted explicitly
//! (`to_le_bytes`/`from_le_bytes` in the integers' `WireLayout`), never by casting
//! memory, so the bytes do not depend on the target the codec is built for, and no
//! `unsafe` is needed.

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

    /// The next `n` bytes. The one bounds check of the codec: a read past the end is a
    /// [`WireError`] saying how many bytes the read needed.
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
        u16::read(self)
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        u32::read(self)
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        u64::read(self)
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
        v.write(self);
        self
    }
    /// Append a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        v.write(self);
        self
    }
    /// Append a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        v.write(self);
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

/// Where encoded bytes go: the end of a growing payload ([`Writer`]) or a fixed buffer
/// filled front to back (the header's array, as `slice::IterMut`).
trait ByteSink {
    /// Append `bytes`.
    fn put(&mut self, bytes: &[u8]);
}

impl ByteSink for Writer {
    fn put(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

impl ByteSink for std::slice::IterMut<'_, u8> {
    fn put(&mut self, bytes: &[u8]) {
        // Layouts written into an array are exactly the array's size (checked at compile
        // time), so nothing is cut off here; zip just makes an overrun impossible. `bytes`
        // goes first: zip then stops without taking a slot it will not fill.
        for (byte, slot) in bytes.iter().zip(self.by_ref()) {
            *slot = *byte;
        }
    }
}

/// A value with a fixed little-endian wire layout: integers, byte arrays, and the
/// structs of `wire_struct!` (their fields in order, no padding).
trait WireLayout: Sized {
    /// Bytes on the wire.
    const SIZE: usize;
    /// Read one value; a short buffer fails at the first field that does not fit.
    fn read(r: &mut Reader<'_>) -> Result<Self, WireError>;
    /// Write one value.
    fn write<S: ByteSink>(&self, out: &mut S);
}

impl<const N: usize> WireLayout for [u8; N] {
    const SIZE: usize = N;

    fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let what = r.what;
        let bytes = r.bytes(N)?;
        // `bytes` returned exactly N bytes, so the conversion succeeds.
        bytes
            .try_into()
            .map_err(|_| WireError::short(what, N, bytes.len()))
    }

    fn write<S: ByteSink>(&self, out: &mut S) {
        out.put(self);
    }
}

/// [`WireLayout`] for little-endian integers.
macro_rules! le_integer_layout {
    ($($int:ty),*) => {$(
        impl WireLayout for $int {
            const SIZE: usize = std::mem::size_of::<$int>();

            fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
                Ok(<$int>::from_le_bytes(WireLayout::read(r)?))
            }

            fn write<S: ByteSink>(&self, out: &mut S) {
                out.put(&self.to_le_bytes());
            }
        }
    )*};
}

le_integer_layout!(u16, u32, u64);

/// Declare a fixed wire layout: a struct whose fields are listed in wire order, each a
/// [`WireLayout`] type (u16, u32, u64, `[u8; N]`, or another such struct).
///
/// `#[wire(size = N)]` (between the doc comment and the other attributes) states the
/// spec's size; the build fails if the fields do not add up to it. The macro implements
/// [`WireLayout`] (field reads in declaration order through one [`Reader`], so the
/// first short field is the error). Two options add the public codec of a command
/// payload, whose errors name it as `what`:
///
/// * `payload = "what"`: `SIZE`, `decode(&[u8]) -> Result<Self, WireError>` (bytes after
///   the layout are ignored) and `encode(&self) -> Vec<u8>`;
/// * `payload = "what", data follows`: `SIZE`, `decode(&[u8]) -> Result<(Self, &[u8]),
///   WireError>` (the bytes after the layout) and `encode(&self, data: &[u8]) -> Vec<u8>`.
///
/// Every layout declared here is listed in the test
/// `every_layout_round_trips_and_refuses_every_truncation`.
macro_rules! wire_struct {
    (
        $(#[doc = $doc:literal])*
        #[wire(size = $size:expr $(, payload = $what:literal $(, $data:ident $follows:ident)?)?)]
        $(#[$attr:meta])*
        $vis:vis struct $name:ident {
            $( $(#[$field_attr:meta])* $field_vis:vis $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[doc = $doc])*
        $(#[$attr])*
        $vis struct $name {
            $( $(#[$field_attr])* $field_vis $field: $ty, )*
        }

        impl WireLayout for $name {
            const SIZE: usize = 0 $( + <$ty as WireLayout>::SIZE )*;

            fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
                // Struct expression fields are evaluated in the order written: wire order.
                Ok($name { $( $field: WireLayout::read(r)?, )* })
            }

            fn write<S: ByteSink>(&self, out: &mut S) {
                $( self.$field.write(out); )*
            }
        }

        const _: () = assert!(
            <$name as WireLayout>::SIZE == $size,
            concat!(stringify!($name), ": the fields do not add up to the spec's size"),
        );

        // `data follows` arrives as two idents; only the `@payload` arms accept them.
        $( wire_struct!(@payload $name, $what $(, $data $follows)?); )?
    };

    (@payload $name:ident, $what:literal) => {
        impl $name {
            /// Encoded size.
            pub const SIZE: usize = <Self as WireLayout>::SIZE;

            /// Parse (bytes after [`Self::SIZE`] are ignored).
            pub fn decode(p: &[u8]) -> Result<Self, WireError> {
                Self::read(&mut Reader::new($what, p))
            }

            /// Encode.
            pub fn encode(&self) -> Vec<u8> {
                let mut w = Writer::with_capacity(Self::SIZE);
                self.write(&mut w);
                w.finish()
            }
        }
    };

    (@payload $name:ident, $what:literal, data follows) => {
        impl $name {
            /// Encoded size of the fixed part.
            pub const SIZE: usize = <Self as WireLayout>::SIZE;

            /// Parse the fixed part; returns it and the bytes after it.
            pub fn decode(p: &[u8]) -> Result<(Self, &[u8]), WireError> {
                let mut r = Reader::new($what, p);
                let fixed = Self::read(&mut r)?;
                Ok((fixed, r.rest()))
            }

            /// Encode the fixed part followed by `data`.
            pub fn encode(&self, data: &[u8]) -> Vec<u8> {
                let mut w = Writer::with_capacity(Self::SIZE + data.len());
                self.write(&mut w);
                w.bytes(data);
                w.finish()
            }
        }
    };
}

wire_struct! {
    /// The 16-byte message header.
    #[wire(size = HEADER_SIZE)]
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
        // The array is exactly the header's layout (checked at compile time), so no
        // field read can fail. Were one to, the all-zero header (size 0) would end the
        // connection as a framing error.
        Header::read(&mut Reader::new("header", b)).unwrap_or_default()
    }

    /// Encode a header.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        self.write(&mut b.iter_mut());
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

wire_struct! {
    /// DMA_MAP payload.
    #[wire(size = 32, payload = "DMA_MAP")]
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
}

wire_struct! {
    /// DMA_UNMAP payload (request and reply).
    #[wire(size = 24, payload = "DMA_UNMAP")]
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
}

wire_struct! {
    /// DEVICE_GET_INFO payload (request and reply).
    #[wire(size = 16, payload = "DEVICE_GET_INFO")]
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
}

wire_struct! {
    /// DEVICE_GET_REGION_INFO fixed payload (`struct vfio_region_info`).
    #[wire(size = 32, payload = "DEVICE_GET_REGION_INFO")]
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
}

wire_struct! {
    /// The header every region capability starts with (`struct vfio_info_cap_header`).
    #[wire(size = 8)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct RegionCapHeader {
        /// Capability ID.
        id: u16,
        /// Capability version.
        version: u16,
        /// Offset of the next capability from the start of the region info, or 0.
        next: u32,
    }
}

wire_struct! {
    /// What follows the header of a sparse-mmap capability
    /// (`struct vfio_region_info_cap_sparse_mmap`); `nr_areas` areas come after it.
    #[wire(size = 8)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct SparseMmapAreaCount {
        /// Number of areas.
        nr_areas: u32,
        /// Reserved, 0.
        reserved: u32,
    }
}

wire_struct! {
    /// One mappable area of a region (`struct vfio_region_sparse_mmap_area`).
    #[wire(size = 16)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct SparseMmapArea {
        /// Offset in the region.
        offset: u64,
        /// Length.
        size: u64,
    }
}

/// Encode a sparse-mmap capability (`vfio_region_info_cap_sparse_mmap`) with `next` = 0.
pub fn encode_sparse_mmap_cap(areas: &[(u64, u64)]) -> Vec<u8> {
    let mut w = Writer::with_capacity(16 + 16 * areas.len());
    RegionCapHeader {
        id: REGION_INFO_CAP_SPARSE_MMAP,
        version: 1,
        next: 0,
    }
    .write(&mut w);
    SparseMmapAreaCount {
        nr_areas: areas.len() as u32,
        reserved: 0,
    }
    .write(&mut w);
    for &(offset, size) in areas {
        SparseMmapArea { offset, size }.write(&mut w);
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
        let cap = RegionCapHeader::read(&mut r)?;
        if cap.id == REGION_INFO_CAP_SPARSE_MMAP {
            let n = SparseMmapAreaCount::read(&mut r)?.nr_areas as usize;
            let mut areas = Vec::with_capacity(n.min(64));
            for _ in 0..n {
                let area = SparseMmapArea::read(&mut r)?;
                areas.push((area.offset, area.size));
            }
            return Ok(Some(areas));
        }
        off = cap.next as usize;
    }
    Ok(None)
}

wire_struct! {
    /// GET_REGION_IO_FDS fixed payload.
    #[wire(size = 16, payload = "DEVICE_GET_REGION_IO_FDS")]
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
}

wire_struct! {
    /// DEVICE_GET_IRQ_INFO payload (request and reply).
    #[wire(size = 16, payload = "DEVICE_GET_IRQ_INFO")]
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
}

wire_struct! {
    /// DEVICE_SET_IRQS fixed payload; `data` (bools) follows it.
    #[wire(size = 20, payload = "DEVICE_SET_IRQS", data follows)]
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
}

wire_struct! {
    /// REGION_READ/REGION_WRITE fixed payload; data follows for writes and read replies.
    #[wire(size = 16, payload = "REGION_READ/WRITE", data follows)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RegionAccess {
        /// Offset in the region.
        pub offset: u64,
        /// Region index.
        pub region: u32,
        /// Bytes to transfer.
        pub count: u32,
    }
}

wire_struct! {
    /// One entry of REGION_WRITE_MULTI.
    #[wire(size = WRITE_MULTI_ENTRY)]
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
        let entry = WriteMultiEntry::read(&mut r)?;
        if entry.count as usize > WRITE_MULTI_DATA {
            return Err(WireError {
                what: "REGION_WRITE_MULTI",
                why: format!("entry count {} exceeds {WRITE_MULTI_DATA}", entry.count),
            });
        }
        out.push(entry);
    }
    Ok(out)
}

/// Encode REGION_WRITE_MULTI.
pub fn encode_write_multi(entries: &[WriteMultiEntry]) -> Vec<u8> {
    let mut w = Writer::with_capacity(8 + WRITE_MULTI_ENTRY * entries.len());
    w.u64(entries.len() as u64);
    for e in entries {
        e.write(&mut w);
    }
    w.finish()
}

wire_struct! {
    /// The fixed part of DMA_READ/DMA_WRITE in QEMU's layout (`VFIOUserDMARW` without its
    /// 4 bytes of tail padding).
    #[wire(size = 12)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct DmaRwQemu {
        /// DMA address.
        address: u64,
        /// Bytes to transfer.
        count: u32,
    }
}

wire_struct! {
    /// The fixed part of DMA_READ/DMA_WRITE in the spec's layout.
    #[wire(size = 16)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    struct DmaRwSpec {
        /// DMA address.
        address: u64,
        /// Bytes to transfer.
        count: u64,
    }
}

/// Tail padding QEMU puts after the data of DMA_READ/DMA_WRITE messages: it sizes them
/// as `sizeof(VFIOUserDMARW) + count`.
const QEMU_DMA_RW_TAIL: [u8; 4] = [0; 4];

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
            DmaRwLayout::Qemu => DmaRwQemu::SIZE,
            DmaRwLayout::Spec => DmaRwSpec::SIZE,
        }
    }

    /// Encode a DMA_READ/DMA_WRITE request (or a DMA_READ reply) header plus `data`.
    pub fn encode(self, address: u64, count: u32, data: &[u8]) -> Vec<u8> {
        let mut w = Writer::with_capacity(16 + data.len() + 4);
        match self {
            DmaRwLayout::Qemu => DmaRwQemu { address, count }.write(&mut w),
            DmaRwLayout::Spec => DmaRwSpec {
                address,
                count: count as u64,
            }
            .write(&mut w),
        }
        w.bytes(data);
        if self == DmaRwLayout::Qemu {
            w.bytes(&QEMU_DMA_RW_TAIL);
        }
        w.finish()
    }

    /// Parse `(address, count, data)` of a DMA_READ/DMA_WRITE payload. `data` is
    /// whatever follows the fixed part (callers check it against `count`).
    pub fn decode(self, p: &[u8]) -> Result<(u64, u64, &[u8]), WireError> {
        let mut r = Reader::new("DMA_READ/WRITE", p);
        let (address, count) = match self {
            DmaRwLayout::Qemu => {
                let fixed = DmaRwQemu::read(&mut r)?;
                (fixed.address, fixed.count as u64)
            }
            DmaRwLayout::Spec => {
                let fixed = DmaRwSpec::read(&mut r)?;
                (fixed.address, fixed.count)
            }
        };
        Ok((address, count, r.rest()))
    }
}

#[cfg(test)]
mod tests;
