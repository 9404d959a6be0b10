//! A shard: one pinned thread, one loop (io_uring: one ring; epoll: monoio's runtime), one
//! slab of connections.
//!
//! Owns what happens to a connection whatever drives its socket: the upgrade, the HTTP
//! endpoints, the codec, handler calls, deadlines, and the end of a connection; and the
//! shard's inbox work (deliveries, the drain). Starting the thread and the driver is
//! `runtime.rs`; the socket IO itself lives in `driver/uring_driver.rs` (io_uring) and
//! `driver/poll_driver.rs` (epoll, with the `epoll` feature). Shards share nothing mutable;
//! commands arrive through `pubsub/bus.rs`.

use std::{
    cell::{Cell, RefCell},
    future::{poll_fn, Future},
    mem,
    rc::Rc,
    sync::Arc,
    task::{Poll, Waker},
    time::Duration,
};

use bytes::BytesMut;
use ringcast_protocol::{
    error_response, http_response, CloseCode, CloseState, Codec, Event, HandshakeError,
    UpgradeRequest,
};
use tracing::{debug, error, info};

use crate::{
    api::{
        handler::{Ctx, Handler},
        hooks::{self, Caught},
    },
    conn::{
        pending::{answer_now, Cause},
        table::{evicted_response, Conn, ConnTable, Phase, Settings, Socket, Upgraded},
    },
    ops::{
        admission::{Held, RejectReason},
        metrics::{Metrics, ShardMetrics},
    },
    pubsub::{
        bus::{Inbox, ShardMsg},
        topic::Topic,
    },
    types::{
        clock::Stamp,
        ids::ShardId,
        message::{CloseInfo, CloseInitiator, Message, Upgrade, UpgradeCtx},
    },
};

/// Topic messages a shard delivers before it lets its other tasks run.
const DELIVER_BATCH: usize = 256;

/// How often a drain closes its next share of connections.
const DRAIN_TICK: Duration = Duration::from_millis(10);

/// What one shard's drain did.
#[derive(Debug, Default)]
pub(crate) struct DrainReport {
    pub(crate) closed: u64,
    pub(crate) flushed: u64,
    pub(crate) dropped: u64,
}

/// One shard's state, owned by its thread (behind an `Rc`).
pub(crate) struct Shard<H> {
    pub(crate) id: ShardId,
    pub(crate) table: RefCell<ConnTable>,
    pub(crate) handler: RefCell<H>,
    /// epoll driver: every read lands here first; only unfinished frames are copied out.
    #[cfg(feature = "epoll")]
    pub(crate) read_buf: RefCell<BytesMut>,
    pub(crate) metrics: Arc<ShardMetrics>,
    pub(crate) all_metrics: Arc<[Arc<ShardMetrics>]>,
    pub(crate) deferred: RefCell<Vec<Waker>>,
    pub(crate) deferrer: RefCell<Option<Waker>>,
    pub(crate) stopped: Cell<bool>,
    pub(crate) canary: Arc<Topic>,
    pub(crate) canary_interval: Duration,
}

/// Whether a connection goes on or ends.
pub(crate) enum Flow {
    Continue,
    Done,
}

impl<H: Handler> Shard<H> {
    /// Delivers `first` and whatever else waits in the inbox, yielding to the socket tasks
    /// every [`DELIVER_BATCH`] messages. Returns false if it found a stop in the inbox.
    pub(crate) async fn deliver(&self, inbox: &Inbox, first: ShardMsg) -> bool {
        let mut next = Some(first);
        loop {
            let mut n = 0;
            {
                let mut table = self.table.borrow_mut();
                let now_ns =
                    crate::types::clock::When::from_instant(std::time::Instant::now()).as_nanos();
                while let Some(msg) = next.take() {
                    match msg {
                        ShardMsg::Deliver(msg) if Arc::ptr_eq(&msg.topic, &self.canary) => {
                            self.metrics.canary_at.set(now_ns);
                            table.hub.taken(self.id.index(), 1);
                            table.sample_rings(crate::types::clock::When::from_nanos(now_ns));
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

    /// Lets every other ready task of the shard run first (see [`deferrer`]).
    pub(crate) fn yield_now(&self) -> impl Future<Output = ()> + '_ {
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
    pub(crate) async fn drain(&self, inbox: &Inbox, stop_at: std::time::Instant) -> DrainReport {
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
            let tick = crate::shard::local::sleep(DRAIN_TICK);
            match crate::shard::local::timeout(DRAIN_TICK, inbox.recv()).await {
                // A second stop changes nothing: the drain is under way.
                Ok(Some(ShardMsg::Stop)) => {}
                Ok(Some(msg)) => {
                    self.deliver(inbox, msg).await;
                }
                // The engine is gone: no more deliveries; just wait out the window.
                Ok(None) => tick.await,
                Err(()) => {}
            }
        }
    }

    pub(crate) fn wait_empty(&self) -> impl Future<Output = ()> + '_ {
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
    pub(crate) fn close_all_now(&self) -> usize {
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
                    conn.queue_transmits();
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
                Phase::Flushing | Phase::HalfClosed | Phase::Closed => {
                    input.clear();
                    return;
                }
            }
        }
        if let Phase::Open(codec) = &table.conns[key].phase {
            if matches!(codec.close_state(), CloseState::Closed | CloseState::Failed) {
                table.flush_and_close(key);
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
                crate::pubsub::canary::stale(&self.all_metrics, self.canary_interval).first()
            {
                let why = format!("shard {shard} is not taking deliveries (no canary for {age:?})");
                http_response(503, &[], &why)
            } else {
                http_response(200, &[], "ready")
            }
        } else if path == http.metrics_path {
            metrics_response(|| {
                Metrics::gather(&self.all_metrics, |i| table.hub.inbox_depth(i), &table.gate)
                    .with_broker(table.hub.broker_stats())
                    .with_topics(table.hub.counts())
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
        // Counted from here: `held` gives the counts back on every refusal below.
        let mut held = Held::new(table.gate.clone());
        if !held.acquire_ip(peer.ip()) {
            debug!(%peer, "upgrade refused: connections per address at the cap");
            let response = http_response(429, &[], "too many connections from this address");
            table.reject(key, RejectReason::IpCap, response);
            return false;
        }
        let ctx = UpgradeCtx {
            peer,
            shard: self.id,
        };
        let decision = match hooks::call(|| handler.on_upgrade(&req, &ctx)) {
            Ok(decision) => decision,
            Err(caught) => {
                self.handler_panicked("on_upgrade", &peer, &caught);
                let response = http_response(500, &[], "internal error");
                table.reject(key, RejectReason::Handler, response);
                return false;
            }
        };
        let (subprotocol, user, compression) = match decision {
            Upgrade::Accept {
                subprotocol,
                user,
                compression,
            } => (subprotocol, user, compression),
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
                let response = http_response(status, &headers, &body);
                table.reject(key, RejectReason::Handler, response);
                return false;
            }
        };
        let settings = &table.settings.compression;
        let deflate_config = settings.deflate(compression.unwrap_or(settings.mode));
        let deflate = deflate_config
            .as_ref()
            .and_then(|config| req.negotiate_deflate(config));
        let response = match req.accept_with(subprotocol.as_deref(), deflate.as_ref()) {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "handler selected a subprotocol the client did not offer");
                table.reject(key, RejectReason::Handler, error_response(&e));
                return false;
            }
        };
        if let Some(user) = user.as_deref() {
            if !held.acquire_user(user) {
                debug!(%peer, user, "upgrade refused: connections per user at the cap");
                let response = http_response(429, &[], "too many connections for this user");
                table.reject(key, RejectReason::UserCap, response);
                return false;
            }
        }
        let counted_ip = held.keep();
        let facts = Upgraded {
            subprotocol: subprotocol.as_deref(),
            // Kept always: ConnInfo::user reads it, and the close gives its count back.
            user: user.as_deref(),
            counted_ip,
            head_kept: table.settings.keep_request_head,
        };
        let limits = table.settings.limits;
        table.left_handshake(key);
        let conn = &mut table.conns[key];
        conn.out.push_encoded(response);
        conn.set_upgraded(&req, head, facts);
        let codec = match (deflate, &deflate_config) {
            (Some(params), Some(config)) => Codec::server(limits).with_deflate(params, config),
            _ => Codec::server(limits),
        };
        conn.open(codec);
        conn.deadline = None;
        conn.spoke = table.now;
        if let Some(first) = first_liveness_check(&table.settings) {
            table.set_deadline(key, first);
        }
        self.metrics.upgrades_accepted.incr();
        let opened = hooks::call(|| {
            handler.on_open(&mut Ctx {
                table,
                key,
                running: key,
            })
        });
        if let Err(caught) = opened {
            self.handler_panicked("on_open", &table.id_of(key), &caught);
            close_after_panic(table, key);
        }
        true
    }

    /// Counts a panic caught in a handler hook and logs it, once (see `Handler`, Panics).
    fn handler_panicked(&self, hook: &str, who: &dyn std::fmt::Display, caught: &Caught) {
        self.metrics.handler_panics.incr();
        error!(
            shard = %self.id,
            conn = %who,
            hook,
            panic = %caught.message,
            location = caught.location.as_deref().unwrap_or("unknown"),
            backtrace = caught.backtrace.as_deref().unwrap_or("(set RUST_BACKTRACE=1)"),
            "handler panicked: the connection is closed, the shard goes on"
        );
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
        // Once this side has sent its close frame the connection is ending: a message the peer
        // sent before it read that frame is discarded, not handled. A client cut with 1008 for
        // bad requests gets no more of its requests counted or served, and a drain's 1012 is
        // not followed by publishes the client will never see acked.
        if !matches!(&table.conns[key].phase, Phase::Open(c) if c.close_state() == CloseState::Open)
        {
            return;
        }
        self.metrics.messages_in.incr();
        table.conns[key].spoke = table.now;
        let handled = hooks::call(|| {
            handler.on_message(
                &mut Ctx {
                    table,
                    key,
                    running: key,
                },
                msg,
            )
        });
        if let Err(caught) = handled {
            self.handler_panicked("on_message", &table.id_of(key), &caught);
            close_after_panic(table, key);
        }
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
            Phase::Open(_) | Phase::Flushing | Phase::HalfClosed | Phase::Closed => Flow::Done,
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
                    ringcast_protocol::OpCode::Ping,
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
    #[cfg(feature = "epoll")]
    pub(crate) fn end(&self, key: usize) -> Poll<()> {
        self.finish(key);
        Poll::Ready(())
    }

    /// Ends a connection: `on_close` if it was opened, then the slot and the socket. The epoll
    /// driver frees both at once; the io_uring driver first waits for operations in flight
    /// (the connection sits in `Phase::Closed` meanwhile, see `driver/uring_driver.rs`).
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
            conn.end_sends(); // sends from on_close now return Closed
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
            table.gate.release(ip, user);
            let mut handler = self.handler.borrow_mut();
            let closed = hooks::call(|| {
                handler.on_close(
                    &mut Ctx {
                        table,
                        key,
                        running: key,
                    },
                    &info,
                )
            });
            drop(handler);
            if let Err(caught) = closed {
                self.handler_panicked("on_close", &table.id_of(key), &caught);
            }
        }
        table.unsubscribe_all(key);
        table.left_handshake(key);
        let conn = &mut table.conns[key];
        conn.finished();
        conn.deadline = None;
        match conn.socket {
            Socket::Ring(_) => table.notify(key, usize::MAX),
            #[cfg(feature = "epoll")]
            Socket::Poll(_) => {
                drop(table_ref);
                self.release(key);
            }
        }
    }

    /// Evicts up to `max` of the shard's unfinished upgrades, oldest first (none younger than
    /// `MIN_EVICT_AGE`), to make room for
    /// new connections (`cause` says why there is none): each is answered 503 at once and
    /// ended, so its descriptor is closed now (io_uring: once its receive is cancelled), not
    /// after `close_timeout`. Counted under `upgrade_rejections{reason="evicted"}` and in
    /// `Pending::evicting` until its slot is released. Returns how many.
    pub(crate) fn evict_oldest(&self, max: usize, cause: Cause) -> usize {
        let mut evicted = 0;
        let now = std::time::Instant::now();
        while evicted < max {
            let key = {
                let mut table_ref = self.table.borrow_mut();
                let table = &mut *table_ref;
                let Some(key) = table.pending.take_oldest(now) else {
                    break;
                };
                let conn = &mut table.conns[key];
                answer_now(conn.socket.raw_fd(), &evicted_response(), false);
                conn.uring.set_evicted(true);
                #[cfg(feature = "epoll")]
                if let Socket::Poll(p) = &mut conn.socket {
                    // Its task ends when it next runs and finds the slot gone.
                    if let Some(w) = p.waker.take() {
                        w.wake();
                    }
                }
                table.pending.evicting += 1;
                table.metrics.rejected(RejectReason::Evicted);
                key
            };
            self.finish(key);
            evicted += 1;
        }
        if evicted > 0 {
            self.table
                .borrow_mut()
                .pending
                .shed(self.id, evicted as u64, 0, Some(cause));
        }
        evicted
    }

    /// Frees the slot and closes the socket of a finished connection.
    pub(crate) fn release(&self, key: usize) {
        let mut table = self.table.borrow_mut();
        let conn = table.conns.remove(key);
        if conn.uring.evicted() {
            table.pending.evicting -= 1;
        }
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

/// Ends a connection whose `on_open` or `on_message` panicked: a close frame with 1011 (the
/// panic message stays in the log, not on the wire), then flush and shut down without waiting
/// for the peer's close frame (RFC 6455 §7.1.7, failing the connection), so the handler gets
/// no more messages from it. `on_close` still runs when the connection ends.
fn close_after_panic(table: &mut ConnTable, key: usize) {
    table.close(
        key,
        CloseCode::INTERNAL_ERROR,
        "internal error",
        CloseInitiator::Server,
        key,
    );
    if matches!(table.conns[key].phase, Phase::Open(_)) {
        table.flush_and_close(key);
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
        return Err((
            RejectReason::Draining,
            crate::conn::table::draining_response(),
        ));
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
        Phase::Handshake(_) | Phase::HalfClosed => true,
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

/// Yields a task behind every task already queued. monoio runs a task that wakes itself again
/// at once, ahead of the queue, so a busy connection that yielded that way would starve the
/// shard; waking it from this separate task puts it at the back instead.
pub(crate) async fn deferrer<H: Handler>(shard: Rc<Shard<H>>) {
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
