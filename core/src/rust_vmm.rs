//! The rust-vmm crates unidev is built on, in the versions it uses: name them from here
//! so that a device crate gets exactly these.
//!
//! unidev's stable API exposes their types (a backend implements
//! [`vhost_user_backend::VhostUserBackend`] over [`vm_memory`] and [`virtio_queue`]), so a
//! device crate must build against the same versions — one copy of each in its
//! dependency graph. With another version of vhost-user-backend, the backend implements
//! a *different* `VhostUserBackend` trait and the build fails with an error like
//! "the trait bound `MyBackend: VhostUserBackend` is not satisfied" (with a note that
//! several versions of `vhost_user_backend` are in the graph: `cargo tree -d` lists them).
//!
//! Two ways out:
//! * **Pin the versions unidev uses** (`docs/api-stability.md` lists them:
//!   vhost-user-backend 0.24, vhost 0.18, virtio-queue 0.18, vm-memory 0.18,
//!   vmm-sys-util 0.15, virtio-bindings 0.2), or write `use unidev_core::rust_vmm::*`
//!   paths instead of depending on them directly.
//! * **Run the backend as its own process** behind the daemon's `vhost-user-proxy`
//!   (`unidev serve --transport vfio-user ... vhost-user-proxy --backend-socket S
//!   --virtio-id N`): it speaks vhost-user to the backend, so any version works —
//!   upstream's released vhost-device daemons included.

pub use ::vhost;
pub use ::vhost_user_backend;
pub use ::virtio_bindings;
pub use ::virtio_queue;
pub use ::vm_memory;
pub use ::vmm_sys_util;
