//! `unidev run devices.toml`: many devices in one daemon.
//!
//! The whole file is parsed and checked before anything starts; every problem found is
//! reported with the device it belongs to and its line in the file. Example:
//!
//! ```toml
//! [[device]]
//! name = "disk0"              # optional; defaults to "<type>-<index>"
//! type = "virtio-blk"         # gpio | virtio-blk | virtio-rng
//! transport = "vfio-user"     # vfio-user | vhost-user | vduse
//! socket = "/run/unidev/disk0.sock"
//! socket_mode = "0600"        # optional
//! file = "/var/lib/images/disk0.img"
//! queues = 2
//!
//! [[device]]
//! name = "vdisk1"             # the VDUSE device: /dev/vduse/vdisk1, vDPA device vdisk1
//! type = "virtio-blk"
//! transport = "vduse"         # no socket: the device lives in the kernel
//! attach = "virtio-vdpa"      # optional: virtio-vdpa | vhost-vdpa (as `serve --attach`)
//! file = "/var/lib/images/disk1.img"
//! ```
//!
//! Device options are the `unidev serve` options of the same name (with `_` for `-`):
//! gpio: `inputs`; virtio-blk: `file`, `readonly`, `queues`, `direct`, `block_size`,
//! `poll_us`, `notify_mmap`; virtio-rng: `poll_us`, `notify_mmap`; every device:
//! `max_dma_maps`. `socket` is required for vfio-user and vhost-user; a vduse device has
//! none, takes `attach`, and its name must be a valid VDUSE device name (it defaults to
//! "<type>-<index>" like the others). VDUSE carries virtio-blk only (Linux 6.12 accepts
//! virtio-blk and virtio-net; unidev has no net backend).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::vduse::VduseSettings;
use crate::{DeviceArgs, Transport, VirtioArgs};
use unidev_transports::vduse::{VdpaDriver, DEFAULT_CONTROL_PATH};

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
    socket: Option<PathBuf>,
    socket_mode: Option<String>,
    attach: Option<String>,
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
    /// Listening socket (vfio-user, vhost-user).
    pub socket: Option<PathBuf>,
    /// The kernel device (vduse).
    pub vduse: Option<VduseSettings>,
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
        if let Some(socket) = &d.socket {
            if let Some(first) = sockets.insert(socket.clone(), location.clone()) {
                err(format!(
                    "socket {} is already used ({first})",
                    socket.display()
                ));
            }
        }
        let transport = match d.transport.as_str() {
            "vfio-user" => Some(Transport::VfioUser),
            "vhost-user" => Some(Transport::VhostUser),
            "vduse" => Some(Transport::Vduse),
            other => {
                err(format!(
                    "unknown transport {other:?} (vfio-user, vhost-user or vduse)"
                ));
                None
            }
        };
        let is_vduse = transport == Some(Transport::Vduse);
        match (&d.socket, is_vduse) {
            (None, false) if transport.is_some() => {
                err(format!("transport {} needs `socket`", d.transport))
            }
            (Some(_), true) => err(
                "option `socket` does not apply to transport \"vduse\" (the device lives \
                 in the kernel)"
                    .into(),
            ),
            _ => {}
        }
        if is_vduse && d.socket_mode.is_some() {
            err("option `socket_mode` does not apply to transport \"vduse\"".into());
        }
        if !is_vduse && d.attach.is_some() {
            err("option `attach` applies to transport \"vduse\" only".into());
        }
        let vduse = if is_vduse {
            if let Err(e) = unidev_transports::vduse::control::check_name(&name) {
                err(e.to_string());
            }
            let attach = match d.attach.as_deref() {
                None => Ok(None),
                Some("virtio-vdpa") => Ok(Some(VdpaDriver::VirtioVdpa)),
                Some("vhost-vdpa") => Ok(Some(VdpaDriver::VhostVdpa)),
                Some(other) => Err(other),
            };
            match attach {
                Ok(attach) => Some(VduseSettings {
                    name: name.clone(),
                    attach,
                    control: PathBuf::from(DEFAULT_CONTROL_PATH),
                }),
                Err(other) => {
                    err(format!(
                        "attach {other:?}: must be \"virtio-vdpa\" or \"vhost-vdpa\""
                    ));
                    None
                }
            }
        } else {
            None
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
                if matches!(transport, Some(Transport::VhostUser | Transport::Vduse)) {
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
                if is_vduse {
                    err(
                        "virtio-rng cannot be served over VDUSE (Linux 6.12 accepts virtio-blk \
                         and virtio-net only)"
                            .into(),
                    );
                }
                Some(DeviceArgs::VirtioRng { virtio })
            }
            other => {
                err(format!(
                    "unknown device type {other:?} (gpio, virtio-blk or virtio-rng)"
                ));
                None
            }
        };
        if virtio.notify_mmap && matches!(transport, Some(Transport::VhostUser | Transport::Vduse))
        {
            errors.push(format!(
                "{location}: notify_mmap applies to the vfio-user transport only"
            ));
        }
        if is_vduse && vduse.is_none() {
            continue;
        }
        if let (Some(transport), Some(device)) = (transport, device) {
            specs.push(DeviceSpec {
                name,
                transport,
                socket: d.socket.clone(),
                vduse,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(tag: &str, text: &str) -> Result<Vec<DeviceSpec>, Vec<String>> {
        let dir = std::env::temp_dir().join(format!("unidev-config-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("devices.toml");
        std::fs::write(&path, text).unwrap();
        let r = load(&path);
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    #[test]
    fn a_vduse_device_has_a_name_and_an_attach_driver_and_no_socket() {
        let image = std::env::temp_dir().join(format!("unidev-config-{}.img", std::process::id()));
        std::fs::write(&image, [0u8; 512]).unwrap();
        let text = format!(
            "[[device]]\nname = \"vdisk0\"\ntype = \"virtio-blk\"\ntransport = \"vduse\"\n\
             attach = \"vhost-vdpa\"\nfile = \"{img}\"\nqueues = 2\n\
             [[device]]\ntype = \"virtio-blk\"\ntransport = \"vduse\"\nfile = \"{img}\"\n",
            img = image.display()
        );
        let specs = load_text("ok", &text).unwrap_or_else(|e| panic!("{e:?}"));
        let _ = std::fs::remove_file(&image);
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].transport, Transport::Vduse);
        assert!(specs[0].socket.is_none());
        let v = specs[0].vduse.as_ref().unwrap();
        assert_eq!(v.name, "vdisk0");
        assert_eq!(v.attach, Some(VdpaDriver::VhostVdpa));
        assert_eq!(v.control, PathBuf::from(DEFAULT_CONTROL_PATH));
        assert!(matches!(
            specs[0].device,
            DeviceArgs::VirtioBlk { queues: 2, .. }
        ));
        // Unnamed: the default name, which is a valid VDUSE name; not attached.
        let v = specs[1].vduse.as_ref().unwrap();
        assert_eq!(v.name, "virtio-blk-1");
        assert_eq!(v.attach, None);
    }

    #[test]
    fn vduse_mistakes_are_all_reported_with_their_device_and_line() {
        let text = "\
[[device]]
name = \"a\"
type = \"virtio-blk\"
transport = \"vduse\"
socket = \"/tmp/a.sock\"
socket_mode = \"0600\"
attach = \"vhost-user\"
file = \"/nonexistent.img\"

[[device]]
name = \"b\"
type = \"virtio-rng\"
transport = \"vduse\"

[[device]]
name = \"c\"
type = \"virtio-blk\"
transport = \"vfio-user\"
attach = \"virtio-vdpa\"
file = \"/nonexistent.img\"

[[device]]
name = \"bad name\"
type = \"gpio\"
transport = \"vduse\"

[[device]]
name = \"e\"
type = \"virtio-rng\"
transport = \"vhost-user\"
";
        let errors = match load_text("bad", text) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        };
        let all = errors.join("\n");
        for want in [
            "devices.toml:1: device \"a\": option `socket` does not apply to transport \"vduse\"",
            "devices.toml:1: device \"a\": option `socket_mode` does not apply",
            "devices.toml:1: device \"a\": attach \"vhost-user\": must be",
            "devices.toml:10: device \"b\": virtio-rng cannot be served over VDUSE",
            "devices.toml:15: device \"c\": option `attach` applies to transport \"vduse\" only",
            "devices.toml:22: device \"bad name\": invalid VDUSE device name",
            "devices.toml:22: device \"bad name\": gpio is a full PCI device",
            "devices.toml:27: device \"e\": transport vhost-user needs `socket`",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }
}
