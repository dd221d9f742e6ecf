//! The PCI configuration access capability of a virtio-pci function (virtio 1.2 section
//! 4.1.4.8, VIRTIO_PCI_CAP_PCI_CFG): a window in configuration space through which a
//! driver reaches the BARs without mapping them. The driver writes the window's BAR,
//! offset and length (1, 2 or 4) into the capability, then reads or writes its
//! `pci_cfg_data` field, and the device performs that access on the BAR.
//!
//! The window fields are the device's state, overlaid on the read-only vendor
//! capability that [`ConfigSpace`](crate::pci::ConfigSpace) holds; accesses to the rest
//! of configuration space pass through untouched.

use super::VirtioPci;

impl VirtioPci {
    /// The PCI_CFG access capability's window fields live in the device, not in the
    /// read-only vendor payload.
    pub(super) fn pci_cfg_overlay_read(&mut self, offset: u64, data: &mut [u8]) {
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

    /// A configuration write that touches the capability: update the window, and
    /// perform the BAR write it describes when `pci_cfg_data` was written. Returns
    /// whether the write was the window's (otherwise configuration space takes it).
    pub(super) fn pci_cfg_overlay_write(&mut self, offset: u64, data: &[u8]) -> bool {
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
}
