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
//!
//! The kernel (6.12) accepts virtio-blk and virtio-net devices only, requires
//! `VIRTIO_F_ACCESS_PLATFORM`, and exposes the config space read-only.
//!
//! [`VirtioDevice`]: unidev_core::virtio::VirtioDevice
//! [`DmaSpace`]: unidev_core::memory::DmaSpace

pub mod control;
pub mod iotlb;
pub mod uapi;

pub use control::{VduseError, DEFAULT_CONTROL_PATH};
