//! vfio-user as a unidev transport ([`crate::transport`]): the [`VfioUser`] address (a
//! socket) carries full PCI functions as they are and virtio devices as virtio-pci
//! functions, served by a [`VfioUserServer`].

use std::io;
use std::sync::Arc;

use unidev_core::dispatch::StopHandle;
use unidev_core::memory::DmaSpace;
use unidev_core::pci::SharedPciDevice;
use unidev_core::virtio::VirtioDevice;

use super::server::VfioUserServer;
use crate::export::{ExportError, ExportOptions};
use crate::transport::{
    self, Address, AddressError, AddressKind, Bound, PciTransport, Server, Socket, TransportKind,
    VirtioTransport,
};

/// The transport's name.
pub const NAME: &str = "vfio-user";

/// vfio-user on a socket (QEMU's `vfio-user-pci`): PCI devices as they are, virtio
/// devices as virtio-pci functions.
///
/// ```
/// use unidev_transports::vfio_user::VfioUser;
/// use unidev_transports::transport::VirtioTransport;
///
/// let card = VfioUser::new("/run/unidev/card.sock");
/// assert_eq!(card.name(), "vfio-user");
/// ```
#[derive(Debug)]
pub struct VfioUser {
    socket: Socket,
}

impl VfioUser {
    /// vfio-user on `socket` (a path, or a listening `UnixListener`).
    pub fn new(socket: impl Into<Socket>) -> Self {
        VfioUser {
            socket: socket.into(),
        }
    }
}

impl VirtioTransport for VfioUser {
    fn name(&self) -> &'static str {
        NAME
    }

    fn carries_virtio_pci(&self) -> bool {
        true
    }

    fn bind_virtio(
        self: Box<Self>,
        name: &str,
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
        options: &ExportOptions,
    ) -> Result<Bound, ExportError> {
        transport::virtio_over_pci(self, name, device, dma, options)
    }
}

impl PciTransport for VfioUser {
    fn bind_pci(
        self: Box<Self>,
        name: &str,
        device: SharedPciDevice,
        options: &ExportOptions,
    ) -> Result<Bound, ExportError> {
        let (listener, socket) = self.socket.listen(options)?;
        let server = VfioUserServer::new(name, listener, device, options.vfio_user.clone())
            .map_err(|source| ExportError::Server {
                name: name.to_string(),
                source,
            })?
            .with_peer_policy(options.peers())
            .single_session(options.single_session);
        Ok(Bound::new(NAME, Box::new(server), socket))
    }
}

impl Server for VfioUserServer {
    fn stop_handle(&self) -> StopHandle {
        VfioUserServer::stop_handle(self)
    }

    fn serve(self: Box<Self>) -> io::Result<()> {
        self.run()
    }
}

/// vfio-user in the list of transports ([`crate::transport::TRANSPORTS`]).
#[derive(Debug)]
pub struct VfioUserKind;

/// The entry of [`crate::transport::TRANSPORTS`].
pub static TRANSPORT: VfioUserKind = VfioUserKind;

impl VfioUserKind {
    fn address(&self, address: Address) -> Result<VfioUser, AddressError> {
        match address {
            Address::Socket(socket) => Ok(VfioUser::new(socket)),
            other => Err(transport::wrong_address(self, &other)),
        }
    }
}

impl TransportKind for VfioUserKind {
    fn name(&self) -> &'static str {
        NAME
    }

    fn about(&self) -> &'static str {
        "vfio-user (QEMU's vfio-user-pci client): any device, virtio ones as virtio-pci"
    }

    fn address(&self) -> AddressKind {
        AddressKind::Socket
    }

    fn carries_pci(&self) -> bool {
        true
    }

    fn virtio(&self, address: Address) -> Result<Box<dyn VirtioTransport>, AddressError> {
        Ok(Box::new(VfioUserKind::address(self, address)?))
    }

    fn pci(&self, address: Address) -> Option<Result<Box<dyn PciTransport>, AddressError>> {
        Some(VfioUserKind::address(self, address).map(|t| Box::new(t) as Box<dyn PciTransport>))
    }
}
