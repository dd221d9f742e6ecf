//! Describing a function's configuration space and laying it out: [`ConfigSpaceBuilder`]
//! collects identity, BARs, expansion ROM and capabilities; `build` checks them against
//! PCI Local Bus Specification 3.0 (BAR sizes and slots, 6.2.5; the ROM BAR, 6.2.5.2;
//! the interrupt pin, 6.2.4; the capability list fitting 0x40..0x100, 6.7; MSI-X
//! structures inside memory BARs, 6.8.2) and produces the power-on register image of a
//! [`ConfigSpace`], with each register's writable and write-one-to-clear bits.

use thiserror::Error;

use super::capability::{emit_capability, CapLayout};
use super::registers::*;
use super::{Bar, BarKind, Capability, ConfigSpace};

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

/// Value, writable bits and write-one-to-clear bits of every byte, while building.
pub(super) struct Regs {
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

    pub(super) fn set8(&mut self, off: usize, value: u8, wmask: u8, w1c: u8) {
        self.set_bytes(off, &[value], &[wmask], &[w1c]);
    }

    pub(super) fn set16(&mut self, off: usize, value: u16, wmask: u16, w1c: u16) {
        self.set_bytes(
            off,
            &value.to_le_bytes(),
            &wmask.to_le_bytes(),
            &w1c.to_le_bytes(),
        );
    }

    pub(super) fn set32(&mut self, off: usize, value: u32, wmask: u32, w1c: u32) {
        self.set_bytes(
            off,
            &value.to_le_bytes(),
            &wmask.to_le_bytes(),
            &w1c.to_le_bytes(),
        );
    }
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
}
