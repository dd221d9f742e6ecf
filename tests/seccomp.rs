//! The seccomp filter of the threads that handle guest data (issue 7,
//! `unidev_core::sandbox`):
//! * a daemon started with `--seccomp kill` (or `seccomp = "kill"` in a devices file)
//!   serves virtio-blk I/O of every kind (read, write, FLUSH, DISCARD, WRITE_ZEROES,
//!   GET_ID) over vhost-user and vfio-user, and virtio-rng; its vring workers and
//!   interrupt relay show `Seccomp: 2` in /proc while it serves, its other threads do
//!   not, and it stops cleanly on SIGTERM (the filtered threads end under their filter);
//! * a worker that makes a call outside its allow-list (`socket(2)`) kills the process
//!   with SIGSYS under `kill`, and goes on under `log` and `off`. That runs in a child
//!   process (this test binary, re-executed) so the harness survives.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{test_dir, unidev_bin, wait_for, Daemon};
use unidev_testkit::{
    vhost_user, BlkSegment, DriverMemory, DriverOptions, VhostUserRing, VirtioBlkRequest,
    VirtioPciDriver, Virtqueue,
};
use unidev_transports::vfio_user::VfioUserClient;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vmm_sys_util::eventfd::EventFd;

const TIMEOUT: Duration = Duration::from_secs(10);
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_F_DISCARD: u64 = 1 << 13;
const BLK_F_WRITE_ZEROES: u64 = 1 << 14;
const S_OK: u8 = 0;
const IMAGE_SIZE: u64 = 4 << 20;

/// Name and `Seccomp:` mode of every thread of `pid`.
fn thread_modes(pid: u32) -> Vec<(String, u8)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // ended meanwhile
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no Seccomp line in {}", dir.display()));
        out.push((comm.trim().to_string(), mode));
    }
    out
}

/// Every thread whose name starts with one of `filtered` has mode 2, and there is at
/// least one of each; every other thread has mode 0. (Names are cut to 15 bytes:
/// "virtio-irq-relay" is "virtio-irq-rela".)
fn check_filtered(daemon: &Daemon, filtered: &[&str]) {
    let modes = thread_modes(daemon.child.id());
    for prefix in filtered {
        assert!(
            modes.iter().any(|(n, _)| n.starts_with(prefix)),
            "no {prefix}* thread in {modes:?}"
        );
    }
    for (name, mode) in &modes {
        let want = if filtered.iter().any(|p| name.starts_with(p)) {
            2
        } else {
            0
        };
        assert_eq!(*mode, want, "thread {name} of {modes:?}");
    }
}

/// The daemon is still running (not killed by its filter).
fn check_alive(daemon: &mut Daemon) {
    if let Some(st) = daemon.child.try_wait().unwrap() {
        panic!("the daemon ended: {st:?}; log:\n{}", daemon.log_text());
    }
}

/// SIGTERM: the daemon stops cleanly, its filtered threads ending under their filter.
fn stop(mut daemon: Daemon) {
    daemon.signal(libc::SIGTERM);
    let st = daemon.wait(10);
    assert!(
        st.success(),
        "exit status {st:?}; log:\n{}",
        daemon.log_text()
    );
}

fn image(dir: &Path) -> std::path::PathBuf {
    let image = dir.join("disk.img");
    let f = std::fs::File::create(&image).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    image
}

fn serve_blk(dir: &Path, transport: &str, image: &Path) -> Daemon {
    let sock = dir.join("blk.sock");
    Daemon::serve(
        dir,
        transport,
        &sock,
        &[
            "serve",
            "--transport",
            transport,
            "--socket-path",
            sock.to_str().unwrap(),
            "--seccomp",
            "kill",
            "virtio-blk",
            "--file",
            image.to_str().unwrap(),
        ],
    )
}

/// Every kind of virtio-blk request, through `submit` (which runs one and returns how it
/// completed); checks the data.
fn blk_requests(mut submit: impl FnMut(&VirtioBlkRequest) -> (u8, Vec<u8>), round: u8) {
    let data: Vec<u8> = (0..8192u32).map(|i| (i as u8) ^ round).collect();
    assert_eq!(submit(&VirtioBlkRequest::write(8, &data)).0, S_OK);
    let (st, back) = submit(&VirtioBlkRequest::read(8, 8192));
    assert_eq!((st, back == data), (S_OK, true), "read back");
    assert_eq!(submit(&VirtioBlkRequest::flush()).0, S_OK);
    let seg = |sector, flags| BlkSegment {
        sector,
        num_sectors: 8,
        flags,
    };
    assert_eq!(submit(&VirtioBlkRequest::discard(&[seg(8, 0)])).0, S_OK);
    assert_eq!(
        submit(&VirtioBlkRequest::write_zeroes(&[seg(16, 1), seg(64, 0)])).0,
        S_OK
    );
    let (st, back) = submit(&VirtioBlkRequest::read(16, 4096));
    assert_eq!((st, back), (S_OK, vec![0; 4096]), "zeroed");
    let (st, id) = submit(&VirtioBlkRequest::get_id());
    assert_eq!(st, S_OK);
    assert_eq!(id.len(), 20);
}

/// Submit one request on a vhost-user ring and wait for it.
fn vhost_user_request(
    mem: &DriverMemory,
    vq: &mut Virtqueue,
    kick: &EventFd,
    req: &VirtioBlkRequest,
) -> (u8, Vec<u8>) {
    let c = vhost_user::blk_request(mem, vq, kick, req).unwrap();
    (c.status, c.data)
}

#[test]
fn a_daemon_under_kill_serves_virtio_blk_over_vhost_user_with_filtered_workers() {
    let dir = test_dir("seccomp-vhost-user");
    let image = image(&dir);
    let mut daemon = serve_blk(&dir, "vhost-user", &image);
    let sock = dir.join("blk.sock");
    let mem = DriverMemory::new(4 << 20, 0x1_0000_0000).unwrap();
    let features = VERSION_1 | PROTOCOL_FEATURES | BLK_F_FLUSH | BLK_F_DISCARD | BLK_F_WRITE_ZEROES;
    let ring =
        VhostUserRing::connect(&sock, &mem, features, VhostUserProtocolFeatures::MQ, 64).unwrap();
    let (fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
    blk_requests(|r| vhost_user_request(&mem, &mut vq, &kick, r), 1);
    check_alive(&mut daemon);
    check_filtered(&daemon, &["vring-worker-"]);
    // Still serving, under the filter.
    blk_requests(|r| vhost_user_request(&mem, &mut vq, &kick, r), 2);
    check_alive(&mut daemon);
    // The frontend goes away (the queue stops), a new one comes: the worker lives on.
    drop(fe);
    let ring =
        VhostUserRing::connect(&sock, &mem, features, VhostUserProtocolFeatures::MQ, 64).unwrap();
    let (_fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
    blk_requests(|r| vhost_user_request(&mem, &mut vq, &kick, r), 3);
    check_filtered(&daemon, &["vring-worker-"]);
    stop(daemon);
}

#[test]
fn a_daemon_under_kill_serves_virtio_blk_over_vfio_user_with_filtered_workers_and_relay() {
    let dir = test_dir("seccomp-vfio-user");
    let image = image(&dir);
    let mut daemon = serve_blk(&dir, "vfio-user", &image);
    let sock = dir.join("blk.sock");
    let mut d = VirtioPciDriver::new(
        VfioUserClient::connect(&sock).unwrap(),
        DriverOptions {
            features: VERSION_1 | BLK_F_FLUSH | BLK_F_DISCARD | BLK_F_WRITE_ZEROES,
            queue_size: 64,
            memory_size: 4 << 20,
            ..DriverOptions::default()
        },
    )
    .unwrap();
    d.init().unwrap();
    let mut submit = |r: &VirtioBlkRequest| {
        let c = d.blk_request(0, r, TIMEOUT).unwrap();
        (c.status, c.data)
    };
    blk_requests(&mut submit, 1);
    check_alive(&mut daemon);
    check_filtered(&daemon, &["vring-worker-", "virtio-irq-rela"]);
    blk_requests(&mut submit, 2);
    check_alive(&mut daemon);
    check_filtered(&daemon, &["vring-worker-", "virtio-irq-rela"]);
    stop(daemon);
}

#[test]
fn a_devices_file_with_seccomp_kill_filters_every_devices_workers() {
    let dir = test_dir("seccomp-run");
    let image = image(&dir);
    let (blk, rng) = (dir.join("blk.sock"), dir.join("rng.sock"));
    let config = dir.join("devices.toml");
    std::fs::write(
        &config,
        format!(
            "seccomp = \"kill\"\n\n\
             [[device]]\nname = \"blk\"\ntype = \"virtio-blk\"\ntransport = \"vhost-user\"\n\
             socket = \"{}\"\nfile = \"{}\"\n\n\
             [[device]]\nname = \"rng\"\ntype = \"virtio-rng\"\ntransport = \"vhost-user\"\n\
             socket = \"{}\"\n",
            blk.display(),
            image.display(),
            rng.display()
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start(&dir, "run", &["run", config.to_str().unwrap()]);
    wait_for(20, "the sockets", || blk.exists() && rng.exists());
    // virtio-rng: entropy from the worker (getrandom).
    let mem = DriverMemory::new(4 << 20, 0x1_0000_0000).unwrap();
    let ring = VhostUserRing::connect(
        &rng,
        &mem,
        VERSION_1 | PROTOCOL_FEATURES,
        VhostUserProtocolFeatures::MQ,
        64,
    )
    .unwrap();
    let (_fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
    let buf = mem.alloc(4096, 64).unwrap();
    mem.fill(buf.iova, 4096, 0).unwrap();
    vq.add_chain(&[(buf.iova, 4096, true)]).unwrap();
    kick.write(1).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let len = loop {
        if let Some((_, len)) = vq.poll_used().unwrap() {
            break len;
        }
        assert!(Instant::now() < deadline, "rng request timed out");
        std::thread::sleep(Duration::from_micros(200));
    };
    assert_eq!(len, 4096);
    let mut got = vec![0u8; 4096];
    mem.read(buf.iova, &mut got).unwrap();
    assert!(
        got.iter().filter(|&&b| b == 0).count() < 100,
        "random bytes"
    );
    // virtio-blk.
    let mem2 = DriverMemory::new(4 << 20, 0x1_0000_0000).unwrap();
    let features = VERSION_1 | PROTOCOL_FEATURES | BLK_F_FLUSH | BLK_F_DISCARD | BLK_F_WRITE_ZEROES;
    let ring =
        VhostUserRing::connect(&blk, &mem2, features, VhostUserProtocolFeatures::MQ, 64).unwrap();
    let (_fe2, mut vq2, kick2) = (ring.fe, ring.vq, ring.kick);
    blk_requests(|r| vhost_user_request(&mem2, &mut vq2, &kick2, r), 1);
    check_alive(&mut daemon);
    let modes = thread_modes(daemon.child.id());
    let workers = modes
        .iter()
        .filter(|(n, m)| n.starts_with("vring-worker-") && *m == 2)
        .count();
    assert_eq!(workers, 2, "one filtered worker per device: {modes:?}");
    assert!(
        daemon.log_text().contains("seccomp filter (kill)"),
        "{}",
        daemon.log_text()
    );
    stop(daemon);
}

#[test]
fn an_unknown_seccomp_policy_is_a_clear_error() {
    let dir = test_dir("seccomp-bad");
    let out = Command::new(unidev_bin())
        .args(["serve", "--transport", "vhost-user", "--socket-path"])
        .arg(dir.join("x.sock"))
        .args(["--seccomp", "strict", "virtio-rng"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("strict") && err.contains("off") && err.contains("kill"),
        "{err}"
    );
}

// ---- a forbidden call in a filtered worker, in a child process ----

const CHILD_ENV: &str = "UNIDEV_SECCOMP_CHILD";
const CHILD_TEST: &str = "forbidden_call_child";
const RETURNED: &str = "FORBIDDEN-CALL-RETURNED";

/// A device whose worker, on any kick, calls socket(2) — outside every allow-list.
#[derive(Clone)]
struct Forbidden {
    result: Arc<AtomicI32>,
}

impl vhost_user_backend::VhostUserBackend for Forbidden {
    type Bitmap = ();
    type Vring = vhost_user_backend::VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        64
    }

    fn features(&self) -> u64 {
        VERSION_1 | PROTOCOL_FEATURES
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn update_memory(
        &self,
        _mem: vm_memory::GuestMemoryAtomic<vm_memory::GuestMemoryMmap>,
    ) -> std::io::Result<()> {
        Ok(())
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: vmm_sys_util::epoll::EventSet,
        _vrings: &[vhost_user_backend::VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        // SAFETY: socket(2) takes no pointers; the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: closes the descriptor just opened, owned by nobody else.
            unsafe { libc::close(fd) };
        }
        self.result.store(fd.max(-2), Ordering::SeqCst);
        Ok(())
    }
}

/// The child: set the policy named in CHILD_ENV, start a [`Forbidden`] device over
/// vhost-user, kick its queue, and print what socket(2) returned (if the process is
/// still alive to print it).
#[test]
#[ignore = "run by a_forbidden_call_in_a_filtered_worker_kills_only_under_kill"]
fn forbidden_call_child() {
    use unidev_core::memory::DmaSpace;
    use unidev_core::sandbox::{set_worker_policy, SeccompPolicy};
    use unidev_core::virtio::{DispatchOptions, LocalVirtio};
    use unidev_transports::listener;
    use unidev_transports::vhost_user::VhostUserServer;

    let Ok(policy) = std::env::var(CHILD_ENV) else {
        return;
    };
    let policy: SeccompPolicy = policy.parse().unwrap();
    set_worker_policy(policy).unwrap();
    let dir = test_dir(&format!("seccomp-child-{policy}"));
    let sock = dir.join("forbidden.sock");
    let dma = Arc::new(DmaSpace::default());
    let result = Arc::new(AtomicI32::new(-1));
    let backend = Forbidden {
        result: result.clone(),
    };
    let local = LocalVirtio::new(1, backend, &dma, DispatchOptions::default()).unwrap();
    let server = VhostUserServer::new(
        "forbidden",
        listener::bind(&sock, 0o600).unwrap(),
        local,
        dma,
    )
    .unwrap();
    std::thread::spawn(move || server.run());
    let mem = DriverMemory::new(1 << 20, 0x1_0000_0000).unwrap();
    let ring = VhostUserRing::connect(
        &sock,
        &mem,
        VERSION_1 | PROTOCOL_FEATURES,
        VhostUserProtocolFeatures::MQ,
        64,
    )
    .unwrap();
    ring.kick.write(1).unwrap();
    wait_for(10, "the worker's call", || {
        result.load(Ordering::SeqCst) != -1
    });
    println!("{RETURNED} {}", result.load(Ordering::SeqCst));
}

/// Run the child under `policy`: its exit status and output.
fn run_child(policy: &str) -> (std::process::ExitStatus, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([CHILD_TEST, "--exact", "--ignored", "--nocapture"])
        .env(CHILD_ENV, policy);
    // SAFETY: setrlimit in the forked child before exec: no core dump for the SIGSYS.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

#[test]
fn a_forbidden_call_in_a_filtered_worker_kills_only_under_kill() {
    use std::os::unix::process::ExitStatusExt;
    let (status, out) = run_child("kill");
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "kill: the child must die of SIGSYS; {status:?}:\n{out}"
    );
    assert!(!out.contains(RETURNED), "{out}");
    for policy in ["log", "off"] {
        let (status, out) = run_child(policy);
        assert!(status.success(), "{policy}: {status:?}:\n{out}");
        // The call went through (a descriptor, not an error).
        let fd: i32 = out
            .lines()
            .find_map(|l| l.strip_prefix(RETURNED))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{policy}: no {RETURNED} line:\n{out}"));
        assert!(fd >= 0, "{policy}: socket(2) returned {fd}:\n{out}");
    }
}
