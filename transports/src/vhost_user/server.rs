//! The vhost-user server for one device: serves one frontend at a time on a listening
//! socket, on the core's epoll dispatch.
//!
//! While a frontend is attached the listening socket is not watched: a second frontend
//! waits in the listen backlog and is accepted once the first disconnects (QEMU's
//! reconnect). On disconnect every queue stops, the device is reset and the memory table
//! is dropped; the device object itself lives on for the next frontend.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use unidev_core::dispatch::{Control, EventLoop, LoopContext, Readiness, StopHandle};
use unidev_core::limits;
use unidev_core::memory::DmaSpace;
use unidev_core::virtio::VirtioDevice;
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use super::session::Session;
use super::status::{self, Intercepted};
use crate::listener::PeerPolicy;

/// How long one request may take to arrive in full once its first byte did.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A vhost-user backend exporting one virtio device.
pub struct VhostUserServer {
    shared: Arc<Shared>,
    event_loop: EventLoop,
}

struct Shared {
    name: String,
    listener: UnixListener,
    device: Arc<dyn VirtioDevice>,
    dma: Arc<DmaSpace>,
    /// The attached frontend's session.
    current: Mutex<Option<Arc<Mutex<Session>>>>,
    peers: PeerPolicy,
}

impl Shared {
    fn current(&self) -> std::sync::MutexGuard<'_, Option<Arc<Mutex<Session>>>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Whether a request error means the connection is gone (or cannot be resynchronized),
/// rather than one refused request.
fn is_fatal(e: &VhostError) -> bool {
    matches!(
        e,
        VhostError::Disconnected
            | VhostError::PartialMessage
            | VhostError::OversizedMsg
            | VhostError::SocketBroken(_)
            | VhostError::SocketError(_)
            | VhostError::SocketRetry(_)
            | VhostError::SocketConnect(_)
    )
}

/// `e` for a log line; where a kernel limit caused it (EMFILE, ENFILE: a descriptor the
/// handler needed), which limit and how to raise it (`unidev_core::limits`).
/// Descriptors lost on their way in are caught before the crate reads the request (see
/// [`status::peek_header`]).
fn describe(e: &VhostError) -> String {
    match e {
        VhostError::ReqHandlerError(io)
        | VhostError::SocketError(io)
        | VhostError::SocketBroken(io)
        | VhostError::SocketRetry(io) => match limits::Limit::of_fd_error(io) {
            Some(limit) => format!("{e}: {}", limit.advice()),
            None => e.to_string(),
        },
        _ => e.to_string(),
    }
}

impl VhostUserServer {
    /// Serve `device`, whose guest memory is `dma`, to frontends of `listener`. `name`
    /// prefixes log lines.
    pub fn new(
        name: impl Into<String>,
        listener: UnixListener,
        device: Arc<dyn VirtioDevice>,
        dma: Arc<DmaSpace>,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        crate::listener::reserve_fd();
        Ok(VhostUserServer {
            shared: Arc::new(Shared {
                name: name.into(),
                listener,
                device,
                dma,
                current: Mutex::new(None),
                peers: PeerPolicy::default(),
            }),
            event_loop: EventLoop::new()?,
        })
    }

    /// Serve only the local users `peers` admits (refused connections are logged).
    pub fn with_peer_policy(mut self, peers: PeerPolicy) -> Self {
        if let Some(shared) = Arc::get_mut(&mut self.shared) {
            shared.peers = peers;
        }
        self
    }

    /// A handle that ends [`run`](VhostUserServer::run) from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.event_loop.stop_handle()
    }

    /// Serve until stopped. An attached frontend's session is closed on the way out.
    pub fn run(mut self) -> io::Result<()> {
        let shared = self.shared.clone();
        self.event_loop.add(
            shared.listener.as_raw_fd(),
            epoll::Events::EPOLLIN,
            listener_handler(shared.clone()),
        )?;
        info!("{}: serving", shared.name);
        let result = self.event_loop.run();
        let left = shared.current().take();
        if let Some(session) = left {
            session.lock().unwrap_or_else(|e| e.into_inner()).close();
        }
        info!("{}: stopped", shared.name);
        result
    }
}

/// Close a frontend's session and go back to accepting the next one.
fn end_session(ctx: &mut LoopContext, shared: &Arc<Shared>, session: &Mutex<Session>) -> Control {
    session.lock().unwrap_or_else(|e| e.into_inner()).close();
    *shared.current() = None;
    ctx.add(
        shared.listener.as_raw_fd(),
        epoll::Events::EPOLLIN,
        listener_handler(shared.clone()),
    );
    Control::Remove
}

fn listener_handler(
    shared: Arc<Shared>,
) -> impl FnMut(&mut LoopContext, Readiness) -> Control + Send + 'static {
    move |ctx, _| {
        let Some(stream) = crate::listener::accept(&shared.listener, &shared.name) else {
            return Control::Continue;
        };
        if let Err(why) = shared.peers.admit(&stream) {
            warn!("{}: refusing a connection: {why}", shared.name);
            return Control::Continue;
        }
        let setup = stream
            .set_nonblocking(false)
            .and_then(|_| stream.set_read_timeout(Some(IO_TIMEOUT)))
            .and_then(|_| stream.set_write_timeout(Some(IO_TIMEOUT)));
        if let Err(e) = setup {
            warn!(
                "{}: cannot set up a connection: {}",
                shared.name,
                limits::describe(&e)
            );
            return Control::Continue;
        }
        let session_name = format!("{}[fd {}]", shared.name, stream.as_raw_fd());
        let session = Arc::new(Mutex::new(Session::new(
            session_name.clone(),
            shared.device.clone(),
            shared.dma.clone(),
        )));
        *shared.current() = Some(session.clone());
        let mut handler = BackendReqHandler::from_stream(stream, session.clone());
        let fd = handler.as_raw_fd();
        info!("{session_name}: frontend connected");
        let shared2 = shared.clone();
        ctx.add(fd, epoll::Events::EPOLLIN, move |ctx, _| {
            let header = match status::peek_header(fd) {
                Ok(h) => h,
                Err(e) => {
                    // A peek fails like that only for the request's descriptors.
                    let why = match limits::Limit::of_fd_error(&e) {
                        Some(_) => limits::fds_lost(&e),
                        None => e.to_string(),
                    };
                    warn!("{session_name}: dropping the connection: {why}");
                    return end_session(ctx, &shared2, &session);
                }
            };
            let (intercepted, protocol) = {
                let mut s = session.lock().unwrap_or_else(|e| e.into_inner());
                let protocol = s.acked_protocol();
                let intercepted = match header {
                    Some(h) => status::intercept(fd, h, &mut s),
                    None => Ok(Intercepted::No),
                };
                (intercepted, protocol)
            };
            let outcome = match intercepted {
                Ok(Intercepted::Handled) => return Control::Continue,
                Ok(Intercepted::No) => handler.handle_request(),
                Err(e) => Err(VhostError::SocketError(e)),
            };
            match outcome {
                Ok(()) => return Control::Continue,
                Err(e) if !is_fatal(&e) => {
                    let handler_error = matches!(
                        e,
                        VhostError::ReqHandlerError(_) | VhostError::InvalidOperation(_)
                    );
                    match header {
                        Some(h) if h.left_unanswered(protocol, handler_error) => warn!(
                            "{session_name}: request {} refused ({}); it needs a reply the \
                             handler could not give: dropping the connection",
                            h.request,
                            describe(&e)
                        ),
                        _ => {
                            warn!("{session_name}: request refused: {}", describe(&e));
                            return Control::Continue;
                        }
                    }
                }
                Err(VhostError::Disconnected) => info!("{session_name}: frontend disconnected"),
                Err(e) => warn!("{session_name}: dropping the connection: {}", describe(&e)),
            }
            end_session(ctx, &shared2, &session)
        });
        // One frontend at a time: others wait in the backlog.
        Control::Remove
    }
}
