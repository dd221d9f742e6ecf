//! The capabilities a function can place in its capability list (PCI Local Bus
//! Specification 3.0, 6.7) and how each is laid out in configuration space: PCI Power
//! Management 1.2 (3.2), MSI (PCI 3.0 6.8.1), the MSI-X capability structure (6.8.2),
//! a version-2 PCI Express capability for an endpoint (PCIe Base 4.0, 7.5.3), and
//! vendor-specific capabilities. Each register gets its power-on value, its writable
//! bits and its write-one-to-clear bits; [`CapLayout`] records where the capabilities
//! with run-time semantics landed.

use super::builder::Regs;
use super::msi::MsiLayout;
use super::registers::*;

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
    /// function; emulate them with [`Msix`](crate::pci::msix::Msix).
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

    pub(super) fn name(&self) -> &'static str {
        match self {
            Capability::PowerManagement => "power management",
            Capability::Msi { .. } => "MSI",
            Capability::Msix { .. } => "MSI-X",
            Capability::PciExpress => "PCI Express",
            Capability::Vendor(_) => "vendor-specific",
        }
    }

    /// Length of the structure in configuration space (before 4-byte alignment).
    pub(super) fn len(&self) -> usize {
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

/// Where the capabilities with run-time semantics start in configuration space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct CapLayout {
    pub(super) pm: Option<usize>,
    pub(super) msi: Option<MsiLayout>,
    pub(super) msix: Option<usize>,
    pub(super) pcie: Option<usize>,
}

/// Write capability `cap`'s registers at `off` (after its id and next pointer) and
/// record where it landed in `layout`.
pub(super) fn emit_capability(r: &mut Regs, off: usize, cap: &Capability, layout: &mut CapLayout) {
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
