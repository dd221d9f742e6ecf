//! Export a device by one call: the stable entry point for device authors.
//!
//! A device is written once against one of the core's two contracts —
//! [`PciDevice`] for a full PCI function, or rust-vmm's
//! [`vhost_user_backend::VhostUserBackend`] for a virtio device — and
//! [`Export`] puts it on the wire:
//!
//! | device | [`VfioUser`] | [`VhostUser`] | [`Vduse`] |
//! |---|---|---|---|
//! | [`Export::pci`] (a [`PciDevice`]) | as is | — | — |
//! | [`Export::virtio`] (a `VhostUserBackend`) | as virtio-pci ([`VirtioPci`]) | yes | yes (virtio-blk, virtio-net) |
//! | [`Export::virtio_device`] (a [`VirtioDevice`]) | as virtio-pci | yes | yes (virtio-blk, virtio-net) |
//!
//! The table is checked by types: [`Export::pci`] gives an `Export<Pci>`, whose
//! [`serve`](Export::serve) takes only a [`PciTransport`] (vfio-user); [`Export::virtio`]
//! gives an `Export<Virtio>`, served by any [`VirtioTransport`] — one of the three address
//! types, or a `Box<dyn VirtioTransport>` chosen at run time. `serve` checks what only
//! run time knows (options against the transport; VDUSE checks the virtio device type),
//! builds what sits between device and transport (the device's [`DmaSpace`], the
//! [`LocalVirtio`] queue runner, the [`VirtioPci`] function), binds the socket (or creates
//! the VDUSE device) and returns an [`Exported`] device, which serves when
//! [`run`](Exported::run) (on the calling thread) or [`spawn`](Exported::spawn) (on a
//! thread of its own) is called. [`ExportOptions`] holds everything else, with defaults
//! that suit QEMU: socket mode and group, the uids allowed to connect, the cap on DMA
//! maps, vfio-user limits, adaptive polling.
//!
//! The `unidev` daemon itself serves every device through this module.
//!
//! # Example: a virtio device over vhost-user
//!
//! A backend written against `VhostUserBackend` (here one that serves nothing), exported
//! by one call and checked with the `vhost` crate's frontend. The same `Export` serves it
//! over vfio-user (as a virtio-pci function) or VDUSE by changing the transport.
//!
//! ```
//! use std::io;
//! use std::sync::Arc;
//! use unidev_transports::export::{Export, ExportOptions, VhostUser};
//! use vhost::vhost_user::message::VhostUserProtocolFeatures;
//! use vhost::vhost_user::{Frontend, VhostUserFrontend};
//! use vhost::VhostBackend;
//! use vhost_user_backend::{VhostUserBackend, VringRwLock};
//! use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
//! use vmm_sys_util::epoll::EventSet;
//!
//! /// A virtio device with one queue that never completes anything.
//! struct Idle;
//!
//! impl VhostUserBackend for Idle {
//!     type Bitmap = ();
//!     type Vring = VringRwLock;
//!     fn num_queues(&self) -> usize { 1 }
//!     fn max_queue_size(&self) -> usize { 256 }
//!     fn features(&self) -> u64 { 1 << 32 } // VIRTIO_F_VERSION_1
//!     fn protocol_features(&self) -> VhostUserProtocolFeatures {
//!         VhostUserProtocolFeatures::empty()
//!     }
//!     fn set_event_idx(&self, _enabled: bool) {}
//!     fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
//!         Ok(())
//!     }
//!     fn handle_event(&self, _event: u16, _set: EventSet, _vrings: &[VringRwLock], _thread: usize)
//!         -> io::Result<()> {
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join(format!("unidev-doc-export-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let sock = dir.join("idle.sock");
//!
//! // Virtio device type 4 (entropy); `Arc` makes the backend `Clone`.
//! let running = Export::virtio("idle", 4, Arc::new(Idle))
//!     .serve(VhostUser::new(&sock), &ExportOptions::default())?
//!     .spawn()?;
//!
//! let mut frontend = Frontend::connect(&sock, 1)?;
//! frontend.set_owner()?;
//! assert_ne!(frontend.get_features()? & (1 << 32), 0);
//! drop(frontend);
//!
//! running.stop()?; // the socket is removed
//! assert!(!sock.exists());
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! A transport picked at run time is a `Box<dyn VirtioTransport>`:
//!
//! ```
//! use unidev_transports::export::{VfioUser, VhostUser, VirtioTransport};
//!
//! fn transport(kind: &str, socket: &str) -> Box<dyn VirtioTransport> {
//!     match kind {
//!         "vhost-user" => Box::new(VhostUser::new(socket)),
//!         _ => Box::new(VfioUser::new(socket)),
//!     }
//! }
//! assert_eq!(transport("vhost-user", "/run/d.sock").name(), "vhost-user");
//! ```
//!
//! # Stability
//! This module is part of unidev's stable device-author API (see
//! `docs/api-stability.md`): options and errors are `#[non_exhaustive]`, so adding one is
//! not a breaking change.
//!
//! [`PciDevice`]: unidev_core::pci::PciDevice
//! [`VirtioDevice`]: unidev_core::virtio::VirtioDevice
//! [`VirtioPci`]: unidev_core::virtio::VirtioPci
//! [`LocalVirtio`]: unidev_core::virtio::LocalVirtio
//! [`DmaSpace`]: unidev_core::memory::DmaSpace

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use unidev_core::dispatch::StopHandle;
use unidev_core::memory::{DmaSpace, DEFAULT_MAX_MAPS};
use unidev_core::pci::{PciDevice, SharedPciDevice};
use unidev_core::virtio::config::ConfigValues;
use unidev_core::virtio::{DispatchOptions, LocalVirtio, VirtioDevice};
use vhost_user_backend::{VhostUserBackend, VringRwLock};

use crate::listener::{ListenError, PeerPolicy};
use crate::transport::{Bound, BoundSocket, Server};
use crate::vduse::{VdpaError, VduseError};
use crate::vfio_user::ServerConfig;

pub use crate::transport::{PciTransport, Socket, VirtioTransport};
pub use crate::vduse::Vduse;
pub use crate::vfio_user::VfioUser;
pub use crate::vhost_user::VhostUser;

/// The VDUSE address under its 0.1 name.
pub type VduseTarget = Vduse;

/// How a device is exported. `ExportOptions::default()` suits QEMU; change fields
/// directly or with the chaining setters:
///
/// ```
/// use std::time::Duration;
/// use unidev_transports::export::ExportOptions;
///
/// let options = ExportOptions::default()
///     .socket_mode(0o660)
///     .allow_uids([107])
///     .poll(Duration::from_micros(50));
/// assert_eq!(options.socket_mode, 0o660);
/// assert_eq!(options.allowed_uids, Some(vec![107]));
/// assert_eq!(options.max_dma_maps, unidev_core::memory::DEFAULT_MAX_MAPS);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ExportOptions {
    /// Permission bits of a socket bound at a path (default 0600).
    pub socket_mode: u32,
    /// Group of a socket bound at a path, so that a client running as another user in
    /// that group may connect (with mode 0660). Default: the process's group.
    pub socket_group: Option<u32>,
    /// Serve only clients running as these uids (checked with SO_PEERCRED on every
    /// connection; others are refused and logged). Default `None`: anyone the socket's
    /// permissions let in.
    pub allowed_uids: Option<Vec<u32>>,
    /// Cap on the client's DMA maps, for the [`DmaSpace`] an export creates for a
    /// virtio backend ([`Export::virtio`]). A PCI device or a [`VirtioDevice`] brings its
    /// own `DmaSpace`, created with its cap ([`DmaSpace::new`]). Default 65535.
    pub max_dma_maps: usize,
    /// vfio-user limits and behaviour (fds and bytes per message, DMA_READ/DMA_WRITE
    /// layout, I/O timeout).
    pub vfio_user: ServerConfig,
    /// Adaptive polling of a virtio backend's queues: after handling a queue, a worker
    /// keeps polling it this long before sleeping (0, the default: sleep at once).
    pub poll: Duration,
    /// Transports that carry virtio devices as virtio-pci functions (vfio-user) only:
    /// make the notify area mappable by the client (its notifications then go to shared
    /// memory) and poll the queues continuously (one busy core per worker thread).
    /// Default off.
    pub notify_mmap: bool,
    /// Values of the device configuration fields the transport's device model keeps
    /// (a virtio backend without the vhost-user CONFIG protocol feature: its read-only
    /// fields, such as virtio-fs's `tag`; see `unidev_core::virtio::config`). For
    /// transports that are the device model (vfio-user, VDUSE); refused over vhost-user,
    /// where the VMM keeps the config. Default: the spec's defaults.
    pub device_config: ConfigValues,
    /// Serve one client session, then stop (as vhost-user-backend's `serve` does; the
    /// daemon-compatible surface, [`crate::daemon`], uses it). Default off: serve one
    /// client after another until stopped. VDUSE serves until stopped either way.
    pub single_session: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            socket_mode: 0o600,
            socket_group: None,
            allowed_uids: None,
            max_dma_maps: DEFAULT_MAX_MAPS,
            vfio_user: ServerConfig::default(),
            poll: Duration::ZERO,
            notify_mmap: false,
            device_config: ConfigValues::default(),
            single_session: false,
        }
    }
}

impl ExportOptions {
    /// Set [`socket_mode`](ExportOptions::socket_mode).
    pub fn socket_mode(mut self, mode: u32) -> Self {
        self.socket_mode = mode;
        self
    }

    /// Set [`socket_group`](ExportOptions::socket_group).
    pub fn socket_group(mut self, gid: u32) -> Self {
        self.socket_group = Some(gid);
        self
    }

    /// Set [`allowed_uids`](ExportOptions::allowed_uids).
    pub fn allow_uids(mut self, uids: impl IntoIterator<Item = u32>) -> Self {
        self.allowed_uids = Some(uids.into_iter().collect());
        self
    }

    /// Set [`max_dma_maps`](ExportOptions::max_dma_maps).
    pub fn max_dma_maps(mut self, maps: usize) -> Self {
        self.max_dma_maps = maps;
        self
    }

    /// Set [`vfio_user`](ExportOptions::vfio_user).
    pub fn vfio_user(mut self, config: ServerConfig) -> Self {
        self.vfio_user = config;
        self
    }

    /// Set [`poll`](ExportOptions::poll).
    pub fn poll(mut self, poll: Duration) -> Self {
        self.poll = poll;
        self
    }

    /// Set [`notify_mmap`](ExportOptions::notify_mmap).
    pub fn notify_mmap(mut self, on: bool) -> Self {
        self.notify_mmap = on;
        self
    }

    /// Set [`device_config`](ExportOptions::device_config).
    pub fn device_config(mut self, values: ConfigValues) -> Self {
        self.device_config = values;
        self
    }

    /// Set [`single_session`](ExportOptions::single_session).
    pub fn single_session(mut self, on: bool) -> Self {
        self.single_session = on;
        self
    }

    pub(crate) fn peers(&self) -> PeerPolicy {
        PeerPolicy {
            allowed_uids: self.allowed_uids.clone(),
        }
    }
}

/// Why a device could not be exported, or stopped serving with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The device does not fit the transport, or an option does not apply to it.
    #[error("{name}: {why}")]
    Unsupported {
        /// The device.
        name: String,
        /// What does not fit.
        why: String,
    },
    /// The device could not be set up (queue workers, the virtio-pci function).
    #[error("{name}: cannot start the device: {source}")]
    Device {
        /// The device.
        name: String,
        /// The cause.
        source: io::Error,
    },
    /// The listening socket could not be set up.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// The server or its thread could not be started.
    #[error("{name}: cannot start server: {source}")]
    Server {
        /// The device.
        name: String,
        /// The cause.
        source: io::Error,
    },
    /// The VDUSE device could not be created (the message says which module or privilege
    /// is missing).
    #[error(transparent)]
    Vduse(#[from] VduseError),
    /// The vDPA bus refused (attaching, or removing a broken device).
    #[error("{what}: {source}")]
    Vdpa {
        /// What was attempted.
        what: String,
        /// The cause.
        source: VdpaError,
    },
    /// Serving failed.
    #[error("{name}: server failed: {source}")]
    Failed {
        /// The device.
        name: String,
        /// The cause.
        source: io::Error,
    },
}

/// Starts a virtio backend's queue runner on a memory space.
type StartBackend =
    Box<dyn FnOnce(&Arc<DmaSpace>, DispatchOptions) -> io::Result<Arc<dyn VirtioDevice>> + Send>;

/// The device of an [`Export`] of a full PCI function ([`Export::pci`]).
pub struct Pci(SharedPciDevice);

/// The device of an [`Export`] of a virtio device ([`Export::virtio`],
/// [`Export::virtio_device`]).
pub struct Virtio(VirtioSource);

enum VirtioSource {
    Backend {
        device_type: u32,
        start: StartBackend,
    },
    Device {
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
    },
}

/// A device to export: what it is, before the transport is chosen — a full PCI function
/// (`Export<Pci>`) or a virtio device (`Export<Virtio>`). See the
/// [module documentation](self).
pub struct Export<C = Virtio> {
    name: String,
    device: C,
}

impl<C> std::fmt::Debug for Export<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("kind", &std::any::type_name::<C>())
            .finish()
    }
}

impl<C> Export<C> {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Export<Pci> {
    /// A full PCI function. `name` names the device in log lines. The device reaches
    /// client memory through the [`DmaSpace`] it returns from [`PciDevice::dma`], which
    /// the transport fills with the client's maps.
    pub fn pci<D: PciDevice + 'static>(name: impl Into<String>, device: D) -> Self {
        Self::pci_shared(name, Arc::new(Mutex::new(device)))
    }

    /// A full PCI function that its owner keeps a handle to (to change its state while a
    /// client is attached: an `Arc<Mutex<D>>` coerces to [`SharedPciDevice`]).
    pub fn pci_shared(name: impl Into<String>, device: SharedPciDevice) -> Self {
        Export {
            name: name.into(),
            device: Pci(device),
        }
    }

    /// Put the device behind `transport` (one that carries PCI functions: [`VfioUser`]),
    /// then bind the socket. Nothing is served until [`Exported::run`] or
    /// [`Exported::spawn`]; a client that connects meanwhile waits in the listen backlog.
    pub fn serve<T: PciTransport + 'static>(
        self,
        transport: T,
        options: &ExportOptions,
    ) -> Result<Exported, ExportError> {
        let name = self.name;
        let bound = Box::new(transport).bind_pci(&name, self.device.0, options)?;
        Ok(Exported::new(name, bound))
    }
}

impl Export<Virtio> {
    /// A virtio device of type `device_type` (virtio 1.2 section 5: 1 net, 2 block,
    /// 3 console, 4 entropy, ...) whose queues `backend` serves, exactly as rust-vmm's
    /// `VhostUserDaemon` would run it: on every transport the backend gets the same calls
    /// (`update_memory`, `set_event_idx`, `acked_features`, `handle_event` with the same
    /// event numbering, `queues_per_thread`, `exit_event`). Its queues run on the core's
    /// dispatch ([`LocalVirtio`]) over a [`DmaSpace`] of
    /// [`ExportOptions::max_dma_maps`]. Wrap a backend in an `Arc` to make it `Clone`.
    pub fn virtio<B>(name: impl Into<String>, device_type: u32, backend: B) -> Self
    where
        B: VhostUserBackend<Bitmap = (), Vring = VringRwLock> + Clone + 'static,
    {
        let start: StartBackend = Box::new(move |dma, dispatch| {
            let local = LocalVirtio::new(device_type, backend, dma, dispatch)?;
            Ok(local as Arc<dyn VirtioDevice>)
        });
        Export {
            name: name.into(),
            device: Virtio(VirtioSource::Backend { device_type, start }),
        }
    }

    /// A virtio device given as the core's transport-facing [`VirtioDevice`] (for
    /// devices whose queues do not run here, such as compat's vhost-user proxy), with the
    /// `dma` space its queues' memory lands in.
    pub fn virtio_device(
        name: impl Into<String>,
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
    ) -> Self {
        Export {
            name: name.into(),
            device: Virtio(VirtioSource::Device { device, dma }),
        }
    }

    /// The virtio device type.
    pub fn device_type(&self) -> u32 {
        match &self.device.0 {
            VirtioSource::Backend { device_type, .. } => *device_type,
            VirtioSource::Device { device, .. } => device.device_type(),
        }
    }

    /// Put the device behind `transport` (any [`VirtioTransport`]): check that they fit,
    /// set up the device, then bind the socket (or create the VDUSE device). Nothing is
    /// served until [`Exported::run`] or [`Exported::spawn`]; a client that connects
    /// meanwhile waits in the listen backlog.
    pub fn serve<T: VirtioTransport + 'static>(
        self,
        transport: T,
        options: &ExportOptions,
    ) -> Result<Exported, ExportError> {
        let unsupported = |name: String, why: String| ExportError::Unsupported { name, why };
        let name = self.name;
        if options.notify_mmap && !transport.carries_virtio_pci() {
            return Err(unsupported(
                name,
                format!(
                    "notify_mmap (a mappable notify area) applies to the vfio-user \
                     transport only, not {}",
                    transport.name()
                ),
            ));
        }
        let (device, dma) = match self.device.0 {
            VirtioSource::Backend { start, .. } => {
                let dma = Arc::new(DmaSpace::new(options.max_dma_maps));
                let dispatch = DispatchOptions {
                    poll: options.poll,
                    busy: options.notify_mmap,
                };
                let device = start(&dma, dispatch).map_err(|source| ExportError::Device {
                    name: name.clone(),
                    source,
                })?;
                (device, dma)
            }
            VirtioSource::Device { device, dma } => (device, dma),
        };
        // A backend failure's log line names the export.
        if let Some(health) = device.health() {
            health.set_name(name.clone());
        }
        let bound = Box::new(transport).bind_virtio(&name, device, dma, options)?;
        Ok(Exported::new(name, bound))
    }
}

/// A device on its transport, ready to serve: [`run`](Exported::run) it on this thread
/// or [`spawn`](Exported::spawn) a thread for it. Dropping it unserved removes its socket
/// (or destroys the VDUSE device it created).
pub struct Exported {
    name: String,
    transport: &'static str,
    server: Box<dyn Server>,
    socket: Option<BoundSocket>,
    on_exit: Option<OnExit>,
}

impl std::fmt::Debug for Exported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exported")
            .field("name", &self.name)
            .field("transport", &self.transport)
            .field("socket", &self.socket_path())
            .finish()
    }
}

impl Exported {
    fn new(name: String, bound: Bound) -> Self {
        Exported {
            name,
            transport: bound.transport,
            server: bound.server,
            socket: bound.socket,
            on_exit: None,
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The transport's name: "vfio-user", "vhost-user" or "vduse".
    pub fn transport_name(&self) -> &'static str {
        self.transport
    }

    /// The socket bound at a path ([`Socket::Path`]), if any.
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket.as_ref().map(BoundSocket::path)
    }

    /// A handle that ends serving from any thread (for example a signal handler's): the
    /// attached client's session is closed, a VDUSE device detached from the vDPA bus and
    /// destroyed, and [`run`](Exported::run) returns. Valid before serving starts too.
    pub fn stop_handle(&self) -> StopHandle {
        self.server.stop_handle()
    }

    /// Call `f` once serving has ended, for whatever reason (after the socket is removed).
    pub fn on_exit(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_exit = Some(Box::new(f));
        self
    }

    /// Prepare serving (VDUSE: start the serving thread and attach the device now, so
    /// that their errors come from [`spawn`](Exported::spawn)).
    fn prepare(mut self) -> Result<Prepared, ExportError> {
        self.server.prepare()?;
        Ok(Prepared {
            name: self.name,
            server: self.server,
            socket: self.socket,
            on_exit: self.on_exit,
        })
    }

    /// Serve on this thread until stopped ([`stop_handle`](Exported::stop_handle)) or
    /// until serving fails; one client at a time. The socket is removed on the way out.
    pub fn run(self) -> Result<(), ExportError> {
        self.prepare()?.run()
    }

    /// Serve on a new thread (named `dev-NAME`). A VDUSE device is attached to the vDPA
    /// bus before this returns.
    pub fn spawn(self) -> Result<Running, ExportError> {
        let name = self.name.clone();
        let stop = self.stop_handle();
        let prepared = self.prepare()?;
        let thread = std::thread::Builder::new()
            .name(format!("dev-{name}"))
            .spawn(move || prepared.run())
            .map_err(|source| ExportError::Server {
                name: name.clone(),
                source,
            })?;
        Ok(Running { name, stop, thread })
    }
}

/// Called once serving has ended.
type OnExit = Box<dyn FnOnce() + Send>;

/// Serving, ready to start on some thread.
struct Prepared {
    name: String,
    server: Box<dyn Server>,
    socket: Option<BoundSocket>,
    on_exit: Option<OnExit>,
}

impl Prepared {
    fn run(self) -> Result<(), ExportError> {
        let name = self.name;
        let result = self
            .server
            .serve()
            .map_err(|source| ExportError::Failed { name, source });
        drop(self.socket);
        if let Some(f) = self.on_exit {
            f();
        }
        result
    }
}

/// A device served on its own thread ([`Exported::spawn`]). Dropping it does not stop
/// serving: call [`stop`](Running::stop), or stop it through a handle and
/// [`join`](Running::join).
pub struct Running {
    name: String,
    stop: StopHandle,
    thread: JoinHandle<Result<(), ExportError>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("name", &self.name)
            .field("finished", &self.thread.is_finished())
            .finish()
    }
}

impl Running {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A handle that ends serving from any thread (see [`Exported::stop_handle`]).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Whether serving has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Wait until serving ends (stopped through a handle, or failed).
    pub fn join(self) -> Result<(), ExportError> {
        let name = self.name;
        self.thread.join().unwrap_or_else(|_| {
            Err(ExportError::Failed {
                name,
                source: io::Error::other("the serving thread panicked"),
            })
        })
    }

    /// Stop serving and wait until it has ended.
    pub fn stop(self) -> Result<(), ExportError> {
        self.stop.stop();
        self.join()
    }
}
