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
//! bound to a loopback source address ([`SourceAddrs`], slot `i` gets address `i / per_addr`)
//! with `IP_BIND_ADDRESS_NO_PORT`. Above [`AUTO_CONNS_PER_PROCESS`] connections the slots are
//! split over child processes (see `workers.rs`; this binary re-executed as `storm-worker`),
//! which start together on the parent's `go` and send their results back as JSON.
//!
//! Bounded: every attempt has a deadline ([`StormConfig::attempt_timeout`]), churn stops
//! starting attempts after `duration`, the reconnect gives up after `reconnect_timeout`, closing
//! waits at most [`CLOSE_TIMEOUT`], and each run has an overall deadline past which whatever is
//! still in flight is dropped. Workers exit on their own at their deadline.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap},
    fmt,
    io::{self, BufRead as _, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddrV4},
    os::fd::AsRawFd as _,
    str::FromStr,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use mio::{net::TcpStream, Events, Interest, Poll, Token};
use ringcast_protocol::{
    ClientHandshake, CloseCode, CloseFrame, Codec, HandshakeError, HeadReader, Limits,
};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    echo::{spectrum, SpectrumPoint},
    idle::{self, WorkerConfig, AUTO_CONNS_PER_PROCESS, MAX_CONNS_PER_PROCESS},
    net::{SourceAddrs, Target},
    progress::Progress,
    stats::{buckets, latency_histogram, record_buckets, LatencySummary},
    timeline::{self, merge_counts, Timeline},
    workers::Children,
};

/// How long a connection gets to finish closing (the server's close and TCP close).
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// The largest upgrade response head accepted, in bytes.
const MAX_RESPONSE_HEAD_BYTES: usize = 16 << 10;

/// The longest one `epoll_wait` blocks.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// The most timers handled between two polls, so a burst of due attempts (the mass
/// reconnect starts every slot at once) interleaves with the completions of the first ones
/// instead of issuing every connect before reading any answer.
const MAX_TIMERS_PER_POLL: usize = 128;

/// How often a worker reports progress to its parent.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

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
    /// Processes to spread them over; 0 picks one per [`AUTO_CONNS_PER_PROCESS`].
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

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connect was refused (RST to the SYN: nothing listening, or the accept queue
    /// overflowed with `tcp_abort_on_overflow`).
    Refused,
    /// The connect or the upgrade took longer than the attempt timeout (a full accept queue
    /// drops SYNs, which the client resends after 1 s, 3 s, ...).
    Timeout,
    /// The server answered the upgrade with this HTTP status instead of 101.
    Http(u16),
    /// The connection was reset or aborted during the attempt.
    Reset,
    /// The server closed the connection before answering the upgrade.
    Closed,
    /// No source port was free (`EADDRNOTAVAIL`): too many connections per source address.
    NoPorts,
    /// Anything else (a malformed response, a local error).
    Other,
}

impl Failure {
    /// Classifies an IO error.
    pub fn from_io(err: &io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::TimedOut => Self::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Self::Reset,
            io::ErrorKind::UnexpectedEof => Self::Closed,
            io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse => Self::NoPorts,
            _ => Self::Other,
        }
    }

    /// The key this failure is counted under in a report.
    pub fn key(&self) -> String {
        match self {
            Self::Refused => "refused".to_owned(),
            Self::Timeout => "timeout".to_owned(),
            Self::Http(code) => format!("http {code}"),
            Self::Reset => "reset".to_owned(),
            Self::Closed => "closed".to_owned(),
            Self::NoPorts => "no ports".to_owned(),
            Self::Other => "other".to_owned(),
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
    pub first_source: u8,
    /// Connections per source address.
    pub per_addr: usize,
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
    fn sources(&self) -> SourceAddrs {
        SourceAddrs {
            first: self.first_source,
            per_addr: self.per_addr,
        }
    }

    /// The longest this part's run (after `go`) can last, closing included.
    fn run_limit(&self) -> Duration {
        let core = match self.kind {
            PartKind::Churn => self.duration + self.attempt_timeout,
            PartKind::Mass => self.reconnect_timeout,
        };
        core + CLOSE_TIMEOUT + Duration::from_secs(1)
    }
}

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
    /// Failed attempts by [`Failure::key`].
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

/// A running tally for progress.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    upgrades: u64,
    back: usize,
    failed: u64,
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
    let procs = if cfg.procs == 0 {
        cfg.conns.div_ceil(AUTO_CONNS_PER_PROCESS)
    } else {
        cfg.procs
    };
    ensure!(
        cfg.conns.div_ceil(procs) <= MAX_CONNS_PER_PROCESS,
        "{} connections over {procs} process(es) is more than {MAX_CONNS_PER_PROCESS} per \
         process; raise --procs",
        cfg.conns
    );
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

/// The part configs for `procs` processes.
fn part_configs(cfg: &StormConfig, kind: PartKind, procs: usize) -> Vec<PartConfig> {
    let per = cfg.conns.div_ceil(procs);
    let url = format!(
        "{}://{}{}",
        if cfg.raw { "tcp" } else { "ws" },
        cfg.target.host,
        cfg.target.path
    );
    (0..procs)
        .map(|w| (w * per).min(cfg.conns)..((w + 1) * per).min(cfg.conns))
        .filter(|r| !r.is_empty())
        .map(|range| PartConfig {
            url: url.clone(),
            kind,
            first_index: range.start,
            count: range.len(),
            first_source: cfg.sources.first,
            per_addr: cfg.sources.per_addr,
            duration: cfg.duration,
            hold: cfg.hold,
            reconnect_timeout: cfg.reconnect_timeout,
            attempt_timeout: cfg.attempt_timeout,
            backoff: cfg.backoff,
            open_timeout: cfg.open_timeout,
            raw: cfg.raw,
        })
        .collect()
}

/// Runs one scenario in this process or over worker processes, with a progress bar.
fn run_parts(cfg: &StormConfig, kind: PartKind, procs: usize) -> Result<Vec<PartResult>> {
    let parts = part_configs(cfg, kind, procs);
    let mut progress = match kind {
        PartKind::Churn => Progress::for_duration(cfg.progress, "churn", cfg.duration),
        PartKind::Mass => Progress::new(cfg.progress, "reconnect", cfg.conns as u64),
    };
    let started = Instant::now();
    let mut show = |tally: Tally| {
        let now = Instant::now();
        match kind {
            PartKind::Churn => progress.update_time(now, now - started, || {
                format!("{} upgrades, {} failed", tally.upgrades, tally.failed)
            }),
            PartKind::Mass => progress.update(now, tally.back as u64, || {
                format!("{} back, {} failed attempts", tally.back, tally.failed)
            }),
        }
    };

    if parts.len() == 1 {
        let part = &parts[0];
        let target = Target::parse(&part.url)?;
        let prepared = prepare(part, &target)?;
        let result = run_part(part, &target, prepared, &mut show)?;
        return Ok(vec![result]);
    }

    let exe = std::env::current_exe().context("finding this executable")?;
    let arg_lists = parts
        .iter()
        .map(|p| {
            Ok(vec![
                "storm-worker".to_owned(),
                "--config".to_owned(),
                serde_json::to_string(p)?,
            ])
        })
        .collect::<Result<Vec<_>>>()?;
    let mut children = Children::spawn(&exe, &arg_lists)?;
    let ready_deadline = Instant::now() + cfg.open_timeout + Duration::from_secs(10);
    let ready = children.collect("ready", ready_deadline, |_, _| {});
    let reported = ready.iter().flatten().count();
    if reported < children.len() {
        children.kill_all();
        bail!(
            "{reported} of {} storm workers were ready by the deadline",
            children.len()
        );
    }
    children.tell_all("go");
    let limit = parts[0].run_limit() + Duration::from_secs(10);
    let mut tallies = vec![Tally::default(); children.len()];
    let results = children.collect("result ", Instant::now() + limit, |i, line| {
        if let Some(t) = parse_progress(line) {
            tallies[i] = t;
            show(tallies.iter().fold(Tally::default(), |a, t| Tally {
                upgrades: a.upgrades + t.upgrades,
                back: a.back + t.back,
                failed: a.failed + t.failed,
            }));
        }
    });
    children.finish(Duration::from_secs(5));
    let mut out = Vec::with_capacity(results.len());
    for (i, r) in results.into_iter().enumerate() {
        let text = r.with_context(|| format!("storm worker {i} sent no result"))?;
        out.push(serde_json::from_str(&text).context("parsing a storm worker's result")?);
    }
    Ok(out)
}

/// `progress UPGRADES BACK FAILED`, as a worker prints it.
fn parse_progress(line: &str) -> Option<Tally> {
    let mut parts = line.strip_prefix("progress ")?.split_ascii_whitespace();
    Some(Tally {
        upgrades: parts.next()?.parse().ok()?,
        back: parts.next()?.parse().ok()?,
        failed: parts.next()?.parse().ok()?,
    })
}

/// The body of the hidden `storm-worker` subcommand: prepares its part, prints `ready`, runs
/// on `go` (or gives up when it does not come in time), prints `progress ...` lines while it
/// runs and `result JSON` at the end.
///
/// # Errors
/// A bad config, or stdout cannot be written.
pub fn storm_worker(part: &PartConfig) -> Result<()> {
    let target = Target::parse(&part.url)?;
    let prepared = prepare(part, &target)?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready {} {}", prepared.opened(), prepared.open_failed)?;
    out.flush()?;

    // Read stdin on a thread so the wait for `go` has a deadline.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        while matches!(io::stdin().lock().read_line(&mut line), Ok(n) if n > 0) {
            if line.trim() == "go" {
                let _ = tx.send(());
                return;
            }
            line.clear();
        }
    });
    if rx
        .recv_timeout(part.open_timeout + Duration::from_secs(30))
        .is_err()
    {
        bail!("storm-worker: no go from the parent in time");
    }
    let mut last = Instant::now();
    let mut report = |t: Tally| {
        let now = Instant::now();
        if now - last >= PROGRESS_EVERY {
            last = now;
            println!("progress {} {} {}", t.upgrades, t.back, t.failed);
        }
    };
    let result = run_part(part, &target, prepared, &mut report)?;
    writeln!(out, "result {}", serde_json::to_string(&result)?)?;
    out.flush()?;
    Ok(())
}

/// What a part has ready before `go`: for the mass reconnect, its open connections.
#[derive(Debug, Default)]
struct Prepared {
    conns: Vec<std::net::TcpStream>,
    open_failed: usize,
    open_secs: f64,
}

impl Prepared {
    fn opened(&self) -> usize {
        self.conns.len()
    }
}

fn prepare(part: &PartConfig, target: &Target) -> Result<Prepared> {
    idle::raise_fd_limit();
    if part.kind == PartKind::Churn {
        return Ok(Prepared::default());
    }
    let started = Instant::now();
    let set = idle::open_range(
        &WorkerConfig {
            target: target.clone(),
            range: part.first_index..part.first_index + part.count,
            raw: part.raw,
            sources: part.sources(),
            open_timeout: part.open_timeout,
            lifetime: Duration::MAX,
        },
        &[],
    )?;
    Ok(Prepared {
        conns: set.conns.into_iter().map(|c| c.stream).collect(),
        open_failed: set.failed,
        open_secs: started.elapsed().as_secs_f64(),
    })
}

/// Runs a prepared part from `go`.
fn run_part(
    part: &PartConfig,
    target: &Target,
    prepared: Prepared,
    tick: &mut dyn FnMut(Tally),
) -> Result<PartResult> {
    let (opened, open_failed, open_secs) =
        (prepared.opened(), prepared.open_failed, prepared.open_secs);
    let closing = Instant::now();
    let slots = match part.kind {
        PartKind::Churn => part.count,
        PartKind::Mass => {
            // The storm: every connection closed at once, no closing handshake.
            for stream in prepared.conns {
                let _ = stream.shutdown(Shutdown::Both);
            }
            opened
        }
    };
    // Reconnect times count from when the last one was closed.
    let t0 = Instant::now();
    let mut engine = Engine::new(part, target, slots, t0)?;
    engine.run(tick)?;
    let mut result = engine.finish();
    result.opened = opened;
    result.open_failed = open_failed;
    result.open_secs = open_secs;
    result.close_secs = (t0 - closing).as_secs_f64();
    Ok(result)
}

/// Builds the churn report from the parts.
fn churn_report(cfg: &StormConfig, parts: &[PartResult]) -> ChurnReport {
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
fn mass_report(cfg: &StormConfig, parts: &[PartResult]) -> MassReport {
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

/// Where one slot is.
#[derive(Debug)]
enum State {
    /// Waiting for its timer to start an attempt.
    Waiting,
    /// TCP connect in progress.
    Connecting(TcpStream),
    /// Upgrade request sent, response head not complete.
    Upgrading {
        stream: TcpStream,
        handshake: ClientHandshake,
        buf: BytesMut,
    },
    /// Upgraded (or, raw, connected) and held.
    Open(TcpStream),
    /// Close sent; waiting for the server's TCP close.
    Closing(TcpStream),
    /// Finished for this run.
    Done,
}

#[derive(Debug)]
struct Slot {
    /// Global index: picks the source address.
    index: usize,
    state: State,
    /// Bumped for each new socket; part of its token, so events of a closed socket are
    /// ignored.
    stream_gen: u32,
    /// Bumped for each timer set; older timers are ignored.
    timer_gen: u64,
    /// Failed attempts in a row, for the backoff.
    failures: u32,
    /// When the current attempt started.
    attempt_at: Instant,
    /// Mass: whether it has come back.
    back: bool,
}

/// One process's slots on one mio loop.
struct Engine {
    kind: PartKind,
    target: Target,
    raw: bool,
    sources: SourceAddrs,
    hold: Duration,
    attempt_timeout: Duration,
    backoff: Backoff,
    poll: Poll,
    slots: Vec<Slot>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    t0: Instant,
    /// No attempt starts, and no upgrade counts, from here on.
    stop_at: Instant,
    /// Set once the run stops: the deadline for closing.
    closing_until: Option<Instant>,
    rng: fastrand::Rng,
    scratch: Vec<u8>,
    upgrade: Histogram<u64>,
    reconnect: Histogram<u64>,
    series: Timeline,
    result: PartResult,
    tally: Tally,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("kind", &self.kind)
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

/// A token: slot index in the low 32 bits, socket generation above.
fn token(slot: usize, gen: u32) -> Token {
    Token(slot | ((gen as usize) << 32))
}

fn untoken(token: Token) -> (usize, u32) {
    (token.0 & 0xffff_ffff, (token.0 >> 32) as u32)
}

impl Engine {
    fn new(part: &PartConfig, target: &Target, slots: usize, t0: Instant) -> Result<Self> {
        ensure!(slots < 1 << 32, "too many slots for one process");
        let span = match part.kind {
            PartKind::Churn => part.duration,
            PartKind::Mass => part.reconnect_timeout,
        };
        let mut engine = Self {
            kind: part.kind,
            target: target.clone(),
            raw: part.raw,
            sources: part.sources(),
            hold: part.hold,
            attempt_timeout: part.attempt_timeout,
            backoff: part.backoff,
            poll: Poll::new().context("creating the epoll instance")?,
            slots: (0..slots)
                .map(|i| Slot {
                    index: part.first_index + i,
                    state: State::Waiting,
                    stream_gen: 0,
                    timer_gen: 0,
                    failures: 0,
                    attempt_at: t0,
                    back: false,
                })
                .collect(),
            timers: BinaryHeap::with_capacity(slots),
            t0,
            stop_at: t0 + span,
            closing_until: None,
            rng: fastrand::Rng::new(),
            scratch: vec![0u8; 16 << 10],
            upgrade: latency_histogram(),
            reconnect: latency_histogram(),
            series: Timeline::new(t0, timeline::INTERVAL, span),
            result: PartResult::default(),
            tally: Tally::default(),
        };
        // Churn: starts spread over one hold period, so the slots do not move in lockstep.
        // Mass: all at once; that is the storm.
        for s in 0..slots {
            let at = match part.kind {
                PartKind::Churn => t0 + part.hold.mul_f64(engine.rng.f64()),
                PartKind::Mass => t0,
            };
            engine.set_timer(s, at);
        }
        Ok(engine)
    }

    fn set_timer(&mut self, s: usize, at: Instant) {
        let slot = &mut self.slots[s];
        slot.timer_gen += 1;
        self.timers.push(Reverse((at, s, slot.timer_gen)));
    }

    /// Forgets the slot's timer.
    fn clear_timer(&mut self, s: usize) {
        self.slots[s].timer_gen += 1;
    }

    /// Runs until every slot is done or the closing deadline passes.
    fn run(&mut self, tick: &mut dyn FnMut(Tally)) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if self.closing_until.is_none() && (now >= self.stop_at || self.all_back()) {
                self.stop(now);
            }
            if let Some(until) = self.closing_until {
                if now >= until || self.slots.iter().all(|s| matches!(s.state, State::Done)) {
                    break;
                }
            }
            let mut handled = 0;
            while let Some(Reverse((at, s, gen))) = self.timers.peek().copied() {
                if at > now || handled == MAX_TIMERS_PER_POLL {
                    break;
                }
                self.timers.pop();
                if self.slots[s].timer_gen == gen {
                    self.on_timer(s, now);
                    handled += 1;
                }
            }
            tick(self.tally);

            let mut wake = self.closing_until.unwrap_or(self.stop_at);
            if let Some(Reverse((at, _, _))) = self.timers.peek() {
                wake = wake.min(*at);
            }
            // Timers left over from a capped batch are due already: poll without blocking.
            let wait = wake.saturating_duration_since(Instant::now()).min(MAX_WAIT);
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            }
            for event in &events {
                let (s, gen) = untoken(event.token());
                if self.slots.get(s).is_some_and(|slot| slot.stream_gen == gen) {
                    self.on_event(s, event.is_writable() || event.is_error());
                }
            }
        }
        Ok(())
    }

    fn all_back(&self) -> bool {
        self.kind == PartKind::Mass && self.result.back == self.slots.len()
    }

    /// The run is over: attempts in flight are dropped, open connections start closing.
    fn stop(&mut self, now: Instant) {
        self.closing_until = Some(now + CLOSE_TIMEOUT);
        for s in 0..self.slots.len() {
            match std::mem::replace(&mut self.slots[s].state, State::Done) {
                State::Waiting | State::Done => self.clear_timer(s),
                State::Connecting(_) | State::Upgrading { .. } => {
                    self.result.abandoned += 1;
                    self.clear_timer(s);
                }
                State::Open(stream) => self.begin_close(s, stream, now),
                closing @ State::Closing(_) => self.slots[s].state = closing,
            }
        }
    }

    fn on_timer(&mut self, s: usize, now: Instant) {
        match std::mem::replace(&mut self.slots[s].state, State::Done) {
            State::Waiting => self.start_attempt(s, now),
            State::Connecting(_) | State::Upgrading { .. } => {
                self.fail(s, Failure::Timeout, "the attempt timed out", now);
            }
            State::Open(stream) => self.begin_close(s, stream, now),
            State::Closing(_) => {
                self.result.unclean_closes += 1;
                self.next(s, now);
            }
            State::Done => {}
        }
    }

    /// Starts a connect, or marks the slot done once the run has stopped.
    fn start_attempt(&mut self, s: usize, now: Instant) {
        if now >= self.stop_at || self.closing_until.is_some() {
            self.slots[s].state = State::Done;
            return;
        }
        self.result.attempts += 1;
        let slot = &mut self.slots[s];
        slot.attempt_at = now;
        slot.stream_gen = slot.stream_gen.wrapping_add(1);
        let gen = slot.stream_gen;
        let connected = self
            .sources
            .for_index(slot.index)
            .map_err(|e| io::Error::other(format!("{e:#}")))
            .and_then(|source| connect_nonblocking(source, self.target.addr));
        match connected {
            Ok(mut stream) => {
                if let Err(e) = self.poll.registry().register(
                    &mut stream,
                    token(s, gen),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    self.fail(s, Failure::Other, &format!("registering: {e}"), now);
                    return;
                }
                self.slots[s].state = State::Connecting(stream);
                self.set_timer(s, now + self.attempt_timeout);
            }
            Err(e) => self.fail(s, Failure::from_io(&e), &format!("connecting: {e}"), now),
        }
    }

    /// Counts a failed attempt and schedules the retry after a backoff.
    fn fail(&mut self, s: usize, why: Failure, msg: &str, now: Instant) {
        *self.result.failures.entry(why.key()).or_default() += 1;
        self.result
            .first_failure
            .get_or_insert_with(|| format!("{}: {msg}", why.key()));
        self.tally.failed += 1;
        let slot = &mut self.slots[s];
        slot.state = State::Waiting;
        slot.failures = slot.failures.saturating_add(1);
        let wait = self.backoff.wait(slot.failures, self.rng.f64());
        self.set_timer(s, now + wait);
    }

    /// After a close: churn starts the next attempt at once; otherwise the slot is done.
    fn next(&mut self, s: usize, now: Instant) {
        self.slots[s].state = State::Waiting;
        if self.kind == PartKind::Churn && self.closing_until.is_none() {
            self.start_attempt(s, now);
        } else {
            self.slots[s].state = State::Done;
            self.clear_timer(s);
        }
    }

    fn on_event(&mut self, s: usize, writable: bool) {
        let now = Instant::now();
        match std::mem::replace(&mut self.slots[s].state, State::Done) {
            State::Connecting(stream) => self.on_connecting(s, stream, writable, now),
            State::Upgrading {
                stream,
                handshake,
                buf,
            } => self.on_upgrading(s, stream, handshake, buf, now),
            State::Open(mut stream) => match drain(&mut stream, &mut self.scratch) {
                Ok(false) => self.slots[s].state = State::Open(stream),
                Ok(true) | Err(_) => {
                    self.result.dropped_by_server += 1;
                    if self.slots[s].back {
                        self.slots[s].back = false;
                        self.result.back -= 1;
                        self.tally.back = self.result.back;
                    }
                    self.clear_timer(s);
                    drop(stream);
                    self.slots[s].state = State::Waiting;
                    self.set_timer(s, now);
                }
            },
            State::Closing(mut stream) => match drain(&mut stream, &mut self.scratch) {
                Ok(false) => self.slots[s].state = State::Closing(stream),
                Ok(true) => {
                    self.result.closed_cleanly += 1;
                    drop(stream);
                    self.next(s, now);
                }
                Err(_) => {
                    self.result.unclean_closes += 1;
                    drop(stream);
                    self.next(s, now);
                }
            },
            other => self.slots[s].state = other,
        }
    }

    fn on_connecting(&mut self, s: usize, mut stream: TcpStream, writable: bool, now: Instant) {
        match stream.take_error() {
            Ok(Some(e)) | Err(e) => {
                return self.fail(s, Failure::from_io(&e), &format!("connecting: {e}"), now);
            }
            Ok(None) => {}
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected && !writable => {
                // A spurious wakeup: still connecting.
                self.slots[s].state = State::Connecting(stream);
                return;
            }
            Err(e) => return self.fail(s, Failure::from_io(&e), &format!("connecting: {e}"), now),
        }
        let _ = stream.set_nodelay(true);
        if self.raw {
            return self.upgraded(s, stream, now);
        }
        let handshake = ClientHandshake::new(self.rng.u128(..).to_ne_bytes(), &[]);
        let request = handshake.request(&self.target.host, &self.target.path, &[]);
        match stream.write(&request) {
            Ok(n) if n == request.len() => {}
            Ok(_) => return self.fail(s, Failure::Other, "the upgrade request was cut short", now),
            Err(e) => {
                return self.fail(s, Failure::from_io(&e), &format!("sending: {e}"), now);
            }
        }
        let gen = self.slots[s].stream_gen;
        if let Err(e) =
            self.poll
                .registry()
                .reregister(&mut stream, token(s, gen), Interest::READABLE)
        {
            return self.fail(s, Failure::Other, &format!("registering: {e}"), now);
        }
        self.slots[s].state = State::Upgrading {
            stream,
            handshake,
            buf: BytesMut::with_capacity(512),
        };
    }

    fn on_upgrading(
        &mut self,
        s: usize,
        mut stream: TcpStream,
        handshake: ClientHandshake,
        mut buf: BytesMut,
        now: Instant,
    ) {
        loop {
            match stream.read(&mut self.scratch) {
                Ok(0) => {
                    return self.fail(s, Failure::Closed, "closed during the upgrade", now);
                }
                Ok(n) => buf.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return self.fail(s, Failure::from_io(&e), &format!("receiving: {e}"), now);
                }
            }
        }
        match HeadReader::new().poll_head(&buf, MAX_RESPONSE_HEAD_BYTES) {
            Ok(None) => {
                self.slots[s].state = State::Upgrading {
                    stream,
                    handshake,
                    buf,
                };
            }
            Ok(Some(len)) => match handshake.check_response(&buf[..len]) {
                Ok(_) => self.upgraded(s, stream, now),
                Err(HandshakeError::Status(code)) => {
                    self.fail(s, Failure::Http(code), &format!("status {code}"), now);
                }
                Err(e) => self.fail(s, Failure::Other, &format!("bad response: {e}"), now),
            },
            Err(e) => self.fail(s, Failure::Other, &format!("bad response: {e}"), now),
        }
    }

    /// An attempt succeeded: count it and hold the connection.
    fn upgraded(&mut self, s: usize, mut stream: TcpStream, now: Instant) {
        let slot = &mut self.slots[s];
        slot.failures = 0;
        let gen = slot.stream_gen;
        let took = now - slot.attempt_at;
        if now < self.stop_at {
            self.result.upgrades += 1;
            self.tally.upgrades += 1;
            record(&mut self.upgrade, took);
            self.series.add(now, 1);
        }
        if self.kind == PartKind::Mass && !self.slots[s].back {
            self.slots[s].back = true;
            self.result.back += 1;
            self.tally.back = self.result.back;
            record(&mut self.reconnect, now - self.t0);
            if self.result.back == self.slots.len() {
                self.result.all_back_ns =
                    Some(u64::try_from((now - self.t0).as_nanos()).unwrap_or(u64::MAX));
            }
        }
        if let Err(e) =
            self.poll
                .registry()
                .reregister(&mut stream, token(s, gen), Interest::READABLE)
        {
            return self.fail(s, Failure::Other, &format!("registering: {e}"), now);
        }
        self.slots[s].state = State::Open(stream);
        match self.kind {
            PartKind::Churn => self.set_timer(s, now + self.hold),
            PartKind::Mass => self.clear_timer(s),
        }
    }

    /// Sends the close (raw: shuts down the write side) and waits for the server's close.
    fn begin_close(&mut self, s: usize, mut stream: TcpStream, now: Instant) {
        let sent = if self.raw {
            stream.shutdown(Shutdown::Write)
        } else {
            let mut codec = Codec::client(Limits::default(), self.rng.u64(..));
            codec.close(Some(CloseFrame::new(CloseCode::NORMAL, "")));
            let mut res = Ok(());
            while let Some(frame) = codec.poll_transmit() {
                res = res.and_then(|()| match stream.write(&frame) {
                    Ok(n) if n == frame.len() => Ok(()),
                    Ok(_) => Err(io::Error::other("the close frame was cut short")),
                    Err(e) => Err(e),
                });
            }
            res
        };
        if sent.is_err() {
            self.result.unclean_closes += 1;
            drop(stream);
            self.clear_timer(s);
            return self.next(s, now);
        }
        self.slots[s].state = State::Closing(stream);
        let until = self.closing_until.unwrap_or(now + CLOSE_TIMEOUT);
        self.set_timer(s, until.min(now + CLOSE_TIMEOUT));
    }

    fn finish(mut self) -> PartResult {
        self.result.upgrade_ns = buckets(&self.upgrade);
        self.result.reconnect_ns = buckets(&self.reconnect);
        let span = self.stop_at - self.t0;
        let len = match self.kind {
            PartKind::Churn => span,
            PartKind::Mass => self
                .result
                .all_back_ns
                .map_or(span, |ns| Duration::from_nanos(ns).min(span)),
        };
        self.result.timeline = self.series.into_counts(len);
        self.result
    }
}

/// Reads and discards what is there; `true` at end of stream.
fn drain(stream: &mut TcpStream, scratch: &mut [u8]) -> io::Result<bool> {
    loop {
        match stream.read(scratch) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
}

/// Starts a non-blocking connect from `source` (port picked at connect time, as in
/// [`crate::net::connect_from`]) to `dest`.
fn connect_nonblocking(source: Ipv4Addr, dest: SocketAddrV4) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    let one: libc::c_int = 1;
    // SAFETY: the fd is a live socket owned by `socket`; the option value is a c_int that
    // outlives the call, and its exact size is passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind(&SockAddr::from(SocketAddrV4::new(source, 0)))?;
    match socket.connect(&SockAddr::from(dest)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
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

    #[test]
    fn failures_are_keyed_by_reason() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(Failure::from_io(&refused), Failure::Refused);
        let no_port = io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        assert_eq!(Failure::from_io(&no_port), Failure::NoPorts);
        let reset = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(Failure::from_io(&reset), Failure::Reset);
        assert_eq!(Failure::Http(503).key(), "http 503");
        assert_eq!(Failure::Timeout.key(), "timeout");
    }

    #[test]
    fn tokens_carry_the_slot_and_the_socket_generation() {
        assert_eq!(untoken(token(12_345, 7)), (12_345, 7));
        assert_eq!(untoken(token(0, u32::MAX)), (0, u32::MAX));
    }

    #[test]
    fn progress_lines_parse() {
        let t = parse_progress("progress 10 4 2").unwrap();
        assert_eq!((t.upgrades, t.back, t.failed), (10, 4, 2));
        assert!(parse_progress("result {}").is_none());
    }

    #[test]
    fn parts_split_the_slots_and_merge_back() {
        let mut cfg = StormConfig::new(Target::parse("ws://127.0.0.1:9/x").unwrap());
        cfg.conns = 10;
        let parts = part_configs(&cfg, PartKind::Mass, 3);
        let ranges: Vec<(usize, usize)> = parts.iter().map(|p| (p.first_index, p.count)).collect();
        assert_eq!(ranges, vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(parts[0].url, "ws://127.0.0.1:9/x");

        let mut h = latency_histogram();
        h.record(1_000).unwrap();
        h.record(2_000).unwrap();
        let a = PartResult {
            opened: 4,
            attempts: 5,
            upgrades: 4,
            failures: BTreeMap::from([("refused".to_owned(), 1)]),
            back: 4,
            all_back_ns: Some(50),
            reconnect_ns: buckets(&h),
            timeline: vec![1, 2],
            ..PartResult::default()
        };
        let b = PartResult {
            opened: 4,
            attempts: 4,
            upgrades: 4,
            back: 4,
            all_back_ns: Some(80),
            reconnect_ns: buckets(&h),
            timeline: vec![3],
            ..PartResult::default()
        };
        let r = mass_report(&cfg, &[a.clone(), b]);
        assert_eq!((r.opened, r.back, r.attempts, r.failed), (8, 8, 9, 1));
        assert_eq!(r.all_back_secs, Some(80e-9));
        assert_eq!(r.timeline, vec![4, 2]);
        assert!((r.reconnect.max_us - 2.0).abs() < 0.01, "{:?}", r.reconnect);

        // A part that did not get all back means the run did not.
        let c = PartResult {
            opened: 2,
            back: 1,
            ..PartResult::default()
        };
        assert_eq!(mass_report(&cfg, &[a, c]).all_back_secs, None);
    }
}
