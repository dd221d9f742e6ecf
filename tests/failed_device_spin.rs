//! A failed device's worker stops instead of spinning: a backend whose listener event
//! panics without consuming its fd (which stays readable, and epoll is level-triggered).
//! Its own test binary, so that the process's CPU time is this test's alone.

mod common;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use unidev_transports::daemon::{DaemonAddress, VhostUserDaemon};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// A device type unidev has no config layout for.
const VIRTIO_ID_TEST: u32 = 40;
/// The listener's device event: above the queue (0) and the exit event (1).
const DATA_READY: u16 = 2;

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Panics on its listener's event.
struct PanicOnListener {
    mem: RwLock<Option<Memory>>,
    ready: EventFd,
}

impl VhostUserBackend for PanicOnListener {
    type Bitmap = ();
    type Vring = VringRwLock;
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
    fn set_event_idx(&self, _: bool) {}
    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap() = Some(mem);
        Ok(())
    }
    fn handle_event(
        &self,
        device_event: u16,
        _: EventSet,
        _: &[VringRwLock],
        _: usize,
    ) -> io::Result<()> {
        if device_event == DATA_READY {
            panic!("the listener's data made the backend panic");
        }
        Ok(())
    }
}

/// CPU time (user + system) of this process, in clock ticks.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `after` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_failed_device_does_not_spin_on_its_listener() {
    let dir = common::test_dir("surface-spin");
    let sock = dir.join("spin.sock");
    let backend = Arc::new(PanicOnListener {
        mem: RwLock::new(None),
        ready: EventFd::new(EFD_NONBLOCK).unwrap(),
    });
    let mut daemon = VhostUserDaemon::new(
        "spin".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    daemon.get_epoll_handlers()[0]
        .register_listener(
            backend.ready.as_raw_fd(),
            EventSet::IN,
            u64::from(DATA_READY),
        )
        .unwrap();
    let health = daemon.health();
    daemon
        .start_on(DaemonAddress::vfio_user(&sock, VIRTIO_ID_TEST))
        .unwrap();
    // The listener is served from the start (no queue needed), and its event panics.
    backend.ready.write(1).unwrap();
    common::wait_for(10, "the device to fail", || health.is_failed());
    std::thread::sleep(Duration::from_millis(100));
    let (t0, c0) = (Instant::now(), cpu_ticks());
    std::thread::sleep(Duration::from_millis(600));
    let ticks = cpu_ticks() - c0;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpu = Duration::from_millis(ticks * 1000 / hz);
    assert!(
        cpu < t0.elapsed() / 4,
        "{cpu:?} of CPU in {:?}: the failed device's worker spins",
        t0.elapsed()
    );
    daemon.request_shutdown();
    daemon.wait().unwrap();
}
