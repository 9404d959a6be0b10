//! What a storm measured: each part's result, the churn and mass-reconnect reports merged
//! from them, their text and their check.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::{
    echo::{spectrum, SpectrumPoint},
    stats::{latency_histogram, record_buckets, LatencySummary},
    timeline::{self, merge_counts},
};

use super::config::StormConfig;

/// What one process measured; merged into a [`StormReport`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PartResult {
    /// Mass: connections open before the storm.
    pub opened: usize,
    /// Mass: connections that failed to open before the storm.
    pub open_failed: usize,
    /// Mass: seconds to open them.
    pub open_secs: f64,
    /// Mass: seconds to close them all.
    pub close_secs: f64,
    /// Attempts started.
    pub attempts: u64,
    /// Attempts that completed the upgrade (churn: inside the window).
    pub upgrades: u64,
    /// Failed attempts by [`Failure::key`](super::Failure::key).
    pub failures: BTreeMap<String, u64>,
    /// The first failure's message.
    pub first_failure: Option<String>,
    /// Attempts still in flight when the run ended (neither failed nor upgraded).
    pub abandoned: u64,
    /// Closes that completed (the server's close frame and TCP close came back).
    pub closed_cleanly: u64,
    /// Closes that timed out or failed.
    pub unclean_closes: u64,
    /// Upgraded connections the server closed on its own.
    pub dropped_by_server: u64,
    /// Connect-to-upgrade latency of the upgrades, as `(nanoseconds, count)` buckets.
    pub upgrade_ns: Vec<(u64, u64)>,
    /// Mass: each connection's reconnect time (end of the mass close to upgrade), as buckets.
    pub reconnect_ns: Vec<(u64, u64)>,
    /// Mass: connections back.
    pub back: usize,
    /// Mass: nanoseconds from the end of the mass close until the last came back, if all did.
    pub all_back_ns: Option<u64>,
    /// Upgrades per [`timeline::INTERVAL`] from the start.
    pub timeline: Vec<u64>,
}

/// Churn results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChurnReport {
    /// Length of the churn, in seconds.
    pub duration_secs: f64,
    /// How long each connection was held, in milliseconds.
    pub hold_ms: f64,
    /// Attempts started.
    pub attempts: u64,
    /// Upgrades completed inside the window.
    pub upgrades: u64,
    /// Upgrades per second.
    pub upgrades_per_sec: f64,
    /// Failed attempts.
    pub failed: u64,
    /// Failed attempts by reason (`refused`, `timeout`, `http NNN`, `reset`, `closed`,
    /// `no ports`, `other`).
    pub failures: BTreeMap<String, u64>,
    /// The first failure's message.
    pub first_failure: Option<String>,
    /// Attempts in flight when the window ended (not counted either way).
    pub abandoned: u64,
    /// Connect-to-101 latency.
    pub upgrade_latency: LatencySummary,
    /// Closes that completed cleanly.
    pub closed_cleanly: u64,
    /// Closes that timed out or failed.
    pub unclean_closes: u64,
    /// Held connections the server closed on its own.
    pub dropped_by_server: u64,
    /// The length of one timeline interval, in milliseconds.
    pub interval_ms: u64,
    /// Upgrades per interval.
    pub timeline: Vec<u64>,
}

/// Mass-reconnect results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MassReport {
    /// Connections open before the storm.
    pub opened: usize,
    /// Connections that failed to open before the storm.
    pub open_failed: usize,
    /// Seconds to open them (the slowest process).
    pub open_secs: f64,
    /// Seconds this client took to close them all (the slowest process); reconnect times
    /// count from the end of it.
    pub close_secs: f64,
    /// Connections back after the storm.
    pub back: usize,
    /// Seconds from the end of the mass close until every connection was back; `None` if
    /// some never came back before the reconnect timeout.
    pub all_back_secs: Option<f64>,
    /// Reconnect attempts started.
    pub attempts: u64,
    /// Failed attempts (each was retried after a backoff).
    pub failed: u64,
    /// Failed attempts by reason.
    pub failures: BTreeMap<String, u64>,
    /// The first failure's message.
    pub first_failure: Option<String>,
    /// Each connection's reconnect time (end of the mass close to its 101), as latency
    /// percentiles.
    pub reconnect: LatencySummary,
    /// The reconnect times' spectrum.
    pub reconnect_spectrum: Vec<SpectrumPoint>,
    /// Connect-to-101 latency of the successful attempts.
    pub upgrade_latency: LatencySummary,
    /// Backoff after the first failure, in milliseconds.
    pub backoff_base_ms: f64,
    /// Largest backoff, in milliseconds.
    pub backoff_cap_ms: f64,
    /// Reconnected connections closed cleanly at the end.
    pub closed_cleanly: u64,
    /// The length of one timeline interval, in milliseconds.
    pub interval_ms: u64,
    /// Upgrades per interval from the mass close.
    pub timeline: Vec<u64>,
}

/// Everything a storm run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormReport {
    /// `"ws"` or `"raw"`.
    pub mode: String,
    /// Slots or connections.
    pub conns: usize,
    /// Processes that ran them.
    pub procs: usize,
    /// The churn, if it ran.
    pub churn: Option<ChurnReport>,
    /// The mass reconnect, if it ran.
    pub mass: Option<MassReport>,
}

impl StormReport {
    /// A few human-readable lines.
    pub fn human(&self) -> String {
        let mut out = String::new();
        if let Some(c) = &self.churn {
            let l = &c.upgrade_latency;
            out += &format!(
                "storm churn {mode}: {conns} slots over {procs} process(es), hold {hold:.0} ms, \
                 {dur:.1} s: {ups} upgrades, {rate:.0} upgrades/s | {failed} failed{reasons} | \
                 upgrade us p50 {p50:.0} p99 {p99:.0} max {max:.0} | closes: {clean} clean, \
                 {unclean} unclean, {dropped} dropped by server\n",
                mode = self.mode,
                conns = self.conns,
                procs = self.procs,
                hold = c.hold_ms,
                dur = c.duration_secs,
                ups = c.upgrades,
                rate = c.upgrades_per_sec,
                failed = c.failed,
                reasons = reasons(&c.failures),
                p50 = l.p50_us,
                p99 = l.p99_us,
                max = l.max_us,
                clean = c.closed_cleanly,
                unclean = c.unclean_closes,
                dropped = c.dropped_by_server,
            );
        }
        if let Some(m) = &self.mass {
            let r = &m.reconnect;
            out += &format!(
                "storm mass {mode}: {opened} open ({open_failed} failed) over {procs} \
                 process(es), all closed at once (in {close:.3} s): {back}/{opened} back{all} | \
                 {attempts} \
                 attempts, {failed} failed{reasons} (backoff {base:.0}..{cap:.0} ms, full \
                 jitter) | reconnect ms p50 {p50:.1} p90 {p90:.1} p99 {p99:.1} max {max:.1}\n",
                mode = self.mode,
                opened = m.opened,
                open_failed = m.open_failed,
                close = m.close_secs,
                procs = self.procs,
                back = m.back,
                all = m
                    .all_back_secs
                    .map_or_else(|| " (NOT all back)".to_owned(), |s| format!(" in {s:.3} s")),
                attempts = m.attempts,
                failed = m.failed,
                reasons = reasons(&m.failures),
                base = m.backoff_base_ms,
                cap = m.backoff_cap_ms,
                p50 = r.p50_us / 1000.0,
                p90 = r.p90_us / 1000.0,
                p99 = r.p99_us / 1000.0,
                max = r.max_us / 1000.0,
            );
        }
        out
    }

    /// Whether the run worked: the churn upgraded something and at most `max_failure_pct` of
    /// its attempts failed; the mass reconnect opened something and got every connection
    /// back. Failed reconnect attempts are retried by design, so only the end state counts.
    ///
    /// # Errors
    /// The first of those that does not hold.
    pub fn check(&self, max_failure_pct: f64) -> Result<()> {
        if let Some(c) = &self.churn {
            ensure!(c.upgrades > 0, "churn: no connection was upgraded");
            let pct = 100.0 * c.failed as f64 / c.attempts.max(1) as f64;
            ensure!(
                pct <= max_failure_pct,
                "churn: {pct:.1}% of attempts failed, more than the {max_failure_pct}% allowed \
                 (first: {})",
                c.first_failure.as_deref().unwrap_or("?")
            );
        }
        if let Some(m) = &self.mass {
            ensure!(m.opened > 0, "mass: no connection could be opened");
            ensure!(
                m.all_back_secs.is_some(),
                "mass: only {} of {} connections came back (first failure: {})",
                m.back,
                m.opened,
                m.first_failure.as_deref().unwrap_or("-")
            );
        }
        Ok(())
    }
}

/// ` (refused 3, timeout 1)`, or nothing when empty.
fn reasons(failures: &BTreeMap<String, u64>) -> String {
    if failures.is_empty() {
        return String::new();
    }
    let list: Vec<String> = failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
    format!(" ({})", list.join(", "))
}

/// Builds the churn report from the parts.
pub(super) fn churn_report(cfg: &StormConfig, parts: &[PartResult]) -> ChurnReport {
    let m = merge(parts);
    let failed = m.failures.values().sum();
    ChurnReport {
        duration_secs: cfg.duration.as_secs_f64(),
        hold_ms: cfg.hold.as_secs_f64() * 1000.0,
        attempts: m.attempts,
        upgrades: m.upgrades,
        upgrades_per_sec: m.upgrades as f64 / cfg.duration.as_secs_f64(),
        failed,
        failures: m.failures,
        first_failure: m.first_failure,
        abandoned: m.abandoned,
        upgrade_latency: LatencySummary::from_histogram(&m.upgrade),
        closed_cleanly: m.closed_cleanly,
        unclean_closes: m.unclean_closes,
        dropped_by_server: m.dropped_by_server,
        interval_ms: timeline::INTERVAL.as_millis() as u64,
        timeline: m.timeline,
    }
}

/// Builds the mass-reconnect report from the parts.
pub(super) fn mass_report(cfg: &StormConfig, parts: &[PartResult]) -> MassReport {
    let m = merge(parts);
    let opened: usize = parts.iter().map(|p| p.opened).sum();
    let all_back = parts
        .iter()
        .all(|p| p.opened == 0 || p.all_back_ns.is_some());
    let failed = m.failures.values().sum();
    MassReport {
        opened,
        open_failed: parts.iter().map(|p| p.open_failed).sum(),
        open_secs: parts.iter().map(|p| p.open_secs).fold(0.0, f64::max),
        close_secs: parts.iter().map(|p| p.close_secs).fold(0.0, f64::max),
        back: parts.iter().map(|p| p.back).sum(),
        all_back_secs: (all_back && opened > 0).then(|| {
            parts
                .iter()
                .filter_map(|p| p.all_back_ns)
                .max()
                .unwrap_or(0) as f64
                / 1e9
        }),
        attempts: m.attempts,
        failed,
        failures: m.failures,
        first_failure: m.first_failure,
        reconnect: LatencySummary::from_histogram(&m.reconnect),
        reconnect_spectrum: spectrum(&m.reconnect),
        upgrade_latency: LatencySummary::from_histogram(&m.upgrade),
        backoff_base_ms: cfg.backoff.base.as_secs_f64() * 1000.0,
        backoff_cap_ms: cfg.backoff.cap.as_secs_f64() * 1000.0,
        closed_cleanly: m.closed_cleanly,
        interval_ms: timeline::INTERVAL.as_millis() as u64,
        timeline: m.timeline,
    }
}

/// The parts added up.
#[derive(Debug)]
struct Merged {
    attempts: u64,
    upgrades: u64,
    failures: BTreeMap<String, u64>,
    first_failure: Option<String>,
    abandoned: u64,
    closed_cleanly: u64,
    unclean_closes: u64,
    dropped_by_server: u64,
    upgrade: Histogram<u64>,
    reconnect: Histogram<u64>,
    timeline: Vec<u64>,
}

fn merge(parts: &[PartResult]) -> Merged {
    let mut m = Merged {
        attempts: 0,
        upgrades: 0,
        failures: BTreeMap::new(),
        first_failure: None,
        abandoned: 0,
        closed_cleanly: 0,
        unclean_closes: 0,
        dropped_by_server: 0,
        upgrade: latency_histogram(),
        reconnect: latency_histogram(),
        timeline: Vec::new(),
    };
    for p in parts {
        m.attempts += p.attempts;
        m.upgrades += p.upgrades;
        for (k, v) in &p.failures {
            *m.failures.entry(k.clone()).or_default() += v;
        }
        if m.first_failure.is_none() {
            m.first_failure.clone_from(&p.first_failure);
        }
        m.abandoned += p.abandoned;
        m.closed_cleanly += p.closed_cleanly;
        m.unclean_closes += p.unclean_closes;
        m.dropped_by_server += p.dropped_by_server;
        record_buckets(&mut m.upgrade, &p.upgrade_ns);
        record_buckets(&mut m.reconnect, &p.reconnect_ns);
        merge_counts(&mut m.timeline, &p.timeline);
    }
    m
}
