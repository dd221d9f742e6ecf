//! What the virtio-pci driver chooses at initialization (virtio 1.2 section 3.1.1 "Driver
//! Requirements: Device Initialization"): its [`DriverOptions`], the feature bits it
//! knows, the features it negotiates ([`negotiate_features`], section 2.2) and the queue
//! sizes it uses ([`choose_queue_size`], section 4.1.4.3).

use std::time::Duration;

use virtio_bindings::virtio_config;

use crate::error::{DriverError, DriverResult};
use crate::virtqueue::MAX_QUEUE_SIZE;

/// The feature bits the driver knows, from the one home of the virtio numbers.
pub use unidev_core::virtio::spec::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
/// Transport features this driver does not implement; removed from every wanted set
/// (packed rings, notification data, admin queues).
pub const UNSUPPORTED_FEATURES: u64 = (1 << virtio_config::VIRTIO_F_RING_PACKED)
    | (1 << virtio_config::VIRTIO_F_NOTIFICATION_DATA)
    | (1 << virtio_config::VIRTIO_F_NOTIF_CONFIG_DATA)
    | (1 << virtio_config::VIRTIO_F_ADMIN_VQ);

/// How notifications (kicks) reach the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NotifyMode {
    /// REGION_WRITE with No_reply, as QEMU does for MMIO BARs.
    #[default]
    Posted,
    /// REGION_WRITE waiting for the server's acknowledgement.
    Acknowledged,
    /// A store into the notify area mmapped from the region fd (the device must make the
    /// notify range mappable, through sparse-mmap areas or the whole region).
    Mmap,
}

/// Options of [`VirtioPciDriver`](super::VirtioPciDriver).
#[derive(Clone, Debug)]
pub struct DriverOptions {
    /// Features the driver wants; it negotiates `wanted & offered`. VIRTIO_F_VERSION_1
    /// is always added, and [`UNSUPPORTED_FEATURES`] always removed.
    pub features: u64,
    /// Queue size to use (a power of two; capped at the device maximum). 0: the device
    /// maximum (rounded down to a power of two).
    pub queue_size: u16,
    /// How many queues to set up, from 0. `None`: all the device has.
    pub num_queues: Option<u16>,
    /// How notifications are sent.
    pub notify: NotifyMode,
    /// Use MSI-X (an eventfd per vector). Without it the rings must be polled.
    pub msix: bool,
    /// Size of driver memory in bytes.
    pub memory_size: u64,
    /// IOVA of driver memory.
    pub iova_base: u64,
    /// DMA_MAP with the memfd (the device accesses memory directly). Without, the device
    /// reaches memory through DMA_READ/DMA_WRITE messages served by the client.
    pub map_with_fd: bool,
    /// How long a reset may take.
    pub reset_timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            features: VIRTIO_F_VERSION_1,
            queue_size: 256,
            num_queues: None,
            notify: NotifyMode::Posted,
            msix: true,
            memory_size: 64 << 20,
            iova_base: 0x1_0000_0000,
            map_with_fd: true,
            reset_timeout: Duration::from_secs(1),
        }
    }
}

/// `wanted & offered`, with VERSION_1 added to what is wanted and unsupported features
/// removed. Fails when the device does not offer VERSION_1.
pub fn negotiate_features(wanted: u64, offered: u64) -> DriverResult<u64> {
    if offered & VIRTIO_F_VERSION_1 == 0 {
        return Err(DriverError::NotModern { offered });
    }
    Ok((wanted | VIRTIO_F_VERSION_1) & !UNSUPPORTED_FEATURES & offered)
}

/// The queue size to use: `requested` (0 = as large as possible) capped at the device's
/// `max`, rounded down to a power of two.
pub fn choose_queue_size(queue: u16, requested: u16, max: u16) -> DriverResult<u16> {
    if max == 0 {
        return Err(DriverError::QueueSizeZero(queue));
    }
    if requested != 0 && !requested.is_power_of_two() {
        return Err(DriverError::InvalidOption(format!(
            "queue size {requested} is not a power of two"
        )));
    }
    let want = if requested == 0 {
        MAX_QUEUE_SIZE
    } else {
        requested
    };
    let n = want.min(max).min(MAX_QUEUE_SIZE);
    Ok(1 << (15 - n.leading_zeros().min(15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_size_and_feature_choice() {
        assert_eq!(choose_queue_size(0, 256, 1024).unwrap(), 256);
        assert_eq!(choose_queue_size(0, 256, 128).unwrap(), 128);
        assert_eq!(choose_queue_size(0, 0, 1000).unwrap(), 512);
        assert_eq!(choose_queue_size(0, 0, 0xffff).unwrap(), 32768);
        assert_eq!(choose_queue_size(0, 1024, 1).unwrap(), 1);
        assert!(matches!(
            choose_queue_size(2, 256, 0),
            Err(DriverError::QueueSizeZero(2))
        ));
        assert!(choose_queue_size(0, 100, 256).is_err());

        let offered = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 0b101 | UNSUPPORTED_FEATURES;
        let f = negotiate_features(
            VIRTIO_RING_F_EVENT_IDX | 0b110 | UNSUPPORTED_FEATURES,
            offered,
        )
        .unwrap();
        assert_eq!(f, VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 0b100);
        assert!(matches!(
            negotiate_features(u64::MAX, 0xffff_ffff),
            Err(DriverError::NotModern { .. })
        ));
    }
}
