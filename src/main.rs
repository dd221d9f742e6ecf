//! `unidev`: the device daemon.
//!
//! `unidev serve --transport vfio-user --socket-path PATH [options] <DEVICE> [device
//! options]` exports one device (the daemon's options may come before or after the
//! device); `unidev serve --transport vduse --name NAME [--attach
//! virtio-vdpa|vhost-vdpa] virtio-blk --file F` makes it a kernel VDUSE device; `unidev run
//! devices.toml` starts many devices (`config.rs`); `unidev vdpa-info /dev/vhost-vdpa-N`
//! shows what a vhost-vdpa device reports (`vdpa_info.rs`); `unidev` alone starts the
//! default demo (a virtio-blk on a scratch image, on `./unidev-blk.sock`) and prints the
//! QEMU command line for it.
//!
//! Devices come from one registry (`devices/`), transports from the transports crate's
//! list (`unidev_transports::transport::TRANSPORTS`): neither is named here.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod config;
mod devices;
mod vdpa_info;

use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use log::{error, info};
use unidev_core::dispatch::{EventLoop, StopHandle};
use unidev_core::sandbox::SeccompPolicy;
use unidev_transports::export::{ExportOptions, Exported, Running, Socket, Vduse};
use unidev_transports::listener;
use unidev_transports::transport::{
    transport_named, transport_names, Address, AddressKind, TransportKind, TRANSPORTS,
};
use unidev_transports::vduse::{VdpaDriver, DEFAULT_CONTROL_PATH};
use unidev_transports::vfio_user::{DmaRwLayout, ServerConfig};

use devices::{BuildContext, Built, Device, DeviceChoice};

#[derive(Parser)]
#[command(
    name = "unidev",
    version,
    about = "Run devices outside the VMM: one device model, many transports",
    long_about = "Run devices outside the VMM. Without a subcommand, serves the demo \
                  device (virtio-blk on ./unidev-scratch.img) over vfio-user on \
                  ./unidev-blk.sock and prints the QEMU command line that attaches it."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Export one device over one transport.
    Serve(ServeArgs),
    /// Start every device listed in a TOML file (see `config.rs` for the format).
    Run {
        /// The devices file.
        config: PathBuf,
    },
    /// Show what a vhost-vdpa device reports (device id, features, queues, config space):
    /// a diagnostic for devices attached with `serve --transport vduse --attach
    /// vhost-vdpa`. Opening the device resets it.
    VdpaInfo {
        /// The device, e.g. /dev/vhost-vdpa-0.
        device: PathBuf,
    },
}

/// The `--transport` values: every transport of the transports crate's list.
fn transport_parser() -> PossibleValuesParser {
    PossibleValuesParser::new(
        TRANSPORTS
            .iter()
            .map(|t| PossibleValue::new(t.name()).help(t.about())),
    )
}

/// The vDPA bus driver a VDUSE device is bound to.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum AttachArg {
    /// virtio_vdpa: the device appears in this kernel (e.g. /dev/vdX).
    VirtioVdpa,
    /// vhost_vdpa: the device appears as /dev/vhost-vdpa-N for a VMM.
    VhostVdpa,
}

impl AttachArg {
    fn driver(self) -> VdpaDriver {
        match self {
            AttachArg::VirtioVdpa => VdpaDriver::VirtioVdpa,
            AttachArg::VhostVdpa => VdpaDriver::VhostVdpa,
        }
    }
}

/// The seccomp policy of the threads that handle guest data (`unidev_core::sandbox`).
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum SeccompArg {
    /// No filter.
    Off,
    /// Calls outside the allow-list are allowed and logged by the kernel (audit).
    Log,
    /// Calls outside the allow-list kill the daemon with SIGSYS.
    Kill,
}

impl SeccompArg {
    fn policy(self) -> SeccompPolicy {
        match self {
            SeccompArg::Off => SeccompPolicy::Off,
            SeccompArg::Log => SeccompPolicy::Log,
            SeccompArg::Kill => SeccompPolicy::Kill,
        }
    }
}

/// Set the process's seccomp policy before any device starts.
fn set_seccomp(policy: SeccompPolicy) -> Result<(), String> {
    unidev_core::sandbox::set_worker_policy(policy)
        .map_err(|e| format!("cannot set the seccomp policy: {e}"))?;
    if policy != SeccompPolicy::Off {
        info!("worker threads run under a seccomp filter ({policy})");
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum LayoutArg {
    /// QEMU's layout (u32 count, data at 12).
    Qemu,
    /// The spec text's layout (u64 count, data at 16).
    Spec,
}

/// `unidev serve`: the daemon's options and the device with its own options. The daemon's
/// options may also follow the device name: [`daemon_options_first`] moves them in front
/// of it before clap parses, so these rules (conflicts included) hold for either order.
#[derive(Args)]
struct ServeArgs {
    /// Transport to export the device over.
    #[arg(long, value_parser = transport_parser())]
    transport: String,
    /// Path of the listening socket (created; an old socket there is replaced).
    #[arg(long, conflicts_with = "fd")]
    socket_path: Option<PathBuf>,
    /// Serve an inherited, already-listening socket instead (socket activation).
    #[arg(long)]
    fd: Option<i32>,
    /// Permission bits of the socket, in octal.
    #[arg(long, default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Group of the socket (a name or a numeric gid), for a client running as another
    /// user in that group (with --socket-mode 0660).
    #[arg(long, value_parser = parse_group)]
    socket_group: Option<u32>,
    /// Serve only clients running as this uid (SO_PEERCRED); repeat to allow several.
    /// Others are refused and logged.
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uids: Vec<u32>,
    /// Cap on the client's DMA maps.
    #[arg(long, default_value_t = unidev_core::memory::DEFAULT_MAX_MAPS)]
    max_dma_maps: usize,
    /// Most file descriptors accepted per message (QEMU accepts at most 16).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=253))]
    max_msg_fds: u32,
    /// Largest data transfer per message, in bytes.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(8..=(64 << 20)))]
    max_data_xfer_size: u32,
    /// Layout of DMA_READ/DMA_WRITE payloads for maps without an fd.
    #[arg(long, value_enum, default_value = "qemu")]
    dma_rw_layout: LayoutArg,
    /// Seconds a client may stall inside a message before it is dropped.
    #[arg(long, default_value_t = 10)]
    io_timeout_secs: u64,
    /// Seccomp filter of the threads that handle guest data (vring workers, interrupt
    /// relays, the VDUSE thread): off, log (calls outside the allow-list are logged by
    /// the kernel) or kill (they kill the daemon with SIGSYS).
    #[arg(long, value_enum, default_value = "off")]
    seccomp: SeccompArg,
    /// VDUSE: the device name (/dev/vduse/NAME, and the vDPA device's name).
    #[arg(long, conflicts_with_all = ["socket_path", "fd"])]
    name: Option<String>,
    /// VDUSE: add the device to the vDPA bus (as `vdpa dev add` does) bound to this
    /// driver; it is removed again on shutdown. Without it, attach it yourself.
    #[arg(long, value_enum)]
    attach: Option<AttachArg>,
    /// VDUSE: the control device.
    #[arg(long, default_value = DEFAULT_CONTROL_PATH)]
    vduse_control: PathBuf,
    #[command(subcommand)]
    device: DeviceChoice,
}

/// A group given by name or numeric gid.
fn parse_group(text: &str) -> Result<u32, String> {
    if let Ok(gid) = text.parse::<u32>() {
        return Ok(gid);
    }
    let name = std::ffi::CString::new(text).map_err(|_| format!("bad group name {text:?}"))?;
    let mut group: libc::group = unsafe_zeroed_group();
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes into `group` and `buf` (of the given length) and sets
    // `found` to `&group` or null; all outlive the call.
    let r = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if r != 0 || found.is_null() {
        return Err(format!("no group named {text:?}"));
    }
    Ok(group.gr_gid)
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: libc::group is plain data (integers and pointers); all-zero is valid.
    unsafe { std::mem::zeroed() }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|e| format!("{s:?} is not an octal mode: {e}"))?;
    if m > 0o777 {
        return Err(format!("{s:?}: mode must be at most 0777"));
    }
    Ok(m)
}

/// Route SIGTERM and SIGINT to every server's stop handle: the handler only writes an
/// eventfd (async-signal-safe); a small thread waits on it and stops the servers.
fn install_signal_handlers(stops: Vec<StopHandle>) -> io::Result<()> {
    use std::sync::atomic::{AtomicI32, Ordering};
    static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
    extern "C" fn on_signal(_: libc::c_int) {
        let fd = SIGNAL_FD.load(Ordering::SeqCst);
        if fd >= 0 {
            let one: u64 = 1;
            // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer.
            unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        }
    }
    let signalled = vmm_sys_util::eventfd::EventFd::new(0)?;
    SIGNAL_FD.store(signalled.as_raw_fd(), Ordering::SeqCst);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if signalled.read().is_ok() {
                info!("signal received: stopping");
                for s in &stops {
                    s.stop();
                }
            }
            // Keep the eventfd open for the handler for the life of the process.
            std::mem::forget(signalled);
        })?;
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a plain handler is valid; the handler only
        // touches an atomic and calls write(2).
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // A client that vanishes mid-send must not kill the daemon.
    // SAFETY: ignoring SIGPIPE is always sound.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    Ok(())
}

/// `unidev serve`'s daemon options may come before or after the device name, as a user
/// types them (`unidev serve virtio-blk --file F --transport vhost-user --socket-path S`).
/// clap wants a subcommand's parent options before it, so every daemon option that
/// follows the device name is moved, with its value, in front of the name; the device's
/// own options stay where they are. Anything that does not parse is left for clap to
/// report.
fn daemon_options_first(argv: Vec<OsString>) -> Vec<OsString> {
    if argv.get(1).and_then(|a| a.to_str()) != Some("serve") {
        return argv;
    }
    let daemon = long_options(&ServeArgs::augment_args(clap::Command::new("serve")));
    // Where the device name is: the first word that is not a daemon option or its value.
    let mut at = 2;
    let kind = loop {
        let Some(word) = argv.get(at).and_then(|a| a.to_str()) else {
            return argv;
        };
        if word == "--" {
            return argv;
        }
        match option_name(word) {
            Some((name, inline)) => {
                let takes_value = daemon.get(name).copied().unwrap_or(false);
                at += if takes_value && !inline { 2 } else { 1 };
            }
            None if word.starts_with('-') => at += 1,
            None => match devices::kind_named(word) {
                Some(kind) => break kind,
                None => return argv,
            },
        }
    };
    let device = long_options(&kind.command());
    let (mut hoisted, mut kept) = (Vec::new(), Vec::new());
    let mut rest = argv[at + 1..].iter();
    while let Some(arg) = rest.next() {
        let Some((name, inline)) = arg.to_str().and_then(option_name) else {
            if arg == "--" {
                kept.push(arg.clone());
                kept.extend(rest.by_ref().cloned());
            } else {
                kept.push(arg.clone());
            }
            continue;
        };
        let (to, takes_value) = match (device.get(name), daemon.get(name)) {
            (Some(&takes), _) => (&mut kept, takes),
            (None, Some(&takes)) => (&mut hoisted, takes),
            (None, None) => (&mut kept, false),
        };
        to.push(arg.clone());
        if takes_value && !inline {
            if let Some(value) = rest.next() {
                to.push(value.clone());
            }
        }
    }
    let mut out = argv[..at].to_vec();
    out.extend(hoisted);
    out.push(argv[at].clone());
    out.extend(kept);
    out
}

/// `--name` or `--name=value`: the name, and whether the value is inline.
fn option_name(word: &str) -> Option<(&str, bool)> {
    let long = word.strip_prefix("--").filter(|l| !l.is_empty())?;
    Some(match long.split_once('=') {
        Some((name, _)) => (name, true),
        None => (long, false),
    })
}

/// A command's long options, and whether each takes a value.
fn long_options(cmd: &clap::Command) -> std::collections::HashMap<String, bool> {
    cmd.get_arguments()
        .filter_map(|a| Some((a.get_long()?.to_string(), a.get_action().takes_values())))
        .collect()
}

/// The export options `serve` was given.
fn serve_options(args: &ServeArgs, device: &dyn Device) -> ExportOptions {
    let mut options = ExportOptions::default()
        .socket_mode(args.socket_mode)
        .max_dma_maps(args.max_dma_maps)
        .vfio_user(ServerConfig {
            max_msg_fds: args.max_msg_fds as usize,
            max_data_xfer_size: args.max_data_xfer_size,
            dma_rw_layout: match args.dma_rw_layout {
                LayoutArg::Qemu => DmaRwLayout::Qemu,
                LayoutArg::Spec => DmaRwLayout::Spec,
            },
            io_timeout: Duration::from_secs(args.io_timeout_secs.max(1)),
        });
    options.socket_group = args.socket_group;
    if !args.allow_uids.is_empty() {
        options = options.allow_uids(args.allow_uids.iter().copied());
    }
    device.export_options(options)
}

/// Check that `device` fits `transport` and that its options hold; every problem in one
/// message.
fn check_device(device: &dyn Device, transport: &dyn TransportKind) -> Result<(), String> {
    let mut problems = device.validate();
    if let Err(e) = device.check_transport(transport) {
        problems.insert(0, e);
    }
    match problems.is_empty() {
        true => Ok(()),
        false => Err(problems.join("; ")),
    }
}

/// Put a built device on `transport` at `address`.
fn export(
    built: Built,
    transport: &dyn TransportKind,
    address: Address,
    options: &ExportOptions,
) -> Result<Exported, String> {
    let exported = match built {
        Built::Pci(export) => {
            let name = export.name().to_string();
            let Some(at) = transport.pci(address) else {
                return Err(format!(
                    "{name}: transport {} carries no PCI functions",
                    transport.name()
                ));
            };
            export.serve(at.map_err(|e| e.to_string())?, options)
        }
        Built::Virtio(export) => export.serve(
            transport.virtio(address).map_err(|e| e.to_string())?,
            options,
        ),
    };
    exported.map_err(|e| e.to_string())
}

/// `serve`: one device on one transport, through the same export API a device author
/// uses (`unidev_transports::export`). With `--transport vduse` the device is created
/// (or taken over from a killed daemon), served on its own thread and optionally attached
/// to the vDPA bus; on SIGTERM/SIGINT it is detached first (while its requests are still
/// served: the driver resets the device on removal), then destroyed.
fn serve(args: ServeArgs) -> Result<(), String> {
    let transport = args.transport.as_str();
    let transport = transport_named(transport)
        .ok_or_else(|| format!("unknown transport {transport:?} ({})", transport_names()))?;
    let device = &*args.device.0;
    let kind = device.kind();
    let takes_name = transport.address() == AddressKind::Vduse;
    if !takes_name && (args.name.is_some() || args.attach.is_some()) {
        return Err("--name and --attach apply to --transport vduse only".into());
    }
    let (address, shown) = match transport.address() {
        AddressKind::Vduse => {
            let Some(name) = &args.name else {
                return Err(format!(
                    "--transport {} needs --name NAME (the /dev/vduse/NAME device)",
                    transport.name()
                ));
            };
            let mut target = Vduse::new(name.clone()).control_path(&args.vduse_control);
            target.attach = args.attach.map(AttachArg::driver);
            (Address::Vduse(target), None)
        }
        _ => match (&args.socket_path, args.fd) {
            (Some(path), _) => (
                Address::Socket(Socket::Path(path.clone())),
                Some(path.display().to_string()),
            ),
            (None, Some(fd)) => (
                Address::Socket(Socket::Listener(
                    listener::from_fd(fd).map_err(|e| e.to_string())?,
                )),
                Some(format!("fd {fd}")),
            ),
            (None, None) => {
                return Err(format!(
                    "--transport {} needs --socket-path PATH or --fd N",
                    transport.name()
                ))
            }
        },
    };
    check_device(device, transport)?;
    set_seccomp(args.seccomp.policy())?;
    let built = device.build(&BuildContext {
        name: kind,
        max_dma_maps: args.max_dma_maps,
    })?;
    let exported = export(built, transport, address, &serve_options(&args, device))?;
    install_signal_handlers(vec![exported.stop_handle()])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    if let Some(shown) = shown {
        info!("{kind}: {} server listening on {shown}", transport.name());
    }
    exported.run().map_err(|e| e.to_string())
}

/// A callback for each of `n` devices; the last one to run stops `wake`.
fn countdown(n: usize, wake: StopHandle) -> impl Fn() -> Box<dyn FnOnce() + Send> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let remaining = Arc::new(AtomicUsize::new(n));
    move || {
        let (remaining, wake) = (remaining.clone(), wake.clone());
        Box::new(move || {
            if remaining.fetch_sub(1, Ordering::SeqCst) == 1 {
                wake.stop();
            }
        })
    }
}

fn run(path: &std::path::Path) -> Result<(), String> {
    let config = config::load(path).map_err(|errors| {
        format!(
            "{} problem(s) in {}; nothing started:\n  {}",
            errors.len(),
            path.display(),
            errors.join("\n  ")
        )
    })?;
    set_seccomp(config.seccomp)?;
    let specs = config.devices;
    // Build every device before any socket appears: a bad image file stops the start.
    let mut built = Vec::with_capacity(specs.len());
    for s in &specs {
        let device = s
            .device
            .build(&BuildContext {
                name: &s.name,
                max_dma_maps: s.max_dma_maps,
            })
            .map_err(|e| format!("{}: {e}; nothing started", s.location))?;
        built.push(device);
    }
    let options = |s: &config::DeviceSpec| {
        let mut o = ExportOptions::default()
            .socket_mode(s.socket_mode)
            .max_dma_maps(s.max_dma_maps);
        o.socket_group = s.socket_group;
        o.allowed_uids = s.allowed_uids.clone();
        s.device.export_options(o)
    };
    // Ended by a signal, or once every device has stopped on its own.
    let mut shutdown =
        EventLoop::new().map_err(|e| format!("cannot create the shutdown waiter: {e}"))?;
    let wake = shutdown.stop_handle();
    let done = countdown(specs.len(), wake.clone());
    // Sockets first. An export dropped unserved removes its socket again, so returning
    // early leaves nothing behind.
    let mut socket_devices = Vec::with_capacity(specs.len());
    let mut kernel_devices = Vec::new();
    for (s, device) in specs.iter().zip(built) {
        let Some(socket) = &s.socket else {
            kernel_devices.push((s, device));
            continue;
        };
        let address = Address::Socket(Socket::Path(socket.clone()));
        let exported = export(device, s.transport, address, &options(s))
            .map_err(|e| format!("{}: {e}; nothing started", s.location))?;
        socket_devices.push((s, exported.on_exit(done())));
    }
    install_signal_handlers(vec![wake])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    // VDUSE devices appear system-wide: create them once every socket is in place.
    let mut running_kernel: Vec<Running> = Vec::new();
    for (s, device) in kernel_devices {
        let started = match &s.vduse {
            Some(target) => export(
                device,
                s.transport,
                Address::Vduse(target.clone()),
                &options(s),
            )
            .and_then(|e| e.on_exit(done()).spawn().map_err(|e| e.to_string())),
            None => Err(format!("transport {} needs an address", s.transport.name())),
        };
        match started {
            Ok(r) => running_kernel.push(r),
            Err(e) => {
                for r in running_kernel.into_iter().rev() {
                    if let Err(e) = r.stop() {
                        error!("{e}");
                    }
                }
                return Err(format!("{}: {e}; nothing started", s.location));
            }
        }
    }
    let mut running = Vec::with_capacity(socket_devices.len());
    for (s, exported) in socket_devices {
        if let Some(socket) = &s.socket {
            info!("{}: serving on {}", s.name, socket.display());
        }
        running.push(
            exported
                .spawn()
                .map_err(|e| format!("cannot start a thread: {e}"))?,
        );
    }
    if let Err(e) = shutdown.run() {
        error!("shutdown waiter failed: {e}");
    }
    // VDUSE devices first: removing one from the vDPA bus needs its server running.
    for r in running_kernel {
        if let Err(e) = r.stop() {
            error!("{e}");
        }
    }
    for r in &running {
        r.stop_handle().stop();
    }
    for r in running {
        if let Err(e) = r.join() {
            error!("{e}");
        }
    }
    info!("all {} devices stopped", specs.len());
    Ok(())
}

fn demo() -> Result<(), String> {
    let here = std::env::current_dir().map_err(|e| e.to_string())?;
    let sock = here.join("unidev-blk.sock");
    let image = here.join("unidev-scratch.img");
    if !image.exists() {
        let f = std::fs::File::create(&image)
            .map_err(|e| format!("cannot create {}: {e}", image.display()))?;
        f.set_len(64 << 20)
            .map_err(|e| format!("cannot size {}: {e}", image.display()))?;
    }
    println!(
        "unidev demo: virtio-blk on {} (64 MiB scratch image) over vfio-user",
        image.display()
    );
    println!("socket: {}", sock.display());
    println!("attach it to QEMU 10.1+ (guest RAM must be shared) with:");
    println!(
        "  qemu-system-x86_64 -accel tcg -m 512M \\\n    -object memory-backend-memfd,id=mem,size=512M,share=on \\\n    -machine q35,memory-backend=mem \\\n    -device '{{\"driver\":\"vfio-user-pci\",\"socket\":{{\"path\":\"{}\",\"type\":\"unix\"}}}}' ...",
        sock.display()
    );
    println!("the guest sees the disk as /dev/vda (virtio_blk driver). Ctrl-C stops the daemon.");
    // The demo is `unidev serve` with these arguments: every default from one place.
    let argv = [
        "unidev".into(),
        "serve".into(),
        "--transport".into(),
        "vfio-user".into(),
        "--socket-path".into(),
        sock.into_os_string(),
        "virtio-blk".into(),
        "--file".into(),
        image.into_os_string(),
    ];
    let matches = Cli::command()
        .try_get_matches_from(argv)
        .map_err(|e| e.to_string())?;
    match Cli::from_arg_matches(&matches)
        .map_err(|e| e.to_string())?
        .command
    {
        Some(Command::Serve(args)) => serve(args),
        _ => Err("the demo's arguments did not parse as `serve`".into()),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse_from(daemon_options_first(std::env::args_os().collect()));
    let result = match cli.command {
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Run { config }) => run(&config),
        Some(Command::VdpaInfo { device }) => vdpa_info::run(&device),
        None => demo(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("unidev: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    fn serve_args(argv: &[&str]) -> Result<ServeArgs, String> {
        let argv = std::iter::once("unidev")
            .chain(argv.iter().copied())
            .map(OsString::from)
            .collect();
        let matches = Cli::command()
            .try_get_matches_from(daemon_options_first(argv))
            .map_err(|e| e.to_string())?;
        match Cli::from_arg_matches(&matches)
            .map_err(|e| e.to_string())?
            .command
        {
            Some(Command::Serve(args)) => Ok(args),
            _ => Err("not serve".into()),
        }
    }

    #[test]
    fn daemon_options_are_accepted_before_or_after_the_device() {
        for argv in [
            &[
                "serve",
                "--transport",
                "vhost-user",
                "--socket-path",
                "/s",
                "virtio-blk",
                "--file",
                "/f",
            ][..],
            &[
                "serve",
                "virtio-blk",
                "--file",
                "/f",
                "--transport",
                "vhost-user",
                "--socket-path",
                "/s",
            ],
            &[
                "serve",
                "--transport",
                "vhost-user",
                "virtio-blk",
                "--socket-path",
                "/s",
                "--file",
                "/f",
            ],
        ] {
            let args = serve_args(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(args.transport, "vhost-user", "{argv:?}");
            assert_eq!(args.socket_path, Some(PathBuf::from("/s")), "{argv:?}");
            assert_eq!(args.device.0.kind(), "virtio-blk", "{argv:?}");
        }
        let args = serve_args(&[
            "serve",
            "--transport",
            "vduse",
            "--name",
            "d0",
            "virtio-blk",
            "--file",
            "/f",
            "--attach",
            "virtio-vdpa",
            "--seccomp",
            "kill",
        ])
        .unwrap();
        assert_eq!(args.name.as_deref(), Some("d0"));
        assert_eq!(args.attach, Some(AttachArg::VirtioVdpa));
        assert_eq!(args.seccomp, SeccompArg::Kill);
    }

    /// The rules hold whichever side of the device name the options are on.
    #[test]
    fn conflicts_across_the_device_name_are_refused() {
        for argv in [
            &[
                "serve",
                "--transport",
                "vfio-user",
                "--socket-path",
                "/s",
                "gpio",
                "--fd",
                "3",
            ][..],
            &[
                "serve",
                "--transport",
                "vduse",
                "--name",
                "d0",
                "virtio-blk",
                "--file",
                "/f",
                "--socket-path",
                "/s",
            ],
            &[
                "serve",
                "gpio",
                "--socket-path",
                "/s",
                "--fd",
                "3",
                "--transport",
                "vfio-user",
            ],
        ] {
            let e = serve_args(argv)
                .err()
                .unwrap_or_else(|| panic!("{argv:?} accepted"));
            assert!(e.contains("cannot be used with"), "{argv:?}: {e}");
        }
        // Repeated options add up wherever they are.
        let args = serve_args(&[
            "serve",
            "--transport",
            "vfio-user",
            "--socket-path",
            "/s",
            "--allow-uid",
            "1",
            "gpio",
            "--allow-uid",
            "2",
            "--inputs",
            "0x5",
        ])
        .unwrap();
        assert_eq!(args.allow_uids, [1, 2]);
        // A value that looks like a device name stays the option's value.
        let args = serve_args(&[
            "serve",
            "--socket-path",
            "gpio",
            "virtio-rng",
            "--transport",
            "vhost-user",
        ])
        .unwrap();
        assert_eq!(args.socket_path, Some(PathBuf::from("gpio")));
        assert_eq!(args.device.0.kind(), "virtio-rng");
    }

    #[test]
    fn no_device_option_shadows_a_daemon_option() {
        let daemon = long_options(&ServeArgs::augment_args(clap::Command::new("serve")));
        for kind in devices::DEVICES {
            for name in long_options(&kind.command()).keys() {
                assert!(
                    !daemon.contains_key(name),
                    "{}'s --{name} is also a daemon option",
                    kind.name()
                );
            }
        }
    }

    #[test]
    fn the_device_help_says_what_each_device_is() {
        let help = Cli::command()
            .find_subcommand_mut("serve")
            .expect("serve")
            .render_help()
            .to_string();
        for line in [
            "An ACCES PCI-IDIO-16 compatible GPIO card",
            "A virtio block device",
        ] {
            assert!(help.contains(line), "{help}");
        }
    }

    #[test]
    fn the_transports_come_from_the_transports_list() {
        let e = serve_args(&["serve", "--transport", "carrier-pigeon", "gpio"])
            .err()
            .expect("refused");
        for t in TRANSPORTS {
            assert!(e.contains(t.name()), "{e}");
        }
    }
}
