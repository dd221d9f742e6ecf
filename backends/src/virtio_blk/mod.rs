//! virtio-blk (virtio 1.2 section 5.2) on a raw image file or a block device.
//!
//! Written only against rust-vmm's `VhostUserBackend` trait (the `&self` flavour, so one
//! `Arc<VirtioBlk>` serves every worker thread), it runs unchanged over every unidev
//! transport and in vhost-user-backend's own `VhostUserDaemon`.
//!
//! * One worker thread per queue (`queues_per_thread()` = `1 << i`); each thread has its
//!   own scratch space (descriptor lists, used entries, an O_DIRECT bounce buffer), so
//!   the data path allocates nothing once warm.
//! * Requests: IN, OUT, FLUSH (`fdatasync`, completed only after it returns; once an
//!   `fdatasync` of a file used through the page cache failed, every later one is failed
//!   too, see the I/O engine's `Disk::flush`), GET_ID,
//!   DISCARD (hole punching, `BLKDISCARD` on block devices), WRITE_ZEROES (zero range,
//!   hole punching when the driver allows unmap, or plain zero writes). Until the driver
//!   negotiates VIRTIO_BLK_F_FLUSH the device is write-through, as QEMU is.
//! * Data moves with `preadv`/`pwritev` straight between the file and guest memory (the
//!   iovecs point into vm-memory's bounds-checked volatile slices); with O_DIRECT,
//!   requests whose guest buffers break the file's alignment rules go through an aligned
//!   bounce buffer instead.
//! * Every descriptor chain is parsed defensively, as a byte stream (virtio 1.x framing:
//!   the 16-byte header may share a descriptor with data or span two): a malformed chain
//!   completes with IOERR when its last byte is device-writable, and with a zero-length
//!   used entry otherwise. Nothing a driver sends makes the device panic, allocate
//!   without bound or loop forever.
//!
//! Three parts, with a seam between the device and its I/O:
//! * this module — the `VhostUserBackend` glue: options, config space, features, queue
//!   handling (taking chains from the ring, running each request, completing it) and
//!   what each request type means: range checks, limits, read-only, write-through;
//! * `request` — the wire format: the chain walk into a parsed request, the header,
//!   DISCARD/WRITE_ZEROES segments, status values; it knows no file;
//! * `io` — the I/O engine, `Disk`: reads, writes, flushes, discards and writes zeroes
//!   over guest-memory segments at byte offsets (`preadv`/`pwritev`, O_DIRECT bounce
//!   buffers, `fdatasync` error stickiness); it knows no virtio ring and no wire format.

mod io;
mod request;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use log::{debug, warn};
use unidev_core::sync;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use self::io::{stream_write, BounceBuffer, Disk, DiskError, DiskResult, Seg, BOUNCE_ALIGN};
use self::request::{
    parse, read_dwz_segment, read_header, Request, Status, DWZ_SEGMENT_SIZE, GET_ID_BYTES,
    HEADER_SIZE, MAX_CHAIN_SEGS, S_IOERR, S_OK, S_UNSUPP,
};

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = unidev_core::virtio::spec::VIRTIO_ID_BLOCK;

const SECTOR_SHIFT: u32 = 9;
const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
const CONFIG_SIZE: usize = std::mem::size_of::<virtio_blk_config>();
/// Largest data transfer of one request (QEMU's limit is about 2 GiB); larger: IOERR.
const MAX_REQUEST_BYTES: u64 = 1 << 30;
/// Largest queue the device accepts (virtio's split-ring maximum).
const MAX_QUEUE_SIZE: u16 = 32768;
const MAX_DISCARD_SECTORS: u32 = 1 << 22; // 2 GiB per segment
const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 16; // 32 MiB per segment (may be written out)
const MAX_DWZ_SEGS: u32 = 16;
/// Chains taken from the available ring under one lock, and descriptors kept meanwhile.
const BATCH_CHAINS: usize = 64;
const BATCH_SEGS: usize = 4096;
/// Largest configuration read served (vhost-user's own limit is 4 KiB).
const MAX_CONFIG_READ: usize = 4096;

type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// How to open and present the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkOptions {
    /// Raw image file or block device.
    pub path: PathBuf,
    /// Open read-only and advertise VIRTIO_BLK_F_RO: writes, discards and write-zeroes
    /// complete with IOERR.
    pub readonly: bool,
    /// Request queues, one worker thread each (1..=64).
    pub queues: u16,
    /// Largest queue size the driver may choose (a power of two, 2..=32768).
    pub queue_size: u16,
    /// Logical block size reported to the driver: 512 or 4096. With 4096, requests not
    /// aligned to it fail with IOERR. Sector numbers stay in 512-byte units.
    pub logical_block_size: u32,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
    /// Returned by GET_ID (truncated to 20 bytes). Default: the file name.
    pub serial: Option<String>,
    /// A null device: reads, writes and flushes complete with OK without touching the
    /// file or the data buffers (ranges are still checked against the capacity, which
    /// the file gives). For measuring transports without I/O.
    pub null_io: bool,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            path: PathBuf::new(),
            readonly: false,
            queues: 1,
            queue_size: 256,
            logical_block_size: 512,
            direct: false,
            serial: None,
            null_io: false,
        }
    }
}

/// Per-queue working space, reused from batch to batch.
#[derive(Default)]
struct Scratch {
    segs: Vec<Seg>,
    reqs: Vec<Request>,
    used: Vec<(u16, u32)>,
    bounce: BounceBuffer,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            segs: Vec::with_capacity(BATCH_SEGS + MAX_CHAIN_SEGS),
            reqs: Vec::with_capacity(BATCH_CHAINS),
            used: Vec::with_capacity(BATCH_CHAINS),
            bounce: BounceBuffer::default(),
        }
    }
}

/// The virtio-blk backend.
pub struct VirtioBlk {
    disk: Disk,
    opts: BlkOptions,
    /// Capacity in 512-byte sectors.
    capacity: u64,
    serial: [u8; GET_ID_BYTES],
    config: [u8; CONFIG_SIZE],
    mem: RwLock<Option<Memory>>,
    event_idx: AtomicBool,
    /// VIRTIO_BLK_F_FLUSH negotiated: writes may stay in the host cache until FLUSH.
    writeback: AtomicBool,
    scratch: Vec<Mutex<Scratch>>,
    exit: Vec<Mutex<Option<EventNotifier>>>,
}

fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, msg)
}

fn validate(opts: &BlkOptions) -> std::io::Result<()> {
    if !(1..=64).contains(&opts.queues) {
        return Err(invalid(format!(
            "virtio-blk supports 1 to 64 queues, not {}",
            opts.queues
        )));
    }
    if !matches!(opts.logical_block_size, 512 | 4096) {
        return Err(invalid(format!(
            "the logical block size must be 512 or 4096, not {}",
            opts.logical_block_size
        )));
    }
    if opts.queue_size < 2 || opts.queue_size > MAX_QUEUE_SIZE || !opts.queue_size.is_power_of_two()
    {
        return Err(invalid(format!(
            "the queue size must be a power of two from 2 to {MAX_QUEUE_SIZE}, not {}",
            opts.queue_size
        )));
    }
    Ok(())
}

impl VirtioBlk {
    /// Open the disk described by `opts`.
    pub fn new(opts: BlkOptions) -> std::io::Result<Self> {
        validate(&opts)?;
        let (file, bytes, is_block_device) = io::open(&opts.path, opts.readonly, opts.direct)?;
        Self::with_file(file, bytes, is_block_device, opts)
    }

    /// A device on an already open `file` of `bytes` bytes.
    fn with_file(
        file: File,
        bytes: u64,
        is_block_device: bool,
        opts: BlkOptions,
    ) -> std::io::Result<Self> {
        validate(&opts)?;
        let lbs = u64::from(opts.logical_block_size);
        let disk = Disk::new(
            file,
            opts.path.clone(),
            is_block_device,
            opts.direct,
            opts.null_io,
        );
        let (dio_mem_align, dio_offset_align) = disk.dio_alignment();
        if opts.direct && (dio_offset_align > lbs || dio_mem_align > BOUNCE_ALIGN) {
            return Err(invalid(format!(
                "{}: O_DIRECT needs {dio_offset_align}-byte blocks here; \
                 use a logical block size of at least that",
                opts.path.display()
            )));
        }
        // Whole logical blocks only.
        let capacity = bytes / lbs * (lbs / SECTOR_SIZE);
        let mut serial = [0u8; GET_ID_BYTES];
        let name = opts.serial.clone().unwrap_or_else(|| {
            opts.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let n = name.len().min(GET_ID_BYTES);
        serial[..n].copy_from_slice(&name.as_bytes()[..n]);
        let physical = disk.physical_block_size();
        let config = config_bytes(&opts, capacity, physical);
        let threads = usize::from(opts.queues);
        Ok(VirtioBlk {
            disk,
            capacity,
            serial,
            config,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(false),
            scratch: (0..threads).map(|_| Mutex::new(Scratch::new())).collect(),
            exit: (0..threads).map(|_| Mutex::new(None)).collect(),
            opts,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    /// The options the device was opened with.
    pub fn options(&self) -> &BlkOptions {
        &self.opts
    }

    /// Wake every worker thread's exit event (the ones handed out by `exit_event`), as a
    /// daemon does to stop its workers.
    pub fn notify_exit(&self) {
        for slot in &self.exit {
            if let Some(n) = sync::lock(slot).as_ref() {
                if let Err(e) = n.notify() {
                    warn!("virtio-blk: cannot signal an exit event: {e}");
                }
            }
        }
    }

    fn memory(&self) -> Option<Memory> {
        sync::read(&self.mem).clone()
    }

    /// Take chains from `vring` until it is empty; returns whether any were taken.
    fn drain(
        &self,
        vring: &VringRwLock,
        m: &GuestMemoryMmap<()>,
        sc: &mut Scratch,
        event_idx: bool,
    ) -> bool {
        let mut any = false;
        loop {
            let Scratch {
                segs,
                reqs,
                used,
                bounce,
            } = &mut *sc;
            segs.clear();
            reqs.clear();
            used.clear();
            {
                let mut state = vring.get_mut();
                if !state.is_enabled() {
                    break;
                }
                let q = state.get_queue_mut();
                while reqs.len() < BATCH_CHAINS && segs.len() < BATCH_SEGS {
                    let Some(chain) = q.pop_descriptor_chain(m) else {
                        break;
                    };
                    let head = chain.head_index();
                    reqs.push(parse(head, chain, m, segs));
                }
            }
            if reqs.is_empty() {
                break;
            }
            any = true;
            for r in reqs.iter() {
                let len = match r.status {
                    None => {
                        debug!("virtio-blk: chain {} has no status byte", r.head);
                        0
                    }
                    Some(at) => {
                        let (status, written) = self.execute(m, segs, r, bounce);
                        match m.write_obj(status, at) {
                            Ok(()) => written + 1,
                            Err(_) => 0,
                        }
                    }
                };
                used.push((r.head, len));
            }
            let mut state = vring.get_mut();
            for &(head, len) in used.iter() {
                if let Err(e) = state.get_queue_mut().add_used(m, head, len) {
                    debug!("virtio-blk: cannot complete chain {head}: {e}");
                }
            }
            let notify = !event_idx || state.get_queue_mut().needs_notification(m).unwrap_or(true);
            if notify {
                if let Err(e) = state.signal_used_queue() {
                    warn!("virtio-blk: cannot signal the driver: {e}");
                }
            }
        }
        any
    }

    /// Run one well-framed request: its status, and the data bytes written into the
    /// chain (the status byte not counted).
    fn execute(
        &self,
        m: &GuestMemoryMmap<()>,
        segs: &[Seg],
        r: &Request,
        bounce: &mut BounceBuffer,
    ) -> (Status, u32) {
        if r.malformed || r.rbytes < HEADER_SIZE || r.wbytes == 0 {
            return (S_IOERR, 0);
        }
        let rd = &segs[r.readable.clone()];
        let wr = &segs[r.writable.clone()];
        let Some(header) = read_header(m, rd) else {
            return (S_IOERR, 0);
        };
        let (kind, sector) = (header.kind, header.sector);
        // Payload to the device (after the header), and from it (before the status).
        let out_len = r.rbytes - HEADER_SIZE;
        let in_len = r.wbytes - 1;
        match kind {
            VIRTIO_BLK_T_IN => {
                if out_len != 0 {
                    return (S_IOERR, 0);
                }
                match self.transfer(m, wr, 0, in_len, sector, false, bounce) {
                    S_OK => (S_OK, in_len as u32),
                    s => (s, 0),
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.opts.readonly || in_len != 0 {
                    return (S_IOERR, 0);
                }
                match self.transfer(m, rd, HEADER_SIZE, out_len, sector, true, bounce) {
                    S_OK => (self.write_through(), 0),
                    s => (s, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.opts.readonly {
                    return (S_OK, 0);
                }
                (status_of(self.disk.flush("flush")), 0)
            }
            VIRTIO_BLK_T_GET_ID => {
                if in_len == 0 {
                    return (S_IOERR, 0);
                }
                let n = (in_len as usize).min(GET_ID_BYTES);
                if stream_write(m, wr, 0, &self.serial[..n]) {
                    (S_OK, n as u32)
                } else {
                    (S_IOERR, 0)
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.opts.readonly || in_len != 0 {
                    return (S_IOERR, 0);
                }
                let zeroes = kind == VIRTIO_BLK_T_WRITE_ZEROES;
                match self.discard_write_zeroes(m, rd, out_len, zeroes, bounce) {
                    S_OK => (self.write_through(), 0),
                    s => (s, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// Without VIRTIO_BLK_F_FLUSH the driver cannot flush: make every write stable.
    fn write_through(&self) -> Status {
        if self.writeback.load(Ordering::Acquire) {
            S_OK
        } else {
            status_of(self.disk.flush("write-through"))
        }
    }

    /// Byte offset of `len` bytes at `sector` when they lie on the disk and respect the
    /// logical block size.
    fn check_range(&self, sector: u64, len: u64) -> Option<u64> {
        let lbs = u64::from(self.opts.logical_block_size);
        if len % lbs != 0 {
            return None;
        }
        let end = sector.checked_add(len >> SECTOR_SHIFT)?;
        if end > self.capacity || sector % (lbs >> SECTOR_SHIFT) != 0 {
            return None;
        }
        // sector <= capacity <= u64::MAX >> 9: no overflow.
        Some(sector << SECTOR_SHIFT)
    }

    /// Move `len` bytes between the disk at `sector` and bytes `skip..` of the stream
    /// `segs`, once they are checked against the request limit, the capacity and the
    /// logical block size.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &self,
        m: &GuestMemoryMmap<()>,
        segs: &[Seg],
        skip: u64,
        len: u64,
        sector: u64,
        write: bool,
        bounce: &mut BounceBuffer,
    ) -> Status {
        if len > MAX_REQUEST_BYTES {
            return S_IOERR;
        }
        let Some(offset) = self.check_range(sector, len) else {
            debug!("virtio-blk: {len} bytes at sector {sector}: out of range or unaligned");
            return S_IOERR;
        };
        status_of(if write {
            self.disk.write_vectored(m, segs, skip, len, offset, bounce)
        } else {
            self.disk.read_vectored(m, segs, skip, len, offset, bounce)
        })
    }

    /// DISCARD or WRITE_ZEROES: `payload` bytes of segments after the header.
    fn discard_write_zeroes(
        &self,
        m: &GuestMemoryMmap<()>,
        rd: &[Seg],
        payload: u64,
        zeroes: bool,
        bounce: &mut BounceBuffer,
    ) -> Status {
        if payload == 0 || payload % DWZ_SEGMENT_SIZE != 0 {
            return S_IOERR;
        }
        let count = payload / DWZ_SEGMENT_SIZE;
        if count > u64::from(MAX_DWZ_SEGS) {
            return S_UNSUPP;
        }
        let max = if zeroes {
            MAX_WRITE_ZEROES_SECTORS
        } else {
            MAX_DISCARD_SECTORS
        };
        // Check every segment before touching the disk.
        let mut ranges = [(0u64, 0u64, false); MAX_DWZ_SEGS as usize];
        for (i, range) in ranges.iter_mut().enumerate().take(count as usize) {
            let Some(segment) = read_dwz_segment(m, rd, i as u64) else {
                return S_IOERR;
            };
            let (sector, num, flags) = (segment.sector, segment.num_sectors, segment.flags);
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && !zeroes) {
                return S_UNSUPP;
            }
            if num > max {
                return S_IOERR;
            }
            let len = u64::from(num) << SECTOR_SHIFT;
            let Some(offset) = self.check_range(sector, len) else {
                return S_IOERR;
            };
            *range = (offset, len, unmap);
        }
        for &(offset, len, unmap) in &ranges[..count as usize] {
            if len == 0 {
                continue;
            }
            let s = status_of(if zeroes {
                self.disk.write_zeroes(offset, len, unmap, bounce)
            } else {
                self.disk.discard(offset, len)
            });
            if s != S_OK {
                return s;
            }
        }
        S_OK
    }
}

/// The virtio-blk status of a disk operation's result.
fn status_of(r: DiskResult) -> Status {
    match r {
        Ok(()) => S_OK,
        Err(DiskError::Unsupported) => S_UNSUPP,
        Err(DiskError::Failed) => S_IOERR,
    }
}

/// struct virtio_blk_config, little-endian, as bytes.
fn config_bytes(opts: &BlkOptions, capacity: u64, physical_block: u32) -> [u8; CONFIG_SIZE] {
    let lbs = opts.logical_block_size;
    let seg_max = u32::from(opts.queue_size.min(MAX_CHAIN_SEGS as u16)).saturating_sub(2);
    let physical_block_exp = if physical_block > lbs && physical_block.is_power_of_two() {
        (physical_block / lbs).trailing_zeros() as u8
    } else {
        0
    };
    let c = virtio_blk_config {
        capacity: capacity.to_le(),
        seg_max: seg_max.max(1).to_le(),
        blk_size: lbs.to_le(),
        physical_block_exp,
        alignment_offset: 0,
        min_io_size: 1u16.to_le(),
        opt_io_size: 0,
        num_queues: opts.queues.to_le(),
        max_discard_sectors: MAX_DISCARD_SECTORS.to_le(),
        max_discard_seg: MAX_DWZ_SEGS.to_le(),
        discard_sector_alignment: (lbs >> SECTOR_SHIFT).to_le(),
        max_write_zeroes_sectors: MAX_WRITE_ZEROES_SECTORS.to_le(),
        max_write_zeroes_seg: MAX_DWZ_SEGS.to_le(),
        write_zeroes_may_unmap: 1,
        ..Default::default()
    };
    let mut out = [0u8; CONFIG_SIZE];
    // SAFETY: virtio_blk_config is repr(C, packed) and made of integers only: its
    // CONFIG_SIZE bytes are all initialised and there is no padding.
    let bytes = unsafe {
        std::slice::from_raw_parts((&c as *const virtio_blk_config).cast::<u8>(), CONFIG_SIZE)
    };
    out.copy_from_slice(bytes);
    out
}

impl VhostUserBackend for VirtioBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.opts.queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.opts.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.opts.queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        if self.opts.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    fn acked_features(&self, features: u64) {
        self.writeback
            .store(features & (1 << VIRTIO_BLK_F_FLUSH) != 0, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&self) {
        self.event_idx.store(false, Ordering::Release);
        self.writeback.store(false, Ordering::Release);
        // Give back bounce buffers of idle queues (a busy one keeps its own).
        for slot in &self.scratch {
            if let Ok(mut sc) = slot.try_lock() {
                sc.bounce.release();
            }
        }
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let size = (size as usize).min(MAX_CONFIG_READ);
        let mut out = vec![0u8; size];
        let offset = offset as usize;
        if offset < CONFIG_SIZE {
            let n = (CONFIG_SIZE - offset).min(size);
            out[..n].copy_from_slice(&self.config[offset..offset + n]);
        }
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> std::io::Result<()> {
        // Nothing is writable: VIRTIO_BLK_F_CONFIG_WCE (writeback toggling) is not offered.
        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn update_memory(&self, mem: Memory) -> std::io::Result<()> {
        *sync::write(&self.mem) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.opts.queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A fresh pair per call: an exit signalled to an earlier daemon's worker must not
        // stop the next one.
        let (consumer, notifier) = match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => pair,
            Err(e) => {
                warn!("virtio-blk: cannot create an exit event: {e}");
                return None;
            }
        };
        if let Some(slot) = self.exit.get(thread_index) {
            *sync::lock(slot) = notifier.try_clone().ok();
        }
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        if !vring.get_ref().is_enabled() {
            return Ok(());
        }
        let Some(mem) = self.memory() else {
            return Ok(());
        };
        let guard = mem.memory();
        let m: &GuestMemoryMmap<()> = &guard;
        let slot = &self.scratch[thread_id.min(self.scratch.len() - 1)];
        let mut sc = sync::lock(slot);
        if !self.event_idx.load(Ordering::Acquire) {
            self.drain(vring, m, &mut sc, false);
            return Ok(());
        }
        crate::vring_loop::drain_with_event_idx("virtio-blk", vring, || {
            self.drain(vring, m, &mut sc, true)
        });
        Ok(())
    }
}
