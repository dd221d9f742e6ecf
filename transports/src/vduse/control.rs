//! The VDUSE control device (`/dev/vduse/control`, kernel
//! `Documentation/userspace-api/vduse.rst`, "Create/Destroy VDUSE devices"): API version
//! negotiation, creating a device from a core [`VirtioDevice`]'s description, and
//! destroying it by name. Also the errors of the whole VDUSE transport, worded for the
//! person starting the daemon (which kernel modules to load, which privilege is missing).
//!
//! [`VirtioDevice`]: unidev_core::virtio::VirtioDevice

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use log::{debug, info, warn};
use unidev_core::limits::Identity;
use unidev_core::virtio::VirtioDevice;
use vm_memory::ByteValued;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref};

use super::uapi::{
    VduseDevConfig, VduseName, VduseVqConfig, VDUSE_API_VERSION, VDUSE_CREATE_DEV,
    VDUSE_DESTROY_DEV, VDUSE_GET_API_VERSION, VDUSE_NAME_MAX, VDUSE_SET_API_VERSION,
    VDUSE_VQ_SETUP,
};

/// Where the kernel puts the control device.
pub const DEFAULT_CONTROL_PATH: &str = "/dev/vduse/control";

pub use unidev_core::virtio::spec::{
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK,
    VIRTIO_ID_NET,
};
// VIRTIO_F_ACCESS_PLATFORM: VDUSE refuses devices without it (`features_is_valid` in
// `drivers/vdpa/vdpa_user/vduse_dev.c`); VIRTIO_F_RING_PACKED: this transport serves split
// rings only.

/// `VIRTIO_BLK_F_CONFIG_WCE`: VDUSE's config space is read-only, so the kernel refuses it.
pub const VIRTIO_BLK_F_CONFIG_WCE: u64 = 1 << virtio_bindings::virtio_blk::VIRTIO_BLK_F_CONFIG_WCE;
/// `VIRTIO_NET_F_CTRL_VQ`: refused by the kernel for VDUSE net devices.
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;

/// Ring alignment given to the kernel (`vq_align`; at most the page size).
pub const VQ_ALIGN: u32 = 4096;

/// What went wrong setting up or serving a VDUSE device.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VduseError {
    /// The control device does not exist: the modules are not loaded. When the process
    /// is not root, the message adds that VDUSE needs root as well (loading the modules
    /// alone would not do).
    #[error("{}", not_available(path, Identity::current().as_ref()))]
    NotAvailable {
        /// The control path tried.
        path: PathBuf,
    },
    /// Opening a VDUSE file or an ioctl on it was refused for lack of privilege. The
    /// message says who the process runs as.
    #[error("{}", permission_denied(what, Identity::current().as_ref()))]
    PermissionDenied {
        /// What was attempted.
        what: String,
    },
    /// The kernel's VDUSE does not accept this device type.
    #[error(
        "virtio device type {device_type} ({type_name}) cannot be served over VDUSE: \
         Linux 6.12 accepts only virtio-blk (2) and virtio-net (1)"
    )]
    UnsupportedDeviceType {
        /// The virtio device id.
        device_type: u32,
        /// A readable name for it.
        type_name: &'static str,
    },
    /// A bad device name.
    #[error("invalid VDUSE device name {name:?}: {why}")]
    InvalidName {
        /// The name.
        name: String,
        /// Why.
        why: &'static str,
    },
    /// A device of this name exists and is attached to the vDPA bus, but the kernel has
    /// marked it broken (a request of the kernel went unanswered for `msg_timeout`
    /// seconds, typically while no daemon served it): it cannot be taken over, only
    /// removed from the vDPA bus and destroyed.
    #[error(
        "VDUSE device {name} is left over from a daemon that died, and the kernel marked it \
         broken (a request went unanswered for msg_timeout seconds): remove it from the \
         vDPA bus (`vdpa dev del {name}`) and start again"
    )]
    Broken {
        /// The device name.
        name: String,
    },
    /// A device of this name exists and another process serves it.
    #[error(
        "VDUSE device {name} exists and another process serves it (/dev/vduse/{name} is \
         open): stop that daemon first"
    )]
    InUse {
        /// The device name.
        name: String,
    },
    /// A left-over device cannot be taken over because it is not the device this daemon
    /// would create.
    #[error("VDUSE device {name} is left over from a daemon that died and differs: {why}")]
    Mismatch {
        /// The device name.
        name: String,
        /// How it differs.
        why: String,
    },
    /// The kernel refused API version 0.
    #[error(
        "the kernel (VDUSE API version {0}) refused API version 0, which this transport implements"
    )]
    ApiVersion(u64),
    /// Any other failing system call.
    #[error("{what}: {source}")]
    Os {
        /// What was attempted.
        what: String,
        /// The OS error.
        source: io::Error,
    },
}

/// What the kernel requires (Linux 6.12's `vduse.ko` calls `capable()` only for
/// `CAP_NET_ADMIN`, on creating a virtio-net device; the rest is file permissions).
const NEEDS_ROOT: &str = "VDUSE needs root: the kernel makes /dev/vduse/control and \
     /dev/vduse/NAME root-only (mode 0600), and creating a virtio-net device or attaching \
     to the vDPA bus (--attach, `vdpa dev add`) needs CAP_NET_ADMIN";

/// The way out for someone who does not want to run unidev as root.
const ONLY_VDUSE: &str = "Run `unidev serve --transport vduse` as root (e.g. with sudo); \
     the vfio-user and vhost-user transports need no privileges";

/// The message of [`VduseError::NotAvailable`] for a process running as `who` (None:
/// unknown): the modules to load, and for anyone but root that root is needed too.
fn not_available(path: &Path, who: Option<&Identity>) -> String {
    let mut text = format!(
        "{} does not exist: VDUSE is not available (the kernel module `vduse` is not loaded, \
         or /dev/vduse is not visible here). Load the kernel modules: `modprobe vduse` \
         (pulls in `vdpa`), and the vDPA bus driver the device should bind to: `modprobe \
         virtio_vdpa` (the device appears in this kernel) or `modprobe vhost_vdpa` (for a VMM \
         through /dev/vhost-vdpa-N)",
        path.display()
    );
    if let Some(who) = who.filter(|id| id.euid != 0) {
        text.push_str(&format!(
            ". Besides, {NEEDS_ROOT}; this process runs as {who}. {ONLY_VDUSE}"
        ));
    }
    text
}

/// The message of [`VduseError::PermissionDenied`] for a process running as `who`.
fn permission_denied(what: &str, who: Option<&Identity>) -> String {
    let who = who.map_or_else(|| "an unknown user".to_string(), |id| id.to_string());
    format!("{what}: permission denied: {NEEDS_ROOT}; this process runs as {who}. {ONLY_VDUSE}")
}

impl VduseError {
    /// Turn an OS error of `what` into the most helpful variant.
    pub fn from_os(what: impl Into<String>, source: io::Error) -> Self {
        let what = what.into();
        match source.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => VduseError::PermissionDenied { what },
            _ => VduseError::Os { what, source },
        }
    }
}

/// A readable name of a virtio device type, for messages.
pub fn virtio_type_name(device_type: u32) -> &'static str {
    unidev_core::virtio::spec::device_type_name(device_type)
}

/// Check that the kernel's VDUSE takes `device_type` (6.12: `allowed_device_id[]` holds
/// block and net; the vduse management device's id table lists the same two).
pub fn check_device_type(device_type: u32) -> Result<(), VduseError> {
    match device_type {
        VIRTIO_ID_BLOCK | VIRTIO_ID_NET => Ok(()),
        t => Err(VduseError::UnsupportedDeviceType {
            device_type: t,
            type_name: virtio_type_name(t),
        }),
    }
}

/// Check a device name: non-empty, shorter than `VDUSE_NAME_MAX`, and usable as a file
/// name under `/dev/vduse/` and a vDPA device name.
pub fn check_name(name: &str) -> Result<(), VduseError> {
    let bad = |why| {
        Err(VduseError::InvalidName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() >= VDUSE_NAME_MAX {
        return bad("longer than 255 bytes");
    }
    if name == "control" {
        return bad("\"control\" is the control device");
    }
    if name == "." || name == ".." {
        return bad("not a file name");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return bad("only letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

fn name_buffer(name: &str) -> VduseName {
    let mut buf = [0u8; VDUSE_NAME_MAX];
    let n = name.len().min(VDUSE_NAME_MAX - 1);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    buf
}

/// Size of the config space VDUSE gets for a device type (the size of the type's config
/// structure in the virtio headers the backends use).
pub fn config_size(device_type: u32) -> u32 {
    use virtio_bindings::virtio_blk::virtio_blk_config;
    use virtio_bindings::virtio_net::virtio_net_config;
    match device_type {
        VIRTIO_ID_BLOCK => std::mem::size_of::<virtio_blk_config>() as u32,
        VIRTIO_ID_NET => std::mem::size_of::<virtio_net_config>() as u32,
        _ => 0,
    }
}

/// The feature bits a VDUSE device of `device_type` offers for `device_features`: plus
/// VERSION_1 and ACCESS_PLATFORM (required), minus what VDUSE or this transport cannot
/// serve (packed rings; a writable config space).
pub fn offered_features(device_type: u32, device_features: u64) -> u64 {
    let mut f = device_features | VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM;
    f &= !VIRTIO_F_RING_PACKED;
    match device_type {
        VIRTIO_ID_BLOCK => f &= !VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_ID_NET => f &= !VIRTIO_NET_F_CTRL_VQ,
        _ => {}
    }
    f
}

/// What `VDUSE_CREATE_DEV` and `VDUSE_VQ_SETUP` are given for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Device name (`/dev/vduse/NAME`, and the vDPA device's name).
    pub name: String,
    /// Virtio device id.
    pub device_type: u32,
    /// Offered features (see [`offered_features`]).
    pub features: u64,
    /// Number of virtqueues.
    pub num_queues: u32,
    /// Largest queue size.
    pub max_queue_size: u16,
    /// The config space.
    pub config: Vec<u8>,
}

impl DeviceSpec {
    /// Describe `device` as VDUSE device `name`. Fails for device types VDUSE refuses.
    pub fn for_device(name: &str, device: &dyn VirtioDevice) -> Result<Self, VduseError> {
        check_name(name)?;
        let device_type = device.device_type();
        check_device_type(device_type)?;
        let mut config = vec![0u8; config_size(device_type) as usize];
        device.read_config(0, &mut config);
        Ok(DeviceSpec {
            name: name.to_string(),
            device_type,
            features: offered_features(device_type, device.features()),
            num_queues: u32::try_from(device.num_queues()).unwrap_or(u32::MAX),
            max_queue_size: device.max_queue_size(),
            config,
        })
    }

    /// The `VDUSE_CREATE_DEV` argument: a `vduse_dev_config` followed by the config space.
    pub fn create_dev_buffer(&self) -> Vec<u8> {
        let head = VduseDevConfig {
            name: name_buffer(&self.name),
            vendor_id: 0,
            device_id: self.device_type,
            features: self.features,
            vq_num: self.num_queues,
            vq_align: VQ_ALIGN,
            config_size: self.config.len() as u32,
            ..Default::default()
        };
        let mut buf = head.as_slice().to_vec();
        buf.extend_from_slice(&self.config);
        buf
    }
}

/// Lower-case hex of `bytes`, for log lines (the config space as the kernel was given it).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An open `/dev/vduse/control`.
#[derive(Debug)]
pub struct VduseControl {
    file: File,
    path: PathBuf,
}

fn open_rw(path: &Path, what: &str) -> Result<File, VduseError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound && what == "control" {
                VduseError::NotAvailable {
                    path: path.to_path_buf(),
                }
            } else {
                VduseError::from_os(format!("cannot open {}", path.display()), e)
            }
        })
}

fn check(ret: i32, what: impl FnOnce() -> String) -> Result<i32, VduseError> {
    if ret < 0 {
        Err(VduseError::from_os(what(), io::Error::last_os_error()))
    } else {
        Ok(ret)
    }
}

impl VduseControl {
    /// Open the control device at `path` and agree on API version 0.
    pub fn open(path: &Path) -> Result<Self, VduseError> {
        let file = open_rw(path, "control")?;
        let ctl = VduseControl {
            file,
            path: path.to_path_buf(),
        };
        let mut version: u64 = 0;
        // SAFETY: VDUSE_GET_API_VERSION writes one u64 into `version`, which outlives the
        // call; the fd is valid.
        let r = unsafe { ioctl_with_mut_ref(&ctl.file, VDUSE_GET_API_VERSION(), &mut version) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOTTY) || e.raw_os_error() == Some(libc::EINVAL) {
                return Err(VduseError::Os {
                    what: format!("{} is not a VDUSE control device", path.display()),
                    source: e,
                });
            }
            return Err(VduseError::from_os(
                format!("VDUSE_GET_API_VERSION on {}", path.display()),
                e,
            ));
        }
        // Every kernel so far speaks version 0; a later one still accepts it when asked.
        debug!("{}: kernel VDUSE API version {version}", path.display());
        let want = VDUSE_API_VERSION;
        // SAFETY: VDUSE_SET_API_VERSION reads one u64 from `want`; the fd is valid.
        let r = unsafe { ioctl_with_ref(&ctl.file, VDUSE_SET_API_VERSION(), &want) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Err(VduseError::ApiVersion(version));
            }
            return Err(VduseError::from_os("VDUSE_SET_API_VERSION 0", e));
        }
        Ok(ctl)
    }

    /// The control device's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Create the device and set up each of its queues with the maximum size. The device
    /// node `/dev/vduse/NAME` appears afterwards (devtmpfs/udev).
    pub fn create(&self, spec: &DeviceSpec) -> Result<(), VduseError> {
        let buf = spec.create_dev_buffer();
        // SAFETY: VDUSE_CREATE_DEV reads a vduse_dev_config followed by `config_size`
        // bytes; `buf` holds exactly that and outlives the call.
        let r = unsafe { ioctl_with_ptr(&self.file, VDUSE_CREATE_DEV(), buf.as_ptr()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            let what = format!("VDUSE_CREATE_DEV {}", spec.name);
            return Err(match e.raw_os_error() {
                Some(libc::EEXIST) => VduseError::Os {
                    what: format!(
                        "{what}: a VDUSE device with this name already exists (a daemon \
                         that did not stop cleanly?)"
                    ),
                    source: e,
                },
                Some(libc::EINVAL) => VduseError::Os {
                    what: format!(
                        "{what}: the kernel refused the device (type {}, features {:#x}, \
                         {} queues, config {} bytes)",
                        spec.device_type,
                        spec.features,
                        spec.num_queues,
                        spec.config.len()
                    ),
                    source: e,
                },
                _ => VduseError::from_os(what, e),
            });
        }
        info!(
            "VDUSE device {} created (type {}, features {:#x}, {} queue(s) of up to {}, \
             config {})",
            spec.name,
            spec.device_type,
            spec.features,
            spec.num_queues,
            spec.max_queue_size,
            hex(&spec.config)
        );
        Ok(())
    }

    /// Destroy device `name`. Fails with EBUSY while it is attached to the vDPA bus or its
    /// `/dev/vduse/NAME` is open.
    pub fn destroy(&self, name: &str) -> Result<(), VduseError> {
        let buf = name_buffer(name);
        // SAFETY: VDUSE_DESTROY_DEV reads VDUSE_NAME_MAX bytes from `buf`.
        let r = unsafe { ioctl_with_ref(&self.file, VDUSE_DESTROY_DEV(), &buf) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                return Err(VduseError::Os {
                    what: format!(
                        "VDUSE_DESTROY_DEV {name}: busy (still attached to the vDPA bus — \
                         `vdpa dev del {name}` — or /dev/vduse/{name} still open)"
                    ),
                    source: e,
                });
            }
            return Err(VduseError::from_os(format!("VDUSE_DESTROY_DEV {name}"), e));
        }
        info!("VDUSE device {name} destroyed");
        Ok(())
    }
}

/// Set up every queue of a freshly created device (`VDUSE_VQ_SETUP`): the kernel refuses
/// to attach a device to the vDPA bus until each queue has a maximum size.
pub fn setup_queues(dev: &File, spec: &DeviceSpec) -> Result<(), VduseError> {
    for index in 0..spec.num_queues {
        let cfg = VduseVqConfig {
            index,
            max_size: spec.max_queue_size,
            ..Default::default()
        };
        // SAFETY: VDUSE_VQ_SETUP reads one vduse_vq_config from `cfg`.
        let r = unsafe { ioctl_with_ref(dev, VDUSE_VQ_SETUP(), &cfg) };
        check(r, || format!("VDUSE_VQ_SETUP {} queue {index}", spec.name))?;
    }
    Ok(())
}

/// Open `/dev/vduse/NAME` (under `dev_dir`), waiting briefly for the node to appear.
pub fn open_device_node(dev_dir: &Path, name: &str) -> Result<File, VduseError> {
    let path = dev_dir.join(name);
    let mut waited = 0;
    loop {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && waited < 50 => {
                // devtmpfs creates the node synchronously; udev may rename or chmod it.
                std::thread::sleep(std::time::Duration::from_millis(20));
                waited += 1;
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    warn!("{} is open elsewhere", path.display());
                }
                return Err(VduseError::from_os(
                    format!("cannot open {}", path.display()),
                    e,
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use unidev_core::virtio::{QueueConfig, QueueError};

    struct FakeDevice(u32);
    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            self.0
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn max_queue_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            VIRTIO_F_RING_PACKED | VIRTIO_BLK_F_CONFIG_WCE | 1 << 9
        }
        fn read_config(&self, offset: u32, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as usize + i) as u8;
            }
        }
        fn write_config(&self, _: u32, _: &[u8]) {}
        fn set_driver_features(&self, _: u64) {}
        fn start_queue(&self, _: usize, _: QueueConfig) -> Result<(), QueueError> {
            Ok(())
        }
        fn set_queue_call(&self, _: usize, _: Option<vmm_sys_util::eventfd::EventFd>) {}
        fn stop_queue(&self, _: usize) -> Option<u16> {
            None
        }
        fn reset(&self) {}
    }

    #[test]
    fn missing_control_device_names_the_modules() {
        let dir = std::env::temp_dir().join(format!("unidev-vduse-none-{}", std::process::id()));
        let err = VduseControl::open(&dir.join("control")).unwrap_err();
        assert!(matches!(err, VduseError::NotAvailable { .. }), "{err:?}");
        let msg = err.to_string();
        for module in ["modprobe vduse", "vdpa", "virtio_vdpa", "vhost_vdpa"] {
            assert!(msg.contains(module), "{msg:?} should mention {module}");
        }
        // Root is told only about the modules; anyone else also that root is needed.
        let path = Path::new("/dev/vduse/control");
        let id = |uid| Identity {
            uid,
            euid: uid,
            cap_eff: 0,
        };
        let root = not_available(path, Some(&id(0)));
        assert!(!root.contains("needs root"), "{root}");
        assert_eq!(not_available(path, None), root);
        let user = not_available(path, Some(&id(1500)));
        assert!(user.starts_with(&root), "{user}");
        assert!(
            user.contains(
                "Besides, VDUSE needs root: the kernel makes /dev/vduse/control and \
                 /dev/vduse/NAME root-only (mode 0600)"
            ) && user.contains("this process runs as uid 1500 (effective 1500), no capabilities"),
            "{user}"
        );
    }

    #[test]
    fn a_plain_file_is_not_a_control_device() {
        let path = std::env::temp_dir().join(format!("unidev-vduse-plain-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let err = VduseControl::open(&path).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(
            err.to_string().contains("is not a VDUSE control device"),
            "{err}"
        );
    }

    #[test]
    fn permission_errors_say_root_is_needed() {
        let e = VduseError::from_os("open", io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(e, VduseError::PermissionDenied { .. }));
        let text = e.to_string();
        for needle in [
            "open: permission denied: VDUSE needs root",
            "root-only (mode 0600)",
            "CAP_NET_ADMIN",
            "this process runs as uid ",
            "need no privileges",
        ] {
            assert!(text.contains(needle), "{needle:?} in {text}");
        }
        assert!(!text.contains("modprobe"), "{text}");
        let e = VduseError::from_os("ioctl", io::Error::from_raw_os_error(libc::EPERM));
        assert!(e.to_string().contains("root"), "{e}");
        let e = VduseError::from_os("ioctl", io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(e, VduseError::Os { .. }));
    }

    #[test]
    fn only_block_and_net_are_accepted() {
        assert!(check_device_type(VIRTIO_ID_BLOCK).is_ok());
        assert!(check_device_type(VIRTIO_ID_NET).is_ok());
        let e = check_device_type(4).unwrap_err();
        assert!(e.to_string().contains("virtio-rng"), "{e}");
        assert!(e.to_string().contains("virtio-blk (2)"), "{e}");
        let e = DeviceSpec::for_device("rng0", &FakeDevice(4)).unwrap_err();
        assert!(matches!(
            e,
            VduseError::UnsupportedDeviceType { device_type: 4, .. }
        ));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("blk0").is_ok());
        assert!(check_name("my-disk_1.a").is_ok());
        for bad in ["", "control", "..", "a/b", "sp ace", &"x".repeat(256)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn spec_and_create_buffer() {
        let dev: Arc<dyn VirtioDevice> = Arc::new(FakeDevice(VIRTIO_ID_BLOCK));
        let spec = DeviceSpec::for_device("blk0", dev.as_ref()).unwrap();
        assert_eq!(spec.device_type, 2);
        assert_eq!(spec.num_queues, 2);
        assert_eq!(spec.max_queue_size, 256);
        // Required bits added, packed rings and CONFIG_WCE removed, the rest kept.
        assert_eq!(
            spec.features,
            VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM | 1 << 9
        );
        assert_eq!(spec.config.len(), config_size(VIRTIO_ID_BLOCK) as usize);
        assert!(
            spec.config.len() >= 60,
            "virtio_blk_config is at least 60 bytes"
        );
        assert_eq!(spec.config[5], 5);

        let buf = spec.create_dev_buffer();
        assert_eq!(buf.len(), 336 + spec.config.len());
        assert_eq!(&buf[..5], b"blk0\0");
        assert_eq!(&buf[256..260], &0u32.to_ne_bytes()); // vendor
        assert_eq!(&buf[260..264], &2u32.to_ne_bytes()); // device id
        assert_eq!(&buf[264..272], &spec.features.to_ne_bytes());
        assert_eq!(&buf[272..276], &2u32.to_ne_bytes()); // vq_num
        assert_eq!(&buf[276..280], &VQ_ALIGN.to_ne_bytes());
        assert!(buf[280..332].iter().all(|&b| b == 0), "reserved zero");
        assert_eq!(&buf[332..336], &(spec.config.len() as u32).to_ne_bytes());
        assert_eq!(&buf[336..], &spec.config[..]);
    }

    #[test]
    fn net_drops_the_control_queue_bit() {
        let f = offered_features(VIRTIO_ID_NET, VIRTIO_NET_F_CTRL_VQ | 1);
        assert_eq!(f & VIRTIO_NET_F_CTRL_VQ, 0);
        assert_ne!(f & 1, 0);
    }
}
