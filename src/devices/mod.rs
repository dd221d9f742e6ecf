//! The daemon's devices: one registry that the command line (`unidev serve <DEVICE>`) and
//! the devices file (`type = "<DEVICE>"`) are both generated from.
//!
//! Each device kind is one file here with one options struct (`#[derive(clap::Args)]`):
//! its fields are the device's options — `--block-size` on the command line,
//! `block_size` in a devices file — with their defaults, ranges and parsers written once.
//! A devices file's keys are turned into the same arguments and parsed by the same
//! definition ([`DeviceKind::configure_from_table`]), so the two can never drift. The options
//! struct implements [`DeviceOptions`]: what the device presents (a PCI function, or a
//! virtio device of some type — which decides the transports it fits, from the
//! transports' own list), any further check, and how to build it as an export.
//!
//! # Adding a device
//!
//! A file beside these with an options struct implementing [`DeviceOptions`], and one
//! line in [`DEVICES`].

mod gpio;
mod vhost_user_proxy;
mod virtio_blk;
mod virtio_rng;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::marker::PhantomData;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgMatches, Args, Command, FromArgMatches};
use unidev_core::virtio::config::ConfigValues;
use unidev_transports::export::{Export, ExportOptions, Pci, Virtio};
use unidev_transports::transport::{TransportKind, TRANSPORTS};

/// Every device kind, in the order help texts list them. Adding a device adds a line.
pub static DEVICES: &[&dyn DeviceKind] = &[
    &Kind::<gpio::GpioOptions>::NEW,
    &Kind::<virtio_blk::VirtioBlkOptions>::NEW,
    &Kind::<virtio_rng::VirtioRngOptions>::NEW,
    &Kind::<vhost_user_proxy::VhostUserProxyOptions>::NEW,
];

/// The device kind named `name`.
pub fn kind_named(name: &str) -> Option<&'static dyn DeviceKind> {
    DEVICES.iter().copied().find(|k| k.name() == name)
}

/// "a, b, c or d" of `names`.
pub fn one_of<'a>(names: impl IntoIterator<Item = &'a str>) -> String {
    let names: Vec<_> = names.into_iter().collect();
    match names.split_last() {
        Some((last, [])) => last.to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// The device kinds' names, for messages.
pub fn kind_names() -> String {
    one_of(DEVICES.iter().map(|k| k.name()))
}

/// What a device presents to its client, which decides the transports it fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contract {
    /// A full PCI function: transports that carry PCI functions only.
    Pci,
    /// A virtio device of this type (virtio 1.2 section 5): any transport that carries
    /// that type.
    Virtio {
        /// The virtio device type.
        device_type: u32,
    },
}

/// A built device, ready to be put on a transport.
pub enum Built {
    /// A full PCI function.
    Pci(Export<Pci>),
    /// A virtio device.
    Virtio(Export<Virtio>),
}

/// What every device is built with.
pub struct BuildContext<'a> {
    /// The device's name (logs).
    pub name: &'a str,
    /// Cap on the client's DMA maps.
    pub max_dma_maps: usize,
}

/// A device kind's options, defined once (`clap::Args`) for the command line and the
/// devices file, and what the daemon needs to know about the device.
pub trait DeviceOptions: Args + FromArgMatches + Send + 'static {
    /// The device's name: `unidev serve NAME`, `type = "NAME"`.
    const NAME: &'static str;
    /// One line for help texts.
    const ABOUT: &'static str;

    /// What the device presents.
    fn contract(&self) -> Contract;

    /// Checks beyond the contract's (a device that fits only some transports).
    fn check_transport(&self, transport: &dyn TransportKind) -> Result<(), String> {
        let _ = transport;
        Ok(())
    }

    /// Checks of the options beyond what their parsers check (files that must exist…);
    /// every problem found.
    fn validate(&self) -> Vec<String> {
        Vec::new()
    }

    /// The virtio dispatch options every virtio device has, if this one has them.
    fn virtio(&self) -> Option<&VirtioOptions> {
        None
    }

    /// Values for the device configuration fields the transport's device model keeps
    /// (`unidev_core::virtio::config`). Default: none.
    fn device_config(&self) -> ConfigValues {
        ConfigValues::new()
    }

    /// Build the device.
    fn build(&self, ctx: &BuildContext) -> Result<Built, String>;
}

/// Options every virtio device that runs its queues here takes.
#[derive(Args, Clone, Copy, Debug, Default)]
pub struct VirtioOptions {
    /// Adaptive polling: after handling a queue, poll it this many microseconds before
    /// sleeping (0: off).
    #[arg(long, default_value_t = 0)]
    pub poll_us: u64,
    /// Make the notify area mappable (the driver's notifications then go to shared
    /// memory) and poll the queues continuously (one busy core per worker). vfio-user
    /// only.
    #[arg(long)]
    pub notify_mmap: bool,
}

/// A device configured from the command line or a devices file.
pub trait Device: Send {
    /// The kind's name.
    fn kind(&self) -> &'static str;
    /// Whether the device fits `transport`; why not, when it does not.
    fn check_transport(&self, transport: &dyn TransportKind) -> Result<(), String>;
    /// Problems of the options that their parsers cannot see.
    fn validate(&self) -> Vec<String>;
    /// Build it.
    fn build(&self, ctx: &BuildContext) -> Result<Built, String>;
    /// `base` with the device's own export options (adaptive polling, mappable notify
    /// area).
    fn export_options(&self, base: ExportOptions) -> ExportOptions;
}

impl<O: DeviceOptions> Device for O {
    fn kind(&self) -> &'static str {
        O::NAME
    }

    fn check_transport(&self, transport: &dyn TransportKind) -> Result<(), String> {
        let name = O::NAME;
        match self.contract() {
            Contract::Pci if !transport.carries_pci() => {
                let pci = one_of(
                    TRANSPORTS
                        .iter()
                        .filter(|t| t.carries_pci())
                        .map(|t| t.name()),
                );
                return Err(format!(
                    "{name} is a full PCI device: it needs transport = \"{pci}\" ({} carries \
                     virtio devices only)",
                    transport.name()
                ));
            }
            Contract::Pci => {}
            Contract::Virtio { device_type } => transport.check_virtio_type(device_type)?,
        }
        if self.virtio().is_some_and(|v| v.notify_mmap) && !transport.carries_virtio_pci() {
            return Err(format!(
                "{name}: notify_mmap (--notify-mmap) applies to the vfio-user transport only"
            ));
        }
        DeviceOptions::check_transport(self, transport)
    }

    fn validate(&self) -> Vec<String> {
        DeviceOptions::validate(self)
    }

    fn build(&self, ctx: &BuildContext) -> Result<Built, String> {
        DeviceOptions::build(self, ctx)
    }

    fn export_options(&self, base: ExportOptions) -> ExportOptions {
        let base = base.device_config(DeviceOptions::device_config(self));
        match self.virtio() {
            Some(v) => base
                .poll(Duration::from_micros(v.poll_us))
                .notify_mmap(v.notify_mmap),
            None => base,
        }
    }
}

/// A device kind in the registry.
pub trait DeviceKind: Sync {
    /// The name.
    fn name(&self) -> &'static str;
    /// The `unidev serve NAME` subcommand: about line and options.
    fn command(&self) -> Command;
    /// The device configured by the subcommand's matches.
    fn configure(&self, matches: &ArgMatches) -> Result<Box<dyn Device>, clap::Error>;
    /// The option names, as devices-file keys.
    fn keys(&self) -> Vec<String> {
        self.command()
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect()
    }
    /// The device configured by a devices-file table of options (the keys that are not
    /// the daemon's), parsed by the same definition as the command line, and every
    /// problem, each with the key it is about. A key with a bad value is left out, so that
    /// the device is still configured from the others (its own checks can then find more
    /// problems); it is `None` only when a required option is missing.
    fn configure_from_table(
        &self,
        options: &BTreeMap<String, toml::Value>,
    ) -> (Option<Box<dyn Device>>, Vec<String>) {
        let cmd = self.command().no_binary_name(true);
        let mut problems = Vec::new();
        let mut argv: Vec<OsString> = Vec::new();
        for (key, value) in options {
            let Some(arg) = cmd.get_arguments().find(|a| a.get_id() == key.as_str()) else {
                problems.push(unknown_key(self.name(), key));
                continue;
            };
            let Some(long) = arg.get_long() else {
                continue;
            };
            let mut one: Vec<OsString> = Vec::new();
            let repeatable = matches!(arg.get_action(), clap::ArgAction::Append);
            match (arg.get_action().takes_values(), value) {
                // A repeatable option: one argument per element.
                (true, toml::Value::Array(items)) if repeatable => {
                    let texts: Option<Vec<String>> = items.iter().map(scalar).collect();
                    match texts {
                        Some(texts) => {
                            one.extend(texts.iter().map(|t| format!("--{long}={t}").into()))
                        }
                        None => {
                            problems.push(format!("{key} must be a list of strings or numbers"));
                            continue;
                        }
                    }
                }
                (false, toml::Value::Boolean(true)) => one.push(format!("--{long}").into()),
                (false, toml::Value::Boolean(false)) => {}
                (false, other) => {
                    problems.push(format!(
                        "{key} must be true or false, not {}",
                        other.type_str()
                    ));
                    continue;
                }
                (true, value) => match scalar(value) {
                    // One argument: a value starting with `-` stays a value.
                    Some(text) => one.push(format!("--{long}={text}").into()),
                    None => {
                        problems.push(format!(
                            "{key} must be a string, a number or a boolean, not {}",
                            value.type_str()
                        ));
                        continue;
                    }
                },
            }
            // Each option on its own first, so that every bad value is reported.
            let alone = Command::new(self.name())
                .no_binary_name(true)
                .arg(arg.clone().required(false));
            if let Err(e) = alone.try_get_matches_from(&one) {
                problems.push(key_problem(key, value, &e));
                continue;
            }
            argv.extend(one);
        }
        let device = match cmd.try_get_matches_from(&argv) {
            Ok(matches) => match self.configure(&matches) {
                Ok(device) => Some(device),
                Err(e) => {
                    problems.push(first_line(&e));
                    None
                }
            },
            Err(e) => {
                problems.push(missing(self.name(), &e));
                None
            }
        };
        (device, problems)
    }
}

/// A scalar as the text of a command-line value.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Whether `key` is an option of some device kind.
pub fn is_option(key: &str) -> bool {
    DEVICES.iter().any(|k| k.keys().iter().any(|k| k == key))
}

/// `key` is not an option of device `kind`: say whether it is another device's.
fn unknown_key(kind: &str, key: &str) -> String {
    if is_option(key) {
        format!("option `{key}` does not apply to {kind}")
    } else {
        format!("unknown option `{key}`")
    }
}

/// What a parser said about `key = value`, without clap's usage text.
fn key_problem(key: &str, value: &toml::Value, e: &clap::Error) -> String {
    let shown = match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match (e.kind(), std::error::Error::source(e)) {
        (ErrorKind::ValueValidation, Some(why)) => format!("{key} {shown}: {why}"),
        (ErrorKind::InvalidValue, _) => {
            let possible = match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(v)) => format!(" (one of {})", v.join(", ")),
                _ => String::new(),
            };
            format!("{key} {shown}: not a valid value{possible}")
        }
        _ => format!("{key} {shown}: {}", first_line(e)),
    }
}

/// A missing required option, as a devices-file user sees it.
fn missing(kind: &str, e: &clap::Error) -> String {
    if e.kind() == ErrorKind::MissingRequiredArgument {
        if let Some(ContextValue::Strings(args)) = e.get(ContextKind::InvalidArg) {
            let keys: Vec<_> = args
                .iter()
                .map(|a| {
                    let flag = a.split_whitespace().next().unwrap_or(a);
                    format!("`{}`", flag.trim_start_matches("--").replace('-', "_"))
                })
                .collect();
            return format!("{kind} needs {}", one_of(keys.iter().map(String::as_str)));
        }
    }
    first_line(e)
}

/// The first line of a clap error, without its "error: " prefix.
fn first_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    line.trim_start_matches("error: ").to_string()
}

/// A [`DeviceOptions`] type as a registry entry.
pub struct Kind<O>(PhantomData<fn() -> O>);

impl<O> Kind<O> {
    /// The entry.
    pub const NEW: Self = Kind(PhantomData);
}

impl<O: DeviceOptions> DeviceKind for Kind<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn command(&self) -> Command {
        // The options struct's own doc comment would become the about text: ABOUT wins.
        O::augment_args(Command::new(O::NAME))
            .about(O::ABOUT)
            .long_about(None)
            .after_help(
                "The daemon's options (`unidev serve --help`) may come before or after the \
                 device name.",
            )
    }

    fn configure(&self, matches: &ArgMatches) -> Result<Box<dyn Device>, clap::Error> {
        Ok(Box::new(O::from_arg_matches(matches)?))
    }
}

/// The device chosen on the command line: `unidev serve ... <DEVICE> [options]`, one
/// subcommand per registry entry.
pub struct DeviceChoice(pub Box<dyn Device>);

impl FromArgMatches for DeviceChoice {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let Some((name, sub)) = matches.subcommand() else {
            return Err(clap::Error::raw(
                ErrorKind::MissingSubcommand,
                format!("a device is required ({})", kind_names()),
            ));
        };
        let kind = kind_named(name).ok_or_else(|| {
            clap::Error::raw(
                ErrorKind::InvalidSubcommand,
                format!("unknown device {name:?} ({})", kind_names()),
            )
        })?;
        Ok(DeviceChoice(kind.configure(sub)?))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Subcommand for DeviceChoice {
    fn augment_subcommands(cmd: Command) -> Command {
        DEVICES
            .iter()
            .fold(cmd, |cmd, kind| cmd.subcommand(kind.command()))
            .subcommand_required(true)
    }

    fn augment_subcommands_for_update(cmd: Command) -> Command {
        Self::augment_subcommands(cmd)
    }

    fn has_subcommand(name: &str) -> bool {
        kind_named(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> BTreeMap<String, toml::Value> {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn every_kind_is_listed_once_with_options_that_build_a_command() {
        let names: Vec<_> = DEVICES.iter().map(|k| k.name()).collect();
        assert_eq!(
            names,
            ["gpio", "virtio-blk", "virtio-rng", "vhost-user-proxy"]
        );
        for kind in DEVICES {
            kind.command().debug_assert();
            assert_eq!(kind_named(kind.name()).map(|k| k.name()), Some(kind.name()));
        }
        assert!(kind_named("nvme").is_none());
    }

    #[test]
    fn a_table_is_parsed_by_the_command_line_definition() {
        let image = std::env::temp_dir().join(format!("unidev-devices-{}.img", std::process::id()));
        std::fs::write(&image, [0u8; 512]).unwrap();
        let blk = kind_named("virtio-blk").unwrap();
        let t = table(&format!(
            "file = \"{}\"\nqueues = 2\nblock_size = 4096\nreadonly = true\npoll_us = 5\n",
            image.display()
        ));
        let (device, errors) = blk.configure_from_table(&t);
        assert!(errors.is_empty(), "{errors:?}");
        let device = device.expect("configured");
        assert_eq!(device.kind(), "virtio-blk");
        assert!(device.validate().is_empty());
        let options = device.export_options(ExportOptions::default());
        assert_eq!(options.poll, Duration::from_micros(5));
        let _ = std::fs::remove_file(&image);
    }

    #[test]
    fn the_proxy_takes_config_values_from_the_command_line_and_a_list_in_a_file() {
        let proxy = kind_named("vhost-user-proxy").unwrap();
        let t = table(
            "backend_socket = \"/b.sock\"\nvirtio_id = 26\nqueues = 2\n\
             config = [\"tag=share0\", \"num_request_queues=1\"]\n",
        );
        let (device, errors) = proxy.configure_from_table(&t);
        assert!(errors.is_empty(), "{errors:?}");
        let options = device.unwrap().export_options(ExportOptions::default());
        let values: Vec<_> = options.device_config.iter().collect();
        assert_eq!(values, [("num_request_queues", "1"), ("tag", "share0")]);
        let (_, errors) = proxy.configure_from_table(&table(
            "backend_socket = \"/b\"\nvirtio_id = 26\nconfig = \"tag\"\n",
        ));
        assert!(
            errors.iter().any(|e| e.contains("NAME=VALUE")),
            "{errors:?}"
        );
    }

    #[test]
    fn every_bad_key_of_a_table_is_reported_with_its_key() {
        let blk = kind_named("virtio-blk").unwrap();
        let t = table(
            "file = \"/x.img\"\nqueues = 0\nblock_size = 1000\nreadonly = \"yes\"\n\
             inputs = \"0x1\"\ncolour = \"blue\"\n",
        );
        let (device, errors) = blk.configure_from_table(&t);
        // Configured from the good keys: its own checks still run.
        assert!(device.is_some_and(|d| d.validate()[0].contains("/x.img does not exist")));
        let got = &errors;
        let has = |text: &str| got.iter().any(|m| m.contains(text));
        assert!(has("queues 0:"), "{got:?}");
        assert!(has("block_size 1000: must be 512 or 4096"), "{got:?}");
        assert!(has("readonly must be true or false, not string"), "{got:?}");
        assert!(
            has("option `inputs` does not apply to virtio-blk"),
            "{got:?}"
        );
        assert!(has("unknown option `colour`"), "{got:?}");
        assert_eq!(got.len(), 5, "{got:?}");
        // A required option missing is named as a key.
        let (device, errors) = blk.configure_from_table(&table("queues = 2\n"));
        assert!(device.is_none());
        assert_eq!(errors[0], "virtio-blk needs `file`");
    }
}
