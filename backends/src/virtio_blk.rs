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
//!   too, see `VirtioBlk::sync`), GET_ID,
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

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

const SECTOR_SHIFT: u32 = 9;
const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// struct virtio_blk_outhdr: le32 type, le32 reserved, le64 sector.
const HEADER_SIZE: u64 = 16;
/// struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
const DWZ_SEGMENT_SIZE: u64 = 16;
const GET_ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
const CONFIG_SIZE: usize = std::mem::size_of::<virtio_blk_config>();
/// Largest data transfer of one request (QEMU's limit is about 2 GiB); larger: IOERR.
const MAX_REQUEST_BYTES: u64 = 1 << 30;
/// Most descriptors of one chain that are kept; a longer chain completes with IOERR.
const MAX_CHAIN_SEGS: usize = 1024;
/// Largest queue the device accepts (virtio's split-ring maximum).
const MAX_QUEUE_SIZE: u16 = 32768;
const MAX_DISCARD_SECTORS: u32 = 1 << 22; // 2 GiB per segment
const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 16; // 32 MiB per segment (may be written out)
const MAX_DWZ_SEGS: u32 = 16;
/// Chains taken from the available ring under one lock, and descriptors kept meanwhile.
const BATCH_CHAINS: usize = 64;
const BATCH_SEGS: usize = 4096;
/// O_DIRECT bounce buffer (per queue, allocated on first use) and its alignment.
const BOUNCE_BYTES: usize = 1 << 20;
const BOUNCE_ALIGN: usize = 4096;
/// iovecs handed to one preadv/pwritev (kept on the stack).
const IOV_BATCH: usize = 128;
/// Largest configuration read served (vhost-user's own limit is 4 KiB).
const MAX_CONFIG_READ: usize = 4096;

type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

mod ioctls {
    // <linux/fs.h>
    vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, libc::size_t);
    vmm_sys_util::ioctl_io_nr!(BLKDISCARD, 0x12, 119);
}

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

/// One descriptor of a chain (non-zero length, inside guest memory).
#[derive(Clone, Copy, Debug)]
struct Seg {
    addr: u64,
    len: u32,
}

/// A descriptor chain taken from the available ring, parsed.
#[derive(Debug)]
struct Request {
    head: u16,
    /// Device-readable segments, as a range of `Scratch::segs`; then device-writable.
    readable: Range<usize>,
    writable: Range<usize>,
    rbytes: u64,
    wbytes: u64,
    /// The chain's last byte, when it is device-writable: where the status goes.
    status: Option<GuestAddress>,
    /// Breaks the framing rules: readable after writable, a zero-length descriptor, a
    /// buffer outside guest memory, too many descriptors.
    malformed: bool,
}

/// Per-queue working space, reused from batch to batch.
#[derive(Default)]
struct Scratch {
    segs: Vec<Seg>,
    reqs: Vec<Request>,
    used: Vec<(u16, u32)>,
    bounce: Vec<u8>,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            segs: Vec::with_capacity(BATCH_SEGS + MAX_CHAIN_SEGS),
            reqs: Vec::with_capacity(BATCH_CHAINS),
            used: Vec::with_capacity(BATCH_CHAINS),
            bounce: Vec::new(),
        }
    }
}

/// The aligned `BOUNCE_BYTES` window of `v`, allocated on first use.
fn bounce_buffer(v: &mut Vec<u8>) -> &mut [u8] {
    if v.len() < BOUNCE_BYTES + BOUNCE_ALIGN {
        *v = vec![0u8; BOUNCE_BYTES + BOUNCE_ALIGN];
    }
    let skew = (BOUNCE_ALIGN - v.as_ptr() as usize % BOUNCE_ALIGN) % BOUNCE_ALIGN;
    &mut v[skew..skew + BOUNCE_BYTES]
}

/// The virtio-blk backend.
pub struct VirtioBlk {
    file: File,
    opts: BlkOptions,
    /// Capacity in 512-byte sectors.
    capacity: u64,
    is_block_device: bool,
    /// O_DIRECT rules: buffer address alignment, and file offset/length alignment.
    dio_mem_align: usize,
    dio_offset_align: u64,
    serial: [u8; GET_ID_BYTES],
    config: [u8; CONFIG_SIZE],
    mem: RwLock<Option<Memory>>,
    event_idx: AtomicBool,
    /// VIRTIO_BLK_F_FLUSH negotiated: writes may stay in the host cache until FLUSH.
    writeback: AtomicBool,
    /// An `fdatasync` failed on a file used through the page cache: what the disk holds
    /// is unknown from then on, and no later flush may report success.
    sync_failed: AtomicBool,
    scratch: Vec<Mutex<Scratch>>,
    exit: Vec<Mutex<Option<EventNotifier>>>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn validate(opts: &BlkOptions) -> io::Result<()> {
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

/// Size in bytes, and whether it is a block device.
fn disk_size(file: &File) -> io::Result<(u64, bool)> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the valid pointer.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), ioctls::BLKGETSIZE64() as _, &mut size) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((size, true))
    } else if meta.file_type().is_file() {
        Ok((meta.len(), false))
    } else {
        Err(invalid("not a regular file or a block device".to_string()))
    }
}

fn ioctl_int(fd: RawFd, req: libc::c_ulong) -> Option<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int through the valid pointer.
    let r = unsafe { libc::ioctl(fd, req as _, &mut v) };
    (r == 0 && v > 0).then_some(v as u32)
}

/// O_DIRECT alignment (buffer address, file offset and length) for `file`.
fn dio_alignment(file: &File, is_block_device: bool) -> (usize, u64) {
    // SAFETY: all-zero is a valid `statx` value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx fills the struct it is given; the empty path with AT_EMPTY_PATH
    // names the open file itself.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        return (
            stx.stx_dio_mem_align.max(1) as usize,
            u64::from(stx.stx_dio_offset_align),
        );
    }
    if is_block_device {
        if let Some(ss) = ioctl_int(file.as_raw_fd(), libc::BLKSSZGET as libc::c_ulong) {
            return (ss as usize, u64::from(ss));
        }
    }
    (512, 512)
}

/// Pieces of guest memory covering bytes `skip..skip + len` of the stream `segs`.
fn window(segs: &[Seg], skip: u64, len: u64) -> impl Iterator<Item = (GuestAddress, usize)> + '_ {
    let mut skip = skip;
    let mut left = len;
    segs.iter().filter_map(move |s| {
        if left == 0 {
            return None;
        }
        let l = u64::from(s.len);
        if skip >= l {
            skip -= l;
            return None;
        }
        let n = (l - skip).min(left);
        let addr = GuestAddress(s.addr.wrapping_add(skip));
        skip = 0;
        left -= n;
        Some((addr, n as usize))
    })
}

/// Copy bytes `skip..skip + buf.len()` of the stream `segs` into `buf`.
fn stream_read(m: &GuestMemoryMmap<()>, segs: &[Seg], skip: u64, buf: &mut [u8]) -> bool {
    let mut done = 0;
    for (addr, n) in window(segs, skip, buf.len() as u64) {
        if m.read_slice(&mut buf[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Copy `buf` into bytes `skip..skip + buf.len()` of the stream `segs`.
fn stream_write(m: &GuestMemoryMmap<()>, segs: &[Seg], skip: u64, buf: &[u8]) -> bool {
    let mut done = 0;
    for (addr, n) in window(segs, skip, buf.len() as u64) {
        if m.write_slice(&buf[done..done + n], addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// preadv/pwritev all of `iov` at `offset`, resuming after short transfers.
fn rw_iovecs(fd: RawFd, iov: &mut [libc::iovec], mut offset: u64, write: bool) -> io::Result<()> {
    let mut i = 0;
    while i < iov.len() {
        let off = libc::off_t::try_from(offset).map_err(|_| invalid("offset".into()))?;
        let cnt = (iov.len() - i) as libc::c_int;
        // SAFETY: every iovec covers guest memory that vm-memory bounds-checked and that
        // stays mapped while the caller holds its memory snapshot; the kernel reads or
        // writes only those ranges.
        let r = unsafe {
            if write {
                libc::pwritev(fd, iov[i..].as_ptr(), cnt, off)
            } else {
                libc::preadv(fd, iov[i..].as_ptr(), cnt, off)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(if write {
                io::Error::new(io::ErrorKind::WriteZero, "the file took no more data")
            } else {
                io::Error::new(io::ErrorKind::UnexpectedEof, "end of file")
            });
        }
        let mut done = r as usize;
        offset += done as u64;
        while done > 0 && i < iov.len() {
            let v = &mut iov[i];
            if done >= v.iov_len {
                done -= v.iov_len;
                i += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(done).cast();
                v.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| invalid("offset".into()))?;
    let len = libc::off_t::try_from(len).map_err(|_| invalid("length".into()))?;
    loop {
        // SAFETY: fallocate on our own descriptor; no memory is passed.
        if unsafe { libc::fallocate(fd, mode, off, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The operation is not offered by this file system or device.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY | libc::EINVAL)
    )
}

type Status = u8;
const S_OK: Status = VIRTIO_BLK_S_OK as Status;
const S_IOERR: Status = VIRTIO_BLK_S_IOERR as Status;
const S_UNSUPP: Status = VIRTIO_BLK_S_UNSUPP as Status;

impl VirtioBlk {
    /// Open the disk described by `opts`.
    pub fn new(opts: BlkOptions) -> io::Result<Self> {
        validate(&opts)?;
        let mut o = OpenOptions::new();
        o.read(true).write(!opts.readonly);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(&opts.path).map_err(|e| {
            if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
                invalid(format!(
                    "{}: this file system refuses O_DIRECT (tmpfs, for one)",
                    opts.path.display()
                ))
            } else {
                e
            }
        })?;
        let (bytes, is_block_device) = disk_size(&file)?;
        Self::with_file(file, bytes, is_block_device, opts)
    }

    /// A device on an already open `file` of `bytes` bytes.
    fn with_file(
        file: File,
        bytes: u64,
        is_block_device: bool,
        opts: BlkOptions,
    ) -> io::Result<Self> {
        validate(&opts)?;
        let lbs = u64::from(opts.logical_block_size);
        let (dio_mem_align, dio_offset_align) = if opts.direct {
            dio_alignment(&file, is_block_device)
        } else {
            (1, 1)
        };
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
        let physical = if is_block_device {
            ioctl_int(file.as_raw_fd(), libc::BLKPBSZGET as libc::c_ulong).unwrap_or(0)
        } else {
            0
        };
        let config = config_bytes(&opts, capacity, physical);
        let threads = usize::from(opts.queues);
        Ok(VirtioBlk {
            file,
            capacity,
            is_block_device,
            dio_mem_align,
            dio_offset_align,
            serial,
            config,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            writeback: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
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
            if let Some(n) = slot.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
                if let Err(e) = n.notify() {
                    warn!("virtio-blk: cannot signal an exit event: {e}");
                }
            }
        }
    }

    fn memory(&self) -> Option<Memory> {
        self.mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
        bounce: &mut Vec<u8>,
    ) -> (Status, u32) {
        if r.malformed || r.rbytes < HEADER_SIZE || r.wbytes == 0 {
            return (S_IOERR, 0);
        }
        let rd = &segs[r.readable.clone()];
        let wr = &segs[r.writable.clone()];
        let mut hdr = [0u8; HEADER_SIZE as usize];
        if !stream_read(m, rd, 0, &mut hdr) {
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let mut s = [0u8; 8];
        s.copy_from_slice(&hdr[8..16]);
        let sector = u64::from_le_bytes(s);
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
                (self.sync("flush"), 0)
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

    /// Make the writes so far stable (`fdatasync`).
    ///
    /// After a failed `fdatasync` of a file written through the page cache (no
    /// O_DIRECT), Linux may have marked the pages it could not write back clean, or
    /// dropped them, and reports the error once: the next `fdatasync` succeeds although
    /// those writes never reached the disk. So the first failure is remembered and every
    /// later sync fails too, until the device is opened again (QEMU's file-posix does
    /// the same). With O_DIRECT the page cache holds none of the device's writes, and
    /// each sync stands alone.
    fn sync(&self, what: &str) -> Status {
        if self.opts.null_io {
            return S_OK;
        }
        if self.sync_failed.load(Ordering::Acquire) {
            debug!(
                "virtio-blk: {}: {what}: failed, an earlier sync failed",
                self.opts.path.display()
            );
            return S_IOERR;
        }
        match self.file.sync_data() {
            Ok(()) => S_OK,
            Err(e) => {
                warn!("virtio-blk: {}: {what}: {e}", self.opts.path.display());
                if !self.opts.direct && !self.sync_failed.swap(true, Ordering::AcqRel) {
                    warn!(
                        "virtio-blk: {}: writes may be lost in the host page cache; \
                         every later flush fails until the device is opened again",
                        self.opts.path.display()
                    );
                }
                S_IOERR
            }
        }
    }

    /// Without VIRTIO_BLK_F_FLUSH the driver cannot flush: make every write stable.
    fn write_through(&self) -> Status {
        if self.writeback.load(Ordering::Acquire) {
            S_OK
        } else {
            self.sync("write-through")
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

    /// Move `len` bytes between the file at `sector` and bytes `skip..` of the stream
    /// `segs`.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &self,
        m: &GuestMemoryMmap<()>,
        segs: &[Seg],
        skip: u64,
        len: u64,
        sector: u64,
        write: bool,
        bounce: &mut Vec<u8>,
    ) -> Status {
        if len > MAX_REQUEST_BYTES {
            return S_IOERR;
        }
        let Some(offset) = self.check_range(sector, len) else {
            debug!("virtio-blk: {len} bytes at sector {sector}: out of range or unaligned");
            return S_IOERR;
        };
        if len == 0 || self.opts.null_io {
            return S_OK;
        }
        let r = if self.opts.direct && !self.dio_aligned(m, segs, skip, len, offset) {
            self.bounced(m, segs, skip, len, offset, write, bounce)
        } else {
            match self.vectored(m, segs, skip, len, offset, write) {
                // The alignment rules were guessed wrong: the bounce buffer is safe.
                Err(e) if self.opts.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    self.bounced(m, segs, skip, len, offset, write, bounce)
                }
                r => r,
            }
        };
        match r {
            Ok(()) => S_OK,
            Err(e) => {
                warn!(
                    "virtio-blk: {}: {} of {len} bytes at sector {sector}: {e}",
                    self.opts.path.display(),
                    if write { "write" } else { "read" },
                );
                S_IOERR
            }
        }
    }

    /// Every guest buffer of the window satisfies O_DIRECT's alignment.
    fn dio_aligned(
        &self,
        m: &GuestMemoryMmap<()>,
        segs: &[Seg],
        skip: u64,
        len: u64,
        offset: u64,
    ) -> bool {
        let (ma, oa) = (self.dio_mem_align, self.dio_offset_align);
        if offset % oa != 0 || len % oa != 0 {
            return false;
        }
        window(segs, skip, len).all(|(addr, n)| {
            GuestMemoryBackend::get_slices(m, addr, n).all(|s| match s {
                Ok(s) => (s.ptr_guard().as_ptr() as usize) % ma == 0 && (s.len() as u64) % oa == 0,
                Err(_) => false,
            })
        })
    }

    /// preadv/pwritev directly between the file and guest memory.
    fn vectored(
        &self,
        m: &GuestMemoryMmap<()>,
        segs: &[Seg],
        skip: u64,
        len: u64,
        mut offset: u64,
        write: bool,
    ) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        let empty = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut iov = [empty; IOV_BATCH];
        let (mut n, mut batch) = (0, 0u64);
        for (addr, plen) in window(segs, skip, len) {
            for slice in GuestMemoryBackend::get_slices(m, addr, plen) {
                let slice = slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                iov[n] = libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: slice.len(),
                };
                n += 1;
                batch += slice.len() as u64;
                if n == IOV_BATCH {
                    rw_iovecs(fd, &mut iov[..n], offset, write)?;
                    offset += batch;
                    (n, batch) = (0, 0);
                }
            }
        }
        if n > 0 {
            rw_iovecs(fd, &mut iov[..n], offset, write)?;
        }
        Ok(())
    }

    /// Through the aligned bounce buffer, a chunk at a time (O_DIRECT).
    #[allow(clippy::too_many_arguments)]
    fn bounced(
        &self,
        m: &GuestMemoryMmap<()>,
        segs: &[Seg],
        skip: u64,
        len: u64,
        offset: u64,
        write: bool,
        bounce: &mut Vec<u8>,
    ) -> io::Result<()> {
        let buf = bounce_buffer(bounce);
        let fault = || io::Error::new(io::ErrorKind::InvalidInput, "buffer outside guest memory");
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE_BYTES as u64) as usize;
            let chunk = &mut buf[..n];
            if write {
                if !stream_read(m, segs, skip + done, chunk) {
                    return Err(fault());
                }
                self.file.write_all_at(chunk, offset + done)?;
            } else {
                self.file.read_exact_at(chunk, offset + done)?;
                if !stream_write(m, segs, skip + done, chunk) {
                    return Err(fault());
                }
            }
            done += n as u64;
        }
        Ok(())
    }

    /// DISCARD or WRITE_ZEROES: `payload` bytes of segments after the header.
    fn discard_write_zeroes(
        &self,
        m: &GuestMemoryMmap<()>,
        rd: &[Seg],
        payload: u64,
        zeroes: bool,
        bounce: &mut Vec<u8>,
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
            let mut raw = [0u8; DWZ_SEGMENT_SIZE as usize];
            if !stream_read(m, rd, HEADER_SIZE + i as u64 * DWZ_SEGMENT_SIZE, &mut raw) {
                return S_IOERR;
            }
            let mut s = [0u8; 8];
            s.copy_from_slice(&raw[0..8]);
            let sector = u64::from_le_bytes(s);
            let num = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
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
            let s = if zeroes {
                self.write_zeroes(offset, len, unmap, bounce)
            } else {
                self.discard(offset, len)
            };
            if s != S_OK {
                return s;
            }
        }
        S_OK
    }

    fn discard(&self, offset: u64, len: u64) -> Status {
        let fd = self.file.as_raw_fd();
        let r = if self.is_block_device {
            let range = [offset, len];
            // SAFETY: BLKDISCARD reads two u64 from the valid array.
            if unsafe { libc::ioctl(fd, ioctls::BLKDISCARD() as _, range.as_ptr()) } == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        } else {
            fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        };
        match r {
            Ok(()) => S_OK,
            Err(e) if unsupported(&e) => S_UNSUPP,
            Err(e) => {
                warn!("virtio-blk: {}: discard: {e}", self.opts.path.display());
                S_IOERR
            }
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, bounce: &mut Vec<u8>) -> Status {
        let fd = self.file.as_raw_fd();
        // Hole punching reads back as zeroes (files and, since Linux 4.9, block devices).
        if unmap
            && fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
            .is_ok()
        {
            return S_OK;
        }
        match fallocate(
            fd,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => return S_OK,
            Err(e) if unsupported(&e) => {}
            Err(e) => {
                warn!(
                    "virtio-blk: {}: write zeroes: {e}",
                    self.opts.path.display()
                );
                return S_IOERR;
            }
        }
        // Write them out.
        let buf = bounce_buffer(bounce);
        buf.fill(0);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE_BYTES as u64) as usize;
            if let Err(e) = self.file.write_all_at(&buf[..n], offset + done) {
                warn!(
                    "virtio-blk: {}: write zeroes: {e}",
                    self.opts.path.display()
                );
                return S_IOERR;
            }
            done += n as u64;
        }
        S_OK
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

/// Record the descriptors of one chain in `segs`.
fn parse(
    head: u16,
    descs: impl Iterator<Item = Descriptor>,
    m: &GuestMemoryMmap<()>,
    segs: &mut Vec<Seg>,
) -> Request {
    let start = segs.len();
    let mut first_writable = None;
    let (mut rbytes, mut wbytes) = (0u64, 0u64);
    let mut malformed = false;
    let mut stored = 0usize;
    let mut last: Option<Descriptor> = None;
    // virtio-queue ends the iteration after the queue size (or indirect table size)
    // descriptors, on an index out of range, and past 4 GiB in total.
    for d in descs {
        last = Some(d);
        let len = d.len();
        if len == 0 {
            malformed = true;
            continue;
        }
        if d.is_write_only() {
            first_writable.get_or_insert(segs.len());
            wbytes += u64::from(len);
        } else {
            if first_writable.is_some() {
                malformed = true; // readable after writable
            }
            rbytes += u64::from(len);
        }
        if stored == MAX_CHAIN_SEGS {
            malformed = true;
            continue;
        }
        if !GuestMemoryBackend::check_range(m, d.addr(), len as usize) {
            malformed = true;
        }
        segs.push(Seg {
            addr: d.addr().0,
            len,
        });
        stored += 1;
    }
    let end = segs.len();
    let fw = first_writable.unwrap_or(end);
    // A chain that stopped on a descriptor still pointing onwards was cut short (a
    // loop, a bad index): its real end, hence its status byte, is unknown.
    let status = last
        .filter(|d| !d.has_next() && d.is_write_only() && d.len() > 0)
        .and_then(|d| d.addr().0.checked_add(u64::from(d.len()) - 1))
        .map(GuestAddress);
    Request {
        head,
        readable: start..fw,
        writable: fw..end,
        rbytes,
        wbytes,
        status,
        malformed,
    }
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
                sc.bounce = Vec::new();
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

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing is writable: VIRTIO_BLK_F_CONFIG_WCE (writeback toggling) is not offered.
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = Some(mem);
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
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = notifier.try_clone().ok();
        }
        Some((consumer, notifier))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
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
        let mut sc = slot.lock().unwrap_or_else(PoisonError::into_inner);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const QSIZE: u16 = 64;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    /// Guest memory: two adjacent 8 MiB regions.
    const REGION: u64 = 8 << 20;
    const MEM_END: u64 = 2 * REGION;
    const HDR: u64 = 0x10_0000;
    const STATUS: u64 = 0x18_0000;
    const DATA: u64 = 0x20_0000;
    const TABLE: u64 = 0x40_0000;
    const IMAGE: usize = 1 << 20;
    const R: bool = false;
    const W: bool = true;

    /// A split virtqueue in guest memory, driven as a driver would.
    struct Rig {
        mem: Memory,
        vring: VringRwLock,
        call: EventFd,
        avail_idx: u16,
        used_seen: u16,
        next_desc: u16,
        base: (u64, u64, u64),
    }

    impl Rig {
        fn new(b: &VirtioBlk, event_idx: bool) -> Rig {
            let gm = GuestMemoryMmap::<()>::from_ranges(&[
                (GuestAddress(0), REGION as usize),
                (GuestAddress(REGION), REGION as usize),
            ])
            .unwrap();
            let mem = GuestMemoryAtomic::new(gm);
            b.update_memory(mem.clone()).unwrap();
            b.set_event_idx(event_idx);
            Self::with_memory(mem, (DESC, AVAIL, USED), event_idx)
        }

        fn with_memory(mem: Memory, base: (u64, u64, u64), event_idx: bool) -> Rig {
            let vring = VringRwLock::new(mem.clone(), QSIZE).unwrap();
            vring.set_queue_size(QSIZE);
            vring.set_queue_info(base.0, base.1, base.2).unwrap();
            vring.set_queue_ready(true);
            vring.set_queue_event_idx(event_idx);
            vring.set_enabled(true);
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            // SAFETY: the File takes sole ownership of a fresh duplicate.
            let f = unsafe { File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
            vring.set_call(Some(f));
            Rig {
                mem,
                vring,
                call,
                avail_idx: 0,
                used_seen: 0,
                next_desc: 0,
                base,
            }
        }

        fn m(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMemoryMmap<()>> {
            self.mem.memory()
        }

        fn write_desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let m = self.m();
            let d = GuestAddress(table + 16 * u64::from(i));
            m.write_obj(addr, d).unwrap();
            m.write_obj(len, GuestAddress(d.0 + 8)).unwrap();
            m.write_obj(flags, GuestAddress(d.0 + 12)).unwrap();
            m.write_obj(next, GuestAddress(d.0 + 14)).unwrap();
        }

        /// Lay out a chain of (addr, len, device-writable) in the descriptor table and
        /// publish it; returns its head.
        fn post(&mut self, chain: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, w)) in chain.iter().enumerate() {
                let idx = (head + i as u16) % QSIZE;
                let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                if i + 1 < chain.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                self.write_desc(self.base.0, idx, addr, len, flags, (idx + 1) % QSIZE);
            }
            self.next_desc = (head + chain.len() as u16) % QSIZE;
            self.publish(head);
            head
        }

        fn publish(&mut self, head: u16) {
            let m = self.m();
            let slot = u64::from(self.avail_idx % QSIZE);
            m.write_obj(head, GuestAddress(self.base.1 + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            m.write_obj(self.avail_idx, GuestAddress(self.base.1 + 2))
                .unwrap();
        }

        fn kick(&self, b: &VirtioBlk) {
            b.handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
                .unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.m().read_obj(GuestAddress(self.base.2 + 2)).unwrap()
        }

        /// Used entry `i`: (head, len).
        fn used(&self, i: u16) -> (u32, u32) {
            let at = self.base.2 + 4 + 8 * u64::from(i % QSIZE);
            let m = self.m();
            (
                m.read_obj(GuestAddress(at)).unwrap(),
                m.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        }

        /// Post one chain, kick, and return the used length it got.
        fn run(&mut self, b: &VirtioBlk, chain: &[(u64, u32, bool)]) -> u32 {
            let head = self.post(chain);
            self.kick(b);
            assert_eq!(
                self.used_idx(),
                self.used_seen.wrapping_add(1),
                "one chain, one used entry"
            );
            let (id, len) = self.used(self.used_seen);
            assert_eq!(id, u32::from(head));
            self.used_seen = self.used_seen.wrapping_add(1);
            len
        }

        fn header(&self, at: u64, kind: u32, sector: u64) {
            let m = self.m();
            m.write_obj(kind.to_le(), GuestAddress(at)).unwrap();
            m.write_obj(0u32, GuestAddress(at + 4)).unwrap();
            m.write_obj(sector.to_le(), GuestAddress(at + 8)).unwrap();
        }

        /// A request: header at HDR, the given data descriptors, status at STATUS.
        /// Returns (status, used length).
        fn request(
            &mut self,
            b: &VirtioBlk,
            kind: u32,
            sector: u64,
            data: &[(u64, u32, bool)],
        ) -> (u8, u32) {
            self.header(HDR, kind, sector);
            self.m().write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let mut chain = vec![(HDR, 16, R)];
            chain.extend_from_slice(data);
            chain.push((STATUS, 1, W));
            let len = self.run(b, &chain);
            (self.status(), len)
        }

        fn status(&self) -> u8 {
            self.m().read_obj(GuestAddress(STATUS)).unwrap()
        }

        fn fill(&self, at: u64, bytes: &[u8]) {
            self.m().write_slice(bytes, GuestAddress(at)).unwrap();
        }

        fn read(&self, at: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.m().read_slice(&mut v, GuestAddress(at)).unwrap();
            v
        }

        fn signalled(&self) -> bool {
            self.call.read().is_ok()
        }
    }

    struct Image(PathBuf);

    impl Image {
        fn new(name: &str) -> Image {
            Self::in_dir(&std::env::temp_dir(), name)
        }

        fn in_dir(dir: &Path, name: &str) -> Image {
            let p = dir.join(format!("unidev-blk-{}-{name}.img", std::process::id()));
            std::fs::write(&p, vec![0x5au8; IMAGE]).unwrap();
            Image(p)
        }

        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }

        fn opts(&self) -> BlkOptions {
            BlkOptions {
                path: self.0.clone(),
                ..BlkOptions::default()
            }
        }

        fn open(&self, f: impl FnOnce(&mut BlkOptions)) -> VirtioBlk {
            let mut o = self.opts();
            f(&mut o);
            VirtioBlk::new(o).unwrap()
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| seed.wrapping_mul(17).wrapping_add((i / 3) as u8))
            .collect()
    }

    /// (sector, num_sectors, flags)
    type DwzSeg = (u64, u32, u32);

    fn dwz(r: &Rig, at: u64, segs: &[DwzSeg]) -> u32 {
        for (i, &(sector, num, flags)) in segs.iter().enumerate() {
            let a = at + 16 * i as u64;
            r.m().write_obj(sector.to_le(), GuestAddress(a)).unwrap();
            r.m().write_obj(num.to_le(), GuestAddress(a + 8)).unwrap();
            r.m()
                .write_obj(flags.to_le(), GuestAddress(a + 12))
                .unwrap();
        }
        16 * segs.len() as u32
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn read_write_flush_get_id_with_and_without_event_idx() {
        for event_idx in [false, true] {
            let img = Image::new(&format!("rw-{event_idx}"));
            let b = img.open(|_| {});
            let mut r = Rig::new(&b, event_idx);
            let data = pattern(1, 1024);
            r.fill(DATA, &data);
            let (st, len) = r.request(&b, VIRTIO_BLK_T_OUT, 3, &[(DATA, 1024, R)]);
            assert_eq!((st, len), (OK, 1), "a write returns just the status byte");
            assert!(r.signalled(), "the driver is notified");
            let disk = img.bytes();
            assert_eq!(&disk[3 * 512..5 * 512], &data[..]);
            assert_eq!((disk[3 * 512 - 1], disk[5 * 512]), (0x5a, 0x5a));

            let (st, len) = r.request(&b, VIRTIO_BLK_T_IN, 2, &[(DATA, 1536, W)]);
            assert_eq!((st, len), (OK, 1537), "data and status");
            let got = r.read(DATA, 1536);
            assert_eq!(&got[..512], &[0x5a; 512][..]);
            assert_eq!(&got[512..], &data[..]);

            let (st, len) = r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]);
            assert_eq!((st, len), (OK, 1));

            let (st, len) = r.request(&b, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
            assert_eq!((st, len), (OK, 21));
            let id = r.read(DATA, 20);
            let name = img.0.file_name().unwrap().to_string_lossy().into_owned();
            assert_eq!(&id[..], &name.as_bytes()[..20]);
        }
    }

    #[test]
    fn null_io_completes_without_touching_file_or_buffers() {
        let img = Image::new("null-io");
        let b = img.open(|o| o.null_io = true);
        let mut r = Rig::new(&b, true);
        r.fill(DATA, &pattern(3, 4096));
        let (st, len) = r.request(&b, VIRTIO_BLK_T_OUT, 8, &[(DATA, 4096, R)]);
        assert_eq!((st, len), (OK, 1));
        assert!(
            img.bytes().iter().all(|&x| x == 0x5a),
            "the file is untouched"
        );
        r.fill(DATA, &[0xee; 4096]);
        let (st, len) = r.request(&b, VIRTIO_BLK_T_IN, 8, &[(DATA, 4096, W)]);
        assert_eq!((st, len), (OK, 4097), "reads report the data length");
        assert_eq!(
            r.read(DATA, 4096),
            vec![0xee; 4096],
            "the buffer is untouched"
        );
        assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
        // Ranges are still checked.
        let past_end = b.capacity_sectors();
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, past_end, &[(DATA, 512, W)])
                .0,
            IOERR
        );
    }

    #[test]
    fn get_id_serial_option_and_short_buffer() {
        let img = Image::new("serial");
        let b = img.open(|o| o.serial = Some("disk-7".into()));
        let mut r = Rig::new(&b, false);
        r.fill(DATA, &[0xee; 20]);
        let (st, len) = r.request(&b, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, W)]);
        assert_eq!((st, len), (OK, 21));
        assert_eq!(&r.read(DATA, 20)[..], b"disk-7\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        let (st, len) = r.request(&b, VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 4, W)]);
        assert_eq!((st, len), (OK, 5));
        // No buffer at all.
        assert_eq!(r.request(&b, VIRTIO_BLK_T_GET_ID, 0, &[]).0, IOERR);
    }

    #[test]
    fn framing_does_not_matter() {
        let img = Image::new("framing");
        let b = img.open(|_| {});
        let mut r = Rig::new(&b, false);
        // Header and data in one readable descriptor.
        r.header(HDR, VIRTIO_BLK_T_OUT, 8);
        let data = pattern(2, 512);
        r.fill(HDR + 16, &data);
        assert_eq!(r.run(&b, &[(HDR, 16 + 512, R), (STATUS, 1, W)]), 1);
        assert_eq!(r.status(), OK);
        assert_eq!(&img.bytes()[8 * 512..9 * 512], &data[..]);
        // Header split over two descriptors, data and status in one writable one.
        r.header(HDR, VIRTIO_BLK_T_IN, 8);
        assert_eq!(
            r.run(&b, &[(HDR, 8, R), (HDR + 8, 8, R), (DATA, 513, W)]),
            513
        );
        assert_eq!(&r.read(DATA, 512)[..], &data[..]);
        assert_eq!(r.read(DATA + 512, 1)[0], OK);
        // Data crossing from one guest memory region into the next.
        let across = REGION - 512;
        let data = pattern(3, 1024);
        r.fill(across, &data);
        let (st, _) = r.request(&b, VIRTIO_BLK_T_OUT, 20, &[(across, 1024, R)]);
        assert_eq!(st, OK);
        assert_eq!(&img.bytes()[20 * 512..22 * 512], &data[..]);
        r.fill(across, &[0; 1024]);
        let (st, len) = r.request(&b, VIRTIO_BLK_T_IN, 20, &[(across, 1024, W)]);
        assert_eq!((st, len), (OK, 1025));
        assert_eq!(r.read(across, 1024), data);
    }

    #[test]
    fn many_segments_and_indirect_tables() {
        let img = Image::new("segs");
        let b = img.open(|_| {});
        let mut r = Rig::new(&b, false);
        // 40 data descriptors of 512 bytes (more than one iovec batch when split).
        let data = pattern(4, 40 * 512);
        r.fill(DATA, &data);
        let segs: Vec<_> = (0..40).map(|i| (DATA + 1024 * i, 512, R)).collect();
        for i in 0..40 {
            r.fill(
                DATA + 1024 * i,
                &data[512 * i as usize..512 * (i as usize + 1)],
            );
        }
        let (st, _) = r.request(&b, VIRTIO_BLK_T_OUT, 100, &segs);
        assert_eq!(st, OK);
        assert_eq!(&img.bytes()[100 * 512..140 * 512], &data[..]);

        // The same read through an indirect table.
        r.header(HDR, VIRTIO_BLK_T_IN, 100);
        let n = 42u16;
        for i in 0..n {
            let (addr, len, flags) = match i {
                0 => (HDR, 16, 0),
                41 => (STATUS, 1, VRING_DESC_F_WRITE),
                _ => (
                    DATA + 0x10_0000 + 512 * u64::from(i - 1),
                    512,
                    VRING_DESC_F_WRITE,
                ),
            };
            let next = if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
            r.write_desc(TABLE, i, addr, len, (flags | next) as u16, i + 1);
        }
        let head = r.next_desc;
        r.write_desc(
            DESC,
            head,
            TABLE,
            16 * u32::from(n),
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        r.next_desc += 1;
        r.publish(head);
        r.kick(&b);
        assert_eq!(r.used(r.used_seen), (u32::from(head), 40 * 512 + 1));
        r.used_seen += 1;
        assert_eq!(r.status(), OK);
        assert_eq!(r.read(DATA + 0x10_0000, 40 * 512), data);
    }

    #[test]
    fn several_requests_in_one_kick() {
        for event_idx in [false, true] {
            let img = Image::new(&format!("batch-{event_idx}"));
            let b = img.open(|_| {});
            let mut r = Rig::new(&b, event_idx);
            let mut heads = Vec::new();
            for i in 0..6u64 {
                let hdr = HDR + 32 * i;
                let st = STATUS + i;
                let data = DATA + 0x1000 * i;
                r.fill(data, &pattern(i as u8, 512));
                r.header(hdr, VIRTIO_BLK_T_OUT, 10 + i);
                heads.push(r.post(&[(hdr, 16, R), (data, 512, R), (st, 1, W)]));
            }
            // And one unknown request in the same batch.
            r.header(HDR + 0x800, 0x77, 0);
            heads.push(r.post(&[(HDR + 0x800, 16, R), (STATUS + 0x80, 1, W)]));
            r.kick(&b);
            assert_eq!(r.used_idx(), 7);
            for (i, &h) in heads.iter().enumerate() {
                assert_eq!(r.used(i as u16), (u32::from(h), 1));
            }
            let m = r.m();
            for i in 0..6u64 {
                assert_eq!(m.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap(), OK);
            }
            assert_eq!(
                m.read_obj::<u8>(GuestAddress(STATUS + 0x80)).unwrap(),
                UNSUPP
            );
            let disk = img.bytes();
            for i in 0..6usize {
                let at = (10 + i) * 512;
                assert_eq!(&disk[at..at + 512], &pattern(i as u8, 512)[..]);
            }
            assert!(r.signalled());
        }
    }

    #[test]
    fn event_idx_notifications_follow_used_event() {
        let img = Image::new("evidx");
        let b = img.open(|_| {});
        let mut r = Rig::new(&b, true);
        let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(QSIZE));
        let avail_event = GuestAddress(USED + 4 + 8 * u64::from(QSIZE));
        // The driver wants an interrupt once used idx passes 0.
        r.m().write_obj(0u16, used_event).unwrap();
        assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
        assert!(r.signalled());
        // ... and then not before entry 10.
        r.m().write_obj(10u16, used_event).unwrap();
        assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
        assert!(!r.signalled(), "suppressed by used_event");
        // The device asks to be kicked for the next available entry.
        assert_eq!(r.m().read_obj::<u16>(avail_event).unwrap(), r.avail_idx);
    }

    #[test]
    fn a_broken_available_index_does_not_spin() {
        for event_idx in [false, true] {
            let img = Image::new(&format!("spin-{event_idx}"));
            let b = Arc::new(img.open(|_| {}));
            let r = Rig::new(&b, event_idx);
            // 1000 entries ahead of the device on a 64-entry ring.
            r.m().write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            let (b2, vring) = (b.clone(), r.vring.clone());
            std::thread::spawn(move || {
                b2.handle_event(0, EventSet::IN, &[vring], 0).unwrap();
                let _ = tx.send(());
            });
            rx.recv_timeout(Duration::from_secs(10))
                .expect("handle_event returned");
            assert_eq!(r.used_idx(), 0);
        }
    }

    #[test]
    fn discard_and_write_zeroes_reach_the_file() {
        let img = Image::new("dz");
        let b = img.open(|_| {});
        let mut r = Rig::new(&b, false);
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        // Write zeroes, without and with unmap; discard over two segments.
        let cases: [(u32, &[DwzSeg]); 3] = [
            (VIRTIO_BLK_T_WRITE_ZEROES, &[(8, 4, 0)]),
            (VIRTIO_BLK_T_WRITE_ZEROES, &[(24, 3, unmap)]),
            (VIRTIO_BLK_T_DISCARD, &[(40, 8, 0), (64, 1, 0)]),
        ];
        for (kind, segs) in cases {
            let len = dwz(&r, DATA, segs);
            assert_eq!(r.request(&b, kind, 0, &[(DATA, len, R)]), (OK, 1));
            let disk = img.bytes();
            assert_eq!(disk.len(), IMAGE, "the size is kept");
            for &(sector, num, _) in segs {
                let (s, e) = (
                    sector as usize * 512,
                    (sector as usize + num as usize) * 512,
                );
                assert!(
                    disk[s..e].iter().all(|&x| x == 0),
                    "type {kind} zeroed {sector}"
                );
                assert_eq!(
                    (disk[s - 1], disk[e]),
                    (0x5a, 0x5a),
                    "type {kind} stays in range"
                );
            }
        }
        let before = img.bytes();
        // Discard with the unmap flag, unknown flags, too many segments: UNSUPP.
        let len = dwz(&r, DATA, &[(0, 1, unmap)]);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_DISCARD, 0, &[(DATA, len, R)]).0,
            UNSUPP
        );
        let len = dwz(&r, DATA, &[(0, 1, 2)]);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, len, R)])
                .0,
            UNSUPP
        );
        let many: Vec<_> = (0..17).map(|i| (i, 1, 0)).collect();
        let len = dwz(&r, DATA, &many);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_DISCARD, 0, &[(DATA, len, R)]).0,
            UNSUPP
        );
        // Out of range, over the limit, a bad payload: IOERR, and nothing changes (even
        // for the valid first segment).
        let len = dwz(&r, DATA, &[(0, 1, 0), (2047, 2, 0)]);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, len, R)])
                .0,
            IOERR
        );
        let len = dwz(&r, DATA, &[(0, MAX_WRITE_ZEROES_SECTORS + 1, 0)]);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA, len, R)])
                .0,
            IOERR
        );
        let len = dwz(&r, DATA, &[(u64::MAX - 1, 4, 0)]);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_DISCARD, 0, &[(DATA, len, R)]).0,
            IOERR
        );
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_DISCARD, 0, &[(DATA, 12, R)]).0,
            IOERR
        );
        assert_eq!(r.request(&b, VIRTIO_BLK_T_DISCARD, 0, &[]).0, IOERR);
        assert_eq!(img.bytes(), before);
    }

    #[test]
    fn read_only() {
        let img = Image::new("ro");
        let b = img.open(|o| o.readonly = true);
        let f = b.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            f & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
            0
        );
        let mut r = Rig::new(&b, false);
        r.fill(DATA, &[1; 512]);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]),
            (IOERR, 1)
        );
        let len = dwz(&r, DATA + 0x1000, &[(0, 1, 0)]);
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            let (st, _) = r.request(&b, kind, 0, &[(DATA + 0x1000, len, R)]);
            assert_eq!(st, IOERR);
        }
        assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
        assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);
        assert_eq!(r.read(DATA, 512), vec![0x5a; 512]);
        assert_eq!(img.bytes(), vec![0x5a; IMAGE], "the image is untouched");
    }

    #[test]
    fn logical_blocks_of_4096_bytes() {
        let img = Image::new("4k");
        let b = img.open(|o| o.logical_block_size = 4096);
        assert_eq!(b.get_config(20, 4), 4096u32.to_le_bytes());
        assert_eq!(b.get_config(44, 4), 8u32.to_le_bytes(), "discard alignment");
        assert_eq!(b.capacity_sectors(), 2048, "still 512-byte sectors");
        let mut r = Rig::new(&b, false);
        // Unaligned sector, unaligned length.
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 1, &[(DATA, 4096, W)]).0,
            IOERR
        );
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 8, &[(DATA, 512, W)]).0,
            IOERR
        );
        let len = dwz(&r, DATA + 0x2000, &[(8, 4, 0)]);
        let (st, _) = r.request(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA + 0x2000, len, R)]);
        assert_eq!(st, IOERR);
        // Aligned.
        r.fill(DATA, &pattern(5, 4096));
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_OUT, 16, &[(DATA, 4096, R)]).0,
            OK
        );
        assert_eq!(&img.bytes()[16 * 512..24 * 512], &pattern(5, 4096)[..]);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 2040, &[(DATA, 4096, W)]).0,
            OK
        );
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 2048, &[(DATA, 4096, W)]).0,
            IOERR
        );
    }

    #[test]
    fn out_of_range_and_unknown_requests() {
        let img = Image::new("range");
        let b = img.open(|_| {});
        let mut r = Rig::new(&b, false);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 2047, &[(DATA, 1024, W)]),
            (IOERR, 1)
        );
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 2048, &[(DATA, 512, W)]).0,
            IOERR
        );
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_OUT, u64::MAX, &[(DATA, 512, R)])
                .0,
            IOERR
        );
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_OUT, 1 << 55, &[(DATA, 512, R)])
                .0,
            IOERR
        );
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 2047, &[(DATA, 512, W)]).0,
            OK
        );
        // Data not a multiple of 512 bytes.
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 100, W)]).0,
            IOERR
        );
        // Unknown types, and ones this device does not offer.
        for kind in [0x77, 2, 14, 16, 0x8000_0000] {
            assert_eq!(r.request(&b, kind, 0, &[]), (UNSUPP, 1), "type {kind:#x}");
        }
        assert_eq!(img.bytes(), vec![0x5a; IMAGE]);
    }

    #[test]
    fn malformed_chains_never_panic() {
        let img = Image::new("bad");
        let b = img.open(|_| {});
        let mut r = Rig::new(&b, false);
        let m = |r: &Rig| r.m();
        r.header(HDR, VIRTIO_BLK_T_IN, 0);
        let set_status = |r: &Rig| m(r).write_obj(0xffu8, GuestAddress(STATUS)).unwrap();

        // No status descriptor: the last one is device-readable. Used length 0.
        set_status(&r);
        assert_eq!(r.run(&b, &[(HDR, 16, R), (DATA, 512, R)]), 0);
        assert_eq!(r.status(), 0xff);
        // The status descriptor is read-only.
        assert_eq!(
            r.run(&b, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, R)]),
            0
        );
        assert_eq!(r.status(), 0xff);
        // A lone descriptor; a zero-length status descriptor.
        assert_eq!(r.run(&b, &[(STATUS, 1, W)]), 1);
        assert_eq!(r.status(), IOERR);
        set_status(&r);
        assert_eq!(r.run(&b, &[(HDR, 16, R), (STATUS, 0, W)]), 0);
        assert_eq!(r.status(), 0xff);
        // Header too short, or device-writable.
        assert_eq!(r.run(&b, &[(HDR, 8, R), (STATUS, 1, W)]), 1);
        assert_eq!(r.status(), IOERR);
        set_status(&r);
        assert_eq!(r.run(&b, &[(HDR, 16, W), (STATUS, 1, W)]), 1);
        assert_eq!(r.status(), IOERR);
        // Wrong data direction, and a readable descriptor after a writable one.
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, R)]).0,
            IOERR
        );
        r.header(HDR, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, W)]).0,
            IOERR
        );
        set_status(&r);
        assert_eq!(
            r.run(
                &b,
                &[(HDR, 16, R), (DATA, 512, W), (DATA, 512, R), (STATUS, 1, W)]
            ),
            1
        );
        assert_eq!(r.status(), IOERR);
        // An empty data buffer.
        assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 0, W)]).0, IOERR);
        // Data outside guest memory, and straddling its end.
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 0, &[(1 << 40, 512, W)]).0,
            IOERR
        );
        let (st, _) = r.request(&b, VIRTIO_BLK_T_IN, 0, &[(MEM_END - 256, 512, W)]);
        assert_eq!(st, IOERR);
        let (st, _) = r.request(&b, VIRTIO_BLK_T_IN, 0, &[(u64::MAX - 100, 512, W)]);
        assert_eq!(st, IOERR);
        // The status byte outside guest memory.
        r.header(HDR, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            r.run(&b, &[(HDR, 16, R), (DATA, 512, W), (MEM_END, 1, W)]),
            0
        );
        assert_eq!(r.run(&b, &[(HDR, 16, R), (u64::MAX, 1, W)]), 0);
        // The header outside guest memory.
        assert_eq!(r.run(&b, &[(MEM_END - 8, 16, R), (STATUS, 1, W)]), 1);
        assert_eq!(r.status(), IOERR);

        // A descriptor loop: 0 -> 1 -> 0 -> ... (virtio-queue gives up after QSIZE).
        set_status(&r);
        r.header(HDR, VIRTIO_BLK_T_IN, 0);
        let head = r.next_desc;
        let nf = VRING_DESC_F_NEXT as u16;
        r.write_desc(DESC, head, HDR, 16, nf, head + 1);
        r.write_desc(
            DESC,
            head + 1,
            STATUS,
            1,
            nf | VRING_DESC_F_WRITE as u16,
            head,
        );
        r.next_desc += 2;
        r.publish(head);
        r.kick(&b);
        assert_eq!(
            r.used(r.used_seen),
            (u32::from(head), 0),
            "no status: length 0"
        );
        r.used_seen += 1;
        // A next index past the table.
        let head = r.next_desc;
        r.write_desc(DESC, head, HDR, 16, nf, QSIZE + 5);
        r.next_desc += 1;
        r.publish(head);
        r.kick(&b);
        assert_eq!(r.used(r.used_seen), (u32::from(head), 0));
        r.used_seen += 1;
        // An indirect table longer than the device keeps: IOERR in the real last byte.
        let n: u16 = 1100;
        for i in 0..n {
            let (addr, len, flags) = match i {
                0 => (HDR, 16, 0),
                _ if i == n - 1 => (STATUS, 1, VRING_DESC_F_WRITE),
                _ => (DATA, 512, VRING_DESC_F_WRITE),
            };
            let next = if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
            r.write_desc(TABLE, i, addr, len, (flags | next) as u16, i + 1);
        }
        let head = r.next_desc;
        r.write_desc(
            DESC,
            head,
            TABLE,
            16 * u32::from(n),
            VRING_DESC_F_INDIRECT as u16,
            0,
        );
        r.next_desc += 1;
        r.publish(head);
        set_status(&r);
        r.kick(&b);
        assert_eq!(r.used(r.used_seen), (u32::from(head), 1));
        r.used_seen += 1;
        assert_eq!(r.status(), IOERR);
        // A head index past the table: no used entry can name it; the next request is
        // served all the same.
        r.publish(QSIZE + 3);
        r.header(HDR, VIRTIO_BLK_T_IN, 0);
        let head = r.post(&[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        r.kick(&b);
        assert_eq!(r.used_idx(), r.used_seen.wrapping_add(1));
        assert_eq!(r.used(r.used_seen), (u32::from(head), 513));
        r.used_seen += 1;

        // The device still works.
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]),
            (OK, 513)
        );
        assert_eq!(img.bytes(), vec![0x5a; IMAGE]);
    }

    #[test]
    fn file_errors_become_ioerr_and_the_device_goes_on() {
        // A read-only descriptor under a writable device: EBADF on writes.
        let img = Image::new("ebadf");
        let file = File::open(&img.0).unwrap();
        let b = VirtioBlk::with_file(file, IMAGE as u64, false, img.opts()).unwrap();
        let mut r = Rig::new(&b, false);
        r.fill(DATA, &[1; 512]);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]),
            (IOERR, 1)
        );
        let len = dwz(&r, DATA + 0x1000, &[(0, 1, 0)]);
        let (st, _) = r.request(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(DATA + 0x1000, len, R)]);
        assert_eq!(st, IOERR);
        assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);
        assert_eq!(img.bytes(), vec![0x5a; IMAGE]);

        // The file shrank under the device: reads past its end fail.
        let img = Image::new("shrunk");
        let b = img.open(|_| {});
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img.0)
            .unwrap()
            .set_len(IMAGE as u64 / 2)
            .unwrap();
        let mut r = Rig::new(&b, false);
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_IN, 2000, &[(DATA, 512, W)]),
            (IOERR, 1)
        );
        assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);

        // ENOSPC: /dev/full takes no data.
        if let Ok(full) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/full")
        {
            let opts = BlkOptions {
                path: "/dev/full".into(),
                ..BlkOptions::default()
            };
            let b = VirtioBlk::with_file(full, IMAGE as u64, false, opts).unwrap();
            b.acked_features(b.features());
            let mut r = Rig::new(&b, false);
            assert_eq!(
                r.request(&b, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]).0,
                IOERR
            );
            assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(DATA, 512, W)]).0, OK);
        }
    }

    #[test]
    fn a_failed_sync_through_the_page_cache_fails_every_later_sync() {
        // fdatasync of /dev/null fails (EINVAL); a regular file dup2'ed over the same
        // descriptor afterwards is the fault healing.
        for direct in [false, true] {
            let Ok(null) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
            else {
                return;
            };
            let opts = BlkOptions {
                path: "/dev/null".into(),
                direct,
                ..BlkOptions::default()
            };
            let b = VirtioBlk::with_file(null, IMAGE as u64, false, opts).unwrap();
            let mut r = Rig::new(&b, false);
            // Write-through (no FLUSH negotiated): the write is done, its sync fails.
            r.fill(DATA, &[1; 512]);
            let write = |r: &mut Rig| r.request(&b, VIRTIO_BLK_T_OUT, 0, &[(DATA, 512, R)]).0;
            assert_eq!(write(&mut r), IOERR, "direct {direct}");
            assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, IOERR);
            assert_eq!(b.sync_failed.load(Ordering::Acquire), !direct);

            let img = Image::new(&format!("sync-heals-{direct}"));
            let good = File::options().read(true).write(true).open(&img.0).unwrap();
            // SAFETY: both descriptors are open; dup2 atomically makes the device's
            // descriptor (still owned by its File) refer to the image file instead.
            let rc = unsafe { libc::dup2(good.as_raw_fd(), b.file.as_raw_fd()) };
            assert!(rc >= 0, "{}", io::Error::last_os_error());
            // Through the page cache: still failed; with O_DIRECT: healed.
            let expect = if direct { OK } else { IOERR };
            assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, expect);
            assert_eq!(write(&mut r), expect, "direct {direct}");
            // Reads go on either way (the write reached the file, only its sync failed).
            let at = DATA + 0x1000;
            assert_eq!(r.request(&b, VIRTIO_BLK_T_IN, 0, &[(at, 512, W)]).0, OK);
            assert_eq!(r.read(at, 512), vec![1; 512]);
        }
    }

    #[test]
    fn direct_io_aligned_and_through_the_bounce_buffer() {
        // O_DIRECT needs a real file system (tmpfs refuses it): use the build directory.
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/blk-direct-test");
        std::fs::create_dir_all(&dir).unwrap();
        let img = Image::in_dir(&dir, "direct");
        let b = match VirtioBlk::new(BlkOptions {
            direct: true,
            ..img.opts()
        }) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("skipped: O_DIRECT unavailable in {}: {e}", dir.display());
                return;
            }
        };
        let mut r = Rig::new(&b, false);
        // Page-aligned buffers: straight to the file.
        r.fill(DATA, &pattern(6, 8192));
        assert_eq!(r.request(&b, VIRTIO_BLK_T_OUT, 8, &[(DATA, 8192, R)]).0, OK);
        // Misaligned buffers (odd address, 512-byte pieces crossing a region): bounced.
        r.fill(DATA + 0x10001, &pattern(7, 1024));
        let (st, _) = r.request(&b, VIRTIO_BLK_T_OUT, 32, &[(DATA + 0x10001, 1024, R)]);
        assert_eq!(st, OK);
        let across = REGION - 512;
        r.fill(across, &pattern(8, 1024));
        assert_eq!(
            r.request(&b, VIRTIO_BLK_T_OUT, 40, &[(across, 1024, R)]).0,
            OK
        );
        let disk = img.bytes();
        assert_eq!(&disk[8 * 512..24 * 512], &pattern(6, 8192)[..]);
        assert_eq!(&disk[32 * 512..34 * 512], &pattern(7, 1024)[..]);
        assert_eq!(&disk[40 * 512..42 * 512], &pattern(8, 1024)[..]);
        let (st, len) = r.request(&b, VIRTIO_BLK_T_IN, 32, &[(DATA + 0x20003, 1024, W)]);
        assert_eq!((st, len), (OK, 1025));
        assert_eq!(r.read(DATA + 0x20003, 1024), pattern(7, 1024));
        let len = dwz(&r, DATA + 0x30000, &[(8, 2, 0)]);
        let (st, _) = r.request(
            &b,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[(DATA + 0x30000, len, R)],
        );
        assert_eq!(st, OK);
        assert!(img.bytes()[8 * 512..10 * 512].iter().all(|&x| x == 0));
    }

    /// Destructive: run with `UNIDEV_TEST_BLOCK_DEVICE=/dev/loopN cargo test -p
    /// unidev-backends -- --ignored block_device` on a scratch device (a loop device
    /// over a file is enough).
    #[test]
    #[ignore = "needs a scratch block device in UNIDEV_TEST_BLOCK_DEVICE"]
    fn on_a_block_device() {
        let Some(dev) = std::env::var_os("UNIDEV_TEST_BLOCK_DEVICE") else {
            panic!("set UNIDEV_TEST_BLOCK_DEVICE to a scratch block device");
        };
        for direct in [false, true] {
            let b = VirtioBlk::new(BlkOptions {
                path: dev.clone().into(),
                direct,
                ..BlkOptions::default()
            })
            .unwrap();
            assert!(b.is_block_device);
            let size = b.capacity_sectors();
            assert!(size >= 64, "at least 32 KiB");
            assert_eq!(b.get_config(0, 8), size.to_le_bytes());
            let mut r = Rig::new(&b, direct);
            let data = pattern(direct as u8 + 1, 8192);
            r.fill(DATA, &data);
            assert_eq!(
                r.request(&b, VIRTIO_BLK_T_OUT, 16, &[(DATA, 8192, R)]).0,
                OK
            );
            assert_eq!(r.request(&b, VIRTIO_BLK_T_FLUSH, 0, &[]).0, OK);
            // Unaligned guest buffer (bounced when direct).
            let (st, _) = r.request(&b, VIRTIO_BLK_T_IN, 16, &[(DATA + 0x10001, 8192, W)]);
            assert_eq!(st, OK);
            assert_eq!(r.read(DATA + 0x10001, 8192), data);
            let last = size - 1;
            assert_eq!(
                r.request(&b, VIRTIO_BLK_T_IN, last, &[(DATA, 512, W)]).0,
                OK
            );
            assert_eq!(
                r.request(&b, VIRTIO_BLK_T_IN, size, &[(DATA, 512, W)]).0,
                IOERR
            );
            let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
            for (kind, flags) in [
                (VIRTIO_BLK_T_WRITE_ZEROES, 0),
                (VIRTIO_BLK_T_WRITE_ZEROES, unmap),
                (VIRTIO_BLK_T_DISCARD, 0),
            ] {
                assert_eq!(
                    r.request(&b, VIRTIO_BLK_T_OUT, 16, &[(DATA, 8192, R)]).0,
                    OK
                );
                let len = dwz(&r, DATA + 0x20000, &[(16, 8, flags)]);
                let (st, _) = r.request(&b, kind, 0, &[(DATA + 0x20000, len, R)]);
                assert!(st == OK || (kind == VIRTIO_BLK_T_DISCARD && st == UNSUPP));
                if kind == VIRTIO_BLK_T_WRITE_ZEROES {
                    let (st, _) = r.request(&b, VIRTIO_BLK_T_IN, 16, &[(DATA + 0x30000, 8192, W)]);
                    assert_eq!(st, OK);
                    let got = r.read(DATA + 0x30000, 8192);
                    assert!(got[..4096].iter().all(|&x| x == 0), "{kind} {flags}");
                    assert_eq!(&got[4096..], &data[4096..]);
                }
            }
        }
    }

    #[test]
    fn queues_run_concurrently_on_their_own_threads() {
        let img = Image::new("mq");
        let b = Arc::new(img.open(|o| o.queues = 2));
        assert_eq!(b.queues_per_thread(), vec![1, 2]);
        let gm =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 * REGION as usize)]).unwrap();
        let mem = GuestMemoryAtomic::new(gm);
        b.update_memory(mem.clone()).unwrap();
        let threads: Vec<_> = (0..2u64)
            .map(|q| {
                let (b, mem) = (b.clone(), mem.clone());
                std::thread::spawn(move || {
                    let off = q * 0x40_0000;
                    let mut r = Rig::with_memory(mem, (DESC + off, AVAIL + off, USED + off), false);
                    for i in 0..50u64 {
                        let (hdr, st, data) = (HDR + off, STATUS + off, DATA + off);
                        let sector = q * 1024 + i * 8;
                        r.fill(data, &pattern((q * 50 + i) as u8, 4096));
                        r.header(hdr, VIRTIO_BLK_T_OUT, sector);
                        let head = r.post(&[(hdr, 16, R), (data, 4096, R), (st, 1, W)]);
                        b.handle_event(0, EventSet::IN, std::slice::from_ref(&r.vring), q as usize)
                            .unwrap();
                        assert_eq!(r.used(i as u16), (u32::from(head), 1));
                        assert_eq!(r.read(st, 1)[0], OK);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let disk = img.bytes();
        for q in 0..2u64 {
            for i in 0..50u64 {
                let at = ((q * 1024 + i * 8) * 512) as usize;
                assert_eq!(&disk[at..at + 4096], &pattern((q * 50 + i) as u8, 4096)[..]);
            }
        }
    }

    #[test]
    fn config_space_layout() {
        let img = Image::new("cfg");
        let b = img.open(|o| {
            o.queues = 4;
            o.queue_size = 128;
        });
        let field = |off: usize, len: usize| b.get_config(off as u32, len as u32);
        type C = virtio_blk_config;
        assert_eq!(CONFIG_SIZE, 96);
        assert_eq!(offset_of!(C, capacity), 0);
        assert_eq!(offset_of!(C, seg_max), 12);
        assert_eq!(offset_of!(C, blk_size), 20);
        assert_eq!(offset_of!(C, num_queues), 34);
        assert_eq!(offset_of!(C, max_discard_sectors), 36);
        assert_eq!(offset_of!(C, write_zeroes_may_unmap), 56);
        assert_eq!(field(0, 8), 2048u64.to_le_bytes(), "capacity in sectors");
        assert_eq!(field(8, 4), [0; 4], "size_max: not offered");
        assert_eq!(field(12, 4), 126u32.to_le_bytes(), "seg_max");
        assert_eq!(field(20, 4), 512u32.to_le_bytes(), "blk_size");
        assert_eq!(field(26, 2), 1u16.to_le_bytes(), "min_io_size");
        assert_eq!(field(34, 2), 4u16.to_le_bytes(), "num_queues");
        let c = |f: usize| u32::from_le_bytes(field(f, 4).try_into().unwrap());
        assert_eq!(c(offset_of!(C, max_discard_sectors)), MAX_DISCARD_SECTORS);
        assert_eq!(c(offset_of!(C, max_discard_seg)), MAX_DWZ_SEGS);
        assert_eq!(c(offset_of!(C, discard_sector_alignment)), 1);
        assert_eq!(
            c(offset_of!(C, max_write_zeroes_sectors)),
            MAX_WRITE_ZEROES_SECTORS
        );
        assert_eq!(c(offset_of!(C, max_write_zeroes_seg)), MAX_DWZ_SEGS);
        assert_eq!(field(56, 1), [1]);
        // Whole, past the end, partly past the end, absurd.
        assert_eq!(b.get_config(0, 96).len(), 96);
        assert_eq!(b.get_config(1000, 4), vec![0; 4]);
        assert_eq!(b.get_config(94, 4)[2..], [0, 0]);
        assert_eq!(b.get_config(u32::MAX, 4), vec![0; 4]);
        assert!(b.get_config(0, u32::MAX).len() <= MAX_CONFIG_READ);
        assert!(b.get_config(0, 0).is_empty());
        assert!(b.set_config(0, &[1, 2, 3]).is_err());
        assert_eq!(b.get_config(0, 8), 2048u64.to_le_bytes(), "unchanged");
    }

    #[test]
    fn features_queues_and_lifecycle() {
        let img = Image::new("life");
        let b = img.open(|_| {});
        let f = b.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
        }
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        for bit in [VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, 1 /* SIZE_MAX */] {
            assert_eq!(f & (1 << bit), 0, "feature bit {bit}");
        }
        assert!(b.protocol_features().contains(
            VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
        ));
        assert_eq!((b.num_queues(), b.max_queue_size()), (1, 256));
        assert_eq!(b.queues_per_thread(), vec![1]);
        let b4 = img.open(|o| o.queues = 64);
        assert_ne!(b4.features() & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_eq!(b4.queues_per_thread().last(), Some(&(1u64 << 63)));

        // Per-thread exit events that notify_exit() wakes.
        let (c0, n0) = b4.exit_event(0).unwrap();
        let (c1, _n1) = b4.exit_event(1).unwrap();
        assert!(c0.consume().is_err(), "not signalled yet");
        n0.notify().unwrap();
        assert!(c0.consume().is_ok() && c1.consume().is_err(), "per thread");
        b4.notify_exit();
        assert!(c0.consume().is_ok() && c1.consume().is_ok());

        // Negotiation and reset.
        b.set_event_idx(true);
        b.acked_features(f);
        assert!(b.event_idx.load(Ordering::Relaxed) && b.writeback.load(Ordering::Relaxed));
        b.reset_device();
        assert!(!b.event_idx.load(Ordering::Relaxed) && !b.writeback.load(Ordering::Relaxed));

        // Before any memory, and for an event that is no queue: nothing happens.
        let vring = VringRwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 16).unwrap();
        b.handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap();
        b.handle_event(5, EventSet::IN, std::slice::from_ref(&vring), 9)
            .unwrap();
    }

    #[test]
    fn bad_options_are_refused() {
        let img = Image::new("opts");
        for f in [
            (|o: &mut BlkOptions| o.queues = 0) as fn(&mut BlkOptions),
            |o| o.queues = 65,
            |o| o.logical_block_size = 1024,
            |o| o.queue_size = 100,
            |o| o.queue_size = 0,
            |o| o.path = "/nonexistent/unidev".into(),
            |o| o.path = "/dev/null".into(),
        ] {
            let mut o = img.opts();
            f(&mut o);
            assert!(VirtioBlk::new(o.clone()).is_err(), "{o:?}");
        }
    }
}
