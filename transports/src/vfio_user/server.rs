//! The vfio-user server for one device: accepts one client at a time on a listening
//! socket and runs its session on the core's epoll dispatch (vfio-user.rst, "Socket",
//! "Socket Disconnection Behavior").
//!
//! The listening socket, the client connection, the inbox of messages parked by DMA
//! requesters, and INTx unmask eventfds are all watched by one [`EventLoop`] on the
//! server's thread. A second client that connects while one is attached is refused (its
//! connection closed with a log line) — the spec allows one client per device.
//!
//! `Acceptor` is the listening side (accept, admit, attach), `Connection` one attached
//! client (its session and its watches).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use unidev_core::dispatch::{Control, EventLoop, LoopContext, StopHandle, Token};
use unidev_core::irq::Interrupts;
use unidev_core::pci::SharedPciDevice;
use unidev_core::sync::lock;

use super::session::{ServerConfig, Session, SessionState};
use super::socket::{Limits, MessageSocket};
use crate::listener::PeerPolicy;

/// A vfio-user server exporting one PCI device.
pub struct VfioUserServer {
    name: String,
    listener: Arc<UnixListener>,
    device: SharedPciDevice,
    config: ServerConfig,
    peers: PeerPolicy,
    single_session: bool,
    event_loop: EventLoop,
}

impl VfioUserServer {
    /// Serve `device` to clients of `listener`. `name` prefixes log lines.
    pub fn new(
        name: impl Into<String>,
        listener: UnixListener,
        device: SharedPciDevice,
        config: ServerConfig,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        crate::listener::reserve_fd();
        Ok(VfioUserServer {
            name: name.into(),
            listener: Arc::new(listener),
            device,
            config,
            peers: PeerPolicy::default(),
            single_session: false,
            event_loop: EventLoop::new()?,
        })
    }

    /// Serve only the local users `peers` admits (refused connections are logged).
    pub fn with_peer_policy(mut self, peers: PeerPolicy) -> Self {
        self.peers = peers;
        self
    }

    /// Stop serving once the first client's session ends (`true`), instead of serving
    /// the next client.
    pub fn single_session(mut self, on: bool) -> Self {
        self.single_session = on;
        self
    }

    /// A handle that ends [`run`](VfioUserServer::run) from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.event_loop.stop_handle()
    }

    /// Serve until stopped. A connected client's session is closed on the way out.
    pub fn run(mut self) -> io::Result<()> {
        let acceptor = Arc::new(Acceptor {
            name: self.name.clone(),
            listener: self.listener.clone(),
            device: self.device.clone(),
            config: self.config.clone(),
            peers: self.peers.clone(),
            single_session: self.single_session,
            attached: Mutex::new(None),
        });
        let on_listener = acceptor.clone();
        self.event_loop.add(
            self.listener.as_raw_fd(),
            epoll::Events::EPOLLIN,
            move |ctx, _| on_listener.accept(ctx),
        )?;
        info!("{}: serving", self.name);
        let result = self.event_loop.run();
        if let Some(c) = acceptor.take_attached() {
            lock(&c.session).close();
        }
        info!("{}: stopped", self.name);
        result
    }
}

/// The listening side: accepts a client while none is attached, refuses a second one.
struct Acceptor {
    name: String,
    listener: Arc<UnixListener>,
    device: SharedPciDevice,
    config: ServerConfig,
    peers: PeerPolicy,
    single_session: bool,
    /// The attached client, if any.
    attached: Mutex<Option<Arc<Connection>>>,
}

impl Acceptor {
    fn take_attached(&self) -> Option<Arc<Connection>> {
        lock(&self.attached).take()
    }

    /// The listener is readable: accept, admit and attach a client.
    fn accept(self: &Arc<Self>, ctx: &mut LoopContext) -> Control {
        let name = &self.name;
        let Some(stream) = crate::listener::accept(&self.listener, name) else {
            return Control::Continue;
        };
        if let Err(why) = self.peers.admit(&stream) {
            warn!("{name}: refusing a connection: {why}");
            return Control::Continue;
        }
        match self.make_room(ctx) {
            Room::Free => {}
            Room::Taken => {
                warn!("{name}: refusing a second client while one is attached");
                return Control::Continue;
            }
            // The first client's session just ended: with one session only, this one
            // is not served.
            Room::Freed if self.single_session => {
                info!("{name}: the session ended; not serving another client");
                return Control::Exit;
            }
            Room::Freed => {}
        }
        if let Err(e) = stream.set_nonblocking(false) {
            warn!("{name}: {e}");
            return Control::Continue;
        }
        let Some(connection) = self.open(stream) else {
            return Control::Continue;
        };
        *lock(&self.attached) = Some(connection.clone());
        connection.watch(ctx, self.clone());
        Control::Continue
    }

    /// Whether a new client may attach: nobody is attached, or the attached client has
    /// just closed (its hang-up can be waiting behind this accept in the same epoll
    /// batch), in which case it is detached now.
    fn make_room(&self, ctx: &mut LoopContext) -> Room {
        let current = lock(&self.attached).clone();
        let Some(current) = current else {
            return Room::Free;
        };
        if !lock(&current.session).finish_if_gone() {
            return Room::Taken;
        }
        self.detach(&current, ctx);
        Room::Freed
    }

    /// A session for `stream`.
    fn open(&self, stream: UnixStream) -> Option<Arc<Connection>> {
        let session_name = format!("{}[{}]", self.name, peer_description(&stream));
        let limits = Limits {
            max_msg_size: self.config.max_msg_size(),
            max_fds: self.config.max_msg_fds,
        };
        let session = match Session::new(
            session_name.clone(),
            MessageSocket::new(stream, limits),
            self.device.clone(),
            self.config.clone(),
        ) {
            Ok(s) => s,
            Err(e) => {
                error!(
                    "{session_name}: cannot start session: {}",
                    unidev_core::limits::describe(&e)
                );
                return None;
            }
        };
        info!("{session_name}: client connected");
        let irqs = lock(&self.device).interrupts().clone();
        Some(Arc::new(Connection {
            session: Mutex::new(session),
            irqs,
            tokens: Mutex::new(Vec::new()),
            unmask: Mutex::new(UnmaskWatches::default()),
        }))
    }

    /// Tear `connection` down and forget it if it is the attached one.
    fn detach(&self, connection: &Arc<Connection>, ctx: &mut LoopContext) {
        connection.teardown(ctx);
        let mut attached = lock(&self.attached);
        if attached
            .as_ref()
            .is_some_and(|a| Arc::ptr_eq(a, connection))
        {
            *attached = None;
        }
    }
}

/// Whether a new client finds the device free.
enum Room {
    /// Nobody is attached.
    Free,
    /// A client is attached.
    Taken,
    /// The attached client had gone; it is detached now.
    Freed,
}

/// One attached client: its session and the watches of its socket, its inbox (messages
/// parked while a DMA request waited for its reply) and its INTx unmask eventfds.
struct Connection {
    session: Mutex<Session>,
    irqs: Arc<Interrupts>,
    /// The watches of the connection and its inbox.
    tokens: Mutex<Vec<Token>>,
    unmask: Mutex<UnmaskWatches>,
}

/// The INTx unmask eventfds being watched, as of the interrupts' unmask generation.
#[derive(Default)]
struct UnmaskWatches {
    generation: u64,
    tokens: Vec<Token>,
}

impl Connection {
    /// Watch the connection's socket and inbox on the loop.
    fn watch(self: &Arc<Self>, ctx: &mut LoopContext, acceptor: Arc<Acceptor>) {
        let (sock_fd, inbox_fd) = {
            let s = lock(&self.session);
            (s.socket_fd(), s.inbox_fd())
        };
        let on_inbox = self.clone();
        let inbox = ctx.add(inbox_fd, epoll::Events::EPOLLIN, move |ctx, _| {
            on_inbox.drain_inbox(ctx);
            Control::Continue
        });
        let on_socket = self.clone();
        let socket = ctx.add(
            sock_fd,
            epoll::Events::EPOLLIN | epoll::Events::EPOLLRDHUP,
            move |ctx, _| {
                if on_socket.serve_one(ctx) != SessionState::Open {
                    acceptor.detach(&on_socket, ctx);
                    if acceptor.single_session {
                        return Control::Exit;
                    }
                }
                Control::Continue
            },
        );
        lock(&self.tokens).extend([inbox, socket]);
    }

    /// Handle the messages parked in the inbox.
    fn drain_inbox(&self, ctx: &mut LoopContext) {
        let state = lock(&self.session).drain_inbox();
        self.sync_unmask_watches(ctx);
        if state == SessionState::Closed {
            // The socket handler sees the hang-up and tears down.
            lock(&self.session).shutdown();
        }
    }

    /// Handle one message from the socket.
    fn serve_one(&self, ctx: &mut LoopContext) -> SessionState {
        let state = lock(&self.session).serve_one();
        if state == SessionState::Open {
            self.sync_unmask_watches(ctx);
        }
        state
    }

    /// Stop watching everything and close the session.
    fn teardown(&self, ctx: &mut LoopContext) {
        for t in lock(&self.tokens).drain(..) {
            ctx.remove(t);
        }
        for t in lock(&self.unmask).tokens.drain(..) {
            ctx.remove(t);
        }
        lock(&self.session).close();
    }

    /// Watch the INTx unmask eventfds the client attached (ACTION_UNMASK with an
    /// eventfd), re-reading them whenever they change.
    fn sync_unmask_watches(&self, ctx: &mut LoopContext) {
        let generation = self.irqs.unmask_generation();
        let mut watches = lock(&self.unmask);
        if watches.generation == generation {
            return;
        }
        watches.generation = generation;
        for t in watches.tokens.drain(..) {
            ctx.remove(t);
        }
        for (fd, kind, line) in self.irqs.unmask_fds() {
            let irqs = self.irqs.clone();
            let raw = fd.as_raw_fd();
            let token = ctx.add(raw, epoll::Events::EPOLLIN, move |_, _| {
                // `fd` (a duplicate) keeps the registration alive while watched.
                let _ = fd.read();
                irqs.unmask(kind, line, 1, None).ok();
                Control::Continue
            });
            watches.tokens.push(token);
        }
    }
}

/// "pid 1234 uid 1000" from SO_PEERCRED, for log lines.
pub fn peer_description(stream: &std::os::unix::net::UnixStream) -> String {
    match crate::listener::peer_credentials(stream) {
        Ok(c) => format!("pid {} uid {}", c.pid, c.uid),
        Err(_) => "unknown peer".to_string(),
    }
}
