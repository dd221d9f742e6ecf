//! `unidev`: the device daemon.
//!
//! `unidev serve --transport vfio-user --socket-path PATH [options] <DEVICE> [device
//! options]` exports one device; `unidev serve --transport vduse --name NAME [--attach
//! virtio-vdpa|vhost-vdpa] virtio-blk --file F` makes it a kernel VDUSE device; `unidev run
//! devices.toml` starts many devices (`config.rs`); `unidev vdpa-info /dev/vhost-vdpa-N`
//! shows what a vhost-vdpa device reports (`vdpa_info.rs`); `unidev` alone starts the
//! default demo (a virtio-blk on a scratch image, on `./unidev-blk.sock`) and prints the
//! QEMU command line for it.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod config;
mod vdpa_info;

use clap::{Args, Parser, Subcommand, ValueEnum};
use log::{error, info};
use unidev_backends::gpio::IdioGpioCard;
use unidev_backends::virtio_blk::{BlkOptions, VirtioBlk};
use unidev_backends::virtio_rng::VirtioRng;
use unidev_compat::vhost_user_proxy::VhostUserProxy;
use unidev_core::dispatch::{EventLoop, StopHandle};
use unidev_core::memory::DmaSpace;
use unidev_core::sandbox::SeccompPolicy;
use unidev_transports::export::{
    Export, ExportOptions, Running, Socket as ExportSocket, Transport as ExportTransport,
    VduseTarget,
};
use unidev_transports::listener;
use unidev_transports::vduse::{VdpaDriver, DEFAULT_CONTROL_PATH};
use unidev_transports::vfio_user::{DmaRwLayout, ServerConfig};

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

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Transport {
    /// vfio-user (QEMU's vfio-user-pci client): any device, virtio ones as virtio-pci.
    VfioUser,
    /// vhost-user (QEMU's vhost-user-*-pci devices): virtio devices.
    VhostUser,
    /// VDUSE (a Linux vDPA device in userspace): virtio-blk for this kernel (virtio-vdpa)
    /// or for a VMM (vhost-vdpa).
    Vduse,
}

/// The vDPA bus driver a VDUSE device is bound to.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum AttachArg {
    /// virtio_vdpa: the device appears in this kernel (e.g. /dev/vdX).
    VirtioVdpa,
    /// vhost_vdpa: the device appears as /dev/vhost-vdpa-N for a VMM.
    VhostVdpa,
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

#[derive(Args)]
struct ServeArgs {
    /// Transport to export the device over.
    #[arg(long, value_enum)]
    transport: Transport,
    /// Path of the listening socket (created; an old socket there is replaced).
    #[arg(long, required_unless_present_any = ["fd", "name"], conflicts_with = "fd")]
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
    #[arg(long, conflicts_with_all = ["socket_path", "fd"], required_if_eq("transport", "vduse"))]
    name: Option<String>,
    /// VDUSE: add the device to the vDPA bus (as `vdpa dev add` does) bound to this
    /// driver; it is removed again on shutdown. Without it, attach it yourself.
    #[arg(long, value_enum)]
    attach: Option<AttachArg>,
    /// VDUSE: the control device.
    #[arg(long, default_value = DEFAULT_CONTROL_PATH)]
    vduse_control: PathBuf,
    #[command(subcommand)]
    device: DeviceArgs,
}

#[derive(Subcommand, Clone)]
enum DeviceArgs {
    /// An ACCES PCI-IDIO-16 compatible GPIO card (Linux driver gpio-pci-idio-16).
    Gpio {
        /// Input lines 0-15, as hex (e.g. 0xa5c3).
        #[arg(long, default_value = "0", value_parser = parse_hex16)]
        inputs: u16,
    },
    /// A virtio block device on a raw image file or block device.
    VirtioBlk {
        /// The image file or block device.
        #[arg(long)]
        file: PathBuf,
        /// Refuse writes (the device advertises VIRTIO_BLK_F_RO).
        #[arg(long)]
        readonly: bool,
        /// Number of request queues (one worker thread each).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        queues: u16,
        /// Open the file with O_DIRECT.
        #[arg(long)]
        direct: bool,
        /// Logical block size in bytes.
        #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
        block_size: u32,
        #[command(flatten)]
        virtio: VirtioArgs,
    },
    /// A virtio entropy device fed from the OS random source.
    VirtioRng {
        #[command(flatten)]
        virtio: VirtioArgs,
    },
    /// An existing vhost-user backend process (qemu-storage-daemon, vhost-device-*,
    /// virtiofsd) presented as a virtio-pci device: unidev is its vhost-user frontend and
    /// passes memory fds, kick and call eventfds through (no copies).
    VhostUserProxy {
        /// The backend process's vhost-user socket.
        #[arg(long)]
        backend_socket: PathBuf,
        /// Virtio device type of the backend (2 = block, 4 = entropy, 26 = fs, ...).
        #[arg(long)]
        virtio_id: u32,
        /// Number of queues to use.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=128))]
        queues: u16,
    },
}

/// Options every virtio device takes.
#[derive(Args, Clone, Copy)]
struct VirtioArgs {
    /// Adaptive polling: after handling a queue, poll it this many microseconds before
    /// sleeping (0: off).
    #[arg(long, default_value_t = 0)]
    poll_us: u64,
    /// Make the notify area mappable (the driver's notifications then go to shared
    /// memory) and poll the queues continuously (one busy core per worker).
    #[arg(long)]
    notify_mmap: bool,
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (512 | 4096)) => Ok(n),
        _ => Err(format!("{s:?}: the logical block size must be 512 or 4096")),
    }
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

fn parse_hex16(s: &str) -> Result<u16, String> {
    let t = s.trim_start_matches("0x").trim_start_matches("0X");
    u16::from_str_radix(t, 16).map_err(|e| format!("{s:?} is not a 16-bit hex value: {e}"))
}

/// `dev` as an export named `name`, its DMA maps capped at `max_dma_maps`. Whether it
/// fits `transport` is checked by the export (one place for every user of the API), except
/// for the proxy, which is meant to sit behind vfio-user.
fn make_device(
    dev: &DeviceArgs,
    name: &str,
    max_dma_maps: usize,
    transport: Transport,
) -> Result<Export, String> {
    match dev {
        DeviceArgs::Gpio { inputs } => {
            info!("gpio: inputs = {inputs:#06x}");
            let dma = Arc::new(DmaSpace::new(max_dma_maps));
            Ok(Export::pci(name, IdioGpioCard::new(dma, *inputs)))
        }
        DeviceArgs::VirtioBlk {
            file,
            readonly,
            queues,
            direct,
            block_size,
            virtio: _,
        } => {
            let blk = VirtioBlk::new(BlkOptions {
                path: file.clone(),
                readonly: *readonly,
                queues: *queues,
                direct: *direct,
                logical_block_size: *block_size,
                ..BlkOptions::default()
            })
            .map_err(|e| format!("virtio-blk: {}: {e}", file.display()))?;
            info!(
                "virtio-blk: {} ({} queue(s){}{})",
                file.display(),
                queues,
                if *readonly { ", read-only" } else { "" },
                if *direct { ", O_DIRECT" } else { "" }
            );
            Ok(Export::virtio(name, VIRTIO_ID_BLOCK, Arc::new(blk)))
        }
        DeviceArgs::VhostUserProxy {
            backend_socket,
            virtio_id,
            queues,
        } => {
            if transport != Transport::VfioUser {
                return Err(
                    "vhost-user-proxy puts a vhost-user backend behind vfio-user: \
                            use --transport vfio-user"
                        .into(),
                );
            }
            let dma = Arc::new(DmaSpace::new(max_dma_maps));
            let proxy = VhostUserProxy::connect(
                backend_socket,
                *virtio_id,
                usize::from(*queues),
                dma.clone(),
            )
            .map_err(|e| {
                format!(
                    "vhost-user-proxy: cannot use the backend at {}: {e}",
                    backend_socket.display()
                )
            })?;
            info!(
                "vhost-user-proxy: virtio device type {virtio_id} at {}",
                backend_socket.display()
            );
            Ok(Export::virtio_device(name, proxy, dma))
        }
        DeviceArgs::VirtioRng { virtio: _ } => {
            let rng = VirtioRng::new().map_err(|e| format!("virtio-rng: {e}"))?;
            Ok(Export::virtio(name, VIRTIO_ID_RNG, Arc::new(rng)))
        }
    }
}

/// `base` with the device's own options (adaptive polling, mappable notify area).
fn device_options(base: ExportOptions, dev: &DeviceArgs) -> ExportOptions {
    match dev {
        DeviceArgs::VirtioBlk { virtio, .. } | DeviceArgs::VirtioRng { virtio } => base
            .poll(Duration::from_micros(virtio.poll_us))
            .notify_mmap(virtio.notify_mmap),
        DeviceArgs::Gpio { .. } | DeviceArgs::VhostUserProxy { .. } => base,
    }
}

const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_ID_RNG: u32 = 4;

fn device_name(dev: &DeviceArgs) -> &'static str {
    match dev {
        DeviceArgs::VhostUserProxy { .. } => "vhost-user-proxy",
        DeviceArgs::Gpio { .. } => "gpio",
        DeviceArgs::VirtioBlk { .. } => "virtio-blk",
        DeviceArgs::VirtioRng { .. } => "virtio-rng",
    }
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

/// The export options `serve` was given.
fn serve_options(args: &ServeArgs) -> ExportOptions {
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
    device_options(options, &args.device)
}

/// A socket transport listening on `socket`, as the export API takes it (VDUSE devices
/// have no socket and never come here).
fn socket_transport(transport: Transport, socket: ExportSocket) -> ExportTransport {
    match transport {
        Transport::VhostUser => ExportTransport::VhostUser(socket),
        Transport::VfioUser | Transport::Vduse => ExportTransport::VfioUser(socket),
    }
}

/// `serve`: one device on one transport, through the same export API a device author
/// uses (`unidev_transports::export`). With `--transport vduse` the device is created
/// (or taken over from a killed daemon), served on its own thread and optionally attached
/// to the vDPA bus; on SIGTERM/SIGINT it is detached first (while its requests are still
/// served: the driver resets the device on removal), then destroyed.
fn serve(args: ServeArgs) -> Result<(), String> {
    let vduse = args.transport == Transport::Vduse;
    if !vduse && (args.name.is_some() || args.attach.is_some()) {
        return Err("--name and --attach apply to --transport vduse only".into());
    }
    let vduse_name = match (&args.name, vduse) {
        (Some(n), true) => Some(n.clone()),
        (None, true) => {
            return Err("--transport vduse needs --name NAME (the /dev/vduse/NAME device)".into())
        }
        _ => None,
    };
    let name = device_name(&args.device);
    if let DeviceArgs::VirtioBlk { virtio, .. } | DeviceArgs::VirtioRng { virtio } = &args.device {
        if virtio.notify_mmap && args.transport != Transport::VfioUser {
            return Err(format!(
                "{name}: --notify-mmap applies to the vfio-user transport only"
            ));
        }
    }
    set_seccomp(args.seccomp.policy())?;
    let export = make_device(&args.device, name, args.max_dma_maps, args.transport)?;
    let (transport, shown) = match (vduse_name, &args.socket_path, args.fd) {
        (Some(vduse_name), _, _) => {
            let mut target = VduseTarget::new(vduse_name).control_path(&args.vduse_control);
            target.attach = args.attach.map(AttachArg::driver);
            (ExportTransport::Vduse(target), None)
        }
        (None, Some(path), _) => (
            socket_transport(args.transport, ExportSocket::Path(path.clone())),
            Some(path.display().to_string()),
        ),
        (None, None, Some(fd)) => (
            socket_transport(
                args.transport,
                ExportSocket::Listener(listener::from_fd(fd).map_err(|e| e.to_string())?),
            ),
            Some(format!("fd {fd}")),
        ),
        (None, None, None) => return Err("--socket-path or --fd is required".into()),
    };
    let transport_name = transport.name();
    let exported = export
        .serve(transport, &serve_options(&args))
        .map_err(|e| e.to_string())?;
    install_signal_handlers(vec![exported.stop_handle()])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    if let Some(shown) = shown {
        info!("{name}: {transport_name} server listening on {shown}");
    }
    exported.run().map_err(|e| e.to_string())
}

impl AttachArg {
    fn driver(self) -> VdpaDriver {
        match self {
            AttachArg::VirtioVdpa => VdpaDriver::VirtioVdpa,
            AttachArg::VhostVdpa => VdpaDriver::VhostVdpa,
        }
    }
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
    let mut exports = Vec::with_capacity(specs.len());
    for s in &specs {
        let export = make_device(&s.device, &s.name, s.max_dma_maps, s.transport)
            .map_err(|e| format!("{}: {e}; nothing started", s.location))?;
        exports.push(export);
    }
    let options = |s: &config::DeviceSpec| {
        let mut o = ExportOptions::default()
            .socket_mode(s.socket_mode)
            .max_dma_maps(s.max_dma_maps);
        o.socket_group = s.socket_group;
        o.allowed_uids = s.allowed_uids.clone();
        device_options(o, &s.device)
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
    for (s, export) in specs.iter().zip(exports) {
        let Some(socket) = &s.socket else {
            kernel_devices.push((s, export));
            continue;
        };
        let transport = socket_transport(s.transport, ExportSocket::Path(socket.clone()));
        let exported = export
            .serve(transport, &options(s))
            .map_err(|e| format!("{}: {e}; nothing started", s.location))?;
        socket_devices.push((s, exported.on_exit(done())));
    }
    install_signal_handlers(vec![wake])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    // VDUSE devices appear system-wide: create them once every socket is in place.
    let mut running_vduse: Vec<Running> = Vec::new();
    for (s, export) in kernel_devices {
        let started = match &s.vduse {
            Some(target) => export
                .serve(ExportTransport::Vduse(target.clone()), &options(s))
                .and_then(|e| e.on_exit(done()).spawn())
                .map_err(|e| e.to_string()),
            None => Err("VDUSE carries virtio devices only".to_string()),
        };
        match started {
            Ok(r) => running_vduse.push(r),
            Err(e) => {
                for r in running_vduse.into_iter().rev() {
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
    for r in running_vduse {
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
    serve(ServeArgs {
        transport: Transport::VfioUser,
        socket_path: Some(sock),
        fd: None,
        socket_mode: 0o600,
        socket_group: None,
        allow_uids: Vec::new(),
        max_dma_maps: unidev_core::memory::DEFAULT_MAX_MAPS,
        max_msg_fds: 16,
        max_data_xfer_size: 1 << 20,
        dma_rw_layout: LayoutArg::Qemu,
        io_timeout_secs: 10,
        seccomp: SeccompArg::Off,
        name: None,
        attach: None,
        vduse_control: PathBuf::from(DEFAULT_CONTROL_PATH),
        device: DeviceArgs::VirtioBlk {
            file: image,
            readonly: false,
            queues: 1,
            direct: false,
            block_size: 512,
            virtio: VirtioArgs {
                poll_us: 0,
                notify_mmap: false,
            },
        },
    })
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
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
