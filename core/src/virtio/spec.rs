//! One home for the virtio specification's numbers and rules that every transport
//! shares (virtio 1.2): device status bits and the one status-transition function
//! (section 2.1 "Device Status Field", section 3.1 "Device Initialization"), the
//! transport-independent feature bits (section 6 "Reserved Feature Bits") and ring
//! feature bits (section 2.7), the feature negotiation check (section 2.2), and device
//! types (section 5).
//!
//! The numbers come from `virtio-bindings` (Linux's `virtio_config.h`, `virtio_ring.h`,
//! `virtio_ids.h`), typed and shifted into masks once here. Every transport — virtio-pci's
//! common configuration, vhost-user's SET_STATUS, VDUSE's SET_STATUS — calls
//! [`write_status`], so a driver's status write means the same thing whichever way it
//! arrives.

use virtio_bindings::virtio_config as config;
use virtio_bindings::virtio_ids as ids;
use virtio_bindings::virtio_ring as ring;

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    use super::config;

    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = config::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = config::VIRTIO_CONFIG_S_DRIVER as u8;
    /// The driver is ready: the device may use its queues.
    pub const DRIVER_OK: u8 = config::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    /// Feature negotiation is complete (the device clears it back when it refuses the
    /// features).
    pub const FEATURES_OK: u8 = config::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    /// The device hit an error it cannot recover from without a reset (the device's bit:
    /// a driver never sets it).
    pub const DEVICE_NEEDS_RESET: u8 = config::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    /// The driver gave up on the device.
    pub const FAILED: u8 = config::VIRTIO_CONFIG_S_FAILED as u8;
}

/// VIRTIO_F_VERSION_1: a virtio 1.x (non-legacy) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << config::VIRTIO_F_VERSION_1;
/// VIRTIO_F_ACCESS_PLATFORM: the device reaches memory through the platform's IOMMU
/// (addresses are IOVAs).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << config::VIRTIO_F_ACCESS_PLATFORM;
/// VIRTIO_F_RING_PACKED: packed virtqueues (section 2.8).
pub const VIRTIO_F_RING_PACKED: u64 = 1 << config::VIRTIO_F_RING_PACKED;
/// VIRTIO_F_IN_ORDER: buffers are used in the order they were made available.
pub const VIRTIO_F_IN_ORDER: u64 = 1 << config::VIRTIO_F_IN_ORDER;
/// VIRTIO_F_NOTIFICATION_DATA: notifications carry ring positions.
pub const VIRTIO_F_NOTIFICATION_DATA: u64 = 1 << config::VIRTIO_F_NOTIFICATION_DATA;
/// VIRTIO_F_RING_RESET: single queues can be reset.
pub const VIRTIO_F_RING_RESET: u64 = 1 << config::VIRTIO_F_RING_RESET;
/// VIRTIO_RING_F_INDIRECT_DESC: indirect descriptor tables (section 2.7.5.3).
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << ring::VIRTIO_RING_F_INDIRECT_DESC;
/// VIRTIO_RING_F_EVENT_IDX: used_event / avail_event notification suppression (section
/// 2.7.7, 2.7.10).
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;

/// Device types (virtio 1.2 section 5).
pub const VIRTIO_ID_NET: u32 = ids::VIRTIO_ID_NET;
/// Block device (section 5.2).
pub const VIRTIO_ID_BLOCK: u32 = ids::VIRTIO_ID_BLOCK;
/// Console (section 5.3).
pub const VIRTIO_ID_CONSOLE: u32 = ids::VIRTIO_ID_CONSOLE;
/// Entropy device (section 5.4).
pub const VIRTIO_ID_RNG: u32 = ids::VIRTIO_ID_RNG;
/// SCSI host (section 5.6).
pub const VIRTIO_ID_SCSI: u32 = ids::VIRTIO_ID_SCSI;
/// File system (section 5.11).
pub const VIRTIO_ID_FS: u32 = ids::VIRTIO_ID_FS;
/// Socket device (section 5.10).
pub const VIRTIO_ID_VSOCK: u32 = ids::VIRTIO_ID_VSOCK;
/// Sound device (section 5.14).
pub const VIRTIO_ID_SOUND: u32 = ids::VIRTIO_ID_SOUND;
/// GPIO device (section 5.18).
pub const VIRTIO_ID_GPIO: u32 = ids::VIRTIO_ID_GPIO;
/// I2C adapter (section 5.16).
pub const VIRTIO_ID_I2C_ADAPTER: u32 = ids::VIRTIO_ID_I2C_ADAPTER;

/// A readable name for a virtio device type (log lines and errors).
pub fn device_type_name(device_type: u32) -> &'static str {
    match device_type {
        ids::VIRTIO_ID_NET => "virtio-net",
        ids::VIRTIO_ID_BLOCK => "virtio-blk",
        ids::VIRTIO_ID_CONSOLE => "virtio-console",
        ids::VIRTIO_ID_RNG => "virtio-rng",
        ids::VIRTIO_ID_BALLOON => "virtio-balloon",
        ids::VIRTIO_ID_SCSI => "virtio-scsi",
        ids::VIRTIO_ID_9P => "virtio-9p",
        ids::VIRTIO_ID_GPU => "virtio-gpu",
        ids::VIRTIO_ID_INPUT => "virtio-input",
        ids::VIRTIO_ID_VSOCK => "virtio-vsock",
        ids::VIRTIO_ID_CRYPTO => "virtio-crypto",
        ids::VIRTIO_ID_FS => "virtio-fs",
        ids::VIRTIO_ID_SOUND => "virtio-sound",
        ids::VIRTIO_ID_SCMI => "virtio-scmi",
        ids::VIRTIO_ID_I2C_ADAPTER => "virtio-i2c",
        ids::VIRTIO_ID_CAN => "virtio-can",
        ids::VIRTIO_ID_GPIO => "virtio-gpio",
        _ => "unknown",
    }
}

/// Whether a driver may accept `driver` features of a device offering `offered`
/// (section 2.2: a subset of what the device offers; section 6.1 and 7: a non-legacy
/// device requires VIRTIO_F_VERSION_1).
pub fn check_driver_features(offered: u64, driver: u64) -> Result<(), String> {
    let unoffered = driver & !offered;
    if unoffered != 0 {
        return Err(format!(
            "driver features {driver:#x} include {unoffered:#x}, which the device does not \
             offer ({offered:#x})"
        ));
    }
    if driver & VIRTIO_F_VERSION_1 == 0 {
        return Err(format!(
            "driver features {driver:#x} lack VIRTIO_F_VERSION_1 (legacy drivers are not \
             supported)"
        ));
    }
    Ok(())
}

/// Why (part of) a status write was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StatusRefusal {
    /// The driver cleared bits without writing 0 (section 2.1.1: the driver must not
    /// clear a device status bit); they stay set.
    #[error(
        "the driver cleared status bits {0:#x} without a reset (virtio 1.2 2.1.1); they stay set"
    )]
    Cleared(u8),
    /// FEATURES_OK was set but the features cannot be accepted; FEATURES_OK is not kept
    /// (section 3.1.1 step 5).
    #[error("FEATURES_OK refused: {0}")]
    Features(String),
    /// DRIVER_OK was set without FEATURES_OK (section 3.1.1: FEATURES_OK comes first for
    /// a non-legacy device); DRIVER_OK is not kept and nothing starts.
    #[error("DRIVER_OK without FEATURES_OK refused (virtio 1.2 3.1.1)")]
    DriverOkBeforeFeaturesOk,
}

/// What the device does about a status write ([`write_status`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatusUpdate {
    /// The status the device keeps: what the driver reads back.
    pub status: u8,
    /// 0 was written: reset the device (section 2.4).
    pub reset: bool,
    /// FEATURES_OK was set now and the driver's features accepted: these, for the device.
    pub features: Option<u64>,
    /// The device starts running its queues now (DRIVER_OK set, the driver not FAILED).
    pub start: bool,
    /// The device stops running its queues now (the driver set FAILED while they ran).
    pub stop: bool,
    /// What of the write was not accepted, if anything (for a log line).
    pub refused: Option<StatusRefusal>,
}

impl StatusUpdate {
    fn keep(status: u8) -> Self {
        StatusUpdate {
            status,
            reset: false,
            features: None,
            start: false,
            stop: false,
            refused: None,
        }
    }
}

/// Whether a device with status `s` runs its queues.
pub fn is_running(s: u8) -> bool {
    s & status::DRIVER_OK != 0 && s & status::FAILED == 0
}

/// The driver wrote `written` to a device whose status is `old` and which offers
/// `offered` features; `driver_features` gives the features the driver accepted (read
/// only when FEATURES_OK is newly set). The rules (virtio 1.2 sections 2.1, 2.4, 3.1):
///
/// * 0 resets the device.
/// * DEVICE_NEEDS_RESET is the device's bit: what the driver writes there is ignored and
///   the device's value kept.
/// * A driver must not clear bits other than by writing 0: cleared bits stay set, and the
///   write is reported refused. The order of ACKNOWLEDGE, DRIVER and FEATURES_OK is not
///   enforced (vhost-user frontends set FEATURES_OK on its own first).
/// * FEATURES_OK newly set: the driver's features must be a subset of the offered ones
///   and include VIRTIO_F_VERSION_1 ([`check_driver_features`]); otherwise FEATURES_OK is
///   not kept (the driver reads it back and gives up).
/// * DRIVER_OK without FEATURES_OK is not kept.
/// * The queues start when the device begins to run (DRIVER_OK, not FAILED) and stop when
///   it ceases to (FAILED set while running).
pub fn write_status(
    old: u8,
    written: u8,
    offered: u64,
    driver_features: impl FnOnce() -> Result<u64, String>,
) -> StatusUpdate {
    if written == 0 {
        return StatusUpdate {
            reset: true,
            ..StatusUpdate::keep(0)
        };
    }
    let needs_reset = old & status::DEVICE_NEEDS_RESET;
    let old_driver_bits = old & !status::DEVICE_NEEDS_RESET;
    let asked = written & !status::DEVICE_NEEDS_RESET;
    let mut update = StatusUpdate::keep(0);
    let cleared = old_driver_bits & !asked;
    if cleared != 0 {
        update.refused = Some(StatusRefusal::Cleared(cleared));
    }
    let mut new = asked | old_driver_bits;
    if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
        match driver_features().and_then(|f| check_driver_features(offered, f).map(|()| f)) {
            Ok(f) => update.features = Some(f),
            Err(why) => {
                new &= !status::FEATURES_OK;
                update.refused.get_or_insert(StatusRefusal::Features(why));
            }
        }
    }
    if new & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
        new &= !status::DRIVER_OK;
        update
            .refused
            .get_or_insert(StatusRefusal::DriverOkBeforeFeaturesOk);
    }
    new |= needs_reset;
    update.status = new;
    update.start = is_running(new) && !is_running(old);
    update.stop = is_running(old) && !is_running(new);
    update
}

#[cfg(test)]
mod tests {
    use super::status::*;
    use super::*;

    const OFFERED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | 1;

    fn write(old: u8, written: u8) -> StatusUpdate {
        write_status(old, written, OFFERED, || Ok(VIRTIO_F_VERSION_1 | 1))
    }

    #[test]
    fn the_numbers_are_the_spec_s() {
        assert_eq!(
            [
                ACKNOWLEDGE,
                DRIVER,
                DRIVER_OK,
                FEATURES_OK,
                DEVICE_NEEDS_RESET,
                FAILED
            ],
            [1, 2, 4, 8, 64, 128]
        );
        assert_eq!(VIRTIO_F_VERSION_1, 1 << 32);
        assert_eq!(VIRTIO_F_ACCESS_PLATFORM, 1 << 33);
        assert_eq!(VIRTIO_F_RING_PACKED, 1 << 34);
        assert_eq!(VIRTIO_RING_F_EVENT_IDX, 1 << 29);
        assert_eq!(VIRTIO_RING_F_INDIRECT_DESC, 1 << 28);
        assert_eq!((VIRTIO_ID_NET, VIRTIO_ID_BLOCK, VIRTIO_ID_RNG), (1, 2, 4));
        assert_eq!(device_type_name(VIRTIO_ID_BLOCK), "virtio-blk");
        assert_eq!(device_type_name(4242), "unknown");
    }

    /// Section 3.1.1, in order: each step is kept, features are handed over at
    /// FEATURES_OK, queues start at DRIVER_OK.
    #[test]
    fn the_initialization_sequence_is_accepted_step_by_step() {
        let mut s = 0;
        for (bit, features, start) in [
            (ACKNOWLEDGE, None, false),
            (DRIVER, None, false),
            (FEATURES_OK, Some(VIRTIO_F_VERSION_1 | 1), false),
            (DRIVER_OK, None, true),
        ] {
            let u = write(s, s | bit);
            assert_eq!(u.status, s | bit, "{bit:#x}");
            assert_eq!(u.features, features, "{bit:#x}");
            assert_eq!(u.start, start, "{bit:#x}");
            assert!(
                !u.stop && !u.reset && u.refused.is_none(),
                "{bit:#x}: {u:?}"
            );
            s = u.status;
        }
        // Writing the same status again changes nothing and starts nothing twice.
        let again = write(s, s);
        assert_eq!(again, StatusUpdate::keep(s));
    }

    #[test]
    fn zero_resets_from_any_status() {
        for old in [
            0,
            ACKNOWLEDGE,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
            FAILED,
        ] {
            let u = write(old, 0);
            assert!(u.reset, "{old:#x}");
            assert_eq!(u.status, 0);
            assert!(!u.start && !u.stop && u.features.is_none());
        }
    }

    #[test]
    fn features_the_device_does_not_offer_or_without_version_1_are_refused() {
        let base = ACKNOWLEDGE | DRIVER;
        for driver in [VIRTIO_F_VERSION_1 | (1 << 5), 1] {
            let u = write_status(base, base | FEATURES_OK, OFFERED, || Ok(driver));
            assert_eq!(u.status, base, "FEATURES_OK not kept for {driver:#x}");
            assert!(u.features.is_none());
            assert!(
                matches!(u.refused, Some(StatusRefusal::Features(_))),
                "{:?}",
                u.refused
            );
        }
        // Features that cannot be read (VDUSE's ioctl failed) are refused the same way.
        let u = write_status(base, base | FEATURES_OK, OFFERED, || Err("EIO".into()));
        assert_eq!(u.refused, Some(StatusRefusal::Features("EIO".into())));
        // Features are read only when FEATURES_OK is newly set.
        let u = write_status(
            base | FEATURES_OK,
            base | FEATURES_OK | DRIVER_OK,
            OFFERED,
            || panic!("read again"),
        );
        assert!(u.start);
    }

    #[test]
    fn driver_ok_without_features_ok_is_refused_and_starts_nothing() {
        let base = ACKNOWLEDGE | DRIVER;
        let u = write(base, base | DRIVER_OK);
        assert_eq!(u.status, base);
        assert!(!u.start);
        assert_eq!(u.refused, Some(StatusRefusal::DriverOkBeforeFeaturesOk));
        // Nor after the device refused the features.
        let u = write_status(base, base | FEATURES_OK | DRIVER_OK, OFFERED, || Ok(1));
        assert_eq!(u.status, base);
        assert!(!u.start);
        assert!(matches!(u.refused, Some(StatusRefusal::Features(_))));
    }

    #[test]
    fn a_driver_cannot_clear_bits_or_set_needs_reset() {
        let running = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        let u = write(running, ACKNOWLEDGE | DRIVER);
        assert_eq!(u.status, running, "cleared bits stay set");
        assert_eq!(
            u.refused,
            Some(StatusRefusal::Cleared(FEATURES_OK | DRIVER_OK))
        );
        assert!(!u.stop && !u.start);
        // DEVICE_NEEDS_RESET is the device's: a driver neither sets nor clears it.
        let u = write(ACKNOWLEDGE, ACKNOWLEDGE | DRIVER | DEVICE_NEEDS_RESET);
        assert_eq!(u.status, ACKNOWLEDGE | DRIVER);
        assert!(u.refused.is_none());
        let u = write(running | DEVICE_NEEDS_RESET, running);
        assert_eq!(u.status, running | DEVICE_NEEDS_RESET);
        assert!(u.refused.is_none());
    }

    #[test]
    fn failed_stops_a_running_device_and_a_failed_one_never_starts() {
        let running = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        let u = write(running, running | FAILED);
        assert!(u.stop && !u.start);
        assert_eq!(u.status, running | FAILED);
        let base = ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED;
        let u = write(base, base | DRIVER_OK);
        assert!(!u.start && !u.stop);
        assert!(!is_running(u.status));
    }

    /// vhost-user frontends (QEMU's `vhost_user_add_status`) set FEATURES_OK alone, then
    /// ACKNOWLEDGE | DRIVER | DRIVER_OK: the order of the first bits is not enforced.
    #[test]
    fn features_ok_before_acknowledge_is_accepted() {
        let u = write(0, FEATURES_OK);
        assert_eq!(u.status, FEATURES_OK);
        assert!(u.features.is_some() && u.refused.is_none());
        let u = write(FEATURES_OK, FEATURES_OK | ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert!(u.start && u.refused.is_none());
    }

    /// Every pair of (old, written) status bytes: the kept status never loses a bit the
    /// driver had without a reset, never gains NEEDS_RESET from the driver, never has
    /// DRIVER_OK without FEATURES_OK unless it had it before, and start/stop follow the
    /// running state exactly.
    #[test]
    fn every_transition_keeps_the_invariants() {
        for old in 0..=255u8 {
            for written in 0..=255u8 {
                let u = write(old, written);
                if written == 0 {
                    assert!(u.reset && u.status == 0);
                    continue;
                }
                let kept = old & !DEVICE_NEEDS_RESET & !(FEATURES_OK | DRIVER_OK);
                assert_eq!(u.status & kept, kept, "{old:#x} <- {written:#x}");
                assert_eq!(
                    u.status & DEVICE_NEEDS_RESET,
                    old & DEVICE_NEEDS_RESET,
                    "{old:#x} <- {written:#x}"
                );
                if u.status & DRIVER_OK != 0 {
                    assert_ne!(u.status & FEATURES_OK, 0, "{old:#x} <- {written:#x}");
                }
                assert_eq!(u.start, is_running(u.status) && !is_running(old));
                assert_eq!(u.stop, is_running(old) && !is_running(u.status));
            }
        }
    }
}
