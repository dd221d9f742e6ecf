//! End to end: real upstream vhost-user daemons, the crates.io releases as their users
//! install them (`cargo install --locked`, by `tests/e2e/setup-upstream.sh` into the e2e
//! cache), each an unmodified process on a unix socket behind unidev's vhost-user-proxy,
//! presented over vfio-user as a virtio-pci device to a Linux 6.12 guest under QEMU
//! 11.1's vfio-user-pci. The guest's own drivers use each device and print markers; the
//! host side checks what landed (image file, sockets, shared directory).
//! docs/upstream-backends.md has the table of what runs.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::{
    check_rng_scenario, e2e_script, run_guest, run_guest_args, spawn_guest, spawn_guest_with,
    test_dir, unidev_bin, vfio_user_device, wait_for, Daemon, GuestOptions, GuestRun,
};

/// Generous: two guests may run at once, next to other builds, on two slow cores.
const GUEST_TIMEOUT_SECS: u64 = 300;

/// The directory of the upstream daemons' binaries (setup-upstream.sh, once per test
/// process; seconds when they are cached).
fn upstream_bin(name: &str) -> PathBuf {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let out = Command::new("bash")
            .arg(e2e_script("setup-upstream.sh"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run setup-upstream.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "setup-upstream.sh failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    let bin = dir.clone().unwrap_or_else(|e| panic!("{e}")).join(name);
    assert!(bin.exists(), "{} is not installed", bin.display());
    bin
}

/// An upstream daemon: stdout and stderr go to `dir/<name>.log`; killed on drop.
struct Backend {
    child: Child,
    log: PathBuf,
}

impl Backend {
    fn spawn(dir: &Path, name: &str, mut cmd: Command) -> Backend {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Backend { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `unidev serve --transport vfio-user ... vhost-user-proxy --backend-socket B
/// --virtio-id ID ...`, once the backend's socket exists; returns the daemon and its
/// vfio-user socket.
fn serve_proxy(
    dir: &Path,
    backend_sock: &Path,
    virtio_id: u32,
    extra: &[&str],
) -> (Daemon, PathBuf) {
    wait_for(30, "the backend's socket", || backend_sock.exists());
    let sock = dir.join("proxy.sock");
    let id = virtio_id.to_string();
    let mut args = vec![
        "serve",
        "--transport",
        "vfio-user",
        "--socket-path",
        sock.to_str().unwrap(),
        "vhost-user-proxy",
        "--backend-socket",
        backend_sock.to_str().unwrap(),
        "--virtio-id",
        &id,
    ];
    args.extend_from_slice(extra);
    let daemon = Daemon::serve(dir, "unidev", &sock, &args);
    (daemon, sock)
}

/// Both sides' logs, for a failure message.
fn logs(daemon: &Daemon, backend: &Backend) -> String {
    format!(
        "--- unidev ---\n{}\n--- backend ---\n{}",
        daemon.log_text(),
        backend.log_text()
    )
}

fn assert_guest_passed(guest: &GuestRun, checks: &[&str], logs: &str) {
    assert!(guest.success, "guest failed:\n{}\n{logs}", guest.log);
    for check in checks {
        assert!(
            guest.passed(check),
            "{check} did not pass:\n{}\n{logs}",
            guest.log
        );
    }
}

fn md5_of(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
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

// ------------------------------------------------------------------------ virtio-scsi

const SCSI_IMAGE_SIZE: usize = 16 << 20;

/// What guest/scsi-init.sh writes at 2 MiB: 128 blocks of 512 bytes, each
/// "UNIDEV-GUEST-SCSI-NNNN" padded with zeros.
fn scsi_guest_pattern() -> Vec<u8> {
    let mut p = vec![0u8; 128 * 512];
    for i in 0..128 {
        let s = format!("UNIDEV-GUEST-SCSI-{i:04}");
        p[i * 512..i * 512 + s.len()].copy_from_slice(s.as_bytes());
    }
    p
}

#[test]
fn virtio_scsi_disk_of_vhost_device_scsi() {
    let dir = test_dir("e2e-upstream-scsi");
    let image = dir.join("scsi.img");
    let mut data: Vec<u8> = (0..SCSI_IMAGE_SIZE as u32)
        .map(|i| (i * 13 + i / 4096) as u8)
        .collect();
    data[1 << 20..(1 << 20) + 18].copy_from_slice(b"UNIDEV-HOST-MARKER");
    std::fs::write(&image, &data).unwrap();

    let backend_sock = dir.join("scsi.sock");
    let mut cmd = Command::new(upstream_bin("vhost-device-scsi"));
    cmd.arg("--socket-path").arg(&backend_sock).arg(&image);
    let backend = Backend::spawn(&dir, "vhost-device-scsi", cmd);
    // Three queues (control, event, one request queue); the daemon takes rings of at
    // most 128 entries.
    let (daemon, sock) = serve_proxy(
        &dir,
        &backend_sock,
        8,
        &["--queues", "3", "--max-queue-size", "128"],
    );
    // qboot instead of SeaBIOS: SeaBIOS drives a virtio-scsi disk itself before Linux
    // does, and vhost-device-scsi 0.1.0 is built on vhost-user-backend 0.10, which keeps
    // the used index of the previous driver across SET_VRING_BASE (fixed upstream in
    // 0.11, rust-vmm/vhost#180): Linux then sees completions at the wrong slots ("id 0
    // is not a head") and no disk.
    let guest = run_guest_args(
        &dir,
        "scsi-init.sh",
        "virtio_scsi sd_mod",
        "",
        &[
            "-bios".to_string(),
            "qboot.rom".to_string(),
            "-device".to_string(),
            vfio_user_device(&sock),
        ],
    );
    let logs = logs(&daemon, &backend);
    drop(daemon);
    assert_guest_passed(
        &guest,
        &["sda-present", "host-marker-read", "guest-pattern-written"],
        &logs,
    );
    assert_eq!(
        guest.value("UNIDEV-E2E-SECTORS"),
        Some((SCSI_IMAGE_SIZE / 512).to_string()),
        "the disk's size is the image's"
    );
    let pattern = scsi_guest_pattern();
    assert_eq!(
        guest.value("UNIDEV-E2E-PATTERN-MD5"),
        Some(md5_of(&pattern)),
        "the guest wrote the pattern this test expects"
    );
    let after = std::fs::read(&image).unwrap();
    assert_eq!(after.len(), SCSI_IMAGE_SIZE, "the image keeps its size");
    assert!(
        after[2 << 20..(2 << 20) + pattern.len()] == pattern[..],
        "the guest's pattern is in the image file at 2 MiB"
    );
    assert_eq!(
        guest.value("UNIDEV-E2E-MD5"),
        Some(md5_of(&after[..4 << 20])),
        "the guest's read of the first 4 MiB matches the image file"
    );
}

// ----------------------------------------------------------------------- virtio-vsock

/// tests/e2e/guest/vsock.c, built statically with the host's gcc (once per test process).
fn guest_vsock_tool() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-tools");
        std::fs::create_dir_all(&out_dir).map_err(|e| e.to_string())?;
        let bin = out_dir.join("vsock");
        let out = Command::new("gcc")
            .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
            .arg(&bin)
            .arg(e2e_script("guest/vsock.c"))
            .output()
            .map_err(|e| format!("cannot run gcc: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building guest/vsock.c failed (a static glibc comes with libc6-dev):\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(bin)
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

fn read_line(r: &mut impl BufRead) -> String {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    line.trim_end_matches('\n').to_string()
}

#[test]
fn virtio_vsock_of_vhost_device_vsock_both_directions() {
    const GUEST_CID: u32 = 7;
    let dir = test_dir("e2e-upstream-vsock");
    let uds = dir.join("vm.vsock");
    // Guest -> host: vhost-device-vsock forwards a connection to host port 5000 to the
    // unix socket <uds>_5000.
    let g2h = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let g2h_thread = std::thread::spawn(move || -> Result<String, String> {
        let (conn, _) = g2h.accept().map_err(|e| format!("accept: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let line = read_line(&mut r);
        (&conn)
            .write_all(format!("HOST-REPLY {line}\n").as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        Ok(line)
    });

    let backend_sock = dir.join("vsock.sock");
    let mut cmd = Command::new(upstream_bin("vhost-device-vsock"));
    cmd.arg("--guest-cid")
        .arg(GUEST_CID.to_string())
        .arg("--socket")
        .arg(&backend_sock)
        .arg("--uds-path")
        .arg(&uds);
    let backend = Backend::spawn(&dir, "vhost-device-vsock", cmd);
    // rx, tx and event queues.
    let (daemon, sock) = serve_proxy(&dir, &backend_sock, 19, &["--queues", "3"]);
    let options = GuestOptions {
        files: vec![(guest_vsock_tool(), "/bin/vsock".into())],
        ..GuestOptions::default()
    };
    let mut guest = spawn_guest_with(
        &dir,
        "vsock",
        "vsock-init.sh",
        "vmw_vsock_virtio_transport",
        &format!("unidev.cid={GUEST_CID}"),
        &["-device".to_string(), vfio_user_device(&sock)],
        GUEST_TIMEOUT_SECS,
        &options,
    );
    // Host -> guest: connect to <uds>, ask for the guest's port 6000.
    guest.wait_for_log(240, "the guest's vsock listener", |l| {
        l.contains("UNIDEV-VSOCK-LISTENING") || l.contains("FAIL vsock-bound")
    });
    let h2g = (|| -> Result<(String, String), String> {
        let conn = UnixStream::connect(&uds).map_err(|e| format!("connect {uds:?}: {e}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        (&conn)
            .write_all(b"CONNECT 6000\n")
            .map_err(|e| format!("write: {e}"))?;
        let ok = read_line(&mut r);
        (&conn)
            .write_all(b"UNIDEV-HOST-TO-GUEST\n")
            .map_err(|e| format!("write: {e}"))?;
        let echo = read_line(&mut r);
        Ok((ok, echo))
    })();
    let guest = guest.wait();
    let logs = logs(&daemon, &backend);
    drop(daemon);
    assert_guest_passed(
        &guest,
        &["vsock-bound", "guest-cid", "guest-to-host", "host-to-guest"],
        &logs,
    );
    let got = g2h_thread.join().unwrap();
    assert_eq!(
        got,
        Ok("UNIDEV-GUEST-TO-HOST".to_string()),
        "the host's listener got the guest's line"
    );
    let (ok, echo) = h2g.unwrap_or_else(|e| panic!("host -> guest: {e}\n{logs}"));
    assert!(
        ok.starts_with("OK "),
        "vhost-device-vsock accepts CONNECT: {ok:?}"
    );
    assert_eq!(echo, "ECHO UNIDEV-HOST-TO-GUEST", "the guest's answer");
}

// -------------------------------------------------------------------------- virtio-fs

const FS_TAG: &str = "unidevfs";
const HOST_FILE: &str = "UNIDEV-HOST-FILE 0123456789";
const GUEST_FILE: &str = "UNIDEV-GUEST-FILE";

/// A shared directory with the host's file in it.
fn fs_share(dir: &Path) -> PathBuf {
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("host.txt"), format!("{HOST_FILE}\n")).unwrap();
    share
}

fn virtiofsd(dir: &Path, share: &Path, backend_sock: &Path, tag: bool) -> Backend {
    let mut cmd = Command::new(upstream_bin("virtiofsd"));
    cmd.arg("--socket-path")
        .arg(backend_sock)
        .arg("--shared-dir")
        .arg(share);
    if tag {
        cmd.args(["--tag", FS_TAG]);
    }
    Backend::spawn(dir, "virtiofsd", cmd)
}

/// The virtio-fs guest scenario (guest/virtiofs-init.sh) on a proxy's socket.
fn check_fs_guest(dir: &Path, share: &Path, sock: &Path, logs: impl FnOnce() -> String) {
    let guest = run_guest(
        dir,
        "virtiofs-init.sh",
        "",
        &format!("unidev.tag={FS_TAG}"),
        &[vfio_user_device(sock)],
    );
    let logs = logs();
    assert_guest_passed(
        &guest,
        &[
            "fs-tag",
            "fs-mount",
            "host-file-read",
            "guest-file-written",
            "fs-umount",
        ],
        &logs,
    );
    let got = std::fs::read_to_string(share.join("guest.txt")).unwrap_or_default();
    assert_eq!(
        got,
        format!("{GUEST_FILE}\n"),
        "the guest's file is in the host directory"
    );
}

/// virtiofsd with `--tag`: it offers the CONFIG protocol feature, so the proxy reads the
/// tag and the queue count from virtiofsd itself.
#[test]
fn virtio_fs_of_virtiofsd_with_its_tag() {
    let dir = test_dir("e2e-upstream-fs-tag");
    let share = fs_share(&dir);
    let backend_sock = dir.join("fs.sock");
    let backend = virtiofsd(&dir, &share, &backend_sock, true);
    // hiprio and one request queue.
    let (daemon, sock) = serve_proxy(&dir, &backend_sock, 26, &["--queues", "2"]);
    check_fs_guest(&dir, &share, &sock, || logs(&daemon, &backend));
}

/// virtiofsd without `--tag` has no CONFIG protocol feature: the config (tag,
/// num_request_queues) is the device model's, as QEMU's vhost-user-fs-pci holds it.
/// Here the device model is the proxy, told by `--config`.
#[test]
fn virtio_fs_of_virtiofsd_without_config_the_proxy_holds_the_tag() {
    let help = Command::new(unidev_bin())
        .args(["serve", "vhost-user-proxy", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--config"),
        "needs vhost-user-proxy --config (the read-only config of a backend without the \
         CONFIG protocol feature: --config tag={FS_TAG} --config num_request_queues=1); \
         `unidev serve vhost-user-proxy --help` has no such option:\n{help}"
    );
    let dir = test_dir("e2e-upstream-fs-config");
    let share = fs_share(&dir);
    let backend_sock = dir.join("fs.sock");
    let backend = virtiofsd(&dir, &share, &backend_sock, false);
    let tag = format!("tag={FS_TAG}");
    let (daemon, sock) = serve_proxy(
        &dir,
        &backend_sock,
        26,
        &[
            "--queues",
            "2",
            "--config",
            &tag,
            "--config",
            "num_request_queues=1",
        ],
    );
    check_fs_guest(&dir, &share, &sock, || logs(&daemon, &backend));
}

// ------------------------------------------------------------------------- virtio-rng

#[test]
fn virtio_rng_of_vhost_device_rng() {
    let dir = test_dir("e2e-upstream-rng");
    let prefix = dir.join("rng.sock");
    let mut cmd = Command::new(upstream_bin("vhost-device-rng"));
    cmd.arg("--socket-path").arg(&prefix);
    let backend = Backend::spawn(&dir, "vhost-device-rng", cmd);
    // The daemon suffixes its socket paths with 0, 1, ... (--socket-count).
    let backend_sock = dir.join("rng.sock0");
    let (daemon, sock) = serve_proxy(&dir, &backend_sock, 4, &[]);
    let guest = run_guest(
        &dir,
        "virtio-rng-init.sh",
        "virtio_rng",
        "",
        &[vfio_user_device(&sock)],
    );
    check_rng_scenario(&guest, &logs(&daemon, &backend));
}

// ----------------------------------------------------------------------- virtio-sound

#[test]
fn virtio_sound_of_vhost_device_sound() {
    let dir = test_dir("e2e-upstream-sound");
    let backend_sock = dir.join("snd.sock");
    let mut cmd = Command::new(upstream_bin("vhost-device-sound"));
    cmd.arg("--socket")
        .arg(&backend_sock)
        .args(["--backend", "null"]);
    let backend = Backend::spawn(&dir, "vhost-device-sound", cmd);
    // control, event, tx and rx queues; the daemon takes rings of at most 64 entries.
    let (daemon, sock) = serve_proxy(
        &dir,
        &backend_sock,
        25,
        &["--queues", "4", "--max-queue-size", "64"],
    );
    let guest = run_guest(
        &dir,
        "sound-init.sh",
        "virtio_snd",
        "",
        &[vfio_user_device(&sock)],
    );
    assert_guest_passed(
        &guest,
        &["snd-card", "snd-playback", "snd-capture"],
        &logs(&daemon, &backend),
    );
}

// --------------------------------------------------------------------- virtio-console

#[test]
fn virtio_console_of_vhost_device_console_both_directions() {
    let dir = test_dir("e2e-upstream-console");
    // A port of our own (the daemon listens on 127.0.0.1:PORT): ask the kernel for a
    // free one and hand it over.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let prefix = dir.join("console.sock");
    let mut cmd = Command::new(upstream_bin("vhost-device-console"));
    cmd.arg("--socket-path").arg(&prefix).args([
        "--backend",
        "network",
        "--tcp-port",
        &port.to_string(),
    ]);
    let backend = Backend::spawn(&dir, "vhost-device-console", cmd);
    let backend_sock = dir.join("console.sock0");
    // rx, tx, control rx, control tx (MULTIPORT); rings of at most 128 entries.
    let (daemon, sock) = serve_proxy(
        &dir,
        &backend_sock,
        3,
        &["--queues", "4", "--max-queue-size", "128"],
    );
    // The daemon serves one TCP client: the test, connected before the guest starts.
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port))
        .unwrap_or_else(|e| panic!("connect to the console's port: {e}\n{}", backend.log_text()));
    tcp.set_read_timeout(Some(Duration::from_secs(240)))
        .unwrap();
    let mut guest = spawn_guest(
        &dir,
        "console",
        "console-init.sh",
        "",
        "",
        &["-device".to_string(), vfio_user_device(&sock)],
        GUEST_TIMEOUT_SECS,
    );
    // Guest -> host: the guest writes a line to its port (read until it is there, or the
    // connection ends: shut down below once the guest is done).
    let reader = {
        let mut r = tcp.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut got = String::new();
            while !got.contains("UNIDEV-GUEST-TO-HOST") {
                let mut buf = [0u8; 256];
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
            got
        })
    };
    // Host -> guest: once the guest reads, send it a line.
    guest.wait_for_log(240, "the guest reading its console port", |l| {
        l.contains("UNIDEV-CONSOLE-READING") || l.contains("FAIL")
    });
    let _ = (&tcp).write_all(b"UNIDEV-HOST-TO-GUEST\n");
    let guest = guest.wait();
    let _ = tcp.shutdown(std::net::Shutdown::Both);
    let got = reader.join().unwrap();
    let logs = logs(&daemon, &backend);
    drop(daemon);
    assert_guest_passed(
        &guest,
        &[
            "console-port",
            "console-hvc",
            "guest-to-host",
            "host-to-guest",
        ],
        &logs,
    );
    assert!(
        got.contains("UNIDEV-GUEST-TO-HOST"),
        "the host got the guest's line: {got:?}\n{logs}"
    );
}
