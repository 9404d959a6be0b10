//! What an abuse run is asked to do: the attacks and their sizes.

use std::{fmt, str::FromStr, time::Duration};

use crate::net::Target;

/// One attack of issue 15's battery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// Subscribe then unsubscribe distinct topic names, as fast as answered.
    SubFlood,
    /// Publish to a new topic name each time.
    PublishNew,
    /// One huge subscribe repeating a topic that has history, with `since`.
    Replay,
    /// Subscribe, subscribe, unsubscribe on the same topics (with `since`), over and over;
    /// meant for a server with `--broker redis://`.
    Toggle,
    /// Connections dribbling an upgrade request a byte at a time and connections sending
    /// nothing, from several source addresses.
    HalfOpen,
    /// Publishes whose JSON `data` nests far deeper than any parser should recurse.
    Nesting,
}

impl Attack {
    /// Every attack, in the order a run takes them by default.
    pub const ALL: [Self; 6] = [
        Self::SubFlood,
        Self::PublishNew,
        Self::Replay,
        Self::Toggle,
        Self::HalfOpen,
        Self::Nesting,
    ];

    /// The refusals a server bounded against this attack answers with (any one suffices):
    /// the envelope's error codes, `close CODE` or `http STATUS`.
    #[must_use]
    pub const fn expected_refusals(self) -> &'static [&'static str] {
        match self {
            Self::SubFlood | Self::Toggle => &["rate_limited", "too_many_topics"],
            Self::PublishNew => &["too_many_topics", "rate_limited"],
            Self::Replay => &["too_large", "rate_limited"],
            Self::HalfOpen => &["http 408", "http 429", "http 503"],
            Self::Nesting => &["bad_payload"],
        }
    }
}

impl FromStr for Attack {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|a| a.to_string() == s)
            .ok_or_else(|| {
                let names: Vec<String> = Self::ALL.iter().map(ToString::to_string).collect();
                format!("unknown attack {s:?}: one of {}", names.join(", "))
            })
    }
}

impl fmt::Display for Attack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::SubFlood => "sub-flood",
            Self::PublishNew => "publish-new",
            Self::Replay => "replay",
            Self::Toggle => "toggle",
            Self::HalfOpen => "half-open",
            Self::Nesting => "nesting",
        })
    }
}

/// An abuse run; see the module docs. [`AbuseConfig::new`] gives the defaults of `loadgen
/// abuse`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AbuseConfig {
    /// The broker (`ringcast serve`, not `--echo`).
    pub target: Target,
    /// The attacks, run one after the other.
    pub attacks: Vec<Attack>,
    /// How long each attack lasts.
    pub duration: Duration,
    /// Attacking connections per attack (half-open has its own count).
    pub connections: usize,
    /// The live client's round trip period.
    pub live_interval: Duration,
    /// The live client's round trip worst allowed; see [`AbuseReport::check`](super::AbuseReport::check).
    pub max_rtt: Duration,
    /// Topics a sub-flood subscribe names at once (then unsubscribes).
    pub flood_batch: usize,
    /// Requests an attacking connection keeps in flight.
    pub window: usize,
    /// Messages of history the replay attack publishes to its topic first.
    pub replay_history: usize,
    /// Entries of the replay attack's subscribe (`{"topic":..,"since":0}` each, 33 bytes).
    pub replay_repeats: usize,
    /// Topics the toggling client subscribes, subscribes again and unsubscribes.
    pub toggle_topics: usize,
    /// Half-open: connections in all (half dribbling, half silent).
    pub halfopen_conns: usize,
    /// Half-open: source addresses they come from (127.0.0.2 onwards).
    pub halfopen_sources: u8,
    /// Half-open: a dribbling connection sends one byte of its request this often.
    pub dribble_every: Duration,
    /// Half-open: a connection the server closed is opened again after this.
    pub reopen_after: Duration,
    /// Nesting: depth of the payload's arrays.
    pub nest_depth: usize,
    /// Limit for opening one connection (connect and upgrade).
    pub open_timeout: Duration,
    /// The server's pid, to report its RSS after each attack.
    pub server_pid: Option<u32>,
}

impl AbuseConfig {
    /// The defaults of `loadgen abuse`, against `target`.
    #[must_use]
    pub fn new(target: Target) -> Self {
        Self {
            target,
            attacks: Attack::ALL.to_vec(),
            duration: Duration::from_secs(10),
            connections: 8,
            live_interval: Duration::from_millis(50),
            max_rtt: Duration::from_millis(100),
            flood_batch: 64,
            window: 16,
            replay_history: 1000,
            replay_repeats: 100_000,
            toggle_topics: 64,
            halfopen_conns: 4000,
            halfopen_sources: 8,
            dribble_every: Duration::from_secs(5),
            reopen_after: Duration::from_millis(500),
            nest_depth: 100_000,
            open_timeout: Duration::from_secs(5),
            server_pid: None,
        }
    }
}
