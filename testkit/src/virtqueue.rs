//! The driver side of a split virtqueue (virtio 1.2 section 2.7 "Split Virtqueues"): the
//! ring layout, the descriptor free list, publishing chains, notification suppression in
//! both directions (flags, or EVENT_IDX with `vring_need_event`, 2.7.10) and the checks
//! of everything the device writes into the used ring.
//!
//! The rings live in [`DriverMemory`]; the same [`Virtqueue`] serves the virtio-pci
//! driver over vfio-user ([`crate::VirtioPciDriver`]) and a vhost-user frontend
//! ([`crate::vhost_user`]).

use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring;

use crate::error::{DriverError, DriverResult};
use crate::le_u32;
use crate::memory::{DmaBuffer, DriverMemory};

/// Largest split virtqueue (virtio 1.2 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Sizes and field offsets of a split virtqueue's three parts (virtio 1.2 2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitRingLayout {
    /// Queue size (descriptors).
    pub size: u16,
}

impl SplitRingLayout {
    /// Alignment of the descriptor table.
    pub const DESC_ALIGN: u64 = virtio_ring::VRING_DESC_ALIGN_SIZE as u64;
    /// Alignment of the available (driver) ring.
    pub const AVAIL_ALIGN: u64 = virtio_ring::VRING_AVAIL_ALIGN_SIZE as u64;
    /// Alignment of the used (device) ring.
    pub const USED_ALIGN: u64 = virtio_ring::VRING_USED_ALIGN_SIZE as u64;
    /// Bytes per descriptor.
    pub const DESC_SIZE: u64 = 16;
    /// Bytes per used element.
    pub const USED_ELEM_SIZE: u64 = 8;

    /// The layout of a queue of `size` descriptors (a power of two, at most 32768).
    pub fn new(size: u16) -> DriverResult<Self> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(DriverError::InvalidOption(format!(
                "queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}"
            )));
        }
        Ok(SplitRingLayout { size })
    }

    /// Bytes of the descriptor table.
    pub fn desc_table_size(&self) -> u64 {
        Self::DESC_SIZE * u64::from(self.size)
    }

    /// Bytes of the available ring: flags, idx, `ring[size]`, used_event.
    pub fn avail_ring_size(&self) -> u64 {
        6 + 2 * u64::from(self.size)
    }

    /// Bytes of the used ring: flags, idx, `ring[size]` (id, len), avail_event.
    pub fn used_ring_size(&self) -> u64 {
        6 + Self::USED_ELEM_SIZE * u64::from(self.size)
    }

    /// Offset of descriptor `i` in the table.
    pub fn desc_offset(&self, i: u16) -> u64 {
        Self::DESC_SIZE * u64::from(i)
    }

    /// Offset of `avail.ring[slot]`.
    pub fn avail_entry_offset(&self, slot: u16) -> u64 {
        4 + 2 * u64::from(slot)
    }

    /// Offset of `avail.used_event`.
    pub fn used_event_offset(&self) -> u64 {
        4 + 2 * u64::from(self.size)
    }

    /// Offset of `used.ring[slot]`.
    pub fn used_entry_offset(&self, slot: u16) -> u64 {
        4 + Self::USED_ELEM_SIZE * u64::from(slot)
    }

    /// Offset of `used.avail_event`.
    pub fn avail_event_offset(&self) -> u64 {
        4 + Self::USED_ELEM_SIZE * u64::from(self.size)
    }
}

/// Offset of the `flags` field in both rings.
const RING_FLAGS: u64 = 0;
/// Offset of the `idx` field in both rings.
const RING_IDX: u64 = 2;
/// Rings are placed on cache-line boundaries (more than the spec's alignment).
const RING_PLACEMENT_ALIGN: u64 = 64;

/// `vring_need_event` (virtio 1.2 2.7.10): with EVENT_IDX, whether moving an index from
/// `old` to `new` passes `event` (the other side asked to be told when the entry at
/// `event` is filled). All arithmetic is modulo 2^16.
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A chain in flight: its length and the bytes the device may write.
#[derive(Clone, Copy, Debug, Default)]
struct InFlight {
    len: u16,
    writable: u64,
}

/// The driver side of one split virtqueue in [`DriverMemory`].
///
/// The descriptor free list and the chains in flight are kept in driver-private shadow
/// state, never read back from shared memory, so a misbehaving device cannot corrupt
/// them; what the device writes (used entries, used index) is checked before use.
#[derive(Debug)]
pub struct Virtqueue {
    index: u16,
    layout: SplitRingLayout,
    mem: DriverMemory,
    desc: DmaBuffer,
    avail: DmaBuffer,
    used: DmaBuffer,
    event_idx: bool,
    interrupts: bool,
    /// Shadow `next` links: the free list, and the chains in flight.
    next: Vec<u16>,
    free_head: u16,
    num_free: u16,
    in_flight: Vec<InFlight>,
    avail_idx: u16,
    kicked_idx: u16,
    last_used: u16,
    /// Offset of the queue's notify address in the notify BAR (set by the virtio-pci
    /// driver).
    pub(crate) notify_offset: u64,
}

impl Virtqueue {
    /// Allocate and zero the rings of queue `index` with `size` descriptors in `mem`.
    /// `event_idx` says whether VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub fn new(mem: &DriverMemory, index: u16, size: u16, event_idx: bool) -> DriverResult<Self> {
        let layout = SplitRingLayout::new(size)?;
        let desc = mem.alloc(
            layout.desc_table_size(),
            RING_PLACEMENT_ALIGN.max(SplitRingLayout::DESC_ALIGN),
        )?;
        let avail = match mem.alloc(
            layout.avail_ring_size(),
            RING_PLACEMENT_ALIGN.max(SplitRingLayout::AVAIL_ALIGN),
        ) {
            Ok(b) => b,
            Err(e) => {
                let _ = mem.free(desc);
                return Err(e);
            }
        };
        let used = match mem.alloc(
            layout.used_ring_size(),
            RING_PLACEMENT_ALIGN.max(SplitRingLayout::USED_ALIGN),
        ) {
            Ok(b) => b,
            Err(e) => {
                let _ = mem.free(desc);
                let _ = mem.free(avail);
                return Err(e);
            }
        };
        let n = usize::from(size);
        Ok(Virtqueue {
            index,
            layout,
            mem: mem.clone(),
            desc,
            avail,
            used,
            event_idx,
            interrupts: true,
            next: (1..=n).map(|i| (i % n) as u16).collect(),
            free_head: 0,
            num_free: size,
            in_flight: vec![InFlight::default(); n],
            avail_idx: 0,
            kicked_idx: 0,
            last_used: 0,
            notify_offset: 0,
        })
    }

    /// Queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.layout.size
    }

    /// Ring layout.
    pub fn layout(&self) -> SplitRingLayout {
        self.layout
    }

    /// IOVA of the descriptor table.
    pub fn desc_iova(&self) -> u64 {
        self.desc.iova
    }

    /// IOVA of the available (driver) ring.
    pub fn avail_iova(&self) -> u64 {
        self.avail.iova
    }

    /// IOVA of the used (device) ring.
    pub fn used_iova(&self) -> u64 {
        self.used.iova
    }

    /// Whether EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains the device has not returned yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().filter(|c| c.len > 0).count()
    }

    /// The driver's available index (chains published so far, modulo 2^16).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The next used index the driver will consume.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Offset of this queue's notify address in the notify BAR.
    pub fn notify_offset(&self) -> u64 {
        self.notify_offset
    }

    /// Give the rings back to `mem` (after the device stopped using them).
    pub(crate) fn release(self) {
        for b in [self.desc, self.avail, self.used] {
            let _ = self.mem.free(b);
        }
    }

    /// Put a chain of `(iova, len, device_writable)` buffers on the available ring and
    /// publish it; returns its head descriptor. Device-readable buffers must come before
    /// device-writable ones (virtio 1.2 2.7.4.2) and lie inside driver memory. Does not
    /// notify: see [`kick_prepare`](Self::kick_prepare) /
    /// [`VirtioPciDriver::kick`](crate::VirtioPciDriver::kick).
    pub fn add_chain(&mut self, chain: &[(u64, u32, bool)]) -> DriverResult<u16> {
        if chain.is_empty() {
            return Err(DriverError::InvalidChain("empty chain".into()));
        }
        if chain.len() > usize::from(self.layout.size) {
            return Err(DriverError::InvalidChain(format!(
                "{} buffers, the queue has {} descriptors",
                chain.len(),
                self.layout.size
            )));
        }
        if chain.len() > usize::from(self.num_free) {
            return Err(DriverError::QueueFull {
                queue: self.index,
                needed: chain.len(),
                free: self.num_free,
            });
        }
        let mut writable = 0u64;
        let mut seen_writable = false;
        for &(iova, len, w) in chain {
            if !w && seen_writable {
                return Err(DriverError::InvalidChain(
                    "a device-readable buffer follows a device-writable one".into(),
                ));
            }
            seen_writable |= w;
            if !self.mem.contains(iova, u64::from(len)) {
                return Err(DriverError::InvalidChain(format!(
                    "buffer {iova:#x}+{len:#x} is outside driver memory"
                )));
            }
            if w {
                writable += u64::from(len);
            }
        }
        let head = self.free_head;
        let mut d = head;
        for (i, &(iova, len, w)) in chain.iter().enumerate() {
            let last = i + 1 == chain.len();
            let next = self.next[usize::from(d)];
            let mut flags = 0u16;
            if !last {
                flags |= virtio_ring::VRING_DESC_F_NEXT as u16;
            }
            if w {
                flags |= virtio_ring::VRING_DESC_F_WRITE as u16;
            }
            let mut e = [0u8; 16];
            e[0..8].copy_from_slice(&iova.to_le_bytes());
            e[8..12].copy_from_slice(&len.to_le_bytes());
            e[12..14].copy_from_slice(&flags.to_le_bytes());
            e[14..16].copy_from_slice(&(if last { 0 } else { next }).to_le_bytes());
            self.mem
                .write(self.desc.iova + self.layout.desc_offset(d), &e)?;
            if !last {
                d = next;
            }
        }
        // `d` is the chain's last descriptor; the free list continues after it.
        self.free_head = self.next[usize::from(d)];
        self.num_free -= chain.len() as u16;
        self.in_flight[usize::from(head)] = InFlight {
            len: chain.len() as u16,
            writable,
        };
        let slot = self.avail_idx & (self.layout.size - 1);
        self.mem
            .store_u16(self.avail.iova + self.layout.avail_entry_offset(slot), head)?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // Descriptors and the ring entry before the index (release store).
        fence(Ordering::Release);
        self.mem
            .store_u16(self.avail.iova + RING_IDX, self.avail_idx)?;
        Ok(head)
    }

    /// Decide whether the device wants a notification for the chains published since
    /// the last call: with EVENT_IDX, `vring_need_event(avail_event, new, old)`; without,
    /// unless the device set VIRTQ_USED_F_NO_NOTIFY.
    pub fn kick_prepare(&mut self) -> DriverResult<bool> {
        // The avail index store must be visible before we read the device's suppression
        // state (store -> load ordering).
        fence(Ordering::SeqCst);
        let (old, new) = (self.kicked_idx, self.avail_idx);
        self.kicked_idx = new;
        if old == new {
            return Ok(false);
        }
        if self.event_idx {
            let event = self
                .mem
                .load_u16(self.used.iova + self.layout.avail_event_offset())?;
            Ok(vring_need_event(event, new, old))
        } else {
            let flags = self.mem.load_u16(self.used.iova + RING_FLAGS)?;
            Ok(flags & virtio_ring::VRING_USED_F_NO_NOTIFY as u16 == 0)
        }
    }

    fn used_idx(&self) -> DriverResult<u16> {
        self.mem.load_u16(self.used.iova + RING_IDX)
    }

    /// Whether the device has returned chains not consumed yet.
    pub fn has_used(&self) -> DriverResult<bool> {
        Ok(self.used_idx()? != self.last_used)
    }

    /// Take the next used chain: `(head, len)` with `len` the bytes the device says it
    /// wrote. Its descriptors go back to the free list. Fails, after recycling what it
    /// safely can, if the device returned something it does not own.
    pub fn poll_used(&mut self) -> DriverResult<Option<(u16, u32)>> {
        let used_idx = self.used_idx()?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let outstanding = self.layout.size - self.num_free;
        if used_idx.wrapping_sub(self.last_used) > outstanding {
            return Err(self.device_error(format!(
                "used index moved from {} to {used_idx} with {outstanding} descriptors out",
                self.last_used
            )));
        }
        // The element is read after the index (the load above is an acquire).
        fence(Ordering::Acquire);
        let slot = self.last_used & (self.layout.size - 1);
        let mut e = [0u8; 8];
        self.mem
            .read(self.used.iova + self.layout.used_entry_offset(slot), &mut e)?;
        let id = le_u32(&e, 0);
        let len = le_u32(&e, 4);
        self.last_used = self.last_used.wrapping_add(1);
        if self.interrupts && self.event_idx {
            // Ask for an interrupt when the next entry is used.
            self.mem.store_u16(
                self.avail.iova + self.layout.used_event_offset(),
                self.last_used,
            )?;
            fence(Ordering::SeqCst);
        }
        let head = match u16::try_from(id) {
            Ok(h) if h < self.layout.size && self.in_flight[usize::from(h)].len > 0 => h,
            _ => return Err(self.device_error(format!("used id {id} is not a chain in flight"))),
        };
        let chain = std::mem::take(&mut self.in_flight[usize::from(head)]);
        let mut last = head;
        for _ in 1..chain.len {
            last = self.next[usize::from(last)];
        }
        self.next[usize::from(last)] = self.free_head;
        self.free_head = head;
        self.num_free += chain.len;
        if u64::from(len) > chain.writable {
            return Err(self.device_error(format!(
                "used len {len} for head {head} exceeds its {} writable bytes",
                chain.writable
            )));
        }
        Ok(Some((head, len)))
    }

    fn device_error(&self, why: String) -> DriverError {
        DriverError::Device {
            queue: self.index,
            why,
        }
    }

    /// Ask the device for used-buffer notifications again (VRING_AVAIL_F_NO_INTERRUPT
    /// cleared; with EVENT_IDX, `used_event` set to the next entry). Returns whether
    /// used chains are already waiting, in which case no interrupt may come for them.
    pub fn enable_interrupts(&mut self) -> DriverResult<bool> {
        self.interrupts = true;
        if self.event_idx {
            self.mem.store_u16(
                self.avail.iova + self.layout.used_event_offset(),
                self.last_used,
            )?;
        } else {
            self.mem.store_u16(self.avail.iova + RING_FLAGS, 0)?;
        }
        fence(Ordering::SeqCst);
        self.has_used()
    }

    /// Ask the device not to interrupt (a hint: it may still do so). With EVENT_IDX
    /// `used_event` is moved as far back as it goes.
    pub fn disable_interrupts(&mut self) -> DriverResult<()> {
        self.interrupts = false;
        if self.event_idx {
            self.mem.store_u16(
                self.avail.iova + self.layout.used_event_offset(),
                self.last_used.wrapping_sub(1),
            )
        } else {
            self.mem.store_u16(
                self.avail.iova + RING_FLAGS,
                virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16,
            )
        }
    }
}

/// A minimal device side of a [`Virtqueue`], for the unit tests of this crate.
#[cfg(test)]
pub(crate) mod test_device {
    use super::*;

    /// A descriptor as the device sees it: addr, len, flags, next.
    pub(crate) type RawDesc = (u64, u32, u16, u16);

    /// A minimal device side: pops avail entries and returns them.
    pub(crate) struct FakeDevice<'a> {
        pub(crate) q: &'a Virtqueue,
        pub(crate) next_avail: u16,
        pub(crate) used_idx: u16,
    }

    impl FakeDevice<'_> {
        pub(crate) fn pop(&mut self) -> Option<(u16, Vec<RawDesc>)> {
            let m = &self.q.mem;
            let idx = m.load_u16(self.q.avail_iova() + 2).unwrap();
            if idx == self.next_avail {
                return None;
            }
            let l = self.q.layout();
            let slot = self.next_avail % l.size;
            let head = m
                .load_u16(self.q.avail_iova() + l.avail_entry_offset(slot))
                .unwrap();
            self.next_avail = self.next_avail.wrapping_add(1);
            let mut descs = Vec::new();
            let mut d = head;
            loop {
                let mut e = [0u8; 16];
                m.read(self.q.desc_iova() + l.desc_offset(d), &mut e)
                    .unwrap();
                let addr = u64::from_le_bytes(e[0..8].try_into().unwrap());
                let len = le_u32(&e, 8);
                let flags = u16::from_le_bytes([e[12], e[13]]);
                let next = u16::from_le_bytes([e[14], e[15]]);
                descs.push((addr, len, flags, next));
                if flags & 1 == 0 {
                    break;
                }
                d = next;
            }
            Some((head, descs))
        }

        pub(crate) fn push(&mut self, id: u32, len: u32) {
            let m = &self.q.mem;
            let l = self.q.layout();
            let at = self.q.used_iova() + l.used_entry_offset(self.used_idx % l.size);
            let mut e = [0u8; 8];
            e[0..4].copy_from_slice(&id.to_le_bytes());
            e[4..8].copy_from_slice(&len.to_le_bytes());
            m.write(at, &e).unwrap();
            self.used_idx = self.used_idx.wrapping_add(1);
            m.store_u16(self.q.used_iova() + 2, self.used_idx).unwrap();
        }
    }

    pub(crate) fn test_queue(size: u16, event_idx: bool) -> (DriverMemory, Virtqueue, DmaBuffer) {
        let m = DriverMemory::new(0x100000, 0x1_0000_0000).unwrap();
        let q = Virtqueue::new(&m, 3, size, event_idx).unwrap();
        let data = m.alloc(0x10000, 4096).unwrap();
        (m, q, data)
    }
}

#[cfg(test)]
mod tests {
    use super::test_device::{test_queue, FakeDevice};
    use super::*;

    #[test]
    fn split_ring_layout() {
        for (n, d, a, u) in [
            (1u16, 16u64, 8u64, 14u64),
            (256, 4096, 518, 2054),
            (32768, 524288, 65542, 262150),
        ] {
            let l = SplitRingLayout::new(n).unwrap();
            assert_eq!(l.desc_table_size(), d);
            assert_eq!(l.avail_ring_size(), a);
            assert_eq!(l.used_ring_size(), u);
            assert_eq!(l.used_event_offset(), a - 2);
            assert_eq!(l.avail_event_offset(), u - 2);
        }
        let l = SplitRingLayout::new(8).unwrap();
        assert_eq!(l.desc_offset(3), 48);
        assert_eq!(l.avail_entry_offset(7), 18);
        assert_eq!(l.used_entry_offset(7), 60);
        assert!(SplitRingLayout::new(0).is_err());
        assert!(SplitRingLayout::new(6).is_err());
        assert_eq!(
            (
                SplitRingLayout::DESC_ALIGN,
                SplitRingLayout::AVAIL_ALIGN,
                SplitRingLayout::USED_ALIGN
            ),
            (16, 2, 4)
        );
        let m = DriverMemory::new(0x100000, 0x1_0000_0000).unwrap();
        let q = Virtqueue::new(&m, 0, 256, false).unwrap();
        assert_eq!(q.desc_iova() % 16, 0);
        assert_eq!(q.avail_iova() % 2, 0);
        assert_eq!(q.used_iova() % 4, 0);
        let ranges = [
            (q.desc_iova(), l.desc_table_size()),
            (q.avail_iova(), 6 + 2 * 256),
            (q.used_iova(), 6 + 8 * 256),
        ];
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "rings overlap");
            }
        }
    }

    #[test]
    fn need_event_arithmetic() {
        // event inside (old, new]: notify.
        assert!(vring_need_event(0, 1, 0));
        assert!(vring_need_event(5, 10, 5));
        assert!(vring_need_event(9, 10, 5));
        // event already passed before old, or not reached yet.
        assert!(!vring_need_event(4, 10, 5));
        assert!(!vring_need_event(10, 10, 5));
        assert!(!vring_need_event(11, 10, 5));
        // Nothing new.
        assert!(!vring_need_event(5, 5, 5));
        // Wrap-around.
        assert!(vring_need_event(0xffff, 2, 0xfffe));
        assert!(vring_need_event(0, 2, 0xfffe));
        assert!(vring_need_event(1, 2, 0xfffe));
        assert!(!vring_need_event(2, 2, 0xfffe));
        assert!(!vring_need_event(0xfffd, 2, 0xfffe));
    }

    #[test]
    fn free_list_fills_and_recycles_out_of_order() {
        let (_m, mut q, data) = test_queue(8, false);
        let b = data.iova;
        let h1 = q
            .add_chain(&[(b, 16, false), (b + 16, 512, true), (b + 528, 1, true)])
            .unwrap();
        let h2 = q.add_chain(&[(b, 16, false), (b + 16, 1, true)]).unwrap();
        let h3 = q
            .add_chain(&[(b, 16, false), (b + 16, 1, true), (b + 17, 1, true)])
            .unwrap();
        assert_eq!((h1, h2, h3), (0, 3, 5));
        assert_eq!(q.num_free(), 0);
        assert!(matches!(
            q.add_chain(&[(b, 1, false)]),
            Err(DriverError::QueueFull {
                queue: 3,
                needed: 1,
                free: 0
            })
        ));
        assert_eq!(q.avail_idx(), 3);

        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 0,
        };
        let (head, descs) = dev.pop().unwrap();
        assert_eq!(head, 0);
        assert_eq!(
            descs,
            vec![(b, 16, 1, 1), (b + 16, 512, 3, 2), (b + 528, 1, 2, 0)]
        );
        assert_eq!(dev.pop().unwrap().0, 3);
        assert_eq!(dev.pop().unwrap().0, 5);
        assert!(dev.pop().is_none());
        // Complete the middle one first.
        dev.push(3, 1);
        assert_eq!(q.poll_used().unwrap(), Some((3, 1)));
        assert_eq!(q.poll_used().unwrap(), None);
        assert_eq!(q.num_free(), 2);
        assert_eq!(q.in_flight(), 2);
        // The freed descriptors are reused.
        let h4 = q.add_chain(&[(b, 4, false), (b, 4, true)]).unwrap();
        assert_eq!(h4, 3);
        assert_eq!(q.num_free(), 0);
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 3,
            used_idx: 1,
        };
        assert_eq!(dev.pop().unwrap().1.len(), 2);
        dev.push(5, 2);
        dev.push(0, 513);
        dev.push(3, 0);
        assert_eq!(q.poll_used().unwrap(), Some((5, 2)));
        assert_eq!(q.poll_used().unwrap(), Some((0, 513)));
        assert_eq!(q.poll_used().unwrap(), Some((3, 0)));
        assert_eq!(q.num_free(), 8);
        assert_eq!(q.in_flight(), 0);
        // The whole queue in one chain.
        let whole: Vec<_> = (0..8).map(|i| (b + i * 8, 8, i >= 4)).collect();
        q.add_chain(&whole).unwrap();
        assert_eq!(q.num_free(), 0);
    }

    #[test]
    fn chains_are_validated() {
        let (m, mut q, data) = test_queue(4, false);
        let b = data.iova;
        let inv = |r: DriverResult<u16>| matches!(r, Err(DriverError::InvalidChain(_)));
        assert!(inv(q.add_chain(&[])));
        assert!(inv(q.add_chain(&[(b, 1, true), (b, 1, false)])));
        assert!(inv(q.add_chain(&[(b, 1, false); 5])));
        assert!(inv(q.add_chain(&[(
            m.iova_base() + m.size() - 1,
            2,
            false
        )])));
        assert!(inv(q.add_chain(&[(0, 1, false)])));
        assert_eq!(q.num_free(), 4);
        assert_eq!(q.avail_idx(), 0);
    }

    #[test]
    fn used_ring_from_a_bad_device_is_rejected() {
        let (_m, mut q, data) = test_queue(4, false);
        let b = data.iova;
        q.add_chain(&[(b, 16, false), (b + 16, 8, true)]).unwrap();
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 0,
        };
        dev.push(7, 0); // id out of range
        assert!(matches!(
            q.poll_used(),
            Err(DriverError::Device { queue: 3, .. })
        ));
        // id in range but not in flight
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 1,
        };
        dev.push(1, 0);
        assert!(matches!(q.poll_used(), Err(DriverError::Device { .. })));
        // len larger than the writable part: the chain is still recycled.
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 2,
        };
        dev.push(0, 9);
        assert!(matches!(q.poll_used(), Err(DriverError::Device { .. })));
        assert_eq!(q.num_free(), 4);
        // The used index jumps past what is in flight.
        q.mem.store_u16(q.used_iova() + 2, 100).unwrap();
        assert!(matches!(q.poll_used(), Err(DriverError::Device { .. })));
    }

    #[test]
    fn kick_suppression_without_event_idx() {
        let (m, mut q, data) = test_queue(8, false);
        assert!(!q.kick_prepare().unwrap(), "nothing added");
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(q.kick_prepare().unwrap());
        assert!(!q.kick_prepare().unwrap(), "already kicked");
        m.store_u16(q.used_iova(), virtio_ring::VRING_USED_F_NO_NOTIFY as u16)
            .unwrap();
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(
            !q.kick_prepare().unwrap(),
            "device asked for no notifications"
        );
        // Interrupt suppression through the avail flags.
        q.disable_interrupts().unwrap();
        assert_eq!(m.load_u16(q.avail_iova()).unwrap(), 1);
        assert!(!q.enable_interrupts().unwrap());
        assert_eq!(m.load_u16(q.avail_iova()).unwrap(), 0);
    }

    #[test]
    fn kick_and_interrupt_suppression_with_event_idx() {
        let (m, mut q, data) = test_queue(8, true);
        let l = q.layout();
        let avail_event = q.used_iova() + l.avail_event_offset();
        let used_event = q.avail_iova() + l.used_event_offset();
        // avail_event 0: the device wants to hear about entry 0.
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(q.kick_prepare().unwrap());
        // The device has not caught up (still waits for entry 0 = already notified).
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(!q.kick_prepare().unwrap());
        // The device now asks for entry 2.
        m.store_u16(avail_event, 2).unwrap();
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(q.kick_prepare().unwrap());
        // Entry 10 is far ahead.
        m.store_u16(avail_event, 10).unwrap();
        q.add_chain(&[(data.iova, 1, false)]).unwrap();
        assert!(!q.kick_prepare().unwrap());

        // used_event follows consumption.
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 0,
        };
        let heads: Vec<u16> = (0..5).map(|_| dev.pop().unwrap().0).collect();
        dev.push(u32::from(heads[0]), 0);
        dev.push(u32::from(heads[1]), 0);
        q.poll_used().unwrap().unwrap();
        assert_eq!(m.load_u16(used_event).unwrap(), 1);
        q.poll_used().unwrap().unwrap();
        assert_eq!(m.load_u16(used_event).unwrap(), 2);
        q.disable_interrupts().unwrap();
        assert_eq!(m.load_u16(used_event).unwrap(), 1);
        assert!(!q.enable_interrupts().unwrap());
        assert_eq!(m.load_u16(used_event).unwrap(), 2);
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 5,
            used_idx: 2,
        };
        dev.push(u32::from(heads[2]), 0);
        assert!(
            q.enable_interrupts().unwrap(),
            "a used entry is already waiting"
        );
    }
}
