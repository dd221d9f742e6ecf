//! A vfio-user client: what a VMM does on the other end of the socket, as a library for
//! anyone who wants to drive a vfio-user device without a VMM (tools, diagnostics, tests).
//!
//! **Experimental**: public, but its API may change in any 0.y release
//! (`docs/api-stability.md`).
//!
//! Connects, negotiates VERSION, queries device/region/irq info (with the region fd and
//! sparse-mmap areas), maps memory (with or without an fd), attaches irq eventfds, does
//! region reads and writes (posted or acknowledged), resets, and serves the server's
//! DMA_READ/DMA_WRITE requests while it waits for a reply (vfio-user.rst, client side of
//! every command). It lives in this crate, beside the server, because it is built on the
//! transport's own wire format ([`super::codec`]) and socket layer ([`super::socket`]).
//! unidev's tests and benchmarks drive virtio-pci devices with the driver built on it in
//! the `unidev-testkit` crate (not published).

use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::codec::*;
use super::socket::{Limits, MessageSocket, RecvError};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The server answered with an error.
    #[error("server failed {command:?} with errno {errno}")]
    Server {
        /// The command.
        command: Command,
        /// The errno it reported.
        errno: i32,
    },
    /// The server's answer does not follow the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

impl ClientError {
    /// The server's errno, if this is a server error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl From<RecvError> for ClientError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Io(e) => ClientError::Io(e),
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

impl From<WireError> for ClientError {
    fn from(e: WireError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

/// Result of client calls.
pub type ClientResult<T> = Result<T, ClientError>;

/// What the server announced in VERSION.
#[derive(Clone, Debug, Default)]
pub struct ServerCaps {
    /// Negotiated major version.
    pub major: u16,
    /// Negotiated minor version.
    pub minor: u16,
    /// The raw capabilities JSON.
    pub json: serde_json::Value,
    /// `max_msg_fds` (1 when absent, per the spec).
    pub max_msg_fds: u64,
    /// `max_data_xfer_size` (1 MiB when absent).
    pub max_data_xfer_size: u64,
    /// `max_dma_maps` (65535 when absent).
    pub max_dma_maps: u64,
}

/// A region as the server described it.
#[derive(Debug)]
pub struct RegionDescription {
    /// The fixed fields.
    pub info: RegionInfoWire,
    /// Sparse mmap areas (offset, size), if the capability was present.
    pub sparse_areas: Option<Vec<(u64, u64)>>,
    /// The fd to mmap, when the region is mappable.
    pub fd: Option<File>,
}

/// Client memory the server may reach with DMA_READ/DMA_WRITE (maps without an fd).
pub trait DmaTarget {
    /// Fill `buf` from `address`.
    fn read(&mut self, address: u64, buf: &mut [u8]) -> Result<(), i32>;
    /// Store `data` at `address`.
    fn write(&mut self, address: u64, data: &[u8]) -> Result<(), i32>;
}

/// A connected, negotiated vfio-user client.
pub struct VfioUserClient {
    sock: MessageSocket,
    next_id: u16,
    caps: ServerCaps,
    layout: DmaRwLayout,
    dma_target: Option<Box<dyn DmaTarget + Send>>,
}

impl std::fmt::Debug for VfioUserClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioUserClient")
            .field("caps", &self.caps)
            .finish()
    }
}

/// Options for [`VfioUserClient::connect_with`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `max_data_xfer_size` offered to the server (it chunks its DMA requests to this).
    pub max_data_xfer_size: u32,
    /// Fds the client accepts per message.
    pub max_msg_fds: u32,
    /// Layout of DMA_READ/DMA_WRITE payloads the server uses.
    pub dma_rw_layout: DmaRwLayout,
    /// Timeout of blocking socket operations.
    pub timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            max_data_xfer_size: 1 << 20,
            max_msg_fds: 16,
            dma_rw_layout: DmaRwLayout::Qemu,
            timeout: Duration::from_secs(10),
        }
    }
}

impl VfioUserClient {
    /// Connect to the server at `path` and negotiate with default options.
    pub fn connect(path: &Path) -> ClientResult<Self> {
        Self::connect_with(path, ClientOptions::default())
    }

    /// Connect and negotiate with `opts`.
    pub fn connect_with(path: &Path, opts: ClientOptions) -> ClientResult<Self> {
        let stream = UnixStream::connect(path)?;
        let sock = MessageSocket::new(
            stream,
            Limits {
                max_msg_size: opts.max_data_xfer_size as usize + 4096,
                max_fds: opts.max_msg_fds as usize,
            },
        );
        sock.set_timeout(Some(opts.timeout))?;
        let mut c = VfioUserClient {
            sock,
            next_id: 0,
            caps: ServerCaps::default(),
            layout: opts.dma_rw_layout,
            dma_target: None,
        };
        let json = serde_json::json!({"capabilities": {
            "max_msg_fds": opts.max_msg_fds,
            "max_data_xfer_size": opts.max_data_xfer_size,
            "pgsizes": 4096,
            "max_dma_maps": 65535,
        }})
        .to_string();
        let mut w = Writer::default();
        w.u16(0).u16(1).bytes(json.as_bytes()).bytes(&[0]);
        let (reply, _) = c.call(Command::Version, &w.finish(), &[], false)?;
        let mut r = Reader::new("VERSION reply", &reply);
        let major = r.u16()?;
        let minor = r.u16()?;
        let text = r.rest();
        let text = text.split(|&b| b == 0).next().unwrap_or(&[]);
        let value: serde_json::Value = serde_json::from_slice(text)
            .map_err(|e| ClientError::Protocol(format!("VERSION JSON: {e}")))?;
        let cap = |k: &str, d: u64| value["capabilities"][k].as_u64().unwrap_or(d);
        c.caps = ServerCaps {
            major,
            minor,
            max_msg_fds: cap("max_msg_fds", 1),
            max_data_xfer_size: cap("max_data_xfer_size", 1 << 20),
            max_dma_maps: cap("max_dma_maps", 65535),
            json: value,
        };
        Ok(c)
    }

    /// What the server announced.
    pub fn server_caps(&self) -> &ServerCaps {
        &self.caps
    }

    /// Serve the server's DMA_READ/DMA_WRITE requests from `target`.
    pub fn set_dma_target(&mut self, target: Box<dyn DmaTarget + Send>) {
        self.dma_target = Some(target);
    }

    /// The raw socket fd (e.g. to poll it).
    pub fn socket_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Send a command and wait for its reply, serving server requests meanwhile.
    /// Returns the reply payload and any fds. With `no_reply`, returns at once.
    pub fn call(
        &mut self,
        command: Command,
        payload: &[u8],
        fds: &[RawFd],
        no_reply: bool,
    ) -> ClientResult<(Vec<u8>, Vec<File>)> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let header = Header::command(id, command, payload.len(), no_reply);
        self.sock.send(&header, payload, fds)?;
        if no_reply {
            return Ok((Vec::new(), Vec::new()));
        }
        loop {
            let msg = self.sock.recv()?;
            let h = msg.header;
            if h.is_command() {
                self.serve_request(&h, &msg.payload)?;
                continue;
            }
            if h.id != id || h.command != command as u16 {
                return Err(ClientError::Protocol(format!(
                    "reply {h:?} does not match request id {id} {command:?}"
                )));
            }
            if h.is_error() {
                return Err(ClientError::Server {
                    command,
                    errno: h.error as i32,
                });
            }
            return Ok((msg.payload, msg.fds.into_iter().map(File::from).collect()));
        }
    }

    /// Handle one DMA_READ/DMA_WRITE from the server.
    fn serve_request(&mut self, h: &Header, payload: &[u8]) -> ClientResult<()> {
        let reply_err = |s: &Self, errno: i32| s.sock.send(&h.error_reply(errno), &[], &[]);
        let (address, count, data) = match self.layout.decode(payload) {
            Ok(v) => v,
            Err(_) => return Ok(reply_err(self, libc::EINVAL)?),
        };
        let Some(target) = self.dma_target.as_mut() else {
            return Ok(reply_err(self, libc::ENOTSUP)?);
        };
        match Command::from_u16(h.command) {
            Some(Command::DmaRead) => {
                let mut buf = vec![0u8; count.min(1 << 26) as usize];
                match target.read(address, &mut buf) {
                    Ok(()) => {
                        let p = self.layout.encode(address, count as u32, &buf);
                        self.sock.send(&h.reply(p.len()), &p, &[])?;
                    }
                    Err(e) => reply_err(self, e)?,
                }
            }
            Some(Command::DmaWrite) => {
                let n = (count as usize).min(data.len());
                match target.write(address, &data[..n]) {
                    Ok(()) => self.sock.send(&h.reply(0), &[], &[])?,
                    Err(e) => reply_err(self, e)?,
                }
            }
            _ => reply_err(self, libc::ENOSYS)?,
        }
        Ok(())
    }

    /// DEVICE_GET_INFO.
    pub fn device_info(&mut self) -> ClientResult<DeviceInfo> {
        let req = DeviceInfo {
            argsz: DeviceInfo::SIZE as u32,
            ..Default::default()
        };
        let (p, _) = self.call(Command::DeviceGetInfo, &req.encode(), &[], false)?;
        Ok(DeviceInfo::decode(&p)?)
    }

    /// DEVICE_GET_REGION_INFO, retrying with a larger `argsz` when the server asks.
    pub fn region_info(&mut self, index: u32) -> ClientResult<RegionDescription> {
        let mut argsz = RegionInfoWire::SIZE as u32;
        for _ in 0..2 {
            let req = RegionInfoWire {
                argsz,
                index,
                ..Default::default()
            };
            let (p, mut fds) =
                self.call(Command::DeviceGetRegionInfo, &req.encode(), &[], false)?;
            let info = RegionInfoWire::decode(&p)?;
            if info.argsz > argsz {
                argsz = info.argsz;
                continue;
            }
            let sparse_areas = if info.flags & REGION_INFO_FLAG_CAPS != 0 && info.cap_offset != 0 {
                decode_sparse_mmap(&p, info.cap_offset)?
            } else {
                None
            };
            return Ok(RegionDescription {
                info,
                sparse_areas,
                fd: fds.pop(),
            });
        }
        Err(ClientError::Protocol(
            "region info argsz keeps growing".into(),
        ))
    }

    /// DEVICE_GET_IRQ_INFO.
    pub fn irq_info(&mut self, index: u32) -> ClientResult<IrqInfoWire> {
        let req = IrqInfoWire {
            argsz: IrqInfoWire::SIZE as u32,
            index,
            ..Default::default()
        };
        let (p, _) = self.call(Command::DeviceGetIrqInfo, &req.encode(), &[], false)?;
        Ok(IrqInfoWire::decode(&p)?)
    }

    /// DEVICE_SET_IRQS with any flags, bool data and fds.
    pub fn set_irqs(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[u8],
        fds: &[RawFd],
    ) -> ClientResult<()> {
        let s = IrqSet {
            argsz: (IrqSet::SIZE + data.len()) as u32,
            flags,
            index,
            start,
            count,
        };
        self.call(Command::DeviceSetIrqs, &s.encode(data), fds, false)?;
        Ok(())
    }

    /// Attach trigger eventfds to lines `start..start+fds.len()` of irq `index`.
    pub fn set_irq_eventfds(&mut self, index: u32, start: u32, fds: &[RawFd]) -> ClientResult<()> {
        self.set_irqs(
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            fds.len() as u32,
            &[],
            fds,
        )
    }

    /// REGION_READ.
    pub fn region_read(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> ClientResult<()> {
        let a = RegionAccess {
            offset,
            region,
            count: buf.len() as u32,
        };
        let (p, _) = self.call(Command::RegionRead, &a.encode(&[]), &[], false)?;
        let (r, data) = RegionAccess::decode(&p)?;
        if r.count as usize != buf.len() || data.len() != buf.len() {
            return Err(ClientError::Protocol(format!(
                "REGION_READ returned {} bytes, asked {}",
                data.len(),
                buf.len()
            )));
        }
        buf.copy_from_slice(data);
        Ok(())
    }

    /// REGION_WRITE, waiting for the acknowledgement.
    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> ClientResult<()> {
        self.write_inner(region, offset, data, false)
    }

    /// REGION_WRITE posted with No_reply (as QEMU does for MMIO BARs).
    pub fn region_write_posted(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
    ) -> ClientResult<()> {
        self.write_inner(region, offset, data, true)
    }

    fn write_inner(
        &mut self,
        region: u32,
        offset: u64,
        data: &[u8],
        posted: bool,
    ) -> ClientResult<()> {
        let a = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        self.call(Command::RegionWrite, &a.encode(data), &[], posted)?;
        Ok(())
    }

    /// DMA_MAP of `size` bytes at `iova`, backed by `fd` at `offset` when given.
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        readable: bool,
        writable: bool,
        fd: Option<(RawFd, u64)>,
    ) -> ClientResult<()> {
        let m = DmaMapRequest {
            argsz: DmaMapRequest::SIZE as u32,
            flags: if readable { DMA_MAP_READ } else { 0 }
                | if writable { DMA_MAP_WRITE } else { 0 },
            offset: fd.map(|f| f.1).unwrap_or(0),
            address: iova,
            size,
        };
        let fds: Vec<RawFd> = fd.map(|f| f.0).into_iter().collect();
        self.call(Command::DmaMap, &m.encode(), &fds, false)?;
        Ok(())
    }

    /// DMA_UNMAP of exactly one earlier map.
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> ClientResult<()> {
        self.unmap_inner(iova, size, 0)
    }

    /// DMA_UNMAP of every map.
    pub fn dma_unmap_all(&mut self) -> ClientResult<()> {
        self.unmap_inner(0, 0, DMA_UNMAP_ALL)
    }

    fn unmap_inner(&mut self, address: u64, size: u64, flags: u32) -> ClientResult<()> {
        let u = DmaUnmapRequest {
            argsz: DmaUnmapRequest::SIZE as u32,
            flags,
            address,
            size,
        };
        self.call(Command::DmaUnmap, &u.encode(), &[], false)?;
        Ok(())
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) -> ClientResult<()> {
        self.call(Command::DeviceReset, &[], &[], false)?;
        Ok(())
    }
}
