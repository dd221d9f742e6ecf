//! Config space through the vhost-user proxy: which writes reach the backend.
//!
//! Regression: the Linux virtio-scsi driver writes `sense_size` and `cdb_size` at probe.
//! The proxy used to pass that on as SET_CONFIG, which upstream vhost-device-scsi
//! answers with `panic!` (QEMU's vhost-user-scsi never sends one), ending the daemon's
//! process before the guest ever saw a disk. Now the device model in front of every
//! device (`unidev_core::virtio::config`, as `VirtioPci` and VDUSE use it) keeps those
//! fields for virtio-scsi, as QEMU does; other types' writable fields still get
//! SET_CONFIG.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use unidev_compat::vhost_user_proxy::VhostUserProxy;
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::config::{ConfigModelled, ConfigValues};
use unidev_core::virtio::VirtioDevice;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_ID_SCSI: u32 = 8;
/// struct virtio_scsi_config's sense_size and cdb_size.
const SENSE_SIZE_AT: u32 = 20;
const CDB_SIZE_AT: u32 = 24;

/// A backend with the CONFIG protocol feature that records every SET_CONFIG it gets
/// (vhost-device-scsi panics instead) and serves a virtio-scsi-like config: num_queues 1,
/// sense_size 96, cdb_size 32.
struct ConfigBackend {
    config: Vec<u8>,
    set_config_calls: Mutex<Vec<(u32, Vec<u8>)>>,
}

impl ConfigBackend {
    fn new() -> Self {
        let mut config = vec![0u8; 36];
        config[0..4].copy_from_slice(&1u32.to_le_bytes());
        config[20..24].copy_from_slice(&96u32.to_le_bytes());
        config[24..28].copy_from_slice(&32u32.to_le_bytes());
        ConfigBackend {
            config,
            set_config_calls: Mutex::new(Vec::new()),
        }
    }
}

impl VhostUserBackend for ConfigBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        3
    }

    fn max_queue_size(&self) -> usize {
        128
    }

    fn features(&self) -> u64 {
        VERSION_1 | PROTOCOL_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut v: Vec<u8> = self
            .config
            .iter()
            .skip(offset as usize)
            .take(size as usize)
            .copied()
            .collect();
        v.resize(size as usize, 0);
        v
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        self.set_config_calls
            .lock()
            .unwrap()
            .push((offset, buf.to_vec()));
        Ok(())
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        _vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        Ok(())
    }
}

fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("unidev-compat-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Serve `backend` on `sock` in a thread. The thread is left behind: the daemon's drop
/// waits for its vring worker, which this backend (no exit event) never stops.
fn serve(sock: &Path, backend: Arc<ConfigBackend>) {
    let path = sock.to_path_buf();
    std::thread::spawn(move || {
        let mut daemon = VhostUserDaemon::new(
            "config".to_string(),
            backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .unwrap();
        let _ = daemon.serve(&path);
    });
    let end = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < end, "the backend's socket did not appear");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The proxy behind the device model, as a transport puts it.
fn modelled(proxy: &Arc<VhostUserProxy>) -> ConfigModelled {
    ConfigModelled::new(proxy.clone(), &ConfigValues::new()).unwrap()
}

fn read_u32(dev: &dyn VirtioDevice, at: u32) -> u32 {
    let mut b = [0u8; 4];
    dev.read_config(at, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn virtio_scsi_config_writes_are_kept_by_the_device_model_not_sent_to_the_backend() {
    let dir = test_dir("config-scsi");
    let sock = dir.join("b.sock");
    let backend = Arc::new(ConfigBackend::new());
    serve(&sock, backend.clone());
    let proxy =
        VhostUserProxy::connect(&sock, VIRTIO_ID_SCSI, 3, Arc::new(DmaSpace::new(16))).unwrap();
    assert!(proxy.serves_config(), "the backend offers CONFIG");
    let device = modelled(&proxy);

    assert_eq!(read_u32(&device, SENSE_SIZE_AT), 96, "the backend's value");
    // What Linux's virtio_scsi does at probe (with its own values, here different ones
    // so that where they come from shows), in one write of both fields.
    let mut both = [0u8; 8];
    both[..4].copy_from_slice(&64u32.to_le_bytes());
    both[4..].copy_from_slice(&16u32.to_le_bytes());
    device.write_config(SENSE_SIZE_AT, &both);
    // num_queues is read-only: dropped.
    device.write_config(0, &9u32.to_le_bytes());

    assert_eq!(
        read_u32(&device, SENSE_SIZE_AT),
        64,
        "sense_size reads back"
    );
    assert_eq!(read_u32(&device, CDB_SIZE_AT), 16, "cdb_size reads back");
    assert_eq!(read_u32(&device, 0), 1, "num_queues stays the backend's");
    let mut whole = [0u8; 36];
    device.read_config(0, &mut whole);
    assert_eq!(
        &whole[20..28],
        &both,
        "a read of the whole config has them too"
    );
    assert!(
        backend.set_config_calls.lock().unwrap().is_empty(),
        "no SET_CONFIG reached the backend"
    );
    assert!(proxy.is_alive());

    device.reset();
    assert_eq!(
        read_u32(&device, SENSE_SIZE_AT),
        96,
        "a reset brings the device's value back"
    );
    proxy.disconnect();
}

#[test]
fn other_types_still_pass_config_writes_to_the_backend() {
    let dir = test_dir("config-blk");
    let sock = dir.join("b.sock");
    let backend = Arc::new(ConfigBackend::new());
    serve(&sock, backend.clone());
    let proxy =
        VhostUserProxy::connect(&sock, VIRTIO_ID_BLOCK, 1, Arc::new(DmaSpace::new(16))).unwrap();
    let device = modelled(&proxy);
    // virtio-blk's writeback field.
    device.write_config(32, &[1]);
    // GET_CONFIG has a reply: once it is back, the backend has handled the SET_CONFIG
    // sent before it.
    assert_eq!(read_u32(&device, 0), 1);
    assert_eq!(
        *backend.set_config_calls.lock().unwrap(),
        vec![(32, vec![1])],
        "the write went to the backend"
    );
    proxy.disconnect();
}
