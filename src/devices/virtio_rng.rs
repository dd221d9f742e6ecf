//! `virtio-rng`: a virtio entropy device fed from the OS random source
//! (`unidev_backends::virtio_rng`).

use std::sync::Arc;

use clap::Args;
use unidev_backends::virtio_rng::{VirtioRng, VIRTIO_ID_RNG};
use unidev_transports::export::Export;

use super::{BuildContext, Built, Contract, DeviceOptions, VirtioOptions};

/// `virtio-rng` options.
#[derive(Args, Clone, Debug)]
pub struct VirtioRngOptions {
    #[command(flatten)]
    pub virtio: VirtioOptions,
}

impl DeviceOptions for VirtioRngOptions {
    const NAME: &'static str = "virtio-rng";
    const ABOUT: &'static str = "A virtio entropy device fed from the OS random source";

    fn contract(&self) -> Contract {
        Contract::Virtio {
            device_type: VIRTIO_ID_RNG,
        }
    }

    fn virtio(&self) -> Option<&VirtioOptions> {
        Some(&self.virtio)
    }

    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        let rng = VirtioRng::new().map_err(|e| format!("virtio-rng: {e}"))?;
        Ok(Built::Virtio(Export::virtio(
            ctx.name,
            VIRTIO_ID_RNG,
            Arc::new(rng),
        )))
    }
}
