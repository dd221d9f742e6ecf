//! `unidev serve --transport vduse` without a kernel: the errors a person meets on a host
//! without VDUSE, with the wrong device type, or with missing arguments. (The device's
//! life with a real kernel is covered by the QEMU guest tests.)

use std::process::Command;

fn unidev(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_unidev"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn scratch_image(name: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!(
        "unidev-vduse-cli-{}-{name}.img",
        std::process::id()
    ));
    std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
    p
}

#[test]
fn a_missing_control_device_names_the_modules_to_load() {
    let img = scratch_image("missing");
    let (ok, err) = unidev(&[
        "serve",
        "--transport",
        "vduse",
        "--name",
        "unidev-test0",
        "--vduse-control",
        "/nonexistent/vduse/control",
        "virtio-blk",
        "--file",
        img.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&img);
    assert!(!ok);
    for needle in [
        "/nonexistent/vduse/control",
        "modprobe vduse",
        "virtio_vdpa",
        "vhost_vdpa",
    ] {
        assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    }
}

#[test]
fn device_types_vduse_refuses_are_reported_before_touching_the_kernel() {
    let (ok, err) = unidev(&[
        "serve",
        "--transport",
        "vduse",
        "--name",
        "rng0",
        "--vduse-control",
        "/nonexistent/vduse/control",
        "virtio-rng",
    ]);
    assert!(!ok);
    assert!(err.contains("virtio-rng"), "{err}");
    assert!(err.contains("virtio-blk (2)"), "{err}");
    assert!(
        !err.contains("modprobe"),
        "the type is checked first:\n{err}"
    );
}

#[test]
fn vduse_arguments_are_checked() {
    let img = scratch_image("args");
    let file = img.to_str().unwrap();
    for (args, needle) in [
        (
            vec![
                "serve",
                "--transport",
                "vduse",
                "virtio-blk",
                "--file",
                file,
            ],
            "--name",
        ),
        (
            vec![
                "serve",
                "--transport",
                "vduse",
                "--name",
                "bad/name",
                "--vduse-control",
                "/nonexistent",
                "virtio-blk",
                "--file",
                file,
            ],
            "invalid VDUSE device name",
        ),
        (
            vec![
                "serve",
                "--transport",
                "vfio-user",
                "--socket-path",
                "/tmp/x.sock",
                "--attach",
                "virtio-vdpa",
                "virtio-blk",
                "--file",
                file,
            ],
            "--name",
        ),
        (
            vec![
                "serve",
                "--transport",
                "vduse",
                "--name",
                "d0",
                "--attach",
                "virtio-pci",
                "virtio-blk",
                "--file",
                file,
            ],
            "virtio-pci",
        ),
        (
            vec![
                "serve",
                "--transport",
                "vduse",
                "--name",
                "d0",
                "--socket-path",
                "/tmp/x.sock",
                "virtio-blk",
                "--file",
                file,
            ],
            "--socket-path",
        ),
        (
            vec!["serve", "--transport", "vduse", "--name", "g0", "gpio"],
            "virtio devices only",
        ),
    ] {
        let (ok, err) = unidev(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(
            err.contains(needle),
            "{args:?}: expected {needle:?} in:\n{err}"
        );
    }
    let _ = std::fs::remove_file(&img);
}
