//! Admission at the upgrade, before the handler: the origin allow-list, connections per peer
//! address and per user (counted over every shard), and each shard's upgrade-rate bucket.
//!
//! Owns [`Gate`], shared by all shards, and [`RejectReason`], the label every refused
//! upgrade is counted under. The caps are counted in striped maps so that shards upgrading
//! at once rarely meet on one lock; nothing here is touched on the message path.

use std::{
    collections::HashMap,
    hash::{BuildHasher, Hash, RandomState},
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use wildmatch::WildMatch;

use crate::{config::AdmissionConfig, ops::memory};

/// How often the memory budget is checked against a fresh reading.
const MEMORY_SAMPLE: Duration = Duration::from_millis(100);

/// Why an upgrade request was refused: the `reason` label of
/// `ringcast_upgrade_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectReason {
    /// Not a valid WebSocket upgrade request (400, 405, 426, 431, ...).
    BadRequest,
    /// The request did not arrive within `timeouts.handshake_timeout` (408).
    Timeout,
    /// The engine is stopping (503).
    Draining,
    /// Over the shard's upgrade rate, `admission.upgrades_per_sec` (503).
    Rate,
    /// Memory at `admission.memory_budget_bytes` (503).
    Memory,
    /// An `Origin` not on `admission.allowed_origins`, or none when one is required (403).
    Origin,
    /// The peer address holds `admission.max_connections_per_ip` connections (429).
    IpCap,
    /// The user holds `admission.max_connections_per_user` connections (429).
    UserCap,
    /// The handler refused: a 401 from token auth, or any status it chose.
    Handler,
    /// Refused at accept: the peer address holds `admission.max_pending_handshakes_per_ip`
    /// unfinished upgrades (429, then closed at once).
    PendingIpCap,
    /// An unfinished upgrade evicted, oldest first, to make room for a new connection: the
    /// shard was at `limits.max_connections_per_shard` or the process out of descriptors
    /// (503, then closed at once).
    Evicted,
}

impl RejectReason {
    /// Every reason, in label order.
    pub const ALL: [RejectReason; 11] = [
        RejectReason::BadRequest,
        RejectReason::Timeout,
        RejectReason::Draining,
        RejectReason::Rate,
        RejectReason::Memory,
        RejectReason::Origin,
        RejectReason::IpCap,
        RejectReason::UserCap,
        RejectReason::Handler,
        RejectReason::PendingIpCap,
        RejectReason::Evicted,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            RejectReason::BadRequest => "bad_request",
            RejectReason::Timeout => "timeout",
            RejectReason::Draining => "draining",
            RejectReason::Rate => "rate",
            RejectReason::Memory => "memory",
            RejectReason::Origin => "origin",
            RejectReason::IpCap => "ip_cap",
            RejectReason::UserCap => "user_cap",
            RejectReason::Handler => "handler",
            RejectReason::PendingIpCap => "pending_ip_cap",
            RejectReason::Evicted => "evicted",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// Locks per map: enough that shards rarely contend, few enough to stay small.
const STRIPES: usize = 16;

/// Open connections per key, in [`STRIPES`] independently locked maps.
#[derive(Debug)]
struct Counts<K> {
    hasher: RandomState,
    stripes: Box<[Mutex<HashMap<K, u32>>]>,
}

impl<K: Hash + Eq> Counts<K> {
    fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }

    fn stripe<Q: Hash + ?Sized>(&self, key: &Q) -> std::sync::MutexGuard<'_, HashMap<K, u32>> {
        let i = self.hasher.hash_one(key) as usize % STRIPES;
        // A panic while holding a count lock leaves the counts as they were: keep going.
        self.stripes[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more connection for `key` unless it already holds `cap`.
    fn acquire(&self, key: K, cap: u32) -> bool {
        let mut map = self.stripe(&key);
        let n = map.entry(key).or_insert(0);
        if *n >= cap {
            return false;
        }
        *n += 1;
        true
    }

    /// Counts one connection of `key` fewer.
    fn release<Q>(&self, key: &Q)
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.stripe(key);
        if let Some(n) = map.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                map.remove(key);
            }
        }
    }

    #[cfg(test)]
    fn get<Q>(&self, key: &Q) -> u32
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.stripe(key).get(key).copied().unwrap_or(0)
    }
}

/// The admission checks every shard shares.
#[derive(Debug)]
pub(crate) struct Gate {
    origins: Vec<WildMatch>,
    require_origin: bool,
    per_ip: u32,
    per_user: u32,
    pending_per_ip: u32,
    ips: Counts<IpAddr>,
    /// Unfinished upgrades per address (IPv6 by /64, see [`pending_key`]).
    pending_ips: Counts<IpAddr>,
    users: Counts<Box<str>>,
    retry_after_max: u64,
    memory_budget: u64,
    kernel_per_conn: u64,
    /// The last memory sample (resident plus the kernel's share), and when it was taken
    /// (milliseconds since `epoch`, 0 = never).
    memory_sample: AtomicU64,
    sampled_at: AtomicU64,
    epoch: Instant,
}

impl Gate {
    pub(crate) fn new(config: &AdmissionConfig) -> Self {
        Self {
            origins: config
                .allowed_origins
                .iter()
                .map(|o| WildMatch::new(&o.to_ascii_lowercase()))
                .collect(),
            require_origin: config.require_origin,
            per_ip: config.max_connections_per_ip,
            per_user: config.max_connections_per_user,
            pending_per_ip: config.max_pending_handshakes_per_ip,
            ips: Counts::new(),
            pending_ips: Counts::new(),
            users: Counts::new(),
            retry_after_max: config.retry_after_max.as_secs().max(1),
            memory_budget: config.memory_budget_bytes,
            kernel_per_conn: config.kernel_bytes_per_connection,
            memory_sample: AtomicU64::new(0),
            sampled_at: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// The kernel's memory per connection, as configured.
    pub(crate) fn kernel_bytes_per_connection(&self) -> u64 {
        self.kernel_per_conn
    }

    /// Whether memory is at the budget: resident memory plus `connections()` times the
    /// kernel's share, sampled at most every [`MEMORY_SAMPLE`] by whichever shard asks first.
    /// Always false without a budget.
    pub(crate) fn memory_full(&self, connections: impl FnOnce() -> u64) -> bool {
        if self.memory_budget == 0 {
            return false;
        }
        // Plus one, so that 0 means "never sampled".
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let at = self.sampled_at.load(Relaxed);
        if at == 0 || now.saturating_sub(at) >= MEMORY_SAMPLE.as_millis() as u64 {
            // One shard samples; a race only means two samples.
            self.sampled_at.store(now, Relaxed);
            let used = memory::resident_bytes().unwrap_or(0)
                + connections().saturating_mul(self.kernel_per_conn);
            self.memory_sample.store(used, Relaxed);
        }
        self.memory_sample.load(Relaxed) >= self.memory_budget
    }

    /// Whether a request with this `Origin` header value (or none) may upgrade.
    pub(crate) fn origin_allowed(&self, origin: Option<&[u8]>) -> bool {
        match origin {
            None => !self.require_origin,
            Some(_) if self.origins.is_empty() => true,
            Some(value) => match std::str::from_utf8(value) {
                // Scheme and host are case-insensitive; the list is lowercased once.
                Ok(value) => {
                    let value = value.trim().to_ascii_lowercase();
                    self.origins.iter().any(|o| o.matches(&value))
                }
                Err(_) => false,
            },
        }
    }

    /// Whether connections per address are capped (and so counted).
    pub(crate) fn counts_ips(&self) -> bool {
        self.per_ip > 0
    }

    /// Counts a connection from `ip`; false (counting nothing) when it holds the cap.
    pub(crate) fn acquire_ip(&self, ip: IpAddr) -> bool {
        self.ips.acquire(ip, self.per_ip)
    }

    pub(crate) fn release_ip(&self, ip: IpAddr) {
        self.ips.release(&ip);
    }

    /// Whether unfinished upgrades per address are capped (and so counted).
    pub(crate) fn counts_pending(&self) -> bool {
        self.pending_per_ip > 0
    }

    /// Counts an unfinished upgrade from `ip` (a [`pending_key`]); false (counting nothing)
    /// when that address holds `admission.max_pending_handshakes_per_ip` of them.
    pub(crate) fn acquire_pending(&self, ip: IpAddr) -> bool {
        self.pending_ips.acquire(ip, self.pending_per_ip)
    }

    /// Gives back what [`Gate::acquire_pending`] counted.
    pub(crate) fn release_pending(&self, ip: IpAddr) {
        self.pending_ips.release(&ip);
    }

    /// Counts a connection of `user`; false (counting nothing) when it holds the cap. Always
    /// true, counting nothing, when users are not capped.
    pub(crate) fn acquire_user(&self, user: &str) -> bool {
        self.per_user == 0 || self.users.acquire(user.into(), self.per_user)
    }

    /// Gives back what [`Gate::acquire_user`] counted (nothing when users are not capped).
    pub(crate) fn release_user(&self, user: &str) {
        if self.per_user > 0 {
            self.users.release(user);
        }
    }

    /// Gives back what a connection held in the caps: its counted address and its user.
    pub(crate) fn release(&self, ip: Option<IpAddr>, user: Option<&str>) {
        if let Some(ip) = ip {
            self.release_ip(ip);
        }
        if let Some(user) = user {
            self.release_user(user);
        }
    }

    /// A `Retry-After` for a shaped upgrade: whole seconds, uniform in 1..=retry_after_max,
    /// so clients told to wait come back spread out instead of in the next wave.
    pub(crate) fn retry_after(&self) -> Duration {
        Duration::from_secs(fastrand::u64(1..=self.retry_after_max))
    }
}

/// The address an unfinished upgrade counts under: an IPv4 address (or an IPv4-mapped IPv6
/// one, from a dual-stack listener) as itself, any other IPv6 address by its /64, the block
/// one host or one customer is usually given, so that a host cannot multiply its share by
/// drawing addresses from its own prefix.
pub(crate) fn pending_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// What an upgrade in progress holds in the caps (its address under the per-address cap, its
/// user under the per-user cap). Dropping it gives both back, so a refusal after counting
/// cannot leak a count; an accepted upgrade calls [`Held::keep`] and the connection gives
/// them back when it ends ([`Gate::release`]).
#[derive(Debug)]
pub(crate) struct Held {
    gate: Arc<Gate>,
    ip: Option<IpAddr>,
    user: Option<String>,
}

impl Held {
    /// Nothing held yet.
    pub(crate) fn new(gate: Arc<Gate>) -> Self {
        Self {
            gate,
            ip: None,
            user: None,
        }
    }

    /// Counts a connection from `ip` when addresses are capped; false (counting nothing) when
    /// it holds the cap.
    pub(crate) fn acquire_ip(&mut self, ip: IpAddr) -> bool {
        if !self.gate.counts_ips() {
            return true;
        }
        if !self.gate.acquire_ip(ip) {
            return false;
        }
        self.ip = Some(ip);
        true
    }

    /// Counts a connection of `user`; false (counting nothing) when the user holds the cap.
    pub(crate) fn acquire_user(&mut self, user: &str) -> bool {
        if !self.gate.acquire_user(user) {
            return false;
        }
        if self.gate.per_user > 0 {
            self.user = Some(user.to_owned());
        }
        true
    }

    /// The upgrade is accepted: the connection holds the counts from now on. Returns the
    /// address counted, which the connection keeps so that its end can give it back.
    pub(crate) fn keep(mut self) -> Option<IpAddr> {
        self.user = None;
        self.ip.take()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gate.release(self.ip, self.user.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(f: impl FnOnce(&mut AdmissionConfig)) -> Gate {
        let mut config = AdmissionConfig::default();
        f(&mut config);
        Gate::new(&config)
    }

    #[test]
    fn origins_match_exactly_or_by_pattern_ignoring_case() {
        let g = gate(|c| {
            c.allowed_origins = vec![
                "https://app.example.com".into(),
                "https://*.trusted.io".into(),
            ]
        });
        assert!(g.origin_allowed(Some(b"https://app.example.com")));
        assert!(g.origin_allowed(Some(b"HTTPS://App.Example.com")));
        assert!(g.origin_allowed(Some(b"https://desk.trusted.io")));
        assert!(!g.origin_allowed(Some(b"https://evil.example")));
        assert!(!g.origin_allowed(Some(b"http://app.example.com")));
        assert!(!g.origin_allowed(Some(b"https://app.example.com.evil.io")));
        assert!(!g.origin_allowed(Some(b"\xff")));
        assert!(g.origin_allowed(None), "non-browser clients send no Origin");
        let strict = gate(|c| c.require_origin = true);
        assert!(!strict.origin_allowed(None));
        assert!(strict.origin_allowed(Some(b"https://any.where")));
    }

    #[test]
    fn caps_count_up_to_the_limit_and_free_on_release() {
        let g = gate(|c| {
            c.max_connections_per_ip = 2;
            c.max_connections_per_user = 1;
        });
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert!(g.acquire_ip(ip));
        assert!(g.acquire_ip(ip));
        assert!(!g.acquire_ip(ip));
        assert!(g.acquire_ip("127.0.0.10".parse().unwrap()));
        g.release_ip(ip);
        assert!(g.acquire_ip(ip));
        assert!(g.acquire_user("ann"));
        assert!(!g.acquire_user("ann"));
        g.release_user("ann");
        assert_eq!(g.users.get("ann"), 0);
        assert!(g.acquire_user("ann"));
    }

    #[test]
    fn pending_handshakes_count_per_address_and_ipv6_per_64() {
        let g = gate(|c| c.max_pending_handshakes_per_ip = 2);
        assert!(g.counts_pending());
        let a = pending_key("2001:db8:1:2::1".parse().unwrap());
        let b = pending_key("2001:db8:1:2:ffff::9".parse().unwrap());
        assert_eq!(a, b, "one /64 is one address");
        assert_ne!(a, pending_key("2001:db8:1:3::1".parse().unwrap()));
        let mapped = pending_key("::ffff:10.0.0.1".parse().unwrap());
        assert_eq!(mapped, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert!(g.acquire_pending(a));
        assert!(g.acquire_pending(b));
        assert!(!g.acquire_pending(a));
        assert!(g.acquire_pending(mapped));
        g.release_pending(a);
        assert!(g.acquire_pending(b));
        assert!(
            AdmissionConfig::default().max_pending_handshakes_per_ip > 0,
            "on by default"
        );
        assert!(!gate(|c| c.max_pending_handshakes_per_ip = 0).counts_pending());
    }

    #[test]
    fn the_memory_budget_counts_resident_memory_and_the_kernel_share() {
        let off = gate(|_| {});
        assert!(!off.memory_full(|| unreachable!("no budget: nothing is read")));
        let rss = memory::resident_bytes().unwrap();
        let g = gate(|c| {
            c.memory_budget_bytes = rss + (64 << 20);
            c.kernel_bytes_per_connection = 4096;
        });
        assert!(!g.memory_full(|| 10));
        // A fresh gate (no cached sample) with enough connections to pass the budget.
        let g = gate(|c| {
            c.memory_budget_bytes = rss + (64 << 20);
            c.kernel_bytes_per_connection = 4096;
        });
        assert!(g.memory_full(|| 1 << 15));
    }

    #[test]
    fn retry_after_stays_in_range_and_varies() {
        let g = gate(|c| c.retry_after_max = Duration::from_secs(5));
        let seen: std::collections::HashSet<u64> =
            (0..200).map(|_| g.retry_after().as_secs()).collect();
        assert!(seen.iter().all(|s| (1..=5).contains(s)), "{seen:?}");
        assert!(seen.len() >= 3, "jitter should spread: {seen:?}");
    }
}
