//! End to end: virtio backends written against rust-vmm's `VhostUserBackend` trait run as
//! virtio-pci devices over vfio-user, and a Linux 6.12 guest uses them through QEMU
//! 11.1's `vfio-user-pci` (TCG): virtio-blk and virtio-rng.

mod common;

use common::{
    blk_scenario_image, check_blk_scenario, check_rng_scenario, run_guest, test_dir,
    vfio_user_device, Daemon,
};

#[test]
fn linux_virtio_blk_over_vfio_user() {
    let dir = test_dir("e2e-blk");
    let sock = dir.join("blk.sock");
    let image = blk_scenario_image(&dir);
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
    let log = daemon.log_text();
    drop(daemon);
    check_blk_scenario(&guest, &image, &log);
}

#[test]
fn linux_virtio_rng_over_vfio_user() {
    let dir = test_dir("e2e-rng");
    let sock = dir.join("rng.sock");
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
    check_rng_scenario(&guest, &daemon.log_text());
}
