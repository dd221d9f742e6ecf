//! VhostUserProxy end to end: vhost-user-backend's stock `VhostUserDaemon` serving
//! unidev's virtio-blk backend on a socket, put behind vfio-user as
//! `VirtioPci(VhostUserProxy)`, driven by unidev's virtio-pci driver library.
//!
//! The daemon runs in this process (data flow) or in a child process (this test binary
//! re-executed, so that it can really die and be restarted).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use unidev_backends::virtio_blk::{BlkOptions, VirtioBlk, VIRTIO_ID_BLOCK};
use unidev_compat::vhost_user_proxy::{ProxyOptions, VhostUserProxy};
use unidev_core::dispatch::StopHandle;
use unidev_core::memory::{DmaSpace, MapRequest, Prot};
use unidev_core::virtio::{QueueConfig, QueueError, VirtioDevice, VirtioPci, VirtioPciOptions};
use unidev_testkit::{DriverOptions, VirtioBlkRequest, VirtioPciDriver};
use unidev_transports::listener;
use unidev_transports::vfio_user::{ServerConfig, VfioUserClient, VfioUserServer};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const IMAGE: usize = 1 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);
const VERSION_1: u64 = 1 << 32;
const BLK_FEATURES: u64 = (1 << 9) | (1 << 13) | (1 << 14);
const EVENT_IDX: u64 = 1 << 29;
const ENV_SOCK: &str = "UNIDEV_PROXY_TEST_DAEMON_SOCK";
const ENV_IMAGE: &str = "UNIDEV_PROXY_TEST_DAEMON_IMAGE";

fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("unidev-compat-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add((i / 3) as u8))
        .collect()
}

fn blk(image: &Path) -> Arc<VirtioBlk> {
    Arc::new(
        VirtioBlk::new(BlkOptions {
            path: image.to_path_buf(),
            ..BlkOptions::default()
        })
        .unwrap(),
    )
}

/// Serve the stock daemon on `sock` until its frontend leaves.
fn run_stock_daemon(sock: &Path, image: &Path) {
    let mut daemon = VhostUserDaemon::new(
        "stock".to_string(),
        blk(image),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    daemon.serve(sock).unwrap();
}

/// Not a test of its own: the body of the child process (see `spawn_daemon`).
#[test]
fn stock_daemon_child() {
    let (Some(sock), Some(image)) = (std::env::var_os(ENV_SOCK), std::env::var_os(ENV_IMAGE))
    else {
        return;
    };
    run_stock_daemon(Path::new(&sock), Path::new(&image));
    std::process::exit(0);
}

/// The stock daemon in a child process (this test binary, running `stock_daemon_child`).
fn spawn_daemon(sock: &Path, image: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "stock_daemon_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_SOCK, sock)
        .env(ENV_IMAGE, image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the stock daemon's socket", || sock.exists());
    child
}

/// `VirtioPci(proxy)` served over vfio-user on `dir/dev.sock`.
struct Served {
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    sock: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn serve_proxy(proxy: Arc<VhostUserProxy>, dma: Arc<DmaSpace>, dir: &Path) -> Served {
    let pci = VirtioPci::new("proxy", proxy, dma, VirtioPciOptions::default()).unwrap();
    let sock = dir.join("dev.sock");
    let server = VfioUserServer::new(
        "proxy",
        listener::bind(&sock, 0o600).unwrap(),
        Arc::new(Mutex::new(pci)),
        ServerConfig::default(),
    )
    .unwrap();
    let stop = server.stop_handle();
    let thread = Some(std::thread::spawn(move || server.run().unwrap()));
    Served { stop, thread, sock }
}

fn driver(s: &Served, event_idx: bool) -> VirtioPciDriver {
    let mut d = VirtioPciDriver::new(
        VfioUserClient::connect(&s.sock).unwrap(),
        DriverOptions {
            features: VERSION_1 | BLK_FEATURES | if event_idx { EVENT_IDX } else { 0 },
            num_queues: Some(1),
            queue_size: 64,
            memory_size: 16 << 20,
            ..DriverOptions::default()
        },
    )
    .unwrap();
    d.init().unwrap();
    d
}

fn image_at(image: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(image).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// Write then read through the whole chain; check the image file and the data read.
fn write_read_check(d: &mut VirtioPciDriver, image: &Path, sector: u64, seed: u8, len: usize) {
    let data = pattern(seed, len);
    let c = d
        .blk_request(0, &VirtioBlkRequest::write(sector, &data), TIMEOUT)
        .unwrap();
    assert_eq!(c.status, 0, "write status");
    assert_eq!(
        image_at(image, sector * 512, len),
        data,
        "image after write"
    );
    let c = d
        .blk_request(0, &VirtioBlkRequest::read(sector, len as u32), TIMEOUT)
        .unwrap();
    assert_eq!(c.status, 0, "read status");
    assert_eq!(c.data, data, "data read back");
}

#[test]
fn data_flows_through_the_stock_daemon_in_process() {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = test_dir("inproc");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0x5au8; IMAGE]).unwrap();
    let backend_sock = dir.join("backend.sock");
    let (s2, i2) = (backend_sock.clone(), image.clone());
    let daemon = std::thread::spawn(move || run_stock_daemon(&s2, &i2));
    wait_for("the stock daemon's socket", || backend_sock.exists());

    let dma = Arc::new(DmaSpace::default());
    let proxy = VhostUserProxy::connect(&backend_sock, VIRTIO_ID_BLOCK, 1, dma.clone()).unwrap();
    assert!(proxy.is_alive());
    assert_eq!(proxy.features() & (1 << 30), 0, "protocol bit hidden");
    assert_ne!(proxy.features() & BLK_FEATURES, 0);
    // Config space through GET_CONFIG: capacity in sectors.
    let mut cap = [0u8; 8];
    proxy.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (IMAGE / 512) as u64);

    for event_idx in [true, false] {
        let served = serve_proxy(proxy.clone(), dma.clone(), &dir);
        let mut d = driver(&served, event_idx);
        write_read_check(&mut d, &image, 0, 1, 4096);
        write_read_check(&mut d, &image, 100, 2, 512);
        write_read_check(&mut d, &image, 7, 3, 16384);
        let c = d
            .blk_request(0, &VirtioBlkRequest::read(2047, 1024), TIMEOUT)
            .unwrap();
        assert_eq!(c.status, 1, "read past the end: IOERR");
        let c = d
            .blk_request(0, &VirtioBlkRequest::flush(), TIMEOUT)
            .unwrap();
        assert_eq!(c.status, 0);
        // Driver reset stops the rings on the backend; a second init starts them again.
        d.init().unwrap();
        write_read_check(&mut d, &image, 300, 4, 8192);
        drop(d);
        drop(served);
    }

    // Rings the backend cannot reach are refused before anything is sent: maps without
    // an fd are not in the snapshot, and cannot be passed on.
    dma.map(MapRequest {
        iova: 0x9000_0000,
        size: 0x10000,
        prot: Prot::READ_WRITE,
        backing: None,
    })
    .unwrap();
    let cfg = |size| QueueConfig {
        size,
        desc: 0x9000_0000,
        avail: 0x9000_1000,
        used: 0x9000_2000,
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        call: None,
        next_avail: 0,
        next_used: 0,
    };
    assert!(matches!(
        proxy.start_queue(0, cfg(64)),
        Err(QueueError::BadRings(0))
    ));
    assert!(matches!(
        proxy.start_queue(1, cfg(64)),
        Err(QueueError::NoSuchQueue(1))
    ));
    assert!(matches!(
        proxy.start_queue(0, cfg(512)),
        Err(QueueError::BadSize { .. })
    ));
    assert!(matches!(
        proxy.start_queue(0, cfg(3)),
        Err(QueueError::BadSize { .. })
    ));
    assert_eq!(proxy.stop_queue(0), None, "never started");

    // The frontend leaving ends the stock daemon.
    assert!(proxy.is_alive());
    proxy.disconnect();
    assert!(!proxy.is_alive());
    daemon.join().unwrap();
}

#[test]
fn backend_death_fails_cleanly_and_reconnect_recovers() {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = test_dir("death");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0x5au8; IMAGE]).unwrap();
    let backend_sock = dir.join("backend.sock");
    let mut child = spawn_daemon(&backend_sock, &image);

    let dma = Arc::new(DmaSpace::default());
    let proxy = VhostUserProxy::connect_with(
        &backend_sock,
        VIRTIO_ID_BLOCK,
        1,
        dma.clone(),
        ProxyOptions {
            timeout: Duration::from_secs(2),
            ..ProxyOptions::default()
        },
    )
    .unwrap();
    let served = serve_proxy(proxy.clone(), dma.clone(), &dir);
    let mut d = driver(&served, true);
    write_read_check(&mut d, &image, 0, 5, 4096);

    // The backend process dies.
    child.kill().unwrap();
    child.wait().unwrap();
    let started = Instant::now();
    let r = d.blk_request(
        0,
        &VirtioBlkRequest::write(8, &pattern(6, 512)),
        Duration::from_millis(500),
    );
    assert!(r.is_err(), "a request to a dead backend completed: {r:?}");
    assert!(!proxy.is_alive());
    // The device says it needs a reset (the driver reads DEVICE_NEEDS_RESET).
    assert!(proxy.health().is_some_and(|h| h.is_failed()));
    assert_ne!(d.device_status().unwrap() & 0x40, 0, "DEVICE_NEEDS_RESET");
    // Control operations fail cleanly and do not hang: a driver re-init resets the
    // device (GET_VRING_BASE fails) and cannot start the queue.
    let r = d.init();
    assert!(r.is_err(), "init against a dead backend succeeded");
    assert!(started.elapsed() < Duration::from_secs(5), "took too long");
    let mut cap = [0xffu8; 8];
    proxy.read_config(0, &mut cap);
    assert_eq!(cap, [0; 8], "config of a dead backend reads as zeros");

    // A new backend process on the same socket; the proxy reconnects and replays.
    let mut child = spawn_daemon(&backend_sock, &image);
    proxy.reconnect().unwrap();
    assert!(proxy.is_alive());
    d.init().unwrap();
    write_read_check(&mut d, &image, 40, 7, 8192);

    drop(d);
    drop(served);
    // The frontend leaves: the child daemon exits on its own.
    proxy.disconnect();
    let end = Instant::now() + TIMEOUT;
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > end {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the stock daemon did not exit when its frontend left");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
