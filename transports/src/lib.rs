//! unidev-transports: wire protocols that export the core's devices.
//!
//! Each transport is a codec plus a session that translates messages into calls on
//! `unidev-core` objects; none holds device state. Today: [`vfio_user`], [`vhost_user`] and [`vduse`].
#![deny(missing_docs)]

pub mod listener;
pub mod vduse;
pub mod vfio_user;
pub mod vhost_user;
