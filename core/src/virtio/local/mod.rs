//! Local queues: a `vhost_user_backend::VhostUserBackend` run on the core's shared
//! dispatch, for every transport.
//!
//! This is vhost-user-backend's own daemon (`VhostUserHandler` + `VringEpollHandler`)
//! with the wire protocol taken out: vrings are `VringRwLock`s over the device's one
//! memory snapshot; worker threads follow `queues_per_thread()`; each waits on its
//! queues' kick eventfds, the backend's `exit_event`, and a stop event; and calls
//! `handle_event(device_event, EventSet::IN, &thread_vrings, thread_id)` with the same
//! numbering (a queue's index among its thread's vrings; the exit event is
//! `num_queues()`; larger numbers are the backend's own listeners). `update_memory` runs
//! on every memory change, `set_event_idx` and `acked_features` on feature negotiation,
//! and the vring is enabled only while the queue runs — exactly the calls a backend gets
//! from `VhostUserDaemon`, so backends run unchanged.
//!
//! In-flight logging (vhost-user's INFLIGHT_SHMFD): with an [`InflightRegion`] set, the
//! worker logs heads around every `handle_event` call and a queue started on a region
//! that holds a log resumes from it (see [`inflight`](super::inflight)). Stopping a queue
//! waits for the worker's current `handle_event` to return, so a stopped queue's
//! position (GET_VRING_BASE) never moves afterwards.
//!
//! A worker's thread starts with the first of its queues, so a device no driver has set
//! up costs no thread (many idle devices in one daemon). It starts under the process's
//! seccomp policy ([`crate::sandbox`]): filtered before it touches a ring, or,
//! if the filter cannot be installed, not at all (the queue start fails).
//!
//! Every call into the backend runs inside the containment boundary
//! ([`super::health`]): after a panic the device's workers stop (they would only spin on
//! events nobody consumes, and a panic inside a vring's lock leaves that vring poisoned);
//! the driver's reset gives the device fresh vrings and re-armed workers on the same epoll
//! sets, so the listeners the backend registered stay. The workers live in `worker.rs`.
//!
//! Adaptive polling (a per-device option): after handling a kick, a worker keeps
//! checking the queue's available index for a bounded time before going back to sleep,
//! trading CPU for wake-up latency (cross-core eventfd wake-ups are costly). While it
//! polls, the driver is asked not to notify; notifications are back on (and the ring
//! checked again) before it sleeps.

mod worker;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use log::{error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use self::worker::{has_new_buffers, spawner, Worker, WorkerQueues, WorkerThread};
use super::device::{QueueConfig, QueueError, VirtioDevice};
use super::health::{contain, DeviceHealth};
use super::inflight::{InflightQueue, InflightRegion, RingLayout};
use super::spec::VIRTIO_RING_F_EVENT_IDX;
use crate::memory::{DmaSpace, GuestMemorySnapshot};
use crate::sync::{self, lock};

/// The stop event's number on a worker's epoll.
const STOP_EVENT: u64 = u64::MAX;

/// How workers wait for work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DispatchOptions {
    /// After handling a queue, keep polling its available ring this long before sleeping
    /// (0: sleep at once).
    pub poll: Duration,
    /// Never sleep: poll every queue of the worker continuously. Needed when the driver's
    /// notifications go to shared memory (mmapped notify area) instead of a kick.
    pub busy: bool,
}

/// The in-flight logs of a device's queues, shared with its workers.
#[derive(Default)]
struct InflightLogs {
    region: Mutex<Option<Arc<InflightRegion>>>,
    /// Per queue (global index), the log of a started queue.
    queues: Vec<Mutex<Option<InflightQueue>>>,
    /// How many of `queues` hold a log: workers skip the per-queue locks while it is 0
    /// (every device without a vhost-user inflight region, on every event).
    logged: AtomicUsize,
}

struct QueuePlace {
    thread: usize,
    device_event: u64,
}

struct LocalState {
    /// Kick fd registered in the worker's epoll, per started queue.
    started: Vec<Option<RawFd>>,
    event_idx: bool,
}

/// A `VhostUserBackend` whose queues run on unidev's dispatch: how a rust-vmm backend
/// becomes a [`VirtioDevice`] that every transport drives.
///
/// The backend is called exactly as `vhost_user_backend::VhostUserDaemon` calls it (see
/// the module documentation), so a backend written for rust-vmm's daemon runs unchanged.
/// What it must provide: `num_queues`, `max_queue_size`, `features` (virtio feature
/// bits; `VHOST_USER_F_PROTOCOL_FEATURES` is ignored), `get_config` for its config space,
/// `update_memory` (keep the snapshot: guest addresses in the rings are read through it),
/// and `handle_event`, which pops chains from the vring, completes them with `add_used`
/// and signals with `signal_used_queue`. `protocol_features` is not used: each transport
/// offers its own.
///
/// The transports layer's one-call export builds one for a backend; the repository's
/// `examples/virtio_ramdisk.rs` is a complete backend (a virtio-blk RAM disk).
///
/// # Example
///
/// ```
/// use std::io;
/// use std::sync::Arc;
/// use unidev_core::memory::DmaSpace;
/// use unidev_core::virtio::{DispatchOptions, LocalVirtio, VirtioDevice};
/// use vhost::vhost_user::message::VhostUserProtocolFeatures;
/// use vhost_user_backend::{VhostUserBackend, VringRwLock};
/// use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
/// use vmm_sys_util::epoll::EventSet;
///
/// /// An entropy device whose one queue never completes anything.
/// struct Idle;
///
/// impl VhostUserBackend for Idle {
///     type Bitmap = ();
///     type Vring = VringRwLock;
///     fn num_queues(&self) -> usize { 1 }
///     fn max_queue_size(&self) -> usize { 256 }
///     fn features(&self) -> u64 { 1 << 32 } // VIRTIO_F_VERSION_1
///     fn protocol_features(&self) -> VhostUserProtocolFeatures {
///         VhostUserProtocolFeatures::empty()
///     }
///     fn set_event_idx(&self, _enabled: bool) {}
///     fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
///         (offset..offset + size).map(|i| i as u8).collect()
///     }
///     fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
///         Ok(())
///     }
///     fn handle_event(&self, _event: u16, _set: EventSet, _vrings: &[VringRwLock], _thread: usize)
///         -> io::Result<()> {
///         Ok(())
///     }
/// }
///
/// let dma = Arc::new(DmaSpace::default());
/// // Type 4: entropy. No thread runs until a queue starts.
/// let device = LocalVirtio::new(4, Arc::new(Idle), &dma, DispatchOptions::default()).unwrap();
/// assert_eq!(device.device_type(), 4);
/// assert_eq!((device.num_queues(), device.max_queue_size()), (1, 256));
/// assert_eq!(device.features(), 1 << 32);
/// let mut config = [0; 4];
/// device.read_config(2, &mut config);
/// assert_eq!(config, [2, 3, 4, 5]);
/// ```
pub struct LocalVirtio<B>
where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    device_type: u32,
    backend: B,
    num_queues: usize,
    /// The vrings, replaced by fresh ones when the device is reset after a failure (a
    /// backend that panicked while holding a vring's lock leaves it poisoned).
    vrings: RwLock<Vec<VringRwLock>>,
    places: Vec<Option<QueuePlace>>,
    workers: Vec<Worker>,
    state: Mutex<LocalState>,
    snapshot: GuestMemorySnapshot,
    logs: Arc<InflightLogs>,
    max_queue_size: u16,
    options: DispatchOptions,
    health: Arc<DeviceHealth>,
}

fn eventfd_into_file(fd: EventFd) -> File {
    // SAFETY: into_raw_fd hands over sole ownership of a valid descriptor to the File.
    unsafe { File::from_raw_fd(fd.into_raw_fd()) }
}

/// `count` vrings of at most `max` entries over `snapshot`.
fn new_vrings(
    count: usize,
    max: u16,
    snapshot: &GuestMemorySnapshot,
) -> io::Result<Vec<VringRwLock>> {
    (0..count)
        .map(|_| {
            VringRwLock::new(snapshot.clone(), max)
                .map_err(|e| io::Error::other(format!("cannot create vring: {e:?}")))
        })
        .collect()
}

impl<B> LocalVirtio<B>
where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    /// Run `backend` (virtio device type `device_type`) on memory from `dma`, with worker
    /// threads per its `queues_per_thread()`.
    pub fn new(
        device_type: u32,
        backend: B,
        dma: &Arc<DmaSpace>,
        options: DispatchOptions,
    ) -> io::Result<Arc<Self>> {
        let snapshot = dma.snapshot();
        let health = Arc::new(DeviceHealth::new(format!(
            "virtio device type {device_type}"
        ))?);
        // The backend's answers while it is set up; a panic there refuses the device.
        let setup = |what: &str, e: String| {
            io::Error::other(format!("the backend panicked in {what}: {e}"))
        };
        contain(|| backend.update_memory(snapshot.clone()))
            .map_err(|e| setup("update_memory", e))??;
        let (num_queues, max_size, masks) = contain(|| {
            (
                backend.num_queues(),
                backend.max_queue_size(),
                backend.queues_per_thread(),
            )
        })
        .map_err(|e| setup("num_queues / max_queue_size / queues_per_thread", e))?;
        let max = u16::try_from(max_size).unwrap_or(u16::MAX);
        let vrings = new_vrings(num_queues, max, &snapshot)?;
        let logs = Arc::new(InflightLogs {
            region: Mutex::new(None),
            queues: (0..num_queues).map(|_| Mutex::new(None)).collect(),
            logged: AtomicUsize::new(0),
        });
        let mut places: Vec<Option<QueuePlace>> = (0..num_queues).map(|_| None).collect();
        let mut workers = Vec::with_capacity(masks.len());
        for (thread_id, mask) in masks.iter().enumerate() {
            let mut global = Vec::new();
            for (i, place) in places.iter_mut().enumerate() {
                if i < 64 && (mask >> i) & 1 == 1 && place.is_none() {
                    *place = Some(QueuePlace {
                        thread: thread_id,
                        device_event: global.len() as u64,
                    });
                    global.push(i);
                }
            }
            workers.push(Worker::new(global)?);
        }
        for (i, p) in places.iter().enumerate() {
            if p.is_none() {
                // rust-vmm's daemon leaves such a queue alone: set up, never served.
                info!("queue {i} is in no worker thread's mask; it will not be served");
            }
        }
        let local = Arc::new(LocalVirtio {
            device_type,
            backend,
            num_queues,
            vrings: RwLock::new(vrings),
            places,
            workers,
            state: Mutex::new(LocalState {
                started: vec![None; num_queues],
                event_idx: false,
            }),
            snapshot,
            logs,
            max_queue_size: max,
            options,
            health,
        });
        for thread in 0..local.workers.len() {
            local.arm(thread)?;
        }
        let listener_backend = local.backend.clone();
        let listener_health = Arc::downgrade(&local.health);
        dma.subscribe(Arc::new(move |snap: &GuestMemorySnapshot| {
            let Some(health) = listener_health.upgrade() else {
                return;
            };
            let updated = health.call("update_memory", || {
                listener_backend.update_memory(snap.clone())
            });
            if let Some(Err(e)) = updated {
                error!("backend refused a memory update: {e}");
            }
        }));
        Ok(local)
    }

    /// Arm worker `thread` with the current vrings and the backend's exit event for it;
    /// its thread starts with its first queue.
    fn arm(&self, thread: usize) -> io::Result<()> {
        let w = &self.workers[thread];
        let exit = contain(|| self.backend.exit_event(thread))
            .map_err(|e| io::Error::other(format!("the backend panicked in exit_event: {e}")))?;
        // The backend's exit event, numbered num_queues as in vhost-user-backend.
        let consumer = match exit {
            Some((consumer, notifier)) => {
                w.watch(consumer.as_raw_fd(), self.num_queues as u64)?;
                *lock(&w.exit) = Some((consumer.as_raw_fd(), notifier));
                Some(consumer)
            }
            None => None,
        };
        let vrings = sync::read(&self.vrings);
        let queues = WorkerQueues {
            backend: self.backend.clone(),
            vrings: w.global.iter().map(|&g| vrings[g].clone()).collect(),
            global: w.global.clone(),
            logs: self.logs.clone(),
            busy: w.busy.clone(),
            thread_id: thread,
            snapshot: self.snapshot.clone(),
            health: self.health.clone(),
        };
        let spawn = spawner(
            w.epoll.clone(),
            queues,
            consumer,
            self.num_queues,
            self.options,
        );
        *lock(&w.thread) = WorkerThread::NotStarted(spawn);
        Ok(())
    }

    /// The device failed (a backend panic): stop the workers, replace the vrings (the
    /// panic may have poisoned their locks), and arm the workers again, so that a driver
    /// reset gets a working device if the backend's own state allows. Queues the driver
    /// had started are given back to the backend as stopped (`stop_vring`), and the
    /// memory as it is now (`update_memory`).
    fn rebuild(&self) {
        for w in &self.workers {
            w.disarm();
        }
        let started: Vec<usize> = {
            let mut st = self.lock();
            let mut started = Vec::new();
            for (i, slot) in st.started.iter_mut().enumerate() {
                if let Some(fd) = slot.take() {
                    self.unregister(i, fd);
                    started.push(i);
                }
            }
            st.event_idx = false;
            started
        };
        for log in &self.logs.queues {
            if lock(log).take().is_some() {
                self.logs.logged.fetch_sub(1, Ordering::Release);
            }
        }
        match new_vrings(self.num_queues, self.max_queue_size, &self.snapshot) {
            Ok(fresh) => *sync::write(&self.vrings) = fresh,
            Err(e) => {
                self.health.fail(format!("cannot make new vrings: {e}"));
                return;
            }
        }
        self.health.clear();
        for i in started {
            let stopped = self
                .health
                .call("stop_vring", || self.backend.stop_vring(i as u32));
            if let Some(Err(e)) = stopped {
                warn!("backend failed to stop queue {i}: {e}");
            }
        }
        let updated = self.health.call("update_memory", || {
            self.backend.update_memory(self.snapshot.clone())
        });
        if let Some(Err(e)) = updated {
            error!("backend refused a memory update: {e}");
        }
        for thread in 0..self.workers.len() {
            if let Err(e) = self.arm(thread) {
                self.health
                    .fail(format!("cannot restart worker {thread}: {e}"));
            }
        }
    }

    /// The backend object (shared with the workers).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Number of worker threads (one per `queues_per_thread()` mask).
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Watch `fd` for `events` on worker `thread`'s epoll: its events reach the backend's
    /// `handle_event(data as u16, events, vrings, thread)` on that worker's thread, after
    /// the queues' (vhost-user-backend's `VringEpollHandler::register_listener`). `data`
    /// must be above `num_queues()`: 0 to `num_queues() - 1` are the worker's queues and
    /// `num_queues()` its exit event. The worker's thread starts now (as upstream's run
    /// from the start), so the listener is served even before any queue runs.
    pub fn register_listener(
        &self,
        thread: usize,
        fd: RawFd,
        events: EventSet,
        data: u64,
    ) -> io::Result<()> {
        let epoll_fd = self.listener_epoll(thread, data)?;
        epoll::ctl(
            epoll_fd,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            epoll::Event::new(epoll::Events::from_bits_truncate(events.bits()), data),
        )?;
        self.workers[thread].ensure_started()
    }

    /// Stop watching a listener registered with
    /// [`register_listener`](LocalVirtio::register_listener).
    pub fn unregister_listener(
        &self,
        thread: usize,
        fd: RawFd,
        events: EventSet,
        data: u64,
    ) -> io::Result<()> {
        let epoll_fd = self.listener_epoll(thread, data)?;
        epoll::ctl(
            epoll_fd,
            epoll::ControlOptions::EPOLL_CTL_DEL,
            fd,
            epoll::Event::new(epoll::Events::from_bits_truncate(events.bits()), data),
        )
    }

    fn listener_epoll(&self, thread: usize, data: u64) -> io::Result<RawFd> {
        let reserved = data <= self.num_queues as u64 || data == STOP_EVENT;
        match self.workers.get(thread) {
            Some(w) if !reserved => Ok(w.epoll.as_raw_fd()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// The epoll descriptor of worker `thread` (vhost-user-backend's `VringEpollHandler`
    /// implements `AsRawFd` with it).
    pub fn worker_epoll_fd(&self, thread: usize) -> Option<RawFd> {
        self.workers.get(thread).map(|w| w.epoll.as_raw_fd())
    }

    /// Signal the backend's exit event of worker `thread` (vhost-user-backend's
    /// `VringEpollHandler::send_exit_event`): the worker leaves its loop.
    pub fn send_exit_event(&self, thread: usize) {
        if let Some(w) = self.workers.get(thread) {
            if let Some((_, exit)) = lock(&w.exit).as_ref() {
                let _ = exit.notify();
            }
        }
    }

    /// The device's health: whether the backend panicked.
    pub fn device_health(&self) -> &Arc<DeviceHealth> {
        &self.health
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalState> {
        lock(&self.state)
    }

    fn unregister(&self, index: usize, fd: RawFd) {
        if let Some(place) = &self.places[index] {
            let _ = epoll::ctl(
                self.workers[place.thread].epoll.as_raw_fd(),
                epoll::ControlOptions::EPOLL_CTL_DEL,
                fd,
                epoll::Event::new(epoll::Events::empty(), 0),
            );
        }
    }

    /// Run `f` on the vrings inside the containment boundary: a vring whose lock a
    /// backend panic poisoned makes the device fail instead of panicking here.
    fn on_vrings<R>(&self, what: &str, f: impl FnOnce(&[VringRwLock]) -> R) -> Option<R> {
        match contain(|| f(&sync::read(&self.vrings))) {
            Ok(r) => Some(r),
            Err(e) => {
                self.health
                    .fail(format!("a vring the backend left poisoned ({what}): {e}"));
                None
            }
        }
    }
}

impl<B> VirtioDevice for LocalVirtio<B>
where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        self.health
            .call("features", || self.backend.features())
            .unwrap_or(0)
            & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn serves_config(&self) -> bool {
        self.health
            .call("protocol_features", || self.backend.protocol_features())
            .is_some_and(|p| p.contains(VhostUserProtocolFeatures::CONFIG))
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        let cfg = self
            .health
            .call("get_config", || {
                self.backend.get_config(offset, data.len() as u32)
            })
            .unwrap_or_default();
        let n = cfg.len().min(data.len());
        data[..n].copy_from_slice(&cfg[..n]);
        data[n..].fill(0);
    }

    fn write_config(&self, offset: u32, data: &[u8]) {
        let written = self
            .health
            .call("set_config", || self.backend.set_config(offset, data));
        if let Some(Err(e)) = written {
            warn!("backend refused a config write at {offset:#x}: {e}");
        }
    }

    fn set_driver_features(&self, features: u64) {
        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        self.lock().event_idx = event_idx;
        self.on_vrings("set_driver_features", |vrings| {
            for v in vrings {
                v.set_queue_event_idx(event_idx);
            }
        });
        self.health.call("set_event_idx / acked_features", || {
            self.backend.set_event_idx(event_idx);
            // A vhost-user frontend acks PROTOCOL_FEATURES when offered; keep that view.
            let proto = self.backend.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
            self.backend.acked_features(features | proto);
        });
    }

    fn start_queue(&self, index: usize, c: QueueConfig) -> Result<(), QueueError> {
        if index >= self.num_queues {
            return Err(QueueError::NoSuchQueue(index));
        }
        if let Some(why) = self.health.failure() {
            return Err(QueueError::Backend {
                index,
                source: io::Error::other(format!("the device failed ({why}); reset it")),
            });
        }
        let started = self.on_vrings("start_queue", |vrings| {
            self.start_queue_on(&vrings[index], index, c)
        });
        started.unwrap_or_else(|| {
            Err(QueueError::Backend {
                index,
                source: io::Error::other("the device failed; reset it"),
            })
        })
    }

    fn set_queue_call(&self, index: usize, call: Option<EventFd>) {
        self.on_vrings("set_queue_call", |vrings| {
            if let Some(vring) = vrings.get(index) {
                vring.set_call(call.map(eventfd_into_file));
            }
        });
    }

    fn stop_queue(&self, index: usize) -> Option<u16> {
        if index >= self.num_queues {
            return None;
        }
        let fd = self.lock().started[index].take();
        if let Some(fd) = fd {
            self.unregister(index, fd);
        }
        self.on_vrings("stop_queue", |vrings| {
            self.stop_queue_on(&vrings[index], index)
        })
    }

    fn reset(&self) {
        // A reset is the driver's way back from a failure: new vrings and workers, and
        // the backend is tried again.
        if self.health.is_failed() {
            self.rebuild();
        }
        for i in 0..self.num_queues {
            self.stop_queue(i);
        }
        self.health.call("reset_device", || {
            self.backend.reset_device();
            self.backend.set_event_idx(false);
        });
        self.on_vrings("reset", |vrings| {
            for v in vrings {
                v.get_mut().get_queue_mut().reset();
                v.set_queue_event_idx(false);
            }
        });
        self.lock().event_idx = false;
    }

    fn health(&self) -> Option<Arc<DeviceHealth>> {
        Some(self.health.clone())
    }

    fn can_log_inflight(&self) -> bool {
        true
    }

    fn set_inflight(&self, region: Option<Arc<InflightRegion>>) -> io::Result<()> {
        if let Some(r) = &region {
            if usize::from(r.num_queues()) > self.num_queues {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "inflight region for {} queues; the device has {}",
                        r.num_queues(),
                        self.num_queues
                    ),
                ));
            }
        }
        *lock(&self.logs.region) = region;
        Ok(())
    }
}

impl<B> LocalVirtio<B>
where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    /// [`VirtioDevice::start_queue`] on `vring`.
    fn start_queue_on(
        &self,
        vring: &VringRwLock,
        index: usize,
        c: QueueConfig,
    ) -> Result<(), QueueError> {
        let place = self.places[index].as_ref();
        let max = self.max_queue_size();
        if c.size == 0 || !c.size.is_power_of_two() || c.size > max {
            return Err(QueueError::BadSize {
                index,
                size: c.size,
                max,
            });
        }
        let mut st = self.lock();
        if let Some(fd) = st.started[index].take() {
            self.unregister(index, fd);
        }
        vring.set_queue_size(c.size);
        vring
            .set_queue_info(c.desc, c.avail, c.used)
            .map_err(|_| QueueError::BadRings(index))?;
        // virtio-queue only validates a queue marked ready.
        vring.set_queue_ready(true);
        let valid = {
            let mem = self.snapshot.memory();
            vring.get_ref().get_queue().is_valid(&*mem)
        };
        if !valid {
            vring.set_queue_ready(false);
            return Err(QueueError::BadRings(index));
        }
        let (mut next_avail, mut next_used) = (c.next_avail, c.next_used);
        let region = lock(&self.logs.region).clone();
        if let Some(region) = region {
            let layout = RingLayout {
                size: c.size,
                avail: c.avail,
                used: c.used,
            };
            let mem = self.snapshot.memory();
            let (log, resume) = InflightQueue::recover(region, index, layout, c.next_avail, &*mem)
                .map_err(|e| {
                    vring.set_queue_ready(false);
                    QueueError::Backend {
                        index,
                        source: io::Error::other(e.to_string()),
                    }
                })?;
            if let Some(p) = resume {
                if p.resubmitted > 0 || p.next_avail != c.next_avail {
                    info!(
                        "queue {index}: resuming from the inflight log at {} ({} requests \
                         in flight are processed again; the frontend said {})",
                        p.next_avail, p.resubmitted, c.next_avail
                    );
                }
                (next_avail, next_used) = (p.next_avail, p.next_used);
            }
            if lock(&self.logs.queues[index]).replace(log).is_none() {
                self.logs.logged.fetch_add(1, Ordering::Release);
            }
        }
        vring.set_queue_next_avail(next_avail);
        vring.set_queue_next_used(next_used);
        vring.set_queue_event_idx(st.event_idx);
        // The fd registered below is the vring's own copy: it stays open while started.
        vring.set_kick(Some(eventfd_into_file(c.kick)));
        vring.set_call(c.call.map(eventfd_into_file));
        vring.set_enabled(true);
        let Some(place) = place else {
            // In no worker's mask: set up and left alone, as rust-vmm's daemon does.
            return Ok(());
        };
        let reg_fd = vring
            .get_ref()
            .get_kick()
            .as_ref()
            .map(|k| k.as_raw_fd())
            .ok_or(QueueError::BadRings(index))?;
        epoll::ctl(
            self.workers[place.thread].epoll.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_ADD,
            reg_fd,
            epoll::Event::new(epoll::Events::EPOLLIN, place.device_event),
        )
        .map_err(|source| QueueError::Backend { index, source })?;
        st.started[index] = Some(reg_fd);
        self.workers[place.thread]
            .ensure_started()
            .map_err(|source| QueueError::Backend { index, source })?;
        // Requests already waiting (a resumed ring, resubmitted in-flight requests) would
        // otherwise wait for the driver's next kick.
        if has_new_buffers(vring, &self.snapshot) {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a valid buffer to the kick eventfd, which the
            // vring keeps open while the queue is started (registered above).
            let n = unsafe { libc::write(reg_fd, one.as_ptr().cast(), one.len()) };
            if n != one.len() as isize {
                warn!(
                    "queue {index}: cannot wake the worker for waiting requests: {}",
                    io::Error::last_os_error()
                );
            }
        }
        Ok(())
    }

    /// [`VirtioDevice::stop_queue`] on `vring`, its kick fd already unregistered.
    fn stop_queue_on(&self, vring: &VringRwLock, index: usize) -> u16 {
        vring.set_enabled(false);
        // Wait for a handle_event in progress: from here on the queue does not move.
        if let Some(place) = &self.places[index] {
            let _quiet = lock(&self.workers[place.thread].busy);
            if let Some(mut log) = lock(&self.logs.queues[index]).take() {
                self.logs.logged.fetch_sub(1, Ordering::Release);
                let (avail, used) = {
                    let state = vring.get_ref();
                    let q = state.get_queue();
                    (q.next_avail(), q.next_used())
                };
                log.record(&*self.snapshot.memory(), avail, used);
            }
        }
        vring.set_queue_ready(false);
        let stopped = self
            .health
            .call("stop_vring", || self.backend.stop_vring(index as u32));
        if let Some(Err(e)) = stopped {
            warn!("backend failed to stop queue {index}: {e}");
        }
        let next = vring.queue_next_avail();
        vring.set_kick(None);
        vring.set_call(None);
        next
    }
}

impl<B> Drop for LocalVirtio<B>
where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    fn drop(&mut self) {
        for w in &self.workers {
            let _ = w.stop.write(1);
        }
        for w in &self.workers {
            if let WorkerThread::Running(t) =
                std::mem::replace(&mut *lock(&w.thread), WorkerThread::Gone)
            {
                let _ = t.join();
            }
        }
    }
}
