//! Register offsets and bit definitions of a type-0 configuration space and of the
//! capabilities this crate emulates: the type-0 header (PCI Local Bus Specification 3.0,
//! 6.1 and 6.2, figure 6-1), BAR size limits (6.2.5), the PM capability (PCI Bus Power
//! Management Interface 1.2, 3.2), MSI and MSI-X (PCI 3.0 6.8.1, 6.8.2), and the PCI
//! Express capability (PCI Express Base 4.0, 7.5.3).
//!
//! The public ones are re-exported by the parent module (`unidev_core::pci::config`).

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
pub(super) const VENDOR_ID: usize = 0x00;
pub(super) const DEVICE_ID: usize = 0x02;
pub(super) const COMMAND: usize = 0x04;
pub(super) const STATUS: usize = 0x06;
pub(super) const REVISION: usize = 0x08;
pub(super) const PROG_IF: usize = 0x09;
pub(super) const SUBCLASS: usize = 0x0a;
pub(super) const CLASS: usize = 0x0b;
pub(super) const CACHE_LINE_SIZE: usize = 0x0c;
pub(super) const LATENCY_TIMER: usize = 0x0d;
pub(super) const BAR0: usize = 0x10;
pub(super) const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub(super) const SUBSYSTEM_ID: usize = 0x2e;
pub(super) const ROM_BAR: usize = 0x30;
pub(super) const CAP_PTR: usize = 0x34;
pub(super) const INTERRUPT_LINE: usize = 0x3c;
pub(super) const INTERRUPT_PIN: usize = 0x3d;
/// First byte of the capability area (after the 64-byte header).
pub(super) const CAP_START: usize = 0x40;
/// End of the (conventional) capability area.
pub(super) const CAP_END: usize = 0x100;

/// Number of BAR slots in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Largest I/O BAR (PCI 3.0 6.2.5.1: "must not consume more than 256 bytes per I/O
/// Base Address register").
pub(super) const MAX_IO_BAR: u64 = 256;
/// Smallest memory BAR: 16 bytes (bits 3:0 hold the flags).
pub(super) const MIN_MEM_BAR: u64 = 16;
/// Smallest I/O BAR: 4 bytes (bits 1:0 hold the flags).
pub(super) const MIN_IO_BAR: u64 = 4;
/// Smallest expansion ROM: 2 KiB (bits 10:1 are reserved).
pub(super) const MIN_ROM: u64 = 2048;
/// Largest expansion ROM: the address field is 21 bits above bit 10.
pub(super) const MAX_ROM: u64 = 1 << 31;

// Power management capability (PM 1.2, 3.2).
pub(super) const PM_LEN: usize = 8;
pub(super) const PM_PMC: usize = 2;
pub(super) const PM_PMCSR: usize = 4;
/// PMC: version 3 (PM 1.2); no PME, no D1/D2, no aux current, no DSI.
pub(super) const PM_PMC_VALUE: u16 = 0x0003;
/// PMCSR: PowerState (1:0) D0, No_Soft_Reset (bit 3).
pub(super) const PM_PMCSR_VALUE: u16 = 0x0008;
pub(super) const PM_STATE_MASK: u16 = 0x0003;
pub(super) const PM_PME_STATUS: u16 = 1 << 15;

// MSI capability (PCI 3.0 6.8.1).
pub(super) const MSI_CTRL: usize = 2;
pub(super) const MSI_ADDR: usize = 4;
pub(super) const MSI_CTRL_ENABLE: u16 = 1 << 0;
pub(super) const MSI_CTRL_MME_SHIFT: u16 = 4;
pub(super) const MSI_CTRL_64BIT: u16 = 1 << 7;
pub(super) const MSI_CTRL_PVM: u16 = 1 << 8;

// MSI-X capability (PCI 3.0 6.8.2).
pub(super) const MSIX_LEN: usize = 12;
pub(super) const MSIX_CTRL: usize = 2;
pub(super) const MSIX_TABLE: usize = 4;
pub(super) const MSIX_PBA: usize = 8;
pub(super) const MSIX_CTRL_ENABLE: u16 = 1 << 15;
pub(super) const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
pub(super) const MSIX_MAX_TABLE: u16 = 2048;

// PCI Express capability, version 2 (PCIe 4.0 7.5.3).
pub(super) const PCIE_LEN: usize = 0x3c;
pub(super) const PCIE_CAPS: usize = 0x02;
pub(super) const PCIE_DEVCAP: usize = 0x04;
pub(super) const PCIE_DEVCTL: usize = 0x08;
pub(super) const PCIE_DEVSTA: usize = 0x0a;
pub(super) const PCIE_LNKCAP: usize = 0x0c;
pub(super) const PCIE_LNKCTL: usize = 0x10;
pub(super) const PCIE_LNKSTA: usize = 0x12;
pub(super) const PCIE_LNKCAP2: usize = 0x2c;
pub(super) const PCIE_LNKCTL2: usize = 0x30;
/// Capability version 2, device/port type 0 (PCI Express Endpoint).
pub(super) const PCIE_CAPS_VALUE: u16 = 0x0002;
/// Max payload 128 bytes (2:0 = 0), extended tag field (bit 5), L0s and L1 acceptable
/// latency "no limit" (8:6 and 11:9 = 7), role-based error reporting (bit 15).
pub(super) const PCIE_DEVCAP_VALUE: u32 = (1 << 5) | (7 << 6) | (7 << 9) | (1 << 15);
/// Relaxed ordering (bit 4) and no snoop (bit 11) enabled, max read request 512 bytes
/// (14:12 = 2): the reset defaults of PCIe 4.0 7.5.3.4.
pub(super) const PCIE_DEVCTL_VALUE: u16 = (1 << 4) | (1 << 11) | (2 << 12);
/// Error reporting enables (3:0), relaxed ordering (4), max payload size (7:5),
/// extended tag (8), no snoop (11), max read request size (14:12).
pub(super) const PCIE_DEVCTL_WMASK: u16 = 0x79ff;
/// Correctable/non-fatal/fatal/unsupported-request detected (3:0) are RW1C.
pub(super) const PCIE_DEVSTA_W1C: u16 = 0x000f;
/// 2.5 GT/s (3:0 = 1), x1 (9:4 = 1), no ASPM, ASPM optionality compliance (bit 22).
pub(super) const PCIE_LNKCAP_VALUE: u32 = 1 | (1 << 4) | (1 << 22);
/// ASPM control (1:0), read completion boundary (3), common clock (6), extended synch (7).
pub(super) const PCIE_LNKCTL_WMASK: u16 = 0x00cb;
/// Current speed 2.5 GT/s, negotiated width x1, slot clock configuration (bit 12).
pub(super) const PCIE_LNKSTA_VALUE: u16 = 1 | (1 << 4) | (1 << 12);
/// Supported link speeds vector: 2.5 GT/s (bit 1).
pub(super) const PCIE_LNKCAP2_VALUE: u32 = 1 << 1;
/// Target link speed 2.5 GT/s.
pub(super) const PCIE_LNKCTL2_VALUE: u16 = 1;
