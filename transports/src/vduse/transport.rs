//! VDUSE as a unidev transport ([`crate::transport`]): the [`Vduse`] address (a device
//! name, and whether to attach it to the vDPA bus) carries virtio devices of the types the
//! kernel accepts, and this module holds the device's whole life as an export:
//!
//! 1. bind: create `/dev/vduse/NAME` — or take over the one a killed daemon left
//!    ([`VduseServer::create`]); a left-over the kernel marked broken is removed from the
//!    vDPA bus first;
//! 2. prepare: serve the request channel on a thread of its own (under the process's
//!    seccomp policy, with the ioctls the server issues), then attach the device to the
//!    vDPA bus with the driver asked for (or adopt the attachment of a device taken
//!    over) — the kernel waits for the serving thread's answers while the driver probes,
//!    which is why serving starts first;
//! 3. serve: wait until stopped (or until the serving thread ends on its own);
//! 4. on the way out: remove the vDPA device this export attached, while requests are
//!    still served (the driver resets the device on removal), then stop serving, which
//!    destroys the device.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use log::{error, info, warn};
use unidev_core::dispatch::{EventLoop, StopHandle};
use unidev_core::memory::DmaSpace;
use unidev_core::sandbox::{self, SandboxedThread};
use unidev_core::virtio::config::ConfigModelled;
use unidev_core::virtio::VirtioDevice;

use super::control::{check_device_type, VduseError, DEFAULT_CONTROL_PATH};
use super::server::{VduseOptions, VduseServer};
use super::vdpa_netlink::{
    adopt_attachment, attach, device_exists, Attachment, NetlinkVdpa, VdpaBus, VdpaDriver,
    VdpaManager,
};
use crate::export::{ExportError, ExportOptions};
use crate::transport::{
    self, Address, AddressError, AddressKind, Bound, Server, TransportKind, VirtioTransport,
};

/// The transport's name.
pub const NAME: &str = "vduse";

/// A VDUSE device to create: `/dev/vduse/NAME` in the host kernel (a vDPA device in
/// userspace, for the host kernel's virtio drivers or, through `vhost_vdpa`, a VMM). It
/// carries virtio devices of the types the kernel accepts (Linux 6.12: virtio-blk and
/// virtio-net) and needs root and the `vduse` module.
///
/// ```
/// use unidev_transports::vduse::{Vduse, VdpaDriver};
///
/// // A kernel block device /dev/vdX while served.
/// let disk = Vduse::new("disk0").attach(VdpaDriver::VirtioVdpa);
/// assert_eq!(disk.attach, Some(VdpaDriver::VirtioVdpa));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Vduse {
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

impl Vduse {
    /// Device `name` at the kernel's usual paths, not attached.
    pub fn new(name: impl Into<String>) -> Self {
        Vduse {
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

impl VirtioTransport for Vduse {
    fn name(&self) -> &'static str {
        NAME
    }

    fn bind_virtio(
        self: Box<Self>,
        name: &str,
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
        options: &ExportOptions,
    ) -> Result<Bound, ExportError> {
        // The kernel takes the config space at creation: the device model's.
        let device: Arc<dyn VirtioDevice> = Arc::new(
            ConfigModelled::new(device, &options.device_config).map_err(|why| {
                ExportError::Unsupported {
                    name: name.to_string(),
                    why,
                }
            })?,
        );
        let server = create(&self, device, dma)?;
        let shutdown = EventLoop::new().map_err(|source| ExportError::Server {
            name: name.to_string(),
            source,
        })?;
        let export = VduseExport {
            server: Some(server),
            attach: self.attach,
            shutdown,
            running: None,
        };
        Ok(Bound::new(NAME, Box::new(export), None))
    }
}

/// Create VDUSE device `target.name` for `device` — or take over the one of that name a
/// killed daemon left (see [`VduseServer::create`]); a left-over device the kernel marked
/// broken is removed from the vDPA bus first.
fn create(
    target: &Vduse,
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

/// A created VDUSE device as an export's server: not yet served, then served on its own
/// thread.
struct VduseExport {
    /// Until [`prepare`](Server::prepare) moves it to its thread.
    server: Option<VduseServer>,
    attach: Option<VdpaDriver>,
    /// Woken by the stop handle, or by the serving thread when it ends on its own.
    shutdown: EventLoop,
    running: Option<VduseRunning>,
}

/// A VDUSE device being served on its thread.
struct VduseRunning {
    name: String,
    stop: StopHandle,
    thread: Option<SandboxedThread<io::Result<()>>>,
    attachment: Option<Attachment<NetlinkVdpa>>,
}

impl Server for VduseExport {
    fn stop_handle(&self) -> StopHandle {
        self.shutdown.stop_handle()
    }

    /// Serve the device on a new thread, then attach it as asked.
    fn prepare(&mut self) -> Result<(), ExportError> {
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        let name = server.name().to_string();
        let took_over = server.took_over();
        let stop = server.stop_handle();
        let wake = self.shutdown.stop_handle();
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
        match self.attach {
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
        info!("{name}: VDUSE device serving");
        self.running = Some(running);
        Ok(())
    }

    fn serve(mut self: Box<Self>) -> io::Result<()> {
        if self.running.is_none() {
            self.prepare().map_err(io::Error::other)?;
        }
        if let Err(e) = self.shutdown.run() {
            error!("shutdown waiter failed: {e}");
        }
        match self.running.take() {
            Some(mut running) => running.shutdown(),
            None => Ok(()),
        }
    }
}

impl VduseRunning {
    /// Remove the vDPA device this export attached (while requests are still served: the
    /// driver resets the device on removal), then stop serving, which destroys the device.
    fn shutdown(&mut self) -> io::Result<()> {
        if let Some(a) = self.attachment.take() {
            if let Err(e) = a.detach() {
                error!("{e}");
            }
        }
        self.stop.stop();
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let failed =
            |e: io::Error| io::Error::new(e.kind(), format!("VDUSE device {}: {e}", self.name));
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

/// VDUSE in the list of transports ([`crate::transport::TRANSPORTS`]).
#[derive(Debug)]
pub struct VduseKind;

/// The entry of [`crate::transport::TRANSPORTS`].
pub static TRANSPORT: VduseKind = VduseKind;

impl TransportKind for VduseKind {
    fn name(&self) -> &'static str {
        NAME
    }

    fn about(&self) -> &'static str {
        "VDUSE (a Linux vDPA device in userspace): virtio-blk for this kernel \
         (virtio-vdpa) or for a VMM (vhost-vdpa)"
    }

    fn address(&self) -> AddressKind {
        AddressKind::Vduse
    }

    fn carries_pci(&self) -> bool {
        false
    }

    fn check_virtio_type(&self, device_type: u32) -> Result<(), String> {
        check_device_type(device_type).map_err(|e| e.to_string())
    }

    fn virtio(&self, address: Address) -> Result<Box<dyn VirtioTransport>, AddressError> {
        match address {
            Address::Vduse(target) => Ok(Box::new(target)),
            other => Err(transport::wrong_address(self, &other)),
        }
    }
}
