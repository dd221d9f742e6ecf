//! What a transport is, to the rest of unidev: the serve traits every transport's folder
//! implements, and the one list of transports.
//!
//! A transport is three small things:
//!
//! * an **address type** saying where it serves (a socket for vfio-user and vhost-user,
//!   a kernel device name for VDUSE) that implements [`VirtioTransport`] (it carries
//!   virtio devices: every transport does) and, where the transport carries full PCI
//!   functions, [`PciTransport`] as well. Binding a device to an address checks that
//!   they fit, listens on the socket (or creates the kernel device) and returns a
//!   [`Bound`] device;
//! * a [`Server`]: the bound device's serving loop, with a [`StopHandle`] that ends it
//!   and, where serving has steps that can fail after binding (VDUSE: its serving thread,
//!   attaching to the vDPA bus), a [`Server::prepare`] step;
//! * a [`TransportKind`] entry in [`TRANSPORTS`], which is how a daemon lists transports
//!   by name and builds an address from what its user typed.
//!
//! Device authors see none of this but the address types: `Export::pci(..).serve(addr)`
//! accepts only a [`PciTransport`], so "a PCI device needs a PCI transport" is checked by
//! the compiler; `Export::virtio(..).serve(addr)` accepts any [`VirtioTransport`],
//! including one chosen at run time (`Box<dyn VirtioTransport>`).
//!
//! # Adding a transport
//!
//! A new folder under `transports/src/` with its codec, session and server, an address
//! type implementing [`VirtioTransport`] (and [`PciTransport`] if it carries PCI
//! functions; [`virtio_over_pci`] then carries virtio devices for it), a [`Server`], and
//! a [`TransportKind`] — plus one line in [`TRANSPORTS`]. The `unidev` daemon's
//! `--transport` values, its checks of which device fits which transport, and its devices
//! file all come from that list. An address of a new kind (neither a socket nor a VDUSE
//! device) is one more [`Address`] variant.
//!
//! # Stability
//! The address types, [`VirtioTransport`], [`PciTransport`] and [`Socket`] are part of the
//! stable export API (`docs/api-stability.md`); implementing the traits outside this crate,
//! [`Server`], [`Bound`] and the [`TransportKind`] list are **experimental**.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use unidev_core::dispatch::StopHandle;
use unidev_core::memory::DmaSpace;
use unidev_core::pci::SharedPciDevice;
use unidev_core::virtio::{VirtioDevice, VirtioPci, VirtioPciOptions};

use crate::export::{ExportError, ExportOptions};
use crate::listener;

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

impl Socket {
    /// A description for log lines: the path, or "an inherited listener".
    pub fn describe(&self) -> String {
        match self {
            Socket::Path(p) => p.display().to_string(),
            Socket::Listener(_) => "an inherited listener".to_string(),
        }
    }

    /// Listen: bind a path (with the options' mode and group) or take the listener as
    /// it is. A bound path comes with the guard that removes it again.
    pub(crate) fn listen(
        self,
        options: &ExportOptions,
    ) -> Result<(UnixListener, Option<BoundSocket>), ExportError> {
        Ok(match self {
            Socket::Path(path) => {
                let l = listener::bind_with(&path, options.socket_mode, options.socket_group)?;
                (l, Some(BoundSocket(path)))
            }
            Socket::Listener(l) => (l, None),
        })
    }
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

/// A socket path bound by an export: removed when dropped (when serving ends, or when the
/// export is dropped without serving).
#[derive(Debug)]
pub struct BoundSocket(PathBuf);

impl BoundSocket {
    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A device's serving loop on its transport, once bound. Each transport's server
/// implements it.
pub trait Server: Send {
    /// A handle that ends [`serve`](Server::serve) from any thread; valid before serving
    /// starts too.
    fn stop_handle(&self) -> StopHandle;

    /// Steps between binding and serving that can fail and whose failure the starter of
    /// serving must see (VDUSE: start the serving thread, attach to the vDPA bus). Called
    /// once, before [`serve`](Server::serve), on the thread that starts serving. Default:
    /// nothing to do.
    fn prepare(&mut self) -> Result<(), ExportError> {
        Ok(())
    }

    /// Serve until stopped or failed; on the way out, close the client's session and
    /// release what the transport holds.
    fn serve(self: Box<Self>) -> io::Result<()>;
}

/// A device bound to its transport: listening (or created in the kernel), not yet
/// serving.
pub struct Bound {
    pub(crate) transport: &'static str,
    pub(crate) server: Box<dyn Server>,
    pub(crate) socket: Option<BoundSocket>,
}

impl Bound {
    /// `server` of transport `transport`, with the socket path it bound (removed when
    /// serving ends), if any.
    pub fn new(
        transport: &'static str,
        server: Box<dyn Server>,
        socket: Option<BoundSocket>,
    ) -> Self {
        Bound {
            transport,
            server,
            socket,
        }
    }
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bound")
            .field("transport", &self.transport)
            .field("socket", &self.socket)
            .finish()
    }
}

/// A transport address that carries virtio devices (every transport does).
pub trait VirtioTransport: Send {
    /// The transport's name: "vfio-user", "vhost-user", "vduse".
    fn name(&self) -> &'static str;

    /// Whether virtio devices travel as virtio-pci functions here (then the virtio-pci
    /// options, such as a mappable notify area, apply).
    fn carries_virtio_pci(&self) -> bool {
        false
    }

    /// Bind virtio device `device`, whose guest memory lands in `dma`, under `name`.
    fn bind_virtio(
        self: Box<Self>,
        name: &str,
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
        options: &ExportOptions,
    ) -> Result<Bound, ExportError>;
}

/// A transport address that carries full PCI functions.
pub trait PciTransport: VirtioTransport {
    /// Bind PCI function `device` under `name`.
    fn bind_pci(
        self: Box<Self>,
        name: &str,
        device: SharedPciDevice,
        options: &ExportOptions,
    ) -> Result<Bound, ExportError>;
}

/// [`VirtioTransport::bind_virtio`] for a PCI transport: the device becomes a virtio-pci
/// function ([`VirtioPci`], with the options' mappable notify area) bound as a PCI
/// device.
pub fn virtio_over_pci<T: PciTransport + ?Sized>(
    transport: Box<T>,
    name: &str,
    device: Arc<dyn VirtioDevice>,
    dma: Arc<DmaSpace>,
    options: &ExportOptions,
) -> Result<Bound, ExportError> {
    let pci_options = VirtioPciOptions::default()
        .notify_mmap(options.notify_mmap)
        .config(options.device_config.clone());
    let pci =
        VirtioPci::new(name, device, dma, pci_options).map_err(|source| ExportError::Device {
            name: name.to_string(),
            source,
        })?;
    transport.bind_pci(name, Arc::new(Mutex::new(pci)), options)
}

impl<T: VirtioTransport + ?Sized> VirtioTransport for Box<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }

    fn carries_virtio_pci(&self) -> bool {
        (**self).carries_virtio_pci()
    }

    fn bind_virtio(
        self: Box<Self>,
        name: &str,
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
        options: &ExportOptions,
    ) -> Result<Bound, ExportError> {
        (*self).bind_virtio(name, device, dma, options)
    }
}

impl<T: PciTransport + ?Sized> PciTransport for Box<T> {
    fn bind_pci(
        self: Box<Self>,
        name: &str,
        device: SharedPciDevice,
        options: &ExportOptions,
    ) -> Result<Bound, ExportError> {
        (*self).bind_pci(name, device, options)
    }
}

/// The kinds of address a transport takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddressKind {
    /// A listening socket ([`Socket`]).
    Socket,
    /// A VDUSE device in the host kernel ([`crate::vduse::Vduse`]).
    Vduse,
}

/// An address given to a [`TransportKind`] by name.
#[derive(Debug)]
#[non_exhaustive]
pub enum Address {
    /// A socket.
    Socket(Socket),
    /// A VDUSE device.
    Vduse(crate::vduse::Vduse),
}

impl Address {
    /// Which kind of address this is.
    pub fn kind(&self) -> AddressKind {
        match self {
            Address::Socket(_) => AddressKind::Socket,
            Address::Vduse(_) => AddressKind::Vduse,
        }
    }
}

/// Why a [`TransportKind`] could not make an address into a transport.
#[derive(Debug, thiserror::Error)]
#[error("transport {transport} takes {wanted}, not {given}")]
pub struct AddressError {
    /// The transport.
    pub transport: &'static str,
    /// What it takes.
    pub wanted: &'static str,
    /// What it was given.
    pub given: &'static str,
}

impl AddressKind {
    /// "a socket", "a VDUSE device name".
    pub fn describe(self) -> &'static str {
        match self {
            AddressKind::Socket => "a socket",
            AddressKind::Vduse => "a VDUSE device name",
        }
    }
}

/// A transport as a daemon lists it: by name, with the kind of address it takes, and
/// how to make an address into a transport.
pub trait TransportKind: Sync {
    /// The name (also the `--transport` value): "vfio-user", "vhost-user", "vduse".
    fn name(&self) -> &'static str;
    /// One line for help texts.
    fn about(&self) -> &'static str;
    /// The address it takes.
    fn address(&self) -> AddressKind;
    /// Whether it carries full PCI functions ([`pci`](TransportKind::pci) gives one).
    fn carries_pci(&self) -> bool;
    /// Whether virtio devices travel as virtio-pci functions here.
    fn carries_virtio_pci(&self) -> bool {
        self.carries_pci()
    }
    /// Check that it carries virtio devices of `device_type`; the reason when not.
    fn check_virtio_type(&self, device_type: u32) -> Result<(), String> {
        let _ = device_type;
        Ok(())
    }
    /// The transport at `address`, for a virtio device.
    fn virtio(&self, address: Address) -> Result<Box<dyn VirtioTransport>, AddressError>;
    /// The transport at `address`, for a PCI function; `None` if it carries none.
    fn pci(&self, address: Address) -> Option<Result<Box<dyn PciTransport>, AddressError>> {
        let _ = address;
        None
    }
}

/// The error for an address of the wrong kind.
pub(crate) fn wrong_address(kind: &dyn TransportKind, given: &Address) -> AddressError {
    AddressError {
        transport: kind.name(),
        wanted: kind.address().describe(),
        given: given.kind().describe(),
    }
}

/// Every transport, in the order help texts list them. Adding a transport adds a line.
pub static TRANSPORTS: &[&dyn TransportKind] = &[
    &crate::vfio_user::TRANSPORT,
    &crate::vhost_user::TRANSPORT,
    &crate::vduse::TRANSPORT,
];

/// The transport named `name`.
pub fn transport_named(name: &str) -> Option<&'static dyn TransportKind> {
    TRANSPORTS.iter().copied().find(|t| t.name() == name)
}

/// The transports' names, for messages: "vfio-user, vhost-user or vduse".
pub fn transport_names() -> String {
    let names: Vec<_> = TRANSPORTS.iter().map(|t| t.name()).collect();
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transport_is_listed_once_and_found_by_name() {
        let names: Vec<_> = TRANSPORTS.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["vfio-user", "vhost-user", "vduse"]);
        for t in TRANSPORTS {
            assert_eq!(transport_named(t.name()).map(|k| k.name()), Some(t.name()));
        }
        assert!(transport_named("vfio_user").is_none());
        assert_eq!(transport_names(), "vfio-user, vhost-user or vduse");
    }

    #[test]
    fn only_vfio_user_carries_pci_functions_and_addresses_must_match() {
        let vfio = transport_named("vfio-user").unwrap();
        let vhost = transport_named("vhost-user").unwrap();
        let vduse = transport_named("vduse").unwrap();
        assert!(vfio.carries_pci() && vfio.carries_virtio_pci());
        assert!(!vhost.carries_pci() && !vduse.carries_pci());
        assert!(vhost
            .pci(Address::Socket(Socket::from("/nonexistent.sock")))
            .is_none());
        assert_eq!(vfio.address(), AddressKind::Socket);
        assert_eq!(vduse.address(), AddressKind::Vduse);
        let e = vduse
            .virtio(Address::Socket(Socket::from("/x.sock")))
            .err()
            .expect("a socket is not a VDUSE address");
        assert_eq!(
            e.to_string(),
            "transport vduse takes a VDUSE device name, not a socket"
        );
        let e = vfio
            .virtio(Address::Vduse(crate::vduse::Vduse::new("d0")))
            .err()
            .expect("a VDUSE name is not a socket");
        assert_eq!(
            e.to_string(),
            "transport vfio-user takes a socket, not a VDUSE device name"
        );
    }

    #[test]
    fn vduse_carries_the_virtio_types_the_kernel_accepts_only() {
        let vduse = transport_named("vduse").unwrap();
        assert!(vduse.check_virtio_type(2).is_ok());
        assert!(vduse.check_virtio_type(1).is_ok());
        let why = vduse.check_virtio_type(4).unwrap_err();
        assert!(
            why.contains("accepts only virtio-blk (2) and virtio-net (1)"),
            "{why}"
        );
        assert!(transport_named("vhost-user")
            .unwrap()
            .check_virtio_type(4)
            .is_ok());
    }
}
