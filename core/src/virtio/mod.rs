//! Virtio devices in the core: the transport-independent device interface, the local
//! queue runner (any rust-vmm `VhostUserBackend` on the shared dispatch), and the
//! virtio-pci function that exports a virtio device to PCI transports.
//!
//! * [`config`] — who owns a device's configuration space, per device type: the device
//!   model of the transports that are one (virtio-pci, VDUSE).
//! * [`device`] — [`VirtioDevice`], what every virtio transport drives.
//! * [`local`] — [`LocalVirtio`], vrings + worker threads for a `VhostUserBackend`.
//! * [`pci`] — [`VirtioPci`], virtio 1.2 section 4.1 as a core `PciDevice`.
//! * [`health`] — [`DeviceHealth`]: a backend panic costs its device only.
//! * [`spec`] — the virtio specification's numbers (status and feature bits, device
//!   types) and the one status-transition function every transport calls.
//! * [`inflight`] — [`InflightRegion`], a shared-memory log of in-flight requests that
//!   lets a restarted daemon resume its queues without losing or repeating requests.

pub mod config;
pub mod device;
pub mod health;
pub mod inflight;
pub mod local;
pub mod pci;
pub mod spec;

pub use device::{QueueConfig, QueueError, VirtioDevice};
pub use health::DeviceHealth;
pub use inflight::InflightRegion;
pub use local::{DispatchOptions, LocalVirtio};
pub use pci::{VirtioPci, VirtioPciOptions};
