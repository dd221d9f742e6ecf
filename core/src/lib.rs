//! unidev-core: the device model every unidev transport serves.
//!
//! * [`memory`] — the one guest-memory/DMA layer (DMA maps → a vm-memory snapshot).
//! * [`pci`] — PCI functions: config space, capabilities, BARs, MSI-X, the device trait.
//! * [`irq`] — eventfd-backed interrupt lines (INTx, MSI, MSI-X, ERR, REQ).
//! * [`dispatch`] — the epoll event loop transports and device workers share.
//! * [`virtio`] — virtio devices: any `VhostUserBackend` on the shared dispatch, and
//!   the virtio-pci function that exports it to PCI transports.
//! * [`rust_vmm`] — the rust-vmm crates unidev builds on, re-exported in the versions
//!   it uses (and what to do when a backend uses others).
//! * [`sandbox`] — optional seccomp filters for the threads that handle guest data.
//! * [`limits`] — kernel limits (open files, memory maps) and privileges, named in errors.
//! * [`sync`] — the poison-tolerant lock every shared structure is taken with.
//!
//! The core knows no wire protocol: transports translate their messages into calls on
//! these types, and backends implement devices against them without knowing which
//! transport carries them.
//!
//! # Writing a device
//!
//! There are two contracts; pick the one that matches the device:
//!
//! * **A full PCI function** — implement [`pci::PciDevice`]: describe config space with
//!   [`pci::ConfigSpace::builder`], answer BAR reads and writes, raise interrupts on the
//!   [`irq::Interrupts`] it owns, reach client memory through its [`memory::DmaSpace`].
//!   The trait's documentation has a complete small device.
//! * **A virtio device** — implement rust-vmm's `vhost_user_backend::VhostUserBackend`
//!   (0.24) exactly as for rust-vmm's own vhost-user daemon; [`virtio::LocalVirtio`]
//!   runs it on the core's dispatch and [`virtio::VirtioPci`] makes it a PCI function.
//!
//! The core does not serve devices itself: the transports layer above it exports a device
//! written against either contract by one call (the repository's README, "Write your own
//! device"). The repository's `examples/` holds a complete device of each kind
//! (`pci_timer.rs`, `virtio_ramdisk.rs`), and `docs/api-stability.md` says what is stable.
//!
//! # Stability
//!
//! Stable (semver-checked; see `docs/api-stability.md`): [`pci`], [`irq`], [`memory`],
//! [`virtio`] except [`virtio::inflight`], and [`dispatch::StopHandle`]. Experimental
//! (may change in any 0.y release): [`dispatch::EventLoop`] and its handler types
//! (transport plumbing), [`virtio::inflight`], [`sandbox`].
#![deny(missing_docs)]

pub mod dispatch;
pub mod irq;
pub mod limits;
pub mod memory;
pub mod pci;
pub mod rust_vmm;
pub mod sandbox;
pub mod sync;
pub mod virtio;

mod truncation_guard;
