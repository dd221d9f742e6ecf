//! `vhost-user-proxy`: an existing vhost-user backend process presented as a virtio-pci
//! device (`unidev_compat::vhost_user_proxy`).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use log::info;
use unidev_compat::vhost_user_proxy::{ProxyOptions, VhostUserProxy};
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::config::ConfigValues;
use unidev_transports::export::Export;
use unidev_transports::transport::TransportKind;

use super::{BuildContext, Built, Contract, DeviceOptions};

/// `vhost-user-proxy` options.
#[derive(Args, Clone, Debug)]
pub struct VhostUserProxyOptions {
    /// The backend process's vhost-user socket.
    #[arg(long)]
    pub backend_socket: PathBuf,
    /// Virtio device type of the backend (2 = block, 4 = entropy, 26 = fs, ...).
    #[arg(long)]
    pub virtio_id: u32,
    /// Number of queues to use.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=128))]
    pub queues: u16,
    /// Largest queue size offered to the driver: at most the backend's own maximum
    /// (vhost-user cannot ask for it; a larger ring makes the backend refuse
    /// SET_VRING_NUM). A power of two; vhost-device-scsi takes 128, vhost-device-sound 64.
    #[arg(long, default_value_t = ProxyOptions::default().max_queue_size,
        value_parser = parse_queue_size)]
    pub max_queue_size: u16,
    /// A field of the device configuration unidev keeps for a backend that does not
    /// serve its own (no vhost-user CONFIG protocol feature; virtiofsd, for one):
    /// NAME=VALUE, e.g. `tag=share0` for virtio-fs. Repeatable; the fields are the
    /// spec's for the device type (`unidev_core::virtio::config`).
    #[arg(long = "config", value_name = "NAME=VALUE", value_parser = parse_config_pair)]
    pub config: Vec<(String, String)>,
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|e| format!("{e}"))?;
    if n == 0 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two"));
    }
    Ok(n)
}

fn parse_config_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_string(), value.to_string())),
        _ => Err("a config value is NAME=VALUE".to_string()),
    }
}

impl DeviceOptions for VhostUserProxyOptions {
    const NAME: &'static str = "vhost-user-proxy";
    const ABOUT: &'static str = "An existing vhost-user backend process (qemu-storage-daemon, \
        vhost-device-*, virtiofsd) presented as a virtio-pci device: unidev is its vhost-user \
        frontend and passes memory fds, kick and call eventfds through (no copies)";

    fn contract(&self) -> Contract {
        Contract::Virtio {
            device_type: self.virtio_id,
        }
    }

    /// The proxy exists to put a vhost-user backend behind a PCI transport.
    fn check_transport(&self, transport: &dyn TransportKind) -> Result<(), String> {
        if transport.carries_virtio_pci() {
            Ok(())
        } else {
            Err(
                "vhost-user-proxy puts a vhost-user backend behind vfio-user: use --transport \
                 vfio-user"
                    .into(),
            )
        }
    }

    fn device_config(&self) -> ConfigValues {
        self.config
            .iter()
            .fold(ConfigValues::new(), |v, (name, value)| v.set(name, value))
    }

    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        let socket = &self.backend_socket;
        let dma = Arc::new(DmaSpace::new(ctx.max_dma_maps));
        let options = ProxyOptions {
            max_queue_size: self.max_queue_size,
            ..ProxyOptions::default()
        };
        let proxy = VhostUserProxy::connect_with(
            socket,
            self.virtio_id,
            usize::from(self.queues),
            dma.clone(),
            options,
        )
        .map_err(|e| {
            format!(
                "vhost-user-proxy: cannot use the backend at {}: {e}",
                socket.display()
            )
        })?;
        info!(
            "vhost-user-proxy: virtio device type {} at {}",
            self.virtio_id,
            socket.display()
        );
        Ok(Built::Virtio(Export::virtio_device(ctx.name, proxy, dma)))
    }
}
