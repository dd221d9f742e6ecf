//! End to end: the same virtio backends over unidev's vhost-user transport, attached by
//! QEMU 11.1's own vhost-user-blk-pci and vhost-user-rng-pci to a Linux 6.12 guest, with
//! the same guest checks as over vfio-user.

mod common;

use common::{
    blk_scenario_image, check_blk_scenario, check_rng_scenario, run_guest_args, test_dir, Daemon,
};

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
    let image = blk_scenario_image(&dir);
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
    check_blk_scenario(&guest, &image, &log);
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
    check_rng_scenario(&guest, &daemon.log_text());
}
