//! The configuration space at run time (PCI Local Bus Specification 3.0, chapter 6):
//! reads and writes of any length and alignment with each register's semantics — the
//! generic masked write with write-one-to-clear bits, the register-specific fix-ups, and
//! [`ConfigWrite`], what a write changed — plus the accessors a device uses to follow
//! what software programmed (Command bits, BAR and ROM addresses, the capability list,
//! the power state).

use super::capability::CapLayout;
use super::registers::*;
use super::{Bar, BarKind};

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

/// A type-0 configuration space: the registers' current values and their semantics.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    pub(super) data: Vec<u8>,
    pub(super) wmask: Vec<u8>,
    pub(super) w1c: Vec<u8>,
    pub(super) initial: Vec<u8>,
    pub(super) bars: [Option<Bar>; NUM_BARS],
    pub(super) rom_size: u64,
    pub(super) caps: CapLayout,
}

impl ConfigSpace {
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

    /// Back to the state [`ConfigSpaceBuilder::build`](super::ConfigSpaceBuilder::build)
    /// produced (power-on values).
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

    pub(super) fn reg16(&self, o: usize) -> u16 {
        self.read_u16(o as u64)
    }

    pub(super) fn reg32(&self, o: usize) -> u32 {
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

    /// Current power state: 0 = D0 ... 3 = D3hot (always D0 without the PM capability).
    pub fn pm_state(&self) -> u8 {
        match self.caps.pm {
            Some(off) => (self.reg16(off + PM_PMCSR) & PM_STATE_MASK) as u8,
            None => 0,
        }
    }
}
