//! The daemon's command line and lifecycle: socket creation rules, socket activation,
//! signals, clear errors; socket group and uid allow-list from the command line and from
//! a devices file.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;

use common::{test_dir, unidev_bin, Daemon};
use unidev_transports::vfio_user::VfioUserClient;

const CONFIG: u32 = 7;

fn read_ids(sock: &std::path::Path) -> (u16, u16) {
    let mut c = VfioUserClient::connect(sock).unwrap();
    let mut b = [0u8; 4];
    c.region_read(CONFIG, 0, &mut b).unwrap();
    (
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
    )
}

#[test]
fn serves_gpio_with_mode_and_stops_cleanly_on_sigterm() {
    let dir = test_dir("sigterm");
    let sock = dir.join("gpio.sock");
    let s = sock.to_str().unwrap();
    let mut d = Daemon::serve(
        &dir,
        "d",
        &sock,
        &[
            "serve",
            "--transport",
            "vfio-user",
            "--socket-path",
            s,
            "--socket-mode",
            "0640",
            "gpio",
            "--inputs",
            "0x1234",
        ],
    );
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    assert_eq!(read_ids(&sock), (0x494f, 0x0dc8));
    d.signal(libc::SIGTERM);
    let st = d.wait(10);
    assert!(st.success(), "exit status {st:?}; log:\n{}", d.log_text());
    assert!(!sock.exists(), "socket removed on shutdown");
    let log = d.log_text();
    assert!(log.contains("gpio"), "log names the device:\n{log}");
    assert!(
        log.contains("client connected"),
        "log names the connection:\n{log}"
    );
}

#[test]
fn sigint_also_stops_with_a_client_attached() {
    let dir = test_dir("sigint");
    let sock = dir.join("gpio.sock");
    let mut d = Daemon::serve(
        &dir,
        "d",
        &sock,
        &[
            "serve",
            "--transport",
            "vfio-user",
            "--socket-path",
            sock.to_str().unwrap(),
            "gpio",
        ],
    );
    let _client = VfioUserClient::connect(&sock).unwrap();
    d.signal(libc::SIGINT);
    assert!(d.wait(10).success());
}

#[test]
fn replaces_a_stale_socket_but_refuses_other_files() {
    let dir = test_dir("paths");
    let sock = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let _d = Daemon::serve(
        &dir,
        "d",
        &sock,
        &[
            "serve",
            "--transport",
            "vfio-user",
            "--socket-path",
            sock.to_str().unwrap(),
            "gpio",
        ],
    );
    common::wait_for(10, "the socket to accept", || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    assert_eq!(read_ids(&sock).0, 0x494f);

    let file = dir.join("notes.txt");
    std::fs::write(&file, b"keep me").unwrap();
    let out = Command::new(unidev_bin())
        .args([
            "serve",
            "--transport",
            "vfio-user",
            "--socket-path",
            file.to_str().unwrap(),
            "gpio",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a socket"),
        "clear error expected, got:\n{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn serves_an_inherited_listening_socket() {
    let dir = test_dir("fd");
    let sock = dir.join("act.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let fd = listener.as_raw_fd();
    // Let the child inherit the listener at fd 3 (socket activation style).
    let mut cmd = Command::new(unidev_bin());
    cmd.args(["serve", "--transport", "vfio-user", "--fd", "3", "gpio"]);
    // SAFETY: pre_exec runs in the forked child before exec; dup2 and fcntl are
    // async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            // dup2 onto itself keeps FD_CLOEXEC, so clear it explicitly.
            if fd == 3 {
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    drop(listener);
    assert_eq!(read_ids(&sock), (0x494f, 0x0dc8));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn bad_arguments_get_clear_errors() {
    for (args, needle) in [
        (
            vec!["serve", "--transport", "vfio-user", "gpio"],
            "socket-path",
        ),
        (
            vec![
                "serve",
                "--transport",
                "vfio-user",
                "--socket-path",
                "/tmp/x.sock",
                "gpio",
                "--inputs",
                "xyz",
            ],
            "hex",
        ),
        (
            vec!["serve", "--transport", "vfio-user", "--fd", "0", "gpio"],
            "not a listening",
        ),
        (
            vec![
                "serve",
                "--transport",
                "carrier-pigeon",
                "--socket-path",
                "/tmp/x",
                "gpio",
            ],
            "carrier-pigeon",
        ),
    ] {
        let out = Command::new(unidev_bin()).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in:\n{err}"
        );
    }
}

#[test]
fn socket_group_and_allowed_uids() {
    use std::os::unix::fs::MetadataExt;
    let dir = test_dir("peers");
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    for (allowed, served) in [(me.wrapping_add(1), false), (me, true)] {
        let sock = dir.join(format!("gpio-{served}.sock"));
        let s = sock.to_str().unwrap();
        let allowed = allowed.to_string();
        let d = Daemon::serve(
            &dir,
            &format!("d-{served}"),
            &sock,
            &[
                "serve",
                "--transport",
                "vfio-user",
                "--socket-path",
                s,
                "--socket-mode",
                "0660",
                "--socket-group",
                "4242",
                "--allow-uid",
                &allowed,
                "gpio",
            ],
        );
        let meta = std::fs::metadata(&sock).unwrap();
        assert_eq!((meta.gid(), meta.mode() & 0o777), (4242, 0o660));
        let answered = VfioUserClient::connect(&sock)
            .and_then(|mut c| c.device_info())
            .is_ok();
        assert_eq!(answered, served, "uid {me}, allowed {allowed}");
        if !served {
            common::wait_for(10, "the refusal in the log", || {
                d.log_text().contains("refusing a connection")
            });
        }
    }
    // A group that does not exist is a clear error.
    let out = Command::new(unidev_bin())
        .args(["serve", "--transport", "vfio-user", "--socket-path"])
        .arg(dir.join("x.sock"))
        .args(["--socket-group", "no-such-group-here", "gpio"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no group named"), "{err}");
}

#[test]
fn socket_group_and_allowed_uids_in_a_devices_file() {
    use std::os::unix::fs::MetadataExt;
    let dir = test_dir("peers-file");
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let (refused, served) = (dir.join("refused.sock"), dir.join("served.sock"));
    let config = dir.join("devices.toml");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nname = \"refused\"\ntype = \"gpio\"\ntransport = \"vfio-user\"\n\
             socket = \"{}\"\nsocket_mode = \"0660\"\nsocket_group = 4242\n\
             allow_uids = [{}]\n\n\
             [[device]]\nname = \"served\"\ntype = \"gpio\"\ntransport = \"vfio-user\"\n\
             socket = \"{}\"\nsocket_group = \"4243\"\nallow_uids = [{}, {me}]\n",
            refused.display(),
            me.wrapping_add(1),
            served.display(),
            me.wrapping_add(7),
        ),
    )
    .unwrap();
    let d = Daemon::start(&dir, "run", &["run", config.to_str().unwrap()]);
    common::wait_for(20, "both sockets", || refused.exists() && served.exists());
    let meta = std::fs::metadata(&refused).unwrap();
    assert_eq!((meta.gid(), meta.mode() & 0o777), (4242, 0o660));
    let meta = std::fs::metadata(&served).unwrap();
    assert_eq!((meta.gid(), meta.mode() & 0o777), (4243, 0o600));
    let answers = |sock: &std::path::Path| {
        VfioUserClient::connect(sock)
            .and_then(|mut c| c.device_info())
            .is_ok()
    };
    assert!(answers(&served), "uid {me} is allowed:\n{}", d.log_text());
    assert!(!answers(&refused), "uid {me} is not allowed");
    common::wait_for(10, "the refusal in the log", || {
        d.log_text().contains("refusing a connection")
    });
    // A group that does not exist stops the start, naming the device and line.
    std::fs::write(
        &config,
        format!(
            "[[device]]\nname = \"g\"\ntype = \"gpio\"\ntransport = \"vfio-user\"\n\
             socket = \"{}\"\nsocket_group = \"no-such-group-here\"\n",
            dir.join("g.sock").display()
        ),
    )
    .unwrap();
    let out = Command::new(unidev_bin())
        .args(["run", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("devices.toml:1: device \"g\": no group named \"no-such-group-here\""),
        "{err}"
    );
}

/// The daemon's options go before or after the device name, as a user types them; each
/// order serves the same device.
#[test]
fn daemon_options_before_or_after_the_device_name() {
    use vhost::vhost_user::Frontend;
    use vhost::VhostBackend;

    let dir = test_dir("order");
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let img = image.to_str().unwrap();
    let sock = dir.join("blk.sock");
    let s = sock.to_str().unwrap();
    for (n, args) in [
        vec![
            "serve",
            "--transport",
            "vhost-user",
            "--socket-path",
            s,
            "virtio-blk",
            "--file",
            img,
        ],
        vec![
            "serve",
            "virtio-blk",
            "--file",
            img,
            "--transport",
            "vhost-user",
            "--socket-path",
            s,
        ],
        vec![
            "serve",
            "--transport",
            "vhost-user",
            "virtio-blk",
            "--socket-path",
            s,
            "--file",
            img,
            "--socket-mode",
            "0640",
        ],
    ]
    .into_iter()
    .enumerate()
    {
        let mut d = Daemon::serve(&dir, &format!("order{n}"), &sock, &args);
        let frontend = Frontend::connect(&sock, 1).unwrap();
        frontend.set_owner().unwrap();
        let features = frontend.get_features().unwrap();
        assert_ne!(
            features & (1 << 32),
            0,
            "{args:?}: VIRTIO_F_VERSION_1 offered"
        );
        drop(frontend);
        if n == 2 {
            let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o640, "a daemon option after the device's options");
        }
        d.signal(libc::SIGTERM);
        assert!(d.wait(10).success(), "{args:?}: {}", d.log_text());
        assert!(!sock.exists());
    }
    // VDUSE options after the device's: parsed (the missing kernel device is what fails,
    // not the command line).
    for args in [
        vec![
            "serve",
            "--transport",
            "vduse",
            "--name",
            "d0",
            "virtio-blk",
            "--file",
            img,
            "--attach",
            "virtio-vdpa",
            "--vduse-control",
            "/nonexistent/vduse/control",
        ],
        vec![
            "serve",
            "virtio-blk",
            "--file",
            img,
            "--vduse-control",
            "/nonexistent/vduse/control",
            "--transport",
            "vduse",
            "--name",
            "d0",
            "--attach",
            "virtio-vdpa",
        ],
    ] {
        let out = Command::new(unidev_bin()).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("/nonexistent/vduse/control") && err.contains("modprobe vduse"),
            "{args:?}: {err}"
        );
    }
}

/// Every device kind of the registry is a `type` of a devices file, with its options
/// under the command line's names: a vhost-user-proxy in a devices file is refused over
/// vhost-user and asks for its backend over vfio-user.
#[test]
fn every_device_kind_is_a_devices_file_type() {
    let dir = test_dir("proxy-file");
    let config = dir.join("devices.toml");
    let backend = dir.join("nobody.sock");
    std::fs::write(
        &config,
        format!(
            "[[device]]\nname = \"p\"\ntype = \"vhost-user-proxy\"\ntransport = \"vhost-user\"\n\
             socket = \"{}\"\nbackend_socket = \"{}\"\nvirtio_id = 4\nqueues = 300\n",
            dir.join("p.sock").display(),
            backend.display()
        ),
    )
    .unwrap();
    let out = Command::new(unidev_bin())
        .args(["run", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in [
        "devices.toml:1: device \"p\": queues 300:",
        "devices.toml:1: device \"p\": vhost-user-proxy puts a vhost-user backend behind vfio-user",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    // Over vfio-user the file is valid: the proxy then needs its backend.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("vhost-user\"\nsocket", "vfio-user\"\nsocket")
        .replace("queues = 300", "queues = 1");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(unidev_bin())
        .args(["run", config.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("vhost-user-proxy: cannot use the backend at")
            && err.contains("nothing started"),
        "{err}"
    );
}

/// vhost-user-proxy's `--max-queue-size` (the largest ring offered to the driver, which a
/// backend such as vhost-device-scsi caps at 128) must be a power of two; a valid one is
/// taken (the daemon then goes on to connect to the backend).
#[test]
fn proxy_max_queue_size_is_a_power_of_two() {
    let dir = test_dir("proxy-queue-size");
    let sock = dir.join("p.sock");
    let backend = dir.join("nobody.sock");
    let run = |size: &str| {
        Command::new(unidev_bin())
            .args(["serve", "--transport", "vfio-user", "--socket-path"])
            .arg(&sock)
            .args(["vhost-user-proxy", "--backend-socket"])
            .arg(&backend)
            .args(["--virtio-id", "8", "--max-queue-size", size])
            .output()
            .unwrap()
    };
    let out = run("100");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("100 is not a power of two"), "{err}");
    let out = run("128");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot use the backend at") && !err.contains("power of two"),
        "{err}"
    );
}
