//! virtio-rng over unidev's vhost-user transport, driven by the `vhost` crate's
//! `Frontend`: every device-writable buffer comes back filled with fresh random bytes,
//! requests above the device's 64 KiB cap are truncated, device-readable buffers are left
//! alone — with and without EVENT_IDX.

use std::sync::Arc;
use std::time::{Duration, Instant};

use unidev_backends::virtio_rng::{VirtioRng, VIRTIO_ID_RNG};
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::{DispatchOptions, LocalVirtio};
use unidev_testkit::vhost_user::run_chain;
use unidev_testkit::{DriverMemory, VhostUserRing};
use unidev_transports::listener;
use unidev_transports::vhost_user::VhostUserServer;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

mod common;

const EVENT_IDX: u64 = 1 << 29;
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const QSIZE: u16 = 64;
const TIMEOUT: Duration = Duration::from_secs(10);

fn run(event_idx: bool) {
    let dir = common::test_dir(&format!("vu-rng-{event_idx}"));
    let sock = dir.join("rng.sock");
    let dma = Arc::new(DmaSpace::default());
    let backend = Arc::new(VirtioRng::new().unwrap());
    let local = LocalVirtio::new(VIRTIO_ID_RNG, backend, &dma, DispatchOptions::default()).unwrap();
    let server =
        VhostUserServer::new("vu-rng", listener::bind(&sock, 0o600).unwrap(), local, dma).unwrap();
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || server.run().unwrap());

    let mem = DriverMemory::new(16 << 20, 0x1_0000_0000).unwrap();
    let features = VERSION_1 | PROTOCOL_FEATURES | if event_idx { EVENT_IDX } else { 0 };
    let ring = VhostUserRing::connect(
        &sock,
        &mem,
        features,
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ,
        QSIZE,
    )
    .unwrap();
    assert_ne!(ring.offered & VERSION_1, 0);
    assert_ne!(ring.offered & EVENT_IDX, 0, "virtio-rng offers EVENT_IDX");
    let (mut fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
    assert_eq!(vq.event_idx(), event_idx);
    assert_eq!(fe.get_queue_num().unwrap(), 1);

    // Buffers of many sizes, each filled with random bytes; no two alike.
    let mut seen = Vec::new();
    for (i, len) in [1u32, 7, 64, 512, 4096, 4097, 16384]
        .into_iter()
        .enumerate()
    {
        let buf = mem.alloc(u64::from(len), 64).unwrap();
        mem.fill(buf.iova, u64::from(len), 0).unwrap();
        let used = run_chain(&mut vq, &kick, &[(buf.iova, len, true)]).unwrap();
        assert_eq!(used, len, "request {i}: used length");
        let mut data = vec![0u8; len as usize];
        mem.read(buf.iova, &mut data).unwrap();
        if len >= 64 {
            assert!(data.iter().any(|b| *b != 0), "request {i}: nothing written");
            assert!(!seen.contains(&data), "request {i}: repeated bytes");
            seen.push(data);
        }
        mem.free(buf).unwrap();
    }
    // Two writable buffers in one chain are both filled.
    let a = mem.alloc(256, 64).unwrap();
    let b = mem.alloc(256, 64).unwrap();
    let used = run_chain(&mut vq, &kick, &[(a.iova, 256, true), (b.iova, 256, true)]).unwrap();
    assert_eq!(used, 512);
    // A device-readable buffer is not touched and yields nothing.
    mem.fill(a.iova, 256, 0xcc).unwrap();
    let used = run_chain(&mut vq, &kick, &[(a.iova, 256, false)]).unwrap();
    assert_eq!(used, 0);
    let mut data = vec![0u8; 256];
    mem.read(a.iova, &mut data).unwrap();
    assert!(data.iter().all(|x| *x == 0xcc));
    mem.free(a).unwrap();
    mem.free(b).unwrap();
    // Above the 64 KiB cap: truncated.
    let big = mem.alloc(128 << 10, 4096).unwrap();
    let used = run_chain(&mut vq, &kick, &[(big.iova, 128 << 10, true)]).unwrap();
    assert_eq!(used, 64 << 10);
    mem.free(big).unwrap();
    // Many requests in flight at once all complete.
    let bufs: Vec<_> = (0..32).map(|_| mem.alloc(1024, 64).unwrap()).collect();
    let heads: Vec<u16> = bufs
        .iter()
        .map(|b| vq.add_chain(&[(b.iova, 1024, true)]).unwrap())
        .collect();
    if vq.kick_prepare().unwrap() {
        kick.write(1).unwrap();
    }
    let mut done = Vec::new();
    let deadline = Instant::now() + TIMEOUT;
    while done.len() < heads.len() {
        match vq.poll_used().unwrap() {
            Some((h, len)) => {
                assert_eq!(len, 1024);
                done.push(h);
            }
            None => {
                assert!(Instant::now() < deadline, "batch timed out");
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    done.sort_unstable();
    let mut want = heads.clone();
    want.sort_unstable();
    assert_eq!(done, want, "each request completed exactly once");
    assert_eq!(fe.get_vring_base(0).unwrap(), 7 + 3 + 32);

    drop(fe);
    stop.stop();
    thread.join().unwrap();
}

#[test]
fn rng_over_vhost_user_with_event_idx() {
    run(true);
}

#[test]
fn rng_over_vhost_user_without_event_idx() {
    run(false);
}
