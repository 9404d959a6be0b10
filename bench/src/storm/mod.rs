//! Connection storms: how a server copes with connections coming and going in bulk.
//!
//! Two scenarios ([`Scenario`]):
//! - **churn**: `conns` slots, each in a loop for `duration`: connect, upgrade, hold the
//!   connection for `hold`, close it with the closing handshake (or, raw, a TCP close), and
//!   start again. Concurrency is bounded by the number of slots. Reports completed upgrades
//!   per second, failed attempts by reason ([`Failure`]), the connect-to-101 latency, and how
//!   the closes went.
//! - **mass reconnect**: open `conns` connections (in batches, like the idle load), then close
//!   them all at once from the client side (a TCP close without the closing handshake, as
//!   when a network path drops), and reconnect every one at once. A failed attempt is retried
//!   after an exponential backoff with full jitter ([`Backoff`]). Reports the time until all
//!   are back, the failures, and the distribution of each connection's reconnect time (from the
//!   end of the mass close to its 101).
//!
//! One thread drives all of a process's slots with mio (epoll): non-blocking connects, each
//! bound to a loopback source address ([`SourceAddrs`](crate::net::SourceAddrs), slot `i`
//! gets address `i / per_addr`) with `IP_BIND_ADDRESS_NO_PORT`. Above
//! [`AUTO_CONNS_PER_PROCESS`](idle::AUTO_CONNS_PER_PROCESS) connections the slots are split
//! over child processes (see `workers.rs`; this binary re-executed as `storm-worker`), which
//! start together on the parent's `go` and send their results back as JSON.
//!
//! Bounded: every attempt has a deadline ([`StormConfig::attempt_timeout`]), churn stops
//! starting attempts after `duration`, the reconnect gives up after `reconnect_timeout`, closing
//! waits at most [`CLOSE_TIMEOUT`], and each run has an overall deadline past which whatever is
//! still in flight is dropped. Workers exit on their own at their deadline.
//!
//! Where things are: `config.rs`, the scenario, backoff and config; `parts.rs`, the split over
//! processes and the worker protocol; `engine.rs`, the slots' event loop; `report.rs`, the
//! results and the report.

mod config;
mod engine;
mod parts;
mod report;

use std::time::Duration;

use anyhow::{ensure, Result};

pub use self::{
    config::{Backoff, PartConfig, PartKind, Scenario, StormConfig},
    engine::Failure,
    parts::storm_worker,
    report::{ChurnReport, MassReport, PartResult, StormReport},
};
use self::{
    parts::run_parts,
    report::{churn_report, mass_report},
};
use crate::idle;

/// How long a connection gets to finish closing (the server's close and TCP close).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the storm; see the module docs.
///
/// # Errors
/// A bad config, a worker process fails or misses its deadline, or the poll cannot be set up.
/// A run in which attempts fail is not an error: see [`StormReport::check`].
pub fn run_storm(cfg: &StormConfig) -> Result<StormReport> {
    ensure!(cfg.conns > 0, "--conns must be at least 1");
    ensure!(
        !cfg.attempt_timeout.is_zero(),
        "--attempt-timeout must be positive"
    );
    ensure!(
        cfg.backoff.base <= cfg.backoff.cap,
        "--backoff-base must not exceed --backoff-cap"
    );
    let procs = idle::processes(cfg.conns, cfg.procs)?;
    cfg.sources.for_index(cfg.conns - 1)?;

    let mut report = StormReport {
        mode: if cfg.raw { "raw" } else { "ws" }.to_owned(),
        conns: cfg.conns,
        procs,
        churn: None,
        mass: None,
    };
    if matches!(cfg.scenario, Scenario::Churn | Scenario::Both) {
        ensure!(!cfg.duration.is_zero(), "--duration must be positive");
        let parts = run_parts(cfg, PartKind::Churn, procs)?;
        report.churn = Some(churn_report(cfg, &parts));
    }
    if matches!(cfg.scenario, Scenario::Mass | Scenario::Both) {
        let parts = run_parts(cfg, PartKind::Mass, procs)?;
        report.mass = Some(mass_report(cfg, &parts));
    }
    Ok(report)
}
