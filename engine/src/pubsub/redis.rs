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
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use futures_util::StreamExt;
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
            waiting: Vec::new(),
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

/// The two connections of one session: commands (publish, read) and the subscription.
struct Conn {
    cmd: MultiplexedConnection,
    sink: redis::aio::PubSubSink,
    stream: redis::aio::PubSubStream,
}

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
    /// Attaches that came while Redis was away, answered on reconnect.
    waiting: Vec<AttachReq>,
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
        let (sink, stream) = self.client.get_async_pubsub().await?.split();
        for code in [PUBLISH, READ] {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(format!("{TRIM}{code}"))
                .query_async::<String>(&mut cmd)
                .await?;
        }
        Ok(Conn { cmd, sink, stream })
    }

    /// After connecting: notice lost data, subscribe every local topic again, forward what
    /// was published meanwhile, and answer the attaches that waited.
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
            let last = self.topics[&name].last;
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
        for req in std::mem::take(&mut self.waiting) {
            self.attach(conn, req).await?;
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
                    Cmd::Attach(req) => {
                        self.interest(&req);
                        self.waiting.push(req);
                    }
                    Cmd::Detach { topic, shard } => {
                        // Its waiting attaches are moot, and must not bring the interest back.
                        self.waiting
                            .retain(|r| !(r.shard == shard && r.topic.name == topic.name));
                        self.detach_local(&topic, shard);
                    }
                    publish @ Cmd::Publish { .. } => {
                        self.refuse(publish, PublishError::Unavailable);
                    }
                }
            }
        }
    }

    /// Serves shards and forwards messages until the connection fails or a stop comes.
    async fn session(&mut self, conn: &mut Conn) -> End {
        let mut health = tokio::time::interval(self.config.health_interval);
        health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = self.wake.notified() => {
                    if let Err(end) = self.commands(conn).await {
                        return end;
                    }
                }
                msg = conn.stream.next() => {
                    let Some(msg) = msg else {
                        return End::Lost(RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "subscription connection closed",
                        )));
                    };
                    if let Err(e) = self.message(conn, &msg).await {
                        return End::Lost(e);
                    }
                }
                _ = health.tick() => {
                    let ping = redis::cmd("PING");
                    if let Err(e) = self.within(ping.query_async::<String>(&mut conn.cmd)).await {
                        return End::Lost(e);
                    }
                }
            }
        }
    }

    /// Takes every queued command: publishes in one pipeline per run between attaches, so
    /// a client that subscribes and then publishes sees its own message.
    async fn commands(&mut self, conn: &mut Conn) -> Result<(), End> {
        let mut batch = Vec::new();
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Publish {
                    topic,
                    payload,
                    reply,
                } => batch.push((topic, payload, reply)),
                other => {
                    self.publish_batch(conn, std::mem::take(&mut batch)).await?;
                    match other {
                        Cmd::Stop => return Err(End::Stop),
                        Cmd::Attach(req) => self.attach(conn, req).await?,
                        Cmd::Detach { topic, shard } => {
                            if self.detach_local(&topic, shard) {
                                let channel = self.channel(&topic.name);
                                self.within(conn.sink.unsubscribe(channel)).await?;
                            }
                        }
                        Cmd::Publish { .. } => unreachable!("matched above"),
                    }
                }
            }
        }
        self.publish_batch(conn, batch).await
    }

    async fn publish_batch(
        &mut self,
        conn: &mut Conn,
        batch: Vec<(Arc<Topic>, Payload, ReplyTo)>,
    ) -> Result<(), End> {
        if batch.is_empty() {
            return Ok(());
        }
        let max_age = self.config.history_max_age.as_millis().to_string();
        let max_len = self.history_max_messages.to_string();
        let mut pipe = redis::pipe();
        for (topic, payload, _) in &batch {
            let (kind, bytes): (&str, &[u8]) = match payload {
                Payload::Json(b) => ("j", b),
                Payload::Text(t) => ("t", t.as_bytes()),
                Payload::Binary(b) => ("b", b),
            };
            pipe.cmd("EVALSHA")
                .arg(self.publish.get_hash())
                .arg(3)
                .arg(self.key(&topic.name, ":seq"))
                .arg(self.key(&topic.name, ":h"))
                .arg(self.epoch_key())
                .arg(self.channel(&topic.name))
                .arg(kind)
                .arg(bytes)
                .arg(&max_len)
                .arg(&max_age)
                .arg(new_epoch());
        }
        let n = batch.len();
        let answer = {
            use redis::aio::ConnectionLike;
            self.within(conn.cmd.req_packed_commands(&pipe, 0, n)).await
        };
        match answer {
            Ok(values) => {
                for ((_, _, reply), value) in batch.into_iter().zip(values) {
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
            Err(e) => {
                for (_, _, reply) in batch {
                    self.answer(reply, Err(PublishError::Unavailable));
                }
                Err(End::Lost(e))
            }
        }
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
            });
        if req.first && !interest.shards.contains(&req.shard) {
            interest.shards.push(req.shard);
        }
    }

    /// Removes a shard's interest; true if no shard of this host wants the topic any more
    /// and its channel was subscribed.
    fn detach_local(&mut self, topic: &Topic, shard: u16) -> bool {
        let Some(interest) = self.topics.get_mut(&*topic.name) else {
            return false;
        };
        interest.shards.retain(|&s| s != shard);
        if !interest.shards.is_empty() {
            return false;
        }
        let subscribed = interest.subscribed;
        self.topics.remove(&*topic.name);
        subscribed
    }

    /// Attaches a new subscriber: subscribe the channel if this host had no subscriber yet,
    /// then replay its `since` from history and tell its shard where live messages start.
    async fn attach(&mut self, conn: &mut Conn, req: AttachReq) -> Result<(), End> {
        self.interest(&req);
        let name = req.topic.name.clone();
        if !self.topics[&name].subscribed {
            let subscribed = self.within(conn.sink.subscribe(self.channel(&name))).await;
            let read = match subscribed {
                Ok(()) => self.read(&mut conn.cmd, &name, 0, 0).await,
                Err(e) => Err(e),
            };
            match read {
                Ok(read) => {
                    if let Some(epoch) = read.epoch {
                        self.observe(epoch);
                    }
                    let interest = self.topics.get_mut(&name).expect("made above");
                    interest.last = read.counter;
                    interest.subscribed = true;
                    interest.topic.seen.store(read.counter, Relaxed);
                }
                Err(e) => {
                    self.waiting.push(req);
                    return Err(End::Lost(e));
                }
            }
        }
        let last = self.topics[&name].last;
        let mut live_from = last + 1;
        let epoch = self.epoch.unwrap_or(0);
        // A since in another epoch counts in a numbering that is gone: replay all that is held.
        let moved = req.since.is_some() && req.epoch.is_some_and(|e| e != epoch);
        let since = if moved { Some(0) } else { req.since };
        let (replay, mut reset) = match since {
            None => (Vec::new(), None),
            // Past what this host has forwarded: a client resuming here after reading on a
            // host that is ahead (this bridge lags). If Redis sequenced `since`, the seqs up
            // to it are on their way down the inbox: live messages start after it, no reset.
            // Past Redis's counter too, `since` names nothing yet: a reset to what comes next.
            Some(since) if since > last => match self.read(&mut conn.cmd, &name, 0, 0).await {
                Ok(read) if since <= read.counter && read.epoch.is_none_or(|e| e == epoch) => {
                    live_from = since + 1;
                    (Vec::new(), None)
                }
                Ok(_) => (Vec::new(), Some(live_from)),
                Err(e) => {
                    self.waiting.push(req);
                    return Err(End::Lost(e));
                }
            },
            Some(since) if since == last => (Vec::new(), None),
            Some(since) => match self.read(&mut conn.cmd, &name, since + 1, last).await {
                Ok(read) => {
                    let replay: Vec<Arc<Published>> = read
                        .messages
                        .into_iter()
                        .filter(|(seq, _)| *seq > since && *seq <= last)
                        .map(|(seq, payload)| {
                            Arc::new(Published::new(req.topic.clone(), seq, payload))
                        })
                        .collect();
                    let oldest = replay.first().map_or(live_from, |m| m.seq);
                    (replay, (oldest > since + 1).then_some(oldest))
                }
                Err(e) => {
                    self.waiting.push(req);
                    return Err(End::Lost(e));
                }
            },
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
        Ok(())
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
        let mut call = redis::cmd("EVALSHA");
        call.arg(self.read.get_hash())
            .arg(3)
            .arg(self.key(name, ":seq"))
            .arg(self.key(name, ":h"))
            .arg(self.epoch_key())
            .arg(from)
            .arg(to)
            .arg(self.config.history_max_age.as_millis().to_string());
        let values: Vec<Value> = self.within(call.query_async(cmd)).await?;
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
