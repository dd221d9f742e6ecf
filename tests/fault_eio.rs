//! EIO from the backing file (issue 7): a virtio-blk device of the daemon on a file of a
//! FUSE file system that this test serves itself (tests/common/fuse.rs), whose "bad
//! sectors" fail READ and WRITE with EIO and whose FSYNC fails while switched on. Every
//! request touching the fault completes with VIRTIO_BLK_S_IOERR — no OK, no hang — and
//! the device goes on serving the good sectors.
//!
//! Flushes after a failed fsync: the daemon opened the file through the page cache
//! (the default), so Linux may have dropped writes that the failed fsync did not get to
//! the disk and would report success on the next fsync; the daemon fails every later
//! FLUSH (and every write-through write) instead, without asking the file system again.
//! Opened with O_DIRECT (`--direct`), nothing is cached and a FLUSH after the fault
//! healed succeeds.
//!
//! Needs root and /dev/fuse (skipped otherwise; CI runs as root).

mod common;
#[path = "common/fuse.rs"]
mod fuse;

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use common::{test_dir, Daemon};
use fuse::FuseMount;
use unidev_testkit::{DriverOptions, VirtioBlkRequest, VirtioPciDriver, VIRTIO_F_VERSION_1};
use unidev_transports::vfio_user::VfioUserClient;

const TIMEOUT: Duration = Duration::from_secs(10);
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// The disk: 1 MiB, 2048 sectors.
const SIZE: usize = 1 << 20;
/// The bad sectors: 1024..1032 (4 KiB at 512 KiB).
const BAD: Range<u64> = 1024..1032;

/// Every byte of the disk has its own value (mostly): what a read must return.
fn pattern(bytes: Range<usize>) -> Vec<u8> {
    bytes.map(|i| ((i ^ (i >> 9)) * 13) as u8).collect()
}

fn sector_bytes(sector: u64, len: usize) -> Range<usize> {
    let start = sector as usize * 512;
    start..start + len
}

fn driver(sock: &Path, features: u64) -> VirtioPciDriver {
    let client = VfioUserClient::connect(sock).unwrap();
    let mut d = VirtioPciDriver::new(
        client,
        DriverOptions {
            features,
            num_queues: Some(1),
            queue_size: 64,
            memory_size: 1 << 20,
            ..DriverOptions::default()
        },
    )
    .unwrap();
    d.init().unwrap();
    d
}

fn eio_fails_the_request_and_the_device_goes_on(direct: bool) {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = test_dir(&format!(
        "fault-eio-{}",
        if direct { "direct" } else { "cached" }
    ));
    let mnt = dir.join("fuse");
    std::fs::create_dir_all(&mnt).unwrap();
    let fs = match FuseMount::mount(&mnt, "disk.img", pattern(0..SIZE)) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("SKIP: cannot mount a FUSE file system here (needs root and /dev/fuse): {e}");
            return;
        }
    };
    let file = fs.file();
    file.set_bad(BAD.start * 512..BAD.end * 512);
    // Declared after the mount: the daemon is killed before the file system goes.
    let sock = dir.join("unidev.sock");
    let image = fs.path();
    let mut args = vec![
        "serve",
        "--transport",
        "vfio-user",
        "--socket-path",
        sock.to_str().unwrap(),
        "virtio-blk",
        "--file",
        image.to_str().unwrap(),
    ];
    if direct {
        args.push("--direct");
    }
    let mut daemon = Daemon::serve(&dir, "unidev", &sock, &args);
    let mut d = driver(&sock, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);
    assert_ne!(d.features() & VIRTIO_BLK_F_FLUSH, 0, "FLUSH negotiated");
    let run = |d: &mut VirtioPciDriver, req: VirtioBlkRequest, what: &str| {
        d.blk_request(0, &req, TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: no completion: {e}"))
    };
    let read_ok = |d: &mut VirtioPciDriver, sector: u64, expect: &[u8]| {
        let c = run(
            d,
            VirtioBlkRequest::read(sector, expect.len() as u32),
            "read",
        );
        assert_eq!(c.status, S_OK, "read of sector {sector}");
        assert!(c.data == expect, "data of sector {sector}");
    };

    // Good sectors, up to the edges of the bad ones, read back right.
    for sector in [0, BAD.start - 8, BAD.end, 2040] {
        read_ok(&mut d, sector, &pattern(sector_bytes(sector, 4096)));
    }

    // Reads touching the bad sectors, inside, across either edge or over them: IOERR.
    for (sector, len) in [
        (BAD.start, 4096),
        (BAD.start - 4, 4096),
        (BAD.end - 1, 512),
        (BAD.start - 16, 32 * 512),
    ] {
        let c = run(&mut d, VirtioBlkRequest::read(sector, len), "bad read");
        assert_eq!(c.status, S_IOERR, "read of {len} bytes at sector {sector}");
    }
    assert!(file.reads_failed.load(SeqCst) >= 4);

    // Writes touching them: IOERR, and the bad sectors keep their old bytes.
    for (sector, len) in [(BAD.start, 4096), (BAD.end - 1, 512), (BAD.start - 8, 8192)] {
        let c = run(
            &mut d,
            VirtioBlkRequest::write(sector, &vec![0xee; len]),
            "bad write",
        );
        assert_eq!(c.status, S_IOERR, "write of {len} bytes at sector {sector}");
    }
    assert!(file.writes_failed.load(SeqCst) >= 3);
    let bad_bytes = sector_bytes(BAD.start, (BAD.end - BAD.start) as usize * 512);
    assert!(file.bytes(bad_bytes.clone()) == pattern(bad_bytes));

    // The device goes on: good writes land in the file and read back; FLUSH reaches the
    // file system and succeeds.
    let new = vec![0x5a; 8192];
    let c = run(&mut d, VirtioBlkRequest::write(16, &new), "good write");
    assert_eq!(c.status, S_OK, "write after the errors");
    assert!(
        file.bytes(sector_bytes(16, 8192)) == new,
        "the write reached the file"
    );
    read_ok(&mut d, 16, &new);
    let fsyncs = file.fsyncs.load(SeqCst);
    let c = run(&mut d, VirtioBlkRequest::flush(), "flush");
    assert_eq!(c.status, S_OK, "FLUSH with fsync working");
    assert!(
        file.fsyncs.load(SeqCst) > fsyncs,
        "the FLUSH reached the file system"
    );

    // fsync fails: FLUSH fails, every time.
    file.fail_fsync(true);
    for i in 0..2 {
        let c = run(&mut d, VirtioBlkRequest::flush(), "failing flush");
        assert_eq!(c.status, S_IOERR, "FLUSH {i} with fsync failing");
    }
    assert!(file.fsyncs_failed.load(SeqCst) >= 1);
    // fsync healed: through the page cache the disk's state is unknown and FLUSH keeps
    // failing (without asking the file system); with O_DIRECT it succeeds again.
    file.fail_fsync(false);
    let fsyncs = file.fsyncs.load(SeqCst);
    let c = run(&mut d, VirtioBlkRequest::flush(), "flush after healing");
    if direct {
        assert_eq!(c.status, S_OK, "FLUSH after fsync healed (O_DIRECT)");
        assert!(file.fsyncs.load(SeqCst) > fsyncs);
    } else {
        assert_eq!(c.status, S_IOERR, "FLUSH after an earlier fsync failed");
        assert_eq!(file.fsyncs.load(SeqCst), fsyncs, "no fsync asked");
    }

    // Reads and writes go on after all the errors; the bad sectors still fail.
    let newer = vec![0xa5; 4096];
    let c = run(&mut d, VirtioBlkRequest::write(40, &newer), "good write");
    assert_eq!(c.status, S_OK, "write after the flush errors");
    assert!(file.bytes(sector_bytes(40, 4096)) == newer);
    read_ok(&mut d, 40, &newer);
    read_ok(&mut d, BAD.end, &pattern(sector_bytes(BAD.end, 4096)));
    let c = run(&mut d, VirtioBlkRequest::read(BAD.start, 512), "bad read");
    assert_eq!(c.status, S_IOERR);

    // Without VIRTIO_BLK_F_FLUSH the device is write-through: each write is synced, and
    // a write whose sync fails says so (the data is in the file, not known stable).
    drop(d);
    let mut d = driver(&sock, VIRTIO_F_VERSION_1);
    assert_eq!(d.features() & VIRTIO_BLK_F_FLUSH, 0);
    let write_through =
        |d: &mut VirtioPciDriver| run(d, VirtioBlkRequest::write(24, &new), "write-through").status;
    if direct {
        assert_eq!(write_through(&mut d), S_OK);
        file.fail_fsync(true);
        assert_eq!(write_through(&mut d), S_IOERR, "fsync failing");
        file.fail_fsync(false);
        assert_eq!(write_through(&mut d), S_OK, "fsync healed");
    } else {
        assert_eq!(
            write_through(&mut d),
            S_IOERR,
            "after an earlier fsync failed"
        );
    }
    assert!(file.bytes(sector_bytes(24, 8192)) == new);
    read_ok(&mut d, 24, &new);

    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon is still running"
    );
    let log = daemon.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("Input/output error"),
        "errors are logged: {log}"
    );
    assert_eq!(log.contains("every later flush fails"), !direct, "{log}");
}

/// The daemon's default: the backing file used through the host page cache.
#[test]
fn eio_from_the_backing_file_fails_the_request_and_the_device_goes_on() {
    eio_fails_the_request_and_the_device_goes_on(false);
}

/// `--direct`: the backing file opened with O_DIRECT. The driver's data buffers sit 16
/// bytes past the request header, off O_DIRECT's alignment: every request goes through
/// the device's bounce buffer.
#[test]
fn eio_from_an_o_direct_backing_file_fails_the_request_and_the_device_goes_on() {
    eio_fails_the_request_and_the_device_goes_on(true);
}
