//! Per-shard counters, summed into a snapshot on demand.
//!
//! Owns the counters and their snapshot. Each counter has exactly one writer, the shard that
//! owns it, so an increment is a plain load and store (no locked instruction); other threads
//! only read. [`Metrics::to_openmetrics`] writes a snapshot in the OpenMetrics text format,
//! which the engine serves at `/metrics` (see `HttpConfig`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::redis_bridge::BrokerStats;

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
}

macro_rules! shard_metrics {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// The counters of one shard.
        #[derive(Debug, Default)]
        pub(crate) struct ShardMetrics {
            $(pub(crate) $name: Counter,)*
        }

        /// Counter values at one moment, for one shard or summed over all.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct MetricsSnapshot {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        impl ShardMetrics {
            pub(crate) fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.get(),)* }
            }
        }

        impl MetricsSnapshot {
            fn add(&mut self, other: &MetricsSnapshot) {
                $(self.$name = self.$name.wrapping_add(other.$name);)*
            }

            /// Every counter as (name, help, value), in declaration order.
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
    /// Upgrades refused: a malformed or invalid request, the handler's rejection, a timeout.
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
    /// Connections failed for a protocol violation (closed with 1002, 1007 or 1009).
    protocol_errors,
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
    /// Topic messages offered to subscribers' data rings (one per subscriber).
    deliveries,
    /// Topic messages dropped by a data ring's overflow policy (drop-oldest, drop-newest,
    /// conflate).
    ring_dropped,
    /// Publishes refused to this shard's connections (rate limit, saturation, bad topic).
    publishes_refused,
    /// Requests the broker refused as malformed.
    bad_requests,
}

/// The counters that are levels, not running totals.
const GAUGES: &[&str] = &["connections_active"];

/// A snapshot handed to the encoder as a collector: one family per counter, one series per
/// shard.
#[derive(Debug)]
struct Snapshot(Metrics);

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
        Ok(())
    }
}

/// The Redis bridge's series: `broker_up` and `broker_lag_ms` are gauges, the rest counters.
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
    ];
    for (name, help, value) in counters {
        let counter = ConstCounter::new(value);
        counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
    }
    Ok(())
}

/// Metrics of every shard, as taken by [`EngineHandle::metrics`](crate::EngineHandle::metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// One snapshot per shard, indexed by shard id.
    pub shards: Vec<MetricsSnapshot>,
    /// The Redis bridge's state and counters; `None` with the in-memory broker.
    pub broker: Option<BrokerStats>,
}

impl Metrics {
    pub(crate) fn collect<'a>(shards: impl Iterator<Item = &'a ShardMetrics>) -> Self {
        Self {
            shards: shards.map(ShardMetrics::snapshot).collect(),
            broker: None,
        }
    }

    pub(crate) fn with_broker(mut self, broker: Option<BrokerStats>) -> Self {
        self.broker = broker;
        self
    }

    /// The snapshot in the OpenMetrics text format, every counter prefixed `ringcast_` with a
    /// `shard` label (counters get the `_total` suffix; `connections_active` is a gauge).
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
    fn totals_sum_every_shard() {
        let a = ShardMetrics::default();
        let b = ShardMetrics::default();
        a.messages_in.add(3);
        b.messages_in.add(4);
        b.connections_active.incr();
        b.connections_active.sub(1);
        let m = Metrics::collect([&a, &b].into_iter());
        assert_eq!(m.shards.len(), 2);
        assert_eq!(m.total().messages_in, 7);
        assert_eq!(m.total().connections_active, 0);
    }
}
