//! Adaptive polling must never lose a wake-up: while a worker polls it asks the driver
//! not to notify, and before it sleeps it re-enables notifications and looks at the ring
//! again. Requests posted at every phase of that cycle (while it polls, just as the poll
//! budget ends, after it sleeps) must each complete, with and without EVENT_IDX.

use std::sync::Arc;
use std::time::{Duration, Instant};

use unidev_backends::virtio_blk::{BlkOptions, VirtioBlk, VIRTIO_ID_BLOCK};
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::{DispatchOptions, LocalVirtio};
use unidev_testkit::{DriverMemory, VhostUserRing, VirtioBlkRequest};
use unidev_transports::listener;
use unidev_transports::vhost_user::VhostUserServer;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

mod common;

const EVENT_IDX: u64 = 1 << 29;
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const POLL: Duration = Duration::from_micros(50);
/// Far above any wake-up on a loaded machine; a lost notification never completes.
const LOST: Duration = Duration::from_secs(5);

fn run(event_idx: bool) {
    let dir = common::test_dir(&format!("poll-wakeups-{event_idx}"));
    let sock = dir.join("blk.sock");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let dma = Arc::new(DmaSpace::default());
    let blk = Arc::new(
        VirtioBlk::new(BlkOptions {
            path: image,
            ..BlkOptions::default()
        })
        .unwrap(),
    );
    let options = DispatchOptions {
        poll: POLL,
        busy: false,
    };
    let local = LocalVirtio::new(VIRTIO_ID_BLOCK, blk, &dma, options).unwrap();
    let server =
        VhostUserServer::new("poll", listener::bind(&sock, 0o600).unwrap(), local, dma).unwrap();
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || server.run().unwrap());

    let mem = DriverMemory::new(4 << 20, 0x1_0000_0000).unwrap();
    let features = VERSION_1 | PROTOCOL_FEATURES | if event_idx { EVENT_IDX } else { 0 };
    let ring =
        VhostUserRing::connect(&sock, &mem, features, VhostUserProtocolFeatures::MQ, 64).unwrap();
    let (fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
    assert_eq!(vq.event_idx(), event_idx);

    // Gaps around the poll budget: inside it, at its edge, and well past it (asleep).
    let gaps_us = [0u64, 5, 30, 45, 50, 55, 70, 120, 400, 2000];
    let req = VirtioBlkRequest::read(0, 512);
    let buf = mem.alloc(req.buffer_len(), 64).unwrap();
    let placed = req.place(&mem, buf.iova).unwrap();
    for i in 0..1500usize {
        std::thread::sleep(Duration::from_micros(gaps_us[i % gaps_us.len()]));
        let head = vq.add_chain(&placed.chain).unwrap();
        if vq.kick_prepare().unwrap() {
            kick.write(1).unwrap();
        }
        let start = Instant::now();
        loop {
            if let Some((h, _)) = vq.poll_used().unwrap() {
                assert_eq!(h, head);
                break;
            }
            assert!(
                start.elapsed() < LOST,
                "request {i} (gap {} us, event_idx {event_idx}) never completed: a lost wake-up",
                gaps_us[i % gaps_us.len()]
            );
            std::hint::spin_loop();
        }
    }
    drop(fe);
    stop.stop();
    thread.join().unwrap();
}

#[test]
fn no_lost_wakeups_with_event_idx() {
    run(true);
}

#[test]
fn no_lost_wakeups_without_event_idx() {
    run(false);
}
