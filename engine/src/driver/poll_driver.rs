//! The epoll driver: each connection is a monoio task on poll-io readiness.
//!
//! Owns, for `driver = "epoll"` (the `epoll` feature): the accept loop (a pause while the
//! shard is full, stopping on shutdown), spawning a task per accepted connection, reading
//! into the shard's shared buffer (only an unfinished frame's bytes are copied to the
//! connection), vectored writes, yielding a busy connection fairly, and the connection's
//! deadline timer.
//! What the bytes mean is `shard/process.rs`'s business.

use std::{
    future::{poll_fn, Future},
    io, mem,
    os::fd::AsRawFd,
    pin::Pin,
    rc::Rc,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use monoio::{
    io::{
        poll_io::{AsyncRead, AsyncWrite, ReadBuf},
        CancelHandle,
    },
    net::{TcpListener, TcpStream},
    time::Sleep,
};
use ringcast_protocol::CloseCode;
use tracing::{debug, warn};

use crate::{
    api::handler::Handler,
    conn::{
        outbound::MAX_IOV,
        pending::{answer_now, Cause, EVICT_BATCH},
        table::{pending_ip_refusal, Conn, Phase, PollSocket, Settings, Socket},
    },
    driver::listener::{is_fd_exhaustion, AcceptBackoff},
    ops::metrics::ShardMetrics,
    shard::process::{on_eof, wants_read, Flow, Shard},
    types::{
        clock::{Stamp, When},
        message::CloseInitiator,
    },
};

/// Accepts connections until the shard stops.
///
/// Failed accepts back off ([`AcceptBackoff`]).
pub(crate) async fn accept_loop<H: Handler>(
    shard: Rc<Shard<H>>,
    listener: TcpListener,
    cancel: CancelHandle,
) {
    let mut backoff = AcceptBackoff::new();
    loop {
        if !wait_for_room(&shard).await {
            return;
        }
        match listener.cancelable_accept(cancel.clone()).await {
            Ok((stream, peer)) => {
                backoff.accepted(shard.id);
                if open_connection(&shard, stream, peer) {
                    // It took an evicted one's place: let it (and the rest of the shard) run
                    // before the next accept, so its first read comes before the next
                    // eviction.
                    shard.yield_now().await;
                }
            }
            Err(_) if shard.table.borrow().stopping => return,
            // Out of descriptors: evict a batch of unfinished upgrades, oldest first (their
            // sockets close at once on this driver), and accept again now.
            Err(e)
                if is_fd_exhaustion(&e)
                    && shard.evict_oldest(EVICT_BATCH, Cause::OutOfDescriptors) > 0 =>
            {
                shard.metrics.accept_fd_exhausted.incr();
                shard.yield_now().await;
            }
            Err(e) => {
                let pause = backoff.failed(shard.id, &shard.metrics, &e);
                monoio::time::sleep(pause).await;
            }
        }
    }
}

/// Waits while the shard holds `max_connections` and no unfinished upgrade to evict in place
/// of a new connection. Returns false once the shard is stopping.
async fn wait_for_room<H: Handler>(shard: &Shard<H>) -> bool {
    loop {
        match room(shard).await {
            Room::Stopping => return false,
            Room::Free => return true,
            // Unfinished upgrades too young to evict yet: look again when the oldest is not.
            Room::EvictableAt(at) => monoio::time::sleep_until(at.into()).await,
        }
    }
}

/// Whether a new connection has room.
enum Room {
    Free,
    Stopping,
    EvictableAt(Instant),
}

fn room<H: Handler>(shard: &Shard<H>) -> impl Future<Output = Room> + '_ {
    let mut counted = false;
    poll_fn(move |cx| {
        let mut table = shard.table.borrow_mut();
        if table.stopping {
            return Poll::Ready(Room::Stopping);
        }
        let now = Instant::now();
        if table.len() < table.settings.max_connections || table.pending.can_evict(now) {
            return Poll::Ready(Room::Free);
        }
        if let Some(at) = table.pending.evictable_at() {
            return Poll::Ready(Room::EvictableAt(at.max(now + Duration::from_millis(1))));
        }
        if !counted {
            counted = true;
            table.metrics.accept_paused_full.incr();
            debug!(shard = %shard.id, "shard full: accept paused");
        }
        table.accept_waker = Some(cx.waker().clone());
        Poll::Pending
    })
}

/// Where a read put its bytes.
enum Landing {
    Shared,
    Tail,
}

/// Registers an accepted socket and spawns its task: refused at once if its address holds
/// the cap on unfinished upgrades; on a full shard, in place of the oldest unfinished upgrade
/// (evicted). Returns whether it evicted one.
pub(crate) fn open_connection<H: Handler>(
    shard: &Rc<Shard<H>>,
    stream: TcpStream,
    peer: std::net::SocketAddr,
) -> bool {
    shard.metrics.connections_accepted.incr();
    let mut table = shard.table.borrow_mut();
    if table.settings.tcp_nodelay {
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "TCP_NODELAY not set");
        }
    }
    // Fills the stream's cached peer address, so ConnInfo::peer_addr costs no syscall.
    let _ = stream.peer_addr();
    let io = match stream.try_into_poll_io() {
        Ok(io) => io,
        Err((e, _stream)) => {
            warn!(shard = %shard.id, error = %e, "cannot register accepted socket; closing it");
            return false;
        }
    };
    let pending_ip = match table.admit_pending(|| Some(peer)) {
        Ok(ip) => ip,
        Err(()) => {
            table.refused_pending();
            answer_now(io.as_raw_fd(), &pending_ip_refusal(), true);
            return false; // dropping `io` closes it
        }
    };
    let mut evicted = false;
    if table.len() >= table.settings.max_connections {
        drop(table);
        evicted = shard.evict_oldest(1, Cause::ShardFull) > 0;
        table = shard.table.borrow_mut();
    }
    let (key, gen) = table.insert(
        Socket::Poll(Box::new(PollSocket { io, waker: None })),
        pending_ip,
    );
    shard.metrics.connections_active.incr();
    drop(table);
    monoio::spawn(ConnTask {
        shard: shard.clone(),
        key,
        gen,
        sleep: None,
    });
    evicted
}

fn poll_drive<H: Handler>(
    shard: &Shard<H>,
    key: usize,
    gen: u32,
    sleep: &mut Option<(Instant, Pin<Box<Sleep>>)>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    shard.drive(key, gen, sleep, cx)
}

impl<H: Handler> Shard<H> {
    fn defer(&self, waker: &Waker) {
        self.deferred.borrow_mut().push(waker.clone());
        if let Some(d) = self.deferrer.borrow().as_ref() {
            d.wake_by_ref();
        }
    }

    /// Drives one connection as far as it can go without waiting.
    fn drive(
        &self,
        key: usize,
        gen: u32,
        sleep: &mut Option<(Instant, Pin<Box<Sleep>>)>,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        let mut reads = 0;
        loop {
            let mut table_ref = self.table.borrow_mut();
            let table = &mut *table_ref;
            let Some(conn) = table.conns.get_mut(key).filter(|c| c.gen == gen) else {
                // Closed by the shard (shutdown deadline) while this task was parked.
                return Poll::Ready(());
            };
            let deadline = conn.deadline.map(When::instant);
            if sleep.as_ref().map(|(when, _)| *when) != deadline {
                *sleep =
                    deadline.map(|when| (when, Box::pin(monoio::time::sleep_until(when.into()))));
            }
            if let Some((_, timer)) = sleep.as_mut() {
                if timer.as_mut().poll(cx).is_ready() {
                    *sleep = None;
                    conn.deadline = None;
                    let flow = self.on_deadline(table, key);
                    drop(table_ref);
                    match flow {
                        Flow::Continue => continue,
                        Flow::Done => return self.end(key),
                    }
                }
            }

            let more = table.refill(key);
            let conn = &mut table.conns[key];
            match flush(conn, cx, &self.metrics) {
                // The socket took the whole window: move the next part of the data ring.
                Poll::Ready(Ok(())) if more => continue,
                Poll::Ready(Ok(())) if matches!(conn.phase, Phase::Flushing) => {
                    // Everything we owed is out: send FIN, then wait for the peer's.
                    let _ = Pin::new(&mut poll_socket(conn).io).poll_shutdown(cx);
                    table.half_closed(key);
                    continue;
                }
                Poll::Ready(Ok(())) | Poll::Pending => {}
                Poll::Ready(Err(e)) => {
                    debug!(peer = %conn.info().peer_addr(), error = %e, "write failed");
                    conn.note_close(
                        CloseCode::ABNORMAL,
                        "write failed",
                        CloseInitiator::Transport,
                    );
                    drop(table_ref);
                    return self.end(key);
                }
            }

            if !wants_read(conn, &table.settings) {
                park(conn, cx);
                return Poll::Pending;
            }
            if reads == table.settings.max_reads_per_turn {
                park(conn, cx);
                self.defer(cx.waker());
                return Poll::Pending;
            }
            let landing = match self.read(conn, &table.settings, cx) {
                Poll::Pending => {
                    park(conn, cx);
                    return Poll::Pending;
                }
                Poll::Ready(Ok((0, _))) => {
                    let flow = on_eof(conn);
                    drop(table_ref);
                    match flow {
                        Flow::Continue => continue,
                        Flow::Done => return self.end(key),
                    }
                }
                Poll::Ready(Ok((n, landing))) => {
                    self.metrics.bytes_in.add(n as u64);
                    landing
                }
                Poll::Ready(Err(e)) => {
                    debug!(peer = %conn.info().peer_addr(), error = %e, "read failed");
                    conn.note_close(
                        CloseCode::ABNORMAL,
                        "read failed",
                        CloseInitiator::Transport,
                    );
                    drop(table_ref);
                    return self.end(key);
                }
            };
            reads += 1;
            let mut input = match landing {
                Landing::Shared => mem::take(&mut *self.read_buf.borrow_mut()),
                Landing::Tail => conn.tail.take(),
            };
            table.now = Stamp::now();
            self.process(table, key, &mut input);
            let conn = &mut table.conns[key];
            match landing {
                Landing::Shared => {
                    if !input.is_empty() {
                        // The one copy: an unfinished frame's bytes move to the connection.
                        conn.tail.put(BytesMut::from(&input[..]));
                        input.clear();
                    }
                    *self.read_buf.borrow_mut() = input;
                }
                Landing::Tail => conn.tail.put(input),
            }
        }
    }

    /// Reads once. Small unfinished input is moved in front of the new bytes in the shard's
    /// buffer; a large frame in progress is read straight into the connection's own buffer,
    /// sized for the whole frame.
    fn read(
        &self,
        conn: &mut Conn,
        settings: &Settings,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<(usize, Landing)>> {
        let frame_left = match &conn.phase {
            Phase::Open(codec) => codec
                .partial_frame_len()
                .map_or(0, |len| len.saturating_sub(conn.tail.len())),
            _ => 0,
        };
        let mut shared = self.read_buf.borrow_mut();
        let conn = &mut *conn;
        let (buf, landing) = if conn.tail.len() + frame_left <= settings.read_buffer_bytes / 2 {
            shared.clear();
            shared.reserve(settings.read_buffer_bytes);
            if !conn.tail.is_empty() {
                shared.extend_from_slice(conn.tail.as_slice());
                conn.tail.put(BytesMut::new());
            }
            (&mut *shared, Landing::Shared)
        } else {
            let tail = conn.tail.get_mut();
            tail.reserve(frame_left.max(settings.read_buffer_bytes));
            (tail, Landing::Tail)
        };
        let mut rb = ReadBuf::uninit(buf.spare_capacity_mut());
        let Socket::Poll(p) = &mut conn.socket else {
            unreachable!("the epoll driver only holds poll sockets");
        };
        match Pin::new(&mut p.io).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                // SAFETY: `poll_read` initialised and filled the first `n` bytes of the spare
                // capacity (ReadBuf tracks both), so they are valid to expose.
                unsafe { buf.set_len(buf.len() + n) };
                Poll::Ready(Ok((n, landing)))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if let Landing::Shared = landing {
                    // Keep unfinished bytes that were moved in front: they belong to the conn.
                    if !shared.is_empty() {
                        conn.tail.put(BytesMut::from(&shared[..]));
                        shared.clear();
                    }
                }
                Poll::Pending
            }
        }
    }
}

fn park(conn: &mut Conn, cx: &Context<'_>) {
    let p = poll_socket(conn);
    if !p.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        p.waker = Some(cx.waker().clone());
    }
}

/// The monoio stream of a connection driven by this module.
fn poll_socket(conn: &mut Conn) -> &mut PollSocket {
    match &mut conn.socket {
        Socket::Poll(p) => p,
        Socket::Ring(_) => unreachable!("the epoll driver only holds poll sockets"),
    }
}

/// Writes as much of the outbound queue as the socket takes, in vectored writes.
fn flush(conn: &mut Conn, cx: &mut Context<'_>, metrics: &ShardMetrics) -> Poll<io::Result<()>> {
    let Conn {
        socket,
        out,
        pubsub,
        ..
    } = conn;
    let Socket::Poll(p) = socket else {
        unreachable!("the epoll driver only holds poll sockets");
    };
    while !out.is_empty() {
        let mut slices = [io::IoSlice::new(&[]); MAX_IOV];
        let n = out.io_slices(&mut slices);
        match Pin::new(&mut p.io).poll_write_vectored(cx, &slices[..n]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(written)) => {
                metrics.bytes_out.add(written as u64);
                out.advance(written);
                if let Some(ps) = pubsub {
                    ps.note_written(written, metrics);
                }
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
    Poll::Ready(Ok(()))
}

/// The task that drives one connection. It holds only the slot and generation; the state is
/// in the shard's table so handlers can reach it.
struct ConnTask<H> {
    shard: Rc<Shard<H>>,
    key: usize,
    gen: u32,
    /// The timer for the connection's current deadline, rebuilt when the deadline changes.
    sleep: Option<(Instant, Pin<Box<Sleep>>)>,
}

impl<H: Handler> Future for ConnTask<H> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        poll_drive(&this.shard, this.key, this.gen, &mut this.sleep, cx)
    }
}
