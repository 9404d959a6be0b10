//! Engine configuration: every tunable and limit, its default, and its validation.
//!
//! Owns [`EngineConfig`] and its sections, their TOML form, and [`EngineConfig::validate`].
//! All defaults live in the `Default` impls here and nowhere else. Nothing is clamped: a value
//! out of range is a [`ConfigError`] at startup.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ringcast_protocol::{deflate::DeflateConfig, Limits};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// Everything an [`Engine`](crate::Engine) needs to run. Load it from TOML with
/// [`EngineConfig::from_toml`] or build it in code from `EngineConfig::default()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct EngineConfig {
    /// Address every shard listens on, each with its own `SO_REUSEPORT` socket so the kernel
    /// spreads connections across shards. Default `127.0.0.1:9000`. Port 0 picks a free port
    /// once; all shards share it.
    pub listen: SocketAddr,
    /// Number of shards (threads, each with its own io_uring). Default 0: one per CPU the
    /// process may run on. Each shard costs one thread, one ring and one read buffer.
    pub shards: usize,
    /// Pin shard `i` to the `i`-th CPU the process may run on (wrapping). Default true.
    pub pin_shards: bool,
    /// IO driver. Default `io_uring`; starting fails if io_uring is unavailable unless this is
    /// `epoll`, which must be chosen explicitly (and needs the crate's `epoll` feature).
    pub driver: Driver,
    /// Limits on what peers may send and on what is queued for them.
    pub limits: LimitsConfig,
    /// Deadlines.
    pub timeouts: TimeoutsConfig,
    /// Socket and buffer settings.
    pub io: IoConfig,
    /// Topics, fan-out, history, per-connection rings and budgets.
    pub pubsub: PubSubConfig,
    /// Plain HTTP answered on the WebSocket port: health, readiness, metrics.
    pub http: HttpConfig,
    /// Who may upgrade, and how fast: origins, per-address and per-user caps, upgrade rate.
    pub admission: AdmissionConfig,
    /// Token auth for the built-in [`Broker`](crate::Broker) (and any handler that uses
    /// `Auth`); the `jwt` feature.
    pub auth: AuthConfig,
    /// Where topics are ordered: in this process (the default) or in Redis, shared by hosts.
    pub broker: BrokerConfig,
    /// Trading CPU for latency: shards that spin instead of sleeping (io_uring driver).
    pub latency: LatencyConfig,
    /// permessage-deflate (RFC 7692): off, shared or dedicated, and its knobs.
    pub compression: CompressionConfig,
}

/// `[latency]`: whether an idle shard spins before it sleeps (io_uring driver; the epoll
/// driver ignores it). Off by default: a shard sleeps in its ring as soon as it has nothing
/// to do, and another thread's publish wakes it with an eventfd write (tens of microseconds
/// on a VM whose idle core must be woken). A spinning shard polls its ring's completions
/// and its inbox without a system call; publishers see that it is not parked and do not wake
/// it, so a message is picked up within a spin iteration. The cost is CPU: a spinning shard
/// uses its whole core while it spins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LatencyConfig {
    /// How long a shard that just had work spins before it parks, in microseconds. Default
    /// 0: parks at once. At most 1,000,000 (1 s). An idle shard spins this long once per
    /// burst of work, then sleeps until woken; a shard busy more often than this never
    /// sleeps (and costs a whole core).
    pub spin_us: u64,
    /// `"idle"` (default): spin `spin_us`, then park. `"always"`: never park (for cores
    /// isolated for the shard, `isolcpus`/`nohz_full`): the shard's core is always at 100%,
    /// and `spin_us` is ignored. Deadlines (timeouts, pings) still fire on time.
    pub mode: LatencyMode,
}

impl Default for LatencyConfig {
    fn default() -> Self {
        Self {
            spin_us: 0,
            mode: LatencyMode::Idle,
        }
    }
}

/// permessage-deflate (RFC 7692) for the listener's connections. A handler can choose another
/// mode per connection at the upgrade ([`Upgrade::with_compression`](crate::Upgrade)).
/// A client that offers nothing acceptable is answered without the extension.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CompressionConfig {
    /// `off`, `shared` or `dedicated`. Default `off`: the echo and broadcast benchmarks
    /// measure framing, and compression is a trade of CPU for bytes that a deployment
    /// chooses. `shared`: the server compresses each message on its own
    /// (`server_no_context_takeover`) and asks clients to do the same, so a published message
    /// is compressed once per delivery format for every subscriber and an idle connection
    /// holds no compression state. `dedicated`: the server keeps its compression context per
    /// connection (better ratios on 1:1 traffic with redundancy across messages), costing a
    /// compressor per connection from its first compressed message on.
    pub mode: CompressionMode,
    /// Messages shorter than this are sent uncompressed (RSV1 clear), in bytes. Default 256.
    /// Small messages gain little and cost a compression each.
    pub threshold_bytes: usize,
    /// Deflate level, 0 (store) to 9 (smallest, slowest). Default 1: the fastest, most of the
    /// gain on JSON (bench/RESULTS.md). Out of range: a ConfigError.
    pub level: u8,
    /// The server's compression window, as a power of two, 9 to 15. Default 15 (32 KiB). In
    /// `dedicated` mode each connection keeps a window of twice this size twice over, so 10
    /// to 12 keeps memory down; in `shared` mode compressors are pooled per shard. An offer
    /// asking for less is honoured; one asking for 8 is declined (zlib cannot produce it).
    pub window_bits: u8,
    /// The compression window asked of clients that support choosing it, as a power of two,
    /// 8 to 15. Default 15. It bounds the server's decompressor in `dedicated` mode, where
    /// clients may keep their context.
    pub client_window_bits: u8,
    /// The compressor's memory level (zlib's `memLevel`), 1 to 9. Default 8. Each step down
    /// halves the compressor's hash table and pending buffer. Measured heap per `dedicated`
    /// connection after a message each way (bench/RESULTS.md): window_bits 15: 418 KiB at 8,
    /// 313 KiB at 4, 307 KiB at 1; window_bits 10: 294 KiB at 8, 189 KiB at 4, 183 KiB at 1.
    /// Measured cost in ratio and time: none at level 1; at level 6 none down to 4, worse at 1.
    /// In `shared` mode compressors are pooled per shard, so it matters little. Out of range:
    /// a ConfigError.
    pub mem_level: u8,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            mode: CompressionMode::Off,
            threshold_bytes: 256,
            level: 1,
            window_bits: 15,
            client_window_bits: 15,
            mem_level: 8,
        }
    }
}

/// [`LatencyConfig::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum LatencyMode {
    /// Spin `spin_us` after work, then park in the ring.
    Idle,
    /// Never park: spin for work without end.
    Always,
}

impl LatencyMode {
    /// The name used in config files and logs.
    pub fn name(self) -> &'static str {
        match self {
            LatencyMode::Idle => "idle",
            LatencyMode::Always => "always",
        }
    }
}

impl CompressionConfig {
    /// The protocol settings for `mode` (`None` for `off`).
    pub(crate) fn deflate(&self, mode: CompressionMode) -> Option<DeflateConfig> {
        let shared = match mode {
            CompressionMode::Off => return None,
            CompressionMode::Shared => true,
            CompressionMode::Dedicated => false,
        };
        Some(
            DeflateConfig::default()
                .with_server_no_context_takeover(shared)
                .with_client_no_context_takeover(shared)
                .with_server_max_window_bits(self.window_bits)
                .with_client_max_window_bits(self.client_window_bits)
                .with_level(self.level)
                .with_mem_level(self.mem_level)
                .with_threshold(self.threshold_bytes),
        )
    }
}

/// How a connection uses permessage-deflate; see [`CompressionConfig::mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum CompressionMode {
    /// Not negotiated: offers are declined.
    Off,
    /// No context takeover on either side: one compressed frame serves every subscriber.
    Shared,
    /// Context takeover on the server side, per connection.
    Dedicated,
}

/// Admission: checks the engine makes on every upgrade request before the handler sees it,
/// in this order: the memory budget (503), the upgrade rate (503), the origin (403),
/// connections per address (429);
/// after the handler accepts, connections per user (429). Plain HTTP requests (`[http]`)
/// are not subject to any of them. Each refusal is counted in `upgrades_rejected` by reason.
/// Before any of them, at accept: unfinished upgrades per address
/// (`max_pending_handshakes_per_ip`, the only check on by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AdmissionConfig {
    /// Origins whose pages may open connections, as `scheme://host[:port]`; `*` matches any
    /// run of characters (`"https://*.example.com"`). Default empty: any origin. A request
    /// with an `Origin` not on the list gets 403, so a page on another site cannot ride a
    /// user's cookies (cross-site WebSocket hijacking).
    pub allowed_origins: Vec<String>,
    /// Refuse (403) requests without an `Origin` header. Default false: clients other than
    /// browsers send none, and a browser always sends one.
    pub require_origin: bool,
    /// Open connections one peer IP address may hold, over all shards. Default 0: no cap
    /// (behind a proxy every client shares its address). Over it: 429.
    pub max_connections_per_ip: u32,
    /// Connections one peer address may hold that have not finished their upgrade (the
    /// request head not yet complete), over all shards; IPv6 addresses count by their /64
    /// (one host's usual share). Default 256, on: unlike `max_connections_per_ip` it is safe
    /// behind a proxy, which forwards each request as soon as it connects, so its pending
    /// handshakes last a round trip. Over it the new connection is refused at accept, before
    /// any byte is read: 429 "too many unfinished upgrades from this address", then closed at
    /// once (it holds no descriptor for `close_timeout`), counted under
    /// `upgrade_rejections{reason="pending_ip_cap"}`. 0: no cap. Memory: none per pending
    /// handshake beyond the connection; one counter per address with one pending.
    pub max_pending_handshakes_per_ip: u32,
    /// Open connections one user (as the handler names it with
    /// [`Upgrade::with_user`](crate::Upgrade::with_user), the token's `sub` for the broker)
    /// may hold, over all shards. Default 0: no cap. Over it: 429.
    pub max_connections_per_user: u32,
    /// Upgrades one shard accepts per second, sustained (a token bucket). Default 0: no
    /// shaping. Over it: 503 with a `Retry-After` drawn at random between 1 s and
    /// `retry_after_max`, so a reconnect storm comes back spread out and live connections
    /// keep their share of the shard.
    pub upgrades_per_sec: u32,
    /// Upgrades one shard accepts in a burst above `upgrades_per_sec`. Default 0: the same
    /// as `upgrades_per_sec`.
    pub upgrade_burst: u32,
    /// The longest `Retry-After` a shaped upgrade is told, whole seconds. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub retry_after_max: Duration,
    /// Memory the process may use, counting its resident memory and the kernel's share for
    /// its connections (`kernel_bytes_per_connection` each), sampled every 100 ms. At or
    /// over it, upgrades get 503 with a `Retry-After` until memory falls. Default 0: no
    /// budget. A cap by memory as well as by count (`limits.max_connections_per_shard`):
    /// busy connections with queued data cost more than idle ones.
    pub memory_budget_bytes: u64,
    /// The kernel's memory per connection, counted against `memory_budget_bytes` and shown
    /// in `/metrics`: socket structures and idle buffers. Default
    /// [`KERNEL_BYTES_PER_CONNECTION`] (4697 bytes, measured per idle loopback socket on
    /// Linux 6.18). Measure your host's with `loadgen idle` (bench/RESULTS.md).
    pub kernel_bytes_per_connection: u64,
}

/// Kernel memory per idle connection held by the server, in bytes: the default of
/// [`AdmissionConfig::kernel_bytes_per_connection`], and the kernel's share per connection in
/// `ringcast capacity` and `ringcast doctor`.
///
/// Measured in `bench/RESULTS.md`, "Idle, 10,000 connections" (run of 2026-11-23, Linux 6.18,
/// 2-core VM), ringcast row: 9,394 B of kernel slab objects in use per connection pair,
/// system-wide (`loadgen idle --conns 10000 --hold 0` against `ringcast serve --echo --shards
/// 1`). On loopback that counts both ends (two TCP sockets with their inodes, dentries and
/// files); a server holds one end, so this is half. An idle socket has no data queued: a busy
/// one adds its socket buffers (bounded by `net.ipv4.tcp_rmem`/`tcp_wmem` per socket and
/// `tcp_mem` in all).
pub const KERNEL_BYTES_PER_CONNECTION: u64 = 4_697;

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            require_origin: false,
            max_connections_per_ip: 0,
            max_pending_handshakes_per_ip: 256,
            max_connections_per_user: 0,
            upgrades_per_sec: 0,
            upgrade_burst: 0,
            retry_after_max: Duration::from_secs(10),
            memory_budget_bytes: 0,
            kernel_bytes_per_connection: KERNEL_BYTES_PER_CONNECTION,
        }
    }
}

/// The broker backend: where each topic's sequence numbers and history live.
///
/// By default (an empty `url`) they live in this process, and only its own connections see a
/// topic. With `url = "redis://HOST:PORT"` they live in Redis, so every host pointed at the
/// same Redis shares topics: a message published on any host reaches subscribers on all of
/// them with the same seq, and a client may resume with `since` on any host. A bridge
/// thread talks to Redis; shards never wait on it. Keys and channels, per topic `T`:
/// `{key_prefix}T:seq` (the counter), `{key_prefix}T:h` (a stream holding the history) and
/// the channel `{key_prefix}T`. History in Redis is bounded by
/// `pubsub.history_max_messages` and by `history_max_age`; `pubsub.history_max_bytes`
/// applies to the in-memory backend only. Redis needs the crate's `redis` feature (on by
/// default): without it a `redis://` URL fails [`EngineConfig::validate`], naming the feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// Empty (the default): the in-memory broker. `redis://HOST:PORT[/DB]`: Redis.
    pub url: String,
    /// Prefix of every Redis key and channel this engine uses. Default `ringcast:`. Hosts
    /// that share topics must use the same prefix.
    pub key_prefix: String,
    /// Redis only: messages older than this are trimmed from a topic's history (checked on
    /// each publish and each resume). Default 1 h. Memory: none here; Redis holds at most
    /// `pubsub.history_max_messages` per topic.
    #[serde(with = "humantime_serde")]
    pub history_max_age: Duration,
    /// Redis only: time one Redis command (a publish, a history read, a ping) may take
    /// before the bridge counts Redis as unreachable. Default 2 s. A publish waiting longer
    /// gets `unavailable`.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Redis only: first delay before reconnecting after Redis went away; it doubles at each
    /// failed attempt, with full jitter, up to `reconnect_max_delay`. Default 100 ms.
    #[serde(with = "humantime_serde")]
    pub reconnect_min_delay: Duration,
    /// Redis only: the longest delay between reconnect attempts. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_max_delay: Duration,
    /// Redis only: how often an idle bridge pings Redis, so a silent outage is noticed
    /// (readiness turns false) within this plus `command_timeout`. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            key_prefix: "ringcast:".into(),
            history_max_age: Duration::from_secs(3600),
            command_timeout: Duration::from_secs(2),
            reconnect_min_delay: Duration::from_millis(100),
            reconnect_max_delay: Duration::from_secs(5),
            health_interval: Duration::from_secs(1),
        }
    }
}

/// Token auth at the upgrade: a JWT signed with HS256, RS256 or ES256, read from the first
/// place that has one: `Authorization: Bearer`, a subprotocol entry, a cookie, or (when
/// enabled) a query parameter. Claims: `sub` (the user id), `exp` (required), and the topic
/// patterns `subscribe` and `publish` (arrays; `*` matches any run of characters). A
/// missing, malformed, badly signed or expired token gets 401. Needs the crate's `jwt`
/// feature (on by default): without it `required = true` fails [`EngineConfig::validate`],
/// naming the feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AuthConfig {
    /// Require a token. Default false: anyone may connect, subscribe and publish.
    pub required: bool,
    /// File holding the HS256 shared secret (its bytes, trailing newline removed). Default
    /// none. Files, not inline values, so `ringcast config` never prints a secret.
    pub hs256_secret_file: Option<PathBuf>,
    /// PEM file with the RSA public key for RS256 tokens. Default none.
    pub rs256_public_key_file: Option<PathBuf>,
    /// PEM file with the P-256 public key for ES256 tokens. Default none.
    pub es256_public_key_file: Option<PathBuf>,
    /// Required `iss` claim. Default empty: not checked.
    pub issuer: String,
    /// Required `aud` claim. Default empty: not checked.
    pub audience: String,
    /// Clock skew allowed on `exp` and `nbf`, whole seconds. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// Cookie that may carry the token. Default `ringcast_token`; empty: cookies are not
    /// read.
    pub cookie: String,
    /// A subprotocol entry starting with this carries the token after it (browsers cannot set
    /// headers): offer `["ringcast.v1.json", "ringcast.token.<JWT>"]`. The server never
    /// selects that entry. Default `ringcast.token.`; empty: not read.
    pub subprotocol_prefix: String,
    /// Query parameter that may carry the token (`?token=...`). Default empty: not read.
    /// Tokens in URLs end up in proxy and access logs; the engine logs a warning at start
    /// when this is set.
    pub query_param: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            required: false,
            hs256_secret_file: None,
            rs256_public_key_file: None,
            es256_public_key_file: None,
            issuer: String::new(),
            audience: String::new(),
            leeway: Duration::from_secs(30),
            cookie: "ringcast_token".into(),
            subprotocol_prefix: "ringcast.token.".into(),
            query_param: String::new(),
        }
    }
}

impl BrokerConfig {
    /// Whether this selects the Redis backend.
    pub fn is_redis(&self) -> bool {
        !self.url.is_empty()
    }
}

/// Plain HTTP GETs the engine answers itself on the listening port, before any handler sees
/// them. An empty path turns that endpoint off. Every other plain request gets 426 (or 405
/// for a method other than GET), never a hang.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpConfig {
    /// Liveness: 200 "ok" while the shard that answers is running. Default `/healthz`.
    pub health_path: String,
    /// Readiness: 200 "ready"; 503 "draining" once the engine is stopping, "broker
    /// unavailable" while the Redis bridge is down, or naming a shard that took no canary
    /// for 3 `canary_interval`s. Default `/readyz`.
    pub ready_path: String,
    /// Every counter of every shard in the OpenMetrics text format (Prometheus scrapes it).
    /// Default `/metrics`. Without the crate's `metrics` feature: 404 with a plain-text body
    /// naming the feature.
    pub metrics_path: String,
    /// A canary goes through the fan-out path to every shard this often; readiness turns
    /// false (503 naming the shard) when a shard has taken none for 3 intervals, so a shard
    /// stuck in a handler or behind on its inbox leaves the load balancer's rotation.
    /// Default 1 s; `"0s"` turns the canary off. At most 1 hour.
    #[serde(with = "humantime_serde")]
    pub canary_interval: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            health_path: "/healthz".into(),
            ready_path: "/readyz".into(),
            metrics_path: "/metrics".into(),
            canary_interval: Duration::from_secs(1),
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
            shards: 0,
            pin_shards: true,
            driver: Driver::IoUring,
            limits: LimitsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            io: IoConfig::default(),
            pubsub: PubSubConfig::default(),
            http: HttpConfig::default(),
            admission: AdmissionConfig::default(),
            auth: AuthConfig::default(),
            broker: BrokerConfig::default(),
            latency: LatencyConfig::default(),
            compression: CompressionConfig::default(),
        }
    }
}

/// This file's source: the field docs `to_toml_documented` quotes, so the comments it
/// prints cannot drift from the documentation.
const SOURCE: &str = include_str!("config.rs");

/// One key of the config file and the line `to_toml_documented` writes above it.
#[derive(Debug)]
struct FieldDoc {
    /// The section (`limits`, ...); empty for top-level keys.
    section: String,
    key: String,
    /// The doc's first sentence, and its sentence on the default when that is another one.
    summary: String,
}

/// The documented fields of `EngineConfig` and its sections, in the order of the source.
fn field_docs() -> Vec<FieldDoc> {
    struct Field {
        owner: String,
        name: String,
        ty: String,
        doc: String,
    }
    let mut fields = Vec::new();
    let mut owner: Option<String> = None;
    let mut doc = Vec::new();
    for line in SOURCE.lines() {
        let line = line.trim();
        if let Some(name) = line
            .strip_prefix("pub struct ")
            .and_then(|rest| rest.strip_suffix(" {"))
        {
            owner = Some(name.to_owned());
            doc.clear();
        } else if line == "}" {
            owner = None;
        } else if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim().to_owned());
        } else if line.starts_with("#[") {
            // Attributes sit between a field's doc and the field.
        } else if let (Some(owner), Some((name, ty))) = (
            &owner,
            line.strip_prefix("pub ")
                .and_then(|f| f.strip_suffix(','))
                .and_then(|f| f.split_once(": ")),
        ) {
            fields.push(Field {
                owner: owner.clone(),
                name: name.to_owned(),
                ty: ty.to_owned(),
                doc: doc.join(" "),
            });
            doc.clear();
        } else {
            doc.clear();
        }
    }
    // Sections are the fields of EngineConfig whose type is another struct here.
    let section_of = |owner: &str| -> Option<String> {
        if owner == "EngineConfig" {
            return Some(String::new());
        }
        fields
            .iter()
            .find(|f| f.owner == "EngineConfig" && f.ty == owner)
            .map(|f| f.name.clone())
    };
    fields
        .iter()
        .filter_map(|f| {
            let section = section_of(&f.owner)?;
            let sentences: Vec<&str> = f.doc.split_inclusive(". ").map(str::trim).collect();
            let mut summary = sentences.first().copied().unwrap_or_default().to_owned();
            if let Some(default) = sentences
                .iter()
                .skip(1)
                .find(|s| s.starts_with("Default") || s.contains("(the default)"))
            {
                summary.push(' ');
                summary.push_str(default);
            }
            Some(FieldDoc {
                section,
                key: f.name.clone(),
                summary: without_doc_links(&summary),
            })
        })
        .collect()
}

/// `text` with rustdoc links (`` [`Auth`](crate::Auth) ``) reduced to their text.
fn without_doc_links(text: &str) -> String {
    let mut out = text.to_owned();
    while let Some(mid) = out.find("](crate::") {
        let (Some(open), Some(close)) = (out[..mid].rfind('['), out[mid..].find(')')) else {
            break;
        };
        out.replace_range(mid..mid + close + 1, "");
        out.remove(open);
    }
    out
}

/// `url` with the password of its user part, if any, replaced by `REDACTED`.
fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].split_once(':') {
        Some((user, password)) if !password.is_empty() => {
            format!("{scheme}://{user}:REDACTED{}", &rest[at..])
        }
        _ => url.to_owned(),
    }
}

/// Which kernel interface the shards use for IO. Written `"io_uring"` (the kernel's own
/// spelling; `"io-uring"` is read too) or `"epoll"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Driver {
    /// io_uring, with readiness for sockets and completions for accepts and timers.
    #[serde(rename = "io_uring", alias = "io-uring")]
    IoUring,
    /// epoll. Only when asked for: hosts with io_uring disabled, or comparisons. Needs the
    /// crate's `epoll` feature; without it [`EngineConfig::validate`] refuses it (the value
    /// still parses, so one config file serves every build).
    Epoll,
}

impl Driver {
    /// The name used in config files and logs.
    pub fn name(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

/// What happens when a message is sent to a connection whose outbound queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum OverflowPolicy {
    /// Close the connection with 1008 "slow consumer": for streams that must not lose data.
    Disconnect,
    /// Drop the new message and count it: for loss-tolerant streams.
    DropNewest,
}

/// What a connection's topic-data ring does when a delivery does not fit. Acks, errors and
/// notices never go through the ring, so no policy ever drops them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum RingOverflow {
    /// Drop the oldest waiting messages to make room: the client sees the newest data, with a
    /// `dropped` notice for the gap. For loss-tolerant live streams.
    DropOldest,
    /// Drop the new message: the client sees a prefix, then a `dropped` notice.
    DropNewest,
    /// Keep only the latest waiting message per topic (market-data snapshots); a message
    /// replaced this way counts as dropped. When the ring is full of distinct topics, the
    /// oldest goes.
    Conflate,
    /// Close with 1008 "slow consumer": for streams that must not lose data.
    Disconnect,
}

impl RingOverflow {
    /// The name used in config files and query strings (`drop-oldest`, ...).
    pub fn name(self) -> &'static str {
        match self {
            RingOverflow::DropOldest => "drop-oldest",
            RingOverflow::DropNewest => "drop-newest",
            RingOverflow::Conflate => "conflate",
            RingOverflow::Disconnect => "disconnect",
        }
    }

    /// Parses a name as [`RingOverflow::name`] writes it.
    pub fn from_name(name: &str) -> Option<Self> {
        [
            RingOverflow::DropOldest,
            RingOverflow::DropNewest,
            RingOverflow::Conflate,
            RingOverflow::Disconnect,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }
}

/// Pub/sub: history per topic, the per-connection data ring, and per-client budgets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PubSubConfig {
    /// Messages kept per topic for resume (`since`). Default 1024. 0 keeps none: every resume
    /// gets a `reset`. Memory: each held message keeps its payload and its encoded frames.
    pub history_max_messages: usize,
    /// Payload bytes kept per topic for resume, whichever bound is hit first. Default 1 MiB.
    pub history_max_bytes: usize,
    /// Topic messages that may wait in one connection's data ring. Default 1024.
    pub ring_max_messages: usize,
    /// Frame bytes that may wait in one connection's data ring. Default 1 MiB. A single
    /// message larger than this is still delivered to an empty ring. Memory: up to this much
    /// per slow connection, frames shared with every other subscriber.
    pub ring_max_bytes: usize,
    /// Policy when the data ring is full. Default `drop-oldest`. The broker lets a client
    /// pick another one with `?overflow=NAME` at the upgrade.
    pub ring_overflow: RingOverflow,
    /// Frame bytes moved from the data ring to the socket's queue at a time; what is there
    /// can no longer be dropped. Default 64 KiB.
    pub write_window_bytes: usize,
    /// Topics one connection may subscribe to. Default 256. Over it: an error reply.
    pub max_subscriptions_per_connection: usize,
    /// Publishes per second one connection may make, sustained. Default 1000. Over budget:
    /// an error reply (`rate_limited`, with `retry_after_ms` until the next one is allowed);
    /// the publish is not made, and the connection is not read until then (slowed, not
    /// closed).
    pub publish_rate_per_sec: u32,
    /// Publishes one connection may make in a burst above the rate. Default 1000.
    pub publish_burst: u32,
    /// Malformed requests (`bad_request`, `unknown_type`, `bad_topic`, `bad_payload`,
    /// `too_large`) a connection may send in a burst before it is closed with 1008. Default
    /// 20; the budget refills at one per second. Refusals of well-formed requests
    /// (`rate_limited`, `unavailable`, `forbidden`, `not_subscribed`,
    /// `too_many_subscriptions`) never count.
    pub max_bad_requests: u32,
    /// Deliveries waiting in one shard's inbox above which publishing reports the engine
    /// saturated, and at twice which a publish is refused. Default 65536.
    pub max_pending_per_shard: usize,
    /// Largest payload one publish may carry, in bytes. Default 1 MiB.
    pub max_publish_bytes: usize,
    /// Deepest nesting of arrays and objects a JSON payload may have (`{"a":[1]}` nests 2
    /// deep, a scalar 0). Default 64; must be > 0. Deeper: a broker client gets
    /// `bad_payload`, and `Ctx::publish` and `Publisher::publish` return
    /// `PublishError::TooDeep`. Subscribers' parsers in other languages recurse per level
    /// (many stop at a few hundred), so such a payload would break them. Checked in one pass
    /// without recursion, nearly free for ordinary payloads.
    pub max_json_depth: usize,
    /// Topics the process holds at once, with subscribers or history or neither. Default
    /// 100000. At the cap, a subscribe or publish that would make a new topic is refused
    /// (`too_many_topics`; [`PublishError::TooManyTopics`](crate::PublishError)), counted in
    /// `topics_refused`; existing topics work as before. Memory: [`TOPIC_BYTES`] per topic
    /// plus its history (bounded by `history_max_messages` and `history_max_bytes`), shown
    /// in `/metrics` as `memory_topics_estimate_bytes`: at the default cap, 27 MB of topics
    /// without history, 55 MB with one small message each.
    pub max_topics: usize,
    /// A topic with no subscriber on any shard and no publish for this long is removed, its
    /// history with it; made again on next use, it starts a new [epoch](crate::TopicStats),
    /// so a later `since` gets a `reset`, never a silent continuation. Default 60 s;
    /// `"0s"` keeps topics forever (then only `max_topics` bounds them). Checked every
    /// quarter of it (at most every second), so a topic goes between this and about 1.25
    /// times it after it went idle.
    #[serde(with = "humantime_serde")]
    pub topic_idle_timeout: Duration,
    /// Topics per second one connection may subscribe to or unsubscribe from, sustained
    /// (each topic of a request counts; the broker charges at most `subscribe_burst` for
    /// one request). Default 100. Over budget: an error reply (`rate_limited`, with
    /// `retry_after_ms`), nothing of the request done, and the connection is not read until
    /// the budget allows it (slowed, not closed); never charged to `max_bad_requests`.
    pub subscribe_rate_per_sec: u32,
    /// Topic subscriptions and unsubscriptions one connection may make in a burst above the
    /// rate. Default 512 (twice `max_subscriptions_per_connection`: subscribing to the
    /// most a connection may hold, then unsubscribing from all of them).
    pub subscribe_burst: u32,
    /// Topics one subscribe or unsubscribe request may name, repeats included. Default
    /// 1024 (four times `max_subscriptions_per_connection`); must be > 0. More: the request
    /// is refused whole (`too_large`, "request names more than N topics", charged to
    /// `max_bad_requests`, and to the subscribe budget as this many topics, so a client
    /// repeating it is slowed) at the first entry past the limit, nothing of it done. Bounds the
    /// work one request costs its shard: every entry is validated, looked up and may replay
    /// history, all in one loop turn that other connections wait for.
    pub max_topics_per_request: usize,
}

/// The memory one topic costs without its history, in bytes: the registry entry, the
/// topic's state, its place in the expiry queue and its name (measured with 10-byte names).
/// Measured in `bench/RESULTS.md`, "Topics" (run of 2026-12-03: `ringcast serve --shards 1`,
/// 200,000 topics made by a subscribe and an unsubscribe each: RSS 11.9 MB -> 65.6 MB). The
/// memory gauge counts `topics x TOPIC_BYTES + held messages x HISTORY_MESSAGE_BYTES +
/// payload bytes held`.
pub const TOPIC_BYTES: u64 = 268;

/// The memory one message in a topic's history costs besides its payload bytes: the shared
/// message (`Published`, with room for its frames, which are counted where they wait) and
/// its place in the history. Measured as [`TOPIC_BYTES`], 200,000 topics made by publishing
/// one 8-byte payload each: 548 B per topic, less `TOPIC_BYTES` and the payload.
pub const HISTORY_MESSAGE_BYTES: u64 = 272;

impl PubSubConfig {
    /// The largest broker request the built-in [`Broker`](crate::Broker) reads: a publish
    /// of `max_publish_bytes` in base64 (the JSON dialect's binary payloads), plus 64 KiB
    /// for the envelope and topic. A larger request is refused (`too_large`) before it is
    /// parsed, so no request costs more parsing than the largest publish: about 1.4 MB at
    /// the default, where a subscribe to every topic a connection may hold takes under
    /// 100 KB.
    pub fn max_request_bytes(&self) -> usize {
        self.max_publish_bytes
            .div_ceil(3)
            .saturating_mul(4)
            .saturating_add(64 << 10)
    }
}

impl Default for PubSubConfig {
    fn default() -> Self {
        Self {
            history_max_messages: 1024,
            history_max_bytes: 1 << 20,
            ring_max_messages: 1024,
            ring_max_bytes: 1 << 20,
            ring_overflow: RingOverflow::DropOldest,
            write_window_bytes: 64 << 10,
            max_subscriptions_per_connection: 256,
            publish_rate_per_sec: 1000,
            publish_burst: 1000,
            max_bad_requests: 20,
            max_pending_per_shard: 65_536,
            max_publish_bytes: 1 << 20,
            max_json_depth: ringcast_protocol::envelope::DEFAULT_MAX_JSON_DEPTH,
            max_topics: 100_000,
            topic_idle_timeout: Duration::from_secs(60),
            subscribe_rate_per_sec: 100,
            subscribe_burst: 512,
            max_topics_per_request: ringcast_protocol::envelope::DEFAULT_MAX_REQUEST_TOPICS,
        }
    }
}

/// Limits. Each is enforced; reaching one gives the peer a close code or an HTTP status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitsConfig {
    /// Largest frame payload a peer may send, in bytes. Default 16 MiB. Over it: close 1009,
    /// decided on the header alone. Memory: one frame is buffered whole.
    pub max_frame_bytes: usize,
    /// Largest message a peer may send, summed over fragments, in bytes. Default 16 MiB. Over
    /// it: close 1009. Memory: a fragmented message is reassembled in one buffer.
    pub max_message_bytes: usize,
    /// Largest upgrade request head, in bytes. Default 8 KiB. Over it: HTTP 431.
    pub max_header_bytes: usize,
    /// Bytes that may wait in one connection's outbound queue. Default 1 MiB. A message sent
    /// to a connection from elsewhere (another connection's hook, fan-out) that would cross it
    /// is handled by `outbound_overflow`; an empty queue always takes one message, so a
    /// message larger than the limit can still be sent. Replies (sends to the connection whose
    /// hook is running) are always queued: instead, reading from a connection pauses while
    /// half of this is queued for it, so a peer that sends without reading is slowed, not
    /// buffered. Memory: up to this much per connection (plus one read's worth of replies);
    /// shared payloads count once per connection.
    pub max_outbound_bytes: usize,
    /// What to do with a message that does not fit `max_outbound_bytes`. Default `disconnect`.
    pub outbound_overflow: OverflowPolicy,
    /// Connections one shard holds at once. Default 65536. At the limit, a new connection
    /// takes the place of the shard's oldest unfinished upgrade (evicted with 503 and closed
    /// at once, `upgrade_rejections{reason="evicted"}`); with none left to evict the shard
    /// stops accepting (new connections wait in the kernel backlog) until one closes. Running
    /// out of descriptors evicts the same way. Keep shards x this below the open-files
    /// limit. Memory: the slab grows to the peak count.
    pub max_connections_per_shard: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let protocol = Limits::default();
        Self {
            max_frame_bytes: protocol.max_frame_bytes,
            max_message_bytes: protocol.max_message_bytes,
            max_header_bytes: protocol.max_header_bytes,
            max_outbound_bytes: 1 << 20,
            outbound_overflow: OverflowPolicy::Disconnect,
            max_connections_per_shard: 65_536,
        }
    }
}

/// Deadlines, written in TOML as `"10s"`, `"250ms"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TimeoutsConfig {
    /// Time a new connection has to send its whole upgrade request, counted from accept
    /// (bytes arriving do not extend it). Default 5 s. Past it: HTTP 408 and close, so
    /// half-sent requests cannot hold sockets. A client sends its request head at once after
    /// connecting, in one round trip even on a slow mobile link; 5 s leaves room for two
    /// retransmissions of a lost segment (1 s, then 2 s) while a silent or dribbling
    /// connection holds its descriptor half as long as with 10 s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time the peer has to answer our close frame, and then to close TCP after we shut down
    /// our side. Default 5 s. Past it the socket is closed regardless, except for the close
    /// frames of a stopping engine's drain: those may wait until `shutdown_timeout`, so a
    /// client still reading its backlog is not cut (a client that never answers then holds the
    /// stop until `shutdown_timeout`, not `drain_window` plus `close_timeout`).
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    /// Time a stopping engine has, from the stop, to close every connection: the drain
    /// window, then the closing handshakes. Default 10 s. Past it the remaining sockets are
    /// closed. Must be longer than `drain_window`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Window over which a stopping engine spreads its close frames (1012 "service
    /// restart"), each connection at a random moment in it, so clients do not all reconnect
    /// at once. Default 2 s; `"0s"` closes every connection at once.
    #[serde(with = "humantime_serde")]
    pub drain_window: Duration,
    /// A connection the server has heard nothing from (no frame of any kind) for this long is
    /// sent a ping. Default 30 s; `"0s"` sends no pings. Traffic from the peer counts as
    /// proof of life, so busy connections are never pinged. A dead peer is found within
    /// `ping_interval` plus `pong_timeout` of its last frame. At most 1 day.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Time the peer has to send anything (its pong, or any frame) after a ping. Default
    /// 10 s. Past it the connection is dropped without a closing handshake (the peer is
    /// presumed gone), its slot freed, and `on_close` reports 1006 "no pong within
    /// pong_timeout". At most 1 day.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// A connection whose peer sent no message (text or binary; pings and pongs do not
    /// count) for this long is closed with 1001 "idle timeout". Default `"0s"`: off, since a
    /// subscriber may never speak. At most 1 day.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            drain_window: Duration::from_secs(2),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            idle_timeout: Duration::ZERO,
        }
    }
}

/// Socket and buffer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct IoConfig {
    /// epoll driver: size of each shard's read buffer, in bytes. Default 64 KiB. Every read of
    /// every connection on the shard goes here first; only an unfinished frame's bytes are copied to
    /// the connection. One read takes at most this much from one socket.
    pub read_buffer_bytes: usize,
    /// Reads one connection may do before other connections on the shard get a turn.
    /// Default 16 (so up to 16 x `read_buffer_bytes` per turn).
    pub max_reads_per_turn: usize,
    /// Accept backlog per listener (the kernel also caps it at `net.core.somaxconn`).
    /// Default 4096.
    pub listen_backlog: u32,
    /// Set `TCP_NODELAY` on accepted sockets. Default true: frames leave at once.
    pub tcp_nodelay: bool,
    /// Submission queue entries of each shard's io_uring rings. Default 1024.
    pub uring_entries: u32,
    /// io_uring driver: buffers in each shard's receive pool, a power of two. Default 1024.
    /// The kernel fills one per receive completion, so an idle connection holds none; when all
    /// are in use, receives wait for one to come back. Memory: this x `ring_buffer_bytes` per
    /// shard, touched at start.
    pub ring_buffers: u16,
    /// io_uring driver: size of each receive buffer, in bytes. Default 4096. A frame longer
    /// than this arrives in several completions and is gathered in its connection.
    pub ring_buffer_bytes: usize,
    /// Keep the upgrade request head (headers) for the connection's lifetime, readable
    /// through [`ConnInfo::header`](crate::ConnInfo::header). Default false: the upgrade hook
    /// sees every header anyway, and the request target (path and query) and subprotocol are
    /// always kept. Memory: the head's size per connection (often 200 to 600 bytes; measured
    /// 415 B instead of 265 B per idle connection at 10,000).
    pub keep_request_head: bool,
}

impl Default for IoConfig {
    fn default() -> Self {
        Self {
            read_buffer_bytes: 64 << 10,
            max_reads_per_turn: 16,
            listen_backlog: 4096,
            tcp_nodelay: true,
            uring_entries: 1024,
            ring_buffers: 1024,
            ring_buffer_bytes: 4096,
            keep_request_head: false,
        }
    }
}

impl EngineConfig {
    /// Parses a TOML document; absent keys take their defaults.
    ///
    /// # Errors
    /// [`ConfigError::Toml`] for syntax errors, unknown keys (named in the message) or values
    /// of the wrong type. Call [`EngineConfig::validate`] for range checks.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))
    }

    /// The configuration as TOML, every key present (but unset key files, `auth.*_file`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("EngineConfig always serializes")
    }

    /// The shards [`Engine::start`](crate::Engine::start) runs with this config: `shards`, or
    /// when it is 0 one per CPU the calling thread may run on (at least 1).
    pub fn effective_shards(&self) -> usize {
        match self.shards {
            0 => core_affinity::get_core_ids().map_or(0, |c| c.len()).max(1),
            n => n,
        }
    }

    /// The configuration in effect as a commented TOML file, what `ringcast config` prints:
    /// every key, each under a one-line comment saying what it is, its unit and default (the
    /// summary and the default of its documentation); `shards` resolved to
    /// [`EngineConfig::effective_shards`]; keys with no value (`auth.*_file`, which TOML
    /// cannot write as null) as commented-out lines. Loading it back gives this config, with
    /// `shards` resolved. The password of a `broker.url` is replaced by `REDACTED`: the
    /// output is meant to be shown.
    pub fn to_toml_documented(&self) -> String {
        let mut config = self.clone();
        config.shards = self.effective_shards();
        let redacted = redact_url_password(&config.broker.url);
        let url_redacted = redacted != config.broker.url;
        config.broker.url = redacted;
        let doc = toml::Table::try_from(&config).expect("EngineConfig always serializes");
        let docs = field_docs();
        let mut out = String::new();
        let emit = |section: &str, table: &toml::Table, out: &mut String| {
            let fields = docs.iter().filter(|f| f.section == section);
            for field in fields {
                match table.get(&field.key) {
                    Some(toml::Value::Table(_)) => continue, // a section, written below
                    Some(value) => {
                        out.push_str(&format!("# {}\n{} = {value}", field.summary, field.key));
                        if section.is_empty() && field.key == "shards" && self.shards == 0 {
                            out.push_str("  # 0 in the config: one per CPU");
                        }
                        if section == "broker" && field.key == "url" && url_redacted {
                            out.push_str("  # password redacted");
                        }
                        out.push('\n');
                    }
                    None => out.push_str(&format!(
                        "# {}\n# {} = \"\"  (unset)\n",
                        field.summary, field.key
                    )),
                }
            }
        };
        emit("", &doc, &mut out);
        for field in docs.iter().filter(|f| f.section.is_empty()) {
            if let Some(toml::Value::Table(table)) = doc.get(&field.key) {
                out.push_str(&format!("\n# {}\n[{}]\n", field.summary, field.key));
                emit(&field.key, table, &mut out);
            }
        }
        out
    }

    /// Sets one key, named as in the TOML file with dots between sections
    /// (`limits.max_frame_bytes`, `timeouts.drain_window`, `admission.allowed_origins`), to
    /// `value` written as in TOML (`1048576`, `"2s"`, `["https://a.example"]`, `true`); a
    /// value that is not valid TOML is taken as a string, so `2s` and `/run/secret` need no
    /// quotes. What `--set KEY=VALUE` and the `RINGCAST__SECTION__KEY` environment variables
    /// of the binary do.
    ///
    /// # Errors
    /// [`ConfigError::Toml`] naming the key when it does not exist or the value has the
    /// wrong type.
    pub fn set(self, key: &str, value: &str) -> Result<Self, ConfigError> {
        let mut doc = toml::Table::try_from(&self).expect("EngineConfig always serializes");
        let parsed = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
            Ok(mut t) => t.remove("v").expect("the key just written"),
            Err(_) => toml::Value::String(value.to_owned()),
        };
        let mut path: Vec<&str> = key.split('.').collect();
        let last = path.pop().filter(|k| !k.is_empty());
        let mut table = &mut doc;
        for section in path {
            table = match table.get_mut(section) {
                Some(toml::Value::Table(t)) => t,
                _ => {
                    return Err(ConfigError::Toml(format!(
                        "unknown section `{section}` in `{key}`"
                    )))
                }
            };
        }
        let Some(last) = last else {
            return Err(ConfigError::Toml(format!("empty key in `{key}`")));
        };
        table.insert(last.to_owned(), parsed);
        doc.try_into::<EngineConfig>()
            .map_err(|e| ConfigError::Toml(format!("{key}: {}", e.message())))
    }

    /// Sets [`EngineConfig::listen`].
    #[must_use]
    pub fn with_listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Sets [`EngineConfig::shards`].
    #[must_use]
    pub fn with_shards(mut self, shards: usize) -> Self {
        self.shards = shards;
        self
    }

    /// Sets [`EngineConfig::driver`].
    #[must_use]
    pub fn with_driver(mut self, driver: Driver) -> Self {
        self.driver = driver;
        self
    }

    /// Sets [`BrokerConfig::url`]: `redis://HOST:PORT` selects the Redis backend, empty the
    /// in-memory one.
    #[must_use]
    pub fn with_broker_url(mut self, url: impl Into<String>) -> Self {
        self.broker.url = url.into();
        self
    }

    /// Sets [`EngineConfig::pin_shards`].
    #[must_use]
    pub fn with_pin_shards(mut self, pin: bool) -> Self {
        self.pin_shards = pin;
        self
    }

    /// Checks every value against its range.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first key out of range and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let t = &self.timeouts;
        let io = &self.io;
        check(
            self.shards <= 1024,
            "shards",
            "must be at most 1024 (0 = one per CPU)",
        )?;
        check(
            self.driver != Driver::Epoll || cfg!(feature = "epoll"),
            "driver",
            "is epoll, which this build of the ringcast crate leaves out (its `epoll` feature)",
        )?;
        check(
            l.max_frame_bytes > 0,
            "limits.max_frame_bytes",
            "must be > 0",
        )?;
        check(
            l.max_message_bytes > 0,
            "limits.max_message_bytes",
            "must be > 0",
        )?;
        check(
            l.max_header_bytes >= 256,
            "limits.max_header_bytes",
            "must be >= 256 so that a minimal upgrade request fits",
        )?;
        check(
            l.max_outbound_bytes > 0,
            "limits.max_outbound_bytes",
            "must be > 0",
        )?;
        check(
            (1..=(1 << 24)).contains(&l.max_connections_per_shard),
            "limits.max_connections_per_shard",
            "must be between 1 and 16777216",
        )?;
        for (value, key) in [
            (t.handshake_timeout, "timeouts.handshake_timeout"),
            (t.close_timeout, "timeouts.close_timeout"),
            (t.shutdown_timeout, "timeouts.shutdown_timeout"),
        ] {
            check(!value.is_zero(), key, "must be > 0")?;
        }
        const DAY: Duration = Duration::from_secs(24 * 60 * 60);
        for (value, key) in [
            (t.ping_interval, "timeouts.ping_interval"),
            (t.pong_timeout, "timeouts.pong_timeout"),
            (t.idle_timeout, "timeouts.idle_timeout"),
        ] {
            check(value <= DAY, key, "must be at most 1 day")?;
        }
        check(
            t.ping_interval.is_zero() || !t.pong_timeout.is_zero(),
            "timeouts.pong_timeout",
            "must be > 0 while timeouts.ping_interval is set",
        )?;
        check(
            t.drain_window < t.shutdown_timeout,
            "timeouts.drain_window",
            "must be shorter than timeouts.shutdown_timeout",
        )?;
        check(
            self.http.canary_interval <= Duration::from_secs(3600),
            "http.canary_interval",
            "must be at most 1 hour",
        )?;
        let a = &self.admission;
        check(
            a.retry_after_max >= Duration::from_secs(1) && a.retry_after_max <= DAY,
            "admission.retry_after_max",
            "must be between 1s and 1 day",
        )?;
        check(
            a.allowed_origins.iter().all(|o| !o.is_empty()),
            "admission.allowed_origins",
            "entries must not be empty",
        )?;
        let auth = &self.auth;
        check(
            !auth.required
                || auth.hs256_secret_file.is_some()
                || auth.rs256_public_key_file.is_some()
                || auth.es256_public_key_file.is_some(),
            "auth.required",
            "needs at least one of hs256_secret_file, rs256_public_key_file, \
             es256_public_key_file",
        )?;
        check(
            !auth.required || cfg!(feature = "jwt"),
            "auth.required",
            "needs token auth, which this build of the ringcast crate leaves out (its `jwt` \
             feature)",
        )?;
        check(auth.leeway <= DAY, "auth.leeway", "must be at most 1 day")?;
        check(
            io.read_buffer_bytes >= 1024,
            "io.read_buffer_bytes",
            "must be >= 1024",
        )?;
        check(
            io.max_reads_per_turn > 0,
            "io.max_reads_per_turn",
            "must be > 0",
        )?;
        check(io.listen_backlog > 0, "io.listen_backlog", "must be > 0")?;
        let p = &self.pubsub;
        for (value, key) in [
            (p.ring_max_messages, "pubsub.ring_max_messages"),
            (p.ring_max_bytes, "pubsub.ring_max_bytes"),
            (p.write_window_bytes, "pubsub.write_window_bytes"),
            (p.max_pending_per_shard, "pubsub.max_pending_per_shard"),
            (p.max_publish_bytes, "pubsub.max_publish_bytes"),
            (p.max_json_depth, "pubsub.max_json_depth"),
            (p.max_topics, "pubsub.max_topics"),
            (p.max_topics_per_request, "pubsub.max_topics_per_request"),
        ] {
            check(value > 0, key, "must be > 0")?;
        }
        check(
            p.publish_rate_per_sec > 0,
            "pubsub.publish_rate_per_sec",
            "must be > 0",
        )?;
        check(
            p.subscribe_rate_per_sec > 0,
            "pubsub.subscribe_rate_per_sec",
            "must be > 0",
        )?;
        check(
            p.subscribe_burst > 0,
            "pubsub.subscribe_burst",
            "must be > 0",
        )?;
        check(
            p.topic_idle_timeout <= DAY,
            "pubsub.topic_idle_timeout",
            "must be at most 1 day",
        )?;
        check(
            p.max_bad_requests > 0,
            "pubsub.max_bad_requests",
            "must be > 0",
        )?;
        check(
            self.latency.spin_us <= 1_000_000,
            "latency.spin_us",
            "must be at most 1000000 (1 s)",
        )?;
        check(
            (8..=32768).contains(&io.uring_entries),
            "io.uring_entries",
            "must be between 8 and 32768",
        )?;
        check(
            io.ring_buffers.is_power_of_two() && io.ring_buffers <= 32768,
            "io.ring_buffers",
            "must be a power of two, at most 32768",
        )?;
        check(
            (512..=(1 << 20)).contains(&io.ring_buffer_bytes),
            "io.ring_buffer_bytes",
            "must be between 512 and 1048576",
        )?;
        let c = &self.compression;
        check(c.level <= 9, "compression.level", "must be between 0 and 9")?;
        check(
            (1..=9).contains(&c.mem_level),
            "compression.mem_level",
            "must be between 1 and 9",
        )?;
        check(
            (9..=15).contains(&c.window_bits),
            "compression.window_bits",
            "must be between 9 and 15",
        )?;
        check(
            (8..=15).contains(&c.client_window_bits),
            "compression.client_window_bits",
            "must be between 8 and 15",
        )?;
        let b = &self.broker;
        check(
            b.url.is_empty() || b.url.starts_with("redis://") || b.url.starts_with("redis+unix://"),
            "broker.url",
            "must be empty (in-memory) or a redis:// URL",
        )?;
        check(
            b.url.is_empty() || cfg!(feature = "redis"),
            "broker.url",
            "names Redis, which this build of the ringcast crate leaves out (its `redis` \
             feature)",
        )?;
        for (value, key) in [
            (b.history_max_age, "broker.history_max_age"),
            (b.command_timeout, "broker.command_timeout"),
            (b.reconnect_min_delay, "broker.reconnect_min_delay"),
            (b.health_interval, "broker.health_interval"),
        ] {
            check(!value.is_zero(), key, "must be > 0")?;
        }
        check(
            b.reconnect_max_delay >= b.reconnect_min_delay,
            "broker.reconnect_max_delay",
            "must be >= broker.reconnect_min_delay",
        )?;
        Ok(())
    }

    /// The protocol limits these settings imply.
    pub(crate) fn protocol_limits(&self) -> Limits {
        Limits::default()
            .with_max_frame_bytes(self.limits.max_frame_bytes)
            .with_max_message_bytes(self.limits.max_message_bytes)
            .with_max_header_bytes(self.limits.max_header_bytes)
    }
}

fn check(ok: bool, key: &'static str, why: &'static str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid { key, why })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let config = EngineConfig::default();
        config.validate().unwrap();
        let text = config.to_toml();
        assert!(text.contains("handshake_timeout = \"5s\""), "{text}");
        assert!(
            text.contains("max_pending_handshakes_per_ip = 256"),
            "{text}"
        );
        assert_eq!(EngineConfig::from_toml(&text).unwrap(), config);
    }

    #[test]
    fn partial_toml_keeps_other_defaults() {
        let config = EngineConfig::from_toml(
            "shards = 2\ndriver = \"epoll\"\n[timeouts]\nclose_timeout = \"250ms\"\n",
        )
        .unwrap();
        assert_eq!(config.shards, 2);
        assert_eq!(config.driver, Driver::Epoll);
        assert_eq!(config.timeouts.close_timeout, Duration::from_millis(250));
        assert_eq!(config.timeouts.handshake_timeout, Duration::from_secs(5));
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let err = EngineConfig::from_toml("[limits]\nmax_frame_byte = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_frame_byte"), "{err}");
    }

    #[test]
    fn drain_auth_and_admission_values_are_checked() {
        let mut config = EngineConfig::default();
        config.timeouts.drain_window = config.timeouts.shutdown_timeout;
        assert_eq!(
            config.validate().unwrap_err(),
            ConfigError::Invalid {
                key: "timeouts.drain_window",
                why: "must be shorter than timeouts.shutdown_timeout"
            }
        );
        let mut config = EngineConfig::default();
        config.auth.required = true;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("auth.required"));
        config.auth.hs256_secret_file = Some("/etc/ringcast/secret".into());
        assert_eq!(config.validate().is_ok(), cfg!(feature = "jwt"));
        let mut config = EngineConfig::default();
        config.admission.retry_after_max = Duration::from_millis(500);
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("retry_after_max"));
        let parsed = EngineConfig::from_toml(
            "[admission]\nallowed_origins = [\"https://*.example.com\"]\n\
             max_connections_per_ip = 10\n[auth]\nrequired = true\n\
             hs256_secret_file = \"/run/secret\"\n",
        )
        .unwrap();
        assert_eq!(parsed.admission.max_connections_per_ip, 10);
        assert_eq!(parsed.to_toml().matches("hs256_secret_file").count(), 1);
    }

    #[test]
    fn single_keys_are_set_by_dotted_name() {
        let config = EngineConfig::default()
            .set("limits.max_frame_bytes", "4096")
            .unwrap()
            .set("timeouts.drain_window", "500ms")
            .unwrap()
            .set("admission.allowed_origins", r#"["https://a.example"]"#)
            .unwrap()
            .set("auth.hs256_secret_file", "/run/secret")
            .unwrap()
            .set("shards", "3")
            .unwrap();
        assert_eq!(config.limits.max_frame_bytes, 4096);
        assert_eq!(config.timeouts.drain_window, Duration::from_millis(500));
        assert_eq!(config.admission.allowed_origins, ["https://a.example"]);
        assert_eq!(
            config.auth.hs256_secret_file,
            Some(PathBuf::from("/run/secret"))
        );
        assert_eq!(config.shards, 3);
        let err = |key: &str, value: &str| {
            EngineConfig::default()
                .set(key, value)
                .unwrap_err()
                .to_string()
        };
        assert!(err("limits.max_frame_byte", "1").contains("max_frame_byte"));
        assert!(err("limit.max_frame_bytes", "1").contains("limit"));
        assert!(err("limits.max_frame_bytes", "lots").contains("limits.max_frame_bytes"));
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        let mut config = EngineConfig::default();
        config.io.read_buffer_bytes = 10;
        assert_eq!(
            config.validate(),
            Err(ConfigError::Invalid {
                key: "io.read_buffer_bytes",
                why: "must be >= 1024"
            })
        );
        let mut config = EngineConfig::default();
        config.timeouts.close_timeout = Duration::ZERO;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("close_timeout"));
    }

    /// A config asking for a part this build leaves out fails validation naming the feature
    /// (both builds run this: with the feature the same config is valid).
    #[test]
    fn a_part_left_out_of_the_build_is_a_config_error_naming_its_feature() {
        let redis = EngineConfig::default().with_broker_url("redis://127.0.0.1:6379");
        let mut jwt = EngineConfig::default();
        jwt.auth.required = true;
        jwt.auth.hs256_secret_file = Some("/etc/ringcast/secret".into());
        let epoll = EngineConfig::default().with_driver(Driver::Epoll);
        for (config, built_in, key, feature) in [
            (
                redis,
                cfg!(feature = "redis"),
                "broker.url",
                "`redis` feature",
            ),
            (jwt, cfg!(feature = "jwt"), "auth.required", "`jwt` feature"),
            (epoll, cfg!(feature = "epoll"), "driver", "`epoll` feature"),
        ] {
            match config.validate() {
                Ok(()) => assert!(built_in, "{key} accepted without the {feature}"),
                Err(e) => {
                    assert!(!built_in, "{e}");
                    let text = e.to_string();
                    assert!(text.starts_with(key) && text.contains(feature), "{text}");
                }
            }
        }
    }

    #[test]
    fn compression_mem_level_is_checked() {
        for (mem_level, ok) in [(0u8, false), (1, true), (8, true), (9, true), (10, false)] {
            let mut config = EngineConfig::default();
            config.compression.mem_level = mem_level;
            match config.validate() {
                Ok(()) => assert!(ok, "mem_level {mem_level} accepted"),
                Err(e) => {
                    assert!(!ok, "mem_level {mem_level}: {e}");
                    assert!(e.to_string().starts_with("compression.mem_level"), "{e}");
                }
            }
        }
    }
}
