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
//! Adaptive polling (a per-device option): after handling a kick, a worker keeps
//! checking the queue's available index for a bounded time before going back to sleep,
//! trading CPU for wake-up latency (cross-core eventfd wake-ups are costly). While it
//! polls, the driver is asked not to notify; notifications are back on (and the ring
//! checked again) before it sleeps.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::EventNotifier;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{QueueConfig, QueueError, VirtioDevice};
use super::health::{contain, DeviceHealth};
use super::inflight::{InflightQueue, InflightRegion, RingLayout};
use crate::memory::{DmaSpace, GuestMemorySnapshot};
use crate::sandbox::{self, SandboxedThread};
use crate::sync::lock;

use super::spec::VIRTIO_RING_F_EVENT_IDX;
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

/// Starts a worker's thread.
type SpawnWorker = Box<dyn FnOnce() -> io::Result<SandboxedThread<()>> + Send>;

struct Worker {
    epoll: Arc<OwnedFd>,
    stop: EventFd,
    /// The notifier half of the backend's `exit_event` for this worker (what
    /// vhost-user-backend's `VringEpollHandler::send_exit_event` signals).
    exit: Option<EventNotifier>,
    /// Held by the worker while it runs the backend; taking it waits for that to end.
    busy: Arc<Mutex<()>>,
    /// The thread starts with the first of its queues: until then it is this closure,
    /// so an idle device costs no thread (its epoll set, stop and exit events exist and
    /// collect events from the start).
    thread: Mutex<WorkerThread>,
}

enum WorkerThread {
    NotStarted(SpawnWorker),
    Running(SandboxedThread<()>),
    Gone,
}

impl Worker {
    /// Start the thread if it has not started yet.
    fn ensure_started(&self) -> io::Result<()> {
        let mut t = lock(&self.thread);
        match std::mem::replace(&mut *t, WorkerThread::Gone) {
            WorkerThread::NotStarted(spawn) => *t = WorkerThread::Running(spawn()?),
            other => *t = other,
        }
        Ok(())
    }
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

/// What a worker needs to run its queues.
struct WorkerQueues<B> {
    backend: B,
    vrings: Vec<VringRwLock>,
    /// Global queue index of each of `vrings`.
    global: Vec<usize>,
    logs: Arc<InflightLogs>,
    busy: Arc<Mutex<()>>,
    thread_id: usize,
    snapshot: GuestMemorySnapshot,
    health: Arc<DeviceHealth>,
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
    vrings: Vec<VringRwLock>,
    places: Vec<Option<QueuePlace>>,
    workers: Vec<Worker>,
    state: Mutex<LocalState>,
    snapshot: GuestMemorySnapshot,
    logs: Arc<InflightLogs>,
    max_queue_size: u16,
    health: Arc<DeviceHealth>,
}

fn eventfd_into_file(fd: EventFd) -> File {
    // SAFETY: into_raw_fd hands over sole ownership of a valid descriptor to the File.
    unsafe { File::from_raw_fd(fd.into_raw_fd()) }
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
        let mut vrings = Vec::with_capacity(num_queues);
        for _ in 0..num_queues {
            vrings.push(
                VringRwLock::new(snapshot.clone(), max)
                    .map_err(|e| io::Error::other(format!("cannot create vring: {e:?}")))?,
            );
        }
        let logs = Arc::new(InflightLogs {
            region: Mutex::new(None),
            queues: (0..num_queues).map(|_| Mutex::new(None)).collect(),
            logged: AtomicUsize::new(0),
        });
        let mut places: Vec<Option<QueuePlace>> = (0..num_queues).map(|_| None).collect();
        let mut workers = Vec::with_capacity(masks.len());
        for (thread_id, mask) in masks.iter().enumerate() {
            let mut thread_vrings = Vec::new();
            let mut global = Vec::new();
            for (i, vring) in vrings.iter().enumerate() {
                if i < 64 && (mask >> i) & 1 == 1 && places[i].is_none() {
                    places[i] = Some(QueuePlace {
                        thread: thread_id,
                        device_event: thread_vrings.len() as u64,
                    });
                    thread_vrings.push(vring.clone());
                    global.push(i);
                }
            }
            let queues = WorkerQueues {
                backend: backend.clone(),
                vrings: thread_vrings,
                global,
                logs: logs.clone(),
                busy: Arc::new(Mutex::new(())),
                thread_id,
                snapshot: snapshot.clone(),
                health: health.clone(),
            };
            workers.push(Self::spawn_worker(queues, num_queues, options)?);
        }
        for (i, p) in places.iter().enumerate() {
            if p.is_none() {
                // rust-vmm's daemon leaves such a queue alone: set up, never served.
                info!("queue {i} is in no worker thread's mask; it will not be served");
            }
        }
        let listener_backend = backend.clone();
        let listener_health = Arc::downgrade(&health);
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
        Ok(Arc::new(LocalVirtio {
            device_type,
            backend,
            vrings,
            places,
            workers,
            state: Mutex::new(LocalState {
                started: vec![None; num_queues],
                event_idx: false,
            }),
            snapshot,
            logs,
            max_queue_size: max,
            health,
        }))
    }

    fn spawn_worker(
        queues: WorkerQueues<B>,
        num_queues: usize,
        options: DispatchOptions,
    ) -> io::Result<Worker> {
        let thread_id = queues.thread_id;
        let raw = epoll::create(true)?;
        // SAFETY: a fresh epoll descriptor that nothing else owns.
        let epoll_fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let add = |fd: RawFd, data: u64| {
            epoll::ctl(
                epoll_fd.as_raw_fd(),
                epoll::ControlOptions::EPOLL_CTL_ADD,
                fd,
                epoll::Event::new(epoll::Events::EPOLLIN, data),
            )
        };
        add(stop.as_raw_fd(), STOP_EVENT)?;
        // The backend's exit event, numbered num_queues as in vhost-user-backend.
        let exit = contain(|| queues.backend.exit_event(thread_id))
            .map_err(|e| io::Error::other(format!("the backend panicked in exit_event: {e}")))?;
        let (exit_consumer, exit_notifier) = match exit {
            Some((consumer, notifier)) => {
                add(consumer.as_raw_fd(), num_queues as u64)?;
                (Some(consumer), Some(notifier))
            }
            None => (None, None),
        };
        let ep = epoll_fd.clone();
        let busy = queues.busy.clone();
        // The worker runs the backend on guest-controlled rings and buffers: it starts
        // under the process's seccomp policy (crate::sandbox), or not at all.
        let spawn: SpawnWorker = Box::new(move || {
            sandbox::spawn(
                format!("vring-worker-{thread_id}"),
                sandbox::Role::Worker,
                move || {
                    let _keep = exit_consumer;
                    worker_loop(&ep, &queues, num_queues, options)
                },
            )
        });
        Ok(Worker {
            epoll: epoll_fd,
            stop,
            exit: exit_notifier,
            busy,
            thread: Mutex::new(WorkerThread::NotStarted(spawn)),
        })
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
    /// `num_queues()` its exit event. Events that arrive before the worker's thread starts
    /// (with its first queue) wait for it.
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
        )
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
        let reserved = data <= self.vrings.len() as u64 || data == STOP_EVENT;
        match self.workers.get(thread) {
            Some(w) if !reserved => Ok(w.epoll.as_raw_fd()),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }

    /// Signal the backend's exit event of worker `thread` (vhost-user-backend's
    /// `VringEpollHandler::send_exit_event`): the worker leaves its loop.
    pub fn send_exit_event(&self, thread: usize) {
        if let Some(exit) = self.workers.get(thread).and_then(|w| w.exit.as_ref()) {
            let _ = exit.notify();
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
}

fn worker_loop<B>(
    epoll_fd: &OwnedFd,
    w: &WorkerQueues<B>,
    num_queues: usize,
    options: DispatchOptions,
) where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock>,
{
    let thread_id = w.thread_id;
    let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 64];
    loop {
        if options.busy {
            for (i, vring) in w.vrings.iter().enumerate() {
                if has_new_buffers(vring, &w.snapshot) {
                    w.handle(i as u16, EventSet::IN);
                }
            }
        }
        let timeout = if options.busy { 0 } else { -1 };
        let n = match epoll::wait(epoll_fd.as_raw_fd(), timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("vring worker {thread_id}: epoll failed: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let data = ev.data;
            if data == STOP_EVENT || data == num_queues as u64 {
                return;
            }
            let evset = EventSet::from_bits_truncate(ev.events);
            if let Some(vring) = w.vrings.get(data as usize) {
                match vring.read_kick() {
                    Ok(true) => {}
                    Ok(false) => continue, // disabled vring: consume and ignore
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        warn!("vring worker {thread_id}: cannot read kick: {e}");
                        continue;
                    }
                }
                w.handle(data as u16, evset);
                if !options.poll.is_zero() {
                    w.poll_queue(vring, data as u16, options.poll);
                }
            } else {
                // One of the backend's own listeners.
                w.handle(data as u16, evset);
            }
        }
    }
}

impl<B: VhostUserBackend<Bitmap = (), Vring = VringRwLock>> WorkerQueues<B> {
    /// Run the backend for one event, logging in-flight heads around it when a log is set.
    fn handle(&self, device_event: u16, evset: EventSet) {
        if self.health.is_failed() {
            return;
        }
        let _busy = lock(&self.busy);
        let logging = self.log_queues(|log, _, mem| log.premark(mem));
        let handled = self.health.call("handle_event", || {
            self.backend
                .handle_event(device_event, evset, &self.vrings, self.thread_id)
        });
        if let Some(Err(e)) = handled {
            warn!(
                "backend failed event {device_event} on worker {}: {e}",
                self.thread_id
            );
        }
        if logging {
            self.log_queues(|log, vring, mem| {
                let (avail, used) = {
                    let state = vring.get_ref();
                    let q = state.get_queue();
                    (q.next_avail(), q.next_used())
                };
                log.record(mem, avail, used);
            });
        }
    }

    /// Apply `f` to the log of every started queue of this worker; whether any had one.
    fn log_queues(
        &self,
        mut f: impl FnMut(&mut InflightQueue, &VringRwLock, &vm_memory::GuestMemoryMmap),
    ) -> bool {
        if self.logs.logged.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut any = false;
        let mut mem = None;
        for (vring, global) in self.vrings.iter().zip(&self.global) {
            let mut slot = lock(&self.logs.queues[*global]);
            if let Some(log) = slot.as_mut() {
                let mem = mem.get_or_insert_with(|| self.snapshot.memory());
                f(log, vring, mem);
                any = true;
            }
        }
        any
    }

    /// Poll `vring` until `budget` passes without new buffers. Meanwhile the driver is
    /// asked not to notify (a kick would only cost it a syscall, and over vfio-user a
    /// doorbell message the server thread must wake for); before returning to sleep,
    /// notifications are enabled again and the ring checked once more, so a buffer
    /// published in between is never left without a kick.
    fn poll_queue(&self, vring: &VringRwLock, device_event: u16, budget: Duration) {
        let mut deadline = Instant::now() + budget;
        let mut spins = 0u32;
        suppress_notifications(vring, &self.snapshot);
        loop {
            if has_new_buffers(vring, &self.snapshot) {
                self.handle(device_event, EventSet::IN);
                // The backend enables notifications when it has drained the ring.
                suppress_notifications(vring, &self.snapshot);
                deadline = Instant::now() + budget;
                continue;
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            // Reading the clock every iteration would dominate the spin.
            if spins % 64 == 0 && Instant::now() >= deadline {
                if !rearm_notifications(vring, &self.snapshot) {
                    return;
                }
                // Published before notifications were back on: keep going.
                deadline = Instant::now() + budget;
            }
        }
    }
}

/// Ask the driver to notify about `vring` again; whether it published buffers meanwhile
/// (then the caller must take them: no kick will come for them). Only while the queue
/// runs: the check and the write happen under the vring's lock, so a queue stopped (and
/// its rings perhaps gone) is never written.
fn rearm_notifications(vring: &VringRwLock, snapshot: &GuestMemorySnapshot) -> bool {
    let mut state = vring.get_mut();
    if !state.is_enabled() {
        return false;
    }
    let q = state.get_queue_mut();
    if !q.ready() {
        return false;
    }
    let mem = snapshot.memory();
    q.enable_notification(&*mem).unwrap_or(false)
}

/// Ask the driver not to notify about `vring` (virtio 1.2 2.7.10): VRING_USED_F_NO_NOTIFY,
/// or with EVENT_IDX an `avail_event` one behind the next entry the device takes, which
/// the driver's next publications do not cross. A hint: a driver may notify anyway. Like
/// [`rearm_notifications`], only while the queue runs.
fn suppress_notifications(vring: &VringRwLock, snapshot: &GuestMemorySnapshot) {
    let mut state = vring.get_mut();
    if !state.is_enabled() {
        return;
    }
    let q = state.get_queue_mut();
    if !q.ready() {
        return;
    }
    let mem = snapshot.memory();
    if !q.event_idx_enabled() {
        let _ = q.disable_notification(&*mem);
        return;
    }
    // avail_event follows the used ring's entries (virtio 1.2 2.7.8).
    let at = q.used_ring().checked_add(4 + 8 * u64::from(q.size()));
    if let Some(at) = at {
        let behind = q.next_avail().wrapping_sub(1);
        let _ = mem.store(behind.to_le(), GuestAddress(at), Ordering::Relaxed);
    }
}

/// Whether the driver published buffers the device has not taken yet.
fn has_new_buffers(vring: &VringRwLock, snapshot: &GuestMemorySnapshot) -> bool {
    let state = vring.get_ref();
    if !state.is_enabled() {
        return false;
    }
    let q = state.get_queue();
    if !q.ready() {
        return false;
    }
    let mem = snapshot.memory();
    q.avail_idx(&*mem, Ordering::Acquire)
        .map(|idx| idx.0 != q.next_avail())
        .unwrap_or(false)
}

impl<B> VirtioDevice for LocalVirtio<B>
where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn num_queues(&self) -> usize {
        self.vrings.len()
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
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
        }
        self.health.call("set_event_idx / acked_features", || {
            self.backend.set_event_idx(event_idx);
            // A vhost-user frontend acks PROTOCOL_FEATURES when offered; keep that view.
            let proto = self.backend.features() & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
            self.backend.acked_features(features | proto);
        });
    }

    fn start_queue(&self, index: usize, c: QueueConfig) -> Result<(), QueueError> {
        let vring = self
            .vrings
            .get(index)
            .ok_or(QueueError::NoSuchQueue(index))?;
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

    fn set_queue_call(&self, index: usize, call: Option<EventFd>) {
        if let Some(vring) = self.vrings.get(index) {
            vring.set_call(call.map(eventfd_into_file));
        }
    }

    fn stop_queue(&self, index: usize) -> Option<u16> {
        let vring = self.vrings.get(index)?;
        let fd = self.lock().started[index].take();
        if let Some(fd) = fd {
            self.unregister(index, fd);
        }
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
        Some(next)
    }

    fn reset(&self) {
        for i in 0..self.vrings.len() {
            self.stop_queue(i);
        }
        // A reset is the driver's way back from a failure: the backend is tried again.
        self.health.clear();
        self.health.call("reset_device", || {
            self.backend.reset_device();
            self.backend.set_event_idx(false);
        });
        for v in &self.vrings {
            v.get_mut().get_queue_mut().reset();
            v.set_queue_event_idx(false);
        }
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
            if usize::from(r.num_queues()) > self.vrings.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "inflight region for {} queues; the device has {}",
                        r.num_queues(),
                        self.vrings.len()
                    ),
                ));
            }
        }
        *lock(&self.logs.region) = region;
        Ok(())
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
