//! Helpers shared by unidev's integration tests: temp dirs, the daemon as a child
//! process, and QEMU guest runs. Tools that drive a device's protocol (the virtio-pci
//! driver over vfio-user, vhost-user rings) are in `unidev-testkit`.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A fresh directory for one test.
pub fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("unidev-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The daemon binary built by cargo for these tests.
pub fn unidev_bin() -> &'static str {
    env!("CARGO_BIN_EXE_unidev")
}

/// Wait until `cond` holds, or panic after `secs`.
pub fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for {what}");
}

/// A running daemon whose stderr goes to a log file; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// Start `unidev` with `args`, logging to `dir/name.log`.
    pub fn start(dir: &Path, name: &str, args: &[&str]) -> Daemon {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(unidev_bin())
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    /// Start and wait for the socket at `sock` to appear.
    pub fn serve(dir: &Path, name: &str, sock: &Path, args: &[&str]) -> Daemon {
        let d = Daemon::start(dir, name, args);
        wait_for(20, "the daemon's socket", || sock.exists());
        d
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Send a signal.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Wait for exit (at most `secs`), returning the exit status.
    pub fn wait(&mut self, secs: u64) -> std::process::ExitStatus {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > end {
                panic!("daemon did not exit; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A script of the end-to-end harness (tests/e2e).
pub fn e2e_script(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e")
        .join(script)
}

/// A guest run's outcome: whether the harness reported success, and the console log.
pub struct GuestRun {
    pub success: bool,
    pub log: String,
}

impl GuestRun {
    /// Whether the guest reported `PASS check`.
    pub fn passed(&self, check: &str) -> bool {
        self.log.contains(&format!("PASS {check}"))
    }

    /// The value of a `KEY value` line the guest printed.
    pub fn value(&self, key: &str) -> Option<String> {
        self.log.lines().find_map(|l| {
            let i = l.find(key)?;
            Some(l[i + key.len()..].trim().to_string())
        })
    }
}

/// Boot the e2e guest with `init` (a script under tests/e2e/guest), `modules`, extra
/// kernel arguments and QEMU `-device` JSON strings; `dir` is shared into QEMU's root so
/// socket paths under it work unchanged.
pub fn run_guest(
    dir: &Path,
    init: &str,
    modules: &str,
    append: &str,
    devices: &[String],
) -> GuestRun {
    let args: Vec<String> = devices
        .iter()
        .flat_map(|d| ["-device".to_string(), d.clone()])
        .collect();
    run_guest_args(dir, init, modules, append, &args)
}

/// Like [`run_guest`], with raw QEMU arguments (e.g. `-chardev` + `-device`).
pub fn run_guest_args(
    dir: &Path,
    init: &str,
    modules: &str,
    append: &str,
    qemu_args: &[String],
) -> GuestRun {
    spawn_guest(dir, init, init, modules, append, qemu_args, 180).wait()
}

/// Build the initramfs of guest init `init` as `dir/name.cpio.gz`, with extra `files`
/// (host path, guest path).
fn build_initramfs(
    dir: &Path,
    name: &str,
    init: &str,
    modules: &str,
    files: &[(PathBuf, String)],
) -> PathBuf {
    let initrd = dir.join(format!("{name}.cpio.gz"));
    let mut cmd = Command::new("bash");
    cmd.arg(e2e_script("mkinitramfs.sh"))
        .arg(&initrd)
        .args(["--modules", modules, "--init"])
        .arg(e2e_script("guest").join(init));
    for (src, dest) in files {
        cmd.arg("--file").arg(format!("{}:{dest}", src.display()));
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "mkinitramfs failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    initrd
}

/// Start the e2e guest with `init` in the background, the console going to
/// `dir/name.log` (`name` tells apart several guests of one test), stopped by the
/// harness after `timeout_secs`. Other arguments as in [`run_guest_args`].
pub fn spawn_guest(
    dir: &Path,
    name: &str,
    init: &str,
    modules: &str,
    append: &str,
    qemu_args: &[String],
    timeout_secs: u64,
) -> GuestProcess {
    spawn_guest_with(
        dir,
        name,
        init,
        modules,
        append,
        qemu_args,
        timeout_secs,
        &GuestOptions::default(),
    )
}

/// Less common guest settings.
#[derive(Default, Clone)]
pub struct GuestOptions {
    /// Extra files in the initramfs: (host path, guest path).
    pub files: Vec<(PathBuf, String)>,
    /// Number of vCPUs (the harness's default, 1, when None).
    pub smp: Option<u32>,
    /// Run QEMU as this user, `UID:GID[:GID,...]` (run-qemu.sh's `--user`), without
    /// capabilities; root when None.
    pub user: Option<String>,
}

/// [`spawn_guest`] with [`GuestOptions`].
#[allow(clippy::too_many_arguments)]
pub fn spawn_guest_with(
    dir: &Path,
    name: &str,
    init: &str,
    modules: &str,
    append: &str,
    qemu_args: &[String],
    timeout_secs: u64,
    options: &GuestOptions,
) -> GuestProcess {
    let initrd = build_initramfs(dir, name, init, modules, &options.files);
    let log = dir.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new("bash");
    cmd.arg(e2e_script("run-qemu.sh"))
        .arg("--initramfs")
        .arg(&initrd)
        .arg("--timeout")
        .arg(timeout_secs.to_string())
        .arg("--log")
        .arg(&log)
        .arg("--share")
        .arg(dir);
    if !append.is_empty() {
        cmd.args(["--append", append]);
    }
    if let Some(n) = options.smp {
        cmd.args(["--smp", &n.to_string()]);
    }
    if let Some(user) = &options.user {
        cmd.args(["--user", user]);
    }
    cmd.arg("--");
    cmd.args(qemu_args);
    GuestProcess {
        child: Some(cmd.spawn().unwrap()),
        log,
    }
}

/// A guest started by [`spawn_guest`]: its console can be watched while it runs. Dropped
/// while running, it is stopped (the harness's TERM path, which stops QEMU too).
pub struct GuestProcess {
    child: Option<Child>,
    /// The serial console (and QEMU's messages).
    pub log: PathBuf,
}

impl GuestProcess {
    /// The console output so far.
    pub fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The pid of the QEMU process of this guest, once it runs (a descendant of the
    /// harness running `qemu-system-*`).
    pub fn qemu_pid(&self) -> Option<u32> {
        let harness = self.child.as_ref()?.id();
        let parent_of = |pid: u32| -> Option<u32> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces, not a ')'.
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        std::fs::read_dir("/proc").ok()?.find_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            if !comm.starts_with("qemu-system") {
                return None;
            }
            let mut up = pid;
            for _ in 0..4 {
                up = parent_of(up)?;
                if up == harness {
                    return Some(pid);
                }
            }
            None
        })
    }

    /// Whether the guest (QEMU) is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Wait until the console output satisfies `cond`, or panic after `secs` (or if the
    /// guest ends first) with the console so far.
    pub fn wait_for_log(&mut self, secs: u64, what: &str, mut cond: impl FnMut(&str) -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let text = self.log_text();
            if cond(&text) {
                return;
            }
            if !self.running() {
                // It may have printed the awaited line just before ending.
                let text = self.log_text();
                if cond(&text) {
                    return;
                }
                panic!("the guest ended before {what}:\n{text}");
            }
            if Instant::now() > end {
                panic!("timed out waiting for {what}; console:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the guest to end; the harness's verdict and the console.
    pub fn wait(mut self) -> GuestRun {
        let status = self.child.take().map(|mut c| c.wait().unwrap());
        GuestRun {
            success: status.is_some_and(|s| s.success()),
            log: self.log_text(),
        }
    }
}

impl Drop for GuestProcess {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child's pid; run-qemu.sh's TERM trap stops QEMU.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// QEMU's vfio-user-pci device for a socket.
pub fn vfio_user_device(sock: &Path) -> String {
    format!(
        r#"{{"driver":"vfio-user-pci","socket":{{"path":"{}","type":"unix"}}}}"#,
        sock.display()
    )
}

/// The image of the virtio-blk guest scenario (guest/virtio-blk-init.sh): 64 MiB of a
/// recognizable pattern with the host's marker at 1 MiB.
pub fn blk_scenario_image(dir: &Path) -> PathBuf {
    use std::io::{Seek, SeekFrom, Write};
    let image = dir.join("disk.img");
    let mut f = std::fs::File::create(&image).unwrap();
    let block: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    for _ in 0..64 {
        f.write_all(&block).unwrap();
    }
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(b"UNIDEV-HOST-MARKER").unwrap();
    image
}

/// Check the virtio-blk guest scenario: every guest check passed, the guest's 16 MiB
/// read matches the image (read after the guest's write), and the guest's synced marker
/// is in the image file.
pub fn check_blk_scenario(guest: &GuestRun, image: &Path, daemon_log: &str) {
    use std::io::{Read, Seek, SeekFrom};
    assert!(
        guest.success,
        "guest failed:\n{}\n--- daemon ---\n{daemon_log}",
        guest.log
    );
    for check in [
        "vda-present",
        "host-marker-read",
        "guest-marker-written",
        "sequential-16m",
    ] {
        assert!(guest.passed(check), "{check} did not pass:\n{}", guest.log);
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("head -c 16777216 '{}' | md5sum", image.display()))
        .output()
        .unwrap();
    let want = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        guest.value("UNIDEV-E2E-MD5"),
        Some(want),
        "the guest's 16 MiB read differs from the image"
    );
    let mut f = std::fs::File::open(image).unwrap();
    f.seek(SeekFrom::Start(2 << 20)).unwrap();
    let mut got = [0u8; 19];
    f.read_exact(&mut got).unwrap();
    assert_eq!(
        &got, b"UNIDEV-GUEST-MARKER",
        "the guest's synced write is in the image"
    );
}

/// Check the virtio-rng guest scenario (guest/virtio-rng-init.sh).
pub fn check_rng_scenario(guest: &GuestRun, daemon_log: &str) {
    assert!(
        guest.success,
        "guest failed:\n{}\n--- daemon ---\n{daemon_log}",
        guest.log
    );
    for check in ["rng-current-virtio", "hwrng-bytes", "hwrng-random"] {
        assert!(guest.passed(check), "{check} did not pass:\n{}", guest.log);
    }
}
