//! virtio-blk (virtio 1.2 section 5.2) on a raw image file or a block device.
//!
//! Written only against rust-vmm's `VhostUserBackend` trait, so it runs unchanged over
//! every unidev transport and in vhost-user-backend's own daemon. One worker thread per
//! queue (`queues_per_thread`). Requests: IN, OUT, FLUSH (fdatasync before completing),
//! GET_ID, DISCARD (hole punching), WRITE_ZEROES (zero range, or punching when the driver
//! allows unmap). Every descriptor chain is parsed defensively: a malformed chain
//! completes with IOERR if a status byte can be written, and with a zero-length used
//! entry otherwise; nothing a driver sends can make the device panic or loop.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::RwLock;

use log::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::*;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
const SECTOR: u64 = 512;
const MAX_SEG: u32 = 126;
/// Largest transfer of one request (bounds memory a driver can make us touch at once).
const MAX_REQUEST_BYTES: u64 = 32 << 20;
const MAX_DISCARD_SECTORS: u32 = u32::MAX / SECTOR as u32;
const GET_ID_BYTES: usize = 20;
const CONFIG_SIZE: usize = 60;
/// Alignment O_DIRECT asks of buffers, lengths and offsets (the page size covers every
/// logical block size in use).
const DIRECT_ALIGN: u64 = 4096;

type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// How to open and present the disk.
#[derive(Clone, Debug)]
pub struct BlkOptions {
    /// Raw image file or block device.
    pub path: PathBuf,
    /// Refuse writes (VIRTIO_BLK_F_RO).
    pub readonly: bool,
    /// Request queues, one worker thread each (1..=64).
    pub queues: u16,
    /// Descriptors per queue.
    pub queue_size: u16,
    /// Logical block size: 512 or 4096.
    pub logical_block_size: u32,
    /// Open with O_DIRECT.
    pub direct: bool,
    /// The serial returned by GET_ID (at most 20 bytes; default: the file name).
    pub serial: Option<String>,
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
        }
    }
}

/// The virtio-blk backend.
pub struct VirtioBlk {
    file: File,
    opts: BlkOptions,
    capacity_sectors: u64,
    serial: [u8; GET_ID_BYTES],
    is_block_device: bool,
    mem: RwLock<Option<Memory>>,
    event_idx: RwLock<bool>,
    exit: (EventConsumer, EventNotifier),
}

fn disk_size(file: &File) -> io::Result<(u64, bool)> {
    let meta = file.metadata()?;
    use std::os::unix::fs::FileTypeExt;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: the ioctl writes one u64 through the valid pointer.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((size, true))
    } else if meta.file_type().is_file() {
        Ok((meta.len(), false))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file or block device",
        ))
    }
}

impl VirtioBlk {
    /// Open the disk described by `opts`.
    pub fn new(opts: BlkOptions) -> io::Result<Self> {
        if !(1..=64).contains(&opts.queues) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "virtio-blk supports 1 to 64 queues",
            ));
        }
        if !matches!(opts.logical_block_size, 512 | 4096) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the logical block size must be 512 or 4096",
            ));
        }
        if opts.queue_size == 0 || !opts.queue_size.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the queue size must be a power of two",
            ));
        }
        let mut o = OpenOptions::new();
        o.read(true).write(!opts.readonly);
        if opts.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let file = o.open(&opts.path).map_err(|e| {
            if opts.direct && e.raw_os_error() == Some(libc::EINVAL) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "O_DIRECT is not supported by this file system (tmpfs, for one)",
                )
            } else {
                e
            }
        })?;
        let (bytes, is_block_device) = disk_size(&file)?;
        let mut serial = [0u8; GET_ID_BYTES];
        let name = opts.serial.clone().unwrap_or_else(|| {
            opts.path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let n = name.len().min(GET_ID_BYTES);
        serial[..n].copy_from_slice(&name.as_bytes()[..n]);
        Ok(VirtioBlk {
            file,
            capacity_sectors: bytes / SECTOR,
            serial,
            is_block_device,
            mem: RwLock::new(None),
            event_idx: RwLock::new(false),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
            opts,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }

    /// The device configuration space (struct virtio_blk_config, little-endian).
    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes()); // capacity
        c[8..12].copy_from_slice(&(MAX_REQUEST_BYTES as u32).to_le_bytes()); // size_max
        c[12..16].copy_from_slice(&MAX_SEG.to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&self.opts.logical_block_size.to_le_bytes()); // blk_size
        c[25] = 0; // alignment_offset
        c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size (in blocks)
        c[34..36].copy_from_slice(&self.opts.queues.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        let align = self.opts.logical_block_size / SECTOR as u32;
        c[44..48].copy_from_slice(&align.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    fn process(&self, vring: &VringRwLock) -> bool {
        let Some(mem) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return false;
        };
        let m = mem.memory();
        let mut used_any = false;
        let mut descs: Vec<Descriptor> = Vec::with_capacity(MAX_SEG as usize + 2);
        loop {
            let chain = {
                let mut state = vring.get_mut();
                match state.get_queue_mut().pop_descriptor_chain(m.clone()) {
                    Some(c) => c,
                    None => break,
                }
            };
            let head = chain.head_index();
            descs.clear();
            for d in chain {
                if descs.len() > MAX_SEG as usize + 2 {
                    break;
                }
                descs.push(d);
            }
            let len = self.execute(&m, &descs);
            if let Err(e) = vring.add_used(head, len) {
                warn!("virtio-blk: cannot add used entry: {e:?}");
            }
            used_any = true;
        }
        used_any
    }

    /// Run one request; returns the number of bytes written into the chain.
    fn execute(&self, m: &GuestMemoryMmap<()>, descs: &[Descriptor]) -> u32 {
        // The status byte is the last byte of the last, device-writable descriptor.
        let Some(last) = descs.last() else { return 0 };
        if !last.is_write_only() || last.len() == 0 || descs.len() < 2 {
            return 0;
        }
        let Some(status_addr) = last.addr().checked_add(u64::from(last.len()) - 1) else {
            return 0;
        };
        let finish = |status: u32, written: u32| -> u32 {
            match m.write_obj(status as u8, status_addr) {
                Ok(()) => written + 1,
                Err(_) => 0,
            }
        };
        let hdr = &descs[0];
        if hdr.is_write_only() || hdr.len() < 16 {
            return finish(VIRTIO_BLK_S_IOERR, 0);
        }
        let (Ok(req_type), Ok(sector)) = (
            m.read_obj::<u32>(hdr.addr()),
            m.read_obj::<u64>(GuestAddress(hdr.addr().0.wrapping_add(8))),
        ) else {
            return finish(VIRTIO_BLK_S_IOERR, 0);
        };
        let req_type = u32::from_le(req_type);
        let sector = u64::from_le(sector);
        // Data descriptors: between the header and the status descriptor. A status
        // descriptor longer than one byte also carries data (rare but legal).
        let mut data: Vec<(GuestAddress, u32, bool)> = descs[1..descs.len() - 1]
            .iter()
            .map(|d| (d.addr(), d.len(), d.is_write_only()))
            .collect();
        if last.len() > 1 {
            data.push((last.addr(), last.len() - 1, true));
        }
        let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
        match req_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write = req_type == VIRTIO_BLK_T_OUT;
                if write && self.opts.readonly {
                    return finish(VIRTIO_BLK_S_IOERR, 0);
                }
                if data.iter().any(|d| d.2 == write || d.1 == 0) {
                    // Wrong direction, or an empty buffer no driver sends.
                    return finish(VIRTIO_BLK_S_IOERR, 0);
                }
                let Some(offset) = self.check_range(sector, total) else {
                    return finish(VIRTIO_BLK_S_IOERR, 0);
                };
                match self.transfer(m, &data, offset, write) {
                    Ok(()) => finish(VIRTIO_BLK_S_OK, if write { 0 } else { total as u32 }),
                    Err(e) => {
                        warn!(
                            "virtio-blk: {} at sector {sector}: {e}",
                            if write { "write" } else { "read" }
                        );
                        finish(VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.opts.readonly {
                    return finish(VIRTIO_BLK_S_OK, 0);
                }
                match self.file.sync_data() {
                    Ok(()) => finish(VIRTIO_BLK_S_OK, 0),
                    Err(e) => {
                        warn!("virtio-blk: flush: {e}");
                        finish(VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let Some(&(addr, len, true)) = data.first() else {
                    return finish(VIRTIO_BLK_S_IOERR, 0);
                };
                let n = (len as usize).min(GET_ID_BYTES);
                match m.write_slice(&self.serial[..n], addr) {
                    Ok(()) => finish(VIRTIO_BLK_S_OK, n as u32),
                    Err(_) => finish(VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.opts.readonly {
                    return finish(VIRTIO_BLK_S_IOERR, 0);
                }
                self.discard_or_zero(m, &data, req_type == VIRTIO_BLK_T_DISCARD)
                    .map_or_else(|s| finish(s, 0), |()| finish(VIRTIO_BLK_S_OK, 0))
            }
            _ => finish(VIRTIO_BLK_S_UNSUPP, 0),
        }
    }

    /// Byte offset of `sector` when `len` bytes from there fit the disk and the
    /// alignment rules; None otherwise.
    fn check_range(&self, sector: u64, len: u64) -> Option<u64> {
        if len % SECTOR != 0 || len > MAX_REQUEST_BYTES {
            return None;
        }
        let end = sector.checked_add(len / SECTOR)?;
        if end > self.capacity_sectors {
            return None;
        }
        let lbs = u64::from(self.opts.logical_block_size);
        let offset = sector.checked_mul(SECTOR)?;
        if offset % lbs != 0 || len % lbs != 0 {
            return None;
        }
        Some(offset)
    }

    fn transfer(
        &self,
        m: &GuestMemoryMmap<()>,
        data: &[(GuestAddress, u32, bool)],
        mut offset: u64,
        write: bool,
    ) -> io::Result<()> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, "buffer outside guest memory");
        for &(addr, len, _) in data {
            if len == 0 {
                continue;
            }
            let slice = m.get_slice(addr, len as usize).map_err(|_| bad())?;
            let ptr = slice.ptr_guard_mut();
            // SAFETY: `slice` is a bounds-checked view of `len` bytes of guest memory
            // that stays mapped while `ptr` (a guard on it) lives; the file I/O reads or
            // writes exactly that range. Guest memory may change concurrently, which is
            // inherent to DMA and harmless for plain bytes.
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len as usize) };
            let aligned = |x: u64| x % DIRECT_ALIGN == 0;
            if self.opts.direct
                && !(aligned(buf.as_ptr() as u64) && aligned(u64::from(len)) && aligned(offset))
            {
                // O_DIRECT needs aligned memory: go through an aligned bounce buffer.
                let mut bounce = vec![0u8; len as usize + DIRECT_ALIGN as usize];
                let skew = bounce.as_ptr().align_offset(DIRECT_ALIGN as usize);
                let b = &mut bounce[skew..skew + len as usize];
                if write {
                    b.copy_from_slice(buf);
                    self.file.write_all_at(b, offset)?;
                } else {
                    self.file.read_exact_at(b, offset)?;
                    buf.copy_from_slice(b);
                }
            } else if write {
                self.file.write_all_at(buf, offset)?;
            } else {
                self.file.read_exact_at(buf, offset)?;
            }
            offset += u64::from(len);
        }
        Ok(())
    }

    fn discard_or_zero(
        &self,
        m: &GuestMemoryMmap<()>,
        data: &[(GuestAddress, u32, bool)],
        discard: bool,
    ) -> Result<(), u32> {
        // One segment: struct virtio_blk_discard_write_zeroes { sector u64, num u32, flags u32 }.
        let Some(&(addr, len, false)) = data.first() else {
            return Err(VIRTIO_BLK_S_IOERR);
        };
        if len < 16 {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let mut seg = [0u8; 16];
        m.read_slice(&mut seg, addr)
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or([0; 8]));
        let num = u32::from_le_bytes(seg[8..12].try_into().unwrap_or([0; 4]));
        let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or([0; 4]));
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if (discard && flags != 0) || flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err(VIRTIO_BLK_S_UNSUPP);
        }
        let bytes = u64::from(num) * SECTOR;
        let end = sector
            .checked_add(u64::from(num))
            .ok_or(VIRTIO_BLK_S_IOERR)?;
        if end > self.capacity_sectors || num == 0 {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let offset = sector * SECTOR;
        let fd = self.file.as_raw_fd();
        if self.is_block_device {
            // BLKDISCARD = _IO(0x12,119), BLKZEROOUT = _IO(0x12,127)
            let req = if discard || unmap { 0x1277 } else { 0x127f };
            let range = [offset, bytes];
            // SAFETY: the ioctl reads two u64 from the valid array.
            let r = unsafe { libc::ioctl(fd, req, range.as_ptr()) };
            return if r == 0 {
                Ok(())
            } else {
                Err(if discard {
                    VIRTIO_BLK_S_UNSUPP
                } else {
                    VIRTIO_BLK_S_IOERR
                })
            };
        }
        let mode = if discard || unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate on our own fd with in-range values.
        let r = unsafe { libc::fallocate(fd, mode, offset as i64, bytes as i64) };
        if r == 0 {
            return Ok(());
        }
        if discard {
            return Err(VIRTIO_BLK_S_UNSUPP);
        }
        // Fallback: write zeroes.
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < bytes {
            let n = (bytes - done).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], offset + done)
                .map_err(|_| VIRTIO_BLK_S_IOERR)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl VhostUserBackend for VirtioBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.opts.queues as usize
    }

    fn max_queue_size(&self) -> usize {
        self.opts.queue_size as usize
    }

    fn features(&self) -> u64 {
        let mut f = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
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

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        *self.event_idx.write().unwrap_or_else(|e| e.into_inner()) = enabled;
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config_bytes();
        (0..size as usize)
            .map(|i| {
                cfg.get((offset as usize).saturating_add(i))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Writeback caching is not offered; nothing in the config is writable.
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.opts.queues).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        let event_idx = *self.event_idx.read().unwrap_or_else(|e| e.into_inner());
        if event_idx {
            loop {
                let _ = vring.disable_notification();
                self.process(vring);
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
            if vring.needs_notification().unwrap_or(true) {
                vring.signal_used_queue()?;
            }
        } else if self.process(vring) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;

    const QSIZE: u16 = 16;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    struct Rig {
        mem: Memory,
        vring: VringRwLock,
        next_desc: u16,
        rings: (u64, u64, u64),
        avail_idx: u16,
    }

    impl Rig {
        fn new(blk: &VirtioBlk, event_idx: bool) -> Rig {
            let gm = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let mem = GuestMemoryAtomic::new(gm);
            let vring = VringRwLock::new(mem.clone(), QSIZE).unwrap();
            let rings = {
                let m = mem.memory();
                let q = MockSplitQueue::create(&*m, GuestAddress(0), QSIZE);
                (q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
            };
            vring.set_queue_info(rings.0, rings.1, rings.2).unwrap();
            vring.set_queue_size(QSIZE);
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            vring.set_queue_event_idx(event_idx);
            blk.set_event_idx(event_idx);
            blk.update_memory(mem.clone()).unwrap();
            Rig {
                mem,
                vring,
                next_desc: 0,
                rings,
                avail_idx: 0,
            }
        }

        /// Post one chain of (addr, len, device-writable) and process it; returns the
        /// used length the device reported.
        fn submit(&mut self, blk: &VirtioBlk, chain: &[(u64, u32, bool)]) -> u32 {
            let (desc, avail, used) = self.rings;
            let start = self.next_desc;
            {
                let m = self.mem.memory();
                for (i, &(addr, len, w)) in chain.iter().enumerate() {
                    let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
                    if i + 1 < chain.len() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    let idx = (start + i as u16) % QSIZE;
                    let next = (idx + 1) % QSIZE;
                    let d = GuestAddress(desc + 16 * u64::from(idx));
                    m.write_obj(addr, d).unwrap();
                    m.write_obj(len, GuestAddress(d.0 + 8)).unwrap();
                    m.write_obj(flags, GuestAddress(d.0 + 12)).unwrap();
                    m.write_obj(next, GuestAddress(d.0 + 14)).unwrap();
                }
                let slot = u64::from(self.avail_idx % QSIZE);
                m.write_obj(start, GuestAddress(avail + 4 + 2 * slot))
                    .unwrap();
                self.avail_idx = self.avail_idx.wrapping_add(1);
                m.write_obj(self.avail_idx, GuestAddress(avail + 2))
                    .unwrap();
            }
            self.next_desc = (start + chain.len() as u16) % QSIZE;
            blk.handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
                .unwrap();
            let m = self.mem.memory();
            let used_idx: u16 = m.read_obj(GuestAddress(used + 2)).unwrap();
            assert_eq!(used_idx, self.avail_idx, "every chain is used exactly once");
            let slot = u64::from(used_idx.wrapping_sub(1) % QSIZE);
            m.read_obj::<u32>(GuestAddress(used + 4 + slot * 8 + 4))
                .unwrap()
        }

        /// Let `write` lay out descriptors by hand, post head 0 and process it.
        fn submit_raw(&mut self, blk: &VirtioBlk, write: impl FnOnce(&GuestMemoryMmap<()>)) -> u32 {
            let (_, avail, used) = self.rings;
            {
                let m = self.mem.memory();
                write(&m);
                let slot = u64::from(self.avail_idx % QSIZE);
                m.write_obj(0u16, GuestAddress(avail + 4 + 2 * slot))
                    .unwrap();
                self.avail_idx = self.avail_idx.wrapping_add(1);
                m.write_obj(self.avail_idx, GuestAddress(avail + 2))
                    .unwrap();
            }
            blk.handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
                .unwrap();
            let m = self.mem.memory();
            let used_idx: u16 = m.read_obj(GuestAddress(used + 2)).unwrap();
            assert_eq!(used_idx, self.avail_idx, "every chain is used exactly once");
            let slot = u64::from(used_idx.wrapping_sub(1) % QSIZE);
            m.read_obj::<u32>(GuestAddress(used + 4 + slot * 8 + 4))
                .unwrap()
        }

        fn header(&self, t: u32, sector: u64) {
            let m = self.mem.memory();
            m.write_obj(t, GuestAddress(HDR)).unwrap();
            m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        }

        fn status(&self) -> u8 {
            self.mem.memory().read_obj(GuestAddress(STATUS)).unwrap()
        }
    }

    fn image(name: &str, len: usize) -> PathBuf {
        let p = std::env::temp_dir().join(format!("unidev-blk-{}-{name}", std::process::id()));
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![0x5au8; len]).unwrap();
        p
    }

    fn blk(name: &str, f: impl FnOnce(&mut BlkOptions)) -> (VirtioBlk, PathBuf) {
        let path = image(name, 1 << 20);
        let mut o = BlkOptions {
            path: path.clone(),
            ..BlkOptions::default()
        };
        f(&mut o);
        (VirtioBlk::new(o).unwrap(), path)
    }

    #[test]
    fn write_read_flush_and_get_id() {
        for event_idx in [false, true] {
            let (b, path) = blk(&format!("rw{event_idx}"), |_| {});
            let mut r = Rig::new(&b, event_idx);
            r.mem
                .memory()
                .write_slice(&[7u8; 1024], GuestAddress(DATA))
                .unwrap();
            r.header(VIRTIO_BLK_T_OUT, 3);
            let len = r.submit(
                &b,
                &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)],
            );
            assert_eq!((r.status(), len), (VIRTIO_BLK_S_OK as u8, 1));
            let on_disk = std::fs::read(&path).unwrap();
            assert!(on_disk[3 * 512..5 * 512].iter().all(|&x| x == 7));
            assert_eq!(on_disk[3 * 512 - 1], 0x5a);

            r.header(VIRTIO_BLK_T_IN, 2);
            let len = r.submit(
                &b,
                &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
            );
            assert_eq!((r.status(), len), (VIRTIO_BLK_S_OK as u8, 1025));
            let mut got = [0u8; 1024];
            r.mem
                .memory()
                .read_slice(&mut got, GuestAddress(DATA))
                .unwrap();
            assert!(got[..512].iter().all(|&x| x == 0x5a) && got[512..].iter().all(|&x| x == 7));

            r.header(VIRTIO_BLK_T_FLUSH, 0);
            r.submit(&b, &[(HDR, 16, false), (STATUS, 1, true)]);
            assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);

            r.header(VIRTIO_BLK_T_GET_ID, 0);
            let len = r.submit(&b, &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
            assert_eq!((r.status(), len), (VIRTIO_BLK_S_OK as u8, 21));
            let mut id = [0u8; 20];
            r.mem
                .memory()
                .read_slice(&mut id, GuestAddress(DATA))
                .unwrap();
            assert!(String::from_utf8_lossy(&id).starts_with("unidev-blk-"));
            let _ = std::fs::remove_file(path);
        }
    }

    #[test]
    fn discard_and_write_zeroes_reach_the_file() {
        let (b, path) = blk("dz", |_| {});
        let mut r = Rig::new(&b, false);
        for (t, sector) in [
            (VIRTIO_BLK_T_WRITE_ZEROES, 8u64),
            (VIRTIO_BLK_T_DISCARD, 16),
        ] {
            let m = r.mem.memory();
            m.write_obj(sector, GuestAddress(DATA)).unwrap();
            m.write_obj(4u32, GuestAddress(DATA + 8)).unwrap();
            m.write_obj(0u32, GuestAddress(DATA + 12)).unwrap();
            drop(m);
            r.header(t, 0);
            r.submit(
                &b,
                &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)],
            );
            assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8, "type {t}");
            let on_disk = std::fs::read(&path).unwrap();
            let s = sector as usize * 512;
            assert!(
                on_disk[s..s + 2048].iter().all(|&x| x == 0),
                "type {t} zeroed"
            );
            assert_eq!(on_disk[s + 2048], 0x5a, "type {t} stays in range");
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn bad_requests_complete_with_errors() {
        let (b, path) = blk("bad", |_| {});
        let mut r = Rig::new(&b, false);
        // Past the end of the disk.
        r.header(VIRTIO_BLK_T_IN, 2047);
        r.submit(
            &b,
            &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR as u8);
        // Unknown type.
        r.header(0x99, 0);
        r.submit(&b, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(r.status(), VIRTIO_BLK_S_UNSUPP as u8);
        // Data not a multiple of 512.
        r.header(VIRTIO_BLK_T_IN, 0);
        r.submit(
            &b,
            &[(HDR, 16, false), (DATA, 100, true), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR as u8);
        // Read into a device-readable buffer (wrong direction).
        r.header(VIRTIO_BLK_T_IN, 0);
        r.submit(
            &b,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR as u8);
        // Header too short.
        r.header(VIRTIO_BLK_T_IN, 0);
        r.submit(&b, &[(HDR, 8, false), (STATUS, 1, true)]);
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR as u8);
        // Data buffer outside guest memory.
        r.header(VIRTIO_BLK_T_IN, 0);
        r.submit(
            &b,
            &[
                (HDR, 16, false),
                (0x4000_0000, 512, true),
                (STATUS, 1, true),
            ],
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR as u8);
        // No writable status byte: used with length 0, status untouched.
        r.header(VIRTIO_BLK_T_IN, 0);
        let len = r.submit(&b, &[(HDR, 16, false), (STATUS, 1, false)]);
        assert_eq!((len, r.status()), (0, 0xff));
        // A lone descriptor.
        let len = r.submit(&b, &[(STATUS, 1, true)]);
        assert_eq!(len, 0);
        // The device still works.
        r.header(VIRTIO_BLK_T_FLUSH, 0);
        r.submit(&b, &[(HDR, 16, false), (STATUS, 1, true)]);
        assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn descriptor_loops_and_long_chains_terminate() {
        let (b, path) = blk("loop", |_| {});
        let mut r = Rig::new(&b, false);
        // A chain as long as the whole queue whose "header" is device-writable: IOERR
        // in the last byte (used length 1).
        let chain: Vec<(u64, u32, bool)> = (0..QSIZE)
            .map(|i| (DATA + 512 * u64::from(i), 512, true))
            .collect();
        assert_eq!(r.submit(&b, &chain), 1);
        let last = GuestAddress(DATA + 512 * u64::from(QSIZE) - 1);
        assert_eq!(
            r.mem.memory().read_obj::<u8>(last).unwrap(),
            VIRTIO_BLK_S_IOERR as u8
        );
        // A two-descriptor loop: 0 -> 1 -> 0 -> ... (the header is read-only, the data
        // descriptor points back to it).
        r.header(VIRTIO_BLK_T_IN, 0);
        r.next_desc = 0;
        let (desc, _, _) = r.rings;
        let loop_len = r.submit_raw(&b, |m| {
            let d1 = GuestAddress(desc + 16);
            m.write_obj(HDR, GuestAddress(desc)).unwrap();
            m.write_obj(16u32, GuestAddress(desc + 8)).unwrap();
            m.write_obj(VRING_DESC_F_NEXT as u16, GuestAddress(desc + 12))
                .unwrap();
            m.write_obj(1u16, GuestAddress(desc + 14)).unwrap();
            m.write_obj(DATA, d1).unwrap();
            m.write_obj(512u32, GuestAddress(d1.0 + 8)).unwrap();
            m.write_obj(
                (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
                GuestAddress(d1.0 + 12),
            )
            .unwrap();
            m.write_obj(0u16, GuestAddress(d1.0 + 14)).unwrap();
        });
        assert!(
            loop_len <= 1,
            "a looping chain completes without data: {loop_len}"
        );
        // The device keeps working.
        r.next_desc = 4;
        r.header(VIRTIO_BLK_T_IN, 0);
        r.submit(
            &b,
            &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn read_only_and_4k_blocks() {
        let (b, path) = blk("ro", |o| o.readonly = true);
        assert_ne!(b.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let mut r = Rig::new(&b, false);
        r.header(VIRTIO_BLK_T_OUT, 0);
        r.submit(
            &b,
            &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR as u8);
        assert!(std::fs::read(&path).unwrap().iter().all(|&x| x == 0x5a));

        let (b4, path4) = blk("4k", |o| o.logical_block_size = 4096);
        assert_eq!(&b4.get_config(20, 4), &4096u32.to_le_bytes());
        let mut r = Rig::new(&b4, false);
        r.header(VIRTIO_BLK_T_IN, 1); // not 4 KiB aligned
        r.submit(
            &b4,
            &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_IOERR as u8);
        r.header(VIRTIO_BLK_T_IN, 8);
        r.submit(
            &b4,
            &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(path4);
    }

    #[test]
    fn direct_io_with_unaligned_buffers_uses_a_bounce_buffer() {
        // O_DIRECT needs a real file system (not tmpfs): use the build directory.
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/blk-direct-test");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("img-{}", std::process::id()));
        std::fs::write(&path, vec![0x5au8; 1 << 20]).unwrap();
        let b = match VirtioBlk::new(BlkOptions {
            path: path.clone(),
            direct: true,
            ..BlkOptions::default()
        }) {
            Ok(b) => b,
            Err(e) => panic!("O_DIRECT open failed on {}: {e}", dir.display()),
        };
        let mut r = Rig::new(&b, false);
        // DATA + 512: not 4 KiB aligned, so the bounce path runs.
        r.mem
            .memory()
            .write_slice(&[9u8; 512], GuestAddress(DATA + 512))
            .unwrap();
        r.header(VIRTIO_BLK_T_OUT, 1);
        r.submit(
            &b,
            &[
                (HDR, 16, false),
                (DATA + 512, 512, false),
                (STATUS, 1, true),
            ],
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);
        r.header(VIRTIO_BLK_T_IN, 0);
        r.submit(
            &b,
            &[(HDR, 16, false), (DATA, 4096, true), (STATUS, 1, true)],
        );
        assert_eq!(r.status(), VIRTIO_BLK_S_OK as u8);
        let mut got = [0u8; 1024];
        r.mem
            .memory()
            .read_slice(&mut got, GuestAddress(DATA))
            .unwrap();
        assert!(got[..512].iter().all(|&x| x == 0x5a) && got[512..].iter().all(|&x| x == 9));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn config_space_layout() {
        let (b, path) = blk("cfg", |o| o.queues = 4);
        assert_eq!(
            &b.get_config(0, 8),
            &2048u64.to_le_bytes(),
            "capacity in sectors"
        );
        assert_eq!(&b.get_config(34, 2), &4u16.to_le_bytes(), "num_queues");
        assert_eq!(b.get_config(1000, 4), vec![0; 4], "past the end reads zero");
        assert_eq!(b.get_config(u32::MAX, 4), vec![0; 4]);
        assert_ne!(b.features() & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4, 8]);
        let _ = std::fs::remove_file(path);
    }
}
