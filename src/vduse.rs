//! VDUSE devices in the daemon — `serve --transport vduse` and `transport = "vduse"` in a
//! devices file: create the kernel device (or take over the one a killed daemon left),
//! serve it on its own thread, attach it to the vDPA bus, and on shutdown remove it from
//! the bus before the device is destroyed.
//!
//! The transport itself is `unidev_transports::vduse` (kernel
//! `Documentation/userspace-api/vduse.rst`, `include/uapi/linux/vduse.h`, and the vDPA
//! generic netlink family of `include/uapi/linux/vdpa.h`); this module only orders its
//! steps. The serving thread starts under the process's seccomp policy
//! (`unidev_core::sandbox`, role `KernelTransport` with the server's ioctls). Left-over
//! devices (see `unidev_transports::vduse::server`):
//! * attached and not broken: taken over — the vDPA device the dead daemon added is kept
//!   if it is bound to the requested driver, and removed on shutdown like one added here;
//! * broken (the kernel gave up waiting for an answer): removed from the vDPA bus
//!   (`vdpa dev del`), then created anew. The removal waits for the driver's requests in
//!   flight; none can complete on a broken device, so it blocks while any is.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use log::{error, info, warn};
use unidev_core::dispatch::StopHandle;
use unidev_core::memory::DmaSpace;
use unidev_core::sandbox::{self, SandboxedThread};
use unidev_core::virtio::VirtioDevice;
use unidev_transports::vduse::{
    adopt_attachment, attach, device_exists, Attachment, NetlinkVdpa, VdpaBus, VdpaDriver,
    VdpaManager, VduseError, VduseOptions, VduseServer,
};

/// Where and how one VDUSE device is created.
#[derive(Debug, Clone)]
pub struct VduseSettings {
    /// `/dev/vduse/NAME`, and the vDPA device's name.
    pub name: String,
    /// The vDPA bus driver to attach it to (None: leave attaching to the user).
    pub attach: Option<VdpaDriver>,
    /// The control device.
    pub control: PathBuf,
}

/// A VDUSE device being served.
pub struct RunningVduse {
    name: String,
    stop: StopHandle,
    thread: SandboxedThread<io::Result<()>>,
    attachment: Option<Attachment<NetlinkVdpa>>,
}

/// Create `device` (whose memory is `dma`) as VDUSE device `settings.name` — or take over
/// the one of that name a killed daemon left — serve it on a new thread, and attach it as
/// asked. `on_exit` runs on that thread when serving ends (also when it ends on its own).
pub fn start(
    settings: &VduseSettings,
    device: Arc<dyn VirtioDevice>,
    dma: Arc<DmaSpace>,
    on_exit: impl FnOnce() + Send + 'static,
) -> Result<RunningVduse, String> {
    let name = settings.name.clone();
    let mut options = VduseOptions::new(&name);
    options.control_path = settings.control.clone();
    let server = match VduseServer::create(&options, device.clone(), dma.clone()) {
        Err(VduseError::Broken { .. }) => {
            warn!(
                "VDUSE device {name} is left over and broken: removing it from the vDPA bus \
                 (this waits for I/O in flight on it, which cannot complete)"
            );
            NetlinkVdpa::open()
                .and_then(|mut nl| nl.dev_del(&name))
                .map_err(|e| format!("cannot remove the broken VDUSE device {name}: {e}"))?;
            VduseServer::create(&options, device, dma)
        }
        other => other,
    }
    .map_err(|e| e.to_string())?;
    let took_over = server.took_over();
    let stop = server.stop_handle();
    // The thread answers the kernel's requests (IOTLB updates, queue set-up driven by
    // the guest's driver): it starts under the process's seccomp policy, with the ioctls
    // it issues; if the filter cannot be installed, the device does not start.
    let role = sandbox::Role::KernelTransport {
        ioctls: VduseServer::run_ioctls(),
    };
    let thread = sandbox::spawn(format!("vduse-{name}"), role, move || {
        let result = server.run();
        on_exit();
        result
    })
    .map_err(|e| format!("cannot start the VDUSE thread: {e}"))?;
    let mut running = RunningVduse {
        name: name.clone(),
        stop,
        thread,
        attachment: None,
    };
    let bus = VdpaBus::default();
    match settings.attach {
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
                Err(e) => {
                    let _ = running.shutdown();
                    return Err(format!("cannot attach VDUSE device {name}: {e}"));
                }
            }
        }
    }
    Ok(running)
}

impl RunningVduse {
    /// Remove the vDPA device this daemon attached (while requests are still served: the
    /// driver resets the device on removal), then stop serving, which destroys the device.
    pub fn shutdown(mut self) -> Result<(), String> {
        if let Some(a) = self.attachment.take() {
            if let Err(e) = a.detach() {
                error!("{e}");
            }
        }
        self.stop.stop();
        let name = self.name;
        match self.thread.join() {
            Ok(r) => r.map_err(|e| format!("VDUSE device {name}: {e}")),
            Err(_) => Err(format!("VDUSE device {name}: the server thread panicked")),
        }
    }
}
