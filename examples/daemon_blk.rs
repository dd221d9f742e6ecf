//! An upstream-style backend `main`, as rust-vmm's vhost-device daemons write theirs,
//! on unidev's drop-in for vhost-user-backend's daemon: the differences from a
//! vhost-user-only main are the `use` line naming `VhostUserDaemon` and the address it
//! serves on. (It uses upstream's `start` + `wait` form, with `start_on` taking the
//! address, so that stdin can end the session; `serve(address)` is the one-call form.)
//! The backend is unidev's virtio-blk on an image file.
//!
//! ```sh
//! cargo run --example daemon_blk -- vhost-user /tmp/blk.sock disk.img
//! cargo run --example daemon_blk -- vfio-user /tmp/blk.sock disk.img
//! cargo run --example daemon_blk -- vduse vdb0 disk.img    # root, vduse + virtio_vdpa
//! ```
//!
//! It serves one session (a VDUSE device: until stdin closes) and exits, as upstream
//! daemons do; a line or EOF on stdin ends it early.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use unidev_backends::virtio_blk::{BlkOptions, VirtioBlk, VIRTIO_ID_BLOCK};
use unidev_transports::daemon::{DaemonAddress, VhostUserDaemon};
use unidev_transports::vduse::{VdpaDriver, Vduse};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

fn serve(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let (Some(transport), Some(place), Some(image)) = (args.get(1), args.get(2), args.get(3))
    else {
        return Err("usage: daemon_blk vhost-user|vfio-user|vduse SOCKET|NAME IMAGE".into());
    };
    let backend = Arc::new(VirtioBlk::new(BlkOptions {
        path: PathBuf::from(image),
        ..BlkOptions::default()
    })?);
    let mut daemon = VhostUserDaemon::new(
        String::from("daemon-blk"),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    // vhost-user-backend's error type (Display, no std::error::Error): as upstream.
    .map_err(|e| e.to_string())?;
    let address = match transport.as_str() {
        // What an upstream main passes to serve(): a path, served over vhost-user.
        "vhost-user" => DaemonAddress::vhost_user(place.as_str()),
        "vfio-user" => DaemonAddress::vfio_user(place.as_str(), VIRTIO_ID_BLOCK),
        "vduse" => DaemonAddress::vduse(
            Vduse::new(place.as_str()).attach(VdpaDriver::VirtioVdpa),
            VIRTIO_ID_BLOCK,
        ),
        other => return Err(format!("unknown transport {other:?}").into()),
    };
    daemon.start_on(address).map_err(|e| e.to_string())?;
    println!("daemon-blk: serving {image} over {transport} at {place}");
    if let Some(stop) = daemon.shutdown_handle() {
        std::thread::spawn(move || {
            let _ = std::io::stdin().lock().read_line(&mut String::new());
            stop.shutdown();
        });
    }
    daemon.wait().map_err(|e| e.to_string())?;
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = serve(&std::env::args().collect::<Vec<_>>()) {
        eprintln!("daemon-blk: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
