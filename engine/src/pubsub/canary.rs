//! The readiness canary: a message sent through the fan-out path to every shard on an
//! interval, so readiness turns false when a shard stops taking deliveries (a stuck handler,
//! a wedged inbox), not only when it stops answering.
//!
//! Owns the canary thread and the freshness check. The canary travels as a topic message
//! of its own topic (not in the registry, so no client can subscribe to it) through each
//! shard's inbox; the shard notes when it took one (`ShardMetrics::canary_at`) instead of
//! delivering it.

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::{
    ops::metrics::ShardMetrics,
    pubsub::{
        bus::Fanout,
        topic::{Published, Topic},
    },
    types::{clock::When, publish::Payload},
};

/// How many intervals a shard may go without a canary before it counts as not delivering.
pub(crate) const STALE_AFTER_INTERVALS: u32 = 3;

/// Starts the thread that hands a canary to every shard each `interval`, until `stop` is
/// dropped or sent to.
pub(crate) fn spawn(
    fanout: Arc<Fanout>,
    topic: Arc<Topic>,
    interval: Duration,
    stop: Receiver<()>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("ringcast-canary".into())
        .spawn(move || {
            let mut seq = 0;
            loop {
                seq += 1;
                let msg = Arc::new(Published::new(
                    topic.clone(),
                    seq,
                    Payload::Binary(bytes::Bytes::new()),
                ));
                for shard in 0..fanout.mailboxes.len() {
                    fanout.hand_off(shard, &msg);
                }
                match stop.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
                }
            }
        })
}

/// The shards that have taken no canary for `STALE_AFTER_INTERVALS` intervals, with how long
/// each has gone without one. Empty when the canary is off (`interval` zero).
pub(crate) fn stale(shards: &[Arc<ShardMetrics>], interval: Duration) -> Vec<(usize, Duration)> {
    if interval.is_zero() {
        return Vec::new();
    }
    let limit = interval * STALE_AFTER_INTERVALS;
    let now = Instant::now();
    shards
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let age = age(m, now);
            (age > limit).then_some((i, age))
        })
        .collect()
}

/// How long ago the shard took its last canary (since the process started, if never).
pub(crate) fn age(metrics: &ShardMetrics, now: Instant) -> Duration {
    let at = When::from_nanos(metrics.canary_at.get()).instant();
    now.saturating_duration_since(at)
}
