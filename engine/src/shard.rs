//! A shard: one pinned thread, one monoio runtime, one slab of connections.
//!
//! Owns starting the thread (pin, build the runtime with the configured driver and nothing
//! else, report readiness), the shard's main task (start the driver, wait for a stop, close
//! gracefully), and what happens to a connection whatever drives its socket: the upgrade, the
//! codec, handler calls, deadlines, and the end of a connection. The socket IO itself lives in
//! `ring_driver.rs` (io_uring) and `poll_driver.rs` (epoll). Shards share nothing mutable;
//! commands arrive through `bus.rs`.

use std::{
    cell::{Cell, RefCell},
    future::{poll_fn, Future},
    io,
    net::{SocketAddr, TcpListener as StdListener},
    os::fd::OwnedFd,
    rc::Rc,
    sync::Arc,
    task::{Poll, Waker},
    thread,
    time::Duration,
};

use bytes::BytesMut;
use crossbeam_channel::Sender;
use monoio::{io::Canceller, net::TcpListener, IoUringDriver, LegacyDriver, RuntimeBuilder};
use ringcast_protocol::{
    error::HandshakeError, error_response, http_response, CloseCode, CloseState, Codec, Event,
    UpgradeRequest,
};
use tracing::{debug, error, info, warn};

use crate::{
    admission::{Gate, RejectReason},
    bus::{Inbox, ShardMsg},
    config::Driver,
    conn::{Conn, ConnTable, Phase, Settings, ShardId, Socket, Stamp, Upgraded},
    error::Error,
    handler::{CloseInfo, CloseInitiator, Ctx, Handler, Message, Upgrade, UpgradeCtx},
    listener::accept_loop,
    metrics::{Metrics, ShardMetrics},
    poll_driver,
    pubsub::{Hub, Topic},
    ring, ring_driver,
};

/// Topic messages a shard delivers before it lets its other tasks run.
const DELIVER_BATCH: usize = 256;

/// How often a drain closes its next share of connections.
const DRAIN_TICK: Duration = Duration::from_millis(10);

/// What one shard's drain did.
#[derive(Debug, Default)]
struct DrainReport {
    closed: u64,
    flushed: u64,
    dropped: u64,
}

/// What a shard thread needs to start.
#[derive(Debug)]
pub(crate) struct ShardSpec {
    pub(crate) id: ShardId,
    pub(crate) listener: StdListener,
    pub(crate) inbox: Inbox,
    pub(crate) core: Option<core_affinity::CoreId>,
    pub(crate) driver: Driver,
    pub(crate) uring_entries: u32,
    pub(crate) ring_buffers: u16,
    pub(crate) ring_buffer_bytes: usize,
    pub(crate) settings: Settings,
    pub(crate) metrics: Arc<ShardMetrics>,
    /// Every shard's counters, for `/metrics`.
    pub(crate) all_metrics: Arc<[Arc<ShardMetrics>]>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) gate: Arc<Gate>,
    /// The readiness canary's topic: messages of it are noted, not delivered.
    pub(crate) canary: Arc<Topic>,
    pub(crate) canary_interval: Duration,
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
    // For the log: the core's number, or "unpinned" (not `Some(3)`).
    let core_name = core.map_or_else(|| "unpinned".to_owned(), |c| c.to_string());
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
                    info!(shard = %id, driver = driver.name(), core = %core_name, "shard starting");
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
                info!(shard = %id, driver = driver.name(), core = %core_name, "shard starting");
                rt.block_on(run(spec, factory(id)));
            }
            Err(e) => {
                let _ = spec.ready.send(Err(runtime_error(e, "")));
            }
        },
    }
}

/// The shard's main task: start the driver, wait for a stop, then close gracefully.
async fn run<H: Handler>(spec: ShardSpec, handler: H) {
    let ShardSpec {
        id,
        listener,
        inbox,
        driver,
        uring_entries,
        ring_buffers,
        ring_buffer_bytes,
        settings,
        metrics,
        all_metrics,
        hub,
        gate,
        canary,
        canary_interval,
        ready,
        ..
    } = spec;
    let addr = listener.local_addr().ok();
    let listen_error = |source: io::Error| Error::Listen {
        addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
        source,
    };
    let shutdown_timeout = settings.shutdown_timeout;
    let read_buffer_bytes = settings.read_buffer_bytes;
    let shard = Rc::new(Shard {
        id,
        table: RefCell::new(ConnTable::new(id, settings, metrics.clone(), hub, gate)),
        handler: RefCell::new(handler),
        read_buf: RefCell::new(BytesMut::new()),
        metrics,
        all_metrics,
        deferred: RefCell::new(Vec::new()),
        deferrer: RefCell::new(None),
        stopped: Cell::new(false),
        canary,
        canary_interval,
    });

    // Start the driver. io_uring: one task runs every socket through the socket ring.
    // epoll: an accept loop and one task per connection, on monoio's poll-io.
    let canceller = Canceller::new();
    let ring_task = match driver {
        Driver::IoUring => {
            let socket_ring =
                match ring::SocketRing::new(uring_entries, ring_buffers, ring_buffer_bytes) {
                    Ok(r) => r,
                    Err(source) => {
                        let _ = ready.send(Err(Error::Runtime {
                            shard: id.index(),
                            driver: driver.name(),
                            source,
                            hint:
                                "; the io_uring driver needs Linux 6.0 or newer (multishot receive \
                               into provided buffers); set driver = \"epoll\" to run without it",
                        }));
                        return;
                    }
                };
            monoio::spawn(poll_driver::deferrer(shard.clone()));
            Some(monoio::spawn(ring_driver::run(
                shard.clone(),
                socket_ring,
                OwnedFd::from(listener),
            )))
        }
        _ => {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(source) => {
                    let _ = ready.send(Err(listen_error(source)));
                    return;
                }
            };
            *shard.read_buf.borrow_mut() = BytesMut::with_capacity(read_buffer_bytes);
            monoio::spawn(accept_loop(shard.clone(), listener, canceller.handle()));
            monoio::spawn(poll_driver::deferrer(shard.clone()));
            None
        }
    };
    // A shard that just started counts as fresh until its first canary is due.
    shard
        .metrics
        .canary_at
        .set(crate::conn::When::from_instant(std::time::Instant::now()).as_nanos());
    let _ = ready.send(Ok(()));
    match addr {
        Some(addr) => info!(shard = %id, listen = %addr, "shard listening"),
        None => info!(shard = %id, "shard listening"),
    }

    // Deliver topic messages until told to stop; a closed inbox (engine dropped) means stop.
    while let Some(msg) = inbox.recv().await {
        if !shard.deliver(&inbox, msg).await {
            break; // a stop came in behind the deliveries
        }
    }

    let stop_at = std::time::Instant::now();
    shard.table.borrow_mut().begin_stop();
    let report = shard.drain(&inbox, stop_at).await;
    shard.table.borrow_mut().stop_accepting();
    canceller.cancel();
    let drained = monoio::time::timeout(
        shutdown_timeout.saturating_sub(stop_at.elapsed()),
        shard.wait_empty(),
    )
    .await
    .is_ok();
    let forced = shard.close_all_now();
    shard.metrics.drain_forced.add(forced as u64);
    info!(
        shard = %id,
        closed = report.closed,
        flushed = report.flushed,
        dropped = report.dropped,
        forced,
        "shard drained: connections closed with 1012, topic messages flushed and dropped"
    );
    if let Some(task) = ring_task {
        // The driver cancels what is still in flight, closes the sockets and returns.
        if monoio::time::timeout(Duration::from_secs(2), task)
            .await
            .is_err()
        {
            warn!(shard = %id, "socket ring did not drain in time");
        }
    }
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

/// One shard's state, owned by its thread (behind an `Rc`).
pub(crate) struct Shard<H> {
    pub(crate) id: ShardId,
    pub(crate) table: RefCell<ConnTable>,
    pub(crate) handler: RefCell<H>,
    /// epoll driver: every read lands here first; only unfinished frames are copied out.
    pub(crate) read_buf: RefCell<BytesMut>,
    pub(crate) metrics: Arc<ShardMetrics>,
    all_metrics: Arc<[Arc<ShardMetrics>]>,
    pub(crate) deferred: RefCell<Vec<Waker>>,
    pub(crate) deferrer: RefCell<Option<Waker>>,
    pub(crate) stopped: Cell<bool>,
    canary: Arc<Topic>,
    canary_interval: Duration,
}

/// Whether a connection goes on or ends.
pub(crate) enum Flow {
    Continue,
    Done,
}

impl<H: Handler> Shard<H> {
    /// Delivers `first` and whatever else waits in the inbox, yielding to the socket tasks
    /// every [`DELIVER_BATCH`] messages. Returns false if it found a stop in the inbox.
    async fn deliver(&self, inbox: &Inbox, first: ShardMsg) -> bool {
        let mut next = Some(first);
        loop {
            let mut n = 0;
            {
                let mut table = self.table.borrow_mut();
                let now_ns = crate::conn::When::from_instant(std::time::Instant::now()).as_nanos();
                while let Some(msg) = next.take() {
                    match msg {
                        ShardMsg::Deliver(msg) if Arc::ptr_eq(&msg.topic, &self.canary) => {
                            self.metrics.canary_at.set(now_ns);
                            table.hub.taken(self.id.index(), 1);
                            table.sample_rings(crate::conn::When::from_nanos(now_ns));
                        }
                        ShardMsg::Deliver(msg) => {
                            let at = msg.at.as_nanos();
                            let age = now_ns.saturating_sub(at);
                            self.metrics.inbox_latency.record_nanos(age);
                            table.deliver(&msg);
                            n += 1;
                        }
                        // In the inbox's order, so after the deliveries before it.
                        ShardMsg::Backend(msg) => table.handle_backend(msg),
                        ShardMsg::Stop => {
                            table.hub.taken(self.id.index(), n);
                            self.metrics.published_in.add(n as u64);
                            return false;
                        }
                    }
                    if n == DELIVER_BATCH {
                        break;
                    }
                    next = inbox.try_recv();
                }
                table.hub.taken(self.id.index(), n);
                self.metrics.published_in.add(n as u64);
            }
            if n < DELIVER_BATCH {
                return true;
            }
            self.yield_now().await;
            match inbox.try_recv() {
                Some(msg) => next = Some(msg),
                None => return true,
            }
        }
    }

    /// Lets every other ready task of the shard run first (see `poll_driver::deferrer`).
    fn yield_now(&self) -> impl Future<Output = ()> + '_ {
        let mut deferred = false;
        poll_fn(move |cx| {
            if deferred || self.stopped.get() {
                return Poll::Ready(());
            }
            deferred = true;
            self.deferred.borrow_mut().push(cx.waker().clone());
            if let Some(d) = self.deferrer.borrow().as_ref() {
                d.wake_by_ref();
            }
            Poll::Pending
        })
    }

    /// Closes every open connection with 1012, each at a random moment of the drain window
    /// (a shuffled order, spread evenly), delivering topic messages to the ones still open
    /// meanwhile. Returns when the window is over (at once if no shard had a connection).
    async fn drain(&self, inbox: &Inbox, stop_at: std::time::Instant) -> DrainReport {
        let (window, shutdown_timeout) = {
            let settings = &self.table.borrow().settings;
            (settings.drain_window, settings.shutdown_timeout)
        };
        let mut order: Vec<(usize, u32)> = {
            let table = self.table.borrow();
            table
                .conns
                .iter()
                .filter(|(_, c)| matches!(c.phase, Phase::Open(_)))
                .map(|(k, c)| (k, c.gen))
                .collect()
        };
        fastrand::shuffle(&mut order);
        // Every shard keeps its listener through the window when any shard has connections:
        // one that stopped early would leave its share of new connections unanswered.
        let engine_had_connections = self
            .all_metrics
            .iter()
            .any(|m| m.connections_active.get() > 0);
        let mut report = DrainReport::default();
        let total = order.len();
        info!(shard = %self.id, open = total, ?window, "shard draining: closing connections with 1012");
        let mut done = 0;
        loop {
            let due = if window.is_zero() {
                total
            } else {
                let share = stop_at.elapsed().as_secs_f64() / window.as_secs_f64();
                ((total as f64 * share).ceil() as usize).min(total)
            };
            {
                let mut table = self.table.borrow_mut();
                let time_left = shutdown_timeout.saturating_sub(stop_at.elapsed());
                for &(key, gen) in &order[done..due] {
                    if table.conns.get(key).is_some_and(|c| c.gen == gen) {
                        let (flushed, dropped) = table.drain_close(key, time_left);
                        report.closed += 1;
                        report.flushed += flushed;
                        report.dropped += dropped;
                    }
                }
            }
            done = due;
            // With connections to drain, the whole window passes before the listener closes:
            // load balancers probing /readyz meanwhile get 503 "draining", not a refused
            // connection. With none anywhere, there is nothing to spread: stop at once.
            if done == total && (!engine_had_connections || stop_at.elapsed() >= window) {
                return report;
            }
            // Until the next share is due, keep delivering to the connections still open.
            monoio::select! {
                msg = inbox.recv() => match msg {
                    // A second stop changes nothing: the drain is under way.
                    Some(ShardMsg::Stop) => {}
                    Some(msg) => {
                        self.deliver(inbox, msg).await;
                    }
                    // The engine is gone: no more deliveries; just wait out the window.
                    None => monoio::time::sleep(DRAIN_TICK).await,
                },
                () = monoio::time::sleep(DRAIN_TICK) => {}
            }
        }
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

    /// Feeds newly read bytes through the handshake or the codec, calling the handler.
    pub(crate) fn process(&self, table: &mut ConnTable, key: usize, input: &mut BytesMut) {
        let mut handler = self.handler.borrow_mut();
        table.conns[key].heard = table.now;
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
                            table.reject(key, RejectReason::BadRequest, error_response(&e));
                            input.clear();
                            return;
                        }
                    }
                }
                // Slowed: what is left waits in the tail until the budget refills
                // (`Shard::end_throttle`).
                Phase::Open(_) if conn.throttle.is_some() => break,
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
                Phase::Flushing | Phase::Draining | Phase::Closed => {
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
                table.set_deadline(key, close_timeout);
                input.clear();
            }
        }
    }

    /// Answers a plain GET or HEAD to one of the engine's own endpoints (`[http]`): health,
    /// readiness, metrics. HEAD gets the GET answer's status and headers (its
    /// `Content-Length` too) without the body, as RFC 9110 §9.3.2 asks: load balancers probe
    /// with either. Returns false, answering nothing, for any other request.
    fn answer_plain_http(&self, table: &mut ConnTable, key: usize, head: &[u8]) -> bool {
        let (head_only, path) = match ringcast_protocol::request_path(head) {
            Some(("GET", path)) => (false, path),
            Some(("HEAD", path)) => (true, path),
            _ => return false,
        };
        let http = &table.settings.http;
        let response = if path == http.health_path {
            http_response(200, &[], "ok")
        } else if path == http.ready_path {
            if table.draining {
                http_response(503, &[], "draining")
            } else if !table.hub.ready() {
                http_response(503, &[], "broker unavailable")
            } else if let Some(&(shard, age)) =
                crate::canary::stale(&self.all_metrics, self.canary_interval).first()
            {
                let why = format!("shard {shard} is not taking deliveries (no canary for {age:?})");
                http_response(503, &[], &why)
            } else {
                http_response(200, &[], "ready")
            }
        } else if path == http.metrics_path {
            metrics_response(|| {
                Metrics::gather(&self.all_metrics, &table.hub, &table.gate)
                    .with_broker(table.hub.broker_stats())
            })
        } else {
            return false;
        };
        let response = if head_only {
            without_body(response)
        } else {
            response
        };
        self.metrics.http_requests.incr();
        table.respond_and_close(key, response);
        true
    }

    /// Decides a complete upgrade request: the engine's admission checks, then the handler,
    /// then the per-user cap. Returns true if the connection is now open.
    fn upgrade(&self, table: &mut ConnTable, handler: &mut H, key: usize, head: &[u8]) -> bool {
        let req = match UpgradeRequest::parse(head) {
            Ok(req) => req,
            Err(HandshakeError::NotWebSocket | HandshakeError::MethodNotAllowed(_))
                if self.answer_plain_http(table, key, head) =>
            {
                return false;
            }
            Err(e) => {
                debug!(peer = %table.conns[key].info().peer_addr(), error = %e, "bad upgrade request");
                table.reject(key, RejectReason::BadRequest, error_response(&e));
                return false;
            }
        };
        let peer = table.conns[key].info().peer_addr();
        let all = &self.all_metrics;
        let open = || all.iter().map(|m| m.connections_active.get()).sum();
        if let Err((reason, response)) = admit(table, &req, open) {
            debug!(%peer, reason = reason.name(), "upgrade refused");
            table.reject(key, reason, response);
            return false;
        }
        // Counted from here: every refusal below gives the count back.
        let counted_ip = if table.gate.counts_ips() {
            if !table.gate.acquire_ip(peer.ip()) {
                debug!(%peer, "upgrade refused: connections per address at the cap");
                let response = http_response(429, &[], "too many connections from this address");
                table.reject(key, RejectReason::IpCap, response);
                return false;
            }
            Some(peer.ip())
        } else {
            None
        };
        let give_back_ip = |table: &ConnTable| {
            if let Some(ip) = counted_ip {
                table.gate.release_ip(ip);
            }
        };
        let ctx = UpgradeCtx {
            peer,
            shard: self.id,
        };
        let (subprotocol, user) = match handler.on_upgrade(&req, &ctx) {
            Upgrade::Accept { subprotocol, user } => (subprotocol, user),
            Upgrade::Reject {
                status,
                body,
                headers,
            } => {
                give_back_ip(table);
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
                let response = http_response(status, &headers, &body);
                table.reject(key, RejectReason::Handler, response);
                return false;
            }
        };
        let response = match req.accept(subprotocol.as_deref()) {
            Ok(r) => r,
            Err(e) => {
                give_back_ip(table);
                error!(error = %e, "handler selected a subprotocol the client did not offer");
                table.reject(key, RejectReason::Handler, error_response(&e));
                return false;
            }
        };
        if let Some(user) = user.as_deref() {
            if !table.gate.acquire_user(user) {
                give_back_ip(table);
                debug!(%peer, user, "upgrade refused: connections per user at the cap");
                let response = http_response(429, &[], "too many connections for this user");
                table.reject(key, RejectReason::UserCap, response);
                return false;
            }
        }
        let facts = Upgraded {
            subprotocol: subprotocol.as_deref(),
            // Kept always: ConnInfo::user reads it, and the close gives its count back.
            user: user.as_deref(),
            counted_ip,
            head_kept: table.settings.keep_request_head,
        };
        let limits = table.settings.limits;
        let conn = &mut table.conns[key];
        conn.out.push_encoded(response);
        conn.set_upgraded(&req, head, facts);
        conn.phase = Phase::Open(Codec::server(limits));
        conn.deadline = None;
        conn.spoke = table.now;
        if let Some(first) = first_liveness_check(&table.settings) {
            table.set_deadline(key, first);
        }
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
        table.conns[key].spoke = table.now;
        handler.on_message(
            &mut Ctx {
                table,
                key,
                running: key,
            },
            msg,
        );
    }

    pub(crate) fn on_deadline(&self, table: &mut ConnTable, key: usize) -> Flow {
        let conn = &mut table.conns[key];
        match conn.phase {
            Phase::Handshake(_) => {
                debug!(peer = %conn.info().peer_addr(), "upgrade request timed out");
                self.metrics.handshake_timeouts.incr();
                table.reject(
                    key,
                    RejectReason::Timeout,
                    http_response(408, &[], "the upgrade request did not arrive in time"),
                );
                table.notify(key, key);
                Flow::Continue
            }
            Phase::Open(ref codec) if codec.close_state() == CloseState::Open => {
                self.end_throttle(table, key);
                match &table.conns[key].phase {
                    Phase::Open(codec) if codec.close_state() == CloseState::Open => {
                        self.check_liveness(table, key)
                    }
                    // What the tail held closed it, or failed the protocol.
                    _ => Flow::Continue,
                }
            }
            // Our close frame went unanswered, or the final bytes or FIN did not get through.
            Phase::Open(_) | Phase::Flushing | Phase::Draining | Phase::Closed => Flow::Done,
        }
    }

    /// Ends a connection's pause once its publish budget has refilled (see
    /// `ConnTable::throttle`): the requests read but not handled when it began, kept in the
    /// tail, are handled now, until the budget runs out again. The driver reads again once
    /// the connection is not paused (`wants_read`).
    fn end_throttle(&self, table: &mut ConnTable, key: usize) {
        let now = Stamp::now();
        let conn = &mut table.conns[key];
        let Some(until) = conn.throttle else {
            return;
        };
        if !now.until(until).is_zero() {
            return;
        }
        conn.throttle = None;
        if conn.tail.is_empty() {
            return;
        }
        let mut input = conn.tail.take();
        table.now = now;
        self.process(table, key, &mut input);
        table.conns[key].tail.put(input);
    }

    /// The liveness deadline of an open connection: closes it if its pong is overdue or it
    /// idled too long, sends a ping if it has been quiet for `ping_interval`, and sets the
    /// next deadline. The deadline may come early (a later frame moved a check), so each
    /// check first asks whether it is due.
    fn check_liveness(&self, table: &mut ConnTable, key: usize) -> Flow {
        let now = Stamp::now();
        let settings = &table.settings;
        let (ping, pong, idle) = (
            settings.ping_interval,
            settings.pong_timeout,
            settings.idle_timeout,
        );
        let id = table.id_of(key);
        let conn = &mut table.conns[key];
        let mut next: Option<Duration> = None;
        let mut sooner = |d: Duration| next = Some(next.map_or(d, |n| n.min(d)));
        if let Some(until) = conn.throttle {
            sooner(now.until(until).max(Duration::from_millis(1)));
        }
        if let Some(ping_at) = conn.ping_out {
            if conn.heard.at_or_after(ping_at) {
                conn.ping_out = None; // the pong, or any frame, came back
            } else if ping_at.until(now) >= pong {
                debug!(conn = %id, "no pong within pong_timeout: dropped");
                self.metrics.pong_timeouts.incr();
                conn.note_close(
                    CloseCode::ABNORMAL,
                    "no pong within pong_timeout",
                    CloseInitiator::Server,
                );
                return Flow::Done;
            } else {
                sooner(pong - ping_at.until(now));
            }
        }
        if !idle.is_zero() {
            let quiet = conn.spoke.until(now);
            if quiet >= idle {
                debug!(conn = %id, "idle timeout");
                self.metrics.idle_timeouts.incr();
                table.close(
                    key,
                    CloseCode::GOING_AWAY,
                    "idle timeout",
                    CloseInitiator::Server,
                    key,
                );
                return Flow::Continue;
            }
            sooner(idle - quiet);
        }
        if !ping.is_zero() && conn.ping_out.is_none() {
            let quiet = conn.heard.until(now);
            if quiet >= ping {
                let mut frame = BytesMut::with_capacity(2);
                ringcast_protocol::encode_frame(
                    &mut frame,
                    true,
                    ringcast_protocol::frame::OpCode::Ping,
                    &[],
                    None,
                );
                conn.out.push_encoded(frame.freeze());
                conn.ping_out = Some(now);
                self.metrics.pings_sent.incr();
                sooner(pong);
            } else {
                sooner(ping - quiet);
            }
        }
        if let Some(after) = next {
            // Millisecond stamps: never re-arm for less than that, or a check could spin.
            table.set_deadline(key, after.max(Duration::from_millis(1)));
        }
        Flow::Continue
    }

    /// Ends the connection's task.
    pub(crate) fn end(&self, key: usize) -> Poll<()> {
        self.finish(key);
        Poll::Ready(())
    }

    /// Ends a connection: `on_close` if it was opened, then the slot and the socket. The epoll
    /// driver frees both at once; the io_uring driver first waits for operations in flight
    /// (the connection sits in `Phase::Closed` meanwhile, see `ring_driver.rs`).
    pub(crate) fn finish(&self, key: usize) {
        let mut table_ref = self.table.borrow_mut();
        let table = &mut *table_ref;
        let Some(conn) = table.conns.get_mut(key) else {
            return;
        };
        if matches!(conn.phase, Phase::Closed) {
            return;
        }
        if conn.opened() {
            conn.phase = Phase::Draining; // sends from on_close now return Closed
            let info = conn.close.take().map_or_else(
                || CloseInfo {
                    code: CloseCode::ABNORMAL,
                    reason: String::from("connection closed by the server"),
                    initiator: CloseInitiator::Server,
                },
                |boxed| *boxed,
            );
            self.metrics.closed(info.code, info.initiator);
            let (user, ip) = conn.admitted();
            if let Some(ip) = ip {
                table.gate.release_ip(ip);
            }
            if let Some(user) = user {
                table.gate.release_user(user);
            }
            self.handler.borrow_mut().on_close(
                &mut Ctx {
                    table,
                    key,
                    running: key,
                },
                &info,
            );
        }
        table.unsubscribe_all(key);
        let conn = &mut table.conns[key];
        conn.phase = Phase::Closed;
        conn.deadline = None;
        match conn.socket {
            Socket::Ring(_) => table.notify(key, usize::MAX),
            Socket::Poll(_) => {
                drop(table_ref);
                self.release(key);
            }
        }
    }

    /// Frees the slot and closes the socket of a finished connection.
    pub(crate) fn release(&self, key: usize) {
        let mut table = self.table.borrow_mut();
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

/// The answer to `/metrics`: the snapshot `gather` takes, in the OpenMetrics text format.
#[cfg(feature = "metrics")]
fn metrics_response(gather: impl FnOnce() -> Metrics) -> bytes::Bytes {
    let text = gather().to_openmetrics();
    // Not `http_response`: that one is text/plain and adds a final newline.
    bytes::Bytes::from(format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; \
         charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    ))
}

/// The answer to `/metrics` without the `metrics` feature: 404 and why, so a scraper's
/// operator sees the cause instead of a WebSocket-only 426. The counters are still kept
/// (`EngineHandle::metrics`); only their text encoding is not built in.
#[cfg(not(feature = "metrics"))]
fn metrics_response(_gather: impl FnOnce() -> Metrics) -> bytes::Bytes {
    http_response(
        404,
        &[],
        "no metrics endpoint: this build of the ringcast crate leaves out its `metrics` feature",
    )
}

/// A whole HTTP response cut after its head: what a HEAD request gets.
fn without_body(response: bytes::Bytes) -> bytes::Bytes {
    match response.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => response.slice(..end + 4),
        None => response,
    }
}

/// When an open connection's first liveness check is due, if pings or the idle timeout are on.
fn first_liveness_check(settings: &Settings) -> Option<Duration> {
    [settings.ping_interval, settings.idle_timeout]
        .into_iter()
        .filter(|d| !d.is_zero())
        .min()
}

/// The engine's own checks of an upgrade request, before the handler sees it: draining, the
/// memory budget, the shard's upgrade rate, the origin. The caps that count connections come
/// after.
fn admit(
    table: &mut ConnTable,
    req: &UpgradeRequest<'_>,
    connections: impl FnOnce() -> u64,
) -> Result<(), (RejectReason, bytes::Bytes)> {
    if table.draining {
        return Err((RejectReason::Draining, crate::conn::draining_response()));
    }
    // 503 with a Retry-After spread at random, so refused clients come back spread out.
    let try_later = |table: &ConnTable, reason, body| {
        let wait = table.gate.retry_after().as_secs().to_string();
        Err((reason, http_response(503, &[("Retry-After", &wait)], body)))
    };
    if table.gate.memory_full(connections) {
        let body = "server at its memory budget; retry after the time given";
        return try_later(table, RejectReason::Memory, body);
    }
    let now = std::time::Instant::now();
    if let Some(false) = table.upgrade_bucket.as_mut().map(|b| b.take(now)) {
        let body = "too many new connections; retry after the time given";
        return try_later(table, RejectReason::Rate, body);
    }
    if !table.gate.origin_allowed(req.header("origin")) {
        let response = http_response(403, &[], "origin not allowed");
        return Err((RejectReason::Origin, response));
    }
    Ok(())
}

/// Whether the connection's socket should be read now.
pub(crate) fn wants_read(conn: &Conn, settings: &Settings) -> bool {
    match conn.phase {
        Phase::Handshake(_) | Phase::Draining => true,
        // Backpressure: a peer that does not read its replies is not read either, nor one
        // whose publish budget is empty (until it refills, see `ConnTable::throttle`).
        Phase::Open(_) => {
            conn.throttle.is_none() && conn.out.len_bytes() < settings.max_outbound_bytes / 2
        }
        Phase::Flushing | Phase::Closed => false,
    }
}

/// The peer closed its side: how the connection ends.
pub(crate) fn on_eof(conn: &mut Conn) -> Flow {
    if let Phase::Open(_) = conn.phase {
        conn.note_close(
            CloseCode::ABNORMAL,
            "connection closed without a close frame",
            CloseInitiator::Transport,
        );
    }
    Flow::Done
}
