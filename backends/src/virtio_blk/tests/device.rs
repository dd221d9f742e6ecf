//! The backend as a driver sees it: requests of every type end to end, batching and
//! notifications, read-only and 4096-byte blocks, range checks, config space, features,
//! queues and threads, options.

use super::*;

#[test]
fn read_write_flush_get_id_with_and_without_event_idx() {
    for event_idx in [false, true] {
        let img = Image::new(&format!("rw-{event_idx}"));
        let b = img.open(|_| {});
        let mut r = Rig::new(&b, event_idx);
        let data = pattern(1, 1024);
        r.fill(DATA, &data);
        let (st, len) = r.request(&b, VIRTIO_BLK_T_OUT, 3, &[(DATA, 1024, R)]);
        assert_eq!((st, len), (OK, 1), "a write returns just the status byte");
        assert!(r.signalled(), "the driver is notified");
        let disk = img.bytes();
        assert_eq!(&disk[3 * 512..5 * 512], &data[..]);
        assert_eq!((disk[3 * 512 - 1], disk[5 * 512]), (0x5a, 0x5a));

        let (st, len) = r.request(&b, VIRTIO_BLK_T_IN, 2, &[(DATA, 1536, W)]);
        assert_eq!((st, len), (OK, 1537), "data and status");
        let got = r.read(DATA, 1536);
        assert_eq!(&got[..512], &[0x5a; 512][..]);
        assert_eq!(&got[512..], &data[..]);

        let (st, len) = r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!((st, len), (OK, 1));

        let (st, len) = r.request(&b, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
        assert_eq!((st, len), (OK, 21));
        let id = r.read(DATA, 20);
        let name = img.0.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(&id[..], &name.as_bytes()[..20]);
    }
}

#[test]
fn get_id_serial_option_and_short_buffer() {
    let img = Image::new("serial");
    let b = img.open(|o| o.serial = Some("disk-7".into()));
    let mut r = Rig::new(&b, false);
    r.fill(DATA, &[0xee; 20]);
    let (st, len) = r.request(&b, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
    assert_eq!((st, len), (OK, 21));
    assert_eq!(&r.read(DATA, 20)[..], b"disk-7\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
    let (st, len) = r.request(&b, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 4, W)]);
    assert_eq!((st, len), (OK, 5));
    // No buffer at all.
    assert_eq!(r.request(&b, VIRTIO_BLK_T_GET_ID, 0, &[]).0, IOERR);
}

#[test]
fn several_requests_in_one_kick() {
    for event_idx in [false, true] {
        let img = Image::new(&format!("batch-{event_idx}"));
        let b = img.open(|_| {});
        let mut r = Rig::new(&b, event_idx);
        let mut heads = Vec::new();
        for i in 0..6u64 {
            let hdr = HDR + 32 * i;
            let st = STATUS + i;
            let data = DATA + 0x1000 * i;
            r.fill(data, &pattern(i as u8, 512));
            r.header(hdr, VIRTIO_BLK_T_OUT, 10 + i);
            heads.push(r.post(&[(hdr, 16, R), (data, 512, R), (st, 1, W)]));
        }
        // And one unknown request in the same batch.
        r.header(HDR + 0x800, 0x77, 0);
        heads.push(r.post(&[(HDR + 0x800, 16, R), (STATUS + 0x80, 1, W)]));
        r.kick(&b);
        assert_eq!(r.used_idx(), 7);
        for (i, &h) in heads.iter().enumerate() {
            assert_eq!(r.used(i as u16), (u32::from(h), 1));
        }
        let m = r.m();
        for i in 0..6u64 {
            assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), OK);
        }
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS + 0x80)).unwrap(),
            UNSUPP
        );
        let disk = img.bytes();
        for i in 0..6usize {
            let at = (10 + i) * 512;
            assert_eq!(&disk[at..at + 512], &pattern(i as u8, 512)[..]);
        }
        assert!(r.signalled());
    }
}

#[test]
fn event_idx_notifications_follow_used_event() {
    let img = Image::new("evidx");
    let b = img.open(|_| {});
    let mut r = Rig::new(&b, true);
    let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
    let avail_event = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
    // The driver wants an interrupt once used idx passes 0.
    r.m().write_obj(0u16, used_event).unwrap();
    assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    assert!(r.signalled());
    // ... and then not before entry 10.
    r.m().write_obj(10u16, used_event).unwrap();
    assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    assert!(!r.signalled(), "suppressed by used_event");
    // The device asks to be kicked for the next available entry.
    assert_eq!(r.m().read_obj::<u16>(avail_event).unwrap(), r.avail_idx);
}

#[test]
fn a_broken_available_index_does_not_spin() {
    for event_idx in [false, true] {
        let img = Image::new(&format!("spin-{event_idx}"));
        let b = Arc::new(img.open(|_| {}));
        let r = Rig::new(&b, event_idx);
        // 1000 entries ahead of the device on a 64-entry ring.
        r.m().write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (b2, vring) = (b.clone(), r.vring.clone());
        std::thread::spawn(move || {
            b2.handle_event(0, EventSet::IN, &[vring], 0).unwrap();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("handle_event returned");
        assert_eq!(r.used_idx(), 0);
    }
}

#[test]
fn read_only() {
    let img = Image::new("ro");
    let b = img.open(|o| o.readonly = true);
    let f = b.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        f & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
        0
    );
    let mut r = Rig::new(&b, false);
    r.fill(DATA, &[1; 512]);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]),
        (IOERR, 1)
    );
    let len = dwz(&r, DATA + 0x1000, &[(0, 1, 0)]);
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let (st, _) = r.request(&b, kind, 0, &[(DATA + 0x1000, len, R)]);
        assert_eq!(st, IOERR);
    }
    assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);
    assert_eq!(r.read(DATA, 512), vec![0x5a; 512]);
    assert_eq!(img.bytes(), vec![0x5a; IMAGE], "the image is untouched");
}

#[test]
fn logical_blocks_of_4096_bytes() {
    let img = Image::new("4k");
    let b = img.open(|o| o.logical_block_size = 4096);
    assert_eq!(b.get_config(20, 4), 4096u32.to_le_bytes());
    assert_eq!(b.get_config(44, 4), 8u32.to_le_bytes(), "discard alignment");
    assert_eq!(b.capacity_sectors(), 2048, "still 512-byte sectors");
    let mut r = Rig::new(&b, false);
    // Unaligned sector, unaligned length.
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 1, &[(DATA, 4096, W)]).0,
        IOERR
    );
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 8, &[(DATA, 512, W)]).0,
        IOERR
    );
    let len = dwz(&r, DATA + 0x2000, &[(8, 4, 0)]);
    let (st, _) = r.request(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA + 0x2000, len, R)]);
    assert_eq!(st, IOERR);
    // Aligned.
    r.fill(DATA, &pattern(5, 4096));
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_OUT, 16, &[(DATA, 4096, R)]).0,
        OK
    );
    assert_eq!(&img.bytes()[16 * 512..24 * 512], &pattern(5, 4096)[..]);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 2040, &[(DATA, 4096, W)]).0,
        OK
    );
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 2048, &[(DATA, 4096, W)]).0,
        IOERR
    );
}

#[test]
fn out_of_range_and_unknown_requests() {
    let img = Image::new("range");
    let b = img.open(|_| {});
    let mut r = Rig::new(&b, false);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 2047, &[(DATA, 1024, W)]),
        (IOERR, 1)
    );
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 2048, &[(DATA, 512, W)]).0,
        IOERR
    );
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_OUT, u64::MAX, &[(DATA, 512, R)])
            .0,
        IOERR
    );
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_OUT, 1 << 55, &[(DATA, 512, R)])
            .0,
        IOERR
    );
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 2047, &[(DATA, 512, W)]).0,
        OK
    );
    // Data not a multiple of 512 bytes.
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 100, W)]).0,
        IOERR
    );
    // Unknown types, and ones this device does not offer.
    for kind in [0x77, 2, 14, 16, 0x8000_0000] {
        assert_eq!(r.request(&b, kind, 0, &[]), (UNSUPP, 1), "type {kind:#x}");
    }
    assert_eq!(img.bytes(), vec![0x5a; IMAGE]);
}

#[test]
fn queues_run_concurrently_on_their_own_threads() {
    let img = Image::new("mq");
    let b = Arc::new(img.open(|o| o.queues = 2));
    assert_eq!(b.queues_per_thread(), vec![1, 2]);
    let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 * REGION as usize)]).unwrap();
    let mem = GuestMemoryAtomic::new(gm);
    b.update_memory(mem.clone()).unwrap();
    let threads: Vec<_> = (0..2u64)
        .map(|q| {
            let (b, mem) = (b.clone(), mem.clone());
            std::thread::spawn(move || {
                let off = q * 0x40_0000;
                let mut r = Rig::with_memory(mem, (DESC + off, AVAIL + off, USED + off), false);
                for i in 0..50u64 {
                    let (hdr, st, data) = (HDR + off, STATUS + off, DATA + off);
                    let sector = q * 1024 + i * 8;
                    r.fill(data, &pattern((q * 50 + i) as u8, 4096));
                    r.header(hdr, VIRTIO_BLK_T_OUT, sector);
                    let head = r.post(&[(hdr, 16, R), (data, 4096, R), (st, 1, W)]);
                    b.handle_event(0, EventSet::IN, std::slice::from_ref(&r.vring), q as usize)
                        .unwrap();
                    assert_eq!(r.used(i as u16), (u32::from(head), 1));
                    assert_eq!(r.read(st, 1)[0], OK);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let disk = img.bytes();
    for q in 0..2u64 {
        for i in 0..50u64 {
            let at = ((q * 1024 + i * 8) * 512) as usize;
            assert_eq!(&disk[at..at + 4096], &pattern((q * 50 + i) as u8, 4096)[..]);
        }
    }
}

#[test]
fn config_space_layout() {
    let img = Image::new("cfg");
    let b = img.open(|o| {
        o.queues = 4;
        o.queue_size = 128;
    });
    let field = |off: usize, len: usize| b.get_config(off as u32, len as u32);
    type C = virtio_blk_config;
    assert_eq!(CONFIG_SIZE, 96);
    assert_eq!(offset_of!(C, capacity), 0);
    assert_eq!(offset_of!(C, seg_max), 12);
    assert_eq!(offset_of!(C, blk_size), 20);
    assert_eq!(offset_of!(C, num_queues), 34);
    assert_eq!(offset_of!(C, max_discard_sectors), 36);
    assert_eq!(offset_of!(C, write_zeroes_may_unmap), 56);
    assert_eq!(field(0, 8), 2048u64.to_le_bytes(), "capacity in sectors");
    assert_eq!(field(8, 4), [0; 4], "size_max: not offered");
    assert_eq!(field(12, 4), 126u32.to_le_bytes(), "seg_max");
    assert_eq!(field(20, 4), 512u32.to_le_bytes(), "blk_size");
    assert_eq!(field(26, 2), 1u16.to_le_bytes(), "min_io_size");
    assert_eq!(field(34, 2), 4u16.to_le_bytes(), "num_queues");
    let c = |f: usize| u32::from_le_bytes(field(f, 4).try_into().unwrap());
    assert_eq!(c(offset_of!(C, max_discard_sectors)), MAX_DISCARD_SECTORS);
    assert_eq!(c(offset_of!(C, max_discard_seg)), MAX_DWZ_SEGS);
    assert_eq!(c(offset_of!(C, discard_sector_alignment)), 1);
    assert_eq!(
        c(offset_of!(C, max_write_zeroes_sectors)),
        MAX_WRITE_ZEROES_SECTORS
    );
    assert_eq!(c(offset_of!(C, max_write_zeroes_seg)), MAX_DWZ_SEGS);
    assert_eq!(field(56, 1), [1]);
    // Whole, past the end, partly past the end, absurd.
    assert_eq!(b.get_config(0, 96).len(), 96);
    assert_eq!(b.get_config(1000, 4), vec![0; 4]);
    assert_eq!(b.get_config(94, 4)[2..], [0, 0]);
    assert_eq!(b.get_config(u32::MAX, 4), vec![0; 4]);
    assert!(b.get_config(0, u32::MAX).len() <= MAX_CONFIG_READ);
    assert!(b.get_config(0, 0).is_empty());
    assert!(b.set_config(0, &[1, 2, 3]).is_err());
    assert_eq!(b.get_config(0, 8), 2048u64.to_le_bytes(), "unchanged");
}

#[test]
fn features_queues_and_lifecycle() {
    let img = Image::new("life");
    let b = img.open(|_| {});
    let f = b.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    for bit in [VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, 1 /* SIZE_MAX */] {
        assert_eq!(f & (1 << bit), 0, "feature bit {bit}");
    }
    assert!(b.protocol_features().contains(
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    ));
    assert_eq!((b.num_queues(), b.max_queue_size()), (1, 256));
    assert_eq!(b.queues_per_thread(), vec![1]);
    let b4 = img.open(|o| o.queues = 64);
    assert_ne!(b4.features() & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_eq!(b4.queues_per_thread().last(), Some(&(1u64 << 63)));

    // Per-thread exit events that notify_exit() wakes.
    let (c0, n0) = b4.exit_event(0).unwrap();
    let (c1, _n1) = b4.exit_event(1).unwrap();
    assert!(c0.consume().is_err(), "not signalled yet");
    n0.notify().unwrap();
    assert!(c0.consume().is_ok() && c1.consume().is_err(), "per thread");
    b4.notify_exit();
    assert!(c0.consume().is_ok() && c1.consume().is_ok());

    // Negotiation and reset.
    b.set_event_idx(true);
    b.acked_features(f);
    assert!(b.event_idx.load(Ordering::Relaxed) && b.writeback.load(Ordering::Relaxed));
    b.reset_device();
    assert!(!b.event_idx.load(Ordering::Relaxed) && !b.writeback.load(Ordering::Relaxed));

    // Before any memory, and for an event that is no queue: nothing happens.
    let vring = VringRwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 16).unwrap();
    b.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
        .unwrap();
    b.handle_event(5, EventSet::IN, std::slice::from_ref(&vring), 9)
        .unwrap();
}

#[test]
fn bad_options_are_refused() {
    let img = Image::new("opts");
    for f in [
        (|o: &mut BlkOptions| o.queues = 0) as fn(&mut BlkOptions),
        |o| o.queues = 65,
        |o| o.logical_block_size = 1024,
        |o| o.queue_size = 100,
        |o| o.queue_size = 0,
        |o| o.path = "/nonexistent/unidev".into(),
        |o| o.path = "/dev/null".into(),
    ] {
        let mut o = img.opts();
        f(&mut o);
        assert!(VirtioBlk::new(o.clone()).is_err(), "{o:?}");
    }
}
