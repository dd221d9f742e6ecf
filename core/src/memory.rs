//! Guest memory and DMA: the one memory layer every transport maps client memory into.
//!
//! A client (a VMM, or the kernel through VDUSE) tells the device which of its memory the
//! device may reach: vfio-user's DMA_MAP/DMA_UNMAP (vfio-user.rst, "VFIO_USER_DMA_MAP"),
//! vhost-user's memory table, VDUSE's IOTLB. Each transport turns those into
//! [`DmaSpace::map`] / [`DmaSpace::unmap`] calls on the device's one `DmaSpace`.
//!
//! * Maps that come with a file descriptor are `mmap`ed and published as regions of a
//!   vm-memory [`GuestMemoryAtomic<GuestMemoryMmap>`] snapshot. Device workers (and
//!   `VhostUserBackend::update_memory`) read that snapshot without taking any lock.
//! * Maps without a file descriptor are recorded too; accesses to them go through a
//!   transport-provided [`DmaMessagePath`] (vfio-user DMA_READ/DMA_WRITE).
//! * An unmap must name exactly one earlier map; overlapping maps fail with `EEXIST`;
//!   permissions are enforced on every access through this module. A read-only map is
//!   mapped copy-on-write (`MAP_PRIVATE`) into the snapshot, so a device that writes to it
//!   through vm-memory changes only its private copy, never the client's memory, and
//!   cannot fault.
//!
//! A map's regular file (memfd, tmpfs, hugetlbfs) must hold the whole range: touching a
//! mapping past the file's end raises SIGBUS in the daemon. The size is checked at map
//! time, and a memfd that allows sealing is sealed against shrinking
//! (`F_SEAL_SHRINK`) so the client cannot cut it short afterwards (QEMU's
//! `memory-backend-memfd` seals its memfds itself). Files that cannot be sealed (tmpfs or
//! hugetlbfs files, memfds without `MFD_ALLOW_SEALING`) are accepted and guarded instead:
//! if the client truncates one under its mapping, the SIGBUS of the next device access is
//! absorbed and the access reads zeros (see `truncation_guard`), so the daemon and its
//! other devices go on.
//!
//! Lookups use a `BTreeMap` keyed by IOVA (O(log n)), and the snapshot is vm-memory's
//! sorted region vector (binary search), so tens of thousands of maps stay fast. Adding a
//! map only marks the snapshot stale; [`DmaSpace::publish`] rebuilds it once per batch of
//! client messages, so a client that pipelines 65,535 maps costs O(n log n), not O(n²).
//! Unmaps publish immediately: once an unmap is acknowledged, no new access can start on
//! the removed range (in-flight snapshot holders keep the mapping alive until they drop it,
//! so nothing ever touches unmapped memory).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, RwLock};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::sync::{self, lock};

/// Default cap on the number of DMA maps of one device (the Linux kernel's
/// `dma_entry_limit`, also vfio-user's default `max_dma_maps`).
pub const DEFAULT_MAX_MAPS: usize = 65535;

/// The snapshot type workers read.
pub type GuestMemorySnapshot = GuestMemoryAtomic<GuestMemoryMmap>;

/// Access permission of a DMA map, as the client granted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Prot {
    /// The device may read the range.
    pub read: bool,
    /// The device may write the range.
    pub write: bool,
}

impl Prot {
    /// Read and write.
    pub const READ_WRITE: Prot = Prot {
        read: true,
        write: true,
    };
    /// Read only.
    pub const READ_ONLY: Prot = Prot {
        read: true,
        write: false,
    };
}

/// What went wrong with a map, unmap or access. Each maps to the errno a transport
/// reports (`errno()`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// Zero size, wrap-around, or a size the host cannot map.
    #[error("invalid DMA range {iova:#x}+{size:#x}: {why}")]
    InvalidRange {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        size: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The new map overlaps an existing one.
    #[error("DMA map {iova:#x}+{size:#x} overlaps an existing map")]
    Overlap {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        size: u64,
    },
    /// An unmap that does not name exactly one existing map.
    #[error("no DMA map is exactly {iova:#x}+{size:#x}")]
    NoSuchMap {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        size: u64,
    },
    /// The configured cap on maps is reached.
    #[error("too many DMA maps (limit {0})")]
    TooManyMaps(usize),
    /// `mmap` of the client's file descriptor failed (the message names the kernel
    /// limit behind `ENOMEM`, see [`crate::limits`]).
    #[error("cannot mmap DMA map {iova:#x}+{size:#x}: {}", crate::limits::describe_mmap(.source))]
    Mmap {
        /// Start of the range.
        iova: u64,
        /// Length of the range.
        size: u64,
        /// The OS error.
        source: io::Error,
    },
    /// An access touches addresses no map covers.
    #[error("DMA access {iova:#x}+{len:#x} is not mapped")]
    NotMapped {
        /// Start of the access.
        iova: u64,
        /// Length of the access.
        len: usize,
    },
    /// An access the map's permissions forbid.
    #[error("DMA {what} of {iova:#x}+{len:#x} is not permitted by the map")]
    Permission {
        /// "read" or "write".
        what: &'static str,
        /// Start of the access.
        iova: u64,
        /// Length of the access.
        len: usize,
    },
    /// A map without an fd was accessed but the transport offers no message path.
    #[error("DMA access {iova:#x}+{len:#x} needs a message path and none is attached")]
    NoMessagePath {
        /// Start of the access.
        iova: u64,
        /// Length of the access.
        len: usize,
    },
    /// The message path (the client) failed the transfer.
    #[error("DMA transfer through the client failed: {0}")]
    Transfer(io::Error),
}

impl MemoryError {
    /// The errno a transport should report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            MemoryError::InvalidRange { .. } => libc::EINVAL,
            MemoryError::Overlap { .. } => libc::EEXIST,
            MemoryError::NoSuchMap { .. } => libc::ENOENT,
            MemoryError::TooManyMaps(_) => libc::ENOSPC,
            MemoryError::Mmap { source, .. } => source.raw_os_error().unwrap_or(libc::ENOMEM),
            MemoryError::NotMapped { .. } => libc::EFAULT,
            MemoryError::Permission { .. } => libc::EACCES,
            MemoryError::NoMessagePath { .. } => libc::EFAULT,
            MemoryError::Transfer(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// A client's request to make `iova..iova+size` reachable by the device.
#[derive(Debug)]
pub struct MapRequest {
    /// Start address in the device's (client's) DMA address space.
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// Permissions granted.
    pub prot: Prot,
    /// The memory behind the range, when the client shared it as a file.
    pub backing: Option<FdBacking>,
}

/// File-backed memory: `file` at `offset` holds the bytes of the map's first address.
#[derive(Debug)]
pub struct FdBacking {
    /// The client's file (memfd, hugetlbfs file, ...).
    pub file: File,
    /// Offset in `file` of the map's first byte.
    pub offset: u64,
}

/// How a transport moves bytes for maps that have no fd: vfio-user's DMA_READ/DMA_WRITE.
pub trait DmaMessagePath: Send + Sync {
    /// Fill `buf` from client memory at `iova`.
    fn dma_read(&self, iova: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Store `data` into client memory at `iova`.
    fn dma_write(&self, iova: u64, data: &[u8]) -> io::Result<()>;
}

/// One recorded DMA map.
#[derive(Debug, Clone)]
pub struct DmaMap {
    /// Start address.
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// Permissions.
    pub prot: Prot,
    /// The mmap of the client's fd, if the map had one.
    region: Option<Arc<GuestRegionMmap>>,
}

impl DmaMap {
    /// Whether the map is backed by a file descriptor (and so lives in the snapshot).
    pub fn has_fd(&self) -> bool {
        self.region.is_some()
    }

    fn end(&self) -> u64 {
        self.iova + self.size
    }
}

#[derive(Default)]
struct MapTable {
    maps: BTreeMap<u64, DmaMap>,
    stale: bool,
}

impl MapTable {
    /// The map containing `addr`, if any.
    fn containing(&self, addr: u64) -> Option<&DmaMap> {
        self.maps
            .range(..=addr)
            .next_back()
            .map(|(_, m)| m)
            .filter(|m| addr < m.end())
    }
}

/// The device's view of client memory: the set of DMA maps, a lock-free snapshot of the
/// fd-backed ones, and the message path for the rest. One per device, shared (`Arc`) by
/// the transport that fills it and the device code that reads it.
///
/// A full PCI device is given one at construction and returns it from
/// `PciDevice::dma`; it reaches client memory with [`read`](DmaSpace::read) and
/// [`write`](DmaSpace::write) by IOVA (the bus addresses its driver programmed). A virtio
/// backend never sees the `DmaSpace` itself: it gets the [`snapshot`](DmaSpace::snapshot)
/// through `VhostUserBackend::update_memory`, as under vhost-user. Transports call
/// [`map`](DmaSpace::map), [`unmap`](DmaSpace::unmap) and [`publish`](DmaSpace::publish).
///
/// # Example
///
/// ```
/// use unidev_core::memory::{DmaSpace, FdBacking, MapRequest, Prot};
/// use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dma = DmaSpace::default();
///
/// // What a transport does on the client's DMA_MAP: 64 KiB of a shared file at IOVA 1 MiB.
/// let path = std::env::temp_dir().join(format!("unidev-doc-dma-{}", std::process::id()));
/// let file = std::fs::OpenOptions::new()
///     .read(true)
///     .write(true)
///     .create(true)
///     .truncate(true)
///     .open(&path)?;
/// file.set_len(0x1_0000)?;
/// dma.map(MapRequest {
///     iova: 0x10_0000,
///     size: 0x1_0000,
///     prot: Prot::READ_WRITE,
///     backing: Some(FdBacking { file, offset: 0 }),
/// })?;
/// dma.publish(); // once per batch of client messages
///
/// // The device reads and writes by IOVA; ranges and permissions are checked.
/// dma.write(0x10_0010, b"hello")?;
/// let mut back = [0; 5];
/// dma.read(0x10_0010, &mut back)?;
/// assert_eq!(&back, b"hello");
/// assert!(dma.read(0x20_0000, &mut back).is_err(), "not mapped");
///
/// // The same bytes, through the snapshot a virtio backend reads without locks.
/// let mem = dma.snapshot().memory();
/// mem.read_slice(&mut back, GuestAddress(0x10_0010))?;
/// assert_eq!(&back, b"hello");
/// # drop(mem);
/// # std::fs::remove_file(&path)?;
/// # Ok(())
/// # }
/// ```
pub struct DmaSpace {
    table: Mutex<MapTable>,
    snapshot: GuestMemorySnapshot,
    message_path: RwLock<Option<Arc<dyn DmaMessagePath>>>,
    listeners: RwLock<Vec<MemoryListener>>,
    max_maps: usize,
}

/// Called after the snapshot changed (a backend's `update_memory`, for instance).
pub type MemoryListener = Arc<dyn Fn(&GuestMemorySnapshot) + Send + Sync>;

impl Default for DmaSpace {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_MAPS)
    }
}

impl std::fmt::Debug for DmaSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaSpace")
            .field("maps", &self.len())
            .field("max_maps", &self.max_maps)
            .finish()
    }
}

impl DmaSpace {
    /// An empty space that accepts at most `max_maps` maps.
    pub fn new(max_maps: usize) -> Self {
        DmaSpace {
            table: Mutex::new(MapTable::default()),
            snapshot: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            message_path: RwLock::new(None),
            listeners: RwLock::new(Vec::new()),
            max_maps,
        }
    }

    /// The cap on the number of maps.
    pub fn max_maps(&self) -> usize {
        self.max_maps
    }

    /// Number of maps currently recorded.
    pub fn len(&self) -> usize {
        self.lock_table().maps.len()
    }

    /// Whether no map is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock_table(&self) -> std::sync::MutexGuard<'_, MapTable> {
        // A panic while holding the lock cannot leave the table inconsistent (every
        // mutation is a single insert/remove), so recover from poisoning.
        lock(&self.table)
    }

    /// The snapshot handle workers keep; `memory()` on it is lock-free.
    pub fn snapshot(&self) -> GuestMemorySnapshot {
        self.snapshot.clone()
    }

    /// Call `listener` after every change of the snapshot (vhost-user-backend's daemon
    /// calls `update_memory` on every memory-table change; devices do the same here).
    pub fn subscribe(&self, listener: MemoryListener) {
        sync::write(&self.listeners).push(listener);
    }

    fn notify_listeners(&self) {
        let listeners = sync::read(&self.listeners).clone();
        for l in listeners {
            l(&self.snapshot);
        }
    }

    /// Attach (or detach with `None`) the transport's path for maps without an fd.
    pub fn set_message_path(&self, path: Option<Arc<dyn DmaMessagePath>>) {
        *sync::write(&self.message_path) = path;
    }

    /// Record a map. Fails with `EEXIST` on overlap, `ENOSPC` past the cap, `EINVAL` on a
    /// zero-sized or wrapping range. The snapshot is updated at the next [`publish`].
    ///
    /// [`publish`]: DmaSpace::publish
    pub fn map(&self, req: MapRequest) -> Result<(), MemoryError> {
        let MapRequest {
            iova,
            size,
            prot,
            backing,
        } = req;
        let invalid = |why| MemoryError::InvalidRange { iova, size, why };
        if size == 0 {
            return Err(invalid("zero size"));
        }
        let end = iova
            .checked_add(size)
            .ok_or_else(|| invalid("range wraps around"))?;
        if !prot.read && !prot.write {
            return Err(invalid("neither read nor write permission"));
        }
        {
            let table = self.lock_table();
            if table.maps.len() >= self.max_maps {
                return Err(MemoryError::TooManyMaps(self.max_maps));
            }
            if Self::overlaps(&table, iova, end) {
                return Err(MemoryError::Overlap { iova, size });
            }
        }
        // mmap outside the lock: it can be slow for large maps.
        let region = match backing {
            Some(b) => {
                let (region, guard_page) = Self::mmap(iova, size, prot, b)?;
                let region = Arc::new(region);
                if let Some(page) = guard_page {
                    crate::truncation_guard::guard(&region, page);
                }
                Some(region)
            }
            None => None,
        };
        let mut table = self.lock_table();
        // Re-check: another thread may have mapped meanwhile.
        if table.maps.len() >= self.max_maps {
            return Err(MemoryError::TooManyMaps(self.max_maps));
        }
        if Self::overlaps(&table, iova, end) {
            return Err(MemoryError::Overlap { iova, size });
        }
        table.stale |= region.is_some();
        table.maps.insert(
            iova,
            DmaMap {
                iova,
                size,
                prot,
                region,
            },
        );
        Ok(())
    }

    fn overlaps(table: &MapTable, iova: u64, end: u64) -> bool {
        if let Some((_, before)) = table.maps.range(..=iova).next_back() {
            if before.end() > iova {
                return true;
            }
        }
        table.maps.range(iova..end).next().is_some()
    }

    /// Map `backing`; also returns the page size to guard the mapping with when its file
    /// could not be sealed against shrinking.
    fn mmap(
        iova: u64,
        size: u64,
        prot: Prot,
        backing: FdBacking,
    ) -> Result<(GuestRegionMmap, Option<usize>), MemoryError> {
        let invalid = |why| MemoryError::InvalidRange { iova, size, why };
        let len = usize::try_from(size).map_err(|_| invalid("size too large"))?;
        let end = backing
            .offset
            .checked_add(size)
            .ok_or_else(|| invalid("file offset + size wraps around"))?;
        let meta = backing
            .file
            .metadata()
            .map_err(|source| MemoryError::Mmap { iova, size, source })?;
        // Regular files (what clients share) must hold the range and are sealed where
        // possible. Kernel-made files (VDUSE's bounce domain, an anonymous inode) report
        // no size; transports decide which kinds of file their peers may send.
        let mut guard_page = None;
        if meta.file_type().is_file() {
            if end > meta.len() {
                return Err(invalid("the range runs past the end of the file"));
            }
            if !seal_against_shrinking(&backing.file) {
                guard_page = Some(file_page_size(&backing.file));
            }
        }
        // Read-only maps become private copy-on-write mappings: a device writing to them
        // never reaches client memory and cannot fault.
        let flags = if prot.write {
            libc::MAP_SHARED
        } else {
            libc::MAP_PRIVATE
        };
        let mmap = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(backing.file, backing.offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Mmap {
                iova,
                size,
                source: match e {
                    vm_memory::mmap::MmapRegionError::Mmap(io) => io,
                    other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
                },
            })?;
        let region =
            GuestRegionMmap::new(mmap, GuestAddress(iova)).ok_or(MemoryError::InvalidRange {
                iova,
                size,
                why: "range ends past the address space",
            })?;
        Ok((region, guard_page))
    }

    /// Remove the map that is exactly `iova..iova+size` and publish the snapshot.
    pub fn unmap(&self, iova: u64, size: u64) -> Result<DmaMap, MemoryError> {
        let mut table = self.lock_table();
        match table.maps.get(&iova) {
            Some(m) if m.size == size => {}
            _ => return Err(MemoryError::NoSuchMap { iova, size }),
        }
        let removed = table
            .maps
            .remove(&iova)
            .ok_or(MemoryError::NoSuchMap { iova, size })?;
        if removed.has_fd() {
            table.stale = true;
            let changed = self.publish_locked(&mut table);
            drop(table);
            if changed {
                self.notify_listeners();
            }
            crate::truncation_guard::sweep();
        }
        Ok(removed)
    }

    /// Remove every map and publish the (empty) snapshot. Returns how many were removed.
    pub fn unmap_all(&self) -> usize {
        let mut table = self.lock_table();
        let n = table.maps.len();
        table.maps.clear();
        table.stale = true;
        let changed = self.publish_locked(&mut table);
        drop(table);
        if changed {
            self.notify_listeners();
        }
        crate::truncation_guard::sweep();
        n
    }

    /// Make the snapshot reflect every map recorded so far. Cheap when nothing changed.
    /// Returns whether the snapshot changed (backends then get `update_memory`).
    pub fn publish(&self) -> bool {
        let mut table = self.lock_table();
        let changed = self.publish_locked(&mut table);
        drop(table);
        if changed {
            self.notify_listeners();
        }
        changed
    }

    fn publish_locked(&self, table: &mut MapTable) -> bool {
        if !table.stale {
            return false;
        }
        let regions: Vec<Arc<GuestRegionMmap>> = table
            .maps
            .values()
            .filter_map(|m| m.region.clone())
            .collect();
        let mem = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            match GuestMemoryMmap::from_arc_regions(regions) {
                Ok(m) => m,
                Err(e) => {
                    // Cannot happen: the table is sorted and overlap-free by construction.
                    log::error!("cannot publish DMA snapshot: {e}");
                    return false;
                }
            }
        };
        match self.snapshot.lock() {
            Ok(guard) => guard.replace(mem),
            Err(e) => e.into_inner().replace(mem),
        }
        table.stale = false;
        true
    }

    /// All maps, in address order (for diagnostics and tests).
    pub fn maps(&self) -> Vec<DmaMap> {
        self.lock_table().maps.values().cloned().collect()
    }

    /// The map containing `iova`, if any.
    pub fn find(&self, iova: u64) -> Option<DmaMap> {
        self.lock_table().containing(iova).cloned()
    }

    /// Read `buf.len()` bytes of client memory at `iova`, through the mmap for fd-backed
    /// maps and through the message path otherwise. The range may span adjacent maps.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        while done < buf.len() {
            let addr = iova + done as u64;
            let (chunk, map) = self.chunk(iova, buf.len(), addr, done, "read")?;
            let dst = &mut buf[done..done + chunk];
            match &map.region {
                Some(region) => region
                    .read_slice(dst, MemoryRegionAddress(addr - map.iova))
                    .map_err(|_| MemoryError::NotMapped {
                        iova: addr,
                        len: chunk,
                    })?,
                None => self
                    .path(addr, chunk)?
                    .dma_read(addr, dst)
                    .map_err(MemoryError::Transfer)?,
            }
            done += chunk;
        }
        Ok(())
    }

    /// Write `data` to client memory at `iova` (see [`DmaSpace::read`]).
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), MemoryError> {
        let mut done = 0usize;
        while done < data.len() {
            let addr = iova + done as u64;
            let (chunk, map) = self.chunk(iova, data.len(), addr, done, "write")?;
            let src = &data[done..done + chunk];
            match &map.region {
                Some(region) => region
                    .write_slice(src, MemoryRegionAddress(addr - map.iova))
                    .map_err(|_| MemoryError::NotMapped {
                        iova: addr,
                        len: chunk,
                    })?,
                None => self
                    .path(addr, chunk)?
                    .dma_write(addr, src)
                    .map_err(MemoryError::Transfer)?,
            }
            done += chunk;
        }
        Ok(())
    }

    /// The part of an access starting at `addr` that one map covers, with that map.
    fn chunk(
        &self,
        iova: u64,
        len: usize,
        addr: u64,
        done: usize,
        what: &'static str,
    ) -> Result<(usize, DmaMap), MemoryError> {
        let not_mapped = MemoryError::NotMapped { iova, len };
        if iova.checked_add(len as u64).is_none() {
            return Err(not_mapped);
        }
        let map = self.find(addr).ok_or(not_mapped)?;
        let allowed = if what == "write" {
            map.prot.write
        } else {
            map.prot.read
        };
        if !allowed {
            return Err(MemoryError::Permission { what, iova, len });
        }
        let chunk = ((map.end() - addr) as usize).min(len - done);
        Ok((chunk, map))
    }

    fn path(&self, iova: u64, len: usize) -> Result<Arc<dyn DmaMessagePath>, MemoryError> {
        sync::read(&self.message_path)
            .clone()
            .ok_or(MemoryError::NoMessagePath { iova, len })
    }
}

/// How many device accesses to client memory that its client truncated under the
/// mapping (an unsealable file) were absorbed: each read zeros instead of killing the
/// daemon with SIGBUS. Process-wide; also logged at the next map change.
pub fn truncated_accesses_absorbed() -> u64 {
    crate::truncation_guard::faults_absorbed()
}

/// Seal a client's memfd against shrinking if it allows sealing and is not sealed yet:
/// a shrink under a mapping would make device accesses SIGBUS. Returns whether the file
/// can no longer shrink; files that cannot be sealed are guarded instead (module doc).
fn seal_against_shrinking(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: F_GET_SEALS on a valid descriptor; failure (not a memfd) is checked.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 {
        return false;
    }
    if seals & libc::F_SEAL_SHRINK != 0 {
        return true;
    }
    if seals & libc::F_SEAL_SEAL != 0 {
        return false;
    }
    // SAFETY: F_ADD_SEALS with a valid seal on a valid descriptor; failure is checked.
    unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) == 0 }
}

/// The granule in which the file's pages are mapped: the huge page size on hugetlbfs,
/// the system page size elsewhere (a power of two either way).
fn file_page_size(file: &File) -> usize {
    use std::os::fd::AsRawFd;
    // SAFETY: sysconf has no memory effects.
    let system = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    // SAFETY: a zeroed statfs is a valid out-buffer for fstatfs.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes into `fs`, which lives for the call.
    let hugetlbfs = unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } == 0
        && fs.f_type == libc::HUGETLBFS_MAGIC;
    let page = if hugetlbfs {
        usize::try_from(fs.f_bsize).unwrap_or(system)
    } else {
        system
    };
    if page.is_power_of_two() {
        page.max(system)
    } else {
        system
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};
    use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

    fn memfd(len: usize) -> File {
        let mut f = tempfile_memfd();
        f.write_all(&vec![0u8; len]).unwrap();
        f.rewind().unwrap();
        f
    }

    fn tempfile_memfd() -> File {
        let name = std::ffi::CString::new("unidev-test").unwrap();
        // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd is owned
        // by the File from here on.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }
    }

    fn anon(iova: u64, size: u64) -> MapRequest {
        MapRequest {
            iova,
            size,
            prot: Prot::READ_WRITE,
            backing: None,
        }
    }

    #[test]
    fn overlap_is_eexist_and_adjacent_is_fine() {
        let s = DmaSpace::default();
        s.map(anon(0x1000, 0x1000)).unwrap();
        for (iova, size) in [(0x1000, 0x1000), (0x800, 0x1000), (0x1fff, 1), (0, 0x10000)] {
            let e = s.map(anon(iova, size)).unwrap_err();
            assert_eq!(e.errno(), libc::EEXIST, "{iova:#x}+{size:#x}");
        }
        s.map(anon(0x2000, 0x1000)).unwrap();
        s.map(anon(0, 0x1000)).unwrap();
        assert_eq!(s.len(), 3);
    }

    #[test]
    fn invalid_ranges_are_einval() {
        let s = DmaSpace::default();
        assert_eq!(s.map(anon(0, 0)).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(s.map(anon(u64::MAX, 2)).unwrap_err().errno(), libc::EINVAL);
        let none = MapRequest {
            prot: Prot::default(),
            ..anon(0, 0x1000)
        };
        assert_eq!(s.map(none).unwrap_err().errno(), libc::EINVAL);
        assert!(s.is_empty());
    }

    #[test]
    fn unmap_must_match_exactly() {
        let s = DmaSpace::default();
        s.map(anon(0x10000, 0x4000)).unwrap();
        assert_eq!(s.unmap(0x10000, 0x1000).unwrap_err().errno(), libc::ENOENT);
        assert_eq!(s.unmap(0x11000, 0x3000).unwrap_err().errno(), libc::ENOENT);
        assert_eq!(s.unmap(0x20000, 0x4000).unwrap_err().errno(), libc::ENOENT);
        s.unmap(0x10000, 0x4000).unwrap();
        assert!(s.is_empty());
    }

    #[test]
    fn cap_on_maps_is_enforced() {
        let s = DmaSpace::new(3);
        for i in 0..3 {
            s.map(anon(i * 0x1000, 0x1000)).unwrap();
        }
        assert_eq!(
            s.map(anon(0x10000, 0x1000)).unwrap_err().errno(),
            libc::ENOSPC
        );
        s.unmap(0, 0x1000).unwrap();
        s.map(anon(0x10000, 0x1000)).unwrap();
    }

    #[test]
    fn fd_maps_reach_the_snapshot_and_unmap_removes_them() {
        let s = DmaSpace::default();
        let f = memfd(0x4000);
        let snap = s.snapshot();
        s.map(MapRequest {
            iova: 0x100000,
            size: 0x2000,
            prot: Prot::READ_WRITE,
            backing: Some(FdBacking {
                file: f.try_clone().unwrap(),
                offset: 0x1000,
            }),
        })
        .unwrap();
        assert_eq!(snap.memory().num_regions(), 0, "not published yet");
        assert!(s.publish());
        assert!(!s.publish(), "second publish is a no-op");
        assert_eq!(snap.memory().num_regions(), 1);
        s.write(0x100010, b"hello").unwrap();
        // The write reached the client's file at offset 0x1010.
        let mut buf = [0u8; 5];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0x1010).unwrap();
        assert_eq!(&buf, b"hello");
        // And workers see it through the snapshot.
        let mut buf2 = [0u8; 5];
        snap.memory()
            .read_slice(&mut buf2, GuestAddress(0x100010))
            .unwrap();
        assert_eq!(&buf2, b"hello");
        s.unmap(0x100000, 0x2000).unwrap();
        assert_eq!(snap.memory().num_regions(), 0, "unmap publishes at once");
        assert_eq!(
            s.read(0x100010, &mut buf).unwrap_err().errno(),
            libc::EFAULT
        );
    }

    #[test]
    fn listeners_hear_every_snapshot_change_including_unmaps() {
        let s = DmaSpace::default();
        let heard = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = heard.clone();
        s.subscribe(Arc::new(move |_| {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        let backed = |iova| MapRequest {
            iova,
            size: 0x1000,
            prot: Prot::READ_WRITE,
            backing: Some(FdBacking {
                file: memfd(0x1000),
                offset: 0,
            }),
        };
        s.map(backed(0)).unwrap();
        s.map(backed(0x1000)).unwrap();
        assert!(s.publish());
        assert_eq!(
            heard.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one publish"
        );
        s.unmap(0, 0x1000).unwrap();
        assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 2, "unmap");
        s.unmap_all();
        assert_eq!(
            heard.load(std::sync::atomic::Ordering::SeqCst),
            3,
            "unmap all"
        );
        // Maps without an fd do not change the snapshot: nobody is told.
        s.map(anon(0x10000, 0x1000)).unwrap();
        s.unmap(0x10000, 0x1000).unwrap();
        assert_eq!(heard.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn read_only_maps_refuse_writes_and_never_change_client_memory() {
        let s = DmaSpace::default();
        let f = memfd(0x1000);
        s.map(MapRequest {
            iova: 0,
            size: 0x1000,
            prot: Prot::READ_ONLY,
            backing: Some(FdBacking {
                file: f.try_clone().unwrap(),
                offset: 0,
            }),
        })
        .unwrap();
        s.publish();
        assert_eq!(s.write(0, b"x").unwrap_err().errno(), libc::EACCES);
        // A device writing through vm-memory only changes its private copy.
        s.snapshot()
            .memory()
            .write_slice(b"zz", GuestAddress(0))
            .unwrap();
        let mut buf = [1u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0).unwrap();
        assert_eq!(buf, [0, 0]);
    }

    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl DmaMessagePath for Recorder {
        fn dma_read(&self, iova: u64, buf: &mut [u8]) -> io::Result<()> {
            buf.fill(iova as u8);
            Ok(())
        }
        fn dma_write(&self, iova: u64, data: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().push((iova, data.to_vec()));
            Ok(())
        }
    }

    #[test]
    fn maps_without_fd_use_the_message_path_and_accesses_may_span_maps() {
        let s = DmaSpace::default();
        s.map(anon(0x1000, 0x10)).unwrap();
        s.map(anon(0x1010, 0x10)).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(s.read(0x1000, &mut buf).unwrap_err().errno(), libc::EFAULT);
        let rec = Arc::new(Recorder(Mutex::new(Vec::new())));
        s.set_message_path(Some(rec.clone()));
        s.write(0x100c, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![(0x100c, vec![1, 2, 3, 4]), (0x1010, vec![5, 6, 7, 8])]
        );
        s.read(0x1010, &mut buf).unwrap();
        assert_eq!(buf, [0x10; 4]);
        // Past the end of the last map.
        assert_eq!(s.read(0x101e, &mut buf).unwrap_err().errno(), libc::EFAULT);
    }

    #[test]
    fn lookup_with_many_maps() {
        let s = DmaSpace::default();
        for i in 0..DEFAULT_MAX_MAPS as u64 {
            s.map(anon(i * 0x2000, 0x1000)).unwrap();
        }
        assert_eq!(
            s.map(anon(u64::MAX / 2, 1)).unwrap_err().errno(),
            libc::ENOSPC
        );
        assert_eq!(s.find(0x2000 * 40000 + 5).unwrap().iova, 0x2000 * 40000);
        assert!(s.find(0x2000 * 40000 + 0x1000).is_none());
        assert_eq!(s.unmap_all(), DEFAULT_MAX_MAPS);
    }

    fn sealable_memfd(len: u64) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let raw = unsafe {
            libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(raw >= 0);
        // SAFETY: a new descriptor owned by nobody else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        f.set_len(len).unwrap();
        f
    }

    #[test]
    fn a_map_must_fit_its_file_and_a_memfd_is_sealed_against_shrinking() {
        let dma = DmaSpace::default();
        let map = |iova, size, file: &File, offset| {
            dma.map(MapRequest {
                iova,
                size,
                prot: Prot::READ_WRITE,
                backing: Some(FdBacking {
                    file: file.try_clone().unwrap(),
                    offset,
                }),
            })
        };
        let f = sealable_memfd(0x4000);
        assert_eq!(map(0, 0x8000, &f, 0).unwrap_err().errno(), libc::EINVAL);
        assert_eq!(
            map(0, 0x4000, &f, 0x1000).unwrap_err().errno(),
            libc::EINVAL
        );
        map(0, 0x4000, &f, 0).unwrap();
        // The client can no longer cut the memory short under the device.
        assert!(f.set_len(0x1000).is_err(), "shrinking a mapped memfd");
        assert!(f.set_len(0x8000).is_ok(), "growing is harmless");
    }

    #[test]
    fn a_client_truncating_unsealable_memory_does_not_kill_the_device() {
        use vm_memory::GuestAddressSpace;
        let dma = DmaSpace::default();
        // A memfd made without MFD_ALLOW_SEALING cannot be sealed: like a tmpfs or
        // hugetlbfs file, the client can shrink it while the device has it mapped.
        let f = memfd(0x4000);
        let mut pattern = vec![0xa5u8; 0x4000];
        std::os::unix::fs::FileExt::write_all_at(&f, &pattern, 0).unwrap();
        dma.map(MapRequest {
            iova: 0x10000,
            size: 0x4000,
            prot: Prot::READ_WRITE,
            backing: Some(FdBacking {
                file: f.try_clone().unwrap(),
                offset: 0,
            }),
        })
        .unwrap();
        dma.publish();
        let before = truncated_accesses_absorbed();
        f.set_len(0x1000).expect("an unsealable file can shrink");
        // The first page is still backed; the rest faulted (SIGBUS) before the guard and
        // now reads zeros through both the snapshot and the DmaSpace accessors.
        let mem = dma.snapshot().memory();
        let mut buf = vec![0u8; 0x4000];
        mem.read_slice(&mut buf, GuestAddress(0x10000)).unwrap();
        assert_eq!(&buf[..0x1000], &pattern[..0x1000]);
        assert!(
            buf[0x1000..].iter().all(|&b| b == 0),
            "cut pages read zeros"
        );
        assert!(truncated_accesses_absorbed() > before);
        dma.write(0x13000, &[1, 2, 3]).unwrap();
        dma.read(0x12ff0, &mut buf[..32]).unwrap();
        assert_eq!(&buf[16..19], &[1, 2, 3], "the replacement page is usable");
        // Growing the file back does not resurrect the client's view for the device:
        // its memory is gone; only the pages still backed are shared.
        pattern[0] = 0x5a;
        std::os::unix::fs::FileExt::write_all_at(&f, &pattern[..1], 0).unwrap();
        mem.read_slice(&mut buf[..1], GuestAddress(0x10000))
            .unwrap();
        assert_eq!(buf[0], 0x5a, "the uncut page stays shared");
        drop(mem);
        dma.unmap(0x10000, 0x4000).unwrap();
    }
}
