//! Driver memory: what a guest's RAM is to a VMM's devices, for a driver in this process.
//! One memfd, mapped here (`MAP_SHARED`) and given to the device at an IOVA base: with
//! its fd (vfio-user DMA_MAP with an fd, a vhost-user memory table region), so the device
//! reads and writes it directly, or without (vfio-user DMA_MAP without an fd), in which
//! case the device's accesses arrive as DMA_READ/DMA_WRITE messages and the client serves
//! them from the same memory through the [`DmaTarget`] implementation here
//! (`docs/interop/vfio-user.rst` in QEMU, "DMA_MAP", "DMA_READ", "DMA_WRITE").
//!
//! A first-fit allocator hands out aligned chunks for rings and data buffers.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use unidev_transports::vfio_user::client::DmaTarget;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion, VolatileSlice,
};

use crate::error::{mem_err, DriverError, DriverResult};

/// A chunk of driver memory handed out by [`DriverMemory::alloc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaBuffer {
    /// Its IOVA (the address the device uses).
    pub iova: u64,
    /// Its length.
    pub len: u64,
}

/// First-fit allocator over `[base, base + size)` with coalescing frees.
#[derive(Debug)]
struct Allocator {
    /// Free ranges, start -> length.
    free: BTreeMap<u64, u64>,
    /// Allocated ranges, start -> length.
    used: BTreeMap<u64, u64>,
}

impl Allocator {
    fn new(base: u64, size: u64) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(base, size);
        }
        Allocator {
            free,
            used: BTreeMap::new(),
        }
    }

    fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        if len == 0 || !align.is_power_of_two() {
            return None;
        }
        let (start, flen, at) = self.free.iter().find_map(|(&start, &flen)| {
            let at = start.checked_next_multiple_of(align)?;
            let end = start + flen;
            (at.checked_add(len)? <= end).then_some((start, flen, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        let tail = start + flen - (at + len);
        if tail > 0 {
            self.free.insert(at + len, tail);
        }
        self.used.insert(at, len);
        Some(at)
    }

    /// Free the chunk at `start`; returns its length.
    fn free(&mut self, start: u64) -> Option<u64> {
        let len = self.used.remove(&start)?;
        let (mut s, mut l) = (start, len);
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            if ps + pl == start {
                self.free.remove(&ps);
                s = ps;
                l += pl;
            }
        }
        if let Some(nl) = self.free.remove(&(start + len)) {
            l += nl;
        }
        self.free.insert(s, l);
        Some(len)
    }

    fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }
}

struct MemoryInner {
    mem: GuestMemoryMmap,
    file: File,
    base: u64,
    size: u64,
    alloc: Mutex<Allocator>,
}

/// Driver memory: a memfd mapped into this process (`MAP_SHARED`) and visible to the
/// device at `[iova_base, iova_base + size)`. Cheap to clone (shared).
///
/// Every access is bounds-checked through vm-memory. Ring fields are accessed with
/// atomic loads and stores; buffer contents with plain (volatile) copies.
#[derive(Clone)]
pub struct DriverMemory {
    inner: Arc<MemoryInner>,
}

impl std::fmt::Debug for DriverMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriverMemory")
            .field("iova_base", &format_args!("{:#x}", self.inner.base))
            .field("size", &self.inner.size)
            .finish()
    }
}

fn memfd(name: &str, size: u64) -> io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: memfd_create with a valid NUL-terminated name; it returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just created and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// The page size of mappings and DMA maps.
pub(crate) const PAGE_SIZE: u64 = 4096;

impl DriverMemory {
    /// Create `size` bytes (a multiple of 4 KiB) of memory at `iova_base` (4 KiB aligned).
    pub fn new(size: u64, iova_base: u64) -> DriverResult<Self> {
        if size == 0 || size % PAGE_SIZE != 0 || iova_base % PAGE_SIZE != 0 {
            return Err(DriverError::InvalidOption(format!(
                "memory size {size:#x} / IOVA base {iova_base:#x} must be non-zero multiples of 4 KiB"
            )));
        }
        if iova_base.checked_add(size).is_none() || usize::try_from(size).is_err() {
            return Err(DriverError::InvalidOption(format!(
                "memory {iova_base:#x}+{size:#x} overflows"
            )));
        }
        let file = memfd("unidev-virtio-driver", size)?;
        let region = MmapRegion::from_file(FileOffset::new(file.try_clone()?, 0), size as usize)
            .map_err(mem_err)?;
        let region = GuestRegionMmap::new(region, GuestAddress(iova_base))
            .ok_or_else(|| mem_err("region overflows"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(mem_err)?;
        Ok(DriverMemory {
            inner: Arc::new(MemoryInner {
                mem,
                file,
                base: iova_base,
                size,
                alloc: Mutex::new(Allocator::new(iova_base, size)),
            }),
        })
    }

    /// The IOVA of the first byte.
    pub fn iova_base(&self) -> u64 {
        self.inner.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size
    }

    /// The memfd behind it (offset 0 is `iova_base`).
    pub fn file(&self) -> &File {
        &self.inner.file
    }

    /// The memory as vm-memory guest memory (addresses are IOVAs).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.inner.mem
    }

    fn allocator(&self) -> MutexGuard<'_, Allocator> {
        self.inner.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Allocate `len` zeroed bytes aligned to `align` (a power of two).
    pub fn alloc(&self, len: u64, align: u64) -> DriverResult<DmaBuffer> {
        if !align.is_power_of_two() || len == 0 {
            return Err(DriverError::Memory(format!(
                "cannot allocate {len} bytes aligned to {align}"
            )));
        }
        // The allocator's guard must be gone before the error path asks it again.
        let got = self.allocator().alloc(len, align);
        let iova = got.ok_or_else(|| {
            DriverError::Memory(format!(
                "no room for {len} bytes aligned to {align} ({} bytes free)",
                self.free_bytes()
            ))
        })?;
        let buf = DmaBuffer { iova, len };
        self.fill(iova, len, 0)?;
        Ok(buf)
    }

    /// Return a buffer from [`alloc`](Self::alloc).
    pub fn free(&self, buf: DmaBuffer) -> DriverResult<()> {
        let mut a = self.allocator();
        match a.used.get(&buf.iova) {
            Some(&len) if len == buf.len => {
                a.free(buf.iova);
                Ok(())
            }
            _ => Err(DriverError::Memory(format!(
                "free of {:#x}+{:#x}, which is not an allocation",
                buf.iova, buf.len
            ))),
        }
    }

    /// Bytes not allocated (possibly fragmented).
    pub fn free_bytes(&self) -> u64 {
        self.allocator().free_bytes()
    }

    /// Whether `[iova, iova + len)` lies inside this memory.
    pub fn contains(&self, iova: u64, len: u64) -> bool {
        iova >= self.inner.base
            && iova
                .checked_add(len)
                .is_some_and(|end| end <= self.inner.base + self.inner.size)
    }

    fn check(&self, iova: u64, len: u64) -> DriverResult<()> {
        if self.contains(iova, len) {
            Ok(())
        } else {
            Err(DriverError::Memory(format!(
                "{iova:#x}+{len:#x} is outside {:#x}+{:#x}",
                self.inner.base, self.inner.size
            )))
        }
    }

    /// Store `data` at `iova`.
    pub fn write(&self, iova: u64, data: &[u8]) -> DriverResult<()> {
        self.check(iova, data.len() as u64)?;
        self.inner
            .mem
            .write_slice(data, GuestAddress(iova))
            .map_err(mem_err)
    }

    /// Fill `buf` from `iova`.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> DriverResult<()> {
        self.check(iova, buf.len() as u64)?;
        self.inner
            .mem
            .read_slice(buf, GuestAddress(iova))
            .map_err(mem_err)
    }

    /// Set `len` bytes at `iova` to `byte`.
    pub fn fill(&self, iova: u64, len: u64, byte: u8) -> DriverResult<()> {
        self.volatile_slice(iova, len)?.copy_from(&[byte; 0][..]);
        let chunk = [byte; 4096];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(chunk.len() as u64);
            self.write(iova + off, &chunk[..n as usize])?;
            off += n;
        }
        Ok(())
    }

    /// Volatile access to `[iova, iova + len)`.
    pub fn volatile_slice(&self, iova: u64, len: u64) -> DriverResult<VolatileSlice<'_, ()>> {
        self.check(iova, len)?;
        self.inner
            .mem
            .get_slice(GuestAddress(iova), len as usize)
            .map_err(mem_err)
    }

    /// The bytes of `[iova, iova + len)` as a plain slice.
    ///
    /// # Safety
    ///
    /// The device may read and write this memory at any time. The caller must make sure
    /// that no device access to the range is in flight (the buffer is not part of a chain
    /// the device still owns) and that no other reference to the range exists while the
    /// slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self, iova: u64, len: u64) -> DriverResult<&mut [u8]> {
        let s = self.volatile_slice(iova, len)?;
        let ptr = s.ptr_guard_mut().as_ptr();
        // SAFETY: `ptr` points to `len` bytes of our mapping (checked above), which lives as
        // long as `self`; exclusivity is the caller's contract (see `# Safety`).
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) })
    }

    /// The little-endian `u16` at `iova`, an acquire load (a ring field).
    pub(crate) fn load_u16(&self, iova: u64) -> DriverResult<u16> {
        self.inner
            .mem
            .load::<u16>(GuestAddress(iova), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(mem_err)
    }

    /// Store `v` little-endian at `iova`, a release store (a ring field).
    pub(crate) fn store_u16(&self, iova: u64, v: u16) -> DriverResult<()> {
        self.inner
            .mem
            .store(v.to_le(), GuestAddress(iova), Ordering::Release)
            .map_err(mem_err)
    }
}

/// Serves the device's DMA_READ/DMA_WRITE (maps without an fd) from this memory.
impl DmaTarget for DriverMemory {
    fn read(&mut self, address: u64, buf: &mut [u8]) -> Result<(), i32> {
        DriverMemory::read(self, address, buf).map_err(|_| libc::EFAULT)
    }

    fn write(&mut self, address: u64, data: &[u8]) -> Result<(), i32> {
        DriverMemory::write(self, address, data).map_err(|_| libc::EFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_aligns_splits_and_coalesces() {
        let mut a = Allocator::new(0x1000, 0x1000);
        let x = a.alloc(10, 1).unwrap();
        assert_eq!(x, 0x1000);
        let y = a.alloc(16, 64).unwrap();
        assert_eq!(y, 0x1040);
        assert_eq!(a.free_bytes(), 0x1000 - 10 - 16);
        assert!(a.alloc(0x1000, 1).is_none());
        assert!(a.alloc(0, 1).is_none());
        assert!(a.alloc(1, 3).is_none());
        assert_eq!(a.free(x), Some(10));
        assert_eq!(a.free(x), None, "double free");
        assert_eq!(a.free(y), Some(16));
        assert_eq!(a.free.len(), 1, "coalesced: {:?}", a.free);
        assert_eq!(a.alloc(0x1000, 0x1000), Some(0x1000));
        assert!(a.alloc(1, 1).is_none());
    }

    #[test]
    fn allocator_reuses_holes_first_fit() {
        let mut a = Allocator::new(0, 0x400);
        let v: Vec<u64> = (0..4).map(|_| a.alloc(0x100, 0x100).unwrap()).collect();
        assert_eq!(v, [0, 0x100, 0x200, 0x300]);
        a.free(0x100);
        a.free(0x300);
        assert!(a.alloc(0x200, 1).is_none(), "fragmented");
        a.free(0x200);
        assert_eq!(a.alloc(0x300, 1), Some(0x100));
    }

    #[test]
    fn driver_memory_access_and_bounds() {
        let m = DriverMemory::new(0x10000, 0x1_0000_0000).unwrap();
        assert!(DriverMemory::new(0x1001, 0).is_err());
        assert!(DriverMemory::new(0x1000, 0x10).is_err());
        assert!(DriverMemory::new(0x2000, u64::MAX - 0xfff).is_err());
        let b = m.alloc(100, 4096).unwrap();
        assert_eq!(b.iova % 4096, 0);
        assert!(m.contains(b.iova, 100));
        m.write(b.iova, b"hello").unwrap();
        let mut out = [0u8; 5];
        m.read(b.iova, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        // The memfd sees the same bytes (what the device maps).
        let mut f = [0u8; 5];
        std::os::unix::fs::FileExt::read_exact_at(m.file(), &mut f, b.iova - m.iova_base())
            .unwrap();
        assert_eq!(&f, b"hello");
        // SAFETY: no device; nothing else references this range.
        let s = unsafe { m.as_mut_slice(b.iova, 5) }.unwrap();
        s[0] = b'j';
        m.read(b.iova, &mut out).unwrap();
        assert_eq!(&out, b"jello");
        assert_eq!(m.volatile_slice(b.iova, 100).unwrap().len(), 100);
        assert!(m.write(m.iova_base() + 0x10000 - 2, &[0; 4]).is_err());
        assert!(m.read(m.iova_base() - 1, &mut [0; 1]).is_err());
        assert!(m.volatile_slice(u64::MAX, 2).is_err());
        // Freed memory comes back zeroed.
        m.free(b).unwrap();
        assert!(m.free(b).is_err());
        let c = m.alloc(100, 4096).unwrap();
        assert_eq!(c.iova, b.iova);
        m.read(c.iova, &mut out).unwrap();
        assert_eq!(out, [0; 5]);
        assert!(m.alloc(0x20000, 1).is_err());
    }

    #[test]
    fn driver_memory_serves_dma_requests() {
        let m = DriverMemory::new(0x2000, 0x4000).unwrap();
        let mut t: Box<dyn DmaTarget + Send> = Box::new(m.clone());
        t.write(0x4100, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        t.read(0x4100, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        m.read(0x4100, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert_eq!(t.read(0x3fff, &mut b), Err(libc::EFAULT));
        assert_eq!(t.write(0x5fff, &[0, 0]), Err(libc::EFAULT));
    }
}
