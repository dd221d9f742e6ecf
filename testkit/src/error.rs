//! Why an operation of the virtio-pci driver, its memory or its rings failed: one error
//! type for the whole driver (virtio 1.2 section 4.1 for the transport, 2.7 for the
//! rings), so that every surprise from an untrusted device is a value, never a panic.

use std::io;

use unidev_transports::vfio_user::client::ClientError;

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The vfio-user client failed.
    #[error("vfio-user: {0}")]
    Client(#[from] ClientError),
    /// A local system call failed (memfd, mmap, eventfd, poll).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The status register does not announce a capability list.
    #[error("the device has no PCI capability list")]
    NoCapabilityList,
    /// The capability list is malformed (loop, pointer or length out of range).
    #[error("capability at {offset:#x}: {why}")]
    BadCapability {
        /// Config space offset of the capability (or of the pointer to it).
        offset: u16,
        /// What is wrong.
        why: String,
    },
    /// A capability the driver needs is absent.
    #[error("the device has no {0} capability")]
    MissingCapability(&'static str),
    /// A structure does not fit in the BAR it names, or the BAR is not usable.
    #[error("BAR {bar}: {why}")]
    BadRegion {
        /// The BAR.
        bar: u8,
        /// What is wrong.
        why: String,
    },
    /// The device did not read back 0 after a reset within the timeout.
    #[error("device status still {0:#x} after reset")]
    ResetTimeout(u8),
    /// The device does not offer VIRTIO_F_VERSION_1 (legacy-only device).
    #[error("device does not offer VIRTIO_F_VERSION_1 (offered {offered:#x})")]
    NotModern {
        /// What the device offered.
        offered: u64,
    },
    /// The device cleared FEATURES_OK: it refused the negotiated features.
    #[error("device refused features {features:#x} (status {status:#x})")]
    FeaturesRefused {
        /// The features written.
        features: u64,
        /// The status read back.
        status: u8,
    },
    /// The device set DEVICE_NEEDS_RESET.
    #[error("device needs reset (status {0:#x})")]
    NeedsReset(u8),
    /// The device has no queue with this index.
    #[error("no queue {0}")]
    NoSuchQueue(u16),
    /// The device reports a maximum size of 0 for a queue.
    #[error("queue {0} is unavailable (size 0)")]
    QueueSizeZero(u16),
    /// The device answered NO_VECTOR when given an MSI-X vector.
    #[error("device rejected MSI-X vector {vector} for {what}")]
    VectorRejected {
        /// "config" or "queue N".
        what: String,
        /// The vector.
        vector: u16,
    },
    /// Fewer MSI-X vectors than config + queues.
    #[error("{needed} MSI-X vectors needed, the device has {available}")]
    NotEnoughVectors {
        /// Vectors needed.
        needed: u32,
        /// Vectors offered (the smaller of the capability's table size and the irq count).
        available: u32,
    },
    /// The queue has fewer free descriptors than the chain needs.
    #[error("queue {queue} full: chain needs {needed} descriptors, {free} free")]
    QueueFull {
        /// The queue.
        queue: u16,
        /// Descriptors the chain needs.
        needed: usize,
        /// Free descriptors.
        free: u16,
    },
    /// A chain the caller built is not acceptable.
    #[error("invalid chain: {0}")]
    InvalidChain(String),
    /// The device wrote something into a ring that breaks the protocol.
    #[error("queue {queue}: device protocol violation: {why}")]
    Device {
        /// The queue.
        queue: u16,
        /// What the device did.
        why: String,
    },
    /// Nothing happened within the timeout.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// Driver memory: out of space, out of range, bad free.
    #[error("driver memory: {0}")]
    Memory(String),
    /// The driver runs without interrupts (`msix: false`).
    #[error("interrupts are not set up")]
    NoInterrupts,
    /// `NotifyMode::Mmap` was asked for but the notify area is not mappable.
    #[error("notify area not mappable: {0}")]
    NotifyNotMappable(String),
    /// An option is out of range.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// The device is not initialized (call `init`).
    #[error("device not initialized")]
    NotInitialized,
}

/// Result of driver operations.
pub type DriverResult<T> = Result<T, DriverError>;

/// A [`DriverError::Memory`] from a vm-memory (or other) error.
pub(crate) fn mem_err(e: impl std::fmt::Display) -> DriverError {
    DriverError::Memory(e.to_string())
}
