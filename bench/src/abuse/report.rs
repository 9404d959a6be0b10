//! What an abuse run found: per attack, the live client's round trips and fresh upgrades, and
//! what the server answered the attackers.

use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use anyhow::{ensure, Result};
use serde::Serialize;
use std::time::Duration;

/// One timed operation of the live client: when it started, how long it took (`None`: it
/// failed or timed out).
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    pub(super) at: Instant,
    pub(super) took: Option<Duration>,
}

/// The live client's timings over one attack, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LiveSummary {
    /// Operations that succeeded.
    pub ok: u64,
    /// Operations that failed or took longer than the round timeout (2 s).
    pub failed: u64,
    /// Median of the successful ones.
    pub p50_ms: f64,
    /// 99th percentile of the successful ones.
    pub p99_ms: f64,
    /// The slowest successful one, or the round timeout if any failed.
    pub worst_ms: f64,
}

impl LiveSummary {
    /// Summarizes the samples that started in `[from, to)`; a failure counts as `timeout`
    /// in `worst_ms`.
    pub(super) fn of(samples: &[Sample], from: Instant, to: Instant, timeout: Duration) -> Self {
        let mut ms: Vec<f64> = Vec::new();
        let mut failed = 0;
        for s in samples.iter().filter(|s| s.at >= from && s.at < to) {
            match s.took {
                Some(d) => ms.push(d.as_secs_f64() * 1e3),
                None => failed += 1,
            }
        }
        ms.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            if ms.is_empty() {
                0.0
            } else {
                ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)]
            }
        };
        let mut worst = ms.last().copied().unwrap_or(0.0);
        if failed > 0 {
            worst = worst.max(timeout.as_secs_f64() * 1e3);
        }
        Self {
            ok: ms.len() as u64,
            failed,
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
            worst_ms: worst,
        }
    }
}

/// What one attack's connections did and were answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tally {
    /// Requests sent (half-open: connections opened).
    pub sent: u64,
    /// Answers by kind: `ack`, an error code (`rate_limited`, `too_many_topics`,
    /// `too_large`, `bad_payload`, ...), `close CODE`, `http STATUS`, `no answer` (the
    /// server closed without one, or none came before the attack ended).
    pub answers: BTreeMap<String, u64>,
    /// Connections that failed to open or broke (reset, write timeout).
    pub conn_failures: u64,
    /// The first such failure.
    pub first_failure: Option<String>,
}

impl Tally {
    /// Counts one answer of kind `kind`.
    pub(super) fn answer(&mut self, kind: &str) {
        *self.answers.entry(kind.to_owned()).or_default() += 1;
    }

    /// Counts a connection failure.
    pub(super) fn fail(&mut self, err: &anyhow::Error) {
        self.conn_failures += 1;
        self.first_failure.get_or_insert_with(|| format!("{err:#}"));
    }

    /// Adds another connection's tally.
    pub(super) fn merge(&mut self, other: Self) {
        self.sent += other.sent;
        for (k, v) in other.answers {
            *self.answers.entry(k).or_default() += v;
        }
        self.conn_failures += other.conn_failures;
        if self.first_failure.is_none() {
            self.first_failure = other.first_failure;
        }
    }

    /// How many answers were one of `kinds`.
    #[must_use]
    pub fn count_of(&self, kinds: &[&str]) -> u64 {
        kinds
            .iter()
            .map(|k| self.answers.get(*k).copied().unwrap_or(0))
            .sum()
    }
}

/// One attack's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttackReport {
    /// The attack (`sub-flood`, ...), or `baseline` for the quiet second before the first.
    pub attack: String,
    /// How long it ran, in seconds.
    pub secs: f64,
    /// What the attackers sent and were answered.
    pub tally: Tally,
    /// The refusals a bounded server answers this attack with (see
    /// [`Attack::expected_refusals`](super::Attack::expected_refusals)) that it did answer.
    pub refusals: u64,
    /// The live client's publish -> ack -> message round trips during the attack.
    pub live: LiveSummary,
    /// Fresh connections' upgrades (connect to 101) during the attack.
    pub upgrades: LiveSummary,
    /// The server's RSS at the end of the attack, in MB, with `--server-pid`.
    pub server_rss_mb: Option<f64>,
    /// The server's `/metrics` over the attack: how each refusal counter rose (`NAME +`)
    /// and the topic gauges after it; empty when it could not be read.
    pub server: BTreeMap<String, f64>,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AbuseReport {
    /// The live client's round trip worst allowed, in milliseconds.
    pub max_rtt_ms: f64,
    /// A quiet stretch first, then each attack in the order run.
    pub attacks: Vec<AttackReport>,
}

impl AbuseReport {
    /// The report as a table: one row per attack.
    #[must_use]
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<12} {:>5} {:>9} {:>28} {:>28}  server answered",
            "attack", "secs", "sent", "live rtt p50/p99/worst ms", "upgrade p50/p99/worst ms"
        );
        for a in &self.attacks {
            let live = |l: &LiveSummary| {
                let failed = if l.failed > 0 {
                    format!(" ({} failed)", l.failed)
                } else {
                    String::new()
                };
                format!("{:.1}/{:.1}/{:.1}{failed}", l.p50_ms, l.p99_ms, l.worst_ms)
            };
            let answers: Vec<String> = a
                .tally
                .answers
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let mut answered = answers.join(", ");
            if a.tally.conn_failures > 0 {
                let _ = write!(answered, "; {} conn failures", a.tally.conn_failures);
            }
            if let Some(rss) = a.server_rss_mb {
                let _ = write!(answered, "; server RSS {rss:.0} MB");
            }
            let _ = writeln!(
                s,
                "{:<12} {:>5.1} {:>9} {:>28} {:>28}  {answered}",
                a.attack,
                a.secs,
                a.tally.sent,
                live(&a.live),
                live(&a.upgrades)
            );
            if !a.server.is_empty() {
                let metrics: Vec<String> =
                    a.server.iter().map(|(k, v)| format!("{k} {v}")).collect();
                let _ = writeln!(s, "{:<12} server /metrics: {}", "", metrics.join(", "));
            }
        }
        let _ = writeln!(
            s,
            "live client: {} round trips, worst {:.1} ms (limit {:.0} ms)",
            self.attacks.iter().map(|a| a.live.ok).sum::<u64>(),
            self.worst_rtt_ms(),
            self.max_rtt_ms
        );
        s
    }

    /// The live client's worst round trip over the run, in milliseconds.
    #[must_use]
    pub fn worst_rtt_ms(&self) -> f64 {
        self.attacks
            .iter()
            .map(|a| a.live.worst_ms)
            .fold(0.0, f64::max)
    }

    /// Fails when the live client made no round trip during some attack, or its worst round
    /// trip exceeded `max_rtt_ms`.
    ///
    /// # Errors
    /// As above, naming the attack.
    pub fn check(&self) -> Result<()> {
        for a in &self.attacks {
            ensure!(
                a.live.ok > 0,
                "{}: the live client made no round trip",
                a.attack
            );
            ensure!(
                a.live.worst_ms <= self.max_rtt_ms,
                "{}: the live client's worst round trip was {:.1} ms, over the {:.0} ms allowed \
                 ({} failed)",
                a.attack,
                a.live.worst_ms,
                self.max_rtt_ms,
                a.live.failed
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_its_samples_and_a_failure_is_as_bad_as_the_timeout() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let samples = [
            Sample {
                at: at(0),
                took: Some(Duration::from_millis(50)),
            },
            Sample {
                at: at(10),
                took: Some(Duration::from_millis(1)),
            },
            Sample {
                at: at(20),
                took: Some(Duration::from_millis(3)),
            },
            Sample {
                at: at(30),
                took: None,
            },
        ];
        let timeout = Duration::from_secs(2);
        // The first is outside the window.
        let s = LiveSummary::of(&samples, at(5), at(40), timeout);
        assert_eq!((s.ok, s.failed), (2, 1));
        assert_eq!(s.p50_ms, 3.0);
        assert_eq!(s.worst_ms, 2000.0);
        let s = LiveSummary::of(&samples, at(0), at(25), timeout);
        assert_eq!((s.ok, s.failed, s.worst_ms), (3, 0, 50.0));
        let report = AbuseReport {
            max_rtt_ms: 100.0,
            attacks: vec![AttackReport {
                attack: "x".into(),
                secs: 1.0,
                tally: Tally::default(),
                refusals: 0,
                live: s,
                upgrades: LiveSummary::default(),
                server_rss_mb: None,
                server: BTreeMap::new(),
            }],
        };
        report.check().unwrap();
        let mut slow = report.clone();
        slow.max_rtt_ms = 10.0;
        let err = slow.check().unwrap_err().to_string();
        assert!(
            err.contains("x: the live client's worst round trip was 50.0 ms"),
            "{err}"
        );
        let mut idle = report;
        idle.attacks[0].live = LiveSummary::default();
        assert!(idle
            .check()
            .unwrap_err()
            .to_string()
            .contains("no round trip"));
    }
}
