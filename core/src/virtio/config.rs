//! Who owns a virtio device's configuration space, per device type (virtio 1.2 section 5,
//! each device's "Device configuration layout").
//!
//! Over vhost-user, the VMM's device model (QEMU's `vhost-user-*` devices) decides what
//! reaches the backend's `get_config`/`set_config`: only with the CONFIG protocol
//! feature, and per device type — QEMU forwards virtio-blk's `writeback` but keeps
//! virtio-scsi's `sense_size`/`cdb_size` itself, and virtio-fs's `tag` lives in QEMU
//! altogether. Over vfio-user (virtio-pci) and VDUSE, unidev *is* that device model, so
//! [`ConfigModel`] does the same:
//!
//! * A backend that serves its config (CONFIG; [`VirtioDevice::serves_config`]) is read
//!   for every field; a field the driver may write is forwarded to it only where the
//!   VMM's model would forward it ([`Access::Forward`]); one the model keeps
//!   ([`Access::Model`]) is stored here and read back from here.
//! * A backend that does not serve its config never sees config accesses: the model
//!   holds the whole space — read-only fields from [`ConfigValues`] (the daemon's
//!   `--config NAME=VALUE`) or the spec's defaults, writable fields as the driver wrote
//!   them.
//! * Types with no layout here: forwarded whole when the backend serves its config (as
//!   before), otherwise an empty config space.
//!
//! [`ConfigModelled`] puts the model in front of any [`VirtioDevice`]; `VirtioPci` and
//! the VDUSE transport use it.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

use super::device::{QueueConfig, QueueError, VirtioDevice};
use super::health::DeviceHealth;
use super::inflight::InflightRegion;
use super::spec;
use crate::sync::lock;

/// Who may write a config field, and where a write goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device's: the driver's writes are ignored.
    ReadOnly,
    /// The driver may write it; the device model keeps it (never the backend's).
    Model,
    /// The driver may write it; a backend that serves its config gets the write (as the
    /// VMM's model forwards it), otherwise the model keeps it.
    Forward,
}

/// What a field holds when nobody set it.
#[derive(Clone, Copy, Debug)]
enum Default {
    /// A number.
    Int(u64),
    /// The device's request queues: the queue count minus this many other queues.
    QueuesMinus(usize),
}

/// One field of a device type's configuration layout.
#[derive(Clone, Copy, Debug)]
pub struct Field {
    /// The spec's name (`sense_size`), also the `--config` key.
    pub name: &'static str,
    /// Offset in the device configuration structure.
    pub offset: u32,
    /// Size in bytes (little-endian integers, or a byte string for `tag`).
    pub size: u32,
    /// Who writes it.
    pub access: Access,
    default: Default,
    /// A byte string (NUL-padded), not an integer.
    text: bool,
}

const fn ro(name: &'static str, offset: u32, size: u32, default: u64) -> Field {
    Field {
        name,
        offset,
        size,
        access: Access::ReadOnly,
        default: Default::Int(default),
        text: false,
    }
}

const fn rw(name: &'static str, offset: u32, size: u32, access: Access, default: u64) -> Field {
    Field {
        name,
        offset,
        size,
        access,
        default: Default::Int(default),
        text: false,
    }
}

const fn queues(name: &'static str, offset: u32, size: u32, others: usize) -> Field {
    Field {
        name,
        offset,
        size,
        access: Access::ReadOnly,
        default: Default::QueuesMinus(others),
        text: false,
    }
}

/// A device type's configuration layout.
#[derive(Debug)]
pub struct Layout {
    /// The virtio device type.
    pub device_type: u32,
    /// Size of the structure in bytes.
    pub size: u32,
    /// Its fields.
    pub fields: &'static [Field],
}

/// virtio 1.2 5.2.4 `struct virtio_blk_config` (without the zoned part).
static BLK: Layout = Layout {
    device_type: spec::VIRTIO_ID_BLOCK,
    size: 72,
    fields: &[
        ro("capacity", 0, 8, 0),
        ro("size_max", 8, 4, 0),
        ro("seg_max", 12, 4, 0),
        ro("cylinders", 16, 2, 0),
        ro("heads", 18, 1, 0),
        ro("sectors", 19, 1, 0),
        ro("blk_size", 20, 4, 512),
        ro("physical_block_exp", 24, 1, 0),
        ro("alignment_offset", 25, 1, 0),
        ro("min_io_size", 26, 2, 0),
        ro("opt_io_size", 28, 4, 0),
        // QEMU's vhost-user-blk forwards a change of the cache mode to the backend.
        rw("writeback", 32, 1, Access::Forward, 0),
        queues("num_queues", 34, 2, 0),
        ro("max_discard_sectors", 36, 4, 0),
        ro("max_discard_seg", 40, 4, 0),
        ro("discard_sector_alignment", 44, 4, 0),
        ro("max_write_zeroes_sectors", 48, 4, 0),
        ro("max_write_zeroes_seg", 52, 4, 0),
        ro("write_zeroes_may_unmap", 56, 1, 0),
        ro("max_secure_erase_sectors", 60, 4, 0),
        ro("max_secure_erase_seg", 64, 4, 0),
        ro("secure_erase_sector_alignment", 68, 4, 0),
    ],
};

/// virtio 1.2 5.6.4 `struct virtio_scsi_config`; defaults as QEMU's and vhost-device's.
static SCSI: Layout = Layout {
    device_type: spec::VIRTIO_ID_SCSI,
    size: 36,
    fields: &[
        // Control and event queue first, then the request queues.
        queues("num_queues", 0, 4, 2),
        ro("seg_max", 4, 4, 126),
        ro("max_sectors", 8, 4, 0xffff),
        ro("cmd_per_lun", 12, 4, 128),
        ro("event_info_size", 16, 4, 16),
        // The driver may set these (5.6.4); QEMU keeps them, never the backend.
        rw("sense_size", 20, 4, Access::Model, 96),
        rw("cdb_size", 24, 4, Access::Model, 32),
        ro("max_channel", 28, 2, 0),
        ro("max_target", 30, 2, 255),
        ro("max_lun", 32, 4, 16383),
    ],
};

/// virtio 1.2 5.10.4 `struct virtio_vsock_config`.
static VSOCK: Layout = Layout {
    device_type: spec::VIRTIO_ID_VSOCK,
    size: 8,
    fields: &[ro("guest_cid", 0, 8, 3)],
};

/// virtio 1.2 5.11.4 `struct virtio_fs_config`.
static FS: Layout = Layout {
    device_type: spec::VIRTIO_ID_FS,
    size: 40,
    fields: &[
        Field {
            name: "tag",
            offset: 0,
            size: 36,
            access: Access::ReadOnly,
            default: Default::Int(0),
            text: true,
        },
        // One high-priority queue, then the request queues.
        queues("num_request_queues", 36, 4, 1),
    ],
};

/// virtio 1.2 5.3.4 `struct virtio_console_config`.
static CONSOLE: Layout = Layout {
    device_type: spec::VIRTIO_ID_CONSOLE,
    size: 12,
    fields: &[
        ro("cols", 0, 2, 0),
        ro("rows", 2, 2, 0),
        ro("max_nr_ports", 4, 4, 1),
        // Written by the driver to emit a character early; the backend gets it.
        rw("emerg_wr", 8, 4, Access::Forward, 0),
    ],
};

/// virtio 1.2 5.14.4 `struct virtio_snd_config` (jacks, streams, chmaps).
static SOUND: Layout = Layout {
    device_type: spec::VIRTIO_ID_SOUND,
    size: 12,
    fields: &[
        ro("jacks", 0, 4, 0),
        ro("streams", 4, 4, 0),
        ro("chmaps", 8, 4, 0),
    ],
};

/// virtio 1.2 5.18.4 `struct virtio_gpio_config`.
static GPIO: Layout = Layout {
    device_type: spec::VIRTIO_ID_GPIO,
    size: 8,
    fields: &[ro("ngpio", 0, 2, 0), ro("gpio_names_size", 4, 4, 0)],
};

/// Entropy (5.4), I2C (virtio 1.2 5.16) and others with no configuration space.
static RNG: Layout = Layout {
    device_type: spec::VIRTIO_ID_RNG,
    size: 0,
    fields: &[],
};

static I2C: Layout = Layout {
    device_type: spec::VIRTIO_ID_I2C_ADAPTER,
    size: 0,
    fields: &[],
};

/// The layout of `device_type`'s configuration space, if unidev models it.
pub fn layout(device_type: u32) -> Option<&'static Layout> {
    [
        &BLK, &SCSI, &VSOCK, &FS, &CONSOLE, &SOUND, &GPIO, &RNG, &I2C,
    ]
    .into_iter()
    .find(|l| l.device_type == device_type)
}

/// Values for a model's read-only fields (`--config NAME=VALUE`): integers in decimal or
/// `0x` hex, text for `tag`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigValues(BTreeMap<String, String>);

impl ConfigValues {
    /// No values: the spec's defaults.
    pub fn new() -> Self {
        ConfigValues::default()
    }

    /// Parse `NAME=VALUE`.
    pub fn set_pair(&mut self, pair: &str) -> Result<(), String> {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?}: a config value is NAME=VALUE"))?;
        if name.is_empty() {
            return Err(format!("{pair:?}: the field name is empty"));
        }
        self.0.insert(name.to_string(), value.to_string());
        Ok(())
    }

    /// Set `name` to `value`.
    pub fn set(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.insert(name.into(), value.into());
        self
    }

    /// Whether no value is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The values, by field name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// The device model's configuration space for one device.
#[derive(Debug)]
pub struct ConfigModel {
    layout: Option<&'static Layout>,
    backend_serves: bool,
    /// The model's bytes as set up (defaults and values), restored at a device reset.
    initial: Vec<u8>,
    /// The model's bytes now, and which of them the driver wrote (those override a
    /// backend's read).
    image: Mutex<(Vec<u8>, Vec<bool>)>,
}

fn parse_int(name: &str, text: &str, size: u32) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse::<u64>(),
    }
    .map_err(|e| format!("config {name}={text}: {e}"))?;
    if size < 8 && parsed >> (8 * size) != 0 {
        return Err(format!(
            "config {name}={text}: does not fit in {size} byte(s)"
        ));
    }
    Ok(parsed)
}

impl ConfigModel {
    /// The model for a device of `device_type` with `num_queues` queues, whose backend
    /// serves its own config space (`backend_serves`) or not, with `values` for its
    /// read-only fields. Unknown field names, values that do not fit and values for a
    /// space the backend serves are refused.
    pub fn new(
        device_type: u32,
        num_queues: usize,
        backend_serves: bool,
        values: &ConfigValues,
    ) -> Result<Self, String> {
        let layout = layout(device_type);
        let size = layout.map_or(0, |l| l.size as usize);
        let mut image = vec![0u8; size];
        let type_name = spec::device_type_name(device_type);
        for (name, _) in values.iter() {
            let known = layout.is_some_and(|l| l.fields.iter().any(|f| f.name == name));
            if !known {
                let names: Vec<_> = layout
                    .map(|l| l.fields.iter().map(|f| f.name).collect())
                    .unwrap_or_default();
                return Err(format!(
                    "config {name}: {type_name} (type {device_type}) has no such field{}",
                    if names.is_empty() {
                        String::new()
                    } else {
                        format!(" (it has {})", names.join(", "))
                    }
                ));
            }
            if backend_serves {
                return Err(format!(
                    "config {name}: the backend serves its own config space (it offers the \
                     vhost-user CONFIG protocol feature); the value would not be used"
                ));
            }
        }
        for f in layout.map_or(&[][..], |l| l.fields) {
            let at = f.offset as usize..(f.offset + f.size) as usize;
            let given = values.iter().find(|(n, _)| *n == f.name).map(|(_, v)| v);
            if f.text {
                let text = given.unwrap_or("").as_bytes();
                if text.len() > f.size as usize {
                    return Err(format!("config {}: at most {} bytes", f.name, f.size));
                }
                image[f.offset as usize..][..text.len()].copy_from_slice(text);
                continue;
            }
            let value = match given {
                Some(text) => parse_int(f.name, text, f.size)?,
                None => match f.default {
                    Default::Int(v) => v,
                    Default::QueuesMinus(n) => num_queues.saturating_sub(n) as u64,
                },
            };
            image[at].copy_from_slice(&value.to_le_bytes()[..f.size as usize]);
        }
        Ok(ConfigModel {
            layout,
            backend_serves,
            initial: image.clone(),
            image: Mutex::new((image, vec![false; size])),
        })
    }

    /// Read `data.len()` bytes at `offset`: from the backend (`device`) where it serves
    /// its config, except for bytes of fields the model keeps that the driver wrote;
    /// otherwise from the model. Zero past the end.
    pub fn read(&self, device: &dyn VirtioDevice, offset: u32, data: &mut [u8]) {
        let modelled = self.layout.is_some();
        if self.backend_serves {
            device.read_config(offset, data);
            if !modelled {
                return;
            }
        } else {
            data.fill(0);
        }
        let guard = lock(&self.image);
        let (image, written) = &*guard;
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            if at < image.len() && (!self.backend_serves || written[at]) {
                *b = image[at];
            }
        }
    }

    /// The driver writes `data` at `offset`: kept, forwarded or ignored field by field.
    pub fn write(&self, device: &dyn VirtioDevice, offset: u32, data: &[u8]) {
        let Some(layout) = self.layout else {
            if self.backend_serves {
                device.write_config(offset, data);
            }
            return;
        };
        let end = offset as usize + data.len();
        for f in layout.fields {
            let (start, stop) = (f.offset as usize, (f.offset + f.size) as usize);
            let (from, to) = (start.max(offset as usize), stop.min(end));
            if from >= to {
                continue;
            }
            let bytes = &data[from - offset as usize..to - offset as usize];
            match f.access {
                Access::ReadOnly => {
                    log::debug!("config {}: read-only, write ignored", f.name)
                }
                Access::Forward if self.backend_serves => device.write_config(from as u32, bytes),
                Access::Forward | Access::Model => {
                    let mut guard = lock(&self.image);
                    let (image, written) = &mut *guard;
                    image[from..to].copy_from_slice(bytes);
                    written[from..to].fill(true);
                }
            }
        }
    }
}

impl ConfigModel {
    /// Back to the values set up, forgetting what the driver wrote (a device reset).
    pub fn reset(&self) {
        let mut guard = lock(&self.image);
        guard.0.copy_from_slice(&self.initial);
        guard.1.fill(false);
    }
}

/// A [`VirtioDevice`] whose configuration space a [`ConfigModel`] serves.
pub struct ConfigModelled {
    inner: Arc<dyn VirtioDevice>,
    model: ConfigModel,
}

impl ConfigModelled {
    /// `device` with the model for its type and `values`.
    pub fn new(device: Arc<dyn VirtioDevice>, values: &ConfigValues) -> Result<Self, String> {
        let model = ConfigModel::new(
            device.device_type(),
            device.num_queues(),
            device.serves_config(),
            values,
        )?;
        Ok(ConfigModelled {
            inner: device,
            model,
        })
    }
}

impl VirtioDevice for ConfigModelled {
    fn device_type(&self) -> u32 {
        self.inner.device_type()
    }
    fn num_queues(&self) -> usize {
        self.inner.num_queues()
    }
    fn max_queue_size(&self) -> u16 {
        self.inner.max_queue_size()
    }
    fn features(&self) -> u64 {
        self.inner.features()
    }
    fn read_config(&self, offset: u32, data: &mut [u8]) {
        self.model.read(self.inner.as_ref(), offset, data)
    }
    fn write_config(&self, offset: u32, data: &[u8]) {
        self.model.write(self.inner.as_ref(), offset, data)
    }
    fn serves_config(&self) -> bool {
        true
    }
    fn set_driver_features(&self, features: u64) {
        self.inner.set_driver_features(features)
    }
    fn start_queue(&self, index: usize, config: QueueConfig) -> Result<(), QueueError> {
        self.inner.start_queue(index, config)
    }
    fn set_queue_call(&self, index: usize, call: Option<EventFd>) {
        self.inner.set_queue_call(index, call)
    }
    fn stop_queue(&self, index: usize) -> Option<u16> {
        self.inner.stop_queue(index)
    }
    fn reset(&self) {
        self.model.reset();
        self.inner.reset()
    }
    fn health(&self) -> Option<Arc<DeviceHealth>> {
        self.inner.health()
    }
    fn can_log_inflight(&self) -> bool {
        self.inner.can_log_inflight()
    }
    fn set_inflight(&self, region: Option<Arc<InflightRegion>>) -> io::Result<()> {
        self.inner.set_inflight(region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A device whose config reads return a pattern and whose writes are recorded.
    struct Backend {
        serves: bool,
        device_type: u32,
        writes: Mutex<Vec<(u32, Vec<u8>)>>,
        read: AtomicBool,
    }

    impl Backend {
        fn new(device_type: u32, serves: bool) -> Arc<Self> {
            Arc::new(Backend {
                serves,
                device_type,
                writes: Mutex::new(Vec::new()),
                read: AtomicBool::new(false),
            })
        }
    }

    impl VirtioDevice for Backend {
        fn device_type(&self) -> u32 {
            self.device_type
        }
        fn num_queues(&self) -> usize {
            3
        }
        fn max_queue_size(&self) -> u16 {
            128
        }
        fn features(&self) -> u64 {
            spec::VIRTIO_F_VERSION_1
        }
        fn read_config(&self, offset: u32, data: &mut [u8]) {
            self.read.store(true, Ordering::SeqCst);
            for (i, b) in data.iter_mut().enumerate() {
                *b = 0xa0u8.wrapping_add((offset as usize + i) as u8);
            }
        }
        fn write_config(&self, offset: u32, data: &[u8]) {
            lock(&self.writes).push((offset, data.to_vec()));
        }
        fn serves_config(&self) -> bool {
            self.serves
        }
        fn set_driver_features(&self, _: u64) {}
        fn start_queue(&self, _: usize, _: QueueConfig) -> Result<(), QueueError> {
            Ok(())
        }
        fn set_queue_call(&self, _: usize, _: Option<EventFd>) {}
        fn stop_queue(&self, _: usize) -> Option<u16> {
            None
        }
        fn reset(&self) {}
    }

    fn u32_at(d: &ConfigModelled, offset: u32) -> u32 {
        let mut b = [0; 4];
        d.read_config(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// vhost-device-scsi serves its config but panics in set_config: QEMU keeps
    /// sense_size and cdb_size, and so does the model.
    #[test]
    fn scsi_sense_and_cdb_sizes_are_kept_by_the_model_never_the_backend() {
        let backend = Backend::new(spec::VIRTIO_ID_SCSI, true);
        let d = ConfigModelled::new(backend.clone(), &ConfigValues::new()).unwrap();
        // Read from the backend until the driver writes.
        assert_eq!(u32_at(&d, 20), u32::from_le_bytes([0xb4, 0xb5, 0xb6, 0xb7]));
        d.write_config(20, &64u32.to_le_bytes());
        d.write_config(24, &16u32.to_le_bytes());
        assert_eq!((u32_at(&d, 20), u32_at(&d, 24)), (64, 16));
        // Read-only fields still come from the backend, and nothing was forwarded.
        assert_eq!(u32_at(&d, 0), u32::from_le_bytes([0xa0, 0xa1, 0xa2, 0xa3]));
        d.write_config(0, &9u32.to_le_bytes());
        assert!(lock(&backend.writes).is_empty());
        // A device reset forgets what the driver wrote.
        d.reset();
        assert_eq!(u32_at(&d, 20), u32::from_le_bytes([0xb4, 0xb5, 0xb6, 0xb7]));
    }

    #[test]
    fn a_backend_without_config_is_never_asked_and_the_model_has_the_spec_defaults() {
        let backend = Backend::new(spec::VIRTIO_ID_SCSI, false);
        let values = ConfigValues::new().set("max_sectors", "0x400");
        let d = ConfigModelled::new(backend.clone(), &values).unwrap();
        // 3 queues: control, event and one request queue.
        assert_eq!(u32_at(&d, 0), 1);
        assert_eq!(u32_at(&d, 8), 0x400);
        assert_eq!((u32_at(&d, 20), u32_at(&d, 24)), (96, 32));
        d.write_config(20, &64u32.to_le_bytes());
        assert_eq!(u32_at(&d, 20), 64);
        // Past the end: zero.
        assert_eq!(u32_at(&d, 36), 0);
        assert!(!backend.read.load(Ordering::SeqCst));
        assert!(lock(&backend.writes).is_empty());
    }

    #[test]
    fn blk_writeback_is_forwarded_to_a_backend_that_serves_config_only() {
        let serving = Backend::new(spec::VIRTIO_ID_BLOCK, true);
        let d = ConfigModelled::new(serving.clone(), &ConfigValues::new()).unwrap();
        d.write_config(32, &[1]);
        assert_eq!(lock(&serving.writes).as_slice(), &[(32, vec![1])]);
        let silent = Backend::new(spec::VIRTIO_ID_BLOCK, false);
        let values = ConfigValues::new().set("capacity", "2048");
        let d = ConfigModelled::new(silent.clone(), &values).unwrap();
        d.write_config(32, &[1]);
        let mut wb = [0];
        d.read_config(32, &mut wb);
        assert_eq!(wb, [1], "kept by the model");
        let mut cap = [0; 8];
        d.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        assert_eq!(u32_at(&d, 20), 512, "blk_size default");
        assert!(lock(&silent.writes).is_empty());
    }

    #[test]
    fn fs_tag_and_request_queues_come_from_values() {
        let backend = Backend::new(spec::VIRTIO_ID_FS, false);
        let values = ConfigValues::new().set("tag", "share0");
        let d = ConfigModelled::new(backend, &values).unwrap();
        let mut tag = [0xffu8; 36];
        d.read_config(0, &mut tag);
        assert_eq!(&tag[..7], b"share0\0");
        assert!(tag[6..].iter().all(|&b| b == 0));
        assert_eq!(u32_at(&d, 36), 2, "3 queues: hiprio + 2 request queues");
    }

    #[test]
    fn bad_values_are_refused_with_the_field_and_what_is_wrong() {
        let backend = Backend::new(spec::VIRTIO_ID_VSOCK, false);
        let cases = [
            (
                ConfigValues::new().set("cid", "3"),
                "has no such field (it has guest_cid)",
            ),
            (
                ConfigValues::new().set("guest_cid", "x"),
                "config guest_cid=x",
            ),
        ];
        for (values, want) in cases {
            let e = ConfigModelled::new(backend.clone(), &values).err().unwrap();
            assert!(e.contains(want), "{e}");
        }
        let fs = Backend::new(spec::VIRTIO_ID_FS, false);
        let long = "t".repeat(37);
        let e = ConfigModelled::new(fs, &ConfigValues::new().set("tag", long))
            .err()
            .unwrap();
        assert!(e.contains("at most 36 bytes"), "{e}");
        let scsi = Backend::new(spec::VIRTIO_ID_SCSI, false);
        let e = ConfigModelled::new(scsi, &ConfigValues::new().set("max_target", "65536"))
            .err()
            .unwrap();
        assert!(e.contains("does not fit in 2 byte(s)"), "{e}");
        let serving = Backend::new(spec::VIRTIO_ID_VSOCK, true);
        let e = ConfigModelled::new(serving, &ConfigValues::new().set("guest_cid", "5"))
            .err()
            .unwrap();
        assert!(e.contains("serves its own config space"), "{e}");
        let mut v = ConfigValues::new();
        assert!(v.set_pair("guest_cid").is_err());
        assert!(v.set_pair("guest_cid=4").is_ok());
    }

    #[test]
    fn unmodelled_types_forward_or_read_zero() {
        let serving = Backend::new(18, true); // input: its config depends on select
        let d = ConfigModelled::new(serving.clone(), &ConfigValues::new()).unwrap();
        d.write_config(0, &[1, 2]);
        assert_eq!(lock(&serving.writes).as_slice(), &[(0, vec![1, 2])]);
        assert_eq!(u32_at(&d, 4), u32::from_le_bytes([0xa4, 0xa5, 0xa6, 0xa7]));
        let silent = Backend::new(18, false);
        let d = ConfigModelled::new(silent.clone(), &ConfigValues::new()).unwrap();
        assert_eq!(u32_at(&d, 4), 0);
        assert!(!silent.read.load(Ordering::SeqCst));
    }
}
