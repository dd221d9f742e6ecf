//! Export a device by one call: the stable entry point for device authors.
//!
//! A device is written once against one of the core's two contracts —
//! [`PciDevice`] for a full PCI function, or rust-vmm's
//! [`vhost_user_backend::VhostUserBackend`] for a virtio device — and
//! [`Export`] puts it on the wire:
//!
//! | device | [`Transport::VfioUser`] | [`Transport::VhostUser`] | [`Transport::Vduse`] |
//! |---|---|---|---|
//! | [`Export::pci`] (a [`PciDevice`]) | as is | — | — |
//! | [`Export::virtio`] (a `VhostUserBackend`) | as virtio-pci ([`VirtioPci`]) | yes | yes (virtio-blk, virtio-net) |
//! | [`Export::virtio_device`] (a [`VirtioDevice`]) | as virtio-pci | yes | yes (virtio-blk, virtio-net) |
//!
//! [`Export::serve`] checks that the device fits the transport, builds what sits between
//! them (the device's [`DmaSpace`], the [`LocalVirtio`] queue runner, the [`VirtioPci`]
//! function), binds the socket (or creates the VDUSE device) and returns an [`Exported`]
//! device, which serves when [`run`](Exported::run) (on the calling thread) or
//! [`spawn`](Exported::spawn) (on a thread of its own) is called. [`ExportOptions`] holds
//! everything else, with defaults that suit QEMU: socket mode and group, the uids
//! allowed to connect, the cap on DMA maps, vfio-user limits, adaptive polling.
//!
//! The `unidev` daemon itself serves every device through this module.
//!
//! # Example: a virtio device over vhost-user
//!
//! A backend written against `VhostUserBackend` (here one that serves nothing), exported
//! by one call and checked with the `vhost` crate's frontend. The same `Export` serves it
//! over vfio-user (as a virtio-pci function) or VDUSE by changing the [`Transport`].
//!
//! ```
//! use std::io;
//! use std::sync::Arc;
//! use unidev_transports::export::{Export, ExportOptions, Transport};
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
//!     .serve(Transport::vhost_user(&sock), &ExportOptions::default())?
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
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{error, info, warn};
use unidev_core::dispatch::{EventLoop, StopHandle};
use unidev_core::memory::{DmaSpace, DEFAULT_MAX_MAPS};
use unidev_core::pci::{PciDevice, SharedPciDevice};
use unidev_core::sandbox::{self, SandboxedThread};
use unidev_core::virtio::{
    DispatchOptions, LocalVirtio, VirtioDevice, VirtioPci, VirtioPciOptions,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock};

use crate::listener::{self, ListenError, PeerPolicy};
use crate::vduse::{
    adopt_attachment, attach, device_exists, Attachment, NetlinkVdpa, VdpaBus, VdpaDriver,
    VdpaError, VdpaManager, VduseError, VduseOptions, VduseServer, DEFAULT_CONTROL_PATH,
};
use crate::vfio_user::{ServerConfig, VfioUserServer};
use crate::vhost_user::VhostUserServer;

/// Where a socket transport listens.
#[derive(Debug)]
#[non_exhaustive]
pub enum Socket {
    /// Bind a new socket here, with [`ExportOptions::socket_mode`] and
    /// [`ExportOptions::socket_group`]. An old socket at the path is replaced; any other
    /// kind of file is refused. The socket is removed again when serving ends.
    Path(PathBuf),
    /// Serve an already-listening socket (socket activation; see
    /// [`crate::listener::from_fd`]). Mode and group are the creator's.
    Listener(UnixListener),
}

impl From<PathBuf> for Socket {
    fn from(path: PathBuf) -> Self {
        Socket::Path(path)
    }
}

impl From<&Path> for Socket {
    fn from(path: &Path) -> Self {
        Socket::Path(path.to_path_buf())
    }
}

impl From<&PathBuf> for Socket {
    fn from(path: &PathBuf) -> Self {
        Socket::Path(path.clone())
    }
}

impl From<&str> for Socket {
    fn from(path: &str) -> Self {
        Socket::Path(PathBuf::from(path))
    }
}

impl From<String> for Socket {
    fn from(path: String) -> Self {
        Socket::Path(PathBuf::from(path))
    }
}

impl From<UnixListener> for Socket {
    fn from(listener: UnixListener) -> Self {
        Socket::Listener(listener)
    }
}

/// A VDUSE device to create: `/dev/vduse/NAME` in the host kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VduseTarget {
    /// Device name: `/dev/vduse/NAME`, and the vDPA device's name.
    pub name: String,
    /// Add the device to the vDPA bus bound to this driver while it is served (as
    /// `vdpa dev add` does), and remove it again when serving ends. `None`: attaching is
    /// left to the user.
    pub attach: Option<VdpaDriver>,
    /// The VDUSE control device.
    pub control_path: PathBuf,
    /// The directory VDUSE device nodes appear in.
    pub dev_dir: PathBuf,
}

impl VduseTarget {
    /// Device `name` at the kernel's usual paths, not attached.
    pub fn new(name: impl Into<String>) -> Self {
        VduseTarget {
            name: name.into(),
            attach: None,
            control_path: PathBuf::from(DEFAULT_CONTROL_PATH),
            dev_dir: PathBuf::from("/dev/vduse"),
        }
    }

    /// Attach the device to the vDPA bus with `driver` while it is served.
    pub fn attach(mut self, driver: VdpaDriver) -> Self {
        self.attach = Some(driver);
        self
    }

    /// Use another control device (tests).
    pub fn control_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.control_path = path.into();
        self
    }
}

/// The transport a device is exported over, and where.
///
/// ```
/// use unidev_transports::export::{Transport, VduseTarget};
/// use unidev_transports::vduse::VdpaDriver;
///
/// let pci = Transport::vfio_user("/run/unidev/card.sock");
/// let blk = Transport::vhost_user(std::path::PathBuf::from("/run/unidev/disk.sock"));
/// // A kernel block device /dev/vdX (root and the vduse module needed).
/// let kernel = Transport::Vduse(VduseTarget::new("disk0").attach(VdpaDriver::VirtioVdpa));
/// assert_eq!(
///     [pci.name(), blk.name(), kernel.name()],
///     ["vfio-user", "vhost-user", "vduse"]
/// );
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Transport {
    /// vfio-user (QEMU's `vfio-user-pci`): PCI devices as they are, virtio devices as
    /// virtio-pci functions.
    VfioUser(Socket),
    /// vhost-user (QEMU's `vhost-user-*` devices): virtio devices.
    VhostUser(Socket),
    /// VDUSE (a vDPA device in userspace, for the host kernel's virtio drivers or, through
    /// `vhost_vdpa`, a VMM): virtio devices of the types the kernel accepts (Linux 6.12:
    /// virtio-blk and virtio-net). Needs root and the `vduse` module.
    Vduse(VduseTarget),
}

impl Transport {
    /// vfio-user on `socket` (a path, or a listening [`UnixListener`]).
    pub fn vfio_user(socket: impl Into<Socket>) -> Self {
        Transport::VfioUser(socket.into())
    }

    /// vhost-user on `socket` (a path, or a listening [`UnixListener`]).
    pub fn vhost_user(socket: impl Into<Socket>) -> Self {
        Transport::VhostUser(socket.into())
    }

    /// VDUSE device `name`, not attached to the vDPA bus (see [`VduseTarget`] for more).
    pub fn vduse(name: impl Into<String>) -> Self {
        Transport::Vduse(VduseTarget::new(name))
    }

    /// The transport's name: "vfio-user", "vhost-user" or "vduse".
    pub fn name(&self) -> &'static str {
        match self {
            Transport::VfioUser(_) => "vfio-user",
            Transport::VhostUser(_) => "vhost-user",
            Transport::Vduse(_) => "vduse",
        }
    }
}

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
    /// vfio-user only: make the virtio-pci notify area mappable by the client (its
    /// notifications then go to shared memory) and poll the queues continuously (one busy
    /// core per worker thread). Default off.
    pub notify_mmap: bool,
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

    fn peers(&self) -> PeerPolicy {
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

enum Device {
    Pci(SharedPciDevice),
    Backend {
        start: StartBackend,
    },
    Virtio {
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
    },
}

/// A device to export: what it is, before the transport is chosen. See the
/// [module documentation](self).
pub struct Export {
    name: String,
    device: Device,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.device {
            Device::Pci(_) => "pci",
            Device::Backend { .. } => "virtio backend",
            Device::Virtio { .. } => "virtio device",
        };
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("kind", &kind)
            .finish()
    }
}

impl Export {
    /// A full PCI function (vfio-user only). `name` names the device in log lines. The
    /// device reaches client memory through the [`DmaSpace`] it returns from
    /// [`PciDevice::dma`], which the transport fills with the client's maps.
    pub fn pci<D: PciDevice + 'static>(name: impl Into<String>, device: D) -> Self {
        Self::pci_shared(name, Arc::new(Mutex::new(device)))
    }

    /// A full PCI function that its owner keeps a handle to (to change its state while a
    /// client is attached: an `Arc<Mutex<D>>` coerces to [`SharedPciDevice`]).
    pub fn pci_shared(name: impl Into<String>, device: SharedPciDevice) -> Self {
        Export {
            name: name.into(),
            device: Device::Pci(device),
        }
    }

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
            device: Device::Backend { start },
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
            device: Device::Virtio { device, dma },
        }
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Put the device behind `transport`: check that they fit, set up the device, then
    /// bind the socket (or create the VDUSE device). Nothing is served until
    /// [`Exported::run`] or [`Exported::spawn`]; a client that connects meanwhile waits
    /// in the listen backlog.
    pub fn serve(
        self,
        transport: Transport,
        options: &ExportOptions,
    ) -> Result<Exported, ExportError> {
        let name = self.name;
        let unsupported = |why: &str| ExportError::Unsupported {
            name: name.clone(),
            why: why.to_string(),
        };
        let vfio_user = matches!(transport, Transport::VfioUser(_));
        if matches!(self.device, Device::Pci(_)) && !vfio_user {
            return Err(unsupported(
                "a full PCI device needs the vfio-user transport (vhost-user and VDUSE \
                 carry virtio devices only)",
            ));
        }
        if options.notify_mmap && !vfio_user {
            return Err(unsupported(
                "notify_mmap (a mappable notify area) applies to the vfio-user transport only",
            ));
        }
        let device_err = |source| ExportError::Device {
            name: name.clone(),
            source,
        };
        let server_err = |source| ExportError::Server {
            name: name.clone(),
            source,
        };
        let virtio = match self.device {
            Device::Pci(pci) => Err(pci),
            Device::Backend { start } => {
                let dma = Arc::new(DmaSpace::new(options.max_dma_maps));
                let dispatch = DispatchOptions {
                    poll: options.poll,
                    busy: options.notify_mmap,
                };
                Ok((start(&dma, dispatch).map_err(device_err)?, dma))
            }
            Device::Virtio { device, dma } => Ok((device, dma)),
        };
        let (inner, socket) = match transport {
            Transport::VfioUser(socket) => {
                let pci: SharedPciDevice = match virtio {
                    Err(pci) => pci,
                    Ok((device, dma)) => {
                        let options = VirtioPciOptions {
                            notify_mmap: options.notify_mmap,
                        };
                        let pci = VirtioPci::new(name.clone(), device, dma, options)
                            .map_err(device_err)?;
                        Arc::new(Mutex::new(pci))
                    }
                };
                let (listener, guard) = listen(socket, options)?;
                let server =
                    VfioUserServer::new(name.clone(), listener, pci, options.vfio_user.clone())
                        .map_err(server_err)?
                        .with_peer_policy(options.peers());
                (Inner::VfioUser(server), guard)
            }
            Transport::VhostUser(socket) => {
                let Ok((device, dma)) = virtio else {
                    unreachable!("PCI devices were refused above");
                };
                let (listener, guard) = listen(socket, options)?;
                let server = VhostUserServer::new(name.clone(), listener, device, dma)
                    .map_err(server_err)?
                    .with_peer_policy(options.peers());
                (Inner::VhostUser(server), guard)
            }
            Transport::Vduse(target) => {
                let Ok((device, dma)) = virtio else {
                    unreachable!("PCI devices were refused above");
                };
                let server = create_vduse(&target, device, dma)?;
                let shutdown = EventLoop::new().map_err(server_err)?;
                (
                    Inner::Vduse(VduseExport {
                        server,
                        attach: target.attach,
                        shutdown,
                    }),
                    None,
                )
            }
        };
        Ok(Exported {
            name,
            inner,
            socket,
            on_exit: None,
        })
    }
}

/// A socket path bound by an export, removed when serving ends (or when the export is
/// dropped without serving).
#[derive(Debug)]
struct BoundPath(PathBuf);

impl Drop for BoundPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn listen(
    socket: Socket,
    options: &ExportOptions,
) -> Result<(UnixListener, Option<BoundPath>), ExportError> {
    Ok(match socket {
        Socket::Path(path) => {
            let l = listener::bind_with(&path, options.socket_mode, options.socket_group)?;
            (l, Some(BoundPath(path)))
        }
        Socket::Listener(l) => (l, None),
    })
}

/// Create VDUSE device `target.name` for `device` — or take over the one of that name a
/// killed daemon left (see [`VduseServer::create`]); a left-over device the kernel marked
/// broken is removed from the vDPA bus first.
fn create_vduse(
    target: &VduseTarget,
    device: Arc<dyn VirtioDevice>,
    dma: Arc<DmaSpace>,
) -> Result<VduseServer, ExportError> {
    let name = &target.name;
    let mut options = VduseOptions::new(name);
    options.control_path = target.control_path.clone();
    options.dev_dir = target.dev_dir.clone();
    match VduseServer::create(&options, device.clone(), dma.clone()) {
        Err(VduseError::Broken { .. }) => {
            warn!(
                "VDUSE device {name} is left over and broken: removing it from the vDPA bus \
                 (this waits for I/O in flight on it, which cannot complete)"
            );
            NetlinkVdpa::open()
                .and_then(|mut nl| nl.dev_del(name))
                .map_err(|source| ExportError::Vdpa {
                    what: format!("cannot remove the broken VDUSE device {name}"),
                    source,
                })?;
            Ok(VduseServer::create(&options, device, dma)?)
        }
        other => Ok(other?),
    }
}

/// A created VDUSE device, not yet served.
struct VduseExport {
    server: VduseServer,
    attach: Option<VdpaDriver>,
    /// Woken by the stop handle, or by the serving thread when it ends on its own.
    shutdown: EventLoop,
}

/// A VDUSE device being served on its thread.
struct VduseRunning {
    name: String,
    stop: StopHandle,
    thread: Option<SandboxedThread<io::Result<()>>>,
    attachment: Option<Attachment<NetlinkVdpa>>,
}

impl VduseExport {
    /// Serve the device on a new thread (under the process's seccomp policy, with the
    /// ioctls the server issues), then attach it as asked; returns the loop to wait on.
    fn start(self) -> Result<(VduseRunning, EventLoop), ExportError> {
        let VduseExport {
            server,
            attach: driver,
            shutdown,
        } = self;
        let name = server.name().to_string();
        let took_over = server.took_over();
        let stop = server.stop_handle();
        let wake = shutdown.stop_handle();
        let role = sandbox::Role::KernelTransport {
            ioctls: VduseServer::run_ioctls(),
        };
        let thread = sandbox::spawn(format!("vduse-{name}"), role, move || {
            let result = server.run();
            wake.stop();
            result
        })
        .map_err(|source| ExportError::Server {
            name: name.clone(),
            source,
        })?;
        let mut running = VduseRunning {
            name: name.clone(),
            stop,
            thread: Some(thread),
            attachment: None,
        };
        let bus = VdpaBus::default();
        match driver {
            None if took_over => {
                info!("VDUSE device {name} taken over; it stays attached to the vDPA bus")
            }
            None => info!(
                "VDUSE device {name} ready; attach it with `vdpa dev add name {name} mgmtdev vduse`"
            ),
            Some(driver) => {
                let attached = NetlinkVdpa::open().and_then(|nl| {
                    if took_over && device_exists(&bus, &name) {
                        adopt_attachment(nl, &bus, &name, driver)
                    } else {
                        attach(nl, &bus, &name, driver)
                    }
                });
                match attached {
                    Ok(a) => running.attachment = Some(a),
                    Err(source) => {
                        if let Err(e) = running.shutdown() {
                            error!("{e}");
                        }
                        return Err(ExportError::Vdpa {
                            what: format!("cannot attach VDUSE device {name}"),
                            source,
                        });
                    }
                }
            }
        }
        Ok((running, shutdown))
    }
}

impl VduseRunning {
    /// Remove the vDPA device this export attached (while requests are still served: the
    /// driver resets the device on removal), then stop serving, which destroys the device.
    fn shutdown(&mut self) -> Result<(), ExportError> {
        if let Some(a) = self.attachment.take() {
            if let Err(e) = a.detach() {
                error!("{e}");
            }
        }
        self.stop.stop();
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let failed = |source| ExportError::Failed {
            name: format!("VDUSE device {}", self.name),
            source,
        };
        match thread.join() {
            Ok(r) => r.map_err(failed),
            Err(_) => Err(failed(io::Error::other("the server thread panicked"))),
        }
    }
}

impl Drop for VduseRunning {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            error!("{e}");
        }
    }
}

enum Inner {
    VfioUser(VfioUserServer),
    VhostUser(VhostUserServer),
    Vduse(VduseExport),
}

/// A device on its transport, ready to serve: [`run`](Exported::run) it on this thread
/// or [`spawn`](Exported::spawn) a thread for it. Dropping it unserved removes its socket
/// (or destroys the VDUSE device it created).
pub struct Exported {
    name: String,
    inner: Inner,
    socket: Option<BoundPath>,
    on_exit: Option<OnExit>,
}

impl std::fmt::Debug for Exported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exported")
            .field("name", &self.name)
            .field("transport", &self.transport_name())
            .field("socket", &self.socket_path())
            .finish()
    }
}

type Body = Box<dyn FnOnce() -> Result<(), ExportError> + Send>;

impl Exported {
    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The transport's name: "vfio-user", "vhost-user" or "vduse".
    pub fn transport_name(&self) -> &'static str {
        match self.inner {
            Inner::VfioUser(_) => "vfio-user",
            Inner::VhostUser(_) => "vhost-user",
            Inner::Vduse(_) => "vduse",
        }
    }

    /// The socket bound at a path ([`Socket::Path`]), if any.
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket.as_ref().map(|b| b.0.as_path())
    }

    /// A handle that ends serving from any thread (for example a signal handler's): the
    /// attached client's session is closed, a VDUSE device detached from the vDPA bus and
    /// destroyed, and [`run`](Exported::run) returns. Valid before serving starts too.
    pub fn stop_handle(&self) -> StopHandle {
        match &self.inner {
            Inner::VfioUser(s) => s.stop_handle(),
            Inner::VhostUser(s) => s.stop_handle(),
            Inner::Vduse(v) => v.shutdown.stop_handle(),
        }
    }

    /// Call `f` once serving has ended, for whatever reason (after the socket is removed).
    pub fn on_exit(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_exit = Some(Box::new(f));
        self
    }

    /// Prepare serving; for VDUSE, start the serving thread and attach the device now, so
    /// that their errors come from [`spawn`](Exported::spawn).
    fn prepare(self) -> Result<Prepared, ExportError> {
        let Exported {
            name,
            inner,
            socket,
            on_exit,
        } = self;
        let body: Body = match inner {
            Inner::VfioUser(s) => Box::new(move || {
                s.run()
                    .map_err(|source| ExportError::Failed { name, source })
            }),
            Inner::VhostUser(s) => Box::new(move || {
                s.run()
                    .map_err(|source| ExportError::Failed { name, source })
            }),
            Inner::Vduse(v) => {
                let (mut running, mut shutdown) = v.start()?;
                info!("{name}: VDUSE device serving");
                Box::new(move || {
                    if let Err(e) = shutdown.run() {
                        error!("{name}: shutdown waiter failed: {e}");
                    }
                    running.shutdown()
                })
            }
        };
        Ok(Prepared {
            body,
            socket,
            on_exit,
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
    body: Body,
    socket: Option<BoundPath>,
    on_exit: Option<OnExit>,
}

impl Prepared {
    fn run(self) -> Result<(), ExportError> {
        let result = (self.body)();
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
