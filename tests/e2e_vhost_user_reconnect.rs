//! End to end: QEMU 11.1's vhost-user-blk-pci reconnecting to unidev (issue 4).
//!
//! * The daemon dies under guest I/O (SIGSTOP so that the guest's next requests are kicked
//!   at it and left pending, then SIGKILL) and a fresh one starts on the same socket path
//!   and image: QEMU (`-chardev socket,...,reconnect-ms=200`) reconnects and hands it the
//!   ring position, the guest's blocked writes complete, and every chunk lands where it
//!   belongs (the guest reads it all back; the host checks the image): no request is
//!   lost. Against double completions: the new daemon must resume the ring at or past
//!   the requests completed before the stop, and the guest's kernel log must be free of
//!   I/O and virtio_ring errors (a completion of a freed descriptor head trips "is not a
//!   head"; one of a head already reused would not, so this is no proof). A write the
//!   dead daemon performed but did not complete may be performed again: harmless.
//! * A frontend disconnects (its guest powers off) and a second QEMU connects to the same
//!   daemon process, which serves it: it reads what the first guest wrote and writes anew.
//!
//! The guest side is `tests/e2e/guest/vhost-user-reconnect-init.sh`.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{spawn_guest, test_dir, wait_for, Daemon, GuestRun};

const INIT: &str = "vhost-user-reconnect-init.sh";
const IMAGE_SIZE: u64 = 32 << 20;
/// Where the guests' region starts on the disk, and its chunking.
const BASE_KIB: u64 = 1024;
const CHUNK_KIB: u64 = 128;

/// A zero-filled image.
fn blank_image(dir: &Path) -> PathBuf {
    let image = dir.join("disk.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    image
}

/// `unidev serve` of a vhost-user virtio-blk on `image` at `sock`.
fn serve_args(sock: &Path, image: &Path) -> Vec<String> {
    [
        "serve",
        "--transport",
        "vhost-user",
        "--socket-path",
        sock.to_str().unwrap(),
        "virtio-blk",
        "--file",
        image.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// QEMU's vhost-user-blk-pci on `sock`; with `reconnect`, the chardev redials every
/// 200 ms after losing the backend.
fn qemu_args(sock: &Path, reconnect: bool) -> Vec<String> {
    let mut chardev = format!("socket,id=vu0,path={}", sock.display());
    if reconnect {
        chardev.push_str(",reconnect-ms=200");
    }
    vec![
        "-chardev".into(),
        chardev,
        "-device".into(),
        "vhost-user-blk-pci,chardev=vu0".into(),
    ]
}

/// Kernel arguments for the guest init.
fn guest_params(chunks: u64, expect: Option<&str>, write: &str, pause_us: u64) -> String {
    let mut s = format!(
        "unidev.rc_base_kib={BASE_KIB} unidev.rc_chunks={chunks} \
         unidev.rc_chunk_kib={CHUNK_KIB} unidev.rc_write={write} unidev.rc_pause_us={pause_us}"
    );
    if let Some(tag) = expect {
        s.push_str(&format!(" unidev.rc_expect={tag}"));
    }
    s
}

/// Requests are capped at this size in the streaming guest: each chunk is then
/// `CHUNK_KIB / REQUEST_KIB` requests in the ring together.
const REQUEST_KIB: u64 = 32;

/// The guest's pattern `tag` for `len` bytes at disk offset `base`: per 512-byte sector,
/// `unidev-TAG-off-OFFSET` (12 digits) space-padded to 511 bytes and a newline.
fn pattern(tag: &str, base: u64, len: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize);
    for off in (base..base + len).step_by(512) {
        let label = format!("unidev-{tag}-off-{off:012}");
        v.extend_from_slice(format!("{label:<511}\n").as_bytes());
    }
    v
}

/// The image holds pattern `tag` over the first `chunks` chunks of the region and zeros
/// everywhere else.
fn check_image(image: &Path, tag: &str, chunks: u64) {
    let data = std::fs::read(image).unwrap();
    assert_eq!(data.len() as u64, IMAGE_SIZE, "image size changed");
    let base = (BASE_KIB * 1024) as usize;
    let len = (chunks * CHUNK_KIB * 1024) as usize;
    let want = pattern(tag, base as u64, len as u64);
    let got = &data[base..base + len];
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        let sector = (base + i) / 512 * 512;
        panic!(
            "image differs from pattern {tag} at byte {:#x}; that sector holds {:?}",
            base + i,
            String::from_utf8_lossy(&data[sector..sector + 40])
        );
    }
    let stray = data[..base]
        .iter()
        .chain(&data[base + len..])
        .position(|b| *b != 0);
    assert_eq!(stray, None, "bytes written outside the region");
}

/// Chunks the guest reported written so far (markers come in order).
fn chunks_done(console: &str) -> u64 {
    console
        .lines()
        .filter_map(|l| {
            let i = l.find("UNIDEV-RC-CHUNK ")?;
            l[i + 16..].trim().parse::<u64>().ok()
        })
        .max()
        .map_or(0, |n| n + 1)
}

/// Queue start positions the daemon logged (`queue N started at M` → M).
fn queue_starts(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(": queue "))
        .filter_map(|l| {
            let i = l.find(" started at ")?;
            l[i + 12..].trim().parse().ok()
        })
        .collect()
}

fn assert_guest_passed(run: &GuestRun, checks: &[&str], daemon_logs: &str) {
    assert!(run.success, "guest failed:\n{}\n{daemon_logs}", run.log);
    for check in checks {
        assert!(
            run.passed(check),
            "{check} did not pass:\n{}\n{daemon_logs}",
            run.log
        );
    }
}

/// The daemon is SIGKILLed while the guest streams O_DIRECT writes; a fresh daemon on
/// the same socket path and image takes over, and the guest's I/O goes on to the end.
#[test]
fn daemon_killed_and_restarted_under_guest_io() {
    const CHUNKS: u64 = 48;
    const KILL_AFTER: u64 = 8;
    let dir = test_dir("e2e-vu-reconnect-daemon");
    let sock = dir.join("blk.sock");
    let image = blank_image(&dir);
    let args = serve_args(&sock, &image);
    let mut first = Daemon::serve(&dir, "unidev-1", &sock, &strs(&args));
    let mut guest = spawn_guest(
        &dir,
        "stream",
        INIT,
        "virtio_blk",
        &format!(
            "{} unidev.rc_max_kib={REQUEST_KIB}",
            guest_params(CHUNKS, None, "S", 20_000)
        ),
        &qemu_args(&sock, true),
        120,
    );
    guest.wait_for_log(90, "the first chunks", |t| chunks_done(t) >= KILL_AFTER);
    // Stop the daemon at varying points of the guest's write / pause cycle, and let the
    // guest queue its next requests at it (kicked, never completed).
    let jitter = Duration::from_millis(u64::from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
            % 40,
    ));
    std::thread::sleep(jitter);
    first.signal(libc::SIGSTOP);
    let at_stop = chunks_done(&guest.log_text());
    assert!(
        at_stop < CHUNKS,
        "the guest finished before the daemon was stopped"
    );
    std::thread::sleep(Duration::from_millis(700));
    // A chunk whose requests completed just before the stop may be reported late;
    // nothing after it can complete.
    let blocked = chunks_done(&guest.log_text());
    assert!(
        blocked <= at_stop + 1 && blocked < CHUNKS,
        "chunks completed by a stopped daemon: {at_stop} at the stop, {blocked} 0.7 s later"
    );

    // Mid-stream, with requests in flight: the backend vanishes without a word (its
    // socket file stays behind).
    first.child.kill().unwrap();
    let killed = Instant::now();
    first.wait(10);
    std::thread::sleep(Duration::from_millis(1000));
    let still = chunks_done(&guest.log_text());
    assert!(
        still <= at_stop + 1,
        "chunks completed with no daemon: {at_stop} at the stop, {still} with the daemon gone"
    );
    assert!(guest.running(), "QEMU gave up on the lost backend");
    assert!(
        sock.exists(),
        "the killed daemon's socket file should still be there"
    );

    // A fresh daemon replaces the stale socket; QEMU redials and resumes the rings.
    let second = Daemon::start(&dir, "unidev-2", &strs(&args));
    wait_for(20, "the second daemon to listen", || {
        second.log_text().contains("listening on")
    });
    wait_for(20, "QEMU to reconnect", || {
        second.log_text().contains("frontend connected")
    });
    let downtime = killed.elapsed();
    let run = guest.wait();
    let logs = format!(
        "--- first daemon ---\n{}\n--- second daemon ---\n{}",
        first.log_text(),
        second.log_text()
    );
    assert_guest_passed(
        &run,
        &[
            "vda-present",
            "chunks-written",
            "written-read-back",
            "kernel-log",
        ],
        &logs,
    );
    let done = chunks_done(&run.log);
    assert_eq!(done, CHUNKS, "the guest did not report every chunk");
    assert!(
        done > still,
        "no chunk completed after the restart ({still} before)"
    );
    // The second daemon picked the ring up where the guest had got to, not from zero:
    // QEMU handed it the index of the first request the first daemon had not completed
    // (at least the requests of the chunks reported before the kill came before it).
    let resumed = queue_starts(&second.log_text());
    let before = at_stop * (CHUNK_KIB / REQUEST_KIB);
    assert!(
        resumed.first().is_some_and(|&at| at >= before),
        "the second daemon should resume the ring at {before} or later, not {resumed:?}:\n{logs}"
    );
    drop(second);
    check_image(&image, "S", CHUNKS);
    eprintln!(
        "daemon stopped {} ms after the guest reported {KILL_AFTER} chunks, with {at_stop} \
         of {CHUNKS} done, then killed; the guest stalled at {still}; a daemon was back \
         after {:.1} s and resumed the ring at {resumed:?}",
        jitter.as_millis(),
        downtime.as_secs_f64()
    );
}

/// One daemon process, two frontends in turn: the first guest writes pattern A and
/// powers off (QEMU disconnects); a second QEMU reads A back through the same daemon and
/// writes B.
#[test]
fn daemon_serves_a_new_frontend_after_the_first_leaves() {
    const CHUNKS: u64 = 32;
    let dir = test_dir("e2e-vu-reconnect-frontend");
    let sock = dir.join("blk.sock");
    let image = blank_image(&dir);
    let args = serve_args(&sock, &image);
    let mut daemon = Daemon::serve(&dir, "unidev", &sock, &strs(&args));

    let first = spawn_guest(
        &dir,
        "first",
        INIT,
        "virtio_blk",
        &guest_params(CHUNKS, None, "A", 0),
        &qemu_args(&sock, false),
        90,
    )
    .wait();
    assert_guest_passed(
        &first,
        &[
            "vda-present",
            "chunks-written",
            "written-read-back",
            "kernel-log",
        ],
        &daemon.log_text(),
    );
    wait_for(20, "the first frontend's disconnect", || {
        daemon.log_text().contains("frontend disconnected")
    });
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited after its frontend left:\n{}",
        daemon.log_text()
    );
    check_image(&image, "A", CHUNKS);

    let second = spawn_guest(
        &dir,
        "second",
        INIT,
        "virtio_blk",
        &guest_params(CHUNKS, Some("A"), "B", 0),
        &qemu_args(&sock, false),
        90,
    )
    .wait();
    assert_guest_passed(
        &second,
        &[
            "vda-present",
            "expected-read",
            "chunks-written",
            "written-read-back",
            "kernel-log",
        ],
        &daemon.log_text(),
    );
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited after its second frontend left:\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert_eq!(
        log.matches("frontend connected").count(),
        2,
        "one daemon process should have served both frontends:\n{log}"
    );
    drop(daemon);
    check_image(&image, "B", CHUNKS);
}
