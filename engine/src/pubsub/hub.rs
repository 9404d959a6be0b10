//! Topics across shards: sequence numbers, history, and the hand-off of each published message
//! to the shards that have subscribers for it.
//!
//! Owns the process-wide topic registry (the in-memory broker backend), [`Publisher`], and
//! [`Published`], a message framed at most once per delivery format and shared by every
//! subscriber on every shard. A topic's sequence number is assigned, its history appended and
//! its message handed to each interested shard's inbox under the topic's lock, so every shard
//! receives a topic's messages in sequence order however many threads publish. Delivery to
//! connections is the shard's business (`conn/topics.rs`).
//!
//! The registry is bounded: at most `pubsub.max_topics` topics, and a topic with no
//! subscriber on any shard and no publish for `pubsub.topic_idle_timeout` is removed (its
//! history with it) by [`Hub::sweep`], which the `ringcast-topics` thread runs. A removed
//! topic is marked under its lock, so whoever still holds its `Arc` (a shard about to attach,
//! a [`TopicPublisher`]) looks the name up again instead of using a topic nobody can reach;
//! made again, the topic has a new epoch, so a resume from the old numbering is a `reset`.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex, RwLock,
    },
    thread,
    time::{Duration, Instant},
};

use ringcast_protocol::envelope::{self};

use crate::pubsub::{
    bus::Fanout,
    topic::{Attach, AttachStart, Publish, Published, Replay, ReplyTo, Topic, TopicState},
};
use crate::types::publish::{Payload, PublishError, PublishReceipt, TopicStats, SATURATED_RETRY};
use crate::{
    config::PubSubConfig, ops::metrics::TopicTotals, pubsub::bus::Mailbox, types::clock::When,
};

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
    max_topics: usize,
    /// `pubsub.topic_idle_timeout`; `None` when topics never expire.
    idle_timeout: Option<Duration>,
    /// Topics with no interest, each with when to look at it again: [`Hub::sweep`] removes
    /// those idle for `idle_timeout`. A topic is in it at most once (`TopicState::queued`).
    expiry: Mutex<VecDeque<(Instant, Arc<Topic>)>>,
    /// Topics in the registry (its length, readable without its lock).
    count: AtomicUsize,
    /// New topics refused at `max_topics`.
    refused: AtomicU64,
    /// Topics removed after `idle_timeout`.
    expired: AtomicU64,
    /// Messages held in every topic's history, and their payload bytes.
    held_messages: AtomicU64,
    held_bytes: AtomicU64,
}

/// Due topics one [`Hub::sweep`] looks at, at most: one registry write lock each batch, kept
/// short, since a shard making a topic waits for it.
const SWEEP_BATCH: usize = 64;

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
            max_topics: config.max_topics,
            idle_timeout: (!config.topic_idle_timeout.is_zero())
                .then_some(config.topic_idle_timeout),
            expiry: Mutex::new(VecDeque::new()),
            count: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            held_messages: AtomicU64::new(0),
            held_bytes: AtomicU64::new(0),
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
    ///
    /// # Errors
    /// [`PublishError::BadTopic`] for a name that breaks the rules;
    /// [`PublishError::TooManyTopics`] for a new one while the registry holds `max_topics`
    /// (after expiring what is due).
    pub(crate) fn topic(&self, name: &str) -> Result<Arc<Topic>, PublishError> {
        if let Some(t) = self.existing(name) {
            return Ok(t);
        }
        envelope::validate_topic(name).map_err(PublishError::BadTopic)?;
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = topics.get(name) {
            return Ok(t.clone());
        }
        if topics.len() >= self.max_topics {
            // Whatever is due to expire goes first.
            drop(topics);
            self.sweep(Instant::now());
            topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = topics.get(name) {
                return Ok(t.clone());
            }
            if topics.len() >= self.max_topics {
                self.refused.fetch_add(1, Relaxed);
                return Err(PublishError::TooManyTopics);
            }
        }
        let topic = Arc::new(Topic::new(Arc::from(name)));
        topics.insert(topic.name.clone(), topic.clone());
        self.count.store(topics.len(), Relaxed);
        drop(topics);
        // No interest yet: it expires unless someone subscribes or publishes.
        let mut st = topic.state.lock().unwrap_or_else(|e| e.into_inner());
        self.watch(&topic, &mut st);
        drop(st);
        Ok(topic)
    }

    /// Puts a topic that has no interest in the expiry queue, unless it is there already.
    /// Lock order: registry, then a topic's state, then the queue.
    fn watch(&self, topic: &Arc<Topic>, st: &mut TopicState) {
        let Some(timeout) = self.idle_timeout else {
            return;
        };
        if st.queued || st.removed {
            return;
        }
        st.queued = true;
        self.expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((st.last_active + timeout, topic.clone()));
    }

    /// Removes the topics whose expiry is due at `now`: no interest on any shard and no
    /// publish for `idle_timeout`. Looks at up to [`SWEEP_BATCH`] queued topics; returns how
    /// many it looked at (less than the batch: nothing more is due).
    pub(crate) fn sweep(&self, now: Instant) -> usize {
        let Some(timeout) = self.idle_timeout else {
            return 0;
        };
        let due: Vec<Arc<Topic>> = {
            let mut queue = self.expiry.lock().unwrap_or_else(|e| e.into_inner());
            let mut due = Vec::new();
            while due.len() < SWEEP_BATCH && queue.front().is_some_and(|(at, _)| *at <= now) {
                due.extend(queue.pop_front().map(|(_, t)| t));
            }
            due
        };
        if due.is_empty() {
            return 0;
        }
        let looked = due.len();
        let mut again = Vec::new();
        // Freed after the locks: a history's messages hold their topic, and the last
        // reference to a large payload may be here.
        let mut gone = Vec::new();
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        for topic in due {
            let mut st = topic.state.lock().unwrap_or_else(|e| e.into_inner());
            st.queued = false;
            if st.removed || !st.interest.is_empty() {
                continue; // the last subscriber to leave queues it again
            }
            let until = st.last_active + timeout;
            if until > now {
                st.queued = true;
                again.push((until, topic.clone()));
                continue;
            }
            st.removed = true;
            self.held_messages
                .fetch_sub(st.history.len() as u64, Relaxed);
            self.held_bytes.fetch_sub(st.history_bytes as u64, Relaxed);
            st.history_bytes = 0;
            gone.push((std::mem::take(&mut st.history), st.snapshot.take()));
            drop(st);
            if topics
                .get(&*topic.name)
                .is_some_and(|t| Arc::ptr_eq(t, &topic))
            {
                topics.remove(&*topic.name);
            }
            self.expired.fetch_add(1, Relaxed);
        }
        self.count.store(topics.len(), Relaxed);
        drop(topics);
        self.expiry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(again);
        drop(gone);
        looked
    }

    /// Starts the `ringcast-topics` thread, which expires idle topics every quarter of
    /// `topic_idle_timeout` (at most every second), until `stop` is dropped or sent to.
    /// `None` when topics never expire.
    pub(crate) fn spawn_sweeper(
        hub: Arc<Hub>,
        stop: crossbeam_channel::Receiver<()>,
    ) -> std::io::Result<Option<thread::JoinHandle<()>>> {
        let Some(timeout) = hub.idle_timeout else {
            return Ok(None);
        };
        let interval = (timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        thread::Builder::new()
            .name("ringcast-topics".into())
            .spawn(move || loop {
                // Batch by batch, each under the registry's write lock once, so a shard
                // making a topic waits for one batch at most.
                while hub.sweep(Instant::now()) == SWEEP_BATCH {
                    thread::yield_now();
                }
                match stop.recv_timeout(interval) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                }
            })
            .map(Some)
    }

    /// What the registry holds and has refused or removed.
    pub(crate) fn counts(&self) -> TopicTotals {
        TopicTotals {
            topics: self.count.load(Relaxed) as u64,
            refused: self.refused.load(Relaxed),
            expired: self.expired.load(Relaxed),
            history_messages: self.held_messages.load(Relaxed),
            history_bytes: self.held_bytes.load(Relaxed),
        }
    }

    /// Runs `f` on `topic`'s state under its lock, or, if the topic expired meanwhile, on the
    /// topic now registered under its name (made again). Returns that other topic, if it
    /// came to that, with `f`'s answer.
    fn locked<R>(
        &self,
        topic: &Arc<Topic>,
        mut f: impl FnMut(&Arc<Topic>, &mut TopicState) -> R,
    ) -> Result<(Option<Arc<Topic>>, R), PublishError> {
        let mut fresh: Option<Arc<Topic>> = None;
        loop {
            let current = fresh.as_ref().unwrap_or(topic);
            let mut st = current.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.removed {
                drop(st);
                let again = self.topic(&current.name)?;
                fresh = Some(again);
                continue;
            }
            let answer = f(current, &mut st);
            drop(st);
            return Ok((fresh, answer));
        }
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
    ///
    /// `local`: the publishing shard and where to put its own share. The in-memory backend
    /// puts the message there instead of in that shard's inbox when nothing is waiting in the
    /// inbox (so delivering it at once keeps the topic's order); the shard delivers it in the
    /// same loop turn.
    pub(crate) fn publish(
        &self,
        topic: &Arc<Topic>,
        payload: Payload,
        reply: ReplyTo,
        local: Option<(u16, &mut Option<Arc<Published>>)>,
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
                .publish_memory(
                    topic,
                    payload,
                    *history_max_messages,
                    *history_max_bytes,
                    local,
                )
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
                let now = Instant::now();
                let (fresh, ()) = self.locked(topic, |_, st| st.last_active = now)?;
                bridge.publish(fresh.unwrap_or_else(|| topic.clone()), payload, reply)?;
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
            return match self.publish(topic, payload, ReplyTo::Nobody, None)? {
                Publish::Done(receipt) => Ok(receipt),
                Publish::Pending { .. } => unreachable!("the in-memory backend never defers"),
            };
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.publish(topic, payload, ReplyTo::Thread(tx), None)?;
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
        mut local: Option<(u16, &mut Option<Arc<Published>>)>,
    ) -> Result<PublishReceipt, PublishError> {
        let mut payload = Some(payload);
        let mut stale = None;
        let (_, receipt) = self.locked(topic, |topic, st| {
            let mut saturated = false;
            for &shard in &st.interest {
                let pending = self.fanout.pending[usize::from(shard)].load(Relaxed);
                if pending >= self.max_pending.saturating_mul(2) {
                    return Err(PublishError::Saturated);
                }
                saturated |= pending >= self.max_pending;
            }
            let payload = payload.take().expect("one topic takes the publish");
            let seq = st.next_seq;
            st.next_seq += 1;
            let len = payload.len();
            let now = Instant::now();
            st.last_active = now;
            let msg = Arc::new(Published {
                topic: topic.clone(),
                seq,
                payload,
                at: When::from_instant(now),
                frames: Default::default(),
                deflated: Default::default(),
            });
            if history_max_messages > 0 {
                // Replays made from here on see the new message; the old slice is freed
                // outside the lock.
                stale = st.snapshot.take();
                st.history.push_back(msg.clone());
                st.history_bytes += len;
                let (mut messages, mut bytes) = (1, len);
                while st.history.len() > history_max_messages
                    || (st.history_bytes > history_max_bytes && st.history.len() > 1)
                {
                    if let Some(old) = st.history.pop_front() {
                        st.history_bytes -= old.payload.len();
                        messages -= 1;
                        bytes = bytes.wrapping_sub(old.payload.len());
                    }
                }
                // Net change, as wrapping adds: the totals never go below what is held.
                self.held_messages
                    .fetch_add((messages as i64) as u64, Relaxed);
                self.held_bytes.fetch_add(bytes as u64, Relaxed);
            }
            for &shard in &st.interest {
                match &mut local {
                    // Nothing waits in its inbox: no message of this topic can be ahead.
                    Some((own, slot))
                        if *own == shard
                            && self.fanout.pending[usize::from(shard)].load(Relaxed) == 0 =>
                    {
                        **slot = Some(msg.clone());
                    }
                    _ => self.fanout.hand_off(usize::from(shard), &msg),
                }
            }
            Ok(PublishReceipt {
                seq,
                saturated,
                epoch: topic.epoch.load(Relaxed),
            })
        })?;
        drop(stale);
        receipt
    }

    /// Registers a new subscriber on `shard` (the shard's first for this topic when `first`),
    /// and works out what it must be replayed: at once, or later in a
    /// `ShardMsg::Backend(BackendMsg::Attached)` carrying `token`.
    ///
    /// `epoch`, with `since`, is the numbering `since` counts in: when it is not the topic's,
    /// the subscriber is reset to the oldest message held and replayed from there.
    ///
    /// When `topic` expired meanwhile, the subscriber is attached to the topic registered
    /// under its name now, which is returned: the caller keeps that one.
    ///
    /// # Errors
    /// [`PublishError::TooManyTopics`]: the topic expired and cannot be made again now.
    pub(crate) fn attach(
        &self,
        topic: &Arc<Topic>,
        shard: u16,
        first: bool,
        since: Option<u64>,
        epoch: Option<u64>,
        token: u64,
    ) -> Result<(Option<Arc<Topic>>, AttachStart), PublishError> {
        let memory = matches!(self.backend, Backend::Memory { .. });
        let (fresh, attach) = self.locked(topic, |topic, st| {
            if first && !st.interest.contains(&shard) {
                st.interest.push(shard);
            }
            memory.then(|| Self::attach_memory(topic, st, since, epoch))
        })?;
        match (&self.backend, attach) {
            (_, Some(attach)) => Ok((fresh, AttachStart::Ready(attach))),
            (Backend::Redis(bridge), None) => {
                let topic = fresh.clone().unwrap_or_else(|| topic.clone());
                bridge.attach(topic, shard, first, since, epoch, token);
                Ok((fresh, AttachStart::Pending))
            }
            (Backend::Memory { .. }, None) => unreachable!("the in-memory backend answers at once"),
        }
    }

    /// The epoch a Redis-backed topic reports before the bridge has answered its attach.
    pub(crate) fn known_epoch(&self, topic: &Topic) -> u64 {
        match self.bridge() {
            Some(bridge) => bridge.epoch(),
            None => topic.epoch.load(Relaxed),
        }
    }

    /// The in-memory attach, under the topic's lock: where live messages start and what to
    /// replay, as a shared slice of the history (one reference count per subscriber).
    fn attach_memory(
        topic: &Topic,
        st: &mut TopicState,
        since: Option<u64>,
        epoch: Option<u64>,
    ) -> Attach {
        let live_from = st.next_seq;
        let current = topic.epoch.load(Relaxed);
        let mut attach = Attach {
            live_from,
            replay: Replay::default(),
            replayed: 0,
            reset: None,
            epoch: current,
        };
        let Some(since) = since else {
            return attach;
        };
        let oldest = st.history.front().map_or(live_from, |m| m.seq);
        let from = if epoch.is_some_and(|e| e != current) {
            // `since` counts in another numbering: it says nothing about this one. Everything
            // held is new to the client.
            attach.reset = Some(oldest);
            0
        } else if since >= live_from {
            // The client has seen messages this history never had (another process, a
            // restart): tell it where this history stands.
            attach.reset = Some(live_from);
            return attach;
        } else {
            if since + 1 < oldest {
                attach.reset = Some(oldest);
            }
            // Seqs in history are consecutive: `since + 1` is at this index.
            usize::try_from((since + 1).saturating_sub(oldest)).unwrap_or(usize::MAX)
        };
        if from >= st.history.len() {
            return attach;
        }
        let all = st
            .snapshot
            .get_or_insert_with(|| st.history.iter().cloned().collect())
            .clone();
        attach.replay = Replay::new(all, from);
        attach.replayed = attach.replay.len();
        attach
    }

    /// The shard's last subscriber to `topic` left. The topic's last interested shard
    /// leaving starts its idle time.
    pub(crate) fn detach(&self, topic: &Arc<Topic>, shard: u16) {
        {
            let mut st = topic.state.lock().unwrap_or_else(|e| e.into_inner());
            st.interest.retain(|&s| s != shard);
            if st.interest.is_empty() {
                st.last_active = Instant::now();
                self.watch(topic, &mut st);
            }
        }
        if let Backend::Redis(bridge) = &self.backend {
            bridge.detach(topic.clone(), shard);
        }
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
    /// deeper than `pubsub.max_json_depth` ([`PublishError::TooDeep`]), a saturated engine
    /// ([`PublishError::Saturated`]: nothing was published, retry later), or a new topic
    /// while the process holds `pubsub.max_topics` ([`PublishError::TooManyTopics`]).
    pub fn publish(&self, topic: &str, payload: Payload) -> Result<PublishReceipt, PublishError> {
        let topic = self.hub.topic(topic)?;
        self.hub.publish_wait(&topic, payload)
    }

    /// A handle to one topic, which publishes without looking the name up each time. If the
    /// topic expires (`pubsub.topic_idle_timeout`: no subscriber and no publish for that
    /// long), the handle publishes to the topic made again under its name, in a new epoch.
    ///
    /// # Errors
    /// [`PublishError::BadTopic`] for a name that breaks the topic rules;
    /// [`PublishError::TooManyTopics`] for a new topic at `pubsub.max_topics`.
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

    fn ready(start: Result<(Option<Arc<Topic>>, AttachStart), PublishError>) -> Attach {
        match start.expect("attached").1 {
            AttachStart::Ready(attach) => attach,
            AttachStart::Pending => panic!("the in-memory backend answers at once"),
        }
    }

    #[test]
    fn a_shard_that_falls_behind_saturates_then_refuses_publishes() {
        let (hub, inbox) = hub(4, 16);
        let topic = hub.topic("t").unwrap();
        hub.attach(&topic, 0, true, None, None, 0).unwrap();
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
            a.replay
                .messages()
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>(),
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
            other
                .replay
                .messages()
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>(),
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

    fn bounded(max_topics: usize, idle: Duration) -> Hub {
        let (mailbox, _inbox) = crate::pubsub::bus::channel();
        let config = PubSubConfig {
            max_topics,
            topic_idle_timeout: idle,
            ..PubSubConfig::default()
        };
        Hub::new(&config, vec![mailbox])
    }

    #[test]
    fn replays_share_one_slice_of_history_until_it_changes() {
        let (hub, _inbox) = hub(1 << 20, 16);
        let topic = hub.topic("t").unwrap();
        for _ in 0..5 {
            hub.publish_wait(&topic, Payload::Json("1".into())).unwrap();
        }
        let a = ready(hub.attach(&topic, 0, true, Some(0), None, 0));
        let b = ready(hub.attach(&topic, 0, false, Some(3), None, 0));
        assert_eq!((a.replayed, b.replayed), (5, 2));
        // The same messages, not copies: b's slice is a's from seq 4 on.
        assert!(std::ptr::eq(
            &a.replay.messages()[3],
            &b.replay.messages()[0]
        ));
        // Up to date: nothing to replay, no slice made.
        let c = ready(hub.attach(&topic, 0, false, Some(5), None, 0));
        assert_eq!(c.replayed, 0);
        hub.publish_wait(&topic, Payload::Json("1".into())).unwrap();
        let d = ready(hub.attach(&topic, 0, false, Some(0), None, 0));
        assert_eq!(d.replayed, 6, "a publish makes a new slice");
        assert!(!std::ptr::eq(
            &a.replay.messages()[0],
            &d.replay.messages()[0]
        ));
        assert!(Arc::ptr_eq(
            &a.replay.messages()[0],
            &d.replay.messages()[0]
        ));
    }

    #[test]
    fn new_topics_are_refused_at_the_cap_and_counted() {
        let hub = bounded(3, Duration::ZERO);
        for name in ["a", "b", "c"] {
            hub.topic(name).unwrap();
        }
        assert_eq!(hub.topic("d").unwrap_err(), PublishError::TooManyTopics);
        assert!(hub.topic("a").is_ok(), "existing topics still work");
        let counts = hub.counts();
        assert_eq!((counts.topics, counts.refused, counts.expired), (3, 1, 0));
        assert_eq!(
            hub.sweep(Instant::now() + Duration::from_secs(3600)),
            0,
            "no expiry"
        );
    }

    #[test]
    fn idle_topics_expire_with_their_history_and_come_back_in_a_new_epoch() {
        let idle = Duration::from_secs(60);
        let hub = bounded(2, idle);
        let kept = hub.topic("kept").unwrap();
        let idle_topic = hub.topic("idle").unwrap();
        let epoch = idle_topic.epoch.load(Relaxed);
        for _ in 0..3 {
            hub.publish_wait(&idle_topic, Payload::Binary(vec![0; 10].into()))
                .unwrap();
        }
        assert_eq!(hub.counts().history_messages, 3);
        assert_eq!(hub.counts().history_bytes, 30);
        hub.attach(&kept, 0, true, None, None, 0).unwrap();
        let now = Instant::now();
        assert_eq!(hub.sweep(now), 0, "nothing due yet");
        assert_eq!(hub.topic("third").unwrap_err(), PublishError::TooManyTopics);
        // Past the idle time: the topic with a subscriber stays, the other goes.
        let later = now + idle + Duration::from_secs(1);
        assert_eq!(hub.sweep(later), 2);
        let counts = hub.counts();
        assert_eq!((counts.topics, counts.expired), (1, 1));
        assert_eq!((counts.history_messages, counts.history_bytes), (0, 0));
        assert!(hub.stats("idle").is_none());
        assert!(idle_topic.state.lock().unwrap().history.is_empty());
        // A publish through the old handle goes to the topic made again, in a new epoch.
        let receipt = hub
            .publish_wait(&idle_topic, Payload::Json("1".into()))
            .unwrap();
        assert_eq!(receipt.seq, 1);
        assert_ne!(receipt.epoch, epoch);
        assert_eq!(hub.stats("idle").unwrap().epoch, receipt.epoch);
        // A resume from the old numbering is a reset, never a continuation.
        let again = hub.topic("idle").unwrap();
        assert!(!Arc::ptr_eq(&again, &idle_topic));
        let a = ready(hub.attach(&idle_topic, 0, true, Some(3), Some(epoch), 0));
        assert_eq!((a.reset, a.replayed, a.epoch), (Some(1), 1, receipt.epoch));
        // The last subscriber leaving starts the idle time again.
        hub.detach(&kept, 0);
        assert_eq!(hub.sweep(Instant::now() + idle / 2), 0);
        assert!(hub.stats("kept").is_some());
        hub.sweep(Instant::now() + idle * 3);
        assert!(hub.stats("kept").is_none());
        assert!(hub.stats("idle").is_some(), "it has a subscriber");
        assert_eq!(hub.counts().topics, 1);
    }
}
