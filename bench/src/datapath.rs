//! Data path: 4 KiB virtio-blk reads at queue depth 1 (round-trip latency, median and
//! p99) and 32 (IOPS), on a null backend (`BlkOptions::null_io`: completes without I/O)
//! and on an image on tmpfs, through
//!
//! * unidev's vhost-user server (`LocalVirtio` behind `VhostUserServer`);
//! * the same backend in vhost-user-backend's stock `VhostUserDaemon` (the peer);
//! * unidev's vfio-user server as a virtio-pci function, doorbell over the socket
//!   (posted REGION_WRITEs, as QEMU sends them);
//! * the same with the notify area mmapped by the driver and a polling device;
//!
//! each in blocking mode (device workers sleep on the kick eventfd, the driver sleeps on
//! the interrupt eventfd) and in adaptive-polling mode (both poll for [`POLL_BUDGET`]
//! after each event before sleeping; the stock daemon cannot poll, so only its driver
//! does). The driver side is unidev's virtio driver library (`unidev-testkit`) in this
//! process: split rings with EVENT_IDX, over vfio-user (`VirtioPciDriver`) or as a
//! vhost-user frontend (the `vhost` crate's `Frontend`, with the library's `DriverMemory`
//! and `Virtqueue`).

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use unidev_backends::virtio_blk::{BlkOptions, VirtioBlk, VIRTIO_ID_BLOCK};
use unidev_core::dispatch::StopHandle;
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::{DispatchOptions, LocalVirtio, VirtioPci, VirtioPciOptions};
use unidev_testkit::{
    DriverError, DriverMemory, DriverOptions, NotifyMode, VirtioBlkRequest, VirtioPciDriver,
    Virtqueue,
};
use unidev_transports::listener;
use unidev_transports::vfio_user::{ServerConfig, VfioUserClient, VfioUserServer};
use unidev_transports::vhost_user::VhostUserServer;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::floors::ns_since;
use super::pin::Placement;

/// How long device workers and the driver poll after an event before sleeping, in
/// adaptive mode (longer than a cross-core wake-up, so a QD1 loop never sleeps).
pub const POLL_BUDGET: Duration = Duration::from_micros(50);
/// Bytes per request.
pub const REQUEST_BYTES: u32 = 4096;
/// Requests in flight for the IOPS rows.
pub const DEEP_QUEUE: usize = 32;
/// Size of the image (and of the null device).
const IMAGE_BYTES: u64 = 32 << 20;
const QUEUE_SIZE: u16 = 128;
const DRIVER_MEMORY: u64 = 16 << 20;
const IOVA_BASE: u64 = 0x1_0000_0000;
const TIMEOUT: Duration = Duration::from_secs(10);
const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// What stands behind the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// virtio-blk with `null_io`: requests complete without I/O.
    Null,
    /// virtio-blk on an image file on tmpfs (page-cache copies, no disk).
    Tmpfs,
}

impl Backend {
    /// Key fragment.
    pub fn key(self) -> &'static str {
        match self {
            Backend::Null => "null",
            Backend::Tmpfs => "tmpfs",
        }
    }
}

/// The transport between driver and device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// unidev's vhost-user server.
    UnidevVhostUser,
    /// vhost-user-backend's `VhostUserDaemon`.
    StockVhostUser,
    /// unidev's vfio-user server, virtio-pci, doorbell over the socket.
    VfioUserSocket,
    /// unidev's vfio-user server, virtio-pci, mmapped notify area, polling device.
    VfioUserMmap,
}

impl Transport {
    /// Every transport, in report order.
    pub const ALL: [Transport; 4] = [
        Transport::UnidevVhostUser,
        Transport::StockVhostUser,
        Transport::VfioUserSocket,
        Transport::VfioUserMmap,
    ];

    /// Key fragment.
    pub fn key(self) -> &'static str {
        match self {
            Transport::UnidevVhostUser => "unidev-vhost-user",
            Transport::StockVhostUser => "stock-vhost-user",
            Transport::VfioUserSocket => "vfio-user-socket",
            Transport::VfioUserMmap => "vfio-user-mmap",
        }
    }

    /// What a reader sees.
    pub fn label(self) -> &'static str {
        match self {
            Transport::UnidevVhostUser => "unidev vhost-user",
            Transport::StockVhostUser => "stock VhostUserDaemon",
            Transport::VfioUserSocket => "unidev vfio-user, socket doorbell",
            Transport::VfioUserMmap => "unidev vfio-user, mmapped notify + polling device",
        }
    }
}

/// How both ends wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Sleep on eventfds at once.
    Blocking,
    /// Poll for [`POLL_BUDGET`] first.
    Adaptive,
}

impl Mode {
    /// Key fragment.
    pub fn key(self) -> &'static str {
        match self {
            Mode::Blocking => "blocking",
            Mode::Adaptive => "adaptive",
        }
    }
}

/// One data-path configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Backend.
    pub backend: Backend,
    /// Transport.
    pub transport: Transport,
    /// Mode.
    pub mode: Mode,
}

impl Config {
    /// `data.{backend}.{transport}.{mode}`.
    pub fn key(&self) -> String {
        format!(
            "data.{}.{}.{}",
            self.backend.key(),
            self.transport.key(),
            self.mode.key()
        )
    }
}

/// The driver's view of one queue, whatever the transport.
trait Ring {
    fn memory(&self) -> &DriverMemory;
    fn add(&mut self, chain: &[(u64, u32, bool)]) -> Result<u16, String>;
    /// Notify the device if it wants to be.
    fn kick(&mut self) -> Result<(), String>;
    fn poll_used(&mut self) -> Result<Option<(u16, u32)>, String>;
    fn enable_interrupts(&mut self) -> Result<bool, String>;
    fn disable_interrupts(&mut self) -> Result<(), String>;
    /// The eventfd the device signals used buffers on.
    fn interrupt_fd(&self) -> RawFd;
}

fn derr(e: DriverError) -> String {
    e.to_string()
}

/// Queue 0 of a virtio-pci device driven over vfio-user.
struct PciRing {
    driver: VirtioPciDriver,
    irq: RawFd,
}

impl Drop for PciRing {
    fn drop(&mut self) {
        // Leave as a driver should: reset the device (its queues stop) and withdraw the
        // memory, before the connection closes.
        if let Err(e) = self.driver.reset() {
            log::warn!("bench driver: reset on the way out: {e}");
        }
        let mem = self.driver.memory();
        let (base, size) = (mem.iova_base(), mem.size());
        if let Err(e) = self.driver.client_mut().dma_unmap(base, size) {
            log::warn!("bench driver: unmap on the way out: {e}");
        }
    }
}

impl Ring for PciRing {
    fn memory(&self) -> &DriverMemory {
        self.driver.memory()
    }
    fn add(&mut self, chain: &[(u64, u32, bool)]) -> Result<u16, String> {
        self.driver.add_chain(0, chain).map_err(derr)
    }
    fn kick(&mut self) -> Result<(), String> {
        self.driver.kick(0).map(|_| ()).map_err(derr)
    }
    fn poll_used(&mut self) -> Result<Option<(u16, u32)>, String> {
        self.driver.poll_used(0).map_err(derr)
    }
    fn enable_interrupts(&mut self) -> Result<bool, String> {
        self.driver
            .queue(0)
            .and_then(|q| q.enable_interrupts())
            .map_err(derr)
    }
    fn disable_interrupts(&mut self) -> Result<(), String> {
        self.driver
            .queue(0)
            .and_then(|q| q.disable_interrupts())
            .map_err(derr)
    }
    fn interrupt_fd(&self) -> RawFd {
        self.irq
    }
}

/// Queue 0 of a vhost-user backend, this process being its frontend.
struct VhostRing {
    // Kept open for the ring's life: dropping it hangs up (the stock daemon returns).
    _frontend: Frontend,
    queue: Virtqueue,
    memory: DriverMemory,
    kick: EventFd,
    call: EventFd,
}

impl Ring for VhostRing {
    fn memory(&self) -> &DriverMemory {
        &self.memory
    }
    fn add(&mut self, chain: &[(u64, u32, bool)]) -> Result<u16, String> {
        self.queue.add_chain(chain).map_err(derr)
    }
    fn kick(&mut self) -> Result<(), String> {
        if self.queue.kick_prepare().map_err(derr)? {
            self.kick.write(1).map_err(|e| format!("kick: {e}"))?;
        }
        Ok(())
    }
    fn poll_used(&mut self) -> Result<Option<(u16, u32)>, String> {
        self.queue.poll_used().map_err(derr)
    }
    fn enable_interrupts(&mut self) -> Result<bool, String> {
        self.queue.enable_interrupts().map_err(derr)
    }
    fn disable_interrupts(&mut self) -> Result<(), String> {
        self.queue.disable_interrupts().map_err(derr)
    }
    fn interrupt_fd(&self) -> RawFd {
        self.call.as_raw_fd()
    }
}

/// Be a vhost-user frontend on `sock`: features with EVENT_IDX, one memfd of driver
/// memory, queue 0 started.
fn vhost_user_frontend(sock: &Path) -> Result<VhostRing, String> {
    let e = |what: &'static str| move |e: vhost::Error| format!("vhost-user {what}: {e}");
    let deadline = Instant::now() + TIMEOUT;
    let mut frontend = loop {
        match Frontend::connect(sock, 1) {
            Ok(f) => break f,
            Err(err) if Instant::now() > deadline => {
                return Err(format!("cannot connect to {}: {err}", sock.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    };
    frontend.set_owner().map_err(e("SET_OWNER"))?;
    let offered = frontend.get_features().map_err(e("GET_FEATURES"))?;
    frontend
        .set_features(offered & (VERSION_1 | PROTOCOL_FEATURES | EVENT_IDX))
        .map_err(e("SET_FEATURES"))?;
    let pf = frontend
        .get_protocol_features()
        .map_err(e("GET_PROTOCOL_FEATURES"))?;
    frontend
        .set_protocol_features(
            pf & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG),
        )
        .map_err(e("SET_PROTOCOL_FEATURES"))?;
    let memory = DriverMemory::new(DRIVER_MEMORY, IOVA_BASE).map_err(derr)?;
    let region = memory
        .guest_memory()
        .iter()
        .next()
        .ok_or("driver memory has no region")?;
    let mut info = VhostUserMemoryRegionInfo::from_guest_region(region)
        .map_err(|e| format!("memory region: {e}"))?;
    info.mmap_handle = memory.file().as_raw_fd();
    frontend
        .set_mem_table(&[info])
        .map_err(e("SET_MEM_TABLE"))?;
    let host = |iova: u64| info.userspace_addr + (iova - memory.iova_base());
    let queue = Virtqueue::new(&memory, 0, QUEUE_SIZE, true).map_err(derr)?;
    frontend
        .set_vring_num(0, QUEUE_SIZE)
        .map_err(e("SET_VRING_NUM"))?;
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: host(queue.desc_iova()),
                used_ring_addr: host(queue.used_iova()),
                avail_ring_addr: host(queue.avail_iova()),
                log_addr: None,
            },
        )
        .map_err(e("SET_VRING_ADDR"))?;
    frontend.set_vring_base(0, 0).map_err(e("SET_VRING_BASE"))?;
    let kick = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
    let call = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
    frontend
        .set_vring_call(0, &call)
        .map_err(e("SET_VRING_CALL"))?;
    frontend
        .set_vring_kick(0, &kick)
        .map_err(e("SET_VRING_KICK"))?;
    frontend
        .set_vring_enable(0, true)
        .map_err(e("SET_VRING_ENABLE"))?;
    Ok(VhostRing {
        _frontend: frontend,
        queue,
        memory,
        kick,
        call,
    })
}

/// The device side of one configuration, running on the device CPU until dropped.
struct DeviceSide {
    stop: Option<StopHandle>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for DeviceSide {
    fn drop(&mut self) {
        if let Some(s) = &self.stop {
            s.stop();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn_server(
    name: &str,
    run: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<std::thread::JoinHandle<()>, String> {
    let label = name.to_string();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Err(e) = run() {
                log::error!("{label}: {e}");
            }
        })
        .map_err(|e| format!("spawn: {e}"))
}

/// Build the backend and its transport on the device CPU, listening on `sock`.
fn start_device(
    cfg: Config,
    place: &Placement,
    image: &Path,
    sock: &Path,
) -> Result<DeviceSide, String> {
    let _ = std::fs::remove_file(sock);
    let blk = Arc::new(
        VirtioBlk::new(BlkOptions {
            path: image.to_path_buf(),
            null_io: cfg.backend == Backend::Null,
            queue_size: 256,
            ..BlkOptions::default()
        })
        .map_err(|e| format!("virtio-blk on {}: {e}", image.display()))?,
    );
    let dispatch = DispatchOptions {
        poll: match cfg.mode {
            Mode::Blocking => Duration::ZERO,
            Mode::Adaptive => POLL_BUDGET,
        },
        busy: cfg.transport == Transport::VfioUserMmap,
    };
    let sock = sock.to_path_buf();
    place
        .build_on_device(move || -> Result<DeviceSide, String> {
            let e = |e: std::io::Error| e.to_string();
            match cfg.transport {
                Transport::StockVhostUser => {
                    let mut daemon = VhostUserDaemon::new(
                        "bench-stock".into(),
                        blk,
                        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
                    )
                    .map_err(|e| format!("stock daemon: {e}"))?;
                    // Serves one frontend and returns when it hangs up.
                    let thread = spawn_server("bench-stock", move || {
                        daemon.serve(&sock).map_err(|e| e.to_string())
                    })?;
                    Ok(DeviceSide {
                        stop: None,
                        thread: Some(thread),
                    })
                }
                Transport::UnidevVhostUser => {
                    let dma = Arc::new(DmaSpace::default());
                    let local =
                        LocalVirtio::new(VIRTIO_ID_BLOCK, blk, &dma, dispatch).map_err(e)?;
                    let server = VhostUserServer::new(
                        "bench-vu",
                        listener::bind(&sock, 0o600).map_err(|e| e.to_string())?,
                        local,
                        dma,
                    )
                    .map_err(e)?;
                    let stop = server.stop_handle();
                    let thread = spawn_server("bench-vu", move || server.run().map_err(e))?;
                    Ok(DeviceSide {
                        stop: Some(stop),
                        thread: Some(thread),
                    })
                }
                Transport::VfioUserSocket | Transport::VfioUserMmap => {
                    let dma = Arc::new(DmaSpace::default());
                    let local =
                        LocalVirtio::new(VIRTIO_ID_BLOCK, blk, &dma, dispatch).map_err(e)?;
                    let pci = VirtioPci::new(
                        "bench-pci",
                        local,
                        dma,
                        VirtioPciOptions::default()
                            .notify_mmap(cfg.transport == Transport::VfioUserMmap),
                    )
                    .map_err(|e| e.to_string())?;
                    let server = VfioUserServer::new(
                        "bench-pci",
                        listener::bind(&sock, 0o600).map_err(|e| e.to_string())?,
                        Arc::new(Mutex::new(pci)),
                        ServerConfig::default(),
                    )
                    .map_err(e)?;
                    let stop = server.stop_handle();
                    let thread = spawn_server("bench-pci", move || server.run().map_err(e))?;
                    Ok(DeviceSide {
                        stop: Some(stop),
                        thread: Some(thread),
                    })
                }
            }
        })
        .map_err(|e| format!("pin: {e}"))?
}

/// Attach a driver to the device on `sock`.
fn connect_driver(cfg: Config, sock: &Path) -> Result<Box<dyn Ring>, String> {
    match cfg.transport {
        Transport::UnidevVhostUser | Transport::StockVhostUser => {
            Ok(Box::new(vhost_user_frontend(sock)?))
        }
        Transport::VfioUserSocket | Transport::VfioUserMmap => {
            let client =
                VfioUserClient::connect(sock).map_err(|e| format!("vfio-user connect: {e}"))?;
            let mut driver = VirtioPciDriver::new(
                client,
                DriverOptions {
                    features: VERSION_1 | EVENT_IDX,
                    num_queues: Some(1),
                    queue_size: QUEUE_SIZE,
                    memory_size: DRIVER_MEMORY,
                    iova_base: IOVA_BASE,
                    notify: if cfg.transport == Transport::VfioUserMmap {
                        NotifyMode::Mmap
                    } else {
                        NotifyMode::Posted
                    },
                    ..DriverOptions::default()
                },
            )
            .map_err(derr)?;
            driver.init().map_err(derr)?;
            let irq = driver
                .queue_irq_fd(0)
                .ok_or("the driver has no interrupt eventfd for queue 0")?;
            Ok(Box::new(PciRing { driver, irq }))
        }
    }
}

/// Clear an eventfd (non-blocking).
fn drain_eventfd(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into a valid u64; a non-blocking eventfd either has
    // a count (read) or fails with EAGAIN.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

/// Wait for `fd` to be readable, at most `timeout`.
fn wait_readable(fd: RawFd, timeout: Duration) -> Result<bool, String> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    loop {
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(format!("poll: {err}"));
        }
    }
}

/// The next used buffer: poll first in adaptive mode, then sleep on the interrupt.
fn wait_used(ring: &mut dyn Ring, mode: Mode) -> Result<(u16, u32), String> {
    if let Some(u) = ring.poll_used()? {
        return Ok(u);
    }
    if mode == Mode::Adaptive {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if let Some(u) = ring.poll_used()? {
                return Ok(u);
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins % 64 == 0 && start.elapsed() >= POLL_BUDGET {
                break;
            }
        }
    }
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if ring.enable_interrupts()? {
            if let Some(u) = ring.poll_used()? {
                if mode == Mode::Adaptive {
                    ring.disable_interrupts()?;
                }
                return Ok(u);
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err("no completion within 10 s".into());
        }
        if wait_readable(ring.interrupt_fd(), deadline - now)? {
            drain_eventfd(ring.interrupt_fd());
        }
        if let Some(u) = ring.poll_used()? {
            if mode == Mode::Adaptive {
                ring.disable_interrupts()?;
            }
            return Ok(u);
        }
    }
}

/// A read request laid out once in driver memory and reused.
struct Slot {
    chain: Vec<(u64, u32, bool)>,
    header_iova: u64,
    status_iova: u64,
}

fn slots(mem: &DriverMemory, n: usize) -> Result<Vec<Slot>, String> {
    let req = VirtioBlkRequest::read(0, REQUEST_BYTES);
    (0..n)
        .map(|_| {
            let buf = mem.alloc(req.buffer_len(), 4096).map_err(derr)?;
            let placed = req.place(mem, buf.iova).map_err(derr)?;
            Ok(Slot {
                chain: placed.chain,
                header_iova: buf.iova,
                status_iova: placed.status_iova,
            })
        })
        .collect()
}

/// Sectors of the `i`-th request: 4 KiB steps through the image.
fn sector(i: u64) -> u64 {
    let blocks = IMAGE_BYTES / u64::from(REQUEST_BYTES);
    (i % blocks) * u64::from(REQUEST_BYTES / 512)
}

fn submit(ring: &mut dyn Ring, slot: &Slot, i: u64) -> Result<u16, String> {
    let mem = ring.memory();
    mem.write(slot.header_iova + 8, &sector(i).to_le_bytes())
        .map_err(derr)?;
    mem.write(slot.status_iova, &[0xff]).map_err(derr)?;
    ring.add(&slot.chain)
}

fn check(ring: &dyn Ring, slot: &Slot, len: u32) -> Result<(), String> {
    let mut status = [0u8];
    ring.memory()
        .read(slot.status_iova, &mut status)
        .map_err(derr)?;
    if status[0] != 0 || len != REQUEST_BYTES + 1 {
        return Err(format!(
            "request failed: status {}, used length {len}",
            status[0]
        ));
    }
    Ok(())
}

/// What one repetition of a configuration measured.
pub struct DataRun {
    /// QD1 round trips, ns.
    pub qd1: Vec<f64>,
    /// QD32: requests completed and seconds.
    pub qd32: (u64, f64),
}

/// Run one configuration: `qd1` requests one at a time, then `deep` requests with
/// [`DEEP_QUEUE`] in flight.
pub fn run(
    cfg: Config,
    place: &Placement,
    dir: &Path,
    qd1: usize,
    deep: usize,
) -> Result<DataRun, String> {
    let image = image(dir, cfg.backend)?;
    let sock = dir.join(format!("{}.sock", cfg.key()));
    let device = start_device(cfg, place, &image, &sock)?;
    // Declared after `device`, so dropped before it on every path: the driver hangs up
    // first (the stock daemon returns only then).
    let mut driver = connect_driver(cfg, &sock)?;
    let ring = driver.as_mut();
    match cfg.mode {
        Mode::Blocking => ring.enable_interrupts()?,
        Mode::Adaptive => {
            ring.disable_interrupts()?;
            false
        }
    };
    let all = slots(ring.memory(), DEEP_QUEUE)?;
    // QD1 (after a warm-up).
    let warm = qd1 / 10 + 10;
    let mut samples = Vec::with_capacity(qd1);
    for i in 0..(warm + qd1) as u64 {
        let t = Instant::now();
        let head = submit(ring, &all[0], i)?;
        ring.kick()?;
        let (h, len) = wait_used(ring, cfg.mode)?;
        if i as usize >= warm {
            samples.push(ns_since(t));
        }
        if h != head {
            return Err(format!("completed head {h}, submitted {head}"));
        }
        check(ring, &all[0], len)?;
    }
    // QD32.
    let mut by_head = vec![usize::MAX; usize::from(QUEUE_SIZE)];
    let t = Instant::now();
    let mut issued = 0u64;
    for (s, slot) in all.iter().enumerate() {
        let head = submit(ring, slot, issued)?;
        by_head[usize::from(head)] = s;
        issued += 1;
    }
    ring.kick()?;
    let mut done = 0u64;
    while done < deep as u64 {
        let mut next = Some(wait_used(ring, cfg.mode)?);
        while let Some((h, len)) = next {
            let s = *by_head
                .get(usize::from(h))
                .filter(|&&s| s != usize::MAX)
                .ok_or_else(|| format!("completed head {h} is not in flight"))?;
            check(ring, &all[s], len)?;
            done += 1;
            if issued < deep as u64 {
                let head = submit(ring, &all[s], issued)?;
                by_head[usize::from(head)] = s;
                issued += 1;
            }
            next = ring.poll_used()?;
        }
        ring.kick()?;
    }
    let secs = t.elapsed().as_secs_f64();
    drop(driver);
    drop(device);
    Ok(DataRun {
        qd1: samples,
        qd32: (done, secs),
    })
}

/// The image of `backend` in `dir` (created once, written so tmpfs holds its pages).
fn image(dir: &Path, backend: Backend) -> Result<PathBuf, String> {
    let path = dir.join(format!("{}.img", backend.key()));
    if !path.exists() {
        let f = std::fs::File::create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        match backend {
            // The null device only needs a size.
            Backend::Null => f.set_len(IMAGE_BYTES),
            Backend::Tmpfs => {
                use std::io::Write;
                let block = vec![0xa5u8; 1 << 20];
                (0..IMAGE_BYTES >> 20).try_for_each(|_| (&f).write_all(&block))
            }
        }
        .map_err(|e| format!("cannot fill {}: {e}", path.display()))?;
    }
    Ok(path)
}
