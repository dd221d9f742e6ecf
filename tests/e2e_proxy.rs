//! End to end: an existing, unmodified vhost-user backend process — qemu-storage-daemon's
//! vhost-user-blk export — put behind vfio-user by unidev's vhost-user-proxy, and used by
//! a Linux 6.12 guest through QEMU 11.1's vfio-user-pci. The guest's writes land in
//! qemu-storage-daemon's image file.

mod common;

use std::process::{Child, Command, Stdio};

use common::{
    blk_scenario_image, check_blk_scenario, e2e_script, run_guest, test_dir, vfio_user_device,
    wait_for, Daemon,
};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn linux_uses_qemu_storage_daemon_through_vhost_user_proxy() {
    let dir = test_dir("e2e-proxy");
    let image = blk_scenario_image(&dir);
    let qsd_sock = dir.join("qsd.sock");
    let qsd_log = std::fs::File::create(dir.join("qsd.log")).unwrap();
    let _qsd = Kill(
        Command::new("bash")
            .arg(e2e_script("run-in-root.sh"))
            .arg("--share")
            .arg(&dir)
            .arg("--")
            .arg("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,addr.type=unix,addr.path={}",
                qsd_sock.display()
            ))
            .stdin(Stdio::null())
            .stdout(qsd_log.try_clone().unwrap())
            .stderr(qsd_log)
            .spawn()
            .unwrap(),
    );
    wait_for(30, "qemu-storage-daemon's socket", || qsd_sock.exists());
    let sock = dir.join("proxy.sock");
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
            "vhost-user-proxy",
            "--backend-socket",
            qsd_sock.to_str().unwrap(),
            "--virtio-id",
            "2",
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
    let qsd = std::fs::read_to_string(dir.join("qsd.log")).unwrap_or_default();
    check_blk_scenario(
        &guest,
        &image,
        &format!("{log}\n--- qemu-storage-daemon ---\n{qsd}"),
    );
}
