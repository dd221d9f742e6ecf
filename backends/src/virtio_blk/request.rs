//! virtio-blk requests as they arrive (virtio 1.2 section 5.2.6): walking a descriptor
//! chain into a parsed [`Request`], and reading its parts from guest memory — the
//! 16-byte header (`struct virtio_blk_outhdr`: type, reserved, sector), the segments of
//! a DISCARD or WRITE_ZEROES payload (`struct virtio_blk_discard_write_zeroes`), and the
//! status byte the device writes last.
//!
//! Every chain is parsed defensively, as a byte stream (virtio 1.x framing: the
//! header may share a descriptor with data or span two): a chain that breaks the rules
//! is marked malformed, not refused, so that it still completes. This module knows the
//! wire format and nothing of the disk.

use std::ops::Range;

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::io::{stream_read, Seg};

/// struct virtio_blk_outhdr: le32 type, le32 reserved, le64 sector.
pub(super) const HEADER_SIZE: u64 = 16;
/// struct virtio_blk_discard_write_zeroes: le64 sector, le32 num_sectors, le32 flags.
pub(super) const DWZ_SEGMENT_SIZE: u64 = 16;
/// Bytes of a GET_ID answer (the serial, NUL-padded, not NUL-terminated when full).
pub(super) const GET_ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Most descriptors of one chain that are kept; a longer chain completes with IOERR.
pub(super) const MAX_CHAIN_SEGS: usize = 1024;

/// A request's completion status, the byte the device writes last (5.2.6).
pub(super) type Status = u8;
pub(super) const S_OK: Status = VIRTIO_BLK_S_OK as Status;
pub(super) const S_IOERR: Status = VIRTIO_BLK_S_IOERR as Status;
pub(super) const S_UNSUPP: Status = VIRTIO_BLK_S_UNSUPP as Status;

/// A descriptor chain taken from the available ring, parsed.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) head: u16,
    /// Device-readable segments, as a range of `Scratch::segs`; then device-writable.
    pub(super) readable: Range<usize>,
    pub(super) writable: Range<usize>,
    pub(super) rbytes: u64,
    pub(super) wbytes: u64,
    /// The chain's last byte, when it is device-writable: where the status goes.
    pub(super) status: Option<GuestAddress>,
    /// Breaks the framing rules: readable after writable, a zero-length descriptor, a
    /// buffer outside guest memory, too many descriptors.
    pub(super) malformed: bool,
}

/// A request's header (struct virtio_blk_outhdr).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Header {
    /// VIRTIO_BLK_T_*.
    pub(super) kind: u32,
    /// Where the request starts, in 512-byte sectors.
    pub(super) sector: u64,
}

/// One segment of a DISCARD or WRITE_ZEROES payload (struct
/// virtio_blk_discard_write_zeroes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DwzSegment {
    /// First sector (512 bytes each).
    pub(super) sector: u64,
    /// Sectors.
    pub(super) num_sectors: u32,
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_*.
    pub(super) flags: u32,
}

/// Record the descriptors of one chain in `segs`.
pub(super) fn parse(
    head: u16,
    descs: impl Iterator<Item = Descriptor>,
    m: &GuestMemoryMmap<()>,
    segs: &mut Vec<Seg>,
) -> Request {
    let start = segs.len();
    let mut first_writable = None;
    let (mut rbytes, mut wbytes) = (0u64, 0u64);
    let mut malformed = false;
    let mut stored = 0usize;
    let mut last: Option<Descriptor> = None;
    // virtio-queue ends the iteration after the queue size (or indirect table size)
    // descriptors, on an index out of range, and past 4 GiB in total.
    for d in descs {
        last = Some(d);
        let len = d.len();
        if len == 0 {
            malformed = true;
            continue;
        }
        if d.is_write_only() {
            first_writable.get_or_insert(segs.len());
            wbytes += u64::from(len);
        } else {
            if first_writable.is_some() {
                malformed = true; // readable after writable
            }
            rbytes += u64::from(len);
        }
        if stored == MAX_CHAIN_SEGS {
            malformed = true;
            continue;
        }
        if !GuestMemoryBackend::check_range(m, d.addr(), len as usize) {
            malformed = true;
        }
        segs.push(Seg {
            addr: d.addr().0,
            len,
        });
        stored += 1;
    }
    let end = segs.len();
    let fw = first_writable.unwrap_or(end);
    // A chain that stopped on a descriptor still pointing onwards was cut short (a
    // loop, a bad index): its real end, hence its status byte, is unknown.
    let status = last
        .filter(|d| !d.has_next() && d.is_write_only() && d.len() > 0)
        .and_then(|d| d.addr().0.checked_add(u64::from(d.len()) - 1))
        .map(GuestAddress);
    Request {
        head,
        readable: start..fw,
        writable: fw..end,
        rbytes,
        wbytes,
        status,
        malformed,
    }
}

/// The header at the start of the readable stream `rd` (None when the stream is cut
/// short by guest memory's end).
pub(super) fn read_header(m: &GuestMemoryMmap<()>, rd: &[Seg]) -> Option<Header> {
    let mut hdr = [0u8; HEADER_SIZE as usize];
    if !stream_read(m, rd, 0, &mut hdr) {
        return None;
    }
    let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let mut s = [0u8; 8];
    s.copy_from_slice(&hdr[8..16]);
    let sector = u64::from_le_bytes(s);
    Some(Header { kind, sector })
}

/// Segment `index` of the DISCARD / WRITE_ZEROES payload that follows the header in the
/// readable stream `rd` (None when it lies outside guest memory).
pub(super) fn read_dwz_segment(
    m: &GuestMemoryMmap<()>,
    rd: &[Seg],
    index: u64,
) -> Option<DwzSegment> {
    let mut raw = [0u8; DWZ_SEGMENT_SIZE as usize];
    if !stream_read(m, rd, HEADER_SIZE + index * DWZ_SEGMENT_SIZE, &mut raw) {
        return None;
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&raw[0..8]);
    let sector = u64::from_le_bytes(s);
    let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
    Some(DwzSegment {
        sector,
        num_sectors,
        flags,
    })
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::Bytes;

    use super::*;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    /// A chain of (addr, len, flags), linked in order.
    fn chain(descs: &[(u64, u32, u16)]) -> impl Iterator<Item = Descriptor> + '_ {
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| Descriptor::new(addr, len, flags, i as u16 + 1))
    }

    #[test]
    fn a_well_framed_chain_splits_into_readable_and_writable_segments() {
        let m = memory();
        let mut segs = vec![Seg { addr: 0, len: 1 }]; // an earlier request's segment
        let descs = [
            (0x100, 16, NEXT),
            (0x200, 512, NEXT | WRITE),
            (0x400, 512, NEXT | WRITE),
            (0x800, 1, WRITE),
        ];
        let r = parse(7, chain(&descs), &m, &mut segs);
        assert_eq!(r.head, 7);
        assert_eq!((r.readable.clone(), r.writable.clone()), (1..2, 2..5));
        assert_eq!((r.rbytes, r.wbytes), (16, 1025));
        assert_eq!(r.status, Some(GuestAddress(0x800)));
        assert!(!r.malformed);
        assert_eq!((segs[2].addr, segs[2].len), (0x200, 512));
    }

    #[test]
    fn framing_errors_mark_the_chain_malformed() {
        let m = memory();
        let mut segs = Vec::new();
        for descs in [
            // Readable after writable.
            &[
                (0x100, 16, NEXT),
                (0x200, 8, NEXT | WRITE),
                (0x300, 8, NEXT),
                (0x800, 1, WRITE),
            ][..],
            // A zero-length descriptor.
            &[(0x100, 16, NEXT), (0x200, 0, NEXT), (0x800, 1, WRITE)],
            // A buffer past the end of guest memory.
            &[
                (0x100, 16, NEXT),
                (0xff00, 0x200, NEXT | WRITE),
                (0x800, 1, WRITE),
            ],
        ] {
            let r = parse(0, chain(descs), &m, &mut segs);
            assert!(r.malformed, "{descs:?}");
            assert_eq!(r.status, Some(GuestAddress(0x800)), "{descs:?}");
        }
        // More descriptors than are kept.
        let long: Vec<_> = (0..MAX_CHAIN_SEGS as u64 + 2)
            .map(|i| (0x1000 + i, 1, NEXT | WRITE))
            .chain([(0x800, 1, WRITE)])
            .collect();
        segs.clear();
        let r = parse(0, chain(&long), &m, &mut segs);
        assert!(r.malformed);
        assert_eq!(segs.len(), MAX_CHAIN_SEGS);
        assert_eq!(r.status, Some(GuestAddress(0x800)), "the real last byte");
    }

    #[test]
    fn the_status_byte_is_the_last_byte_of_a_final_writable_descriptor() {
        let m = memory();
        let mut segs = Vec::new();
        let r = parse(
            0,
            chain(&[(0x100, 16, NEXT), (0x800, 4, WRITE)]),
            &m,
            &mut segs,
        );
        assert_eq!(r.status, Some(GuestAddress(0x803)));
        // The last descriptor is device-readable, or still points onwards (cut short).
        let r = parse(0, chain(&[(0x100, 16, NEXT), (0x800, 1, 0)]), &m, &mut segs);
        assert_eq!(r.status, None);
        let r = parse(
            0,
            chain(&[(0x100, 16, NEXT), (0x800, 1, WRITE | NEXT)]),
            &m,
            &mut segs,
        );
        assert_eq!(r.status, None);
    }

    #[test]
    fn header_and_dwz_segments_are_read_across_descriptors() {
        let m = memory();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&4u32.to_le_bytes()); // type: FLUSH
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&0x1122_3344_5566u64.to_le_bytes());
        bytes.extend_from_slice(&9u64.to_le_bytes());
        bytes.extend_from_slice(&3u32.to_le_bytes());
        bytes.extend_from_slice(&1u32.to_le_bytes());
        // Split at byte 5 (inside the header) and byte 20 (inside the segment).
        m.write_slice(&bytes[..5], GuestAddress(0x100)).unwrap();
        m.write_slice(&bytes[5..20], GuestAddress(0x300)).unwrap();
        m.write_slice(&bytes[20..], GuestAddress(0x500)).unwrap();
        let rd = [
            Seg {
                addr: 0x100,
                len: 5,
            },
            Seg {
                addr: 0x300,
                len: 15,
            },
            Seg {
                addr: 0x500,
                len: 12,
            },
        ];
        let header = read_header(&m, &rd).unwrap();
        assert_eq!((header.kind, header.sector), (4, 0x1122_3344_5566));
        let segment = read_dwz_segment(&m, &rd, 0).unwrap();
        assert_eq!(
            (segment.sector, segment.num_sectors, segment.flags),
            (9, 3, 1)
        );
        // Past the stream, or outside guest memory.
        assert_eq!(read_dwz_segment(&m, &rd, 1), None);
        assert_eq!(
            read_header(
                &m,
                &[Seg {
                    addr: 0xfff8,
                    len: 16
                }]
            ),
            None
        );
    }
}
