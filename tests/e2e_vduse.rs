//! End to end: the VDUSE transport in a Linux 6.12 guest (issue 5). The host cannot load
//! modules, so unidev runs *inside* a QEMU (TCG) guest whose kernel is the bookworm-
//! backports 6.12 one with vduse, vdpa, virtio_vdpa, vhost_vdpa and virtio_blk loaded
//! (`tests/e2e/guest/vduse-blk-init.sh` holds the scenarios and their checks). The guest
//! has no libc, so the test builds a statically linked unidev first
//! (`RUSTFLAGS='-C target-feature=+crt-static'`, target dir `target/static` so the main
//! build is left alone; `UNIDEV_STATIC_BIN` names a ready one instead).
//!
//! * attached to virtio_vdpa, serving the host's image (a QEMU virtio disk in the guest):
//!   the guest's virtio_blk reads the host's marker, writes a random pattern, syncs and
//!   reads it back; after the guest powered off, the pattern is in the image file here.
//! * attached to vhost_vdpa from a devices file (`unidev run`): `unidev vdpa-info` reports
//!   through the vhost-vdpa ioctls the device id, features and config space unidev
//!   created the device with; a daemon killed then leaves a device the kernel marks broken
//!   on its next request, and a new daemon removes it and creates it again.
//! * killed while attached to virtio_vdpa: I/O on the disk waits (neither completes nor
//!   fails: the 6.12 kernel has no timeout for it), the kernel stays responsive, and a new
//!   unidev takes the device over — the waiting read completes, new writes land in the
//!   image — then, after a clean stop, a third one creates it again.
//!
//! Every daemon runs with `--seccomp kill` (`seccomp = "kill"` in the devices file): its
//! VDUSE thread and vring workers show `Seccomp: 2` while it serves, and the guest's
//! kernel (booted with `audit=1`) logs no seccomp violation. `UNIDEV_E2E_SECCOMP=log`
//! runs them under `log` instead and prints what an allow-list lacks.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{spawn_guest_with, test_dir, GuestOptions, GuestRun};

const INIT: &str = "vduse-blk-init.sh";
const MODULES: &str = "vduse virtio_vdpa vhost_vdpa virtio_blk";
const IMAGE_SIZE: u64 = 32 << 20;
const HOST_MARKER: &[u8] = b"UNIDEV-IMAGE-MARKER";
/// Generous: two guests may run at once, next to other builds, on two slow cores.
const GUEST_TIMEOUT_SECS: u64 = 300;

/// Whether `path` is an ELF executable without a program interpreter (statically linked).
fn is_static_elf(path: &Path) -> Result<bool, String> {
    let b = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let u16_at = |at: usize| b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |at: usize| {
        b.get(at..at + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let u64_at = |at: usize| {
        b.get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if b.get(..5) != Some(b"\x7fELF\x02") {
        return Err(format!("{} is not a 64-bit ELF file", path.display()));
    }
    let bad = || format!("{}: truncated ELF headers", path.display());
    let phoff = u64_at(0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(0x38).ok_or_else(bad)? as usize;
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        if u32_at(phoff + i * phentsize).ok_or_else(bad)? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The statically linked unidev the guest runs: `UNIDEV_STATIC_BIN`, or built once per test
/// process into `target/static` (about a minute from scratch).
fn static_unidev() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("UNIDEV_STATIC_BIN") {
            return Ok(PathBuf::from(p));
        }
        static_build(&["--bin", "unidev"], "unidev")
    });
    let bin = built.clone().unwrap_or_else(|e| panic!("{e}"));
    match is_static_elf(&bin) {
        Ok(true) => bin,
        Ok(false) => panic!(
            "{} is dynamically linked; the guest has no libc",
            bin.display()
        ),
        Err(e) => panic!("{e}"),
    }
}

/// `examples/daemon_blk.rs` linked statically, built once per test process beside the
/// static unidev (`UNIDEV_STATIC_DAEMON_BLK` names a ready one instead).
fn static_daemon_blk() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("UNIDEV_STATIC_DAEMON_BLK") {
            return Ok(PathBuf::from(p));
        }
        static_build(&["--example", "daemon_blk"], "examples/daemon_blk")
    });
    let bin = built.clone().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        is_static_elf(&bin),
        Ok(true),
        "{} is not static",
        bin.display()
    );
    bin
}

/// `cargo build --release` of `what` linked statically into `target/static`; the path of
/// `artifact` (relative to the release directory).
fn static_build(what: &[&str], artifact: &str) -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = root.join("target/static");
    let triple = "x86_64-unknown-linux-gnu";
    let out = Command::new(option_env!("CARGO").unwrap_or("cargo"))
        .current_dir(root)
        .args(["build", "--release", "--target", triple])
        .args(what)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // No debug info: a faster build and a small initramfs (symbols stay).
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        // It would take precedence over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "the static build failed (glibc's static libraries come with libc6-dev):\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(target_dir.join(triple).join("release").join(artifact))
}

/// A zeroed image with the host's marker at 1 MiB.
fn host_image(dir: &Path) -> PathBuf {
    use std::io::Write;
    let image = dir.join("disk.img");
    let mut f = std::fs::File::create(&image).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(HOST_MARKER).unwrap();
    image
}

/// QEMU arguments giving the guest `image` as a virtio disk with serial "unidev-image".
fn image_drive(image: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("file={},format=raw,if=none,id=hostimg", image.display()),
        "-device".into(),
        "virtio-blk-pci,drive=hostimg,serial=unidev-image".into(),
    ]
}

/// The seccomp policy of the guest's daemons: kill, or `UNIDEV_E2E_SECCOMP` (log, to
/// list what an allow-list lacks: audit records in the console as UNIDEV-SECCOMP-AUDIT).
fn seccomp_policy() -> String {
    std::env::var("UNIDEV_E2E_SECCOMP").unwrap_or_else(|_| "kill".into())
}

/// Boot the guest on `scenario` (two vCPUs: virtio_blk uses one queue per CPU at most).
fn run_scenario(dir: &Path, scenario: &str, qemu_args: &[String]) -> GuestRun {
    let mut files = vec![(static_unidev(), "/bin/unidev".into())];
    if scenario == "daemon-surface" {
        files.push((static_daemon_blk(), "/bin/daemon-blk".into()));
    }
    let options = GuestOptions {
        files,
        smp: Some(2),
        ..GuestOptions::default()
    };
    spawn_guest_with(
        dir,
        scenario,
        INIT,
        MODULES,
        &format!(
            "unidev.scenario={scenario} unidev.seccomp={} audit=1",
            seccomp_policy()
        ),
        qemu_args,
        GUEST_TIMEOUT_SECS,
        &options,
    )
    .wait()
}

fn assert_passed(run: &GuestRun, checks: &[&str]) {
    assert!(run.success, "guest failed:\n{}", run.log);
    for check in checks {
        assert!(
            run.log
                .contains(&format!("UNIDEV-E2E-RESULT: PASS {check}\r"))
                || run
                    .log
                    .contains(&format!("UNIDEV-E2E-RESULT: PASS {check}\n")),
            "{check} did not pass:\n{}",
            run.log
        );
    }
}

/// The md5 the guest printed for its pattern `tag`, and where it wrote it (MiB).
fn guest_pattern(run: &GuestRun, tag: &str) -> (String, u64) {
    let v = run
        .value(&format!("UNIDEV-E2E-PATTERN-{tag} "))
        .unwrap_or_else(|| panic!("no pattern {tag} line:\n{}", run.log));
    let mut it = v.split_whitespace();
    let md5 = it.next().unwrap_or_default().to_string();
    let mib = it.next().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
    assert_eq!(md5.len(), 32, "bad pattern line {v:?}");
    (md5, mib)
}

fn md5_of(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The image holds the guest's pattern `tag` where the guest wrote it.
fn assert_pattern_in_image(run: &GuestRun, image: &Path, tag: &str) {
    let (md5, mib) = guest_pattern(run, tag);
    let mut f = std::fs::File::open(image).unwrap();
    f.seek(SeekFrom::Start(mib << 20)).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    f.read_exact(&mut buf).unwrap();
    assert_eq!(
        md5_of(&buf),
        md5,
        "pattern {tag} (1 MiB at {mib} MiB) is not in the image file"
    );
}

fn assert_host_marker_kept(image: &Path) {
    let data = std::fs::read(image).unwrap();
    assert_eq!(data.len() as u64, IMAGE_SIZE, "the image changed size");
    assert_eq!(&data[1 << 20..(1 << 20) + HOST_MARKER.len()], HOST_MARKER);
}

#[test]
fn virtio_vdpa_disk_on_the_host_image() {
    let dir = test_dir("e2e-vduse-virtio-vdpa");
    let image = host_image(&dir);
    let run = run_scenario(&dir, "virtio-vdpa", &image_drive(&image));
    assert_passed(
        &run,
        &[
            "control-node",
            "vv-disk-present",
            "bound-virtio-vdpa",
            "autoprobe-restored",
            "two-queues",
            "capacity",
            "image-marker-read",
            "pattern-A-read-back",
            "sequential-whole-disk",
            "vv-exit-status",
            "vv-vdpa-device-gone",
            "vv-vduse-device-gone",
            "vv-disk-gone",
            "vv-seccomp",
            "vv-after-io-seccomp",
            "no-seccomp-violations",
        ],
    );
    // After the guest powered off: the pattern it wrote through VDUSE is in the file.
    assert_pattern_in_image(&run, &image, "A");
    assert_host_marker_kept(&image);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn vhost_vdpa_device_reports_what_unidev_created_and_a_broken_one_is_recreated() {
    let dir = test_dir("e2e-vduse-vhost-vdpa");
    let run = run_scenario(&dir, "vhost-vdpa", &[]);
    assert_passed(
        &run,
        &[
            "vhost-vdpa-node",
            "bound-vhost-vdpa",
            "no-virtio-disk",
            "autoprobe-restored",
            "first-device-id",
            "first-features",
            "first-config-space",
            "first-capacity",
            "first-num-queues",
            "first-vqs",
            "broken-left-over",
            "open-without-daemon-fails",
            "recreated-node",
            "removed-broken",
            "recreated-device-id",
            "recreated-config-space",
            "vh-exit-status",
            "vh-vdpa-device-gone",
            "vh-vduse-device-gone",
            "vhost-vdpa-node-gone",
            "vh-seccomp",
            "no-seccomp-violations",
        ],
    );
    // Independently of the guest's own comparison: what vdpa-info printed is a virtio-blk
    // of 48 MiB with VERSION_1 and ACCESS_PLATFORM offered.
    let info = |key: &str| run.value(&format!("UNIDEV-VDPA-INFO {key} "));
    assert_eq!(info("device_id").as_deref(), Some("2 (virtio-blk)"));
    assert_eq!(info("blk.capacity").as_deref(), Some("98304"));
    let features = info("features").expect("features line");
    let features = u64::from_str_radix(features.trim_start_matches("0x"), 16).unwrap();
    assert_eq!(features & (3 << 32), 3 << 32, "VERSION_1 | ACCESS_PLATFORM");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn killed_daemon_io_waits_and_a_new_daemon_takes_the_device_over() {
    let dir = test_dir("e2e-vduse-kill");
    let image = host_image(&dir);
    let run = run_scenario(&dir, "kill", &image_drive(&image));
    assert_passed(
        &run,
        &[
            "first-disk-present",
            "pattern-A-read-back",
            "vduse-device-kept",
            "vdpa-device-kept",
            "disk-kept",
            "io-waits-for-a-daemon",
            "kernel-responsive",
            "waiting-io-completed",
            "waiting-io-data",
            "taken-over",
            "same-disk",
            "pattern-B-read-back",
            "second-exit-status",
            "second-vdpa-device-gone",
            "second-vduse-device-gone",
            "second-disk-gone",
            "third-disk-present",
            "third-created",
            "third-reads-pattern-B",
            "third-exit-status",
            "second-seccomp",
            "no-seccomp-violations",
        ],
    );
    // Both daemons' writes are in the image: the one killed, and the one that took over.
    assert_pattern_in_image(&run, &image, "A");
    assert_pattern_in_image(&run, &image, "B");
    assert_host_marker_kept(&image);
    let _ = std::fs::remove_dir_all(&dir);
}

/// An upstream-style main on the drop-in daemon surface (`examples/daemon_blk.rs`) serves
/// over VDUSE by changing only the address it serves on: the guest's virtio_blk uses the
/// host's image through it, and ending its session removes the devices.
#[test]
fn an_upstream_style_main_serves_over_vduse() {
    let dir = test_dir("e2e-vduse-daemon-surface");
    let image = host_image(&dir);
    let run = run_scenario(&dir, "daemon-surface", &image_drive(&image));
    assert_passed(
        &run,
        &[
            "ds-disk-present",
            "ds-bound-virtio-vdpa",
            "ds-image-marker-read",
            "pattern-C-read-back",
            "ds-daemon-exits",
            "ds-exit-status",
            "ds-vdpa-device-gone",
            "ds-vduse-device-gone",
        ],
    );
    assert_pattern_in_image(&run, &image, "C");
    assert_host_marker_kept(&image);
    let _ = std::fs::remove_dir_all(&dir);
}
