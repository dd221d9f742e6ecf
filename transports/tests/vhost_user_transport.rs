//! The vhost-user transport driven by the `vhost` crate's `Frontend`: a tiny "echo"
//! backend (fills every device-writable buffer with one byte) runs in `LocalVirtio` and
//! is exported by `VhostUserServer`; split rings are built in a memfd with the driver
//! library's `DriverMemory` / `Virtqueue`.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use unidev_core::dispatch::StopHandle;
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::{DispatchOptions, LocalVirtio};
use unidev_testkit::{DriverMemory, Virtqueue};
use unidev_transports::listener;
use unidev_transports::vhost_user::VhostUserServer;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// A device feature bit the echo device does not offer.
const NOT_OFFERED: u64 = 1 << 50;
const ECHO_TYPE: u32 = 0x3f;
const FILL: u8 = 0xe5;
const QSIZE: u16 = 64;
const MEM: u64 = 16 << 20;
const HALF: u64 = MEM / 2;
const BASE: u64 = 0x1_0000_0000;
const TIMEOUT: Duration = Duration::from_secs(10);

type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Fills each device-writable buffer with `FILL` and reports the bytes written.
///
/// With `hold_after` set it behaves like an asynchronous backend: after that many
/// completions it keeps popping requests but holds them instead of completing them; a
/// device reset drops what it holds (as a restarted process would).
struct Echo {
    mem: RwLock<Option<Memory>>,
    config: Mutex<Vec<u8>>,
    acked: Mutex<u64>,
    hold_after: Mutex<Option<usize>>,
    held: Mutex<Vec<u16>>,
}

impl Echo {
    fn new() -> Arc<Self> {
        Arc::new(Echo {
            mem: RwLock::new(None),
            config: Mutex::new((0x10..0x18).collect()),
            acked: Mutex::new(0),
            hold_after: Mutex::new(None),
            held: Mutex::new(Vec::new()),
        })
    }

    /// Whether the next popped request is to be held rather than completed.
    fn hold_next(&self) -> bool {
        let mut hold = self.hold_after.lock().unwrap();
        match hold.as_mut() {
            Some(0) => true,
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        }
    }
}

impl VhostUserBackend for Echo {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        256
    }

    fn features(&self) -> u64 {
        VERSION_1 | PROTOCOL_FEATURES
    }

    fn acked_features(&self, features: u64) {
        *self.acked.lock().unwrap() = features;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn reset_device(&self) {
        self.held.lock().unwrap().clear();
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config.lock().unwrap();
        (offset..offset + size)
            .map(|i| cfg.get(i as usize).copied().unwrap_or(0))
            .collect()
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        let mut cfg = self.config.lock().unwrap();
        for (i, b) in buf.iter().enumerate() {
            if let Some(c) = cfg.get_mut(offset as usize + i) {
                *c = *b;
            }
        }
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        *self.mem.write().unwrap() = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        let Some(mem) = self.mem.read().unwrap().clone() else {
            return Ok(());
        };
        let m = mem.memory();
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(m.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            if self.hold_next() {
                self.held.lock().unwrap().push(head);
                continue;
            }
            let mut written = 0u32;
            for desc in chain.filter(|d| d.is_write_only()) {
                let fill = vec![FILL; desc.len() as usize];
                if m.write_slice(&fill, desc.addr()).is_err() {
                    break;
                }
                written += desc.len();
            }
            vring.add_used(head, written).unwrap();
        }
        vring.signal_used_queue()
    }
}

struct Rig {
    sock: PathBuf,
    dir: PathBuf,
    dma: Arc<DmaSpace>,
    backend: Arc<Echo>,
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
}

impl Rig {
    fn start(name: &str) -> Rig {
        let dir =
            std::env::temp_dir().join(format!("unidev-vhost-user-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("vu.sock");
        let dma = Arc::new(DmaSpace::default());
        let backend = Echo::new();
        let local =
            LocalVirtio::new(ECHO_TYPE, backend.clone(), &dma, DispatchOptions::default()).unwrap();
        let server = VhostUserServer::new(
            name,
            listener::bind(&sock, 0o600).unwrap(),
            local,
            dma.clone(),
        )
        .unwrap();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || server.run().unwrap());
        Rig {
            sock,
            dir,
            dma,
            backend,
            stop,
            thread: Some(thread),
        }
    }

    /// A frontend that negotiated PROTOCOL_FEATURES and REPLY_ACK (every request acked).
    fn frontend(&self) -> Frontend {
        let mut fe = Frontend::connect(&self.sock, 8).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert_eq!(features, VERSION_1 | PROTOCOL_FEATURES);
        let pf = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(pf).unwrap();
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        fe.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
        fe
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Driver memory plus the frontend's view of it (its virtual address).
struct Guest {
    mem: DriverMemory,
    uaddr: u64,
}

impl Guest {
    fn new() -> Guest {
        let mem = DriverMemory::new(MEM, BASE).unwrap();
        let region = mem.guest_memory().iter().next().unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        Guest {
            uaddr: info.userspace_addr,
            mem,
        }
    }

    /// The region `[BASE + offset, + size)` as the frontend describes it.
    fn region(&self, offset: u64, size: u64) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: BASE + offset,
            memory_size: size,
            userspace_addr: self.uaddr + offset,
            mmap_offset: offset,
            mmap_handle: self.mem.file().as_raw_fd(),
        }
    }

    fn host(&self, iova: u64) -> u64 {
        self.uaddr + (iova - BASE)
    }
}

struct Queue {
    vq: Virtqueue,
    kick: EventFd,
    call: EventFd,
}

/// Set up ring `index` (size, base, addresses, call, kick, enable).
fn setup_queue(fe: &mut Frontend, g: &Guest, index: usize, base: u16) -> Queue {
    let vq = Virtqueue::new(&g.mem, index as u16, QSIZE, false).unwrap();
    fe.set_vring_num(index, QSIZE).unwrap();
    fe.set_vring_base(index, base).unwrap();
    fe.set_vring_addr(index, &ring_config(g, &vq)).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_call(index, &call).unwrap();
    fe.set_vring_kick(index, &kick).unwrap();
    fe.set_vring_enable(index, true).unwrap();
    Queue { vq, kick, call }
}

/// Set up ring `index` again on a ring that already exists in guest memory.
fn attach_queue(fe: &mut Frontend, g: &Guest, index: usize, q: &Queue, base: u16) {
    fe.set_vring_num(index, QSIZE).unwrap();
    fe.set_vring_base(index, base).unwrap();
    fe.set_vring_addr(index, &ring_config(g, &q.vq)).unwrap();
    fe.set_vring_call(index, &q.call).unwrap();
    fe.set_vring_kick(index, &q.kick).unwrap();
    fe.set_vring_enable(index, true).unwrap();
}

/// Used entries that arrive within `within`, as (head, length).
fn collect_used(q: &mut Queue, within: Duration) -> Vec<(u16, u32)> {
    let deadline = Instant::now() + within;
    let mut out = Vec::new();
    while Instant::now() < deadline {
        match q.vq.poll_used().unwrap() {
            Some(used) => out.push(used),
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    }
    out
}

/// A raw vhost-user request on the frontend's socket (for requests `Frontend` lacks).
fn raw_request(sock: &mut UnixStream, request: u32, flags: u32, payload: &[u8]) {
    let mut msg = Vec::new();
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&(1 | flags).to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    sock.write_all(&msg).unwrap();
}

/// Read a reply carrying a u64: (request, flags, value).
fn raw_reply_u64(sock: &mut UnixStream) -> (u32, u32, u64) {
    let mut buf = [0u8; 20];
    sock.read_exact(&mut buf).unwrap();
    let word = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().unwrap());
    assert_eq!(word(8), 8, "reply size");
    (
        word(0),
        word(4),
        u64::from_le_bytes(buf[12..20].try_into().unwrap()),
    )
}

const SET_STATUS: u32 = 39;
const GET_STATUS: u32 = 40;
const NEED_REPLY: u32 = 0x8;
const REPLY: u32 = 0x4;

fn get_status(sock: &mut UnixStream) -> u64 {
    raw_request(sock, GET_STATUS, 0, &[]);
    let (req, flags, value) = raw_reply_u64(sock);
    assert_eq!((req, flags & REPLY), (GET_STATUS, REPLY));
    value
}

fn set_status(sock: &mut UnixStream, status: u64) -> u64 {
    raw_request(sock, SET_STATUS, NEED_REPLY, &status.to_le_bytes());
    let (req, _, ack) = raw_reply_u64(sock);
    assert_eq!(req, SET_STATUS);
    ack
}

fn ring_config(g: &Guest, vq: &Virtqueue) -> VringConfigData {
    VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: g.host(vq.desc_iova()),
        used_ring_addr: g.host(vq.used_iova()),
        avail_ring_addr: g.host(vq.avail_iova()),
        log_addr: None,
    }
}

/// Post one device-writable buffer and kick.
fn post(q: &mut Queue, g: &Guest, iova: u64, len: u32) -> u16 {
    g.mem.fill(iova, u64::from(len), 0).unwrap();
    let head = q.vq.add_chain(&[(iova, len, true)]).unwrap();
    if q.vq.kick_prepare().unwrap() {
        q.kick.write(1).unwrap();
    }
    head
}

fn wait_used(q: &mut Queue, head: u16, within: Duration) -> Option<u32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some((h, len)) = q.vq.poll_used().unwrap() {
            assert_eq!(h, head);
            let _ = q.call.read();
            return Some(len);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A full round trip: returns the used length and whether the buffer holds FILL.
fn round_trip(q: &mut Queue, g: &Guest, iova: u64, len: u32) -> (u32, bool) {
    let head = post(q, g, iova, len);
    let used = wait_used(q, head, TIMEOUT).expect("request not completed");
    let mut buf = vec![0u8; len as usize];
    g.mem.read(iova, &mut buf).unwrap();
    (used, buf.iter().all(|b| *b == FILL))
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn feature_negotiation_and_config() {
    let rig = Rig::start("features");
    let mut fe = Frontend::connect(&rig.sock, 8).unwrap();
    fe.set_owner().unwrap();
    assert_eq!(fe.get_features().unwrap(), VERSION_1 | PROTOCOL_FEATURES);
    let pf = fe.get_protocol_features().unwrap();
    for f in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        VhostUserProtocolFeatures::RESET_DEVICE,
        VhostUserProtocolFeatures::STATUS,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
    ] {
        assert!(pf.contains(f), "{f:?} not offered");
    }
    assert!(!pf.contains(VhostUserProtocolFeatures::LOG_SHMFD));
    fe.set_protocol_features(pf).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    // A bit the device does not offer is refused; the offered set is accepted.
    assert!(fe.set_features(VERSION_1 | NOT_OFFERED).is_err());
    fe.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
    // The backend sees the virtio features (its acked view keeps PROTOCOL_FEATURES).
    assert_eq!(
        *rig.backend.acked.lock().unwrap(),
        VERSION_1 | PROTOCOL_FEATURES
    );
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    assert_eq!(fe.get_max_mem_slots().unwrap(), 509);
    let (_, data) = fe
        .get_config(2, 4, VhostUserConfigFlags::WRITABLE, &[0; 4])
        .unwrap();
    assert_eq!(data, vec![0x12, 0x13, 0x14, 0x15]);
    fe.set_config(3, VhostUserConfigFlags::WRITABLE, &[0xaa, 0xbb])
        .unwrap();
    let (_, data) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .unwrap();
    assert_eq!(data, vec![0x10, 0x11, 0x12, 0xaa, 0xbb, 0x15, 0x16, 0x17]);
    // Out-of-range config access: an error reply, the connection stays.
    assert!(fe
        .get_config(4090, 16, VhostUserConfigFlags::WRITABLE, &[0; 16])
        .is_err());
    assert_eq!(fe.get_queue_num().unwrap(), 2);
}

#[test]
fn round_trip_and_memory_changes_while_running() {
    let rig = Rig::start("memory");
    let mut fe = rig.frontend();
    let g = Guest::new();
    // Only the first half of guest memory is in the table at first.
    fe.set_mem_table(&[g.region(0, HALF)]).unwrap();
    assert_eq!(rig.dma.len(), 1);
    let mut q = setup_queue(&mut fe, &g, 0, 0);

    let low = BASE + (1 << 20);
    let high = BASE + HALF + (1 << 20);
    assert_eq!(round_trip(&mut q, &g, low, 4096), (4096, true));
    // A buffer in memory the backend does not have: nothing written.
    assert_eq!(round_trip(&mut q, &g, high, 4096), (0, false));

    // ADD_MEM_REG of the second half while the ring runs; now it is reachable.
    fe.add_mem_region(&g.region(HALF, HALF)).unwrap();
    assert_eq!(rig.dma.len(), 2);
    assert_eq!(round_trip(&mut q, &g, high, 8192), (8192, true));
    assert_eq!(round_trip(&mut q, &g, low, 512), (512, true));

    // REM_MEM_REG: gone again.
    fe.remove_mem_region(&g.region(HALF, HALF)).unwrap();
    assert_eq!(rig.dma.len(), 1);
    assert_eq!(round_trip(&mut q, &g, high, 4096), (0, false));

    // SET_MEM_TABLE with both halves while running: the kept region stays mapped.
    fe.set_mem_table(&[g.region(0, HALF), g.region(HALF, HALF)])
        .unwrap();
    assert_eq!(rig.dma.len(), 2);
    assert_eq!(round_trip(&mut q, &g, high, 4096), (4096, true));
    assert_eq!(round_trip(&mut q, &g, low, 4096), (4096, true));
}

#[test]
fn get_vring_base_stops_and_restart_resumes() {
    let rig = Rig::start("base");
    let mut fe = rig.frontend();
    let g = Guest::new();
    fe.set_mem_table(&[g.region(0, MEM)]).unwrap();
    let mut q = setup_queue(&mut fe, &g, 1, 0);
    let buf = BASE + (2 << 20);
    for _ in 0..3 {
        assert_eq!(round_trip(&mut q, &g, buf, 1024), (1024, true));
    }
    // Stopped: the position comes back, and a new request is not served.
    assert_eq!(fe.get_vring_base(1).unwrap(), 3);
    let head = post(&mut q, &g, buf, 2048);
    assert_eq!(wait_used(&mut q, head, Duration::from_millis(300)), None);
    // Restart where it stopped: the pending request is served (its kick is still
    // pending on the eventfd).
    fe.set_vring_base(1, 3).unwrap();
    fe.set_vring_addr(1, &ring_config(&g, &q.vq)).unwrap();
    fe.set_vring_kick(1, &q.kick).unwrap();
    fe.set_vring_enable(1, true).unwrap();
    assert_eq!(wait_used(&mut q, head, TIMEOUT), Some(2048));
    assert_eq!(round_trip(&mut q, &g, buf, 100), (100, true));
    assert_eq!(fe.get_vring_base(1).unwrap(), 5);

    // SET_VRING_ENABLE 0 also stops it; 1 resumes.
    fe.set_vring_base(1, 5).unwrap();
    fe.set_vring_kick(1, &q.kick).unwrap();
    fe.set_vring_enable(1, false).unwrap();
    let head = post(&mut q, &g, buf, 64);
    assert_eq!(wait_used(&mut q, head, Duration::from_millis(300)), None);
    fe.set_vring_enable(1, true).unwrap();
    assert_eq!(wait_used(&mut q, head, TIMEOUT), Some(64));
}

#[test]
fn reconnect_is_served_and_disconnect_drops_memory() {
    let rig = Rig::start("reconnect");
    for round in 0..3 {
        let mut fe = rig.frontend();
        let g = Guest::new();
        fe.set_mem_table(&[g.region(0, MEM)]).unwrap();
        let mut q = setup_queue(&mut fe, &g, 0, 0);
        let (len, filled) = round_trip(&mut q, &g, BASE + (4 << 20), 4096 + round);
        assert_eq!((len, filled), (4096 + round, true), "round {round}");
        drop(fe);
        wait_for("the memory table to be dropped", || rig.dma.is_empty());
    }
}

#[test]
fn a_second_frontend_waits_for_the_first() {
    let rig = Rig::start("second");
    let mut first = rig.frontend();
    // The second connects at once but is only served when the first leaves.
    let sock = rig.sock.clone();
    let t = std::thread::spawn(move || {
        let fe = Frontend::connect(&sock, 8).unwrap();
        fe.get_features().unwrap()
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(!t.is_finished());
    assert_eq!(first.get_queue_num().unwrap(), 2);
    drop(first);
    assert_eq!(t.join().unwrap(), VERSION_1 | PROTOCOL_FEATURES);
}

#[test]
fn bad_messages_get_error_replies_and_serving_continues() {
    let rig = Rig::start("bad");
    let mut fe = rig.frontend();
    let g = Guest::new();
    fe.set_mem_table(&[g.region(0, HALF)]).unwrap();
    // No such queue (the device has 2).
    assert!(fe.set_vring_num(5, QSIZE).is_err());
    assert!(fe.set_vring_base(7, 0).is_err());
    assert!(fe.set_vring_enable(3, true).is_err());
    // Sizes: not a power of two, above the maximum.
    assert!(fe.set_vring_num(0, 3).is_err());
    assert!(fe.set_vring_num(0, 512).is_err());
    // A ring address outside the memory table.
    let vq = Virtqueue::new(&g.mem, 0, QSIZE, false).unwrap();
    let mut outside = ring_config(&g, &vq);
    outside.desc_table_addr = g.uaddr + HALF + 0x1000;
    assert!(fe.set_vring_addr(0, &outside).is_err());
    // Removing a region that is not there; adding one that overlaps.
    assert!(fe.remove_mem_region(&g.region(HALF, HALF)).is_err());
    assert!(fe.add_mem_region(&g.region(0x1000, 0x1000)).is_err());
    assert_eq!(rig.dma.len(), 1);
    drop(vq);

    // The connection is still served: set up a ring and run a request.
    let mut q = setup_queue(&mut fe, &g, 0, 0);
    // While running: size and address changes are refused.
    assert!(fe.set_vring_num(0, 32).is_err());
    assert!(fe.set_vring_base(0, 9).is_err());
    assert_eq!(round_trip(&mut q, &g, BASE + 0x10_0000, 256), (256, true));

    // A frontend without REPLY_ACK sends a bad message: no reply, but later requests
    // still work on the same connection.
    drop(fe);
    wait_for("the first session to end", || rig.dma.is_empty());
    let fe = Frontend::connect(&rig.sock, 8).unwrap();
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    fe.set_features(VERSION_1).unwrap();
    fe.set_vring_num(6, QSIZE).unwrap(); // refused silently by the server
    assert_eq!(fe.get_features().unwrap(), VERSION_1 | PROTOCOL_FEATURES);
    fe.set_mem_table(&[g.region(0, MEM)]).unwrap();
    // Without PROTOCOL_FEATURES the ring starts on its kick.
    let vq = Virtqueue::new(&g.mem, 0, QSIZE, false).unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    fe.set_vring_addr(0, &ring_config(&g, &vq)).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    let mut q = Queue { vq, kick, call };
    assert_eq!(round_trip(&mut q, &g, BASE + 0x90_0000, 300), (300, true));
}

#[test]
fn call_fd_replaced_while_running_and_reset_device() {
    let rig = Rig::start("reset");
    let mut fe = rig.frontend();
    let g = Guest::new();
    fe.set_mem_table(&[g.region(0, MEM)]).unwrap();
    let mut q = setup_queue(&mut fe, &g, 0, 0);
    let buf = BASE + (3 << 20);
    assert_eq!(round_trip(&mut q, &g, buf, 512), (512, true));
    // A new call fd while the ring runs: completions signal it, not the old one.
    let new_call = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_call(0, &new_call).unwrap();
    let _ = q.call.read();
    assert_eq!(round_trip(&mut q, &g, buf, 512), (512, true));
    assert_eq!(new_call.read().unwrap(), 1);
    assert!(q.call.read().is_err(), "the old call fd was signalled");

    // RESET_DEVICE stops the ring: a request is not served until it is set up again.
    fe.reset_device().unwrap();
    let head = post(&mut q, &g, buf, 64);
    assert_eq!(wait_used(&mut q, head, Duration::from_millis(300)), None);
    fe.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
    let mut q = setup_queue(&mut fe, &g, 0, 0);
    assert_eq!(round_trip(&mut q, &g, buf, 128), (128, true));
    // The memory table survives a device reset.
    assert_eq!(rig.dma.len(), 1);
}

#[test]
fn status_is_kept_and_zero_resets_the_device() {
    let rig = Rig::start("status");
    let stream = UnixStream::connect(&rig.sock).unwrap();
    let mut raw = stream.try_clone().unwrap();
    let mut fe = Frontend::from_stream(stream, 8);
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
    assert_eq!(get_status(&mut raw), 0);
    // ACKNOWLEDGE | DRIVER | FEATURES_OK, then DRIVER_OK.
    assert_eq!(set_status(&mut raw, 0xb), 0);
    assert_eq!(get_status(&mut raw), 0xb);
    assert_eq!(set_status(&mut raw, 0xf), 0);
    assert_eq!(get_status(&mut raw), 0xf);
    // Not a status byte: refused, nothing changes.
    assert_ne!(set_status(&mut raw, 0x1_0000), 0);
    assert_eq!(get_status(&mut raw), 0xf);

    let g = Guest::new();
    fe.set_mem_table(&[g.region(0, MEM)]).unwrap();
    let mut q = setup_queue(&mut fe, &g, 0, 0);
    let buf = BASE + (5 << 20);
    assert_eq!(round_trip(&mut q, &g, buf, 256), (256, true));
    // Status 0 resets the device: the ring stops; memory and features stay.
    assert_eq!(set_status(&mut raw, 0), 0);
    assert_eq!(get_status(&mut raw), 0);
    let head = post(&mut q, &g, buf, 64);
    assert_eq!(wait_used(&mut q, head, Duration::from_millis(300)), None);
    assert_eq!(rig.dma.len(), 1);
    // Interleaved with requests the crate handles, on the same connection.
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    attach_queue(&mut fe, &g, 0, &q, 1);
    assert_eq!(wait_used(&mut q, head, TIMEOUT), Some(64));
    assert_eq!(set_status(&mut raw, 0xf), 0);
    assert_eq!(get_status(&mut raw), 0xf);
}

/// SET_STATUS follows the rules every transport shares (`unidev_core::virtio::spec`):
/// FEATURES_OK needs VIRTIO_F_VERSION_1 among the negotiated features, DRIVER_OK needs
/// FEATURES_OK, and a driver cannot clear bits without a reset.
#[test]
fn status_follows_the_shared_rules() {
    let rig = Rig::start("status-rules");
    let stream = UnixStream::connect(&rig.sock).unwrap();
    let mut raw = stream.try_clone().unwrap();
    let mut fe = Frontend::from_stream(stream, 8);
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf).unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    // Negotiated without VERSION_1: FEATURES_OK is refused and not kept.
    fe.set_features(PROTOCOL_FEATURES).unwrap();
    assert_ne!(set_status(&mut raw, 0xb), 0);
    assert_eq!(get_status(&mut raw), 0x3);
    // DRIVER_OK without FEATURES_OK is not kept either.
    assert_ne!(set_status(&mut raw, 0x7), 0);
    assert_eq!(get_status(&mut raw), 0x3);
    // With VERSION_1 it is.
    fe.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
    assert_eq!(set_status(&mut raw, 0xb), 0);
    assert_eq!(set_status(&mut raw, 0xf), 0);
    // Clearing bits without a reset: refused, the bits stay.
    assert_ne!(set_status(&mut raw, 0x1), 0);
    assert_eq!(get_status(&mut raw), 0xf);
}

#[test]
fn a_ring_that_cannot_start_reports_needs_reset() {
    let rig = Rig::start("needs-reset");
    let stream = UnixStream::connect(&rig.sock).unwrap();
    let mut raw = stream.try_clone().unwrap();
    let mut fe = Frontend::from_stream(stream, 8);
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    let pf = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(pf).unwrap();
    fe.set_features(VERSION_1 | PROTOCOL_FEATURES).unwrap();
    let g = Guest::new();
    fe.set_mem_table(&[g.region(0, MEM)]).unwrap();
    assert_eq!(set_status(&mut raw, 0xf), 0);
    // A descriptor table that runs past the end of guest memory: the queue refuses to
    // start (the address itself is in the table, so SET_VRING_ADDR accepts it).
    let vq = Virtqueue::new(&g.mem, 0, QSIZE, false).unwrap();
    let mut bad = ring_config(&g, &vq);
    bad.desc_table_addr = g.uaddr + MEM - 16;
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(0, &bad).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    assert!(fe.set_vring_enable(0, true).is_err());
    assert_eq!(get_status(&mut raw), 0xf | 64, "DEVICE_NEEDS_RESET");
}

/// The frontend's inflight region survives a disconnect in which the backend lost the
/// requests it had popped: the new session resumes from the log, so each request
/// completes exactly once even though the frontend says the ring stopped after them.
#[test]
fn requests_in_flight_across_a_reconnect_are_neither_lost_nor_repeated() {
    let rig = Rig::start("inflight");
    let g = Guest::new();
    let mut fe = rig.frontend();
    let asked = VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 2,
        queue_size: QSIZE,
    };
    let (region, fd) = fe.get_inflight_fd(&asked).unwrap();
    assert_eq!((region.num_queues, region.queue_size), (2, QSIZE));
    assert!(region.mmap_size >= 2 * (16 + 16 * u64::from(QSIZE)));
    fe.set_inflight_fd(&region, fd.as_raw_fd()).unwrap();
    fe.set_mem_table(&[g.region(0, MEM)]).unwrap();
    *rig.backend.hold_after.lock().unwrap() = Some(3);
    let mut q = setup_queue(&mut fe, &g, 0, 0);
    let buf = |i: u64| BASE + (6 << 20) + i * 0x1000;
    let heads: Vec<u16> = (0..8).map(|i| post(&mut q, &g, buf(i), 512)).collect();
    wait_for("five requests held", || {
        rig.backend.held.lock().unwrap().len() == 5
    });
    let first = collect_used(&mut q, Duration::from_millis(200));
    assert_eq!(first.iter().map(|u| u.0).collect::<Vec<_>>(), heads[..3]);

    // The frontend goes away; the backend drops what it held.
    drop(fe);
    wait_for("the first session to end", || rig.dma.is_empty());
    assert!(rig.backend.held.lock().unwrap().is_empty());
    *rig.backend.hold_after.lock().unwrap() = None;

    // A new session with the same region, resuming at 8 (all popped, as far as the
    // frontend knows): the log puts the five back.
    let mut fe = rig.frontend();
    fe.set_inflight_fd(&region, fd.as_raw_fd()).unwrap();
    fe.set_mem_table(&[g.region(0, MEM)]).unwrap();
    attach_queue(&mut fe, &g, 0, &q, 8);
    let again = collect_used(&mut q, Duration::from_millis(500));
    assert_eq!(
        again.iter().map(|u| u.0).collect::<Vec<_>>(),
        heads[3..],
        "the five in flight complete once, the three done before do not repeat"
    );
    assert!(again.iter().all(|u| u.1 == 512));
    // And the ring goes on normally.
    let head = post(&mut q, &g, buf(9), 100);
    assert_eq!(wait_used(&mut q, head, TIMEOUT), Some(100));
    assert!(collect_used(&mut q, Duration::from_millis(100)).is_empty());
}

#[test]
fn bad_inflight_requests_are_refused() {
    let rig = Rig::start("inflight-bad");
    let ask = |num_queues, queue_size| VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues,
        queue_size,
    };
    // GET_INFLIGHT_FD has no error reply: a bad one ends the connection (the frontend
    // sees an error, not a hang) and the daemon serves the next frontend.
    for (queues, size) in [(0, 64), (3, 64), (1, 0)] {
        let mut fe = rig.frontend();
        assert!(
            fe.get_inflight_fd(&ask(queues, size)).is_err(),
            "{queues} x {size}"
        );
    }
    let mut fe = rig.frontend();
    let (region, fd) = fe.get_inflight_fd(&ask(1, 64)).unwrap();
    // A region that claims more than the file holds, or queues the device lacks: an
    // error reply, the connection stays.
    let mut big = region;
    big.mmap_size *= 4;
    big.queue_size = 256;
    assert!(fe.set_inflight_fd(&big, fd.as_raw_fd()).is_err());
    let mut many = region;
    many.num_queues = 9;
    assert!(fe.set_inflight_fd(&many, fd.as_raw_fd()).is_err());
    fe.set_inflight_fd(&region, fd.as_raw_fd()).unwrap();
    // A ring larger than the region logs is refused at start, and the connection lives.
    let g = Guest::new();
    fe.set_mem_table(&[g.region(0, MEM)]).unwrap();
    let vq = Virtqueue::new(&g.mem, 0, 128, false).unwrap();
    fe.set_vring_num(0, 128).unwrap();
    fe.set_vring_base(0, 0).unwrap();
    let mut cfg = ring_config(&g, &vq);
    cfg.queue_size = 128;
    fe.set_vring_addr(0, &cfg).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    assert!(fe.set_vring_enable(0, true).is_err());
    assert_eq!(fe.get_queue_num().unwrap(), 2);
}

#[test]
fn a_failed_request_that_needs_a_reply_ends_the_connection_instead_of_hanging() {
    let rig = Rig::start("no-reply");
    let mut fe = rig.frontend();
    // GET_VRING_BASE of a queue that does not exist (the device has 2; the frontend
    // allows 8): nothing to reply with.
    assert!(fe.get_vring_base(5).is_err());
    assert!(fe.get_queue_num().is_err(), "the connection was closed");
    // The next frontend is served.
    let mut fe = rig.frontend();
    assert_eq!(fe.get_queue_num().unwrap(), 2);
}

#[test]
fn peers_outside_the_allowed_uids_are_refused() {
    let dir = std::env::temp_dir().join(format!("unidev-vhost-user-{}-peers", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    for (allowed, served) in [(me.wrapping_add(1), false), (me, true)] {
        let sock = dir.join(format!("vu-{served}.sock"));
        let dma = Arc::new(DmaSpace::default());
        let local =
            LocalVirtio::new(ECHO_TYPE, Echo::new(), &dma, DispatchOptions::default()).unwrap();
        let server =
            VhostUserServer::new("peers", listener::bind(&sock, 0o600).unwrap(), local, dma)
                .unwrap()
                .with_peer_policy(listener::PeerPolicy {
                    allowed_uids: Some(vec![allowed]),
                });
        let stop = server.stop_handle();
        let t = std::thread::spawn(move || server.run().unwrap());
        let fe = Frontend::connect(&sock, 8).unwrap();
        assert_eq!(fe.get_features().is_ok(), served, "uid {allowed} allowed");
        stop.stop();
        t.join().unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
