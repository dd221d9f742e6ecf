//! A drop-in for vhost-user-backend's daemon surface, served by any unidev transport.
//!
//! A rust-vmm backend is not only its `VhostUserBackend` impl: its `main.rs` builds a
//! `vhost_user_backend::VhostUserDaemon`, takes its `VringEpollHandler`s to register its
//! own listener fds (`get_epoll_handlers()`, `register_listener`), and `serve`s (or
//! `start`s and `wait`s). [`VhostUserDaemon`] and [`VringEpollHandler`] here have that
//! surface — the same method names, argument types and error type as
//! vhost-user-backend 0.24 — and run the backend on unidev's shared dispatch
//! ([`LocalVirtio`]), so an upstream `main.rs` runs over vfio-user, vhost-user or VDUSE
//! by changing only its `use` lines and the address it serves on:
//!
//! ```text
//! -use vhost_user_backend::{VhostUserDaemon, VringEpollHandler};
//! +use unidev_transports::daemon::{VhostUserDaemon, VringEpollHandler, DaemonAddress};
//!  ...
//! -daemon.serve(&socket)?;                                   // vhost-user, as before
//! +daemon.serve(DaemonAddress::vfio_user(&socket, VIRTIO_ID_VSOCK))?;
//! ```
//!
//! A plain path still means vhost-user (upstream's `serve(&socket)` compiles and works
//! unchanged); vfio-user and VDUSE need the virtio device type, which over vhost-user
//! only the VMM knows.
//!
//! What matches upstream, and how:
//! * Listener events reach `handle_event` with upstream's numbering — a worker's queues
//!   first (0..), `num_queues()` for the exit event, the backend's own listeners above —
//!   on the same worker thread as the queues ([`LocalVirtio::register_listener`]).
//! * `serve` serves one client session and returns when it ends, after signalling every
//!   worker's exit event, as upstream's does; upstream daemons that build a fresh backend
//!   per connection (a `loop { new backend; new daemon; serve }`) therefore keep doing
//!   so over every transport. A backend that needs one backend object across clients
//!   uses the export API instead ([`crate::export`]), which keeps the device for the next
//!   client.
//! * `start` takes upstream's `vhost::vhost_user::Listener`; [`start_on`] any address.
//!   Both return at once (upstream's `start` blocks until a client connects); `wait`
//!   waits for the session either way; [`shutdown_handle`] / [`request_shutdown`] end it.
//!   A failure to start is `Error::StartDaemon`.
//! * The `GuestMemoryAtomic` given to [`VhostUserDaemon::new`] is not used: the backend
//!   gets the device's memory through `update_memory`, as with upstream.
//! * The backend must have `Bitmap = ()` and `Vring = VringRwLock` (what unidev's
//!   dispatch runs; most vhost-device backends do); others run as a process behind
//!   `vhost-user-proxy`.
//! * Not offered: `start_client` (vhost-user's backend-connects mode).
//!
//! The backend's calls run inside the core's containment boundary
//! ([`unidev_core::virtio::health`]): a panic in `handle_event`, `set_config`, ... marks
//! the device as needing a reset and the daemon process goes on.
//!
//! [`start_on`]: VhostUserDaemon::start_on
//! [`shutdown_handle`]: VhostUserDaemon::shutdown_handle
//! [`request_shutdown`]: VhostUserDaemon::request_shutdown
//!
//! **Experimental** (`docs/api-stability.md`): the surface follows vhost-user-backend's.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;

use unidev_core::dispatch::StopHandle;
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::{
    DeviceHealth, DispatchOptions, InflightRegion, LocalVirtio, QueueConfig, QueueError,
    VirtioDevice,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::export::{Export, ExportOptions};
use crate::transport::{Socket, VirtioTransport};
use crate::vduse::Vduse;
use crate::vfio_user::VfioUser;
use crate::vhost_user::VhostUser;

pub use vhost_user_backend::Error;

/// Result of daemon operations (vhost-user-backend's error type, so that upstream code's
/// `map_err` keeps compiling).
pub type Result<T> = std::result::Result<T, Error>;

/// Where a [`VhostUserDaemon`] serves: a transport address and, where the transport is
/// the device model (vfio-user, VDUSE), the virtio device type.
pub struct DaemonAddress {
    transport: Box<dyn VirtioTransport>,
    device_type: u32,
}

impl std::fmt::Debug for DaemonAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonAddress")
            .field("transport", &self.transport.name())
            .field("device_type", &self.device_type)
            .finish()
    }
}

impl DaemonAddress {
    /// vhost-user on `socket` (what upstream's `serve(path)` does).
    pub fn vhost_user(socket: impl Into<Socket>) -> Self {
        DaemonAddress {
            transport: Box::new(VhostUser::new(socket)),
            device_type: 0,
        }
    }

    /// vfio-user on `socket`, as a virtio-pci function of virtio device type
    /// `device_type` (virtio 1.2 section 5).
    pub fn vfio_user(socket: impl Into<Socket>, device_type: u32) -> Self {
        DaemonAddress {
            transport: Box::new(VfioUser::new(socket)),
            device_type,
        }
    }

    /// A VDUSE device of virtio device type `device_type`.
    pub fn vduse(target: Vduse, device_type: u32) -> Self {
        DaemonAddress {
            transport: Box::new(target),
            device_type,
        }
    }

    /// Any virtio transport, for a device of type `device_type`.
    pub fn new(transport: impl VirtioTransport + 'static, device_type: u32) -> Self {
        DaemonAddress {
            transport: Box::new(transport),
            device_type,
        }
    }
}

/// What [`VhostUserDaemon::serve`] accepts: a [`DaemonAddress`], or a socket path
/// (vhost-user, as upstream).
pub trait IntoDaemonAddress {
    /// The address.
    fn into_daemon_address(self) -> DaemonAddress;
}

impl IntoDaemonAddress for DaemonAddress {
    fn into_daemon_address(self) -> DaemonAddress {
        self
    }
}

impl<P: AsRef<Path>> IntoDaemonAddress for P {
    fn into_daemon_address(self) -> DaemonAddress {
        DaemonAddress::vhost_user(self.as_ref())
    }
}

/// The backend's worker `thread`, as vhost-user-backend's `VringEpollHandler`: register
/// the backend's own fds on the worker's epoll.
pub struct VringEpollHandler<T>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    local: Arc<LocalVirtio<T>>,
    thread: usize,
}

impl<T> VringEpollHandler<T>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    /// Watch `fd` for `ev_type`; its events reach the backend's `handle_event(data as
    /// u16, ...)` on this worker's thread. `data` must be above the backend's
    /// `num_queues()` (EINVAL otherwise), as upstream.
    pub fn register_listener(&self, fd: RawFd, ev_type: EventSet, data: u64) -> io::Result<()> {
        self.local.register_listener(self.thread, fd, ev_type, data)
    }

    /// Stop watching `fd`.
    pub fn unregister_listener(&self, fd: RawFd, ev_type: EventSet, data: u64) -> io::Result<()> {
        self.local
            .unregister_listener(self.thread, fd, ev_type, data)
    }

    /// Signal the backend's exit event of this worker: the worker leaves its loop.
    pub fn send_exit_event(&self) {
        self.local.send_exit_event(self.thread);
    }
}

impl<T> AsRawFd for VringEpollHandler<T>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    /// The worker's epoll descriptor, as upstream's.
    fn as_raw_fd(&self) -> RawFd {
        self.local.worker_epoll_fd(self.thread).unwrap_or(-1)
    }
}

/// A handle that ends a running [`VhostUserDaemon`] from any thread.
#[derive(Clone)]
pub struct ShutdownHandle(StopHandle);

impl ShutdownHandle {
    /// Ask the daemon to stop serving (the attached client is disconnected).
    pub fn shutdown(&self) {
        self.0.stop();
    }
}

/// vhost-user-backend's `VhostUserDaemon`, served by any unidev transport (see the
/// [module documentation](self)).
pub struct VhostUserDaemon<T>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    name: String,
    local: Arc<LocalVirtio<T>>,
    dma: Arc<DmaSpace>,
    handlers: Vec<Arc<VringEpollHandler<T>>>,
    options: ExportOptions,
    serving: Option<(StopHandle, JoinHandle<Result<()>>)>,
}

fn start_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    Error::StartDaemon(io::Error::other(e))
}

impl<T> VhostUserDaemon<T>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    /// Set `backend` up on unidev's dispatch: its worker threads' epoll sets exist from
    /// here on (threads start with their first queue), so listeners can be registered
    /// before serving. `atomic_mem` is not used (see the module documentation).
    pub fn new(
        name: String,
        backend: T,
        atomic_mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    ) -> Result<Self> {
        let _ = atomic_mem;
        let options = ExportOptions::default();
        let dma = Arc::new(DmaSpace::new(options.max_dma_maps));
        let local =
            LocalVirtio::new(0, backend, &dma, DispatchOptions::default()).map_err(|e| {
                Error::NewVhostUserHandler(
                    vhost_user_backend::VhostUserHandlerError::SpawnVringWorker(e),
                )
            })?;
        local.device_health().set_name(name.clone());
        let handlers = (0..local.workers())
            .map(|thread| {
                Arc::new(VringEpollHandler {
                    local: local.clone(),
                    thread,
                })
            })
            .collect();
        Ok(VhostUserDaemon {
            name,
            local,
            dma,
            handlers,
            options,
            serving: None,
        })
    }

    /// Serve with these export options (socket mode and group, allowed uids, vfio-user
    /// limits; unidev's addition). The device's memory space and workers exist from
    /// [`new`](VhostUserDaemon::new), so its DMA-map cap and adaptive polling are the
    /// defaults; the export API ([`crate::export`]) sets those.
    pub fn set_export_options(&mut self, options: ExportOptions) {
        self.options = options;
    }

    /// The worker threads' handlers, one per `queues_per_thread()` mask, in order.
    pub fn get_epoll_handlers(&self) -> Vec<Arc<VringEpollHandler<T>>> {
        self.handlers.clone()
    }

    /// Serve one client session at `address` (a socket path: vhost-user; or a
    /// [`DaemonAddress`]), then signal every worker's exit event and return. A client
    /// that disconnects is not an error.
    pub fn serve<A: IntoDaemonAddress>(&mut self, address: A) -> Result<()> {
        self.start_on(address)?;
        let result = self.wait();
        for h in &self.handlers {
            h.send_exit_event();
        }
        result
    }

    /// Start serving one client session at `address` on a thread of its own; [`wait`]
    /// for it.
    ///
    /// [`wait`]: VhostUserDaemon::wait
    pub fn start_on<A: IntoDaemonAddress>(&mut self, address: A) -> Result<()> {
        if self.serving.is_some() {
            return Err(start_error("the daemon is serving already"));
        }
        let address = address.into_daemon_address();
        let device = Arc::new(Typed {
            inner: self.local.clone(),
            device_type: address.device_type,
        });
        let options = self.options.clone().single_session(true);
        let exported = Export::virtio_device(self.name.clone(), device, self.dma.clone())
            .serve(address.transport, &options)
            .map_err(start_error)?;
        let stop = exported.stop_handle();
        let running = exported.spawn().map_err(start_error)?;
        let name = self.name.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-wait"))
            .spawn(move || running.join().map_err(start_error))
            .map_err(Error::StartDaemon)?;
        self.serving = Some((stop, thread));
        Ok(())
    }

    /// Start serving one vhost-user session on `listener` (upstream's `start`).
    pub fn start(&mut self, listener: &mut vhost::vhost_user::Listener) -> Result<()> {
        // SAFETY: dup(2) of the listener's open descriptor; the copy is owned below.
        let fd = unsafe { libc::dup(listener.as_raw_fd()) };
        if fd < 0 {
            return Err(Error::StartDaemon(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        self.start_on(DaemonAddress::vhost_user(UnixListener::from(owned)))
    }

    /// Wait until the session started by [`start`](VhostUserDaemon::start) or
    /// [`start_on`](VhostUserDaemon::start_on) ends.
    pub fn wait(&mut self) -> Result<()> {
        let Some((_, thread)) = self.serving.take() else {
            return Ok(());
        };
        thread.join().map_err(Error::WaitDaemon).and_then(|r| r)
    }

    /// A handle that ends the running session, or `None` when not serving.
    pub fn shutdown_handle(&self) -> Option<ShutdownHandle> {
        self.serving
            .as_ref()
            .map(|(stop, _)| ShutdownHandle(stop.clone()))
    }

    /// End the running session, if any.
    pub fn request_shutdown(&self) {
        if let Some(h) = self.shutdown_handle() {
            h.shutdown();
        }
    }

    /// The device's health: whether the backend panicked (unidev's addition).
    pub fn health(&self) -> Arc<DeviceHealth> {
        self.local.device_health().clone()
    }
}

impl<T> Drop for VhostUserDaemon<T>
where
    T: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
{
    fn drop(&mut self) {
        if let Some((stop, thread)) = self.serving.take() {
            stop.stop();
            let _ = thread.join();
        }
    }
}

/// A device of another virtio type: the daemon's [`LocalVirtio`] is made before the
/// address (and so the type) is known.
struct Typed {
    inner: Arc<dyn VirtioDevice>,
    device_type: u32,
}

impl VirtioDevice for Typed {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn num_queues(&self) -> usize {
        self.inner.num_queues()
    }
    fn max_queue_size(&self) -> u16 {
        self.inner.max_queue_size()
    }
    fn features(&self) -> u64 {
        self.inner.features()
    }
    fn read_config(&self, offset: u32, data: &mut [u8]) {
        self.inner.read_config(offset, data)
    }
    fn write_config(&self, offset: u32, data: &[u8]) {
        self.inner.write_config(offset, data)
    }
    fn serves_config(&self) -> bool {
        self.inner.serves_config()
    }
    fn set_driver_features(&self, features: u64) {
        self.inner.set_driver_features(features)
    }
    fn start_queue(
        &self,
        index: usize,
        config: QueueConfig,
    ) -> std::result::Result<(), QueueError> {
        self.inner.start_queue(index, config)
    }
    fn set_queue_call(&self, index: usize, call: Option<EventFd>) {
        self.inner.set_queue_call(index, call)
    }
    fn stop_queue(&self, index: usize) -> Option<u16> {
        self.inner.stop_queue(index)
    }
    fn reset(&self) {
        self.inner.reset()
    }
    fn health(&self) -> Option<Arc<DeviceHealth>> {
        self.inner.health()
    }
    fn can_log_inflight(&self) -> bool {
        self.inner.can_log_inflight()
    }
    fn set_inflight(&self, region: Option<Arc<InflightRegion>>) -> io::Result<()> {
        self.inner.set_inflight(region)
    }
}
