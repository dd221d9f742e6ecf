//! A test-only PCI function for the vfio-user protocol tests.
//!
//! * Config space: 256 plain bytes (vendor/device ID preset), every byte read/write.
//! * BAR0: 0x2000 bytes of memory in a memfd at file offset 0; only its second page is
//!   offered for mmap (a sparse-mmap area), the first page is trapped.
//! * BAR1: 0x100 bytes of trapped registers; a write that reaches the doorbell's `op`
//!   word makes the device read or write client memory through its `DmaSpace` (the
//!   DMA_READ/DMA_WRITE message path for maps without an fd).
//! * BAR2: 0x2000 bytes in the same memfd at file offset 0x2000, mappable as a whole.
//! * BAR3-5, ROM and VGA are absent.
//! * Interrupts: `IrqLayout::pci(true, 2, 4)`.
//!
//! Every write, reset, detach and DMA outcome is recorded for assertions.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use unidev_core::irq::{Interrupts, IrqLayout};
use unidev_core::memory::DmaSpace;
use unidev_core::pci::{AccessError, PciDevice, PciRegion, RegionInfo, RegionMmap, SparseArea};

/// BAR0 size.
pub const BAR0_SIZE: u64 = 0x2000;
/// The mappable part of BAR0: its second page.
pub const BAR0_AREA: (u64, u64) = (0x1000, 0x1000);
/// BAR1 (trapped registers) size.
pub const BAR1_SIZE: u64 = 0x100;
/// BAR2 size.
pub const BAR2_SIZE: u64 = 0x2000;
/// Where BAR2 lives in the memfd.
pub const BAR2_FILE_OFFSET: u64 = 0x2000;
/// Config space size.
pub const CONFIG_SIZE: u64 = 256;
/// Vendor ID in config space.
pub const VENDOR_ID: u16 = 0x1234;
/// Device ID in config space.
pub const DEVICE_ID: u16 = 0xabcd;

/// BAR1 doorbell: u64 IOVA at +0, u32 length at +8, u32 op at +12. Writing the op word
/// runs the DMA.
pub const DOORBELL: u64 = 0x40;
/// Doorbell op: read `len` bytes of client memory into [`Record::dma_in`].
pub const DB_OP_READ: u32 = 1;
/// Doorbell op: write `len` bytes of [`dma_pattern`] to client memory.
pub const DB_OP_WRITE: u32 = 2;

/// Byte `i` of the data the device writes on a doorbell write. The period is longer
/// than a 4 KiB chunk, so misplaced chunks are detected.
pub fn dma_pattern(i: usize) -> u8 {
    ((i * 7) ^ (i >> 8)) as u8
}

/// Initial byte at offset `off` of the memfd that backs BAR0 and BAR2.
pub fn mem_pattern(off: u64) -> u8 {
    (off as u8) ^ ((off >> 8) as u8) ^ 0xa5
}

/// What happened to the device.
#[derive(Debug, Default)]
pub struct Record {
    /// Every write the device saw, in order.
    pub writes: Vec<(PciRegion, u64, Vec<u8>)>,
    /// Number of resets.
    pub resets: u32,
    /// Number of `client_detached` calls.
    pub detached: u32,
    /// Bytes the last doorbell read obtained.
    pub dma_in: Vec<u8>,
    /// Completed doorbell DMAs (op, iova, len).
    pub dma_done: Vec<(u32, u64, u32)>,
    /// errno of every failed doorbell DMA.
    pub dma_errors: Vec<i32>,
}

/// The test device.
pub struct TestDevice {
    config: [u8; CONFIG_SIZE as usize],
    regs: [u8; BAR1_SIZE as usize],
    mem: Arc<File>,
    irqs: Arc<Interrupts>,
    dma: Arc<DmaSpace>,
    can_reset: bool,
    /// Shared with the test.
    pub record: Arc<Mutex<Record>>,
}

/// A memfd of `len` bytes.
pub fn memfd(name: &str, len: u64) -> File {
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

impl TestDevice {
    /// A device raising `irqs` and reaching client memory through `dma`.
    pub fn new(irqs: Arc<Interrupts>, dma: Arc<DmaSpace>, can_reset: bool) -> Self {
        let mem = memfd("unidev-test-bars", BAR2_FILE_OFFSET + BAR2_SIZE);
        let init: Vec<u8> = (0..BAR2_FILE_OFFSET + BAR2_SIZE).map(mem_pattern).collect();
        mem.write_all_at(&init, 0).unwrap();
        let mut config = [0u8; CONFIG_SIZE as usize];
        config[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
        config[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
        TestDevice {
            config,
            regs: [0; BAR1_SIZE as usize],
            mem: Arc::new(mem),
            irqs,
            dma,
            can_reset,
            record: Arc::default(),
        }
    }

    /// The memfd behind BAR0 and BAR2.
    pub fn mem(&self) -> &Arc<File> {
        &self.mem
    }

    fn reg_u64(&self, off: u64) -> u64 {
        let o = off as usize;
        u64::from_le_bytes(self.regs[o..o + 8].try_into().unwrap())
    }

    fn reg_u32(&self, off: u64) -> u32 {
        let o = off as usize;
        u32::from_le_bytes(self.regs[o..o + 4].try_into().unwrap())
    }

    fn ring_doorbell(&mut self) -> Result<(), AccessError> {
        let iova = self.reg_u64(DOORBELL);
        let len = self.reg_u32(DOORBELL + 8);
        let op = self.reg_u32(DOORBELL + 12);
        let result = match op {
            DB_OP_READ => {
                let mut buf = vec![0u8; len as usize];
                let r = self.dma.read(iova, &mut buf);
                if r.is_ok() {
                    self.record.lock().unwrap().dma_in = buf;
                }
                r
            }
            DB_OP_WRITE => {
                let data: Vec<u8> = (0..len as usize).map(dma_pattern).collect();
                self.dma.write(iova, &data)
            }
            _ => return Ok(()),
        };
        let mut rec = self.record.lock().unwrap();
        match result {
            Ok(()) => {
                rec.dma_done.push((op, iova, len));
                Ok(())
            }
            Err(e) => {
                rec.dma_errors.push(e.errno());
                Err(AccessError::Device(format!("doorbell DMA failed: {e}")))
            }
        }
    }
}

fn mmap_info(file: &Arc<File>, size: u64, file_offset: u64, area: (u64, u64)) -> RegionInfo {
    RegionInfo {
        size,
        read: true,
        write: true,
        mmap: Some(RegionMmap {
            file: file.clone(),
            file_offset,
            areas: vec![SparseArea {
                offset: area.0,
                size: area.1,
            }],
        }),
    }
}

impl PciDevice for TestDevice {
    fn name(&self) -> &str {
        "test-device"
    }

    fn region_info(&self, region: PciRegion) -> RegionInfo {
        match region {
            PciRegion::Config => RegionInfo::read_write(CONFIG_SIZE),
            PciRegion::Bar(0) => mmap_info(&self.mem, BAR0_SIZE, 0, BAR0_AREA),
            PciRegion::Bar(1) => RegionInfo::read_write(BAR1_SIZE),
            PciRegion::Bar(2) => mmap_info(&self.mem, BAR2_SIZE, BAR2_FILE_OFFSET, (0, BAR2_SIZE)),
            _ => RegionInfo::absent(),
        }
    }

    fn interrupts(&self) -> &Arc<Interrupts> {
        &self.irqs
    }

    fn dma(&self) -> &Arc<DmaSpace> {
        &self.dma
    }

    fn read(&mut self, region: PciRegion, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
        let o = offset as usize;
        match region {
            PciRegion::Config => data.copy_from_slice(&self.config[o..o + data.len()]),
            PciRegion::Bar(1) => data.copy_from_slice(&self.regs[o..o + data.len()]),
            PciRegion::Bar(0) => self.mem.read_exact_at(data, offset).unwrap(),
            PciRegion::Bar(2) => self
                .mem
                .read_exact_at(data, BAR2_FILE_OFFSET + offset)
                .unwrap(),
            _ => return Err(AccessError::NotPermitted(region)),
        }
        Ok(())
    }

    fn write(&mut self, region: PciRegion, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        self.record
            .lock()
            .unwrap()
            .writes
            .push((region, offset, data.to_vec()));
        let o = offset as usize;
        match region {
            PciRegion::Config => self.config[o..o + data.len()].copy_from_slice(data),
            PciRegion::Bar(1) => {
                self.regs[o..o + data.len()].copy_from_slice(data);
                let op_word = DOORBELL + 12..DOORBELL + 16;
                if offset < op_word.end && offset + data.len() as u64 > op_word.start {
                    return self.ring_doorbell();
                }
            }
            PciRegion::Bar(0) => self.mem.write_all_at(data, offset).unwrap(),
            PciRegion::Bar(2) => self
                .mem
                .write_all_at(data, BAR2_FILE_OFFSET + offset)
                .unwrap(),
            _ => return Err(AccessError::NotPermitted(region)),
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.regs = [0; BAR1_SIZE as usize];
        self.record.lock().unwrap().resets += 1;
    }

    fn can_reset(&self) -> bool {
        self.can_reset
    }

    fn client_detached(&mut self) {
        self.record.lock().unwrap().detached += 1;
    }
}

/// Build the device for a test: its interrupts and DMA space are the test's too.
pub fn build(max_maps: usize, can_reset: bool) -> (TestDevice, Arc<Interrupts>, Arc<DmaSpace>) {
    let irqs = Arc::new(Interrupts::new(IrqLayout::pci(true, 2, 4)));
    let dma = Arc::new(DmaSpace::new(max_maps));
    let dev = TestDevice::new(irqs.clone(), dma.clone(), can_reset);
    (dev, irqs, dma)
}
