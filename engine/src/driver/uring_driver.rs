//! The io_uring driver: a shard runs every socket through its one ring.
//!
//! Owns, for `driver = "io-uring"`: accepting (multishot, paused while the shard is full,
//! backing off when descriptors run out), receiving (multishot into the provided-buffer pool,
//! parsed in place; cancelled while a peer does not read its replies), sending (one `sendmsg`
//! per connection per loop turn, gathering everything queued), deadlines, and tearing a
//! connection down only after every operation on its socket has completed.
//!
//! Each turn ([`Driver::turn`], called by the shard loop in `runtime.rs`): take every
//! completion, return buffers, fire deadlines, serve connections marked dirty and queue what
//! they need. The loop then enters the ring once: submit, and sleep there when no turn has
//! work. What the bytes mean is `shard/process.rs`'s business.

use std::{
    mem,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Instant,
};

use bytes::BytesMut;
use ringcast_protocol::CloseCode;
use tracing::debug;

use crate::{
    api::handler::Handler,
    conn::{
        outbound::MAX_IOV,
        pending::{answer_now, Cause, EVICT_BATCH, EVICT_IN_FLIGHT},
        table::{pending_ip_refusal, reservation, ConnTable, Phase, Socket},
    },
    driver::{
        listener::{is_fd_exhaustion, AcceptBackoff},
        uring::{Completion, Op, SocketRing},
    },
    shard::process::{on_eof, wants_read, Flow, Shard},
    types::{
        clock::{Stamp, When},
        message::CloseInitiator,
    },
};

/// The longest an accept waits for evicted sockets to close after running out of descriptors.
const EVICTION_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// A shard's sockets on its ring: turned by the shard loop (`runtime.rs`), which also parks
/// in the ring when no turn has work.
pub(crate) struct Driver<'a, H> {
    shard: &'a Shard<H>,
    pub(crate) ring: SocketRing,
    listener: OwnedFd,
    accept_armed: bool,
    accept_cancelling: bool,
    /// The current "shard full" pause was counted in the metrics.
    paused_counted: bool,
    /// Accepting resumes at this time (after running out of descriptors).
    retry_at: Option<Instant>,
    /// Out of descriptors, unfinished upgrades were evicted: accept again once their sockets
    /// are closed (or at `retry_at`).
    awaiting_evictions: bool,
    /// A full shard's oldest unfinished upgrade may be evicted from then on: accept again.
    evictable_at: Option<Instant>,
    backoff: AcceptBackoff,
    /// Connections whose receive stopped because every buffer was in use.
    starved: Vec<usize>,
}

impl<'a, H: Handler> Driver<'a, H> {
    /// The driver of `shard`'s sockets on `ring`, accepting from `listener`.
    pub(crate) fn new(shard: &'a Shard<H>, ring: SocketRing, listener: OwnedFd) -> Self {
        {
            let mut table = shard.table.borrow_mut();
            table.driver_running = true;
            table.same_turn_delivery = true;
        }
        Self {
            shard,
            ring,
            listener,
            accept_armed: false,
            accept_cancelling: false,
            paused_counted: false,
            retry_at: None,
            awaiting_evictions: false,
            evictable_at: None,
            backoff: AcceptBackoff::new(),
            starved: Vec::new(),
        }
    }

    /// One turn: handle the completions the ring holds, return buffers, fire deadlines, serve
    /// connections marked dirty and the accept. Queues submissions; the loop enters the ring.
    pub(crate) fn turn(&mut self, now: Instant) {
        self.shard.table.borrow_mut().now = Stamp::from_instant(now);
        self.reap();
        self.ring.pool.reclaim();
        if self.ring.pool.available() > 0 && !self.starved.is_empty() {
            let mut table = self.shard.table.borrow_mut();
            for key in mem::take(&mut self.starved) {
                if table.conns.contains(key) {
                    table.notify(key, usize::MAX);
                }
            }
        }
        self.expire(now);
        self.serve();
        self.serve_accept();
        self.ring.pool.publish();
    }

    /// Whether another turn has work without waiting: completions to handle, connections
    /// marked dirty.
    pub(crate) fn busy(&mut self) -> bool {
        self.ring.has_completions() || !self.shard.table.borrow().dirty.is_empty()
    }

    /// The shard stopped and every connection and operation is gone.
    pub(crate) fn finished(&self) -> bool {
        let table = self.shard.table.borrow();
        table.stopping
            && table.conns.is_empty()
            && !self.accept_armed
            && self.ring.sends_in_flight() == 0
    }

    /// The next time a turn has work though nothing completes: a connection's deadline, an
    /// accept retry.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let table = self.shard.table.borrow();
        let timer = table.timers.peek().map(|r| r.0 .0.instant());
        [timer, self.retry_at, self.evictable_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Handles every completion waiting in the ring.
    fn reap(&mut self) {
        while let Some(c) = self.ring.next() {
            match c.op {
                Op::Accept => self.on_accept(c),
                Op::Recv { key, gen } => self.on_recv(key, gen, c),
                Op::Send { slot } => self.on_send(slot, c.result),
                Op::Shutdown { key, gen } => self.on_shutdown(key, gen, c.result),
                Op::Wake => self.ring.woken(),
                Op::Ignore => {}
            }
        }
    }

    fn on_accept(&mut self, c: Completion) {
        if !c.more {
            self.accept_armed = false;
            self.accept_cancelling = false;
        }
        let shard = self.shard;
        if c.result >= 0 {
            // SAFETY: a successful accept completion carries a new descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
            self.accepted(fd);
            return;
        }
        match -c.result {
            libc::ECANCELED => {}
            errno => {
                let e = std::io::Error::from_raw_os_error(errno);
                if is_fd_exhaustion(&e) && self.evict_for_descriptors(c.more) {
                    return;
                }
                let pause = self.backoff.failed(shard.id, &shard.metrics, &e);
                if is_fd_exhaustion(&e) {
                    self.retry_at = Some(Instant::now() + pause);
                    if c.more {
                        // Stop the multishot accept while backing off; re-armed at retry_at.
                        self.cancel_accept();
                    }
                } else if !c.more {
                    self.retry_at = Some(Instant::now() + pause);
                }
            }
        }
    }

    /// Takes in an accepted socket: refused at once if its address holds the cap on
    /// unfinished upgrades; else, on a full shard, in place of the oldest unfinished upgrade
    /// (evicted); else as a new connection.
    fn accepted(&mut self, fd: OwnedFd) {
        let shard = self.shard;
        let mut table = shard.table.borrow_mut();
        if table.stopping {
            return; // dropping `fd` closes it
        }
        self.backoff.accepted(shard.id);
        shard.metrics.connections_accepted.incr();
        let sock = socket2::SockRef::from(&fd);
        let pending_ip = match table.admit_pending(|| sock.peer_addr().ok()?.as_socket()) {
            Ok(ip) => ip,
            Err(()) => {
                table.refused_pending();
                answer_now(fd.as_raw_fd(), &pending_ip_refusal(), true);
                return; // dropping `fd` closes it: nothing waits on it
            }
        };
        if table.settings.tcp_nodelay {
            if let Err(e) = sock.set_nodelay(true) {
                debug!(error = %e, "TCP_NODELAY not set");
            }
        }
        if table.len() >= table.settings.max_connections && table.pending.can_evict(Instant::now())
        {
            drop(table);
            shard.evict_oldest(1, Cause::ShardFull);
            table = shard.table.borrow_mut();
        }
        // A full shard with nothing to evict cancelled its accept (`serve_accept`); one
        // accepted before the cancel took effect is still taken in.
        let (key, _) = table.insert(Socket::Ring(fd), pending_ip);
        shard.metrics.connections_active.incr();
        table.notify(key, usize::MAX);
    }

    /// Out of descriptors: evicts a batch of unfinished upgrades, oldest first (none while
    /// the previous batch's sockets are still closing), and accepts again once their sockets
    /// are closed. False when there is nothing to evict: the caller backs off as before.
    fn evict_for_descriptors(&mut self, more: bool) -> bool {
        let shard = self.shard;
        let (pending, evicting) = {
            let table = shard.table.borrow();
            (table.pending.len(), table.pending.evicting)
        };
        if pending == 0 && evicting == 0 {
            return false;
        }
        if evicting == 0 && shard.evict_oldest(EVICT_BATCH, Cause::OutOfDescriptors) == 0 {
            return false; // all too young to evict yet
        }
        shard.metrics.accept_fd_exhausted.incr();
        self.awaiting_evictions = true;
        // Normally the sockets close within a loop turn or two; this bounds the wait if not.
        self.retry_at = Some(Instant::now() + EVICTION_WAIT);
        if more {
            self.cancel_accept();
        }
        true
    }

    fn cancel_accept(&mut self) {
        if self.accept_armed && !self.accept_cancelling {
            self.ring.cancel_accept();
            self.accept_cancelling = true;
        }
    }

    fn on_recv(&mut self, key: usize, gen: u32, c: Completion) {
        let shard = self.shard;
        let mut table_ref = shard.table.borrow_mut();
        let table = &mut *table_ref;
        let live = table
            .conns
            .get(key)
            .is_some_and(|conn| Op::matches_gen(gen, conn.gen));
        if !live {
            // A completion for a slot since reused (or freed): only its buffer matters.
            if let Some(bid) = c.buffer {
                let buf = self.ring.pool.take(bid, 0);
                self.ring.pool.give_back(bid, buf);
            }
            return;
        }
        if !c.more {
            let conn = &mut table.conns[key];
            conn.uring.set_recv_armed(false);
            conn.uring.set_recv_cancelling(false);
            table.notify(key, usize::MAX);
        }
        match c.result {
            n if n > 0 => {
                let bid = c.buffer.expect("a receive with data names its buffer");
                let buf = self.ring.pool.take(bid, n as usize);
                shard.metrics.bytes_in.add(n as u64);
                self.feed(table, key, bid, buf);
            }
            0 => {
                if matches!(on_eof(&mut table.conns[key]), Flow::Done) {
                    drop(table_ref);
                    shard.finish(key);
                }
            }
            n if n == -libc::ENOBUFS => self.starved.push(key),
            n if n == -libc::ECANCELED => {}
            n => {
                let conn = &mut table.conns[key];
                if !matches!(conn.phase, Phase::Closed) {
                    debug!(conn = %table.id_of(key), error = %std::io::Error::from_raw_os_error(-n), "receive failed");
                    table.conns[key].note_close(
                        CloseCode::ABNORMAL,
                        "read failed",
                        CloseInitiator::Transport,
                    );
                    drop(table_ref);
                    shard.finish(key);
                }
            }
        }
    }

    /// Runs received bytes through the connection: parsed in place in the pool's buffer when
    /// nothing is pending, else appended to the unfinished frame first.
    fn feed(&mut self, table: &mut ConnTable, key: usize, bid: u16, buf: BytesMut) {
        let conn = &mut table.conns[key];
        if !matches!(conn.phase, Phase::Handshake(_) | Phase::Open(_)) {
            // Flushing, half-closed or closed: what the peer sends now is discarded.
            self.ring.pool.give_back(bid, buf);
            return;
        }
        if conn.tail.is_empty() {
            let mut input = buf;
            self.shard.process(table, key, &mut input);
            let conn = &mut table.conns[key];
            if !input.is_empty() {
                // The one copy: an unfinished frame's bytes move to the connection, with room
                // for the rest of the frame when its length is known.
                let want = match &conn.phase {
                    Phase::Open(codec) => codec.partial_frame_len().unwrap_or(0),
                    _ => 0,
                };
                let mut tail = BytesMut::with_capacity(want.max(input.len()));
                tail.extend_from_slice(&input);
                conn.tail.put(tail);
                input.clear();
            }
            self.ring.pool.give_back(bid, input);
        } else {
            conn.tail.get_mut().extend_from_slice(&buf);
            self.ring.pool.give_back(bid, buf);
            let mut input = conn.tail.take();
            self.shard.process(table, key, &mut input);
            table.conns[key].tail.put(input);
        }
        table.notify(key, usize::MAX);
    }

    fn on_send(&mut self, slot: u32, result: i32) {
        let shard = self.shard;
        let (key, gen) = {
            let s = self.ring.send_slot(slot);
            (s.key, s.gen)
        };
        let mut table_ref = shard.table.borrow_mut();
        let table = &mut *table_ref;
        let live = table.conns.get(key).is_some_and(|c| c.gen == gen);
        if result > 0 {
            let n = result as usize;
            shard.metrics.bytes_out.add(n as u64);
            let done = self.ring.send_slot(slot).batch.advance(n);
            if live {
                let conn = &mut table.conns[key];
                conn.out.note_sent(n);
                if let Some(ps) = conn.pubsub.as_mut() {
                    ps.note_written(n, &shard.metrics);
                }
            }
            let closed = !live || matches!(table.conns[key].phase, Phase::Closed);
            if !done && !closed {
                let fd = raw_fd(&table.conns[key].socket);
                self.ring.submit_send(fd, slot);
                return;
            }
        }
        // Written, failed, or cancelled: the slot is free; unwritten chunks are dropped.
        self.ring.finish_send(slot, |batch| {
            if live {
                table.conns[key].out.abandon_batch(batch);
            }
        });
        if !live {
            return;
        }
        let conn = &mut table.conns[key];
        conn.uring.set_send_slot(None);
        conn.uring.set_send_cancelling(false);
        let closed = matches!(conn.phase, Phase::Closed);
        table.notify(key, usize::MAX);
        if result <= 0 && result != -libc::ECANCELED && !closed {
            debug!(conn = %table.id_of(key), result, "send failed");
            table.conns[key].note_close(
                CloseCode::ABNORMAL,
                "write failed",
                CloseInitiator::Transport,
            );
            drop(table_ref);
            shard.finish(key);
        }
    }

    /// The write shutdown finished: a closed connection may now give its descriptor back.
    fn on_shutdown(&mut self, key: usize, gen: u32, result: i32) {
        let mut table = self.shard.table.borrow_mut();
        let live = table
            .conns
            .get(key)
            .is_some_and(|conn| Op::matches_gen(gen, conn.gen));
        if !live {
            return; // cannot happen: the slot is kept until this completion
        }
        if result < 0 && result != -libc::ENOTCONN {
            debug!(conn = %table.id_of(key), error = %std::io::Error::from_raw_os_error(-result), "shutdown failed");
        }
        table.conns[key].uring.set_shutdown_pending(false);
        table.notify(key, usize::MAX);
    }

    /// Fires deadlines that have passed.
    fn expire(&mut self, now: Instant) {
        let shard = self.shard;
        let mut done = Vec::new();
        {
            let mut table_ref = shard.table.borrow_mut();
            let table = &mut *table_ref;
            let now = When::from_instant(now);
            while let Some(&std::cmp::Reverse((when, key, gen))) = table.timers.peek() {
                if when > now {
                    break;
                }
                table.timers.pop();
                let key = key as usize;
                let Some(conn) = table.conns.get_mut(key) else {
                    continue;
                };
                if conn.gen != gen || conn.deadline != Some(when) {
                    continue; // re-armed or cleared since
                }
                conn.deadline = None;
                match shard.on_deadline(table, key) {
                    Flow::Continue => table.notify(key, usize::MAX),
                    Flow::Done => done.push(key),
                }
            }
        }
        for key in done {
            shard.finish(key);
        }
    }

    /// Serves every connection marked dirty: sends, the end of a flush, receive arming and
    /// backpressure, and teardown.
    fn serve(&mut self) {
        let shard = self.shard;
        let mut release = Vec::new();
        let mut table_ref = shard.table.borrow_mut();
        let table = &mut *table_ref;
        let dirty = mem::take(&mut table.dirty);
        for &key in &dirty {
            if !table.conns.contains(key) {
                continue;
            }
            let _ = table.refill(key); // what stays waits for this send's completion
            let conn = &mut table.conns[key];
            conn.uring.set_dirty(false);
            let gen = conn.gen;
            let fd = raw_fd(&conn.socket);
            if let Phase::Closed = conn.phase {
                if conn.uring.recv_armed() && !conn.uring.recv_cancelling() {
                    self.ring.cancel_recv(key, gen);
                    conn.uring.set_recv_cancelling(true);
                }
                if let Some(slot) = conn.uring.send_slot() {
                    if !conn.uring.send_cancelling() {
                        self.ring.cancel_send(slot);
                        conn.uring.set_send_cancelling(true);
                    }
                }
                if !conn.uring.recv_armed()
                    && conn.uring.send_slot().is_none()
                    && !conn.uring.shutdown_pending()
                {
                    release.push(key);
                }
                continue;
            }
            if conn.uring.send_slot().is_none() && !conn.out.is_empty() {
                let out = &mut conn.out;
                let slot = self
                    .ring
                    .send(fd, key, gen, |batch| out.take_batch(batch, MAX_IOV));
                conn.uring.set_send_slot(Some(slot));
            }
            if matches!(conn.phase, Phase::Flushing) && conn.out.len_bytes() == 0 {
                // Everything we owed is out: send FIN, then wait for the peer's.
                self.ring.shutdown_write(fd, key, gen);
                conn.uring.set_shutdown_pending(true);
                table.half_closed(key);
            }
            let conn = &mut table.conns[key];
            let want = wants_read(conn, &table.settings);
            if want && !conn.uring.recv_armed() {
                if self.ring.pool.available() > 0 {
                    self.ring.recv(fd, key, gen);
                    conn.uring.set_recv_armed(true);
                } else {
                    self.starved.push(key);
                }
            } else if !want
                && conn.uring.recv_armed()
                && !conn.uring.recv_cancelling()
                && matches!(conn.phase, Phase::Open(_))
            {
                // Backpressure: stop reading a peer that does not read its replies.
                self.ring.cancel_recv(key, gen);
                conn.uring.set_recv_cancelling(true);
            }
        }
        // Reuse the dirty list's memory next turn, unless a burst made it large.
        let mut dirty = dirty;
        dirty.clear();
        if table.dirty.is_empty() && dirty.capacity() <= 1024 {
            table.dirty = dirty;
        }
        // Stale entries can grow the heap past its reservation; give that back once empty.
        let reserve = reservation(&table.settings);
        if table.timers.is_empty() && table.timers.capacity() > reserve {
            table.timers = std::collections::BinaryHeap::with_capacity(reserve);
        }
        drop(table_ref);
        for key in release {
            shard.release(key);
        }
    }

    /// Arms, pauses or stops the multishot accept.
    fn serve_accept(&mut self) {
        let mut table = self.shard.table.borrow_mut();
        if table.stopping {
            drop(table);
            self.cancel_accept();
            return;
        }
        self.evictable_at = None;
        let now = Instant::now();
        // A full shard takes new connections in place of its unfinished upgrades (evicted).
        if table.len() >= table.settings.max_connections && !table.pending.can_evict(now) {
            if table.pending.evicting < EVICT_IN_FLIGHT {
                // Those there are too young to evict yet: look again when the oldest is not.
                self.evictable_at = table.pending.evictable_at();
            }
            if !self.paused_counted {
                self.paused_counted = true;
                table.metrics.accept_paused_full.incr();
                debug!(shard = %self.shard.id, "shard full: accept paused");
            }
            drop(table);
            self.cancel_accept();
            return;
        }
        if self.awaiting_evictions {
            let waited = self.retry_at.is_none_or(|at| Instant::now() >= at);
            if table.pending.evicting > 0 && !waited {
                return;
            }
            self.awaiting_evictions = false;
            self.retry_at = None;
        }
        drop(table);
        self.paused_counted = false;
        if self.accept_armed {
            return;
        }
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        self.retry_at = None;
        self.ring.accept(self.listener.as_raw_fd());
        self.accept_armed = true;
    }
}

fn raw_fd(socket: &Socket) -> RawFd {
    match socket {
        Socket::Ring(fd) => fd.as_raw_fd(),
        #[cfg(feature = "epoll")]
        Socket::Poll(p) => p.io.as_raw_fd(),
    }
}
