//! The VDUSE server for one device: creates the device in the kernel, serves its request
//! channel on the core's dispatch [`EventLoop`], and destroys it when done.
//!
//! Life cycle (kernel `Documentation/userspace-api/vduse.rst`):
//! 1. `/dev/vduse/control`: API version 0, `VDUSE_CREATE_DEV` with the device's id,
//!    features, queue count and config space ([`VduseServer::create`]).
//! 2. `/dev/vduse/NAME`: `VDUSE_VQ_SETUP` for each queue, then requests are served on the
//!    loop ([`VduseServer::run`]). The device is only visible to a driver once it is
//!    attached to the vDPA bus (`vdpa dev add`, or [`super::vdpa_netlink`]) — which must
//!    happen from another thread while `run` serves, since the kernel waits for this
//!    loop's answers while the driver probes.
//! 3. On stop: the session resets the device and unmaps all memory, `/dev/vduse/NAME` is
//!    closed, and `VDUSE_DESTROY_DEV` removes the device. The kernel refuses that while
//!    the device is still attached to the vDPA bus, so detach first.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use unidev_core::dispatch::{Control, EventLoop, StopHandle};
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::VirtioDevice;

use super::control::{
    open_device_node, setup_queues, DeviceSpec, VduseControl, VduseError, DEFAULT_CONTROL_PATH,
};
use super::session::{read_request, write_response, KernelIoctls, Session, VduseIoctls};

/// Where a VDUSE device is created.
#[derive(Debug, Clone)]
pub struct VduseOptions {
    /// Device name: `/dev/vduse/NAME` and the vDPA device's name.
    pub name: String,
    /// The control device (tests point it elsewhere).
    pub control_path: PathBuf,
    /// The directory device nodes appear in.
    pub dev_dir: PathBuf,
}

impl VduseOptions {
    /// Options for device `name` at the kernel's usual paths.
    pub fn new(name: impl Into<String>) -> Self {
        VduseOptions {
            name: name.into(),
            control_path: PathBuf::from(DEFAULT_CONTROL_PATH),
            dev_dir: PathBuf::from("/dev/vduse"),
        }
    }
}

/// A created kernel device: destroyed when dropped (after everything that holds its node
/// open, which is why it is the server's last field).
struct CreatedDevice {
    control: VduseControl,
    name: String,
}

impl Drop for CreatedDevice {
    fn drop(&mut self) {
        if let Err(e) = self.control.destroy(&self.name) {
            error!("{e}");
        }
    }
}

/// Serves one core virtio device as a VDUSE device.
pub struct VduseServer {
    name: String,
    event_loop: EventLoop,
    session: Arc<Mutex<Session>>,
    channel: Arc<File>,
    failure: Arc<Mutex<Option<String>>>,
    // Keep last: destroying the device needs every other reference to its node closed.
    created: Option<CreatedDevice>,
}

impl VduseServer {
    /// Create VDUSE device `options.name` for `device` (whose memory is `dma`): check that
    /// VDUSE takes its type, create it, set up its queues and open its node.
    pub fn create(
        options: &VduseOptions,
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
    ) -> Result<Self, VduseError> {
        let spec = DeviceSpec::for_device(&options.name, device.as_ref())?;
        let control = VduseControl::open(&options.control_path)?;
        match control.create(&spec) {
            Ok(()) => {}
            Err(VduseError::Os { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                // A daemon killed without cleaning up leaves its device behind; a device
                // in use (attached, or open by a running daemon) refuses destruction.
                warn!(
                    "VDUSE device {} already exists; destroying the stale one",
                    spec.name
                );
                control.destroy(&spec.name)?;
                control.create(&spec)?;
            }
            Err(e) => return Err(e),
        }
        let created = CreatedDevice {
            control,
            name: spec.name.clone(),
        };
        let node = open_device_node(&options.dev_dir, &spec.name)?;
        setup_queues(&node, &spec)?;
        let channel = Arc::new(node);
        let io: Arc<dyn VduseIoctls> = Arc::new(KernelIoctls::new(channel.clone()));
        let mut server = Self::with_channel(spec.name.clone(), device, dma, channel, io)
            .map_err(|e| VduseError::from_os("cannot create the event loop", e))?;
        server.created = Some(created);
        Ok(server)
    }

    /// Serve an existing request channel with the given ioctls (tests use a socket and a
    /// fake; [`create`](VduseServer::create) uses `/dev/vduse/NAME` for both). The
    /// channel must be non-blocking.
    pub fn with_channel(
        name: impl Into<String>,
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
        channel: Arc<File>,
        io: Arc<dyn VduseIoctls>,
    ) -> io::Result<Self> {
        let name = name.into();
        Ok(VduseServer {
            session: Arc::new(Mutex::new(Session::new(name.clone(), device, dma, io))),
            name,
            event_loop: EventLoop::new()?,
            channel,
            failure: Arc::new(Mutex::new(None)),
            created: None,
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The session (for diagnostics and tests).
    pub fn session(&self) -> Arc<Mutex<Session>> {
        self.session.clone()
    }

    /// A handle that ends [`run`](VduseServer::run) from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.event_loop.stop_handle()
    }

    /// Serve requests until stopped, then reset the device, close its node and destroy it.
    /// Fails when the channel fails (the kernel marks a device broken when an answer takes
    /// longer than its `msg_timeout`) or the device cannot be destroyed.
    pub fn run(mut self) -> io::Result<()> {
        let session = self.session.clone();
        let channel = self.channel.clone();
        let failure = self.failure.clone();
        let name = self.name.clone();
        self.event_loop.add(
            self.channel.as_raw_fd(),
            epoll::Events::EPOLLIN,
            move |ctx, events| {
                if events.contains(epoll::Events::EPOLLERR) {
                    let why = "the kernel marked the device broken (an answer came too late?)";
                    error!("{name}: {why}");
                    *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.into());
                    return Control::Exit;
                }
                let req = match read_request(&channel) {
                    Ok(Some(req)) => req,
                    Ok(None) => return Control::Continue,
                    Err(e) => {
                        error!("{name}: request channel failed: {e}");
                        *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                        return Control::Exit;
                    }
                };
                let resp = session
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .handle(&req, ctx);
                if let Err(e) = write_response(&channel, &resp) {
                    warn!("{name}: cannot answer request {}: {e}", req.request_id);
                }
                Control::Continue
            },
        )?;
        info!("{}: serving VDUSE requests", self.name);
        let result = self.event_loop.run();
        self.shutdown();
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        result?;
        match failure {
            Some(why) => Err(io::Error::other(why)),
            None => Ok(()),
        }
    }

    fn shutdown(&mut self) {
        self.session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .close();
        info!("{}: stopped", self.name);
    }
}

impl Drop for VduseServer {
    fn drop(&mut self) {
        // Relays (holding the node through the ioctl object) go with the loop's handlers;
        // replace the loop so they are dropped before the device is destroyed.
        if let Ok(fresh) = EventLoop::new() {
            drop(std::mem::replace(&mut self.event_loop, fresh));
        }
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner());
        if session.status() != 0 {
            drop(session);
            self.shutdown();
        }
    }
}
