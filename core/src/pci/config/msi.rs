//! MSI and MSI-X capability state (PCI Local Bus Specification 3.0, 6.8.1 and 6.8.2) as
//! software programmed it: what a device reads to know whether, where and how to
//! signal. The MSI-X table and PBA themselves live in [`crate::pci::msix`].

use super::registers::*;
use super::ConfigSpace;

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

/// Where the MSI capability's registers are: their offsets depend on 64-bit addressing
/// and per-vector masking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MsiLayout {
    pub(super) offset: usize,
    pub(super) addr64: bool,
    pub(super) per_vector_mask: bool,
}

impl MsiLayout {
    pub(super) fn data(&self) -> usize {
        self.offset + if self.addr64 { 0x0c } else { 0x08 }
    }

    pub(super) fn mask(&self) -> usize {
        self.data() + 4
    }

    pub(super) fn len(&self) -> usize {
        match (self.addr64, self.per_vector_mask) {
            (false, false) => 0x0a,
            (true, false) => 0x0e,
            (false, true) => 0x14,
            (true, true) => 0x18,
        }
    }
}

impl ConfigSpace {
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
}
