//! The kernel's VDUSE IOTLB mirrored into the device's [`DmaSpace`].
//!
//! VDUSE (kernel `Documentation/userspace-api/vduse.rst`, "How VDUSE works") gives the
//! device its memory as IOTLB entries: `VDUSE_IOTLB_GET_FD` on `[start, last]` returns the
//! first entry overlapping the range — its exact `[start, last]`, permission, and a file
//! descriptor plus offset to `mmap`. Each entry becomes one [`DmaSpace`] map (iova =
//! entry start, size = last - start + 1, `FdBacking { file, offset }`), so the device's
//! workers see it in the one memory snapshot every transport fills.
//!
//! libvduse (QEMU) maps entries lazily, on the first miss of an address translation. The
//! core's memory is a vm-memory `GuestMemoryMmap` that backends read directly: a miss is
//! an error there, not a hook, so this mirror instead enumerates the IOTLB eagerly —
//! `GET_FD` from 0 over `[start, u64::MAX]`, map, continue at `last + 1` — at DRIVER_OK
//! and for each UPDATE_IOTLB message ([`IotlbMirror::sync`]).
//!
//! One kind of entry escapes both: with `virtio-vdpa`, the kernel adds its bounce-buffer
//! region `[0, bounce_size - 1]` to the IOTLB only when the driver first maps a streaming
//! DMA buffer (`vduse_domain_init_bounce_map` in `drivers/vdpa/vdpa_user/iova_domain.c`),
//! which is after DRIVER_OK and without any message. The first request's buffers then
//! live there. So until an entry starting at IOVA 0 is mirrored, kicks go through a relay
//! that fills the IOTLB gaps ([`IotlbMirror::fill_gaps`], a few `GET_FD` calls that find
//! nothing once everything is mapped) before waking the device; after that the kick
//! eventfd is handed to the kernel directly (see `session`).
//!
//! Entries are compared by range, offset, permission and file identity (device and inode
//! of the returned descriptor), so re-reading an unchanged IOTLB (vhost-vdpa's
//! `UPDATE_IOTLB [0, u64::MAX]` on every memory-table change) leaves running queues'
//! memory untouched.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use unidev_core::memory::{DmaSpace, FdBacking, MapRequest, Prot};
use unidev_core::sync::lock;

use super::uapi::{VduseIotlbEntry, VDUSE_ACCESS_RO, VDUSE_ACCESS_RW, VDUSE_ACCESS_WO};

/// The IOTLB lookup the mirror needs (`VDUSE_IOTLB_GET_FD`).
pub trait IotlbSource: Send + Sync {
    /// The first IOTLB entry overlapping `[start, last]` and a descriptor of its memory,
    /// or `None` when no entry overlaps (the kernel's `EINVAL`).
    fn iotlb_get_fd(&self, start: u64, last: u64) -> io::Result<Option<(File, VduseIotlbEntry)>>;
}

/// What identifies a mirrored entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mirrored {
    last: u64,
    offset: u64,
    perm: u8,
    file_id: (u64, u64),
}

/// The DMA permissions of an IOTLB permission, `None` for an invalid one.
pub fn prot_of(perm: u8) -> Option<Prot> {
    match perm {
        VDUSE_ACCESS_RO => Some(Prot::READ_ONLY),
        VDUSE_ACCESS_WO => Some(Prot {
            read: false,
            write: true,
        }),
        VDUSE_ACCESS_RW => Some(Prot::READ_WRITE),
        _ => None,
    }
}

/// Keeps a device's [`DmaSpace`] equal to the kernel's IOTLB.
pub struct IotlbMirror {
    source: Arc<dyn IotlbSource>,
    dma: Arc<DmaSpace>,
    /// Mirrored entries by start address.
    entries: Mutex<BTreeMap<u64, Mirrored>>,
    name: String,
}

impl IotlbMirror {
    /// A mirror filling `dma` from `source`; `name` prefixes log lines.
    pub fn new(name: impl Into<String>, source: Arc<dyn IotlbSource>, dma: Arc<DmaSpace>) -> Self {
        IotlbMirror {
            source,
            dma,
            entries: Mutex::new(BTreeMap::new()),
            name: name.into(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Mirrored>> {
        lock(&self.entries)
    }

    /// The space the mirror fills.
    pub fn dma(&self) -> &DmaSpace {
        &self.dma
    }

    /// Whether the bounce region (an entry at IOVA 0) is mirrored: from then on, new
    /// entries only come with UPDATE_IOTLB or before DRIVER_OK.
    pub fn settled(&self) -> bool {
        self.lock().contains_key(&0)
    }

    /// Number of mirrored entries.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is mirrored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget every entry and unmap everything (device reset).
    pub fn clear(&self) {
        self.lock().clear();
        self.dma.unmap_all();
    }

    /// Every IOTLB entry overlapping `[start, last]`, in address order.
    fn lookup_all(&self, start: u64, last: u64) -> io::Result<Vec<(File, VduseIotlbEntry)>> {
        let mut found = Vec::new();
        let mut cur = start;
        loop {
            let Some((file, entry)) = self.source.iotlb_get_fd(cur, last)? else {
                break;
            };
            if entry.last < cur || entry.start > last || entry.start > entry.last {
                warn!(
                    "{}: IOTLB lookup of [{cur:#x}, {last:#x}] returned [{:#x}, {:#x}]; stopping",
                    self.name, entry.start, entry.last
                );
                break;
            }
            let next = entry.last.checked_add(1);
            found.push((file, entry));
            match next {
                Some(n) if n <= last => cur = n,
                _ => break,
            }
        }
        Ok(found)
    }

    /// Make the mirror equal the IOTLB over `[start, last]` (UPDATE_IOTLB, DRIVER_OK):
    /// entries gone or changed are unmapped, new ones mapped, unchanged ones kept; then
    /// the snapshot is published. Returns whether anything changed.
    pub fn sync(&self, start: u64, last: u64) -> io::Result<bool> {
        if start > last {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("IOVA range [{start:#x}, {last:#x}] is empty"),
            ));
        }
        let fresh = self.lookup_all(start, last)?;
        let mut changed = false;
        // Unmap mirrored entries in the range that the IOTLB no longer has as they are.
        let stale: Vec<u64> = {
            let entries = self.lock();
            entries
                .iter()
                .filter(|(&s, m)| s <= last && m.last >= start)
                .filter(|(&s, m)| {
                    !fresh
                        .iter()
                        .any(|(f, e)| e.start == s && Self::describe(f, e).as_ref() == Some(m))
                })
                .map(|(&s, _)| s)
                .collect()
        };
        for s in stale {
            self.remove(s);
            changed = true;
        }
        for (file, entry) in fresh {
            changed |= self.install(file, entry);
        }
        if self.dma.publish() {
            changed = true;
        }
        Ok(changed)
    }

    /// Map every IOTLB entry that lies in an unmirrored gap (the kick relay's check for
    /// entries the kernel added without a message). Returns whether anything changed.
    pub fn fill_gaps(&self) -> io::Result<bool> {
        let gaps = {
            let entries = self.lock();
            let mut gaps = Vec::new();
            let mut cur = Some(0u64);
            for (&s, m) in entries.iter() {
                if let Some(c) = cur {
                    if s > c {
                        gaps.push((c, s - 1));
                    }
                }
                cur = m.last.checked_add(1);
            }
            if let Some(c) = cur {
                gaps.push((c, u64::MAX));
            }
            gaps
        };
        let mut changed = false;
        for (start, last) in gaps {
            for (file, entry) in self.lookup_all(start, last)? {
                changed |= self.install(file, entry);
            }
        }
        if changed {
            self.dma.publish();
        }
        Ok(changed)
    }

    fn describe(file: &File, entry: &VduseIotlbEntry) -> Option<Mirrored> {
        let meta = file.metadata().ok()?;
        Some(Mirrored {
            last: entry.last,
            offset: entry.offset,
            perm: entry.perm,
            file_id: (meta.dev(), meta.ino()),
        })
    }

    fn remove(&self, start: u64) {
        let Some(m) = self.lock().remove(&start) else {
            return;
        };
        let size = m.last.wrapping_sub(start).wrapping_add(1);
        if let Err(e) = self.dma.unmap(start, size) {
            warn!("{}: cannot unmap IOVA {start:#x}+{size:#x}: {e}", self.name);
        }
        debug!("{}: unmapped [{start:#x}, {:#x}]", self.name, m.last);
    }

    /// Mirror one entry (replacing mirrored entries it overlaps). Returns whether it
    /// changed anything.
    fn install(&self, file: File, entry: VduseIotlbEntry) -> bool {
        let Some(desc) = Self::describe(&file, &entry) else {
            warn!(
                "{}: cannot stat the IOTLB file of {:#x}",
                self.name, entry.start
            );
            return false;
        };
        if self.lock().get(&entry.start) == Some(&desc) {
            return false;
        }
        let overlapping: Vec<u64> = self
            .lock()
            .iter()
            .filter(|(&s, m)| s <= entry.last && m.last >= entry.start)
            .map(|(&s, _)| s)
            .collect();
        let mut changed = !overlapping.is_empty();
        for s in overlapping {
            self.remove(s);
        }
        let Some(prot) = prot_of(entry.perm) else {
            warn!(
                "{}: IOTLB entry [{:#x}, {:#x}] has invalid permission {}",
                self.name, entry.start, entry.last, entry.perm
            );
            return changed;
        };
        let Some(size) = (entry.last - entry.start).checked_add(1) else {
            warn!(
                "{}: IOTLB entry spans the whole 64-bit space; ignored",
                self.name
            );
            return changed;
        };
        match self.dma.map(MapRequest {
            iova: entry.start,
            size,
            prot,
            backing: Some(FdBacking {
                file,
                offset: entry.offset,
            }),
        }) {
            Ok(()) => {
                self.lock().insert(entry.start, desc);
                debug!(
                    "{}: mapped [{:#x}, {:#x}] (offset {:#x}, perm {})",
                    self.name, entry.start, entry.last, entry.offset, entry.perm
                );
                changed = true;
            }
            Err(e) => warn!(
                "{}: cannot map IOTLB entry [{:#x}, {:#x}]: {e}",
                self.name, entry.start, entry.last
            ),
        }
        changed
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A kernel IOTLB stand-in: entries over memfds, looked up as the kernel does.
    #[derive(Default)]
    pub struct FakeIotlb {
        pub entries: Mutex<Vec<(VduseIotlbEntry, Arc<File>)>>,
        pub lookups: std::sync::atomic::AtomicUsize,
    }

    pub fn memfd(size: u64) -> File {
        let name = std::ffi::CString::new("unidev-vduse-test").unwrap();
        // SAFETY: memfd_create with a valid C string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f
    }

    impl FakeIotlb {
        pub fn add(&self, start: u64, last: u64, perm: u8, file: Arc<File>, offset: u64) {
            let mut e = self.entries.lock().unwrap();
            e.push((
                VduseIotlbEntry {
                    offset,
                    start,
                    last,
                    perm,
                    padding: [0; 7],
                },
                file,
            ));
            e.sort_by_key(|(x, _)| x.start);
        }

        pub fn remove(&self, start: u64) {
            self.entries
                .lock()
                .unwrap()
                .retain(|(e, _)| e.start != start);
        }
    }

    impl IotlbSource for FakeIotlb {
        fn iotlb_get_fd(
            &self,
            start: u64,
            last: u64,
        ) -> io::Result<Option<(File, VduseIotlbEntry)>> {
            self.lookups
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if start > last {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let entries = self.entries.lock().unwrap();
            Ok(entries
                .iter()
                .find(|(e, _)| e.start <= last && e.last >= start)
                .map(|(e, f)| (f.try_clone().unwrap(), *e)))
        }
    }

    fn setup() -> (Arc<FakeIotlb>, Arc<DmaSpace>, IotlbMirror) {
        let fake = Arc::new(FakeIotlb::default());
        let dma = Arc::new(DmaSpace::default());
        let mirror = IotlbMirror::new("test", fake.clone(), dma.clone());
        (fake, dma, mirror)
    }

    #[test]
    fn sync_maps_every_entry_with_its_offset_and_permission() {
        let (fake, dma, mirror) = setup();
        let file = Arc::new(memfd(0x10000));
        file.as_ref();
        std::os::unix::fs::FileExt::write_at(file.as_ref(), b"hello", 0x3000).unwrap();
        fake.add(0x1000, 0x2fff, VDUSE_ACCESS_RW, file.clone(), 0x2000);
        fake.add(0x10_0000, 0x10_0fff, VDUSE_ACCESS_RO, file.clone(), 0);
        assert!(mirror.sync(0, u64::MAX).unwrap());
        let maps = dma.maps();
        assert_eq!(maps.len(), 2);
        assert_eq!((maps[0].iova, maps[0].size), (0x1000, 0x2000));
        assert_eq!(maps[0].prot, Prot::READ_WRITE);
        assert_eq!((maps[1].iova, maps[1].size), (0x10_0000, 0x1000));
        assert_eq!(maps[1].prot, Prot::READ_ONLY);
        // iova 0x2000 is file offset 0x2000 + 0x1000.
        let mut buf = [0u8; 5];
        dma.read(0x2000, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // In the snapshot too.
        use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
        let mut buf = [0u8; 5];
        dma.snapshot()
            .memory()
            .read_slice(&mut buf, GuestAddress(0x2000))
            .unwrap();
        assert_eq!(&buf, b"hello");
        assert!(!mirror.settled());

        // Unchanged IOTLB: nothing changes.
        assert!(!mirror.sync(0, u64::MAX).unwrap());
        assert_eq!(dma.len(), 2);
    }

    #[test]
    fn sync_removes_and_replaces_entries_in_the_range_only() {
        let (fake, dma, mirror) = setup();
        let a = Arc::new(memfd(0x10000));
        let b = Arc::new(memfd(0x10000));
        fake.add(0x0, 0xfff, VDUSE_ACCESS_RW, a.clone(), 0);
        fake.add(0x4000, 0x4fff, VDUSE_ACCESS_RW, a.clone(), 0x1000);
        mirror.sync(0, u64::MAX).unwrap();
        assert!(mirror.settled());
        // Replace the second with another file, drop nothing else.
        fake.remove(0x4000);
        fake.add(0x4000, 0x5fff, VDUSE_ACCESS_RW, b.clone(), 0);
        assert!(mirror.sync(0x4000, 0x4fff).unwrap());
        let maps = dma.maps();
        assert_eq!(maps.len(), 2);
        assert_eq!((maps[1].iova, maps[1].size), (0x4000, 0x2000));
        // Same range, different file: replaced too.
        fake.remove(0x4000);
        fake.add(0x4000, 0x5fff, VDUSE_ACCESS_RW, a.clone(), 0);
        assert!(mirror.sync(0x4000, 0x5fff).unwrap());
        // Removal.
        fake.remove(0x0);
        assert!(mirror.sync(0, 0xfff).unwrap());
        assert_eq!(dma.len(), 1);
        assert!(!mirror.settled());
        mirror.clear();
        assert!(dma.is_empty());
        assert!(mirror.is_empty());
    }

    #[test]
    fn fill_gaps_finds_entries_added_without_a_message() {
        let (fake, dma, mirror) = setup();
        let f = Arc::new(memfd(0x100000));
        fake.add(
            0x4000_0000,
            0x4000_0fff,
            VDUSE_ACCESS_RW,
            f.clone(),
            0x4000_0000 % 0x1000,
        );
        mirror.sync(0, u64::MAX).unwrap();
        assert!(!mirror.settled());
        fake.lookups.store(0, std::sync::atomic::Ordering::SeqCst);
        // Nothing new: one lookup per gap (before and after the one entry).
        assert!(!mirror.fill_gaps().unwrap());
        assert_eq!(fake.lookups.load(std::sync::atomic::Ordering::SeqCst), 2);
        // The bounce region appears.
        fake.add(0, 0xffff, VDUSE_ACCESS_RW, f.clone(), 0);
        assert!(mirror.fill_gaps().unwrap());
        assert!(mirror.settled());
        assert_eq!(dma.len(), 2);
        assert!(dma.find(0x8000).is_some());
    }

    #[test]
    fn entries_reaching_the_top_of_the_space_end_the_walk() {
        let (fake, dma, mirror) = setup();
        let f = Arc::new(memfd(0x1000));
        fake.add(u64::MAX - 0xfff, u64::MAX, VDUSE_ACCESS_RW, f, 0);
        mirror.sync(0, u64::MAX).unwrap();
        // vm-memory cannot place a region ending at 2^64, but the walk ends cleanly.
        assert!(dma.len() <= 1);
        assert!(mirror.fill_gaps().is_ok());
    }

    #[test]
    fn bad_permissions_are_skipped() {
        let (fake, dma, mirror) = setup();
        let f = Arc::new(memfd(0x1000));
        fake.add(0x1000, 0x1fff, 0, f, 0);
        mirror.sync(0, u64::MAX).unwrap();
        assert!(dma.is_empty());
        assert!(prot_of(VDUSE_ACCESS_WO).unwrap().write);
        assert!(mirror.sync(5, 4).is_err());
    }
}
