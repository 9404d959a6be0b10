//! Unfinished upgrades: the connections of a shard still sending their upgrade request.
//!
//! Owns the shard's list of them, oldest first, so that they are the first to go when the
//! shard is full or the process runs out of descriptors (`Shard::evict_oldest`); what each
//! holds under `admission.max_pending_handshakes_per_ip`; the answer given to a connection
//! dropped before its upgrade (written at once, not queued: it is closed right after, so its
//! descriptor is free at once instead of after `close_timeout`); and the rate-limited log
//! line for all of it. A connection enters at accept (`ConnTable::insert`) and leaves when
//! its phase leaves `Handshake` (`ConnTable::left_handshake`).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    os::fd::RawFd,
    time::{Duration, Instant},
};

use tracing::warn;

use crate::types::ids::ShardId;

/// Unfinished upgrades evicted at once when an accept finds no descriptor left. Each frees a
/// descriptor for one connection waiting in the backlog; a batch lets the accepts that follow
/// proceed without a failed accept each (a failed accept, and the wait for the evicted
/// sockets to close, cost a loop turn or two). Those evicted are the oldest unfinished
/// upgrades, which a client that sends its request at once never is.
pub(crate) const EVICT_BATCH: usize = 128;

/// Evicted connections whose socket may still be open (io_uring: its operations are being
/// cancelled) before the shard stops taking connections in their place: a full shard's slab
/// grows past `max_connections_per_shard` by at most this many.
pub(crate) const EVICT_IN_FLIGHT: usize = 64;

/// A connection younger than this is not evicted: its first read may not have happened yet,
/// and a client's request is usually in its socket already. Evicting only older ones also
/// keeps a burst of accepts from evicting each other.
pub(crate) const MIN_EVICT_AGE: Duration = Duration::from_millis(10);

/// The shortest time between two log lines about shed upgrades, per shard.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why unfinished upgrades were evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// The shard holds `limits.max_connections_per_shard`.
    ShardFull,
    /// Accept failed with EMFILE or ENFILE.
    OutOfDescriptors,
}

impl Cause {
    fn text(self) -> &'static str {
        match self {
            Cause::ShardFull => "shard at limits.max_connections_per_shard",
            Cause::OutOfDescriptors => "out of file descriptors",
        }
    }
}

/// One shard's unfinished upgrades.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// Each pending connection by slab key: its generation and the address it counts under
    /// (when addresses are capped).
    live: HashMap<usize, (u32, Option<IpAddr>)>,
    /// (key, generation, accepted at) in accept order, oldest first. Entries of connections
    /// that have left the handshake stay until met at the front, or until a compaction.
    order: VecDeque<(usize, u32, Instant)>,
    /// Connections evicted whose slot is not released yet.
    pub(crate) evicting: usize,
    log: ShedLog,
}

impl Pending {
    /// Pending connections now.
    pub(crate) fn len(&self) -> usize {
        self.live.len()
    }

    /// Whether one more connection may take an evicted one's place now.
    pub(crate) fn can_evict(&mut self, now: Instant) -> bool {
        self.evicting < EVICT_IN_FLIGHT && self.evictable_at().is_some_and(|at| at <= now)
    }

    /// When the oldest pending connection may be evicted ([`MIN_EVICT_AGE`]).
    pub(crate) fn evictable_at(&mut self) -> Option<Instant> {
        self.drop_stale();
        self.order.front().map(|&(_, _, at)| at + MIN_EVICT_AGE)
    }

    /// A new connection, counted under `ip` (if counted).
    pub(crate) fn add(&mut self, key: usize, gen: u32, ip: Option<IpAddr>) {
        self.live.insert(key, (gen, ip));
        self.order.push_back((key, gen, Instant::now()));
    }

    fn is_live(&self, key: usize, gen: u32) -> bool {
        self.live.get(&key).is_some_and(|&(g, _)| g == gen)
    }

    /// Drops entries of connections that left from the front.
    fn drop_stale(&mut self) {
        while let Some(&(key, gen, _)) = self.order.front() {
            if self.is_live(key, gen) {
                return;
            }
            self.order.pop_front();
        }
    }

    /// The connection left its handshake: returns the address it was counted under.
    pub(crate) fn remove(&mut self, key: usize, gen: u32) -> Option<IpAddr> {
        let ip = match self.live.get(&key) {
            Some(&(g, ip)) if g == gen => {
                self.live.remove(&key);
                ip
            }
            _ => return None,
        };
        // Upgrades finish in any order: drop entries that left while an older one stays, so
        // the list stays within a few times the pending count.
        if self.order.len() > 64 && self.order.len() > 4 * self.live.len() {
            let live = &self.live;
            self.order
                .retain(|(k, g, _)| live.get(k).is_some_and(|&(lg, _)| lg == *g));
        }
        ip
    }

    /// The oldest pending connection if it is at least [`MIN_EVICT_AGE`] old, taken off the
    /// list (the caller ends it).
    pub(crate) fn take_oldest(&mut self, now: Instant) -> Option<usize> {
        if self.evictable_at()? > now {
            return None;
        }
        self.order.pop_front().map(|(key, _, _)| key)
    }

    /// Counts connections shed and logs, at most every [`LOG_EVERY`] per shard.
    /// `cause` is why the evictions were made, if any were.
    pub(crate) fn shed(
        &mut self,
        shard: ShardId,
        evicted: u64,
        refused: u64,
        cause: Option<Cause>,
    ) {
        self.log
            .note(shard, evicted, refused, cause, self.live.len());
    }
}

/// The rate-limited log line for shed upgrades: the first at once, then at most one every
/// [`LOG_EVERY`], each with the counts since the one before.
#[derive(Debug, Default)]
struct ShedLog {
    last: Option<Instant>,
    evicted: u64,
    refused: u64,
    cause: Option<Cause>,
}

impl ShedLog {
    fn note(
        &mut self,
        shard: ShardId,
        evicted: u64,
        refused: u64,
        cause: Option<Cause>,
        pending: usize,
    ) {
        self.evicted += evicted;
        self.refused += refused;
        self.cause = cause.or(self.cause);
        let now = Instant::now();
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            return;
        }
        self.last = Some(now);
        warn!(
            shard = %shard,
            evicted_oldest = self.evicted,
            refused_over_cap = self.refused,
            pending,
            last_eviction_cause = self.cause.map_or("none", Cause::text),
            "unfinished upgrades shed: the oldest evicted to make room (503), new ones over \
             admission.max_pending_handshakes_per_ip refused (429); counted in \
             upgrade_rejections, logged at most every 10 s"
        );
        self.evicted = 0;
        self.refused = 0;
        self.cause = None;
    }
}

/// Answers a connection dropped before its upgrade, without waiting: one non-blocking send
/// (nothing was written to the socket yet, so its buffer takes a short answer whole). With
/// `drain`, what the peer sent so far is read first: a socket closed with unread bytes sends
/// a reset, which may destroy the answer at the peer. Best effort: a failure only means the
/// peer sees a plain close.
pub(crate) fn answer_now(fd: RawFd, response: &[u8], drain: bool) {
    if drain {
        let mut sink = [0u8; 2048];
        for _ in 0..4 {
            // SAFETY: `fd` is a socket the caller owns; `sink` is valid for its length.
            let n =
                unsafe { libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT) };
            if n < sink.len() as isize {
                break;
            }
        }
    }
    // SAFETY: as above; `response` is valid for its length. MSG_NOSIGNAL: a peer already
    // gone is an EPIPE, not a SIGPIPE.
    let _ = unsafe {
        libc::send(
            fd,
            response.as_ptr().cast(),
            response.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_still_pending_comes_first_and_the_list_stays_compact() {
        let mut p = Pending::default();
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        for key in 0..10 {
            p.add(key, 1, Some(ip));
        }
        let now = Instant::now();
        assert_eq!(p.take_oldest(now), None, "too young to evict");
        assert!(!p.can_evict(now));
        let now = now + MIN_EVICT_AGE;
        assert_eq!(p.remove(0, 1), Some(ip));
        assert_eq!(p.remove(1, 2), None, "another generation");
        assert_eq!(p.take_oldest(now), Some(1));
        assert_eq!(p.remove(1, 1), Some(ip));
        assert_eq!(p.len(), 8);
        // Key 2 is reused by a new connection after leaving: the old entry is skipped.
        assert_eq!(p.remove(2, 1), Some(ip));
        p.add(2, 7, None);
        assert_eq!(p.take_oldest(now), Some(3));
        // Many quick upgrades behind one slow one: the order list is compacted.
        for key in 100..1100 {
            p.add(key, 1, None);
            p.remove(key, 1);
        }
        assert!(p.order.len() <= 4 * p.len() + 64, "{}", p.order.len());
        assert!(p.can_evict(now));
        p.evicting = EVICT_IN_FLIGHT;
        assert!(!p.can_evict(now));
    }
}
