//! `unidev run devices.toml`: one daemon, many devices across both transports; a
//! misbehaving client of one device leaves the others serving; the file is validated
//! as a whole before anything starts; SIGTERM stops everything.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{test_dir, unidev_bin, wait_for, Daemon};
use unidev_transports::vfio_user::VfioUserClient;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

fn devices_file(dir: &Path) -> (PathBuf, Vec<(PathBuf, &'static str)>) {
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let entries: Vec<(&str, &str, &str)> = vec![
        ("gpio0", "gpio", "vfio-user"),
        ("gpio1", "gpio", "vfio-user"),
        ("blk0", "virtio-blk", "vfio-user"),
        ("blk1", "virtio-blk", "vfio-user"),
        ("rng0", "virtio-rng", "vfio-user"),
        ("vblk0", "virtio-blk", "vhost-user"),
        ("vblk1", "virtio-blk", "vhost-user"),
        ("vrng0", "virtio-rng", "vhost-user"),
        ("vrng1", "virtio-rng", "vhost-user"),
    ];
    let mut text = String::new();
    let mut socks = Vec::new();
    for (name, kind, transport) in entries {
        let sock = dir.join(format!("{name}.sock"));
        text += &format!(
            "[[device]]\nname = \"{name}\"\ntype = \"{kind}\"\ntransport = \"{transport}\"\nsocket = \"{}\"\n",
            sock.display()
        );
        if kind == "virtio-blk" {
            text += &format!("file = \"{}\"\n", image.display());
        }
        if kind == "gpio" {
            text += "inputs = \"0x1234\"\n";
        }
        text += "\n";
        socks.push((sock, transport));
    }
    let path = dir.join("devices.toml");
    std::fs::write(&path, text).unwrap();
    (path, socks)
}

fn answers(sock: &Path, transport: &str) -> bool {
    match transport {
        "vfio-user" => VfioUserClient::connect(sock)
            .and_then(|mut c| c.device_info())
            .map(|i| i.num_regions == 9)
            .unwrap_or(false),
        _ => Frontend::connect(sock, 1)
            .and_then(|f| {
                f.set_owner()?;
                f.get_features()
            })
            .map(|f| f & (1 << 32) != 0)
            .unwrap_or(false),
    }
}

#[test]
fn nine_devices_serve_and_a_bad_client_does_not_disturb_the_others() {
    let dir = test_dir("multi");
    let (config, socks) = devices_file(&dir);
    let mut d = Daemon::start(&dir, "unidev", &["run", config.to_str().unwrap()]);
    wait_for(20, "every socket", || socks.iter().all(|(s, _)| s.exists()));
    for (s, t) in &socks {
        wait_for(10, "an answer", || answers(s, t));
    }
    // Misbehaving clients: half a vfio-user message, then gone; garbage on a vhost-user
    // socket, then gone.
    {
        let mut c = UnixStream::connect(&socks[2].0).unwrap();
        c.write_all(&[1, 0, 1, 0, 0xff, 0xff]).unwrap();
        let mut v = UnixStream::connect(&socks[5].0).unwrap();
        v.write_all(&[0xde; 7]).unwrap();
    }
    for (s, t) in &socks {
        wait_for(20, "an answer after the bad clients", || answers(s, t));
    }
    d.signal(libc::SIGTERM);
    let st = d.wait(15);
    assert!(st.success(), "exit {st:?}:\n{}", d.log_text());
    assert!(socks.iter().all(|(s, _)| !s.exists()), "sockets removed");
    assert!(d.log_text().contains("all 9 devices stopped"));
}

#[test]
fn a_bad_file_is_rejected_whole_with_locations_and_nothing_starts() {
    let dir = test_dir("multi-bad");
    let good = dir.join("ok.sock");
    let text = format!(
        r#"[[device]]
name = "fine"
type = "virtio-rng"
transport = "vfio-user"
socket = "{good}"

[[device]]
name = "disk"
type = "virtio-blk"
transport = "vfio-user"
socket = "{bad}"
file = "/nonexistent.img"
block_size = 1000

[[device]]
name = "fine"
type = "gpio"
transport = "vhost-user"
socket = "{good}"
queues = 2

[[device]]
type = "teleporter"
transport = "carrier-pigeon"
socket = "{other}"
"#,
        good = good.display(),
        bad = dir.join("bad.sock").display(),
        other = dir.join("other.sock").display()
    );
    let path = dir.join("devices.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(unidev_bin())
        .args(["run", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "devices.toml:7: device \"disk\": block_size 1000",
        "devices.toml:7: device \"disk\": file /nonexistent.img does not exist",
        "devices.toml:15: device \"fine\": the name is already used",
        "is already used",
        "option `queues` does not apply to gpio",
        "needs transport = \"vfio-user\"",
        "unknown transport \"carrier-pigeon\"",
        "unknown device type \"teleporter\"",
        "nothing started",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    assert!(!good.exists(), "no socket was created");

    // Syntax errors name the line too; unknown keys are refused.
    std::fs::write(&path, "[[device]]\nname = \"x\"\ncolour = \"blue\"\n").unwrap();
    let out = Command::new(unidev_bin())
        .args(["run", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("devices.toml:3") && err.contains("colour"),
        "{err}"
    );
}
