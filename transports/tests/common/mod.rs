//! Helpers for the vfio-user protocol tests (`vfio_user_*.rs`, one file per command
//! group): an in-process [`VfioUserServer`] on a socket in a private temp dir, serving
//! the test-only device of [`device`], and a raw [`Client`] that builds every message
//! with [`Request`] and reads every reply at the spec's offsets (`reply.rs`). None of
//! this uses the transport's codec, so a field-order mistake there cannot cancel out
//! here.
//!
//! Tests of one file run in parallel threads of one process. The fd-leak test counts
//! `/proc/self/fd`, so every harness holds a lock shared within the test binary and that
//! test takes it exclusively.
#![allow(dead_code)]

mod client;
pub mod device;
mod reply;
mod request;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
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

pub use client::Client;
use device::{Record, TestDevice};
pub use reply::*;
pub use request::*;

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

/// DMA_MAP flags (vfio-user.rst, "VFIO_USER_DMA_MAP").
pub mod dma {
    pub const READ: u32 = 1 << 0;
    pub const WRITE: u32 = 1 << 1;
    pub const RW: u32 = READ | WRITE;
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

/// The errno most refusals carry.
pub const EINVAL: i32 = libc::EINVAL;

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

impl Opts {
    /// Default options with the server settings `config`.
    pub fn with_config(config: ServerConfig) -> Opts {
        Opts {
            config,
            ..Opts::default()
        }
    }
}

/// The server settings of [`Opts::default`], to start a `ServerConfig { .. }` from.
pub fn config() -> ServerConfig {
    Opts::default().config
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
