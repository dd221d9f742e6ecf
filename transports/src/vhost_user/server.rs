//! The vhost-user server for one device: serves one frontend at a time on a listening
//! socket, on the core's epoll dispatch.
//!
//! While a frontend is attached the listening socket is not watched: a second frontend
//! waits in the listen backlog and is accepted once the first disconnects (QEMU's
//! reconnect). On disconnect every queue stops, the device is reset and the memory table
//! is dropped; the device object itself lives on for the next frontend.
//!
//! `Acceptor` is the listening side (accept, admit, hand over to a connection),
//! `Connection` the attached frontend (its session and the `vhost` crate's request
//! handler on its socket).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use unidev_core::dispatch::{Control, EventLoop, LoopContext, StopHandle, Token};
use unidev_core::limits;
use unidev_core::memory::DmaSpace;
use unidev_core::sync::lock;
use unidev_core::virtio::VirtioDevice;
use vhost::vhost_user::{BackendReqHandler, Error as VhostError};

use super::session::Session;
use super::status::{self, Intercepted};
use crate::listener::PeerPolicy;

/// How long one request may take to arrive in full once its first byte did.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A vhost-user backend exporting one virtio device.
pub struct VhostUserServer {
    acceptor: Arc<Acceptor>,
    event_loop: EventLoop,
}

/// The listening side: accepts one frontend at a time; while one is attached the
/// listener is not watched and others wait in the backlog.
struct Acceptor {
    name: String,
    listener: UnixListener,
    device: Arc<dyn VirtioDevice>,
    dma: Arc<DmaSpace>,
    /// The attached frontend's session.
    current: Mutex<Option<Arc<Mutex<Session>>>>,
    peers: PeerPolicy,
    /// Stop once the first frontend's session ends.
    single_session: bool,
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
            acceptor: Arc::new(Acceptor {
                name: name.into(),
                listener,
                device,
                dma,
                current: Mutex::new(None),
                peers: PeerPolicy::default(),
                single_session: false,
            }),
            event_loop: EventLoop::new()?,
        })
    }

    /// Serve only the local users `peers` admits (refused connections are logged).
    pub fn with_peer_policy(mut self, peers: PeerPolicy) -> Self {
        if let Some(acceptor) = Arc::get_mut(&mut self.acceptor) {
            acceptor.peers = peers;
        }
        self
    }

    /// Stop serving once the first frontend's session ends (`true`), instead of
    /// accepting the next frontend.
    pub fn single_session(mut self, on: bool) -> Self {
        if let Some(acceptor) = Arc::get_mut(&mut self.acceptor) {
            acceptor.single_session = on;
        }
        self
    }

    /// A handle that ends [`run`](VhostUserServer::run) from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.event_loop.stop_handle()
    }

    /// Serve until stopped. An attached frontend's session is closed on the way out.
    pub fn run(mut self) -> io::Result<()> {
        let acceptor = self.acceptor.clone();
        acceptor.listen_on(&mut self.event_loop)?;
        info!("{}: serving", acceptor.name);
        let result = self.event_loop.run();
        let left = lock(&acceptor.current).take();
        if let Some(session) = left {
            lock(&session).close();
        }
        info!("{}: stopped", acceptor.name);
        result
    }
}

impl Acceptor {
    fn listen_on(self: &Arc<Self>, event_loop: &mut EventLoop) -> io::Result<()> {
        let acceptor = self.clone();
        event_loop.add(
            self.listener.as_raw_fd(),
            epoll::Events::EPOLLIN,
            move |ctx, _| acceptor.accept(ctx),
        )?;
        Ok(())
    }

    /// Watch the listener again (the attached frontend has gone).
    fn listen_again(self: &Arc<Self>, ctx: &mut LoopContext) {
        let acceptor = self.clone();
        ctx.add(
            self.listener.as_raw_fd(),
            epoll::Events::EPOLLIN,
            move |ctx, _| acceptor.accept(ctx),
        );
    }

    /// The listener is readable: accept and admit a frontend; while it is attached, stop
    /// watching the listener.
    fn accept(self: &Arc<Self>, ctx: &mut LoopContext) -> Control {
        let Some(stream) = crate::listener::accept(&self.listener, &self.name) else {
            return Control::Continue;
        };
        if let Err(why) = self.peers.admit(&stream) {
            warn!("{}: refusing a connection: {why}", self.name);
            return Control::Continue;
        }
        let setup = stream
            .set_nonblocking(false)
            .and_then(|_| stream.set_read_timeout(Some(IO_TIMEOUT)))
            .and_then(|_| stream.set_write_timeout(Some(IO_TIMEOUT)));
        if let Err(e) = setup {
            warn!(
                "{}: cannot set up a connection: {}",
                self.name,
                limits::describe(&e)
            );
            return Control::Continue;
        }
        let session_name = format!("{}[fd {}]", self.name, stream.as_raw_fd());
        let session = Arc::new(Mutex::new(Session::new(
            session_name.clone(),
            self.device.clone(),
            self.dma.clone(),
        )));
        *lock(&self.current) = Some(session.clone());
        let handler = BackendReqHandler::from_stream(stream, session.clone());
        info!("{session_name}: frontend connected");
        let fd = handler.as_raw_fd();
        // A device whose backend failed (a panic) cannot be used on this connection: it
        // is closed, and the next frontend (QEMU's reconnect) finds the device reset.
        let health = self.device.health().map(|health| {
            let name = session_name.clone();
            ctx.add(health.event_fd(), epoll::Events::EPOLLIN, move |_, _| {
                health.acknowledge();
                warn!("{name}: the device failed; closing the connection");
                // SAFETY: shutdown(2) on the connection's socket, which the request
                // handler keeps open until this watch is removed (`Connection::end`).
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                Control::Remove
            })
        });
        let mut connection = Connection {
            name: session_name,
            fd,
            session,
            handler,
            acceptor: self.clone(),
            health,
        };
        ctx.add(connection.fd, epoll::Events::EPOLLIN, move |ctx, _| {
            connection.on_readable(ctx)
        });
        // One frontend at a time: others wait in the backlog.
        Control::Remove
    }
}

/// The attached frontend: its session and the `vhost` crate's request handler on its
/// socket.
struct Connection {
    name: String,
    fd: RawFd,
    session: Arc<Mutex<Session>>,
    handler: BackendReqHandler<Mutex<Session>>,
    acceptor: Arc<Acceptor>,
    /// The watch of the device's health, while the connection lasts.
    health: Option<Token>,
}

impl Connection {
    /// A request is waiting: handle it (requests the `vhost` crate cannot dispatch are
    /// intercepted first); on a fatal error, end the session.
    fn on_readable(&mut self, ctx: &mut LoopContext) -> Control {
        let name = &self.name;
        let header = match status::peek_header(self.fd) {
            Ok(h) => h,
            Err(e) => {
                // A peek fails like that only for the request's descriptors.
                let why = match limits::Limit::of_fd_error(&e) {
                    Some(_) => limits::fds_lost(&e),
                    None => e.to_string(),
                };
                warn!("{name}: dropping the connection: {why}");
                return self.end(ctx);
            }
        };
        let (intercepted, protocol) = {
            let mut s = lock(&self.session);
            let protocol = s.acked_protocol();
            let intercepted = match header {
                Some(h) => status::intercept(self.fd, h, &mut s),
                None => Ok(Intercepted::No),
            };
            (intercepted, protocol)
        };
        let outcome = match intercepted {
            Ok(Intercepted::Handled) => return Control::Continue,
            Ok(Intercepted::No) => self.handler.handle_request(),
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
                        "{name}: request {} refused ({}); it needs a reply the handler \
                         could not give: dropping the connection",
                        h.request,
                        describe(&e)
                    ),
                    _ => {
                        warn!("{name}: request refused: {}", describe(&e));
                        return Control::Continue;
                    }
                }
            }
            Err(VhostError::Disconnected) => info!("{name}: frontend disconnected"),
            Err(e) => warn!("{name}: dropping the connection: {}", describe(&e)),
        }
        self.end(ctx)
    }

    /// Close the session and go back to accepting the next frontend.
    fn end(&mut self, ctx: &mut LoopContext) -> Control {
        if let Some(token) = self.health.take() {
            ctx.remove(token);
        }
        lock(&self.session).close();
        *lock(&self.acceptor.current) = None;
        if self.acceptor.single_session {
            return Control::Exit;
        }
        self.acceptor.listen_again(ctx);
        Control::Remove
    }
}
