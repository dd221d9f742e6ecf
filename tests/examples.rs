//! The device-author examples (`examples/`), run as their binaries and driven by real
//! clients over every network transport they support:
//! * `pci_timer` over vfio-user with unidev's `VfioUserClient`: identity, the register
//!   file, the timer's INTx (fired, acknowledged, re-armed after unmask, cancelled) and its
//!   DMA write into client memory;
//! * `virtio_ramdisk` over vfio-user (unidev's virtio-pci driver) and vhost-user (the
//!   `vhost` crate's `Frontend`): config space, writes read back, FLUSH, GET_ID, IOERR past
//!   the end, UNSUPP for an unknown request; its VDUSE mode fails here with an error that
//!   says what is missing (this host has no VDUSE).
//!
//! Each test asks cargo to build its example first (a no-op when `cargo test` built it
//! already; `cargo test --test examples` alone does not build examples).

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use unidev_testkit::{
    vhost_user, BlkCompletion, BlkSegment, DriverMemory, DriverOptions, VhostUserRing,
    VirtioBlkRequest, VirtioPciDriver,
};
use unidev_transports::vfio_user::codec::{IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_NONE};
use unidev_transports::vfio_user::VfioUserClient;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::VhostUserFrontend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const TIMEOUT: Duration = Duration::from_secs(10);
const BAR0: u32 = 0;
const CONFIG: u32 = 7;
const INTX: u32 = 0;
const VERSION_1: u64 = 1 << 32;
/// VHOST_USER_F_PROTOCOL_FEATURES.
const PROTOCOL_FEATURES: u64 = 1 << 30;
const BLK_F_FLUSH: u64 = 1 << 9;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// The example binary `name` in this test's own profile directory, built (or found up
/// to date) by cargo first: `cargo test --test examples` alone does not build examples.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "--quiet", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().is_some_and(|p| p == "release") {
        cargo.arg("--release");
    }
    assert!(cargo.status().unwrap().success(), "cannot build {name}");
    profile_dir.join("examples").join(name)
}

/// A running example; killed on drop if it did not stop.
struct Running(Child);

impl Running {
    fn start(name: &str, args: &[&str]) -> Running {
        let child = Command::new(example(name))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Running(child)
    }

    /// Close its stdin (which stops it) and expect a clean exit.
    fn stop(mut self) {
        drop(self.0.stdin.take());
        let end = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                let mut err = String::new();
                let _ = self.0.stderr.take().unwrap().read_to_string(&mut err);
                assert!(st.success(), "exit status {st:?}:\n{err}");
                return;
            }
            assert!(Instant::now() < end, "the example did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_socket(sock: &Path) {
    common::wait_for(20, "the example's socket", || sock.exists());
}

/// Wait until `fd` is readable (an interrupt arrived), then consume it.
fn wait_irq(fd: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, TIMEOUT.as_millis() as i32) };
    n == 1 && fd.read().is_ok()
}

fn reg(c: &mut VfioUserClient, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(BAR0, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn set(c: &mut VfioUserClient, offset: u64, value: u32) {
    c.region_write(BAR0, offset, &value.to_le_bytes()).unwrap();
}

#[test]
fn pci_timer_registers_interrupt_and_dma_over_vfio_user() {
    const COUNTER: u64 = 0x04;
    const TIMER: u64 = 0x08;
    const STATUS: u64 = 0x0c;
    let dir = common::test_dir("example-pci-timer");
    let sock = dir.join("timer.sock");
    let example = Running::start("pci_timer", &[sock.to_str().unwrap()]);
    wait_socket(&sock);
    let mut c = VfioUserClient::connect(&sock).unwrap();

    let mut ids = [0u8; 4];
    c.region_read(CONFIG, 0, &mut ids).unwrap();
    assert_eq!(ids, [0x36, 0x1b, 0x05, 0x00], "vendor 1b36, device 0005");
    assert_eq!(c.region_info(BAR0).unwrap().info.size, 0x1000);
    assert_eq!(reg(&mut c, 0), 0x5449_4d52, "ID");
    set(&mut c, COUNTER, 5);
    set(&mut c, COUNTER, 7);
    assert_eq!(reg(&mut c, COUNTER), 12);
    let mut two = [0u8; 2];
    c.region_read(BAR0, COUNTER + 1, &mut two).unwrap();
    assert_eq!(two, [0, 0], "narrow reads see the register's bytes");

    // Client memory the card may write, and an INTx eventfd.
    let mem = DriverMemory::new(1 << 20, 0x1_0000_0000).unwrap();
    let fd = Some((mem.file().as_raw_fd(), 0));
    c.dma_map(mem.iova_base(), mem.size(), true, true, fd)
        .unwrap();
    let slot = mem.alloc(8, 8).unwrap().iova;
    set(&mut c, 0x10, slot as u32);
    set(&mut c, 0x14, (slot >> 32) as u32);
    let intx = EventFd::new(EFD_NONBLOCK).unwrap();
    c.set_irq_eventfds(INTX, 0, &[intx.as_raw_fd()]).unwrap();

    set(&mut c, TIMER, 20);
    assert!(wait_irq(&intx), "the timer raised INTx");
    assert_eq!(reg(&mut c, STATUS), 1);
    let mut count = [0u8; 4];
    mem.read(slot, &mut count).unwrap();
    assert_eq!(
        u32::from_le_bytes(count),
        12,
        "the count was written by DMA"
    );
    set(&mut c, STATUS, 1);
    assert_eq!(reg(&mut c, STATUS), 0, "acknowledged");

    // INTx masks itself when it fires (as vfio-pci's does): unmask, then fire again.
    c.set_irqs(
        IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK,
        INTX,
        0,
        1,
        &[],
        &[],
    )
    .unwrap();
    set(&mut c, COUNTER, 1);
    set(&mut c, TIMER, 10);
    assert!(wait_irq(&intx), "the timer fired again");
    mem.read(slot, &mut count).unwrap();
    assert_eq!(u32::from_le_bytes(count), 13);
    set(&mut c, STATUS, 1);

    // A cancelled timer never fires.
    set(&mut c, TIMER, 100);
    set(&mut c, TIMER, 0);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(reg(&mut c, STATUS), 0, "cancelled");

    drop(c);
    example.stop();
    assert!(!sock.exists(), "the socket is removed on the way out");
}

fn blk_checks(mut run: impl FnMut(&VirtioBlkRequest) -> BlkCompletion) {
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(run(&VirtioBlkRequest::write(5, &data)).status, S_OK);
    let back = run(&VirtioBlkRequest::read(5, 4096));
    assert_eq!((back.status, &back.data), (S_OK, &data));
    let zeros = run(&VirtioBlkRequest::read(0, 512));
    assert!(zeros.data.iter().all(|b| *b == 0));
    assert_eq!(run(&VirtioBlkRequest::flush()).status, S_OK);
    let id = run(&VirtioBlkRequest::get_id());
    assert_eq!(id.status, S_OK);
    assert!(id.data.starts_with(b"unidev-ramdisk"), "{:?}", id.data);
    // 1 MiB is 2048 sectors: a read across the end fails.
    assert_eq!(run(&VirtioBlkRequest::read(2047, 1024)).status, S_IOERR);
    let seg = BlkSegment {
        sector: 0,
        num_sectors: 1,
        flags: 0,
    };
    assert_eq!(run(&VirtioBlkRequest::discard(&[seg])).status, S_UNSUPP);
}

#[test]
fn virtio_ramdisk_over_vfio_user_as_virtio_pci() {
    let dir = common::test_dir("example-ramdisk-vfio-user");
    let sock = dir.join("disk.sock");
    let example = Running::start(
        "virtio_ramdisk",
        &["vfio-user", sock.to_str().unwrap(), "1"],
    );
    wait_socket(&sock);
    let client = VfioUserClient::connect(&sock).unwrap();
    let options = DriverOptions {
        features: BLK_F_FLUSH,
        num_queues: Some(1),
        queue_size: 64,
        memory_size: 4 << 20,
        ..DriverOptions::default()
    };
    let mut d = VirtioPciDriver::new(client, options).unwrap();
    d.init().unwrap();
    assert_eq!(d.virtio_device_type(), Some(2));
    assert_ne!(d.features() & BLK_F_FLUSH, 0);
    let mut capacity = [0u8; 8];
    d.read_config(0, &mut capacity).unwrap();
    assert_eq!(u64::from_le_bytes(capacity), 2048);
    blk_checks(|req| d.blk_request(0, req, TIMEOUT).unwrap());
    drop(d);
    example.stop();
    assert!(!sock.exists());
}

#[test]
fn virtio_ramdisk_over_vhost_user() {
    let dir = common::test_dir("example-ramdisk-vhost-user");
    let sock = dir.join("disk.sock");
    let example = Running::start(
        "virtio_ramdisk",
        &["vhost-user", sock.to_str().unwrap(), "1"],
    );
    wait_socket(&sock);
    let mem = DriverMemory::new(4 << 20, 0x1_0000_0000).unwrap();
    let features = VERSION_1 | PROTOCOL_FEATURES | BLK_F_FLUSH;
    let protocol = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG;
    let ring = VhostUserRing::connect(&sock, &mem, features, protocol, 64).unwrap();
    let (mut fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
    assert_ne!(ring.offered & BLK_F_FLUSH, 0);
    let (_, capacity) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .unwrap();
    assert_eq!(capacity, 2048u64.to_le_bytes());
    blk_checks(|req| vhost_user::blk_request(&mem, &mut vq, &kick, req).unwrap());
    drop(fe);
    example.stop();
    assert!(!sock.exists());
}

#[test]
fn virtio_ramdisk_over_vduse_says_what_is_missing() {
    if Path::new("/dev/vduse/control").exists() {
        eprintln!("skipped: this host has VDUSE (the guest tests cover it)");
        return;
    }
    let out = Command::new(example("virtio_ramdisk"))
        .args(["vduse", "unidev-example0", "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/dev/vduse/control does not exist: VDUSE is not available")
            && err.contains("modprobe vduse"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `examples/daemon_blk.rs`, an upstream-style main on the drop-in daemon surface: it
/// serves one session (the image file gets the writes) and exits when the client goes,
/// as a vhost-device daemon does — over vfio-user and over vhost-user.
#[test]
fn an_upstream_style_main_serves_one_session_over_vfio_user_and_vhost_user() {
    for transport in ["vfio-user", "vhost-user"] {
        let dir = common::test_dir(&format!("example-daemon-blk-{transport}"));
        let sock = dir.join("blk.sock");
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let example = Running::start(
            "daemon_blk",
            &[transport, sock.to_str().unwrap(), image.to_str().unwrap()],
        );
        wait_socket(&sock);
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 253) as u8).collect();
        if transport == "vfio-user" {
            let client = VfioUserClient::connect(&sock).unwrap();
            let options = DriverOptions {
                features: BLK_F_FLUSH,
                num_queues: Some(1),
                queue_size: 64,
                memory_size: 4 << 20,
                ..DriverOptions::default()
            };
            let mut d = VirtioPciDriver::new(client, options).unwrap();
            d.init().unwrap();
            assert_eq!(d.virtio_device_type(), Some(2));
            let c = d
                .blk_request(0, &VirtioBlkRequest::write(8, &data), TIMEOUT)
                .unwrap();
            assert_eq!(c.status, S_OK);
            let back = d
                .blk_request(0, &VirtioBlkRequest::read(8, 4096), TIMEOUT)
                .unwrap();
            assert_eq!((back.status, &back.data), (S_OK, &data));
        } else {
            let mem = DriverMemory::new(4 << 20, 0x1_0000_0000).unwrap();
            let features = VERSION_1 | PROTOCOL_FEATURES | BLK_F_FLUSH;
            let protocol = VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG;
            let ring = VhostUserRing::connect(&sock, &mem, features, protocol, 64).unwrap();
            let (fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
            let c =
                vhost_user::blk_request(&mem, &mut vq, &kick, &VirtioBlkRequest::write(8, &data))
                    .unwrap();
            assert_eq!(c.status, S_OK);
            drop(fe);
        }
        // The session ended with the client: the example exits on its own.
        let mut child = example;
        let end = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(st) = child.0.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < end, "{transport}: the daemon did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{transport}: {status:?}");
        let on_disk = std::fs::read(&image).unwrap();
        assert_eq!(&on_disk[8 * 512..8 * 512 + 4096], &data[..], "{transport}");
        assert!(!sock.exists(), "{transport}: the socket is removed");
    }
}
