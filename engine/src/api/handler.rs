//! The embedder's API inside a shard: the [`Handler`] hooks and the [`Ctx`] they act through.
//!
//! Owns the types an application sees per connection: the upgrade decision, messages, the
//! send status, close information, and pre-encoded shared frames. Everything here runs on the
//! shard's own thread; a handler need not be `Send`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ringcast_protocol::{CloseCode, UpgradeRequest, Utf8Bytes};

use crate::api::hooks::engine_code;
use crate::types::message::{
    CloseInfo, CloseInitiator, Enqueue, Frame, Message, SubscribeError, Subscribed, Upgrade,
    UpgradeCtx,
};
use crate::{
    config::{PubSubConfig, RingOverflow},
    conn::table::{ConnInfo, ConnTable},
    pubsub::{
        hub::Publisher,
        topic::{Publish, ReplyTo},
    },
    types::{
        ids::{ConnId, ShardId},
        publish::{DeliveryFormat, Payload, PublishError, PublishReceipt},
    },
};

/// The hooks a shard calls for each connection. One handler value lives on each shard (made by
/// the factory given to [`Engine::start`](crate::Engine::start)); it is never shared between
/// threads, so it needs no locks and need not be `Send`.
///
/// Hooks must not block: a shard runs every connection it owns on one thread.
///
/// # Panics
///
/// A panic in a hook is caught: it costs the connection, not the shard. The engine logs it
/// once (error level, with the connection, the hook, the panic message and location, and a
/// backtrace when `RUST_BACKTRACE` asks; its panic hook keeps it from also being printed),
/// counts it in `handler_panics` (`ringcast_handler_panics_total`), and goes on serving every
/// other connection:
/// - [`Handler::on_upgrade`]: the request is answered with 500 "internal error".
/// - [`Handler::on_open`] and [`Handler::on_message`]: the connection is closed with 1011
///   "internal error" (the panic message is not sent to the client) and gets no more
///   messages; [`Handler::on_close`] still runs for it, so its state can be cleaned up.
/// - [`Handler::on_close`]: only counted and logged; the connection ends as it would have.
///
/// The same handler value serves the shard's next calls, so a hook should not leave its own
/// state broken half way through an update. Shard state is safe: a hook reaches it only
/// through [`Ctx`], whose calls are whole. A panic inside a `Ctx` call (an engine bug) is not
/// caught and stops the shard ([`Error::ShardPanicked`](crate::Error::ShardPanicked)). Under `panic = "abort"`
/// nothing is caught: any panic ends the process.
pub trait Handler: 'static {
    /// Decides an upgrade request that passed RFC 6455 validation. Runs before the connection
    /// costs anything beyond its socket. The default accepts with no subprotocol.
    fn on_upgrade(&mut self, req: &UpgradeRequest<'_>, ctx: &UpgradeCtx) -> Upgrade {
        let _ = (req, ctx);
        Upgrade::accept()
    }

    /// The 101 is queued; the connection is open.
    fn on_open(&mut self, ctx: &mut Ctx<'_>) {
        let _ = ctx;
    }

    /// A whole message arrived (fragments reassembled, text validated). The payload shares the
    /// shard's read buffer; keeping it for long keeps that buffer's memory alive, so copy what
    /// you keep (`Bytes::copy_from_slice`).
    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message);

    /// The connection ended; `close` says how. Called once for every connection that was
    /// opened. Sends from here return [`Enqueue::Closed`].
    fn on_close(&mut self, ctx: &mut Ctx<'_>, close: &CloseInfo) {
        let _ = (ctx, close);
    }
}

/// A handler's access to the shard while a hook runs for one connection.
#[derive(Debug)]
pub struct Ctx<'a> {
    pub(crate) table: &'a mut ConnTable,
    pub(crate) key: usize,
    /// The connection whose task is running: it flushes by itself, so it is never woken.
    pub(crate) running: usize,
}

impl Ctx<'_> {
    /// This connection's id.
    pub fn id(&self) -> ConnId {
        self.table.id_of(self.key)
    }

    /// This connection's upgrade-time facts: peer, path, headers, subprotocol.
    pub fn info(&self) -> ConnInfo<'_> {
        self.table.info(self.key)
    }

    /// The shard this hook runs on.
    pub fn shard(&self) -> ShardId {
        self.table.shard
    }

    /// Connections open on this shard, this one included.
    pub fn connections(&self) -> usize {
        self.table.len()
    }

    /// Queues a message to this connection. The payload is not copied. A reply from this
    /// connection's own hook is always queued (reading pauses instead while the queue is
    /// half full); see [`LimitsConfig::max_outbound_bytes`](crate::LimitsConfig).
    pub fn send(&mut self, msg: Message) -> Enqueue {
        let _engine = engine_code();
        self.table.send_message(self.key, &msg, self.running)
    }

    /// Queues a text message to this connection.
    pub fn send_text(&mut self, text: impl Into<Utf8Bytes>) -> Enqueue {
        self.send(Message::Text(text.into()))
    }

    /// Queues a binary message to this connection.
    pub fn send_binary(&mut self, data: impl Into<Bytes>) -> Enqueue {
        self.send(Message::Binary(data.into()))
    }

    /// Queues a pre-encoded frame to this connection.
    pub fn send_frame(&mut self, frame: &Frame) -> Enqueue {
        let _engine = engine_code();
        self.table.send_frame(self.key, frame, self.running)
    }

    /// Queues a message to another connection on this shard. Returns [`Enqueue::Closed`] if
    /// `id` is stale or lives on another shard.
    pub fn send_to(&mut self, id: ConnId, msg: &Message) -> Enqueue {
        let _engine = engine_code();
        match self.table.key_of(id) {
            Some(key) => self.table.send_message(key, msg, self.running),
            None => Enqueue::Closed,
        }
    }

    /// Queues a pre-encoded frame to another connection on this shard.
    pub fn send_frame_to(&mut self, id: ConnId, frame: &Frame) -> Enqueue {
        let _engine = engine_code();
        match self.table.key_of(id) {
            Some(key) => self.table.send_frame(key, frame, self.running),
            None => Enqueue::Closed,
        }
    }

    /// Starts the closing handshake on this connection. A code that may not be sent on the
    /// wire (1005, 1006, 1015, reserved ranges) is replaced by 1011, with a log line.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        let _engine = engine_code();
        self.table
            .close(self.key, code, reason, CloseInitiator::Server, self.running);
    }

    /// Starts the closing handshake on another connection of this shard. Returns false if
    /// `id` is stale or lives on another shard.
    pub fn close_conn(&mut self, id: ConnId, code: CloseCode, reason: &str) -> bool {
        let _engine = engine_code();
        match self.table.key_of(id) {
            Some(key) => {
                self.table
                    .close(key, code, reason, CloseInitiator::Server, self.running);
                true
            }
            None => false,
        }
    }

    /// Sets how this connection receives topic messages: raw frames (the default) or the
    /// broker's envelope. Set it before subscribing: messages already queued keep theirs.
    pub fn set_delivery_format(&mut self, format: DeliveryFormat) {
        let _engine = engine_code();
        self.table.pubsub(self.key).format = format;
    }

    /// Sets what this connection's data ring does when it is full (default:
    /// `pubsub.ring_overflow`).
    pub fn set_ring_overflow(&mut self, policy: RingOverflow) {
        let _engine = engine_code();
        self.table.pubsub(self.key).overflow = policy;
    }

    /// Subscribes this connection to `topic`. With `since = Some(S)` it first gets the
    /// topic's messages after S from history, then live ones, with no gap and no duplicate;
    /// see [`Subscribed::reset`] for a history that no longer reaches back to S. Subscribing
    /// again to a topic starts the subscription over.
    ///
    /// Not charged to the connection's subscribe budget: a handler that subscribes on a
    /// client's request charges it first with [`Ctx::charge_subscriptions`], as the
    /// [`Broker`](crate::Broker) does.
    ///
    /// # Errors
    /// A topic name that breaks the rules, `pubsub.max_subscriptions_per_connection`, or a
    /// new topic while the process holds `pubsub.max_topics`
    /// ([`SubscribeError::TooManyTopics`]).
    pub fn subscribe(
        &mut self,
        topic: &str,
        since: Option<u64>,
    ) -> Result<Subscribed, SubscribeError> {
        self.subscribe_in(topic, since, None)
    }

    /// As [`Ctx::subscribe`], with the epoch `since` counts in (from an earlier
    /// [`Subscribed::epoch`] or publish receipt). When the topic's epoch is another, its
    /// numbering started over since: the subscriber is reset to the oldest message held
    /// ([`Subscribed::reset`]) and replayed from there.
    ///
    /// # Errors
    /// As [`Ctx::subscribe`].
    pub fn subscribe_in(
        &mut self,
        topic: &str,
        since: Option<u64>,
        epoch: Option<u64>,
    ) -> Result<Subscribed, SubscribeError> {
        let _engine = engine_code();
        let topic = match self.table.local_topic(topic) {
            Some(t) => t,
            None => self.table.hub.topic(topic).map_err(|e| match e {
                PublishError::BadTopic(why) => SubscribeError::BadTopic(why),
                _ => SubscribeError::TooManyTopics,
            })?,
        };
        let seen = topic.seen.load(std::sync::atomic::Ordering::Relaxed);
        let attach = self.table.subscribe(self.key, topic, since, epoch)?;
        // A backend that answers later (Redis) has not said yet.
        let pending = attach.live_from == u64::MAX;
        Ok(Subscribed {
            live_from: if pending { 0 } else { attach.live_from },
            replayed: attach.replayed as u64,
            reset: attach.reset,
            epoch: attach.epoch,
            seq: if pending { seen } else { attach.live_from - 1 },
        })
    }

    /// Ends this connection's subscription to `topic`; false if it had none.
    pub fn unsubscribe(&mut self, topic: &str) -> bool {
        let _engine = engine_code();
        self.table.unsubscribe(self.key, topic)
    }

    /// Publishes to `topic` on behalf of this connection, within its publish budget
    /// (`pubsub.publish_rate_per_sec` and `pubsub.publish_burst`). The payload is copied once
    /// (not per subscriber): a message's payload shares the shard's read buffer, which topic
    /// history must not hold on to.
    ///
    /// # Errors
    /// [`PublishError::RateLimited`] over budget, and as [`Publisher::publish`].
    pub fn publish(
        &mut self,
        topic: &str,
        payload: Payload,
    ) -> Result<PublishReceipt, PublishError> {
        let _engine = engine_code();
        let payload = match payload {
            Payload::Json(b) => Payload::Json(Bytes::copy_from_slice(&b)),
            Payload::Binary(b) => Payload::Binary(Bytes::copy_from_slice(&b)),
            Payload::Text(t) => Payload::Text(
                Utf8Bytes::try_from(Bytes::copy_from_slice(t.as_bytes()))
                    .unwrap_or_else(|_| unreachable!("a copy of valid UTF-8 is valid UTF-8")),
            ),
        };
        self.publish_owned(topic, payload)
    }

    /// As [`Ctx::publish`], for a payload that owns its memory (no copy).
    pub(crate) fn publish_owned(
        &mut self,
        topic: &str,
        payload: Payload,
    ) -> Result<PublishReceipt, PublishError> {
        match self.publish_to(topic, payload, ReplyTo::Nobody)? {
            Publish::Done(receipt) => Ok(receipt),
            Publish::Pending { saturated } => Ok(PublishReceipt {
                seq: 0,
                saturated,
                epoch: 0,
            }),
        }
    }

    /// A publish request from a client speaking the broker protocol, id `id` in `dialect`:
    /// `Ok(Some(_))` when it is done (ack it now), `Ok(None)` when the backend (Redis)
    /// orders it later and then sends the ack or error to this connection itself.
    ///
    /// # Errors
    /// As [`Ctx::publish`].
    pub fn publish_request(
        &mut self,
        topic: &str,
        payload: Payload,
        id: Option<u64>,
        dialect: ringcast_protocol::envelope::Dialect,
    ) -> Result<Option<PublishReceipt>, PublishError> {
        let _engine = engine_code();
        let reply = ReplyTo::Conn {
            conn: self.id(),
            id,
            dialect,
        };
        Ok(match self.publish_to(topic, payload, reply)? {
            Publish::Done(receipt) => Some(receipt),
            Publish::Pending { .. } => None,
        })
    }

    fn publish_to(
        &mut self,
        topic: &str,
        payload: Payload,
        reply: ReplyTo,
    ) -> Result<Publish, PublishError> {
        let result = self.publish_inner(topic, payload, reply);
        if result.is_err() {
            self.table.metrics.publishes_refused.incr();
        }
        result
    }

    fn publish_inner(
        &mut self,
        topic: &str,
        payload: Payload,
        reply: ReplyTo,
    ) -> Result<Publish, PublishError> {
        let now = Instant::now();
        let budget = &mut self.table.pubsub(self.key).publish_budget;
        if !budget.take(now) {
            // Slowed, not cut: nothing more from this connection is parsed or read until
            // the budget allows the next publish.
            let wait = budget.wait(now);
            self.table.throttle(self.key, wait);
            return Err(PublishError::RateLimited);
        }
        let topic = match self.table.local_topic(topic) {
            Some(t) => t,
            None => self.table.hub.topic(topic)?,
        };
        // io_uring: this shard's own subscribers get the message in this loop turn, not
        // through the shard's inbox.
        let mut own = None;
        let local = self
            .table
            .same_turn_delivery
            .then_some((self.table.shard.0, &mut own));
        let result = self.table.hub.publish(&topic, payload, reply, local);
        if let Some(msg) = own {
            self.table.deliver(&msg);
            self.table.metrics.published_in.incr();
            self.table.metrics.published_local.incr();
        }
        result
    }

    /// The options to decode this connection's broker requests with
    /// ([`envelope::decode_request_with`](ringcast_protocol::envelope::decode_request_with)),
    /// as the engine's config sets them (`pubsub.max_json_depth`,
    /// `pubsub.max_topics_per_request`): what the built-in broker uses, so that a payload it
    /// acks would also pass [`Ctx::publish`].
    pub fn decode_options(&self) -> ringcast_protocol::envelope::DecodeOptions {
        let pubsub = &self.table.settings.pubsub;
        ringcast_protocol::envelope::DecodeOptions::default()
            .max_json_depth(pubsub.max_json_depth)
            .max_request_topics(pubsub.max_topics_per_request)
    }

    /// A publisher for use outside hooks (another thread, a timer).
    pub fn publisher(&self) -> Publisher {
        Publisher {
            hub: self.table.hub.clone(),
        }
    }

    /// Topic messages this connection's data ring has dropped so far.
    pub fn dropped(&self) -> u64 {
        self.table.conns[self.key]
            .pubsub
            .as_ref()
            .map_or(0, |ps| ps.dropped)
    }

    /// How long this connection should wait before retrying what failed with `err`, the
    /// hint a refusal carries: after [`PublishError::RateLimited`], the time until its
    /// publish budget allows the next publish (the time its reads stay paused); after
    /// [`PublishError::Saturated`] and [`PublishError::Unavailable`], as
    /// [`Publisher::retry_after`]. `None` after errors a retry does not cure.
    pub fn retry_after(&mut self, err: &PublishError) -> Option<Duration> {
        let _engine = engine_code();
        match err {
            PublishError::RateLimited => {
                let budget = &self.table.pubsub(self.key).publish_budget;
                Some(budget.wait(Instant::now()).max(Duration::from_millis(1)))
            }
            other => self.table.hub.retry_hint(*other),
        }
    }

    /// The engine's pub/sub settings (limits and budgets), for a handler that enforces them
    /// in its own protocol, as the [`Broker`](crate::Broker) does with
    /// [`PubSubConfig::max_request_bytes`].
    pub fn pubsub_config(&self) -> &PubSubConfig {
        &self.table.settings.pubsub
    }

    /// Charges `topics` subscriptions or unsubscriptions to this connection's subscribe
    /// budget (`pubsub.subscribe_rate_per_sec`, `pubsub.subscribe_burst`; more than the burst
    /// is charged as the burst, so any request can pass once the budget is full). Over
    /// budget nothing is taken, the connection is not read until the budget allows it
    /// (slowed, not cut, as for publishes), and the error is that wait, the hint for a
    /// `rate_limited` reply.
    ///
    /// # Errors
    /// The time until the budget holds `topics` tokens, when it does not now.
    pub fn charge_subscriptions(&mut self, topics: usize) -> Result<(), Duration> {
        let now = Instant::now();
        let budget = &mut self.table.pubsub(self.key).subscribe_budget;
        let n = topics as f64;
        if budget.take_n(n, now) {
            return Ok(());
        }
        let wait = budget.wait_for(n, now).max(Duration::from_millis(1));
        self.table.throttle(self.key, wait);
        self.table.metrics.subscribes_refused.incr();
        Err(wait)
    }

    /// Charges one malformed request to this connection's budget (`pubsub.max_bad_requests`,
    /// refilled at one per second). Returns false once the budget is spent: the caller
    /// should close the connection with 1008. Charge only requests that are the client's
    /// fault (the broker charges `bad_request`, `unknown_type`, `bad_topic`, `bad_payload`
    /// and `too_large`), never refusals of a well-formed request (rate limit, an engine or
    /// broker that cannot take it now, auth, a missing subscription).
    pub fn charge_bad_request(&mut self) -> bool {
        let _engine = engine_code();
        self.table.metrics.bad_requests.incr();
        self.table
            .pubsub(self.key)
            .bad_request_budget
            .take(std::time::Instant::now())
    }
}
