//! `unidev vdpa-info /dev/vhost-vdpa-N`: what a vhost-vdpa character device reports about
//! its device, through the kernel's vhost-vdpa ioctls (`include/uapi/linux/vhost.h`:
//! `VHOST_VDPA_GET_DEVICE_ID`, `VHOST_GET_FEATURES`, `VHOST_VDPA_GET_STATUS`,
//! `VHOST_VDPA_GET_VQS_COUNT`, `VHOST_VDPA_GET_VRING_NUM`, `VHOST_VDPA_GET_CONFIG_SIZE`,
//! `VHOST_VDPA_GET_CONFIG`), issued with the `vhost` crate's `VhostKernVdpa`.
//!
//! A diagnostic: it shows what a VMM would see of a device served over VDUSE and attached
//! with `--attach vhost-vdpa` (the end-to-end test checks it against what unidev created).
//! Output is one `key value` line per item, for scripts; the config space is given in hex
//! and, for virtio-blk, decoded (virtio 1.2 section 5.2.4: `capacity` always, `blk_size`
//! and `num_queues` when their feature bits are offered).
//!
//! Opening the device resets it (`vhost_vdpa_open`), and only one process may hold it open:
//! not for a device a VMM uses.

use std::mem::offset_of;
use std::path::Path;

use unidev_core::virtio::spec::VIRTIO_ID_BLOCK;
use vhost::vdpa::VhostVdpa;
use vhost::vhost_kern::vdpa::VhostKernVdpa;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::{virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_MQ};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// What the device reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdpaInfo {
    /// Virtio device id.
    pub device_id: u32,
    /// Device features (`VHOST_GET_FEATURES` on vhost-vdpa: what the device offers).
    pub features: u64,
    /// Device status.
    pub status: u8,
    /// Number of virtqueues.
    pub vqs: u32,
    /// Largest queue size.
    pub max_queue_size: u16,
    /// The config space.
    pub config: Vec<u8>,
}

fn errno(what: &str, e: vhost::Error) -> String {
    format!("{what}: {e}")
}

/// Ask the vhost-vdpa device at `path`.
pub fn query(path: &Path) -> Result<VdpaInfo, String> {
    let shown = path.display();
    let path_str = path
        .to_str()
        .ok_or_else(|| format!("{shown}: not a UTF-8 path"))?;
    // No guest memory is needed for queries; the handle wants an address space anyway.
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::default());
    let dev = VhostKernVdpa::new(path_str, mem).map_err(|e| errno(&format!("{shown}"), e))?;
    let device_id = dev
        .get_device_id()
        .map_err(|e| errno("VHOST_VDPA_GET_DEVICE_ID", e))?;
    let features = dev
        .get_features()
        .map_err(|e| errno("VHOST_GET_FEATURES", e))?;
    let status = dev
        .get_status()
        .map_err(|e| errno("VHOST_VDPA_GET_STATUS", e))?;
    let vqs = dev
        .get_vqs_count()
        .map_err(|e| errno("VHOST_VDPA_GET_VQS_COUNT", e))?;
    let max_queue_size = dev
        .get_vring_num()
        .map_err(|e| errno("VHOST_VDPA_GET_VRING_NUM", e))?;
    let size = dev
        .get_config_size()
        .map_err(|e| errno("VHOST_VDPA_GET_CONFIG_SIZE", e))?;
    let mut config = vec![0u8; size as usize];
    if size > 0 {
        dev.get_config(0, &mut config)
            .map_err(|e| errno("VHOST_VDPA_GET_CONFIG", e))?;
    }
    Ok(VdpaInfo {
        device_id,
        features,
        status,
        vqs,
        max_queue_size,
        config,
    })
}

fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The report: `key value` lines.
pub fn describe(info: &VdpaInfo) -> String {
    use unidev_transports::vduse::control::{hex, virtio_type_name};
    let mut out = vec![
        format!(
            "device_id {} ({})",
            info.device_id,
            virtio_type_name(info.device_id)
        ),
        format!("features {:#x}", info.features),
        format!("status {:#x}", info.status),
        format!("vqs {}", info.vqs),
        format!("max_queue_size {}", info.max_queue_size),
        format!("config_size {}", info.config.len()),
        format!("config {}", hex(&info.config)),
    ];
    if info.device_id == VIRTIO_ID_BLOCK {
        let c = &info.config;
        let has = |bit: u32| info.features & (1u64 << bit) != 0;
        // The config space is little-endian for virtio 1.x devices (VDUSE requires 1.x).
        if let Some(v) = le_u64(c, offset_of!(virtio_blk_config, capacity)) {
            out.push(format!("blk.capacity {v}"));
        }
        if has(VIRTIO_BLK_F_BLK_SIZE) {
            if let Some(v) = le_u32(c, offset_of!(virtio_blk_config, blk_size)) {
                out.push(format!("blk.blk_size {v}"));
            }
        }
        if has(VIRTIO_BLK_F_MQ) {
            if let Some(v) = le_u16(c, offset_of!(virtio_blk_config, num_queues)) {
                out.push(format!("blk.num_queues {v}"));
            }
        }
    }
    out.join("\n")
}

/// `unidev vdpa-info PATH`: print the report.
pub fn run(path: &Path) -> Result<(), String> {
    let info = query(path)?;
    println!("{}", describe(&info));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk_config(capacity: u64, blk_size: u32, num_queues: u16) -> Vec<u8> {
        let mut c = vec![0u8; std::mem::size_of::<virtio_blk_config>()];
        c[0..8].copy_from_slice(&capacity.to_le_bytes());
        c[20..24].copy_from_slice(&blk_size.to_le_bytes());
        c[34..36].copy_from_slice(&num_queues.to_le_bytes());
        c
    }

    #[test]
    fn a_block_device_is_decoded_by_its_feature_bits() {
        let info = VdpaInfo {
            device_id: 2,
            features: (1 << 33) | (1 << 32) | (1 << VIRTIO_BLK_F_MQ) | (1 << VIRTIO_BLK_F_BLK_SIZE),
            status: 0,
            vqs: 2,
            max_queue_size: 256,
            config: blk_config(65536, 4096, 2),
        };
        let text = describe(&info);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "device_id 2 (virtio-blk)");
        assert_eq!(lines[1], "features 0x300001040");
        assert!(lines.contains(&"vqs 2"), "{text}");
        assert!(lines.contains(&"max_queue_size 256"), "{text}");
        let size = format!("config_size {}", info.config.len());
        assert!(lines.contains(&size.as_str()), "{text}");
        let hex = format!(
            "config {}",
            unidev_transports::vduse::control::hex(&info.config)
        );
        assert!(lines.contains(&hex.as_str()), "{text}");
        assert!(lines.contains(&"blk.capacity 65536"), "{text}");
        assert!(lines.contains(&"blk.blk_size 4096"), "{text}");
        assert!(lines.contains(&"blk.num_queues 2"), "{text}");

        // Without MQ and BLK_SIZE those fields mean nothing and are not shown.
        let bare = VdpaInfo {
            features: 1 << 32,
            ..info
        };
        let text = describe(&bare);
        assert!(text.contains("blk.capacity 65536"), "{text}");
        assert!(!text.contains("blk.num_queues"), "{text}");
        assert!(!text.contains("blk.blk_size"), "{text}");
    }

    #[test]
    fn a_short_config_space_is_not_decoded_past_its_end() {
        let info = VdpaInfo {
            device_id: 2,
            features: 1 << VIRTIO_BLK_F_MQ,
            status: 0,
            vqs: 1,
            max_queue_size: 128,
            config: vec![1, 0, 0, 0],
        };
        let text = describe(&info);
        assert!(text.contains("config_size 4"), "{text}");
        assert!(!text.contains("blk."), "{text}");
        // Other device types get the raw config only.
        let net = VdpaInfo {
            device_id: 1,
            config: blk_config(1, 1, 1),
            ..info
        };
        let text = describe(&net);
        assert!(text.starts_with("device_id 1 (virtio-net)"), "{text}");
        assert!(!text.contains("blk."), "{text}");
    }

    #[test]
    fn a_missing_device_is_an_error_naming_it() {
        let err = query(Path::new("/nonexistent/vhost-vdpa-9")).unwrap_err();
        assert!(err.contains("/nonexistent/vhost-vdpa-9"), "{err}");
    }
}
