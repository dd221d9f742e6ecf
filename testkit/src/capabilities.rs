//! The probe's first step: walking a virtio-pci function's PCI capability list (PCI
//! Local Bus 3.0 section 6.7; virtio 1.2 section 4.1.4 "Virtio Structure PCI
//! Capabilities") for the virtio vendor capabilities and MSI-X.
//!
//! The walker reads config space through [`ConfigSource`], implemented for the vfio-user
//! client (region 7) and for a plain snapshot, so that it is testable without a device.
//! Config space comes from an untrusted device: pointers, lengths and loops are checked.

use log::warn;
use unidev_transports::vfio_user::VfioUserClient;

use crate::error::{DriverError, DriverResult};
use crate::le_u32;

/// vfio-user region index of PCI config space.
pub const CONFIG_REGION: u32 = 7;
/// Size of the standard PCI config space the capability list lives in.
pub const PCI_CONFIG_SIZE: usize = 256;

/// PCI status register.
const PCI_STATUS: u16 = 0x06;
/// Capabilities pointer.
const PCI_CAPABILITY_LIST: u16 = 0x34;
/// Status: a capability list is present.
const PCI_STATUS_CAP_LIST: u16 = 1 << 4;
/// First byte after the standard header, where capabilities may start.
const PCI_STD_HEADER_END: u16 = 0x40;
/// Capability ID: vendor specific.
pub const PCI_CAP_ID_VNDR: u8 = 0x09;
/// Capability ID: MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// MSI-X message control: table size minus one.
const MSIX_CONTROL_QSIZE: u16 = 0x7ff;

/// Virtio structure type: common configuration.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// Virtio structure type: notifications.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// Virtio structure type: ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// Virtio structure type: device-specific configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// Virtio structure type: PCI configuration access window.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
/// Size of `struct virtio_pci_cap`.
const VIRTIO_PCI_CAP_LEN: usize = 16;
/// Size of `struct virtio_pci_notify_cap` and `struct virtio_pci_cfg_cap`.
const VIRTIO_PCI_CAP_EXT_LEN: usize = 20;

fn bad_cap(offset: u16, why: impl Into<String>) -> DriverError {
    DriverError::BadCapability {
        offset,
        why: why.into(),
    }
}

/// Where the capability walker reads PCI config space from.
pub trait ConfigSource {
    /// Fill `buf` from config space at `offset`.
    fn read_config(&mut self, offset: u16, buf: &mut [u8]) -> DriverResult<()>;
}

impl ConfigSource for VfioUserClient {
    fn read_config(&mut self, offset: u16, buf: &mut [u8]) -> DriverResult<()> {
        Ok(self.region_read(CONFIG_REGION, u64::from(offset), buf)?)
    }
}

/// A config space snapshot; reads past its end fail.
impl ConfigSource for [u8] {
    fn read_config(&mut self, offset: u16, buf: &mut [u8]) -> DriverResult<()> {
        let start = usize::from(offset);
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(|| bad_cap(offset, "read beyond the config space snapshot"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// The little-endian 16-bit config space register at `offset`.
pub(crate) fn cfg_u16(src: &mut (impl ConfigSource + ?Sized), offset: u16) -> DriverResult<u16> {
    let mut b = [0u8; 2];
    src.read_config(offset, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

/// One virtio vendor capability (`struct virtio_pci_cap`, virtio 1.2 4.1.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    /// Config space offset of the capability.
    pub cap_offset: u8,
    /// `cfg_type`.
    pub cfg_type: u8,
    /// The BAR the structure lives in (region index).
    pub bar: u8,
    /// `id` (distinguishes several structures of one type).
    pub id: u8,
    /// Offset of the structure in the BAR.
    pub offset: u32,
    /// Length of the structure.
    pub length: u32,
}

/// The notification capability (`struct virtio_pci_notify_cap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifyCap {
    /// The structure.
    pub cap: VirtioCap,
    /// `notify_off_multiplier`.
    pub multiplier: u32,
}

/// The MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    /// Config space offset of the capability.
    pub cap_offset: u8,
    /// Message control as found.
    pub control: u16,
    /// Number of table entries (vectors).
    pub table_size: u16,
    /// BAR of the table.
    pub table_bar: u8,
    /// Offset of the table in its BAR.
    pub table_offset: u32,
    /// BAR of the pending bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR.
    pub pba_offset: u32,
}

/// What the capability walk found: the first usable capability of each kind, in list
/// order (the device's order of preference, virtio 1.2 4.1.4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PciCaps {
    /// Common configuration.
    pub common: Option<VirtioCap>,
    /// Notifications.
    pub notify: Option<NotifyCap>,
    /// ISR status.
    pub isr: Option<VirtioCap>,
    /// Device-specific configuration.
    pub device: Option<VirtioCap>,
    /// PCI configuration access window.
    pub pci_cfg: Option<VirtioCap>,
    /// MSI-X.
    pub msix: Option<MsixCap>,
    /// Config space offsets of every capability visited, with their IDs.
    pub visited: Vec<(u8, u8)>,
}

/// Walk the PCI capability list of `src` (standard 256-byte config space) and collect the
/// virtio and MSI-X capabilities. Fails on a malformed list (pointers into the header or
/// past the end, loops, capabilities running past the end); ignores vendor capabilities
/// that are too short, name a reserved BAR, or have an unknown type.
pub fn walk_capabilities(src: &mut (impl ConfigSource + ?Sized)) -> DriverResult<PciCaps> {
    let status = cfg_u16(src, PCI_STATUS)?;
    if status & PCI_STATUS_CAP_LIST == 0 {
        return Err(DriverError::NoCapabilityList);
    }
    let mut ptr_byte = [0u8; 1];
    src.read_config(PCI_CAPABILITY_LIST, &mut ptr_byte)?;
    let mut caps = PciCaps::default();
    let mut ptr = u16::from(ptr_byte[0]) & !3;
    let mut from = PCI_CAPABILITY_LIST;
    let mut seen = [false; PCI_CONFIG_SIZE / 4];
    while ptr != 0 {
        if ptr < PCI_STD_HEADER_END || usize::from(ptr) + 2 > PCI_CONFIG_SIZE {
            return Err(bad_cap(from, format!("points to {ptr:#x}")));
        }
        let slot = usize::from(ptr / 4);
        if seen[slot] {
            return Err(bad_cap(ptr, "capability list loops"));
        }
        seen[slot] = true;
        let mut hdr = [0u8; 2];
        src.read_config(ptr, &mut hdr)?;
        let (id, next) = (hdr[0], u16::from(hdr[1]) & !3);
        caps.visited.push((ptr as u8, id));
        match id {
            PCI_CAP_ID_VNDR => walk_vendor(src, ptr, &mut caps)?,
            PCI_CAP_ID_MSIX if caps.msix.is_none() => {
                if usize::from(ptr) + 12 > PCI_CONFIG_SIZE {
                    return Err(bad_cap(ptr, "MSI-X capability runs past config space"));
                }
                let mut b = [0u8; 12];
                src.read_config(ptr, &mut b)?;
                let control = u16::from_le_bytes([b[2], b[3]]);
                let table = le_u32(&b, 4);
                let pba = le_u32(&b, 8);
                caps.msix = Some(MsixCap {
                    cap_offset: ptr as u8,
                    control,
                    table_size: (control & MSIX_CONTROL_QSIZE) + 1,
                    table_bar: (table & 7) as u8,
                    table_offset: table & !7,
                    pba_bar: (pba & 7) as u8,
                    pba_offset: pba & !7,
                });
            }
            _ => {}
        }
        from = ptr + 1;
        ptr = next;
    }
    Ok(caps)
}

fn walk_vendor(
    src: &mut (impl ConfigSource + ?Sized),
    ptr: u16,
    caps: &mut PciCaps,
) -> DriverResult<()> {
    let mut lenb = [0u8; 2];
    src.read_config(ptr + 2, &mut lenb)?;
    let (cap_len, cfg_type) = (usize::from(lenb[0]), lenb[1]);
    if usize::from(ptr) + cap_len > PCI_CONFIG_SIZE {
        return Err(bad_cap(
            ptr,
            format!("cap_len {cap_len} runs past config space"),
        ));
    }
    let need = match cfg_type {
        VIRTIO_PCI_CAP_NOTIFY_CFG | VIRTIO_PCI_CAP_PCI_CFG => VIRTIO_PCI_CAP_EXT_LEN,
        VIRTIO_PCI_CAP_COMMON_CFG | VIRTIO_PCI_CAP_ISR_CFG | VIRTIO_PCI_CAP_DEVICE_CFG => {
            VIRTIO_PCI_CAP_LEN
        }
        _ => return Ok(()), // Reserved or not ours (shared memory, vendor data): ignore.
    };
    if cap_len < need {
        warn!(
            "virtio capability at {ptr:#x} (type {cfg_type}): cap_len {cap_len} < {need}; ignored"
        );
        return Ok(());
    }
    let mut b = [0u8; VIRTIO_PCI_CAP_EXT_LEN];
    src.read_config(ptr, &mut b[..need])?;
    let cap = VirtioCap {
        cap_offset: ptr as u8,
        cfg_type,
        bar: b[4],
        id: b[5],
        offset: le_u32(&b, 8),
        length: le_u32(&b, 12),
    };
    if cfg_type != VIRTIO_PCI_CAP_PCI_CFG && cap.bar > 5 {
        warn!(
            "virtio capability at {ptr:#x}: reserved BAR {}; ignored",
            cap.bar
        );
        return Ok(());
    }
    match cfg_type {
        VIRTIO_PCI_CAP_COMMON_CFG => {
            caps.common.get_or_insert(cap);
        }
        VIRTIO_PCI_CAP_NOTIFY_CFG => {
            caps.notify.get_or_insert(NotifyCap {
                cap,
                multiplier: le_u32(&b, 16),
            });
        }
        VIRTIO_PCI_CAP_ISR_CFG => {
            caps.isr.get_or_insert(cap);
        }
        VIRTIO_PCI_CAP_DEVICE_CFG => {
            caps.device.get_or_insert(cap);
        }
        _ => {
            caps.pci_cfg.get_or_insert(cap);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config space that records every read and fails reads past 256 bytes.
    struct MockConfig {
        bytes: [u8; 256],
        reads: Vec<(u16, usize)>,
    }

    impl ConfigSource for MockConfig {
        fn read_config(&mut self, offset: u16, buf: &mut [u8]) -> DriverResult<()> {
            self.reads.push((offset, buf.len()));
            let end = usize::from(offset) + buf.len();
            assert!(
                end <= 256,
                "read {offset:#x}+{} past config space",
                buf.len()
            );
            buf.copy_from_slice(&self.bytes[usize::from(offset)..end]);
            Ok(())
        }
    }

    fn vendor(cfg_type: u8, bar: u8, offset: u32, length: u32, extra: &[u8]) -> Vec<u8> {
        let mut v = vec![PCI_CAP_ID_VNDR, 0, 0, cfg_type, bar, 0, 0, 0];
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&length.to_le_bytes());
        v.extend_from_slice(extra);
        v[2] = v.len() as u8;
        v
    }

    /// Lay out capabilities at the given offsets, chained in order.
    fn config_with(caps: &[(u8, Vec<u8>)]) -> MockConfig {
        let mut b = [0u8; 256];
        b[0..4].copy_from_slice(&[0xf4, 0x1a, 0x42, 0x10]);
        b[6] = PCI_STATUS_CAP_LIST as u8;
        b[0x34] = caps.first().map(|c| c.0).unwrap_or(0);
        for (i, (at, bytes)) in caps.iter().enumerate() {
            let at = usize::from(*at);
            // A capability that runs past the end is cut there (that is the point of
            // some tests).
            let n = bytes.len().min(b.len() - at);
            b[at..at + n].copy_from_slice(&bytes[..n]);
            if at + 1 < b.len() {
                b[at + 1] = caps.get(i + 1).map(|c| c.0).unwrap_or(0);
            }
        }
        MockConfig {
            bytes: b,
            reads: Vec::new(),
        }
    }

    fn msix_cap(table_size: u16, table: u32, pba: u32) -> Vec<u8> {
        let mut v = vec![PCI_CAP_ID_MSIX, 0];
        v.extend_from_slice(&(table_size - 1).to_le_bytes());
        v.extend_from_slice(&table.to_le_bytes());
        v.extend_from_slice(&pba.to_le_bytes());
        v
    }

    fn standard_config() -> MockConfig {
        config_with(&[
            (0x40, msix_cap(3, 1, 0x1001)),
            (0x50, vendor(1, 4, 0, 0x40, &[])),
            (0x60, vendor(2, 4, 0x3000, 0x1000, &4u32.to_le_bytes())),
            (0x78, vendor(3, 4, 0x1000, 1, &[])),
            (0x88, vendor(4, 4, 0x2000, 0x1000, &[])),
            (0x98, vendor(5, 0, 0, 0, &[0; 4])),
        ])
    }

    #[test]
    fn walker_finds_virtio_and_msix_caps() {
        let mut c = standard_config();
        let caps = walk_capabilities(&mut c).unwrap();
        assert_eq!(
            caps.common,
            Some(VirtioCap {
                cap_offset: 0x50,
                cfg_type: 1,
                bar: 4,
                id: 0,
                offset: 0,
                length: 0x40
            })
        );
        let n = caps.notify.unwrap();
        assert_eq!(
            (n.cap.offset, n.cap.length, n.multiplier),
            (0x3000, 0x1000, 4)
        );
        assert_eq!(caps.isr.unwrap().offset, 0x1000);
        assert_eq!(caps.device.unwrap().length, 0x1000);
        assert_eq!(caps.pci_cfg.unwrap().cap_offset, 0x98);
        let m = caps.msix.unwrap();
        assert_eq!(
            (
                m.table_size,
                m.table_bar,
                m.table_offset,
                m.pba_bar,
                m.pba_offset
            ),
            (3, 1, 0, 1, 0x1000)
        );
        assert_eq!(caps.visited.len(), 6);
        assert!(c.reads.iter().all(|&(o, l)| usize::from(o) + l <= 256));
    }

    #[test]
    fn walker_prefers_the_first_usable_capability() {
        let mut c = config_with(&[
            (0x40, vendor(1, 9, 0, 0x40, &[])), // reserved BAR: ignored
            (0x50, vendor(1, 2, 0x100, 0x40, &[])),
            (0x60, vendor(1, 4, 0x200, 0x40, &[])), // second choice
            (0x70, vendor(2, 4, 0, 0x10, &[])),     // notify without multiplier: too short
            (0x80, vendor(7, 4, 0, 0x10, &[])),     // unknown type
        ]);
        let caps = walk_capabilities(&mut c).unwrap();
        assert_eq!(caps.common.unwrap().bar, 2);
        assert_eq!(caps.common.unwrap().offset, 0x100);
        assert!(caps.notify.is_none());
        assert!(caps.msix.is_none());
    }

    #[test]
    fn walker_rejects_malformed_lists() {
        // No capability list bit.
        let mut c = standard_config();
        c.bytes[6] = 0;
        assert!(matches!(
            walk_capabilities(&mut c),
            Err(DriverError::NoCapabilityList)
        ));
        // A loop.
        let mut c = standard_config();
        c.bytes[0x99] = 0x50;
        assert!(matches!(
            walk_capabilities(&mut c),
            Err(DriverError::BadCapability { offset: 0x50, .. })
        ));
        // A pointer into the header.
        let mut c = standard_config();
        c.bytes[0x51] = 0x10;
        assert!(matches!(
            walk_capabilities(&mut c),
            Err(DriverError::BadCapability { .. })
        ));
        // A vendor capability running past the end.
        let mut c = config_with(&[(0xf8, vendor(1, 4, 0, 0x40, &[]))]);
        c.bytes[0xfa] = 16;
        assert!(c.bytes.len() == 256);
        assert!(matches!(
            walk_capabilities(&mut c),
            Err(DriverError::BadCapability { offset: 0xf8, .. })
        ));
        // An MSI-X capability running past the end.
        let mut c = config_with(&[(0xf8, vec![PCI_CAP_ID_MSIX, 0, 0, 0])]);
        assert!(matches!(
            walk_capabilities(&mut c),
            Err(DriverError::BadCapability { offset: 0xf8, .. })
        ));
        // A pointer to the last byte is masked to the last dword (0xfc), where an empty
        // header ends the list.
        let mut c = standard_config();
        c.bytes[0x34] = 0xff;
        assert_eq!(walk_capabilities(&mut c).unwrap().visited, vec![(0xfc, 0)]);
        // Empty list.
        let mut c = config_with(&[]);
        assert_eq!(walk_capabilities(&mut c).unwrap(), PciCaps::default());
    }

    #[test]
    fn walker_reads_a_plain_snapshot() {
        let c = standard_config();
        let mut bytes = c.bytes.to_vec();
        let caps = walk_capabilities(bytes.as_mut_slice()).unwrap();
        assert!(caps.common.is_some() && caps.msix.is_some());
        assert!(bytes.as_mut_slice().read_config(250, &mut [0; 8]).is_err());
    }
}
