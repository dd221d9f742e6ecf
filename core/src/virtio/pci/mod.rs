//! virtio-pci: a virtio device as a full PCI function (virtio 1.2, section 4.1 "Virtio
//! Over PCI Bus", modern interface, split virtqueues).
//!
//! Hand-written because no crate implements the device side of virtio-pci as a plain
//! register model independent of a VMM (rust-vmm's `virtio-device`/`vm-virtio` target
//! in-VMM devices with their own bus traits).
//!
//! Layout (fixed, read by drivers from the capabilities):
//! * BAR 1 (32-bit memory, 8 KiB): MSI-X table at 0, PBA at 0x1000; vector 0..n.
//! * BAR 4 (64-bit memory, 16 KiB): common config at 0x0000, ISR at 0x1000, device
//!   config at 0x2000, notify at 0x3000 (4 bytes per queue). With `notify_mmap` the
//!   notify page is a sparse-mmap area backed by a memfd, and the device polls.
//! * Capabilities: MSI-X, then vendor capabilities COMMON, NOTIFY, ISR, DEVICE and the
//!   PCI_CFG access window.
//!
//! Register writes become [`VirtioDevice`] calls: status state machine, feature
//! negotiation, queue set-up and start at DRIVER_OK (or at enable after it), reset.
//! Interrupts: while MSI-X is enabled, a queue's call fd *is* the eventfd the client
//! attached to its vector (completions go straight to the client's irqfd); otherwise a
//! small relay thread turns the call into ISR bit 0 plus INTx (or an MSI-X pending bit).
//! The relay thread starts with the first queue, so an idle function has no thread.
//!
//! One file per concern:
//! * this module — [`VirtioPci`], its options, the register layout, and the
//!   [`PciDevice`] implementation that routes each access to the structure it hits;
//! * `common_cfg` — the common configuration structure (4.1.4.3): status state
//!   machine, feature negotiation, queue registers and queue start;
//! * `notify` — the notification structure (4.1.4.4) and its optional mappable page;
//! * `interrupts` — interrupt routing (4.1.4.5 ISR status, 4.1.5.1.2 MSI-X vectors)
//!   and the relay thread;
//! * `pci_cfg` — the VIRTIO_PCI_CAP_PCI_CFG access window (4.1.4.8, "PCI configuration
//!   access capability").

mod common_cfg;
mod interrupts;
mod notify;
mod pci_cfg;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use log::info;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::common_cfg::QueueRegs;
use self::interrupts::Router;
use super::config::{ConfigModelled, ConfigValues};
use super::device::VirtioDevice;
use crate::dispatch::{EventLoop, StopHandle};
use crate::irq::{Interrupts, IrqLayout};
use crate::memory::DmaSpace;
use crate::pci::{
    AccessError, Bar, Capability, ConfigSpace, Msix, PciDevice, PciRegion, RegionInfo,
};
use crate::sandbox::SandboxedThread;
use crate::sync::lock;

/// Virtio's PCI vendor ID.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;
/// Most queues a VirtioPci accepts (MSI-X table of queues + 1 vectors fits BAR 1).
pub const MAX_QUEUES: usize = 128;

/// Device status bits (virtio 1.2 section 2.1), at their virtio-pci path.
pub use super::spec::status;

/// VIRTIO_F_VERSION_1, at its virtio-pci path.
pub use super::spec::VIRTIO_F_VERSION_1;

const MSIX_BAR: u8 = 1;
const MSIX_BAR_SIZE: u64 = 0x2000;
const PBA_OFFSET: u64 = 0x1000;
const VIRTIO_BAR: u8 = 4;
const VIRTIO_BAR_SIZE: u64 = 0x4000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const PAGE: u64 = 0x1000;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;

/// Options of a virtio-pci function.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct VirtioPciOptions {
    /// Make the notify page mappable (sparse mmap): the driver's notifications then go
    /// to shared memory instead of trapping, and the queues must be polled.
    pub notify_mmap: bool,
    /// Values of the device configuration fields the function's device model keeps
    /// (a backend without the CONFIG protocol feature: `virtio::config`).
    pub config: ConfigValues,
}

impl VirtioPciOptions {
    /// Set [`notify_mmap`](VirtioPciOptions::notify_mmap).
    pub fn notify_mmap(mut self, on: bool) -> Self {
        self.notify_mmap = on;
        self
    }

    /// Set [`config`](VirtioPciOptions::config).
    pub fn config(mut self, values: ConfigValues) -> Self {
        self.config = values;
        self
    }
}

/// A virtio device exported as a PCI function.
///
/// # Example
///
/// Any [`VirtioDevice`] (here a `VhostUserBackend` run by
/// [`LocalVirtio`](super::LocalVirtio)) as a virtio-pci function, which a PCI transport
/// serves like any other [`PciDevice`]:
///
/// ```
/// # use std::io;
/// # use vhost::vhost_user::message::VhostUserProtocolFeatures;
/// # use vhost_user_backend::{VhostUserBackend, VringRwLock};
/// # use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
/// # use vmm_sys_util::epoll::EventSet;
/// # struct Idle;
/// # impl VhostUserBackend for Idle {
/// #     type Bitmap = ();
/// #     type Vring = VringRwLock;
/// #     fn num_queues(&self) -> usize { 2 }
/// #     fn max_queue_size(&self) -> usize { 256 }
/// #     fn features(&self) -> u64 { 1 << 32 }
/// #     fn protocol_features(&self) -> VhostUserProtocolFeatures {
/// #         VhostUserProtocolFeatures::empty()
/// #     }
/// #     fn set_event_idx(&self, _enabled: bool) {}
/// #     fn update_memory(&self, _: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
/// #         Ok(())
/// #     }
/// #     fn handle_event(&self, _: u16, _: EventSet, _: &[VringRwLock], _: usize) -> io::Result<()> {
/// #         Ok(())
/// #     }
/// # }
/// use std::sync::Arc;
/// use unidev_core::memory::DmaSpace;
/// use unidev_core::pci::{PciDevice, PciRegion};
/// use unidev_core::virtio::{DispatchOptions, LocalVirtio, VirtioPci, VirtioPciOptions};
///
/// let dma = Arc::new(DmaSpace::default());
/// let device = LocalVirtio::new(4, Arc::new(Idle), &dma, DispatchOptions::default()).unwrap();
/// let mut pci = VirtioPci::new("idle", device, dma, VirtioPciOptions::default()).unwrap();
///
/// // Vendor 0x1af4, device 0x1040 + 4 (a modern virtio entropy device).
/// let mut ids = [0; 4];
/// pci.read(PciRegion::Config, 0, &mut ids).unwrap();
/// assert_eq!(ids, [0xf4, 0x1a, 0x44, 0x10]);
/// // One MSI-X vector for configuration changes and one per queue.
/// assert_eq!(pci.irq_layout().count(unidev_core::irq::IrqKind::Msix), 3);
/// ```
pub struct VirtioPci {
    name: String,
    config: ConfigSpace,
    pci_cfg_cap: Option<u16>,
    pci_cfg_window: (u8, u32, u32),
    irqs: Arc<Interrupts>,
    dma: Arc<DmaSpace>,
    msix: Arc<Mutex<Msix>>,
    device: Arc<dyn VirtioDevice>,
    router: Arc<Router>,
    relay_stop: Option<StopHandle>,
    /// The relay's loop until its thread starts (with the first queue: an idle function
    /// costs no thread), then its thread.
    relay_loop: Option<EventLoop>,
    relay_thread: Option<SandboxedThread<()>>,
    kicks: Vec<EventFd>,
    notify_mem: Option<Arc<File>>,
    // Common configuration state.
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    config_vector: u16,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
}

/// PCI class and sub-class for a virtio device type.
fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        1 => (0x02, 0x00), // network
        2 => (0x01, 0x00), // block: storage
        3 => (0x07, 0x80), // console: communication
        _ => (0xff, 0x00),
    }
}

/// A virtio vendor capability (virtio 1.2 4.1.4, `struct virtio_pci_cap`) for a
/// structure at `offset` in the virtio BAR.
fn vendor_cap(cfg_type: u8, offset: u64, length: u64, extra: &[u8]) -> Capability {
    let mut p = vec![cfg_type, VIRTIO_BAR, 0, 0, 0];
    p.extend_from_slice(&(offset as u32).to_le_bytes());
    p.extend_from_slice(&(length as u32).to_le_bytes());
    p.extend_from_slice(extra);
    Capability::Vendor(p)
}

impl VirtioPci {
    /// Export `device` as a virtio-pci function using `dma` for client memory.
    pub fn new(
        name: impl Into<String>,
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
        options: VirtioPciOptions,
    ) -> io::Result<Self> {
        let name = name.into();
        let nq = device.num_queues();
        if nq == 0 || nq > MAX_QUEUES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{nq} queues; virtio-pci supports 1 to {MAX_QUEUES}"),
            ));
        }
        let vectors = nq as u16 + 1;
        let dtype = device.device_type();
        let (class, sub) = class_of(dtype);
        let pci_cfg_extra = [0u8; 4];
        let config = ConfigSpace::builder(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE + dtype as u16)
            .revision(1)
            .class(class, sub, 0)
            .subsystem(VIRTIO_PCI_VENDOR, 0x1100)
            .interrupt_pin(1)
            .bar(MSIX_BAR, Bar::mem32(MSIX_BAR_SIZE))
            .bar(VIRTIO_BAR, Bar::mem64(VIRTIO_BAR_SIZE).prefetchable())
            .capability(Capability::Msix {
                table_size: vectors,
                table_bar: MSIX_BAR,
                table_offset: 0,
                pba_bar: MSIX_BAR,
                pba_offset: PBA_OFFSET as u32,
            })
            .capability(vendor_cap(CAP_COMMON, COMMON, COMMON_LEN, &[]))
            .capability(vendor_cap(
                CAP_NOTIFY,
                NOTIFY,
                PAGE,
                &NOTIFY_MULTIPLIER.to_le_bytes(),
            ))
            .capability(vendor_cap(CAP_ISR, ISR, 1, &[]))
            .capability(vendor_cap(CAP_DEVICE, DEVICE, PAGE, &[]))
            .capability(vendor_cap(CAP_PCI_CFG, 0, 0, &pci_cfg_extra))
            .build()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let pci_cfg_cap = find_vendor_cap(&config, CAP_PCI_CFG);
        let irqs = Arc::new(Interrupts::new(IrqLayout::pci(true, 0, u32::from(vectors))));
        let msix = Arc::new(Mutex::new(Msix::new(vectors, irqs.clone())));
        let mut relay_fds = Vec::with_capacity(nq);
        let mut kicks = Vec::with_capacity(nq);
        for _ in 0..nq {
            relay_fds.push(EventFd::new(EFD_NONBLOCK)?);
            kicks.push(EventFd::new(EFD_NONBLOCK)?);
        }
        // This function is the device model: it keeps the config space the backend does
        // not serve (virtio::config).
        let device: Arc<dyn VirtioDevice> = Arc::new(
            ConfigModelled::new(device, &options.config)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        );
        let router = Router::new(device.clone(), irqs.clone(), msix.clone(), relay_fds);
        let relay_loop = Self::relay_loop(&router)?;
        let notify_mem = if options.notify_mmap {
            Some(Arc::new(notify::notify_memfd()?))
        } else {
            None
        };
        let mut dev = VirtioPci {
            name,
            config,
            pci_cfg_cap,
            pci_cfg_window: (0, 0, 0),
            irqs,
            dma,
            msix,
            device,
            router,
            relay_stop: Some(relay_loop.stop_handle()),
            relay_loop: Some(relay_loop),
            relay_thread: None,
            kicks,
            notify_mem,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            config_vector: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: Vec::new(),
        };
        dev.reset_virtio();
        dev.router.refresh();
        Ok(dev)
    }

    /// The virtio device behind this function.
    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.device
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// A read of the virtio BAR, from the structure it lies in (an access straddling two
    /// is refused).
    fn virtio_bar_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
        let len = data.len() as u64;
        let region = PciRegion::Bar(VIRTIO_BAR);
        let within = |base: u64, size: u64| offset >= base && offset + len <= base + size;
        if within(COMMON, PAGE) {
            let img = self.common_image();
            for (i, b) in data.iter_mut().enumerate() {
                *b = img
                    .get((offset - COMMON) as usize + i)
                    .copied()
                    .unwrap_or(0);
            }
        } else if within(ISR, PAGE) {
            data.fill(0);
            if offset == ISR {
                data[0] = self.isr_read();
            }
        } else if within(DEVICE, PAGE) {
            self.device.read_config((offset - DEVICE) as u32, data);
        } else if within(NOTIFY, PAGE) {
            data.fill(0);
        } else {
            return Err(AccessError::Unsupported {
                region,
                offset,
                len: data.len(),
            });
        }
        Ok(())
    }

    /// A write of the virtio BAR, to the structure it lies in (an access straddling two
    /// is refused).
    fn virtio_bar_write(&mut self, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        let len = data.len() as u64;
        let region = PciRegion::Bar(VIRTIO_BAR);
        let within = |base: u64, size: u64| offset >= base && offset + len <= base + size;
        if within(COMMON, PAGE) {
            self.common_write(offset - COMMON, data);
        } else if within(ISR, PAGE) {
            // Read-only.
        } else if within(DEVICE, PAGE) {
            self.device.write_config((offset - DEVICE) as u32, data);
        } else if within(NOTIFY, PAGE) {
            self.notify_write(offset - NOTIFY);
        } else {
            return Err(AccessError::Unsupported {
                region,
                offset,
                len: data.len(),
            });
        }
        Ok(())
    }

    /// Check that an access lies inside one of our BARs.
    fn check_bar(bar: u8, offset: u64, len: usize) -> Result<(), AccessError> {
        let size = match bar {
            MSIX_BAR => MSIX_BAR_SIZE,
            VIRTIO_BAR => VIRTIO_BAR_SIZE,
            _ => return Err(AccessError::NotPermitted(PciRegion::Bar(bar))),
        };
        if offset.saturating_add(len as u64) > size {
            return Err(AccessError::OutOfRange {
                region: PciRegion::Bar(bar),
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
        Self::check_bar(bar, offset, data.len())?;
        if bar == MSIX_BAR {
            self.msix_read(offset, data);
            Ok(())
        } else {
            self.virtio_bar_read(offset, data)
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        Self::check_bar(bar, offset, data.len())?;
        if bar == MSIX_BAR {
            self.msix_write(offset, data);
            Ok(())
        } else {
            self.virtio_bar_write(offset, data)
        }
    }
}

/// Offset of the first virtio vendor capability of type `cfg_type`.
fn find_vendor_cap(config: &ConfigSpace, cfg_type: u8) -> Option<u16> {
    let mut ptr = config.read_u16(0x34) as u8 as u16 & !3;
    let mut hops = 0;
    while ptr >= 0x40 && hops < 48 {
        let mut hdr = [0u8; 4];
        config.read(u64::from(ptr), &mut hdr);
        if hdr[0] == Capability::ID_VENDOR && hdr[3] == cfg_type {
            return Some(ptr);
        }
        ptr = u16::from(hdr[1]) & !3;
        hops += 1;
    }
    None
}

impl PciDevice for VirtioPci {
    fn name(&self) -> &str {
        &self.name
    }

    fn region_info(&self, region: PciRegion) -> RegionInfo {
        match region {
            PciRegion::Config => RegionInfo::read_write(self.config.size()),
            PciRegion::Bar(MSIX_BAR) => RegionInfo::read_write(MSIX_BAR_SIZE),
            PciRegion::Bar(VIRTIO_BAR) => RegionInfo {
                mmap: self.notify_mmap(),
                ..RegionInfo::read_write(VIRTIO_BAR_SIZE)
            },
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
        match region {
            PciRegion::Config => {
                let intx_pending = self.intx_pending();
                self.config.set_intx_status(intx_pending);
                self.config.read(offset, data);
                self.pci_cfg_overlay_read(offset, data);
                Ok(())
            }
            PciRegion::Bar(bar) => self.bar_read(bar, offset, data),
            _ => Err(AccessError::NotPermitted(region)),
        }
    }

    fn write(&mut self, region: PciRegion, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        match region {
            PciRegion::Config => {
                if !self.pci_cfg_overlay_write(offset, data) {
                    let change = self.config.write(offset, data);
                    if change.msix || change.command {
                        self.sync_msix_control();
                    }
                }
                Ok(())
            }
            PciRegion::Bar(bar) => self.bar_write(bar, offset, data),
            _ => Err(AccessError::NotPermitted(region)),
        }
    }

    fn reset(&mut self) {
        info!("{}: function reset", self.name);
        self.reset_virtio();
        self.config.reset();
        self.pci_cfg_window = (0, 0, 0);
        lock(&self.msix).reset();
        self.sync_msix_control();
        {
            let mut r = self.router.lock();
            r.msix_enabled = false;
        }
        self.router.refresh();
    }

    fn client_detached(&mut self) {
        // The client's vector eventfds are gone; queues fall back to the relay until the
        // next client attaches its own.
        self.router.refresh();
    }
}

impl Drop for VirtioPci {
    fn drop(&mut self) {
        self.device.reset();
        if let Some(s) = self.relay_stop.take() {
            s.stop();
        }
        if let Some(t) = self.relay_thread.take() {
            let _ = t.join();
        }
    }
}
