//! An ACCES PCI-IDIO-16 compatible card: 16 optically isolated inputs, 16 FET outputs,
//! and a change-of-state interrupt on the inputs, as a PCI function.
//!
//! What it is for: a small but complete PCI device — I/O BAR, level-triggered INTx,
//! register side effects on read — that an unmodified Linux guest drives with its
//! in-tree driver (`drivers/gpio/gpio-pci-idio-16.c` on top of the IDIO-16 library
//! `drivers/gpio/gpio-idio-16.c`, kernel 6.12). The host side changes input lines with
//! [`IdioGpioCard::set_inputs`] and observes the outputs with [`IdioGpioCard::outputs`].
//!
//! # Identity and BARs
//! Vendor 0x494F (ACCES I/O), device 0x0DC8, the ids the driver matches. The driver
//! maps BAR 2 (`pcim_iomap_regions(pdev, BIT(2), ...)`) and accesses it with
//! `ioread8`/`iowrite8` through an `io_port` regmap, which works for either kind of BAR;
//! the real card (a PLX PCI 9050-style bridge) decodes its registers in I/O space, so
//! BAR 2 here is an 8-byte I/O BAR (the family's register block is 8 bytes,
//! `IDIO_16_EXTENT` in the ISA driver). The bridge's own BARs 0 and 1 are not modelled:
//! the driver never touches them. Class 0xff/0x00/0x00 (unassigned), INTA.
//!
//! # Register map (BAR 2, byte registers)
//! | offset | read | write |
//! |---|---|---|
//! | 0 | outputs 0–7 | outputs 0–7 |
//! | 1 | inputs 0–7 | clear interrupt (any value) |
//! | 2 | **enable** IRQ (strobe; reads 0xff) | **disable** IRQ (any value) |
//! | 3 | activate input filters (strobe; reads 0xff) | deactivate input filters |
//! | 4 | outputs 8–15 | outputs 8–15 |
//! | 5 | inputs 8–15 | ignored |
//! | 6 | interrupt status | ignored |
//! | 7 | 0xff | ignored |
//!
//! Interrupt status: bit 2 is set while a change-of-state interrupt is latched (the
//! regmap IRQ chip of 6.12 tests exactly `BIT(2)` for every input line); bits 0 and 1
//! record which input bank (0–7, 8–15) changed, so that the pre-regmap driver's test
//! (`status & 0x3` and `status & 0x4`) also holds. Any write to offset 1 clears the
//! latch — the regmap IRQ chip acknowledges by writing the status it read to its
//! `ack_base` (1), and its mask sync writes 0 there before enabling.
//!
//! How the 6.12 driver uses it: at probe it writes offset 2 (disable), then the regmap
//! IRQ chip masks everything (another write to 2) and acknowledges anything pending,
//! then writes offset 3 (deactivate filters). When the first input line's interrupt is
//! unmasked it writes 0 to offset 1 and *reads* offset 2 to enable; when the last is
//! masked it writes offset 2. The interrupt thread reads offset 6, then writes the
//! status to offset 1. Outputs are never read back from the card (the regmap caches
//! offsets 0 and 4, which are not in its readable table), so they power up as 0, as the
//! cache assumes.
//!
//! # Interrupt
//! While the IRQ is enabled, any change of the inputs latches the status and asserts
//! INTx (level) until the driver clears it or disables the IRQ. Status bit 3 of the
//! configuration space follows the card's interrupt output; the Command register's
//! INTx Disable bit keeps the line itself low (PCI 3.0 6.2.2).
//!
//! Input filters have no effect here; their state is only recorded. BAR accesses are
//! served whether or not I/O decoding is enabled in the Command register: a client only
//! forwards them once the guest has mapped the BAR.

use std::sync::Arc;

use unidev_core::irq::{Interrupts, IrqLayout};
use unidev_core::memory::DmaSpace;
use unidev_core::pci::{AccessError, Bar, ConfigSpace, PciDevice, PciRegion, RegionInfo};

/// PCI vendor id of ACCES I/O Products.
pub const VENDOR_ID: u16 = 0x494f;
/// PCI device id of the PCI-IDIO-16.
pub const DEVICE_ID: u16 = 0x0dc8;
/// The BAR holding the registers.
pub const BAR_INDEX: u8 = 2;
/// Size of the register BAR (I/O space).
pub const BAR_SIZE: u64 = 8;

/// Register offsets in BAR 2.
pub mod reg {
    /// Outputs 0–7 (read/write).
    pub const OUT0_7: u64 = 0;
    /// Read: inputs 0–7. Write: clear the interrupt.
    pub const IN0_7: u64 = 1;
    /// Read: enable the IRQ. Write: disable the IRQ.
    pub const IRQ_CTL: u64 = 2;
    /// Read: activate the input filters. Write: deactivate them.
    pub const FILTER_CTL: u64 = 3;
    /// Outputs 8–15 (read/write).
    pub const OUT8_15: u64 = 4;
    /// Inputs 8–15 (read only).
    pub const IN8_15: u64 = 5;
    /// Interrupt status (read only).
    pub const IRQ_STATUS: u64 = 6;
}

/// Interrupt status: inputs 0–7 changed.
pub const STATUS_IN0_7: u8 = 1 << 0;
/// Interrupt status: inputs 8–15 changed.
pub const STATUS_IN8_15: u8 = 1 << 1;
/// Interrupt status: a change-of-state interrupt is latched.
pub const STATUS_IRQ: u8 = 1 << 2;

/// Value read from strobe registers (side effect only) and unused offsets.
const FLOATING: u8 = 0xff;

/// An emulated ACCES PCI-IDIO-16.
#[derive(Debug)]
pub struct IdioGpioCard {
    config: ConfigSpace,
    irqs: Arc<Interrupts>,
    dma: Arc<DmaSpace>,
    inputs: u16,
    outputs: u16,
    irq_enabled: bool,
    irq_status: u8,
    filters_active: bool,
}

fn config_space() -> ConfigSpace {
    ConfigSpace::builder(VENDOR_ID, DEVICE_ID)
        .class(0xff, 0x00, 0x00)
        .subsystem(VENDOR_ID, DEVICE_ID)
        .interrupt_pin(1)
        .bar(BAR_INDEX, Bar::io(BAR_SIZE))
        .build()
        // A fixed description, checked by the unit tests: cannot fail at run time.
        .expect("the PCI-IDIO-16 configuration space description is valid")
}

impl IdioGpioCard {
    /// A card in its power-on state with input lines `inputs` (bit n = input n).
    pub fn new(dma: Arc<DmaSpace>, inputs: u16) -> Self {
        IdioGpioCard {
            config: config_space(),
            irqs: Arc::new(Interrupts::new(IrqLayout::pci(true, 0, 0))),
            dma,
            inputs,
            outputs: 0,
            irq_enabled: false,
            irq_status: 0,
            filters_active: false,
        }
    }

    /// Change the input lines. While the driver has the IRQ enabled, any change latches
    /// the interrupt status and asserts INTx.
    pub fn set_inputs(&mut self, inputs: u16) {
        let changed = self.inputs ^ inputs;
        self.inputs = inputs;
        if changed == 0 || !self.irq_enabled {
            return;
        }
        if changed & 0x00ff != 0 {
            self.irq_status |= STATUS_IN0_7;
        }
        if changed & 0xff00 != 0 {
            self.irq_status |= STATUS_IN8_15;
        }
        self.irq_status |= STATUS_IRQ;
        self.update_intx();
    }

    /// Enable the change-of-state interrupt, as the driver's read of offset 2 does.
    pub fn enable_change_interrupt(&mut self) {
        self.irq_enabled = true;
        self.update_intx();
    }

    /// The input lines.
    pub fn inputs(&self) -> u16 {
        self.inputs
    }

    /// The output lines as the driver last wrote them (bit n = output n).
    pub fn outputs(&self) -> u16 {
        self.outputs
    }

    /// Whether the driver enabled the change-of-state interrupt.
    pub fn irq_enabled(&self) -> bool {
        self.irq_enabled
    }

    /// The interrupt status register.
    pub fn irq_status(&self) -> u8 {
        self.irq_status
    }

    /// Whether the driver activated the input filters (recorded only).
    pub fn filters_active(&self) -> bool {
        self.filters_active
    }

    /// The configuration space.
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// Drive INTx from the card's interrupt output and the Command register.
    fn update_intx(&mut self) {
        let asserted = self.irq_enabled && self.irq_status & STATUS_IRQ != 0;
        self.config.set_intx_status(asserted);
        let level = asserted && !self.config.intx_disabled();
        if self.irqs.intx_level() != level {
            self.irqs.set_intx_level(level);
        }
    }

    fn read_reg(&mut self, offset: u64) -> u8 {
        let [lo_out, hi_out] = self.outputs.to_le_bytes();
        let [lo_in, hi_in] = self.inputs.to_le_bytes();
        match offset {
            reg::OUT0_7 => lo_out,
            reg::IN0_7 => lo_in,
            reg::IRQ_CTL => {
                self.enable_change_interrupt();
                FLOATING
            }
            reg::FILTER_CTL => {
                self.filters_active = true;
                FLOATING
            }
            reg::OUT8_15 => hi_out,
            reg::IN8_15 => hi_in,
            reg::IRQ_STATUS => self.irq_status,
            _ => FLOATING,
        }
    }

    /// Write one register; returns whether the outputs were written.
    fn write_reg(&mut self, offset: u64, value: u8) -> bool {
        match offset {
            reg::OUT0_7 => {
                self.outputs = (self.outputs & 0xff00) | u16::from(value);
                return true;
            }
            reg::IN0_7 => {
                self.irq_status = 0;
                self.update_intx();
            }
            reg::IRQ_CTL => {
                self.irq_enabled = false;
                self.update_intx();
            }
            reg::FILTER_CTL => self.filters_active = false,
            reg::OUT8_15 => {
                self.outputs = (self.outputs & 0x00ff) | (u16::from(value) << 8);
                return true;
            }
            _ => {}
        }
        false
    }
}

impl PciDevice for IdioGpioCard {
    fn name(&self) -> &str {
        "gpio"
    }

    fn region_info(&self, region: PciRegion) -> RegionInfo {
        match region {
            PciRegion::Config => RegionInfo::read_write(self.config.size()),
            PciRegion::Bar(BAR_INDEX) => RegionInfo::read_write(BAR_SIZE),
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
        match region {
            PciRegion::Config => self.config.read(offset, data),
            PciRegion::Bar(BAR_INDEX) => {
                // Wider accesses act as consecutive byte accesses, in address order.
                for (i, b) in data.iter_mut().enumerate() {
                    *b = match offset.checked_add(i as u64) {
                        Some(o) => self.read_reg(o),
                        None => FLOATING,
                    };
                }
            }
            _ => return Err(AccessError::NotPermitted(region)),
        }
        Ok(())
    }

    fn write(&mut self, region: PciRegion, offset: u64, data: &[u8]) -> Result<(), AccessError> {
        match region {
            PciRegion::Config => {
                let changed = self.config.write(offset, data);
                if changed.command {
                    // INTx Disable may have changed.
                    self.update_intx();
                }
            }
            PciRegion::Bar(BAR_INDEX) => {
                let mut outputs_written = false;
                for (i, &b) in data.iter().enumerate() {
                    if let Some(o) = offset.checked_add(i as u64) {
                        outputs_written |= self.write_reg(o, b);
                    }
                }
                if outputs_written {
                    log::info!("gpio: outputs = {:#06x}", self.outputs);
                }
            }
            _ => return Err(AccessError::NotPermitted(region)),
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.outputs = 0;
        self.irq_enabled = false;
        self.irq_status = 0;
        self.filters_active = false;
        self.config.reset();
        self.irqs.set_intx_level(false);
        log::info!("gpio: reset, outputs = {:#06x}", self.outputs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use unidev_core::irq::IrqKind;
    use unidev_core::pci::config::{COMMAND_INTX_DISABLE, COMMAND_IO, STATUS_INTX};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const BAR: PciRegion = PciRegion::Bar(BAR_INDEX);

    fn card(inputs: u16) -> IdioGpioCard {
        IdioGpioCard::new(Arc::new(DmaSpace::default()), inputs)
    }

    fn rd(c: &mut IdioGpioCard, off: u64) -> u8 {
        let mut b = [0u8];
        c.read(BAR, off, &mut b).unwrap();
        b[0]
    }

    fn wr(c: &mut IdioGpioCard, off: u64, v: u8) {
        c.write(BAR, off, &[v]).unwrap();
    }

    fn cfg16(c: &mut IdioGpioCard, off: u64) -> u16 {
        let mut b = [0u8; 2];
        c.read(PciRegion::Config, off, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    fn cfg32(c: &mut IdioGpioCard, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(PciRegion::Config, off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn attach_intx(c: &IdioGpioCard) -> EventFd {
        let efd = EventFd::new(EFD_NONBLOCK).unwrap();
        c.interrupts()
            .set_eventfds(IrqKind::Intx, 0, vec![Some(efd.try_clone().unwrap())])
            .unwrap();
        efd
    }

    fn fired(fd: &EventFd) -> u64 {
        fd.read().unwrap_or(0)
    }

    /// What the 6.12 driver does at probe and when the first interrupt is unmasked.
    fn driver_enable_irq(c: &mut IdioGpioCard) {
        wr(c, reg::IRQ_CTL, 0);
        wr(c, reg::FILTER_CTL, 0);
        wr(c, reg::IN0_7, 0);
        rd(c, reg::IRQ_CTL);
    }

    #[test]
    fn config_space_identity_and_bar_sizing() {
        let mut c = card(0);
        assert_eq!(cfg16(&mut c, 0), VENDOR_ID);
        assert_eq!(cfg16(&mut c, 2), DEVICE_ID);
        assert_eq!(cfg32(&mut c, 8) >> 8, 0xff_0000, "class");
        assert_eq!(cfg16(&mut c, 0x3c) >> 8, 1, "INTA");
        assert_eq!(cfg32(&mut c, 0x18), 0x1, "I/O BAR");
        for i in 0..6 {
            c.write(PciRegion::Config, 0x10 + 4 * i, &[0xff; 4])
                .unwrap();
        }
        for i in 0..6 {
            let expect = if i == 2 { 0xffff_fff9 } else { 0 };
            assert_eq!(cfg32(&mut c, 0x10 + 4 * i), expect, "BAR {i}");
        }
        c.write(PciRegion::Config, 0x18, &0xc040u32.to_le_bytes())
            .unwrap();
        c.write(PciRegion::Config, 4, &0xffffu16.to_le_bytes())
            .unwrap();
        assert_eq!(c.config().bar_address(2), Some(0xc040));
        assert_eq!(c.config().command() & COMMAND_IO, COMMAND_IO);
        assert_eq!(
            c.config().command() & 0x2,
            0,
            "no memory BAR: MEM stays off"
        );

        assert_eq!(c.region_info(PciRegion::Config).size, 256);
        let bar = c.region_info(BAR);
        assert!(bar.size == BAR_SIZE && bar.read && bar.write);
        for r in [0, 1, 3, 4, 5] {
            assert_eq!(c.region_info(PciRegion::Bar(r)).size, 0);
        }
        assert_eq!(c.region_info(PciRegion::Rom).size, 0);
        assert_eq!(c.irq_layout(), IrqLayout::pci(true, 0, 0));
        assert_eq!(
            c.read(PciRegion::Bar(0), 0, &mut [0]),
            Err(AccessError::NotPermitted(PciRegion::Bar(0)))
        );
        assert!(c.write(PciRegion::Vga, 0, &[0]).is_err());
    }

    #[test]
    fn inputs_read_back() {
        let mut c = card(0xa55a);
        assert_eq!(rd(&mut c, reg::IN0_7), 0x5a);
        assert_eq!(rd(&mut c, reg::IN8_15), 0xa5);
        c.set_inputs(0x1234);
        assert_eq!(rd(&mut c, reg::IN0_7), 0x34);
        assert_eq!(rd(&mut c, reg::IN8_15), 0x12);
        // A wider read is a run of byte reads.
        let mut all = [0u8; 8];
        c.read(BAR, 0, &mut all).unwrap();
        assert_eq!(all[1], 0x34);
        assert_eq!(all[5], 0x12);
        assert_eq!(all[7], 0xff);
    }

    #[test]
    fn outputs_write_and_read_back() {
        let mut c = card(0);
        assert_eq!(c.outputs(), 0);
        wr(&mut c, reg::OUT0_7, 0xff);
        wr(&mut c, reg::OUT8_15, 0x81);
        assert_eq!(c.outputs(), 0x81ff);
        assert_eq!(rd(&mut c, reg::OUT0_7), 0xff);
        assert_eq!(rd(&mut c, reg::OUT8_15), 0x81);
        // Inputs are read-only.
        wr(&mut c, reg::IN8_15, 0x77);
        assert_eq!(rd(&mut c, reg::IN8_15), 0);
        // A 5-byte write reaches both output registers.
        c.write(BAR, 0, &[0x01, 0, 0, 0, 0x02]).unwrap();
        assert_eq!(c.outputs(), 0x0201);
        // Past the BAR: ignored, reads float, no panic.
        c.write(BAR, 8, &[1, 2, 3]).unwrap();
        c.write(BAR, u64::MAX, &[1, 2]).unwrap();
        let mut b = [0u8; 2];
        c.read(BAR, u64::MAX, &mut b).unwrap();
        assert_eq!(b, [0xff, 0xff]);
        assert_eq!(c.outputs(), 0x0201);
    }

    #[test]
    fn input_change_raises_intx_and_clear_lowers_it() {
        let mut c = card(0);
        let efd = attach_intx(&c);
        // IRQ disabled (power-on): a change latches nothing.
        c.set_inputs(0x0001);
        assert_eq!(rd(&mut c, reg::IRQ_STATUS), 0);
        assert_eq!(fired(&efd), 0);

        driver_enable_irq(&mut c);
        assert!(c.irq_enabled());
        assert!(!c.filters_active());
        assert_eq!(fired(&efd), 0);
        c.set_inputs(0x0001); // unchanged
        assert_eq!(fired(&efd), 0);
        c.set_inputs(0x0003);
        assert_eq!(fired(&efd), 1);
        assert!(c.interrupts().intx_level());
        assert_eq!(c.config().status() & STATUS_INTX, STATUS_INTX);
        let status = rd(&mut c, reg::IRQ_STATUS);
        assert_eq!(status, STATUS_IRQ | STATUS_IN0_7);
        // Both the regmap IRQ chip's test and the older driver's test hold.
        assert!(status & 0x4 != 0 && status & 0x3 != 0);
        // Reading the status does not acknowledge.
        assert!(c.interrupts().intx_level());

        // Acknowledge the way regmap-irq does: write the status to offset 1.
        wr(&mut c, reg::IN0_7, status);
        assert!(!c.interrupts().intx_level());
        assert_eq!(rd(&mut c, reg::IRQ_STATUS), 0);
        assert_eq!(c.config().status() & STATUS_INTX, 0);
        // The client unmasks after EOI; the level is low, nothing fires.
        c.interrupts().unmask(IrqKind::Intx, 0, 1, None).unwrap();
        assert_eq!(fired(&efd), 0);

        // A change in the upper bank fires again.
        c.set_inputs(0x8003);
        assert_eq!(fired(&efd), 1);
        assert_eq!(rd(&mut c, reg::IRQ_STATUS), STATUS_IRQ | STATUS_IN8_15);
        // Disabling the IRQ (write offset 2) drops the line too.
        wr(&mut c, reg::IRQ_CTL, 0);
        assert!(!c.irq_enabled());
        assert!(!c.interrupts().intx_level());
        c.set_inputs(0);
        assert_eq!(
            rd(&mut c, reg::IRQ_STATUS) & STATUS_IN0_7,
            0,
            "disabled: no latch"
        );
        // Re-enabling with the status still latched raises the line again.
        c.enable_change_interrupt();
        assert!(c.interrupts().intx_level());
    }

    #[test]
    fn intx_disable_keeps_the_line_low() {
        let mut c = card(0);
        let efd = attach_intx(&c);
        driver_enable_irq(&mut c);
        c.write(PciRegion::Config, 4, &COMMAND_INTX_DISABLE.to_le_bytes())
            .unwrap();
        c.set_inputs(0x0100);
        assert_eq!(fired(&efd), 0);
        assert!(!c.interrupts().intx_level());
        assert_eq!(
            c.config().status() & STATUS_INTX,
            STATUS_INTX,
            "status still shows it"
        );
        c.write(PciRegion::Config, 4, &0u16.to_le_bytes()).unwrap();
        assert!(c.interrupts().intx_level());
        assert_eq!(fired(&efd), 1);
    }

    #[test]
    fn filters_are_recorded() {
        let mut c = card(0);
        assert_eq!(rd(&mut c, reg::FILTER_CTL), 0xff);
        assert!(c.filters_active());
        wr(&mut c, reg::FILTER_CTL, 0);
        assert!(!c.filters_active());
    }

    #[test]
    fn reset_restores_power_on_state_but_keeps_inputs() {
        let mut c = card(0x00f0);
        let _efd = attach_intx(&c);
        c.write(PciRegion::Config, 0x18, &0xc040u32.to_le_bytes())
            .unwrap();
        c.write(PciRegion::Config, 4, &COMMAND_IO.to_le_bytes())
            .unwrap();
        wr(&mut c, reg::OUT0_7, 0x55);
        driver_enable_irq(&mut c);
        c.set_inputs(0x00f1);
        assert!(c.interrupts().intx_level());
        c.reset();
        assert_eq!(c.outputs(), 0);
        assert!(!c.irq_enabled());
        assert_eq!(c.irq_status(), 0);
        assert!(!c.interrupts().intx_level());
        assert_eq!(c.inputs(), 0x00f1);
        assert_eq!(rd(&mut c, reg::IN0_7), 0xf1);
        assert_eq!(c.config().command(), 0);
        assert_eq!(c.config().bar_address(2), Some(0));
        assert_eq!(c.config().status() & STATUS_INTX, 0);
        assert!(c.can_reset());
        assert_eq!(c.name(), "gpio");
    }
}
