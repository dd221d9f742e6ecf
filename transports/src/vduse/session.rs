//! One VDUSE device's request channel, translated into calls on the core's
//! [`VirtioDevice`] and [`DmaSpace`] (kernel `Documentation/userspace-api/vduse.rst`,
//! "How VDUSE works"; messages of `include/uapi/linux/vduse.h`).
//!
//! * `VDUSE_GET_VQ_STATE` — the kernel asks for a queue's next available index (vhost-vdpa's
//!   `VHOST_GET_VRING_BASE`, which stops the ring): a running queue is stopped and the
//!   index it stopped at is returned; a stopped one returns where it stopped (or where
//!   the driver set it).
//! * `VDUSE_SET_STATUS` — FEATURES_OK: the negotiated features (`VDUSE_DEV_GET_FEATURES`)
//!   go to [`VirtioDevice::set_driver_features`]. DRIVER_OK: the IOTLB is mirrored
//!   ([`IotlbMirror::sync`]), and each ready queue (`VDUSE_VQ_GET_INFO`) is started with
//!   a kick eventfd given to the kernel (`VDUSE_VQ_SETUP_KICKFD`, directly or through a
//!   relay, see [`iotlb`](super::iotlb)) and a call eventfd whose signals a relay on the
//!   dispatch turns into `VDUSE_VQ_INJECT_IRQ`. Status 0: queues stop, the device resets,
//!   all memory is unmapped.
//! * `VDUSE_UPDATE_IOTLB` — the range is re-read from the kernel into the `DmaSpace`.
//!
//! A session can also take over a device whose daemon died while a driver used it
//! ([`Session::adopt`]): the kernel keeps the device and its rings, so the queues are
//! started again at their used index and the driver's waiting requests complete.
//!
//! The session holds no device state beyond the status and where each queue stopped. The
//! ioctls it uses are the [`VduseIoctls`] trait, so tests drive it with a fake device.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::Arc;

use log::{debug, info, warn};
use unidev_core::dispatch::{Control, LoopContext, Token};
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::spec::{self, status};
use unidev_core::virtio::{QueueConfig, VirtioDevice};
use vm_memory::ByteValued;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use super::control::offered_features;
use super::iotlb::{IotlbMirror, IotlbSource};
use super::uapi::{
    VduseDevRequest, VduseDevResponse, VduseIotlbEntry, VduseVqEventfd, VduseVqInfo,
    VDUSE_DEV_GET_FEATURES, VDUSE_EVENTFD_DEASSIGN, VDUSE_GET_VQ_STATE, VDUSE_IOTLB_GET_FD,
    VDUSE_REQ_RESULT_FAILED, VDUSE_REQ_RESULT_OK, VDUSE_SET_STATUS, VDUSE_UPDATE_IOTLB,
    VDUSE_VQ_GET_INFO, VDUSE_VQ_INJECT_IRQ, VDUSE_VQ_SETUP_KICKFD,
};

/// The per-device ioctls a session issues on `/dev/vduse/NAME`.
pub trait VduseIoctls: IotlbSource {
    /// `VDUSE_DEV_GET_FEATURES`: the features the driver accepted.
    fn driver_features(&self) -> io::Result<u64>;
    /// `VDUSE_VQ_GET_INFO` for queue `index`.
    fn vq_info(&self, index: u32) -> io::Result<VduseVqInfo>;
    /// `VDUSE_VQ_SETUP_KICKFD`: the eventfd the kernel signals when the driver kicks
    /// queue `index` (`None`: none; kicks are then remembered until one is set).
    fn set_vq_kick(&self, index: u32, fd: Option<RawFd>) -> io::Result<()>;
    /// `VDUSE_VQ_INJECT_IRQ`: interrupt the driver for queue `index`.
    fn inject_vq_irq(&self, index: u32) -> io::Result<()>;
}

/// The real ioctls, on an open `/dev/vduse/NAME`.
#[derive(Debug)]
pub struct KernelIoctls {
    file: Arc<File>,
}

impl KernelIoctls {
    /// Issue ioctls on `file` (`/dev/vduse/NAME`).
    pub fn new(file: Arc<File>) -> Self {
        KernelIoctls { file }
    }
}

fn ioctl_result(ret: i32) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl IotlbSource for KernelIoctls {
    fn iotlb_get_fd(&self, start: u64, last: u64) -> io::Result<Option<(File, VduseIotlbEntry)>> {
        let mut entry = VduseIotlbEntry {
            start,
            last,
            ..Default::default()
        };
        // SAFETY: VDUSE_IOTLB_GET_FD reads and writes one vduse_iotlb_entry in `entry`,
        // which outlives the call; the fd is valid.
        let fd =
            unsafe { ioctl_with_mut_ref(self.file.as_ref(), VDUSE_IOTLB_GET_FD(), &mut entry) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EINVAL) {
                Ok(None)
            } else {
                Err(e)
            };
        }
        // SAFETY: on success the ioctl returns a new descriptor that this process owns and
        // nothing else refers to.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Some((file, entry)))
    }
}

impl VduseIoctls for KernelIoctls {
    fn driver_features(&self) -> io::Result<u64> {
        let mut features = 0u64;
        // SAFETY: VDUSE_DEV_GET_FEATURES writes one u64 into `features`.
        let r = unsafe {
            ioctl_with_mut_ref(self.file.as_ref(), VDUSE_DEV_GET_FEATURES(), &mut features)
        };
        ioctl_result(r).map(|_| features)
    }

    fn vq_info(&self, index: u32) -> io::Result<VduseVqInfo> {
        let mut info = VduseVqInfo {
            index,
            ..Default::default()
        };
        // SAFETY: VDUSE_VQ_GET_INFO reads the index from and writes one vduse_vq_info
        // into `info`.
        let r = unsafe { ioctl_with_mut_ref(self.file.as_ref(), VDUSE_VQ_GET_INFO(), &mut info) };
        ioctl_result(r).map(|_| info)
    }

    fn set_vq_kick(&self, index: u32, fd: Option<RawFd>) -> io::Result<()> {
        let arg = VduseVqEventfd {
            index,
            fd: fd.unwrap_or(VDUSE_EVENTFD_DEASSIGN),
        };
        // SAFETY: VDUSE_VQ_SETUP_KICKFD reads one vduse_vq_eventfd from `arg`; the kernel
        // takes its own reference to the eventfd.
        let r = unsafe { ioctl_with_ref(self.file.as_ref(), VDUSE_VQ_SETUP_KICKFD(), &arg) };
        ioctl_result(r)
    }

    fn inject_vq_irq(&self, index: u32) -> io::Result<()> {
        // SAFETY: VDUSE_VQ_INJECT_IRQ reads one u32 from `index`.
        let r = unsafe { ioctl_with_ref(self.file.as_ref(), VDUSE_VQ_INJECT_IRQ(), &index) };
        ioctl_result(r)
    }
}

/// Read one request from the channel; `Ok(None)` when none is pending (`EAGAIN`).
/// A closed channel (end of file, only possible with a test stand-in) is `UnexpectedEof`.
pub fn read_request(channel: &File) -> io::Result<Option<VduseDevRequest>> {
    let mut req = VduseDevRequest::default();
    let want = req.as_slice().len();
    match (&*channel).read(req.as_mut_slice()) {
        Ok(n) if n == want => Ok(Some(req)),
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the request channel was closed",
        )),
        Ok(n) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("short request: {n} of {want} bytes"),
        )),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
        Err(e) => Err(e),
    }
}

/// Write one response to the channel.
pub fn write_response(channel: &File, resp: &VduseDevResponse) -> io::Result<()> {
    let bytes = resp.as_slice();
    let n = (&*channel).write(bytes)?;
    if n != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short response: {n} of {} bytes", bytes.len()),
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Queue {
    running: bool,
    /// Where the queue stopped (or the driver's start index): GET_VQ_STATE's answer.
    last_avail: u16,
    /// Kick and call relay watches on the dispatch.
    relays: Vec<Token>,
}

/// The requests of one VDUSE device, as calls on one core device.
pub struct Session {
    name: String,
    device: Arc<dyn VirtioDevice>,
    io: Arc<dyn VduseIoctls>,
    mirror: Arc<IotlbMirror>,
    status: u8,
    driver_features: u64,
    queues: Vec<Queue>,
}

/// Adapts the ioctl object to the mirror's lookup interface.
struct LookupThrough(Arc<dyn VduseIoctls>);

impl IotlbSource for LookupThrough {
    fn iotlb_get_fd(&self, start: u64, last: u64) -> io::Result<Option<(File, VduseIotlbEntry)>> {
        self.0.iotlb_get_fd(start, last)
    }
}

impl Session {
    /// A session serving `device`, whose memory is `dma`, through `io`.
    pub fn new(
        name: impl Into<String>,
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
        io: Arc<dyn VduseIoctls>,
    ) -> Self {
        let name = name.into();
        let queues = (0..device.num_queues()).map(|_| Queue::default()).collect();
        let mirror = Arc::new(IotlbMirror::new(
            name.clone(),
            Arc::new(LookupThrough(io.clone())),
            dma,
        ));
        Session {
            name,
            device,
            io,
            mirror,
            status: 0,
            driver_features: 0,
            queues,
        }
    }

    /// The device this session serves.
    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.device
    }

    /// The device status the driver last set.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The features negotiated at FEATURES_OK.
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Whether queue `index` runs.
    pub fn queue_running(&self, index: usize) -> bool {
        self.queues.get(index).is_some_and(|q| q.running)
    }

    /// The IOTLB mirror (for diagnostics and tests).
    pub fn mirror(&self) -> &Arc<IotlbMirror> {
        &self.mirror
    }

    /// Answer one request. Watches for relays are added to or removed from `ctx`.
    pub fn handle(&mut self, req: &VduseDevRequest, ctx: &mut LoopContext) -> VduseDevResponse {
        let id = req.request_id;
        let failed = VduseDevResponse::new(id, VDUSE_REQ_RESULT_FAILED);
        match req.req_type {
            VDUSE_GET_VQ_STATE => {
                let index = req.vq_index();
                match self.get_vq_state(index as usize, ctx) {
                    Some(avail) => VduseDevResponse::vq_state(id, index, avail),
                    None => {
                        warn!(
                            "{}: GET_VQ_STATE for queue {index}: no such queue",
                            self.name
                        );
                        failed
                    }
                }
            }
            VDUSE_SET_STATUS => match self.set_status(req.status(), ctx) {
                Ok(()) => VduseDevResponse::new(id, VDUSE_REQ_RESULT_OK),
                Err(e) => {
                    warn!("{}: status {:#x} refused: {e}", self.name, req.status());
                    failed
                }
            },
            VDUSE_UPDATE_IOTLB => {
                let (start, last) = req.iova_range();
                match self.mirror.sync(start, last) {
                    Ok(changed) => {
                        debug!(
                            "{}: IOTLB [{start:#x}, {last:#x}] updated (changed: {changed})",
                            self.name
                        );
                        VduseDevResponse::new(id, VDUSE_REQ_RESULT_OK)
                    }
                    Err(e) => {
                        warn!("{}: IOTLB update [{start:#x}, {last:#x}]: {e}", self.name);
                        failed
                    }
                }
            }
            other => {
                warn!("{}: unknown request type {other}", self.name);
                failed
            }
        }
    }

    fn get_vq_state(&mut self, index: usize, ctx: &mut LoopContext) -> Option<u16> {
        self.queues.get(index)?;
        self.stop_queue(index, ctx);
        Some(self.queues[index].last_avail)
    }

    /// SET_STATUS, by the rules every transport shares (`unidev_core::virtio::spec`):
    /// FEATURES_OK hands the kernel's negotiated features to the device, the device
    /// starts running its queues at DRIVER_OK and stops when the driver sets FAILED; 0
    /// resets it. A write that is not taken as it is (refused features, DRIVER_OK before
    /// FEATURES_OK, cleared bits) or a queue that cannot start fails the request, so that
    /// the kernel's cached status stays the device's.
    fn set_status(&mut self, written: u8, ctx: &mut LoopContext) -> io::Result<()> {
        let old = self.status;
        debug!("{}: status {old:#x} -> {written:#x}", self.name);
        let offered = offered_features(self.device.device_type(), self.device.features());
        let io = self.io.clone();
        let update = spec::write_status(old, written, offered, || {
            io.driver_features()
                .map_err(|e| format!("VDUSE_DEV_GET_FEATURES: {e}"))
        });
        if update.reset {
            self.reset(ctx);
            return Ok(());
        }
        if let Some(features) = update.features {
            self.device.set_driver_features(features);
            self.driver_features = features;
            info!("{}: driver features {features:#x}", self.name);
        }
        if update.start {
            if let Err(e) = self.start_queues(ctx) {
                // The kernel keeps its old status when the request fails: so does this.
                self.stop_all(ctx);
                return Err(e);
            }
        } else if update.stop {
            self.stop_all(ctx);
        }
        self.status = update.status;
        // The kernel caches the status it asked for unless the request fails, and its
        // driver reads that cache: a write the device does not take as it is must fail.
        match update.refused {
            Some(why) => Err(io::Error::other(why)),
            None => Ok(()),
        }
    }

    /// Stop every queue, reset the device and drop all memory (status 0, shutdown).
    pub fn reset(&mut self, ctx: &mut LoopContext) {
        self.stop_all(ctx);
        self.close();
    }

    /// The device failed (its backend panicked): stop its queues and keep
    /// DEVICE_NEEDS_RESET in the status until the driver resets it. (The kernel keeps its
    /// own copy of the status, which a device cannot change: the driver learns of the
    /// failure only by its requests no longer completing.)
    pub fn device_failed(&mut self, ctx: &mut LoopContext) {
        self.stop_all(ctx);
        self.status |= status::DEVICE_NEEDS_RESET;
    }

    /// Like [`reset`](Session::reset) when no dispatch is at hand (the loop has ended and
    /// dropped every relay).
    pub fn close(&mut self) {
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.running {
                self.device.stop_queue(i);
                let _ = self.io.set_vq_kick(i as u32, None);
            }
            *q = Queue::default();
        }
        self.device.reset();
        self.mirror.clear();
        self.status = 0;
        self.driver_features = 0;
    }

    fn stop_all(&mut self, ctx: &mut LoopContext) {
        for i in 0..self.queues.len() {
            self.stop_queue(i, ctx);
        }
    }

    fn stop_queue(&mut self, index: usize, ctx: &mut LoopContext) {
        let Some(q) = self.queues.get_mut(index) else {
            return;
        };
        for t in q.relays.drain(..) {
            ctx.remove(t);
        }
        if !q.running {
            return;
        }
        q.running = false;
        if let Some(next) = self.device.stop_queue(index) {
            q.last_avail = next;
        }
        // Kicks from now on are remembered by the kernel until a queue start sets a fd.
        if let Err(e) = self.io.set_vq_kick(index as u32, None) {
            debug!("{}: queue {index}: cannot drop the kick fd: {e}", self.name);
        }
        debug!("{}: queue {index} stopped at {}", self.name, q.last_avail);
    }

    fn start_queues(&mut self, ctx: &mut LoopContext) -> io::Result<()> {
        self.mirror.sync(0, u64::MAX)?;
        for index in 0..self.queues.len() {
            let info = self.io.vq_info(index as u32)?;
            if info.ready == 0 {
                debug!("{}: queue {index} not ready; not started", self.name);
                continue;
            }
            self.start_queue(index, &info, ctx, false)?;
        }
        Ok(())
    }

    /// Take over a device whose previous daemon died while a driver used it.
    ///
    /// The kernel keeps such a device as it was (`vduse_dev_release` in
    /// `drivers/vdpa/vdpa_user/vduse_dev.c` only marks it disconnected and puts requests
    /// the dead daemon read but did not answer back in the queue for the next reader):
    /// driver features, queue addresses and sizes, the IOTLB and the rings in memory. There
    /// is no ioctl for the device status, so it is inferred: negotiated features mean
    /// FEATURES_OK, a ready queue means DRIVER_OK. Then, as at DRIVER_OK, the IOTLB is
    /// mirrored and each ready queue started — at the used ring's index, for both the next
    /// available entry and the next used one: requests the dead daemon took from the ring
    /// but did not complete are taken again. That is exact for devices that complete each
    /// queue's requests in the order they take them (the backends here do; it is the
    /// assumption the core's in-flight recovery makes too); such a request may run twice
    /// (harmless for block reads and writes of the same data).
    ///
    /// Answers nothing itself: messages the kernel re-queued follow on the channel.
    pub fn adopt(&mut self, ctx: &mut LoopContext) -> io::Result<()> {
        let features = self.io.driver_features()?;
        let mut infos = Vec::with_capacity(self.queues.len());
        for index in 0..self.queues.len() {
            infos.push(self.io.vq_info(index as u32)?);
        }
        if features != 0 {
            self.device.set_driver_features(features);
            self.driver_features = features;
            self.status = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        }
        let ready: Vec<usize> = (0..infos.len()).filter(|&i| infos[i].ready != 0).collect();
        if ready.is_empty() {
            info!(
                "{}: took over the device (driver features {features:#x}, no queue ready)",
                self.name
            );
            return Ok(());
        }
        self.mirror.sync(0, u64::MAX)?;
        for &index in &ready {
            if let Err(e) = self.start_queue(index, &infos[index], ctx, true) {
                self.stop_all(ctx);
                return Err(e);
            }
        }
        self.status |= status::DRIVER_OK;
        info!(
            "{}: took over the running device (driver features {features:#x}, queues {ready:?} \
             resumed at their used index)",
            self.name
        );
        Ok(())
    }

    /// The used ring's index in guest memory, where a resumed queue continues.
    fn used_index(&self, used_ring: u64) -> Option<u16> {
        let mut idx = [0u8; 2];
        let addr = used_ring.checked_add(2)?;
        self.mirror.dma().read(addr, &mut idx).ok()?;
        Some(u16::from_le_bytes(idx))
    }

    /// Start queue `index` as the kernel describes it; `resume`: at the used ring's index
    /// (a takeover, see [`adopt`](Session::adopt)) instead of where the driver said.
    fn start_queue(
        &mut self,
        index: usize,
        info: &VduseVqInfo,
        ctx: &mut LoopContext,
        resume: bool,
    ) -> io::Result<()> {
        let size = u16::try_from(info.num).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("queue {index}: size {} too large", info.num),
            )
        })?;
        let (next_avail, next_used) = if resume {
            let used = self.used_index(info.device_addr).ok_or_else(|| {
                io::Error::other(format!(
                    "queue {index}: the used ring at {:#x} is not mapped",
                    info.device_addr
                ))
            })?;
            (used, used)
        } else {
            let avail = info.split_avail_index();
            (avail, self.used_index(info.device_addr).unwrap_or(avail))
        };
        let device_kick = EventFd::new(EFD_NONBLOCK)?;
        let kick_for_kernel = device_kick.try_clone()?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        let config = QueueConfig {
            size,
            desc: info.desc_addr,
            avail: info.driver_addr,
            used: info.device_addr,
            kick: device_kick,
            call: Some(call.try_clone()?),
            next_avail,
            next_used,
        };
        self.device
            .start_queue(index, config)
            .map_err(|e| io::Error::other(e.to_string()))?;
        let q = &mut self.queues[index];
        q.running = true;
        q.last_avail = next_avail;

        // Interrupts: the device signals `call`; the relay injects them.
        let io = self.io.clone();
        let name = self.name.clone();
        let q_index = index as u32;
        let call_fd = call.as_raw_fd();
        q.relays
            .push(ctx.add(call_fd, epoll::Events::EPOLLIN, move |_, _| {
                if call.read().is_ok() {
                    if let Err(e) = io.inject_vq_irq(q_index) {
                        debug!("{name}: queue {q_index}: cannot inject an interrupt: {e}");
                    }
                }
                Control::Continue
            }));

        // Kicks: straight to the device once the IOTLB is settled, else through a relay.
        if self.mirror.settled() {
            if let Err(e) = self
                .io
                .set_vq_kick(q_index, Some(kick_for_kernel.as_raw_fd()))
            {
                self.stop_queue(index, ctx);
                return Err(e);
            }
        } else {
            let relay = EventFd::new(EFD_NONBLOCK)?;
            if let Err(e) = self.io.set_vq_kick(q_index, Some(relay.as_raw_fd())) {
                self.stop_queue(index, ctx);
                return Err(e);
            }
            let relay_fd = relay.as_raw_fd();
            let token = ctx.add(
                relay_fd,
                epoll::Events::EPOLLIN,
                kick_relay(
                    self.name.clone(),
                    q_index,
                    relay,
                    kick_for_kernel,
                    self.mirror.clone(),
                    self.io.clone(),
                ),
            );
            self.queues[index].relays.push(token);
        }
        info!(
            "{}: queue {index} started (size {size}, avail {next_avail}, used {next_used})",
            self.name
        );
        Ok(())
    }
}

/// The kick relay of one queue: on each kick, map IOTLB entries the kernel added without
/// a message, then wake the device; once the bounce region is mapped, hand the device's
/// kick eventfd to the kernel and remove itself.
fn kick_relay(
    name: String,
    index: u32,
    relay: EventFd,
    device_kick: EventFd,
    mirror: Arc<IotlbMirror>,
    io: Arc<dyn VduseIoctls>,
) -> impl FnMut(&mut LoopContext, unidev_core::dispatch::Readiness) -> Control + Send + 'static {
    move |_, _| {
        if relay.read().is_err() {
            return Control::Continue;
        }
        if let Err(e) = mirror.fill_gaps() {
            warn!("{name}: queue {index}: IOTLB lookup failed: {e}");
        }
        if let Err(e) = device_kick.write(1) {
            warn!("{name}: queue {index}: cannot kick the device: {e}");
        }
        if mirror.settled() {
            match io.set_vq_kick(index, Some(device_kick.as_raw_fd())) {
                Ok(()) => {
                    // A kick that reached the relay after its read above.
                    if relay.read().is_ok() {
                        let _ = device_kick.write(1);
                    }
                    debug!("{name}: queue {index}: IOTLB settled; kicks go to the device");
                    return Control::Remove;
                }
                Err(e) => debug!("{name}: queue {index}: keeping the kick relay: {e}"),
            }
        }
        Control::Continue
    }
}
