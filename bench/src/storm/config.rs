//! What a storm is asked to do: the scenario, the backoff, the config, and one process's
//! part of it.

use std::{fmt, str::FromStr, time::Duration};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::net::{SourceAddrs, Target};

use super::CLOSE_TIMEOUT;

/// Which storm to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scenario {
    /// Connect, hold, close, repeat.
    Churn,
    /// Open all, drop all at once, reconnect all.
    Mass,
    /// Churn, then the mass reconnect.
    #[default]
    Both,
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "churn" => Ok(Self::Churn),
            "mass" => Ok(Self::Mass),
            "both" => Ok(Self::Both),
            other => Err(format!("unknown scenario {other:?}: churn, mass or both")),
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Churn => "churn",
            Self::Mass => "mass",
            Self::Both => "both",
        })
    }
}

/// Exponential backoff with full jitter: after the `n`th failure in a row, wait a uniformly
/// random time in `[0, min(cap, base * 2^(n-1)))`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    /// The ceiling after the first failure.
    pub base: Duration,
    /// The largest ceiling.
    pub cap: Duration,
}

impl Backoff {
    /// The ceiling after `failures` failures in a row (0 gives zero: the first try is
    /// immediate).
    pub fn ceiling(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(failures - 1).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The wait after `failures` failures in a row, with `unit` uniform in `[0, 1)`.
    pub fn wait(&self, failures: u32, unit: f64) -> Duration {
        self.ceiling(failures).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct StormConfig {
    /// The server.
    pub target: Target,
    /// Which storm.
    pub scenario: Scenario,
    /// Slots (churn) or connections (mass reconnect).
    pub conns: usize,
    /// Processes to spread them over; 0 picks one per
    /// [`AUTO_CONNS_PER_PROCESS`](crate::idle::AUTO_CONNS_PER_PROCESS).
    pub procs: usize,
    /// Churn: how long to keep churning.
    pub duration: Duration,
    /// Churn: how long each connection stays open once upgraded.
    pub hold: Duration,
    /// Mass reconnect: how long all connections get to come back.
    pub reconnect_timeout: Duration,
    /// Limit for one attempt: connect plus upgrade.
    pub attempt_timeout: Duration,
    /// Retry delays after failed attempts.
    pub backoff: Backoff,
    /// Mass reconnect: deadline for opening the connections before the storm.
    pub open_timeout: Duration,
    /// Plain TCP connections, no upgrade (for a raw TCP server).
    pub raw: bool,
    /// Source addresses for the connections.
    pub sources: SourceAddrs,
    /// Draw a progress bar on stderr (when it is a terminal and the run lasts over a second).
    pub progress: bool,
}

impl StormConfig {
    /// The defaults for `target`: both scenarios, 1000 connections, 5 s of churn holding each
    /// connection 100 ms, 30 s for the reconnect, 5 s per attempt, backoff from 100 ms up to
    /// 5 s.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            scenario: Scenario::Both,
            conns: 1000,
            procs: 0,
            duration: Duration::from_secs(5),
            hold: Duration::from_millis(100),
            reconnect_timeout: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(5),
            backoff: Backoff {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(5),
            },
            open_timeout: Duration::from_secs(120),
            raw: false,
            sources: SourceAddrs::default(),
            progress: false,
        }
    }
}

/// Which part of a storm one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PartKind {
    /// The churn loop.
    Churn,
    /// The mass reconnect.
    Mass,
}

/// One process's share of a storm; the hidden `storm-worker` subcommand takes it as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartConfig {
    /// `ws://` or `tcp://` URL of the server.
    pub url: String,
    /// Which loop.
    pub kind: PartKind,
    /// Global index of the first slot (it picks the source address).
    pub first_index: usize,
    /// Slots in this part.
    pub count: usize,
    /// Source addresses, shared by all parts.
    #[serde(flatten)]
    pub sources: SourceAddrs,
    /// See [`StormConfig::duration`].
    pub duration: Duration,
    /// See [`StormConfig::hold`].
    pub hold: Duration,
    /// See [`StormConfig::reconnect_timeout`].
    pub reconnect_timeout: Duration,
    /// See [`StormConfig::attempt_timeout`].
    pub attempt_timeout: Duration,
    /// See [`StormConfig::backoff`].
    pub backoff: Backoff,
    /// See [`StormConfig::open_timeout`].
    pub open_timeout: Duration,
    /// Plain TCP.
    pub raw: bool,
}

impl PartConfig {
    /// The longest this part's run (after `go`) can last, closing included.
    pub(super) fn run_limit(&self) -> Duration {
        let core = match self.kind {
            PartKind::Churn => self.duration + self.attempt_timeout,
            PartKind::Mass => self.reconnect_timeout,
        };
        core + CLOSE_TIMEOUT + Duration::from_secs(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        assert_eq!(b.ceiling(0), Duration::ZERO);
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(800));
        assert_eq!(b.ceiling(5), Duration::from_secs(1));
        assert_eq!(b.ceiling(200), Duration::from_secs(1));
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
        };
        assert_eq!(b.wait(3, 0.0), Duration::ZERO);
        assert_eq!(b.wait(3, 0.5), Duration::from_millis(200));
        assert!(b.wait(3, 0.999_999) < Duration::from_millis(400));
        assert_eq!(b.wait(0, 0.7), Duration::ZERO);
    }
}
