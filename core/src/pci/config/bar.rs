//! Base address registers as a function declares them (PCI Local Bus Specification 3.0,
//! 6.2.5): the address space a BAR decodes, its size, and the read-only flag bits and
//! writable address bits that give the "write all-ones, read back the size" probe its
//! answer.

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
///
/// [`ConfigSpace::bar_address`]: super::ConfigSpace::bar_address
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
    ///
    /// [`ConfigSpaceBuilder::build`]: super::ConfigSpaceBuilder::build
    pub fn prefetchable(mut self) -> Self {
        self.prefetchable = true;
        self
    }

    /// Whether the BAR decodes I/O space.
    pub fn is_io(&self) -> bool {
        self.kind == BarKind::Io
    }

    /// The read-only low bits of the BAR register (space indicator, type, prefetchable).
    pub(super) fn flags(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x1,
            BarKind::Mem32 => u32::from(self.prefetchable) << 3,
            BarKind::Mem64 => 0x4 | (u32::from(self.prefetchable) << 3),
        }
    }

    /// The writable address bits of the whole (possibly 64-bit) register.
    pub(super) fn address_mask(&self) -> u64 {
        let size_mask = !(self.size.wrapping_sub(1));
        match self.kind {
            BarKind::Io => size_mask & 0xffff_fffc,
            BarKind::Mem32 => size_mask & 0xffff_fff0,
            BarKind::Mem64 => size_mask & !0xf,
        }
    }
}
