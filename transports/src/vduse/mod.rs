//! The VDUSE transport: serves a core [`VirtioDevice`] as a Linux VDUSE device ("vDPA
//! Device in Userspace", kernel `Documentation/userspace-api/vduse.rst`,
//! `include/uapi/linux/vduse.h`), so the kernel's own virtio drivers (through
//! `virtio_vdpa`) or a VMM (through `vhost_vdpa`) drive the same device model as every
//! other transport.
//!
//! * [`uapi`] — the header's structures and ioctl numbers (no Rust crate covers VDUSE).
//! * [`control`] — `/dev/vduse/control`: API version, create and destroy, and errors
//!   that say which modules or privileges are missing.
//! * [`iotlb`] — the kernel's IOTLB mirrored into the device's [`DmaSpace`].
//! * [`session`] — the request channel (GET_VQ_STATE, SET_STATUS, UPDATE_IOTLB)
//!   translated into core calls, with kick and interrupt relays on the dispatch.
//! * [`server`] — one device's life: create, serve on an [`EventLoop`], destroy.
//! * [`transport`] — the [`Vduse`] address and the device's life as an export: create
//!   (or take over), serve on a thread of its own, attach to the vDPA bus, detach and
//!   destroy.
//! * [`vdpa_netlink`] — attaching the device to the vDPA bus (`vdpa dev add`) over generic
//!   netlink, and making sure the requested bus driver binds it.
//!
//! A device left over by a daemon that was killed is destroyed and created anew, or, when
//! a driver still holds it, taken over and resumed (see [`server`]).
//!
//! The kernel (6.12) accepts virtio-blk and virtio-net devices only, requires
//! `VIRTIO_F_ACCESS_PLATFORM`, and exposes the config space read-only.
//!
//! Stability: device authors use [`crate::export`] with the [`Vduse`] address, which names
//! [`VdpaDriver`], [`VduseError`], [`VdpaError`] and [`DEFAULT_CONTROL_PATH`] from here
//! (stable). The VDUSE internals — [`uapi`], [`control`], [`iotlb`], [`session`],
//! [`server`], [`vdpa_netlink`] beyond those names — are **experimental** and may change
//! in any 0.y release (`docs/api-stability.md`).
//!
//! [`VirtioDevice`]: unidev_core::virtio::VirtioDevice
//! [`DmaSpace`]: unidev_core::memory::DmaSpace
//! [`EventLoop`]: unidev_core::dispatch::EventLoop

pub mod control;
pub mod iotlb;
pub mod server;
pub mod session;
pub mod transport;
pub mod uapi;
pub mod vdpa_netlink;

#[cfg(test)]
mod session_tests;

pub use control::{VduseError, DEFAULT_CONTROL_PATH};
pub use server::{VduseOptions, VduseServer};
pub use transport::{Vduse, TRANSPORT};
pub use vdpa_netlink::{
    adopt_attachment, attach, device_exists, Attachment, NetlinkVdpa, VdpaBus, VdpaDriver,
    VdpaError, VdpaManager,
};
