//! The vfio-user server for one device: accepts one client at a time on a listening
//! socket and runs its session on the core's epoll dispatch (vfio-user.rst, "Socket",
//! "Socket Disconnection Behavior").
//!
//! The listening socket, the client connection, the inbox of messages parked by DMA
//! requesters, and INTx unmask eventfds are all watched by one [`EventLoop`] on the
//! server's thread. A second client that connects while one is attached is refused (its
//! connection closed with a log line) — the spec allows one client per device.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use unidev_core::dispatch::{Control, EventLoop, LoopContext, StopHandle, Token};
use unidev_core::irq::Interrupts;
use unidev_core::pci::SharedPciDevice;

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
    event_loop: EventLoop,
}

struct Attached {
    session: Mutex<Session>,
    irqs: Arc<Interrupts>,
    /// The watches of the connection and its inbox.
    tokens: Mutex<Vec<Token>>,
    unmask: Mutex<(u64, Vec<Token>)>,
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
            event_loop: EventLoop::new()?,
        })
    }

    /// Serve only the local users `peers` admits (refused connections are logged).
    pub fn with_peer_policy(mut self, peers: PeerPolicy) -> Self {
        self.peers = peers;
        self
    }

    /// A handle that ends [`run`](VfioUserServer::run) from any thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.event_loop.stop_handle()
    }

    /// Serve until stopped. A connected client's session is closed on the way out.
    pub fn run(mut self) -> io::Result<()> {
        let attached: Arc<Mutex<Option<Arc<Attached>>>> = Arc::new(Mutex::new(None));
        let busy = Arc::new(AtomicBool::new(false));
        let (listener, device, config, name, peers) = (
            self.listener.clone(),
            self.device.clone(),
            self.config.clone(),
            self.name.clone(),
            self.peers.clone(),
        );
        let att = attached.clone();
        self.event_loop.add(
            self.listener.as_raw_fd(),
            epoll::Events::EPOLLIN,
            move |ctx, _| {
                let Some(stream) = crate::listener::accept(&listener, &name) else {
                    return Control::Continue;
                };
                if let Err(why) = peers.admit(&stream) {
                    warn!("{name}: refusing a connection: {why}");
                    return Control::Continue;
                }
                if busy.load(Ordering::SeqCst) {
                    // The attached client may have just closed; its hang-up can be
                    // waiting behind this accept in the same epoll batch.
                    let current = att.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    let gone = current.as_ref().is_some_and(|a| {
                        a.session
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .finish_if_gone()
                    });
                    if !gone {
                        warn!("{name}: refusing a second client while one is attached");
                        return Control::Continue;
                    }
                    if let Some(a) = current {
                        teardown(&a, ctx);
                    }
                    *att.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    busy.store(false, Ordering::SeqCst);
                }
                if let Err(e) = stream.set_nonblocking(false) {
                    warn!("{name}: {e}");
                    return Control::Continue;
                }
                let peer = peer_description(&stream);
                let session_name = format!("{name}[{peer}]");
                let limits = Limits {
                    max_msg_size: config.max_msg_size(),
                    max_fds: config.max_msg_fds,
                };
                let session = match Session::new(
                    session_name.clone(),
                    MessageSocket::new(stream, limits),
                    device.clone(),
                    config.clone(),
                ) {
                    Ok(s) => s,
                    Err(e) => {
                        error!(
                            "{session_name}: cannot start session: {}",
                            unidev_core::limits::describe(&e)
                        );
                        return Control::Continue;
                    }
                };
                info!("{session_name}: client connected");
                busy.store(true, Ordering::SeqCst);
                let irqs = device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .interrupts()
                    .clone();
                let (sock_fd, inbox_fd) = (session.socket_fd(), session.inbox_fd());
                let a = Arc::new(Attached {
                    session: Mutex::new(session),
                    irqs,
                    tokens: Mutex::new(Vec::new()),
                    unmask: Mutex::new((0, Vec::new())),
                });
                *att.lock().unwrap_or_else(|e| e.into_inner()) = Some(a.clone());

                let a_inbox = a.clone();
                let inbox_token = ctx.add(inbox_fd, epoll::Events::EPOLLIN, move |ctx, _| {
                    let st = a_inbox
                        .session
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .drain_inbox();
                    sync_unmask_watches(&a_inbox, ctx);
                    if st == SessionState::Closed {
                        // The socket handler sees the hang-up and tears down.
                        a_inbox
                            .session
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .shutdown();
                    }
                    Control::Continue
                });

                let (a_sock, busy2, att2) = (a.clone(), busy.clone(), att.clone());
                let sock_token = ctx.add(
                    sock_fd,
                    epoll::Events::EPOLLIN | epoll::Events::EPOLLRDHUP,
                    move |ctx, _| {
                        let st = a_sock
                            .session
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .serve_one();
                        if st == SessionState::Open {
                            sync_unmask_watches(&a_sock, ctx);
                            return Control::Continue;
                        }
                        teardown(&a_sock, ctx);
                        *att2.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        busy2.store(false, Ordering::SeqCst);
                        Control::Continue
                    },
                );
                a.tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend([inbox_token, sock_token]);
                Control::Continue
            },
        )?;
        info!("{}: serving", self.name);
        let result = self.event_loop.run();
        let left = attached.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(a) = left {
            a.session.lock().unwrap_or_else(|e| e.into_inner()).close();
        }
        info!("{}: stopped", self.name);
        result
    }
}

fn teardown(a: &Attached, ctx: &mut LoopContext) {
    for t in a.tokens.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
        ctx.remove(t);
    }
    let mut um = a.unmask.lock().unwrap_or_else(|e| e.into_inner());
    for t in um.1.drain(..) {
        ctx.remove(t);
    }
    a.session.lock().unwrap_or_else(|e| e.into_inner()).close();
}

/// Watch the INTx unmask eventfds the client attached (ACTION_UNMASK with an eventfd),
/// re-reading them whenever they change.
fn sync_unmask_watches(a: &Attached, ctx: &mut LoopContext) {
    let generation = a.irqs.unmask_generation();
    let mut um = a.unmask.lock().unwrap_or_else(|e| e.into_inner());
    if um.0 == generation {
        return;
    }
    um.0 = generation;
    for t in um.1.drain(..) {
        ctx.remove(t);
    }
    for (fd, kind, line) in a.irqs.unmask_fds() {
        let irqs = a.irqs.clone();
        let raw = fd.as_raw_fd();
        let token = ctx.add(raw, epoll::Events::EPOLLIN, move |_, _| {
            // `fd` (a duplicate) keeps the registration alive while watched.
            let _ = fd.read();
            irqs.unmask(kind, line, 1, None).ok();
            Control::Continue
        });
        um.1.push(token);
    }
}

/// "pid 1234 uid 1000" from SO_PEERCRED, for log lines.
pub fn peer_description(stream: &std::os::unix::net::UnixStream) -> String {
    match crate::listener::peer_credentials(stream) {
        Ok(c) => format!("pid {} uid {}", c.pid, c.uid),
        Err(_) => "unknown peer".to_string(),
    }
}
