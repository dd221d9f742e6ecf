//! MSI-X table and Pending Bit Array emulation (PCI Local Bus Specification 3.0,
//! section 6.8.2).
//!
//! What it is for: a function with the MSI-X capability (declared with
//! [`Capability::Msix`](super::config::Capability::Msix)) keeps, in one of its memory
//! BARs, a table of `table_size` 16-byte entries (message address low/high, message
//! data, vector control whose bit 0 masks the vector) and a Pending Bit Array with one
//! bit per vector. [`Msix`] holds both, serves the guest's accesses to them (any size
//! and alignment — the device routes the BAR ranges here), and turns a device's
//! [`signal`](Msix::signal) into either an interrupt on the vector's line of
//! [`Interrupts`] or a pending bit, following the masking rules of 6.8.2.9:
//!
//! * MSI-X disabled (Message Control bit 15 clear): the function sends nothing.
//! * Function Mask (bit 14) set, or the vector's mask bit set: the message is not sent
//!   and the vector's pending bit is set instead.
//! * When the mask that held it back is cleared (the entry's mask bit by a table write,
//!   or the Function Mask by a Message Control write reported through
//!   [`set_control`](Msix::set_control)), a pending vector is sent and its bit cleared.
//!
//! After reset every vector is masked and nothing is pending (6.8.2.9: "the mask bit
//! ... is set after reset"). The message address and data are kept for devices that
//! want them; delivery itself goes through the eventfd the client attached to the
//! vector's MSI-X line.

use std::sync::Arc;

use crate::irq::{Interrupts, IrqKind};

/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
/// Largest MSI-X table (Message Control's Table Size is 11 bits).
pub const MAX_TABLE_SIZE: u16 = 2048;

/// Offset of the vector control dword inside an entry.
const VECTOR_CONTROL: usize = 12;
/// Vector control bit 0: the vector is masked.
const VECTOR_MASKED: u8 = 1;

/// One MSI-X table entry as software programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixEntry {
    /// Message address (both halves).
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// The vector's mask bit.
    pub masked: bool,
}

/// The MSI-X table and PBA of one function, and the delivery of its vectors.
#[derive(Debug)]
pub struct Msix {
    table_size: u16,
    table: Vec<u8>,
    pba: Vec<u8>,
    enabled: bool,
    function_masked: bool,
    irqs: Arc<Interrupts>,
}

impl Msix {
    /// A table of `table_size` entries (at most 2048; larger values are clamped)
    /// delivering through the MSI-X lines of `irqs`. Starts in the reset state.
    pub fn new(table_size: u16, irqs: Arc<Interrupts>) -> Self {
        let table_size = table_size.min(MAX_TABLE_SIZE);
        let mut msix = Msix {
            table_size,
            table: vec![0; usize::from(table_size) * ENTRY_SIZE as usize],
            pba: vec![0; usize::from(table_size.div_ceil(64)) * 8],
            enabled: false,
            function_masked: false,
            irqs,
        };
        msix.reset();
        msix
    }

    /// Number of table entries (vectors).
    pub fn table_size(&self) -> u16 {
        self.table_size
    }

    /// Size of the table in bytes (16 per entry).
    pub fn table_size_bytes(&self) -> u64 {
        self.table.len() as u64
    }

    /// Size of the PBA in bytes (one bit per vector, in whole quadwords).
    pub fn pba_size_bytes(&self) -> u64 {
        self.pba.len() as u64
    }

    /// The interrupt lines vectors are delivered through.
    pub fn interrupts(&self) -> &Arc<Interrupts> {
        &self.irqs
    }

    /// Whether MSI-X is enabled (as last reported by [`set_control`](Msix::set_control)).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the function is masked (as last reported by `set_control`).
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    fn byte_index(offset: u64, i: usize, len: usize) -> Option<usize> {
        let o = usize::try_from(offset.checked_add(i as u64)?).ok()?;
        (o < len).then_some(o)
    }

    /// Read `data.len()` bytes of the table at `offset`, any size and alignment. Bytes
    /// outside the table read as 0.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = Self::byte_index(offset, i, self.table.len()).map_or(0, |o| self.table[o]);
        }
    }

    /// Write `data` into the table at `offset`, any size and alignment. Only the mask
    /// bit of vector control is writable there (bits 31:1 are reserved and read 0).
    /// Unmasking a vector with its pending bit set sends it now. Bytes outside the
    /// table are ignored.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some(start) = Self::byte_index(offset, 0, self.table.len()) else {
            return;
        };
        let end = start.saturating_add(data.len()).min(self.table.len());
        if end <= start {
            // A zero-length write (found by fuzzing: `end - 1` below underflowed).
            return;
        }
        let first = start / ENTRY_SIZE as usize;
        let last = (end - 1) / ENTRY_SIZE as usize;
        let was_masked: Vec<bool> = (first..=last).map(|e| self.entry_masked(e)).collect();
        for (o, &v) in (start..end).zip(data) {
            self.table[o] = match o % ENTRY_SIZE as usize {
                VECTOR_CONTROL => v & VECTOR_MASKED,
                13..=15 => 0,
                _ => v,
            };
        }
        for (e, was) in (first..=last).zip(was_masked) {
            if was && !self.entry_masked(e) {
                self.deliver_pending(e);
            }
        }
    }

    /// Read `data.len()` bytes of the PBA at `offset`. Bytes outside read as 0.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = Self::byte_index(offset, i, self.pba.len()).map_or(0, |o| self.pba[o]);
        }
    }

    /// Writes to the PBA are ignored: it is read-only (6.8.2.7).
    pub fn write_pba(&mut self, _offset: u64, _data: &[u8]) {}

    /// The device reports MSI-X Message Control after a configuration write changed it
    /// (see [`ConfigSpace::msix_control`](super::config::ConfigSpace::msix_control)).
    /// Clearing the Function Mask while enabled sends every pending, unmasked vector.
    pub fn set_control(&mut self, enabled: bool, function_masked: bool) {
        self.enabled = enabled;
        self.function_masked = function_masked;
        if enabled && !function_masked {
            for v in 0..usize::from(self.table_size) {
                self.deliver_pending(v);
            }
        }
    }

    /// Device side: raise `vector`. Returns whether an eventfd was signalled. With MSI-X
    /// disabled nothing happens; while the function or the vector is masked the
    /// vector's pending bit is set instead. Vectors past the table are ignored.
    pub fn signal(&mut self, vector: u16) -> bool {
        let v = usize::from(vector);
        if !self.enabled || v >= usize::from(self.table_size) {
            return false;
        }
        if self.function_masked || self.entry_masked(v) {
            self.set_pending_bit(v, true);
            return false;
        }
        self.irqs.signal(IrqKind::Msix, u32::from(vector))
    }

    /// The entry of `vector`, if it exists.
    pub fn entry(&self, vector: u16) -> Option<MsixEntry> {
        let base = usize::from(vector) * ENTRY_SIZE as usize;
        let e = self.table.get(base..base + ENTRY_SIZE as usize)?;
        let dword = |i: usize| u32::from_le_bytes([e[i], e[i + 1], e[i + 2], e[i + 3]]);
        Some(MsixEntry {
            address: (u64::from(dword(4)) << 32) | u64::from(dword(0)),
            data: dword(8),
            masked: e[VECTOR_CONTROL] & VECTOR_MASKED != 0,
        })
    }

    /// Whether `vector`'s pending bit is set.
    pub fn pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pba.get(v / 8).is_some_and(|b| b & (1 << (v % 8)) != 0)
    }

    /// Device side: clear `vector`'s pending bit without sending it (the condition that
    /// raised it went away, 6.8.2.9).
    pub fn clear_pending(&mut self, vector: u16) {
        self.set_pending_bit(usize::from(vector), false);
    }

    /// Power-on state: every vector masked, addresses and data 0, nothing pending,
    /// MSI-X disabled and the function unmasked.
    pub fn reset(&mut self) {
        self.table.fill(0);
        for entry in self.table.chunks_exact_mut(ENTRY_SIZE as usize) {
            entry[VECTOR_CONTROL] = VECTOR_MASKED;
        }
        self.pba.fill(0);
        self.enabled = false;
        self.function_masked = false;
    }

    fn entry_masked(&self, v: usize) -> bool {
        self.table
            .get(v * ENTRY_SIZE as usize + VECTOR_CONTROL)
            .is_none_or(|b| b & VECTOR_MASKED != 0)
    }

    fn set_pending_bit(&mut self, v: usize, pending: bool) {
        if v >= usize::from(self.table_size) {
            return;
        }
        if let Some(b) = self.pba.get_mut(v / 8) {
            if pending {
                *b |= 1 << (v % 8);
            } else {
                *b &= !(1 << (v % 8));
            }
        }
    }

    /// Send `v` if it is pending and nothing masks it any more.
    fn deliver_pending(&mut self, v: usize) {
        let Ok(vector) = u16::try_from(v) else {
            return;
        };
        if self.enabled && !self.function_masked && !self.entry_masked(v) && self.pending(vector) {
            self.set_pending_bit(v, false);
            self.irqs.signal(IrqKind::Msix, u32::from(vector));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLayout;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn setup(n: u16) -> (Msix, Vec<EventFd>) {
        let irqs = Arc::new(Interrupts::new(IrqLayout::pci(false, 0, u32::from(n))));
        let fds: Vec<EventFd> = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        irqs.set_eventfds(
            IrqKind::Msix,
            0,
            fds.iter().map(|f| Some(f.try_clone().unwrap())).collect(),
        )
        .unwrap();
        (Msix::new(n, irqs), fds)
    }

    fn fired(fd: &EventFd) -> u64 {
        fd.read().unwrap_or(0)
    }

    fn program(m: &mut Msix, v: u16, masked: bool) {
        let base = u64::from(v) * 16;
        m.write_table(base, &0xfee0_0000u32.to_le_bytes());
        m.write_table(base + 4, &0u32.to_le_bytes());
        m.write_table(base + 8, &(0x40 + u32::from(v)).to_le_bytes());
        m.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn sizes() {
        let (m, _) = setup(70);
        assert_eq!(m.table_size_bytes(), 70 * 16);
        assert_eq!(m.pba_size_bytes(), 16);
        let (m, _) = setup(1);
        assert_eq!(m.pba_size_bytes(), 8);
        let m = Msix::new(5000, m.interrupts().clone());
        assert_eq!(m.table_size(), 2048);
        assert_eq!(m.pba_size_bytes(), 256);
    }

    #[test]
    fn reset_state_masks_every_vector() {
        let (mut m, _) = setup(4);
        for v in 0..4 {
            assert_eq!(
                m.entry(v),
                Some(MsixEntry {
                    address: 0,
                    data: 0,
                    masked: true,
                })
            );
        }
        program(&mut m, 2, false);
        m.set_control(true, true);
        m.signal(2);
        assert!(m.pending(2));
        m.reset();
        assert!(m.entry(2).unwrap().masked);
        assert!(!m.pending(2));
        assert!(!m.enabled() && !m.function_masked());
    }

    #[test]
    fn table_accesses_of_any_size() {
        let (mut m, _) = setup(4);
        // One qword write covering address low and high.
        m.write_table(16, &0x0000_0001_fee0_1000u64.to_le_bytes());
        m.write_table(24, &[0x21, 0x43]);
        m.write_table(26, &[0x65, 0x87]);
        // Vector control: reserved bits ignored.
        m.write_table(28, &0xffff_fffeu32.to_le_bytes());
        assert_eq!(
            m.entry(1),
            Some(MsixEntry {
                address: 0x1_fee0_1000,
                data: 0x8765_4321,
                masked: false,
            })
        );
        let mut all = [0u8; 16];
        m.read_table(16, &mut all);
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            m.read_table(16 + i as u64, std::slice::from_mut(b));
        }
        assert_eq!(all, bytes);
        assert_eq!(&all[12..], &[0, 0, 0, 0]);
        // An unaligned write straddling entries 1 and 2 masks entry 1 again.
        m.write_table(28, &[0x01, 0xff, 0xff, 0xff, 0xaa, 0xbb]);
        assert!(m.entry(1).unwrap().masked);
        assert_eq!(m.entry(2).unwrap().address & 0xffff, 0xbbaa);
        // Out of range: ignored, reads 0, no panic.
        m.write_table(60, &[0; 16]);
        m.write_table(u64::MAX, &[1; 4]);
        m.write_table(64, &[1; 4]);
        let mut tail = [0xffu8; 8];
        m.read_table(60, &mut tail);
        assert_eq!(tail, [0; 8]);
        m.read_table(u64::MAX - 1, &mut tail);
        assert_eq!(tail, [0; 8]);
        assert_eq!(m.entry(4), None);
    }

    #[test]
    fn empty_accesses_change_nothing() {
        // Found by fuzzing: a zero-length table write underflowed.
        let (mut m, _) = setup(2);
        program(&mut m, 0, true);
        let before = m.table.clone();
        m.write_table(0, &[]);
        m.write_table(16, &[]);
        m.write_table(1 << 40, &[]);
        m.read_table(0, &mut []);
        assert_eq!(m.table, before);
    }

    #[test]
    fn disabled_msix_sends_nothing() {
        let (mut m, fds) = setup(2);
        program(&mut m, 0, false);
        assert!(!m.signal(0));
        assert!(!m.pending(0));
        assert_eq!(fired(&fds[0]), 0);
        m.set_control(true, false);
        assert!(m.signal(0));
        assert_eq!(fired(&fds[0]), 1);
        assert!(!m.signal(7), "vector past the table");
    }

    #[test]
    fn masked_vector_is_pending_until_unmasked() {
        let (mut m, fds) = setup(70);
        m.set_control(true, false);
        program(&mut m, 65, true);
        assert!(!m.signal(65));
        assert!(m.pending(65));
        assert_eq!(fired(&fds[65]), 0);
        let mut pba = [0u8; 16];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba[8..].try_into().unwrap()), 1 << 1);
        m.write_pba(8, &[0; 8]);
        assert!(m.pending(65), "PBA is read-only");
        // Unmask through a byte write of vector control.
        m.write_table(65 * 16 + 12, &[0]);
        assert_eq!(fired(&fds[65]), 1);
        assert!(!m.pending(65));
        // A device can withdraw a pending vector.
        m.write_table(65 * 16 + 12, &[1]);
        m.signal(65);
        m.clear_pending(65);
        m.write_table(65 * 16 + 12, &[0]);
        assert_eq!(fired(&fds[65]), 0);
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let (mut m, fds) = setup(3);
        for v in 0..3 {
            program(&mut m, v, v == 2);
        }
        m.set_control(true, true);
        for v in 0..3 {
            assert!(!m.signal(v));
            assert!(m.pending(v));
        }
        m.set_control(true, false);
        assert_eq!(fired(&fds[0]), 1);
        assert_eq!(fired(&fds[1]), 1);
        assert_eq!(fired(&fds[2]), 0, "still masked by its own bit");
        assert!(m.pending(2) && !m.pending(0));
        // Disabling MSI-X keeps the pending bit; unmasking then sends nothing.
        m.set_control(false, false);
        m.write_table(2 * 16 + 12, &[0]);
        assert_eq!(fired(&fds[2]), 0);
        m.set_control(true, false);
        assert_eq!(fired(&fds[2]), 1);
    }
}
