//! unidev adapters for foreign backends.
//!
//! * [`vhost_user_proxy`] — [`VhostUserProxy`](vhost_user_proxy::VhostUserProxy), a
//!   `VirtioDevice` whose queues are run by an existing, unmodified vhost-user backend
//!   process (qemu-storage-daemon, vhost-device-*, virtiofsd), so that process can be
//!   exported through any unidev transport (vfio-user through `VirtioPci`, for one).
//!
//! **Experimental**: the proxy's API may change in any 0.y release (`docs/api-stability.md`).
#![deny(missing_docs)]

pub mod vhost_user_proxy;
