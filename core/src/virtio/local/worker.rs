//! The worker threads of a [`LocalVirtio`](super::LocalVirtio): each waits (epoll) on its
//! queues' kick eventfds, the backend's exit event, a stop event and the backend's own
//! listeners, and calls `handle_event` with vhost-user-backend's numbering (see the
//! parent module). A worker is *armed* with its vrings: its thread starts with its first
//! queue (or listener) and stops when the device is stopped, reset after a failure, or
//! fails; re-arming gives it fresh vrings on the same epoll set, so the listeners a
//! backend registered stay.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{error, info, warn};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::EventNotifier;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DispatchOptions, InflightLogs, STOP_EVENT};
use crate::memory::GuestMemorySnapshot;
use crate::sandbox::{self, SandboxedThread};
use crate::sync::lock;
use crate::virtio::health::DeviceHealth;
use crate::virtio::inflight::InflightQueue;

/// Starts a worker's thread.
pub(super) type SpawnWorker = Box<dyn FnOnce() -> io::Result<SandboxedThread<()>> + Send>;

/// One worker: its epoll set and events, and its thread.
pub(super) struct Worker {
    pub(super) epoll: Arc<OwnedFd>,
    pub(super) stop: EventFd,
    /// The backend's `exit_event` of this worker: the consumer's fd (watched, numbered
    /// `num_queues`) and the notifier vhost-user-backend's `send_exit_event` signals.
    pub(super) exit: Mutex<Option<(RawFd, EventNotifier)>>,
    /// Held by the worker while it runs the backend; taking it waits for that to end.
    pub(super) busy: Arc<Mutex<()>>,
    /// The thread starts with the first of its queues: until then it is this closure,
    /// so an idle device costs no thread (its epoll set, stop and exit events exist and
    /// collect events from the start).
    pub(super) thread: Mutex<WorkerThread>,
    /// The queues (global indices) it serves, in the order of its vrings.
    pub(super) global: Vec<usize>,
}

pub(super) enum WorkerThread {
    NotStarted(SpawnWorker),
    Running(SandboxedThread<()>),
    Gone,
}

impl Worker {
    /// A worker for queues `global`, not armed yet.
    pub(super) fn new(global: Vec<usize>) -> io::Result<Worker> {
        let raw = epoll::create(true)?;
        // SAFETY: a fresh epoll descriptor that nothing else owns.
        let epoll_fd = Arc::new(unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) });
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let w = Worker {
            epoll: epoll_fd,
            stop,
            exit: Mutex::new(None),
            busy: Arc::new(Mutex::new(())),
            thread: Mutex::new(WorkerThread::Gone),
            global,
        };
        w.watch(w.stop.as_raw_fd(), STOP_EVENT)?;
        Ok(w)
    }

    /// Watch `fd` for input, as event `data`.
    pub(super) fn watch(&self, fd: RawFd, data: u64) -> io::Result<()> {
        epoll::ctl(
            self.epoll.as_raw_fd(),
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            epoll::Event::new(epoll::Events::EPOLLIN, data),
        )
    }

    /// Start the thread if it is armed and has not started yet.
    pub(super) fn ensure_started(&self) -> io::Result<()> {
        let mut t = lock(&self.thread);
        match std::mem::replace(&mut *t, WorkerThread::Gone) {
            WorkerThread::NotStarted(spawn) => *t = WorkerThread::Running(spawn()?),
            other => *t = other,
        }
        Ok(())
    }

    /// Stop the thread (if it runs) and forget its exit event: the worker is not armed
    /// afterwards. The epoll set and what else it watches stay.
    pub(super) fn disarm(&self) {
        if let Some((fd, _)) = lock(&self.exit).take() {
            // The consumer is still open (the thread, or its closure, holds it).
            let _ = epoll::ctl(
                self.epoll.as_raw_fd(),
                epoll::ControlOptions::EPOLL_CTL_DEL,
                fd,
                epoll::Event::new(epoll::Events::empty(), 0),
            );
        }
        let _ = self.stop.write(1);
        let thread = std::mem::replace(&mut *lock(&self.thread), WorkerThread::Gone);
        if let WorkerThread::Running(t) = thread {
            let _ = t.join();
        }
        // The loop leaves the stop event set: clear it for the next thread.
        let _ = self.stop.read();
    }
}

/// What a worker's thread needs to run its queues.
pub(super) struct WorkerQueues<B> {
    pub(super) backend: B,
    pub(super) vrings: Vec<VringRwLock>,
    /// Global queue index of each of `vrings`.
    pub(super) global: Vec<usize>,
    pub(super) logs: Arc<InflightLogs>,
    pub(super) busy: Arc<Mutex<()>>,
    pub(super) thread_id: usize,
    pub(super) snapshot: GuestMemorySnapshot,
    pub(super) health: Arc<DeviceHealth>,
}

/// The closure that starts worker `queues.thread_id`'s thread on `epoll`: under the
/// process's seccomp policy (the worker runs the backend on guest-controlled rings and
/// buffers), or not at all.
pub(super) fn spawner<B>(
    epoll: Arc<OwnedFd>,
    queues: WorkerQueues<B>,
    exit_consumer: Option<vmm_sys_util::event::EventConsumer>,
    num_queues: usize,
    options: DispatchOptions,
) -> SpawnWorker
where
    B: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + 'static,
{
    let thread_id = queues.thread_id;
    Box::new(move || {
        sandbox::spawn(
            format!("vring-worker-{thread_id}"),
            sandbox::Role::Worker,
            move || {
                let _keep = exit_consumer;
                worker_loop(&epoll, &queues, num_queues, options)
            },
        )
    })
}

pub(super) fn worker_loop<B>(
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
        // A failed device's worker stops: its vrings may be poisoned by the backend's
        // panic, and its events would only spin. A reset makes a new worker.
        if w.health.is_failed() {
            info!("vring worker {thread_id}: the device failed; stopping");
            return;
        }
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
            if w.health.is_failed() {
                break;
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
            if self.health.is_failed() {
                return;
            }
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
pub(super) fn has_new_buffers(vring: &VringRwLock, snapshot: &GuestMemorySnapshot) -> bool {
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
