//! A small FUSE file system served by the test itself, straight over `/dev/fuse` (no
//! libfuse, no fusermount): one regular file held in memory, with faults to inject —
//! READ and WRITE touching a chosen byte range fail with EIO, FSYNC fails with EIO while
//! switched on. Needs root (mount(2) of type `fuse` with the device fd).
//!
//! The protocol subset is what opening, reading, writing and syncing one file takes
//! (FUSE 7.31 replies; the kernel speaks the older or newer of both): INIT, LOOKUP,
//! GETATTR, SETATTR (attributes unchanged), OPEN, READ, WRITE, FSYNC, FLUSH, RELEASE,
//! STATFS, OPENDIR/READDIR (empty)/RELEASEDIR; FORGET and INTERRUPT get no reply,
//! anything else ENOSYS.
//!
//! The file goes through the kernel's page cache as on any file system (opening it
//! with O_DIRECT bypasses it); no readahead, so each read asks for what was read.
//! Writes are write-through (no FUSE writeback cache): each one reaches the server.
//!
//! [`FuseMount`] unmounts on drop (MNT_DETACH) and stops its server thread, whose
//! closing of the device fd aborts the connection: nothing is left behind when a test
//! fails half-way.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_SETATTR: u32 = 4;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_FSYNC: u32 = 20;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;

/// INIT flag: honour `max_write` (otherwise writes come a page at a time).
const FUSE_BIG_WRITES: u32 = 1 << 5;

const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
const MAX_WRITE: u32 = 128 << 10;
/// Largest request: a WRITE of MAX_WRITE with its headers, with room to spare.
const BUFFER: usize = MAX_WRITE as usize + 64 * 1024;
const ROOT: u64 = 1;
const FILE_NODE: u64 = 2;
/// How long attributes and names stay cached in the kernel, in seconds.
const TTL: u64 = 3600;

/// The in-memory file and its faults, shared between the test and the server thread.
pub struct FaultyFile {
    data: Mutex<Vec<u8>>,
    bad: Mutex<Range<u64>>,
    fail_fsync: AtomicBool,
    /// READ/WRITE/FSYNC requests that were failed with EIO.
    pub reads_failed: AtomicU64,
    pub writes_failed: AtomicU64,
    pub fsyncs_failed: AtomicU64,
    /// Every FSYNC request received.
    pub fsyncs: AtomicU64,
}

impl FaultyFile {
    /// READ and WRITE requests overlapping `bytes` fail with EIO from now on.
    pub fn set_bad(&self, bytes: Range<u64>) {
        *self.bad.lock().unwrap_or_else(PoisonError::into_inner) = bytes;
    }

    /// FSYNC fails with EIO while `fail` holds.
    pub fn fail_fsync(&self, fail: bool) {
        self.fail_fsync.store(fail, Ordering::SeqCst);
    }

    /// The file's bytes at `range` (as the file system holds them).
    pub fn bytes(&self, range: Range<usize>) -> Vec<u8> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)[range].to_vec()
    }

    /// Overwrite the file's bytes at `offset` (behind the kernel's back: pages it cached
    /// keep the old bytes).
    pub fn set_bytes(&self, offset: usize, bytes: &[u8]) {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)[offset..offset + bytes.len()]
            .copy_from_slice(bytes);
    }

    fn len(&self) -> u64 {
        self.data
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64
    }

    fn touches_bad(&self, offset: u64, len: u64) -> bool {
        let bad = self
            .bad
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        len > 0 && offset < bad.end && bad.start < offset.saturating_add(len)
    }
}

/// A mounted FUSE file system with one file; unmounted on drop.
pub struct FuseMount {
    mnt: PathBuf,
    name: String,
    file: Arc<FaultyFile>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FuseMount {
    /// Mount at `mnt` (an empty directory) a file system holding one file `name` with
    /// `contents`. Fails (EPERM, ENOENT) when this is not root or has no /dev/fuse.
    pub fn mount(mnt: &Path, name: &str, contents: Vec<u8>) -> io::Result<FuseMount> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/fuse")?;
        let target = CString::new(mnt.as_os_str().as_bytes())?;
        let data = CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
            dev.as_raw_fd()
        ))?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let r = unsafe {
            libc::mount(
                c"unidev-faulty".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let file = Arc::new(FaultyFile {
            data: Mutex::new(contents),
            bad: Mutex::new(0..0),
            fail_fsync: AtomicBool::new(false),
            reads_failed: AtomicU64::new(0),
            writes_failed: AtomicU64::new(0),
            fsyncs_failed: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let server = Server {
            dev,
            name: name.as_bytes().to_vec(),
            file: file.clone(),
        };
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fuse-server".into())
            .spawn(move || server.run(&s))?;
        Ok(FuseMount {
            mnt: mnt.to_path_buf(),
            name: name.to_string(),
            file,
            stop,
            thread: Some(thread),
        })
    }

    /// Path of the file.
    pub fn path(&self) -> PathBuf {
        self.mnt.join(&self.name)
    }

    /// The file and its fault switches.
    pub fn file(&self) -> &FaultyFile {
        &self.file
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.mnt.as_os_str().as_bytes()) {
            // SAFETY: a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        // The server sees the flag within one poll interval; dropping its fd aborts the
        // connection for anyone still holding the file open.
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Server {
    dev: File,
    name: Vec<u8>,
    file: Arc<FaultyFile>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}

fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}

/// Why a request is answered with an error.
type Reply = Result<Vec<u8>, i32>;

impl Server {
    fn run(mut self, stop: &AtomicBool) {
        let mut buf = vec![0u8; BUFFER];
        while !stop.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: self.dev.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, 50) };
            if r <= 0 {
                continue;
            }
            let n = match self.dev.read(&mut buf) {
                Ok(n) => n,
                Err(e) => match e.raw_os_error() {
                    // No request after all, or one interrupted before it was read.
                    Some(libc::EAGAIN | libc::EINTR | libc::ENOENT) => continue,
                    // Unmounted and aborted, or anything else: the file system is gone.
                    _ => return,
                },
            };
            self.handle(&buf[..n]);
        }
    }

    fn handle(&mut self, req: &[u8]) {
        let (Some(opcode), Some(unique), Some(node)) =
            (u32_at(req, 4), u64_at(req, 8), u64_at(req, 16))
        else {
            return;
        };
        let body = req.get(IN_HEADER..).unwrap_or(&[]);
        let reply = match opcode {
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => return,
            FUSE_INIT => Ok(self.init(body)),
            FUSE_LOOKUP => self.lookup(node, body),
            FUSE_GETATTR | FUSE_SETATTR => self.attr(node).map(|a| {
                let mut v = Vec::new();
                put64(&mut v, TTL);
                put32(&mut v, 0);
                put32(&mut v, 0);
                v.extend_from_slice(&a);
                v
            }),
            FUSE_OPEN | FUSE_OPENDIR => {
                let mut v = Vec::new();
                put64(&mut v, 0); // fh
                put32(&mut v, 0); // open_flags
                put32(&mut v, 0);
                Ok(v)
            }
            FUSE_READDIR => Ok(Vec::new()),
            FUSE_READ => self.read(body),
            FUSE_WRITE => self.write(body),
            FUSE_FSYNC => {
                self.file.fsyncs.fetch_add(1, Ordering::SeqCst);
                if self.file.fail_fsync.load(Ordering::SeqCst) {
                    self.file.fsyncs_failed.fetch_add(1, Ordering::SeqCst);
                    Err(libc::EIO)
                } else {
                    Ok(Vec::new())
                }
            }
            FUSE_FLUSH | FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_DESTROY => Ok(Vec::new()),
            FUSE_STATFS => Ok(self.statfs()),
            _ => Err(libc::ENOSYS),
        };
        let (error, payload) = match reply {
            Ok(p) => (0i32, p),
            Err(e) => (-e, Vec::new()),
        };
        let mut out = Vec::with_capacity(OUT_HEADER + payload.len());
        put32(&mut out, (OUT_HEADER + payload.len()) as u32);
        out.extend_from_slice(&error.to_le_bytes());
        put64(&mut out, unique);
        out.extend_from_slice(&payload);
        // One reply, one write. ENOENT: the request was interrupted meanwhile.
        let _ = self.dev.write(&out);
    }

    /// fuse_init_out (64 bytes, protocol 7.31).
    fn init(&self, body: &[u8]) -> Vec<u8> {
        let kernel_flags = u32_at(body, 12).unwrap_or(0);
        let mut v = Vec::new();
        put32(&mut v, 7); // major
        put32(&mut v, 31); // minor
        put32(&mut v, 0); // max_readahead: none, every read is the one asked for
        put32(&mut v, kernel_flags & FUSE_BIG_WRITES);
        v.extend_from_slice(&16u16.to_le_bytes()); // max_background
        v.extend_from_slice(&12u16.to_le_bytes()); // congestion_threshold
        put32(&mut v, MAX_WRITE);
        put32(&mut v, 1); // time_gran
        v.resize(64, 0); // max_pages (default), map_alignment, flags2, unused
        v
    }

    fn lookup(&self, parent: u64, name: &[u8]) -> Reply {
        let name = name.split(|b| *b == 0).next().unwrap_or(&[]);
        if parent != ROOT || name != self.name.as_slice() {
            return Err(libc::ENOENT);
        }
        let mut v = Vec::new();
        put64(&mut v, FILE_NODE);
        put64(&mut v, 0); // generation
        put64(&mut v, TTL); // entry_valid
        put64(&mut v, TTL); // attr_valid
        put32(&mut v, 0);
        put32(&mut v, 0);
        v.extend_from_slice(&self.attr(FILE_NODE)?);
        Ok(v)
    }

    /// fuse_attr (88 bytes).
    fn attr(&self, node: u64) -> Result<Vec<u8>, i32> {
        let (mode, size, nlink) = match node {
            ROOT => (libc::S_IFDIR | 0o755, 0, 2),
            FILE_NODE => (libc::S_IFREG | 0o644, self.file.len(), 1),
            _ => return Err(libc::ENOENT),
        };
        let mut v = Vec::new();
        put64(&mut v, node); // ino
        put64(&mut v, size);
        put64(&mut v, size.div_ceil(512)); // blocks
        for _ in 0..3 {
            put64(&mut v, 0); // atime, mtime, ctime
        }
        for _ in 0..3 {
            put32(&mut v, 0); // their nanoseconds
        }
        put32(&mut v, mode);
        put32(&mut v, nlink);
        put32(&mut v, 0); // uid
        put32(&mut v, 0); // gid
        put32(&mut v, 0); // rdev
        put32(&mut v, 4096); // blksize
        put32(&mut v, 0); // flags
        Ok(v)
    }

    fn read(&self, body: &[u8]) -> Reply {
        let (Some(offset), Some(size)) = (u64_at(body, 8), u32_at(body, 16)) else {
            return Err(libc::EINVAL);
        };
        if self.file.touches_bad(offset, u64::from(size)) {
            self.file.reads_failed.fetch_add(1, Ordering::SeqCst);
            return Err(libc::EIO);
        }
        let data = self
            .file
            .data
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(size as usize).min(data.len());
        Ok(data[start..end].to_vec())
    }

    fn write(&self, body: &[u8]) -> Reply {
        let (Some(offset), Some(size)) = (u64_at(body, 8), u32_at(body, 16)) else {
            return Err(libc::EINVAL);
        };
        let Some(bytes) = body.get(40..40 + size as usize) else {
            return Err(libc::EINVAL);
        };
        if self.file.touches_bad(offset, u64::from(size)) {
            self.file.writes_failed.fetch_add(1, Ordering::SeqCst);
            return Err(libc::EIO);
        }
        let mut data = self
            .file
            .data
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let start = offset as usize;
        let end = start.checked_add(bytes.len()).ok_or(libc::EINVAL)?;
        let Some(dst) = data.get_mut(start..end) else {
            // The file has a fixed size, like a disk.
            return Err(libc::ENOSPC);
        };
        dst.copy_from_slice(bytes);
        let mut v = Vec::new();
        put32(&mut v, size);
        put32(&mut v, 0);
        Ok(v)
    }

    /// fuse_kstatfs (80 bytes).
    fn statfs(&self) -> Vec<u8> {
        let blocks = self.file.len().div_ceil(4096);
        let mut v = Vec::new();
        for x in [blocks, 0, 0, 2, 0] {
            put64(&mut v, x); // blocks, bfree, bavail, files, ffree
        }
        put32(&mut v, 4096); // bsize
        put32(&mut v, 255); // namelen
        put32(&mut v, 4096); // frsize
        v.resize(80, 0);
        v
    }
}
