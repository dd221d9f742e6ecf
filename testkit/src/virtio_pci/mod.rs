//! An in-process virtio-pci driver on top of the vfio-user client
//! ([`VfioUserClient`]): drive any virtio-pci device exported over vfio-user without a
//! VMM (virtio 1.2, section 4.1 "Virtio Over PCI Bus", modern interface only; split
//! virtqueues, section 2.7).
//!
//! What it does, in the order a driver does it:
//!
//! 1. **Probe** ([`VirtioPciDriver::attach`]): reads PCI config space (region 7), walks the
//!    capability list ([`walk_capabilities`], testable through [`ConfigSource`]) for the
//!    virtio vendor capabilities (common, notify, ISR, device, PCI_CFG) and MSI-X, checks
//!    every structure against the size of the BAR it names, and enables memory space and
//!    bus mastering in the command register.
//! 2. **Memory** ([`DriverMemory`]): one memfd mapped here and DMA_MAPped to the device,
//!    with its fd or without (then the client serves the device's DMA_READ/DMA_WRITE).
//! 3. **Interrupts**: one eventfd per MSI-X vector (vector 0 for configuration changes,
//!    vector `i + 1` for queue `i`), attached with SET_IRQS; the MSI-X table entries are
//!    programmed and unmasked and MSI-X is enabled in the capability's message control.
//! 4. **Initialization** ([`VirtioPciDriver::init`], spec 3.1.1): reset, ACKNOWLEDGE,
//!    DRIVER, feature negotiation ([`options`]), FEATURES_OK (checked), per-queue set-up,
//!    DRIVER_OK. [`reset`](VirtioPciDriver::reset) and a later `init` re-initialize on
//!    the same connection.
//! 5. **Queues** ([`Virtqueue`]): split rings with a shadow free list, EVENT_IDX or flag
//!    based notification suppression in both directions, and checks of everything the
//!    device writes into the used ring.
//!
//! Notifications are REGION_WRITEs of the queue index at the queue's notify address:
//! posted (No_reply, as QEMU does for MMIO BARs), acknowledged, or stored straight into
//! the notify area when the device makes it mappable ([`NotifyMode`]).
//!
//! The device is as untrusted as any client: every offset and length read from config
//! space or the rings is checked, and surprises become [`DriverError`]s, never panics.
//! [`VirtioPciDriver::blk_request`] (in [`crate::virtio_blk`]) runs one virtio-blk
//! request to completion.

pub mod options;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use log::debug;
use unidev_transports::vfio_user::codec::{
    REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
use unidev_transports::vfio_user::VfioUserClient;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::capabilities::{
    cfg_u16, walk_capabilities, ConfigSource, PciCaps, VirtioCap, CONFIG_REGION, PCI_CONFIG_SIZE,
};
use crate::error::{mem_err, DriverError, DriverResult};
use crate::memory::{DriverMemory, PAGE_SIZE};
use crate::virtqueue::Virtqueue;
pub use options::{
    choose_queue_size, negotiate_features, DriverOptions, NotifyMode, UNSUPPORTED_FEATURES,
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

/// vfio-user irq index of MSI-X.
pub const MSIX_IRQ_INDEX: u32 = 2;
/// PCI command register.
const PCI_COMMAND: u16 = 0x04;
/// Command: memory space enable.
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master enable.
const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// MSI-X message control: MSI-X enable.
const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// MSI-X message control: function mask.
const MSIX_CONTROL_MASKALL: u16 = 1 << 14;
/// Bytes per MSI-X table entry.
const MSIX_ENTRY_SIZE: u64 = 16;
/// Message address programmed into MSI-X entries (the x86 interrupt window; the device
/// only keeps it, delivery goes through the eventfds).
const MSIX_MESSAGE_ADDRESS: u32 = 0xfee0_0000;

/// "No MSI-X vector" in `config_msix_vector` / `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Device status bits (virtio 1.2 2.1), from the one home of the virtio numbers.
pub use unidev_core::virtio::spec::status;

/// Offsets in the common configuration structure (virtio 1.2 4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Smallest common configuration this driver can use (up to `queue_device`).
    pub const MIN_LEN: u64 = 0x38;
}

/// A structure in a BAR, bounds-checked.
#[derive(Clone, Copy, Debug)]
struct Window {
    bar: u8,
    offset: u64,
    length: u64,
}

impl Window {
    fn at(&self, off: u64, len: usize) -> DriverResult<u64> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.length => Ok(self.offset + off),
            _ => Err(DriverError::BadRegion {
                bar: self.bar,
                why: format!(
                    "access {off:#x}+{len} outside the {:#x}-byte structure",
                    self.length
                ),
            }),
        }
    }
}

/// A mapped piece of the notify region.
struct NotifyMap {
    /// Region offset of the first mapped byte.
    start: u64,
    map: MmapRegion,
}

/// A virtio-pci driver bound to one vfio-user connection.
pub struct VirtioPciDriver {
    client: VfioUserClient,
    opts: DriverOptions,
    caps: PciCaps,
    vendor_id: u16,
    device_id: u16,
    common: Window,
    notify: Window,
    notify_multiplier: u32,
    isr: Window,
    device_cfg: Option<Window>,
    notify_maps: Vec<NotifyMap>,
    /// Per queue: index into `notify_maps` and offset in that map.
    notify_slots: Vec<Option<(usize, usize)>>,
    memory: DriverMemory,
    irq_fds: Vec<EventFd>,
    features: u64,
    queues: Vec<Virtqueue>,
    device_queues: u16,
    initialized: bool,
}

impl std::fmt::Debug for VirtioPciDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDriver")
            .field("vendor_id", &format_args!("{:#06x}", self.vendor_id))
            .field("device_id", &format_args!("{:#06x}", self.device_id))
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues.len())
            .field("initialized", &self.initialized)
            .finish()
    }
}

fn region_window(
    client: &mut VfioUserClient,
    sizes: &mut [Option<(u32, u64)>; 6],
    what: &str,
    cap: &VirtioCap,
) -> DriverResult<Window> {
    let bar = cap.bar;
    let (flags, size) = match sizes[usize::from(bar)] {
        Some(v) => v,
        None => {
            let r = client.region_info(u32::from(bar))?;
            let v = (r.info.flags, r.info.size);
            sizes[usize::from(bar)] = Some(v);
            v
        }
    };
    let need = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE;
    if flags & need != need {
        return Err(DriverError::BadRegion {
            bar,
            why: format!("{what} structure in a BAR that is not read/write (flags {flags:#x})"),
        });
    }
    let (offset, length) = (u64::from(cap.offset), u64::from(cap.length));
    if offset + length > size {
        return Err(DriverError::BadRegion {
            bar,
            why: format!("{what} structure {offset:#x}+{length:#x} past the BAR's {size:#x} bytes"),
        });
    }
    Ok(Window {
        bar,
        offset,
        length,
    })
}

fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<()> {
    let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl VirtioPciDriver {
    /// Probe, map memory and fully initialize the device (reset to DRIVER_OK).
    pub fn new(client: VfioUserClient, opts: DriverOptions) -> DriverResult<Self> {
        let mut d = Self::attach(client, opts)?;
        d.init()?;
        Ok(d)
    }

    /// Probe the device and map driver memory, without touching the virtio status:
    /// walk the capabilities, check the structures against their BARs, enable memory
    /// space and bus mastering, create and DMA_MAP the memory. Call [`init`](Self::init)
    /// next.
    pub fn attach(mut client: VfioUserClient, opts: DriverOptions) -> DriverResult<Self> {
        let cfg = client.region_info(CONFIG_REGION)?;
        if cfg.info.size < PCI_CONFIG_SIZE as u64 {
            return Err(DriverError::BadRegion {
                bar: CONFIG_REGION as u8,
                why: format!("config space of {} bytes", cfg.info.size),
            });
        }
        let mut ids = [0u8; 4];
        client.read_config(0, &mut ids)?;
        let vendor_id = u16::from_le_bytes([ids[0], ids[1]]);
        let device_id = u16::from_le_bytes([ids[2], ids[3]]);
        let caps = walk_capabilities(&mut client)?;
        debug!("virtio-pci {vendor_id:04x}:{device_id:04x}: {caps:?}");

        let mut sizes = [None; 6];
        let c = caps
            .common
            .ok_or(DriverError::MissingCapability("common configuration"))?;
        let common = region_window(&mut client, &mut sizes, "common", &c)?;
        if common.length < common::MIN_LEN {
            return Err(DriverError::BadRegion {
                bar: common.bar,
                why: format!("common configuration of {} bytes", common.length),
            });
        }
        let n = caps
            .notify
            .ok_or(DriverError::MissingCapability("notification"))?;
        let notify = region_window(&mut client, &mut sizes, "notify", &n.cap)?;
        let i = caps.isr.ok_or(DriverError::MissingCapability("ISR"))?;
        let isr = region_window(&mut client, &mut sizes, "ISR", &i)?;
        if isr.length < 1 {
            return Err(DriverError::BadRegion {
                bar: isr.bar,
                why: "empty ISR structure".into(),
            });
        }
        let device_cfg = match caps.device {
            Some(d) => Some(region_window(&mut client, &mut sizes, "device", &d)?),
            None => None,
        };

        // Memory space and bus mastering.
        let cmd = cfg_u16(&mut client, PCI_COMMAND)?;
        let cmd = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        client.region_write(CONFIG_REGION, u64::from(PCI_COMMAND), &cmd.to_le_bytes())?;

        let memory = DriverMemory::new(opts.memory_size, opts.iova_base)?;
        if opts.map_with_fd {
            client.dma_map(
                memory.iova_base(),
                memory.size(),
                true,
                true,
                Some((memory.file().as_raw_fd(), 0)),
            )?;
        } else {
            client.set_dma_target(Box::new(memory.clone()));
            client.dma_map(memory.iova_base(), memory.size(), true, true, None)?;
        }

        Ok(VirtioPciDriver {
            client,
            opts,
            caps,
            vendor_id,
            device_id,
            common,
            notify,
            notify_multiplier: n.multiplier,
            isr,
            device_cfg,
            notify_maps: Vec::new(),
            notify_slots: Vec::new(),
            memory,
            irq_fds: Vec::new(),
            features: 0,
            queues: Vec::new(),
            device_queues: 0,
            initialized: false,
        })
    }

    /// The options in use.
    pub fn options(&self) -> &DriverOptions {
        &self.opts
    }

    /// Change the options for the next [`init`](Self::init) (memory options are fixed at
    /// [`attach`](Self::attach)).
    pub fn options_mut(&mut self) -> &mut DriverOptions {
        &mut self.opts
    }

    /// The capabilities found.
    pub fn caps(&self) -> &PciCaps {
        &self.caps
    }

    /// PCI vendor ID.
    pub fn vendor_id(&self) -> u16 {
        self.vendor_id
    }

    /// PCI device ID.
    pub fn device_id(&self) -> u16 {
        self.device_id
    }

    /// The virtio device type (modern IDs: device ID - 0x1040; transitional IDs
    /// 0x1000-0x103f are not decoded and give `None`).
    pub fn virtio_device_type(&self) -> Option<u16> {
        self.device_id.checked_sub(0x1040).filter(|&t| t < 0x40)
    }

    /// The negotiated features (valid after `init`).
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Queues the device has (`num_queues`, read at `init`).
    pub fn device_num_queues(&self) -> u16 {
        self.device_queues
    }

    /// The vfio-user client.
    pub fn client_mut(&mut self) -> &mut VfioUserClient {
        &mut self.client
    }

    /// Driver memory (allocate data buffers here).
    pub fn memory(&self) -> &DriverMemory {
        &self.memory
    }

    /// The queues set up by `init`.
    pub fn queues(&self) -> &[Virtqueue] {
        &self.queues
    }

    /// Queue `q`.
    pub fn queue(&mut self, q: u16) -> DriverResult<&mut Virtqueue> {
        self.queues
            .get_mut(usize::from(q))
            .ok_or(DriverError::NoSuchQueue(q))
    }

    // ---- common configuration access ----

    fn common_read<const N: usize>(&mut self, off: u64) -> DriverResult<[u8; N]> {
        let at = self.common.at(off, N)?;
        let mut b = [0u8; N];
        self.client
            .region_read(u32::from(self.common.bar), at, &mut b)?;
        Ok(b)
    }

    fn common_write(&mut self, off: u64, data: &[u8]) -> DriverResult<()> {
        let at = self.common.at(off, data.len())?;
        Ok(self
            .client
            .region_write(u32::from(self.common.bar), at, data)?)
    }

    fn read8(&mut self, off: u64) -> DriverResult<u8> {
        Ok(self.common_read::<1>(off)?[0])
    }

    fn read16(&mut self, off: u64) -> DriverResult<u16> {
        Ok(u16::from_le_bytes(self.common_read(off)?))
    }

    fn read32(&mut self, off: u64) -> DriverResult<u32> {
        Ok(u32::from_le_bytes(self.common_read(off)?))
    }

    fn write16(&mut self, off: u64, v: u16) -> DriverResult<()> {
        self.common_write(off, &v.to_le_bytes())
    }

    fn write32(&mut self, off: u64, v: u32) -> DriverResult<()> {
        self.common_write(off, &v.to_le_bytes())
    }

    /// 64-bit fields as two 32-bit writes, low half first (virtio 1.2 4.1.3.1).
    fn write64(&mut self, off: u64, v: u64) -> DriverResult<()> {
        self.write32(off, v as u32)?;
        self.write32(off + 4, (v >> 32) as u32)
    }

    /// The device status byte.
    pub fn device_status(&mut self) -> DriverResult<u8> {
        self.read8(common::DEVICE_STATUS)
    }

    /// Write the device status byte.
    pub fn set_device_status(&mut self, status: u8) -> DriverResult<()> {
        self.common_write(common::DEVICE_STATUS, &[status])
    }

    fn add_status(&mut self, bits: u8) -> DriverResult<u8> {
        let s = self.device_status()? | bits;
        self.set_device_status(s)?;
        Ok(s)
    }

    /// `config_generation`.
    pub fn config_generation(&mut self) -> DriverResult<u8> {
        self.read8(common::CONFIG_GENERATION)
    }

    /// Read (and thereby clear) the ISR status byte.
    pub fn read_isr(&mut self) -> DriverResult<u8> {
        let at = self.isr.at(0, 1)?;
        let mut b = [0u8; 1];
        self.client
            .region_read(u32::from(self.isr.bar), at, &mut b)?;
        Ok(b[0])
    }

    /// The features the device offers (all 64 bits).
    pub fn device_features(&mut self) -> DriverResult<u64> {
        self.write32(common::DEVICE_FEATURE_SELECT, 0)?;
        let lo = self.read32(common::DEVICE_FEATURE)?;
        self.write32(common::DEVICE_FEATURE_SELECT, 1)?;
        let hi = self.read32(common::DEVICE_FEATURE)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }

    // ---- device configuration ----

    fn device_window(&self) -> DriverResult<Window> {
        self.device_cfg
            .ok_or(DriverError::MissingCapability("device configuration"))
    }

    /// Device accesses split into naturally aligned 1/2/4-byte pieces.
    fn config_pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize)> {
        let end = offset + len as u64;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let left = end - at;
            let n = if at % 4 == 0 && left >= 4 {
                4
            } else if at % 2 == 0 && left >= 2 {
                2
            } else {
                1
            };
            let piece = (at, n);
            at += n as u64;
            Some(piece)
        })
    }

    /// Read device-specific configuration at `offset` into `buf`, retried until
    /// `config_generation` is stable around it (virtio 1.2 4.1.4.3.1). Accesses are
    /// naturally aligned pieces of at most 4 bytes.
    pub fn read_config(&mut self, offset: u32, buf: &mut [u8]) -> DriverResult<()> {
        let w = self.device_window()?;
        w.at(u64::from(offset), buf.len())?;
        for _ in 0..100 {
            let before = self.config_generation()?;
            let mut pos = 0;
            for (at, n) in Self::config_pieces(u64::from(offset), buf.len()) {
                self.client
                    .region_read(u32::from(w.bar), w.offset + at, &mut buf[pos..pos + n])?;
                pos += n;
            }
            if self.config_generation()? == before {
                return Ok(());
            }
        }
        Err(DriverError::Timeout(
            "a stable config_generation".to_string(),
        ))
    }

    /// Write device-specific configuration at `offset` (naturally aligned pieces of at
    /// most 4 bytes, acknowledged).
    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> DriverResult<()> {
        let w = self.device_window()?;
        w.at(u64::from(offset), data.len())?;
        let mut pos = 0;
        for (at, n) in Self::config_pieces(u64::from(offset), data.len()) {
            self.client
                .region_write(u32::from(w.bar), w.offset + at, &data[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    // ---- reset and initialization ----

    /// Reset the device (device_status 0, then wait until it reads 0) and drop the
    /// queues. Interrupt eventfds stay attached (and are drained).
    pub fn reset(&mut self) -> DriverResult<()> {
        self.set_device_status(0)?;
        let deadline = Instant::now() + self.opts.reset_timeout;
        loop {
            let s = self.device_status()?;
            if s == 0 {
                break;
            }
            if Instant::now() >= deadline {
                return Err(DriverError::ResetTimeout(s));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for q in self.queues.drain(..) {
            q.release();
        }
        self.notify_slots.clear();
        for fd in &self.irq_fds {
            let _ = fd.read();
        }
        self.features = 0;
        self.initialized = false;
        Ok(())
    }

    /// Initialize the device (virtio 1.2 3.1.1): reset, ACKNOWLEDGE, DRIVER, feature
    /// negotiation, FEATURES_OK, MSI-X and queue set-up, DRIVER_OK. Works again after
    /// [`reset`](Self::reset) (or on a running device: it resets first). On failure the
    /// FAILED status bit is set (best effort).
    pub fn init(&mut self) -> DriverResult<()> {
        match self.init_inner() {
            Ok(()) => Ok(()),
            Err(e) => {
                if let Ok(s) = self.device_status() {
                    let _ = self.set_device_status(s | status::FAILED);
                }
                Err(e)
            }
        }
    }

    fn init_inner(&mut self) -> DriverResult<()> {
        self.reset()?;
        self.add_status(status::ACKNOWLEDGE)?;
        self.add_status(status::DRIVER)?;

        let offered = self.device_features()?;
        let features = negotiate_features(self.opts.features, offered)?;
        self.write32(common::DRIVER_FEATURE_SELECT, 0)?;
        self.write32(common::DRIVER_FEATURE, features as u32)?;
        self.write32(common::DRIVER_FEATURE_SELECT, 1)?;
        self.write32(common::DRIVER_FEATURE, (features >> 32) as u32)?;
        self.add_status(status::FEATURES_OK)?;
        let s = self.device_status()?;
        if s & status::FEATURES_OK == 0 {
            return Err(DriverError::FeaturesRefused {
                features,
                status: s,
            });
        }
        self.features = features;
        debug!("features offered {offered:#x}, negotiated {features:#x}");

        self.device_queues = self.read16(common::NUM_QUEUES)?;
        let nq = match self.opts.num_queues {
            Some(n) if n > self.device_queues => return Err(DriverError::NoSuchQueue(n - 1)),
            Some(n) => n,
            None => self.device_queues,
        };

        if self.opts.msix {
            self.setup_msix(u32::from(nq) + 1)?;
            self.write16(common::CONFIG_MSIX_VECTOR, 0)?;
            let v = self.read16(common::CONFIG_MSIX_VECTOR)?;
            if v == VIRTIO_MSI_NO_VECTOR {
                return Err(DriverError::VectorRejected {
                    what: "config".into(),
                    vector: 0,
                });
            }
        }

        let event_idx = features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in 0..nq {
            self.setup_queue(q, event_idx)?;
        }

        self.add_status(status::DRIVER_OK)?;
        let s = self.device_status()?;
        if s & status::DEVICE_NEEDS_RESET != 0 {
            return Err(DriverError::NeedsReset(s));
        }
        self.initialized = true;
        Ok(())
    }

    fn setup_queue(&mut self, q: u16, event_idx: bool) -> DriverResult<()> {
        self.write16(common::QUEUE_SELECT, q)?;
        let max = self.read16(common::QUEUE_SIZE)?;
        let size = choose_queue_size(q, self.opts.queue_size, max)?;
        if size != max {
            self.write16(common::QUEUE_SIZE, size)?;
        }
        let notify_off = self.read16(common::QUEUE_NOTIFY_OFF)?;
        let rel = u64::from(notify_off) * u64::from(self.notify_multiplier);
        let notify_at = self.notify.at(rel, 2).map_err(|_| DriverError::BadRegion {
            bar: self.notify.bar,
            why: format!(
                "queue {q}: notify offset {notify_off} * {} outside the {}-byte notify structure",
                self.notify_multiplier, self.notify.length
            ),
        })?;
        let mut vq = Virtqueue::new(&self.memory, q, size, event_idx)?;
        vq.notify_offset = notify_at;
        let r = self.program_queue(q, &vq);
        if r.is_err() {
            vq.release();
            return r;
        }
        let slot = if self.opts.notify == NotifyMode::Mmap {
            match self.map_notify(notify_at) {
                Ok(s) => Some(s),
                Err(e) => {
                    vq.release();
                    return Err(e);
                }
            }
        } else {
            None
        };
        self.notify_slots.push(slot);
        self.queues.push(vq);
        Ok(())
    }

    fn program_queue(&mut self, q: u16, vq: &Virtqueue) -> DriverResult<()> {
        self.write64(common::QUEUE_DESC, vq.desc_iova())?;
        self.write64(common::QUEUE_DRIVER, vq.avail_iova())?;
        self.write64(common::QUEUE_DEVICE, vq.used_iova())?;
        if self.opts.msix {
            let vector = q + 1;
            self.write16(common::QUEUE_MSIX_VECTOR, vector)?;
            if self.read16(common::QUEUE_MSIX_VECTOR)? == VIRTIO_MSI_NO_VECTOR {
                return Err(DriverError::VectorRejected {
                    what: format!("queue {q}"),
                    vector,
                });
            }
        }
        self.write16(common::QUEUE_ENABLE, 1)
    }

    /// Find (or make) a mapping of the notify region covering `at..at + 2`.
    fn map_notify(&mut self, at: u64) -> DriverResult<(usize, usize)> {
        for (i, m) in self.notify_maps.iter().enumerate() {
            if at >= m.start && at + 2 <= m.start + m.map.size() as u64 {
                return Ok((i, (at - m.start) as usize));
            }
        }
        let bar = self.notify.bar;
        let r = self.client.region_info(u32::from(bar))?;
        let not = |why: String| DriverError::NotifyNotMappable(format!("BAR {bar}: {why}"));
        if r.info.flags & REGION_INFO_FLAG_MMAP == 0 {
            return Err(not("region is not mappable".into()));
        }
        let file =
            r.fd.ok_or_else(|| not("no fd with the region info".into()))?;
        let areas = r.sparse_areas.unwrap_or_else(|| vec![(0, r.info.size)]);
        let (start, size) = areas
            .into_iter()
            .find(|&(o, s)| {
                at >= o
                    && o.checked_add(s)
                        .is_some_and(|e| e <= r.info.size && at + 2 <= e)
            })
            .ok_or_else(|| not(format!("no mmap area covers notify offset {at:#x}")))?;
        let file_off = r
            .info
            .offset
            .checked_add(start)
            .filter(|o| o % PAGE_SIZE == 0)
            .ok_or_else(|| not(format!("area {start:#x} has an unaligned file offset")))?;
        let len = usize::try_from(size).map_err(|e| not(e.to_string()))?;
        let map = MmapRegion::build(
            Some(FileOffset::new(file, file_off)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|e| not(e.to_string()))?;
        self.notify_maps.push(NotifyMap { start, map });
        Ok((self.notify_maps.len() - 1, (at - start) as usize))
    }

    // ---- MSI-X ----

    fn setup_msix(&mut self, vectors: u32) -> DriverResult<()> {
        let cap = self
            .caps
            .msix
            .ok_or(DriverError::MissingCapability("MSI-X"))?;
        let irq_count = self.client.irq_info(MSIX_IRQ_INDEX)?.count;
        let available = irq_count.min(u32::from(cap.table_size));
        if vectors > available {
            return Err(DriverError::NotEnoughVectors {
                needed: vectors,
                available,
            });
        }
        if self.irq_fds.len() != vectors as usize {
            let mut fds = Vec::with_capacity(vectors as usize);
            for _ in 0..vectors {
                fds.push(EventFd::new(EFD_NONBLOCK)?);
            }
            let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
            self.client.set_irq_eventfds(MSIX_IRQ_INDEX, 0, &raw)?;
            self.irq_fds = fds;
        }
        // Program and unmask the table entries the driver uses.
        let tbar = cap.table_bar;
        if tbar > 5 {
            return Err(DriverError::BadRegion {
                bar: tbar,
                why: "MSI-X table in a reserved BAR".into(),
            });
        }
        let tsize = self.client.region_info(u32::from(tbar))?.info.size;
        let table_end = u64::from(cap.table_offset) + MSIX_ENTRY_SIZE * u64::from(cap.table_size);
        if table_end > tsize {
            return Err(DriverError::BadRegion {
                bar: tbar,
                why: format!("MSI-X table ends at {table_end:#x}, past the BAR's {tsize:#x}"),
            });
        }
        for v in 0..vectors {
            let mut e = [0u8; MSIX_ENTRY_SIZE as usize];
            e[0..4].copy_from_slice(&MSIX_MESSAGE_ADDRESS.to_le_bytes());
            e[8..12].copy_from_slice(&v.to_le_bytes());
            // e[12..16]: vector control 0 = unmasked.
            let at = u64::from(cap.table_offset) + MSIX_ENTRY_SIZE * u64::from(v);
            self.client.region_write(u32::from(tbar), at, &e)?;
        }
        let ctl_at = u16::from(cap.cap_offset) + 2;
        let ctl = cfg_u16(&mut self.client, ctl_at)?;
        let ctl = (ctl | MSIX_CONTROL_ENABLE) & !MSIX_CONTROL_MASKALL;
        self.client
            .region_write(CONFIG_REGION, u64::from(ctl_at), &ctl.to_le_bytes())?;
        Ok(())
    }

    /// The eventfd of MSI-X vector `vector` (0: configuration changes, `q + 1`: queue
    /// `q`), for callers that poll it themselves (benchmarks).
    pub fn vector_fd(&self, vector: u16) -> Option<RawFd> {
        self.irq_fds.get(usize::from(vector)).map(|f| f.as_raw_fd())
    }

    /// The eventfd of queue `q`'s vector.
    pub fn queue_irq_fd(&self, q: u16) -> Option<RawFd> {
        self.vector_fd(q.checked_add(1)?)
    }

    /// The eventfd of the configuration-change vector.
    pub fn config_irq_fd(&self) -> Option<RawFd> {
        self.vector_fd(0)
    }

    /// If the server has sent something (a DMA_READ/DMA_WRITE, with memory mapped
    /// without an fd), serve it now. Needed when polling the rings without waiting
    /// through this driver: the device may be blocked on such a request.
    pub fn service_dma(&mut self) -> DriverResult<()> {
        let mut p = [libc::pollfd {
            fd: self.client.socket_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        poll_fds(&mut p, Duration::ZERO)?;
        if p[0].revents != 0 {
            // Any acknowledged call serves the requests that arrive before its reply.
            self.config_generation()?;
        }
        Ok(())
    }

    fn wait_vector(&mut self, vector: u16, timeout: Duration) -> DriverResult<()> {
        let deadline = Instant::now() + timeout;
        let Some(efd) = self.irq_fds.get(usize::from(vector)) else {
            return Err(DriverError::NoInterrupts);
        };
        let efd_raw = efd.as_raw_fd();
        loop {
            if self.irq_fds[usize::from(vector)].read().is_ok() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DriverError::Timeout(format!("MSI-X vector {vector}")));
            }
            let mut p = [
                libc::pollfd {
                    fd: efd_raw,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.client.socket_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let n = if self.opts.map_with_fd { 1 } else { 2 };
            poll_fds(&mut p[..n], deadline - now)?;
            if n == 2 && p[1].revents != 0 {
                self.config_generation()?;
            }
        }
    }

    /// Wait until queue `q`'s MSI-X vector fires (poll(2) on its eventfd, which is then
    /// cleared). With memory mapped without an fd, the device's DMA requests are served
    /// meanwhile.
    pub fn wait_queue_irq(&mut self, q: u16, timeout: Duration) -> DriverResult<()> {
        if usize::from(q) >= self.queues.len() {
            return Err(DriverError::NoSuchQueue(q));
        }
        self.wait_vector(q + 1, timeout)
    }

    /// Wait for the configuration-change vector.
    pub fn wait_config_irq(&mut self, timeout: Duration) -> DriverResult<()> {
        self.wait_vector(0, timeout)
    }

    // ---- data path ----

    /// Put a chain on queue `q` (see [`Virtqueue::add_chain`]).
    pub fn add_chain(&mut self, q: u16, chain: &[(u64, u32, bool)]) -> DriverResult<u16> {
        self.queue(q)?.add_chain(chain)
    }

    /// Take a used chain from queue `q` (see [`Virtqueue::poll_used`]).
    pub fn poll_used(&mut self, q: u16) -> DriverResult<Option<(u16, u32)>> {
        self.queue(q)?.poll_used()
    }

    /// Notify the device about queue `q` if it wants to be (see
    /// [`Virtqueue::kick_prepare`]); returns whether a notification was sent.
    pub fn kick(&mut self, q: u16) -> DriverResult<bool> {
        if !self.queue(q)?.kick_prepare()? {
            return Ok(false);
        }
        self.notify(q)?;
        Ok(true)
    }

    /// Send queue `q`'s notification unconditionally.
    pub fn notify(&mut self, q: u16) -> DriverResult<()> {
        let at = self.queue(q)?.notify_offset;
        let value = q.to_le_bytes();
        let bar = u32::from(self.notify.bar);
        match self.opts.notify {
            NotifyMode::Posted => self.client.region_write_posted(bar, at, &value)?,
            NotifyMode::Acknowledged => self.client.region_write(bar, at, &value)?,
            NotifyMode::Mmap => {
                let (m, off) = self
                    .notify_slots
                    .get(usize::from(q))
                    .copied()
                    .flatten()
                    .ok_or(DriverError::NotInitialized)?;
                fence(Ordering::SeqCst);
                self.notify_maps[m]
                    .map
                    .as_volatile_slice()
                    .store(q.to_le(), off, Ordering::Release)
                    .map_err(mem_err)?;
            }
        }
        Ok(())
    }

    /// Wait up to `timeout` for a used chain on queue `q`: polls the ring, re-arms
    /// interrupts and sleeps on the queue's vector (or spins without MSI-X).
    pub fn wait_used(&mut self, q: u16, timeout: Duration) -> DriverResult<(u16, u32)> {
        let deadline = Instant::now() + timeout;
        let use_irq = !self.irq_fds.is_empty();
        loop {
            if let Some(u) = self.poll_used(q)? {
                return Ok(u);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DriverError::Timeout(format!("a used buffer on queue {q}")));
            }
            if use_irq {
                if self.queue(q)?.enable_interrupts()? {
                    continue;
                }
                match self.wait_queue_irq(q, deadline - now) {
                    Ok(()) | Err(DriverError::Timeout(_)) => {}
                    Err(e) => return Err(e),
                }
            } else {
                if !self.opts.map_with_fd {
                    self.service_dma()?;
                }
                std::thread::yield_now();
            }
        }
    }

    /// Reset the device, withdraw driver memory from it and give the client back.
    pub fn shutdown(mut self) -> DriverResult<VfioUserClient> {
        self.reset()?;
        self.client
            .dma_unmap(self.memory.iova_base(), self.memory.size())?;
        Ok(self.client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_pieces_are_naturally_aligned() {
        let p: Vec<_> = VirtioPciDriver::config_pieces(1, 9).collect();
        assert_eq!(p, vec![(1, 1), (2, 2), (4, 4), (8, 2)]);
        let p: Vec<_> = VirtioPciDriver::config_pieces(0, 8).collect();
        assert_eq!(p, vec![(0, 4), (4, 4)]);
        assert_eq!(VirtioPciDriver::config_pieces(3, 0).count(), 0);
    }
}
