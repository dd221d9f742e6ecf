//! Driver-level tests: unidev's virtio-pci driver library drives VhostUserBackend
//! backends (virtio-blk, virtio-rng) exported as virtio-pci devices over vfio-user,
//! in this process, and checks the results against the backing file.

mod common;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use unidev_backends::virtio_blk::{BlkOptions, VirtioBlk, VIRTIO_ID_BLOCK};
use unidev_backends::virtio_rng::{VirtioRng, VIRTIO_ID_RNG};
use unidev_core::memory::DmaSpace;
use unidev_core::pci::SharedPciDevice;
use unidev_core::virtio::{DispatchOptions, LocalVirtio, VirtioPci, VirtioPciOptions};
use unidev_testkit::{BlkSegment, DriverOptions, NotifyMode, VirtioBlkRequest, VirtioPciDriver};
use unidev_transports::listener;
use unidev_transports::vfio_user::{ServerConfig, VfioUserClient, VfioUserServer};

const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const TIMEOUT: Duration = Duration::from_secs(10);

struct Served {
    stop: unidev_core::dispatch::StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    sock: PathBuf,
    image: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn serve(name: &str, device: SharedPciDevice, dir: PathBuf, image: PathBuf) -> Served {
    let sock = dir.join("dev.sock");
    let l = listener::bind(&sock, 0o600).unwrap();
    let server = VfioUserServer::new(name, l, device, ServerConfig::default()).unwrap();
    let stop = server.stop_handle();
    let thread = Some(std::thread::spawn(move || server.run().unwrap()));
    Served {
        stop,
        thread,
        sock,
        image,
    }
}

fn blk_device(name: &str, queues: u16, poll: Duration) -> Served {
    let dir = common::test_dir(name);
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0x5au8; 4 << 20]).unwrap();
    let dma = Arc::new(DmaSpace::default());
    let blk = VirtioBlk::new(BlkOptions {
        path: image.clone(),
        queues,
        ..BlkOptions::default()
    })
    .unwrap();
    let local = LocalVirtio::new(
        VIRTIO_ID_BLOCK,
        Arc::new(blk),
        &dma,
        DispatchOptions { poll, busy: false },
    )
    .unwrap();
    let pci = VirtioPci::new(name, local, dma, VirtioPciOptions::default()).unwrap();
    serve(name, Arc::new(Mutex::new(pci)), dir, image)
}

fn driver(s: &Served, features: u64, queues: u16, size: u16) -> VirtioPciDriver {
    let client = VfioUserClient::connect(&s.sock).unwrap();
    let mut d = VirtioPciDriver::new(
        client,
        DriverOptions {
            features: features | (1 << 32),
            num_queues: Some(queues),
            queue_size: size,
            memory_size: 16 << 20,
            ..DriverOptions::default()
        },
    )
    .unwrap();
    d.init().unwrap();
    d
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add((i / 7) as u8)).collect()
}

fn status(d: &mut VirtioPciDriver, req: VirtioBlkRequest) -> u8 {
    d.blk_request(0, &req, TIMEOUT).unwrap().status
}

/// Wait until `head` completes on `q`; other completions are collected into `done`.
fn wait_head(d: &mut VirtioPciDriver, q: u16, head: u16, done: &mut Vec<(u16, u16)>) {
    if let Some(i) = done.iter().position(|&(dq, h)| dq == q && h == head) {
        done.swap_remove(i);
        return;
    }
    loop {
        let (h, _) = d.wait_used(q, TIMEOUT).unwrap();
        if h == head {
            return;
        }
        done.push((q, h));
    }
}

#[test]
fn blk_operations_match_the_backing_file_with_and_without_event_idx() {
    for (event_idx, poll) in [(true, 0), (false, 0), (true, 50)] {
        let s = blk_device(
            &format!("blk-ops-{event_idx}-{poll}"),
            1,
            Duration::from_micros(poll),
        );
        let wanted = if event_idx {
            VIRTIO_RING_F_EVENT_IDX
        } else {
            0
        } | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_DISCARD
            | VIRTIO_BLK_F_WRITE_ZEROES;
        let mut d = driver(&s, wanted, 1, 64);
        assert_eq!(d.features() & VIRTIO_RING_F_EVENT_IDX != 0, event_idx);
        let mut cap = [0u8; 8];
        d.read_config(0, &mut cap).unwrap();
        assert_eq!(u64::from_le_bytes(cap), 8192, "capacity in sectors");

        let data = pattern(event_idx as u8 + 1, 8192);
        assert_eq!(status(&mut d, VirtioBlkRequest::write(16, &data)), S_OK);
        let file = std::fs::File::open(&s.image).unwrap();
        let mut on_disk = vec![0u8; 8192];
        file.read_exact_at(&mut on_disk, 16 * 512).unwrap();
        assert_eq!(on_disk, data, "the write reached the file");
        let c = d
            .blk_request(0, &VirtioBlkRequest::read(16, 8192), TIMEOUT)
            .unwrap();
        assert_eq!((c.status, c.data), (S_OK, data), "read back");
        assert_eq!(status(&mut d, VirtioBlkRequest::flush()), S_OK);
        let c = d
            .blk_request(0, &VirtioBlkRequest::get_id(), TIMEOUT)
            .unwrap();
        assert_eq!(c.status, S_OK);
        assert!(c.data.starts_with(b"disk.img"));
        for (discard, sector) in [(false, 16u64), (true, 20)] {
            let seg = [BlkSegment {
                sector,
                num_sectors: 2,
                flags: 0,
            }];
            let req = if discard {
                VirtioBlkRequest::discard(&seg)
            } else {
                VirtioBlkRequest::write_zeroes(&seg)
            };
            assert_eq!(status(&mut d, req), S_OK);
            let mut z = [1u8; 1024];
            file.read_exact_at(&mut z, sector * 512).unwrap();
            assert!(
                z.iter().all(|&b| b == 0),
                "discard={discard} zeroed the range"
            );
        }
    }
}

#[test]
fn many_requests_in_flight_on_several_queues() {
    let s = blk_device("blk-mq", 4, Duration::ZERO);
    let mut d = driver(&s, VIRTIO_RING_F_EVENT_IDX | VIRTIO_BLK_F_MQ, 4, 32);
    let mut heads = Vec::new();
    for q in 0..4u16 {
        for i in 0..8u64 {
            let n = u64::from(q) * 8 + i;
            let req = VirtioBlkRequest::write(n * 8, &pattern(n as u8, 4096));
            let buf = d.memory().alloc(req.buffer_len(), 64).unwrap();
            let placed = req.place(d.memory(), buf.iova).unwrap();
            let head = d.add_chain(q, &placed.chain).unwrap();
            heads.push((q, head, placed.status_iova));
        }
        d.kick(q).unwrap();
    }
    let mut done = Vec::new();
    for (q, head, st) in heads {
        wait_head(&mut d, q, head, &mut done);
        let mut b = [0u8; 1];
        d.memory().read(st, &mut b).unwrap();
        assert_eq!(b[0], S_OK);
    }
    let img = std::fs::read(&s.image).unwrap();
    for n in 0..32u64 {
        let off = (n * 8 * 512) as usize;
        assert_eq!(
            &img[off..off + 4096],
            &pattern(n as u8, 4096)[..],
            "request {n}"
        );
    }
}

#[test]
fn reset_in_the_middle_of_a_stream_and_reinitialize() {
    let s = blk_device("blk-reset", 1, Duration::ZERO);
    let mut d = driver(&s, VIRTIO_RING_F_EVENT_IDX, 1, 64);
    for i in 0..20u64 {
        let req = VirtioBlkRequest::read(i, 512);
        let buf = d.memory().alloc(req.buffer_len(), 64).unwrap();
        let placed = req.place(d.memory(), buf.iova).unwrap();
        d.add_chain(0, &placed.chain).unwrap();
        d.kick(0).unwrap();
    }
    // Reset without waiting for completions, then start over.
    d.reset().unwrap();
    d.init().unwrap();
    let w = pattern(9, 4096);
    assert_eq!(status(&mut d, VirtioBlkRequest::write(100, &w)), S_OK);
    let c = d
        .blk_request(0, &VirtioBlkRequest::read(100, 4096), TIMEOUT)
        .unwrap();
    assert_eq!((c.status, c.data), (S_OK, w));
}

#[test]
fn a_second_client_after_the_first_disconnects() {
    let s = blk_device("blk-reconnect", 1, Duration::ZERO);
    {
        let mut d = driver(&s, 0, 1, 64);
        assert_eq!(
            status(&mut d, VirtioBlkRequest::write(7, &pattern(3, 512))),
            S_OK
        );
    }
    std::thread::sleep(Duration::from_millis(100));
    let mut d = driver(&s, VIRTIO_RING_F_EVENT_IDX, 1, 64);
    let c = d
        .blk_request(0, &VirtioBlkRequest::read(7, 512), TIMEOUT)
        .unwrap();
    assert_eq!((c.status, c.data), (S_OK, pattern(3, 512)));
}

#[test]
fn hostile_requests_fail_cleanly_and_the_device_keeps_serving() {
    let s = blk_device("blk-hostile", 1, Duration::ZERO);
    let mut d = driver(&s, 0, 1, 64);
    let hdr = d.memory().alloc(16, 16).unwrap().iova;
    let st = d.memory().alloc(1, 1).unwrap().iova;
    let buf = d.memory().alloc(512, 512).unwrap().iova;
    let base = d.memory().iova_base();
    // The driver library refuses malformed chains, so build a valid one and then
    // rewrite its second descriptor in the ring, as a hostile guest would.
    let run = |d: &mut VirtioPciDriver, kind: u32, data: Option<(u64, u32)>| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        d.memory().write(hdr, &h).unwrap();
        d.memory().write(st, &[0xff]).unwrap();
        let chain: Vec<(u64, u32, bool)> = match data {
            Some(_) => vec![(hdr, 16, false), (buf, 512, true), (st, 1, true)],
            None => vec![(hdr, 16, false), (st, 1, true)],
        };
        let head = d.add_chain(0, &chain).unwrap();
        if let Some((addr, len)) = data {
            let table = d.queue(0).unwrap().desc_iova();
            let mut e = [0u8; 16];
            d.memory()
                .read(table + 16 * u64::from(head), &mut e)
                .unwrap();
            let second = u64::from(u16::from_le_bytes([e[14], e[15]]));
            d.memory()
                .write(table + 16 * second, &addr.to_le_bytes())
                .unwrap();
            d.memory()
                .write(table + 16 * second + 8, &len.to_le_bytes())
                .unwrap();
        }
        d.kick(0).unwrap();
        let (h, _) = d.wait_used(0, TIMEOUT).unwrap();
        assert_eq!(h, head);
        let mut b = [0u8; 1];
        d.memory().read(st, &mut b).unwrap();
        b[0]
    };
    // Unknown request type.
    assert_eq!(run(&mut d, 0x77, None), S_UNSUPP);
    // A data buffer outside any DMA map.
    assert_eq!(run(&mut d, 0, Some((0x7_0000_0000, 512))), S_IOERR);
    // A zero-length data buffer, and one larger than the device allows.
    assert_eq!(run(&mut d, 0, Some((buf, 0))), S_IOERR);
    assert_eq!(run(&mut d, 0, Some((base, 64 << 20))), S_IOERR);
    // The device keeps serving.
    let c = d
        .blk_request(0, &VirtioBlkRequest::read(0, 512), TIMEOUT)
        .unwrap();
    assert_eq!((c.status, c.data), (S_OK, vec![0x5a; 512]));
}

#[test]
fn a_queue_outside_mapped_memory_makes_the_device_ask_for_reset() {
    let s = blk_device("blk-badring", 1, Duration::ZERO);
    let client = VfioUserClient::connect(&s.sock).unwrap();
    let mut d = VirtioPciDriver::new(
        client,
        DriverOptions {
            num_queues: Some(1),
            queue_size: 64,
            memory_size: 1 << 20,
            ..DriverOptions::default()
        },
    )
    .unwrap();
    // Withdraw the driver's memory: the rings now lie outside every map.
    d.client_mut().dma_unmap_all().unwrap();
    assert!(d.init().is_err());
    assert_ne!(d.device_status().unwrap() & 0x40, 0, "DEVICE_NEEDS_RESET");
    drop(d);
    std::thread::sleep(Duration::from_millis(100));
    // The daemon keeps serving a well-behaved driver.
    let mut d = driver(&s, 0, 1, 64);
    let c = d
        .blk_request(0, &VirtioBlkRequest::read(0, 512), TIMEOUT)
        .unwrap();
    assert_eq!(c.status, S_OK);
}

#[test]
fn rng_delivers_random_bytes() {
    let dir = common::test_dir("rng-driver");
    let dma = Arc::new(DmaSpace::default());
    let local = LocalVirtio::new(
        VIRTIO_ID_RNG,
        Arc::new(VirtioRng::new().unwrap()),
        &dma,
        DispatchOptions::default(),
    )
    .unwrap();
    let pci = VirtioPci::new("rng", local, dma, VirtioPciOptions::default()).unwrap();
    let s = serve(
        "rng",
        Arc::new(Mutex::new(pci)),
        dir.clone(),
        dir.join("none"),
    );
    let mut d = driver(&s, VIRTIO_RING_F_EVENT_IDX, 1, 64);
    let buf = d.memory().alloc(4096, 8).unwrap().iova;
    let head = d.add_chain(0, &[(buf, 4096, true)]).unwrap();
    d.kick(0).unwrap();
    assert_eq!(d.wait_used(0, TIMEOUT).unwrap(), (head, 4096));
    let mut got = vec![0u8; 4096];
    d.memory().read(buf, &mut got).unwrap();
    let distinct: std::collections::HashSet<u8> = got.iter().copied().collect();
    assert!(distinct.len() > 200);
}

#[test]
fn notifications_through_the_mmapped_notify_area_with_a_polling_device() {
    let dir = common::test_dir("blk-notify-mmap");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0x5au8; 1 << 20]).unwrap();
    let dma = Arc::new(DmaSpace::default());
    let blk = VirtioBlk::new(BlkOptions {
        path: image.clone(),
        ..BlkOptions::default()
    })
    .unwrap();
    let local = LocalVirtio::new(
        VIRTIO_ID_BLOCK,
        Arc::new(blk),
        &dma,
        DispatchOptions {
            poll: Duration::ZERO,
            busy: true,
        },
    )
    .unwrap();
    let pci = VirtioPci::new(
        "blk-mmap",
        local,
        dma,
        VirtioPciOptions::default().notify_mmap(true),
    )
    .unwrap();
    let s = serve("blk-mmap", Arc::new(Mutex::new(pci)), dir, image);
    let client = VfioUserClient::connect(&s.sock).unwrap();
    let mut d = VirtioPciDriver::new(
        client,
        DriverOptions {
            features: (1 << 32) | VIRTIO_RING_F_EVENT_IDX,
            num_queues: Some(1),
            queue_size: 64,
            notify: NotifyMode::Mmap,
            memory_size: 16 << 20,
            ..DriverOptions::default()
        },
    )
    .unwrap();
    d.init().unwrap();
    for i in 0..50u64 {
        let w = pattern(i as u8, 512);
        assert_eq!(status(&mut d, VirtioBlkRequest::write(i, &w)), S_OK);
        let c = d
            .blk_request(0, &VirtioBlkRequest::read(i, 512), TIMEOUT)
            .unwrap();
        assert_eq!((c.status, c.data), (S_OK, w));
    }
}
