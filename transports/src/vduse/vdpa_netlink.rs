//! Attaching a VDUSE device to the vDPA bus: what `vdpa dev add name NAME mgmtdev vduse`
//! and `vdpa dev del NAME` (iproute2) do, over the kernel's generic netlink "vdpa" family
//! (`include/uapi/linux/vdpa.h`, `drivers/vdpa/vdpa.c`), plus the sysfs steps that decide
//! which vDPA bus driver takes the device.
//!
//! Netlink is hand-written here over a raw `AF_NETLINK` socket (`NETLINK_GENERIC`): one
//! request at a time, answered by an ack or an error (`linux/netlink.h`,
//! `linux/genetlink.h`). The family id is resolved by name with `CTRL_CMD_GETFAMILY`.
//!
//! Driver choice. The vDPA bus matches every device with every driver
//! (`vdpa_dev_match`) unless the device's `driver_override` sysfs attribute names one,
//! and a device added while drivers are loaded is probed at once by the first driver
//! that takes it (`virtio_vdpa`: the device becomes a virtio device of this kernel;
//! `vhost_vdpa`: it becomes `/dev/vhost-vdpa-N` for a VMM). `driver_override` can only
//! be written once the device exists, so to make `--attach X` deterministic:
//! 1. if another vDPA driver is loaded, the bus's `drivers_autoprobe` is set to 0 for the
//!    moment of the add (and restored after), so nothing probes the new device;
//! 2. the device is added (`VDPA_CMD_DEV_NEW`), its `driver_override` set to X;
//! 3. it is bound with `drivers/X/bind` (or, if something bound it anyway, unbound from
//!    that driver first);
//! 4. the `driver` link is checked to point at X; otherwise the device is removed again
//!    and the attach fails.
//!
//! The kernel's `VDPA_CMD_DEV_NEW` probes synchronously: the VDUSE device's request
//! channel must be served (on another thread) while [`attach`] runs.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use log::{debug, info, warn};

/// `NETLINK_GENERIC`.
const NETLINK_GENERIC: i32 = 16;
/// Generic netlink controller family id (`GENL_ID_CTRL`).
pub const GENL_ID_CTRL: u16 = 0x10;
/// `CTRL_CMD_GETFAMILY`.
pub const CTRL_CMD_GETFAMILY: u8 = 3;
/// `CTRL_ATTR_FAMILY_ID` (u16).
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
/// `CTRL_ATTR_FAMILY_NAME` (string).
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// `NLMSG_ERROR`: an error or (error 0) an ack.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`.
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 0x1;
/// `NLM_F_ACK`.
pub const NLM_F_ACK: u16 = 0x4;

/// The vDPA family's name (`VDPA_GENL_NAME`).
pub const VDPA_GENL_NAME: &str = "vdpa";
/// `VDPA_GENL_VERSION`.
pub const VDPA_GENL_VERSION: u8 = 1;
/// `VDPA_CMD_DEV_NEW`.
pub const VDPA_CMD_DEV_NEW: u8 = 3;
/// `VDPA_CMD_DEV_DEL`.
pub const VDPA_CMD_DEV_DEL: u8 = 4;
/// `VDPA_ATTR_MGMTDEV_DEV_NAME` (string).
pub const VDPA_ATTR_MGMTDEV_DEV_NAME: u16 = 2;
/// `VDPA_ATTR_DEV_NAME` (string).
pub const VDPA_ATTR_DEV_NAME: u16 = 4;

/// The management device VDUSE registers.
pub const VDUSE_MGMTDEV: &str = "vduse";

const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;
const NLA_HDRLEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// One generic netlink request under construction.
#[derive(Debug, Clone)]
pub struct GenlMessage {
    buf: Vec<u8>,
}

impl GenlMessage {
    /// A request for family `family`, command `cmd`, version `version`, with `flags`
    /// (`NLM_F_REQUEST` is always set) and sequence number `seq`.
    pub fn new(family: u16, cmd: u8, version: u8, flags: u16, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, set by finish()
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel fills it
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        GenlMessage { buf }
    }

    /// Append attribute `kind` with `payload` (padded to 4 bytes).
    pub fn attr(mut self, kind: u16, payload: &[u8]) -> Self {
        let len = NLA_HDRLEN + payload.len();
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// Append a NUL-terminated string attribute (`nla_put_string`).
    pub fn attr_str(self, kind: u16, s: &str) -> Self {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v)
    }

    /// The finished message bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// `CTRL_CMD_GETFAMILY` for `name`.
pub fn get_family_request(name: &str, seq: u32) -> Vec<u8> {
    GenlMessage::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 2, NLM_F_ACK, seq)
        .attr_str(CTRL_ATTR_FAMILY_NAME, name)
        .finish()
}

/// `VDPA_CMD_DEV_NEW name NAME mgmtdev vduse`.
pub fn dev_new_request(family: u16, name: &str, seq: u32) -> Vec<u8> {
    GenlMessage::new(family, VDPA_CMD_DEV_NEW, VDPA_GENL_VERSION, NLM_F_ACK, seq)
        .attr_str(VDPA_ATTR_MGMTDEV_DEV_NAME, VDUSE_MGMTDEV)
        .attr_str(VDPA_ATTR_DEV_NAME, name)
        .finish()
}

/// `VDPA_CMD_DEV_DEL NAME`.
pub fn dev_del_request(family: u16, name: &str, seq: u32) -> Vec<u8> {
    GenlMessage::new(family, VDPA_CMD_DEV_DEL, VDPA_GENL_VERSION, NLM_F_ACK, seq)
        .attr_str(VDPA_ATTR_DEV_NAME, name)
        .finish()
}

/// One message of a netlink reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `NLMSG_ERROR` with error 0.
    Ack,
    /// `NLMSG_ERROR` with a negative errno (given here as the positive errno).
    Error(i32),
    /// Any other message: its type and the generic netlink attributes after the genl
    /// header.
    Data {
        /// `nlmsg_type`.
        msg_type: u16,
        /// `(type, payload)` pairs.
        attrs: Vec<(u16, Vec<u8>)>,
    },
    /// `NLMSG_DONE`.
    Done,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parse netlink attributes.
pub fn parse_attrs(mut b: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= NLA_HDRLEN {
        let (Some(len), Some(kind)) = (u16_at(b, 0), u16_at(b, 2)) else {
            break;
        };
        let len = len as usize;
        if len < NLA_HDRLEN || len > b.len() {
            break;
        }
        // NLA_F_NESTED and NLA_F_NET_BYTEORDER are the top two bits.
        out.push((kind & 0x3fff, b[NLA_HDRLEN..len].to_vec()));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

/// Parse every message of one datagram of a reply.
pub fn parse_reply(mut b: &[u8]) -> io::Result<Vec<Reply>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {why}"));
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let len = u32_at(b, 0).ok_or_else(|| bad("short header"))? as usize;
        let msg_type = u16_at(b, 4).ok_or_else(|| bad("short header"))?;
        if len < NLMSG_HDRLEN || len > b.len() {
            return Err(bad("message length out of bounds"));
        }
        let body = &b[NLMSG_HDRLEN..len];
        out.push(match msg_type {
            NLMSG_ERROR => {
                let err = u32_at(body, 0).ok_or_else(|| bad("short error message"))? as i32;
                if err == 0 {
                    Reply::Ack
                } else {
                    Reply::Error(-err)
                }
            }
            NLMSG_DONE => Reply::Done,
            _ => Reply::Data {
                msg_type,
                attrs: parse_attrs(body.get(GENL_HDRLEN..).unwrap_or(&[])),
            },
        });
        b = &b[align4(len).min(b.len())..];
    }
    Ok(out)
}

/// A generic netlink socket.
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    /// Open and bind a `NETLINK_GENERIC` socket.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value (pid 0: the kernel
        // assigns one).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `addr` is a valid sockaddr_nl of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: 60,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(GenlSocket { fd, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Send `msg` and collect the reply messages up to the ack or error.
    fn transact(&mut self, msg: &[u8]) -> io::Result<Vec<Reply>> {
        // SAFETY: `msg` is a valid buffer of the length passed.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 16384];
        loop {
            // SAFETY: `buf` is a valid writable buffer of the length passed.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let got = parse_reply(&buf[..n as usize])?;
            let done = got
                .iter()
                .any(|r| matches!(r, Reply::Ack | Reply::Error(_) | Reply::Done));
            replies.extend(got);
            if done {
                return Ok(replies);
            }
        }
    }

    fn command(&mut self, msg: Vec<u8>) -> io::Result<Vec<Reply>> {
        let replies = self.transact(&msg)?;
        for r in &replies {
            if let Reply::Error(errno) = r {
                return Err(io::Error::from_raw_os_error(*errno));
            }
        }
        Ok(replies)
    }

    /// The id of generic netlink family `name` (`ENOENT` if it is not registered).
    pub fn family_id(&mut self, name: &str) -> io::Result<u16> {
        let seq = self.next_seq();
        let replies = self.command(get_family_request(name, seq))?;
        family_id_of(&replies).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "CTRL_CMD_GETFAMILY reply has no family id",
            )
        })
    }
}

/// The family id in a `CTRL_CMD_GETFAMILY` reply.
pub fn family_id_of(replies: &[Reply]) -> Option<u16> {
    replies.iter().find_map(|r| match r {
        Reply::Data { attrs, .. } => attrs
            .iter()
            .find(|(k, _)| *k == CTRL_ATTR_FAMILY_ID)
            .and_then(|(_, v)| u16_at(v, 0)),
        _ => None,
    })
}

/// What went wrong attaching or detaching.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VdpaError {
    /// The "vdpa" netlink family is missing: the vdpa module is not loaded.
    #[error("the kernel has no vDPA netlink interface: `modprobe vdpa` (and vduse)")]
    NoVdpa,
    /// The requested bus driver is not loaded.
    #[error("vDPA bus driver {0} is not loaded: `modprobe {0}`")]
    DriverMissing(&'static str),
    /// A netlink command failed.
    #[error("{what}: {source}{hint}")]
    Netlink {
        /// The command.
        what: String,
        /// The kernel's errno.
        source: io::Error,
        /// What it probably means.
        hint: &'static str,
    },
    /// A sysfs step failed.
    #[error("{what}: {source}")]
    Sysfs {
        /// The step.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The device ended up bound to another driver (or none).
    #[error("vDPA device {name} is bound to {bound:?}, not {wanted}")]
    WrongDriver {
        /// The device.
        name: String,
        /// The driver it should have.
        wanted: &'static str,
        /// What it has.
        bound: Option<String>,
    },
}

/// The two vDPA bus drivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VdpaDriver {
    /// `virtio_vdpa`: the device becomes a virtio device of this kernel.
    VirtioVdpa,
    /// `vhost_vdpa`: the device becomes `/dev/vhost-vdpa-N` for a VMM.
    VhostVdpa,
}

impl VdpaDriver {
    /// The driver's (and module's) name.
    pub fn name(self) -> &'static str {
        match self {
            VdpaDriver::VirtioVdpa => "virtio_vdpa",
            VdpaDriver::VhostVdpa => "vhost_vdpa",
        }
    }
}

/// Adds and removes vDPA devices (netlink in production, a fake in tests).
pub trait VdpaManager {
    /// `vdpa dev add name NAME mgmtdev vduse`.
    fn dev_new(&mut self, name: &str) -> Result<(), VdpaError>;
    /// `vdpa dev del NAME`.
    fn dev_del(&mut self, name: &str) -> Result<(), VdpaError>;
}

/// The kernel's vDPA netlink interface.
pub struct NetlinkVdpa {
    socket: GenlSocket,
    family: u16,
}

impl NetlinkVdpa {
    /// Open a socket and resolve the "vdpa" family.
    pub fn open() -> Result<Self, VdpaError> {
        let mut socket = GenlSocket::open().map_err(|source| VdpaError::Netlink {
            what: "cannot open a generic netlink socket".into(),
            source,
            hint: "",
        })?;
        let family = match socket.family_id(VDPA_GENL_NAME) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Err(VdpaError::NoVdpa),
            Err(source) => {
                return Err(VdpaError::Netlink {
                    what: "CTRL_CMD_GETFAMILY vdpa".into(),
                    source,
                    hint: "",
                })
            }
        };
        debug!("vdpa netlink family id {family}");
        Ok(NetlinkVdpa { socket, family })
    }
}

fn netlink_hint(errno: Option<i32>, adding: bool) -> &'static str {
    match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => " (vDPA management needs CAP_NET_ADMIN)",
        Some(libc::ENODEV) if adding => " (no management device \"vduse\": `modprobe vduse`)",
        Some(libc::EINVAL) if adding => {
            " (no VDUSE device of that name, or its queues are not set up)"
        }
        Some(libc::EEXIST) => " (a vDPA device of that name already exists)",
        Some(libc::ENODEV) => " (no vDPA device of that name)",
        _ => "",
    }
}

impl VdpaManager for NetlinkVdpa {
    fn dev_new(&mut self, name: &str) -> Result<(), VdpaError> {
        let seq = self.socket.next_seq();
        self.socket
            .command(dev_new_request(self.family, name, seq))
            .map(|_| ())
            .map_err(|source| VdpaError::Netlink {
                what: format!("vdpa dev add name {name} mgmtdev vduse"),
                hint: netlink_hint(source.raw_os_error(), true),
                source,
            })
    }

    fn dev_del(&mut self, name: &str) -> Result<(), VdpaError> {
        let seq = self.socket.next_seq();
        self.socket
            .command(dev_del_request(self.family, name, seq))
            .map(|_| ())
            .map_err(|source| VdpaError::Netlink {
                what: format!("vdpa dev del {name}"),
                hint: netlink_hint(source.raw_os_error(), false),
                source,
            })
    }
}

/// The vDPA bus in sysfs (`/sys/bus/vdpa`).
#[derive(Debug, Clone)]
pub struct VdpaBus {
    root: PathBuf,
}

impl Default for VdpaBus {
    fn default() -> Self {
        VdpaBus {
            root: PathBuf::from("/sys/bus/vdpa"),
        }
    }
}

impl VdpaBus {
    /// The bus at `root` (tests use a fake tree).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        VdpaBus { root: root.into() }
    }

    fn driver_dir(&self, driver: &str) -> PathBuf {
        self.root.join("drivers").join(driver)
    }

    fn device_dir(&self, name: &str) -> PathBuf {
        self.root.join("devices").join(name)
    }

    /// Names of the loaded vDPA bus drivers.
    pub fn drivers(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join("drivers"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The driver device `name` is bound to.
    pub fn bound_driver(&self, name: &str) -> Option<String> {
        let link = fs::read_link(self.device_dir(name).join("driver")).ok()?;
        link.file_name()?.to_str().map(str::to_string)
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), VdpaError> {
        fs::write(path, value).map_err(|source| VdpaError::Sysfs {
            what: format!("cannot write {value:?} to {}", path.display()),
            source,
        })
    }
}

/// Restores `drivers_autoprobe` when dropped.
struct AutoprobeOff<'a> {
    bus: &'a VdpaBus,
    previous: String,
}

impl Drop for AutoprobeOff<'_> {
    fn drop(&mut self) {
        let path = self.bus.root.join("drivers_autoprobe");
        if let Err(e) = fs::write(&path, &self.previous) {
            warn!("cannot restore {}: {e}", path.display());
        }
    }
}

/// A vDPA device this process added; [`detach`](Attachment::detach) removes it.
pub struct Attachment<M: VdpaManager> {
    manager: M,
    name: String,
    attached: bool,
}

impl<M: VdpaManager> Attachment<M> {
    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Remove the vDPA device (the bound driver is removed first, which resets the
    /// device: its VDUSE server must still be serving).
    pub fn detach(mut self) -> Result<(), VdpaError> {
        self.attached = false;
        self.manager.dev_del(&self.name)?;
        info!("vDPA device {} removed", self.name);
        Ok(())
    }
}

impl<M: VdpaManager> Drop for Attachment<M> {
    fn drop(&mut self) {
        if self.attached {
            if let Err(e) = self.manager.dev_del(&self.name) {
                warn!("{e}");
            }
        }
    }
}

/// Take charge of vDPA device `name`, which is on the bus already (a daemon that died
/// added it, and this one took the VDUSE device over): check that `driver` has it, and
/// remove it on [`detach`](Attachment::detach) like one this process added.
pub fn adopt_attachment<M: VdpaManager>(
    manager: M,
    bus: &VdpaBus,
    name: &str,
    driver: VdpaDriver,
) -> Result<Attachment<M>, VdpaError> {
    let wanted = driver.name();
    match bus.bound_driver(name) {
        Some(d) if d == wanted => {
            info!("vDPA device {name} (left by a daemon that died) is bound to {wanted}: kept");
            Ok(Attachment {
                manager,
                name: name.to_string(),
                attached: true,
            })
        }
        bound => Err(VdpaError::WrongDriver {
            name: name.to_string(),
            wanted,
            bound,
        }),
    }
}

/// Whether vDPA device `name` exists.
pub fn device_exists(bus: &VdpaBus, name: &str) -> bool {
    bus.device_dir(name).exists()
}

/// Add VDUSE device `name` to the vDPA bus and make sure `driver` binds it (see the module
/// documentation for the steps and why).
pub fn attach<M: VdpaManager>(
    mut manager: M,
    bus: &VdpaBus,
    name: &str,
    driver: VdpaDriver,
) -> Result<Attachment<M>, VdpaError> {
    let wanted = driver.name();
    if !bus.driver_dir(wanted).is_dir() {
        return Err(VdpaError::DriverMissing(wanted));
    }
    let others: Vec<String> = bus.drivers().into_iter().filter(|d| d != wanted).collect();
    let autoprobe_guard = if others.is_empty() {
        None
    } else {
        let path = bus.root.join("drivers_autoprobe");
        let previous = fs::read_to_string(&path).map_err(|source| VdpaError::Sysfs {
            what: format!("cannot read {}", path.display()),
            source,
        })?;
        bus.write(&path, "0")?;
        debug!("vDPA autoprobe off while adding {name} (other drivers: {others:?})");
        Some(AutoprobeOff {
            bus,
            previous: previous.trim().to_string(),
        })
    };
    manager.dev_new(name)?;
    let mut attachment = Attachment {
        manager,
        name: name.to_string(),
        attached: true,
    };
    drop(autoprobe_guard);
    // From here on, a failure removes the device again (Attachment's Drop).
    bus.write(&bus.device_dir(name).join("driver_override"), wanted)?;
    match bus.bound_driver(name) {
        Some(d) if d == wanted => {}
        current => {
            if let Some(other) = current {
                bus.write(&bus.driver_dir(&other).join("unbind"), name)?;
            }
            bus.write(&bus.driver_dir(wanted).join("bind"), name)?;
        }
    }
    match bus.bound_driver(name) {
        Some(d) if d == wanted => {
            info!("vDPA device {name} attached to {wanted}");
            Ok(attachment)
        }
        bound => {
            let err = VdpaError::WrongDriver {
                name: name.to_string(),
                wanted,
                bound,
            };
            attachment.attached = false;
            if let Err(e) = attachment.manager.dev_del(name) {
                warn!("{e}");
            }
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    #[test]
    fn get_family_encoding() {
        let m = get_family_request("vdpa", 7);
        // nlmsghdr(16) + genlmsghdr(4) + nlattr(4) + "vdpa\0" padded to 8.
        assert_eq!(m.len(), 32);
        assert_eq!(u32_at(&m, 0), Some(32));
        assert_eq!(u16_at(&m, 4), Some(GENL_ID_CTRL));
        assert_eq!(u16_at(&m, 6), Some(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(u32_at(&m, 8), Some(7));
        assert_eq!(u32_at(&m, 12), Some(0));
        assert_eq!(&m[16..20], &[CTRL_CMD_GETFAMILY, 2, 0, 0]);
        assert_eq!(u16_at(&m, 20), Some(9)); // nla_len = 4 + 5
        assert_eq!(u16_at(&m, 22), Some(CTRL_ATTR_FAMILY_NAME));
        assert_eq!(&m[24..32], b"vdpa\0\0\0\0");
    }

    #[test]
    fn dev_new_and_del_encoding() {
        let m = dev_new_request(0x1b, "blk0", 3);
        assert_eq!(u32_at(&m, 0), Some(m.len() as u32));
        assert_eq!(u16_at(&m, 4), Some(0x1b));
        assert_eq!(&m[16..20], &[VDPA_CMD_DEV_NEW, VDPA_GENL_VERSION, 0, 0]);
        let attrs = parse_attrs(&m[20..]);
        assert_eq!(
            attrs,
            vec![
                (VDPA_ATTR_MGMTDEV_DEV_NAME, b"vduse\0".to_vec()),
                (VDPA_ATTR_DEV_NAME, b"blk0\0".to_vec()),
            ]
        );
        // "vduse\0" is 6 bytes: attribute 10, padded to 12.
        assert_eq!(u16_at(&m, 20), Some(10));
        assert_eq!(u16_at(&m, 32), Some(9));
        assert_eq!(m.len(), 20 + 12 + 12);

        let m = dev_del_request(0x1b, "blk0", 4);
        assert_eq!(&m[16..20], &[VDPA_CMD_DEV_DEL, VDPA_GENL_VERSION, 0, 0]);
        assert_eq!(
            parse_attrs(&m[20..]),
            vec![(VDPA_ATTR_DEV_NAME, b"blk0\0".to_vec())]
        );
    }

    fn nlmsg(msg_type: u16, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&msg_type.to_ne_bytes());
        v.extend_from_slice(&0u16.to_ne_bytes());
        v.extend_from_slice(&1u32.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(body);
        v.resize(align4(v.len()), 0);
        v
    }

    #[test]
    fn replies_decode() {
        // A GETFAMILY answer: genl header, FAMILY_NAME, FAMILY_ID = 0x1f; then an ack.
        let mut body = vec![1u8, 2, 0, 0];
        body.extend_from_slice(&9u16.to_ne_bytes());
        body.extend_from_slice(&CTRL_ATTR_FAMILY_NAME.to_ne_bytes());
        body.extend_from_slice(b"vdpa\0\0\0\0");
        body.extend_from_slice(&6u16.to_ne_bytes());
        body.extend_from_slice(&CTRL_ATTR_FAMILY_ID.to_ne_bytes());
        body.extend_from_slice(&0x1fu16.to_ne_bytes());
        body.extend_from_slice(&[0, 0]);
        let mut dgram = nlmsg(GENL_ID_CTRL, &body);
        let mut ack = 0i32.to_ne_bytes().to_vec();
        ack.extend_from_slice(&[0u8; 16]); // the echoed request header
        dgram.extend(nlmsg(NLMSG_ERROR, &ack));
        let replies = parse_reply(&dgram).unwrap();
        assert_eq!(replies.len(), 2);
        assert_eq!(family_id_of(&replies), Some(0x1f));
        assert_eq!(replies[1], Reply::Ack);

        let mut err = (-libc::ENODEV).to_ne_bytes().to_vec();
        err.extend_from_slice(&[0u8; 16]);
        assert_eq!(
            parse_reply(&nlmsg(NLMSG_ERROR, &err)).unwrap(),
            vec![Reply::Error(libc::ENODEV)]
        );
        assert_eq!(
            parse_reply(&nlmsg(NLMSG_DONE, &[0; 4])).unwrap(),
            vec![Reply::Done]
        );
        // Truncated: a length beyond the datagram.
        let mut bad = nlmsg(NLMSG_DONE, &[0; 4]);
        bad[0] = 200;
        assert!(parse_reply(&bad).is_err());
        // Garbage attributes stop parsing instead of panicking.
        assert!(parse_attrs(&[1, 0, 0, 0, 0xff]).is_empty());
    }

    #[test]
    fn netlink_errors_carry_hints() {
        assert!(netlink_hint(Some(libc::EPERM), true).contains("CAP_NET_ADMIN"));
        assert!(netlink_hint(Some(libc::ENODEV), true).contains("modprobe vduse"));
    }

    /// A fake kernel: adding creates the sysfs device directory, bound to `bind_to` (as
    /// the first probing driver would) unless autoprobe is off.
    struct FakeKernel {
        root: PathBuf,
        bind_to: Option<&'static str>,
        log: Rc<RefCell<Vec<String>>>,
    }

    impl VdpaManager for FakeKernel {
        fn dev_new(&mut self, name: &str) -> Result<(), VdpaError> {
            let autoprobe = fs::read_to_string(self.root.join("drivers_autoprobe")).unwrap();
            self.log
                .borrow_mut()
                .push(format!("new {name} autoprobe={}", autoprobe.trim()));
            let dev = self.root.join("devices").join(name);
            fs::create_dir_all(&dev).unwrap();
            fs::write(dev.join("driver_override"), "(null)\n").unwrap();
            let target = if autoprobe.trim() == "1" {
                self.bind_to
            } else {
                // Autoprobe off: the test decides what the explicit bind yields.
                self.bind_to.filter(|d| *d == "virtio_vdpa")
            };
            if let Some(d) = target {
                std::os::unix::fs::symlink(self.root.join("drivers").join(d), dev.join("driver"))
                    .unwrap();
            }
            Ok(())
        }
        fn dev_del(&mut self, name: &str) -> Result<(), VdpaError> {
            self.log.borrow_mut().push(format!("del {name}"));
            let _ = fs::remove_dir_all(self.root.join("devices").join(name));
            Ok(())
        }
    }

    fn fake_bus(drivers: &[&str]) -> (PathBuf, VdpaBus) {
        let root = std::env::temp_dir().join(format!(
            "unidev-vdpa-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        let _ = fs::remove_dir_all(&root);
        for d in drivers {
            fs::create_dir_all(root.join("drivers").join(d)).unwrap();
        }
        fs::create_dir_all(root.join("devices")).unwrap();
        fs::write(root.join("drivers_autoprobe"), "1\n").unwrap();
        (root.clone(), VdpaBus::at(root))
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::SeqCst)
    }

    #[test]
    fn a_missing_driver_is_reported_before_anything_is_added() {
        let (root, bus) = fake_bus(&["vhost_vdpa"]);
        let log = Rc::new(RefCell::new(Vec::new()));
        let k = FakeKernel {
            root: root.clone(),
            bind_to: None,
            log: log.clone(),
        };
        let err = attach(k, &bus, "blk0", VdpaDriver::VirtioVdpa)
            .err()
            .unwrap();
        assert!(err.to_string().contains("modprobe virtio_vdpa"), "{err}");
        assert!(log.borrow().is_empty());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn with_both_drivers_autoprobe_is_off_during_the_add_and_the_override_binds() {
        let (root, bus) = fake_bus(&["vhost_vdpa", "virtio_vdpa"]);
        let log = Rc::new(RefCell::new(Vec::new()));
        let k = FakeKernel {
            root: root.clone(),
            bind_to: Some("virtio_vdpa"),
            log: log.clone(),
        };
        let a = attach(k, &bus, "blk0", VdpaDriver::VirtioVdpa).unwrap();
        assert_eq!(log.borrow()[0], "new blk0 autoprobe=0");
        assert_eq!(
            fs::read_to_string(root.join("drivers_autoprobe")).unwrap(),
            "1",
            "autoprobe restored"
        );
        assert_eq!(
            fs::read_to_string(root.join("devices/blk0/driver_override")).unwrap(),
            "virtio_vdpa"
        );
        assert_eq!(bus.bound_driver("blk0").as_deref(), Some("virtio_vdpa"));
        a.detach().unwrap();
        assert_eq!(log.borrow()[1], "del blk0");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_device_bound_elsewhere_is_unbound_and_rebound_or_removed() {
        let (root, bus) = fake_bus(&["virtio_vdpa", "vhost_vdpa"]);
        // Something bound it to virtio_vdpa although vhost_vdpa was asked for, and the
        // fake cannot rebind: the attach must unbind, bind, notice, and remove it.
        fs::write(root.join("drivers_autoprobe"), "1\n").unwrap();
        let log = Rc::new(RefCell::new(Vec::new()));
        let k = FakeKernel {
            root: root.clone(),
            bind_to: Some("virtio_vdpa"),
            log: log.clone(),
        };
        let err = attach(k, &bus, "blk0", VdpaDriver::VhostVdpa)
            .err()
            .unwrap();
        assert!(
            matches!(
                &err,
                VdpaError::WrongDriver {
                    wanted: "vhost_vdpa",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(
            fs::read_to_string(root.join("drivers/virtio_vdpa/unbind")).unwrap(),
            "blk0"
        );
        assert_eq!(
            fs::read_to_string(root.join("drivers/vhost_vdpa/bind")).unwrap(),
            "blk0"
        );
        assert_eq!(log.borrow().last().unwrap(), "del blk0");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn an_attached_device_is_adopted_only_when_bound_to_the_wanted_driver() {
        let (root, bus) = fake_bus(&["virtio_vdpa", "vhost_vdpa"]);
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut k = FakeKernel {
            root: root.clone(),
            bind_to: Some("virtio_vdpa"),
            log: log.clone(),
        };
        assert!(!device_exists(&bus, "blk0"));
        k.dev_new("blk0").unwrap();
        assert!(device_exists(&bus, "blk0"));
        log.borrow_mut().clear();
        let err = adopt_attachment(
            FakeKernel {
                root: root.clone(),
                bind_to: None,
                log: log.clone(),
            },
            &bus,
            "blk0",
            VdpaDriver::VhostVdpa,
        )
        .err()
        .unwrap();
        assert!(
            matches!(&err, VdpaError::WrongDriver { bound: Some(b), .. } if b == "virtio_vdpa"),
            "{err}"
        );
        assert!(
            log.borrow().is_empty(),
            "a refused adoption removes nothing"
        );
        let a = adopt_attachment(k, &bus, "blk0", VdpaDriver::VirtioVdpa).unwrap();
        assert!(log.borrow().is_empty(), "adopting adds nothing");
        a.detach().unwrap();
        assert_eq!(*log.borrow(), vec!["del blk0".to_string()]);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn the_only_driver_binds_without_touching_autoprobe() {
        let (root, bus) = fake_bus(&["virtio_vdpa"]);
        fs::write(root.join("drivers_autoprobe"), "1\n").unwrap();
        let log = Rc::new(RefCell::new(Vec::new()));
        let k = FakeKernel {
            root: root.clone(),
            bind_to: Some("virtio_vdpa"),
            log: log.clone(),
        };
        let a = attach(k, &bus, "blk0", VdpaDriver::VirtioVdpa).unwrap();
        assert_eq!(log.borrow()[0], "new blk0 autoprobe=1");
        assert!(!root.join("drivers/virtio_vdpa/bind").exists());
        drop(a); // dropping detaches too
        assert_eq!(log.borrow()[1], "del blk0");
        fs::remove_dir_all(root).unwrap();
    }
}
