//! End to end, nobody privileged (issue 8): a Linux 6.12 guest under QEMU 11.1 (TCG)
//! uses virtio-blk from unidev over vfio-user (`vfio-user-pci`) and over vhost-user
//! (`vhost-user-blk-pci`) while unidev runs as uid 1500 (no supplementary groups) and
//! QEMU as uid 1501 with supplementary group 1502, both without capabilities. QEMU
//! reaches the socket only through its group: the socket directory is 1500:1502 mode
//! 02750 and the socket 0660 group 1502 (`--socket-mode 0660 --socket-group 1502`).
//! Same guest checks as tests/e2e_virtio.rs and tests/e2e_vhost_user.rs (including the
//! data in the image afterwards); both processes' uids, groups and capabilities are read
//! from /proc while the guest runs. QEMU drops root right after its chroot (run-qemu.sh
//! `--user`).

mod common;
#[path = "common/unprivileged.rs"]
mod unprivileged_common;

use std::path::Path;

use common::{
    blk_scenario_image, check_blk_scenario, spawn_guest_with, vfio_user_device, wait_for,
    GuestOptions,
};
use unprivileged_common::{
    check_daemon_identity, check_identity, proc_status, serve_blk_args, Stage, CLIENT_UID,
    SHARED_GID,
};

/// The virtio-blk guest scenario with unidev as uid 1500 serving over `transport` and
/// QEMU as uid 1501 in group 1502 attaching with `qemu_args(socket)`.
fn unprivileged_blk(transport: &str, qemu_args: impl Fn(&Path) -> Vec<String>) {
    let stage = Stage::new(&format!("e2e-{transport}"));
    let run = stage.socket_dir(SHARED_GID, 0o2750);
    let image = blk_scenario_image(&stage.dir);
    stage.give_to_daemon(&image);
    let sock = run.join("blk.sock");
    let daemon = stage.daemon(
        "unidev",
        unprivileged_common::DAEMON_UID,
        &[],
        &serve_blk_args(transport, sock.to_str().unwrap(), image.to_str().unwrap()),
    );
    wait_for(20, "the daemon's socket", || sock.exists());
    check_daemon_identity(&daemon);

    let options = GuestOptions {
        user: Some(format!("{CLIENT_UID}:{CLIENT_UID}:{SHARED_GID}")),
        ..GuestOptions::default()
    };
    let mut guest = spawn_guest_with(
        &stage.dir,
        "guest",
        "virtio-blk-init.sh",
        "virtio_blk",
        "",
        &qemu_args(&sock),
        180,
        &options,
    );
    // QEMU, while it runs: uid 1501, group 1502, no capabilities.
    let mut qemu = None;
    wait_for(30, "QEMU to start", || {
        qemu = guest.qemu_pid();
        qemu.is_some() || !guest.running()
    });
    let qemu = qemu.unwrap_or_else(|| panic!("QEMU did not run:\n{}", guest.log_text()));
    check_identity(
        &proc_status(qemu),
        CLIENT_UID,
        CLIENT_UID,
        &SHARED_GID.to_string(),
        "QEMU",
    );
    // The guest's I/O reaches the daemon before its checks pass: sample the daemon while
    // it serves too.
    guest.wait_for_log(120, "the guest's first check", |log| {
        log.contains("UNIDEV-E2E-RESULT:")
    });
    check_daemon_identity(&daemon);
    let result = guest.wait();
    let log = daemon.log_text();
    assert!(
        log.contains("connected"),
        "QEMU's connection reached the daemon:\n{log}"
    );
    if transport == "vfio-user" {
        // The daemon names its client by SO_PEERCRED.
        assert!(
            log.contains(&format!("uid {CLIENT_UID}]: client connected")),
            "{log}"
        );
    }
    drop(daemon);
    check_blk_scenario(&result, &image, &log);
}

#[test]
fn linux_virtio_blk_over_vfio_user_with_qemu_and_unidev_unprivileged() {
    unprivileged_blk("vfio-user", |sock| {
        vec!["-device".into(), vfio_user_device(sock)]
    });
}

#[test]
fn linux_vhost_user_blk_with_qemu_and_unidev_unprivileged() {
    unprivileged_blk("vhost-user", |sock| {
        vec![
            "-chardev".into(),
            format!("socket,id=vu0,path={}", sock.display()),
            "-device".into(),
            "vhost-user-blk-pci,chardev=vu0".into(),
        ]
    });
}
