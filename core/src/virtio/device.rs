//! The one small interface every virtio transport drives: a [`VirtioDevice`] is
//! features, config space and queues, whatever runs the queues.
//!
//! Two implementations: [`LocalVirtio`](super::local::LocalVirtio) runs a
//! `VhostUserBackend` on the core's shared dispatch (vrings + worker threads), and
//! (later) compat's vhost-user proxy hands the same set-up to an external backend
//! process. `VirtioPci` drives it from PCI register writes; the vhost-user and VDUSE
//! transports drive it from their messages — so every transport-to-device path meets
//! here.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::health::DeviceHealth;
use super::inflight::InflightRegion;

/// Where a started queue lives and how it signals.
#[derive(Debug)]
pub struct QueueConfig {
    /// Number of descriptors (a power of two for split rings).
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available (driver) ring.
    pub avail: u64,
    /// Guest address of the used (device) ring.
    pub used: u64,
    /// The driver kicks this eventfd when it adds buffers.
    pub kick: EventFd,
    /// The device signals this eventfd when it used buffers (None: nobody listens).
    pub call: Option<EventFd>,
    /// Index of the next available entry to process (0 for a fresh queue).
    pub next_avail: u16,
    /// Index of the next used entry to fill (0 for a fresh queue).
    pub next_used: u16,
}

/// Why a queue could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// No such queue.
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    /// Size zero, not a power of two, or above the maximum.
    #[error("queue {index}: invalid size {size} (maximum {max})")]
    BadSize {
        /// Queue.
        index: usize,
        /// Size asked for.
        size: u16,
        /// Maximum.
        max: u16,
    },
    /// Ring addresses misaligned or outside mapped memory.
    #[error("queue {0}: ring addresses are misaligned or outside mapped memory")]
    BadRings(usize),
    /// The backend or the dispatch refused.
    #[error("queue {index}: {}", crate::limits::describe(.source))]
    Backend {
        /// Queue.
        index: usize,
        /// Cause.
        source: io::Error,
    },
}

/// A virtio device as a transport sees it. Methods take `&self` (implementations use
/// interior mutability) so that interrupt routing can update call fds from any thread.
///
/// Device authors do not implement this trait: they implement rust-vmm's
/// `vhost_user_backend::VhostUserBackend`, and [`LocalVirtio`](super::LocalVirtio) turns it
/// into a `VirtioDevice` (the transports layer's one-call export does that for them).
/// Implement it directly only for a device whose queues run somewhere else, as the compat
/// layer's proxy does. Transports call it from their messages, and
/// [`VirtioPci`](super::VirtioPci) calls it from PCI register writes.
pub trait VirtioDevice: Send + Sync {
    /// The virtio device type (virtio 1.2 section 5: 2 = block, 4 = entropy, ...).
    fn device_type(&self) -> u32;
    /// Number of queues.
    fn num_queues(&self) -> usize;
    /// Largest queue size the device accepts.
    fn max_queue_size(&self) -> u16;
    /// Device feature bits (transport-independent virtio features; no vhost-user bits).
    fn features(&self) -> u64;
    /// Read `data.len()` bytes of device-specific config at `offset` (zero past the end).
    fn read_config(&self, offset: u32, data: &mut [u8]);
    /// Write device-specific config.
    fn write_config(&self, offset: u32, data: &[u8]);
    /// The driver accepted `features` (FEATURES_OK).
    fn set_driver_features(&self, features: u64);
    /// Start queue `index`.
    fn start_queue(&self, index: usize, config: QueueConfig) -> Result<(), QueueError>;
    /// Replace the call eventfd of a queue (started or not).
    fn set_queue_call(&self, index: usize, call: Option<EventFd>);
    /// Stop queue `index`; returns the next available index (for a later resume).
    fn stop_queue(&self, index: usize) -> Option<u16>;
    /// Stop every queue and return to the initial state (driver reset, FLR).
    fn reset(&self);
    /// Whether the device serves its own configuration space (for a vhost-user backend,
    /// whether it offers the CONFIG protocol feature). When it does not, transports that
    /// are the device model (virtio-pci, VDUSE) keep the config space themselves
    /// ([`super::config`]) and vhost-user does not offer CONFIG. Default: it does.
    fn serves_config(&self) -> bool {
        true
    }
    /// The device's health, if it can fail on its own (a backend that panicked): the
    /// transport watches its eventfd and tells the driver the device needs a reset.
    /// Default: none.
    fn health(&self) -> Option<Arc<DeviceHealth>> {
        None
    }
    /// Whether [`set_inflight`](VirtioDevice::set_inflight) is supported.
    fn can_log_inflight(&self) -> bool {
        false
    }
    /// Log in-flight requests of queues started from now on in `region` (None: stop
    /// logging), and resume queues from the log it holds (see
    /// [`inflight`](super::inflight)). Devices that cannot track return `Unsupported`.
    fn set_inflight(&self, region: Option<Arc<InflightRegion>>) -> io::Result<()> {
        match region {
            None => Ok(()),
            Some(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "this device cannot log in-flight requests",
            )),
        }
    }
}
