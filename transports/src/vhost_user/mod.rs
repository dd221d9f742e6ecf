//! The vhost-user transport, backend side: exports a core [`VirtioDevice`] (for example a
//! `LocalVirtio` running any `VhostUserBackend`) over a vhost-user socket
//! (QEMU's `docs/interop/vhost-user.rst`), so that `vhost-user-*` frontends drive the same
//! device model as every other transport.
//!
//! * [`session`] — one connection: requests translated into core calls (the `vhost`
//!   crate's `BackendReqHandler` does the framing, fds and REPLY_ACK).
//! * [`server`] — the listening socket on the core's dispatch, one frontend at a time.
//! * [`transport`] — the [`VhostUser`] address: vhost-user as a unidev transport.
//!
//! Guest memory: SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG become maps and unmaps of the
//! device's [`DmaSpace`] by guest physical address; ring addresses, which a frontend gives
//! as its own virtual addresses, are translated through the memory table.
//!
//! Offered protocol features: MQ, CONFIG, REPLY_ACK, CONFIGURE_MEM_SLOTS, RESET_DEVICE,
//! STATUS, and INFLIGHT_SHMFD for devices that can log in-flight requests (the core's
//! [`InflightRegion`]: a restarted daemon resumes without losing or repeating requests).
//! Not offered: dirty logging, device state transfer, backend requests, packed rings,
//! polling mode (a ring without a kick fd).
//!
//! * [`status`] — SET_STATUS/GET_STATUS, which the `vhost` crate cannot dispatch.
//!
//! Stability: device authors use [`crate::export`] with the [`VhostUser`] address; the server,
//! session and status types here are **experimental** and may change in any 0.y release
//! (`docs/api-stability.md`).
//!
//! [`VirtioDevice`]: unidev_core::virtio::VirtioDevice
//! [`DmaSpace`]: unidev_core::memory::DmaSpace
//! [`InflightRegion`]: unidev_core::virtio::InflightRegion

pub mod server;
pub mod session;
pub mod status;
pub mod transport;

pub use server::VhostUserServer;
pub use transport::{VhostUser, TRANSPORT};
