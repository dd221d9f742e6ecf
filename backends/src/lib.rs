//! unidev-backends: device behaviour, written once against `unidev-core`'s contracts and
//! carried by any transport.
//!
//! * [`gpio`] — an ACCES PCI-IDIO-16 compatible isolated digital I/O card, a full PCI
//!   function (`unidev_core::pci::PciDevice`) that Linux's `gpio-pci-idio-16` driver
//!   binds to.
//! * [`virtio_blk`] — a virtio block device on a raw image or block device.
//! * [`virtio_rng`] — a virtio entropy device (`vhost_user_backend::VhostUserBackend`).
//!
//! Backends never learn which transport carries them: they see configuration space and
//! BAR accesses, raise interrupts through `unidev_core::irq::Interrupts`, and reach client
//! memory through `unidev_core::memory::DmaSpace`.
//!
//! **Experimental** as a library: these are the daemon's devices, and their Rust API
//! (constructors, options) may change in any 0.y release; what they do for a guest, and the
//! daemon options that configure them, are covered by `docs/api-stability.md`. Devices of
//! your own are written against `unidev-core`, like these.
#![deny(missing_docs)]

pub mod gpio;
pub mod virtio_blk;
pub mod virtio_rng;
mod vring_loop;
