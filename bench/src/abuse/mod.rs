//! The abuse battery of issue 15: attacks on a running broker, one after the other, each for
//! a bounded time, with a live client beside them, reporting per attack the live client's
//! round trips and what the server answered the attackers.
//!
//! The live client ([`live`](self)) publishes to its own topic every 50 ms and waits for the
//! ack and the message back (the JSON dialect, `ringcast.v1.json`), and a fresh connection
//! upgrades every 100 ms; both come from 127.0.0.1. The attacks ([`Attack`]) come from
//! 127.0.0.2 onwards:
//!
//! - `sub-flood`: subscribe then unsubscribe batches of distinct names (a bounded server
//!   answers `rate_limited` once the subscribe budget is spent, `too_many_topics` at its cap);
//! - `publish-new`: publish to a new name each time (`too_many_topics`, `rate_limited`);
//! - `replay`: one subscribe repeating `{"topic":"abuse.replay","since":0}` 100,000 times
//!   (3.3 MB: `too_large`), then one of 30,000 that fits (merged into one, or `rate_limited`),
//!   against a topic given 1,000 messages of history first;
//! - `toggle`: subscribe, subscribe, unsubscribe on the same 64 topics (10 messages of history
//!   each) with `since: 0`, over and over (meaningful against `serve --broker redis://`: the
//!   bridge's attaches; the default subscribe budget answers most rounds `rate_limited`, so
//!   lift `pubsub.subscribe_rate_per_sec` and `_burst` to load the bridge itself);
//! - `half-open`: connections dribbling an upgrade request a byte every 5 s and connections
//!   sending nothing (`408` at the handshake timeout, `429` over the per-address cap on
//!   unfinished upgrades, `503` when out of descriptors);
//! - `nesting`: publishes whose `data` nests 100,000 arrays deep (`bad_payload`, then close
//!   1008 for too many bad requests).
//!
//! The server's `/metrics` is read before and after each attack: the report shows how its
//! refusal counters (`topics_refused`, `subscribes_refused`, `bad_requests`,
//! `upgrade_rejections` by reason, ...) rose, and its topic count.
//!
//! A quiet second first gives the live client's baseline. [`AbuseReport::check`] fails when
//! the live client's worst round trip in any attack exceeds `max_rtt` (100 ms by default), so
//! the run can gate; [`Attack::expected_refusals`] names what each attack should be answered.
//!
//! ```text
//! target/release/ringcast serve --shards 2 --listen 127.0.0.1:9000 &
//! target/release/loadgen abuse --url ws://127.0.0.1:9000/ --duration 10 --server-pid $!
//! ```
//!
//! Bounded: each attack stops at its duration (answers in flight get one more second), every
//! wait and write has a timeout, the live client's rounds time out at 2 s, and at most
//! `connections` (half-open: `halfopen_conns`) attacking connections are open at once.
//!
//! Where things are: `config.rs`, the attacks and the config; `client.rs`, the blocking JSON
//! client; `live.rs`, the live client; `attacks.rs`, the protocol attacks; `halfopen.rs`, the
//! half-open attack; `report.rs`, the results.

mod attacks;
mod client;
mod config;
mod halfopen;
mod live;
mod metrics;
mod report;

use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};

pub use self::{
    config::{AbuseConfig, Attack},
    report::{AbuseReport, AttackReport, LiveSummary, Tally},
};
use self::{
    live::{Live, ROUND_TIMEOUT},
    report::Sample,
};
use crate::procfs;

/// The quiet stretch before the first attack, for the live client's baseline.
pub const BASELINE: Duration = Duration::from_secs(1);
/// The pause after each attack, so the next one's figures do not carry its tail.
pub const SETTLE: Duration = Duration::from_millis(500);

/// Runs the battery; see the module docs.
///
/// # Errors
/// A bad config, or the live client cannot make its first round trip (the server is not the
/// broker, or not there). A live client that is slow or fails during the attacks is not an
/// error here: see [`AbuseReport::check`].
pub fn run_abuse(cfg: &AbuseConfig) -> Result<AbuseReport> {
    ensure!(!cfg.attacks.is_empty(), "--attacks names no attack");
    ensure!(!cfg.duration.is_zero(), "--duration must be positive");
    ensure!(cfg.connections > 0, "--connections must be at least 1");
    ensure!(
        (1..=200).contains(&cfg.halfopen_sources),
        "--halfopen-sources must be 1 to 200"
    );
    ensure!(
        !cfg.live_interval.is_zero(),
        "the live interval must be positive"
    );
    let live = Live::start(cfg)?;
    let mut report = AbuseReport {
        max_rtt_ms: cfg.max_rtt.as_secs_f64() * 1e3,
        attacks: Vec::new(),
    };
    let start = Instant::now();
    let mut scraped = metrics::scrape(&cfg.target);
    thread::sleep(BASELINE);
    report.attacks.push(attack_report(
        cfg,
        &live,
        "baseline",
        start,
        Tally::default(),
        &[],
        &mut scraped,
    ));
    for &attack in &cfg.attacks {
        let start = Instant::now();
        let end = start + cfg.duration;
        let tally = match attack {
            Attack::HalfOpen => halfopen::run(cfg, end),
            _ => attacks::run(cfg, attack, end),
        };
        let tally = match tally {
            Ok(t) => t,
            Err(e) => {
                live.stop();
                return Err(e.context(format!("attack {attack}")));
            }
        };
        report.attacks.push(attack_report(
            cfg,
            &live,
            &attack.to_string(),
            start,
            tally,
            attack.expected_refusals(),
            &mut scraped,
        ));
        thread::sleep(SETTLE);
    }
    live.stop();
    Ok(report)
}

/// The report of one attack that started at `start` and has just ended.
fn attack_report(
    cfg: &AbuseConfig,
    live: &Live,
    name: &str,
    start: Instant,
    tally: Tally,
    refusals: &[&str],
    scraped: &mut Option<BTreeMap<String, f64>>,
) -> AttackReport {
    let end = Instant::now();
    let now = metrics::scrape(&cfg.target);
    let server = metrics::delta(scraped.as_ref(), now.as_ref());
    *scraped = now;
    let summary = |samples: &std::sync::Mutex<Vec<Sample>>| {
        LiveSummary::of(&samples.lock().unwrap(), start, end, ROUND_TIMEOUT)
    };
    AttackReport {
        attack: name.to_owned(),
        secs: (end - start).as_secs_f64(),
        refusals: tally.count_of(refusals),
        tally,
        live: summary(&live.rtts),
        upgrades: summary(&live.upgrades),
        server_rss_mb: cfg
            .server_pid
            .and_then(|pid| procfs::process_memory(pid).ok())
            .map(|m| m.rss_bytes as f64 / 1e6),
        server,
    }
}
