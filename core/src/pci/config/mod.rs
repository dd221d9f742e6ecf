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
//!
//! One file per concern: the register offsets and bits (`registers`), BARs (`bar`),
//! capabilities and their layout (`capability`), the builder and its checks
//! (`builder`), the run-time register semantics and accessors (`space`), and the MSI
//! and MSI-X capability state (`msi`). Every public item is re-exported here.

mod bar;
mod builder;
mod capability;
mod msi;
mod registers;
mod space;
#[cfg(test)]
mod tests;

pub use bar::{Bar, BarKind};
pub use builder::{ConfigError, ConfigSpaceBuilder};
pub use capability::Capability;
pub use msi::MsiState;
pub use registers::{
    COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO, COMMAND_MEMORY, COMMAND_PARITY,
    COMMAND_SERR, CONFIG_SPACE_SIZE, EXTENDED_CONFIG_SPACE_SIZE, NUM_BARS, STATUS_CAP_LIST,
    STATUS_ERRORS_RW1C, STATUS_INTX,
};
pub use space::{ConfigSpace, ConfigWrite};
