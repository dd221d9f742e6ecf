//! `virtio-blk`: a virtio block device on a raw image file or block device
//! (`unidev_backends::virtio_blk`).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use log::info;
use unidev_backends::virtio_blk::{BlkOptions, VirtioBlk, VIRTIO_ID_BLOCK};
use unidev_transports::export::Export;

use super::{BuildContext, Built, Contract, DeviceOptions, VirtioOptions};

/// `virtio-blk` options.
#[derive(Args, Clone, Debug)]
pub struct VirtioBlkOptions {
    /// The image file or block device.
    #[arg(long)]
    pub file: PathBuf,
    /// Refuse writes (the device advertises VIRTIO_BLK_F_RO).
    #[arg(long)]
    pub readonly: bool,
    /// Number of request queues (one worker thread each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,
    /// Open the file with O_DIRECT.
    #[arg(long)]
    pub direct: bool,
    /// Logical block size in bytes.
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub block_size: u32,
    #[command(flatten)]
    pub virtio: VirtioOptions,
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (512 | 4096)) => Ok(n),
        _ => Err("must be 512 or 4096 (the logical block size)".to_string()),
    }
}

impl DeviceOptions for VirtioBlkOptions {
    const NAME: &'static str = "virtio-blk";
    const ABOUT: &'static str = "A virtio block device on a raw image file or block device";

    fn contract(&self) -> Contract {
        Contract::Virtio {
            device_type: VIRTIO_ID_BLOCK,
        }
    }

    fn validate(&self) -> Vec<String> {
        if self.file.exists() {
            Vec::new()
        } else {
            vec![format!("file {} does not exist", self.file.display())]
        }
    }

    fn virtio(&self) -> Option<&VirtioOptions> {
        Some(&self.virtio)
    }

    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        let file = &self.file;
        let blk = VirtioBlk::new(BlkOptions {
            path: file.clone(),
            readonly: self.readonly,
            queues: self.queues,
            direct: self.direct,
            logical_block_size: self.block_size,
            ..BlkOptions::default()
        })
        .map_err(|e| format!("virtio-blk: {}: {e}", file.display()))?;
        info!(
            "virtio-blk: {} ({} queue(s){}{})",
            file.display(),
            self.queues,
            if self.readonly { ", read-only" } else { "" },
            if self.direct { ", O_DIRECT" } else { "" }
        );
        Ok(Built::Virtio(Export::virtio(
            ctx.name,
            VIRTIO_ID_BLOCK,
            Arc::new(blk),
        )))
    }
}
