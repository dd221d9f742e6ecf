//! Virtio devices in the core: the transport-independent device interface, the local
//! queue runner (any rust-vmm `VhostUserBackend` on the shared dispatch), and the
//! virtio-pci function that exports a virtio device to PCI transports.
//!
//! * [`device`] — [`VirtioDevice`], what every virtio transport drives.
//! * [`local`] — [`LocalVirtio`], vrings + worker threads for a `VhostUserBackend`.
//! * [`pci`] — [`VirtioPci`], virtio 1.2 section 4.1 as a core `PciDevice`.

pub mod device;
pub mod local;
pub mod pci;

pub use device::{QueueConfig, QueueError, VirtioDevice};
pub use local::{DispatchOptions, LocalVirtio};
pub use pci::{VirtioPci, VirtioPciOptions};
