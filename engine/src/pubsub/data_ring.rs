//! Each connection's side of pub/sub, without the connection table: the shard-local topic
//! table's entries, the per-connection [`ConnPubSub`] (delivery format, overflow policy,
//! subscriptions, the data ring, drop notices, budgets) and the token bucket behind the
//! budgets. The data ring is the only place topic data may be dropped: acks, errors and
//! notices go straight onto the connection's outbound queue (the lossless control lane).

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use slab::Slab;

use crate::pubsub::topic::Topic;
use crate::{
    config::{PubSubConfig, RingOverflow},
    ops::metrics::ShardMetrics,
    types::{clock::When, publish::DeliveryFormat},
};
use bytes::Bytes;

/// `Sub::live_from` of a subscriber whose attach the backend has not answered yet: it takes
/// no live message until then.
pub(crate) const PENDING: u64 = u64::MAX;

/// Topics with subscribers on this shard.
#[derive(Debug, Default)]
pub(crate) struct LocalTopics {
    pub(crate) by_name: HashMap<Arc<str>, u32>,
    pub(crate) topics: Slab<LocalTopic>,
    /// The token of the last attach handed to a backend that answers later.
    pub(crate) last_token: u64,
}

#[derive(Debug)]
pub(crate) struct LocalTopic {
    pub(crate) topic: Arc<Topic>,
    pub(crate) subs: Vec<Sub>,
    /// Subscribers waiting for the backend's answer: (token, connection key).
    pub(crate) pending: Vec<(u64, u32)>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Sub {
    pub(crate) key: u32,
    /// Messages with a lower seq still in the inbox predate this subscription.
    pub(crate) live_from: u64,
}

/// One connection's pub/sub state, made on its first pub/sub use (boxed in the connection:
/// a connection that never subscribes pays one pointer).
#[derive(Debug)]
pub(crate) struct ConnPubSub {
    pub(crate) format: DeliveryFormat,
    pub(crate) overflow: RingOverflow,
    /// (local topic, index of this connection in that topic's subscribers).
    pub(crate) subs: Vec<(u32, u32)>,
    pub(crate) data_ring: VecDeque<Item>,
    pub(crate) data_ring_bytes: usize,
    pub(crate) drops: Vec<DropNote>,
    /// The publish time of the oldest message moved onto the socket queue since the last
    /// one was written, and the queued bytes up to its end: when they are written, the
    /// "written" latency stage is recorded.
    pub(crate) write_mark: Option<(When, usize)>,
    pub(crate) dropped: u64,
    pub(crate) publish_budget: TokenBucket,
    /// Topics subscribed to or unsubscribed from (`pubsub.subscribe_rate_per_sec`).
    pub(crate) subscribe_budget: TokenBucket,
    pub(crate) bad_request_budget: TokenBucket,
}

#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) frame: Bytes,
    pub(crate) seq: u64,
    pub(crate) topic: u32,
    /// When the message was published.
    pub(crate) at: When,
}

/// Deliveries of one topic dropped since the client last heard of it.
#[derive(Debug)]
pub(crate) struct DropNote {
    pub(crate) topic: u32,
    pub(crate) name: Arc<str>,
    pub(crate) count: u64,
    /// The highest seq dropped.
    pub(crate) last: u64,
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokenBucket {
    pub(crate) tokens: f64,
    pub(crate) burst: f64,
    pub(crate) rate: f64,
    pub(crate) at: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: f64) -> Self {
        Self {
            tokens: burst,
            burst,
            rate,
            at: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long from `now` until the bucket holds a whole token again (zero if it does).
    /// After a refused [`TokenBucket::take`], the wait that take's caller should be told.
    pub(crate) fn wait(&self, now: Instant) -> Duration {
        self.wait_for(1.0, now)
    }

    /// Takes `n` tokens at once if there are that many (`n` at most the burst: more is
    /// charged as the burst); otherwise takes none.
    pub(crate) fn take_n(&mut self, n: f64, now: Instant) -> bool {
        let n = n.min(self.burst);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// How long from `now` until the bucket holds `n` tokens (at most the burst).
    pub(crate) fn wait_for(&self, n: f64, now: Instant) -> Duration {
        let n = n.min(self.burst);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if tokens >= n || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((n - tokens) / self.rate)
    }
}

/// What became of a delivery offered to a connection's data ring.
pub(crate) enum Offer {
    Queued,
    Disconnect,
}

impl ConnPubSub {
    /// A connection's state on its first pub/sub use: raw delivery, the configured policy
    /// and budgets, nothing subscribed or waiting.
    pub(crate) fn new(s: &PubSubConfig) -> Self {
        Self {
            format: DeliveryFormat::Raw,
            overflow: s.ring_overflow,
            subs: Vec::new(),
            data_ring: VecDeque::new(),
            data_ring_bytes: 0,
            drops: Vec::new(),
            write_mark: None,
            dropped: 0,
            publish_budget: TokenBucket::new(
                f64::from(s.publish_rate_per_sec),
                f64::from(s.publish_burst.max(1)),
            ),
            subscribe_budget: TokenBucket::new(
                f64::from(s.subscribe_rate_per_sec),
                f64::from(s.subscribe_burst.max(1)),
            ),
            bad_request_budget: TokenBucket::new(1.0, f64::from(s.max_bad_requests)),
        }
    }

    /// `n` bytes of the connection's socket queue were written: once they reach the end of
    /// the marked message, records its publish-to-written latency.
    pub(crate) fn note_written(&mut self, n: usize, metrics: &ShardMetrics) {
        if let Some((at, left)) = &mut self.write_mark {
            if n >= *left {
                let now = When::from_instant(Instant::now()).as_nanos();
                metrics
                    .written_latency
                    .record_nanos(now.saturating_sub(at.as_nanos()));
                self.write_mark = None;
            } else {
                *left -= n;
            }
        }
    }

    pub(crate) fn note_drop(&mut self, topic: u32, name: &Arc<str>, seq: u64) {
        self.note_drops(topic, name, 1, seq);
    }

    /// `count` deliveries of `topic`, the highest `last`, will not reach the client. A gap
    /// that continues the topic's latest one extends it; any other is a gap of its own, so a
    /// message waiting between two gaps is announced after the first only (merging them
    /// once made the notice come after that message, leaving the first gap unannounced).
    pub(crate) fn note_drops(&mut self, topic: u32, name: &Arc<str>, count: u64, last: u64) {
        self.dropped += count;
        let first = last + 1 - count;
        match self
            .drops
            .iter_mut()
            .find(|d| d.topic == topic && d.last + 1 == first)
        {
            Some(note) => {
                note.count += count;
                note.last = last;
            }
            None => self.drops.push(DropNote {
                topic,
                name: name.clone(),
                count,
                last,
            }),
        }
    }

    /// Removes `topic`'s gaps that end before `before`; returns the topic's name, how many
    /// messages they missed and the highest missed seq.
    pub(crate) fn take_gaps(&mut self, topic: u32, before: u64) -> Option<(Arc<str>, u64, u64)> {
        let mut found: Option<(Arc<str>, u64, u64)> = None;
        self.drops.retain(|d| {
            if d.topic != topic || d.last >= before {
                return true;
            }
            let (_, count, last) = found.get_or_insert_with(|| (d.name.clone(), 0, 0));
            *count += d.count;
            *last = (*last).max(d.last);
            false
        });
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> ConnPubSub {
        ConnPubSub::new(&PubSubConfig::default())
    }

    /// Drop-newest with 11 waiting in the ring: 9 and 10 were dropped before it, 12 after.
    /// The notice before 11 must count 9 and 10 only; 12 gets its own at the end.
    #[test]
    fn a_gap_after_a_waiting_message_stays_apart_from_the_one_before_it() {
        let name: Arc<str> = "t".into();
        let mut ps = state();
        ps.note_drop(0, &name, 9);
        ps.note_drop(0, &name, 10);
        ps.note_drop(1, &name, 4); // another topic, untouched below
        ps.note_drop(0, &name, 12);
        assert_eq!(ps.dropped, 4);
        let (_, count, last) = ps.take_gaps(0, 11).expect("the gap before 11");
        assert_eq!((count, last), (2, 10));
        assert!(ps.take_gaps(0, 11).is_none(), "taken once");
        let (_, count, last) = ps.take_gaps(0, u64::MAX).expect("the gap after 11");
        assert_eq!((count, last), (1, 12));
        assert_eq!(ps.take_gaps(1, u64::MAX).map(|g| (g.1, g.2)), Some((1, 4)));
        assert!(ps.drops.is_empty());
    }

    #[test]
    fn gaps_with_no_message_between_them_are_announced_as_one() {
        let name: Arc<str> = "t".into();
        let mut ps = state();
        ps.note_drops(0, &name, 3, 5); // 3..=5
        ps.note_drop(0, &name, 8); // 6 and 7 conflated away later, say
        ps.note_drops(0, &name, 2, 7); // 6..=7: continues neither, stands alone
        let (_, count, last) = ps.take_gaps(0, 9).unwrap();
        assert_eq!((count, last), (6, 8), "3..=8, one notice before 9");
    }
}
