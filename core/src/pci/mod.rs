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
/// through the [`Interrupts`](crate::irq::Interrupts) and reaches client memory through
/// the [`DmaSpace`](crate::memory::DmaSpace) it was built with. The transport holds only
/// session state, so a client that reconnects finds the device as it left it.
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
