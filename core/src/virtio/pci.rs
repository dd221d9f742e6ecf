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

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use log::{info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{QueueConfig, VirtioDevice};
use crate::dispatch::{Control, EventLoop, StopHandle};
use crate::irq::{Interrupts, IrqKind, IrqLayout};
use crate::memory::DmaSpace;
use crate::pci::{
    AccessError, Bar, Capability, ConfigSpace, Msix, PciDevice, PciRegion, RegionInfo, RegionMmap,
    SparseArea,
};
use crate::sandbox::{self, SandboxedThread};

/// Virtio's PCI vendor ID.
pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;
/// Most queues a VirtioPci accepts (MSI-X table of queues + 1 vectors fits BAR 1).
pub const MAX_QUEUES: usize = 128;

/// Device status bits (virtio 1.2 section 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// VIRTIO_F_VERSION_1.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

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
#[derive(Clone, Copy, Debug, Default)]
pub struct VirtioPciOptions {
    /// Make the notify page mappable (sparse mmap): the driver's notifications then go
    /// to shared memory instead of trapping, and the queues must be polled.
    pub notify_mmap: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
    running: bool,
}

/// Interrupt routing shared with the eventfd listener and the relay thread.
struct Router {
    device: Arc<dyn VirtioDevice>,
    irqs: Arc<Interrupts>,
    msix: Arc<Mutex<Msix>>,
    isr: Arc<AtomicU8>,
    route: Mutex<Route>,
    relay_fds: Vec<EventFd>,
}

#[derive(Default)]
struct Route {
    msix_enabled: bool,
    intx_disabled: bool,
    vectors: Vec<u16>,
}

impl Router {
    fn lock(&self) -> std::sync::MutexGuard<'_, Route> {
        self.route.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fd a queue's backend should signal.
    fn call_fd(&self, queue: usize) -> Option<EventFd> {
        let direct = {
            let r = self.lock();
            let v = r.vectors.get(queue).copied().unwrap_or(NO_VECTOR);
            if r.msix_enabled && v != NO_VECTOR {
                self.irqs.eventfd(IrqKind::Msix, u32::from(v))
            } else {
                None
            }
        };
        direct.or_else(|| self.relay_fds.get(queue).and_then(|f| f.try_clone().ok()))
    }

    /// Hand every queue its current call fd.
    fn refresh(&self) {
        for q in 0..self.relay_fds.len() {
            self.device.set_queue_call(q, self.call_fd(q));
        }
    }

    /// A queue signalled its relay fd: ISR bit 0, then MSI-X or INTx.
    fn relay(&self, queue: usize) {
        self.isr.fetch_or(1, Ordering::SeqCst);
        let (msix, vector, intx_disabled) = {
            let r = self.lock();
            (
                r.msix_enabled,
                r.vectors.get(queue).copied().unwrap_or(NO_VECTOR),
                r.intx_disabled,
            )
        };
        if msix {
            if vector != NO_VECTOR {
                self.msix
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .signal(vector);
            }
        } else if !intx_disabled {
            self.irqs.set_intx_level(true);
        }
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

fn class_of(device_type: u32) -> (u8, u8) {
    match device_type {
        1 => (0x02, 0x00), // network
        2 => (0x01, 0x00), // block: storage
        3 => (0x07, 0x80), // console: communication
        _ => (0xff, 0x00),
    }
}

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
        let isr = Arc::new(AtomicU8::new(0));
        let mut relay_fds = Vec::with_capacity(nq);
        let mut kicks = Vec::with_capacity(nq);
        for _ in 0..nq {
            relay_fds.push(EventFd::new(EFD_NONBLOCK)?);
            kicks.push(EventFd::new(EFD_NONBLOCK)?);
        }
        let router = Arc::new(Router {
            device: device.clone(),
            irqs: irqs.clone(),
            msix: msix.clone(),
            isr,
            route: Mutex::new(Route {
                vectors: vec![NO_VECTOR; nq],
                ..Route::default()
            }),
            relay_fds,
        });
        // Vector eventfds attached or replaced by the client reach the queues at once.
        // A weak reference: the router owns the device and must die with the function.
        let r = Arc::downgrade(&router);
        irqs.subscribe(Arc::new(move |kind| {
            if let (IrqKind::Msix, Some(r)) = (kind, r.upgrade()) {
                r.refresh();
            }
        }));
        let relay_loop = Self::relay_loop(&router)?;
        let notify_mem = if options.notify_mmap {
            Some(Arc::new(notify_memfd()?))
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

    fn relay_loop(router: &Arc<Router>) -> io::Result<EventLoop> {
        let mut lp = EventLoop::new()?;
        for (q, fd) in router.relay_fds.iter().enumerate() {
            let r = router.clone();
            let efd = fd.try_clone()?;
            lp.add(fd.as_raw_fd(), epoll::Events::EPOLLIN, move |_, _| {
                let _ = efd.read();
                r.relay(q);
                Control::Continue
            })?;
        }
        Ok(lp)
    }

    /// Start the relay thread if it has not started yet (queues signal it only once they
    /// run; its eventfds collect signals meanwhile).
    /// It starts under the process's seccomp policy (crate::sandbox); if it could not
    /// start, every later queue start fails too.
    fn ensure_relay(&mut self) -> io::Result<()> {
        if self.relay_thread.is_some() {
            return Ok(());
        }
        let Some(mut lp) = self.relay_loop.take() else {
            return Err(io::Error::other("the interrupt relay failed to start"));
        };
        let thread = sandbox::spawn(
            "virtio-irq-relay".into(),
            sandbox::Role::Worker,
            move || {
                if let Err(e) = lp.run() {
                    warn!("virtio interrupt relay failed: {e}");
                }
            },
        )?;
        self.relay_thread = Some(thread);
        Ok(())
    }

    /// The virtio device behind this function.
    pub fn device(&self) -> &Arc<dyn VirtioDevice> {
        &self.device
    }

    /// The device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    /// Driver reset (status 0): stop queues, forget negotiation, keep PCI state.
    fn reset_virtio(&mut self) {
        self.device.reset();
        let nq = self.device.num_queues();
        let max = self.device.max_queue_size();
        self.queues = vec![
            QueueRegs {
                size: max,
                vector: NO_VECTOR,
                ..QueueRegs::default()
            };
            nq
        ];
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.config_vector = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        self.router.isr.store(0, Ordering::SeqCst);
        self.irqs.set_intx_level(false);
        for k in &self.kicks {
            let _ = k.read();
        }
        {
            let mut r = self.router.lock();
            r.vectors = vec![NO_VECTOR; nq];
        }
        self.router.refresh();
    }

    fn sync_msix_control(&mut self) {
        if let Some((enabled, masked)) = self.config.msix_control() {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_control(enabled, masked);
            let changed = {
                let mut r = self.router.lock();
                let changed = r.msix_enabled != enabled;
                r.msix_enabled = enabled;
                r.intx_disabled = self.config.intx_disabled();
                changed
            };
            if changed {
                self.router.refresh();
            }
        }
    }

    fn set_status(&mut self, new: u8) {
        if new == 0 {
            info!("{}: driver reset", self.name);
            self.reset_virtio();
            return;
        }
        let old = self.status;
        let mut new = new;
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let offered = self.offered_features();
            let f = self.driver_features;
            if f & !offered != 0 || f & VIRTIO_F_VERSION_1 == 0 {
                warn!(
                    "{}: driver features {f:#x} not acceptable (offered {offered:#x})",
                    self.name
                );
                new &= !status::FEATURES_OK;
            } else {
                self.device.set_driver_features(f);
            }
        }
        self.status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            for q in 0..self.queues.len() {
                if self.queues[q].enabled {
                    self.start_queue(q);
                }
            }
        }
    }

    fn start_queue(&mut self, q: usize) {
        if let Err(e) = self.ensure_relay() {
            warn!(
                "{}: cannot start the interrupt relay: {}",
                self.name,
                crate::limits::describe(&e)
            );
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        let regs = self.queues[q];
        let kick = match self.kicks[q].try_clone() {
            Ok(k) => k,
            Err(e) => {
                warn!("{}: queue {q}: {}", self.name, crate::limits::describe(&e));
                return;
            }
        };
        self.dma.publish();
        let cfg = QueueConfig {
            size: regs.size,
            desc: regs.desc,
            avail: regs.driver,
            used: regs.device,
            kick,
            call: self.router.call_fd(q),
            next_avail: 0,
            next_used: 0,
        };
        match self.device.start_queue(q, cfg) {
            Ok(()) => self.queues[q].running = true,
            Err(e) => {
                warn!("{}: cannot start queue: {e}; device needs reset", self.name);
                self.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    fn selected(&self) -> Option<usize> {
        let q = self.queue_select as usize;
        (q < self.queues.len()).then_some(q)
    }

    /// The common configuration structure as bytes (virtio 1.2 4.1.4.3).
    fn common_image(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let feat = match self.device_feature_select {
            0 => self.offered_features() as u32,
            1 => (self.offered_features() >> 32) as u32,
            _ => 0,
        };
        let drv = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        b[0x00..0x04].copy_from_slice(&self.device_feature_select.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&feat.to_le_bytes());
        b[0x08..0x0c].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        b[0x0c..0x10].copy_from_slice(&drv.to_le_bytes());
        b[0x10..0x12].copy_from_slice(&self.config_vector.to_le_bytes());
        b[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        b[0x14] = self.status;
        b[0x15] = self.config_generation;
        b[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            let r = &self.queues[q];
            b[0x18..0x1a].copy_from_slice(&r.size.to_le_bytes());
            b[0x1a..0x1c].copy_from_slice(&r.vector.to_le_bytes());
            b[0x1c..0x1e].copy_from_slice(&u16::from(r.enabled).to_le_bytes());
            b[0x1e..0x20].copy_from_slice(&(q as u16).to_le_bytes());
            b[0x20..0x28].copy_from_slice(&r.desc.to_le_bytes());
            b[0x28..0x30].copy_from_slice(&r.driver.to_le_bytes());
            b[0x30..0x38].copy_from_slice(&r.device.to_le_bytes());
            b[0x38..0x3a].copy_from_slice(&(q as u16).to_le_bytes());
        }
        b
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let before = self.common_image();
        let mut img = before;
        let start = offset as usize;
        let end = (start + data.len()).min(img.len());
        if start >= end {
            return;
        }
        img[start..end].copy_from_slice(&data[..end - start]);
        let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |b: &[u8], o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let touched = |o: usize, len: usize| start < o + len && o < end;
        if touched(0x00, 4) {
            self.device_feature_select = u32_at(&img, 0x00);
        }
        if touched(0x08, 4) {
            self.driver_feature_select = u32_at(&img, 0x08);
        }
        if touched(0x0c, 4) {
            let v = u64::from(u32_at(&img, 0x0c));
            match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                _ => {}
            }
        }
        if touched(0x10, 2) {
            self.config_vector = self.valid_vector(u16_at(&img, 0x10));
        }
        if touched(0x16, 2) {
            self.queue_select = u16_at(&img, 0x16);
        }
        if let Some(q) = self.selected() {
            // Queue registers are read-only while the queue runs (except enable).
            let running = self.queues[q].running;
            if touched(0x18, 2) && !running {
                self.queues[q].size = u16_at(&img, 0x18);
            }
            if touched(0x1a, 2) {
                let v = self.valid_vector(u16_at(&img, 0x1a));
                self.queues[q].vector = v;
                self.router.lock().vectors[q] = v;
                self.router.device.set_queue_call(q, self.router.call_fd(q));
            }
            if touched(0x20, 8) && !running {
                self.queues[q].desc = u64_at(&img, 0x20);
            }
            if touched(0x28, 8) && !running {
                self.queues[q].driver = u64_at(&img, 0x28);
            }
            if touched(0x30, 8) && !running {
                self.queues[q].device = u64_at(&img, 0x30);
            }
            if touched(0x1c, 2) && u16_at(&img, 0x1c) == 1 && !self.queues[q].enabled {
                self.queues[q].enabled = true;
                if self.status & status::DRIVER_OK != 0 {
                    self.start_queue(q);
                }
            }
        }
        // Status last: a write that sets queue registers and status together sees them.
        if touched(0x14, 1) && img[0x14] != before[0x14] {
            self.set_status(img[0x14]);
        } else if touched(0x14, 1) && img[0x14] == 0 {
            self.set_status(0);
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.queues.len() as u16 + 1 {
            v
        } else {
            NO_VECTOR
        }
    }

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
                // Reading the ISR clears it and lowers INTx (4.1.4.5).
                data[0] = self.router.isr.swap(0, Ordering::SeqCst);
                self.irqs.set_intx_level(false);
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
            let q = ((offset - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)) as usize;
            match self.kicks.get(q) {
                Some(k) if self.queues[q].running => {
                    let _ = k.write(1);
                }
                Some(_) => {} // not started: the kick is meaningless
                None => warn!("{}: notify for queue {q}, which does not exist", self.name),
            }
        } else {
            return Err(AccessError::Unsupported {
                region,
                offset,
                len: data.len(),
            });
        }
        Ok(())
    }

    fn msix_read(&self, offset: u64, data: &mut [u8]) {
        let m = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        if offset >= PBA_OFFSET {
            m.read_pba(offset - PBA_OFFSET, data);
        } else {
            m.read_table(offset, data);
        }
    }

    fn msix_write(&self, offset: u64, data: &[u8]) {
        let mut m = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        if offset >= PBA_OFFSET {
            m.write_pba(offset - PBA_OFFSET, data);
        } else {
            m.write_table(offset, data);
        }
    }

    /// The PCI_CFG access capability's window fields live in the device, not in the
    /// read-only vendor payload.
    fn pci_cfg_overlay_read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(cap) = self.pci_cfg_cap.map(u64::from) else {
            return;
        };
        let (bar, off, length) = self.pci_cfg_window;
        let mut window = [0u8; 20];
        self.config.read(cap, &mut window);
        window[4] = bar;
        window[8..12].copy_from_slice(&off.to_le_bytes());
        window[12..16].copy_from_slice(&length.to_le_bytes());
        let end = offset + data.len() as u64;
        if end <= cap + 16 || offset >= cap + 20 {
            // Only the header fields may be touched; overlay them.
            for (i, b) in data.iter_mut().enumerate() {
                let o = offset + i as u64;
                if o >= cap && o < cap + 16 {
                    *b = window[(o - cap) as usize];
                }
            }
            return;
        }
        // pci_cfg_data read: perform the BAR read the window describes.
        let mut val = [0u8; 4];
        if let Ok(len @ (1 | 2 | 4)) = usize::try_from(length) {
            let mut tmp = vec![0u8; len];
            if self.bar_read(bar, u64::from(off), &mut tmp).is_ok() {
                val[..len].copy_from_slice(&tmp);
            }
        }
        window[16..20].copy_from_slice(&val);
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset + i as u64;
            if o >= cap && o < cap + 20 {
                *b = window[(o - cap) as usize];
            }
        }
    }

    fn pci_cfg_overlay_write(&mut self, offset: u64, data: &[u8]) -> bool {
        let Some(cap) = self.pci_cfg_cap.map(u64::from) else {
            return false;
        };
        let end = offset + data.len() as u64;
        if end <= cap || offset >= cap + 20 {
            return false;
        }
        let (mut bar, mut off, mut length) = self.pci_cfg_window;
        let mut hdr = [0u8; 16];
        hdr[4] = bar;
        hdr[8..12].copy_from_slice(&off.to_le_bytes());
        hdr[12..16].copy_from_slice(&length.to_le_bytes());
        let mut val = [0u8; 4];
        let mut data_touched = false;
        for (i, &b) in data.iter().enumerate() {
            let o = offset + i as u64;
            if o >= cap + 16 && o < cap + 20 {
                val[(o - cap - 16) as usize] = b;
                data_touched = true;
            } else if o >= cap && o < cap + 16 {
                hdr[(o - cap) as usize] = b;
            }
        }
        bar = hdr[4];
        off = u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
        length = u32::from_le_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]);
        self.pci_cfg_window = (bar, off, length);
        if data_touched {
            if let Ok(len @ (1 | 2 | 4)) = usize::try_from(length) {
                let _ = self.bar_write(bar, u64::from(off), &val[..len]);
            }
        }
        true
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

fn notify_memfd() -> io::Result<File> {
    let name = std::ffi::CString::new("unidev-virtio-notify").map_err(io::Error::other)?;
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nobody else.
    let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(VIRTIO_BAR_SIZE)?;
    Ok(f)
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
                mmap: self.notify_mem.as_ref().map(|f| RegionMmap {
                    file: f.clone(),
                    file_offset: 0,
                    areas: vec![SparseArea {
                        offset: NOTIFY,
                        size: PAGE,
                    }],
                }),
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
                let isr_pending = self.router.isr.load(Ordering::SeqCst) != 0;
                let msix_on = self.router.lock().msix_enabled;
                self.config.set_intx_status(isr_pending && !msix_on);
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
        self.msix.lock().unwrap_or_else(|e| e.into_inner()).reset();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// A VirtioDevice that records what the transport asked of it.
    #[derive(Default)]
    struct Recorder {
        log: StdMutex<Vec<String>>,
        kicks: StdMutex<Vec<Option<EventFd>>>,
        calls: StdMutex<Vec<Option<EventFd>>>,
        fail_start: bool,
    }

    impl Recorder {
        fn events(&self) -> Vec<String> {
            self.log.lock().unwrap().clone()
        }
        fn push(&self, s: String) {
            self.log.lock().unwrap().push(s);
        }
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            2
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn max_queue_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            (1 << 29) | (1 << 6)
        }
        fn read_config(&self, offset: u32, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as usize + i) as u8;
            }
        }
        fn write_config(&self, offset: u32, data: &[u8]) {
            self.push(format!("config {offset} {data:?}"));
        }
        fn set_driver_features(&self, features: u64) {
            self.push(format!("features {features:#x}"));
        }
        fn start_queue(
            &self,
            index: usize,
            c: QueueConfig,
        ) -> Result<(), super::super::QueueError> {
            if self.fail_start {
                return Err(super::super::QueueError::BadRings(index));
            }
            self.push(format!(
                "start {index} size {} {:#x} {:#x} {:#x}",
                c.size, c.desc, c.avail, c.used
            ));
            let mut k = self.kicks.lock().unwrap();
            k.resize_with(2, || None);
            k[index] = Some(c.kick);
            Ok(())
        }
        fn set_queue_call(&self, index: usize, call: Option<EventFd>) {
            let mut c = self.calls.lock().unwrap();
            c.resize_with(2, || None);
            c[index] = call;
        }
        fn stop_queue(&self, index: usize) -> Option<u16> {
            self.push(format!("stop {index}"));
            Some(0)
        }
        fn reset(&self) {
            self.push("reset".into());
        }
    }

    fn make(fail_start: bool) -> (VirtioPci, Arc<Recorder>) {
        let rec = Arc::new(Recorder {
            fail_start,
            ..Recorder::default()
        });
        let pci = VirtioPci::new(
            "test",
            rec.clone(),
            Arc::new(DmaSpace::default()),
            VirtioPciOptions::default(),
        )
        .unwrap();
        (pci, rec)
    }

    const BAR: PciRegion = PciRegion::Bar(VIRTIO_BAR);

    fn w8(p: &mut VirtioPci, off: u64, v: u8) {
        p.write(BAR, off, &[v]).unwrap();
    }
    fn w16(p: &mut VirtioPci, off: u64, v: u16) {
        p.write(BAR, off, &v.to_le_bytes()).unwrap();
    }
    fn w32(p: &mut VirtioPci, off: u64, v: u32) {
        p.write(BAR, off, &v.to_le_bytes()).unwrap();
    }
    fn r8(p: &mut VirtioPci, off: u64) -> u8 {
        let mut b = [0u8; 1];
        p.read(BAR, off, &mut b).unwrap();
        b[0]
    }
    fn r16(p: &mut VirtioPci, off: u64) -> u16 {
        let mut b = [0u8; 2];
        p.read(BAR, off, &mut b).unwrap();
        u16::from_le_bytes(b)
    }
    fn r32(p: &mut VirtioPci, off: u64) -> u32 {
        let mut b = [0u8; 4];
        p.read(BAR, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn negotiate(p: &mut VirtioPci, high: u32) {
        w8(p, 0x14, status::ACKNOWLEDGE | status::DRIVER);
        w32(p, 0x08, 1);
        w32(p, 0x0c, high);
        w8(
            p,
            0x14,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn identity_and_capabilities() {
        let (mut p, _) = make(false);
        let mut id = [0u8; 4];
        p.read(PciRegion::Config, 0, &mut id).unwrap();
        assert_eq!(
            id,
            [0xf4, 0x1a, 0x42, 0x10],
            "1af4:1042 is a modern virtio-blk"
        );
        for t in [CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG] {
            let off = find_vendor_cap(&p.config, t).expect("vendor cap present");
            let mut cap = [0u8; 16];
            p.read(PciRegion::Config, u64::from(off), &mut cap).unwrap();
            if t != CAP_PCI_CFG {
                assert_eq!(cap[4], VIRTIO_BAR);
            }
        }
        assert!(p.config.find_capability(Capability::ID_MSIX).is_some());
        assert_eq!(
            p.region_info(PciRegion::Bar(VIRTIO_BAR)).size,
            VIRTIO_BAR_SIZE
        );
        assert!(p.region_info(PciRegion::Bar(VIRTIO_BAR)).mmap.is_none());
        assert_eq!(p.region_info(PciRegion::Bar(0)).size, 0);
    }

    #[test]
    fn features_need_version_1_and_a_subset() {
        let (mut p, rec) = make(false);
        // Offered: EVENT_IDX and bit 6, plus VERSION_1.
        w32(&mut p, 0x00, 0);
        assert_eq!(r32(&mut p, 0x04), (1 << 29) | (1 << 6));
        w32(&mut p, 0x00, 1);
        assert_eq!(r32(&mut p, 0x04), 1);
        // Without VERSION_1: FEATURES_OK does not stick.
        negotiate(&mut p, 0);
        assert_eq!(r8(&mut p, 0x14) & status::FEATURES_OK, 0);
        // Reset, then accept properly.
        w8(&mut p, 0x14, 0);
        assert_eq!(r8(&mut p, 0x14), 0);
        w32(&mut p, 0x08, 0);
        w32(&mut p, 0x0c, 1 << 29);
        negotiate(&mut p, 1);
        assert_ne!(r8(&mut p, 0x14) & status::FEATURES_OK, 0);
        assert!(rec
            .events()
            .contains(&format!("features {:#x}", (1u64 << 32) | (1 << 29))));
        // A feature the device does not offer is refused.
        w8(&mut p, 0x14, 0);
        w32(&mut p, 0x08, 0);
        w32(&mut p, 0x0c, 1 << 3);
        negotiate(&mut p, 1);
        assert_eq!(r8(&mut p, 0x14) & status::FEATURES_OK, 0);
    }

    #[test]
    fn queues_start_at_driver_ok_and_notify_kicks() {
        let (mut p, rec) = make(false);
        negotiate(&mut p, 1);
        assert_eq!(r16(&mut p, 0x12), 2, "num_queues");
        w16(&mut p, 0x16, 5);
        assert_eq!(
            r16(&mut p, 0x18),
            0,
            "a queue that does not exist has size 0"
        );
        w16(&mut p, 0x16, 1);
        assert_eq!(r16(&mut p, 0x18), 256);
        w16(&mut p, 0x18, 64);
        w32(&mut p, 0x20, 0x1000);
        w32(&mut p, 0x24, 0x1);
        w32(&mut p, 0x28, 0x2000);
        w32(&mut p, 0x30, 0x3000);
        w16(&mut p, 0x1a, 2);
        assert_eq!(r16(&mut p, 0x1a), 2);
        w16(&mut p, 0x1a, 99);
        assert_eq!(
            r16(&mut p, 0x1a),
            NO_VECTOR,
            "an impossible vector reads NO_VECTOR"
        );
        w16(&mut p, 0x1c, 1);
        assert!(
            !rec.events().iter().any(|e| e.starts_with("start")),
            "not before DRIVER_OK"
        );
        w8(
            &mut p,
            0x14,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(rec
            .events()
            .contains(&"start 1 size 64 0x100001000 0x2000 0x3000".to_string()));
        // Notify for queue 1 at notify offset 1 * multiplier.
        p.write(BAR, NOTIFY + 4, &1u16.to_le_bytes()).unwrap();
        let kick = rec.kicks.lock().unwrap()[1]
            .as_ref()
            .unwrap()
            .read()
            .unwrap();
        assert_eq!(kick, 1);
        // Queue 0 was never enabled: its notify is ignored, not an error.
        p.write(BAR, NOTIFY, &0u16.to_le_bytes()).unwrap();
        // Device reset stops everything and clears registers.
        w8(&mut p, 0x14, 0);
        assert!(rec.events().contains(&"reset".to_string()));
        w16(&mut p, 0x16, 1);
        assert_eq!(r16(&mut p, 0x1c), 0);
    }

    #[test]
    fn a_queue_that_cannot_start_sets_needs_reset() {
        let (mut p, _) = make(true);
        negotiate(&mut p, 1);
        w16(&mut p, 0x16, 0);
        w16(&mut p, 0x1c, 1);
        w8(&mut p, 0x14, 0x0f);
        assert_ne!(r8(&mut p, 0x14) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn device_config_and_pci_cfg_window() {
        let (mut p, rec) = make(false);
        assert_eq!(r32(&mut p, DEVICE + 4), u32::from_le_bytes([4, 5, 6, 7]));
        p.write(BAR, DEVICE + 8, &[9]).unwrap();
        assert!(rec.events().contains(&"config 8 [9]".to_string()));
        // Read num_queues (common cfg 0x12) through the PCI_CFG window.
        let cap = u64::from(p.pci_cfg_cap.unwrap());
        p.write(PciRegion::Config, cap + 4, &[VIRTIO_BAR]).unwrap();
        p.write(PciRegion::Config, cap + 8, &0x12u32.to_le_bytes())
            .unwrap();
        p.write(PciRegion::Config, cap + 12, &2u32.to_le_bytes())
            .unwrap();
        let mut v = [0u8; 2];
        p.read(PciRegion::Config, cap + 16, &mut v).unwrap();
        assert_eq!(u16::from_le_bytes(v), 2);
        // An access that straddles two structures is refused, not misrouted.
        assert!(p.read(BAR, ISR - 2, &mut [0u8; 4]).is_err());
        assert!(p.read(BAR, VIRTIO_BAR_SIZE - 2, &mut [0u8; 4]).is_err());
    }

    #[test]
    fn isr_read_clears_and_lowers_intx() {
        let (mut p, _) = make(false);
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        p.irqs
            .set_eventfds(IrqKind::Intx, 0, vec![Some(efd.try_clone().unwrap())])
            .unwrap();
        // MSI-X is off: a queue completion goes through the relay to ISR + INTx (its
        // thread starts with the first queue; start it as a running queue would).
        p.ensure_relay().unwrap();
        p.router.relay_fds[0].write(1).unwrap();
        let mut waited = 0;
        while p.router.isr.load(Ordering::SeqCst) == 0 && waited < 200 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            waited += 1;
        }
        assert_eq!(efd.read().unwrap(), 1, "INTx fired");
        assert_eq!(r8(&mut p, ISR), 1);
        assert_eq!(r8(&mut p, ISR), 0, "reading clears");
        assert!(!p.irqs.intx_level());
    }

    #[test]
    fn dropping_the_function_releases_the_virtio_device() {
        let (p, rec) = make(false);
        assert!(Arc::strong_count(&rec) > 1);
        drop(p);
        assert_eq!(
            Arc::strong_count(&rec),
            1,
            "no reference cycle keeps the device alive"
        );
    }

    #[test]
    fn with_msix_enabled_the_vector_eventfd_is_the_call_fd() {
        let (mut p, rec) = make(false);
        let msix = u64::from(p.config.find_capability(Capability::ID_MSIX).unwrap());
        p.write(PciRegion::Config, msix + 3, &[0x80]).unwrap(); // MSI-X enable
        w16(&mut p, 0x16, 0);
        w16(&mut p, 0x1a, 1);
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        p.irqs
            .set_eventfds(IrqKind::Msix, 1, vec![Some(efd.try_clone().unwrap())])
            .unwrap();
        let call = rec.calls.lock().unwrap()[0]
            .as_ref()
            .unwrap()
            .try_clone()
            .unwrap();
        call.write(1).unwrap();
        assert_eq!(
            efd.read().unwrap(),
            1,
            "the backend's signal reached the vector's eventfd directly"
        );
    }
}
