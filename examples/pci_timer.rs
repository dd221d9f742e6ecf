//! A small, complete PCI device served over vfio-user by one call: a counter/timer card.
//!
//! BAR 0 (4 KiB of 32-bit memory) holds 32-bit registers (reads of any size; writes of
//! other sizes than 4 bytes are ignored):
//!
//! | offset | register |
//! |---|---|
//! | 0x00 | ID: reads 0x54494d52 ("TIMR") |
//! | 0x04 | COUNTER: reads the count; a write adds the value written |
//! | 0x08 | TIMER: write N to fire once in N ms (0 cancels) |
//! | 0x0c | STATUS: bit 0 is set when the timer fires; INTx is asserted while it is; write 1 to clear |
//! | 0x10, 0x14 | DMA address (low, high): when not 0, firing first writes COUNTER there |
//!
//! `cargo run --example pci_timer -- /tmp/timer.sock`, then attach it to QEMU 10.1+ with
//! `-device '{"driver":"vfio-user-pci","socket":{"path":"/tmp/timer.sock","type":"unix"}}'`
//! (guest RAM shared, e.g. `memory-backend-memfd,share=on`). Enter or EOF on stdin stops it.

use std::io::BufRead;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use unidev_core::irq::{Interrupts, IrqLayout};
use unidev_core::memory::DmaSpace;
use unidev_core::pci::{AccessError, Bar, ConfigSpace, PciDevice, PciRegion, RegionInfo};
use unidev_transports::export::{Export, ExportOptions, VfioUser};

const COUNTER: u64 = 0x04;
const TIMER: u64 = 0x08;
const STATUS: u64 = 0x0c;
const DMA_LO: u64 = 0x10;
const DMA_HI: u64 = 0x14;
const BAR_SIZE: u64 = 0x1000;

/// The registers, shared with the timer threads.
struct Shared {
    regs: [AtomicU32; 6],
    /// Bumped by every arm, cancel and reset: a timer fires only if it is still current.
    generation: AtomicU64,
    irqs: Arc<Interrupts>,
    dma: Arc<DmaSpace>,
}

impl Shared {
    fn reg(&self, offset: u64) -> &AtomicU32 {
        &self.regs[(offset / 4) as usize]
    }

    fn fire(&self) {
        let addr = u64::from(self.reg(DMA_LO).load(SeqCst))
            | u64::from(self.reg(DMA_HI).load(SeqCst)) << 32;
        if addr != 0 {
            let count = self.reg(COUNTER).load(SeqCst).to_le_bytes();
            if let Err(e) = self.dma.write(addr, &count) {
                eprintln!("pci-timer: cannot write the count to {addr:#x}: {e}");
            }
        }
        self.reg(STATUS).fetch_or(1, SeqCst);
        self.irqs.set_intx_level(true);
    }
}

struct TimerCard {
    config: ConfigSpace,
    shared: Arc<Shared>,
}

impl TimerCard {
    fn new(dma: Arc<DmaSpace>) -> Result<Self, unidev_core::pci::ConfigError> {
        let config = ConfigSpace::builder(0x1b36, 0x0005) // a QEMU "PCI test device" id
            .class(0xff, 0x00, 0x00)
            .interrupt_pin(1) // INTA
            .bar(0, Bar::mem32(BAR_SIZE))
            .build()?;
        let regs = [0x5449_4d52, 0, 0, 0, 0, 0].map(AtomicU32::new);
        let irqs = Arc::new(Interrupts::new(IrqLayout::pci(true, 0, 0)));
        let generation = AtomicU64::new(0);
        let shared = Arc::new(Shared {
            regs,
            generation,
            irqs,
            dma,
        });
        Ok(TimerCard { config, shared })
    }

    fn arm(&self, ms: u32) {
        let generation = self.shared.generation.fetch_add(1, SeqCst) + 1;
        let shared = self.shared.clone();
        if ms > 0 {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(u64::from(ms)));
                if shared.generation.load(SeqCst) == generation {
                    shared.fire();
                }
            });
        }
    }
}

impl PciDevice for TimerCard {
    fn name(&self) -> &str {
        "pci-timer"
    }

    fn region_info(&self, region: PciRegion) -> RegionInfo {
        match region {
            PciRegion::Config => RegionInfo::read_write(self.config.size()),
            PciRegion::Bar(0) => RegionInfo::read_write(BAR_SIZE),
            _ => RegionInfo::absent(),
        }
    }

    fn interrupts(&self) -> &Arc<Interrupts> {
        &self.shared.irqs
    }

    fn dma(&self) -> &Arc<DmaSpace> {
        &self.shared.dma
    }

    // The transport range-checks accesses against `region_info` before calling these.
    fn read(&mut self, region: PciRegion, offset: u64, data: &mut [u8]) -> Result<(), AccessError> {
        match region {
            PciRegion::Config => self.config.read(offset, data),
            _ => {
                for (at, byte) in (offset as usize..).zip(data.iter_mut()) {
                    let reg = self.shared.regs.get(at / 4).map_or(0, |r| r.load(SeqCst));
                    *byte = reg.to_le_bytes()[at % 4];
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, region: PciRegion, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        if region == PciRegion::Config {
            self.config.write(offset, data);
            return Ok(());
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return Ok(()); // narrower and wider writes are ignored
        };
        let (value, s) = (u32::from_le_bytes(bytes), &self.shared);
        match offset {
            COUNTER => drop(s.reg(COUNTER).fetch_add(value, SeqCst)),
            TIMER => self.arm(value),
            STATUS if value & 1 == 1 => {
                s.reg(STATUS).fetch_and(!1, SeqCst);
                s.irqs.set_intx_level(false);
            }
            DMA_LO | DMA_HI => s.reg(offset).store(value, SeqCst),
            _ => {} // read-only or unused
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.shared.generation.fetch_add(1, SeqCst);
        self.shared.regs[1..]
            .iter()
            .for_each(|r| r.store(0, SeqCst));
        self.shared.irqs.set_intx_level(false);
        self.config.reset();
    }
}

/// Serve the card on `socket` until a line (or EOF) arrives on stdin.
fn serve(socket: &str) -> Result<(), Box<dyn std::error::Error>> {
    let card = TimerCard::new(Arc::new(DmaSpace::default()))?;
    let served =
        Export::pci("pci-timer", card).serve(VfioUser::new(socket), &ExportOptions::default())?;
    let stop = served.stop_handle();
    std::thread::spawn(move || {
        let _ = std::io::stdin().lock().read_line(&mut String::new());
        stop.stop();
    });
    println!("pci-timer: serving on {socket}");
    Ok(served.run()?)
}

fn main() -> ExitCode {
    let socket = std::env::args().nth(1);
    if let Err(e) = serve(socket.as_deref().unwrap_or("pci-timer.sock")) {
        eprintln!("pci-timer: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
