//! Faults against the daemon process: clients that die in the middle of I/O, over and
//! over, on both transports (no fd leak, bounded memory, still serving); a SIGKILLed
//! daemon after an acknowledged FLUSH (nothing flushed is lost); a backing file system
//! that runs out of space (the request fails, the device goes on); a frontend that
//! truncates the memory it shared (the daemon survives the SIGBUS).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::{test_dir, wait_for, Daemon};
use unidev_testkit::{
    vhost_user, DriverMemory, DriverOptions, VhostUserRing, VirtioBlkRequest, VirtioPciDriver,
};
use unidev_transports::vfio_user::VfioUserClient;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

const TIMEOUT: Duration = Duration::from_secs(10);
const CYCLES: usize = 1000;
const WARMUP: usize = 50;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;

fn serve_blk(dir: &Path, name: &str, transport: &str, image: &Path) -> Daemon {
    let sock = dir.join(format!("{name}.sock"));
    Daemon::serve(
        dir,
        name,
        &sock,
        &[
            "serve",
            "--transport",
            transport,
            "--socket-path",
            sock.to_str().unwrap(),
            "virtio-blk",
            "--file",
            image.to_str().unwrap(),
        ],
    )
}

/// Open fds and resident KiB of a process.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    (fds, rss)
}

fn vfio_driver(sock: &Path) -> VirtioPciDriver {
    let client = VfioUserClient::connect(sock).unwrap();
    let mut d = VirtioPciDriver::new(
        client,
        DriverOptions {
            num_queues: Some(1),
            queue_size: 64,
            memory_size: 1 << 20,
            ..DriverOptions::default()
        },
    )
    .unwrap();
    d.init().unwrap();
    d
}

/// One vfio-user client life: set the device up, put writes in flight, die.
fn vfio_user_cycle(sock: &Path, n: usize) {
    let mut d = vfio_driver(sock);
    for i in 0..4u64 {
        let req = VirtioBlkRequest::write(i * 8, &[n as u8; 4096]);
        let buf = d.memory().alloc(req.buffer_len(), 64).unwrap();
        let placed = req.place(d.memory(), buf.iova).unwrap();
        d.queue(0).unwrap().add_chain(&placed.chain).unwrap();
    }
    d.kick(0).unwrap();
    // Dropped with requests in flight: the connection closes under them.
}

/// A vhost-user frontend life: memory table, one ring, writes in flight, gone.
fn vhost_user_cycle(sock: &Path, n: usize) {
    let mem = DriverMemory::new(1 << 20, 0x1_0000_0000).unwrap();
    let VhostUserRing { mut vq, kick, .. } = VhostUserRing::connect(
        sock,
        &mem,
        (1 << 32) | (1 << 30),
        VhostUserProtocolFeatures::MQ,
        64,
    )
    .unwrap();
    for i in 0..4u64 {
        let req = VirtioBlkRequest::write(i * 8, &[n as u8; 4096]);
        let buf = mem.alloc(req.buffer_len(), 64).unwrap();
        let placed = req.place(&mem, buf.iova).unwrap();
        vq.add_chain(&placed.chain).unwrap();
    }
    kick.write(1).unwrap();
}

/// Run `cycle` CYCLES times against a daemon; its fds and memory must not grow.
fn cycles_leak_nothing(transport: &str, cycle: fn(&Path, usize)) {
    let dir = test_dir(&format!("faults-cycles-{transport}"));
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let daemon = serve_blk(&dir, "unidev", transport, &image);
    let sock = dir.join("unidev.sock");
    let pid = daemon.child.id();
    for n in 0..WARMUP {
        cycle(&sock, n);
    }
    // The last session ends asynchronously; settle before the baseline.
    std::thread::sleep(Duration::from_millis(300));
    let (fds0, rss0) = fds_and_rss(pid);
    for n in WARMUP..CYCLES {
        cycle(&sock, n);
    }
    let mut last = (0, 0);
    wait_for(10, "the daemon's fds to settle", || {
        last = fds_and_rss(pid);
        last.0 <= fds0
    });
    let (fds1, rss1) = last;
    assert_eq!(fds1, fds0, "fds after {CYCLES} killed clients");
    assert!(
        rss1 < rss0 + 1024,
        "resident memory grew from {rss0} KiB to {rss1} KiB over {CYCLES} clients"
    );
    // Still serving, with the data of a complete request intact.
    match transport {
        "vfio-user" => {
            let mut d = vfio_driver(&sock);
            let c = d
                .blk_request(0, &VirtioBlkRequest::write(100, &[0xab; 512]), TIMEOUT)
                .unwrap();
            assert_eq!(c.status, S_OK);
            let c = d
                .blk_request(0, &VirtioBlkRequest::read(100, 512), TIMEOUT)
                .unwrap();
            assert_eq!((c.status, c.data), (S_OK, vec![0xab; 512]));
        }
        _ => {
            let fe = Frontend::connect(&sock, 1).unwrap();
            fe.set_owner().unwrap();
            assert_ne!(fe.get_features().unwrap() & (1 << 32), 0);
        }
    }
    let log = daemon.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn vfio_user_clients_killed_mid_io_leak_nothing() {
    cycles_leak_nothing("vfio-user", vfio_user_cycle);
}

#[test]
fn vhost_user_frontends_killed_mid_io_leak_nothing() {
    cycles_leak_nothing("vhost-user", vhost_user_cycle);
}

#[test]
fn flushed_writes_survive_a_sigkill_of_the_daemon() {
    let dir = test_dir("faults-flush");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let mut daemon = serve_blk(&dir, "unidev", "vfio-user", &image);
    let sock = dir.join("unidev.sock");
    let mut d = vfio_driver(&sock);
    let pattern = |i: u64| -> Vec<u8> { (0..4096).map(|b| (b as u64 * 7 + i) as u8).collect() };
    for i in 0..16u64 {
        let c = d
            .blk_request(0, &VirtioBlkRequest::write(i * 8, &pattern(i)), TIMEOUT)
            .unwrap();
        assert_eq!(c.status, S_OK);
    }
    let c = d
        .blk_request(0, &VirtioBlkRequest::flush(), TIMEOUT)
        .unwrap();
    assert_eq!(c.status, S_OK, "FLUSH acknowledged");
    daemon.signal(libc::SIGKILL);
    daemon.wait(10);
    drop(d);
    // A new daemon on the same image serves the flushed data, and the file holds it.
    let _daemon = serve_blk(&dir, "unidev2", "vfio-user", &image);
    let mut d = vfio_driver(&dir.join("unidev2.sock"));
    let file = std::fs::File::open(&image).unwrap();
    for i in 0..16u64 {
        let c = d
            .blk_request(0, &VirtioBlkRequest::read(i * 8, 4096), TIMEOUT)
            .unwrap();
        assert_eq!((c.status, &c.data), (S_OK, &pattern(i)), "block {i}");
        let mut on_disk = vec![0u8; 4096];
        file.read_exact_at(&mut on_disk, i * 4096).unwrap();
        assert_eq!(on_disk, pattern(i), "block {i} in the file");
    }
}

/// A tmpfs of 256 KiB under a 4 MiB sparse image: writes beyond the space fail with
/// ENOSPC, which the guest sees as VIRTIO_BLK_S_IOERR; the device goes on serving.
#[test]
fn a_full_file_system_fails_the_write_and_the_device_goes_on() {
    let dir = test_dir("faults-enospc");
    let mnt = dir.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "unidev-enospc"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("SKIP: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let image = mnt.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let _daemon = serve_blk(&dir, "unidev", "vfio-user", &image);
    let mut d = vfio_driver(&dir.join("unidev.sock"));
    let mut statuses = Vec::new();
    for i in 0..128u64 {
        let c = d
            .blk_request(0, &VirtioBlkRequest::write(i * 8, &[0x77; 4096]), TIMEOUT)
            .unwrap();
        statuses.push(c.status);
    }
    let ok = statuses.iter().filter(|s| **s == S_OK).count();
    assert!(ok > 0, "some writes fit");
    assert!(
        statuses[ok..].iter().all(|s| *s == S_IOERR),
        "once full, every write fails with IOERR: {statuses:?}"
    );
    // The device goes on: what was written reads back, reads of the rest give zeros.
    let c = d
        .blk_request(0, &VirtioBlkRequest::read(0, 4096), TIMEOUT)
        .unwrap();
    assert_eq!((c.status, c.data), (S_OK, vec![0x77; 4096]));
    let c = d
        .blk_request(0, &VirtioBlkRequest::read(127 * 8, 4096), TIMEOUT)
        .unwrap();
    assert_eq!((c.status, c.data), (S_OK, vec![0; 4096]));
    // Rewriting a block that has its space still works.
    let c = d
        .blk_request(0, &VirtioBlkRequest::write(0, &[0x78; 4096]), TIMEOUT)
        .unwrap();
    assert_eq!(c.status, S_OK, "rewriting an allocated block still works");
}

fn vfio_user_message(id: u16, command: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&command.to_le_bytes());
    m.extend_from_slice(&((16 + payload.len()) as u32).to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// One daemon, three devices: a client of the first floods requests and never reads a
/// reply, a client of the second sends half a message and stalls; the third device's
/// requests complete meanwhile, each well within the time the stalled sessions are
/// allowed to block (their own device only).
#[test]
fn stalled_clients_do_not_stall_other_devices() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = test_dir("faults-stall");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let sock = |n: &str| dir.join(format!("{n}.sock"));
    let toml = format!(
        "[[device]]\nname = \"gpio\"\ntype = \"gpio\"\ntransport = \"vfio-user\"\nsocket = \"{}\"\n\n\
         [[device]]\nname = \"vblk\"\ntype = \"virtio-blk\"\ntransport = \"vhost-user\"\nsocket = \"{}\"\nfile = \"{}\"\n\n\
         [[device]]\nname = \"blk\"\ntype = \"virtio-blk\"\ntransport = \"vfio-user\"\nsocket = \"{}\"\nfile = \"{}\"\n",
        sock("gpio").display(),
        sock("vblk").display(),
        image.display(),
        sock("blk").display(),
        image.display()
    );
    let config = dir.join("devices.toml");
    std::fs::write(&config, toml).unwrap();
    let _daemon = Daemon::start(&dir, "unidev", &["run", config.to_str().unwrap()]);
    wait_for(20, "the sockets", || {
        ["gpio", "vblk", "blk"].iter().all(|n| sock(n).exists())
    });

    // Flood: VERSION, then thousands of config-space reads whose replies are never read.
    let flood = UnixStream::connect(sock("gpio")).unwrap();
    let mut version = Vec::new();
    version.extend_from_slice(&0u16.to_le_bytes());
    version.extend_from_slice(&2u16.to_le_bytes());
    version.extend_from_slice(b"{\"capabilities\":{}}\0");
    let mut writer = flood.try_clone().unwrap();
    writer
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let flooder = std::thread::spawn(move || {
        let _ = writer.write_all(&vfio_user_message(0, 1, &version));
        let mut read = Vec::new();
        read.extend_from_slice(&0u64.to_le_bytes()); // offset
        read.extend_from_slice(&7u32.to_le_bytes()); // config space
        read.extend_from_slice(&256u32.to_le_bytes());
        for id in 1..20_000u16 {
            if writer.write_all(&vfio_user_message(id, 9, &read)).is_err() {
                break;
            }
        }
    });
    // Half a vhost-user header, then nothing.
    let mut half = UnixStream::connect(sock("vblk")).unwrap();
    half.write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let mut d = vfio_driver(&sock("blk"));
    for i in 0..20u64 {
        let c = d
            .blk_request(
                0,
                &VirtioBlkRequest::write(i * 8, &[i as u8; 4096]),
                Duration::from_secs(3),
            )
            .expect("a request of another device completes while two sessions stall");
        assert_eq!(c.status, S_OK);
    }
    drop(d);
    drop(half);
    drop(flood);
    let _ = flooder.join();
    // The stalled devices serve new clients afterwards.
    wait_for(30, "the flooded device to serve again", || {
        VfioUserClient::connect(&sock("gpio"))
            .and_then(|mut c| c.device_info())
            .is_ok()
    });
    let fe = Frontend::connect(sock("vblk"), 1).unwrap();
    fe.set_owner().unwrap();
    assert_ne!(fe.get_features().unwrap() & (1 << 32), 0);
}

/// A vhost-user frontend shares memory the daemon cannot seal (a memfd without
/// MFD_ALLOW_SEALING, like a tmpfs or hugetlbfs file) and cuts it short under a request's
/// buffers: the device's accesses to the cut pages raise SIGBUS, which used to kill the
/// daemon and every device in it. The request completes (its data is gone with the
/// memory), the daemon logs what happened, and it serves the next frontend.
#[test]
fn a_frontend_truncating_its_shared_memory_does_not_kill_the_daemon() {
    let dir = test_dir("faults-truncate");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0x3cu8; 1 << 20]).unwrap();
    let mut daemon = serve_blk(&dir, "trunc", "vhost-user", &image);
    let sock = dir.join("trunc.sock");
    let mem = DriverMemory::new(1 << 20, 0x1_0000_0000).unwrap();
    let VhostUserRing {
        mut vq, kick, fe, ..
    } = VhostUserRing::connect(
        &sock,
        &mem,
        (1 << 32) | (1 << 30),
        // REPLY_ACK: every message is handled before the memory is cut.
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
        64,
    )
    .unwrap();
    // The rings sit at the start of the memory; the request's buffers past 512 KiB.
    let _pad = mem.alloc(512 << 10, 4096).unwrap();
    let req = VirtioBlkRequest::read(0, 4096);
    let buf = mem.alloc(req.buffer_len(), 4096).unwrap();
    assert!(buf.iova >= mem.iova_base() + (512 << 10));
    let placed = req.place(&mem, buf.iova).unwrap();
    vq.add_chain(&placed.chain).unwrap();
    mem.file()
        .set_len(512 << 10)
        .expect("the memfd is not sealed");
    kick.write(1).unwrap();
    wait_for(10, "the request on truncated memory to complete", || {
        matches!(vq.poll_used(), Ok(Some(_)))
    });
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon died of the truncation; log:\n{}",
        daemon.log_text()
    );
    drop((vq, kick, fe));

    // A new frontend (its SET_MEM_TABLE retires the old mapping) is served normally.
    let mem = DriverMemory::new(1 << 20, 0x1_0000_0000).unwrap();
    // The frontend (the connection) must live until the request completes.
    let VhostUserRing {
        mut vq, kick, fe, ..
    } = VhostUserRing::connect(
        &sock,
        &mem,
        (1 << 32) | (1 << 30),
        VhostUserProtocolFeatures::MQ,
        64,
    )
    .unwrap();
    let done =
        vhost_user::blk_request(&mem, &mut vq, &kick, &VirtioBlkRequest::read(0, 4096)).unwrap();
    assert_eq!(done.status, S_OK);
    assert!(done.data.iter().all(|&b| b == 0x3c));
    drop(fe);
    wait_for(10, "the truncation to be logged", || {
        daemon.log_text().contains("truncated under its mapping")
    });
}
