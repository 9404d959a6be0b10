//! Topics across shards: sequence numbers, history, and the hand-off of each published message
//! to the shards that have subscribers for it.
//!
//! Owns the process-wide topic registry (the in-memory broker backend), [`Publisher`], and
//! [`Published`], a message framed at most once per delivery format and shared by every
//! subscriber on every shard. A topic's sequence number is assigned, its history appended and
//! its message handed to each interested shard's inbox under the topic's lock, so every shard
//! receives a topic's messages in sequence order however many threads publish. Delivery to
//! connections is the shard's business (`conn/topics.rs`).

use std::{
    collections::HashMap,
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use ringcast_protocol::envelope::{self};

use crate::pubsub::{
    bus::Fanout,
    topic::{Attach, AttachStart, Publish, Published, ReplyTo, Topic},
};
use crate::types::publish::{Payload, PublishError, PublishReceipt, TopicStats, SATURATED_RETRY};
use crate::{config::PubSubConfig, pubsub::bus::Mailbox, types::clock::When};

/// The broker-backend seam: where a topic's sequence numbers and history live, and how a
/// published message reaches the shards. Every backend offers the same three operations
/// (publish, attach, detach, dispatched by [`Hub`]); an enum rather than a trait object so
/// the in-memory path stays a direct, inlinable call.
#[derive(Debug)]
pub(crate) enum Backend {
    /// In this process (the default): each topic's seq and history under the topic's lock.
    Memory {
        history_max_messages: usize,
        history_max_bytes: usize,
    },
    /// In Redis, shared by every host that uses it, through the bridge thread
    /// (`pubsub/redis.rs`). Publishes and attaches complete later, by messages to the shards.
    Redis(crate::pubsub::redis::Bridge),
}

/// Every topic of the process, the shards' inboxes, and the backend that orders messages.
pub(crate) struct Hub {
    topics: RwLock<HashMap<Arc<str>, Arc<Topic>>>,
    /// Set once the engine has stopped: publishes fail with `Stopped`.
    stopped: AtomicBool,
    fanout: Arc<Fanout>,
    backend: Backend,
    max_pending: usize,
    max_publish_bytes: usize,
    max_json_depth: usize,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("shards", &self.fanout.mailboxes.len())
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// The in-memory hub.
    pub(crate) fn new(config: &PubSubConfig, mailboxes: Vec<Mailbox>) -> Self {
        let backend = Backend::Memory {
            history_max_messages: config.history_max_messages,
            history_max_bytes: config.history_max_bytes,
        };
        Self::with_backend(config, Self::fanout(mailboxes), backend)
    }

    /// The shared inboxes for [`Hub::with_backend`].
    pub(crate) fn fanout(mailboxes: Vec<Mailbox>) -> Arc<Fanout> {
        Arc::new(Fanout {
            pending: mailboxes.iter().map(|_| AtomicUsize::new(0)).collect(),
            mailboxes,
        })
    }

    /// A hub ordering messages through `backend`.
    pub(crate) fn with_backend(
        config: &PubSubConfig,
        fanout: Arc<Fanout>,
        backend: Backend,
    ) -> Self {
        Self {
            topics: RwLock::new(HashMap::new()),
            stopped: AtomicBool::new(false),
            fanout,
            backend,
            max_pending: config.max_pending_per_shard,
            max_publish_bytes: config.max_publish_bytes,
            max_json_depth: config.max_json_depth,
        }
    }

    /// The Redis bridge, when that is the backend.
    pub(crate) fn bridge(&self) -> Option<&crate::pubsub::redis::Bridge> {
        match &self.backend {
            Backend::Redis(bridge) => Some(bridge),
            Backend::Memory { .. } => None,
        }
    }

    /// Whether the backend can order messages now (always, in memory).
    pub(crate) fn ready(&self) -> bool {
        self.bridge().is_none_or(|b| b.is_up())
    }

    /// Stops the backend's own thread, if it has one. Publishes fail with `Stopped` after,
    /// with every backend.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Relaxed);
        if let Some(bridge) = self.bridge() {
            bridge.stop();
        }
    }

    /// The shards' inboxes.
    pub(crate) fn fanout_handle(&self) -> Arc<Fanout> {
        self.fanout.clone()
    }

    /// A topic outside the registry (no client can subscribe to it): the readiness canary's.
    pub(crate) fn unregistered_topic(name: &str) -> Arc<Topic> {
        Arc::new(Topic::new(Arc::from(name)))
    }

    /// The topic called `name`, made on first use.
    pub(crate) fn topic(&self, name: &str) -> Result<Arc<Topic>, PublishError> {
        if let Some(t) = self
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(t.clone());
        }
        envelope::validate_topic(name).map_err(PublishError::BadTopic)?;
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let topic = topics
            .entry(Arc::from(name))
            .or_insert_with_key(|name| Arc::new(Topic::new(name.clone())));
        Ok(topic.clone())
    }

    fn existing(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// The Redis bridge's state and counters, when that is the backend.
    pub(crate) fn broker_stats(&self) -> Option<crate::types::publish::BrokerStats> {
        self.bridge().map(|b| b.stats())
    }

    /// Sequences `payload` in `topic`, keeps it in history and hands it to every shard with
    /// subscribers, in the backend's order. A backend that sequences later (Redis) answers
    /// `Pending` and sends the outcome to `reply`.
    pub(crate) fn publish(
        &self,
        topic: &Arc<Topic>,
        payload: Payload,
        reply: ReplyTo,
    ) -> Result<Publish, PublishError> {
        if self.stopped.load(Relaxed) {
            return Err(PublishError::Stopped);
        }
        if payload.len() > self.max_publish_bytes {
            return Err(PublishError::TooLarge);
        }
        // Every publish path comes here (the broker decoded with the same limit already).
        if let Payload::Json(json) = &payload {
            if !envelope::json_depth_within(json, self.max_json_depth) {
                return Err(PublishError::TooDeep);
            }
        }
        match &self.backend {
            Backend::Memory {
                history_max_messages,
                history_max_bytes,
            } => self
                .publish_memory(topic, payload, *history_max_messages, *history_max_bytes)
                .map(Publish::Done),
            Backend::Redis(bridge) => {
                // Shards with a full inbox: the same back-pressure as in memory, over all
                // of this host's shards (the topic's interest lives in the bridge).
                let mut saturated = false;
                for p in self.fanout.pending.iter() {
                    let pending = p.load(Relaxed);
                    if pending >= self.max_pending.saturating_mul(2) {
                        return Err(PublishError::Saturated);
                    }
                    saturated |= pending >= self.max_pending;
                }
                bridge.publish(topic.clone(), payload, reply)?;
                Ok(Publish::Pending { saturated })
            }
        }
    }

    /// Publishes and returns the receipt, waiting for a backend that sequences later (a
    /// thread outside the shards: [`Publisher`]).
    fn publish_wait(
        &self,
        topic: &Arc<Topic>,
        payload: Payload,
    ) -> Result<PublishReceipt, PublishError> {
        let Some(bridge) = self.bridge() else {
            return match self.publish(topic, payload, ReplyTo::Nobody)? {
                Publish::Done(receipt) => Ok(receipt),
                Publish::Pending { .. } => unreachable!("the in-memory backend never defers"),
            };
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.publish(topic, payload, ReplyTo::Thread(tx))?;
        rx.recv_timeout(bridge.reply_wait())
            .unwrap_or(Err(PublishError::Unavailable))
    }

    /// The in-memory backend's publish: seq, history and hand-off under the topic's lock.
    fn publish_memory(
        &self,
        topic: &Arc<Topic>,
        payload: Payload,
        history_max_messages: usize,
        history_max_bytes: usize,
    ) -> Result<PublishReceipt, PublishError> {
        let mut st = topic.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut saturated = false;
        for &shard in &st.interest {
            let pending = self.fanout.pending[usize::from(shard)].load(Relaxed);
            if pending >= self.max_pending.saturating_mul(2) {
                return Err(PublishError::Saturated);
            }
            saturated |= pending >= self.max_pending;
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let len = payload.len();
        let msg = Arc::new(Published {
            topic: topic.clone(),
            seq,
            payload,
            at: When::from_instant(Instant::now()),
            frames: Default::default(),
        });
        if history_max_messages > 0 {
            st.history.push_back(msg.clone());
            st.history_bytes += len;
            while st.history.len() > history_max_messages
                || (st.history_bytes > history_max_bytes && st.history.len() > 1)
            {
                if let Some(old) = st.history.pop_front() {
                    st.history_bytes -= old.payload.len();
                }
            }
        }
        for &shard in &st.interest {
            self.fanout.hand_off(usize::from(shard), &msg);
        }
        Ok(PublishReceipt {
            seq,
            saturated,
            epoch: topic.epoch.load(Relaxed),
        })
    }

    /// Registers a new subscriber on `shard` (the shard's first for this topic when `first`),
    /// and works out what it must be replayed: at once, or later in a
    /// `ShardMsg::Backend(BackendMsg::Attached)` carrying `token`.
    ///
    /// `epoch`, with `since`, is the numbering `since` counts in: when it is not the topic's,
    /// the subscriber is reset to the oldest message held and replayed from there.
    pub(crate) fn attach(
        &self,
        topic: &Arc<Topic>,
        shard: u16,
        first: bool,
        since: Option<u64>,
        epoch: Option<u64>,
        token: u64,
    ) -> AttachStart {
        match &self.backend {
            Backend::Memory { .. } => {
                AttachStart::Ready(Self::attach_memory(topic, shard, first, since, epoch))
            }
            Backend::Redis(bridge) => {
                bridge.attach(topic.clone(), shard, first, since, epoch, token);
                AttachStart::Pending
            }
        }
    }

    /// The epoch a Redis-backed topic reports before the bridge has answered its attach.
    pub(crate) fn known_epoch(&self, topic: &Topic) -> u64 {
        match self.bridge() {
            Some(bridge) => bridge.epoch(),
            None => topic.epoch.load(Relaxed),
        }
    }

    fn attach_memory(
        topic: &Topic,
        shard: u16,
        first: bool,
        since: Option<u64>,
        epoch: Option<u64>,
    ) -> Attach {
        let mut st = topic.state.lock().unwrap_or_else(|e| e.into_inner());
        if first && !st.interest.contains(&shard) {
            st.interest.push(shard);
        }
        let live_from = st.next_seq;
        let current = topic.epoch.load(Relaxed);
        let mut attach = Attach {
            live_from,
            replay: Vec::new(),
            replayed: 0,
            reset: None,
            epoch: current,
        };
        let Some(since) = since else {
            return attach;
        };
        if epoch.is_some_and(|e| e != current) {
            // `since` counts in another numbering: it says nothing about this one. Everything
            // held is new to the client.
            let oldest = st.history.front().map_or(live_from, |m| m.seq);
            attach.reset = Some(oldest);
            attach.replay = st.history.iter().cloned().collect();
            attach.replayed = attach.replay.len();
            return attach;
        }
        if since >= live_from {
            // The client has seen messages this history never had (another process, a
            // restart): tell it where this history stands.
            attach.reset = Some(live_from);
            return attach;
        }
        let oldest = st.history.front().map_or(live_from, |m| m.seq);
        if since + 1 < oldest {
            attach.reset = Some(oldest);
        }
        attach.replay = st
            .history
            .iter()
            .filter(|m| m.seq > since)
            .cloned()
            .collect();
        attach.replayed = attach.replay.len();
        attach
    }

    /// The shard's last subscriber to `topic` left.
    pub(crate) fn detach(&self, topic: &Arc<Topic>, shard: u16) {
        match &self.backend {
            Backend::Memory { .. } => Self::detach_memory(topic, shard),
            Backend::Redis(bridge) => bridge.detach(topic.clone(), shard),
        }
    }

    fn detach_memory(topic: &Topic, shard: u16) {
        let mut st = topic.state.lock().unwrap_or_else(|e| e.into_inner());
        st.interest.retain(|&s| s != shard);
    }

    /// Deliveries sent to `shard`'s inbox and not yet taken out.
    pub(crate) fn inbox_depth(&self, shard: usize) -> usize {
        self.fanout.pending[shard].load(Relaxed)
    }

    /// The shard took `n` deliveries out of its inbox.
    pub(crate) fn taken(&self, shard: usize, n: usize) {
        self.fanout.pending[shard].fetch_sub(n, Relaxed);
    }

    /// How long a publisher refused with `err` should wait before trying again, for the
    /// refusals the engine decides: [`SATURATED_RETRY`] for a saturated engine, the Redis
    /// bridge's time to its next connection attempt while it is away. `None` for the others
    /// (a retry cannot help, or the engine stopped).
    pub(crate) fn retry_hint(&self, err: PublishError) -> Option<Duration> {
        match err {
            PublishError::Saturated => Some(SATURATED_RETRY),
            PublishError::Unavailable => Some(
                self.bridge()
                    .map_or(SATURATED_RETRY, crate::pubsub::redis::Bridge::retry_hint),
            ),
            _ => None,
        }
    }

    fn saturated(&self) -> bool {
        self.fanout
            .pending
            .iter()
            .any(|p| p.load(Relaxed) >= self.max_pending)
    }

    fn stats(&self, name: &str) -> Option<TopicStats> {
        let topic = self.existing(name)?;
        let st = topic.state.lock().unwrap_or_else(|e| e.into_inner());
        Some(TopicStats {
            epoch: self.known_epoch(&topic),
            next_seq: st.next_seq,
            oldest_held: st.history.front().map(|m| m.seq),
            history_messages: st.history.len(),
            interested_shards: st.interest.len(),
            dropped: topic.dropped.load(Relaxed),
        })
    }
}

/// Publishes to topics from any thread: a market-data feed, a timer, another service's
/// client. Cheap to clone; `Send + Sync`.
///
/// ```
/// use ringcast::{Broker, Engine, EngineConfig, Payload};
///
/// let engine = Engine::start(
///     EngineConfig::default().with_listen("127.0.0.1:0".parse().unwrap()).with_shards(1),
///     |_| Broker::new(),
/// )?;
/// let publisher = engine.handle().publisher();
/// let feed = std::thread::spawn(move || {
///     publisher.publish("prices.BTC", Payload::json(r#"{"bid":1}"#).unwrap()).unwrap()
/// });
/// assert_eq!(feed.join().unwrap().seq, 1);
/// engine.stop()?;
/// # Ok::<(), ringcast::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Publisher {
    pub(crate) hub: Arc<Hub>,
}

impl Publisher {
    /// Publishes `payload` to `topic`, made on first use. Subscribers on every shard get it
    /// in sequence order; it is kept in the topic's history for resume.
    ///
    /// # Errors
    /// A bad topic name, a payload over `pubsub.max_publish_bytes`, a JSON payload nested
    /// deeper than `pubsub.max_json_depth` ([`PublishError::TooDeep`]), or a saturated engine
    /// ([`PublishError::Saturated`]: nothing was published, retry later).
    pub fn publish(&self, topic: &str, payload: Payload) -> Result<PublishReceipt, PublishError> {
        let topic = self.hub.topic(topic)?;
        self.hub.publish_wait(&topic, payload)
    }

    /// A handle to one topic, which publishes without looking the name up each time.
    ///
    /// # Errors
    /// [`PublishError::BadTopic`] for a name that breaks the topic rules.
    pub fn topic(&self, topic: &str) -> Result<TopicPublisher, PublishError> {
        Ok(TopicPublisher {
            topic: self.hub.topic(topic)?,
            hub: self.hub.clone(),
        })
    }

    /// How long to wait before publishing again after `err`: 100 ms after
    /// [`PublishError::Saturated`]; after [`PublishError::Unavailable`], the Redis bridge's
    /// time until it next tries to connect (or `broker.reconnect_min_delay` while it is
    /// trying). `None` after the other errors, which a retry does not cure.
    pub fn retry_after(&self, err: &PublishError) -> Option<Duration> {
        self.hub.retry_hint(*err)
    }

    /// Whether any shard has more than `pubsub.max_pending_per_shard` deliveries waiting.
    pub fn is_saturated(&self) -> bool {
        self.hub.saturated()
    }

    /// The counters of `topic`, if it exists.
    pub fn topic_stats(&self, topic: &str) -> Option<TopicStats> {
        self.hub.stats(topic)
    }
}

/// Publishes to one topic; see [`Publisher::topic`].
#[derive(Debug, Clone)]
pub struct TopicPublisher {
    topic: Arc<Topic>,
    hub: Arc<Hub>,
}

impl TopicPublisher {
    /// As [`Publisher::publish`], to this handle's topic.
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    pub fn publish(&self, payload: Payload) -> Result<PublishReceipt, PublishError> {
        self.hub.publish_wait(&self.topic, payload)
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.topic.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{pubsub::bus::ShardMsg, types::publish::DeliveryFormat};
    use ringcast_protocol::envelope::Encoding;

    fn hub(max_pending: usize, history: usize) -> (Hub, crate::pubsub::bus::Inbox) {
        let (mailbox, inbox) = crate::pubsub::bus::channel();
        let config = PubSubConfig {
            max_pending_per_shard: max_pending,
            history_max_messages: history,
            ..PubSubConfig::default()
        };
        (Hub::new(&config, vec![mailbox]), inbox)
    }

    fn ready(start: AttachStart) -> Attach {
        match start {
            AttachStart::Ready(attach) => attach,
            AttachStart::Pending => panic!("the in-memory backend answers at once"),
        }
    }

    #[test]
    fn a_shard_that_falls_behind_saturates_then_refuses_publishes() {
        let (hub, inbox) = hub(4, 16);
        let topic = hub.topic("t").unwrap();
        hub.attach(&topic, 0, true, None, None, 0);
        let mut saturated = Vec::new();
        for _ in 0..8 {
            saturated.push(
                hub.publish_wait(&topic, Payload::Json("1".into()))
                    .unwrap()
                    .saturated,
            );
        }
        assert_eq!(
            saturated,
            [false, false, false, false, true, true, true, true]
        );
        assert_eq!(
            hub.publish_wait(&topic, Payload::Json("1".into())),
            Err(PublishError::Saturated)
        );
        // Nothing was sequenced for the refused publish.
        let mut seqs = Vec::new();
        while let Some(ShardMsg::Deliver(m)) = inbox.try_recv() {
            seqs.push(m.seq);
        }
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
        hub.taken(0, 8);
        assert_eq!(
            hub.publish_wait(&topic, Payload::Json("1".into()))
                .unwrap()
                .seq,
            9
        );
    }

    #[test]
    fn history_is_bounded_by_count_and_bytes_and_replays_after_since() {
        let (hub, _inbox) = hub(1 << 20, 5);
        let topic = hub.topic("t").unwrap();
        for _ in 0..9 {
            hub.publish_wait(&topic, Payload::Binary(vec![0; 10].into()))
                .unwrap();
        }
        let a = ready(hub.attach(&topic, 0, true, Some(6), None, 0));
        assert_eq!(a.live_from, 10);
        assert_eq!(a.reset, None);
        assert_eq!(
            a.replay.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [7, 8, 9]
        );
        let b = ready(hub.attach(&topic, 0, false, Some(1), None, 0));
        assert_eq!(b.reset, Some(5), "history holds 5..=9");
        assert_eq!(b.replayed, 5);
        assert!(hub.topic("bad topic").is_err());
    }

    #[test]
    fn since_in_another_epoch_resets_to_the_oldest_held_and_replays_it_all() {
        let (hub, _inbox) = hub(1 << 20, 5);
        let topic = hub.topic("t").unwrap();
        let epoch = topic.epoch.load(Relaxed);
        assert_ne!(epoch, 0);
        for _ in 0..9 {
            let receipt = hub.publish_wait(&topic, Payload::Json("1".into())).unwrap();
            assert_eq!(receipt.epoch, epoch);
        }
        // The same epoch: an ordinary resume.
        let same = ready(hub.attach(&topic, 0, true, Some(7), Some(epoch), 0));
        assert_eq!((same.reset, same.replayed, same.epoch), (None, 2, epoch));
        // Another epoch: seq 7 of some other numbering. Everything held (5..=9) is new.
        let other = ready(hub.attach(&topic, 0, false, Some(7), Some(epoch ^ 1), 0));
        assert_eq!(other.reset, Some(5));
        assert_eq!(
            other.replay.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [5, 6, 7, 8, 9]
        );
        // A topic made again (another hub, as after a restart) has another epoch.
        let (again, _inbox) = self::hub(16, 4);
        assert_ne!(again.topic("t").unwrap().epoch.load(Relaxed), epoch);
    }

    #[test]
    fn a_stopped_hub_refuses_publishes() {
        let (hub, _inbox) = hub(16, 4);
        let topic = hub.topic("t").unwrap();
        assert!(hub.publish_wait(&topic, Payload::Json("1".into())).is_ok());
        hub.stop();
        assert_eq!(
            hub.publish_wait(&topic, Payload::Json("1".into())),
            Err(PublishError::Stopped)
        );
    }

    #[test]
    fn frames_are_made_once_per_format_and_shared() {
        let (hub, _inbox) = hub(16, 4);
        let topic = hub.topic("t").unwrap();
        hub.publish_wait(&topic, Payload::Text("hi".into()))
            .unwrap();
        let st = topic.state.lock().unwrap();
        let msg = st.history.back().unwrap();
        let raw = msg.frame(DeliveryFormat::Raw).clone();
        assert_eq!(&raw[..], b"\x81\x02hi");
        assert_eq!(raw.as_ptr(), msg.frame(DeliveryFormat::Raw).as_ptr());
        let json = msg.frame(DeliveryFormat::Envelope(Encoding::Json));
        assert!(json.ends_with(br#""data":"hi"}"#), "{json:?}");
    }
}
