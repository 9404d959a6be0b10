//! # ringcast
//!
//! An io_uring, thread-per-core WebSocket engine. One shard per CPU core: a pinned OS thread
//! running its own loop on its own io_uring, its own `SO_REUSEPORT` listener, and a slab of the
//! connections it accepted. A shard reads every socket into one shared buffer, parses frames in
//! place and hands payloads to your [`Handler`] without copying; replies go out in vectored
//! writes from a bounded per-connection queue. Shards share nothing mutable.
//!
//! ## Embedding, in order
//!
//! 1. Build an [`EngineConfig`] (defaults, TOML, or both) and implement [`Handler`].
//! 2. [`Engine::start`] validates the config, binds every listener, starts the shards and
//!    returns once all of them listen; each shard calls your factory once, on its own thread.
//! 3. Handlers run on their shard: decide upgrades, react to messages through [`Ctx`].
//! 4. [`EngineHandle::stop`] (any thread) drains: every connection gets close 1012, spread
//!    over `timeouts.drain_window`, and the shards stop; [`Engine::wait`] joins them.
//!
//! ```
//! use ringcast::{Ctx, Engine, EngineConfig, Handler, Message};
//!
//! /// Answers every text message with its length.
//! struct Counter;
//!
//! impl Handler for Counter {
//!     fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
//!         let _ = ctx.send_text(msg.payload().len().to_string());
//!     }
//! }
//!
//! let config = EngineConfig::default()
//!     .with_listen("127.0.0.1:0".parse().unwrap())
//!     .with_shards(1);
//! let engine = Engine::start(config, |_shard| Counter)?;
//! let url = format!("ws://{}/", engine.local_addr());
//!
//! let (mut ws, _) = tungstenite::connect(&url).expect("connect");
//! ws.send(tungstenite::Message::text("hello")).unwrap();
//! assert_eq!(ws.read().unwrap(), tungstenite::Message::text("5"));
//!
//! drop(ws); // hang up, so the shutdown below need not wait for a close reply
//! engine.handle().stop();
//! engine.wait()?;
//! # Ok::<(), ringcast::Error>(())
//! ```
//!
//! ## Defaults
//!
//! | setting | default | where |
//! |---|---|---|
//! | listen address | `127.0.0.1:9000` | [`EngineConfig::listen`] |
//! | shards | one per CPU the process may use, pinned | [`EngineConfig::shards`] |
//! | driver | io_uring, no silent fallback | [`EngineConfig::driver`] |
//! | max frame / message | 16 MiB / 16 MiB | [`LimitsConfig`] |
//! | max upgrade head | 8 KiB | [`LimitsConfig::max_header_bytes`] |
//! | outbound queue | 1 MiB per connection, then disconnect with 1008 | [`LimitsConfig`] |
//! | connections per shard | 65536 | [`LimitsConfig::max_connections_per_shard`] |
//! | handshake / close / shutdown timeouts | 10 s / 5 s / 10 s | [`TimeoutsConfig`] |
//! | read buffer | 64 KiB per shard (not per connection) | [`IoConfig::read_buffer_bytes`] |
//! | topic history | 1024 messages or 1 MiB per topic | [`PubSubConfig`] |
//! | data ring | 1024 messages or 1 MiB per connection, drop-oldest | [`PubSubConfig`] |
//! | subscriptions / publishes | 256 per connection / 1000 per s, burst 1000 | [`PubSubConfig`] |
//! | subscribes + unsubscribes | 100 topics per s per connection, burst 512 | [`PubSubConfig::subscribe_rate_per_sec`] |
//! | topics per subscribe / unsubscribe request | 1024, then `too_large` | [`PubSubConfig::max_topics_per_request`] |
//! | topics | 100,000 per process; idle ones (no subscriber, no publish) removed after 60 s | [`PubSubConfig::max_topics`] |
//! | bad requests before 1008 | 20, refilled at 1 per s | [`PubSubConfig::max_bad_requests`] |
//! | JSON payload nesting | 64 levels of arrays and objects | [`PubSubConfig::max_json_depth`] |
//! | heartbeat | ping after 30 s quiet, pong within 10 s | [`TimeoutsConfig`] |
//! | drain | 1012 spread over 2 s, exit by 10 s | [`TimeoutsConfig::drain_window`] |
//! | origins, per-IP / per-user caps, upgrade rate | off | [`AdmissionConfig`] |
//! | token auth (broker) | off | [`AuthConfig`] |
//! | broker backend | in memory; `redis://HOST:PORT` for several hosts | [`BrokerConfig`] |
//! | permessage-deflate | off; `shared` or `dedicated`, level 1, 256-byte threshold | [`CompressionConfig`] |
//!
//! ## Pub/sub
//!
//! Topics live in the process (the in-memory broker backend), or in Redis when
//! [`BrokerConfig::url`] names one, shared by every host using it (see [`BrokerConfig`]).
//! [`Ctx::subscribe`] puts a
//! connection on a topic, optionally replaying history after a seq; [`Ctx::publish`] and
//! [`Publisher::publish`] (any thread) sequence a message under the topic's lock and hand it
//! to every shard with subscribers, where it is framed once per delivery format and queued to
//! each subscriber's data ring. [`Broker`] is the wire protocol of `protocol/PROTOCOL.md` on
//! top of these calls; [`Broadcast`] is the raw all-to-all benchmark server.
//!
//! ## Features
//!
//! Four, all on by default, because a server expects them; an embedder that needs fewer
//! takes `default-features = false` and names the ones it uses. The counts are crates in the
//! normal dependency tree (`cargo tree -p ringcast -e normal --prefix none`, deduplicated),
//! ringcast itself included: 55 with no features, 167 with all four.
//!
//! | feature | adds | crates (alone) |
//! |---|---|---|
//! | `redis` | the Redis broker backend, [`BrokerConfig::url`] `= "redis://..."`: the `redis` crate's async client on a current-thread tokio runtime in one bridge thread | +45 (100) |
//! | `jwt` | token auth at the upgrade ([`AuthConfig`]): `Auth`, `Grants`, `AuthError` and `Broker::with_auth`, JWT signatures checked by `jsonwebtoken` with pure-Rust crypto | +55 (110) |
//! | `metrics` | `/metrics` in the OpenMetrics text format and `Metrics::to_openmetrics`, encoded by `prometheus-client` | +8 (63) |
//! | `epoll` | the epoll driver, [`EngineConfig::driver`] `= "epoll"`, for hosts where io_uring is disabled or blocked: monoio's runtime with its legacy driver (mio) and its `poll-io` readiness IO, which uses tokio's IO traits (a bare tokio: no features, no runtime) | +16 (71) |
//!
//! A config that asks for a part the build leaves out is refused, never half-served:
//! [`EngineConfig::validate`] (so [`Engine::start`] too) returns [`ConfigError::Invalid`]
//! naming the key and the feature for `broker.url = "redis://..."` without `redis`, for
//! `auth.required = true` without `jwt` and for `driver = "epoll"` without `epoll` (the value
//! still parses, so one config file serves every build). Without `metrics` every counter is
//! still kept and read through [`EngineHandle::metrics`] (and [`BrokerStats`] stays in the
//! API, always `None` without `redis`); only the text encoding is missing, so
//! `[http] metrics_path` answers 404 with a plain-text body naming the feature, where a
//! scraper's operator sees it.
//!
//! Without any feature the tree has none of redis, jsonwebtoken, prometheus-client, monoio,
//! mio or tokio: the io_uring driver is the engine's own loop on the `io-uring` crate.
//!
//! This crate is the library only: the `ringcast` command (`ringcast serve`, with mimalloc as
//! its global allocator, clap, signal handling and log output, and all four features) is the
//! `ringcast-cli` crate, and the host checks and capacity planning behind `ringcast doctor`
//! and `ringcast capacity` are the `ringcast-tuning` crate. Embedders choose their own
//! allocator and logging.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(unsafe_op_in_unsafe_fn)]

/// The README's example, compiled as a doctest so it cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

mod api;
mod broker;
mod config;
mod conn;
mod driver;
mod error;
mod ops;
mod pubsub;
mod runtime;
mod shard;
mod types;

use std::{net::SocketAddr, sync::Arc, thread, time::Duration};

pub use api::handler::{Ctx, Handler};
pub use broker::{Broadcast, Broker};
pub use config::{
    AdmissionConfig, AuthConfig, BrokerConfig, CompressionConfig, CompressionMode, Driver,
    EngineConfig, HttpConfig, IoConfig, LatencyConfig, LatencyMode, LimitsConfig, OverflowPolicy,
    PubSubConfig, RingOverflow, TimeoutsConfig, HISTORY_MESSAGE_BYTES, KERNEL_BYTES_PER_CONNECTION,
    TOPIC_BYTES,
};
pub use conn::table::ConnInfo;
pub use error::{ConfigError, Error, Result};
#[cfg(feature = "jwt")]
#[cfg_attr(docsrs, doc(cfg(feature = "jwt")))]
pub use ops::auth::{Auth, AuthError, Grants};
// Without `jwt` the broker's auth paths name these stand-ins, which have no values.
#[cfg(not(feature = "jwt"))]
pub(crate) use ops::auth::{Auth, Grants};
pub use ops::{
    admission::RejectReason,
    metrics::{
        LatencySnapshot, MemoryGauges, Metrics, MetricsSnapshot, TopicTotals, LATENCY_BUCKETS,
    },
};
pub use pubsub::{
    hub::{Publisher, TopicPublisher},
    notices::error_frame,
};
/// The protocol crate, re-exported for its types ([`protocol::CloseCode`],
/// [`protocol::UpgradeRequest`], ...).
pub use ringcast_protocol as protocol;
pub use types::{
    ids::{ConnId, ShardId},
    message::{
        CloseInfo, CloseInitiator, Enqueue, Frame, Message, SubscribeError, Subscribed, Upgrade,
        UpgradeCtx,
    },
    publish::{BrokerStats, DeliveryFormat, Payload, PublishError, PublishReceipt, TopicStats},
};

use crate::{
    conn::table::Settings,
    ops::metrics::ShardMetrics,
    pubsub::{
        bus::{Mailbox, ShardMsg},
        hub::Hub,
    },
    runtime::ShardSpec,
};

/// A running engine: its shard threads and a handle to control them.
///
/// Dropping an `Engine` stops it and waits for its shards, as [`Engine::stop`] does.
#[derive(Debug)]
pub struct Engine {
    handle: EngineHandle,
    threads: Vec<thread::JoinHandle<()>>,
    /// The readiness canary's thread and the sender whose drop stops it.
    canary: Option<(crossbeam_channel::Sender<()>, thread::JoinHandle<()>)>,
    /// The thread that expires idle topics (`ringcast-topics`), and the sender whose drop
    /// stops it.
    sweeper: Option<(crossbeam_channel::Sender<()>, thread::JoinHandle<()>)>,
}

/// Controls a running engine from any thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

#[derive(Debug)]
struct HandleInner {
    mailboxes: Vec<Mailbox>,
    metrics: Vec<Arc<ShardMetrics>>,
    hub: Arc<Hub>,
    gate: Arc<crate::ops::admission::Gate>,
    local_addr: SocketAddr,
    driver: Driver,
    canary_interval: std::time::Duration,
    /// Set by [`EngineHandle::stop`]: not ready from then on.
    stopped: std::sync::atomic::AtomicBool,
}

impl Engine {
    /// Validates `config`, binds the listeners, starts the shards, and returns once every
    /// shard listens. `factory` runs once on each shard's thread to make its handler.
    ///
    /// # Errors
    /// An invalid config, an address that cannot be bound (in use, even by another process
    /// using `SO_REUSEPORT`), an io_uring that cannot be set up (unless `driver = "epoll"`),
    /// or a shard that died while starting. Shards already started are stopped first.
    pub fn start<H, F>(config: EngineConfig, factory: F) -> Result<Engine>
    where
        H: Handler,
        F: Fn(ShardId) -> H + Send + Sync + 'static,
    {
        config.validate()?;
        // Read the CPU set before any thread is pinned: it is the calling thread's set.
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let count = config.effective_shards();
        let listeners = crate::driver::listener::bind_all(
            config.listen,
            count,
            config.io.listen_backlog,
            config.driver,
        )?;
        let local_addr = listeners[0].local_addr().map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
        let factory = Arc::new(factory);
        // Every inbox exists before any shard starts: the hub sends to all of them.
        let (all_mailboxes, inboxes): (Vec<_>, Vec<_>) =
            (0..count).map(|_| crate::pubsub::bus::channel()).unzip();
        let hub = Arc::new(hub(&config, all_mailboxes.clone())?);
        let gate = Arc::new(crate::ops::admission::Gate::new(&config.admission));
        let canary_topic = Hub::unregistered_topic("$ringcast.canary");
        let mut mailboxes = Vec::with_capacity(count);
        let mut metrics = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        let mut readiness = Vec::with_capacity(count);
        let mut failure = None;
        let all_metrics: Arc<[Arc<ShardMetrics>]> = (0..count)
            .map(|_| Arc::new(ShardMetrics::default()))
            .collect();
        for ((i, listener), (mailbox, inbox)) in listeners
            .into_iter()
            .enumerate()
            .zip(all_mailboxes.into_iter().zip(inboxes))
        {
            let shard_metrics = all_metrics[i].clone();
            let (ready, ready_rx) = crossbeam_channel::bounded(1);
            let spec = ShardSpec {
                id: ShardId(i as u16),
                listener,
                inbox,
                core: (config.pin_shards && !cores.is_empty()).then(|| cores[i % cores.len()]),
                driver: config.driver,
                uring_entries: config.io.uring_entries,
                ring_buffers: config.io.ring_buffers,
                ring_buffer_bytes: config.io.ring_buffer_bytes,
                settings: Settings::new(&config),
                metrics: shard_metrics.clone(),
                all_metrics: all_metrics.clone(),
                hub: hub.clone(),
                gate: gate.clone(),
                canary: canary_topic.clone(),
                canary_interval: config.http.canary_interval,
                spin: Duration::from_micros(config.latency.spin_us),
                latency_mode: config.latency.mode,
                ready,
            };
            match crate::runtime::spawn(spec, factory.clone()) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    failure = Some(Error::Spawn(e));
                    break;
                }
            }
            mailboxes.push(mailbox);
            metrics.push(shard_metrics);
            readiness.push(ready_rx);
        }
        let mut engine = Engine {
            handle: EngineHandle {
                inner: Arc::new(HandleInner {
                    mailboxes,
                    metrics,
                    hub,
                    gate,
                    local_addr,
                    driver: config.driver,
                    canary_interval: config.http.canary_interval,
                    stopped: std::sync::atomic::AtomicBool::new(false),
                }),
            },
            threads,
            canary: None,
            sweeper: None,
        };
        if failure.is_none() {
            for (i, ready) in readiness.iter().enumerate() {
                match ready.recv() {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        failure = Some(e);
                        break;
                    }
                    Err(_) => {
                        failure = Some(Error::ShardPanicked(i));
                        break;
                    }
                }
            }
        }
        if failure.is_none() && !config.http.canary_interval.is_zero() {
            let (stop, stopped) = crossbeam_channel::bounded(1);
            match crate::pubsub::canary::spawn(
                engine.handle.inner.hub.fanout_handle(),
                canary_topic,
                config.http.canary_interval,
                stopped,
            ) {
                Ok(thread) => engine.canary = Some((stop, thread)),
                Err(e) => failure = Some(Error::Spawn(e)),
            }
        }
        if failure.is_none() {
            let (stop, stopped) = crossbeam_channel::bounded(1);
            match Hub::spawn_sweeper(engine.handle.inner.hub.clone(), stopped) {
                Ok(Some(thread)) => engine.sweeper = Some((stop, thread)),
                Ok(None) => {}
                Err(e) => failure = Some(Error::Spawn(e)),
            }
        }
        match failure {
            None => Ok(engine),
            Some(e) => {
                // Dropping stops and joins whatever did start.
                drop(engine);
                Err(e)
            }
        }
    }

    /// The address the shards listen on (with the real port when the config said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }

    /// A handle that can stop the engine and read its metrics from any thread.
    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Waits until every shard has stopped (after [`EngineHandle::stop`]). Call it at once
    /// if you like: until the stop the engine runs, and stays ready, as if nobody waited.
    ///
    /// # Errors
    /// [`Error::ShardPanicked`] if a shard thread panicked.
    pub fn wait(mut self) -> Result<()> {
        self.join()
    }

    /// Stops the engine and waits for it: [`EngineHandle::stop`] then [`Engine::wait`].
    ///
    /// # Errors
    /// As [`Engine::wait`].
    pub fn stop(self) -> Result<()> {
        self.handle.stop();
        self.wait()
    }

    /// Joins the shards, then stops the canary. In that order: the shards run until
    /// [`EngineHandle::stop`], however early `wait` was called, and readiness needs the
    /// canary for as long as they run (through the drain too).
    fn join(&mut self) -> Result<()> {
        let mut result = Ok(());
        for (i, thread) in self.threads.drain(..).enumerate() {
            if thread.join().is_err() && result.is_ok() {
                result = Err(Error::ShardPanicked(i));
            }
        }
        for (stop, thread) in [self.canary.take(), self.sweeper.take()]
            .into_iter()
            .flatten()
        {
            drop(stop);
            let _ = thread.join();
        }
        self.handle.inner.hub.stop();
        result
    }
}

/// The hub with the backend the config names: in memory, or Redis through a bridge thread.
fn hub(config: &EngineConfig, mailboxes: Vec<Mailbox>) -> Result<Hub> {
    if !config.broker.is_redis() {
        return Ok(Hub::new(&config.pubsub, mailboxes));
    }
    let fanout = Hub::fanout(mailboxes);
    let bridge = crate::pubsub::redis::Bridge::start(
        &config.broker,
        config.pubsub.history_max_messages,
        fanout.clone(),
    )
    .map_err(|e| {
        tracing::error!(error = %e, "broker.url");
        ConfigError::Invalid {
            key: "broker.url",
            why: "not a usable Redis URL",
        }
    })?;
    Ok(Hub::with_backend(
        &config.pubsub,
        fanout,
        crate::pubsub::hub::Backend::Redis(bridge),
    ))
}

impl Drop for Engine {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.handle.stop();
            let _ = self.join();
        }
    }
}

impl EngineHandle {
    /// Drains and stops every shard: through the drain window the listeners still accept,
    /// but upgrades get 503 with `Retry-After` and `/readyz` answers 503 "draining"; every
    /// open connection gets close 1012 "service restart" at a random moment of
    /// `timeouts.drain_window` (envelope clients a `shutdown` notice first; must-deliver
    /// connections everything their data ring holds first), the shards wait for the closing
    /// handshakes until `timeouts.shutdown_timeout` after this call, and exit. Counters
    /// `drain_flushed`, `drain_dropped` and `drain_forced` report what became of queued data.
    /// Returns at once; [`Engine::wait`] waits. Calling it again is harmless.
    pub fn stop(&self) {
        self.inner
            .stopped
            .store(true, std::sync::atomic::Ordering::Relaxed);
        for mailbox in &self.inner.mailboxes {
            let _ = mailbox.send(ShardMsg::Stop);
        }
    }

    /// The address the shards listen on.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.inner.mailboxes.len()
    }

    /// The IO driver the shards run.
    pub fn driver(&self) -> Driver {
        self.inner.driver
    }

    /// A handle that publishes to topics from any thread.
    pub fn publisher(&self) -> Publisher {
        Publisher {
            hub: self.inner.hub.clone(),
        }
    }

    /// Current counters of every shard, and of the Redis bridge when that is the broker.
    pub fn metrics(&self) -> Metrics {
        Metrics::gather(
            &self.inner.metrics,
            |i| self.inner.hub.inbox_depth(i),
            &self.inner.gate,
        )
        .with_broker(self.inner.hub.broker_stats())
        .with_topics(self.inner.hub.counts())
    }

    /// Whether the engine is ready for traffic, as `/readyz` answers it: not stopping, the
    /// broker can order publishes ([`EngineHandle::broker_ready`]) and every shard took a
    /// readiness canary from its inbox within the last 3 `http.canary_interval`s.
    pub fn ready(&self) -> bool {
        !self
            .inner
            .stopped
            .load(std::sync::atomic::Ordering::Relaxed)
            && self.broker_ready()
            && crate::pubsub::canary::stale(&self.inner.metrics, self.inner.canary_interval)
                .is_empty()
    }

    /// Whether the broker backend can order publishes now: always true in memory; with
    /// Redis, true while the bridge is connected with every local topic subscribed. `/readyz`
    /// answers 503 "broker unavailable" while this is false.
    pub fn broker_ready(&self) -> bool {
        self.inner.hub.ready()
    }

    /// The Redis bridge's state and counters; `None` with the in-memory broker.
    pub fn broker_stats(&self) -> Option<BrokerStats> {
        self.inner.hub.broker_stats()
    }
}
