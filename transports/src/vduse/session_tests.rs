//! The VDUSE request channel end to end without a kernel: a `SOCK_SEQPACKET` socket
//! stands in for `/dev/vduse/NAME` (one request per datagram, as `read(2)` on the device
//! returns one), a fake implements the ioctls over memfd-backed IOTLB entries, and a fake
//! virtio device records what the transport asks of it.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use unidev_core::memory::DmaSpace;
use unidev_core::virtio::{QueueConfig, QueueError, VirtioDevice};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::EventFd;

use super::iotlb::tests::{memfd, FakeIotlb};
use super::iotlb::IotlbSource;
use super::server::VduseServer;
use super::session::VduseIoctls;
use super::uapi::*;

/// What the fake device saw.
#[derive(Default)]
struct DeviceLog {
    driver_features: Option<u64>,
    started: Vec<(usize, u16, u64, u64, u64, u16, u16)>,
    kicks: Vec<Option<EventFd>>,
    calls: Vec<Option<EventFd>>,
    stopped: Vec<usize>,
    resets: usize,
}

struct FakeDevice {
    log: Mutex<DeviceLog>,
    stop_at: u16,
    refuse_start: std::sync::atomic::AtomicBool,
    health: Arc<unidev_core::virtio::DeviceHealth>,
}

impl FakeDevice {
    fn new() -> Arc<Self> {
        Arc::new(FakeDevice {
            log: Mutex::new(DeviceLog {
                kicks: vec![None, None],
                calls: vec![None, None],
                ..Default::default()
            }),
            stop_at: 7,
            refuse_start: std::sync::atomic::AtomicBool::new(false),
            health: Arc::new(unidev_core::virtio::DeviceHealth::new("fake").unwrap()),
        })
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn max_queue_size(&self) -> u16 {
        256
    }
    fn features(&self) -> u64 {
        // VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX: the kernel negotiates a subset.
        (1 << 32) | (1 << 29)
    }
    fn read_config(&self, _: u32, data: &mut [u8]) {
        data.fill(0);
    }
    fn write_config(&self, _: u32, _: &[u8]) {}
    fn set_driver_features(&self, features: u64) {
        self.log.lock().unwrap().driver_features = Some(features);
    }
    fn start_queue(&self, index: usize, c: QueueConfig) -> Result<(), QueueError> {
        if self.refuse_start.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(QueueError::BadRings(index));
        }
        let mut log = self.log.lock().unwrap();
        log.started.push((
            index,
            c.size,
            c.desc,
            c.avail,
            c.used,
            c.next_avail,
            c.next_used,
        ));
        log.kicks[index] = Some(c.kick);
        log.calls[index] = c.call;
        Ok(())
    }
    fn set_queue_call(&self, _: usize, _: Option<EventFd>) {}
    fn stop_queue(&self, index: usize) -> Option<u16> {
        let mut log = self.log.lock().unwrap();
        log.stopped.push(index);
        log.kicks[index] = None;
        log.calls[index] = None;
        Some(self.stop_at)
    }
    fn reset(&self) {
        self.log.lock().unwrap().resets += 1;
        self.health.clear();
    }
    fn health(&self) -> Option<Arc<unidev_core::virtio::DeviceHealth>> {
        Some(self.health.clone())
    }
}

/// The fake kernel side of the ioctls.
struct FakeKernel {
    iotlb: Arc<FakeIotlb>,
    features: u64,
    vqs: Mutex<Vec<VduseVqInfo>>,
    /// The eventfd the kernel would signal on a kick, per queue (a dup of what was set).
    kick_fds: Mutex<Vec<Option<EventFd>>>,
    /// Every SETUP_KICKFD: (queue, fd given).
    kick_log: Mutex<Vec<(u32, Option<RawFd>)>>,
    irqs: Mutex<Vec<u32>>,
}

impl IotlbSource for FakeKernel {
    fn iotlb_get_fd(
        &self,
        start: u64,
        last: u64,
    ) -> std::io::Result<Option<(File, VduseIotlbEntry)>> {
        self.iotlb.iotlb_get_fd(start, last)
    }
}

impl VduseIoctls for FakeKernel {
    fn driver_features(&self) -> std::io::Result<u64> {
        Ok(self.features)
    }
    fn vq_info(&self, index: u32) -> std::io::Result<VduseVqInfo> {
        self.vqs
            .lock()
            .unwrap()
            .get(index as usize)
            .copied()
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
    }
    fn set_vq_kick(&self, index: u32, fd: Option<RawFd>) -> std::io::Result<()> {
        self.kick_log.lock().unwrap().push((index, fd));
        // SAFETY: dup of a descriptor the caller keeps open for the call.
        let dup = fd.map(|fd| unsafe { libc::dup(fd) });
        // SAFETY: a fresh duplicate owned by nothing else.
        let efd = dup.map(|d| unsafe { EventFd::from_raw_fd(d) });
        self.kick_fds.lock().unwrap()[index as usize] = efd;
        Ok(())
    }
    fn inject_vq_irq(&self, index: u32) -> std::io::Result<()> {
        self.irqs.lock().unwrap().push(index);
        Ok(())
    }
}

struct Harness {
    device: Arc<FakeDevice>,
    kernel: Arc<FakeKernel>,
    dma: Arc<DmaSpace>,
    ring_file: Arc<File>,
    peer: File,
    stop: unidev_core::dispatch::StopHandle,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    next_id: u32,
}

const RINGS: u64 = 0x4000_0000;
const DESC: u64 = RINGS;
const AVAIL: u64 = RINGS + 0x1000;
const USED: u64 = RINGS + 0x2000;

fn socketpair() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (a, b) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on a valid descriptor.
    unsafe {
        let fl = libc::fcntl(a.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(a.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    (a, b)
}

impl Harness {
    fn start(device: Arc<FakeDevice>) -> Harness {
        Self::start_with(device, false)
    }

    /// With `takeover`, the server takes the device over as left by a dead daemon.
    fn start_with(device: Arc<FakeDevice>, takeover: bool) -> Harness {
        Self::start_full(device, takeover, |_| {})
    }

    /// `prepare` may change the kernel's queue state before the server starts.
    fn start_full(
        device: Arc<FakeDevice>,
        takeover: bool,
        prepare: impl FnOnce(&mut Vec<VduseVqInfo>),
    ) -> Harness {
        let iotlb = Arc::new(FakeIotlb::default());
        // The rings' coherent region, as virtio-vdpa allocates it above the bounce region.
        let ring_file = Arc::new(memfd(0x10000));
        iotlb.add(RINGS, RINGS + 0xffff, VDUSE_ACCESS_RW, ring_file.clone(), 0);
        // used->idx = 5.
        std::os::unix::fs::FileExt::write_at(ring_file.as_ref(), &5u16.to_le_bytes(), 0x2002)
            .unwrap();
        let mut ready = VduseVqInfo {
            index: 0,
            num: 256,
            desc_addr: DESC,
            driver_addr: AVAIL,
            device_addr: USED,
            ready: 1,
            ..Default::default()
        };
        ready.state[0] = 3; // split.avail_index
        let not_ready = VduseVqInfo {
            index: 1,
            ..Default::default()
        };
        let mut vqs = vec![ready, not_ready];
        prepare(&mut vqs);
        let kernel = Arc::new(FakeKernel {
            iotlb,
            features: (1 << 32) | (1 << 33) | (1 << 29),
            vqs: Mutex::new(vqs),
            kick_fds: Mutex::new(vec![None, None]),
            kick_log: Mutex::new(Vec::new()),
            irqs: Mutex::new(Vec::new()),
        });
        let dma = Arc::new(DmaSpace::default());
        let (ours, peer) = socketpair();
        let make = if takeover {
            VduseServer::takeover_channel
        } else {
            VduseServer::with_channel
        };
        let server = make(
            "test-vduse",
            device.clone(),
            dma.clone(),
            Arc::new(ours),
            kernel.clone(),
        )
        .unwrap();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || server.run());
        Harness {
            device,
            kernel,
            dma,
            ring_file,
            peer,
            stop,
            thread: Some(thread),
            next_id: 100,
        }
    }

    /// Send one request as the kernel would and wait for the answer.
    fn request(&mut self, mut req: VduseDevRequest) -> VduseDevResponse {
        self.next_id += 1;
        req.request_id = self.next_id;
        self.peer.write_all(req.as_slice()).unwrap();
        let mut resp = VduseDevResponse::new(0, 0);
        let n = self.peer.read(resp.as_mut_slice()).unwrap();
        assert_eq!(n, std::mem::size_of::<VduseDevResponse>());
        assert_eq!(resp.request_id, self.next_id);
        assert_eq!(resp.reserved, [0; 4]);
        resp
    }

    fn status(&mut self, s: u8) -> u32 {
        self.request(VduseDevRequest::set_status(0, s)).result
    }

    fn stop(mut self) -> std::io::Result<()> {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap()
    }
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Kick queue `index` the way the kernel does: signal the eventfd it was given.
fn kernel_kick(h: &Harness, index: usize) {
    h.kernel.kick_fds.lock().unwrap()[index]
        .as_ref()
        .expect("a kick fd is set")
        .write(1)
        .unwrap();
}

fn device_was_kicked(h: &Harness, index: usize) -> bool {
    h.device.log.lock().unwrap().kicks[index]
        .as_ref()
        .is_some_and(|k| k.read().is_ok())
}

#[test]
fn negotiation_start_kicks_interrupts_iotlb_state_and_reset() {
    let mut h = Harness::start(FakeDevice::new());

    // ACKNOWLEDGE | DRIVER | FEATURES_OK: the negotiated features reach the device.
    assert_eq!(h.status(0x0b), VDUSE_REQ_RESULT_OK);
    assert_eq!(
        h.device.log.lock().unwrap().driver_features,
        Some(h.kernel.features)
    );
    assert!(h.dma.is_empty(), "nothing is mapped before DRIVER_OK");

    // DRIVER_OK: the IOTLB is mirrored, ready queues start where the kernel says.
    assert_eq!(h.status(0x0f), VDUSE_REQ_RESULT_OK);
    let started = h.device.log.lock().unwrap().started.clone();
    assert_eq!(started, vec![(0, 256, DESC, AVAIL, USED, 3, 5)]);
    assert_eq!(h.dma.len(), 1);
    assert!(h.dma.find(AVAIL).is_some());

    // No bounce region yet: kicks come through the relay, which forwards them.
    let relay_fd = h.kernel.kick_log.lock().unwrap()[0].1;
    assert!(relay_fd.is_some());
    kernel_kick(&h, 0);
    wait_for("the relayed kick", || device_was_kicked(&h, 0));
    assert_eq!(h.kernel.kick_log.lock().unwrap().len(), 1, "still relayed");

    // The driver's first streaming DMA adds the bounce region without a message: the
    // next kick maps it before waking the device, then hands the kernel the device's fd.
    let bounce = Arc::new(memfd(0x10000));
    std::os::unix::fs::FileExt::write_at(bounce.as_ref(), b"bounce", 0x100).unwrap();
    h.kernel
        .iotlb
        .add(0, 0xffff, VDUSE_ACCESS_RW, bounce.clone(), 0);
    kernel_kick(&h, 0);
    wait_for("the kick after the bounce map", || device_was_kicked(&h, 0));
    let mut buf = [0u8; 6];
    h.dma.read(0x100, &mut buf).unwrap();
    assert_eq!(&buf, b"bounce");
    wait_for("the direct kick fd", || {
        h.kernel.kick_log.lock().unwrap().len() == 2
    });
    let direct_fd = h.kernel.kick_log.lock().unwrap()[1].1;
    assert!(direct_fd.is_some() && direct_fd != relay_fd);
    // Now the kernel's eventfd is the device's own.
    kernel_kick(&h, 0);
    wait_for("the direct kick", || device_was_kicked(&h, 0));

    // Interrupts: the device signals its call eventfd; the relay injects them.
    h.device.log.lock().unwrap().calls[0]
        .as_ref()
        .unwrap()
        .write(1)
        .unwrap();
    wait_for("the injected interrupt", || {
        *h.kernel.irqs.lock().unwrap() == vec![0]
    });

    // UPDATE_IOTLB: a new region in the announced range is mapped, a removed one unmapped.
    let extra = Arc::new(memfd(0x2000));
    h.kernel
        .iotlb
        .add(0x8000_0000, 0x8000_1fff, VDUSE_ACCESS_RO, extra, 0);
    let r = h.request(VduseDevRequest::update_iotlb(0, 0x8000_0000, 0x8000_1fff));
    assert_eq!(r.result, VDUSE_REQ_RESULT_OK);
    assert_eq!(h.dma.len(), 3);
    assert!(!h.dma.find(0x8000_1000).unwrap().prot.write);
    h.kernel.iotlb.remove(0x8000_0000);
    let r = h.request(VduseDevRequest::update_iotlb(0, 0, u64::MAX));
    assert_eq!(r.result, VDUSE_REQ_RESULT_OK);
    assert_eq!(
        h.dma.len(),
        2,
        "unchanged entries stay, the removed one goes"
    );
    let r = h.request(VduseDevRequest::update_iotlb(0, 9, 8));
    assert_eq!(r.result, VDUSE_REQ_RESULT_FAILED, "empty range");

    // GET_VQ_STATE stops a running queue and reports where it stopped.
    let r = h.request(VduseDevRequest::get_vq_state(0, 0));
    assert_eq!(r.result, VDUSE_REQ_RESULT_OK);
    assert_eq!(r.payload[0], 0);
    assert_eq!(r.split_avail_index(), 7);
    assert_eq!(h.device.log.lock().unwrap().stopped, vec![0]);
    assert_eq!(
        h.kernel.kick_log.lock().unwrap().last().copied(),
        Some((0, None)),
        "the kick fd is withdrawn"
    );
    // Again: the same answer without stopping twice.
    let r = h.request(VduseDevRequest::get_vq_state(0, 0));
    assert_eq!(r.split_avail_index(), 7);
    assert_eq!(h.device.log.lock().unwrap().stopped, vec![0]);
    // A queue never started reports 0; a missing queue fails.
    assert_eq!(
        h.request(VduseDevRequest::get_vq_state(0, 1))
            .split_avail_index(),
        0
    );
    assert_eq!(
        h.request(VduseDevRequest::get_vq_state(0, 9)).result,
        VDUSE_REQ_RESULT_FAILED
    );

    // An unknown request type fails without disturbing anything.
    let mut odd = VduseDevRequest::set_status(0, 0);
    odd.req_type = 42;
    assert_eq!(h.request(odd).result, VDUSE_REQ_RESULT_FAILED);

    // Status 0: reset and unmap everything.
    assert_eq!(h.status(0), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.device.log.lock().unwrap().resets, 1);
    assert!(h.dma.is_empty());

    // A second driver generation starts again from FEATURES_OK.
    assert_eq!(h.status(0x0b), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.status(0x0f), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.device.log.lock().unwrap().started.len(), 2);
    // The bounce region is present from the start now: kicks go straight to the device.
    let log = h.kernel.kick_log.lock().unwrap().clone();
    let (q, fd) = *log.last().unwrap();
    assert_eq!(q, 0);
    assert!(fd.is_some());
    drop(log);
    kernel_kick(&h, 0);
    wait_for("the direct kick of the second generation", || {
        device_was_kicked(&h, 0)
    });
    let _ = &h.ring_file;

    h.stop().unwrap();
}

#[test]
fn losing_driver_ok_stops_queues_and_a_refused_start_fails_the_status() {
    let mut h = Harness::start(FakeDevice::new());
    assert_eq!(h.status(0x0b), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.status(0x0f), VDUSE_REQ_RESULT_OK);
    // The driver marks the device FAILED.
    assert_eq!(h.status(0x8f), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.device.log.lock().unwrap().stopped, vec![0]);
    h.stop().unwrap();

    let device = Arc::new(FakeDevice {
        log: Mutex::new(DeviceLog {
            kicks: vec![None, None],
            calls: vec![None, None],
            ..Default::default()
        }),
        stop_at: 0,
        refuse_start: std::sync::atomic::AtomicBool::new(true),
        health: Arc::new(unidev_core::virtio::DeviceHealth::new("fake").unwrap()),
    });
    let mut h = Harness::start(device.clone());
    assert_eq!(h.status(0x0b), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.status(0x0f), VDUSE_REQ_RESULT_FAILED);
    // The failed DRIVER_OK was not taken (the kernel keeps its old status too): once the
    // device can start, the driver's retry starts the queues.
    device
        .refuse_start
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(h.status(0x0f), VDUSE_REQ_RESULT_OK);
    assert!(!device.log.lock().unwrap().started.is_empty());
    h.stop().unwrap();
}

#[test]
fn stopping_the_server_resets_the_device_and_a_closed_channel_ends_it() {
    let mut h = Harness::start(FakeDevice::new());
    assert_eq!(h.status(0x0b), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.status(0x0f), VDUSE_REQ_RESULT_OK);
    let device = h.device.clone();
    let dma = h.dma.clone();
    h.stop().unwrap();
    assert_eq!(device.log.lock().unwrap().resets, 1);
    assert!(dma.is_empty());

    let mut h = Harness::start(FakeDevice::new());
    let (_, dead) = socketpair();
    let peer = std::mem::replace(&mut h.peer, dead);
    drop(peer);
    let err = h.thread.take().unwrap().join().unwrap().unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
}

#[test]
fn a_device_left_by_a_dead_daemon_is_taken_over_and_resumed_at_the_used_index() {
    let mut h = Harness::start_with(FakeDevice::new(), true);
    // Before any message: the negotiated features reach the device, the IOTLB is
    // mirrored, and the ready queue starts at the used index (5) for both positions — not
    // at the driver's start index (3): requests taken but not completed are taken again.
    wait_for("the takeover", || {
        !h.device.log.lock().unwrap().started.is_empty()
    });
    assert_eq!(
        h.device.log.lock().unwrap().driver_features,
        Some(h.kernel.features)
    );
    let started = h.device.log.lock().unwrap().started.clone();
    assert_eq!(started, vec![(0, 256, DESC, AVAIL, USED, 5, 5)]);
    assert!(h.dma.find(USED).is_some());
    // The kernel got a fresh kick fd, and kicks reach the device.
    assert!(h.kernel.kick_log.lock().unwrap()[0].1.is_some());
    kernel_kick(&h, 0);
    wait_for("a kick after the takeover", || device_was_kicked(&h, 0));
    // A DRIVER_OK the dead daemon left unanswered (re-queued by the kernel) changes
    // nothing: the queue runs already.
    assert_eq!(h.status(0x0f), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.device.log.lock().unwrap().started.len(), 1);
    // The device is served as usual from here: GET_VQ_STATE stops the queue, reset.
    let r = h.request(VduseDevRequest::get_vq_state(0, 0));
    assert_eq!(r.split_avail_index(), 7);
    assert_eq!(h.status(0), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.device.log.lock().unwrap().resets, 1);
    assert!(h.dma.is_empty());
    h.stop().unwrap();
}

#[test]
fn a_takeover_whose_used_ring_is_not_mapped_ends_the_server_with_an_error() {
    let h = Harness::start_full(FakeDevice::new(), true, |vqs| {
        vqs[0].device_addr = 0x9000_0000;
    });
    let mut h = h;
    let err = h.thread.take().unwrap().join().unwrap().unwrap_err();
    assert!(
        err.to_string().contains("cannot take the device over"),
        "{err}"
    );
    assert!(err.to_string().contains("not mapped"), "{err}");
    assert!(h.device.log.lock().unwrap().started.is_empty());
}

#[test]
fn status_writes_follow_the_shared_rules() {
    let mut h = Harness::start(FakeDevice::new());
    // DRIVER_OK without FEATURES_OK: refused (the kernel then keeps its old status), no
    // queue started.
    assert_eq!(h.status(0x07), VDUSE_REQ_RESULT_FAILED);
    assert!(h.device.log.lock().unwrap().started.is_empty());
    assert_eq!(h.status(0x0b), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.status(0x0f), VDUSE_REQ_RESULT_OK);
    assert!(!h.device.log.lock().unwrap().started.is_empty());
    // A driver clearing bits without a reset: refused, nothing stops.
    assert_eq!(h.status(0x03), VDUSE_REQ_RESULT_FAILED);
    assert!(h.device.log.lock().unwrap().stopped.is_empty());
    h.stop().unwrap();
}

/// A backend failure (a panic the device contained) stops the device's queues; the driver's
/// reset clears it and the device starts again.
#[test]
fn a_failed_device_stops_its_queues_until_the_driver_resets_it() {
    let mut h = Harness::start(FakeDevice::new());
    assert_eq!(h.status(0x0b), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.status(0x0f), VDUSE_REQ_RESULT_OK);
    assert!(h.device.log.lock().unwrap().stopped.is_empty());
    h.device
        .health
        .fail("the backend panicked in handle_event: test");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while h.device.log.lock().unwrap().stopped.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the queues were not stopped"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(h.status(0), VDUSE_REQ_RESULT_OK);
    assert!(
        !h.device.health.is_failed(),
        "the reset cleared the failure"
    );
    let started = h.device.log.lock().unwrap().started.len();
    assert_eq!(h.status(0x0b), VDUSE_REQ_RESULT_OK);
    assert_eq!(h.status(0x0f), VDUSE_REQ_RESULT_OK);
    assert!(
        h.device.log.lock().unwrap().started.len() > started,
        "started again"
    );
    h.stop().unwrap();
}
