//! The I/O engine of the virtio-blk backend: everything that touches the disk file.
//!
//! [`Disk`] moves bytes between the file and guest memory, and knows nothing of virtio
//! rings or of virtio-blk's wire format: its callers hand it guest buffers ([`Seg`]s, a
//! byte window of them) and byte offsets already checked against the disk's capacity,
//! and get a [`DiskResult`] back. The operations:
//!
//! * [`Disk::read_vectored`] / [`Disk::write_vectored`]: `preadv`/`pwritev` straight
//!   between the file and guest memory (the iovecs point into vm-memory's bounds-checked
//!   volatile slices); with O_DIRECT, transfers whose guest buffers break the file's
//!   alignment rules go through an aligned [`BounceBuffer`] instead.
//! * [`Disk::flush`]: `fdatasync`, with the error stickiness of a file used through the
//!   page cache (one failure fails every later flush).
//! * [`Disk::discard`]: hole punching, `BLKDISCARD` on block devices.
//! * [`Disk::write_zeroes`]: hole punching when unmapping is allowed, else a zero range,
//!   else plain zero writes.
//!
//! Failures are logged here, with the file's name; the result only says whether the
//! operation is unsupported or failed. Every call is synchronous: it returns when the
//! kernel is done.
//!
//! It implements no part of the virtio specification: what each request means (virtio
//! 1.2 section 5.2.6, range checks, limits, write-through) is decided by the glue in the
//! parent module, which calls it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use log::{debug, warn};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{invalid, SECTOR_SHIFT};

/// O_DIRECT bounce buffer size (per queue, allocated on first use).
const BOUNCE_BYTES: usize = 1 << 20;
/// The bounce buffer's alignment: the most O_DIRECT may demand of buffer addresses for
/// the disk to be usable.
pub(super) const BOUNCE_ALIGN: usize = 4096;
/// iovecs handed to one preadv/pwritev (kept on the stack).
const IOV_BATCH: usize = 128;

mod ioctls {
    // <linux/fs.h>
    vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, libc::size_t);
    vmm_sys_util::ioctl_io_nr!(BLKDISCARD, 0x12, 119);
}

/// A guest buffer: `len` bytes at guest address `addr` (for a request, one descriptor
/// of its chain: non-zero length, inside guest memory unless the chain is malformed).
#[derive(Clone, Copy, Debug)]
pub(super) struct Seg {
    pub(super) addr: u64,
    pub(super) len: u32,
}

/// Aligned memory for transfers that cannot go straight to guest memory (O_DIRECT with
/// misaligned guest buffers) and for writing zeroes out. One per queue, allocated on
/// first use, so the data path allocates nothing once warm.
#[derive(Default)]
pub(super) struct BounceBuffer(Vec<u8>);

impl BounceBuffer {
    /// The aligned `BOUNCE_BYTES` window, allocated on first use.
    fn get(&mut self) -> &mut [u8] {
        let v = &mut self.0;
        if v.len() < BOUNCE_BYTES + BOUNCE_ALIGN {
            *v = vec![0u8; BOUNCE_BYTES + BOUNCE_ALIGN];
        }
        let skew = (BOUNCE_ALIGN - v.as_ptr() as usize % BOUNCE_ALIGN) % BOUNCE_ALIGN;
        &mut v[skew..skew + BOUNCE_BYTES]
    }

    /// Give the memory back; the next use allocates again.
    pub(super) fn release(&mut self) {
        self.0 = Vec::new();
    }
}

/// Why a disk operation did not complete (the cause is logged already).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DiskError {
    /// The file system or device does not offer the operation.
    Unsupported,
    /// The operation failed: what the range holds now is unknown.
    Failed,
}

/// What a disk operation returns.
pub(super) type DiskResult = Result<(), DiskError>;

/// The disk: an open image file or block device and how to do I/O on it.
pub(super) struct Disk {
    file: File,
    /// Names the file in log messages.
    path: PathBuf,
    is_block_device: bool,
    /// Opened with O_DIRECT.
    direct: bool,
    /// Reads, writes and flushes complete without touching the file or guest memory.
    null_io: bool,
    /// O_DIRECT rules: buffer address alignment, and file offset/length alignment.
    dio_mem_align: usize,
    dio_offset_align: u64,
    /// An `fdatasync` failed on a file used through the page cache: what the disk holds
    /// is unknown from then on, and no later flush may report success.
    sync_failed: AtomicBool,
}

/// Open `path` as a disk: read-only or read-write, with O_DIRECT when `direct`. Returns
/// the file, its size in bytes, and whether it is a block device.
pub(super) fn open(path: &Path, readonly: bool, direct: bool) -> io::Result<(File, u64, bool)> {
    let mut o = OpenOptions::new();
    o.read(true).write(!readonly);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let file = o.open(path).map_err(|e| {
        if direct && e.raw_os_error() == Some(libc::EINVAL) {
            invalid(format!(
                "{}: this file system refuses O_DIRECT (tmpfs, for one)",
                path.display()
            ))
        } else {
            e
        }
    })?;
    let (bytes, is_block_device) = disk_size(&file)?;
    Ok((file, bytes, is_block_device))
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
pub(super) fn stream_read(
    m: &GuestMemoryMmap<()>,
    segs: &[Seg],
    skip: u64,
    buf: &mut [u8],
) -> bool {
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
pub(super) fn stream_write(m: &GuestMemoryMmap<()>, segs: &[Seg], skip: u64, buf: &[u8]) -> bool {
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

impl Disk {
    /// The engine for `file`, already open (with O_DIRECT when `direct`), named `path` in
    /// log messages. With `null_io`, reads, writes and flushes complete without touching
    /// the file or guest memory.
    pub(super) fn new(
        file: File,
        path: PathBuf,
        is_block_device: bool,
        direct: bool,
        null_io: bool,
    ) -> Disk {
        let (dio_mem_align, dio_offset_align) = if direct {
            dio_alignment(&file, is_block_device)
        } else {
            (1, 1)
        };
        Disk {
            file,
            path,
            is_block_device,
            direct,
            null_io,
            dio_mem_align,
            dio_offset_align,
            sync_failed: AtomicBool::new(false),
        }
    }

    /// O_DIRECT's alignment rules here: guest buffer address, and file offset and length
    /// (1 and 1 without O_DIRECT). A [`BounceBuffer`] is `BOUNCE_ALIGN`-aligned.
    pub(super) fn dio_alignment(&self) -> (usize, u64) {
        (self.dio_mem_align, self.dio_offset_align)
    }

    /// The physical block size of a block device (0 when unknown, and for a file).
    pub(super) fn physical_block_size(&self) -> u32 {
        if self.is_block_device {
            ioctl_int(self.file.as_raw_fd(), libc::BLKPBSZGET as libc::c_ulong).unwrap_or(0)
        } else {
            0
        }
    }

    /// Read `len` bytes of the disk at byte `offset` into bytes `skip..skip + len` of the
    /// guest buffers `segs` (a byte stream across them).
    pub(super) fn read_vectored(
        &self,
        m: &GuestMemoryMmap<()>,
        segs: &[Seg],
        skip: u64,
        len: u64,
        offset: u64,
        bounce: &mut BounceBuffer,
    ) -> DiskResult {
        self.transfer(m, segs, skip, len, offset, false, bounce)
    }

    /// Write bytes `skip..skip + len` of the guest buffers `segs` (a byte stream across
    /// them) to the disk at byte `offset`.
    pub(super) fn write_vectored(
        &self,
        m: &GuestMemoryMmap<()>,
        segs: &[Seg],
        skip: u64,
        len: u64,
        offset: u64,
        bounce: &mut BounceBuffer,
    ) -> DiskResult {
        self.transfer(m, segs, skip, len, offset, true, bounce)
    }

    /// Move `len` bytes between the file at `offset` and bytes `skip..` of the stream
    /// `segs`.
    #[allow(clippy::too_many_arguments)]
    fn transfer(
        &self,
        m: &GuestMemoryMmap<()>,
        segs: &[Seg],
        skip: u64,
        len: u64,
        offset: u64,
        write: bool,
        bounce: &mut BounceBuffer,
    ) -> DiskResult {
        if len == 0 || self.null_io {
            return Ok(());
        }
        let r = if self.direct && !self.dio_aligned(m, segs, skip, len, offset) {
            self.bounced(m, segs, skip, len, offset, write, bounce)
        } else {
            match self.vectored(m, segs, skip, len, offset, write) {
                // The alignment rules were guessed wrong: the bounce buffer is safe.
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    self.bounced(m, segs, skip, len, offset, write, bounce)
                }
                r => r,
            }
        };
        r.map_err(|e| {
            warn!(
                "virtio-blk: {}: {} of {len} bytes at sector {}: {e}",
                self.path.display(),
                if write { "write" } else { "read" },
                offset >> SECTOR_SHIFT,
            );
            DiskError::Failed
        })
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
        bounce: &mut BounceBuffer,
    ) -> io::Result<()> {
        let buf = bounce.get();
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

    /// Make the writes so far stable (`fdatasync`); `what` names the reason in log
    /// messages ("flush", "write-through").
    ///
    /// After a failed `fdatasync` of a file written through the page cache (no
    /// O_DIRECT), Linux may have marked the pages it could not write back clean, or
    /// dropped them, and reports the error once: the next `fdatasync` succeeds although
    /// those writes never reached the disk. So the first failure is remembered and every
    /// later sync fails too, until the device is opened again (QEMU's file-posix does
    /// the same). With O_DIRECT the page cache holds none of the device's writes, and
    /// each sync stands alone.
    pub(super) fn flush(&self, what: &str) -> DiskResult {
        if self.null_io {
            return Ok(());
        }
        if self.sync_failed.load(Ordering::Acquire) {
            debug!(
                "virtio-blk: {}: {what}: failed, an earlier sync failed",
                self.path.display()
            );
            return Err(DiskError::Failed);
        }
        match self.file.sync_data() {
            Ok(()) => Ok(()),
            Err(e) => {
                warn!("virtio-blk: {}: {what}: {e}", self.path.display());
                if !self.direct && !self.sync_failed.swap(true, Ordering::AcqRel) {
                    warn!(
                        "virtio-blk: {}: writes may be lost in the host page cache; \
                         every later flush fails until the device is opened again",
                        self.path.display()
                    );
                }
                Err(DiskError::Failed)
            }
        }
    }

    /// Deallocate `len` bytes at `offset` (their contents become unspecified).
    pub(super) fn discard(&self, offset: u64, len: u64) -> DiskResult {
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
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => Err(DiskError::Unsupported),
            Err(e) => {
                warn!("virtio-blk: {}: discard: {e}", self.path.display());
                Err(DiskError::Failed)
            }
        }
    }

    /// Make `len` bytes at `offset` read as zeroes: by punching a hole when `unmap`
    /// allows it, else by zeroing the range, else by writing zeroes out (through
    /// `bounce`). Never unsupported.
    pub(super) fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
        bounce: &mut BounceBuffer,
    ) -> DiskResult {
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
            return Ok(());
        }
        match fallocate(
            fd,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => return Ok(()),
            Err(e) if unsupported(&e) => {}
            Err(e) => {
                warn!("virtio-blk: {}: write zeroes: {e}", self.path.display());
                return Err(DiskError::Failed);
            }
        }
        // Write them out.
        let buf = bounce.get();
        buf.fill(0);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(BOUNCE_BYTES as u64) as usize;
            if let Err(e) = self.file.write_all_at(&buf[..n], offset + done) {
                warn!("virtio-blk: {}: write zeroes: {e}", self.path.display());
                return Err(DiskError::Failed);
            }
            done += n as u64;
        }
        Ok(())
    }

    /// Whether the disk is a block device.
    #[cfg(test)]
    pub(super) fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// Whether an `fdatasync` through the page cache failed (every flush fails now).
    #[cfg(test)]
    pub(super) fn sync_failed(&self) -> bool {
        self.sync_failed.load(Ordering::Acquire)
    }

    /// The open file.
    #[cfg(test)]
    pub(super) fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch image of `len` bytes of 0x5a, removed on drop.
    struct Image(PathBuf);

    impl Image {
        fn new(name: &str, len: usize) -> Image {
            let p = std::env::temp_dir()
                .join(format!("unidev-blk-io-{}-{name}.img", std::process::id()));
            std::fs::write(&p, vec![0x5au8; len]).unwrap();
            Image(p)
        }

        fn disk(&self, null_io: bool) -> Disk {
            let (file, _, is_block_device) = open(&self.0, false, false).unwrap();
            Disk::new(file, self.0.clone(), is_block_device, false, null_io)
        }

        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn vectored_reads_and_writes_follow_the_segment_stream() {
        let img = Image::new("rw", 4096);
        let disk = img.disk(false);
        let m = memory();
        let mut bounce = BounceBuffer::default();
        let data: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
        // 1024 bytes across three guest buffers, after 16 bytes of something else.
        m.write_slice(&data[..200], GuestAddress(0x1010)).unwrap();
        m.write_slice(&data[200..700], GuestAddress(0x3000))
            .unwrap();
        m.write_slice(&data[700..], GuestAddress(0x5000)).unwrap();
        let segs = [
            Seg {
                addr: 0x1000,
                len: 216,
            },
            Seg {
                addr: 0x3000,
                len: 500,
            },
            Seg {
                addr: 0x5000,
                len: 324,
            },
        ];
        assert_eq!(
            disk.write_vectored(&m, &segs, 16, 1024, 512, &mut bounce),
            Ok(())
        );
        let file = img.bytes();
        assert_eq!(&file[512..1536], &data[..]);
        assert_eq!((file[511], file[1536]), (0x5a, 0x5a));

        let back = [Seg {
            addr: 0x8000,
            len: 1024,
        }];
        assert_eq!(
            disk.read_vectored(&m, &back, 0, 1024, 512, &mut bounce),
            Ok(())
        );
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(got, data);
        // Past the end of the file: a failure, not a short read.
        let r = disk.read_vectored(&m, &back, 0, 1024, 4096 - 512, &mut bounce);
        assert_eq!(r, Err(DiskError::Failed));
        assert_eq!(disk.flush("flush"), Ok(()));
    }

    #[test]
    fn null_io_touches_neither_the_file_nor_guest_memory() {
        let img = Image::new("null", 4096);
        let disk = img.disk(true);
        let m = memory();
        let mut bounce = BounceBuffer::default();
        m.write_slice(&[7; 512], GuestAddress(0x1000)).unwrap();
        let segs = [Seg {
            addr: 0x1000,
            len: 512,
        }];
        assert_eq!(
            disk.write_vectored(&m, &segs, 0, 512, 0, &mut bounce),
            Ok(())
        );
        assert_eq!(
            disk.read_vectored(&m, &segs, 0, 512, 512, &mut bounce),
            Ok(())
        );
        assert_eq!(disk.flush("flush"), Ok(()));
        assert_eq!(img.bytes(), vec![0x5a; 4096]);
        let mut got = [0u8; 512];
        m.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(got, [7; 512]);
    }

    #[test]
    fn discard_and_write_zeroes_leave_zeroes_in_range_only() {
        let img = Image::new("dz", 16384);
        let disk = img.disk(false);
        let mut bounce = BounceBuffer::default();
        assert_eq!(disk.write_zeroes(4096, 1024, false, &mut bounce), Ok(()));
        assert_eq!(disk.write_zeroes(8192, 512, true, &mut bounce), Ok(()));
        match disk.discard(12288, 4096) {
            Ok(()) => assert!(img.bytes()[12288..].iter().all(|&b| b == 0)),
            r => assert_eq!(r, Err(DiskError::Unsupported)),
        }
        let file = img.bytes();
        assert_eq!(file.len(), 16384, "the size is kept");
        assert!(file[4096..5120].iter().all(|&b| b == 0));
        assert!(file[8192..8704].iter().all(|&b| b == 0));
        assert_eq!(
            (file[4095], file[5120], file[8191], file[8704]),
            (0x5a, 0x5a, 0x5a, 0x5a)
        );
    }

    #[test]
    fn a_failed_flush_through_the_page_cache_is_sticky() {
        // fdatasync of /dev/null fails (EINVAL).
        for direct in [false, true] {
            let Ok(null) = File::options().read(true).write(true).open("/dev/null") else {
                return;
            };
            let disk = Disk::new(null, "/dev/null".into(), false, direct, false);
            assert_eq!(disk.flush("flush"), Err(DiskError::Failed));
            assert_eq!(disk.sync_failed(), !direct, "direct {direct}");
        }
    }
}
