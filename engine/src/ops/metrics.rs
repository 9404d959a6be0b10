//! Per-shard counters, summed into a snapshot on demand.
//!
//! Owns the counters and their snapshot. Each counter has exactly one writer, the shard that
//! owns it, so an increment is a plain load and store (no locked instruction); other threads
//! only read. With the `metrics` feature, `Metrics::to_openmetrics` writes a snapshot in the
//! OpenMetrics text format, which the engine serves at `/metrics` (see `HttpConfig`); that
//! encoding is the only part of this module the feature gates.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ringcast_protocol::CloseCode;

use std::sync::Arc;

use crate::{
    ops::{
        admission::{Gate, RejectReason},
        memory,
    },
    types::{message::CloseInitiator, publish::BrokerStats},
};

/// Latency buckets: bucket `i` counts durations in (2^(i-1), 2^i] microseconds (bucket 0: up
/// to 1 us); the last one everything above 2^(LATENCY_BUCKETS-2) us (about 4.2 s).
pub const LATENCY_BUCKETS: usize = 24;

/// A latency histogram with power-of-two microsecond buckets, written by one shard.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    buckets: [Counter; LATENCY_BUCKETS],
    sum_ns: Counter,
}

impl Latency {
    /// Counts one duration of `nanos` nanoseconds: integer math only, it runs per message.
    #[inline]
    pub(crate) fn record_nanos(&self, nanos: u64) {
        let us = nanos.saturating_sub(1) / 1000; // (2^(i-1), 2^i] us lands in bucket i
        let i = (64 - us.leading_zeros()) as usize;
        self.buckets[i.min(LATENCY_BUCKETS - 1)].incr();
        self.sum_ns.add(nanos);
    }

    fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].get()),
            sum_ns: self.sum_ns.get(),
        }
    }
}

/// A latency histogram at one moment: counts per power-of-two microsecond bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LatencySnapshot {
    /// Count per bucket; see [`LATENCY_BUCKETS`].
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Sum of every recorded duration, nanoseconds.
    pub sum_ns: u64,
}

impl LatencySnapshot {
    /// Durations recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The upper bound of bucket `i` (`None` for the last, unbounded one).
    pub fn bucket_bound(i: usize) -> Option<std::time::Duration> {
        (i < LATENCY_BUCKETS - 1).then(|| std::time::Duration::from_micros(1 << i))
    }

    /// An upper bound on the `q` quantile (0 to 1): the bound of the bucket it falls in
    /// (`None` when nothing was recorded or it falls in the last bucket).
    pub fn quantile_bound(&self, q: f64) -> Option<std::time::Duration> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::bucket_bound(i);
            }
        }
        None
    }

    fn add(&mut self, other: &LatencySnapshot) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a = a.wrapping_add(b);
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }
}

/// Rejection reasons counted apart.
const REASONS: usize = RejectReason::ALL.len();
/// Close codes counted apart: 1000 to 1015, then one slot for every other code.
const CLOSE_SLOTS: usize = 17;
const INITIATORS: [CloseInitiator; 3] = [
    CloseInitiator::Peer,
    CloseInitiator::Server,
    CloseInitiator::Transport,
];

fn close_slot(code: u16) -> usize {
    match code {
        1000..=1015 => usize::from(code - 1000),
        _ => CLOSE_SLOTS - 1,
    }
}

fn initiator_index(by: CloseInitiator) -> usize {
    INITIATORS.iter().position(|&i| i == by).unwrap_or(1)
}

#[cfg(feature = "metrics")]
fn initiator_name(by: CloseInitiator) -> &'static str {
    match by {
        CloseInitiator::Peer => "peer",
        CloseInitiator::Server => "server",
        CloseInitiator::Transport => "transport",
    }
}

impl ShardMetrics {
    /// Counts a refused upgrade (the total and its reason).
    pub(crate) fn rejected(&self, reason: RejectReason) {
        self.upgrades_rejected.incr();
        self.rejections[reason.index()].incr();
    }

    /// Counts a closed connection by its close code and who started the close.
    pub(crate) fn closed(&self, code: CloseCode, by: CloseInitiator) {
        self.closes[initiator_index(by)][close_slot(code.as_u16())].incr();
    }

    /// Counts one compressed message: `plain_len` bytes in, `frame` (a whole encoded frame)
    /// out, compressed since `started`.
    pub(crate) fn deflated(&self, started: std::time::Instant, plain_len: usize, frame: &[u8]) {
        self.deflate_nanos.add(started.elapsed().as_nanos() as u64);
        self.deflate_messages.incr();
        self.deflate_bytes_in.add(plain_len as u64);
        let body = ringcast_protocol::FrameHeader::parse(frame)
            .ok()
            .flatten()
            .map_or(0, |(h, _)| h.payload_len);
        self.deflate_bytes_out.add(body);
    }
}

/// A counter written by one shard and read by any thread.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Only the owning shard calls this, so load-then-store cannot lose updates.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    #[inline]
    pub(crate) fn incr(&self) {
        self.add(1);
    }

    #[inline]
    pub(crate) fn sub(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_sub(n), Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }

    /// Sets the value (a level, such as a time stamp). Only the owning shard calls this.
    pub(crate) fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
}

macro_rules! shard_metrics {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// The counters of one shard.
        #[derive(Debug, Default)]
        pub(crate) struct ShardMetrics {
            $(pub(crate) $name: Counter,)*
            /// Refused upgrades, by [`RejectReason::index`].
            pub(crate) rejections: [Counter; REASONS],
            /// Closed connections, by initiator and close code slot (see `close_slot`).
            pub(crate) closes: [[Counter; CLOSE_SLOTS]; 3],
            /// Publish to taken from this shard's inbox and offered to subscribers.
            pub(crate) inbox_latency: Latency,
            /// Publish to moved from a subscriber's data ring onto its socket queue.
            pub(crate) queued_latency: Latency,
            /// Publish to its last byte written to the subscriber's socket.
            pub(crate) written_latency: Latency,
            /// When the shard last took a readiness canary from its inbox (`When` nanos).
            pub(crate) canary_at: Counter,
        }

        /// Counter values at one moment, for one shard or summed over all.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct MetricsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
            /// Refused upgrades by reason; read with [`MetricsSnapshot::rejected`].
            pub rejections: [u64; REASONS],
            /// Closed connections by initiator and code; read with [`MetricsSnapshot::closes`].
            pub closes: [[u64; CLOSE_SLOTS]; 3],
            /// Delivery latency, publish to taken from the shard's inbox (one per message
            /// per shard with subscribers).
            pub inbox_latency: LatencySnapshot,
            /// Delivery latency, publish to moved from a subscriber's data ring onto its
            /// socket queue, for the oldest message of each batch moved: how far behind
            /// subscribers are.
            pub queued_latency: LatencySnapshot,
            /// Delivery latency, publish to its last byte written to the subscriber's
            /// socket (handed to the kernel), for the oldest message of each batch moved.
            pub written_latency: LatencySnapshot,
        }

        impl ShardMetrics {
            pub(crate) fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.get(),)*
                    rejections: std::array::from_fn(|i| self.rejections[i].get()),
                    closes: std::array::from_fn(|by| {
                        std::array::from_fn(|slot| self.closes[by][slot].get())
                    }),
                    inbox_latency: self.inbox_latency.snapshot(),
                    queued_latency: self.queued_latency.snapshot(),
                    written_latency: self.written_latency.snapshot(),
                }
            }
        }

        impl MetricsSnapshot {
            fn add(&mut self, other: &MetricsSnapshot) {
                $(self.$name = self.$name.wrapping_add(other.$name);)*
                for (a, b) in self.rejections.iter_mut().zip(other.rejections) {
                    *a = a.wrapping_add(b);
                }
                for (row, other_row) in self.closes.iter_mut().zip(other.closes) {
                    for (a, b) in row.iter_mut().zip(other_row) {
                        *a = a.wrapping_add(b);
                    }
                }
                self.inbox_latency.add(&other.inbox_latency);
                self.queued_latency.add(&other.queued_latency);
                self.written_latency.add(&other.written_latency);
            }

            /// Refused upgrades for `reason`.
            pub fn rejected(&self, reason: RejectReason) -> u64 {
                self.rejections[reason.index()]
            }

            /// Connections closed with `code` (sent or received, 1006 for a dropped
            /// connection) where `by` started the close. Codes outside 1000 to 1015 share
            /// one count, read with any of them.
            pub fn closes(&self, code: u16, by: CloseInitiator) -> u64 {
                self.closes[initiator_index(by)][close_slot(code)]
            }

            /// Every plain counter as (name, help, value), in declaration order.
            pub fn fields(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), concat!($($doc, "\n"),*), self.$name),)*]
            }
        }
    };
}

shard_metrics! {
    /// Connections open now (TCP accepted and not yet closed), upgraded or not.
    connections_active,
    /// TCP connections accepted since start.
    connections_accepted,
    /// Upgrades completed with a 101.
    upgrades_accepted,
    /// Upgrades refused, for any reason (by reason: `upgrade_rejections`).
    upgrades_rejected,
    /// Handshakes that timed out (a subset of `upgrades_rejected`).
    handshake_timeouts,
    /// Plain HTTP requests answered by the engine's own endpoints (health, readiness,
    /// metrics).
    http_requests,
    /// Pings the server sent to quiet connections.
    pings_sent,
    /// Connections dropped because nothing came back within `pong_timeout` of a ping.
    pong_timeouts,
    /// Connections closed (1001) after `idle_timeout` without a message from the peer.
    idle_timeouts,
    /// Messages received (whole messages, after reassembly).
    messages_in,
    /// Messages queued for sending.
    messages_out,
    /// Bytes read from sockets.
    bytes_in,
    /// Bytes written to sockets.
    bytes_out,
    /// Message payload bytes compressed with permessage-deflate, before compression.
    deflate_bytes_in,
    /// What those payloads became after compression (frame headers not counted).
    deflate_bytes_out,
    /// Messages compressed with permessage-deflate (a shared frame counts once).
    deflate_messages,
    /// Time spent compressing them, in nanoseconds.
    deflate_nanos,
    /// Connections failed for a protocol violation (closed with 1002, 1007 or 1009).
    protocol_errors,
    /// Handler hooks that panicked, caught: the connection was closed with 1011 (or its
    /// upgrade answered 500; a panic in `on_close` is only counted). See `Handler`.
    handler_panics,
    /// Messages not queued because the connection's outbound limit was reached.
    outbound_dropped,
    /// Connections closed because their outbound limit was reached (slow consumers).
    slow_consumer_closes,
    /// Accepts that failed because the process ran out of file descriptors (EMFILE/ENFILE).
    accept_fd_exhausted,
    /// Accepts that failed for any other reason.
    accept_errors,
    /// Times the accept loop paused because the shard held `max_connections_per_shard`.
    accept_paused_full,
    /// Topic messages this shard took from its inbox (one per message, however many local
    /// subscribers it had).
    published_in,
    /// Topic messages published by this shard's own connections and delivered to its own
    /// subscribers in the same loop turn, not through its inbox (io_uring driver; also
    /// counted in `published_in`).
    published_local,
    /// Topic messages offered to subscribers' data rings (one per subscriber).
    deliveries,
    /// Times another thread woke this shard from its sleep with an eventfd write (io_uring
    /// driver): the wake-ups that cost a system call. A running or spinning shard
    /// (`[latency]`) is not woken: it finds its inbox on its own.
    shard_wakes,
    /// Topic messages dropped by a data ring's overflow policy (drop-oldest, drop-newest,
    /// conflate): the sum of the three counters below.
    ring_dropped,
    /// Topic messages dropped under drop-oldest (and under conflate when the ring holds only
    /// other topics).
    ring_dropped_oldest,
    /// Topic messages dropped under drop-newest.
    ring_dropped_newest,
    /// Topic messages replaced by a newer one of their topic under conflate.
    ring_dropped_conflated,
    /// Topic messages waiting in this shard's data rings, all connections together (sampled
    /// at each readiness canary, once per `http.canary_interval`).
    ring_waiting_messages,
    /// Frame bytes waiting in this shard's data rings (sampled as `ring_waiting_messages`).
    ring_waiting_bytes,
    /// Age of the oldest message waiting in any data ring of this shard, in microseconds:
    /// how far behind the most behind subscriber is (sampled as `ring_waiting_messages`;
    /// a sum over shards means nothing, take the maximum).
    subscriber_lag_max_us,
    /// Publishes refused to this shard's connections (rate limit, saturation, bad topic).
    publishes_refused,
    /// Requests the broker refused as malformed (charged to the connection's bad-request
    /// budget, `pubsub.max_bad_requests`).
    bad_requests,
    /// Times a connection's reads were paused because its publish or subscribe budget was
    /// empty (it is read again when the budget refills).
    throttled,
    /// Subscribe and unsubscribe requests refused (`rate_limited`) because the connection's
    /// subscribe budget (`pubsub.subscribe_rate_per_sec`) was spent.
    subscribes_refused,
    /// Drain: topic messages moved from must-deliver connections' data rings onto the socket
    /// ahead of their close frame.
    drain_flushed,
    /// Drain: topic messages dropped from loss-tolerant connections' data rings at their
    /// close.
    drain_dropped,
    /// Drain: connections still open at `shutdown_timeout`, closed without a handshake.
    drain_forced,
}

/// The counters that are levels, not running totals.
#[cfg(feature = "metrics")]
const GAUGES: &[&str] = &[
    "connections_active",
    "ring_waiting_messages",
    "ring_waiting_bytes",
    "subscriber_lag_max_us",
];

/// A snapshot handed to the encoder as a collector: one family per counter, one series per
/// shard.
#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Snapshot(Metrics);

/// No exemplar labels.
#[cfg(feature = "metrics")]
type NoLabels = [(&'static str, &'static str); 0];

#[cfg(feature = "metrics")]
impl prometheus_client::collector::Collector for Snapshot {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> std::fmt::Result {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{counter::ConstCounter, gauge::ConstGauge},
        };
        if let Some(b) = &self.0.broker {
            encode_broker(&mut encoder, b)?;
        }
        let per_shard: Vec<_> = self.0.shards.iter().map(MetricsSnapshot::fields).collect();
        let Some(first) = per_shard.first() else {
            return Ok(());
        };
        for (i, &(name, help, _)) in first.iter().enumerate() {
            let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
            let gauge = GAUGES.contains(&name);
            let kind = if gauge {
                ConstGauge::new(0i64).metric_type()
            } else {
                ConstCounter::new(0u64).metric_type()
            };
            let mut family = encoder.encode_descriptor(name, &help, None, kind)?;
            for (shard, fields) in per_shard.iter().enumerate() {
                let labels = [("shard", shard.to_string())];
                let series = family.encode_family(&labels)?;
                let value = fields[i].2;
                if gauge {
                    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(series)?;
                } else {
                    ConstCounter::new(value).encode(series)?;
                }
            }
        }
        let gauge = ConstGauge::new(0i64).metric_type();
        let as_gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
        if !self.0.inbox_depth.is_empty() {
            let mut family = encoder.encode_descriptor(
                "inbox_depth",
                "Topic deliveries waiting in the shard's inbox (the cross-shard queue).",
                None,
                gauge,
            )?;
            for (shard, depth) in self.0.inbox_depth.iter().enumerate() {
                let labels = [("shard", shard.to_string())];
                as_gauge(*depth).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "delivery_latency_seconds",
            "Publish-to-delivery latency by stage: inbox (taken from the shard's inbox and \
             offered to its subscribers, once per message per shard) and queued (moved from a \
             subscriber's data ring onto its socket queue, the oldest message of each batch \
             moved: subscriber lag) and written (that message's last byte written to the \
             socket).",
            None,
            prometheus_client::metrics::MetricType::Histogram,
        )?;
        for (shard, snap) in self.0.shards.iter().enumerate() {
            for (stage, lat) in [
                ("inbox", &snap.inbox_latency),
                ("queued", &snap.queued_latency),
                ("written", &snap.written_latency),
            ] {
                let labels = [("shard", shard.to_string()), ("stage", stage.to_owned())];
                let buckets: Vec<(f64, u64)> = lat
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let bound =
                            LatencySnapshot::bucket_bound(i).map_or(f64::MAX, |d| d.as_secs_f64());
                        (bound, n)
                    })
                    .collect();
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabels>(
                        lat.sum_ns as f64 / 1e9,
                        lat.count(),
                        &buckets,
                        None,
                    )?;
            }
        }
        let t = &self.0.topics;
        for (name, help, value, counter) in [
            (
                "topics",
                "Topics the process holds (at most pubsub.max_topics).",
                t.topics,
                false,
            ),
            (
                "topics_history_messages",
                "Messages held in topic histories, all topics.",
                t.history_messages,
                false,
            ),
            (
                "topics_refused",
                "New topics refused at pubsub.max_topics (too_many_topics).",
                t.refused,
                true,
            ),
            (
                "topics_expired",
                "Topics removed after pubsub.topic_idle_timeout with no subscriber and no \
                 publish.",
                t.expired,
                true,
            ),
        ] {
            if counter {
                let counter = ConstCounter::new(value);
                counter.encode(encoder.encode_descriptor(
                    name,
                    help,
                    None,
                    counter.metric_type(),
                )?)?;
            } else {
                as_gauge(value).encode(encoder.encode_descriptor(name, help, None, gauge)?)?;
            }
        }
        let m = &self.0.memory;
        for (name, help, value) in [
            (
                "memory_resident_bytes",
                "Resident memory of the process (RSS).",
                m.resident_bytes,
            ),
            (
                "memory_kernel_estimate_bytes",
                "The kernel's share for open connections: connections x \
                 admission.kernel_bytes_per_connection.",
                m.kernel_estimate_bytes,
            ),
            (
                "memory_per_connection_bytes",
                "Resident memory plus the kernel's share, per open connection.",
                m.per_connection_bytes(),
            ),
            (
                "memory_topics_estimate_bytes",
                "Topics' memory, estimated: topics x TOPIC_BYTES, plus held messages x \
                 HISTORY_MESSAGE_BYTES, plus the payload bytes held (part of the resident \
                 memory).",
                m.topics_estimate_bytes,
            ),
            (
                "host_tcp_memory_bytes",
                "Kernel TCP buffer memory of the whole host (/proc/net/sockstat).",
                m.host_tcp_bytes,
            ),
        ] {
            let family = encoder.encode_descriptor(name, help, None, gauge)?;
            as_gauge(value).encode(family)?;
        }
        let counter = ConstCounter::new(0u64).metric_type();
        let mut family = encoder.encode_descriptor(
            "upgrade_rejections",
            "Upgrade requests refused, by reason.",
            None,
            counter,
        )?;
        for (shard, snap) in self.0.shards.iter().enumerate() {
            for reason in RejectReason::ALL {
                let labels = [
                    ("shard", shard.to_string()),
                    ("reason", reason.name().into()),
                ];
                ConstCounter::new(snap.rejected(reason)).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "closes",
            "Connections closed, by close code (sent or received; 1006 for a dropped \
             connection; \"other\" for codes past 1015) and by who started the close.",
            None,
            counter,
        )?;
        for (shard, snap) in self.0.shards.iter().enumerate() {
            for (by, row) in INITIATORS.iter().zip(snap.closes) {
                for (slot, value) in row.into_iter().enumerate().filter(|&(_, v)| v > 0) {
                    let code = match slot {
                        s if s < CLOSE_SLOTS - 1 => (1000 + s).to_string(),
                        _ => "other".into(),
                    };
                    let labels = [
                        ("shard", shard.to_string()),
                        ("code", code),
                        ("initiator", initiator_name(*by).into()),
                    ];
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Memory as the kernel reports it, read when metrics are taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemoryGauges {
    /// The process's resident memory (RSS), bytes.
    pub resident_bytes: u64,
    /// The kernel's share for the open connections: connections x
    /// `admission.kernel_bytes_per_connection` (socket structures and idle buffers).
    pub kernel_estimate_bytes: u64,
    /// Kernel TCP buffer memory of the whole host, every process's sockets
    /// (`/proc/net/sockstat`), bytes.
    pub host_tcp_bytes: u64,
    /// Connections open over all shards.
    pub connections: u64,
    /// The topics' share of the resident memory, estimated: topics x
    /// [`TOPIC_BYTES`](crate::TOPIC_BYTES), plus messages held in histories x
    /// [`HISTORY_MESSAGE_BYTES`](crate::HISTORY_MESSAGE_BYTES), plus their payload bytes.
    pub topics_estimate_bytes: u64,
}

/// The topic registry: what it holds, and what it refused or removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicTotals {
    /// Topics the process holds now (at most `pubsub.max_topics`).
    pub topics: u64,
    /// New topics refused because the process held `pubsub.max_topics`.
    pub refused: u64,
    /// Topics removed after `pubsub.topic_idle_timeout` without subscribers or publishes.
    pub expired: u64,
    /// Messages held in every topic's history.
    pub history_messages: u64,
    /// Payload bytes of those messages.
    pub history_bytes: u64,
}

impl MemoryGauges {
    /// Resident plus the kernel's estimated share, per open connection (0 with none open).
    pub fn per_connection_bytes(&self) -> u64 {
        (self.resident_bytes + self.kernel_estimate_bytes)
            .checked_div(self.connections)
            .unwrap_or(0)
    }
}

/// The Redis bridge's series: `broker_up` and `broker_lag_ms` are gauges, the rest counters.
#[cfg(feature = "metrics")]
fn encode_broker(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder<'_>,
    b: &BrokerStats,
) -> std::fmt::Result {
    use prometheus_client::{
        encoding::EncodeMetric,
        metrics::{counter::ConstCounter, gauge::ConstGauge},
    };
    let gauges = [
        (
            "broker_up",
            "1 while the Redis bridge is connected",
            u64::from(b.up),
        ),
        (
            "broker_lag_ms",
            "Publish-to-receive lag of the latest message from Redis, in ms",
            b.lag_ms,
        ),
    ];
    for (name, help, value) in gauges {
        let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
        gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
    }
    let counters = [
        (
            "broker_reconnects",
            "Redis connection attempts after the first",
            b.reconnects,
        ),
        (
            "broker_errors",
            "Redis failures: connections, commands, timeouts",
            b.errors,
        ),
        (
            "broker_publishes",
            "Publishes Redis sequenced for this host",
            b.publishes,
        ),
        (
            "broker_publish_errors",
            "Publishes answered unavailable",
            b.publish_errors,
        ),
        (
            "broker_messages_in",
            "Topic messages received from Redis",
            b.messages_in,
        ),
        (
            "broker_repaired",
            "Messages fetched from history to fill a hole",
            b.repaired,
        ),
        (
            "broker_lost",
            "Messages announced as dropped after a hole",
            b.lost,
        ),
        (
            "broker_resets",
            "Topic resets announced because Redis lost its data (a new epoch)",
            b.resets,
        ),
    ];
    for (name, help, value) in counters {
        let counter = ConstCounter::new(value);
        counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
    }
    Ok(())
}

/// Metrics of every shard, as taken by [`EngineHandle::metrics`](crate::EngineHandle::metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// One snapshot per shard, indexed by shard id.
    pub shards: Vec<MetricsSnapshot>,
    /// Topic deliveries waiting in each shard's inbox (the cross-shard queue), by shard id.
    pub inbox_depth: Vec<u64>,
    /// Process memory and the kernel's share.
    pub memory: MemoryGauges,
    /// The Redis bridge's state and counters; `None` with the in-memory broker.
    pub broker: Option<BrokerStats>,
    /// The topic registry's counts.
    pub topics: TopicTotals,
}

impl Metrics {
    /// Every shard's counters, each inbox's depth, and memory read now.
    /// `inbox_depth(i)` is shard `i`'s inbox depth (the hub's count, read by the caller so
    /// that this module stays below pub/sub).
    pub(crate) fn gather(
        shards: &[Arc<ShardMetrics>],
        inbox_depth: impl Fn(usize) -> usize,
        gate: &Gate,
    ) -> Self {
        let shards: Vec<MetricsSnapshot> = shards.iter().map(|m| m.snapshot()).collect();
        let connections = shards.iter().map(|s| s.connections_active).sum();
        Self {
            inbox_depth: (0..shards.len()).map(|i| inbox_depth(i) as u64).collect(),
            shards,
            memory: MemoryGauges {
                resident_bytes: memory::resident_bytes().unwrap_or(0),
                kernel_estimate_bytes: connections * gate.kernel_bytes_per_connection(),
                host_tcp_bytes: memory::host_tcp_bytes().unwrap_or(0),
                connections,
                topics_estimate_bytes: 0,
            },
            broker: None,
            topics: TopicTotals::default(),
        }
    }

    pub(crate) fn with_broker(mut self, broker: Option<BrokerStats>) -> Self {
        self.broker = broker;
        self
    }

    /// Adds the topic registry's counts, and their memory estimate to the memory gauges.
    pub(crate) fn with_topics(mut self, topics: TopicTotals) -> Self {
        self.memory.topics_estimate_bytes = topics
            .topics
            .saturating_mul(crate::config::TOPIC_BYTES)
            .saturating_add(
                topics
                    .history_messages
                    .saturating_mul(crate::config::HISTORY_MESSAGE_BYTES),
            )
            .saturating_add(topics.history_bytes);
        self.topics = topics;
        self
    }

    /// The snapshot in the OpenMetrics text format, every counter prefixed `ringcast_` with a
    /// `shard` label (counters get the `_total` suffix; `connections_active` is a gauge).
    /// Needs the `metrics` feature.
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn to_openmetrics(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::with_prefix("ringcast");
        registry.register_collector(Box::new(Snapshot(self.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The sum over all shards.
    pub fn total(&self) -> MetricsSnapshot {
        let mut sum = MetricsSnapshot::default();
        for s in &self.shards {
            sum.add(s);
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_takes_every_shard_and_totals_sum_them() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        a.messages_in.add(3);
        b.messages_in.add(4);
        a.connections_active.add(2);
        b.connections_active.incr();
        b.connections_active.sub(1);
        b.rejected(RejectReason::Rate);
        b.rejected(RejectReason::Rate);
        a.rejected(RejectReason::Origin);
        a.closed(CloseCode::from(1000), CloseInitiator::Peer);
        b.closed(CloseCode::from(1000), CloseInitiator::Peer);
        b.closed(CloseCode::from(4000), CloseInitiator::Server);
        a.inbox_latency.record_nanos(1_500);
        b.inbox_latency.record_nanos(1_500);
        let config = crate::config::AdmissionConfig {
            kernel_bytes_per_connection: 1000,
            ..Default::default()
        };
        let gate = Gate::new(&config);
        let m = Metrics::gather(&[a, b], |i| 10 * (i + 1), &gate);
        // One snapshot and one inbox depth per shard, in shard order.
        assert_eq!(m.shards.len(), 2);
        assert_eq!((m.shards[0].messages_in, m.shards[1].messages_in), (3, 4));
        assert_eq!(m.inbox_depth, [10, 20]);
        // The kernel's share counts the connections open on every shard.
        assert_eq!(m.memory.connections, 2);
        assert_eq!(m.memory.kernel_estimate_bytes, 2000);
        assert_eq!(m.broker, None);
        let total = m.total();
        assert_eq!(total.messages_in, 7);
        assert_eq!(total.connections_active, 2);
        assert_eq!(total.upgrades_rejected, 3);
        assert_eq!(total.rejected(RejectReason::Rate), 2);
        assert_eq!(total.rejected(RejectReason::Origin), 1);
        assert_eq!(total.closes(1000, CloseInitiator::Peer), 2);
        assert_eq!(total.closes(1000, CloseInitiator::Server), 0);
        // Codes outside 1000 to 1015 share one count, read with any of them.
        assert_eq!(total.closes(4999, CloseInitiator::Server), 1);
        assert_eq!(total.inbox_latency.count(), 2);
        assert_eq!(total.inbox_latency.sum_ns, 3_000);
    }
}
