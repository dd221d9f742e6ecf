//! unidev-core: the device model every unidev transport serves.
//!
//! * [`memory`] — the one guest-memory/DMA layer (DMA maps → a vm-memory snapshot).
//! * [`pci`] — PCI functions: config space, capabilities, BARs, MSI-X, the device trait.
//! * [`irq`] — eventfd-backed interrupt lines (INTx, MSI, MSI-X, ERR, REQ).
//! * [`dispatch`] — the epoll event loop transports and device workers share.
//! * [`virtio`] — virtio devices: any `VhostUserBackend` on the shared dispatch, and
//!   the virtio-pci function that exports it to PCI transports.
//! * [`sandbox`] — optional seccomp filters for the threads that handle guest data.
//!
//! The core knows no wire protocol: transports translate their messages into calls on
//! these types, and backends implement devices against them without knowing which
//! transport carries them.
#![deny(missing_docs)]

pub mod dispatch;
pub mod irq;
pub mod memory;
pub mod pci;
pub mod sandbox;
pub mod virtio;

mod truncation_guard;
