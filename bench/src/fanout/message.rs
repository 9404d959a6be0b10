//! What a message carries and where it goes: the shared monotonic clock, the payload with its
//! due time, and the spread of messages and subscribers over the topics.

use std::{
    ops::Range,
    time::{Duration, Instant},
};

use super::{TOPIC_PREFIX, TS_BYTES};

/// How many of `0..n` fall on topic `t` of `topics` (message or subscriber `i` goes to topic
/// `i % topics`).
pub(super) fn on_topic(n: u64, t: usize, topics: usize) -> u64 {
    let (t, topics) = (t as u64, topics.max(1) as u64);
    n / topics + u64::from(t < n % topics)
}

/// Deliveries that messages `range` owe to `subs` subscribers over `topics`.
pub(super) fn expected_deliveries(subs: usize, topics: usize, range: Range<u64>) -> u64 {
    (0..topics)
        .map(|t| {
            let messages = on_topic(range.end, t, topics) - on_topic(range.start, t, topics);
            on_topic(subs as u64, t, topics).saturating_mul(messages)
        })
        .fold(0u64, u64::saturating_add)
}

pub(super) fn topic_name(t: usize) -> String {
    format!("{TOPIC_PREFIX}{t}")
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock every process of the host shares, and the one
/// `Instant` reads on Linux.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call; CLOCK_MONOTONIC
    // exists on every Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// One reading of `Instant` and [`monotonic_ns`] together, to turn one into the other with a
/// single clock read per event.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    pub(super) at: Instant,
    pub(super) ns: u64,
}

impl Clock {
    pub(super) fn now() -> Self {
        let at = Instant::now();
        Self {
            ns: monotonic_ns(),
            at,
        }
    }

    /// `CLOCK_MONOTONIC` nanoseconds at `at`.
    pub(super) fn ns(self, at: Instant) -> u64 {
        match at.checked_duration_since(self.at) {
            Some(d) => self.ns.saturating_add(d.as_nanos() as u64),
            None => self
                .ns
                .saturating_sub(self.at.duration_since(at).as_nanos() as u64),
        }
    }

    /// The instant at `ns` `CLOCK_MONOTONIC` nanoseconds.
    pub(super) fn instant(self, ns: u64) -> Instant {
        if ns >= self.ns {
            self.at + Duration::from_nanos(ns - self.ns)
        } else {
            self.at
                .checked_sub(Duration::from_nanos(self.ns - ns))
                .unwrap_or(self.at)
        }
    }
}

/// Writes the payload of a message due at `ts_ns` into `out`: exactly `size` bytes (at least
/// the mode's minimum), see the module docs.
pub(super) fn write_payload(json: bool, ts_ns: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    if json {
        out.push(b'[');
        out.extend_from_slice(ts_ns.to_string().as_bytes());
        out.extend_from_slice(b",\"");
        let pad = size.saturating_sub(out.len() + 2);
        out.resize(out.len() + pad, b'x');
        out.extend_from_slice(b"\"]");
    } else {
        out.extend_from_slice(&ts_ns.to_le_bytes());
        out.extend((TS_BYTES..size).map(|i| (i % 251) as u8));
    }
}

/// The due time a payload carries, or `None` if it carries none.
pub(super) fn read_ts(json: bool, payload: &[u8]) -> Option<u64> {
    if json {
        let rest = payload.strip_prefix(b"[")?;
        let digits = &rest[..rest.iter().position(|&b| b == b',')?];
        std::str::from_utf8(digits).ok()?.parse().ok()
    } else {
        Some(u64::from_le_bytes(
            payload.get(..TS_BYTES)?.try_into().ok()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_exactly_the_size_asked_and_carry_the_timestamp() {
        let mut out = Vec::new();
        for (json, size) in [(true, 25), (true, 64), (false, 8), (false, 64)] {
            for ts in [0, 1_234_567_890, u64::MAX] {
                write_payload(json, ts, size, &mut out);
                assert_eq!(out.len(), size, "json {json}, ts {ts}");
                assert_eq!(read_ts(json, &out), Some(ts));
            }
        }
        write_payload(true, 42, 64, &mut out);
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
        assert_eq!(read_ts(true, b"\"x\""), None);
        assert_eq!(read_ts(false, &[1, 2, 3]), None);
    }

    #[test]
    fn messages_and_subscribers_spread_over_topics() {
        assert_eq!(on_topic(10, 0, 3), 4);
        assert_eq!(on_topic(10, 1, 3), 3);
        assert_eq!(on_topic(10, 2, 3), 3);
        assert_eq!(on_topic(7, 0, 1), 7);
        // 5 subscribers over 2 topics (3 + 2), messages 4..10 (3 each).
        assert_eq!(expected_deliveries(5, 2, 4..10), 3 * 3 + 2 * 3);
        assert_eq!(expected_deliveries(5, 1, 4..10), 5 * 6);
        assert_eq!(expected_deliveries(5, 3, 7..7), 0);
    }

    #[test]
    fn the_clock_converts_both_ways() {
        let clock = Clock::now();
        let later = clock.at + Duration::from_millis(5);
        assert_eq!(clock.ns(later), clock.ns + 5_000_000);
        assert_eq!(clock.instant(clock.ns + 5_000_000), later);
        let reading = monotonic_ns();
        assert!(reading >= clock.ns && reading - clock.ns < 60_000_000_000);
    }
}
