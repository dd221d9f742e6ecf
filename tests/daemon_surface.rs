//! Backends written the way rust-vmm's vhost-device backends are, served through
//! unidev's drop-in for vhost-user-backend's daemon (`unidev_transports::daemon`) over
//! vfio-user and vhost-user, driven end to end by the test kit's drivers:
//!
//! * a vsock-like backend that registers its own listener fd on its worker
//!   (`get_epoll_handlers()[0].register_listener`) and writes host data to the guest from
//!   it;
//! * a scsi-like backend without the CONFIG protocol feature whose `get_config` and
//!   `set_config` panic (behind vhost-user, QEMU owns that config): unidev's device model
//!   keeps the config and the backend is never asked;
//! * a backend that panics in `handle_event` on a request the guest chooses, in a process
//!   with another device that keeps serving during and after the panic; the panicking
//!   device asks for a reset, and works again after one.

mod common;

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use unidev_testkit::vhost_user::run_chain;
use unidev_testkit::{DriverMemory, DriverOptions, VhostUserRing, VirtioPciDriver};
use unidev_transports::daemon::{DaemonAddress, VhostUserDaemon};
use unidev_transports::vfio_user::VfioUserClient;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const TIMEOUT: Duration = Duration::from_secs(10);
const STATUS_NEEDS_RESET: u8 = 0x40;
const VIRTIO_ID_VSOCK: u32 = 19;
const VIRTIO_ID_SCSI: u32 = 8;
/// A device type unidev has no config layout for: its config is the backend's.
const VIRTIO_ID_TEST: u32 = 40;

type Memory = GuestMemoryAtomic<GuestMemoryMmap>;

/// Complete the next available chain of `vring` by writing `data` into its first
/// device-writable buffer (what every vhost-device backend's handle_event does).
fn complete_one(vring: &VringRwLock, mem: &Memory, data: &[u8]) -> bool {
    let m = mem.memory();
    let chain = vring
        .get_mut()
        .get_queue_mut()
        .pop_descriptor_chain(m.clone());
    let Some(chain) = chain else {
        return false;
    };
    let head = chain.head_index();
    let mut written = 0;
    for desc in chain {
        if desc.is_write_only() && written == 0 {
            let n = data.len().min(desc.len() as usize);
            m.write_slice(&data[..n], desc.addr()).unwrap();
            written = n as u32;
        }
    }
    vring.add_used(head, written).unwrap();
    vring.signal_used_queue().unwrap();
    true
}

/// The first byte of the next available chain's first device-readable buffer, and the
/// chain's head (without completing it).
fn peek_request(
    vring: &VringRwLock,
    mem: &Memory,
) -> Option<(u16, u8, Option<vm_memory::GuestAddress>)> {
    let m = mem.memory();
    let chain = vring
        .get_mut()
        .get_queue_mut()
        .pop_descriptor_chain(m.clone())?;
    let head = chain.head_index();
    let mut first = 0;
    let mut out = None;
    for desc in chain {
        if !desc.is_write_only() {
            first = m.read_obj::<u8>(desc.addr()).unwrap_or(0);
        } else if out.is_none() {
            out = Some(desc.addr());
        }
    }
    Some((head, first, out))
}

// ---- a vsock-like backend: its own listener fd, host data written to the guest ----

/// Like vhost-device-vsock: host data arrives on a backend-owned fd registered with the
/// daemon's epoll handler, and is copied into the guest's receive queue.
struct HostToGuest {
    mem: RwLock<Option<Memory>>,
    pending: Mutex<VecDeque<Vec<u8>>>,
    data_ready: EventFd,
    /// Queue events handled: once the guest's kick was seen, data can reach the guest
    /// only through the listener.
    kicks: std::sync::atomic::AtomicUsize,
}

/// The listener's device event: above the queues (0) and the exit event (1).
const DATA_READY: u16 = 2;

impl HostToGuest {
    fn new() -> Arc<Self> {
        Arc::new(HostToGuest {
            mem: RwLock::new(None),
            pending: Mutex::new(VecDeque::new()),
            data_ready: EventFd::new(EFD_NONBLOCK).unwrap(),
            kicks: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn send(&self, data: &[u8]) {
        self.pending.lock().unwrap().push_back(data.to_vec());
        self.data_ready.write(1).unwrap();
    }

    fn deliver(&self, vring: &VringRwLock) {
        let Some(mem) = self.mem.read().unwrap().clone() else {
            return;
        };
        let mut pending = self.pending.lock().unwrap();
        while let Some(data) = pending.front() {
            if !complete_one(vring, &mem, data) {
                return; // no buffer yet: delivered at the next kick
            }
            pending.pop_front();
        }
    }
}

impl VhostUserBackend for HostToGuest {
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
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = 42u64.to_le_bytes(); // guest_cid
        (offset..offset + size)
            .map(|i| cfg.get(i as usize).copied().unwrap_or(0))
            .collect()
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
        vrings: &[VringRwLock],
        thread: usize,
    ) -> io::Result<()> {
        assert_eq!(thread, 0);
        match device_event {
            0 => {
                self.deliver(&vrings[0]);
                self.kicks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            DATA_READY => {
                let _ = self.data_ready.read();
                self.deliver(&vrings[0]);
            }
            other => panic!("unexpected device event {other}"),
        }
        Ok(())
    }
}

/// An upstream-style `main`: build the backend and the daemon, register the backend's
/// listener on the first worker, serve one session.
fn serve_host_to_guest(
    backend: Arc<HostToGuest>,
    address: DaemonAddress,
) -> (JoinHandle<()>, unidev_transports::daemon::ShutdownHandle) {
    let mut daemon = VhostUserDaemon::new(
        "host-to-guest".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let handlers = daemon.get_epoll_handlers();
    assert_eq!(handlers.len(), 1);
    // 0 (the queue) and 1 (the exit event) are taken, as with vhost-user-backend.
    for taken in [0, 1] {
        let e = handlers[0]
            .register_listener(backend.data_ready.as_raw_fd(), EventSet::IN, taken)
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }
    handlers[0]
        .register_listener(
            backend.data_ready.as_raw_fd(),
            EventSet::IN,
            u64::from(DATA_READY),
        )
        .unwrap();
    daemon.start_on(address).unwrap();
    let shutdown = daemon.shutdown_handle().unwrap();
    let thread = std::thread::spawn(move || {
        daemon.wait().unwrap();
    });
    (thread, shutdown)
}

fn wait_socket(sock: &std::path::Path) {
    common::wait_for(10, "the daemon's socket", || sock.exists());
}

fn pci_driver(sock: &std::path::Path, queues: u16) -> VirtioPciDriver {
    let client = VfioUserClient::connect(sock).unwrap();
    let mut d = VirtioPciDriver::new(
        client,
        DriverOptions {
            features: VERSION_1,
            num_queues: Some(queues),
            queue_size: 16,
            memory_size: 4 << 20,
            ..DriverOptions::default()
        },
    )
    .unwrap();
    d.init().unwrap();
    d
}

#[test]
fn a_backend_listener_writes_to_the_guest_over_vfio_user() {
    let dir = common::test_dir("surface-h2g-vfio");
    let sock = dir.join("h2g.sock");
    let backend = HostToGuest::new();
    let (thread, shutdown) = serve_host_to_guest(
        backend.clone(),
        DaemonAddress::vfio_user(&sock, VIRTIO_ID_VSOCK),
    );
    wait_socket(&sock);
    let mut d = pci_driver(&sock, 1);
    assert_eq!(d.virtio_device_type(), Some(VIRTIO_ID_VSOCK as u16));
    let mut cid = [0u8; 8];
    d.read_config(0, &mut cid).unwrap();
    assert_eq!(
        u64::from_le_bytes(cid),
        42,
        "guest_cid from the backend's get_config"
    );
    // A buffer posted before any data: filled when the host sends.
    let buf = d.memory().alloc(64, 64).unwrap();
    let head = d.add_chain(0, &[(buf.iova, 64, true)]).unwrap();
    d.kick(0).unwrap();
    common::wait_for(10, "the kick", || {
        backend.kicks.load(std::sync::atomic::Ordering::SeqCst) > 0
    });
    assert!(d.poll_used(0).unwrap().is_none(), "nothing sent yet");
    // From here on only the listener can deliver.
    backend.send(b"hello guest");
    let (h, len) = d.wait_used(0, TIMEOUT).unwrap();
    assert_eq!((h, len), (head, 11));
    let mut got = [0u8; 11];
    d.memory().read(buf.iova, &mut got).unwrap();
    assert_eq!(&got, b"hello guest");
    // Data sent before a buffer is there: delivered when the guest posts one.
    backend.send(b"early");
    std::thread::sleep(Duration::from_millis(50));
    let head = d.add_chain(0, &[(buf.iova, 64, true)]).unwrap();
    d.kick(0).unwrap();
    assert_eq!(d.wait_used(0, TIMEOUT).unwrap(), (head, 5));
    drop(d);
    // serve() returns once the session ends, as upstream's does.
    thread.join().unwrap();
    drop(shutdown);
}

#[test]
fn a_backend_listener_writes_to_the_guest_over_vhost_user() {
    let dir = common::test_dir("surface-h2g-vhost");
    let sock = dir.join("h2g.sock");
    let backend = HostToGuest::new();
    // A plain path means vhost-user, as upstream's serve(&socket).
    let (thread, _shutdown) =
        serve_host_to_guest(backend.clone(), DaemonAddress::vhost_user(&sock));
    wait_socket(&sock);
    let mem = DriverMemory::new(4 << 20, 0x1_0000_0000).unwrap();
    let ring = VhostUserRing::connect(
        &sock,
        &mem,
        VERSION_1 | PROTOCOL_FEATURES,
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
        16,
    )
    .unwrap();
    let (fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
    let buf = mem.alloc(64, 64).unwrap();
    let head = vq.add_chain(&[(buf.iova, 64, true)]).unwrap();
    if vq.kick_prepare().unwrap() {
        kick.write(1).unwrap();
    }
    common::wait_for(10, "the kick", || {
        backend.kicks.load(std::sync::atomic::Ordering::SeqCst) > 0
    });
    assert!(vq.poll_used().unwrap().is_none(), "nothing sent yet");
    // From here on only the listener can deliver.
    backend.send(b"from the host");
    let deadline = Instant::now() + TIMEOUT;
    let used = loop {
        if let Some((h, len)) = vq.poll_used().unwrap() {
            assert_eq!(h, head);
            break len;
        }
        assert!(Instant::now() < deadline, "the host's data never arrived");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(used, 13);
    let mut got = [0u8; 13];
    mem.read(buf.iova, &mut got).unwrap();
    assert_eq!(&got, b"from the host");
    drop(fe);
    thread.join().unwrap();
}

// ---- a scsi-like backend: no CONFIG, config calls panic ----

/// Like vhost-device-scsi where QEMU owns the config: `get_config`/`set_config` panic.
/// Its one request queue answers every request with one byte 0x5a.
struct NoConfig {
    mem: RwLock<Option<Memory>>,
}

impl VhostUserBackend for NoConfig {
    type Bitmap = ();
    type Vring = VringRwLock;
    fn num_queues(&self) -> usize {
        3 // control, event, one request queue
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
    fn get_config(&self, _: u32, _: u32) -> Vec<u8> {
        panic!("Access to configuration space is not supported.");
    }
    fn set_config(&self, _: u32, _: &[u8]) -> io::Result<()> {
        panic!("Access to configuration space is not supported.");
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
        vrings: &[VringRwLock],
        _: usize,
    ) -> io::Result<()> {
        let mem = self.mem.read().unwrap().clone().unwrap();
        if let Some(vring) = vrings.get(usize::from(device_event)) {
            while complete_one(vring, &mem, &[0x5a]) {}
        }
        Ok(())
    }
}

fn serve_daemon<T>(name: &str, backend: T, address: DaemonAddress) -> JoinHandle<()>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + Send + 'static,
{
    let mut daemon = VhostUserDaemon::new(
        name.into(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    daemon.start_on(address).unwrap();
    std::thread::spawn(move || {
        daemon.wait().unwrap();
    })
}

fn u32_config(d: &mut VirtioPciDriver, offset: u32) -> u32 {
    let mut b = [0u8; 4];
    d.read_config(offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn a_backend_without_config_is_never_asked_over_vfio_user() {
    let dir = common::test_dir("surface-noconfig");
    let sock = dir.join("scsi.sock");
    let thread = serve_daemon(
        "no-config",
        Arc::new(NoConfig {
            mem: RwLock::new(None),
        }),
        DaemonAddress::vfio_user(&sock, VIRTIO_ID_SCSI),
    );
    wait_socket(&sock);
    let mut d = pci_driver(&sock, 3);
    // The device model's virtio-scsi config: num_queues (request queues), sense_size,
    // cdb_size — what Linux's virtio_scsi reads and writes.
    assert_eq!(u32_config(&mut d, 0), 1);
    assert_eq!(u32_config(&mut d, 20), 96);
    assert_eq!(u32_config(&mut d, 24), 32);
    d.write_config(20, &64u32.to_le_bytes()).unwrap();
    d.write_config(24, &16u32.to_le_bytes()).unwrap();
    assert_eq!((u32_config(&mut d, 20), u32_config(&mut d, 24)), (64, 16));
    // Read-only fields ignore writes.
    d.write_config(0, &9u32.to_le_bytes()).unwrap();
    assert_eq!(u32_config(&mut d, 0), 1);
    assert_eq!(
        d.device_status().unwrap() & STATUS_NEEDS_RESET,
        0,
        "no panic reached"
    );
    // The device serves requests.
    let buf = d.memory().alloc(64, 64).unwrap();
    let head = d.add_chain(2, &[(buf.iova, 8, true)]).unwrap();
    d.kick(2).unwrap();
    assert_eq!(d.wait_used(2, TIMEOUT).unwrap(), (head, 1));
    drop(d);
    thread.join().unwrap();
}

#[test]
fn a_backend_without_config_is_not_offered_config_over_vhost_user() {
    use vhost::vhost_user::{Frontend, VhostUserFrontend};
    use vhost::VhostBackend;
    let dir = common::test_dir("surface-noconfig-vu");
    let sock = dir.join("scsi.sock");
    let thread = serve_daemon(
        "no-config",
        Arc::new(NoConfig {
            mem: RwLock::new(None),
        }),
        DaemonAddress::vhost_user(&sock),
    );
    wait_socket(&sock);
    let mut fe = Frontend::connect(&sock, 3).unwrap();
    fe.set_owner().unwrap();
    assert_ne!(fe.get_features().unwrap() & PROTOCOL_FEATURES, 0);
    let offered = fe.get_protocol_features().unwrap();
    assert!(offered.contains(VhostUserProtocolFeatures::MQ));
    assert!(
        !offered.contains(VhostUserProtocolFeatures::CONFIG),
        "the backend does not serve its config: the VMM keeps it"
    );
    drop(fe);
    thread.join().unwrap();
}

// ---- a backend that panics on a request the guest chooses ----

/// Answers each request with its first byte plus one; a request whose first byte is 0xff
/// makes it panic (a backend bug a guest can trigger).
struct Fragile {
    mem: RwLock<Option<Memory>>,
    /// Panic while holding the vring's lock (as vhost-device-vsock's rx path can),
    /// which poisons it.
    hold_vring: bool,
}

impl Fragile {
    fn new(hold_vring: bool) -> Arc<Self> {
        Arc::new(Fragile {
            mem: RwLock::new(None),
            hold_vring,
        })
    }
}

impl VhostUserBackend for Fragile {
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
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }
    fn set_event_idx(&self, _: bool) {}
    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap() = Some(mem);
        Ok(())
    }
    fn handle_event(
        &self,
        _: u16,
        _: EventSet,
        vrings: &[VringRwLock],
        _: usize,
    ) -> io::Result<()> {
        let mem = self.mem.read().unwrap().clone().unwrap();
        let vring = &vrings[0];
        while let Some((head, first, out)) = peek_request(vring, &mem) {
            if first == 0xff {
                if self.hold_vring {
                    let _state = vring.get_mut();
                    panic!("request {head} poisoned the backend and its vring");
                }
                panic!("request {head} poisoned the backend");
            }
            let mut written = 0;
            if let Some(out) = out {
                mem.memory().write_obj(first.wrapping_add(1), out).unwrap();
                written = 1;
            }
            vring.add_used(head, written).unwrap();
            vring.signal_used_queue().unwrap();
        }
        Ok(())
    }
}

/// One request on queue 0 of `d`: a device-readable byte `value` and a device-writable
/// byte for the answer; waits at most `timeout` for the answer.
fn ask(d: &mut VirtioPciDriver, value: u8, timeout: Duration) -> Option<u8> {
    let req = d.memory().alloc(1, 64).unwrap();
    let resp = d.memory().alloc(1, 64).unwrap();
    d.memory().write(req.iova, &[value]).unwrap();
    d.memory().write(resp.iova, &[0]).unwrap();
    let head = d
        .add_chain(0, &[(req.iova, 1, false), (resp.iova, 1, true)])
        .unwrap();
    d.kick(0).unwrap();
    let answer = match d.wait_used(0, timeout) {
        Ok((h, 1)) if h == head => {
            let mut b = [0u8];
            d.memory().read(resp.iova, &mut b).unwrap();
            Some(b[0])
        }
        _ => None,
    };
    let _ = d.memory().free(req);
    let _ = d.memory().free(resp);
    answer
}

#[test]
fn a_backend_panic_costs_its_device_only_over_vfio_user() {
    panic_costs_its_device_only(false);
}

/// The backend panics while holding its vring's lock: the lock is poisoned, and unidev
/// must neither touch that vring again (nor abort when the device is dropped) nor leave
/// the device unusable: a reset gives it fresh vrings.
#[test]
fn a_backend_panic_inside_a_vring_lock_is_recovered_by_a_reset() {
    panic_costs_its_device_only(true);
}

fn panic_costs_its_device_only(hold_vring: bool) {
    let dir = common::test_dir(&format!("surface-panic-vfio-{hold_vring}"));
    let fragile_sock = dir.join("fragile.sock");
    let other_sock = dir.join("other.sock");
    let fragile = serve_daemon(
        "fragile",
        Fragile::new(hold_vring),
        DaemonAddress::vfio_user(&fragile_sock, VIRTIO_ID_TEST),
    );
    let other = serve_daemon(
        "other",
        Fragile::new(false),
        DaemonAddress::vfio_user(&other_sock, VIRTIO_ID_TEST),
    );
    wait_socket(&fragile_sock);
    wait_socket(&other_sock);
    // The other device serves I/O all along, from its own thread.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let io = {
        let (stop, served, sock) = (stop.clone(), served.clone(), other_sock.clone());
        std::thread::spawn(move || {
            let mut d = pci_driver(&sock, 1);
            let mut n = 0u8;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n = n.wrapping_add(1) % 0xf0;
                assert_eq!(
                    ask(&mut d, n, TIMEOUT),
                    Some(n + 1),
                    "the other device answers"
                );
                served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    let mut d = pci_driver(&fragile_sock, 1);
    assert_eq!(ask(&mut d, 7, TIMEOUT), Some(8));
    let before = served.load(std::sync::atomic::Ordering::SeqCst);
    // The poisoned request: never answered; the device asks for a reset and raises a
    // configuration-change interrupt.
    assert_eq!(ask(&mut d, 0xff, Duration::from_millis(500)), None);
    d.wait_config_irq(TIMEOUT).unwrap();
    assert_ne!(d.device_status().unwrap() & STATUS_NEEDS_RESET, 0);
    // Every other device of the process goes on.
    let deadline = Instant::now() + TIMEOUT;
    while served.load(std::sync::atomic::Ordering::SeqCst) < before + 20 {
        assert!(Instant::now() < deadline, "the other device stalled");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A driver reset brings the device back (the backend's state allows it).
    d.reset().unwrap();
    d.init().unwrap();
    assert_eq!(d.device_status().unwrap() & STATUS_NEEDS_RESET, 0);
    assert_eq!(ask(&mut d, 41, TIMEOUT), Some(42));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    io.join().unwrap();
    drop(d);
    fragile.join().unwrap();
    other.join().unwrap();
}

#[test]
fn a_backend_panic_closes_its_vhost_user_connection_only() {
    let dir = common::test_dir("surface-panic-vhost");
    let sock = dir.join("fragile.sock");
    // serve() once per connection, with a fresh backend each time, as upstream mains do.
    let server = {
        let sock = sock.clone();
        std::thread::spawn(move || {
            for _ in 0..2 {
                let mut daemon = VhostUserDaemon::new(
                    "fragile".into(),
                    Fragile::new(false),
                    GuestMemoryAtomic::new(GuestMemoryMmap::new()),
                )
                .unwrap();
                daemon.serve(&sock).unwrap();
            }
        })
    };
    wait_socket(&sock);
    let connect = || {
        let mem = DriverMemory::new(4 << 20, 0x1_0000_0000).unwrap();
        let ring = VhostUserRing::connect(
            &sock,
            &mem,
            VERSION_1 | PROTOCOL_FEATURES,
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
            16,
        )
        .unwrap();
        (mem, ring)
    };
    let (mem, ring) = connect();
    let (mut fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
    let req = mem.alloc(1, 64).unwrap();
    let resp = mem.alloc(1, 64).unwrap();
    mem.write(req.iova, &[0xff]).unwrap();
    vq.add_chain(&[(req.iova, 1, false), (resp.iova, 1, true)])
        .unwrap();
    kick.write(1).unwrap();
    // The connection is closed: the next request fails instead of hanging.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        use vhost::vhost_user::VhostUserFrontend;
        if fe.get_protocol_features().is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "the connection stayed open");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop((fe, vq, kick, mem));
    // The next frontend gets a working device (a fresh backend: serve() returned, and the
    // upstream-style loop serves again on a new socket).
    let deadline = Instant::now() + TIMEOUT;
    let (mem, ring) = loop {
        let mem = DriverMemory::new(4 << 20, 0x1_0000_0000).unwrap();
        match VhostUserRing::connect(
            &sock,
            &mem,
            VERSION_1 | PROTOCOL_FEATURES,
            VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
            16,
        ) {
            Ok(ring) => break (mem, ring),
            Err(e) => {
                assert!(Instant::now() < deadline, "no second session: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let (fe, mut vq, kick) = (ring.fe, ring.vq, ring.kick);
    let req = mem.alloc(1, 64).unwrap();
    let resp = mem.alloc(1, 64).unwrap();
    mem.write(req.iova, &[3]).unwrap();
    let used = run_chain(
        &mut vq,
        &kick,
        &[(req.iova, 1, false), (resp.iova, 1, true)],
    )
    .unwrap();
    assert_eq!(used, 1);
    let mut b = [0u8];
    mem.read(resp.iova, &mut b).unwrap();
    assert_eq!(b[0], 4);
    drop((fe, vq, kick));
    server.join().unwrap();
}

// ---- across connections: a fresh backend per session, or one kept ----

/// Counts the requests it answered (its answer is the count so far), on queue 0 only:
/// queue 1 is in no worker's mask (`queues_per_thread`), as some upstream backends leave
/// a queue they do not serve.
struct Counter {
    mem: RwLock<Option<Memory>>,
    answered: std::sync::atomic::AtomicU8,
}

impl Counter {
    fn new() -> Arc<Self> {
        Arc::new(Counter {
            mem: RwLock::new(None),
            answered: std::sync::atomic::AtomicU8::new(0),
        })
    }
}

impl VhostUserBackend for Counter {
    type Bitmap = ();
    type Vring = VringRwLock;
    fn num_queues(&self) -> usize {
        2
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
    fn queues_per_thread(&self) -> Vec<u64> {
        vec![0b01]
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
        vrings: &[VringRwLock],
        _: usize,
    ) -> io::Result<()> {
        assert_eq!(device_event, 0, "only queue 0 is served");
        let mem = self.mem.read().unwrap().clone().unwrap();
        loop {
            let n = self.answered.load(std::sync::atomic::Ordering::SeqCst) + 1;
            if !complete_one(&vrings[0], &mem, &[n]) {
                return Ok(());
            }
            self.answered.store(n, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

fn count(d: &mut VirtioPciDriver) -> u8 {
    let buf = d.memory().alloc(1, 64).unwrap();
    let head = d.add_chain(0, &[(buf.iova, 1, true)]).unwrap();
    d.kick(0).unwrap();
    assert_eq!(d.wait_used(0, TIMEOUT).unwrap(), (head, 1));
    let mut b = [0u8];
    d.memory().read(buf.iova, &mut b).unwrap();
    d.memory().free(buf).unwrap();
    b[0]
}

/// What a backend sees across vfio-user clients: upstream's `loop { new backend; new
/// daemon; serve }` gets a fresh backend per client through the daemon surface; the
/// export API keeps one device (reset between clients) whose backend state lives on.
#[test]
fn across_clients_a_fresh_backend_per_session_or_one_kept() {
    use unidev_transports::export::{Export, ExportOptions, VfioUser};
    let dir = common::test_dir("surface-sessions");
    let sock = dir.join("counter.sock");
    let made = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = {
        let (sock, made) = (sock.clone(), made.clone());
        std::thread::spawn(move || {
            for _ in 0..2 {
                made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut daemon = VhostUserDaemon::new(
                    "counter".into(),
                    Counter::new(),
                    GuestMemoryAtomic::new(GuestMemoryMmap::new()),
                )
                .unwrap();
                daemon
                    .serve(DaemonAddress::vfio_user(&sock, VIRTIO_ID_TEST))
                    .unwrap();
            }
        })
    };
    for session in 0..2 {
        wait_socket(&sock);
        let deadline = Instant::now() + TIMEOUT;
        let mut d = loop {
            match VfioUserClient::connect(&sock) {
                Ok(client) => {
                    let mut d = VirtioPciDriver::new(
                        client,
                        DriverOptions {
                            features: VERSION_1,
                            num_queues: Some(2),
                            queue_size: 16,
                            memory_size: 4 << 20,
                            ..DriverOptions::default()
                        },
                    )
                    .unwrap();
                    d.init().unwrap();
                    break d;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "session {session}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        // Queue 1 is in no worker's mask: it starts (no DEVICE_NEEDS_RESET) and is left
        // alone.
        assert_eq!(d.device_status().unwrap() & STATUS_NEEDS_RESET, 0);
        assert_eq!(
            (count(&mut d), count(&mut d)),
            (1, 2),
            "session {session}: fresh"
        );
        drop(d);
    }
    server.join().unwrap();
    assert_eq!(made.load(std::sync::atomic::Ordering::SeqCst), 2);

    // The export API: one device for every client; the backend's own state is kept.
    let sock = dir.join("kept.sock");
    let running = Export::virtio("kept", VIRTIO_ID_TEST, Counter::new())
        .serve(VfioUser::new(&sock), &ExportOptions::default())
        .unwrap()
        .spawn()
        .unwrap();
    for want in [(1, 2), (3, 4)] {
        let mut d = pci_driver(&sock, 2);
        assert_eq!((count(&mut d), count(&mut d)), want);
    }
    running.stop().unwrap();
}
