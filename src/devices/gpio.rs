//! `gpio`: an ACCES PCI-IDIO-16 compatible GPIO card, a full PCI function
//! (`unidev_backends::gpio`).

use std::sync::Arc;

use clap::Args;
use log::info;
use unidev_backends::gpio::IdioGpioCard;
use unidev_core::memory::DmaSpace;
use unidev_transports::export::Export;

use super::{BuildContext, Built, Contract, DeviceOptions};

/// `gpio` options.
#[derive(Args, Clone, Debug)]
pub struct GpioOptions {
    /// Input lines 0-15, as hex (e.g. 0xa5c3).
    #[arg(long, default_value = "0", value_parser = parse_hex16)]
    pub inputs: u16,
}

fn parse_hex16(s: &str) -> Result<u16, String> {
    let t = s.trim_start_matches("0x").trim_start_matches("0X");
    u16::from_str_radix(t, 16).map_err(|e| format!("not a 16-bit hex value: {e}"))
}

impl DeviceOptions for GpioOptions {
    const NAME: &'static str = "gpio";
    const ABOUT: &'static str =
        "An ACCES PCI-IDIO-16 compatible GPIO card (Linux driver gpio-pci-idio-16)";

    fn contract(&self) -> Contract {
        Contract::Pci
    }

    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        info!("gpio: inputs = {:#06x}", self.inputs);
        let dma = Arc::new(DmaSpace::new(ctx.max_dma_maps));
        Ok(Built::Pci(Export::pci(
            ctx.name,
            IdioGpioCard::new(dma, self.inputs),
        )))
    }
}
