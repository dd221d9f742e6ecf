//! A type-0 PCI configuration space with real register semantics.
//!
//! What it is for: every PCI function a transport exposes needs a configuration space
//! that behaves like hardware, because guest drivers (and the guest's PCI core, and the
//! firmware before it) rely on the exact semantics — which bits stick, which are
//! read-only, which clear when written with one, how a BAR answers the "write all-ones,
//! read back the size mask" probe. [`ConfigSpaceBuilder`] describes a function once
//! (identity, BARs, expansion ROM, capabilities); [`ConfigSpace`] then emulates reads and
//! writes of any length and alignment and tells the device what a write changed
//! ([`ConfigWrite`]) so it can react (decoding enabled, INTx disabled, MSI/MSI-X switched
//! on, a power-state change).
//!
//! Specifications implemented:
//! * PCI Local Bus Specification 3.0, chapter 6: the type-0 header (6.1, 6.2), the
//!   Command and Status registers (6.2.2, 6.2.3), Base Address Registers and the
//!   expansion ROM BAR (6.2.5), the capabilities list (6.7), MSI (6.8.1) and the MSI-X
//!   capability structure (6.8.2; the table and PBA live in [`super::msix`]).
//! * PCI Bus Power Management Interface 1.2, chapter 3: the PM capability with D0 and
//!   D3hot only.
//! * PCI Express Base 4.0, 7.5.3: a version-2 PCI Express capability for an endpoint
//!   (2.5 GT/s x1 link, no slot, no ASPM, no FLR). With [`ConfigSpaceBuilder::extended`]
//!   the space is 4096 bytes and the extended capability list at 0x100 is empty (its
//!   header reads 0).
//!
//! Every register is modelled with three per-byte masks: the current value, the bits
//! software may write, and the bits that are write-one-to-clear. A few registers get a
//! fix-up after the generic write (MSI's Multiple Message Enable is clamped to what the
//! function is capable of; a write of an unsupported power state is discarded, as PM 1.2
//! 3.2.4 requires).
//!
//! Nothing here trusts the caller: offsets and lengths outside the space are ignored on
//! write and read as `0xff` (the value a master abort returns), and no access panics.

use thiserror::Error;

/// Command register: I/O space decoding enable (bit 0).
pub const COMMAND_IO: u16 = 1 << 0;
/// Command register: memory space decoding enable (bit 1).
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: bus master (DMA) enable (bit 2).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: parity error response (bit 6).
pub const COMMAND_PARITY: u16 = 1 << 6;
/// Command register: SERR# enable (bit 8).
pub const COMMAND_SERR: u16 = 1 << 8;
/// Command register: INTx emulation disable (bit 10).
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// Status register: INTx status, set by the device while its INTx is asserted (bit 3).
pub const STATUS_INTX: u16 = 1 << 3;
/// Status register: capabilities list present (bit 4).
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Status register: the error bits, write-one-to-clear (bits 8 and 11..=15).
pub const STATUS_ERRORS_RW1C: u16 = 0xf900;

/// Size of a conventional PCI configuration space.
pub const CONFIG_SPACE_SIZE: u64 = 256;
/// Size of a PCI Express (extended) configuration space.
pub const EXTENDED_CONFIG_SPACE_SIZE: u64 = 4096;

// Type-0 header offsets (PCI 3.0, figure 6-1).
const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const PROG_IF: usize = 0x09;
const SUBCLASS: usize = 0x0a;
const CLASS: usize = 0x0b;
const CACHE_LINE_SIZE: usize = 0x0c;
const LATENCY_TIMER: usize = 0x0d;
const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const ROM_BAR: usize = 0x30;
const CAP_PTR: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;
/// First byte of the capability area (after the 64-byte header).
const CAP_START: usize = 0x40;
/// End of the (conventional) capability area.
const CAP_END: usize = 0x100;

/// Number of BAR slots in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Largest I/O BAR (PCI 3.0 6.2.5.1: "must not consume more than 256 bytes per I/O
/// Base Address register").
const MAX_IO_BAR: u64 = 256;
/// Smallest memory BAR: 16 bytes (bits 3:0 hold the flags).
const MIN_MEM_BAR: u64 = 16;
/// Smallest I/O BAR: 4 bytes (bits 1:0 hold the flags).
const MIN_IO_BAR: u64 = 4;
/// Smallest expansion ROM: 2 KiB (bits 10:1 are reserved).
const MIN_ROM: u64 = 2048;
/// Largest expansion ROM: the address field is 21 bits above bit 10.
const MAX_ROM: u64 = 1 << 31;

/// The address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// 32-bit memory space (one slot).
    Mem32,
    /// 64-bit memory space (two slots: this one and the next holds the upper half).
    Mem64,
    /// I/O space.
    Io,
}

/// A base address register as the device declares it: kind and size. The address is
/// programmed by software and read back with [`ConfigSpace::bar_address`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bar {
    /// Address space.
    pub kind: BarKind,
    /// Size in bytes: a power of two, at least 16 for memory and 4 for I/O.
    pub size: u64,
    /// Memory reads have no side effects (bit 3). Only meaningful for memory BARs.
    pub prefetchable: bool,
}

impl Bar {
    /// A 32-bit memory BAR of `size` bytes.
    pub fn mem32(size: u64) -> Self {
        Bar {
            kind: BarKind::Mem32,
            size,
            prefetchable: false,
        }
    }

    /// A 64-bit memory BAR of `size` bytes (takes this slot and the next).
    pub fn mem64(size: u64) -> Self {
        Bar {
            kind: BarKind::Mem64,
            size,
            prefetchable: false,
        }
    }

    /// An I/O BAR of `size` bytes.
    pub fn io(size: u64) -> Self {
        Bar {
            kind: BarKind::Io,
            size,
            prefetchable: false,
        }
    }

    /// The same BAR, marked prefetchable (memory BARs only; [`ConfigSpaceBuilder::build`]
    /// rejects a prefetchable I/O BAR).
    pub fn prefetchable(mut self) -> Self {
        self.prefetchable = true;
        self
    }

    /// Whether the BAR decodes I/O space.
    pub fn is_io(&self) -> bool {
        self.kind == BarKind::Io
    }

    /// The read-only low bits of the BAR register (space indicator, type, prefetchable).
    fn flags(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x1,
            BarKind::Mem32 => u32::from(self.prefetchable) << 3,
            BarKind::Mem64 => 0x4 | (u32::from(self.prefetchable) << 3),
        }
    }

    /// The writable address bits of the whole (possibly 64-bit) register.
    fn address_mask(&self) -> u64 {
        let size_mask = !(self.size.wrapping_sub(1));
        match self.kind {
            BarKind::Io => size_mask & 0xffff_fffc,
            BarKind::Mem32 => size_mask & 0xffff_fff0,
            BarKind::Mem64 => size_mask & !0xf,
        }
    }
}

/// A capability to place in the capability list (PCI 3.0 6.7). The list is laid out in
/// the order the capabilities were added, from offset 0x40, each aligned to 4 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capability {
    /// PCI Power Management 1.2: D0 and D3hot, no PME, No_Soft_Reset set (the function
    /// keeps its state across D3hot → D0).
    PowerManagement,
    /// Message Signalled Interrupts (PCI 3.0 6.8.1).
    Msi {
        /// Vectors the function can use: a power of two, 1..=32.
        vectors: u8,
        /// 64-bit message address.
        addr64: bool,
        /// Per-vector mask and pending bits.
        per_vector_mask: bool,
    },
    /// MSI-X (PCI 3.0 6.8.2). The table and PBA must lie inside memory BARs of the
    /// function; emulate them with [`super::msix::Msix`].
    Msix {
        /// Number of table entries, 1..=2048.
        table_size: u16,
        /// BAR index holding the table.
        table_bar: u8,
        /// Offset of the table in that BAR (8-byte aligned).
        table_offset: u32,
        /// BAR index holding the pending bit array.
        pba_bar: u8,
        /// Offset of the PBA in that BAR (8-byte aligned).
        pba_offset: u32,
    },
    /// PCI Express capability, version 2, for an endpoint: 2.5 GT/s x1 link, 128-byte
    /// max payload, extended tags, role-based error reporting; no slot, no ASPM, no FLR.
    PciExpress,
    /// Vendor-specific capability (id 0x09); the bytes follow the 3-byte header
    /// (id, next, length) and are read-only.
    Vendor(Vec<u8>),
}

impl Capability {
    /// Capability id of PCI Power Management.
    pub const ID_PM: u8 = 0x01;
    /// Capability id of MSI.
    pub const ID_MSI: u8 = 0x05;
    /// Capability id of a vendor-specific capability.
    pub const ID_VENDOR: u8 = 0x09;
    /// Capability id of PCI Express.
    pub const ID_PCIE: u8 = 0x10;
    /// Capability id of MSI-X.
    pub const ID_MSIX: u8 = 0x11;

    /// The capability id.
    pub fn id(&self) -> u8 {
        match self {
            Capability::PowerManagement => Self::ID_PM,
            Capability::Msi { .. } => Self::ID_MSI,
            Capability::Msix { .. } => Self::ID_MSIX,
            Capability::PciExpress => Self::ID_PCIE,
            Capability::Vendor(_) => Self::ID_VENDOR,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Capability::PowerManagement => "power management",
            Capability::Msi { .. } => "MSI",
            Capability::Msix { .. } => "MSI-X",
            Capability::PciExpress => "PCI Express",
            Capability::Vendor(_) => "vendor-specific",
        }
    }

    /// Length of the structure in configuration space (before 4-byte alignment).
    fn len(&self) -> usize {
        match self {
            Capability::PowerManagement => PM_LEN,
            Capability::Msi {
                addr64,
                per_vector_mask,
                ..
            } => match (addr64, per_vector_mask) {
                (false, false) => 0x0a,
                (true, false) => 0x0e,
                (false, true) => 0x14,
                (true, true) => 0x18,
            },
            Capability::Msix { .. } => MSIX_LEN,
            Capability::PciExpress => PCIE_LEN,
            Capability::Vendor(payload) => 3 + payload.len(),
        }
    }
}

// Power management capability (PM 1.2, 3.2).
const PM_LEN: usize = 8;
const PM_PMC: usize = 2;
const PM_PMCSR: usize = 4;
/// PMC: version 3 (PM 1.2); no PME, no D1/D2, no aux current, no DSI.
const PM_PMC_VALUE: u16 = 0x0003;
/// PMCSR: PowerState (1:0) D0, No_Soft_Reset (bit 3).
const PM_PMCSR_VALUE: u16 = 0x0008;
const PM_STATE_MASK: u16 = 0x0003;
const PM_PME_STATUS: u16 = 1 << 15;

// MSI capability (PCI 3.0 6.8.1).
const MSI_CTRL: usize = 2;
const MSI_ADDR: usize = 4;
const MSI_CTRL_ENABLE: u16 = 1 << 0;
const MSI_CTRL_MME_SHIFT: u16 = 4;
const MSI_CTRL_64BIT: u16 = 1 << 7;
const MSI_CTRL_PVM: u16 = 1 << 8;

// MSI-X capability (PCI 3.0 6.8.2).
const MSIX_LEN: usize = 12;
const MSIX_CTRL: usize = 2;
const MSIX_TABLE: usize = 4;
const MSIX_PBA: usize = 8;
const MSIX_CTRL_ENABLE: u16 = 1 << 15;
const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_MAX_TABLE: u16 = 2048;

// PCI Express capability, version 2 (PCIe 4.0 7.5.3).
const PCIE_LEN: usize = 0x3c;
const PCIE_CAPS: usize = 0x02;
const PCIE_DEVCAP: usize = 0x04;
const PCIE_DEVCTL: usize = 0x08;
const PCIE_DEVSTA: usize = 0x0a;
const PCIE_LNKCAP: usize = 0x0c;
const PCIE_LNKCTL: usize = 0x10;
const PCIE_LNKSTA: usize = 0x12;
const PCIE_LNKCAP2: usize = 0x2c;
const PCIE_LNKCTL2: usize = 0x30;
/// Capability version 2, device/port type 0 (PCI Express Endpoint).
const PCIE_CAPS_VALUE: u16 = 0x0002;
/// Max payload 128 bytes (2:0 = 0), extended tag field (bit 5), L0s and L1 acceptable
/// latency "no limit" (8:6 and 11:9 = 7), role-based error reporting (bit 15).
const PCIE_DEVCAP_VALUE: u32 = (1 << 5) | (7 << 6) | (7 << 9) | (1 << 15);
/// Relaxed ordering (bit 4) and no snoop (bit 11) enabled, max read request 512 bytes
/// (14:12 = 2): the reset defaults of PCIe 4.0 7.5.3.4.
const PCIE_DEVCTL_VALUE: u16 = (1 << 4) | (1 << 11) | (2 << 12);
/// Error reporting enables (3:0), relaxed ordering (4), max payload size (7:5),
/// extended tag (8), no snoop (11), max read request size (14:12).
const PCIE_DEVCTL_WMASK: u16 = 0x79ff;
/// Correctable/non-fatal/fatal/unsupported-request detected (3:0) are RW1C.
const PCIE_DEVSTA_W1C: u16 = 0x000f;
/// 2.5 GT/s (3:0 = 1), x1 (9:4 = 1), no ASPM, ASPM optionality compliance (bit 22).
const PCIE_LNKCAP_VALUE: u32 = 1 | (1 << 4) | (1 << 22);
/// ASPM control (1:0), read completion boundary (3), common clock (6), extended synch (7).
const PCIE_LNKCTL_WMASK: u16 = 0x00cb;
/// Current speed 2.5 GT/s, negotiated width x1, slot clock configuration (bit 12).
const PCIE_LNKSTA_VALUE: u16 = 1 | (1 << 4) | (1 << 12);
/// Supported link speeds vector: 2.5 GT/s (bit 1).
const PCIE_LNKCAP2_VALUE: u32 = 1 << 1;
/// Target link speed 2.5 GT/s.
const PCIE_LNKCTL2_VALUE: u16 = 1;

/// Why a configuration space description is invalid.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A BAR index past 5, or a 64-bit BAR at index 5 (its upper half would not fit).
    #[error("BAR index {0} is out of range (0..=5; 0..=4 for a 64-bit BAR)")]
    BarIndex(u8),
    /// A BAR size that is not a power of two, or too small or too large for its kind.
    #[error("BAR {index}: invalid size {size:#x}: {why}")]
    BarSize {
        /// BAR index.
        index: u8,
        /// The size given.
        size: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Two BARs claim the same slot (including the upper half of a 64-bit BAR).
    #[error("BAR {0} overlaps a slot already in use")]
    BarOverlap(u8),
    /// An I/O BAR marked prefetchable.
    #[error("BAR {0}: an I/O BAR cannot be prefetchable")]
    PrefetchableIo(u8),
    /// An expansion ROM size that is not a power of two from 2 KiB to 2 GiB.
    #[error("invalid expansion ROM size {0:#x} (a power of two from 2 KiB to 2 GiB)")]
    RomSize(u64),
    /// An interrupt pin past 4 (INTD).
    #[error("invalid interrupt pin {0} (0 = none, 1..=4 = INTA..INTD)")]
    InterruptPin(u8),
    /// A capability with invalid parameters.
    #[error("invalid {cap} capability: {why}")]
    InvalidCapability {
        /// Which capability.
        cap: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A capability that may appear only once was added twice.
    #[error("the {0} capability was added twice")]
    DuplicateCapability(&'static str),
    /// The capabilities do not fit between 0x40 and 0x100.
    #[error("capabilities need {needed} bytes, only {available} fit in configuration space")]
    CapabilitiesTooLarge {
        /// Bytes the capability list needs.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The MSI-X table or PBA names a BAR that is absent, the upper half of a 64-bit
    /// BAR, or an I/O BAR.
    #[error("MSI-X {what} is in BAR {bar}, which is not a memory BAR of this function")]
    MsixBar {
        /// "table" or "PBA".
        what: &'static str,
        /// The BAR index given.
        bar: u8,
    },
    /// The MSI-X table or PBA is misaligned, does not fit its BAR, or the two overlap.
    #[error("MSI-X {what} at BAR {bar} offset {offset:#x} ({size:#x} bytes): {why}")]
    MsixRange {
        /// "table" or "PBA".
        what: &'static str,
        /// The BAR index.
        bar: u8,
        /// Offset in the BAR.
        offset: u32,
        /// Size of the structure.
        size: u64,
        /// What is wrong.
        why: &'static str,
    },
}

/// What a configuration write changed, so the device can react. Flags are set only
/// when the register's value actually changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigWrite {
    /// The Command register changed (decoding, bus master, INTx disable...).
    pub command: bool,
    /// Bit `i` is set when BAR `i` changed (for a 64-bit BAR, the bit of its lower
    /// index, whichever half was written).
    pub bars: u8,
    /// The expansion ROM BAR changed (address or enable).
    pub rom: bool,
    /// The MSI capability changed (enable, message address/data, enabled vectors, masks).
    pub msi: bool,
    /// The MSI-X Message Control register changed (enable or function mask).
    pub msix: bool,
    /// The PM Control/Status register changed (power state, PME status).
    pub pm: bool,
    /// The PCI Express Device Control/Status or Link Control register changed.
    pub pcie: bool,
}

impl ConfigWrite {
    /// Whether BAR `index` changed.
    pub fn bar(&self, index: u8) -> bool {
        index < 8 && self.bars & (1 << index) != 0
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == ConfigWrite::default()
    }
}

/// The MSI capability's programmed state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiState {
    /// MSI Enable.
    pub enabled: bool,
    /// Message address (upper half 0 without 64-bit addressing).
    pub address: u64,
    /// Message data.
    pub data: u16,
    /// Vectors software enabled (1 << Multiple Message Enable).
    pub vectors: u8,
    /// Vectors the function is capable of.
    pub capable: u8,
    /// Per-vector mask bits (0 without per-vector masking).
    pub mask: u32,
}

impl MsiState {
    /// Whether `vector` is masked (never, without per-vector masking).
    pub fn masked(&self, vector: u8) -> bool {
        vector < 32 && self.mask & (1 << vector) != 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MsiLayout {
    offset: usize,
    addr64: bool,
    per_vector_mask: bool,
}

impl MsiLayout {
    fn data(&self) -> usize {
        self.offset + if self.addr64 { 0x0c } else { 0x08 }
    }

    fn mask(&self) -> usize {
        self.data() + 4
    }

    fn len(&self) -> usize {
        match (self.addr64, self.per_vector_mask) {
            (false, false) => 0x0a,
            (true, false) => 0x0e,
            (false, true) => 0x14,
            (true, true) => 0x18,
        }
    }
}

/// Describes a function's configuration space; [`build`](ConfigSpaceBuilder::build)
/// checks the description and lays it out.
///
/// # Example
///
/// A function with a memory BAR, an MSI-X capability whose table lives in it, and the
/// BAR sizing probe every firmware and OS runs on it:
///
/// ```
/// use unidev_core::pci::{Bar, Capability, ConfigSpace};
///
/// let mut config = ConfigSpace::builder(0x1234, 0xabcd)
///     .class(0x05, 0x80, 0x00) // memory controller, other
///     .interrupt_pin(1)
///     .bar(0, Bar::mem64(0x4000).prefetchable())
///     .capability(Capability::Msix {
///         table_size: 4,
///         table_bar: 0,
///         table_offset: 0,
///         pba_bar: 0,
///         pba_offset: 0x1000,
///     })
///     .build()
///     .unwrap();
/// assert_eq!(config.size(), 256);
/// assert_eq!((config.vendor_id(), config.device_id()), (0x1234, 0xabcd));
///
/// // Write all-ones to the BAR, read back the size mask (PCI 3.0 6.2.5.1).
/// let changed = config.write(0x10, &[0xff; 4]);
/// assert!(changed.bar(0));
/// let mut low = [0; 4];
/// config.read(0x10, &mut low);
/// assert_eq!(u32::from_le_bytes(low) & !0xf, !(0x4000 - 1));
/// assert!(config.find_capability(Capability::ID_MSIX).is_some());
/// ```
#[derive(Clone, Debug)]
pub struct ConfigSpaceBuilder {
    vendor: u16,
    device: u16,
    class: (u8, u8, u8),
    revision: u8,
    subsystem: (u16, u16),
    interrupt_pin: u8,
    bars: Vec<(u8, Bar)>,
    rom: u64,
    caps: Vec<Capability>,
    extended: bool,
}

impl ConfigSpaceBuilder {
    /// Class code: base class, sub-class, programming interface.
    pub fn class(mut self, base: u8, sub: u8, prog_if: u8) -> Self {
        self.class = (base, sub, prog_if);
        self
    }

    /// Revision id.
    pub fn revision(mut self, revision: u8) -> Self {
        self.revision = revision;
        self
    }

    /// Subsystem vendor id and subsystem id.
    pub fn subsystem(mut self, vendor: u16, id: u16) -> Self {
        self.subsystem = (vendor, id);
        self
    }

    /// Interrupt pin: 0 = none, 1..=4 = INTA..INTD.
    pub fn interrupt_pin(mut self, pin: u8) -> Self {
        self.interrupt_pin = pin;
        self
    }

    /// Declare BAR `index` (a 64-bit BAR also takes `index + 1`).
    pub fn bar(mut self, index: u8, bar: Bar) -> Self {
        self.bars.push((index, bar));
        self
    }

    /// An expansion ROM of `size` bytes (a power of two, at least 2 KiB); 0 means none.
    pub fn rom(mut self, size: u64) -> Self {
        self.rom = size;
        self
    }

    /// Append a capability to the list.
    pub fn capability(mut self, cap: Capability) -> Self {
        self.caps.push(cap);
        self
    }

    /// A 4096-byte PCI Express configuration space instead of 256 bytes.
    pub fn extended(mut self, extended: bool) -> Self {
        self.extended = extended;
        self
    }

    fn check_bars(&self) -> Result<[Option<Bar>; NUM_BARS], ConfigError> {
        let mut slots: [Option<Bar>; NUM_BARS] = [None; NUM_BARS];
        let mut used = [false; NUM_BARS];
        for &(index, bar) in &self.bars {
            let i = usize::from(index);
            let last = if bar.kind == BarKind::Mem64 { i + 1 } else { i };
            if last >= NUM_BARS {
                return Err(ConfigError::BarIndex(index));
            }
            let size_err = |why| ConfigError::BarSize {
                index,
                size: bar.size,
                why,
            };
            if !bar.size.is_power_of_two() {
                return Err(size_err("not a power of two"));
            }
            match bar.kind {
                BarKind::Io => {
                    if bar.prefetchable {
                        return Err(ConfigError::PrefetchableIo(index));
                    }
                    if bar.size < MIN_IO_BAR {
                        return Err(size_err("an I/O BAR is at least 4 bytes"));
                    }
                    if bar.size > MAX_IO_BAR {
                        return Err(size_err("an I/O BAR is at most 256 bytes"));
                    }
                }
                BarKind::Mem32 | BarKind::Mem64 => {
                    if bar.size < MIN_MEM_BAR {
                        return Err(size_err("a memory BAR is at least 16 bytes"));
                    }
                    if bar.kind == BarKind::Mem32 && bar.size > 1 << 31 {
                        return Err(size_err("a 32-bit memory BAR is at most 2 GiB"));
                    }
                    if bar.size > 1 << 63 {
                        return Err(size_err("a 64-bit memory BAR is at most 2^63 bytes"));
                    }
                }
            }
            if used[i..=last].iter().any(|&u| u) {
                return Err(ConfigError::BarOverlap(index));
            }
            used[i..=last].iter_mut().for_each(|u| *u = true);
            slots[i] = Some(bar);
        }
        Ok(slots)
    }

    fn check_capabilities(&self, bars: &[Option<Bar>; NUM_BARS]) -> Result<(), ConfigError> {
        let mut seen: Vec<u8> = Vec::new();
        let mut needed = 0usize;
        for cap in &self.caps {
            let invalid = |why| ConfigError::InvalidCapability {
                cap: cap.name(),
                why,
            };
            if cap.id() != Capability::ID_VENDOR {
                if seen.contains(&cap.id()) {
                    return Err(ConfigError::DuplicateCapability(cap.name()));
                }
                seen.push(cap.id());
            }
            match cap {
                Capability::Msi { vectors, .. } => {
                    if !(1..=32).contains(vectors) || !vectors.is_power_of_two() {
                        return Err(invalid("vectors must be a power of two from 1 to 32"));
                    }
                }
                Capability::Msix {
                    table_size,
                    table_bar,
                    table_offset,
                    pba_bar,
                    pba_offset,
                } => {
                    if !(1..=MSIX_MAX_TABLE).contains(table_size) {
                        return Err(invalid("table size must be from 1 to 2048"));
                    }
                    let table_len = u64::from(*table_size) * 16;
                    let pba_len = u64::from(table_size.div_ceil(64)) * 8;
                    let table =
                        check_msix_range("table", bars, *table_bar, *table_offset, table_len)?;
                    let pba = check_msix_range("PBA", bars, *pba_bar, *pba_offset, pba_len)?;
                    if table_bar == pba_bar && table.0 < pba.1 && pba.0 < table.1 {
                        return Err(ConfigError::MsixRange {
                            what: "PBA",
                            bar: *pba_bar,
                            offset: *pba_offset,
                            size: pba_len,
                            why: "overlaps the MSI-X table",
                        });
                    }
                }
                Capability::Vendor(payload) => {
                    if 3 + payload.len() > usize::from(u8::MAX) {
                        return Err(invalid("the payload is longer than 252 bytes"));
                    }
                }
                Capability::PowerManagement | Capability::PciExpress => {}
            }
            needed += cap.len().next_multiple_of(4);
        }
        let available = CAP_END - CAP_START;
        if needed > available {
            return Err(ConfigError::CapabilitiesTooLarge { needed, available });
        }
        Ok(())
    }

    /// Check the description and lay out the configuration space.
    pub fn build(self) -> Result<ConfigSpace, ConfigError> {
        if self.interrupt_pin > 4 {
            return Err(ConfigError::InterruptPin(self.interrupt_pin));
        }
        let bars = self.check_bars()?;
        if self.rom != 0
            && (!self.rom.is_power_of_two() || self.rom < MIN_ROM || self.rom > MAX_ROM)
        {
            return Err(ConfigError::RomSize(self.rom));
        }
        self.check_capabilities(&bars)?;

        let size = if self.extended {
            EXTENDED_CONFIG_SPACE_SIZE
        } else {
            CONFIG_SPACE_SIZE
        } as usize;
        let mut r = Regs::new(size);

        // Identity: read-only.
        r.set16(VENDOR_ID, self.vendor, 0, 0);
        r.set16(DEVICE_ID, self.device, 0, 0);
        r.set8(REVISION, self.revision, 0, 0);
        r.set8(PROG_IF, self.class.2, 0, 0);
        r.set8(SUBCLASS, self.class.1, 0, 0);
        r.set8(CLASS, self.class.0, 0, 0);
        r.set16(SUBSYSTEM_VENDOR_ID, self.subsystem.0, 0, 0);
        r.set16(SUBSYSTEM_ID, self.subsystem.1, 0, 0);

        // Command: decoding enables only for the spaces the function has.
        let has_io = bars.iter().flatten().any(|b| b.is_io());
        let has_mem = bars.iter().flatten().any(|b| !b.is_io()) || self.rom != 0;
        let mut cmd_wmask =
            COMMAND_BUS_MASTER | COMMAND_PARITY | COMMAND_SERR | COMMAND_INTX_DISABLE;
        if has_io {
            cmd_wmask |= COMMAND_IO;
        }
        if has_mem {
            cmd_wmask |= COMMAND_MEMORY;
        }
        r.set16(COMMAND, 0, cmd_wmask, 0);
        let status = if self.caps.is_empty() {
            0
        } else {
            STATUS_CAP_LIST
        };
        r.set16(STATUS, status, 0, STATUS_ERRORS_RW1C);

        r.set8(CACHE_LINE_SIZE, 0, 0xff, 0);
        // PCIe functions hardwire the latency timer to 0 (PCIe 4.0 7.5.1.1.6).
        let pcie = self.caps.contains(&Capability::PciExpress);
        r.set8(LATENCY_TIMER, 0, if pcie { 0 } else { 0xff }, 0);

        // BARs: address bits per size are writable, the flag bits are not.
        for (i, bar) in bars.iter().enumerate() {
            let Some(bar) = bar else { continue };
            let off = BAR0 + 4 * i;
            let mask = bar.address_mask();
            r.set32(off, bar.flags(), mask as u32, 0);
            if bar.kind == BarKind::Mem64 {
                r.set32(off + 4, 0, (mask >> 32) as u32, 0);
            }
        }
        if self.rom != 0 {
            let mask = (!(self.rom - 1) as u32) & 0xffff_f800;
            r.set32(ROM_BAR, 0, mask | 1, 0);
        }

        r.set8(INTERRUPT_LINE, 0, 0xff, 0);
        r.set8(INTERRUPT_PIN, self.interrupt_pin, 0, 0);

        // Capability list.
        let mut layout = CapLayout::default();
        let mut offset = CAP_START;
        let count = self.caps.len();
        if count > 0 {
            r.set8(CAP_PTR, CAP_START as u8, 0, 0);
        }
        for (n, cap) in self.caps.iter().enumerate() {
            let len = cap.len().next_multiple_of(4);
            let next = if n + 1 == count { 0 } else { offset + len };
            // Checked above: every capability ends at or before 0x100.
            r.set8(offset, cap.id(), 0, 0);
            r.set8(offset + 1, next as u8, 0, 0);
            emit_capability(&mut r, offset, cap, &mut layout);
            offset += len;
        }

        let initial = r.data.clone();
        Ok(ConfigSpace {
            data: r.data,
            wmask: r.wmask,
            w1c: r.w1c,
            initial,
            bars,
            rom_size: self.rom,
            caps: layout,
        })
    }
}

/// Check that an MSI-X structure lies inside a memory BAR; returns its byte range.
fn check_msix_range(
    what: &'static str,
    bars: &[Option<Bar>; NUM_BARS],
    bar: u8,
    offset: u32,
    len: u64,
) -> Result<(u64, u64), ConfigError> {
    let b = match bars.get(usize::from(bar)).copied().flatten() {
        Some(b) if !b.is_io() => b,
        _ => return Err(ConfigError::MsixBar { what, bar }),
    };
    let err = |why| ConfigError::MsixRange {
        what,
        bar,
        offset,
        size: len,
        why,
    };
    if offset % 8 != 0 {
        return Err(err("the offset is not 8-byte aligned"));
    }
    let start = u64::from(offset);
    let end = start + len;
    if end > b.size {
        return Err(err("it runs past the end of the BAR"));
    }
    Ok((start, end))
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CapLayout {
    pm: Option<usize>,
    msi: Option<MsiLayout>,
    msix: Option<usize>,
    pcie: Option<usize>,
}

fn emit_capability(r: &mut Regs, off: usize, cap: &Capability, layout: &mut CapLayout) {
    match cap {
        Capability::PowerManagement => {
            r.set16(off + PM_PMC, PM_PMC_VALUE, 0, 0);
            r.set16(off + PM_PMCSR, PM_PMCSR_VALUE, PM_STATE_MASK, PM_PME_STATUS);
            layout.pm = Some(off);
        }
        Capability::Msi {
            vectors,
            addr64,
            per_vector_mask,
        } => {
            let mmc = vectors.trailing_zeros() as u16;
            let mut ctrl = mmc << 1;
            if *addr64 {
                ctrl |= MSI_CTRL_64BIT;
            }
            if *per_vector_mask {
                ctrl |= MSI_CTRL_PVM;
            }
            r.set16(
                off + MSI_CTRL,
                ctrl,
                MSI_CTRL_ENABLE | (0x7 << MSI_CTRL_MME_SHIFT),
                0,
            );
            r.set32(off + MSI_ADDR, 0, 0xffff_fffc, 0);
            let l = MsiLayout {
                offset: off,
                addr64: *addr64,
                per_vector_mask: *per_vector_mask,
            };
            if *addr64 {
                r.set32(off + MSI_ADDR + 4, 0, 0xffff_ffff, 0);
            }
            r.set16(l.data(), 0, 0xffff, 0);
            if *per_vector_mask {
                let mask = if *vectors >= 32 {
                    u32::MAX
                } else {
                    (1u32 << vectors) - 1
                };
                r.set32(l.mask(), 0, mask, 0);
            }
            layout.msi = Some(l);
        }
        Capability::Msix {
            table_size,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
        } => {
            r.set16(
                off + MSIX_CTRL,
                table_size - 1,
                MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK,
                0,
            );
            r.set32(off + MSIX_TABLE, table_offset | u32::from(*table_bar), 0, 0);
            r.set32(off + MSIX_PBA, pba_offset | u32::from(*pba_bar), 0, 0);
            layout.msix = Some(off);
        }
        Capability::PciExpress => {
            r.set16(off + PCIE_CAPS, PCIE_CAPS_VALUE, 0, 0);
            r.set32(off + PCIE_DEVCAP, PCIE_DEVCAP_VALUE, 0, 0);
            r.set16(off + PCIE_DEVCTL, PCIE_DEVCTL_VALUE, PCIE_DEVCTL_WMASK, 0);
            r.set16(off + PCIE_DEVSTA, 0, 0, PCIE_DEVSTA_W1C);
            r.set32(off + PCIE_LNKCAP, PCIE_LNKCAP_VALUE, 0, 0);
            r.set16(off + PCIE_LNKCTL, 0, PCIE_LNKCTL_WMASK, 0);
            r.set16(off + PCIE_LNKSTA, PCIE_LNKSTA_VALUE, 0, 0);
            r.set32(off + PCIE_LNKCAP2, PCIE_LNKCAP2_VALUE, 0, 0);
            r.set16(off + PCIE_LNKCTL2, PCIE_LNKCTL2_VALUE, 0, 0);
            layout.pcie = Some(off);
        }
        Capability::Vendor(payload) => {
            r.set8(off + 2, (3 + payload.len()) as u8, 0, 0);
            for (i, b) in payload.iter().enumerate() {
                r.set8(off + 3 + i, *b, 0, 0);
            }
        }
    }
}

/// Value, writable bits and write-one-to-clear bits of every byte, while building.
struct Regs {
    data: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
}

impl Regs {
    fn new(size: usize) -> Self {
        Regs {
            data: vec![0; size],
            wmask: vec![0; size],
            w1c: vec![0; size],
        }
    }

    fn set_bytes(&mut self, off: usize, value: &[u8], wmask: &[u8], w1c: &[u8]) {
        let bytes = value.iter().zip(wmask).zip(w1c);
        for (i, ((&v, &w), &c)) in bytes.enumerate() {
            if let (Some(d), Some(dw), Some(dc)) = (
                self.data.get_mut(off + i),
                self.wmask.get_mut(off + i),
                self.w1c.get_mut(off + i),
            ) {
                *d = v;
                *dw = w;
                *dc = c;
            }
        }
    }

    fn set8(&mut self, off: usize, value: u8, wmask: u8, w1c: u8) {
        self.set_bytes(off, &[value], &[wmask], &[w1c]);
    }

    fn set16(&mut self, off: usize, value: u16, wmask: u16, w1c: u16) {
        self.set_bytes(
            off,
            &value.to_le_bytes(),
            &wmask.to_le_bytes(),
            &w1c.to_le_bytes(),
        );
    }

    fn set32(&mut self, off: usize, value: u32, wmask: u32, w1c: u32) {
        self.set_bytes(
            off,
            &value.to_le_bytes(),
            &wmask.to_le_bytes(),
            &w1c.to_le_bytes(),
        );
    }
}

/// A type-0 configuration space: the registers' current values and their semantics.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    data: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    initial: Vec<u8>,
    bars: [Option<Bar>; NUM_BARS],
    rom_size: u64,
    caps: CapLayout,
}

impl ConfigSpace {
    /// Start describing a function with this vendor and device id.
    pub fn builder(vendor: u16, device: u16) -> ConfigSpaceBuilder {
        ConfigSpaceBuilder {
            vendor,
            device,
            class: (0xff, 0, 0),
            revision: 0,
            subsystem: (0, 0),
            interrupt_pin: 0,
            bars: Vec::new(),
            rom: 0,
            caps: Vec::new(),
            extended: false,
        }
    }

    /// Size in bytes: 256, or 4096 for an extended space.
    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// The byte index of `offset + i`, if it lies inside the space.
    fn index(&self, offset: u64, i: usize) -> Option<usize> {
        let o = usize::try_from(offset.checked_add(i as u64)?).ok()?;
        (o < self.data.len()).then_some(o)
    }

    /// Read `data.len()` bytes at `offset`, any alignment. Bytes outside the space read
    /// as `0xff`.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.index(offset, i).map_or(0xff, |o| self.data[o]);
        }
    }

    /// Write `data` at `offset`, any alignment, with each register's semantics:
    /// read-only bits keep their value, write-one-to-clear bits clear where a one is
    /// written. Bytes outside the space are ignored. Returns what changed.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> ConfigWrite {
        let mut changes = ConfigWrite::default();
        let Some(start) = self.index(offset, 0) else {
            return changes;
        };
        let end = start.saturating_add(data.len()).min(self.data.len());
        let old: Vec<u8> = self.data[start..end].to_vec();
        for (o, &v) in (start..end).zip(data) {
            let w = self.wmask[o];
            let mut b = (self.data[o] & !w) | (v & w);
            b &= !(v & self.w1c[o]);
            self.data[o] = b;
        }
        self.fix_up(start, end, &old);
        for (o, &before) in (start..end).zip(&old) {
            if self.data[o] != before {
                self.classify(o, &mut changes);
            }
        }
        changes
    }

    /// Register-specific rules after the generic masked write of `start..end`.
    fn fix_up(&mut self, start: usize, end: usize, old: &[u8]) {
        let in_range = |o: usize| (start..end).contains(&o);
        // MSI: Multiple Message Enable never exceeds Multiple Message Capable.
        if let Some(msi) = self.caps.msi {
            let o = msi.offset + MSI_CTRL;
            if in_range(o) {
                let ctrl = self.data[o];
                let mmc = (ctrl >> 1) & 0x7;
                let mme = (ctrl >> 4) & 0x7;
                if mme > mmc {
                    self.data[o] = (ctrl & !0x70) | (mmc << 4);
                }
            }
        }
        // PM: a write of an unsupported power state (D1, D2) is discarded (PM 1.2 3.2.4).
        if let Some(pm) = self.caps.pm {
            let o = pm + PM_PMCSR;
            if in_range(o) {
                let state = self.data[o] & 0x3;
                if state == 1 || state == 2 {
                    let before = old[o - start] & 0x3;
                    self.data[o] = (self.data[o] & !0x3) | before;
                }
            }
        }
    }

    /// Record which register byte `o` belongs to.
    fn classify(&self, o: usize, c: &mut ConfigWrite) {
        match o {
            0x04..=0x05 => c.command = true,
            0x10..=0x27 => {
                let mut i = (o - BAR0) / 4;
                if i > 0 && matches!(self.bars[i - 1], Some(b) if b.kind == BarKind::Mem64) {
                    i -= 1;
                }
                c.bars |= 1 << i;
            }
            0x30..=0x33 => c.rom = true,
            _ => {}
        }
        if let Some(msi) = self.caps.msi {
            if (msi.offset..msi.offset + msi.len()).contains(&o) {
                c.msi = true;
            }
        }
        if let Some(off) = self.caps.msix {
            if (off + MSIX_CTRL..off + MSIX_CTRL + 2).contains(&o) {
                c.msix = true;
            }
        }
        if let Some(off) = self.caps.pm {
            if (off + PM_PMCSR..off + PM_PMCSR + 2).contains(&o) {
                c.pm = true;
            }
        }
        if let Some(off) = self.caps.pcie {
            if (off + PCIE_DEVCTL..off + PCIE_DEVSTA + 2).contains(&o)
                || (off + PCIE_LNKCTL..off + PCIE_LNKCTL + 2).contains(&o)
            {
                c.pcie = true;
            }
        }
    }

    /// Back to the state [`ConfigSpaceBuilder::build`] produced (power-on values).
    pub fn reset(&mut self) {
        self.data.copy_from_slice(&self.initial);
    }

    /// Read a little-endian 16-bit value at `offset` (bytes outside read as `0xff`).
    pub fn read_u16(&self, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Read a little-endian 32-bit value at `offset` (bytes outside read as `0xff`).
    pub fn read_u32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn reg16(&self, o: usize) -> u16 {
        self.read_u16(o as u64)
    }

    fn reg32(&self, o: usize) -> u32 {
        self.read_u32(o as u64)
    }

    /// Vendor id.
    pub fn vendor_id(&self) -> u16 {
        self.reg16(VENDOR_ID)
    }

    /// Device id.
    pub fn device_id(&self) -> u16 {
        self.reg16(DEVICE_ID)
    }

    /// The Command register.
    pub fn command(&self) -> u16 {
        self.reg16(COMMAND)
    }

    /// The Status register.
    pub fn status(&self) -> u16 {
        self.reg16(STATUS)
    }

    /// I/O space decoding is enabled.
    pub fn io_enabled(&self) -> bool {
        self.command() & COMMAND_IO != 0
    }

    /// Memory space decoding is enabled.
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// The function may master the bus (DMA, MSI writes).
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Software disabled INTx assertion (Command bit 10).
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTX_DISABLE != 0
    }

    /// Device side: report whether the function's INTx is pending (Status bit 3). The
    /// bit reflects the device's interrupt state even while INTx is disabled.
    pub fn set_intx_status(&mut self, pending: bool) {
        if let Some(b) = self.data.get_mut(STATUS) {
            if pending {
                *b |= STATUS_INTX as u8;
            } else {
                *b &= !(STATUS_INTX as u8);
            }
        }
    }

    /// The BAR declared at `index` (None for an absent slot and for the upper half of a
    /// 64-bit BAR).
    pub fn bar(&self, index: u8) -> Option<Bar> {
        self.bars.get(usize::from(index)).copied().flatten()
    }

    /// The address software programmed into BAR `index` (both halves of a 64-bit BAR).
    pub fn bar_address(&self, index: u8) -> Option<u64> {
        let bar = self.bar(index)?;
        let off = BAR0 + 4 * usize::from(index);
        let lo = u64::from(self.reg32(off));
        Some(match bar.kind {
            BarKind::Io => lo & !0x3,
            BarKind::Mem32 => lo & !0xf,
            BarKind::Mem64 => (u64::from(self.reg32(off + 4)) << 32) | (lo & !0xf),
        })
    }

    /// Size of the expansion ROM (0 without one).
    pub fn rom_size(&self) -> u64 {
        self.rom_size
    }

    /// The address programmed into the expansion ROM BAR, if the function has a ROM.
    pub fn rom_address(&self) -> Option<u64> {
        (self.rom_size != 0).then(|| u64::from(self.reg32(ROM_BAR) & 0xffff_f800))
    }

    /// The expansion ROM's address decoding is enabled (ROM BAR bit 0 and Memory Space).
    pub fn rom_enabled(&self) -> bool {
        self.rom_size != 0 && self.reg32(ROM_BAR) & 1 != 0 && self.memory_enabled()
    }

    /// Offset of the first capability with id `id`, walking the list as software does.
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        if self.status() & STATUS_CAP_LIST == 0 {
            return None;
        }
        let mut ptr = usize::from(*self.data.get(CAP_PTR)? & 0xfc);
        // A list can hold at most 48 capabilities; the bound also stops any cycle.
        for _ in 0..48 {
            if ptr < CAP_START {
                return None;
            }
            if *self.data.get(ptr)? == id {
                return u16::try_from(ptr).ok();
            }
            ptr = usize::from(*self.data.get(ptr + 1)? & 0xfc);
        }
        None
    }

    /// MSI-X Message Control as (enabled, function masked), if the function has MSI-X.
    pub fn msix_control(&self) -> Option<(bool, bool)> {
        let ctrl = self.reg16(self.caps.msix? + MSIX_CTRL);
        Some((
            ctrl & MSIX_CTRL_ENABLE != 0,
            ctrl & MSIX_CTRL_FUNCTION_MASK != 0,
        ))
    }

    /// The MSI capability's programmed state, if the function has MSI.
    pub fn msi_state(&self) -> Option<MsiState> {
        let l = self.caps.msi?;
        let ctrl = self.reg16(l.offset + MSI_CTRL);
        let lo = u64::from(self.reg32(l.offset + MSI_ADDR));
        let hi = if l.addr64 {
            u64::from(self.reg32(l.offset + MSI_ADDR + 4))
        } else {
            0
        };
        Some(MsiState {
            enabled: ctrl & MSI_CTRL_ENABLE != 0,
            address: (hi << 32) | lo,
            data: self.reg16(l.data()),
            vectors: 1 << ((ctrl >> MSI_CTRL_MME_SHIFT) & 0x7),
            capable: 1 << ((ctrl >> 1) & 0x7),
            mask: if l.per_vector_mask {
                self.reg32(l.mask())
            } else {
                0
            },
        })
    }

    /// Device side: set the MSI pending bits (only with per-vector masking).
    pub fn set_msi_pending(&mut self, pending: u32) {
        if let Some(l) = self.caps.msi.filter(|l| l.per_vector_mask) {
            let o = l.mask() + 4;
            if let Some(dst) = self.data.get_mut(o..o + 4) {
                dst.copy_from_slice(&pending.to_le_bytes());
            }
        }
    }

    /// Current power state: 0 = D0 ... 3 = D3hot (always D0 without the PM capability).
    pub fn pm_state(&self) -> u8 {
        match self.caps.pm {
            Some(off) => (self.reg16(off + PM_PMCSR) & PM_STATE_MASK) as u8,
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd32(c: &ConfigSpace, off: u64) -> u32 {
        c.read_u32(off)
    }

    fn wr32(c: &mut ConfigSpace, off: u64, v: u32) -> ConfigWrite {
        c.write(off, &v.to_le_bytes())
    }

    fn wr16(c: &mut ConfigSpace, off: u64, v: u16) -> ConfigWrite {
        c.write(off, &v.to_le_bytes())
    }

    fn full() -> ConfigSpace {
        ConfigSpace::builder(0x1af4, 0x1041)
            .class(0x01, 0x80, 0x00)
            .revision(1)
            .subsystem(0x1af4, 0x1100)
            .interrupt_pin(1)
            .bar(0, Bar::mem32(0x1000))
            .bar(1, Bar::io(0x20))
            .bar(2, Bar::mem64(0x4000).prefetchable())
            .bar(4, Bar::mem64(1 << 33))
            .rom(0x10000)
            .capability(Capability::PowerManagement)
            .capability(Capability::Msi {
                vectors: 4,
                addr64: true,
                per_vector_mask: true,
            })
            .capability(Capability::Msix {
                table_size: 70,
                table_bar: 2,
                table_offset: 0,
                pba_bar: 2,
                pba_offset: 0x2000,
            })
            .capability(Capability::PciExpress)
            .capability(Capability::Vendor(vec![0xaa, 0xbb, 0xcc]))
            .build()
            .unwrap()
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = full();
        let before: Vec<u32> = [0x00, 0x08, 0x0c, 0x2c, 0x34, 0x3c]
            .iter()
            .map(|&o| rd32(&c, o))
            .collect();
        assert_eq!(rd32(&c, 0), 0x1041_1af4);
        assert_eq!(rd32(&c, 0x08), 0x0180_0001);
        assert_eq!(rd32(&c, 0x2c), 0x1100_1af4);
        assert_eq!(c.read_u16(0x3c) >> 8, 1, "interrupt pin");
        for off in [0x00u64, 0x08, 0x2c, 0x34] {
            assert!(wr32(&mut c, off, 0xffff_ffff).is_empty());
        }
        // Header type and BIST (0x0e, 0x0f) are read-only; cache line and latency are
        // writable, except latency for a PCIe function.
        wr32(&mut c, 0x0c, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x0c), 0x0000_00ff);
        // Interrupt line is RW, pin and min_gnt/max_lat are not.
        wr32(&mut c, 0x3c, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x3c), 0x0000_01ff);
        assert_eq!(c.vendor_id(), 0x1af4);
        assert_eq!(c.device_id(), 0x1041);
        c.reset();
        let after: Vec<u32> = [0x00, 0x08, 0x0c, 0x2c, 0x34, 0x3c]
            .iter()
            .map(|&o| rd32(&c, o))
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn latency_timer_is_writable_without_pcie() {
        let mut c = ConfigSpace::builder(1, 2).build().unwrap();
        c.write(0x0d, &[0x40]);
        assert_eq!(c.read_u16(0x0c), 0x4000);
        assert_eq!(c.status() & STATUS_CAP_LIST, 0);
        assert_eq!(c.find_capability(Capability::ID_PM), None);
    }

    #[test]
    fn command_has_only_the_writable_bits() {
        let mut c = full();
        let w = wr16(&mut c, 4, 0xffff);
        assert!(w.command);
        assert_eq!(c.command(), 0x0547);
        assert!(c.io_enabled() && c.memory_enabled() && c.bus_master() && c.intx_disabled());
        assert!(wr16(&mut c, 4, 0xffff).is_empty(), "no change, no flag");
        // A function with only memory BARs cannot enable I/O decoding, and vice versa.
        let mut m = ConfigSpace::builder(1, 2)
            .bar(0, Bar::mem32(16))
            .build()
            .unwrap();
        wr16(&mut m, 4, 0xffff);
        assert_eq!(m.command(), 0x0546);
        let mut i = ConfigSpace::builder(1, 2)
            .bar(0, Bar::io(4))
            .build()
            .unwrap();
        wr16(&mut i, 4, 0xffff);
        assert_eq!(i.command(), 0x0545);
    }

    #[test]
    fn status_error_bits_are_rw1c_and_intx_is_device_controlled() {
        let mut c = full();
        assert_eq!(c.status(), STATUS_CAP_LIST);
        // Software cannot set anything in Status.
        wr16(&mut c, 6, 0xffff);
        assert_eq!(c.status(), STATUS_CAP_LIST);
        // Pretend the device latched errors (test-only poke) and clear one of them.
        c.data[7] = 0xf9;
        wr16(&mut c, 6, 0x8000);
        assert_eq!(c.status(), 0x7900 | STATUS_CAP_LIST);
        wr16(&mut c, 6, 0x0100);
        assert_eq!(c.status(), 0x7800 | STATUS_CAP_LIST);
        c.set_intx_status(true);
        assert_eq!(c.status() & STATUS_INTX, STATUS_INTX);
        wr16(&mut c, 6, 0xffff);
        assert_eq!(
            c.status(),
            STATUS_INTX | STATUS_CAP_LIST,
            "INTx is read-only"
        );
        c.set_intx_status(false);
        assert_eq!(c.status(), STATUS_CAP_LIST);
    }

    #[test]
    fn bar_sizing_for_every_kind() {
        let mut c = full();
        // Flags before sizing.
        assert_eq!(rd32(&c, 0x10), 0x0);
        assert_eq!(rd32(&c, 0x14), 0x1);
        assert_eq!(rd32(&c, 0x18), 0xc);
        assert_eq!(rd32(&c, 0x20), 0x4);
        for i in 0..6 {
            wr32(&mut c, 0x10 + 4 * i, 0xffff_ffff);
        }
        assert_eq!(rd32(&c, 0x10), 0xffff_f000, "mem32 4 KiB");
        assert_eq!(rd32(&c, 0x14), 0xffff_ffe1, "io 32 bytes");
        assert_eq!(
            rd32(&c, 0x18),
            0xffff_c00c,
            "mem64 prefetchable 16 KiB, low"
        );
        assert_eq!(rd32(&c, 0x1c), 0xffff_ffff, "mem64 16 KiB, high");
        assert_eq!(
            rd32(&c, 0x20),
            0x0000_0004,
            "mem64 8 GiB, low: no address bits"
        );
        assert_eq!(rd32(&c, 0x24), 0xffff_fffe, "mem64 8 GiB, high");
        // Program addresses.
        let w = wr32(&mut c, 0x10, 0xfebf_1000);
        assert_eq!(w.bars, 0b1);
        wr32(&mut c, 0x14, 0xc040);
        let w = wr32(&mut c, 0x1c, 0x0000_0001);
        assert!(w.bar(2) && !w.bar(3), "upper half reports the lower index");
        wr32(&mut c, 0x18, 0x2000_0000);
        wr32(&mut c, 0x20, 0);
        wr32(&mut c, 0x24, 0x4);
        assert_eq!(c.bar_address(0), Some(0xfebf_1000));
        assert_eq!(c.bar_address(1), Some(0xc040));
        assert_eq!(c.bar_address(2), Some(0x1_2000_0000));
        assert_eq!(c.bar_address(3), None, "upper half is not a BAR of its own");
        assert_eq!(c.bar_address(4), Some(0x4_0000_0000));
        assert_eq!(c.bar(2), Some(Bar::mem64(0x4000).prefetchable()));
        assert_eq!(c.bar(3), None);
        assert_eq!(c.bar(9), None);
        // Low bits of an address written unaligned are dropped; flags stay.
        wr32(&mut c, 0x10, 0xfebf_1fff);
        assert_eq!(rd32(&c, 0x10), 0xfebf_1000);
    }

    #[test]
    fn unused_bars_read_zero_and_ignore_writes() {
        let mut c = ConfigSpace::builder(1, 2)
            .bar(1, Bar::mem32(0x100))
            .build()
            .unwrap();
        for i in [0u64, 2, 3, 4, 5] {
            assert!(wr32(&mut c, 0x10 + 4 * i, 0xffff_ffff).is_empty());
            assert_eq!(rd32(&c, 0x10 + 4 * i), 0);
        }
        assert_eq!(c.bar_address(0), None);
        // No ROM: the ROM BAR reads 0 and ignores writes.
        wr32(&mut c, 0x30, 0xffff_ffff);
        assert_eq!(rd32(&c, 0x30), 0);
        assert_eq!(c.rom_address(), None);
    }

    #[test]
    fn rom_bar_sizing_and_enable() {
        let mut c = full();
        let w = wr32(&mut c, 0x30, 0xffff_ffff);
        assert!(w.rom);
        assert_eq!(rd32(&c, 0x30), 0xffff_0001, "64 KiB ROM, enable bit set");
        wr32(&mut c, 0x30, 0xfeb0_0001);
        assert_eq!(c.rom_address(), Some(0xfeb0_0000));
        assert!(!c.rom_enabled(), "memory decoding still off");
        wr16(&mut c, 4, COMMAND_MEMORY);
        assert!(c.rom_enabled());
        assert_eq!(c.rom_size(), 0x10000);
    }

    #[test]
    fn capability_chain_walk() {
        let c = full();
        let mut ids = Vec::new();
        let mut ptr = c.read_u16(0x34) as u8;
        while ptr != 0 {
            assert_eq!(ptr % 4, 0, "aligned");
            assert!(ptr >= 0x40);
            let mut hdr = [0u8; 2];
            c.read(u64::from(ptr), &mut hdr);
            ids.push((ptr, hdr[0]));
            ptr = hdr[1];
        }
        assert_eq!(
            ids,
            vec![
                (0x40, 0x01),
                (0x48, 0x05),
                (0x60, 0x11),
                (0x6c, 0x10),
                (0xa8, 0x09)
            ]
        );
        assert_eq!(c.find_capability(Capability::ID_PM), Some(0x40));
        assert_eq!(c.find_capability(Capability::ID_MSIX), Some(0x60));
        assert_eq!(c.find_capability(Capability::ID_PCIE), Some(0x6c));
        assert_eq!(c.find_capability(0x0d), None);
        // Vendor capability: length byte covers the header, payload follows.
        let mut v = [0u8; 6];
        c.read(0xa8, &mut v);
        assert_eq!(v, [0x09, 0x00, 0x06, 0xaa, 0xbb, 0xcc]);
    }

    #[test]
    fn msix_control_bits_only() {
        let mut c = full();
        let off = u64::from(c.find_capability(Capability::ID_MSIX).unwrap());
        assert_eq!(c.read_u16(off + 2), 69, "table size - 1");
        assert_eq!(rd32(&c, off + 4), 2, "table at BAR 2 offset 0");
        assert_eq!(rd32(&c, off + 8), 0x2002, "PBA at BAR 2 offset 0x2000");
        assert_eq!(c.msix_control(), Some((false, false)));
        let w = wr16(&mut c, off + 2, 0xffff);
        assert!(w.msix && !w.msi);
        assert_eq!(c.read_u16(off + 2), 0xc000 | 69);
        assert_eq!(c.msix_control(), Some((true, true)));
        c.write(off + 3, &[0x80]);
        assert_eq!(c.msix_control(), Some((true, false)));
        // Table and PBA offsets are read-only.
        assert!(wr32(&mut c, off + 4, 0x1234_5678).is_empty());
        assert!(wr32(&mut c, off + 8, 0x1234_5678).is_empty());
        assert_eq!(rd32(&c, off + 4), 2);
    }

    #[test]
    fn msi_semantics() {
        let mut c = full();
        let off = u64::from(c.find_capability(Capability::ID_MSI).unwrap());
        // 64-bit, per-vector mask, 4 vectors capable (MMC = 2).
        assert_eq!(c.read_u16(off + 2), 0x0184);
        let w = wr16(&mut c, off + 2, 0xffff);
        assert!(w.msi);
        assert_eq!(
            c.read_u16(off + 2),
            0x01a5,
            "MME clamped to MMC, enable set"
        );
        wr32(&mut c, off + 4, 0xfee0_0003);
        wr32(&mut c, off + 8, 0x1);
        wr32(&mut c, off + 12, 0xffff_4041);
        wr32(&mut c, off + 16, 0xffff_ffff);
        let s = c.msi_state().unwrap();
        assert_eq!(
            s,
            MsiState {
                enabled: true,
                address: 0x1_fee0_0000,
                data: 0x4041,
                vectors: 4,
                capable: 4,
                mask: 0xf,
            }
        );
        assert!(s.masked(3) && !s.masked(4));
        // Pending bits are read-only to software but the device may set them.
        wr32(&mut c, off + 20, 0xffff_ffff);
        assert_eq!(rd32(&c, off + 20), 0);
        c.set_msi_pending(0x2);
        assert_eq!(rd32(&c, off + 20), 0x2);
        // MME = 1 (2 vectors) is within capability and kept.
        wr16(&mut c, off + 2, 0x0011);
        assert_eq!(c.msi_state().unwrap().vectors, 2);
        // A 32-bit MSI without masking: data right after the address.
        let mut m = ConfigSpace::builder(1, 2)
            .capability(Capability::Msi {
                vectors: 1,
                addr64: false,
                per_vector_mask: false,
            })
            .build()
            .unwrap();
        wr16(&mut m, 0x42, 0x0071);
        assert_eq!(m.read_u16(0x42), 0x0001, "MMC = 0: MME stays 0");
        wr32(&mut m, 0x44, 0xfee0_1000);
        wr32(&mut m, 0x48, 0xffff_0022);
        let s = m.msi_state().unwrap();
        assert_eq!((s.address, s.data, s.mask), (0xfee0_1000, 0x22, 0));
        assert_eq!(
            rd32(&m, 0x48),
            0x22,
            "upper 16 bits past the capability are RO"
        );
    }

    #[test]
    fn power_management() {
        let mut c = full();
        let off = u64::from(c.find_capability(Capability::ID_PM).unwrap());
        assert_eq!(c.read_u16(off + 2), 0x0003);
        assert_eq!(c.pm_state(), 0);
        let w = wr16(&mut c, off + 4, 0x0003);
        assert!(w.pm);
        assert_eq!(c.pm_state(), 3);
        assert_eq!(c.read_u16(off + 4), 0x000b, "No_Soft_Reset stays set");
        // D1 and D2 are unsupported: the write is discarded.
        assert!(wr16(&mut c, off + 4, 0x0001).is_empty());
        assert_eq!(c.pm_state(), 3);
        wr16(&mut c, off + 4, 0x0000);
        assert_eq!(c.pm_state(), 0);
        // PME status is RW1C; writing one to a clear bit changes nothing.
        c.data[(off + 5) as usize] |= 0x80;
        wr16(&mut c, off + 4, 0x8000);
        assert_eq!(c.read_u16(off + 4), 0x0008);
    }

    #[test]
    fn pcie_capability() {
        let mut c = full();
        let off = u64::from(c.find_capability(Capability::ID_PCIE).unwrap());
        assert_eq!(c.read_u16(off + 2), 0x0002, "v2 endpoint");
        assert_eq!(c.read_u16(off + 8), 0x2810);
        let w = wr16(&mut c, off + 8, 0xffff);
        assert!(w.pcie);
        assert_eq!(
            c.read_u16(off + 8),
            0x79ff,
            "no FLR, phantom or aux power bits"
        );
        c.data[(off + 10) as usize] = 0x0f;
        wr16(&mut c, off + 10, 0x0005);
        assert_eq!(c.read_u16(off + 10), 0x000a);
        wr16(&mut c, off + 0x10, 0xffff);
        assert_eq!(c.read_u16(off + 0x10), 0x00cb);
        assert_eq!(c.read_u16(off + 0x12), 0x1011, "2.5 GT/s x1");
        assert!(wr32(&mut c, off + 0x0c, 0).is_empty(), "link caps are RO");
        // Latency timer is hardwired for PCIe functions.
        c.write(0x0d, &[0x40]);
        assert_eq!(c.read_u16(0x0c) >> 8, 0);
    }

    #[test]
    fn bytewise_and_unaligned_access_equal_dword_access() {
        let mut a = full();
        let mut b = full();
        let values: Vec<(u64, u32)> = vec![
            (0x04, 0xffff_0547),
            (0x10, 0xffff_ffff),
            (0x18, 0x1234_5678),
            (0x1c, 0x9abc_def0),
            (0x30, 0xffff_ffff),
            (0x3c, 0x0000_000b),
            (0x44, 0x0071_0000),
            (0x4c, 0xfee0_0000),
            (0x60, 0xc000_0000),
        ];
        for &(off, v) in &values {
            wr32(&mut a, off, v);
            for (i, byte) in v.to_le_bytes().iter().enumerate() {
                b.write(off + i as u64, &[*byte]);
            }
        }
        let mut da = vec![0u8; 256];
        let mut db = vec![0u8; 256];
        a.read(0, &mut da);
        b.read(0, &mut db);
        assert_eq!(da, db);
        // Unaligned reads straddling registers match the dword view.
        for off in 0..253u64 {
            let mut x = [0u8; 3];
            a.read(off, &mut x);
            assert_eq!(&x[..], &da[off as usize..off as usize + 3]);
        }
        // An unaligned write across the BAR 0/BAR 1 boundary acts per byte.
        let mut c = full();
        c.write(0x12, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(rd32(&c, 0x10), 0xffff_0000);
        assert_eq!(rd32(&c, 0x14), 0x0000_ffe1);
    }

    #[test]
    fn out_of_range_accesses_never_panic() {
        let mut c = full();
        let mut buf = [0u8; 8];
        c.read(0xfc, &mut buf);
        assert_eq!(&buf[4..], &[0xff; 4]);
        c.read(u64::MAX, &mut buf);
        assert_eq!(buf, [0xff; 8]);
        assert!(c.write(u64::MAX - 2, &[1; 8]).is_empty());
        assert!(c.write(0x1000, &[1; 8]).is_empty());
        let big = vec![0xffu8; 10000];
        c.write(0, &big);
        let mut all = vec![0u8; 300];
        c.read(0, &mut all);
        assert_eq!(c.read_u16(0), 0x1af4);
        // Extended space: 4096 bytes, the extended capability header at 0x100 reads 0.
        let mut e = ConfigSpace::builder(1, 2)
            .capability(Capability::PciExpress)
            .extended(true)
            .build()
            .unwrap();
        assert_eq!(e.size(), 4096);
        assert_eq!(rd32(&e, 0x100), 0);
        wr32(&mut e, 0x100, 0xffff_ffff);
        assert_eq!(rd32(&e, 0x100), 0);
        assert_eq!(rd32(&e, 0xffc), 0);
        assert_eq!(e.read_u16(0xfff), 0xff00);
    }

    #[test]
    fn reset_restores_the_built_state() {
        let mut c = full();
        let mut before = vec![0u8; 256];
        c.read(0, &mut before);
        let big = vec![0xffu8; 256];
        c.write(0, &big);
        c.set_intx_status(true);
        let mut mid = vec![0u8; 256];
        c.read(0, &mut mid);
        assert_ne!(before, mid);
        c.reset();
        let mut after = vec![0u8; 256];
        c.read(0, &mut after);
        assert_eq!(before, after);
    }

    #[test]
    fn builder_rejects_invalid_descriptions() {
        let b = || ConfigSpace::builder(1, 2);
        assert_eq!(
            b().bar(6, Bar::mem32(16)).build().unwrap_err(),
            ConfigError::BarIndex(6)
        );
        assert_eq!(
            b().bar(5, Bar::mem64(16)).build().unwrap_err(),
            ConfigError::BarIndex(5)
        );
        assert!(matches!(
            b().bar(0, Bar::mem32(24)).build(),
            Err(ConfigError::BarSize { .. })
        ));
        assert!(matches!(
            b().bar(0, Bar::mem32(8)).build(),
            Err(ConfigError::BarSize { .. })
        ));
        assert!(matches!(
            b().bar(0, Bar::io(2)).build(),
            Err(ConfigError::BarSize { .. })
        ));
        assert!(matches!(
            b().bar(0, Bar::io(512)).build(),
            Err(ConfigError::BarSize { .. })
        ));
        assert!(matches!(
            b().bar(0, Bar::mem32(1 << 32)).build(),
            Err(ConfigError::BarSize { .. })
        ));
        assert!(matches!(
            b().bar(0, Bar::mem64(0)).build(),
            Err(ConfigError::BarSize { .. })
        ));
        assert_eq!(
            b().bar(0, Bar::io(4).prefetchable()).build().unwrap_err(),
            ConfigError::PrefetchableIo(0)
        );
        assert_eq!(
            b().bar(0, Bar::mem64(16))
                .bar(1, Bar::mem32(16))
                .build()
                .unwrap_err(),
            ConfigError::BarOverlap(1)
        );
        assert_eq!(
            b().bar(2, Bar::mem32(16))
                .bar(1, Bar::mem64(16))
                .build()
                .unwrap_err(),
            ConfigError::BarOverlap(1)
        );
        assert_eq!(
            b().rom(1024).build().unwrap_err(),
            ConfigError::RomSize(1024)
        );
        assert_eq!(
            b().interrupt_pin(5).build().unwrap_err(),
            ConfigError::InterruptPin(5)
        );
        let msi = |vectors| Capability::Msi {
            vectors,
            addr64: false,
            per_vector_mask: false,
        };
        for v in [0, 3, 64] {
            assert!(matches!(
                b().capability(msi(v)).build(),
                Err(ConfigError::InvalidCapability { .. })
            ));
        }
        assert_eq!(
            b().capability(msi(1))
                .capability(msi(2))
                .build()
                .unwrap_err(),
            ConfigError::DuplicateCapability("MSI")
        );
        let msix = |table_size, table_bar, table_offset, pba_bar, pba_offset| Capability::Msix {
            table_size,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
        };
        let with_bars = || {
            b().bar(0, Bar::mem32(0x1000))
                .bar(1, Bar::io(16))
                .bar(2, Bar::mem64(0x1000))
        };
        assert!(with_bars()
            .capability(msix(8, 0, 0, 0, 0x800))
            .build()
            .is_ok());
        for (cap, bar) in [
            (msix(8, 5, 0, 0, 0x800), 5), // absent
            (msix(8, 1, 0, 0, 0x800), 1), // I/O
            (msix(8, 3, 0, 0, 0x800), 3), // upper half
            (msix(8, 0, 0, 9, 0x800), 9), // out of range
        ] {
            assert!(
                matches!(with_bars().capability(cap).build(), Err(ConfigError::MsixBar { bar: got, .. }) if got == bar)
            );
        }
        for cap in [msix(0, 0, 0, 0, 0x800), msix(2049, 0, 0, 0, 0x800)] {
            assert!(matches!(
                with_bars().capability(cap).build(),
                Err(ConfigError::InvalidCapability { .. })
            ));
        }
        for cap in [
            msix(8, 0, 4, 0, 0x800),   // misaligned
            msix(257, 0, 0, 2, 0),     // table runs past the 4 KiB BAR
            msix(8, 0, 0, 0, 0x40),    // PBA overlaps the table
            msix(8, 0, 0, 0, 0xffc),   // misaligned PBA
            msix(64, 0, 0, 0, 0x1000), // PBA past the end
        ] {
            assert!(
                matches!(
                    with_bars().capability(cap.clone()).build(),
                    Err(ConfigError::MsixRange { .. })
                ),
                "{cap:?}"
            );
        }
        let fat = Capability::Vendor(vec![0; 252]);
        assert!(matches!(
            b().capability(fat).build(),
            Err(ConfigError::CapabilitiesTooLarge { .. })
        ));
        assert!(matches!(
            b().capability(Capability::Vendor(vec![0; 253])).build(),
            Err(ConfigError::InvalidCapability { .. })
        ));
        // Exactly filling the capability area is fine.
        assert!(b()
            .capability(Capability::Vendor(vec![0; 189]))
            .build()
            .is_ok());
        assert!(matches!(
            b().capability(Capability::Vendor(vec![0; 190])).build(),
            Err(ConfigError::CapabilitiesTooLarge { .. })
        ));
    }
}
