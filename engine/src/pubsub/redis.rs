//! The Redis broker backend: one bridge thread between the shards and Redis.
//!
//! Owns the bridge thread (a current-thread tokio runtime running the `redis` crate's async
//! client), the Lua scripts that sequence and keep history in Redis, this host's Redis
//! subscriptions (one channel per topic with a local subscriber, followed up and down), the
//! reconnect loop, and the bridge's state and counters. Shards hand it commands over a
//! crossbeam channel and get results back in their inboxes; it must never make a shard wait.
//!
//! Order and resume. A publish runs one script: INCR the topic's counter, XADD the message to
//! the topic's capped history stream (ID `seq-ms`, trimmed by count and age) and PUBLISH it,
//! atomically, so every host sees one seq per message. The bridge forwards a topic's
//! messages to its shards in seq order: it tracks the last seq it forwarded, drops repeats,
//! and fills a hole (a lost connection, a late subscription) from the history stream before
//! going on, announcing as dropped what history no longer holds. A shard's new subscriber is
//! attached by the bridge itself: after the channel's SUBSCRIBE is confirmed, it reads the
//! counter (messages above it are certain to arrive on the channel), replays `since + 1` up
//! to the last forwarded seq from history, and tells the shard to take live messages from
//! the next one. Both travel down the same inbox as the live messages, so the shard's
//! `live_from` check keeps the no-gap, no-duplicate guarantee of the in-memory backend.
//!
//! Batches and lanes (issue 15: one client toggling subscriptions stalled every host's
//! pub/sub). Subscriber changes gather while a batch of them is with Redis and are folded in
//! order: an attach whose shard detached later is dropped, and a topic attached and detached
//! within one batch costs Redis nothing. What is left goes as one SUBSCRIBE or UNSUBSCRIBE per
//! channel, pipelined, then one pipeline of history reads, one per topic, shared by its
//! attaches. The bridge loop never waits for a batch: channel messages of other topics keep
//! flowing, and those of a topic in the batch wait for its answers. Publishes have their own
//! connection and pipeline, so neither the loop nor Redis's per-connection order puts them
//! behind another client's attaches; a publish waits only for an attach to its own topic
//! that came before it, so a client that subscribes and then publishes sees its message.
//!
//! Epochs. `{prefix}epoch` holds a random nonzero u64 (decimal) naming the current numbering:
//! after Redis loses its data the key is gone, and the next publish script makes a new one,
//! atomically with the first seq of the new numbering. Every published message carries the
//! epoch (`e<epoch>:seq:ms:kind:payload`), and the publish and read scripts return it, so the
//! bridge notices a new epoch on whichever path sees it first (a publish's answer, a channel
//! message, a history read, a reconnect), retires the old one (late messages of it are
//! stale), and resets every local topic to seq 1 of the new epoch: subscribers get a `reset`
//! before the first message of the new numbering, and the hole-filling path replays that
//! numbering from history.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use futures_util::{
    future::{join_all, LocalBoxFuture},
    stream::FuturesUnordered,
    StreamExt,
};
use redis::{aio::MultiplexedConnection, AsyncConnectionConfig, RedisError, Value};
use ringcast_protocol::{
    envelope::{self},
    Utf8Bytes,
};
use tokio::sync::Notify;

use crate::types::publish::BrokerStats;
use crate::{
    config::BrokerConfig,
    pubsub::{
        bus::{Fanout, ShardMsg},
        topic::{new_epoch, BackendMsg, Published, ReplyTo, Topic},
    },
    types::{
        clock::When,
        publish::{Payload, PublishError, PublishReceipt},
    },
};

/// Deletes history entries older than the cutoff (ms), oldest first, at most 100 per call.
const TRIM: &str = r"
local function trim(key, cutoff)
  for _ = 1, 100 do
    local first = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)[1]
    if not first then return end
    local id = first[1]
    local ms = tonumber(string.sub(id, string.find(id, '-', 1, true) + 1))
    if ms >= cutoff then return end
    redis.call('XDEL', key, id)
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// KEYS: counter, history, epoch. ARGV: channel, kind, payload, max messages, max age (ms),
/// a fresh epoch (used when the epoch key is gone: Redis lost its data). Returns
/// {epoch, seq}. The message text is `e<epoch>:seq:ms:kind:payload`.
const PUBLISH: &str = r"
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[6]
  redis.call('SET', KEYS[3], epoch)
end
local seq = redis.call('INCR', KEYS[1])
local msg = 'e' .. epoch .. ':' .. seq .. ':' .. now .. ':' .. ARGV[2] .. ':' .. ARGV[3]
local max = tonumber(ARGV[4])
if max > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', max, seq .. '-' .. now, 'm', msg)
  trim(KEYS[2], now - tonumber(ARGV[5]))
end
redis.call('PUBLISH', ARGV[1], msg)
return {epoch, seq}
";

/// KEYS: counter, history, epoch. ARGV: from seq (0: none), to seq (0: the newest), max age
/// (ms). Returns {counter, oldest seq held (0: none), epoch ('': none), messages from..to}.
const READ: &str = r"
trim(KEYS[2], now - tonumber(ARGV[3]))
local out = {tonumber(redis.call('GET', KEYS[1]) or '0'), 0, redis.call('GET', KEYS[3]) or ''}
local first = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if first then
  out[2] = tonumber(string.sub(first[1], 1, string.find(first[1], '-', 1, true) - 1))
end
if ARGV[1] ~= '0' then
  local to = ARGV[2]
  if to == '0' then to = '+' end
  for _, e in ipairs(redis.call('XRANGE', KEYS[2], ARGV[1], to)) do
    out[#out + 1] = e[2][2]
  end
end
return out
";

/// The bridge's state and counters, read by any thread.
#[derive(Debug, Default)]
struct Shared {
    up: AtomicBool,
    stopped: AtomicBool,
    reconnects: AtomicU64,
    errors: AtomicU64,
    publishes: AtomicU64,
    publish_errors: AtomicU64,
    messages_in: AtomicU64,
    repaired: AtomicU64,
    lost: AtomicU64,
    resets: AtomicU64,
    /// The current epoch (0 before the first connection).
    epoch: AtomicU64,
    lag_ms: AtomicU64,
    /// While Redis is away: when the bridge next tries to connect, as [`When`] nanoseconds;
    /// 0 while it tries or is connected.
    retry_at: AtomicU64,
}

impl Shared {
    /// The retry hint for a publish refused as unavailable: the time until the bridge next
    /// tries to connect, else (connected, or that time has passed) `fallback`; at least 1 ms.
    fn retry_hint(&self, fallback: Duration) -> Duration {
        let at = self.retry_at.load(Relaxed);
        let now = When::from_instant(Instant::now()).as_nanos();
        let wait = if at > now {
            Duration::from_nanos(at - now)
        } else {
            fallback
        };
        wait.max(Duration::from_millis(1))
    }

    /// Notes when the bridge next tries to connect.
    fn retry_in(&self, wait: Duration) {
        let at = When::from_instant(Instant::now() + wait).as_nanos();
        self.retry_at.store(at, Relaxed);
    }
}

/// What a shard or thread asks of the bridge.
#[derive(Debug)]
enum Cmd {
    Publish {
        topic: Arc<Topic>,
        payload: Payload,
        reply: ReplyTo,
    },
    Attach(AttachReq),
    Detach {
        topic: Arc<Topic>,
        shard: u16,
    },
    Stop,
}

#[derive(Debug)]
struct AttachReq {
    topic: Arc<Topic>,
    shard: u16,
    first: bool,
    since: Option<u64>,
    epoch: Option<u64>,
    token: u64,
}

/// The shards' handle on the bridge thread.
#[derive(Debug)]
pub(crate) struct Bridge {
    tx: Sender<Cmd>,
    wake: Arc<Notify>,
    shared: Arc<Shared>,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
    reply_wait: Duration,
    reconnect_min_delay: Duration,
}

impl Bridge {
    /// Starts the bridge thread. It connects in the background: [`Bridge::is_up`] turns true
    /// once Redis answers.
    pub(crate) fn start(
        config: &BrokerConfig,
        history_max_messages: usize,
        fanout: Arc<Fanout>,
    ) -> Result<Self, RedisError> {
        let client = redis::Client::open(config.url.as_str())?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(Shared::default());
        let worker = Worker {
            rx,
            wake: wake.clone(),
            shared: shared.clone(),
            fanout,
            client,
            config: config.clone(),
            history_max_messages,
            publish: redis::Script::new(&format!("{TRIM}{PUBLISH}")),
            read: redis::Script::new(&format!("{TRIM}{READ}")),
            topics: HashMap::new(),
            queued: Vec::new(),
            queued_topics: HashSet::new(),
            flights: Vec::new(),
            next_flight: 0,
            held: Vec::new(),
            held_topics: HashSet::new(),
            outgoing: Vec::new(),
            sent: Vec::new(),
            epoch: None,
            retired: Vec::new(),
        };
        let thread = thread::Builder::new()
            .name("ringcast-redis".into())
            .spawn(move || worker.run())
            .map_err(|e| RedisError::from(std::io::Error::other(e)))?;
        Ok(Self {
            tx,
            wake,
            shared,
            thread: Mutex::new(Some(thread)),
            // The bridge answers every publish within a command timeout of taking it; the
            // margin covers the batch ahead of it.
            reply_wait: config.command_timeout * 3,
            reconnect_min_delay: config.reconnect_min_delay,
        })
    }

    fn send(&self, cmd: Cmd) -> Result<(), Cmd> {
        self.tx.send(cmd).map_err(|e| e.into_inner())?;
        self.wake.notify_one();
        Ok(())
    }

    /// Hands a publish to the bridge. Fails at once while Redis is away.
    pub(crate) fn publish(
        &self,
        topic: Arc<Topic>,
        payload: Payload,
        reply: ReplyTo,
    ) -> Result<(), PublishError> {
        if self.shared.stopped.load(Relaxed) {
            return Err(PublishError::Stopped);
        }
        if !self.is_up() {
            self.shared.publish_errors.fetch_add(1, Relaxed);
            return Err(PublishError::Unavailable);
        }
        self.send(Cmd::Publish {
            topic,
            payload,
            reply,
        })
        .map_err(|_| PublishError::Stopped)
    }

    /// Asks for a subscriber's replay; the answer comes as `BackendMsg::Attached`.
    pub(crate) fn attach(
        &self,
        topic: Arc<Topic>,
        shard: u16,
        first: bool,
        since: Option<u64>,
        epoch: Option<u64>,
        token: u64,
    ) {
        let _ = self.send(Cmd::Attach(AttachReq {
            topic,
            shard,
            first,
            since,
            epoch,
            token,
        }));
    }

    /// The epoch of Redis's numbering as the bridge last saw it (0: not connected yet).
    pub(crate) fn epoch(&self) -> u64 {
        self.shared.epoch.load(Relaxed)
    }

    /// The shard's last subscriber to `topic` left.
    pub(crate) fn detach(&self, topic: Arc<Topic>, shard: u16) {
        let _ = self.send(Cmd::Detach { topic, shard });
    }

    /// Connected, with every local topic subscribed.
    pub(crate) fn is_up(&self) -> bool {
        self.shared.up.load(Relaxed)
    }

    /// How long a publisher refused as unavailable should wait: until the bridge next tries
    /// to connect, or `broker.reconnect_min_delay` while it is trying (at least 1 ms).
    pub(crate) fn retry_hint(&self) -> Duration {
        self.shared.retry_hint(self.reconnect_min_delay)
    }

    /// How long a thread waits for a publish's outcome.
    pub(crate) fn reply_wait(&self) -> Duration {
        self.reply_wait
    }

    pub(crate) fn stats(&self) -> BrokerStats {
        let s = &self.shared;
        BrokerStats {
            up: s.up.load(Relaxed),
            reconnects: s.reconnects.load(Relaxed),
            errors: s.errors.load(Relaxed),
            publishes: s.publishes.load(Relaxed),
            publish_errors: s.publish_errors.load(Relaxed),
            messages_in: s.messages_in.load(Relaxed),
            repaired: s.repaired.load(Relaxed),
            lost: s.lost.load(Relaxed),
            resets: s.resets.load(Relaxed),
            epoch: s.epoch.load(Relaxed),
            lag_ms: s.lag_ms.load(Relaxed),
        }
    }

    /// Stops the bridge thread and waits for it (at most about one command timeout).
    pub(crate) fn stop(&self) {
        self.shared.stopped.store(true, Relaxed);
        let _ = self.send(Cmd::Stop);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One topic this host has subscribers for.
#[derive(Debug)]
struct Interest {
    topic: Arc<Topic>,
    shards: Vec<u16>,
    /// The last seq forwarded to the shards.
    last: u64,
    /// Its channel is subscribed on the current connection, and `last` is valid.
    subscribed: bool,
    /// `last` is a position in Redis's numbering (false until the first read of its counter
    /// answered): a topic that never was is subscribed afresh on reconnect, not filled from
    /// seq 1.
    synced: bool,
}

/// Why a session with Redis ended.
enum End {
    Stop,
    Lost(RedisError),
}

impl From<RedisError> for End {
    fn from(e: RedisError) -> Self {
        End::Lost(e)
    }
}

/// The connections of one session: commands (attach and hole-filling reads, health pings),
/// publishes (their own lane, so Redis never runs them behind a batch of attach reads), and
/// the subscription.
struct Conn {
    cmd: MultiplexedConnection,
    lane: MultiplexedConnection,
    sink: redis::aio::PubSubSink,
    stream: redis::aio::PubSubStream,
}

/// A publish waiting for Redis.
#[derive(Debug)]
struct Pub {
    topic: Arc<Topic>,
    payload: Payload,
    reply: ReplyTo,
}

/// A subscriber change waiting for the next attach batch, in the order the shards sent them.
#[derive(Debug)]
enum Op {
    Attach(AttachReq),
    Detach { topic: Arc<Topic>, shard: u16 },
}

/// One topic's share of an attach batch in flight: one read, shared by its attaches.
#[derive(Debug)]
struct FlightTopic {
    name: Arc<str>,
    /// Its channel is subscribed by this batch: the read gives its counter too.
    subscribing: bool,
    reqs: Vec<AttachReq>,
}

/// An attach batch in flight: one pipelined (UN)SUBSCRIBE per channel, then one pipeline of
/// history reads. Batches in flight together have no topic in common.
#[derive(Debug)]
struct Flight {
    id: u64,
    /// The epoch when it was made: the `since` checks assumed it.
    epoch: Option<u64>,
    topics: Vec<FlightTopic>,
    /// Its topics: those it reads and those it unsubscribes.
    names: HashSet<Arc<str>>,
    /// Channel messages of its topics that came while it was in flight: forwarded after its
    /// answers, so a new subscriber's `live_from` and replay meet with no gap.
    deferred: Vec<redis::Msg>,
}

/// A topic's attaches left after folding, in order.
type TopicAttaches = (Arc<str>, Vec<AttachReq>);

/// A request to Redis in flight, made of owned values (so the bridge keeps serving while it
/// runs).
type InFlight = LocalBoxFuture<'static, Result<Vec<Value>, RedisError>>;

/// An attach batch's request, answering with the batch's id.
type Batch = LocalBoxFuture<'static, (u64, Result<Vec<Value>, RedisError>)>;

/// Attach batches in flight at once (batches in flight together share no topic). One: with
/// more, a toggling client's changes spread over more batches and coalesce less, and under
/// the issue-15 load the live client's round trips measured worse (p50 35-77 ms with 2 or 8
/// against 13-24 ms with 1, debug build on a loaded 2-core machine).
const MAX_FLIGHTS: usize = 1;

/// Most commands taken off the shards' channel per turn of the bridge loop, so channel
/// messages and answers are served in between.
const MAX_TAKE: usize = 4096;

/// Queued subscriber changes above which a bridge without Redis folds them (a topic attached
/// and detached meanwhile is forgotten), so a toggling client cannot grow the queue.
const FOLD_WHILE_AWAY: usize = 1024;

/// The bridge thread's state.
struct Worker {
    rx: Receiver<Cmd>,
    wake: Arc<Notify>,
    shared: Arc<Shared>,
    fanout: Arc<Fanout>,
    client: redis::Client,
    config: BrokerConfig,
    history_max_messages: usize,
    publish: redis::Script,
    read: redis::Script,
    topics: HashMap<Arc<str>, Interest>,
    /// Subscriber changes for the next attach batch (while Redis is away: for the first one
    /// after it is back).
    queued: Vec<Op>,
    /// The topics with an attach in `queued`.
    queued_topics: HashSet<Arc<str>>,
    /// The attach batches in flight.
    flights: Vec<Flight>,
    next_flight: u64,
    /// Publishes to a topic with an attach queued or in flight, in order: they go once it is
    /// answered, so a client that subscribes and then publishes sees its own message.
    held: Vec<Pub>,
    /// The topics of `held`: a later publish to one waits behind it (one topic's order).
    held_topics: HashSet<Arc<str>>,
    /// Publishes for the next pipeline on the publish lane.
    outgoing: Vec<Pub>,
    /// Where the answers of the publish pipeline in flight go, in order.
    sent: Vec<ReplyTo>,
    /// The epoch this Redis holds under `{prefix}epoch` ([`epoch_of`]): when it changes, Redis
    /// lost its data (a restart without persistence, a FLUSHALL) and every counter started
    /// over.
    epoch: Option<u64>,
    /// Epochs replaced by a newer one: a message still carrying one is stale.
    retired: Vec<u64>,
}

/// What the read script returns.
struct Read {
    counter: u64,
    /// The epoch key's value, if it exists.
    epoch: Option<u64>,
    messages: Vec<(u64, Payload)>,
}

/// What a message or answer's epoch means to the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// The current epoch (or none said).
    Current,
    /// A retired epoch: what carries it predates the current numbering.
    Stale,
    /// A new epoch: Redis lost its data; every local topic was reset to it.
    New,
}

/// The epoch a value of `{prefix}epoch` names: the decimal u64 it holds, or (a value written
/// by an older version, or 0) a hash of it. The same on every host.
fn epoch_of(text: &[u8]) -> u64 {
    match std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse::<u64>().ok())
    {
        Some(n) if (1..=envelope::MAX_EPOCH).contains(&n) => n,
        _ => {
            // FNV-1a, 64 bits.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for &b in text {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
            (h & envelope::MAX_EPOCH).max(1)
        }
    }
}

fn timeout_error() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no answer within broker.command_timeout",
    ))
}

impl Worker {
    fn run(mut self) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "redis bridge: no runtime; the broker stays down");
                return;
            }
        };
        runtime.block_on(self.main());
        // Whatever is still queued gets an answer.
        while let Ok(cmd) = self.rx.try_recv() {
            self.refuse(cmd, PublishError::Stopped);
        }
    }

    async fn main(&mut self) {
        let mut delay = self.config.reconnect_min_delay;
        let mut first = true;
        loop {
            if !first {
                self.shared.reconnects.fetch_add(1, Relaxed);
            }
            first = false;
            // Trying now: refused publishes are told `reconnect_min_delay`.
            self.shared.retry_at.store(0, Relaxed);
            let end = match self.within(self.connect()).await {
                Ok(mut conn) => match self.resume(&mut conn).await {
                    Ok(()) => {
                        delay = self.config.reconnect_min_delay;
                        self.shared.up.store(true, Relaxed);
                        tracing::info!(url = %self.config.url, "redis bridge up");
                        let end = self.session(&mut conn).await;
                        self.shared.up.store(false, Relaxed);
                        end
                    }
                    Err(end) => end,
                },
                Err(e) => End::Lost(e),
            };
            for interest in self.topics.values_mut() {
                interest.subscribed = false;
            }
            match end {
                End::Stop => return,
                End::Lost(e) => {
                    self.shared.errors.fetch_add(1, Relaxed);
                    tracing::warn!(error = %e, retry_in = ?delay, "redis bridge down");
                }
            }
            // Full jitter: a fleet that lost Redis together does not come back together.
            let pause = delay.mul_f64(fastrand::f64());
            delay = (delay * 2).min(self.config.reconnect_max_delay);
            self.shared.retry_in(pause);
            if self.idle(pause).await {
                return;
            }
        }
    }

    /// Runs `fut` within the command timeout.
    async fn within<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        tokio::time::timeout(self.config.command_timeout, fut)
            .await
            .unwrap_or_else(|_| Err(timeout_error()))
    }

    async fn connect(&self) -> Result<Conn, RedisError> {
        let t = self.config.command_timeout;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(t)
            .set_response_timeout(t);
        let mut cmd = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let lane = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let (sink, stream) = self.client.get_async_pubsub().await?.split();
        for code in [PUBLISH, READ] {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(format!("{TRIM}{code}"))
                .query_async::<String>(&mut cmd)
                .await?;
        }
        Ok(Conn {
            cmd,
            lane,
            sink,
            stream,
        })
    }

    /// After connecting: notice lost data, subscribe every local topic again and forward what
    /// was published meanwhile. The attaches that waited go in the session's first batch.
    async fn resume(&mut self, conn: &mut Conn) -> Result<(), End> {
        let key = self.epoch_key();
        let fresh = new_epoch().to_string();
        self.within(
            redis::cmd("SET")
                .arg(&key)
                .arg(&fresh)
                .arg("NX")
                .query_async::<Option<String>>(&mut conn.cmd),
        )
        .await?;
        let epoch: Vec<u8> = self
            .within(redis::cmd("GET").arg(&key).query_async(&mut conn.cmd))
            .await?;
        let epoch = epoch_of(&epoch);
        let lost_data = self.epoch.is_some_and(|e| e != epoch);
        if let Some(old) = self.epoch.replace(epoch) {
            if old != epoch {
                self.retired.push(old);
            }
        }
        self.shared.epoch.store(epoch, Relaxed);
        let names: Vec<Arc<str>> = self.topics.keys().cloned().collect();
        for name in names {
            self.within(conn.sink.subscribe(self.channel(&name)))
                .await?;
            let interest = &self.topics[&name];
            if !interest.synced {
                // Attached before it ever reached Redis (its attach waits in `queued`): no
                // position to resume from, only the counter to start at.
                let read = self.read(&mut conn.cmd, &name, 0, 0).await?;
                let interest = self.topics.get_mut(&name).expect("listed above");
                interest.last = read.counter;
                interest.subscribed = true;
                interest.synced = true;
                interest.topic.seen.store(read.counter, Relaxed);
                continue;
            }
            let last = interest.last;
            let mut read = self.read(&mut conn.cmd, &name, last + 1, 0).await?;
            let started_over = lost_data || read.counter < last;
            if started_over {
                // The new numbering from its start: everything this history still holds.
                read = self.read(&mut conn.cmd, &name, 1, 0).await?;
            }
            let interest = self.topics.get_mut(&name).expect("listed above");
            interest.subscribed = true;
            if started_over {
                // Redis started over: the counter restarted and nothing after `last` can be
                // recovered. Subscribers hear a reset to the oldest held in the new history.
                let next = read.messages.first().map_or(read.counter + 1, |m| m.0);
                tracing::warn!(topic = %name, last, next, "redis lost its data: topic reset");
                interest.last = next - 1;
                interest.topic.epoch.store(epoch, Relaxed);
                interest.topic.seen.store(next - 1, Relaxed);
                self.shared.resets.fetch_add(1, Relaxed);
                for &shard in &interest.shards {
                    self.fanout.send(
                        usize::from(shard),
                        ShardMsg::Backend(BackendMsg::Rebase {
                            topic: interest.topic.clone(),
                            next,
                            epoch,
                        }),
                    );
                }
            }
            let until = read.counter;
            self.fill(&name, read.messages, until);
        }
        Ok(())
    }

    /// Handles commands while Redis is away, until `pause` has passed. Returns true on stop.
    async fn idle(&mut self, pause: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + pause;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = self.wake.notified() => {}
            }
            while let Ok(cmd) = self.rx.try_recv() {
                match cmd {
                    Cmd::Stop => return true,
                    Cmd::Attach(req) => self.queue(Op::Attach(req)),
                    Cmd::Detach { topic, shard } => self.queue(Op::Detach { topic, shard }),
                    publish @ Cmd::Publish { .. } => {
                        self.refuse(publish, PublishError::Unavailable);
                    }
                }
            }
            if self.queued.len() > FOLD_WHILE_AWAY {
                // No channel is subscribed while Redis is away: folding costs nothing, and
                // what is left is one attach per live subscriber.
                self.queued_topics.clear();
                let ops = std::mem::take(&mut self.queued);
                let (attaches, _) = self.fold(ops);
                for (_, reqs) in attaches {
                    for req in reqs {
                        self.queue(Op::Attach(req));
                    }
                }
            }
        }
    }

    fn queue(&mut self, op: Op) {
        if let Op::Attach(req) = &op {
            self.queued_topics.insert(req.topic.name.clone());
        }
        self.queued.push(op);
    }

    /// Serves shards and forwards messages until the connection fails or a stop comes.
    ///
    /// Two lanes, each with at most one request to Redis in flight while the next batch
    /// gathers behind it: publishes (one pipeline on their own connection) and subscriber
    /// changes (pipelined SUBSCRIBE and UNSUBSCRIBE, then one pipeline of history reads). The
    /// loop never waits for either, so channel messages keep flowing and a publish never waits
    /// behind another client's attaches; only a publish to a topic with an attach still to
    /// answer waits for that attach (see `held`).
    async fn session(&mut self, conn: &mut Conn) -> End {
        let mut health = tokio::time::interval(self.config.health_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let wake = self.wake.clone();
        let mut attaching: FuturesUnordered<Batch> = FuturesUnordered::new();
        let mut publishing: Option<InFlight> = None;
        let end = loop {
            if self.take_commands() {
                break End::Stop;
            }
            if self.flights.len() < MAX_FLIGHTS && !self.queued.is_empty() {
                if let Some(batch) = self.start_batch(conn) {
                    attaching.push(batch);
                }
            }
            if publishing.is_none() && !self.outgoing.is_empty() {
                publishing = Some(self.start_publishes(conn));
            }
            // Not biased: a stream of commands must not starve channel messages, nor the
            // reverse.
            tokio::select! {
                _ = wake.notified() => {}
                Some((id, done)) = attaching.next(), if !attaching.is_empty() => {
                    if let Err(end) = self.finish_batch(conn, id, done).await {
                        break end;
                    }
                }
                done = async { publishing.as_mut().expect("guarded").await }, if publishing.is_some() => {
                    publishing = None;
                    if let Err(e) = self.finish_publishes(done) {
                        break End::Lost(e);
                    }
                }
                msg = conn.stream.next() => {
                    let Some(msg) = msg else {
                        break End::Lost(RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "subscription connection closed",
                        )));
                    };
                    let name = msg
                        .get_channel_name()
                        .strip_prefix(self.config.key_prefix.as_str());
                    if let Some(flight) = name.and_then(|n| {
                        self.flights.iter_mut().find(|f| f.names.contains(n))
                    }) {
                        flight.deferred.push(msg);
                        continue;
                    }
                    if let Err(e) = self.message(conn, &msg).await {
                        break End::Lost(e);
                    }
                }
                _ = health.tick() => {
                    let ping = redis::cmd("PING");
                    if let Err(e) = self.within(ping.query_async::<String>(&mut conn.cmd)).await {
                        break End::Lost(e);
                    }
                }
            }
        };
        // Every publish taken gets its answer: the pipeline in flight its own, and on a stop
        // the rest are still sent (no subscriber is left to need their order).
        if let Some(done) = publishing {
            let _ = self.finish_publishes(done.await);
        }
        if matches!(end, End::Stop) {
            self.outgoing.append(&mut self.held);
            if !self.outgoing.is_empty() {
                let done = self.start_publishes(conn).await;
                let _ = self.finish_publishes(done);
            }
        }
        let why = match end {
            End::Stop => PublishError::Stopped,
            End::Lost(_) => PublishError::Unavailable,
        };
        let left: Vec<Pub> = self.held.drain(..).chain(self.outgoing.drain(..)).collect();
        for publish in left {
            self.answer(publish.reply, Err(why));
        }
        self.held_topics.clear();
        // Their attaches are answered after the reconnect.
        drop(attaching);
        for flight in std::mem::take(&mut self.flights) {
            self.requeue(flight);
        }
        end
    }

    /// Takes the queued commands (at most [`MAX_TAKE`]): publishes to the publish lane, or
    /// held behind their topic's attach; subscriber changes to the next attach batch. Returns
    /// true on stop.
    fn take_commands(&mut self) -> bool {
        for _ in 0..MAX_TAKE {
            let Ok(cmd) = self.rx.try_recv() else {
                return false;
            };
            match cmd {
                Cmd::Publish {
                    topic,
                    payload,
                    reply,
                } => {
                    let publish = Pub {
                        topic,
                        payload,
                        reply,
                    };
                    let name = &publish.topic.name;
                    if self.blocked(name) {
                        self.held_topics.insert(name.clone());
                        self.held.push(publish);
                    } else {
                        self.outgoing.push(publish);
                    }
                }
                Cmd::Attach(req) => self.queue(Op::Attach(req)),
                Cmd::Detach { topic, shard } => self.queue(Op::Detach { topic, shard }),
                Cmd::Stop => return true,
            }
        }
        // More is waiting: come back to it after a turn of the loop.
        self.wake.notify_one();
        false
    }

    /// A publish to `name` must wait: an attach to it is queued or in flight, or an earlier
    /// publish to it waits.
    fn blocked(&self, name: &str) -> bool {
        self.queued_topics.contains(name) || self.held_topics.contains(name) || self.in_flight(name)
    }

    /// An attach batch in flight has `name`.
    fn in_flight(&self, name: &str) -> bool {
        self.flights.iter().any(|f| f.names.contains(name))
    }

    /// Moves the held publishes whose topic no longer waits for an attach to the publish
    /// lane, keeping each topic's order.
    fn release_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut still = HashSet::new();
        for publish in std::mem::take(&mut self.held) {
            let name = &publish.topic.name;
            let waits =
                still.contains(name) || self.queued_topics.contains(name) || self.in_flight(name);
            if waits {
                still.insert(name.clone());
                self.held.push(publish);
            } else {
                self.outgoing.push(publish);
            }
        }
        self.held_topics = still;
    }

    /// Applies the queued subscriber changes to the local interest, in order: an attach whose
    /// shard detached later in the queue is dropped (that shard forgot it), and a topic no
    /// shard wants any more is forgotten. Returns the attaches left, by topic in first-seen
    /// order, and the channels to unsubscribe. A topic attached and detached within the queue
    /// costs nothing.
    fn fold(&mut self, ops: Vec<Op>) -> (Vec<TopicAttaches>, Vec<Arc<str>>) {
        let mut order: Vec<Arc<str>> = Vec::new();
        let mut attaches: HashMap<Arc<str>, Vec<AttachReq>> = HashMap::new();
        let mut emptied: Vec<Arc<str>> = Vec::new();
        for op in ops {
            match op {
                Op::Attach(req) => {
                    self.interest(&req);
                    let name = req.topic.name.clone();
                    attaches
                        .entry(name.clone())
                        .or_insert_with(|| {
                            order.push(name);
                            Vec::new()
                        })
                        .push(req);
                }
                Op::Detach { topic, shard } => {
                    if let Some(reqs) = attaches.get_mut(&*topic.name) {
                        reqs.retain(|r| r.shard != shard);
                    }
                    if let Some(interest) = self.topics.get_mut(&*topic.name) {
                        interest.shards.retain(|&s| s != shard);
                        if interest.shards.is_empty() {
                            emptied.push(topic.name.clone());
                        }
                    }
                }
            }
        }
        let mut unsubscribe = Vec::new();
        for name in emptied {
            if self.topics.get(&name).is_some_and(|i| i.shards.is_empty()) {
                let interest = self.topics.remove(&name).expect("checked above");
                if interest.subscribed {
                    unsubscribe.push(name);
                }
            }
        }
        let left = order
            .into_iter()
            .filter_map(|name| {
                let reqs = attaches.remove(&name)?;
                (!reqs.is_empty() && self.topics.contains_key(&name)).then_some((name, reqs))
            })
            .collect();
        (left, unsubscribe)
    }

    /// Starts the next attach batch: folds the queue, answers at once what needs nothing from
    /// Redis (a new subscriber with no `since`, or one already up to date, on a subscribed
    /// topic), and sends the rest as one request: an UNSUBSCRIBE and a SUBSCRIBE per channel,
    /// pipelined, then every history read in one pipeline. `None` when nothing needs Redis.
    ///
    /// Changes to a topic in a batch still in flight wait in the queue, in order, for the
    /// next batch after it.
    fn start_batch(&mut self, conn: &Conn) -> Option<Batch> {
        let mut ready = Vec::new();
        self.queued_topics.clear();
        for op in std::mem::take(&mut self.queued) {
            let topic = match &op {
                Op::Attach(req) => &req.topic,
                Op::Detach { topic, .. } => topic,
            };
            if self.in_flight(&topic.name) {
                self.queue(op);
            } else {
                ready.push(op);
            }
        }
        if ready.is_empty() {
            return None;
        }
        let (attaches, unsubscribed) = self.fold(ready);
        let epoch = self.epoch.unwrap_or(0);
        self.next_flight += 1;
        let mut flight = Flight {
            id: self.next_flight,
            epoch: self.epoch,
            topics: Vec::new(),
            names: HashSet::new(),
            deferred: Vec::new(),
        };
        let mut subscribe = Vec::new();
        let mut reads = redis::pipe();
        for (name, reqs) in attaches {
            let interest = &self.topics[&name];
            let subscribing = !interest.subscribed;
            let last = interest.last;
            // The oldest history any of them needs (a new channel's read gives its counter
            // with it, so it reads from there to the newest).
            let need = reqs
                .iter()
                .filter_map(|r| effective_since(r, epoch))
                .filter(|&s| subscribing || s != last)
                .min();
            let (from, to) = match need {
                None if !subscribing => {
                    // Every `since` is `last` or absent: nothing to read.
                    for req in reqs {
                        self.answer_attach(req, &[], (last, None));
                    }
                    continue;
                }
                None => (0, 0),
                Some(since) if subscribing => (since.saturating_add(1), 0),
                // Past what this host forwarded: only Redis's counter (was `since` sequenced?).
                Some(since) if since > last => (0, 0),
                Some(since) => (since + 1, last),
            };
            reads.add_command(self.read_cmd(&name, from, to));
            if subscribing {
                subscribe.push(self.channel(&name));
            }
            flight.names.insert(name.clone());
            flight.topics.push(FlightTopic {
                name,
                subscribing,
                reqs,
            });
        }
        let unsubscribe: Vec<String> = unsubscribed.iter().map(|n| self.channel(n)).collect();
        flight.names.extend(unsubscribed);
        let id = flight.id;
        let n = flight.topics.len();
        if !flight.names.is_empty() {
            self.flights.push(flight);
        }
        self.release_held();
        if n == 0 && unsubscribe.is_empty() {
            return None;
        }
        let sink = conn.sink.clone();
        let mut cmd = conn.cmd.clone();
        let timeout = self.config.command_timeout;
        let request = async move {
            // One command per channel: the sink matches one confirmation to each command,
            // and Redis confirms each channel of a command separately. Sent together, they
            // cost one round trip; a SUBSCRIBE confirmed means its channel is live before
            // the reads below run.
            let channels = unsubscribe
                .into_iter()
                .map(|c| (false, c))
                .chain(subscribe.into_iter().map(|c| (true, c)));
            let confirm = join_all(channels.map(|(on, channel)| {
                let mut sink = sink.clone();
                async move {
                    if on {
                        sink.subscribe(channel).await
                    } else {
                        sink.unsubscribe(channel).await
                    }
                }
            }));
            for confirmed in tokio::time::timeout(timeout, confirm)
                .await
                .map_err(|_| timeout_error())?
            {
                confirmed?;
            }
            if n == 0 {
                return Ok(Vec::new());
            }
            use redis::aio::ConnectionLike;
            tokio::time::timeout(timeout, cmd.req_packed_commands(&reads, 0, n))
                .await
                .unwrap_or_else(|_| Err(timeout_error()))
        };
        Some(Box::pin(async move { (id, request.await) }))
    }

    /// Attach batch `id` answered: mark its channels subscribed, answer its attaches, then
    /// forward the channel messages that waited for it.
    async fn finish_batch(
        &mut self,
        conn: &mut Conn,
        id: u64,
        done: Result<Vec<Value>, RedisError>,
    ) -> Result<(), End> {
        let at = self.flights.iter().position(|f| f.id == id);
        let flight = self.flights.swap_remove(at.expect("a batch in flight"));
        let reads = done.and_then(|values| values.into_iter().map(parse_read).collect());
        let reads: Vec<Read> = match reads {
            Ok(reads) => reads,
            Err(e) => {
                self.requeue(flight);
                return Err(End::Lost(e));
            }
        };
        for read in &reads {
            if let Some(epoch) = read.epoch {
                self.observe(epoch);
            }
        }
        for (ft, read) in flight.topics.iter().zip(&reads) {
            if !ft.subscribing {
                continue;
            }
            let current = read.epoch.is_none() || read.epoch == self.epoch;
            if let Some(interest) = self.topics.get_mut(&ft.name) {
                interest.subscribed = true;
                interest.synced = true;
                if current {
                    interest.last = read.counter;
                    interest.topic.seen.store(read.counter, Relaxed);
                }
                // Else the read predates a new epoch, and `last` stays where that epoch's
                // reset put it: the hole-filling path brings its messages.
            }
        }
        let Flight {
            epoch,
            topics,
            deferred,
            ..
        } = flight;
        let stale = reads
            .iter()
            .any(|r| r.epoch.is_some_and(|e| self.retired.contains(&e)));
        if self.epoch != epoch || stale {
            // Redis lost its data while the batch ran: its `since` checks and reads belong to
            // the old numbering. The attaches go again, first.
            let mut again: Vec<Op> = topics
                .into_iter()
                .flat_map(|ft| ft.reqs)
                .map(Op::Attach)
                .collect();
            for op in std::mem::take(&mut self.queued) {
                again.push(op);
            }
            for op in again {
                self.queue(op);
            }
        } else {
            // An attach whose shard has since detached the topic is moot: the shard dropped
            // its token with the subscriber.
            let left: HashSet<(&str, u16)> = self
                .queued
                .iter()
                .filter_map(|op| match op {
                    Op::Detach { topic, shard } => Some((&*topic.name, *shard)),
                    Op::Attach(_) => None,
                })
                .collect();
            let (topics, reads): (Vec<FlightTopic>, Vec<Read>) = topics
                .into_iter()
                .zip(reads)
                .filter_map(|(mut ft, read)| {
                    ft.reqs.retain(|r| !left.contains(&(&*ft.name, r.shard)));
                    (!ft.reqs.is_empty()).then_some((ft, read))
                })
                .unzip();
            for (ft, read) in topics.into_iter().zip(reads) {
                let Some(last) = self.topics.get(&ft.name).map(|i| i.last) else {
                    continue;
                };
                let sequenced = (read.counter, read.epoch);
                let Some(topic) = ft.reqs.first().map(|r| r.topic.clone()) else {
                    continue;
                };
                // One copy of the history for every subscriber it is replayed to.
                let history: Vec<Arc<Published>> = read
                    .messages
                    .into_iter()
                    .filter(|(seq, _)| *seq <= last)
                    .map(|(seq, payload)| Arc::new(Published::new(topic.clone(), seq, payload)))
                    .collect();
                for req in ft.reqs {
                    self.answer_attach(req, &history, sequenced);
                }
            }
        }
        for msg in deferred {
            self.message(conn, &msg).await?;
        }
        self.release_held();
        Ok(())
    }

    /// Puts a batch's attaches back at the head of the queue (to be answered after a
    /// reconnect).
    fn requeue(&mut self, flight: Flight) {
        let rest = std::mem::take(&mut self.queued);
        for req in flight.topics.into_iter().flat_map(|ft| ft.reqs) {
            self.queue(Op::Attach(req));
        }
        for op in rest {
            self.queue(op);
        }
    }

    /// Tells a new subscriber's shard where live messages start and what to replay, from the
    /// topic's `last` and `history` (its messages after the subscriber's `since`, or more), and
    /// what Redis had sequenced when the batch read it: its counter and epoch.
    fn answer_attach(
        &mut self,
        req: AttachReq,
        history: &[Arc<Published>],
        (counter, counter_epoch): (u64, Option<u64>),
    ) {
        let last = self.topics.get(&*req.topic.name).map_or(0, |i| i.last);
        let mut live_from = last + 1;
        let epoch = self.epoch.unwrap_or(0);
        // A since in another epoch counts in a numbering that is gone: replay all that is held.
        let moved = req.since.is_some() && req.epoch.is_some_and(|e| e != epoch);
        let (replay, mut reset) = match effective_since(&req, epoch) {
            None => (Vec::new(), None),
            // Past what this host has forwarded: a client resuming here after reading on a
            // host that is ahead (this bridge lags). If Redis had sequenced `since`, the seqs
            // up to it are on their way down the inbox: live messages start after it, no
            // reset. Past Redis's counter too, `since` names nothing yet: a reset to what
            // comes next.
            Some(since) if since > last => {
                if since <= counter && counter_epoch.is_none_or(|e| e == epoch) {
                    live_from = since + 1;
                    (Vec::new(), None)
                } else {
                    (Vec::new(), Some(live_from))
                }
            }
            Some(since) if since == last => (Vec::new(), None),
            Some(since) => {
                let replay: Vec<Arc<Published>> = history
                    .iter()
                    .filter(|m| m.seq > since && m.seq <= last)
                    .cloned()
                    .collect();
                let oldest = replay.first().map_or(live_from, |m| m.seq);
                (replay, (oldest > since + 1).then_some(oldest))
            }
        };
        if moved && reset.is_none() {
            reset = Some(replay.first().map_or(live_from, |m| m.seq));
        }
        self.fanout.send(
            usize::from(req.shard),
            ShardMsg::Backend(BackendMsg::Attached(Box::new(
                crate::pubsub::topic::Attached {
                    topic: req.topic,
                    token: req.token,
                    live_from,
                    replay,
                    reset,
                    epoch,
                },
            ))),
        );
    }

    /// Sends every outgoing publish in one pipeline on the publish lane.
    fn start_publishes(&mut self, conn: &Conn) -> InFlight {
        let max_age = self.config.history_max_age.as_millis().to_string();
        let max_len = self.history_max_messages.to_string();
        let mut pipe = redis::pipe();
        for publish in &self.outgoing {
            let (kind, bytes): (&str, &[u8]) = match &publish.payload {
                Payload::Json(b) => ("j", b),
                Payload::Text(t) => ("t", t.as_bytes()),
                Payload::Binary(b) => ("b", b),
            };
            let name = &publish.topic.name;
            pipe.cmd("EVALSHA")
                .arg(self.publish.get_hash())
                .arg(3)
                .arg(self.key(name, ":seq"))
                .arg(self.key(name, ":h"))
                .arg(self.epoch_key())
                .arg(self.channel(name))
                .arg(kind)
                .arg(bytes)
                .arg(&max_len)
                .arg(&max_age)
                .arg(new_epoch());
        }
        self.sent = self.outgoing.drain(..).map(|p| p.reply).collect();
        let n = self.sent.len();
        let mut lane = conn.lane.clone();
        let timeout = self.config.command_timeout;
        Box::pin(async move {
            use redis::aio::ConnectionLike;
            tokio::time::timeout(timeout, lane.req_packed_commands(&pipe, 0, n))
                .await
                .unwrap_or_else(|_| Err(timeout_error()))
        })
    }

    /// The publish pipeline answered: each publisher gets its receipt or error.
    fn finish_publishes(&mut self, done: Result<Vec<Value>, RedisError>) -> Result<(), RedisError> {
        let replies = std::mem::take(&mut self.sent);
        let values = match done {
            Ok(values) => values,
            Err(e) => {
                for reply in replies {
                    self.answer(reply, Err(PublishError::Unavailable));
                }
                return Err(e);
            }
        };
        for (reply, value) in replies.into_iter().zip(values) {
            let result = match value {
                Value::Array(parts) => match parts.as_slice() {
                    [Value::BulkString(epoch), Value::Int(seq)] => {
                        let epoch = epoch_of(epoch);
                        self.observe(epoch);
                        self.shared.publishes.fetch_add(1, Relaxed);
                        Ok(PublishReceipt {
                            seq: *seq as u64,
                            saturated: false,
                            epoch,
                        })
                    }
                    other => {
                        tracing::warn!(answer = ?other, "redis: unexpected publish answer");
                        self.shared.errors.fetch_add(1, Relaxed);
                        Err(PublishError::Unavailable)
                    }
                },
                other => {
                    tracing::warn!(answer = ?other, "redis refused a publish");
                    self.shared.errors.fetch_add(1, Relaxed);
                    Err(PublishError::Unavailable)
                }
            };
            self.answer(reply, result);
        }
        Ok(())
    }

    /// Sends a publish's outcome where it was asked for.
    fn answer(&self, reply: ReplyTo, result: Result<PublishReceipt, PublishError>) {
        if result.is_err() {
            self.shared.publish_errors.fetch_add(1, Relaxed);
        }
        match reply {
            ReplyTo::Nobody => {}
            ReplyTo::Thread(tx) => {
                let _ = tx.send(result);
            }
            ReplyTo::Conn { conn, id, dialect } => {
                let retry = matches!(result, Err(PublishError::Unavailable))
                    .then(|| self.shared.retry_hint(self.config.reconnect_min_delay));
                let frame = crate::pubsub::notices::publish_reply(dialect, id, result, retry);
                self.fanout.send(
                    conn.shard().index(),
                    ShardMsg::Backend(BackendMsg::Reply { conn, frame }),
                );
            }
        }
    }

    /// Answers a command that cannot be served.
    fn refuse(&self, cmd: Cmd, why: PublishError) {
        if let Cmd::Publish { reply, .. } = cmd {
            self.answer(reply, Err(why));
        }
    }

    /// Adds the requesting shard to the topic's interest.
    fn interest(&mut self, req: &AttachReq) {
        let interest = self
            .topics
            .entry(req.topic.name.clone())
            .or_insert_with(|| Interest {
                topic: req.topic.clone(),
                shards: Vec::new(),
                last: 0,
                subscribed: false,
                synced: false,
            });
        if req.first && !interest.shards.contains(&req.shard) {
            interest.shards.push(req.shard);
        }
    }
    /// A message from a topic channel: forward it in order, filling any hole first.
    async fn message(&mut self, conn: &mut Conn, msg: &redis::Msg) -> Result<(), RedisError> {
        let Some(name) = msg
            .get_channel_name()
            .strip_prefix(self.config.key_prefix.as_str())
        else {
            return Ok(());
        };
        let Some((epoch, seq, ms, payload)) = parse(msg.get_payload_bytes()) else {
            self.shared.errors.fetch_add(1, Relaxed);
            tracing::warn!(topic = name, "unreadable message on a topic channel");
            return Ok(());
        };
        if let Some(epoch) = epoch {
            if self.observe(epoch) == Seen::Stale {
                // Published before Redis lost its data, and covered by the reset already sent.
                return Ok(());
            }
        }
        let Some(interest) = self.topics.get(name) else {
            return Ok(()); // unsubscribed while it was on its way
        };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.shared.lag_ms.store(now_ms.saturating_sub(ms), Relaxed);
        let last = interest.last;
        if !interest.subscribed || seq <= last {
            return Ok(()); // a repeat of what history already gave
        }
        let name: Arc<str> = interest.topic.name.clone();
        if seq > last + 1 {
            let read = self.read(&mut conn.cmd, &name, last + 1, seq - 1).await?;
            if read.epoch.is_some_and(|e| self.observe(e) != Seen::Current) {
                // The numbering changed again under the read: this message is of the old
                // one, and the reset that was just sent covers it.
                return Ok(());
            }
            self.fill(&name, read.messages, seq - 1);
        }
        self.forward(&name, seq, payload);
        Ok(())
    }

    /// Forwards history messages after the topic's last seq up to `until`, announcing as
    /// lost what history no longer holds.
    fn fill(&mut self, name: &Arc<str>, messages: Vec<(u64, Payload)>, until: u64) {
        for (seq, payload) in messages {
            let last = self.topics[name].last;
            if seq <= last || seq > until {
                continue;
            }
            if seq > last + 1 {
                self.lose(name, seq - 1);
            }
            self.shared.repaired.fetch_add(1, Relaxed);
            self.forward(name, seq, payload);
        }
        if self.topics[name].last < until {
            self.lose(name, until);
        }
    }

    /// Announces the seqs after the topic's last up to `to` as lost.
    fn lose(&mut self, name: &Arc<str>, to: u64) {
        let interest = self.topics.get_mut(name).expect("a local topic");
        let count = to - interest.last;
        self.shared.lost.fetch_add(count, Relaxed);
        tracing::warn!(topic = %name, from = interest.last + 1, to, "messages lost");
        interest.last = to;
        for &shard in &interest.shards {
            self.fanout.send(
                usize::from(shard),
                ShardMsg::Backend(BackendMsg::Gap {
                    topic: interest.topic.clone(),
                    count,
                    last: to,
                }),
            );
        }
    }

    /// Takes note of an epoch seen in a message or an answer. A new one means Redis lost its
    /// data: every local topic starts over at seq 1 of it, and its subscribers get a `reset`
    /// (they take messages from 1 on; the hole-filling path replays what history holds).
    fn observe(&mut self, epoch: u64) -> Seen {
        if self.epoch == Some(epoch) {
            return Seen::Current;
        }
        if self.retired.contains(&epoch) {
            return Seen::Stale;
        }
        if let Some(old) = self.epoch.replace(epoch) {
            self.retired.push(old);
        }
        self.shared.epoch.store(epoch, Relaxed);
        tracing::warn!(epoch, "redis lost its data: a new epoch, every topic reset");
        for interest in self.topics.values_mut() {
            interest.last = 0;
            interest.topic.epoch.store(epoch, Relaxed);
            interest.topic.seen.store(0, Relaxed);
            self.shared.resets.fetch_add(1, Relaxed);
            for &shard in &interest.shards {
                self.fanout.send(
                    usize::from(shard),
                    ShardMsg::Backend(BackendMsg::Rebase {
                        topic: interest.topic.clone(),
                        next: 1,
                        epoch,
                    }),
                );
            }
        }
        Seen::New
    }

    fn forward(&mut self, name: &Arc<str>, seq: u64, payload: Payload) {
        let interest = self.topics.get_mut(name).expect("a local topic");
        interest.last = seq;
        interest.topic.seen.store(seq, Relaxed);
        if let Some(epoch) = self.epoch {
            interest.topic.epoch.store(epoch, Relaxed);
        }
        self.shared.messages_in.fetch_add(1, Relaxed);
        let msg = Arc::new(Published::new(interest.topic.clone(), seq, payload));
        for &shard in &interest.shards {
            self.fanout.hand_off(usize::from(shard), &msg);
        }
    }

    async fn read(
        &self,
        cmd: &mut MultiplexedConnection,
        name: &str,
        from: u64,
        to: u64,
    ) -> Result<Read, RedisError> {
        let values: Value = self
            .within(self.read_cmd(name, from, to).query_async(cmd))
            .await?;
        parse_read(values)
    }

    /// The read script's call: `name`'s counter, oldest seq and epoch, and its history from
    /// seq `from` (0: none) to `to` (0: the newest).
    fn read_cmd(&self, name: &str, from: u64, to: u64) -> redis::Cmd {
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.read.get_hash())
            .arg(3)
            .arg(self.key(name, ":seq"))
            .arg(self.key(name, ":h"))
            .arg(self.epoch_key())
            .arg(from)
            .arg(to)
            .arg(self.config.history_max_age.as_millis().to_string());
        call
    }

    fn epoch_key(&self) -> String {
        format!("{}epoch", self.config.key_prefix)
    }

    fn key(&self, topic: &str, suffix: &str) -> String {
        format!("{}{topic}{suffix}", self.config.key_prefix)
    }

    fn channel(&self, topic: &str) -> String {
        format!("{}{topic}", self.config.key_prefix)
    }
}

/// What the read script answered.
fn parse_read(value: Value) -> Result<Read, RedisError> {
    let values = match value {
        Value::Array(values) => values,
        other => {
            return Err(RedisError::from((
                redis::ErrorKind::TypeError,
                "unexpected answer to the read script",
                format!("{other:?}"),
            )))
        }
    };
    let int = |v: Option<&Value>| match v {
        Some(Value::Int(i)) => *i as u64,
        _ => 0,
    };
    let mut read = Read {
        counter: int(values.first()),
        epoch: match values.get(2) {
            Some(Value::BulkString(e)) if !e.is_empty() => Some(epoch_of(e)),
            _ => None,
        },
        messages: Vec::new(),
    };
    for value in values.iter().skip(3) {
        if let Value::BulkString(bytes) = value {
            if let Some((_, seq, _, payload)) = parse(bytes) {
                read.messages.push((seq, payload));
            }
        }
    }
    Ok(read)
}

/// The `since` an attach replays from in the current `epoch`: its own, or (a `since` counted
/// in another numbering, which says nothing about this one) 0, everything held.
fn effective_since(req: &AttachReq, epoch: u64) -> Option<u64> {
    let moved = req.since.is_some() && req.epoch.is_some_and(|e| e != epoch);
    if moved {
        Some(0)
    } else {
        req.since
    }
}

/// Splits `e<epoch>:seq:ms:kind:payload` (or, from an older version, `seq:ms:kind:payload`,
/// with no epoch).
fn parse(bytes: &[u8]) -> Option<(Option<u64>, u64, u64, Payload)> {
    let (epoch, bytes) = match bytes.strip_prefix(b"e") {
        Some(rest) => {
            let at = rest.iter().position(|&b| b == b':')?;
            (Some(epoch_of(&rest[..at])), &rest[at + 1..])
        }
        None => (None, bytes),
    };
    let mut parts = bytes.splitn(4, |&b| b == b':');
    let seq = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let ms = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let kind = parts.next()?;
    let data = Bytes::copy_from_slice(parts.next()?);
    let payload = match kind {
        b"j" => Payload::Json(data),
        b"t" => Payload::Text(Utf8Bytes::try_from(data).ok()?),
        b"b" => Payload::Binary(data),
        _ => return None,
    };
    Some((epoch, seq, ms, payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_keeps_colons_in_the_payload() {
        let (epoch, seq, ms, payload) = parse(b"42:1700000000000:j:{\"a\":\"b:c\"}").unwrap();
        assert_eq!((epoch, seq, ms), (None, 42, 1_700_000_000_000));
        assert_eq!(
            payload,
            Payload::Json(Bytes::from_static(b"{\"a\":\"b:c\"}"))
        );
        assert!(parse(b"42:1:x:data").is_none(), "unknown kind");
        assert!(parse(b"nope").is_none());
        let (_, _, _, binary) = parse(b"1:2:b:\x00\xff").unwrap();
        assert_eq!(binary, Payload::Binary(Bytes::from_static(b"\x00\xff")));
        let (epoch, seq, _, payload) = parse(b"e77:3:4:t:x:y").unwrap();
        assert_eq!((epoch, seq), (Some(77), 3));
        assert_eq!(payload, Payload::Text("x:y".into()));
        assert!(parse(b"e77").is_none());
    }

    #[test]
    fn epochs_are_the_decimal_value_or_a_stable_nonzero_hash() {
        assert_eq!(epoch_of(b"12345"), 12345);
        let old = epoch_of(b"00ab00cd00ef0012");
        assert_eq!(old, epoch_of(b"00ab00cd00ef0012"), "the same on every host");
        assert_ne!(old, 0);
        assert_ne!(epoch_of(b"0"), 0);
        assert_ne!(epoch_of(b""), 0);
    }

    #[test]
    fn epochs_stay_exact_as_javascript_numbers() {
        let max = envelope::MAX_EPOCH;
        assert_eq!(epoch_of(max.to_string().as_bytes()), max);
        for text in [
            u64::MAX.to_string(),
            (max + 1).to_string(),
            "old-epoch".into(),
        ] {
            let e = epoch_of(text.as_bytes());
            assert!((1..=max).contains(&e), "{text} -> {e}");
        }
        assert!((0..10_000).all(|_| (1..=max).contains(&super::new_epoch())));
    }
}
