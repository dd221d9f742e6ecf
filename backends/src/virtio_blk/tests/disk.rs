//! The disk I/O behind requests end to end: null I/O, discard and write zeroes, file
//! errors, the sticky sync failure, O_DIRECT and the bounce buffer, block devices.

use super::*;

#[test]
fn null_io_completes_without_touching_file_or_buffers() {
    let img = Image::new("null-io");
    let b = img.open(|o| o.null_io = true);
    let mut r = Rig::new(&b, true);
    r.fill(DATA, &pattern(3, 4096));
    let (st, len) = r.request(&b, VIRTIO_BLK_T_OUT, 8, &[(DATA, 4096, R)]);
    assert_eq!((st, len), (OK, 1));
    assert!(
        img.bytes().iter().all(|&x| x == 0x5a),
        "the file is untouched"
    );
    r.fill(DATA, &[0xee; 4096]);
    let (st, len) = r.request(&b, VIRTIO_BLK_T_IN, 8, &[(DATA, 4096, W)]);
    assert_eq!((st, len), (OK, 4097), "reads report the data length");
    assert_eq!(
        r.read(DATA, 4096),
        vec![0xee; 4096],
        "the buffer is untouched"
    );
    assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
    // Ranges are still checked.
    let past_end = b.capacity_sectors();
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, past_end, &[(DATA, 512, W)])
            .0,
        IOERR
    );
}

#[test]
fn discard_and_write_zeroes_reach_the_file() {
    let img = Image::new("dz");
    let b = img.open(|_| {});
    let mut r = Rig::new(&b, false);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    // Write zeroes, without and with unmap; discard over two segments.
    let cases: [(u32, &[DwzSeg]); 3] = [
        (VIRTIO_BLK_T_WRITE_ZEROES, &[(8, 4, 0)]),
        (VIRTIO_BLK_T_WRITE_ZEROES, &[(24, 3, unmap)]),
        (VIRTIO_BLK_T_DISCARD, &[(40, 8, 0), (64, 1, 0)]),
    ];
    for (kind, segs) in cases {
        let len = dwz(&r, DATA, segs);
        assert_eq!(r.request(&b, kind, 0, &[(DATA, len, R)]), (OK, 1));
        let disk = img.bytes();
        assert_eq!(disk.len(), IMAGE, "the size is kept");
        for &(sector, num, _) in segs {
            let (s, e) = (
                sector as usize * 512,
                (sector as usize + num as usize) * 512,
            );
            assert!(
                disk[s..e].iter().all(|&x| x == 0),
                "type {kind} zeroed {sector}"
            );
            assert_eq!(
                (disk[s - 1], disk[e]),
                (0x5a, 0x5a),
                "type {kind} stays in range"
            );
        }
    }
    let before = img.bytes();
    // Discard with the unmap flag, unknown flags, too many segments: UNSUPP.
    let len = dwz(&r, DATA, &[(0, 1, unmap)]);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_DISCARD, 0, &[(DATA, len, R)]).0,
        UNSUPP
    );
    let len = dwz(&r, DATA, &[(0, 1, 2)]);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, len, R)])
            .0,
        UNSUPP
    );
    let many: Vec<_> = (0..17).map(|i| (i, 1, 0)).collect();
    let len = dwz(&r, DATA, &many);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_DISCARD, 0, &[(DATA, len, R)]).0,
        UNSUPP
    );
    // Out of range, over the limit, a bad payload: IOERR, and nothing changes (even
    // for the valid first segment).
    let len = dwz(&r, DATA, &[(0, 1, 0), (2047, 2, 0)]);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, len, R)])
            .0,
        IOERR
    );
    let len = dwz(&r, DATA, &[(0, MAX_WRITE_ZEROES_SECTORS + 1, 0)]);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, len, R)])
            .0,
        IOERR
    );
    let len = dwz(&r, DATA, &[(u64::MAX - 1, 4, 0)]);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_DISCARD, 0, &[(DATA, len, R)]).0,
        IOERR
    );
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 12, R)]).0,
        IOERR
    );
    assert_eq!(r.request(&b, VIRTIO_BLK_T_DISCARD, 0, &[]).0, IOERR);
    assert_eq!(img.bytes(), before);
}

#[test]
fn file_errors_become_ioerr_and_the_device_goes_on() {
    // A read-only descriptor under a writable device: EBADF on writes.
    let img = Image::new("ebadf");
    let file = File::open(&img.0).unwrap();
    let b = VirtioBlk::with_file(file, IMAGE as u64, false, img.opts()).unwrap();
    let mut r = Rig::new(&b, false);
    r.fill(DATA, &[1; 512]);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]),
        (IOERR, 1)
    );
    let len = dwz(&r, DATA + 0x1000, &[(0, 1, 0)]);
    let (st, _) = r.request(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA + 0x1000, len, R)]);
    assert_eq!(st, IOERR);
    assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);
    assert_eq!(img.bytes(), vec![0x5a; IMAGE]);

    // The file shrank under the device: reads past its end fail.
    let img = Image::new("shrunk");
    let b = img.open(|_| {});
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img.0)
        .unwrap()
        .set_len(IMAGE as u64 / 2)
        .unwrap();
    let mut r = Rig::new(&b, false);
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_IN, 2000, &[(DATA, 512, W)]),
        (IOERR, 1)
    );
    assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);

    // ENOSPC: /dev/full takes no data.
    if let Ok(full) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/full")
    {
        let opts = BlkOptions {
            path: "/dev/full".into(),
            ..BlkOptions::default()
        };
        let b = VirtioBlk::with_file(full, IMAGE as u64, false, opts).unwrap();
        b.acked_features(b.features());
        let mut r = Rig::new(&b, false);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]).0,
            IOERR
        );
        assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);
    }
}

#[test]
fn a_failed_sync_through_the_page_cache_fails_every_later_sync() {
    // fdatasync of /dev/null fails (EINVAL); a regular file dup2'ed over the same
    // descriptor afterwards is the fault healing.
    for direct in [false, true] {
        let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        else {
            return;
        };
        let opts = BlkOptions {
            path: "/dev/null".into(),
            direct,
            ..BlkOptions::default()
        };
        let b = VirtioBlk::with_file(null, IMAGE as u64, false, opts).unwrap();
        let mut r = Rig::new(&b, false);
        // Write-through (no FLUSH negotiated): the write is done, its sync fails.
        r.fill(DATA, &[1; 512]);
        let write = |r: &mut Rig| r.request(&b, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]).0;
        assert_eq!(write(&mut r), IOERR, "direct {direct}");
        assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, IOERR);
        assert_eq!(b.disk.sync_failed(), !direct);

        let img = Image::new(&format!("sync-heals-{direct}"));
        let good = File::options().read(true).write(true).open(&img.0).unwrap();
        // SAFETY: both descriptors are open; dup2 atomically makes the device's
        // descriptor (still owned by its File) refer to the image file instead.
        let rc = unsafe { libc::dup2(good.as_raw_fd(), b.disk.file().as_raw_fd()) };
        assert!(rc >= 0, "{}", io::Error::last_os_error());
        // Through the page cache: still failed; with O_DIRECT: healed.
        let expect = if direct { OK } else { IOERR };
        assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, expect);
        assert_eq!(write(&mut r), expect, "direct {direct}");
        // Reads go on either way (the write reached the file, only its sync failed).
        let at = DATA + 0x1000;
        assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(at, 512, W)]).0, OK);
        assert_eq!(r.read(at, 512), vec![1; 512]);
    }
}

#[test]
fn direct_io_aligned_and_through_the_bounce_buffer() {
    // O_DIRECT needs a real file system (tmpfs refuses it): use the build directory.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/blk-direct-test");
    std::fs::create_dir_all(&dir).unwrap();
    let img = Image::in_dir(&dir, "direct");
    let b = match VirtioBlk::new(BlkOptions {
        direct: true,
        ..img.opts()
    }) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("skipped: O_DIRECT unavailable in {}: {e}", dir.display());
            return;
        }
    };
    let mut r = Rig::new(&b, false);
    // Page-aligned buffers: straight to the file.
    r.fill(DATA, &pattern(6, 8192));
    assert_eq!(r.request(&b, VIRTIO_BLK_T_OUT, 8, &[(DATA, 8192, R)]).0, OK);
    // Misaligned buffers (odd address, 512-byte pieces crossing a region): bounced.
    r.fill(DATA + 0x10001, &pattern(7, 1024));
    let (st, _) = r.request(&b, VIRTIO_BLK_T_OUT, 32, &[(DATA + 0x10001, 1024, R)]);
    assert_eq!(st, OK);
    let across = REGION - 512;
    r.fill(across, &pattern(8, 1024));
    assert_eq!(
        r.request(&b, VIRTIO_BLK_T_OUT, 40, &[(across, 1024, R)]).0,
        OK
    );
    let disk = img.bytes();
    assert_eq!(&disk[8 * 512..24 * 512], &pattern(6, 8192)[..]);
    assert_eq!(&disk[32 * 512..34 * 512], &pattern(7, 1024)[..]);
    assert_eq!(&disk[40 * 512..42 * 512], &pattern(8, 1024)[..]);
    let (st, len) = r.request(&b, VIRTIO_BLK_T_IN, 32, &[(DATA + 0x20003, 1024, W)]);
    assert_eq!((st, len), (OK, 1025));
    assert_eq!(r.read(DATA + 0x20003, 1024), pattern(7, 1024));
    let len = dwz(&r, DATA + 0x30000, &[(8, 2, 0)]);
    let (st, _) = r.request(
        &b,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[(DATA + 0x30000, len, R)],
    );
    assert_eq!(st, OK);
    assert!(img.bytes()[8 * 512..10 * 512].iter().all(|&x| x == 0));
}

/// Destructive: run with `UNIDEV_TEST_BLOCK_DEVICE=/dev/loopN cargo test -p
/// unidev-backends -- --ignored block_device` on a scratch device (a loop device
/// over a file is enough).
#[test]
#[ignore = "needs a scratch block device in UNIDEV_TEST_BLOCK_DEVICE"]
fn on_a_block_device() {
    let Some(dev) = std::env::var_os("UNIDEV_TEST_BLOCK_DEVICE") else {
        panic!("set UNIDEV_TEST_BLOCK_DEVICE to a scratch block device");
    };
    for direct in [false, true] {
        let b = VirtioBlk::new(BlkOptions {
            path: dev.clone().into(),
            direct,
            ..BlkOptions::default()
        })
        .unwrap();
        assert!(b.disk.is_block_device());
        let size = b.capacity_sectors();
        assert!(size >= 64, "at least 32 KiB");
        assert_eq!(b.get_config(0, 8), size.to_le_bytes());
        let mut r = Rig::new(&b, direct);
        let data = pattern(direct as u8 + 1, 8192);
        r.fill(DATA, &data);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_OUT, 16, &[(DATA, 8192, R)]).0,
            OK
        );
        assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
        // Unaligned guest buffer (bounced when direct).
        let (st, _) = r.request(&b, VIRTIO_BLK_T_IN, 16, &[(DATA + 0x10001, 8192, W)]);
        assert_eq!(st, OK);
        assert_eq!(r.read(DATA + 0x10001, 8192), data);
        let last = size - 1;
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, last, &[(DATA, 512, W)]).0,
            OK
        );
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, size, &[(DATA, 512, W)]).0,
            IOERR
        );
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        for (kind, flags) in [
            (VIRTIO_BLK_T_WRITE_ZEROES, 0),
            (VIRTIO_BLK_T_WRITE_ZEROES, unmap),
            (VIRTIO_BLK_T_DISCARD, 0),
        ] {
            assert_eq!(
                r.request(&b, VIRTIO_BLK_T_OUT, 16, &[(DATA, 8192, R)]).0,
                OK
            );
            let len = dwz(&r, DATA + 0x20000, &[(16, 8, flags)]);
            let (st, _) = r.request(&b, kind, 0, &[(DATA + 0x20000, len, R)]);
            assert!(st == OK || (kind == VIRTIO_BLK_T_DISCARD && st == UNSUPP));
            if kind == VIRTIO_BLK_T_WRITE_ZEROES {
                let (st, _) = r.request(&b, VIRTIO_BLK_T_IN, 16, &[(DATA + 0x30000, 8192, W)]);
                assert_eq!(st, OK);
                let got = r.read(DATA + 0x30000, 8192);
                assert!(got[..4096].iter().all(|&x| x == 0), "{kind} {flags}");
                assert_eq!(&got[4096..], &data[4096..]);
            }
        }
    }
}
