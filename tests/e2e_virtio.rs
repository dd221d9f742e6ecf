//! End to end: virtio backends written against rust-vmm's `VhostUserBackend` trait run as
//! virtio-pci devices over vfio-user, and a Linux 6.12 guest uses them through QEMU
//! 11.1's `vfio-user-pci` (TCG): virtio-blk and virtio-rng.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};

use common::{run_guest, test_dir, vfio_user_device, Daemon};

#[test]
fn linux_virtio_blk_over_vfio_user() {
    let dir = test_dir("e2e-blk");
    let sock = dir.join("blk.sock");
    let image = dir.join("disk.img");
    // 64 MiB of a recognizable pattern, and the host's marker at 1 MiB.
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
            "vfio-user",
            "--socket-path",
            sock.to_str().unwrap(),
            "virtio-blk",
            "--file",
            image.to_str().unwrap(),
        ],
    );
    let guest = run_guest(
        &dir,
        "virtio-blk-init.sh",
        "virtio_blk",
        "",
        &[vfio_user_device(&sock)],
    );
    drop(daemon);
    assert!(guest.success, "guest failed:\n{}", guest.log);
    for check in [
        "vda-present",
        "host-marker-read",
        "guest-marker-written",
        "sequential-16m",
    ] {
        assert!(guest.passed(check), "{check} did not pass:\n{}", guest.log);
    }
    // The guest read the first 16 MiB after writing its marker: compare with the image
    // as it is now.
    let expect_md5 = {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("head -c 16777216 '{}' | md5sum", image.display()))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        guest.value("UNIDEV-E2E-MD5").as_deref(),
        Some(expect_md5.as_str()),
        "the guest's 16 MiB read differs from the image"
    );
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
fn linux_virtio_rng_over_vfio_user() {
    let dir = test_dir("e2e-rng");
    let sock = dir.join("rng.sock");
    let _daemon = Daemon::serve(
        &dir,
        "unidev",
        &sock,
        &[
            "serve",
            "--transport",
            "vfio-user",
            "--socket-path",
            sock.to_str().unwrap(),
            "virtio-rng",
        ],
    );
    let guest = run_guest(
        &dir,
        "virtio-rng-init.sh",
        "virtio-rng",
        "",
        &[vfio_user_device(&sock)],
    );
    assert!(guest.success, "guest failed:\n{}", guest.log);
    for check in ["rng-current-virtio", "hwrng-bytes", "hwrng-random"] {
        assert!(guest.passed(check), "{check} did not pass:\n{}", guest.log);
    }
}
