//! vhost-user as a unidev transport ([`crate::transport`]): the [`VhostUser`] address (a
//! socket) carries virtio devices, served by a [`VhostUserServer`].

use std::io;
use std::sync::Arc;

use unidev_core::dispatch::StopHandle;
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::VirtioDevice;

use super::server::VhostUserServer;
use crate::export::{ExportError, ExportOptions};
use crate::transport::{
    self, Address, AddressError, AddressKind, Bound, Server, Socket, TransportKind, VirtioTransport,
};

/// The transport's name.
pub const NAME: &str = "vhost-user";

/// vhost-user on a socket (QEMU's `vhost-user-*` devices): virtio devices.
///
/// ```
/// use unidev_transports::vhost_user::VhostUser;
/// use unidev_transports::transport::VirtioTransport;
///
/// let disk = VhostUser::new(std::path::PathBuf::from("/run/unidev/disk.sock"));
/// assert_eq!(disk.name(), "vhost-user");
/// ```
#[derive(Debug)]
pub struct VhostUser {
    socket: Socket,
}

impl VhostUser {
    /// vhost-user on `socket` (a path, or a listening `UnixListener`).
    pub fn new(socket: impl Into<Socket>) -> Self {
        VhostUser {
            socket: socket.into(),
        }
    }
}

impl VirtioTransport for VhostUser {
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
        if !options.device_config.is_empty() {
            return Err(ExportError::Unsupported {
                name: name.to_string(),
                why: "device config values apply to transports that are the device model \
                      (vfio-user, VDUSE); over vhost-user the VMM keeps the config"
                    .into(),
            });
        }
        let (listener, socket) = self.socket.listen(options)?;
        let server = VhostUserServer::new(name, listener, device, dma)
            .map_err(|source| ExportError::Server {
                name: name.to_string(),
                source,
            })?
            .with_peer_policy(options.peers())
            .single_session(options.single_session);
        Ok(Bound::new(NAME, Box::new(server), socket))
    }
}

impl Server for VhostUserServer {
    fn stop_handle(&self) -> StopHandle {
        VhostUserServer::stop_handle(self)
    }

    fn serve(self: Box<Self>) -> io::Result<()> {
        self.run()
    }
}

/// vhost-user in the list of transports ([`crate::transport::TRANSPORTS`]).
#[derive(Debug)]
pub struct VhostUserKind;

/// The entry of [`crate::transport::TRANSPORTS`].
pub static TRANSPORT: VhostUserKind = VhostUserKind;

impl TransportKind for VhostUserKind {
    fn name(&self) -> &'static str {
        NAME
    }

    fn about(&self) -> &'static str {
        "vhost-user (QEMU's vhost-user-*-pci devices): virtio devices"
    }

    fn address(&self) -> AddressKind {
        AddressKind::Socket
    }

    fn carries_pci(&self) -> bool {
        false
    }

    fn virtio(&self, address: Address) -> Result<Box<dyn VirtioTransport>, AddressError> {
        match address {
            Address::Socket(socket) => Ok(Box::new(VhostUser::new(socket))),
            other => Err(transport::wrong_address(self, &other)),
        }
    }
}
