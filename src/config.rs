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
//! type = "virtio-blk"         # gpio | virtio-blk | virtio-rng | vhost-user-proxy
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
//! A device's options are its `unidev serve <DEVICE>` options, with `_` for `-`
//! (`--block-size 4096` is `block_size = 4096`; a flag is `true` or `false`), parsed by
//! the very same definitions (`devices/`): gpio: `inputs`; virtio-blk: `file`,
//! `readonly`, `queues`, `direct`, `block_size`, `poll_us`, `notify_mmap`; virtio-rng:
//! `poll_us`, `notify_mmap`; vhost-user-proxy: `backend_socket`, `virtio_id`, `queues`,
//! `max_queue_size`.
//! Every device also takes `max_dma_maps`. A transport that listens on a socket
//! (vfio-user, vhost-user) needs `socket`, and `socket_mode`, `socket_group`
//! (`--socket-group`) and `allow_uids` (`--allow-uid`, at least one uid when given) are
//! meant for it; a vduse device has none of these, takes `attach`, and its name must be a
//! valid VDUSE device name (it defaults to "<type>-<index>" like the others). Which
//! device fits which transport comes from the device and the transports' list (VDUSE
//! carries virtio-blk only here: Linux 6.12 accepts virtio-blk and virtio-net, and unidev
//! has no net backend). The top-level `seccomp` is the seccomp policy of every device's
//! worker threads (`unidev_core::sandbox`; default "off").

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::devices::{self, Device};
use unidev_core::sandbox::SeccompPolicy;
use unidev_transports::export::Vduse;
use unidev_transports::transport::{transport_named, transport_names, AddressKind, TransportKind};
use unidev_transports::vduse::VdpaDriver;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    seccomp: Option<toml::Spanned<String>>,
    #[serde(default)]
    device: Vec<toml::Spanned<BTreeMap<String, toml::Spanned<toml::Value>>>>,
}

/// The keys of a `[[device]]` table that are the daemon's, not the device's.
const DAEMON_KEYS: &[&str] = &[
    "name",
    "type",
    "transport",
    "socket",
    "socket_mode",
    "socket_group",
    "allow_uids",
    "attach",
    "max_dma_maps",
];

/// One device of the file, validated.
pub struct DeviceSpec {
    /// Unique name (logs).
    pub name: String,
    /// Transport.
    pub transport: &'static dyn TransportKind,
    /// Listening socket (transports that take one).
    pub socket: Option<PathBuf>,
    /// The kernel device (vduse).
    pub vduse: Option<Vduse>,
    /// Socket permission bits.
    pub socket_mode: u32,
    /// Group of the socket.
    pub socket_group: Option<u32>,
    /// Only these uids are served (None: any).
    pub allowed_uids: Option<Vec<u32>>,
    /// Cap on DMA maps.
    pub max_dma_maps: usize,
    /// Device and its options.
    pub device: Box<dyn Device>,
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
fn parse_allow_uids(v: &toml::Value) -> Result<Vec<u32>, String> {
    let toml::Value::Array(uids) = v else {
        return Err(format!(
            "allow_uids must be a list of uids, not {}",
            v.type_str()
        ));
    };
    if uids.is_empty() {
        return Err(
            "allow_uids is empty: list at least one uid, or leave it out to serve any uid".into(),
        );
    }
    uids.iter()
        .map(|u| {
            u.as_integer()
                .and_then(|u| u32::try_from(u).ok())
                .filter(|&u| u != u32::MAX)
                .ok_or_else(|| format!("allow_uids: {u} is not a valid uid"))
        })
        .collect()
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// A `[[device]]` table's keys, with their values and lines.
struct Table<'a> {
    entries: &'a BTreeMap<String, toml::Spanned<toml::Value>>,
    text: &'a str,
}

impl Table<'_> {
    fn get(&self, key: &str) -> Option<&toml::Value> {
        self.entries.get(key).map(|v| v.get_ref())
    }

    fn line(&self, key: &str) -> Option<usize> {
        self.entries
            .get(key)
            .map(|v| line_of(self.text, v.span().start))
    }
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
    let mut checker = Checker {
        file: &file,
        names: HashMap::new(),
        sockets: HashMap::new(),
        errors: Vec::new(),
    };
    let seccomp = match &parsed.seccomp {
        None => SeccompPolicy::Off,
        Some(v) => v.get_ref().parse().unwrap_or_else(|e| {
            checker.errors.push(format!(
                "{file}:{}: seccomp: {e}",
                line_of(&text, v.span().start)
            ));
            SeccompPolicy::Off
        }),
    };
    let mut specs = Vec::new();
    for (i, spanned) in parsed.device.iter().enumerate() {
        let table = Table {
            entries: spanned.get_ref(),
            text: &text,
        };
        let line = line_of(&text, spanned.span().start);
        if let Some(spec) = checker.device(i, line, &table) {
            specs.push(spec);
        }
    }
    if checker.errors.is_empty() {
        Ok(Config {
            seccomp,
            devices: specs,
        })
    } else {
        Err(checker.errors)
    }
}

/// The checks that span the whole file (unique names and sockets), and every problem
/// found.
struct Checker<'a> {
    file: &'a str,
    names: HashMap<String, String>,
    sockets: HashMap<PathBuf, String>,
    errors: Vec<String>,
}

/// One `[[device]]` table being checked: its problems, each reported as
/// `FILE:LINE: device "NAME": ...` with the table's line (or, for an unknown key, the
/// key's).
struct DeviceCheck<'a> {
    name: String,
    location: String,
    file: &'a str,
    problems: Vec<String>,
}

impl DeviceCheck<'_> {
    fn err(&mut self, message: impl Into<String>) {
        let message = message.into();
        self.problems.push(format!("{}: {message}", self.location));
    }

    fn err_at_line(&mut self, line: usize, message: &str) {
        self.problems.push(format!(
            "{}:{line}: device {:?}: {message}",
            self.file, self.name
        ));
    }

    /// The string at `key`; an error if it is something else.
    fn string(&mut self, table: &Table, key: &str) -> Option<String> {
        match table.get(key)? {
            toml::Value::String(s) => Some(s.clone()),
            other => {
                self.err(format!(
                    "`{key}` must be a string, not {}",
                    other.type_str()
                ));
                None
            }
        }
    }
}

impl Checker<'_> {
    /// Check table number `index` (at `line`); the device, if nothing is wrong with it.
    fn device(&mut self, index: usize, line: usize, table: &Table) -> Option<DeviceSpec> {
        let kind_name = match table.get("type") {
            Some(toml::Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let name = match table.get("name") {
            Some(toml::Value::String(s)) => s.clone(),
            _ => format!("{}-{index}", kind_name.as_deref().unwrap_or("device")),
        };
        let location = format!("{}:{line}: device {name:?}", self.file);
        let mut d = DeviceCheck {
            name: name.clone(),
            location: location.clone(),
            file: self.file,
            problems: Vec::new(),
        };
        let spec = self.check(&mut d, table, kind_name);
        let ok = d.problems.is_empty();
        self.errors.append(&mut d.problems);
        spec.filter(|_| ok)
    }

    fn check(
        &mut self,
        d: &mut DeviceCheck,
        table: &Table,
        kind_name: Option<String>,
    ) -> Option<DeviceSpec> {
        let _ = d.string(table, "name");
        if let Some(first) = self.names.insert(d.name.clone(), d.location.clone()) {
            d.err(format!("the name is already used ({first})"));
        }
        let socket = d.string(table, "socket").map(PathBuf::from);
        if let Some(socket) = &socket {
            if let Some(first) = self.sockets.insert(socket.clone(), d.location.clone()) {
                d.err(format!(
                    "socket {} is already used ({first})",
                    socket.display()
                ));
            }
        }
        let transport = match d.string(table, "transport") {
            None => {
                if table.get("transport").is_none() {
                    d.err(format!("`transport` is missing ({})", transport_names()));
                }
                None
            }
            Some(t) => {
                let found = transport_named(&t);
                if found.is_none() {
                    d.err(format!("unknown transport {t:?} ({})", transport_names()));
                }
                found
            }
        };
        let transport_name = transport.map_or("", |t| t.name());
        let address = transport.map(|t| t.address());
        let kernel = address == Some(AddressKind::Vduse);
        match (&socket, address) {
            (None, Some(AddressKind::Socket)) => {
                d.err(format!("transport {transport_name} needs `socket`"))
            }
            (Some(_), Some(AddressKind::Vduse)) => d.err(format!(
                "option `socket` does not apply to transport \"{transport_name}\" (the device \
                 lives in the kernel)"
            )),
            _ => {}
        }
        if kernel {
            for opt in ["socket_mode", "socket_group", "allow_uids"] {
                if table.get(opt).is_some() {
                    d.err(format!(
                        "option `{opt}` does not apply to transport \"{transport_name}\""
                    ));
                }
            }
        }
        let socket_group = match table.get("socket_group").map(parse_socket_group) {
            Some(Err(e)) => {
                d.err(e);
                None
            }
            Some(Ok(g)) => Some(g),
            None => None,
        };
        let allowed_uids = match table.get("allow_uids").map(parse_allow_uids) {
            Some(Err(e)) => {
                d.err(e);
                None
            }
            Some(Ok(u)) => Some(u),
            None => None,
        };
        let attach = d.string(table, "attach");
        if !kernel && attach.is_some() {
            d.err("option `attach` applies to transport \"vduse\" only");
        }
        let vduse = if kernel {
            if let Err(e) = unidev_transports::vduse::control::check_name(&d.name) {
                d.err(e.to_string());
            }
            let driver = match attach.as_deref() {
                None => Ok(None),
                Some("virtio-vdpa") => Ok(Some(VdpaDriver::VirtioVdpa)),
                Some("vhost-vdpa") => Ok(Some(VdpaDriver::VhostVdpa)),
                Some(other) => Err(other),
            };
            match driver {
                Ok(driver) => {
                    let mut target = Vduse::new(d.name.clone());
                    target.attach = driver;
                    Some(target)
                }
                Err(other) => {
                    d.err(format!(
                        "attach {other:?}: must be \"virtio-vdpa\" or \"vhost-vdpa\""
                    ));
                    None
                }
            }
        } else {
            None
        };
        let socket_mode = match d
            .string(table, "socket_mode")
            .map(|m| crate::parse_mode(&m))
        {
            None => 0o600,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                d.err(e);
                0o600
            }
        };
        let max_dma_maps = match table.get("max_dma_maps") {
            None => unidev_core::memory::DEFAULT_MAX_MAPS,
            Some(v) => match v.as_integer().and_then(|n| usize::try_from(n).ok()) {
                Some(n) => n,
                None => {
                    d.err(format!("max_dma_maps {v}: not a count of maps"));
                    unidev_core::memory::DEFAULT_MAX_MAPS
                }
            },
        };
        let device = self.options(d, table, kind_name, transport);
        Some(DeviceSpec {
            name: d.name.clone(),
            transport: transport?,
            socket,
            vduse: if kernel { Some(vduse?) } else { None },
            socket_mode,
            socket_group,
            allowed_uids,
            max_dma_maps,
            device: device?,
            location: d.location.clone(),
        })
    }

    /// The device of type `kind_name`, configured by every key that is not the
    /// daemon's, checked against `transport`.
    fn options(
        &self,
        d: &mut DeviceCheck,
        table: &Table,
        kind_name: Option<String>,
        transport: Option<&'static dyn TransportKind>,
    ) -> Option<Box<dyn Device>> {
        // A key that is nobody's option (a typo) is reported at its own line, whatever
        // the type.
        let mut options: BTreeMap<String, toml::Value> = BTreeMap::new();
        for (key, value) in table.entries {
            if DAEMON_KEYS.contains(&key.as_str()) {
                continue;
            }
            if devices::is_option(key) {
                options.insert(key.clone(), value.get_ref().clone());
            } else {
                d.err_at_line(
                    table.line(key).unwrap_or(0),
                    &format!("unknown option `{key}`"),
                );
            }
        }
        let kind_name = match (kind_name, table.get("type")) {
            (Some(k), _) => k,
            (None, None) => {
                d.err(format!("`type` is missing ({})", devices::kind_names()));
                return None;
            }
            (None, Some(other)) => {
                d.err(format!("`type` must be a string, not {}", other.type_str()));
                return None;
            }
        };
        let Some(kind) = devices::kind_named(&kind_name) else {
            d.err(format!(
                "unknown device type {kind_name:?} ({})",
                devices::kind_names()
            ));
            return None;
        };
        let (device, key_errors) = kind.configure_from_table(&options);
        for e in key_errors {
            d.err(e);
        }
        let device = device?;
        if let Some(transport) = transport {
            if let Err(e) = device.check_transport(transport) {
                d.err(e);
            }
        }
        for problem in device.validate() {
            d.err(problem);
        }
        Some(device)
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
        assert_eq!(specs[0].transport.name(), "vduse");
        assert!(specs[0].socket.is_none());
        let v = specs[0].vduse.as_ref().unwrap();
        assert_eq!(v.name, "vdisk0");
        assert_eq!(v.attach, Some(VdpaDriver::VhostVdpa));
        assert_eq!(
            v.control_path,
            PathBuf::from(unidev_transports::vduse::DEFAULT_CONTROL_PATH)
        );
        assert_eq!(specs[0].device.kind(), "virtio-blk");
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
            "devices.toml:10: device \"b\": virtio device type 4 (virtio-rng) cannot be served over VDUSE",
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
