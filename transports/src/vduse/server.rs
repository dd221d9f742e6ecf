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
//!
//! A device of the same name may be left over by a daemon that was killed. What the
//! kernel (6.12) does then: closing `/dev/vduse/NAME` (`vduse_dev_release`) only marks the
//! device disconnected; the device stays on the vDPA bus, its driver keeps it, and the
//! driver's requests wait in the rings — nothing in VDUSE or virtio-blk times them out, so
//! I/O on the device blocks until a daemon serves it again. A control message the kernel
//! sends meanwhile (a reset, when a driver unbinds or `/dev/vhost-vdpa-N` is opened) waits
//! `msg_timeout` seconds (`/sys/class/vduse/NAME/msg_timeout`, 30 by default), then
//! fails and marks the device broken for good. So [`VduseServer::create`], finding the
//! name taken:
//! * destroys the old device if the kernel lets it (not attached, not open) and creates
//!   it anew;
//! * if it is attached and not broken, takes it over: opens `/dev/vduse/NAME` again (the
//!   kernel allows one opener), checks that it is the device this daemon would create
//!   (type, queue count, features), and serves it, resuming its queues
//!   ([`Session::adopt`]) — the waiting requests then complete;
//! * if it is broken, fails with [`VduseError::Broken`]: it must be removed from the vDPA
//!   bus first (removal waits for the driver's requests in flight, which only a daemon
//!   could complete — so an attached broken device with I/O in flight cannot be removed).
//!
//! [`Session::adopt`]: super::session::Session::adopt

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use unidev_core::dispatch::{Control, EventLoop, StopHandle};
use unidev_core::memory::DmaSpace;
use unidev_core::sync::lock;
use unidev_core::virtio::VirtioDevice;

use super::control::{
    open_device_node, setup_queues, virtio_type_name, DeviceSpec, VduseControl, VduseError,
    DEFAULT_CONTROL_PATH,
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

/// A kernel device this server is responsible for: destroyed when dropped if `armed`
/// (after everything that holds its node open, which is why it is the server's last
/// field). A left-over device is armed only once it is taken over.
struct CreatedDevice {
    control: VduseControl,
    name: String,
    armed: bool,
}

impl Drop for CreatedDevice {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = self.control.destroy(&self.name) {
                error!("{e}");
            }
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
    /// The device was left over by a dead daemon: take it over before serving.
    takeover: bool,
    // Keep last: destroying the device needs every other reference to its node closed.
    created: Option<CreatedDevice>,
}

/// Whether the device behind `io` is the one `spec` describes, as far as the kernel tells:
/// its queue count (`VDUSE_VQ_GET_INFO` answers for indexes below it only) and the
/// driver's features (a subset of what `spec` offers). The config space cannot be read
/// back; the kernel keeps the one the device was created with.
fn check_same_device(spec: &DeviceSpec, io: &dyn VduseIoctls) -> Result<(), VduseError> {
    let mismatch = |why: String| VduseError::Mismatch {
        name: spec.name.clone(),
        why,
    };
    let last = spec.num_queues.saturating_sub(1);
    if io.vq_info(last).is_err() || io.vq_info(spec.num_queues).is_ok() {
        return Err(mismatch(format!(
            "it does not have {} queue(s)",
            spec.num_queues
        )));
    }
    let features = io
        .driver_features()
        .map_err(|e| VduseError::from_os("VDUSE_DEV_GET_FEATURES", e))?;
    if features & !spec.features != 0 {
        return Err(mismatch(format!(
            "its driver accepted features {features:#x}, not all offered by this {} \
             ({:#x})",
            virtio_type_name(spec.device_type),
            spec.features
        )));
    }
    Ok(())
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
        let mut created = CreatedDevice {
            control: VduseControl::open(&options.control_path)?,
            name: spec.name.clone(),
            armed: false,
        };
        let control = &created.control;
        let mut takeover = false;
        match control.create(&spec) {
            Ok(()) => created.armed = true,
            Err(VduseError::Os { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                // Left over by a daemon killed without cleaning up (see the module docs).
                match control.destroy(&spec.name) {
                    Ok(()) => {
                        warn!(
                            "VDUSE device {} was left over (not attached): destroyed it",
                            spec.name
                        );
                        control.create(&spec)?;
                        created.armed = true;
                    }
                    Err(VduseError::Os { source, .. })
                        if source.raw_os_error() == Some(libc::EBUSY) =>
                    {
                        takeover = true;
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
        let node = match open_device_node(&options.dev_dir, &spec.name) {
            Err(VduseError::Os { source, .. })
                if takeover && source.raw_os_error() == Some(libc::EBUSY) =>
            {
                return Err(VduseError::InUse { name: spec.name });
            }
            other => other?,
        };
        let channel = Arc::new(node);
        let io: Arc<dyn VduseIoctls> = Arc::new(KernelIoctls::new(channel.clone()));
        if takeover {
            // Every ioctl of a broken device fails with EPERM.
            match io.vq_info(0) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                    return Err(VduseError::Broken { name: spec.name });
                }
                _ => check_same_device(&spec, io.as_ref())?,
            }
            warn!(
                "VDUSE device {} is left over from a daemon that died while it was \
                 attached: taking it over",
                spec.name
            );
            created.armed = true;
        } else {
            setup_queues(&channel, &spec)?;
        }
        let mut server = Self::with_channel(spec.name.clone(), device, dma, channel, io)
            .map_err(|e| VduseError::from_os("cannot create the event loop", e))?;
        server.takeover = takeover;
        server.created = Some(created);
        Ok(server)
    }

    /// Serve a channel like [`with_channel`](VduseServer::with_channel), taking the device
    /// over first ([`Session::adopt`](super::session::Session::adopt)): for a device whose
    /// previous daemon died.
    pub fn takeover_channel(
        name: impl Into<String>,
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
        channel: Arc<File>,
        io: Arc<dyn VduseIoctls>,
    ) -> io::Result<Self> {
        let mut server = Self::with_channel(name, device, dma, channel, io)?;
        server.takeover = true;
        Ok(server)
    }

    /// Whether this server took over a device left by a daemon that died (it is attached
    /// to the vDPA bus already).
    pub fn took_over(&self) -> bool {
        self.takeover
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
            takeover: false,
            created: None,
        })
    }

    /// The ioctl requests [`run`](VduseServer::run) issues (on the device node and, to
    /// destroy the device at the end, on the control device): the allow-list of a
    /// seccomp-filtered serving thread (`unidev_core::sandbox::Role::KernelTransport`).
    pub fn run_ioctls() -> Vec<u32> {
        use super::uapi::{
            VDUSE_DESTROY_DEV, VDUSE_DEV_GET_FEATURES, VDUSE_IOTLB_GET_FD, VDUSE_VQ_GET_INFO,
            VDUSE_VQ_INJECT_IRQ, VDUSE_VQ_SETUP_KICKFD,
        };
        [
            VDUSE_IOTLB_GET_FD(),
            VDUSE_DEV_GET_FEATURES(),
            VDUSE_VQ_GET_INFO(),
            VDUSE_VQ_SETUP_KICKFD(),
            VDUSE_VQ_INJECT_IRQ(),
            VDUSE_DESTROY_DEV(),
        ]
        .into_iter()
        // Request numbers are 32 bits (`_IOC`); the kernel compares only those.
        .map(|nr| nr as u32)
        .collect()
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
        let channel_fd = self.channel.as_raw_fd();
        let serve = self.channel_handler();
        if self.takeover {
            // The takeover needs a loop context (for relays) and must come before any
            // message the kernel re-queued for this reader: it is the loop's first event,
            // and it starts watching the channel.
            let first = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?;
            first.write(1)?;
            let session = self.session.clone();
            let failure = self.failure.clone();
            let name = self.name.clone();
            let mut serve = Some(serve);
            self.event_loop
                .add(first.as_raw_fd(), epoll::Events::EPOLLIN, move |ctx, _| {
                    let _ = first.read();
                    let adopted = lock(&session).adopt(ctx);
                    if let Err(e) = adopted {
                        error!("{name}: cannot take the device over: {e}");
                        *lock(&failure) = Some(format!("cannot take the device over: {e}"));
                        return Control::Exit;
                    }
                    if let Some(serve) = serve.take() {
                        ctx.add(channel_fd, epoll::Events::EPOLLIN, serve);
                    }
                    Control::Remove
                })?;
        } else {
            self.event_loop
                .add(channel_fd, epoll::Events::EPOLLIN, serve)?;
        }
        // A backend failure (a panic) stops the device's queues.
        if let Some(health) = lock(&self.session).device().health() {
            let session = self.session.clone();
            let name = self.name.clone();
            self.event_loop
                .add(health.event_fd(), epoll::Events::EPOLLIN, move |ctx, _| {
                    health.acknowledge();
                    warn!("{name}: the device failed; its queues stop until the driver resets it");
                    lock(&session).device_failed(ctx);
                    Control::Continue
                })?;
        }
        info!("{}: serving VDUSE requests", self.name);
        let result = self.event_loop.run();
        self.shutdown();
        let failure = lock(&self.failure).take();
        result?;
        match failure {
            Some(why) => Err(io::Error::other(why)),
            None => Ok(()),
        }
    }

    /// The request channel's handler: read a request, answer it through the session.
    fn channel_handler(
        &self,
    ) -> impl FnMut(&mut unidev_core::dispatch::LoopContext, epoll::Events) -> Control + Send + 'static
    {
        let session = self.session.clone();
        let channel = self.channel.clone();
        let failure = self.failure.clone();
        let name = self.name.clone();
        move |ctx, events| {
            if events.contains(epoll::Events::EPOLLERR) {
                let why = "the kernel marked the device broken (an answer came too late?)";
                error!("{name}: {why}");
                *lock(&failure) = Some(why.into());
                return Control::Exit;
            }
            let req = match read_request(&channel) {
                Ok(Some(req)) => req,
                Ok(None) => return Control::Continue,
                Err(e) => {
                    error!("{name}: request channel failed: {e}");
                    *lock(&failure) = Some(e.to_string());
                    return Control::Exit;
                }
            };
            let resp = lock(&session).handle(&req, ctx);
            if let Err(e) = write_response(&channel, &resp) {
                warn!("{name}: cannot answer request {}: {e}", req.request_id);
            }
            Control::Continue
        }
    }

    fn shutdown(&mut self) {
        lock(&self.session).close();
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
        let session = lock(&self.session);
        if session.status() != 0 {
            drop(session);
            self.shutdown();
        }
    }
}
