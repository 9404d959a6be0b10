//! A shard: one pinned thread, one monoio runtime, one slab of connections, one read buffer.
//!
//! Owns starting the thread (pin, build the runtime with the configured driver and nothing
//! else, report readiness), the shard's tasks (accept loop, inbox, deferrer, one per
//! connection), and driving each connection's socket: read into the shard's buffer, feed the
//! codec, call the handler, flush with vectored writes, honour deadlines, close.
//! It shares nothing mutable with other shards; commands arrive through `bus.rs`.

use std::{
    cell::RefCell,
    future::{poll_fn, Future},
    io, mem,
    net::{SocketAddr, TcpListener as StdListener},
    pin::Pin,
    rc::Rc,
    sync::Arc,
    task::{Context, Poll, Waker},
    thread,
};

use bytes::BytesMut;
use crossbeam_channel::Sender;
use monoio::{
    io::{
        poll_io::{AsyncRead, AsyncWrite, ReadBuf},
        Canceller,
    },
    net::{TcpListener, TcpStream},
    IoUringDriver, LegacyDriver, RuntimeBuilder,
};
use ringcast_protocol::{
    error_response, http_response, CloseCode, CloseState, Codec, Event, UpgradeRequest,
};
use tracing::{debug, error, info, warn};

use crate::{
    bus::{Inbox, ShardMsg},
    config::Driver,
    conn::{Conn, ConnTable, Phase, Settings, ShardId},
    error::Error,
    handler::{CloseInfo, CloseInitiator, Ctx, Handler, Message, Upgrade, UpgradeCtx},
    listener::accept_loop,
    metrics::ShardMetrics,
    outbound::MAX_IOV,
};

/// What a shard thread needs to start.
#[derive(Debug)]
pub(crate) struct ShardSpec {
    pub(crate) id: ShardId,
    pub(crate) listener: StdListener,
    pub(crate) inbox: Inbox,
    pub(crate) core: Option<core_affinity::CoreId>,
    pub(crate) driver: Driver,
    pub(crate) uring_entries: u32,
    pub(crate) settings: Settings,
    pub(crate) metrics: Arc<ShardMetrics>,
    /// Gets `Ok` once the shard listens, or the error that stopped it from starting.
    pub(crate) ready: Sender<Result<(), Error>>,
}

/// Starts the shard's thread.
pub(crate) fn spawn<H, F>(spec: ShardSpec, factory: Arc<F>) -> io::Result<thread::JoinHandle<()>>
where
    H: Handler,
    F: Fn(ShardId) -> H + Send + Sync + 'static,
{
    thread::Builder::new()
        .name(format!("ringcast-shard-{}", spec.id))
        .spawn(move || run_thread(spec, &*factory))
}

fn run_thread<H: Handler>(spec: ShardSpec, factory: &(impl Fn(ShardId) -> H + ?Sized)) {
    let id = spec.id;
    let pinned = spec
        .core
        .map(|core| (core.id, core_affinity::set_for_current(core)));
    if let Some((core, false)) = pinned {
        warn!(shard = %id, core, "could not pin shard thread; running unpinned");
    }
    let core = pinned.and_then(|(core, ok)| ok.then_some(core));
    let driver = spec.driver;
    let runtime_error = |source: io::Error, hint: &'static str| Error::Runtime {
        shard: id.index(),
        driver: driver.name(),
        source,
        hint,
    };
    match driver {
        Driver::IoUring => {
            let built = RuntimeBuilder::<IoUringDriver>::new()
                .with_entries(spec.uring_entries)
                .enable_timer()
                .build();
            match built {
                Ok(mut rt) => {
                    info!(shard = %id, driver = "io_uring", ?core, "shard starting");
                    rt.block_on(run(spec, factory(id)));
                }
                Err(e) => {
                    let hint = "; is io_uring disabled (sysctl kernel.io_uring_disabled) or \
                                blocked by seccomp? set driver = \"epoll\" to run without it";
                    let _ = spec.ready.send(Err(runtime_error(e, hint)));
                }
            }
        }
        Driver::Epoll => match RuntimeBuilder::<LegacyDriver>::new().enable_timer().build() {
            Ok(mut rt) => {
                info!(shard = %id, driver = "epoll", ?core, "shard starting");
                rt.block_on(run(spec, factory(id)));
            }
            Err(e) => {
                let _ = spec.ready.send(Err(runtime_error(e, "")));
            }
        },
    }
}

/// The shard's main task: start the other tasks, wait for a stop, then close gracefully.
async fn run<H: Handler>(spec: ShardSpec, handler: H) {
    let ShardSpec {
        id,
        listener,
        inbox,
        settings,
        metrics,
        ready,
        ..
    } = spec;
    let addr = listener.local_addr().ok();
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(source) => {
            let addr = addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
            let _ = ready.send(Err(Error::Listen { addr, source }));
            return;
        }
    };
    let shutdown_timeout = settings.shutdown_timeout;
    let read_buffer_bytes = settings.read_buffer_bytes;
    let shard = Rc::new(Shard {
        id,
        table: RefCell::new(ConnTable::new(id, settings, metrics.clone())),
        handler: RefCell::new(handler),
        read_buf: RefCell::new(BytesMut::with_capacity(read_buffer_bytes)),
        metrics,
        deferred: RefCell::new(Vec::new()),
        deferrer: RefCell::new(None),
        stopped: std::cell::Cell::new(false),
    });
    let canceller = Canceller::new();
    monoio::spawn(accept_loop(shard.clone(), listener, canceller.handle()));
    monoio::spawn(deferrer(shard.clone()));
    let _ = ready.send(Ok(()));
    info!(shard = %id, listen = ?addr, "shard listening");

    // Every command so far means stop; a closed inbox (engine dropped) means it too.
    match inbox.recv().await {
        Some(ShardMsg::Stop) | None => {}
    }

    let open = shard.table.borrow().len();
    info!(shard = %id, open, "shard stopping: closing connections with 1001");
    shard.table.borrow_mut().begin_stop();
    canceller.cancel();
    let drained = monoio::time::timeout(shutdown_timeout, shard.wait_empty())
        .await
        .is_ok();
    let forced = shard.close_all_now();
    if drained {
        info!(shard = %id, "shard stopped");
    } else {
        warn!(shard = %id, forced, "shutdown timeout passed; closed remaining connections");
    }
    shard.stopped.set(true);
    let deferrer = shard.deferrer.borrow_mut().take();
    if let Some(w) = deferrer {
        w.wake();
    }
}

/// Yields a task behind every task already queued. monoio runs a task that wakes itself again
/// at once, ahead of the queue, so a busy connection that yielded that way would starve the
/// shard; waking it from this separate task puts it at the back instead.
async fn deferrer<H: Handler>(shard: Rc<Shard<H>>) {
    let mut batch = Vec::new();
    poll_fn(|cx| {
        if shard.stopped.get() {
            return Poll::Ready(());
        }
        *shard.deferrer.borrow_mut() = Some(cx.waker().clone());
        mem::swap(&mut batch, &mut *shard.deferred.borrow_mut());
        for w in batch.drain(..) {
            w.wake();
        }
        Poll::Pending
    })
    .await;
}

/// One shard's state, owned by its thread (behind an `Rc`).
pub(crate) struct Shard<H> {
    pub(crate) id: ShardId,
    pub(crate) table: RefCell<ConnTable>,
    handler: RefCell<H>,
    /// Every read lands here first; only unfinished frames are copied out per connection.
    read_buf: RefCell<BytesMut>,
    pub(crate) metrics: Arc<ShardMetrics>,
    deferred: RefCell<Vec<Waker>>,
    deferrer: RefCell<Option<Waker>>,
    stopped: std::cell::Cell<bool>,
}

/// Where a read put its bytes.
enum Landing {
    Shared,
    Tail,
}

/// Whether a connection's task goes on or ends.
enum Flow {
    Continue,
    Done,
}

impl<H: Handler> Shard<H> {
    /// Registers an accepted socket and spawns its task.
    pub(crate) fn open_connection(self: &Rc<Self>, stream: TcpStream) {
        let mut table = self.table.borrow_mut();
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
                warn!(shard = %self.id, error = %e, "cannot register accepted socket; closing it");
                return;
            }
        };
        let (key, gen) = table.insert(io);
        self.metrics.connections_accepted.incr();
        self.metrics.connections_active.incr();
        drop(table);
        monoio::spawn(ConnTask {
            shard: self.clone(),
            key,
            gen,
        });
    }

    fn wait_empty(&self) -> impl Future<Output = ()> + '_ {
        poll_fn(|cx| {
            let mut table = self.table.borrow_mut();
            if table.conns.is_empty() {
                Poll::Ready(())
            } else {
                table.empty_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
    }

    /// Ends every remaining connection at once (shutdown deadline). Returns how many.
    fn close_all_now(&self) -> usize {
        let keys: Vec<usize> = self.table.borrow().conns.iter().map(|(k, _)| k).collect();
        for &key in &keys {
            self.finish(key);
        }
        keys.len()
    }

    fn defer(&self, waker: &Waker) {
        self.deferred.borrow_mut().push(waker.clone());
        if let Some(d) = self.deferrer.borrow().as_ref() {
            d.wake_by_ref();
        }
    }

    /// Drives one connection as far as it can go without waiting.
    fn drive(&self, key: usize, gen: u32, cx: &mut Context<'_>) -> Poll<()> {
        let mut reads = 0;
        loop {
            let mut table_ref = self.table.borrow_mut();
            let table = &mut *table_ref;
            let Some(conn) = table.conns.get_mut(key).filter(|c| c.gen == gen) else {
                // Closed by the shard (shutdown deadline) while this task was parked.
                return Poll::Ready(());
            };
            if let Some(deadline) = conn.deadline.as_mut() {
                if deadline.as_mut().poll(cx).is_ready() {
                    conn.deadline = None;
                    let flow = self.on_deadline(table, key);
                    drop(table_ref);
                    match flow {
                        Flow::Continue => continue,
                        Flow::Done => return self.end(key),
                    }
                }
            }

            match flush(conn, cx, &self.metrics) {
                Poll::Ready(Ok(())) if matches!(conn.phase, Phase::Flushing) => {
                    // Everything we owed is out: send FIN, then wait for the peer's.
                    let _ = Pin::new(&mut conn.io).poll_shutdown(cx);
                    conn.phase = Phase::Draining;
                    conn.set_deadline(table.settings.close_timeout);
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
                Landing::Tail => mem::take(&mut conn.tail),
            };
            self.process(table, key, &mut input);
            let conn = &mut table.conns[key];
            match landing {
                Landing::Shared => {
                    if !input.is_empty() {
                        // The one copy: an unfinished frame's bytes move to the connection.
                        conn.tail = BytesMut::from(&input[..]);
                        input.clear();
                    }
                    *self.read_buf.borrow_mut() = input;
                }
                Landing::Tail if input.is_empty() => conn.tail = BytesMut::new(),
                Landing::Tail => conn.tail = input,
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
        let (buf, landing) = if conn.tail.len() + frame_left <= settings.read_buffer_bytes / 2 {
            shared.clear();
            shared.reserve(settings.read_buffer_bytes);
            if !conn.tail.is_empty() {
                shared.extend_from_slice(&conn.tail);
                conn.tail = BytesMut::new();
            }
            (&mut *shared, Landing::Shared)
        } else {
            conn.tail
                .reserve(frame_left.max(settings.read_buffer_bytes));
            (&mut conn.tail, Landing::Tail)
        };
        let mut rb = ReadBuf::uninit(buf.spare_capacity_mut());
        match Pin::new(&mut conn.io).poll_read(cx, &mut rb) {
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
                        conn.tail = BytesMut::from(&shared[..]);
                        shared.clear();
                    }
                }
                Poll::Pending
            }
        }
    }

    /// Feeds newly read bytes through the handshake or the codec, calling the handler.
    fn process(&self, table: &mut ConnTable, key: usize, input: &mut BytesMut) {
        let mut handler = self.handler.borrow_mut();
        loop {
            let conn = &mut table.conns[key];
            match &mut conn.phase {
                Phase::Handshake(reader) => {
                    match reader.poll_head(input, table.settings.limits.max_header_bytes) {
                        Ok(None) => return,
                        Ok(Some(len)) => {
                            let head = input.split_to(len);
                            if !self.upgrade(table, &mut *handler, key, &head) {
                                input.clear();
                                return;
                            }
                        }
                        Err(e) => {
                            debug!(peer = %conn.info().peer_addr(), error = %e, "bad upgrade request");
                            reject(table, key, error_response(&e));
                            input.clear();
                            return;
                        }
                    }
                }
                Phase::Open(codec) => {
                    let result = codec.poll_event(input);
                    conn.drain_transmits();
                    match result {
                        Ok(Some(event)) => self.dispatch(table, &mut *handler, key, event),
                        Ok(None) => break,
                        Err(e) => {
                            debug!(conn = %table.id_of(key), error = %e, "protocol error");
                            self.metrics.protocol_errors.incr();
                            let conn = &mut table.conns[key];
                            conn.note_close(e.close_code(), &e.to_string(), CloseInitiator::Server);
                            break;
                        }
                    }
                }
                Phase::Flushing | Phase::Draining => {
                    input.clear();
                    return;
                }
            }
        }
        let close_timeout = table.settings.close_timeout;
        let conn = &mut table.conns[key];
        if let Phase::Open(codec) = &conn.phase {
            if matches!(codec.close_state(), CloseState::Closed | CloseState::Failed) {
                conn.phase = Phase::Flushing;
                conn.set_deadline(close_timeout);
                input.clear();
            }
        }
    }

    /// Decides a complete upgrade request. Returns true if the connection is now open.
    fn upgrade(&self, table: &mut ConnTable, handler: &mut H, key: usize, head: &[u8]) -> bool {
        let req = match UpgradeRequest::parse(head) {
            Ok(req) => req,
            Err(e) => {
                debug!(peer = %table.conns[key].info().peer_addr(), error = %e, "bad upgrade request");
                reject(table, key, error_response(&e));
                return false;
            }
        };
        let ctx = UpgradeCtx {
            peer: table.conns[key].info().peer_addr(),
            shard: self.id,
        };
        let subprotocol = match handler.on_upgrade(&req, &ctx) {
            Upgrade::Accept { subprotocol } => subprotocol,
            Upgrade::Reject {
                status,
                body,
                headers,
            } => {
                let status = if (400..=599).contains(&status) {
                    status
                } else {
                    error!(
                        status,
                        "handler rejected an upgrade with a non-error status; sending 500"
                    );
                    500
                };
                let headers: Vec<(&str, &str)> = headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                reject(table, key, http_response(status, &headers, &body));
                return false;
            }
        };
        let response = match req.accept(subprotocol.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "handler selected a subprotocol the client did not offer");
                reject(table, key, error_response(&e));
                return false;
            }
        };
        let keep = table.settings.keep_request_head;
        let limits = table.settings.limits;
        let conn = &mut table.conns[key];
        conn.out.push_encoded(response);
        conn.set_upgraded(&req, head, keep, subprotocol);
        conn.phase = Phase::Open(Codec::server(limits));
        conn.deadline = None;
        conn.opened = true;
        self.metrics.upgrades_accepted.incr();
        handler.on_open(&mut Ctx {
            table,
            key,
            running: key,
        });
        true
    }

    fn dispatch(&self, table: &mut ConnTable, handler: &mut H, key: usize, event: Event) {
        let msg = match event {
            Event::Text(text) => Message::Text(text),
            Event::Binary(data) => Message::Binary(data),
            Event::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (f.code, f.reason.to_string()))
                    .unwrap_or((CloseCode::NO_STATUS, String::new()));
                table.conns[key].note_close(code, &reason, CloseInitiator::Peer);
                return;
            }
            // The codec queued the pong already; heartbeats come with the hardening work.
            _ => return,
        };
        self.metrics.messages_in.incr();
        handler.on_message(
            &mut Ctx {
                table,
                key,
                running: key,
            },
            msg,
        );
    }

    fn on_deadline(&self, table: &mut ConnTable, key: usize) -> Flow {
        let close_timeout = table.settings.close_timeout;
        let conn = &mut table.conns[key];
        match conn.phase {
            Phase::Handshake(_) => {
                debug!(peer = %conn.info().peer_addr(), "upgrade request timed out");
                self.metrics.handshake_timeouts.incr();
                self.metrics.upgrades_rejected.incr();
                conn.out.push_encoded(http_response(
                    408,
                    &[],
                    "the upgrade request did not arrive in time",
                ));
                conn.phase = Phase::Flushing;
                conn.set_deadline(close_timeout);
                Flow::Continue
            }
            // Our close frame went unanswered, or the final bytes or FIN did not get through.
            Phase::Open(_) | Phase::Flushing | Phase::Draining => Flow::Done,
        }
    }

    /// Ends the connection's task.
    fn end(&self, key: usize) -> Poll<()> {
        self.finish(key);
        Poll::Ready(())
    }

    /// Removes a connection: `on_close` if it was opened, then the slot and the socket.
    fn finish(&self, key: usize) {
        let mut table_ref = self.table.borrow_mut();
        let table = &mut *table_ref;
        let Some(conn) = table.conns.get_mut(key) else {
            return;
        };
        if conn.opened {
            conn.phase = Phase::Draining; // sends from on_close now return Closed
            let info = conn.close.take().map_or_else(
                || CloseInfo {
                    code: CloseCode::ABNORMAL,
                    reason: String::from("connection closed by the server"),
                    initiator: CloseInitiator::Server,
                },
                |boxed| *boxed,
            );
            self.handler.borrow_mut().on_close(
                &mut Ctx {
                    table,
                    key,
                    running: key,
                },
                &info,
            );
        }
        let conn = table.conns.remove(key);
        drop(conn);
        self.metrics.connections_active.sub(1);
        if let Some(w) = table.accept_waker.take() {
            w.wake();
        }
        if table.stopping && table.conns.is_empty() {
            if let Some(w) = table.empty_waker.take() {
                w.wake();
            }
        }
    }
}

/// Queues an HTTP error and moves the connection to flushing.
fn reject(table: &mut ConnTable, key: usize, response: bytes::Bytes) {
    table.metrics.upgrades_rejected.incr();
    let close_timeout = table.settings.close_timeout;
    let conn = &mut table.conns[key];
    conn.out.push_encoded(response);
    conn.phase = Phase::Flushing;
    conn.set_deadline(close_timeout);
}

fn wants_read(conn: &Conn, settings: &Settings) -> bool {
    match conn.phase {
        Phase::Handshake(_) | Phase::Draining => true,
        // Backpressure: a peer that does not read its replies is not read either.
        Phase::Open(_) => conn.out.len_bytes() < settings.max_outbound_bytes / 2,
        Phase::Flushing => false,
    }
}

fn on_eof(conn: &mut Conn) -> Flow {
    if let Phase::Open(_) = conn.phase {
        conn.note_close(
            CloseCode::ABNORMAL,
            "connection closed without a close frame",
            CloseInitiator::Transport,
        );
    }
    Flow::Done
}

/// Stores the task's waker so other tasks (sends, closes, shutdown) can wake it.
fn park(conn: &mut Conn, cx: &Context<'_>) {
    if !conn.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        conn.waker = Some(cx.waker().clone());
    }
}

/// Writes as much of the outbound queue as the socket takes, in vectored writes.
fn flush(conn: &mut Conn, cx: &mut Context<'_>, metrics: &ShardMetrics) -> Poll<io::Result<()>> {
    while !conn.out.is_empty() {
        let mut slices = [io::IoSlice::new(&[]); MAX_IOV];
        let n = conn.out.io_slices(&mut slices);
        match Pin::new(&mut conn.io).poll_write_vectored(cx, &slices[..n]) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(written)) => {
                metrics.bytes_out.add(written as u64);
                conn.out.advance(written);
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
}

impl<H: Handler> Future for ConnTask<H> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.shard.drive(self.key, self.gen, cx)
    }
}
