//! virtio-blk requests for the driver side (virtio 1.2 section 5.2.6 "Device Operation"):
//! the request header, DISCARD/WRITE_ZEROES segments, the chain of a request laid out in
//! [`DriverMemory`], its completion, and [`VirtioPciDriver::blk_request`], which runs one
//! request to completion over vfio-user. The same requests run on a vhost-user ring with
//! [`crate::vhost_user::blk_request`].

use std::time::Duration;

use virtio_bindings::virtio_blk;

use crate::error::{DriverError, DriverResult};
use crate::memory::DriverMemory;
use crate::virtio_pci::VirtioPciDriver;

/// virtio-blk request types this helper builds (virtio 1.2 5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkRequestType {
    /// Read sectors.
    In,
    /// Write sectors.
    Out,
    /// Flush the write cache.
    Flush,
    /// Read the 20-byte device ID string.
    GetId,
    /// Discard ranges.
    Discard,
    /// Write zeroes to ranges.
    WriteZeroes,
}

impl BlkRequestType {
    /// The `type` field value.
    pub fn code(self) -> u32 {
        match self {
            BlkRequestType::In => virtio_blk::VIRTIO_BLK_T_IN,
            BlkRequestType::Out => virtio_blk::VIRTIO_BLK_T_OUT,
            BlkRequestType::Flush => virtio_blk::VIRTIO_BLK_T_FLUSH,
            BlkRequestType::GetId => virtio_blk::VIRTIO_BLK_T_GET_ID,
            BlkRequestType::Discard => virtio_blk::VIRTIO_BLK_T_DISCARD,
            BlkRequestType::WriteZeroes => virtio_blk::VIRTIO_BLK_T_WRITE_ZEROES,
        }
    }
}

/// Status byte: success.
pub const VIRTIO_BLK_S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
/// Status byte: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
/// Status byte: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;
/// Bytes of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: u32 = virtio_blk::VIRTIO_BLK_ID_BYTES;
/// WRITE_ZEROES segment flag: the device may unmap.
pub const VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP: u32 = virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
/// Size of the request header.
pub const BLK_HEADER_SIZE: u64 = 16;

/// One DISCARD / WRITE_ZEROES range (`struct virtio_blk_discard_write_zeroes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// Flags (WRITE_ZEROES: [`VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`]).
    pub flags: u32,
}

impl BlkSegment {
    /// The 16 bytes on the wire.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// A virtio-blk request: 16-byte header (type, reserved/ioprio, sector), data buffers,
/// and a 1-byte status the device writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioBlkRequest {
    /// Request type.
    pub kind: BlkRequestType,
    /// The header's `reserved` (ioprio) field.
    pub ioprio: u32,
    /// The header's sector (0 where the type does not use it).
    pub sector: u64,
    /// Bytes the driver sends (OUT data, DISCARD/WRITE_ZEROES segments).
    pub out: Vec<u8>,
    /// Bytes the device writes besides the status (IN length, GET_ID's 20).
    pub in_len: u32,
}

/// A request laid out in driver memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedBlkRequest {
    /// The chain to submit: header, data, status.
    pub chain: Vec<(u64, u32, bool)>,
    /// IOVA of the device-writable data (IN, GET_ID).
    pub in_iova: u64,
    /// Its length.
    pub in_len: u32,
    /// IOVA of the status byte.
    pub status_iova: u64,
}

/// How a request completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkCompletion {
    /// The status byte.
    pub status: u8,
    /// The device-writable data (IN, GET_ID), empty otherwise.
    pub data: Vec<u8>,
    /// The used length the device reported.
    pub used_len: u32,
}

impl VirtioBlkRequest {
    fn new(kind: BlkRequestType, sector: u64, out: Vec<u8>, in_len: u32) -> Self {
        VirtioBlkRequest {
            kind,
            ioprio: 0,
            sector,
            out,
            in_len,
        }
    }

    /// Read `len` bytes from `sector`.
    pub fn read(sector: u64, len: u32) -> Self {
        Self::new(BlkRequestType::In, sector, Vec::new(), len)
    }

    /// Write `data` at `sector`.
    pub fn write(sector: u64, data: &[u8]) -> Self {
        Self::new(BlkRequestType::Out, sector, data.to_vec(), 0)
    }

    /// Flush.
    pub fn flush() -> Self {
        Self::new(BlkRequestType::Flush, 0, Vec::new(), 0)
    }

    /// Get the device ID string.
    pub fn get_id() -> Self {
        Self::new(BlkRequestType::GetId, 0, Vec::new(), VIRTIO_BLK_ID_BYTES)
    }

    fn segments(kind: BlkRequestType, segs: &[BlkSegment]) -> Self {
        let out = segs.iter().flat_map(|s| s.to_bytes()).collect();
        Self::new(kind, 0, out, 0)
    }

    /// Discard `segs`.
    pub fn discard(segs: &[BlkSegment]) -> Self {
        Self::segments(BlkRequestType::Discard, segs)
    }

    /// Write zeroes to `segs`.
    pub fn write_zeroes(segs: &[BlkSegment]) -> Self {
        Self::segments(BlkRequestType::WriteZeroes, segs)
    }

    /// The 16-byte header.
    pub fn header(&self) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&self.kind.code().to_le_bytes());
        h[4..8].copy_from_slice(&self.ioprio.to_le_bytes());
        h[8..16].copy_from_slice(&self.sector.to_le_bytes());
        h
    }

    /// Bytes of driver memory the request needs: header, data, status.
    pub fn buffer_len(&self) -> u64 {
        BLK_HEADER_SIZE + self.out.len() as u64 + u64::from(self.in_len) + 1
    }

    /// The chain for a request laid out contiguously at `iova`: header, out data, in
    /// data, status.
    pub fn chain(&self, iova: u64) -> DriverResult<Vec<(u64, u32, bool)>> {
        let out_len = u32::try_from(self.out.len())
            .map_err(|_| DriverError::InvalidChain("data over 4 GiB".into()))?;
        let mut chain = vec![(iova, BLK_HEADER_SIZE as u32, false)];
        let mut at = iova + BLK_HEADER_SIZE;
        if out_len > 0 {
            chain.push((at, out_len, false));
            at += u64::from(out_len);
        }
        if self.in_len > 0 {
            chain.push((at, self.in_len, true));
            at += u64::from(self.in_len);
        }
        chain.push((at, 1, true));
        Ok(chain)
    }

    /// Write header and out data at `iova` in `mem` (status preset to 0xff) and return
    /// the chain.
    pub fn place(&self, mem: &DriverMemory, iova: u64) -> DriverResult<PlacedBlkRequest> {
        let chain = self.chain(iova)?;
        mem.write(iova, &self.header())?;
        if !self.out.is_empty() {
            mem.write(iova + BLK_HEADER_SIZE, &self.out)?;
        }
        let in_iova = iova + BLK_HEADER_SIZE + self.out.len() as u64;
        let status_iova = in_iova + u64::from(self.in_len);
        mem.write(status_iova, &[0xff])?;
        Ok(PlacedBlkRequest {
            chain,
            in_iova,
            in_len: self.in_len,
            status_iova,
        })
    }
}

impl PlacedBlkRequest {
    /// Read the outcome after the device returned the chain with `used_len`.
    pub fn complete(&self, mem: &DriverMemory, used_len: u32) -> DriverResult<BlkCompletion> {
        let mut status = [0u8; 1];
        mem.read(self.status_iova, &mut status)?;
        let mut data = vec![0u8; self.in_len as usize];
        if !data.is_empty() {
            mem.read(self.in_iova, &mut data)?;
        }
        Ok(BlkCompletion {
            status: status[0],
            data,
            used_len,
        })
    }
}

impl VirtioPciDriver {
    /// Run one virtio-blk request on queue `q` to completion: allocate its buffer in
    /// driver memory, submit, kick, wait up to `timeout`, and return the status byte and
    /// the data the device wrote (reads, GET_ID). No other request may be outstanding on
    /// `q`.
    pub fn blk_request(
        &mut self,
        q: u16,
        req: &VirtioBlkRequest,
        timeout: Duration,
    ) -> DriverResult<BlkCompletion> {
        let buf = self.memory().alloc(req.buffer_len(), 64)?;
        let r = self.blk_request_in(q, req, buf.iova, timeout);
        if matches!(r, Err(DriverError::Timeout(_))) {
            // The device may still write the buffer: keep it allocated.
            return r;
        }
        let _ = self.memory().free(buf);
        r
    }

    fn blk_request_in(
        &mut self,
        q: u16,
        req: &VirtioBlkRequest,
        iova: u64,
        timeout: Duration,
    ) -> DriverResult<BlkCompletion> {
        let placed = req.place(self.memory(), iova)?;
        let head = self.add_chain(q, &placed.chain)?;
        self.kick(q)?;
        let (used_head, used_len) = self.wait_used(q, timeout)?;
        if used_head != head {
            return Err(DriverError::Device {
                queue: q,
                why: format!("completed head {used_head}, expected {head}"),
            });
        }
        placed.complete(self.memory(), used_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtqueue::test_device::{test_queue, FakeDevice};

    #[test]
    fn blk_request_bytes_and_chains() {
        let r = VirtioBlkRequest::read(0x1122_3344_5566_7788, 4096);
        assert_eq!(
            r.header(),
            [0, 0, 0, 0, 0, 0, 0, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(
            r.chain(0x1000).unwrap(),
            vec![(0x1000, 16, false), (0x1010, 4096, true), (0x2010, 1, true)]
        );
        assert_eq!(r.buffer_len(), 16 + 4096 + 1);

        let w = VirtioBlkRequest::write(8, &[0xab; 512]);
        assert_eq!(&w.header()[..4], &1u32.to_le_bytes());
        assert_eq!(&w.header()[8..], &8u64.to_le_bytes());
        assert_eq!(
            w.chain(0).unwrap(),
            vec![(0, 16, false), (16, 512, false), (528, 1, true)]
        );

        let f = VirtioBlkRequest::flush();
        assert_eq!(f.header(), {
            let mut h = [0u8; 16];
            h[0] = 4;
            h
        });
        assert_eq!(f.chain(0).unwrap(), vec![(0, 16, false), (16, 1, true)]);

        let id = VirtioBlkRequest::get_id();
        assert_eq!(id.header()[0], 8);
        assert_eq!(
            id.chain(0).unwrap(),
            vec![(0, 16, false), (16, 20, true), (36, 1, true)]
        );

        let seg = BlkSegment {
            sector: 0x10,
            num_sectors: 0x20,
            flags: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        };
        assert_eq!(
            seg.to_bytes(),
            [0x10, 0, 0, 0, 0, 0, 0, 0, 0x20, 0, 0, 0, 1, 0, 0, 0]
        );
        let d = VirtioBlkRequest::discard(&[seg, seg]);
        assert_eq!(d.header()[0], 11);
        assert_eq!(d.out.len(), 32);
        assert_eq!(
            d.chain(0).unwrap(),
            vec![(0, 16, false), (16, 32, false), (48, 1, true)]
        );
        let z = VirtioBlkRequest::write_zeroes(&[seg]);
        assert_eq!(z.header()[0], 13);
        assert_eq!(z.out, seg.to_bytes());
    }

    #[test]
    fn blk_request_placed_and_completed_in_memory() {
        let (m, mut q, data) = test_queue(8, false);
        let w = VirtioBlkRequest::write(3, b"abcd");
        let p = w.place(&m, data.iova).unwrap();
        let mut img = [0u8; 21];
        m.read(data.iova, &mut img).unwrap();
        assert_eq!(&img[..16], &w.header());
        assert_eq!(&img[16..20], b"abcd");
        assert_eq!(img[20], 0xff, "status preset");
        let head = q.add_chain(&p.chain).unwrap();

        let r = VirtioBlkRequest::read(0, 8);
        let base = data.iova + 64;
        let pr = r.place(&m, base).unwrap();
        q.add_chain(&pr.chain).unwrap();
        let mut dev = FakeDevice {
            q: &q,
            next_avail: 0,
            used_idx: 0,
        };
        assert_eq!(dev.pop().unwrap().0, head);
        let (rh, descs) = dev.pop().unwrap();
        m.write(descs[1].0, b"datadata").unwrap();
        m.write(descs[2].0, &[VIRTIO_BLK_S_OK]).unwrap();
        dev.push(u32::from(rh), 9);
        let (h, len) = q.poll_used().unwrap().unwrap();
        assert_eq!(h, rh);
        let c = pr.complete(&m, len).unwrap();
        assert_eq!(
            c,
            BlkCompletion {
                status: VIRTIO_BLK_S_OK,
                data: b"datadata".to_vec(),
                used_len: 9
            }
        );
    }
}
