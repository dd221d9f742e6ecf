//! The same backend object, driven with the same request script through unidev's core
//! dispatch — over vfio-user (virtio-pci) and over unidev's vhost-user transport — and
//! through vhost-user-backend's stock `VhostUserDaemon` (the `vhost` crate's `Frontend`
//! as the client), gives identical results: statuses, data returned, and the bytes left
//! in the image.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use unidev_backends::virtio_blk::{BlkOptions, VirtioBlk, VIRTIO_ID_BLOCK};
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::{DispatchOptions, LocalVirtio, VirtioPci, VirtioPciOptions};
use unidev_testkit::{
    BlkCompletion, BlkSegment, DriverMemory, DriverOptions, VhostUserRing, VirtioBlkRequest,
    VirtioPciDriver,
};
use unidev_transports::listener;
use unidev_transports::vfio_user::{ServerConfig, VfioUserClient, VfioUserServer};
use unidev_transports::vhost_user::VhostUserServer;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

const EVENT_IDX: u64 = 1 << 29;
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const BLK_FEATURES: u64 = (1 << 9) | (1 << 13) | (1 << 14);
const TIMEOUT: Duration = Duration::from_secs(10);
const IMAGE: usize = 1 << 20;

fn script() -> Vec<VirtioBlkRequest> {
    let pat = |seed: u8, len: usize| -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
            .collect()
    };
    let seg = |sector, n| {
        [BlkSegment {
            sector,
            num_sectors: n,
            flags: 0,
        }]
    };
    let mut unknown = VirtioBlkRequest::flush();
    unknown.sector = 0;
    vec![
        VirtioBlkRequest::write(0, &pat(1, 4096)),
        VirtioBlkRequest::read(0, 4096),
        VirtioBlkRequest::write(100, &pat(2, 512)),
        VirtioBlkRequest::read(96, 4096),
        VirtioBlkRequest::flush(),
        VirtioBlkRequest::get_id(),
        VirtioBlkRequest::write_zeroes(&seg(2, 4)),
        VirtioBlkRequest::discard(&seg(100, 1)),
        VirtioBlkRequest::read(0, 8192),
        VirtioBlkRequest::read(2047, 1024), // past the end: IOERR
        VirtioBlkRequest::write(1 << 40, &pat(3, 512)), // absurd sector: IOERR
        VirtioBlkRequest::write(10, &pat(4, 8192)),
        VirtioBlkRequest::read(8, 16384),
    ]
}

fn reset_image(path: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0x5au8; IMAGE], 0).unwrap();
    f.sync_all().unwrap();
}

/// Run the script through unidev: VirtioPci + LocalVirtio over vfio-user.
fn through_unidev(backend: Arc<VirtioBlk>, event_idx: bool, dir: &Path) -> Vec<BlkCompletion> {
    let dma = Arc::new(DmaSpace::default());
    let local =
        LocalVirtio::new(VIRTIO_ID_BLOCK, backend, &dma, DispatchOptions::default()).unwrap();
    let pci = VirtioPci::new("equiv", local, dma, VirtioPciOptions::default()).unwrap();
    let sock = dir.join(format!("unidev-{event_idx}.sock"));
    let server = VfioUserServer::new(
        "equiv",
        listener::bind(&sock, 0o600).unwrap(),
        Arc::new(Mutex::new(pci)),
        ServerConfig::default(),
    )
    .unwrap();
    let stop = server.stop_handle();
    let t = std::thread::spawn(move || server.run().unwrap());
    let mut d = VirtioPciDriver::new(
        VfioUserClient::connect(&sock).unwrap(),
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
    let out = script()
        .iter()
        .enumerate()
        .map(|(i, r)| {
            d.blk_request(0, r, TIMEOUT)
                .unwrap_or_else(|e| panic!("request {i}: {e}"))
        })
        .collect();
    drop(d);
    stop.stop();
    t.join().unwrap();
    out
}

/// Run the script through vhost-user-backend's own daemon.
fn through_stock_daemon(
    backend: Arc<VirtioBlk>,
    event_idx: bool,
    dir: &Path,
) -> Vec<BlkCompletion> {
    let sock = dir.join(format!("stock-{event_idx}.sock"));
    let mut daemon = VhostUserDaemon::new(
        "stock".to_string(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let s2 = sock.clone();
    let t = std::thread::spawn(move || {
        let _ = daemon.serve(&s2);
    });
    common::wait_for(10, "the stock daemon's socket", || sock.exists());
    let out = drive_over_vhost_user(&sock, event_idx);
    t.join().unwrap();
    out
}

/// Run the script through unidev's own vhost-user transport (LocalVirtio behind
/// VhostUserServer): the same backend, the same dispatch as over vfio-user.
fn through_unidev_vhost_user(
    backend: Arc<VirtioBlk>,
    event_idx: bool,
    dir: &Path,
) -> Vec<BlkCompletion> {
    let dma = Arc::new(DmaSpace::default());
    let local =
        LocalVirtio::new(VIRTIO_ID_BLOCK, backend, &dma, DispatchOptions::default()).unwrap();
    let sock = dir.join(format!("unidev-vu-{event_idx}.sock"));
    let server = VhostUserServer::new(
        "equiv-vu",
        listener::bind(&sock, 0o600).unwrap(),
        local,
        dma,
    )
    .unwrap();
    let stop = server.stop_handle();
    let t = std::thread::spawn(move || server.run().unwrap());
    let out = drive_over_vhost_user(&sock, event_idx);
    stop.stop();
    t.join().unwrap();
    out
}

/// Be a vhost-user frontend on `sock`: negotiate, share a memfd, set up one vring and
/// run the script.
fn drive_over_vhost_user(sock: &Path, event_idx: bool) -> Vec<BlkCompletion> {
    let mem = DriverMemory::new(16 << 20, 0x1_0000_0000).unwrap();
    let features =
        VERSION_1 | PROTOCOL_FEATURES | BLK_FEATURES | if event_idx { EVENT_IDX } else { 0 };
    let VhostUserRing {
        fe, mut vq, kick, ..
    } = VhostUserRing::connect(
        sock,
        &mem,
        features,
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG,
        64,
    )
    .unwrap();
    assert_eq!(vq.event_idx(), event_idx);

    let mut out = Vec::new();
    for req in script() {
        let buf = mem.alloc(req.buffer_len(), 64).unwrap();
        let placed = req.place(&mem, buf.iova).unwrap();
        let head = vq.add_chain(&placed.chain).unwrap();
        if vq.kick_prepare().unwrap() {
            kick.write(1).unwrap();
        }
        let deadline = std::time::Instant::now() + TIMEOUT;
        let len = loop {
            if let Some((h, len)) = vq.poll_used().unwrap() {
                assert_eq!(h, head);
                break len;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "stock daemon timed out"
            );
            std::thread::sleep(Duration::from_micros(200));
        };
        out.push(placed.complete(&mem, len).unwrap());
        mem.free(buf).unwrap();
    }
    drop(fe);
    out
}

#[test]
fn same_backend_same_script_same_results() {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = common::test_dir("equivalence");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0x5au8; IMAGE]).unwrap();
    for event_idx in [true, false] {
        // One backend object serves both runs. (A fresh one per round: the stock daemon
        // fires the backend's exit event when its frontend leaves, which ends every
        // worker that listens to it, unidev's included, as vhost-user-backend defines.)
        let backend = Arc::new(
            VirtioBlk::new(BlkOptions {
                path: image.clone(),
                ..BlkOptions::default()
            })
            .unwrap(),
        );
        reset_image(&image);
        let ours = through_unidev(backend.clone(), event_idx, &dir);
        let ours_image = std::fs::read(&image).unwrap();
        reset_image(&image);
        let ours_vu = through_unidev_vhost_user(backend.clone(), event_idx, &dir);
        let ours_vu_image = std::fs::read(&image).unwrap();
        reset_image(&image);
        let stock = through_stock_daemon(backend.clone(), event_idx, &dir);
        let stock_image = std::fs::read(&image).unwrap();
        assert_eq!(
            ours_vu, stock,
            "unidev vhost-user vs stock (event_idx {event_idx})"
        );
        assert!(
            ours_vu_image == stock_image,
            "images differ over vhost-user"
        );
        assert_eq!(ours.len(), script().len());
        for (i, (a, b)) in ours.iter().zip(&stock).enumerate() {
            assert_eq!(a, b, "request {i} (event_idx {event_idx}) differs");
        }
        assert!(
            ours_image == stock_image,
            "images differ (event_idx {event_idx})"
        );
        // And the script really did something: successes, errors, changed bytes.
        assert!(ours.iter().any(|c| c.status == 0) && ours.iter().any(|c| c.status == 1));
        assert_ne!(ours_image, vec![0x5au8; IMAGE]);
    }
}
