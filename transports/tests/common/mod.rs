//! Helpers for the vfio-user protocol tests: an in-process [`VfioUserServer`] on a socket
//! in a private temp dir, serving the test-only device of [`device`], and a raw client
//! that builds and parses every message byte by byte (it deliberately does not use the
//! transport's codec, so a field-order mistake there cannot cancel out here).
//!
//! Tests run in parallel threads of one process. The fd-leak test counts
//! `/proc/self/fd`, so every harness holds a shared lock and that test takes it
//! exclusively.
#![allow(dead_code)]

pub mod device;

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use unidev_core::dispatch::StopHandle;
use unidev_core::irq::Interrupts;
use unidev_core::memory::{DmaSpace, DEFAULT_MAX_MAPS};
use unidev_core::pci::SharedPciDevice;
use unidev_transports::vfio_user::{ServerConfig, VfioUserServer};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use device::{Record, TestDevice};

/// Command numbers (vfio-user.rst, "Commands").
pub mod cmd {
    pub const VERSION: u16 = 1;
    pub const DMA_MAP: u16 = 2;
    pub const DMA_UNMAP: u16 = 3;
    pub const DEVICE_GET_INFO: u16 = 4;
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    pub const DEVICE_SET_IRQS: u16 = 8;
    pub const REGION_READ: u16 = 9;
    pub const REGION_WRITE: u16 = 10;
    pub const DMA_READ: u16 = 11;
    pub const DMA_WRITE: u16 = 12;
    pub const DEVICE_RESET: u16 = 13;
    pub const DIRTY_PAGES: u16 = 14;
    pub const REGION_WRITE_MULTI: u16 = 15;
    pub const DEVICE_FEATURE: u16 = 16;
    pub const MIG_DATA_READ: u16 = 17;
    pub const MIG_DATA_WRITE: u16 = 18;
}

/// Header flags (vfio-user.rst, "Header").
pub const F_REPLY: u32 = 0x1;
/// No_reply.
pub const F_NO_REPLY: u32 = 0x10;
/// Error.
pub const F_ERROR: u32 = 0x20;

/// SET_IRQS flags (`<linux/vfio.h>`).
pub mod irq {
    pub const DATA_NONE: u32 = 1 << 0;
    pub const DATA_BOOL: u32 = 1 << 1;
    pub const DATA_EVENTFD: u32 = 1 << 2;
    pub const ACTION_MASK: u32 = 1 << 3;
    pub const ACTION_UNMASK: u32 = 1 << 4;
    pub const ACTION_TRIGGER: u32 = 1 << 5;
    pub const INTX: u32 = 0;
    pub const MSI: u32 = 1;
    pub const MSIX: u32 = 2;
    pub const ERR: u32 = 3;
    pub const REQ: u32 = 4;
}

/// Region indices (`VFIO_PCI_*_REGION_INDEX`).
pub mod region {
    pub const BAR0: u32 = 0;
    pub const BAR1: u32 = 1;
    pub const BAR2: u32 = 2;
    pub const ROM: u32 = 6;
    pub const CONFIG: u32 = 7;
    pub const VGA: u32 = 8;
}

/// How long a test waits for anything.
pub const WAIT: Duration = Duration::from_secs(5);

static FD_LOCK: RwLock<()> = RwLock::new(());
static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

enum Guard {
    Shared(RwLockReadGuard<'static, ()>),
    Exclusive(RwLockWriteGuard<'static, ()>),
}

/// Server options.
pub struct Opts {
    /// The server's settings.
    pub config: ServerConfig,
    /// Whether the device supports reset.
    pub can_reset: bool,
    /// Cap on DMA maps of the device's `DmaSpace`.
    pub max_maps: usize,
    /// Run alone in the process (for fd counting).
    pub exclusive: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            config: ServerConfig {
                io_timeout: WAIT,
                ..ServerConfig::default()
            },
            can_reset: true,
            max_maps: DEFAULT_MAX_MAPS,
            exclusive: false,
        }
    }
}

/// A running server and handles on its device.
pub struct Harness {
    /// The socket path.
    pub path: PathBuf,
    dir: PathBuf,
    /// The device, as the server sees it.
    pub device: Arc<Mutex<TestDevice>>,
    /// The device's interrupts.
    pub irqs: Arc<Interrupts>,
    /// The device's DMA space.
    pub dma: Arc<DmaSpace>,
    /// What the device recorded.
    pub record: Arc<Mutex<Record>>,
    /// The memfd behind BAR0/BAR2.
    pub mem: Arc<File>,
    stop: StopHandle,
    thread: Option<JoinHandle<io::Result<()>>>,
    // Last: released only after the server thread is joined.
    _guard: Guard,
}

impl Harness {
    /// A server with default options.
    pub fn start() -> Harness {
        Harness::with(Opts::default())
    }

    /// A server with `opts`.
    pub fn with(opts: Opts) -> Harness {
        let guard = if opts.exclusive {
            Guard::Exclusive(FD_LOCK.write().unwrap_or_else(|e| e.into_inner()))
        } else {
            Guard::Shared(FD_LOCK.read().unwrap_or_else(|e| e.into_inner()))
        };
        let dir = std::env::temp_dir().join(format!(
            "unidev-vfu-proto-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dev.sock");
        let listener = unidev_transports::listener::bind(&path, 0o600).unwrap();
        let (dev, irqs, dma) = device::build(opts.max_maps, opts.can_reset);
        let record = dev.record.clone();
        let mem = dev.mem().clone();
        let device = Arc::new(Mutex::new(dev));
        let shared: SharedPciDevice = device.clone();
        let server = VfioUserServer::new("test", listener, shared, opts.config).unwrap();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || server.run());
        Harness {
            path,
            dir,
            device,
            irqs,
            dma,
            record,
            mem,
            stop,
            thread: Some(thread),
            _guard: guard,
        }
    }

    /// A raw connection (not negotiated).
    pub fn connect(&self) -> Client {
        Client::connect(&self.path)
    }

    /// A connection that has negotiated VERSION with default capabilities.
    pub fn client(&self) -> Client {
        let mut c = self.connect();
        c.negotiate();
        c
    }
}

impl Harness {
    /// Stop the server and wait for its thread (idempotent).
    pub fn stop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.expect("server thread panicked")
                    .expect("server returned an error");
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Wait until `cond` holds; false after [`WAIT`].
pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + WAIT;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------
// Little-endian helpers.

/// u16 at `off`.
pub fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
/// u32 at `off`.
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
/// u64 at `off`.
pub fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// A payload under construction.
#[derive(Default)]
pub struct P(pub Vec<u8>);

impl P {
    /// Empty.
    pub fn new() -> P {
        P(Vec::new())
    }
    /// Append a u16.
    pub fn u16(mut self, v: u16) -> P {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u32.
    pub fn u32(mut self, v: u32) -> P {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append a u64.
    pub fn u64(mut self, v: u64) -> P {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Append bytes.
    pub fn bytes(mut self, b: &[u8]) -> P {
        self.0.extend_from_slice(b);
        self
    }
    /// The bytes.
    pub fn done(self) -> Vec<u8> {
        self.0
    }
}

/// A 16-byte header.
pub fn header(id: u16, command: u16, size: u32, flags: u32, error: u32) -> Vec<u8> {
    P::new()
        .u16(id)
        .u16(command)
        .u32(size)
        .u32(flags)
        .u32(error)
        .done()
}

/// DMA_MAP payload.
pub fn dma_map(flags: u32, offset: u64, address: u64, size: u64) -> Vec<u8> {
    P::new()
        .u32(32)
        .u32(flags)
        .u64(offset)
        .u64(address)
        .u64(size)
        .done()
}

/// DMA_UNMAP payload.
pub fn dma_unmap(flags: u32, address: u64, size: u64) -> Vec<u8> {
    P::new().u32(24).u32(flags).u64(address).u64(size).done()
}

/// DEVICE_GET_REGION_INFO payload.
pub fn region_info_req(argsz: u32, index: u32) -> Vec<u8> {
    P::new()
        .u32(argsz)
        .u32(0)
        .u32(index)
        .u32(0)
        .u64(0)
        .u64(0)
        .done()
}

/// An argsz/flags/index/count payload (GET_IRQ_INFO, GET_REGION_IO_FDS, GET_INFO).
pub fn four_u32(a: u32, b: u32, c: u32, d: u32) -> Vec<u8> {
    P::new().u32(a).u32(b).u32(c).u32(d).done()
}

/// DEVICE_SET_IRQS payload with `data` after the fixed part.
pub fn set_irqs(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    P::new()
        .u32(20 + data.len() as u32)
        .u32(flags)
        .u32(index)
        .u32(start)
        .u32(count)
        .bytes(data)
        .done()
}

/// REGION_READ/REGION_WRITE payload.
pub fn region_rw(region: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
    P::new()
        .u64(offset)
        .u32(region)
        .u32(count)
        .bytes(data)
        .done()
}

/// A fresh non-blocking eventfd.
pub fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// The eventfd's counter if it was written, else 0 (does not wait).
pub fn fired(fd: &EventFd) -> u64 {
    fd.read().unwrap_or(0)
}

/// Wait up to `ms` for the eventfd to be written; its counter, or 0.
pub fn wait_fired(fd: &EventFd, ms: i32) -> u64 {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n > 0 {
        fired(fd)
    } else {
        0
    }
}

/// Number of open fds of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// A pipe (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two fds into the array; the result is checked.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

// ---------------------------------------------------------------------------------------
// The raw client.

/// A received message.
#[derive(Debug)]
pub struct Msg {
    /// Message ID.
    pub id: u16,
    /// Command.
    pub command: u16,
    /// Size from the header.
    pub size: u32,
    /// Flags.
    pub flags: u32,
    /// Error field.
    pub error: u32,
    /// Payload.
    pub payload: Vec<u8>,
    /// Fds that came with it.
    pub fds: Vec<OwnedFd>,
}

impl Msg {
    /// A reply (type bits 1).
    pub fn is_reply(&self) -> bool {
        self.flags & 0xf == F_REPLY
    }
    /// A command (type bits 0).
    pub fn is_command(&self) -> bool {
        self.flags & 0xf == 0
    }
    /// Assert this is a success reply and return its payload.
    #[track_caller]
    pub fn ok(&self) -> &[u8] {
        assert!(self.is_reply(), "not a reply: {self:?}");
        assert_eq!(
            self.flags & F_ERROR,
            0,
            "command {} failed with errno {}",
            self.command,
            self.error
        );
        &self.payload
    }
    /// Assert this is an error reply with `errno` (header only, as the spec requires).
    #[track_caller]
    pub fn errno(&self, errno: i32) {
        assert!(self.is_reply(), "not a reply: {self:?}");
        assert_ne!(
            self.flags & F_ERROR,
            0,
            "command {} succeeded, expected errno {errno}",
            self.command
        );
        assert_eq!(
            self.error, errno as u32,
            "errno of command {}",
            self.command
        );
        assert_eq!(self.size, 16, "error replies are header only");
        assert!(self.payload.is_empty() && self.fds.is_empty());
    }
}

/// A client speaking raw bytes on the socket.
pub struct Client {
    /// The socket.
    pub sock: UnixStream,
    next_id: u16,
}

impl Client {
    /// Connect to `path`.
    pub fn connect(path: &Path) -> Client {
        let sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        sock.set_write_timeout(Some(WAIT)).unwrap();
        Client { sock, next_id: 1 }
    }

    /// Send raw bytes with `fds` attached to the first chunk.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[RawFd]) {
        let mut sent = self.sock.send_with_fds(&[bytes], fds).unwrap();
        while sent < bytes.len() {
            sent += (&self.sock).write(&bytes[sent..]).unwrap();
        }
    }

    /// A fresh message ID.
    pub fn id(&mut self) -> u16 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    /// Send a command with an explicit ID and flags.
    pub fn send_as(&self, id: u16, command: u16, flags: u32, payload: &[u8], fds: &[RawFd]) {
        let mut m = header(id, command, 16 + payload.len() as u32, flags, 0);
        m.extend_from_slice(payload);
        self.send_bytes(&m, fds);
    }

    /// Send a command; returns its ID.
    pub fn send(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> u16 {
        let id = self.id();
        self.send_as(id, command, 0, payload, fds);
        id
    }

    /// Send a command with No_reply; returns its ID.
    pub fn post(&mut self, command: u16, payload: &[u8]) -> u16 {
        let id = self.id();
        self.send_as(id, command, F_NO_REPLY, payload, &[]);
        id
    }

    fn recv_exact(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            let mut raw = [-1 as RawFd; 32];
            let rest = &mut buf[got..];
            let mut iov = [libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            }];
            // SAFETY: the iovec points into `buf`, valid for writes of its length.
            let (n, nfds) = unsafe { self.sock.recv_with_fds(&mut iov, &mut raw) }
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
            for &fd in &raw[..nfds] {
                // SAFETY: recvmsg just installed this fd; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(got)
    }

    /// Receive one message; `Ok(None)` when the server closed the connection.
    pub fn try_recv(&self) -> io::Result<Option<Msg>> {
        let mut fds = Vec::new();
        let mut h = [0u8; 16];
        let got = self.recv_exact(&mut h, &mut fds)?;
        if got == 0 {
            return Ok(None);
        }
        assert_eq!(got, 16, "connection closed inside a header");
        let size = u32_at(&h, 4);
        assert!(size >= 16, "server sent size {size}");
        let mut payload = vec![0u8; size as usize - 16];
        let got = self.recv_exact(&mut payload, &mut fds)?;
        assert_eq!(got, payload.len(), "connection closed inside a payload");
        Ok(Some(Msg {
            id: u16_at(&h, 0),
            command: u16_at(&h, 2),
            size,
            flags: u32_at(&h, 8),
            error: u32_at(&h, 12),
            payload,
            fds,
        }))
    }

    /// Receive one message (panics on EOF or timeout).
    #[track_caller]
    pub fn recv(&self) -> Msg {
        self.try_recv()
            .expect("receiving from the server")
            .expect("server closed the connection")
    }

    /// Receive the reply to command `command` with `id`, checking the header.
    #[track_caller]
    pub fn reply(&self, id: u16, command: u16) -> Msg {
        let m = self.recv();
        assert!(m.is_reply(), "expected a reply, got {m:?}");
        assert_eq!((m.id, m.command), (id, command), "reply header");
        assert_eq!(m.size as usize, 16 + m.payload.len());
        m
    }

    /// Send a command and wait for its reply.
    #[track_caller]
    pub fn call_fds(&mut self, command: u16, payload: &[u8], fds: &[RawFd]) -> Msg {
        let id = self.send(command, payload, fds);
        self.reply(id, command)
    }

    /// Send a command without fds and wait for its reply.
    #[track_caller]
    pub fn call(&mut self, command: u16, payload: &[u8]) -> Msg {
        self.call_fds(command, payload, &[])
    }

    /// Negotiate with `json` capabilities (NUL-terminated on the wire) and minor 0.
    #[track_caller]
    pub fn negotiate_json(&mut self, json: &str) -> serde_json::Value {
        let p = P::new()
            .u16(0)
            .u16(0)
            .bytes(json.as_bytes())
            .bytes(&[0])
            .done();
        let r = self.call(cmd::VERSION, &p);
        let payload = r.ok();
        assert_eq!(u16_at(payload, 0), 0, "major");
        parse_caps(payload)
    }

    /// Negotiate with QEMU's usual capabilities.
    #[track_caller]
    pub fn negotiate(&mut self) -> serde_json::Value {
        self.negotiate_json(
            r#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true}}"#,
        )
    }

    /// DEVICE_GET_INFO must succeed with 9 regions and 5 irqs.
    #[track_caller]
    pub fn assert_alive(&mut self) {
        let r = self.call(cmd::DEVICE_GET_INFO, &four_u32(16, 0, 0, 0));
        let p = r.ok();
        assert_eq!(p.len(), 16);
        assert_eq!((u32_at(p, 8), u32_at(p, 12)), (9, 5));
    }

    /// Whether the server closed this connection (EOF or reset) within [`WAIT`].
    pub fn closed_by_server(&self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match io::Read::read(&mut &self.sock, &mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    /// REGION_READ that must succeed; the data.
    #[track_caller]
    pub fn read_region(&mut self, region: u32, offset: u64, count: u32) -> Vec<u8> {
        let r = self.call(cmd::REGION_READ, &region_rw(region, offset, count, &[]));
        let p = r.ok();
        assert_eq!(p.len(), 16 + count as usize);
        assert_eq!(u64_at(p, 0), offset);
        assert_eq!(u32_at(p, 8), region);
        assert_eq!(u32_at(p, 12), count);
        p[16..].to_vec()
    }

    /// REGION_WRITE that must succeed.
    #[track_caller]
    pub fn write_region(&mut self, region: u32, offset: u64, data: &[u8]) {
        let r = self.call(
            cmd::REGION_WRITE,
            &region_rw(region, offset, data.len() as u32, data),
        );
        let p = r.ok();
        assert_eq!(p.len(), 16);
        assert_eq!(
            (u64_at(p, 0), u32_at(p, 8), u32_at(p, 12)),
            (offset, region, data.len() as u32)
        );
    }

    /// SET_IRQS with eventfds that must succeed.
    #[track_caller]
    pub fn set_irq_fds(&mut self, action: u32, index: u32, start: u32, fds: &[&EventFd]) {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.call_fds(
            cmd::DEVICE_SET_IRQS,
            &set_irqs(
                irq::DATA_EVENTFD | action,
                index,
                start,
                fds.len() as u32,
                &[],
            ),
            &raw,
        )
        .ok();
    }
}

/// Parse a VERSION payload's JSON (NUL-terminated).
#[track_caller]
pub fn parse_caps(payload: &[u8]) -> serde_json::Value {
    let json = &payload[4..];
    assert_eq!(json.last(), Some(&0), "JSON must be NUL-terminated");
    serde_json::from_slice(&json[..json.len() - 1]).expect("server capabilities are JSON")
}
