//! PCI devices: the contract between a full PCI function and any PCI transport, plus the
//! pieces every function needs — a type-0 configuration space with real register
//! semantics ([`config`]), a capability builder, BARs, and MSI-X table/PBA emulation
//! ([`msix`]).
//!
//! Implements the PCI Local Bus Specification 3.0 (chapter 6, configuration space), the
//! PCI Power Management 1.2 capability, MSI/MSI-X (PCI 3.0 section 6.8), and the PCI
//! Express capability structure (PCIe base 4.0, 7.5.3). Knows no wire protocol: a
//! transport (vfio-user today) maps its region indices onto [`PciRegion`] and its
//! messages onto [`PciDevice`] calls.

pub mod config;
pub mod msix;

use std::fs::File;
use std::sync::Arc;

use crate::irq::{Interrupts, IrqLayout};
use crate::memory::DmaSpace;

pub use config::{
    Bar, BarKind, Capability, ConfigError, ConfigSpace, ConfigSpaceBuilder, ConfigWrite, MsiState,
};
pub use msix::{Msix, MsixEntry};

/// A region of a PCI function, as a transport addresses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PciRegion {
    /// Base address register 0..=5.
    Bar(u8),
    /// Expansion ROM.
    Rom,
    /// Configuration space.
    Config,
    /// Legacy VGA ranges.
    Vga,
}

/// A part of a region the client may `mmap` instead of trapping accesses (VFIO's sparse
/// mmap areas). Offsets are relative to the start of the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SparseArea {
    /// Start within the region.
    pub offset: u64,
    /// Length.
    pub size: u64,
}

/// The memory a client may map for a region: `file` at `file_offset` holds the region's
/// first byte; only `areas` may be mapped.
#[derive(Clone, Debug)]
pub struct RegionMmap {
    /// The backing file (a memfd, usually), shared with every client.
    pub file: Arc<File>,
    /// Offset of the region's byte 0 in `file`.
    pub file_offset: u64,
    /// The mappable parts.
    pub areas: Vec<SparseArea>,
}

/// What a transport needs to describe a region to its client.
#[derive(Clone, Debug, Default)]
pub struct RegionInfo {
    /// Size in bytes; 0 means the region does not exist.
    pub size: u64,
    /// Reads are allowed.
    pub read: bool,
    /// Writes are allowed.
    pub write: bool,
    /// Mappable parts, if any.
    pub mmap: Option<RegionMmap>,
}

impl RegionInfo {
    /// A readable and writable, trapped region of `size` bytes.
    pub fn read_write(size: u64) -> Self {
        RegionInfo {
            size,
            read: true,
            write: true,
            mmap: None,
        }
    }

    /// A region that does not exist.
    pub fn absent() -> Self {
        RegionInfo::default()
    }
}

/// Why a region access failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccessError {
    /// The region does not exist, or does not allow this direction.
    #[error("region {0:?} does not allow this access")]
    NotPermitted(PciRegion),
    /// The access runs past the end of the region (or wraps).
    #[error("access {offset:#x}+{len} is past the end of region {region:?} ({size:#x} bytes)")]
    OutOfRange {
        /// The region.
        region: PciRegion,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Size of the region.
        size: u64,
    },
    /// The device does not support an access of this size or alignment here.
    #[error("unsupported {len}-byte access at {offset:#x} of region {region:?}")]
    Unsupported {
        /// The region.
        region: PciRegion,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
    },
    /// The device failed the access for its own reason.
    #[error("device error: {0}")]
    Device(String),
}

impl AccessError {
    /// The errno a transport reports.
    pub fn errno(&self) -> i32 {
        match self {
            AccessError::NotPermitted(_) => libc::EINVAL,
            AccessError::OutOfRange { .. } => libc::EINVAL,
            AccessError::Unsupported { .. } => libc::EINVAL,
            AccessError::Device(_) => libc::EIO,
        }
    }
}

/// Check that `offset..offset+len` lies inside a region of `info.size` bytes and that the
/// region allows the access. Transports call this before [`PciDevice::read`]/`write`, so
/// devices only ever see in-range accesses.
pub fn check_access(
    region: PciRegion,
    info: &RegionInfo,
    offset: u64,
    len: usize,
    write: bool,
) -> Result<(), AccessError> {
    let allowed = if write { info.write } else { info.read };
    if info.size == 0 || !allowed {
        return Err(AccessError::NotPermitted(region));
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= info.size => Ok(()),
        _ => Err(AccessError::OutOfRange {
            region,
            offset,
            len,
            size: info.size,
        }),
    }
}

/// A device shared between its transport session and its owner (who may, for example,
/// change a GPIO card's inputs while a client is attached).
pub type SharedPciDevice = Arc<std::sync::Mutex<dyn PciDevice>>;

/// The contract between a PCI function and a PCI transport.
///
/// A device owns its state (config space, registers, MSI-X table); it raises interrupts
/// through the [`crate::irq::Interrupts`] and reaches client memory through the
/// [`crate::memory::DmaSpace`] it was built with. The transport holds only session
/// state, so a client that reconnects finds the device as it left it.
///
/// What a transport guarantees: every [`read`](PciDevice::read) and
/// [`write`](PciDevice::write) lies inside the region as [`region_info`](PciDevice::region_info)
/// describes it and is allowed by its permissions ([`check_access`]); calls come from one
/// thread at a time (the device sits behind a `Mutex`, [`SharedPciDevice`]); nothing else
/// about the client is trusted, and an access a device refuses becomes a protocol error
/// ([`AccessError::errno`]), never a crash. Regions are numbered as VFIO numbers them:
/// BARs 0–5 are regions 0–5, the ROM 6, config space 7, VGA 8.
///
/// The transports layer's one-call export serves a device; the repository's
/// `examples/pci_timer.rs` is a complete one (registers, a timer interrupt, DMA).
///
/// # Example
///
/// A function with one 32-bit register in BAR 0 that raises INTx when written, driven
/// here by hand the way a transport drives it:
///
/// ```
/// use std::sync::Arc;
/// use unidev_core::irq::{Interrupts, IrqKind, IrqLayout};
/// use unidev_core::memory::DmaSpace;
/// use unidev_core::pci::{
///     check_access, AccessError, Bar, ConfigSpace, PciDevice, PciRegion, RegionInfo,
/// };
/// use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
///
/// struct Doorbell {
///     config: ConfigSpace,
///     irqs: Arc<Interrupts>,
///     dma: Arc<DmaSpace>,
///     value: [u8; 4],
/// }
///
/// impl PciDevice for Doorbell {
///     fn name(&self) -> &str {
///         "doorbell"
///     }
///     fn region_info(&self, region: PciRegion) -> RegionInfo {
///         match region {
///             PciRegion::Config => RegionInfo::read_write(self.config.size()),
///             PciRegion::Bar(0) => RegionInfo::read_write(4),
///             _ => RegionInfo::absent(),
///         }
///     }
///     fn interrupts(&self) -> &Arc<Interrupts> {
///         &self.irqs
///     }
///     fn dma(&self) -> &Arc<DmaSpace> {
///         &self.dma
///     }
///     fn read(&mut self, region: PciRegion, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
///         match region {
///             PciRegion::Config => self.config.read(offset, data),
///             _ => data.copy_from_slice(&self.value[offset as usize..][..data.len()]),
///         }
///         Ok(())
///     }
///     fn write(&mut self, region: PciRegion, offset: u64, data: &[u8]) -> Result<(), AccessError> {
///         match region {
///             PciRegion::Config => drop(self.config.write(offset, data)),
///             _ => {
///                 self.value[offset as usize..][..data.len()].copy_from_slice(data);
///                 self.irqs.set_intx_level(true); // level-triggered: high until reset
///             }
///         }
///         Ok(())
///     }
///     fn reset(&mut self) {
///         self.config.reset();
///         self.value = [0; 4];
///         self.irqs.set_intx_level(false);
///     }
/// }
///
/// let mut dev = Doorbell {
///     config: ConfigSpace::builder(0x1234, 0x0001)
///         .interrupt_pin(1)
///         .bar(0, Bar::mem32(4096))
///         .build()
///         .unwrap(),
///     irqs: Arc::new(Interrupts::new(IrqLayout::pci(true, 0, 0))),
///     dma: Arc::new(DmaSpace::default()),
///     value: [0; 4],
/// };
///
/// // What a transport does: the client attaches an eventfd to INTx...
/// let intx = EventFd::new(EFD_NONBLOCK).unwrap();
/// dev.interrupts()
///     .set_eventfds(IrqKind::Intx, 0, vec![Some(intx.try_clone().unwrap())])
///     .unwrap();
/// // ...and every access is checked against the region before the device sees it.
/// let bar0 = PciRegion::Bar(0);
/// check_access(bar0, &dev.region_info(bar0), 0, 4, true).unwrap();
/// dev.write(bar0, 0, &[1, 2, 3, 4]).unwrap();
/// assert_eq!(intx.read().unwrap(), 1, "INTx fired");
/// let mut back = [0; 4];
/// dev.read(bar0, 0, &mut back).unwrap();
/// assert_eq!(back, [1, 2, 3, 4]);
/// assert!(check_access(bar0, &dev.region_info(bar0), 2, 4, false).is_err());
/// ```
pub trait PciDevice: Send {
    /// A short name for logs ("gpio", "virtio-blk").
    fn name(&self) -> &str;

    /// Size, permissions and mappable parts of `region`.
    fn region_info(&self, region: PciRegion) -> RegionInfo;

    /// The device's interrupt lines; the transport attaches the client's eventfds here.
    fn interrupts(&self) -> &Arc<Interrupts>;

    /// The device's view of client memory; the transport records the client's DMA maps
    /// here. Usually created by the daemon (it sets the cap on maps) and handed to the
    /// device's constructor.
    fn dma(&self) -> &Arc<DmaSpace>;

    /// Interrupt lines of each kind.
    fn irq_layout(&self) -> IrqLayout {
        self.interrupts().layout()
    }

    /// Read `data.len()` bytes at `offset` of `region` (already range-checked).
    fn read(&mut self, region: PciRegion, offset: u64, data: &mut [u8]) -> Result<(), AccessError>;

    /// Write `data` at `offset` of `region` (already range-checked).
    fn write(&mut self, region: PciRegion, offset: u64, data: &[u8]) -> Result<(), AccessError>;

    /// Function-level reset: back to power-on state (config space included).
    fn reset(&mut self);

    /// Whether [`reset`](PciDevice::reset) is supported (VFIO's device reset flag).
    fn can_reset(&self) -> bool {
        true
    }

    /// The client went away. Its DMA maps and eventfds are already dropped by the core;
    /// the device keeps its state for the next client.
    fn client_detached(&mut self) {}
}
