//! Per-shard counters, summed into a snapshot on demand.
//!
//! Owns the counters and their snapshot. Each counter has exactly one writer, the shard that
//! owns it, so an increment is a plain load and store (no locked instruction); other threads
//! only read. [`Metrics::to_openmetrics`] writes a snapshot in the OpenMetrics text format,
//! which the engine serves at `/metrics` (see `HttpConfig`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use ringcast_protocol::CloseCode;

use crate::{admission::RejectReason, handler::CloseInitiator};

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
        }

        impl ShardMetrics {
            pub(crate) fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot {
                    $($name: self.$name.get(),)*
                    rejections: std::array::from_fn(|i| self.rejections[i].get()),
                    closes: std::array::from_fn(|by| {
                        std::array::from_fn(|slot| self.closes[by][slot].get())
                    }),
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

/// Metrics of every shard, as taken by [`EngineHandle::metrics`](crate::EngineHandle::metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    /// One snapshot per shard, indexed by shard id.
    pub shards: Vec<MetricsSnapshot>,
}

impl Metrics {
    pub(crate) fn collect<'a>(shards: impl Iterator<Item = &'a ShardMetrics>) -> Self {
        Self {
            shards: shards.map(ShardMetrics::snapshot).collect(),
        }
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
