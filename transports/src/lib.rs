//! unidev-transports: wire protocols that export the core's devices, and the one call
//! that puts a device on them.
//!
//! Each transport is a folder — a codec plus a session that translates messages into
//! calls on `unidev-core` objects, a server, and an address type implementing the serve
//! traits of [`transport`] — and holds no device state: [`vfio_user`], [`vhost_user`]
//! and [`vduse`], listed once in [`transport::TRANSPORTS`]. Device authors need only
//! [`export`]: write a device against the core's PCI contract ([`PciDevice`]) or against
//! rust-vmm's `VhostUserBackend`, and serve it by one call on an address ([`VfioUser`],
//! [`VhostUser`], [`Vduse`]).
//!
//! # The shortest path to a working device
//!
//! A PCI function with one 32-bit register in BAR 0, served over vfio-user, then read and
//! written by unidev's own vfio-user client as a VMM would:
//!
//! ```
//! use std::sync::Arc;
//! use unidev_core::irq::{Interrupts, IrqLayout};
//! use unidev_core::memory::DmaSpace;
//! use unidev_core::pci::{AccessError, Bar, ConfigSpace, PciDevice, PciRegion, RegionInfo};
//! use unidev_transports::export::{Export, ExportOptions, VfioUser};
//! use unidev_transports::vfio_user::VfioUserClient;
//!
//! struct Scratch {
//!     config: ConfigSpace,
//!     irqs: Arc<Interrupts>,
//!     dma: Arc<DmaSpace>,
//!     value: [u8; 4],
//! }
//!
//! impl PciDevice for Scratch {
//!     fn name(&self) -> &str {
//!         "scratch"
//!     }
//!     fn region_info(&self, region: PciRegion) -> RegionInfo {
//!         match region {
//!             PciRegion::Config => RegionInfo::read_write(self.config.size()),
//!             PciRegion::Bar(0) => RegionInfo::read_write(4),
//!             _ => RegionInfo::absent(),
//!         }
//!     }
//!     fn interrupts(&self) -> &Arc<Interrupts> {
//!         &self.irqs
//!     }
//!     fn dma(&self) -> &Arc<DmaSpace> {
//!         &self.dma
//!     }
//!     // Accesses arrive range-checked against `region_info`.
//!     fn read(&mut self, region: PciRegion, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
//!         match region {
//!             PciRegion::Config => self.config.read(offset, data),
//!             _ => data.copy_from_slice(&self.value[offset as usize..][..data.len()]),
//!         }
//!         Ok(())
//!     }
//!     fn write(&mut self, region: PciRegion, offset: u64, data: &[u8]) -> Result<(), AccessError> {
//!         match region {
//!             PciRegion::Config => drop(self.config.write(offset, data)),
//!             _ => self.value[offset as usize..][..data.len()].copy_from_slice(data),
//!         }
//!         Ok(())
//!     }
//!     fn reset(&mut self) {
//!         self.config.reset();
//!         self.value = [0; 4];
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Scratch {
//!     config: ConfigSpace::builder(0x1234, 0x5678).bar(0, Bar::mem32(4096)).build()?,
//!     irqs: Arc::new(Interrupts::new(IrqLayout::pci(false, 0, 0))),
//!     dma: Arc::new(DmaSpace::default()),
//!     value: [0; 4],
//! };
//! let dir = std::env::temp_dir().join(format!("unidev-doc-lib-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let sock = dir.join("scratch.sock");
//!
//! let running = Export::pci("scratch", device)
//!     .serve(VfioUser::new(&sock), &ExportOptions::default())?
//!     .spawn()?;
//!
//! // What QEMU's vfio-user-pci does: region 0 is BAR 0, region 7 config space.
//! let mut client = VfioUserClient::connect(&sock)?;
//! client.region_write(0, 0, &0xfeed_f00d_u32.to_le_bytes())?;
//! let mut value = [0; 4];
//! client.region_read(0, 0, &mut value)?;
//! assert_eq!(u32::from_le_bytes(value), 0xfeed_f00d);
//! let mut ids = [0; 4];
//! client.region_read(7, 0, &mut ids)?;
//! assert_eq!(ids, [0x34, 0x12, 0x78, 0x56]);
//! drop(client);
//!
//! running.stop()?;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! A virtio device is a `VhostUserBackend` given to [`Export::virtio`](export::Export::virtio);
//! see [`export`] for an example, and `examples/` in the repository for complete devices
//! of both kinds.
//!
//! # Stability
//! [`export`] is stable API (`docs/api-stability.md`). The transports' own modules are
//! public for tests, benchmarks and tools; their server types are stable in what
//! [`export`] uses of them ([`vfio_user::ServerConfig`], [`listener`],
//! [`vduse::VdpaDriver`]), the rest — sessions, codecs, the vfio-user client
//! ([`vfio_user::client`]) and VDUSE internals — is experimental and may change in any
//! 0.y release.
//!
//! [`PciDevice`]: unidev_core::pci::PciDevice
//! [`VfioUser`]: vfio_user::VfioUser
//! [`VhostUser`]: vhost_user::VhostUser
//! [`Vduse`]: vduse::Vduse
#![deny(missing_docs)]

pub mod daemon;
pub mod export;
pub mod listener;
mod scm_rights;
pub mod transport;
pub mod vduse;
pub mod vfio_user;
pub mod vhost_user;
