//! Control path: 4-byte vfio-user REGION_READ and REGION_WRITE round trips on a plain
//! register BAR, through unidev's vfio-user server and through rust-vmm's `vfio-user`
//! crate `Server` (the peer), each driven by unidev's client and by rust-vmm's `Client`.
//!
//! Both servers serve the same thing: a 4 KiB BAR 0 of plain memory and a 256-byte
//! config space, with no side effects, so a round trip is transport cost only.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use unidev_core::irq::{Interrupts, IrqLayout};
use unidev_core::memory::DmaSpace;
use unidev_core::pci::{AccessError, PciDevice, PciRegion, RegionInfo};
use unidev_transports::listener;
use unidev_transports::vfio_user::{ServerConfig, VfioUserClient, VfioUserServer};
use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_NUM_IRQS,
    VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, ServerBackend, ServerRegion};

use super::floors::ns_since;
use super::pin::Placement;

/// Size of the register BAR both servers expose.
const BAR_SIZE: usize = 4096;
const CONFIG_SIZE: usize = 256;
/// The register the benchmark reads and writes.
const REGISTER: u64 = 0x40;

/// vfio-user header (16) + offset (8) + region (4) + count (4).
pub const REGION_ACCESS_BYTES: usize = 32;
/// Bytes of a 4-byte REGION_READ request and of its reply.
pub const READ_SIZES: (usize, usize) = (REGION_ACCESS_BYTES, REGION_ACCESS_BYTES + 4);
/// Bytes of a 4-byte REGION_WRITE request and of its reply.
pub const WRITE_SIZES: (usize, usize) = (REGION_ACCESS_BYTES + 4, REGION_ACCESS_BYTES);

/// Which vfio-user server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    /// unidev's `VfioUserServer` (the core's epoll dispatch, session, PCI device).
    Unidev,
    /// rust-vmm's `vfio_user::Server` (blocking loop on the accepted stream).
    RustVmm,
}

/// Which vfio-user client drives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// unidev's `VfioUserClient`.
    Unidev,
    /// rust-vmm's `vfio_user::Client`.
    RustVmm,
}

/// Read or write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// REGION_READ of 4 bytes.
    Read,
    /// REGION_WRITE of 4 bytes.
    Write,
}

/// The register device behind unidev's server.
struct RegisterDevice {
    irqs: Arc<Interrupts>,
    dma: Arc<DmaSpace>,
    config: [u8; CONFIG_SIZE],
    bar0: Vec<u8>,
}

impl RegisterDevice {
    fn new() -> Self {
        RegisterDevice {
            irqs: Arc::new(Interrupts::new(IrqLayout::pci(false, 0, 0))),
            dma: Arc::new(DmaSpace::default()),
            config: [0; CONFIG_SIZE],
            bar0: vec![0; BAR_SIZE],
        }
    }

    fn bytes(&mut self, region: PciRegion) -> Result<&mut [u8], AccessError> {
        match region {
            PciRegion::Config => Ok(&mut self.config),
            PciRegion::Bar(0) => Ok(&mut self.bar0),
            other => Err(AccessError::NotPermitted(other)),
        }
    }
}

/// `offset..offset+len` of `bytes`, if it fits.
fn window(bytes: &mut [u8], offset: u64, len: usize) -> Option<&mut [u8]> {
    let start = usize::try_from(offset).ok()?;
    bytes.get_mut(start..start.checked_add(len)?)
}

impl PciDevice for RegisterDevice {
    fn name(&self) -> &str {
        "bench-registers"
    }
    fn region_info(&self, region: PciRegion) -> RegionInfo {
        match region {
            PciRegion::Config => RegionInfo::read_write(CONFIG_SIZE as u64),
            PciRegion::Bar(0) => RegionInfo::read_write(BAR_SIZE as u64),
            _ => RegionInfo::absent(),
        }
    }
    fn interrupts(&self) -> &Arc<Interrupts> {
        &self.irqs
    }
    fn dma(&self) -> &Arc<DmaSpace> {
        &self.dma
    }
    fn read(&mut self, region: PciRegion, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
        let len = data.len();
        match window(self.bytes(region)?, offset, len) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
        Ok(())
    }
    fn write(&mut self, region: PciRegion, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        if let Some(dst) = window(self.bytes(region)?, offset, data.len()) {
            dst.copy_from_slice(data);
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.bar0.fill(0);
    }
}

/// The same registers behind rust-vmm's server.
struct RegisterBackend {
    config: [u8; CONFIG_SIZE],
    bar0: Vec<u8>,
}

impl RegisterBackend {
    fn bytes(&mut self, region: u32) -> std::io::Result<&mut [u8]> {
        match region {
            VFIO_PCI_CONFIG_REGION_INDEX => Ok(&mut self.config),
            VFIO_PCI_BAR0_REGION_INDEX => Ok(&mut self.bar0),
            _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

impl ServerBackend for RegisterBackend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let len = data.len();
        match window(self.bytes(region)?, offset, len) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
        Ok(())
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if let Some(dst) = window(self.bytes(region)?, offset, data.len()) {
            dst.copy_from_slice(data);
        }
        Ok(())
    }
    fn dma_map(
        &mut self,
        _: DmaMapFlags,
        _: u64,
        _: u64,
        _: u64,
        _: Option<File>,
    ) -> std::io::Result<()> {
        Ok(())
    }
    fn dma_unmap(&mut self, _: DmaUnmapFlags, _: u64, _: u64) -> std::io::Result<()> {
        Ok(())
    }
    fn reset(&mut self) -> std::io::Result<()> {
        self.bar0.fill(0);
        Ok(())
    }
    fn set_irqs(&mut self, _: u32, _: u32, _: u32, _: u32, _: Vec<File>) -> std::io::Result<()> {
        Ok(())
    }
}

fn rust_vmm_regions() -> Vec<ServerRegion> {
    (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let size = match index {
                VFIO_PCI_CONFIG_REGION_INDEX => CONFIG_SIZE as u64,
                VFIO_PCI_BAR0_REGION_INDEX => BAR_SIZE as u64,
                _ => 0,
            };
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: std::mem::size_of::<vfio_region_info>() as u32,
                    index,
                    size,
                    flags: if size > 0 {
                        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE
                    } else {
                        0
                    },
                    ..Default::default()
                },
                sparse_areas: Vec::new(),
                mmap_fd: None,
            }
        })
        .collect()
}

/// A server of either kind, running on the device CPU until dropped.
struct RunningServer {
    stop: Option<unidev_core::dispatch::StopHandle>,
    thread: Option<std::thread::JoinHandle<()>>,
    sock: PathBuf,
}

impl RunningServer {
    fn start(kind: ServerKind, place: &Placement, sock: PathBuf) -> Result<Self, String> {
        let _ = std::fs::remove_file(&sock);
        let path = sock.clone();
        let started = place
            .build_on_device(move || -> Result<_, String> {
                match kind {
                    ServerKind::Unidev => {
                        let l = listener::bind(&path, 0o600).map_err(|e| e.to_string())?;
                        let dev = Arc::new(Mutex::new(RegisterDevice::new()));
                        let server =
                            VfioUserServer::new("bench-ctl", l, dev, ServerConfig::default())
                                .map_err(|e| e.to_string())?;
                        let stop = server.stop_handle();
                        let t = std::thread::Builder::new()
                            .name("bench-ctl-unidev".into())
                            .spawn(move || {
                                if let Err(e) = server.run() {
                                    log::error!("bench control server: {e}");
                                }
                            })
                            .map_err(|e| e.to_string())?;
                        Ok((Some(stop), t))
                    }
                    ServerKind::RustVmm => {
                        let irqs = (0..VFIO_PCI_NUM_IRQS)
                            .map(|index| IrqInfo {
                                index,
                                count: 0,
                                flags: 0,
                            })
                            .collect();
                        let server = vfio_user::Server::new(&path, true, irqs, rust_vmm_regions())
                            .map_err(|e| format!("rust-vmm server: {e}"))?;
                        let t = std::thread::Builder::new()
                            .name("bench-ctl-rust-vmm".into())
                            .spawn(move || {
                                let mut backend = RegisterBackend {
                                    config: [0; CONFIG_SIZE],
                                    bar0: vec![0; BAR_SIZE],
                                };
                                // Serves one client, returns when it hangs up.
                                if let Err(e) = server.run(&mut backend) {
                                    log::error!("rust-vmm server: {e}");
                                }
                            })
                            .map_err(|e| e.to_string())?;
                        Ok((None, t))
                    }
                }
            })
            .map_err(|e| format!("pin: {e}"))??;
        Ok(RunningServer {
            stop: started.0,
            thread: Some(started.1),
            sock,
        })
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        match &self.stop {
            Some(s) => s.stop(),
            // rust-vmm's server may still wait in accept (a client that never came):
            // a connection that closes at once ends its run().
            None => drop(std::os::unix::net::UnixStream::connect(&self.sock)),
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// A client of either kind.
enum Client {
    Unidev(VfioUserClient),
    RustVmm(vfio_user::Client),
}

impl Client {
    fn connect(kind: ClientKind, sock: &Path) -> Result<Self, String> {
        Ok(match kind {
            ClientKind::Unidev => Client::Unidev(
                VfioUserClient::connect(sock).map_err(|e| format!("unidev client: {e}"))?,
            ),
            ClientKind::RustVmm => Client::RustVmm(
                vfio_user::Client::new(sock).map_err(|e| format!("rust-vmm client: {e}"))?,
            ),
        })
    }

    fn access(&mut self, access: Access, value: &mut [u8; 4]) -> Result<(), String> {
        let bar = VFIO_PCI_BAR0_REGION_INDEX;
        match (self, access) {
            (Client::Unidev(c), Access::Read) => c.region_read(bar, REGISTER, value),
            (Client::Unidev(c), Access::Write) => c.region_write(bar, REGISTER, value),
            (Client::RustVmm(c), Access::Read) => {
                return c
                    .region_read(bar, REGISTER, value)
                    .map_err(|e| e.to_string())
            }
            (Client::RustVmm(c), Access::Write) => {
                return c
                    .region_write(bar, REGISTER, value)
                    .map_err(|e| e.to_string())
            }
        }
        .map_err(|e| e.to_string())
    }
}

/// `rounds` 4-byte accesses by `client` to `server` (after a short warm-up); the
/// written value is read back once at the end as a sanity check.
pub fn round_trips(
    place: &Placement,
    dir: &Path,
    server: ServerKind,
    client: ClientKind,
    access: Access,
    rounds: usize,
) -> Result<Vec<f64>, String> {
    let running = RunningServer::start(server, place, dir.join("control.sock"))?;
    let mut c = Client::connect(client, &running.sock)?;
    let mut value = [0x5a, 0xa5, 0x11, 0x22];
    for _ in 0..rounds / 10 + 10 {
        c.access(access, &mut value)?;
    }
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        c.access(access, &mut value)?;
        samples.push(ns_since(t));
    }
    if access == Access::Write {
        let mut back = [0u8; 4];
        c.access(Access::Read, &mut back)?;
        if back != value {
            return Err(format!("read back {back:02x?}, wrote {value:02x?}"));
        }
    }
    drop(c);
    drop(running);
    Ok(samples)
}
