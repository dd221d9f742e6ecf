//! End to end: QEMU 11.1's own vfio-user client (`vfio-user-pci`) attaches unidev's GPIO
//! card to a Linux 6.12 guest (TCG); the guest's `gpio-pci-idio-16` driver binds, reads
//! exactly the inputs given on the daemon's command line, and its output writes reach the
//! daemon. Uses the harness in tests/e2e (see its README).

mod common;

use common::{run_guest, test_dir, vfio_user_device, Daemon};

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
    let guest = run_guest(
        &dir,
        "gpio-init.sh",
        "gpio-pci-idio-16",
        &format!("unidev.inputs={inputs:#06x} unidev.outputs={outputs:#06x}"),
        &[vfio_user_device(&sock)],
    );
    let daemon_log = daemon.log_text();
    assert!(
        guest.success,
        "guest failed.\n--- guest log ---\n{}\n--- daemon log ---\n{daemon_log}",
        guest.log
    );
    for check in ["driver-bound", "inputs-match", "outputs-written"] {
        assert!(guest.passed(check), "{check} did not pass:\n{}", guest.log);
    }
    // The guest's output writes reached the daemon.
    let want = format!("outputs = {outputs:#06x}");
    assert!(
        daemon_log.contains(&want),
        "daemon never logged {want:?}:\n{daemon_log}"
    );
    assert!(daemon_log.contains("client connected"));
}
