//! End to end: QEMU 11.1's own vfio-user client (`vfio-user-pci`) attaches unidev's GPIO
//! card to a Linux 6.12 guest (TCG); the guest's `gpio-pci-idio-16` driver binds, reads
//! exactly the inputs given on the daemon's command line, and its output writes reach the
//! daemon. Uses the harness in tests/e2e (see its README).

mod common;

use std::path::Path;
use std::process::Command;

use common::{test_dir, Daemon};

fn e2e(script: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/e2e")
        .join(script)
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn linux_gpio_driver_binds_reads_inputs_and_writes_outputs() {
    let dir = test_dir("e2e-gpio");
    let sock = dir.join("gpio.sock");
    let (inputs, outputs) = (0xa5c3u16, 0x3c5au16);
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
            "gpio",
            "--inputs",
            &format!("{inputs:#06x}"),
        ],
    );
    let initrd = dir.join("gpio.cpio.gz");
    run(
        Command::new("bash")
            .arg(e2e("mkinitramfs.sh"))
            .arg(&initrd)
            .args([
                "--modules",
                "gpio-pci-idio-16",
                "--init",
                e2e("guest/gpio-init.sh").to_str().unwrap(),
            ]),
        "mkinitramfs",
    );
    let log = dir.join("guest.log");
    let device = format!(
        r#"{{"driver":"vfio-user-pci","socket":{{"path":"{}","type":"unix"}}}}"#,
        sock.display()
    );
    let status = Command::new("bash")
        .arg(e2e("run-qemu.sh"))
        .args(["--initramfs", initrd.to_str().unwrap()])
        .args(["--timeout", "180", "--log", log.to_str().unwrap()])
        .args(["--share", dir.to_str().unwrap()])
        .args([
            "--append",
            &format!("unidev.inputs={inputs:#06x} unidev.outputs={outputs:#06x}"),
        ])
        .args(["--", "-device", &device])
        .status()
        .unwrap();
    let guest = std::fs::read_to_string(&log).unwrap_or_default();
    let daemon_log = daemon.log_text();
    assert!(
        status.success(),
        "guest failed ({status}).\n--- guest log ---\n{guest}\n--- daemon log ---\n{daemon_log}"
    );
    for check in ["driver-bound", "inputs-match", "outputs-written"] {
        assert!(
            guest.contains(&format!("PASS {check}")),
            "{check} did not pass:\n{guest}"
        );
    }
    // The guest's output writes reached the daemon.
    let want = format!("outputs = {outputs:#06x}");
    assert!(
        daemon_log.contains(&want),
        "daemon never logged {want:?}:\n{daemon_log}"
    );
    assert!(daemon_log.contains("client connected"));
}
