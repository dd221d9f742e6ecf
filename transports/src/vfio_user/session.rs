//! One vfio-user client connection: negotiation state and the translation of each
//! command into calls on the core's device model (vfio-user.rst, every command section).
//!
//! The session holds only what belongs to the connection — negotiated limits, the
//! socket, the DMA message path. Device state lives in the device, DMA maps in the
//! device's `DmaSpace`, interrupt eventfds in its `Interrupts`; on disconnect the
//! session drops the client's maps and eventfds and leaves the device as it is (spec,
//! "Client Disconnection").

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, info, warn};
use unidev_core::irq::{Interrupts, IrqKind};
use unidev_core::memory::{DmaMessagePath, DmaSpace, FdBacking, MapRequest, MemoryError, Prot};
use unidev_core::pci::{check_access, PciRegion, SharedPciDevice};
use unidev_core::sync::lock;
use vmm_sys_util::eventfd::EventFd;

use super::codec::*;
use super::socket::{Message, MessageSocket};

/// Protocol version unidev speaks.
pub const VERSION_MAJOR: u16 = 0;
/// Highest minor version unidev speaks.
pub const VERSION_MINOR: u16 = 1;
/// The only DMA page size offered (`pgsizes`).
pub const PAGE_SIZE: u64 = 4096;

/// Settings of a vfio-user server, the same for every connection.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Most fds the server accepts per message (advertised as `max_msg_fds`; QEMU rejects
    /// more than 16).
    pub max_msg_fds: usize,
    /// Largest `count` of a region or DMA transfer the server accepts
    /// (`max_data_xfer_size`).
    pub max_data_xfer_size: u32,
    /// Layout of DMA_READ/DMA_WRITE payloads (see [`DmaRwLayout`]).
    pub dma_rw_layout: DmaRwLayout,
    /// How long a blocking read or write on the socket may take (a client that stalls
    /// mid-message or stops reading is dropped after this long).
    pub io_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_msg_fds: 16,
            max_data_xfer_size: 1 << 20,
            dma_rw_layout: DmaRwLayout::Qemu,
            io_timeout: Duration::from_secs(10),
        }
    }
}

impl ServerConfig {
    /// Largest message accepted: a full data transfer plus headers and slack for the
    /// VERSION JSON.
    pub fn max_msg_size(&self) -> usize {
        self.max_data_xfer_size as usize + 4096
    }
}

/// What the client told us in VERSION.
#[derive(Clone, Copy, Debug)]
struct ClientCaps {
    max_data_xfer_size: u32,
}

/// A reply payload and the fds that go with it (owned until sent).
type Reply = (Vec<u8>, Vec<File>);

/// What a handler produced.
enum Outcome {
    /// Reply with this payload (and fds).
    Reply(Vec<u8>, Vec<File>),
    /// Reply with an error.
    Error(i32),
}

fn err<T>(errno: i32) -> Result<T, i32> {
    Err(errno)
}

/// Messages a DMA requester read while waiting for its reply; the session handles them
/// in order before reading the socket again.
#[derive(Default)]
pub(crate) struct Inbox {
    pub(crate) queue: Mutex<VecDeque<Message>>,
    /// Serializes readers of the socket (the session thread and DMA requesters).
    pub(crate) recv_lock: Mutex<()>,
}

/// The server-to-client DMA path (DMA_READ/DMA_WRITE messages on the main socket).
pub(crate) struct ClientDmaPath {
    sock: Arc<MessageSocket>,
    inbox: Arc<Inbox>,
    wake: EventFd,
    next_id: AtomicU16,
    layout: DmaRwLayout,
    chunk: u32,
}

impl ClientDmaPath {
    fn transfer(
        &self,
        cmd: Command,
        iova: u64,
        len: usize,
        data: Option<&[u8]>,
        out: Option<&mut [u8]>,
    ) -> io::Result<()> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let payload = self.layout.encode(iova, len as u32, data.unwrap_or(&[]));
        let header = Header::command(id, cmd, payload.len(), false);
        let _rx = lock(&self.inbox.recv_lock);
        self.sock.send(&header, &payload, &[])?;
        loop {
            let msg = match self.sock.recv() {
                Ok(m) => m,
                Err(e) => {
                    // The stream may be mid-message now: end the connection cleanly.
                    let _ = self.sock.stream().shutdown(std::net::Shutdown::Both);
                    return Err(io::Error::other(format!("waiting for DMA reply: {e}")));
                }
            };
            let h = msg.header;
            if h.is_reply() && h.id == id && h.command == cmd as u16 {
                if h.is_error() {
                    let errno = if h.error == 0 {
                        libc::EIO
                    } else {
                        h.error as i32
                    };
                    return Err(io::Error::from_raw_os_error(errno));
                }
                if let Some(out) = out {
                    let (_, count, bytes) = self
                        .layout
                        .decode(&msg.payload)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    if count != len as u64 || bytes.len() < len {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("DMA_READ reply has {} of {len} bytes", bytes.len()),
                        ));
                    }
                    out.copy_from_slice(&bytes[..len]);
                }
                return Ok(());
            }
            if h.is_command() {
                lock(&self.inbox.queue).push_back(msg);
                let _ = self.wake.write(1);
            } else {
                warn!("vfio-user: dropping unexpected reply {h:?}");
            }
        }
    }
}

impl DmaMessagePath for ClientDmaPath {
    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> io::Result<()> {
        let chunk = self.chunk.max(1) as usize;
        for (i, part) in buf.chunks_mut(chunk).enumerate() {
            let len = part.len();
            self.transfer(
                Command::DmaRead,
                iova + (i * chunk) as u64,
                len,
                None,
                Some(part),
            )?;
        }
        Ok(())
    }

    fn dma_write(&self, iova: u64, data: &[u8]) -> io::Result<()> {
        let chunk = self.chunk.max(1) as usize;
        for (i, part) in data.chunks(chunk).enumerate() {
            self.transfer(
                Command::DmaWrite,
                iova + (i * chunk) as u64,
                part.len(),
                Some(part),
                None,
            )?;
        }
        Ok(())
    }
}

/// A connected client.
pub struct Session {
    name: String,
    sock: Arc<MessageSocket>,
    device: SharedPciDevice,
    dma: Arc<DmaSpace>,
    irqs: Arc<Interrupts>,
    config: ServerConfig,
    client: Option<ClientCaps>,
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) inbox_wake: EventFd,
    /// Set when the session must end after the current message.
    closing: bool,
    /// Size and permissions of regions 0..=8, read once: a device's regions do not
    /// change, and the data path (notify writes) should not ask the device each time.
    region_limits: Vec<(u64, bool, bool)>,
}

/// Whether the session goes on after a message.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionState {
    /// Keep serving.
    Open,
    /// The connection ended (or must end).
    Closed,
}

impl Session {
    /// A session on a freshly accepted connection.
    pub fn new(
        name: String,
        sock: MessageSocket,
        device: SharedPciDevice,
        config: ServerConfig,
    ) -> io::Result<Self> {
        sock.set_timeout(Some(config.io_timeout))?;
        let (dma, irqs, region_limits) = {
            let d = lock(&device);
            let limits = (0..PCI_NUM_REGIONS)
                .filter_map(region_of)
                .map(|r| {
                    let i = d.region_info(r);
                    (i.size, i.read, i.write)
                })
                .collect();
            (d.dma().clone(), d.interrupts().clone(), limits)
        };
        Ok(Session {
            name,
            sock: Arc::new(sock),
            device,
            dma,
            irqs,
            config,
            client: None,
            inbox: Arc::new(Inbox::default()),
            inbox_wake: EventFd::new(libc::EFD_NONBLOCK)?,
            closing: false,
            region_limits,
        })
    }

    /// The connection's fd (for epoll).
    pub fn socket_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// The fd that signals messages parked by a DMA requester.
    pub fn inbox_fd(&self) -> RawFd {
        self.inbox_wake.as_raw_fd()
    }

    fn parked(&self) -> Option<Message> {
        lock(&self.inbox.queue).pop_front()
    }

    /// Handle messages parked by DMA requesters.
    pub fn drain_inbox(&mut self) -> SessionState {
        let _ = self.inbox_wake.read();
        let mut handled = false;
        while let Some(msg) = self.parked() {
            handled = true;
            if self.handle(msg) == SessionState::Closed {
                return SessionState::Closed;
            }
        }
        // Parked DMA maps are published like those read from the socket: once the
        // client's burst is consumed (otherwise the next `serve_one` does it).
        if handled && self.sock.pending_bytes() == 0 {
            self.dma.publish();
        }
        SessionState::Open
    }

    /// Read and handle one message (the socket is readable).
    pub fn serve_one(&mut self) -> SessionState {
        if self.drain_inbox() == SessionState::Closed {
            return SessionState::Closed;
        }
        let received = {
            let _rx = lock(&self.inbox.recv_lock);
            self.sock.recv()
        };
        use super::socket::RecvError;
        let msg = match received {
            Ok(m) => m,
            Err(RecvError::Closed) => {
                info!("{}: client disconnected", self.name);
                return SessionState::Closed;
            }
            Err(RecvError::TooBig {
                header,
                size,
                limit,
            }) => {
                warn!(
                    "{}: {header:?}: message of {size} bytes exceeds {limit}",
                    self.name
                );
                self.send_error(&header, libc::E2BIG);
                return self.state();
            }
            Err(RecvError::TooManyFds {
                header,
                count,
                limit,
            }) => {
                warn!(
                    "{}: {header:?}: {count} fds, at most {limit} allowed",
                    self.name
                );
                self.send_error(&header, libc::EINVAL);
                return self.state();
            }
            Err(e) => {
                // Descriptors the kernel could not pass: the message was read, answer it.
                if let Some((&header, errno)) = e.lost_fds() {
                    let lost = std::io::Error::from_raw_os_error(errno);
                    let why = unidev_core::limits::fds_lost(&lost);
                    warn!("{}: {header:?}: {why}", self.name);
                    self.send_error(&header, errno);
                    return self.state();
                }
                warn!("{}: dropping connection: {e}", self.name);
                return SessionState::Closed;
            }
        };
        let state = self.handle(msg);
        // Publish new DMA maps once the client's burst of messages is consumed.
        if self.sock.pending_bytes() == 0 {
            self.dma.publish();
        }
        state
    }

    fn state(&self) -> SessionState {
        if self.closing {
            SessionState::Closed
        } else {
            SessionState::Open
        }
    }

    fn send_error(&mut self, h: &Header, errno: i32) {
        if h.no_reply() {
            return;
        }
        if let Err(e) = self.sock.send(&h.error_reply(errno), &[], &[]) {
            warn!("{}: cannot send reply: {e}", self.name);
            self.closing = true;
        }
    }

    /// Handle one message.
    pub fn handle(&mut self, msg: Message) -> SessionState {
        let h = msg.header;
        if !h.is_command() {
            warn!(
                "{}: ignoring unexpected non-command message {h:?}",
                self.name
            );
            return self.state();
        }
        debug!("{}: <- {h:?}", self.name);
        let outcome = self.dispatch(&h, &msg.payload, msg.fds);
        match outcome {
            Outcome::Reply(payload, fds) => {
                if !h.no_reply() {
                    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                    if let Err(e) = self.sock.send(&h.reply(payload.len()), &payload, &raw) {
                        warn!("{}: cannot send reply: {e}", self.name);
                        self.closing = true;
                    }
                }
            }
            Outcome::Error(errno) => {
                debug!("{}: {h:?} failed: errno {errno}", self.name);
                self.send_error(&h, errno);
            }
        }
        self.state()
    }

    fn dispatch(&mut self, h: &Header, p: &[u8], fds: Vec<OwnedFd>) -> Outcome {
        let Some(cmd) = Command::from_u16(h.command) else {
            warn!("{}: unknown command {}", self.name, h.command);
            return Outcome::Error(libc::ENOSYS);
        };
        if cmd != Command::Version && self.client.is_none() {
            warn!("{}: {cmd:?} before VERSION", self.name);
            return Outcome::Error(libc::EINVAL);
        }
        // Only these commands may carry fds.
        let takes_fds = matches!(cmd, Command::DmaMap | Command::DeviceSetIrqs);
        if !takes_fds && !fds.is_empty() {
            warn!(
                "{}: {cmd:?} carried {} unexpected fds",
                self.name,
                fds.len()
            );
            return Outcome::Error(libc::EINVAL);
        }
        let result = match cmd {
            Command::Version => self.version(p),
            Command::DmaMap => self.dma_map(p, fds),
            Command::DmaUnmap => self.dma_unmap(p),
            Command::DeviceGetInfo => self.device_info(p),
            Command::DeviceGetRegionInfo => self.region_info(p),
            Command::DeviceGetRegionIoFds => self.region_io_fds(p),
            Command::DeviceGetIrqInfo => self.irq_info(p),
            Command::DeviceSetIrqs => self.set_irqs(p, fds),
            Command::RegionRead => self.region_read(p),
            Command::RegionWrite => self.region_write(p),
            Command::RegionWriteMulti => self.region_write_multi(p),
            Command::DeviceReset => self.reset(p),
            Command::DmaRead | Command::DmaWrite => {
                warn!("{}: {cmd:?} is a server-to-client command", self.name);
                err(libc::EINVAL)
            }
            Command::DirtyPages
            | Command::DeviceFeature
            | Command::MigDataRead
            | Command::MigDataWrite => err(libc::ENOTSUP),
        };
        match result {
            Ok((payload, fds)) => Outcome::Reply(payload, fds),
            Err(errno) => Outcome::Error(errno),
        }
    }

    fn parse<T>(&self, r: Result<T, WireError>) -> Result<T, i32> {
        r.map_err(|e| {
            warn!("{}: {e}", self.name);
            libc::EINVAL
        })
    }

    fn version(&mut self, p: &[u8]) -> Result<Reply, i32> {
        if self.client.is_some() {
            warn!("{}: VERSION sent twice", self.name);
            return err(libc::EINVAL);
        }
        let mut r = Reader::new("VERSION", p);
        let major = self.parse(r.u16())?;
        let minor = self.parse(r.u16())?;
        if major != VERSION_MAJOR {
            warn!(
                "{}: client speaks vfio-user {major}.{minor}, we speak {VERSION_MAJOR}.x",
                self.name
            );
            return err(libc::ENOTSUP);
        }
        let json = r.rest();
        let json = json.split(|&b| b == 0).next().unwrap_or(&[]);
        let mut caps = ClientCaps {
            max_data_xfer_size: 1 << 20,
        };
        if !json.is_empty() {
            let v: serde_json::Value = match serde_json::from_slice(json) {
                Ok(v) => v,
                Err(e) => {
                    warn!("{}: VERSION capabilities are not JSON: {e}", self.name);
                    return err(libc::EINVAL);
                }
            };
            let c = &v["capabilities"];
            if let Some(x) = c.get("max_data_xfer_size") {
                match x.as_u64() {
                    Some(n) if n > 0 => caps.max_data_xfer_size = n.min(u32::MAX as u64) as u32,
                    _ => {
                        warn!("{}: bad max_data_xfer_size {x}", self.name);
                        return err(libc::EINVAL);
                    }
                }
            }
            if let Some(x) = c.get("pgsizes") {
                if x.as_u64().is_none_or(|n| n & PAGE_SIZE == 0) {
                    warn!("{}: client page sizes {x} do not include 4 KiB", self.name);
                    return err(libc::EINVAL);
                }
            }
        }
        let reply_caps = serde_json::json!({
            "capabilities": {
                "max_msg_fds": self.config.max_msg_fds,
                "max_data_xfer_size": self.config.max_data_xfer_size,
                "pgsizes": PAGE_SIZE,
                "max_dma_maps": self.dma.max_maps(),
                "write_multiple": true,
            }
        });
        let mut w = Writer::default();
        w.u16(VERSION_MAJOR)
            .u16(minor.min(VERSION_MINOR))
            .bytes(reply_caps.to_string().as_bytes())
            .bytes(&[0]);
        info!(
            "{}: client negotiated vfio-user {VERSION_MAJOR}.{}",
            self.name,
            minor.min(VERSION_MINOR)
        );
        self.client = Some(caps);
        // From now on, maps without an fd are served over this connection.
        self.dma.set_message_path(Some(Arc::new(ClientDmaPath {
            sock: self.sock.clone(),
            inbox: self.inbox.clone(),
            wake: self.inbox_wake.try_clone().map_err(|_| libc::ENOMEM)?,
            next_id: AtomicU16::new(0),
            layout: self.config.dma_rw_layout,
            // A DMA_READ reply carries `count` bytes to us: bounded by our own limit too.
            chunk: caps.max_data_xfer_size.min(self.config.max_data_xfer_size),
        })));
        Ok((w.finish(), vec![]))
    }

    fn dma_map(&mut self, p: &[u8], mut fds: Vec<OwnedFd>) -> Result<Reply, i32> {
        let m = self.parse(DmaMapRequest::decode(p))?;
        if (m.argsz as usize) < DmaMapRequest::SIZE {
            return err(libc::EINVAL);
        }
        if m.flags & !(DMA_MAP_READ | DMA_MAP_WRITE) != 0 {
            warn!("{}: DMA_MAP with unknown flags {:#x}", self.name, m.flags);
            return err(libc::EINVAL);
        }
        if fds.len() > 1 {
            return err(libc::EINVAL);
        }
        if m.address % PAGE_SIZE != 0 || m.size % PAGE_SIZE != 0 || m.offset % PAGE_SIZE != 0 {
            warn!(
                "{}: DMA_MAP {:#x}+{:#x} (offset {:#x}) is not page aligned",
                self.name, m.address, m.size, m.offset
            );
            return err(libc::EINVAL);
        }
        let backing = match fds.pop() {
            Some(fd) => {
                // Clients share memory as regular files (memfd, tmpfs, hugetlbfs); the
                // core checks the size and seals it against shrinking.
                let file = File::from(fd);
                if !file.metadata().is_ok_and(|m| m.file_type().is_file()) {
                    warn!("{}: DMA_MAP fd is not a regular file", self.name);
                    return err(libc::EINVAL);
                }
                Some(FdBacking {
                    file,
                    offset: m.offset,
                })
            }
            None => None,
        };
        let prot = Prot {
            read: m.flags & DMA_MAP_READ != 0,
            write: m.flags & DMA_MAP_WRITE != 0,
        };
        self.dma
            .map(MapRequest {
                iova: m.address,
                size: m.size,
                prot,
                backing,
            })
            .map_err(|e| self.memory_errno(e))?;
        debug!(
            "{}: mapped {:#x}+{:#x} {prot:?}",
            self.name, m.address, m.size
        );
        Ok((vec![], vec![]))
    }

    fn memory_errno(&self, e: MemoryError) -> i32 {
        warn!("{}: {e}", self.name);
        e.errno()
    }

    fn dma_unmap(&mut self, p: &[u8]) -> Result<Reply, i32> {
        let u = self.parse(DmaUnmapRequest::decode(p))?;
        if (u.argsz as usize) < DmaUnmapRequest::SIZE {
            return err(libc::EINVAL);
        }
        if u.flags & DMA_UNMAP_GET_DIRTY_BITMAP != 0 {
            return err(libc::ENOTSUP);
        }
        if u.flags & !DMA_UNMAP_ALL != 0 {
            return err(libc::EINVAL);
        }
        if u.flags & DMA_UNMAP_ALL != 0 {
            if u.address != 0 || u.size != 0 {
                return err(libc::EINVAL);
            }
            let n = self.dma.unmap_all();
            debug!("{}: unmapped all {n} maps", self.name);
        } else {
            self.dma
                .unmap(u.address, u.size)
                .map_err(|e| self.memory_errno(e))?;
        }
        Ok((
            DmaUnmapRequest {
                argsz: DmaUnmapRequest::SIZE as u32,
                ..u
            }
            .encode(),
            vec![],
        ))
    }

    fn device_info(&mut self, p: &[u8]) -> Result<Reply, i32> {
        let req = self.parse(DeviceInfo::decode(p))?;
        if (req.argsz as usize) < DeviceInfo::SIZE {
            return err(libc::EINVAL);
        }
        let can_reset = self.lock_device().can_reset();
        let info = DeviceInfo {
            argsz: DeviceInfo::SIZE as u32,
            flags: DEVICE_FLAGS_PCI | if can_reset { DEVICE_FLAGS_RESET } else { 0 },
            num_regions: PCI_NUM_REGIONS,
            num_irqs: PCI_NUM_IRQS,
        };
        Ok((info.encode(), vec![]))
    }

    fn lock_device(&self) -> std::sync::MutexGuard<'_, dyn unidev_core::pci::PciDevice + 'static> {
        lock(&self.device)
    }

    fn region_info(&mut self, p: &[u8]) -> Result<Reply, i32> {
        let req = self.parse(RegionInfoWire::decode(p))?;
        if (req.argsz as usize) < RegionInfoWire::SIZE {
            return err(libc::EINVAL);
        }
        let region = region_of(req.index).ok_or(libc::EINVAL)?;
        let info = self.lock_device().region_info(region);
        let mut flags = 0;
        if info.size > 0 {
            if info.read {
                flags |= REGION_INFO_FLAG_READ;
            }
            if info.write {
                flags |= REGION_INFO_FLAG_WRITE;
            }
        }
        let mut caps = Vec::new();
        let mut fds = Vec::new();
        let mut offset = 0;
        if let (Some(mm), true) = (&info.mmap, info.size > 0) {
            flags |= REGION_INFO_FLAG_MMAP;
            offset = mm.file_offset;
            let whole =
                mm.areas.len() == 1 && mm.areas[0].offset == 0 && mm.areas[0].size == info.size;
            if !whole {
                let areas: Vec<(u64, u64)> = mm.areas.iter().map(|a| (a.offset, a.size)).collect();
                caps = encode_sparse_mmap_cap(&areas);
            }
            fds.push(
                mm.file
                    .try_clone()
                    .map_err(|e| e.raw_os_error().unwrap_or(libc::EMFILE))?,
            );
        }
        let needed = (RegionInfoWire::SIZE + caps.len()) as u32;
        let fits = req.argsz >= needed;
        // CAPS means "capabilities found in the reply" (spec); QEMU's client fails a
        // reply that sets it with a cap_offset outside the payload, before it would
        // retry with the larger argsz.
        if fits && !caps.is_empty() {
            flags |= REGION_INFO_FLAG_CAPS;
        }
        let reply = RegionInfoWire {
            argsz: needed,
            flags,
            index: req.index,
            cap_offset: if fits && !caps.is_empty() {
                RegionInfoWire::SIZE as u32
            } else {
                0
            },
            size: info.size,
            offset,
        };
        let mut payload = reply.encode();
        if fits {
            payload.extend_from_slice(&caps);
        } else {
            // "Reply needs more space": the client retries with argsz = needed; the fd
            // comes with the full answer only, so a retrying client leaks nothing.
            fds.clear();
        }
        Ok((payload, fds))
    }

    fn region_io_fds(&mut self, p: &[u8]) -> Result<Reply, i32> {
        let req = self.parse(RegionIoFds::decode(p))?;
        if (req.argsz as usize) < RegionIoFds::SIZE || req.flags != 0 {
            return err(libc::EINVAL);
        }
        region_of(req.index).ok_or(libc::EINVAL)?;
        // unidev offers no ioeventfd sub-regions yet: an empty list.
        let reply = RegionIoFds {
            argsz: RegionIoFds::SIZE as u32,
            flags: 0,
            index: req.index,
            count: 0,
        };
        Ok((reply.encode(), vec![]))
    }

    fn irq_info(&mut self, p: &[u8]) -> Result<Reply, i32> {
        let req = self.parse(IrqInfoWire::decode(p))?;
        if (req.argsz as usize) < IrqInfoWire::SIZE {
            return err(libc::EINVAL);
        }
        let kind = IrqKind::from_index(req.index).ok_or(libc::EINVAL)?;
        let count = self.irqs.layout().count(kind);
        let flags = IRQ_INFO_EVENTFD
            | match kind {
                IrqKind::Intx => IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED,
                IrqKind::Msi => IRQ_INFO_MASKABLE | IRQ_INFO_NORESIZE,
                IrqKind::Msix => IRQ_INFO_MASKABLE,
                IrqKind::Err | IrqKind::Req => 0,
            };
        let reply = IrqInfoWire {
            argsz: IrqInfoWire::SIZE as u32,
            flags,
            index: req.index,
            count,
        };
        Ok((reply.encode(), vec![]))
    }

    fn set_irqs(&mut self, p: &[u8], fds: Vec<OwnedFd>) -> Result<Reply, i32> {
        let (s, data) = self.parse(IrqSet::decode(p))?;
        let data_flags = s.flags & IRQ_SET_DATA_MASK;
        let action = s.flags & IRQ_SET_ACTION_MASK_ALL;
        if s.flags & !(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL) != 0
            || data_flags.count_ones() != 1
            || action.count_ones() != 1
        {
            warn!("{}: SET_IRQS flags {:#x} invalid", self.name, s.flags);
            return err(libc::EINVAL);
        }
        if (s.argsz as usize) < IrqSet::SIZE {
            return err(libc::EINVAL);
        }
        let kind = IrqKind::from_index(s.index).ok_or(libc::EINVAL)?;
        if data_flags != IRQ_SET_DATA_EVENTFD && !fds.is_empty() {
            return err(libc::EINVAL);
        }
        let irq_err = |e: unidev_core::irq::IrqError| {
            warn!("{}: SET_IRQS: {e}", self.name);
            e.errno()
        };
        match data_flags {
            IRQ_SET_DATA_NONE => {
                if s.count == 0 {
                    // count 0 (and start 0) with TRIGGER disables the whole index.
                    if action == IRQ_SET_ACTION_TRIGGER && s.start == 0 {
                        self.irqs.disable(kind);
                        return Ok((vec![], vec![]));
                    }
                    return err(libc::EINVAL);
                }
                match action {
                    IRQ_SET_ACTION_MASK => self.irqs.mask(kind, s.start, s.count, None),
                    IRQ_SET_ACTION_UNMASK => self.irqs.unmask(kind, s.start, s.count, None),
                    _ => self.irqs.trigger(kind, s.start, s.count, None),
                }
                .map_err(irq_err)?;
            }
            IRQ_SET_DATA_BOOL => {
                let bools = data.get(..s.count as usize).ok_or(libc::EINVAL)?;
                let which: Vec<bool> = bools.iter().map(|&b| b != 0).collect();
                match action {
                    IRQ_SET_ACTION_MASK => self.irqs.mask(kind, s.start, s.count, Some(&which)),
                    IRQ_SET_ACTION_UNMASK => self.irqs.unmask(kind, s.start, s.count, Some(&which)),
                    _ => self.irqs.trigger(kind, s.start, s.count, Some(&which)),
                }
                .map_err(irq_err)?;
            }
            _ => {
                // DATA_EVENTFD: one fd per line, or none to de-assign the range. The range
                // is checked before anything is built for it (a count of 2^32 - 1 must
                // not allocate; found by fuzzing).
                let lines_of_kind = self.irqs.layout().count(kind);
                if s.start
                    .checked_add(s.count)
                    .is_none_or(|end| end > lines_of_kind)
                {
                    warn!(
                        "{}: SET_IRQS {kind:?} {}+{} is outside its {lines_of_kind} lines",
                        self.name, s.start, s.count
                    );
                    return err(libc::EINVAL);
                }
                let lines: Vec<Option<EventFd>> = if fds.is_empty() {
                    (0..s.count).map(|_| None).collect()
                } else if fds.len() == s.count as usize {
                    let mut v = Vec::with_capacity(fds.len());
                    for fd in fds {
                        v.push(Some(to_eventfd(fd).inspect_err(|_| {
                            warn!("{}: SET_IRQS fd is not an eventfd", self.name);
                        })?));
                    }
                    v
                } else {
                    warn!(
                        "{}: SET_IRQS count {} with {} fds",
                        self.name,
                        s.count,
                        fds.len()
                    );
                    return err(libc::EINVAL);
                };
                match action {
                    IRQ_SET_ACTION_TRIGGER => self.irqs.set_eventfds(kind, s.start, lines),
                    IRQ_SET_ACTION_UNMASK => self.irqs.set_unmask_eventfd(kind, s.start, lines),
                    _ => return err(libc::EINVAL),
                }
                .map_err(irq_err)?;
            }
        }
        Ok((vec![], vec![]))
    }

    fn access_check(
        &self,
        region: PciRegion,
        offset: u64,
        len: usize,
        write: bool,
    ) -> Result<(), i32> {
        if len > self.config.max_data_xfer_size as usize {
            return err(libc::E2BIG);
        }
        let index = match region {
            PciRegion::Bar(b) => usize::from(b),
            PciRegion::Rom => 6,
            PciRegion::Config => 7,
            PciRegion::Vga => 8,
        };
        let (size, read, write_ok) = self.region_limits.get(index).copied().unwrap_or_default();
        let info = unidev_core::pci::RegionInfo {
            size,
            read,
            write: write_ok,
            mmap: None,
        };
        check_access(region, &info, offset, len, write).map_err(|e| {
            warn!("{}: {e}", self.name);
            e.errno()
        })
    }

    fn region_read(&mut self, p: &[u8]) -> Result<Reply, i32> {
        let (a, rest) = self.parse(RegionAccess::decode(p))?;
        if !rest.is_empty() {
            return err(libc::EINVAL);
        }
        let region = region_of(a.region).ok_or(libc::EINVAL)?;
        self.access_check(region, a.offset, a.count as usize, false)?;
        self.dma.publish();
        let mut data = vec![0u8; a.count as usize];
        self.lock_device()
            .read(region, a.offset, &mut data)
            .map_err(|e| {
                warn!("{}: read {region:?}+{:#x}: {e}", self.name, a.offset);
                e.errno()
            })?;
        Ok((a.encode(&data), vec![]))
    }

    fn write_one(&mut self, region_index: u32, offset: u64, data: &[u8]) -> Result<(), i32> {
        let region = region_of(region_index).ok_or(libc::EINVAL)?;
        self.access_check(region, offset, data.len(), true)?;
        self.dma.publish();
        self.lock_device().write(region, offset, data).map_err(|e| {
            warn!("{}: write {region:?}+{offset:#x}: {e}", self.name);
            e.errno()
        })
    }

    fn region_write(&mut self, p: &[u8]) -> Result<Reply, i32> {
        let (a, data) = self.parse(RegionAccess::decode(p))?;
        if data.len() != a.count as usize {
            warn!(
                "{}: REGION_WRITE count {} but {} data bytes",
                self.name,
                a.count,
                data.len()
            );
            return err(libc::EINVAL);
        }
        self.write_one(a.region, a.offset, data)?;
        Ok((a.encode(&[]), vec![]))
    }

    fn region_write_multi(&mut self, p: &[u8]) -> Result<Reply, i32> {
        let entries = self.parse(decode_write_multi(p))?;
        for e in &entries {
            self.write_one(e.region, e.offset, &e.data[..e.count as usize])?;
        }
        let mut w = Writer::default();
        w.u64(entries.len() as u64);
        Ok((w.finish(), vec![]))
    }

    fn reset(&mut self, p: &[u8]) -> Result<Reply, i32> {
        if !p.is_empty() {
            return err(libc::EINVAL);
        }
        let mut dev = self.lock_device();
        if !dev.can_reset() {
            return err(libc::ENOTSUP);
        }
        info!("{}: device reset", self.name);
        dev.reset();
        Ok((vec![], vec![]))
    }

    /// Handle whatever the client already sent, then report whether it has hung up.
    /// Used when a new client knocks while this one looks attached: a client that sent
    /// posted writes and closed still gets its writes applied, and then makes room.
    pub fn finish_if_gone(&mut self) -> bool {
        while self.sock.pending_bytes() > 0 {
            if self.serve_one() == SessionState::Closed {
                return true;
            }
        }
        let mut pfd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd with a zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
    }

    /// Shut the connection down (the socket's handler then sees the hang-up).
    pub fn shutdown(&self) {
        let _ = self.sock.stream().shutdown(std::net::Shutdown::Both);
    }

    /// The client is gone: drop its maps and eventfds, keep the device state.
    pub fn close(&mut self) {
        let maps = self.dma.unmap_all();
        self.dma.set_message_path(None);
        self.irqs.disable_all();
        self.lock_device().client_detached();
        let _ = self.sock.stream().shutdown(std::net::Shutdown::Both);
        info!("{}: session closed ({maps} DMA maps dropped)", self.name);
    }
}

/// The PCI region for VFIO region index `index`.
pub fn region_of(index: u32) -> Option<PciRegion> {
    match index {
        0..=5 => Some(PciRegion::Bar(index as u8)),
        6 => Some(PciRegion::Rom),
        7 => Some(PciRegion::Config),
        8 => Some(PciRegion::Vga),
        _ => None,
    }
}

/// Accept `fd` as an interrupt eventfd only if it is one (writing 8 bytes to anything
/// else would corrupt it).
fn to_eventfd(fd: OwnedFd) -> Result<EventFd, i32> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|_| libc::EINVAL)?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return err(libc::EINVAL);
    }
    // SAFETY: we own `fd` (into_raw_fd hands over ownership) and it is an eventfd.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) })
}
