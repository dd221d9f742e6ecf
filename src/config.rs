//! `unidev run devices.toml`: many devices in one daemon.
//!
//! The whole file is parsed and checked before anything starts; every problem found is
//! reported with the device it belongs to and its line in the file. Example:
//!
//! ```toml
//! [[device]]
//! name = "disk0"              # optional; defaults to "<type>-<index>"
//! type = "virtio-blk"         # gpio | virtio-blk | virtio-rng
//! transport = "vfio-user"     # vfio-user | vhost-user
//! socket = "/run/unidev/disk0.sock"
//! socket_mode = "0600"        # optional
//! file = "/var/lib/images/disk0.img"
//! queues = 2
//! ```
//!
//! Device options are the `unidev serve` options of the same name (with `_` for `-`):
//! gpio: `inputs`; virtio-blk: `file`, `readonly`, `queues`, `direct`, `block_size`,
//! `poll_us`, `notify_mmap`; virtio-rng: `poll_us`, `notify_mmap`; every device:
//! `max_dma_maps`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{DeviceArgs, Transport, VirtioArgs};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    device: Vec<toml::Spanned<DeviceEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceEntry {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    transport: String,
    socket: PathBuf,
    socket_mode: Option<String>,
    max_dma_maps: Option<usize>,
    inputs: Option<String>,
    file: Option<PathBuf>,
    readonly: Option<bool>,
    queues: Option<u16>,
    direct: Option<bool>,
    block_size: Option<u32>,
    poll_us: Option<u64>,
    notify_mmap: Option<bool>,
}

/// One device of the file, validated.
pub struct DeviceSpec {
    /// Unique name (logs).
    pub name: String,
    /// Transport.
    pub transport: Transport,
    /// Listening socket.
    pub socket: PathBuf,
    /// Socket permission bits.
    pub socket_mode: u32,
    /// Cap on DMA maps.
    pub max_dma_maps: usize,
    /// Device and its options.
    pub device: DeviceArgs,
    /// Where it is in the file (for later errors).
    pub location: String,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parse and validate `path`. Returns every device, or every problem found.
pub fn load(path: &Path) -> Result<Vec<DeviceSpec>, Vec<String>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{file}: {e}")])?;
    let parsed: ConfigFile = toml::from_str(&text).map_err(|e| {
        let at = e
            .span()
            .map(|s| format!(":{}", line_of(&text, s.start)))
            .unwrap_or_default();
        vec![format!("{file}{at}: {}", e.message())]
    })?;
    if parsed.device.is_empty() {
        return Err(vec![format!("{file}: no [[device]] entries")]);
    }
    let mut errors = Vec::new();
    let mut specs = Vec::new();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut sockets: HashMap<PathBuf, String> = HashMap::new();
    for (i, spanned) in parsed.device.iter().enumerate() {
        let line = line_of(&text, spanned.span().start);
        let d = spanned.get_ref();
        let name = d
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{}", d.kind, i));
        let location = format!("{file}:{line}: device {name:?}");
        let mut err = |msg: String| errors.push(format!("{location}: {msg}"));
        if let Some(first) = names.insert(name.clone(), location.clone()) {
            err(format!("the name is already used ({first})"));
        }
        if let Some(first) = sockets.insert(d.socket.clone(), location.clone()) {
            err(format!(
                "socket {} is already used ({first})",
                d.socket.display()
            ));
        }
        let transport = match d.transport.as_str() {
            "vfio-user" => Some(Transport::VfioUser),
            "vhost-user" => Some(Transport::VhostUser),
            other => {
                err(format!(
                    "unknown transport {other:?} (vfio-user or vhost-user)"
                ));
                None
            }
        };
        let socket_mode = match d.socket_mode.as_deref().map(crate::parse_mode) {
            None => 0o600,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                err(e);
                0o600
            }
        };
        let virtio = VirtioArgs {
            poll_us: d.poll_us.unwrap_or(0),
            notify_mmap: d.notify_mmap.unwrap_or(false),
        };
        // Options that do not belong to this type.
        let mut reject = |present: bool, opt: &str| {
            if present {
                err(format!("option `{opt}` does not apply to {}", d.kind));
            }
        };
        let device = match d.kind.as_str() {
            "gpio" => {
                reject(d.file.is_some(), "file");
                reject(d.readonly.is_some(), "readonly");
                reject(d.queues.is_some(), "queues");
                reject(d.direct.is_some(), "direct");
                reject(d.block_size.is_some(), "block_size");
                reject(d.poll_us.is_some(), "poll_us");
                reject(d.notify_mmap.is_some(), "notify_mmap");
                if transport == Some(Transport::VhostUser) {
                    err("gpio is a full PCI device: it needs transport = \"vfio-user\"".into());
                }
                match d.inputs.as_deref().map(crate::parse_hex16) {
                    None => Some(DeviceArgs::Gpio { inputs: 0 }),
                    Some(Ok(inputs)) => Some(DeviceArgs::Gpio { inputs }),
                    Some(Err(e)) => {
                        err(e);
                        None
                    }
                }
            }
            "virtio-blk" => {
                reject(d.inputs.is_some(), "inputs");
                let block_size = d.block_size.unwrap_or(512);
                let queues = d.queues.unwrap_or(1);
                let mut ok = true;
                if !matches!(block_size, 512 | 4096) {
                    err(format!("block_size {block_size}: must be 512 or 4096"));
                    ok = false;
                }
                if !(1..=64).contains(&queues) {
                    err(format!("queues {queues}: must be 1 to 64"));
                    ok = false;
                }
                match &d.file {
                    None => {
                        err("virtio-blk needs `file`".into());
                        None
                    }
                    Some(f) if !f.exists() => {
                        err(format!("file {} does not exist", f.display()));
                        None
                    }
                    Some(f) if ok => Some(DeviceArgs::VirtioBlk {
                        file: f.clone(),
                        readonly: d.readonly.unwrap_or(false),
                        queues,
                        direct: d.direct.unwrap_or(false),
                        block_size,
                        virtio,
                    }),
                    Some(_) => None,
                }
            }
            "virtio-rng" => {
                reject(d.inputs.is_some(), "inputs");
                reject(d.file.is_some(), "file");
                reject(d.readonly.is_some(), "readonly");
                reject(d.queues.is_some(), "queues");
                reject(d.direct.is_some(), "direct");
                reject(d.block_size.is_some(), "block_size");
                Some(DeviceArgs::VirtioRng { virtio })
            }
            other => {
                err(format!(
                    "unknown device type {other:?} (gpio, virtio-blk or virtio-rng)"
                ));
                None
            }
        };
        if virtio.notify_mmap && transport == Some(Transport::VhostUser) {
            errors.push(format!(
                "{location}: notify_mmap applies to the vfio-user transport only"
            ));
        }
        if let (Some(transport), Some(device)) = (transport, device) {
            specs.push(DeviceSpec {
                name,
                transport,
                socket: d.socket.clone(),
                socket_mode,
                max_dma_maps: d
                    .max_dma_maps
                    .unwrap_or(unidev_core::memory::DEFAULT_MAX_MAPS),
                device,
                location,
            });
        }
    }
    if errors.is_empty() {
        Ok(specs)
    } else {
        Err(errors)
    }
}
