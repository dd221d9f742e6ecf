//! Interop with an independent vfio-user client: rust-vmm's `vfio-user` crate (the
//! `Client` cloud-hypervisor uses), against unidev's server in this process.

mod common;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use unidev_backends::gpio::IdioGpioCard;
use unidev_core::irq::{Interrupts, IrqLayout};
use unidev_core::memory::DmaSpace;
use unidev_core::pci::{
    AccessError, PciDevice, PciRegion, RegionInfo, RegionMmap, SharedPciDevice, SparseArea,
};
use unidev_transports::listener;
use unidev_transports::vfio_user::{ServerConfig, VfioUserServer};
use vfio_user::Client;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BAR0: u32 = 0;
const BAR2: u32 = 2;
const CONFIG: u32 = 7;
const INTX: u32 = 0;
const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

struct Running {
    stop: unidev_core::dispatch::StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    sock: std::path::PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn serve(name: &str, device: SharedPciDevice) -> Running {
    let dir = common::test_dir(name);
    let sock = dir.join("dev.sock");
    let l = listener::bind(&sock, 0o600).unwrap();
    let server = VfioUserServer::new(name, l, device, ServerConfig::default()).unwrap();
    let stop = server.stop_handle();
    let thread = Some(std::thread::spawn(move || server.run().unwrap()));
    Running { stop, thread, sock }
}

fn memfd(name: &str, len: u64) -> std::fs::File {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: memfd_create with a valid name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: fresh fd owned by nobody else.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

#[test]
fn gpio_card_through_rust_vmm_client() {
    let dma = Arc::new(DmaSpace::default());
    let card = Arc::new(Mutex::new(IdioGpioCard::new(dma.clone(), 0xbeef)));
    let srv = serve("interop-gpio", card.clone());
    let mut client = Client::new(&srv.sock).expect("rust-vmm client connects and negotiates");

    // Device and region info, as parsed by the independent client.
    let config = client.region(CONFIG).expect("config region");
    assert_eq!(config.size, 256);
    let bar2 = client.region(BAR2).expect("bar 2");
    assert!(bar2.size >= 8, "gpio registers in BAR2");
    assert_eq!(client.region(BAR0).unwrap().size, 0, "BAR0 absent");

    // Config space identity.
    let mut id = [0u8; 4];
    client.region_read(CONFIG, 0, &mut id).unwrap();
    assert_eq!(id, [0x4f, 0x49, 0xc8, 0x0d]);

    // Inputs 0-7 at offset 1, 8-15 at offset 5; outputs at 0 and 4.
    let mut b = [0u8; 1];
    client.region_read(BAR2, 1, &mut b).unwrap();
    assert_eq!(b[0], 0xef);
    client.region_read(BAR2, 5, &mut b).unwrap();
    assert_eq!(b[0], 0xbe);
    client.region_write(BAR2, 0, &[0x5a]).unwrap();
    client.region_write(BAR2, 4, &[0xa5]).unwrap();
    assert_eq!(card.lock().unwrap().outputs(), 0xa55a);
    client.region_read(BAR2, 4, &mut b).unwrap();
    assert_eq!(b[0], 0xa5);

    // DMA map of a memfd lands in the core's memory layer.
    let mem = memfd("guest-ram", 0x10_0000);
    client
        .dma_map(0, 0x4000_0000, 0x10_0000, mem.as_raw_fd())
        .unwrap();
    common::wait_for(5, "the map", || dma.len() == 1);
    dma.write(0x4000_0010, b"via unidev").unwrap();
    let mut seen = [0u8; 10];
    std::os::unix::fs::FileExt::read_exact_at(&mem, &mut seen, 0x10).unwrap();
    assert_eq!(&seen, b"via unidev");
    client.dma_unmap(0x4000_0000, 0x10_0000).unwrap();
    assert_eq!(dma.len(), 0);

    // INTx eventfd delivery: attach an eventfd, enable the card's change interrupt,
    // change an input.
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    client
        .set_irqs(
            INTX,
            IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[efd.as_raw_fd()],
        )
        .unwrap();
    common::wait_for(5, "the eventfd", || {
        card.lock()
            .unwrap()
            .interrupts()
            .has_eventfd(unidev_core::irq::IrqKind::Intx, 0)
    });
    // The driver enables the change interrupt by reading the IRQ control register (2).
    client.region_read(BAR2, 2, &mut b).unwrap();
    assert!(efd.read().is_err(), "no interrupt before a change");
    card.lock().unwrap().set_inputs(0xbeee);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(efd.read().unwrap(), 1, "input change raised INTx");
    // Status (6) says the inputs changed; writing offset 1 acknowledges.
    client.region_read(BAR2, 6, &mut b).unwrap();
    assert_ne!(b[0] & 0x4, 0, "status bit 2 latched");
    client.region_write(BAR2, 1, &[b[0]]).unwrap();
    assert!(
        !card.lock().unwrap().interrupts().intx_level(),
        "acknowledged"
    );
    client.shutdown().unwrap();
}

/// A device with a memfd-backed BAR0 whose second page is mappable (a sparse area), and a
/// fully mappable BAR2.
struct MappedBars {
    irqs: Arc<Interrupts>,
    dma: Arc<DmaSpace>,
    mem: Arc<std::fs::File>,
}

impl PciDevice for MappedBars {
    fn name(&self) -> &str {
        "mapped-bars"
    }
    fn region_info(&self, region: PciRegion) -> RegionInfo {
        let mmap = |off, areas| {
            Some(RegionMmap {
                file: self.mem.clone(),
                file_offset: off,
                areas,
            })
        };
        match region {
            PciRegion::Config => RegionInfo::read_write(256),
            PciRegion::Bar(0) => RegionInfo {
                mmap: mmap(
                    0,
                    vec![SparseArea {
                        offset: 0x1000,
                        size: 0x1000,
                    }],
                ),
                ..RegionInfo::read_write(0x2000)
            },
            PciRegion::Bar(2) => RegionInfo {
                mmap: mmap(
                    0x2000,
                    vec![SparseArea {
                        offset: 0,
                        size: 0x1000,
                    }],
                ),
                ..RegionInfo::read_write(0x1000)
            },
            _ => RegionInfo::absent(),
        }
    }
    fn interrupts(&self) -> &Arc<Interrupts> {
        &self.irqs
    }
    fn dma(&self) -> &Arc<DmaSpace> {
        &self.dma
    }
    fn read(&mut self, _: PciRegion, _: u64, data: &mut [u8]) -> Result<(), AccessError> {
        data.fill(0);
        Ok(())
    }
    fn write(&mut self, _: PciRegion, _: u64, _: &[u8]) -> Result<(), AccessError> {
        Ok(())
    }
    fn reset(&mut self) {}
}

#[test]
fn sparse_mmap_areas_through_rust_vmm_client() {
    let mem = memfd("bars", 0x3000);
    std::os::unix::fs::FileExt::write_all_at(&mem, b"doorbells", 0x1000).unwrap();
    let dev = MappedBars {
        irqs: Arc::new(Interrupts::new(IrqLayout::pci(false, 0, 0))),
        dma: Arc::new(DmaSpace::default()),
        mem: Arc::new(mem),
    };
    let srv = serve("interop-sparse", Arc::new(Mutex::new(dev)));
    let client = Client::new(&srv.sock).unwrap();
    let bar0 = client.region(BAR0).unwrap();
    assert_eq!(bar0.size, 0x2000);
    assert_eq!(bar0.sparse_areas.len(), 1);
    assert_eq!(
        (bar0.sparse_areas[0].offset, bar0.sparse_areas[0].size),
        (0x1000, 0x1000)
    );
    let fo = bar0
        .file_offset
        .as_ref()
        .expect("an fd for the mappable BAR");
    let mut buf = [0u8; 9];
    std::os::unix::fs::FileExt::read_exact_at(fo.file(), &mut buf, fo.start() + 0x1000).unwrap();
    assert_eq!(&buf, b"doorbells");
    let bar2 = client.region(BAR2).unwrap();
    assert!(
        bar2.sparse_areas.is_empty(),
        "whole region mappable: no caps"
    );
    assert_eq!(bar2.file_offset.as_ref().unwrap().start(), 0x2000);
}
