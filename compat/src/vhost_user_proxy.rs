//! A [`VirtioDevice`] whose queues are run by an external vhost-user backend process.
//!
//! unidev is the vhost-user *frontend* here (the `vhost` crate's [`Frontend`]): the
//! transport in front of the device (vfio-user through `VirtioPci`, for one) drives the
//! [`VirtioDevice`] calls, and the proxy turns them into vhost-user messages to an
//! existing, unmodified backend process (qemu-storage-daemon's vhost-user-blk export,
//! vhost-device-rng, virtiofsd, ...):
//!
//! | `VirtioDevice` call | vhost-user messages |
//! |---|---|
//! | [`VhostUserProxy::connect`] | SET_OWNER, GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM |
//! | `features` | the backend's features minus `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30) |
//! | `set_driver_features` | SET_FEATURES (plus bit 30 when protocol features were negotiated) |
//! | `read_config` / `write_config` | GET_CONFIG / SET_CONFIG (CONFIG protocol feature; else zeros / ignored) — behind the device model of the transport (below) |
//! | every memory snapshot change | SET_MEM_TABLE |
//! | `start_queue` | SET_VRING_NUM, _ADDR, _BASE, _CALL, _KICK, _ENABLE(1) |
//! | `set_queue_call` | SET_VRING_CALL |
//! | `stop_queue` | GET_VRING_BASE |
//! | `reset` | GET_VRING_BASE per running queue, RESET_DEVICE when offered |
//!
//! # No copies
//!
//! Client memory is passed on, never copied: each region of the device's
//! [`DmaSpace`] snapshot is an `mmap` of a file descriptor the client sent (a memfd, a
//! hugetlbfs file); the proxy sends that same descriptor in SET_MEM_TABLE, with the
//! region's IOVA as guest physical address and the address of the mapping *in this
//! process* as the frontend virtual address. Ring addresses are translated IOVA → this
//! process's address through the same snapshot. The kick eventfd the transport signals
//! on a notify write, and the call eventfd (the client's MSI-X irqfd when it has one) are
//! handed to the backend as they are, so neither kicks nor completions pass through
//! this process.
//!
//! # Config space: the device model decides
//!
//! Behind vhost-user, QEMU's device model decides which config accesses reach the
//! backend; behind unidev, the transport's device model does (`unidev_core::virtio::config`,
//! which `VirtioPci` and VDUSE put in front of every device): the proxy reports whether
//! the backend serves its config (`serves_config`: the CONFIG protocol feature) and
//! forwards what it is given. So virtio-scsi's `sense_size`/`cdb_size`, which Linux writes
//! at probe and vhost-device-scsi answers with a panic, never reach the backend, as with
//! QEMU's vhost-user-scsi.
//!
//! # Limits
//!
//! * Maps a client made *without* a file descriptor (vfio-user DMA_READ/DMA_WRITE
//!   memory) are not in the snapshot and cannot be passed on: rings or buffers there are
//!   unreachable for the backend (a ring there fails `start_queue` with
//!   [`QueueError::BadRings`]; a buffer there fails in the backend).
//! * vhost-user has no per-region permission: read-only maps are passed on like the
//!   others (the backend maps the descriptor as it likes).
//! * SET_MEM_TABLE carries at most 8 regions (the `vhost` crate's limit); a snapshot
//!   with more is not sent (logged) and the backend keeps its previous table.
//! * vhost-user has no empty memory table: when the snapshot becomes empty the backend
//!   keeps its previous table (queues are stopped by then).
//! * The largest queue size cannot be asked for (vhost-user has no such query): it is
//!   [`ProxyOptions::max_queue_size`], 256 by default.
//!
//! # Backend death
//!
//! Every message has a socket timeout ([`ProxyOptions::timeout`]). A socket error or
//! timeout marks the session dead: the error is logged, the operation fails
//! ([`QueueError::Backend`], `None` from `stop_queue`, zeros from `read_config`) and the
//! proxy stops talking to the socket. [`VhostUserProxy::is_alive`] reports it;
//! [`VhostUserProxy::reconnect`] connects again and replays the negotiated state.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use log::{debug, error, info, warn};
use unidev_core::memory::{DmaSpace, GuestMemorySnapshot};
use unidev_core::sync::lock;
use unidev_core::virtio::{DeviceHealth, QueueConfig, QueueError, VirtioDevice};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `VHOST_USER_F_PROTOCOL_FEATURES`: a vhost-user bit, never shown to the driver.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Largest config space GET_CONFIG / SET_CONFIG can carry (vhost-user's
/// `VHOST_USER_CONFIG_SIZE`).
pub const CONFIG_SPACE_MAX: u32 = 256;

/// Most regions SET_MEM_TABLE can carry.
pub const MAX_MEM_TABLE_REGIONS: usize = 8;

/// Protocol features the proxy uses when the backend offers them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// Tunables of a proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyOptions {
    /// Largest queue size offered to the driver (vhost-user cannot ask the backend).
    pub max_queue_size: u16,
    /// Socket send/receive timeout for every message; a backend that does not answer
    /// in time is considered dead.
    pub timeout: Duration,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            max_queue_size: 256,
            timeout: Duration::from_secs(5),
        }
    }
}

/// One connection to the backend and what was negotiated on it.
struct Session {
    fe: Frontend,
    /// Protocol features acked by both sides.
    protocol: VhostUserProtocolFeatures,
}

/// Where a running queue is, to restart it after a reconnect.
struct Running {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
}

#[derive(Default)]
struct QueueSlot {
    running: Option<Running>,
    call: Option<EventFd>,
}

/// One region as last sent in SET_MEM_TABLE: (IOVA, size, our address, file offset).
type TableKey = (u64, u64, u64, u64);

struct Inner {
    session: Option<Session>,
    /// The backend's features, protocol bit included.
    backend_features: u64,
    /// The driver's features as last accepted (no protocol bit).
    driver_features: Option<u64>,
    /// The memory table the backend has now.
    table: Vec<TableKey>,
    queues: Vec<QueueSlot>,
}

/// A virtio device whose queues run in an external vhost-user backend process.
pub struct VhostUserProxy {
    socket: PathBuf,
    virtio_id: u32,
    num_queues: usize,
    options: ProxyOptions,
    dma: Arc<DmaSpace>,
    /// Signalled by the backend when a queue has no call fd: nobody listens.
    spare_call: EventFd,
    /// Failed when the backend hangs up or its connection breaks: the transport tells
    /// the driver the device needs a reset.
    health: Arc<DeviceHealth>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for VhostUserProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserProxy")
            .field("socket", &self.socket)
            .field("virtio_id", &self.virtio_id)
            .field("num_queues", &self.num_queues)
            .finish()
    }
}

/// Whether a `vhost` error means the connection is unusable (as opposed to a refusal).
fn is_fatal(e: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as U;
    match e {
        vhost::Error::VhostUserProtocol(u) => !matches!(
            u,
            U::InvalidParam
                | U::InvalidOperation(_)
                | U::InactiveFeature(_)
                | U::InactiveOperation(_)
                | U::BackendInternalError
                | U::FeatureMismatch
        ),
        _ => true,
    }
}

fn other(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{what}: {e}"))
}

/// Whether the peer of `fd` hung up (or the socket has an error).
fn peer_gone(fd: std::os::fd::RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd for the duration of the call; timeout 0 never blocks.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// Open a session: connect, SET_OWNER, features, protocol features, queue count.
fn open_session(socket: &Path, num_queues: usize, timeout: Duration) -> io::Result<(Session, u64)> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut fe = Frontend::from_stream(stream, num_queues as u64);
    fe.set_owner().map_err(|e| other("SET_OWNER", e))?;
    let features = fe.get_features().map_err(|e| other("GET_FEATURES", e))?;
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
        let offered = fe
            .get_protocol_features()
            .map_err(|e| other("GET_PROTOCOL_FEATURES", e))?;
        protocol = offered & wanted_protocol_features();
        fe.set_protocol_features(protocol)
            .map_err(|e| other("SET_PROTOCOL_FEATURES", e))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // Every message that has no reply of its own is acknowledged, so refusals
            // are seen where they happen.
            fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let n = fe.get_queue_num().map_err(|e| other("GET_QUEUE_NUM", e))?;
        if n < num_queues as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the backend has {n} queues, {num_queues} wanted"),
            ));
        }
    } else if num_queues > 1 {
        warn!("backend does not offer MQ; assuming it has {num_queues} queues");
    }
    info!(
        "vhost-user backend {}: features {features:#x}, protocol features {:#x}",
        socket.display(),
        protocol.bits()
    );
    Ok((Session { fe, protocol }, features))
}

/// The memory table for `snapshot`: every fd-backed region, as the backend must map it.
fn table_of(mem: &GuestMemoryMmap) -> (Vec<VhostUserMemoryRegionInfo>, Vec<TableKey>) {
    let mut infos = Vec::new();
    let mut keys = Vec::new();
    for region in mem.iter() {
        match VhostUserMemoryRegionInfo::from_guest_region(region) {
            Ok(info) => {
                keys.push((
                    info.guest_phys_addr,
                    info.memory_size,
                    info.userspace_addr,
                    info.mmap_offset,
                ));
                infos.push(info);
            }
            Err(e) => warn!(
                "region at {:#x} cannot be passed to the backend: {e}",
                region.start_addr().0
            ),
        }
    }
    (infos, keys)
}

/// This process's address of `gpa..gpa+len`, which must lie in one region.
fn host_addr(mem: &GuestMemoryMmap, gpa: u64, len: u64) -> Option<u64> {
    let end = gpa.checked_add(len)?;
    mem.iter().find_map(|r| {
        let start = r.start_addr().0;
        let r_end = start.checked_add(r.len())?;
        (gpa >= start && end <= r_end).then(|| r.as_ptr() as u64 + (gpa - start))
    })
}

impl VhostUserProxy {
    /// Connect to the vhost-user backend listening on `socket` (virtio device type
    /// `virtio_id`, `num_queues` queues) with default options, and pass it the memory of
    /// `dma` from now on.
    pub fn connect(
        socket: &Path,
        virtio_id: u32,
        num_queues: usize,
        dma: Arc<DmaSpace>,
    ) -> io::Result<Arc<Self>> {
        Self::connect_with(socket, virtio_id, num_queues, dma, ProxyOptions::default())
    }

    /// [`connect`](Self::connect) with explicit options.
    pub fn connect_with(
        socket: &Path,
        virtio_id: u32,
        num_queues: usize,
        dma: Arc<DmaSpace>,
        options: ProxyOptions,
    ) -> io::Result<Arc<Self>> {
        if num_queues == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a virtio device needs at least one queue",
            ));
        }
        let max = options.max_queue_size;
        if max == 0 || !max.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("maximum queue size {max} is not a power of two"),
            ));
        }
        let (session, backend_features) = open_session(socket, num_queues, options.timeout)?;
        let proxy = Arc::new(VhostUserProxy {
            socket: socket.to_path_buf(),
            virtio_id,
            num_queues,
            options,
            dma: dma.clone(),
            spare_call: EventFd::new(EFD_NONBLOCK)?,
            health: Arc::new(DeviceHealth::new(format!(
                "vhost-user-proxy {}",
                socket.display()
            ))?),
            inner: Mutex::new(Inner {
                session: Some(session),
                backend_features,
                driver_features: None,
                table: Vec::new(),
                queues: (0..num_queues).map(|_| QueueSlot::default()).collect(),
            }),
        });
        // Memory that is already there, then every later change.
        {
            let mut inner = proxy.lock();
            proxy.sync_mem_table(&mut inner, &dma.snapshot(), false);
        }
        let weak: Weak<VhostUserProxy> = Arc::downgrade(&proxy);
        dma.subscribe(Arc::new(move |snap: &GuestMemorySnapshot| {
            if let Some(p) = weak.upgrade() {
                let mut inner = p.lock();
                // Only while rings run (stopped rings get the current table at
                // start_queue): a client remaps memory freely while the device is
                // stopped (SeaBIOS does, after driving the disk itself).
                let mem = snap.memory();
                let covered = |a: u64| mem.find_region(vm_memory::GuestAddress(a)).is_some();
                let running: Vec<&Running> = inner
                    .queues
                    .iter()
                    .filter_map(|q| q.running.as_ref())
                    .collect();
                // While rings run, never send a table that drops them (the client is in
                // the middle of an unmap/remap): libvhost-user backends abort on that.
                // The remap that follows brings a table that covers them again.
                let keeps_rings = running
                    .iter()
                    .all(|r| covered(r.desc) && covered(r.avail) && covered(r.used));
                if !running.is_empty() && keeps_rings {
                    drop(mem);
                    p.sync_mem_table(&mut inner, snap, false);
                } else {
                    // Not sent: make sure the next sync sends whatever table is current
                    // (a new mapping may reuse the old addresses with a new fd).
                    inner.table.clear();
                }
            }
        }));
        Ok(proxy)
    }

    /// The socket this proxy talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Whether the backend connection is usable: no socket error so far and the peer
    /// has not hung up.
    pub fn is_alive(&self) -> bool {
        let mut inner = self.lock();
        self.check_alive(&mut inner)
    }

    fn check_alive(&self, inner: &mut Inner) -> bool {
        let gone = match &inner.session {
            None => return false,
            Some(s) => peer_gone(std::os::fd::AsRawFd::as_raw_fd(&s.fe)),
        };
        if gone {
            error!(
                "vhost-user backend {} hung up; its queues stop",
                self.socket.display()
            );
            inner.session = None;
            self.health.fail("the vhost-user backend hung up");
        }
        !gone
    }

    /// Run one exchange with the backend. A connection-level failure ends the session.
    fn exchange<T>(
        &self,
        inner: &mut Inner,
        what: &str,
        f: impl FnOnce(&mut Session) -> vhost::Result<T>,
    ) -> io::Result<T> {
        if !self.check_alive(inner) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                format!("{what}: the vhost-user backend is gone"),
            ));
        }
        let Some(session) = inner.session.as_mut() else {
            return Err(io::Error::from(io::ErrorKind::NotConnected));
        };
        match f(session) {
            Ok(v) => Ok(v),
            Err(e) => {
                if is_fatal(&e) {
                    error!(
                        "vhost-user backend {}: {what} failed: {e}; connection closed",
                        self.socket.display()
                    );
                    inner.session = None;
                    self.health.fail(format!(
                        "the vhost-user backend's connection broke ({what})"
                    ));
                } else {
                    warn!(
                        "vhost-user backend {}: {what} refused: {e}",
                        self.socket.display()
                    );
                }
                Err(other(what, e))
            }
        }
    }

    /// Send the snapshot's memory table if it differs from what the backend has (or
    /// always, with `force`).
    fn sync_mem_table(&self, inner: &mut Inner, snap: &GuestMemorySnapshot, force: bool) {
        let mem = snap.memory();
        let (infos, keys) = table_of(&mem);
        if !force && keys == inner.table {
            return;
        }
        if infos.is_empty() {
            // vhost-user has no empty table; the backend keeps the previous one.
            inner.table = keys;
            return;
        }
        if infos.len() > MAX_MEM_TABLE_REGIONS {
            error!(
                "{} fd-backed regions; SET_MEM_TABLE carries at most {MAX_MEM_TABLE_REGIONS}: \
                 the backend keeps its previous table",
                infos.len()
            );
            return;
        }
        // `mem` (and so every region's file) stays alive until the message is sent.
        match self.exchange(inner, "SET_MEM_TABLE", |s| s.fe.set_mem_table(&infos)) {
            Ok(_) => {
                debug!("memory table sent: {} regions", infos.len());
                inner.table = keys;
            }
            Err(e) => warn!("{e}"),
        }
    }

    fn call_fd<'a>(&'a self, slot: &'a QueueSlot) -> &'a EventFd {
        slot.call.as_ref().unwrap_or(&self.spare_call)
    }

    /// Set up queue `index` on the backend from `run` (and the queue's call fd).
    fn send_queue(
        &self,
        inner: &mut Inner,
        index: usize,
        run: &Running,
        base: u16,
    ) -> Result<(), QueueError> {
        let backend = |source| QueueError::Backend { index, source };
        let (desc, avail, used) = {
            let snap = self.dma.snapshot();
            let mem = snap.memory();
            let n = u64::from(run.size);
            let desc = host_addr(&mem, run.desc, 16 * n);
            let avail = host_addr(&mem, run.avail, 6 + 2 * n);
            let used = host_addr(&mem, run.used, 6 + 8 * n);
            match (desc, avail, used) {
                // Alignment of virtio 1.2 2.7 (split rings), as the backend sees them.
                (Some(d), Some(a), Some(u)) if d % 16 == 0 && a % 2 == 0 && u % 4 == 0 => (d, a, u),
                _ => return Err(QueueError::BadRings(index)),
            }
        };
        let config = VringConfigData {
            queue_max_size: self.options.max_queue_size,
            queue_size: run.size,
            flags: 0,
            desc_table_addr: desc,
            used_ring_addr: used,
            avail_ring_addr: avail,
            log_addr: None,
        };
        let call = self
            .call_fd(&inner.queues[index])
            .try_clone()
            .map_err(backend)?;
        let enable = inner.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0
            && inner.driver_features.is_some();
        self.exchange(inner, "SET_VRING_NUM", |s| {
            s.fe.set_vring_num(index, run.size)
        })
        .map_err(backend)?;
        self.exchange(inner, "SET_VRING_ADDR", |s| {
            s.fe.set_vring_addr(index, &config)
        })
        .map_err(backend)?;
        self.exchange(inner, "SET_VRING_BASE", |s| {
            s.fe.set_vring_base(index, base)
        })
        .map_err(backend)?;
        self.exchange(inner, "SET_VRING_CALL", |s| {
            s.fe.set_vring_call(index, &call)
        })
        .map_err(backend)?;
        self.exchange(inner, "SET_VRING_KICK", |s| {
            s.fe.set_vring_kick(index, &run.kick)
        })
        .map_err(backend)?;
        if enable {
            self.exchange(inner, "SET_VRING_ENABLE", |s| {
                s.fe.set_vring_enable(index, true)
            })
            .map_err(backend)?;
        }
        Ok(())
    }

    fn send_features(&self, inner: &mut Inner, features: u64) -> io::Result<()> {
        let protocol = inner.backend_features & VHOST_USER_F_PROTOCOL_FEATURES;
        self.exchange(inner, "SET_FEATURES", |s| {
            s.fe.set_features(features | protocol)
        })
    }

    /// The backend's config (GET_CONFIG) at `offset` into `data` (zeroed by the caller),
    /// when it has the CONFIG protocol feature.
    fn read_backend_config(&self, inner: &mut Inner, offset: u32, data: &mut [u8]) {
        let has_config = inner
            .session
            .as_ref()
            .is_some_and(|s| s.protocol.contains(VhostUserProtocolFeatures::CONFIG));
        if !has_config || offset >= CONFIG_SPACE_MAX || data.is_empty() {
            return;
        }
        let len = data.len().min((CONFIG_SPACE_MAX - offset) as usize);
        // Ask from offset 0, as QEMU's frontend always does: libvhost-user based
        // backends (qemu-storage-daemon's exports) ignore the offset field.
        let whole = offset as usize + len;
        let res = self.exchange(inner, "GET_CONFIG", |s| {
            s.fe.get_config(
                0,
                whole as u32,
                VhostUserConfigFlags::empty(),
                &vec![0u8; whole],
            )
        });
        match res {
            Ok((_, payload)) => {
                let part = payload.get(offset as usize..).unwrap_or(&[]);
                let n = part.len().min(len);
                data[..n].copy_from_slice(&part[..n]);
            }
            // The backend's config may be shorter than asked: zeros past its end.
            Err(e) => debug!("config read {offset:#x}+{len}: {e}"),
        }
    }

    /// Close the connection to the backend (a vhost-user backend typically exits when
    /// its frontend leaves). Later operations fail until [`reconnect`](Self::reconnect).
    pub fn disconnect(&self) {
        let mut inner = self.lock();
        for q in &mut inner.queues {
            q.running = None;
        }
        inner.session = None;
    }

    /// Connect to the socket again (after the backend process was restarted) and replay
    /// what was negotiated: features, the memory table, and the running queues (resumed
    /// at the used ring's index: requests that were in flight when the old process died
    /// are submitted again). Best effort: the first failure is returned.
    pub fn reconnect(&self) -> io::Result<()> {
        let mut inner = self.lock();
        inner.session = None;
        let (session, features) =
            open_session(&self.socket, self.num_queues, self.options.timeout)?;
        if features != inner.backend_features {
            warn!(
                "reconnected backend offers features {features:#x}, was {:#x}",
                inner.backend_features
            );
        }
        inner.backend_features = features;
        inner.session = Some(session);
        self.health.clear();
        if let Some(f) = inner.driver_features {
            self.send_features(&mut inner, f & features)?;
        }
        inner.table.clear();
        self.sync_mem_table(&mut inner, &self.dma.snapshot(), true);
        if inner.session.is_none() {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        }
        for index in 0..self.num_queues {
            let Some(run) = inner.queues[index].running.take() else {
                continue;
            };
            let mut used_idx = [0u8; 2];
            let base = match self.dma.read(run.used + 2, &mut used_idx) {
                Ok(()) => u16::from_le_bytes(used_idx),
                Err(e) => {
                    warn!("queue {index}: cannot read the used index ({e}); resuming at 0");
                    0
                }
            };
            let res = self.send_queue(&mut inner, index, &run, base);
            inner.queues[index].running = Some(run);
            res.map_err(|e| other("restarting queue", e))?;
        }
        info!(
            "reconnected to vhost-user backend {}",
            self.socket.display()
        );
        Ok(())
    }
}

impl VirtioDevice for VhostUserProxy {
    fn device_type(&self) -> u32 {
        self.virtio_id
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.options.max_queue_size
    }

    fn features(&self) -> u64 {
        self.lock().backend_features & !VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn health(&self) -> Option<Arc<DeviceHealth>> {
        Some(self.health.clone())
    }

    fn serves_config(&self) -> bool {
        self.lock()
            .session
            .as_ref()
            .is_some_and(|s| s.protocol.contains(VhostUserProtocolFeatures::CONFIG))
    }

    fn read_config(&self, offset: u32, data: &mut [u8]) {
        data.fill(0);
        let mut inner = self.lock();
        self.read_backend_config(&mut inner, offset, data);
    }

    fn write_config(&self, offset: u32, data: &[u8]) {
        let mut inner = self.lock();
        let has_config = inner
            .session
            .as_ref()
            .is_some_and(|s| s.protocol.contains(VhostUserProtocolFeatures::CONFIG));
        if !has_config || data.is_empty() {
            return;
        }
        let _ = self.exchange(&mut inner, "SET_CONFIG", |s| {
            s.fe.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
        });
    }

    fn set_driver_features(&self, features: u64) {
        let mut inner = self.lock();
        let features = features & inner.backend_features & !VHOST_USER_F_PROTOCOL_FEATURES;
        inner.driver_features = Some(features);
        if let Err(e) = self.send_features(&mut inner, features) {
            warn!("driver features {features:#x} not passed on: {e}");
        }
    }

    fn start_queue(&self, index: usize, config: QueueConfig) -> Result<(), QueueError> {
        if index >= self.num_queues {
            return Err(QueueError::NoSuchQueue(index));
        }
        let max = self.options.max_queue_size;
        if config.size == 0 || !config.size.is_power_of_two() || config.size > max {
            return Err(QueueError::BadSize {
                index,
                size: config.size,
                max,
            });
        }
        let mut inner = self.lock();
        if inner.queues[index].running.is_some() {
            // Restarting a running queue: stop it on the backend first.
            let _ = self.exchange(&mut inner, "GET_VRING_BASE", |s| s.fe.get_vring_base(index));
            inner.queues[index].running = None;
        }
        // The transport publishes before starting queues, but unmaps do not notify:
        // make sure the backend has the current table.
        self.sync_mem_table(&mut inner, &self.dma.snapshot(), false);
        if let Some(call) = config.call {
            inner.queues[index].call = Some(call);
        }
        let run = Running {
            size: config.size,
            desc: config.desc,
            avail: config.avail,
            used: config.used,
            kick: config.kick,
        };
        self.send_queue(&mut inner, index, &run, config.next_avail)?;
        inner.queues[index].running = Some(run);
        Ok(())
    }

    fn set_queue_call(&self, index: usize, call: Option<EventFd>) {
        let mut inner = self.lock();
        let Some(slot) = inner.queues.get_mut(index) else {
            return;
        };
        slot.call = call;
        if slot.running.is_none() {
            return; // Sent at start.
        }
        let fd = match self.call_fd(&inner.queues[index]).try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                warn!("queue {index}: cannot pass the call fd on: {e}");
                return;
            }
        };
        let _ = self.exchange(&mut inner, "SET_VRING_CALL", |s| {
            s.fe.set_vring_call(index, &fd)
        });
    }

    fn stop_queue(&self, index: usize) -> Option<u16> {
        let mut inner = self.lock();
        inner.queues.get_mut(index)?.running.take()?;
        self.exchange(&mut inner, "GET_VRING_BASE", |s| s.fe.get_vring_base(index))
            .ok()
            .map(|base| base as u16)
    }

    fn reset(&self) {
        for index in 0..self.num_queues {
            let _ = self.stop_queue(index);
        }
        // Tried again: a backend still gone fails the device at the next exchange.
        self.health.clear();
        let mut inner = self.lock();
        inner.driver_features = None;
        let reset_device = inner
            .session
            .as_ref()
            .is_some_and(|s| s.protocol.contains(VhostUserProtocolFeatures::RESET_DEVICE));
        if reset_device {
            let _ = self.exchange(&mut inner, "RESET_DEVICE", |s| s.fe.reset_device());
        }
        // Without RESET_DEVICE (RESET_OWNER is deprecated) the stopped rings are the
        // reset; SET_FEATURES is sent again at the next FEATURES_OK.
    }
}
