//! End to end: the same virtio backends over unidev's vhost-user transport, attached by
//! QEMU 11.1's own vhost-user-blk-pci and vhost-user-rng-pci to a Linux 6.12 guest, with
//! the same guest checks as over vfio-user.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};

use common::{run_guest_args, test_dir, Daemon};

fn vhost_user_args(sock: &std::path::Path, device: &str) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=vu0,path={}", sock.display()),
        "-device".into(),
        format!("{device},chardev=vu0"),
    ]
}

#[test]
fn linux_vhost_user_blk() {
    let dir = test_dir("e2e-vu-blk");
    let sock = dir.join("blk.sock");
    let image = dir.join("disk.img");
    {
        let mut f = std::fs::File::create(&image).unwrap();
        let block: Vec<u8> = (0..1024 * 1024u32)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        for _ in 0..64 {
            f.write_all(&block).unwrap();
        }
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(b"UNIDEV-HOST-MARKER").unwrap();
    }
    let daemon = Daemon::serve(
        &dir,
        "unidev",
        &sock,
        &[
            "serve",
            "--transport",
            "vhost-user",
            "--socket-path",
            sock.to_str().unwrap(),
            "virtio-blk",
            "--file",
            image.to_str().unwrap(),
        ],
    );
    let guest = run_guest_args(
        &dir,
        "virtio-blk-init.sh",
        "virtio_blk",
        "",
        &vhost_user_args(&sock, "vhost-user-blk-pci"),
    );
    let log = daemon.log_text();
    drop(daemon);
    assert!(
        guest.success,
        "guest failed:\n{}\n--- daemon ---\n{log}",
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
    let mut f = std::fs::File::open(&image).unwrap();
    f.seek(SeekFrom::Start(2 << 20)).unwrap();
    let mut got = [0u8; 19];
    f.read_exact(&mut got).unwrap();
    assert_eq!(
        &got, b"UNIDEV-GUEST-MARKER",
        "the guest's synced write is in the image"
    );
}

#[test]
fn linux_vhost_user_rng() {
    let dir = test_dir("e2e-vu-rng");
    let sock = dir.join("rng.sock");
    let daemon = Daemon::serve(
        &dir,
        "unidev",
        &sock,
        &[
            "serve",
            "--transport",
            "vhost-user",
            "--socket-path",
            sock.to_str().unwrap(),
            "virtio-rng",
        ],
    );
    let guest = run_guest_args(
        &dir,
        "virtio-rng-init.sh",
        "virtio-rng",
        "",
        &vhost_user_args(&sock, "vhost-user-rng-pci"),
    );
    let log = daemon.log_text();
    assert!(
        guest.success,
        "guest failed:\n{}\n--- daemon ---\n{log}",
        guest.log
    );
    for check in ["rng-current-virtio", "hwrng-bytes", "hwrng-random"] {
        assert!(guest.passed(check), "{check} did not pass:\n{}", guest.log);
    }
}
