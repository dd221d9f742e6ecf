//! `unidev run devices.toml`: many devices in one daemon.
//!
//! The whole file is parsed and checked before anything starts; every problem found is
//! reported with the device it belongs to and its line in the file. Example:
//!
//! ```toml
//! seccomp = "kill"            # optional: off | log | kill (as `serve --seccomp`)
//!
//! [[device]]
//! name = "disk0"              # optional; defaults to "<type>-<index>"
//! type = "virtio-blk"         # gpio | virtio-blk | virtio-rng
//! transport = "vfio-user"     # vfio-user | vhost-user | vduse
//! socket = "/run/unidev/disk0.sock"
//! socket_mode = "0600"        # optional
//! socket_group = "kvm"        # optional: a group name or a numeric gid
//! allow_uids = [107]          # optional: serve only these uids (SO_PEERCRED)
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
//! `max_dma_maps`. `socket` is required for vfio-user and vhost-user, and so are
//! `socket_mode`, `socket_group` (`--socket-group`) and `allow_uids` (`--allow-uid`, at
//! least one uid when given) meant for them; a vduse device has none of these, takes
//! `attach`, and its name must be a valid VDUSE device name (it defaults to
//! "<type>-<index>" like the others). The top-level `seccomp` is the seccomp policy of
//! every device's worker threads (`unidev_core::sandbox`; default "off"). VDUSE carries virtio-blk only (Linux 6.12 accepts
//! virtio-blk and virtio-net; unidev has no net backend).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{DeviceArgs, Transport, VirtioArgs};
use unidev_core::sandbox::SeccompPolicy;
use unidev_transports::export::VduseTarget;
use unidev_transports::vduse::VdpaDriver;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    seccomp: Option<toml::Spanned<String>>,
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
    socket_group: Option<toml::Value>,
    allow_uids: Option<Vec<i64>>,
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
    pub vduse: Option<VduseTarget>,
    /// Socket permission bits.
    pub socket_mode: u32,
    /// Group of the socket.
    pub socket_group: Option<u32>,
    /// Only these uids are served (None: any).
    pub allowed_uids: Option<Vec<u32>>,
    /// Cap on DMA maps.
    pub max_dma_maps: usize,
    /// Device and its options.
    pub device: DeviceArgs,
    /// Where it is in the file (for later errors).
    pub location: String,
}

/// A devices file, validated.
pub struct Config {
    /// The seccomp policy of the worker threads.
    pub seccomp: SeccompPolicy,
    /// The devices, in file order.
    pub devices: Vec<DeviceSpec>,
}

/// `socket_group`: a name, or a gid as a number or a numeric string.
fn parse_socket_group(v: &toml::Value) -> Result<u32, String> {
    match v {
        toml::Value::Integer(n) => u32::try_from(*n)
            .ok()
            .filter(|&g| g != u32::MAX)
            .ok_or_else(|| format!("socket_group {n}: not a valid gid")),
        toml::Value::String(name) => crate::parse_group(name),
        other => Err(format!(
            "socket_group must be a group name or a numeric gid, not {}",
            other.type_str()
        )),
    }
}

/// `allow_uids`: at least one valid uid.
fn parse_allow_uids(uids: &[i64]) -> Result<Vec<u32>, String> {
    if uids.is_empty() {
        return Err(
            "allow_uids is empty: list at least one uid, or leave it out to serve any uid".into(),
        );
    }
    uids.iter()
        .map(|&u| {
            u32::try_from(u)
                .ok()
                .filter(|&u| u != u32::MAX)
                .ok_or_else(|| format!("allow_uids: {u} is not a valid uid"))
        })
        .collect()
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parse and validate `path`. Returns the policy and every device, or every problem
/// found.
pub fn load(path: &Path) -> Result<Config, Vec<String>> {
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
    let seccomp = match &parsed.seccomp {
        None => SeccompPolicy::Off,
        Some(v) => v.get_ref().parse().unwrap_or_else(|e| {
            errors.push(format!(
                "{file}:{}: seccomp: {e}",
                line_of(&text, v.span().start)
            ));
            SeccompPolicy::Off
        }),
    };
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
        for (present, opt) in [
            (d.socket_mode.is_some(), "socket_mode"),
            (d.socket_group.is_some(), "socket_group"),
            (d.allow_uids.is_some(), "allow_uids"),
        ] {
            if is_vduse && present {
                err(format!(
                    "option `{opt}` does not apply to transport \"vduse\""
                ));
            }
        }
        let socket_group = match d.socket_group.as_ref().map(parse_socket_group) {
            Some(Err(e)) => {
                err(e);
                None
            }
            Some(Ok(g)) => Some(g),
            None => None,
        };
        let allowed_uids = match d.allow_uids.as_deref().map(parse_allow_uids) {
            Some(Err(e)) => {
                err(e);
                None
            }
            Some(Ok(u)) => Some(u),
            None => None,
        };
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
                Ok(attach) => {
                    let mut target = VduseTarget::new(name.clone());
                    target.attach = attach;
                    Some(target)
                }
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
                socket_group,
                allowed_uids,
                max_dma_maps: d
                    .max_dma_maps
                    .unwrap_or(unidev_core::memory::DEFAULT_MAX_MAPS),
                device,
                location,
            });
        }
    }
    if errors.is_empty() {
        Ok(Config {
            seccomp,
            devices: specs,
        })
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(tag: &str, text: &str) -> Result<Config, Vec<String>> {
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
        let specs = load_text("ok", &text)
            .unwrap_or_else(|e| panic!("{e:?}"))
            .devices;
        let _ = std::fs::remove_file(&image);
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].transport, Transport::Vduse);
        assert!(specs[0].socket.is_none());
        let v = specs[0].vduse.as_ref().unwrap();
        assert_eq!(v.name, "vdisk0");
        assert_eq!(v.attach, Some(VdpaDriver::VhostVdpa));
        assert_eq!(
            v.control_path,
            PathBuf::from(unidev_transports::vduse::DEFAULT_CONTROL_PATH)
        );
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

    fn image(tag: &str) -> PathBuf {
        let image =
            std::env::temp_dir().join(format!("unidev-config-{}-{tag}.img", std::process::id()));
        std::fs::write(&image, [0u8; 512]).unwrap();
        image
    }

    #[test]
    fn the_seccomp_policy_is_read_and_an_unknown_one_is_an_error_with_its_line() {
        let device = "[[device]]\ntype = \"virtio-rng\"\ntransport = \"vhost-user\"\n\
                      socket = \"/tmp/unidev-config-rng.sock\"\n";
        for (line, want) in [
            ("", SeccompPolicy::Off),
            ("seccomp = \"off\"\n", SeccompPolicy::Off),
            ("seccomp = \"log\"\n", SeccompPolicy::Log),
            ("seccomp = \"kill\"\n", SeccompPolicy::Kill),
        ] {
            let config = load_text("seccomp", &format!("{line}{device}"))
                .unwrap_or_else(|e| panic!("{line:?}: {e:?}"));
            assert_eq!(config.seccomp, want, "{line:?}");
            assert_eq!(config.devices.len(), 1);
        }
        let errors = match load_text("seccomp-bad", &format!("\nseccomp = \"strict\"\n{device}")) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        };
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].ends_with(
                "devices.toml:2: seccomp: unknown seccomp policy \"strict\" (off, log or kill)"
            ),
            "{errors:?}"
        );
        // Not a string: the parser names the line.
        let errors = match load_text("seccomp-int", &format!("seccomp = 2\n{device}")) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        };
        assert!(errors[0].contains("devices.toml:1:"), "{errors:?}");
    }

    #[test]
    fn socket_group_and_allow_uids_per_device() {
        let img = image("peers");
        let text = format!(
            "[[device]]\nname = \"a\"\ntype = \"virtio-blk\"\ntransport = \"vfio-user\"\n\
             socket = \"/tmp/unidev-config-a.sock\"\nfile = \"{img}\"\n\
             socket_mode = \"0660\"\nsocket_group = 4242\nallow_uids = [0, 107]\n\
             [[device]]\nname = \"b\"\ntype = \"virtio-rng\"\ntransport = \"vhost-user\"\n\
             socket = \"/tmp/unidev-config-b.sock\"\nsocket_group = \"root\"\n\
             [[device]]\nname = \"c\"\ntype = \"gpio\"\ntransport = \"vfio-user\"\n\
             socket = \"/tmp/unidev-config-c.sock\"\nsocket_group = \"4243\"\n\
             [[device]]\nname = \"d\"\ntype = \"gpio\"\ntransport = \"vfio-user\"\n\
             socket = \"/tmp/unidev-config-d.sock\"\n",
            img = img.display()
        );
        let specs = load_text("peers", &text)
            .unwrap_or_else(|e| panic!("{e:?}"))
            .devices;
        let _ = std::fs::remove_file(&img);
        let got: Vec<_> = specs
            .iter()
            .map(|s| (s.socket_mode, s.socket_group, s.allowed_uids.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (0o660, Some(4242), Some(vec![0, 107])),
                (0o600, Some(0), None),
                (0o600, Some(4243), None),
                (0o600, None, None),
            ]
        );
    }

    #[test]
    fn bad_socket_groups_and_uid_lists_are_reported_with_their_device_and_line() {
        let img = image("peers-bad");
        let text = format!(
            "[[device]]\nname = \"a\"\ntype = \"gpio\"\ntransport = \"vfio-user\"\n\
             socket = \"/tmp/unidev-config-a.sock\"\nsocket_group = \"no-such-group-here\"\n\
             allow_uids = []\n\
             [[device]]\nname = \"b\"\ntype = \"gpio\"\ntransport = \"vfio-user\"\n\
             socket = \"/tmp/unidev-config-b.sock\"\nsocket_group = -1\nallow_uids = [1, -5]\n\
             [[device]]\nname = \"c\"\ntype = \"gpio\"\ntransport = \"vfio-user\"\n\
             socket = \"/tmp/unidev-config-c.sock\"\nsocket_group = true\n\
             allow_uids = [4294967295]\n\
             [[device]]\nname = \"v\"\ntype = \"virtio-blk\"\ntransport = \"vduse\"\n\
             file = \"{img}\"\nsocket_group = 4242\nallow_uids = [0]\n",
            img = img.display()
        );
        let errors = match load_text("peers-bad", &text) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        };
        let _ = std::fs::remove_file(&img);
        let all = errors.join("\n");
        for want in [
            "devices.toml:1: device \"a\": no group named \"no-such-group-here\"",
            "devices.toml:1: device \"a\": allow_uids is empty",
            "devices.toml:8: device \"b\": socket_group -1: not a valid gid",
            "devices.toml:8: device \"b\": allow_uids: -5 is not a valid uid",
            "devices.toml:15: device \"c\": socket_group must be a group name or a numeric \
             gid, not boolean",
            "devices.toml:15: device \"c\": allow_uids: 4294967295 is not a valid uid",
            "devices.toml:22: device \"v\": option `socket_group` does not apply to transport \
             \"vduse\"",
            "devices.toml:22: device \"v\": option `allow_uids` does not apply to transport \
             \"vduse\"",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert_eq!(errors.len(), 8, "{all}");
    }
}
