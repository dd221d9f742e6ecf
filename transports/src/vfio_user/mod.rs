//! The vfio-user transport: a server that exports a core [`PciDevice`] over QEMU's
//! vfio-user protocol (`docs/interop/vfio-user.rst`), with QEMU 11.1's `vfio-user-pci`
//! client as the reference peer.
//!
//! * [`codec`] — the wire format (declared layouts with a generated codec: see its doc
//!   for why and how).
//! * [`socket`] — framing, fds, limits.
//! * [`session`] — one connection: commands translated into core calls.
//! * [`server`] — the listening socket and the event loop, one client at a time.
//! * [`transport`] — the [`VfioUser`] address: vfio-user as a unidev transport.
//! * [`client`] — the other end, as a library: drive a vfio-user device without a VMM
//!   (the virtio-pci driver of the tests and benchmarks, `unidev-testkit`, is built on it).
//!
//! Stability: device authors use [`crate::export`], which takes a [`ServerConfig`] (stable,
//! with [`DmaRwLayout`]). Everything else here — the server type, the session, codec and
//! socket, and the [`client`] — is **experimental** and may change in any 0.y release
//! (`docs/api-stability.md`).
//!
//! Differences from the spec text, where QEMU wins (see `DmaRwLayout`): DMA_READ and
//! DMA_WRITE payload layout, and DMA_WRITE's header-only reply. Twin-socket mode is not
//! offered (QEMU does not use it); DMA requests travel on the main socket and commands
//! that arrive meanwhile are parked and handled in order.
//!
//! [`PciDevice`]: unidev_core::pci::PciDevice

pub mod client;
pub mod codec;
pub mod server;
pub mod session;
pub mod socket;
pub mod transport;

pub use client::VfioUserClient;
pub use codec::DmaRwLayout;
pub use server::VfioUserServer;
pub use session::ServerConfig;
pub use transport::{VfioUser, TRANSPORT};
