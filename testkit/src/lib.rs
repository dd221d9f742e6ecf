//! unidev-testkit: the driver side of unidev's transports, for tests and benchmarks.
//!
//! A VMM drives the devices unidev exports; this crate does what the VMM and its guest's
//! driver would, in the test's own process, so that devices can be exercised (and
//! measured) without QEMU. It is not shipped and not published: the library crates and
//! the daemon use it as a dev-dependency only, the benchmark (`unidev-bench`) as a normal
//! one.
//!
//! * [`virtio_pci`] — a virtio-pci driver (virtio 1.2 section 4.1, modern interface) on
//!   top of unidev-transports' vfio-user client
//!   ([`VfioUserClient`](unidev_transports::vfio_user::VfioUserClient)): probe, feature
//!   negotiation ([`virtio_pci::options`]), MSI-X, queue set-up, notifications.
//! * [`capabilities`] — the walk of the PCI capability list the probe starts with
//!   (section 4.1.4).
//! * [`memory`] — driver memory: a memfd the device reaches with or without its fd, and
//!   the allocator for rings and buffers.
//! * [`virtqueue`] — the driver side of a split virtqueue (section 2.7).
//! * [`virtio_blk`] — virtio-blk requests (section 5.2.6).
//! * [`vhost_user`] — the frontend side of one vhost-user ring (the `vhost` crate's
//!   `Frontend` with this crate's memory and virtqueue).
//! * [`error`] — [`DriverError`], the one error type of the driver, its memory and rings.
//!
//! The device on the other end is untrusted: everything read from it is checked, and
//! surprises are errors, never panics.
//!
//! What tests use is re-exported here, so that call sites stay short:
//! `use unidev_testkit::{DriverOptions, VirtioBlkRequest, VirtioPciDriver};`.
#![deny(missing_docs)]

pub mod capabilities;
pub mod error;
pub mod memory;
pub mod vhost_user;
pub mod virtio_blk;
pub mod virtio_pci;
pub mod virtqueue;

pub use capabilities::{walk_capabilities, ConfigSource, MsixCap, NotifyCap, PciCaps, VirtioCap};
pub use error::{DriverError, DriverResult};
pub use memory::{DmaBuffer, DriverMemory};
pub use vhost_user::VhostUserRing;
pub use virtio_blk::{
    BlkCompletion, BlkRequestType, BlkSegment, PlacedBlkRequest, VirtioBlkRequest,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
pub use virtio_pci::{
    negotiate_features, DriverOptions, NotifyMode, VirtioPciDriver, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
pub use virtqueue::{vring_need_event, SplitRingLayout, Virtqueue};

/// The little-endian `u32` at `b[at..at + 4]` (the caller checked the length).
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
