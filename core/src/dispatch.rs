//! Dispatch: the epoll event loop that transports (listening sockets, client connections,
//! unmask eventfds) and device workers (kick eventfds) share.
//!
//! One [`EventLoop`] runs on one thread. Each watched fd has a handler closure; a handler
//! may add or remove watches (a listener adds the connection it accepted) through the
//! [`LoopContext`] it is given, and changes take effect when it returns. A [`StopHandle`]
//! ends the loop from any thread (signal handling, shutdown).
//!
//! Built on the `epoll` crate; level-triggered, so a handler that leaves data unread is
//! simply called again.
//!
//! Stability: [`StopHandle`] is part of the stable device-author API (it stops an
//! exported device); [`EventLoop`], [`LoopContext`] and the handler types are transport
//! plumbing and **experimental** (`docs/api-stability.md`).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Identifies a watch in its loop.
pub type Token = u64;

/// Readiness bits passed to handlers (`epoll` event flags).
pub type Readiness = epoll::Events;

/// What a handler wants after it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Keep watching the fd.
    Continue,
    /// Stop watching the fd and drop the handler.
    Remove,
    /// Leave the loop.
    Exit,
}

type Handler = Box<dyn FnMut(&mut LoopContext, Readiness) -> Control + Send>;

/// Watches added or removed by handlers while the loop runs.
pub struct LoopContext {
    add: Vec<(RawFd, Readiness, Handler)>,
    remove: Vec<Token>,
    next_token: Token,
}

impl LoopContext {
    /// Watch `fd` for `events` with `handler`, from the next loop iteration on. The fd
    /// must stay open until the watch is removed (the handler usually owns it).
    pub fn add(
        &mut self,
        fd: RawFd,
        events: Readiness,
        handler: impl FnMut(&mut LoopContext, Readiness) -> Control + Send + 'static,
    ) -> Token {
        let token = self.next_token;
        self.next_token += 1;
        self.add.push((fd, events, Box::new(handler)));
        token
    }

    /// Stop watching `token`.
    pub fn remove(&mut self, token: Token) {
        self.remove.push(token);
    }
}

/// Ends an [`EventLoop`] from any thread.
#[derive(Clone)]
pub struct StopHandle(Arc<EventFd>);

impl StopHandle {
    /// Ask the loop to return. Idempotent.
    pub fn stop(&self) {
        if let Err(e) = self.0.write(1) {
            log::error!("cannot stop event loop: {e}");
        }
    }

    /// The raw eventfd (e.g. to write it from a signal handler).
    pub fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

struct Watch {
    fd: RawFd,
    handler: Handler,
}

/// An epoll loop with a handler per fd.
pub struct EventLoop {
    epoll_fd: std::os::fd::OwnedFd,
    watches: HashMap<Token, Watch>,
    stop: Arc<EventFd>,
    next_token: Token,
}

const STOP_TOKEN: Token = u64::MAX;

impl EventLoop {
    /// A new loop with nothing watched.
    pub fn new() -> io::Result<Self> {
        let raw = epoll::create(true)?;
        // SAFETY: epoll::create returned a fresh descriptor that nothing else owns.
        let epoll_fd = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let lp = EventLoop {
            epoll_fd,
            watches: HashMap::new(),
            stop,
            next_token: 0,
        };
        lp.ctl(
            epoll::ControlOptions::EPOLL_CTL_ADD,
            lp.stop.as_raw_fd(),
            epoll::Events::EPOLLIN,
            STOP_TOKEN,
        )?;
        Ok(lp)
    }

    fn ctl(
        &self,
        op: epoll::ControlOptions,
        fd: RawFd,
        events: Readiness,
        token: Token,
    ) -> io::Result<()> {
        epoll::ctl(
            self.epoll_fd.as_raw_fd(),
            op,
            fd,
            epoll::Event::new(events, token),
        )
    }

    /// A handle that ends [`run`](EventLoop::run).
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop.clone())
    }

    /// Watch `fd` for `events` with `handler`.
    pub fn add(
        &mut self,
        fd: RawFd,
        events: Readiness,
        handler: impl FnMut(&mut LoopContext, Readiness) -> Control + Send + 'static,
    ) -> io::Result<Token> {
        let token = self.next_token;
        self.next_token += 1;
        self.insert(token, fd, events, Box::new(handler))?;
        Ok(token)
    }

    fn insert(
        &mut self,
        token: Token,
        fd: RawFd,
        events: Readiness,
        handler: Handler,
    ) -> io::Result<()> {
        self.ctl(epoll::ControlOptions::EPOLL_CTL_ADD, fd, events, token)?;
        self.watches.insert(token, Watch { fd, handler });
        Ok(())
    }

    /// Stop watching `token`; its handler is dropped.
    pub fn remove(&mut self, token: Token) {
        if let Some(w) = self.watches.remove(&token) {
            // The fd may already be closed by the handler's owner; nothing to undo then.
            let _ = self.ctl(
                epoll::ControlOptions::EPOLL_CTL_DEL,
                w.fd,
                epoll::Events::empty(),
                token,
            );
        }
    }

    /// Number of fds watched (not counting the stop event).
    pub fn len(&self) -> usize {
        self.watches.len()
    }

    /// Whether nothing is watched.
    pub fn is_empty(&self) -> bool {
        self.watches.is_empty()
    }

    /// Run until a handler returns [`Control::Exit`] or the stop handle fires.
    pub fn run(&mut self) -> io::Result<()> {
        let mut events = vec![epoll::Event::new(epoll::Events::empty(), 0); 32];
        loop {
            let n = match epoll::wait(self.epoll_fd.as_raw_fd(), -1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                let token = ev.data;
                if token == STOP_TOKEN {
                    let _ = self.stop.read();
                    return Ok(());
                }
                let readiness = Readiness::from_bits_truncate(ev.events);
                let mut ctx = LoopContext {
                    add: Vec::new(),
                    remove: Vec::new(),
                    next_token: self.next_token,
                };
                let control = match self.watches.get_mut(&token) {
                    Some(w) => (w.handler)(&mut ctx, readiness),
                    None => continue, // removed earlier in this batch
                };
                self.next_token = ctx.next_token;
                let first_new = self.next_token - ctx.add.len() as u64;
                for (i, (fd, evs, h)) in ctx.add.into_iter().enumerate() {
                    if let Err(e) = self.insert(first_new + i as u64, fd, evs, h) {
                        log::error!("cannot watch fd {fd}: {e}");
                    }
                }
                for t in ctx.remove {
                    self.remove(t);
                }
                match control {
                    Control::Continue => {}
                    Control::Remove => self.remove(token),
                    Control::Exit => return Ok(()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn handlers_run_add_watches_and_stop() {
        let mut lp = EventLoop::new().unwrap();
        let first = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let second = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let hits = Arc::new(AtomicU32::new(0));
        let (f, s, h) = (first.clone(), second.clone(), hits.clone());
        lp.add(first.as_raw_fd(), epoll::Events::EPOLLIN, move |ctx, _| {
            let _ = f.read();
            h.fetch_add(1, Ordering::SeqCst);
            let (s2, h2) = (s.clone(), h.clone());
            ctx.add(s.as_raw_fd(), epoll::Events::EPOLLIN, move |_, _| {
                let _ = s2.read();
                h2.fetch_add(10, Ordering::SeqCst);
                Control::Exit
            });
            s.write(1).unwrap();
            Control::Remove
        })
        .unwrap();
        first.write(1).unwrap();
        lp.run().unwrap();
        assert_eq!(hits.load(Ordering::SeqCst), 11);
        assert_eq!(lp.len(), 1, "first removed itself, second stays");

        let stop = lp.stop_handle();
        let t = std::thread::spawn(move || stop.stop());
        lp.run().unwrap();
        t.join().unwrap();
    }
}
