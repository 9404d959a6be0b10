//! The fan-out load: N subscribers over T topics, publishers at a fixed rate, and the latency
//! from each message's publish time to its delivery at every subscriber.
//!
//! Three modes ([`FanoutMode`]):
//! - `envelope-json` and `envelope-bin`, against the ringcast broker (`ringcast serve`): each
//!   subscriber connection offers the mode's subprotocol (`ringcast.v1.json` or
//!   `ringcast.v1.bin`), subscribes to one topic (subscriber `i` to `fanout.{i % T}`) and waits
//!   for its ack before the load starts; the publisher connections publish round-robin over the
//!   topics and count the broker's acks and errors. The broker limits each connection's
//!   publishes (`pubsub.publish_rate_per_sec`, 1000 by default), so run it with
//!   `-c bench/ringcast-fanout.toml`, which lifts that limit, or spread the rate over more
//!   publishers ([`FanoutConfig::publishers`]).
//! - `raw`, against an all-to-all broadcast server (`ringcast serve --broadcast`,
//!   `peer-tokio-tungstenite-broadcast`, `bench/node/broadcast.js`): subscribers only connect,
//!   since every connection receives every message; the publishers send binary messages, and
//!   their own copies are read and ignored. `ringcast serve --broadcast` applies the same
//!   publish limit (silently: it drops what is over budget), so it needs the config file too.
//!
//! Publishing follows a schedule, as the fixed-rate echo does ([`crate::echo::rate`]): message
//! `m` is due `m / rate` seconds after the start, goes out on publisher `m % P` to topic
//! `fanout.{m % T}`, and is sent when due whether or not earlier ones were delivered. Its
//! payload carries its *due* time in `CLOCK_MONOTONIC` nanoseconds ([`monotonic_ns`]), a clock
//! every process of the host shares, so a subscriber in another process computes the latency
//! as receive time less due time: lateness in sending counts (no coordinated omission). A
//! binary payload (`envelope-bin`, `raw`) starts with the timestamp as [`TS_BYTES`]
//! little-endian bytes followed by a byte pattern; a JSON one is the array `[TS,"xx…x"]`. Both
//! are padded to exactly `--size` bytes. A subscriber reads the clock once per readiness event,
//! so messages that arrive in one read share a receive time.
//!
//! What is measured: messages due inside the window (`[warmup, warmup + duration)` after the
//! start). The report gives the deliveries expected for those that were sent (every subscriber
//! of the message's topic) and those received, the server's `dropped` notices (envelope modes),
//! the deliveries still in flight when the load stopped (see below),
//! the deliveries that arrived while the window was open (per second, and per 100 ms), latency
//! percentiles, the server's CPU time per delivery and the client's CPU time (all its
//! processes). In the envelope modes each subscriber checks that seq rises by exactly one except
//! where a `dropped` notice announced the gap; anything else is a seq error.
//!
//! A server that falls behind delivers late rather than not at all, and past the drain its
//! subscribers still wait for messages due in the window: leaving those out would report the
//! latency of the lucky ones only. So, as the fixed-rate echo does with unanswered messages,
//! each measured message a subscriber has not received when it stops, and that comes after the
//! last one it did receive (delivery is in order per topic), is recorded in the latency at the
//! latency it had reached, a lower bound, and counted as in flight. A message missing before
//! the last one received was dropped (announced or not) and has no latency.
//!
//! Processes: the subscribers are split over worker processes (this binary re-executed with the
//! hidden `fanout-worker` subcommand, see `workers.rs`), or run on a thread of this process when
//! there is one. Each drives all its connections from one thread on one mio `Poll`,
//! edge-triggered, like the echo load's default driver. The publishers run in this process: a
//! ticker thread sleeps (timer slack 1 ns) until each due time and wakes the publishers' `Poll`.
//! The processes talk in lines: a worker prints `ready N` once its N subscribers are
//! subscribed; the parent sends `go T0 TOTAL` (the start in monotonic nanoseconds, set
//! [`START_LEAD`] ahead, and how many messages the schedule holds); the worker answers
//! `started`; the parent sends `end SENT` once the publishers are done; the worker prints
//! `result JSON`, whose latency histogram travels as `(value, count)` buckets and is merged in
//! the parent.
//!
//! Bounded: opening and subscribing have a deadline, the publishers stop [`DRAIN_TIMEOUT`] after
//! the window even when behind, a subscriber process stops once each of its subscribers has
//! every message (or a notice of its loss) or [`DRAIN_TIMEOUT`] after `end`, and has a hard
//! deadline of its own, and closing waits at most [`CLOSE_GRACE`].

use std::{
    borrow::Cow,
    fmt, fs,
    io::{self, BufRead as _, Write as _},
    ops::Range,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use hdrhistogram::Histogram;
use mio::{Events, Poll, Registry, Token, Waker};
use ringcast_protocol::{
    envelope::{self, Encoding, Payload, PayloadKind, Request, ServerMessage, SubscribeTopic},
    OpCode,
};
use serde::{Deserialize, Serialize};

use crate::{
    echo::{
        rate::{set_timer_slack_ns, Schedule, DRAIN_TIMEOUT},
        spectrum, SpectrumPoint, BEHIND_TOLERANCE, CLOSE_GRACE,
    },
    idle::{self, OpenSet, WorkerConfig, AUTO_CONNS_PER_PROCESS, BATCH, MAX_CONNS_PER_PROCESS},
    net::{SourceAddrs, Target},
    plot, procfs,
    progress::Progress,
    stats::{buckets, latency_histogram, record_buckets, LatencySummary},
    timeline::{self, Timeline},
    window::{record, Window, WindowStart},
    workers::Children,
    wsconn::MioConn,
};

/// Bytes of the timestamp at the start of a binary payload (little-endian nanoseconds).
pub const TS_BYTES: usize = 8;

/// The smallest JSON payload: `[` + a timestamp of up to 20 digits + `,""]`.
pub const MIN_JSON_PAYLOAD_BYTES: usize = 25;

/// Topic `t` is named `fanout.{t}`.
pub const TOPIC_PREFIX: &str = "fanout.";

/// How far ahead of the first message the start is set, so that every subscriber process has
/// it before any message arrives (the parent checks that each answered `started` in time).
pub const START_LEAD: Duration = Duration::from_millis(500);

/// Bytes one `read` may return; the buffer is shared by one process's connections.
const READ_BYTES: usize = 64 << 10;

/// The longest one `epoll_wait` blocks, so phase changes and commands are never later.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// The most bytes queued on one publisher connection beyond what its socket took; past it the
/// publishers fall behind their schedule (the lateness counts in the latency) rather than queue
/// more.
const OUT_HIGH_BYTES: usize = 64 << 10;

/// Margin on each deadline one process sets for another's work.
const SLACK: Duration = Duration::from_secs(10);

/// The publishers' `Waker` token; connections use their index.
const WAKE: Token = Token(usize::MAX);

/// What the subscribers speak, and to which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FanoutMode {
    /// The broker's JSON envelope (`ringcast.v1.json`, text frames).
    #[default]
    EnvelopeJson,
    /// The broker's binary envelope (`ringcast.v1.bin`, binary frames).
    EnvelopeBin,
    /// Bare binary messages through an all-to-all broadcast server; one topic.
    Raw,
}

impl FanoutMode {
    /// The envelope encoding, or `None` for raw.
    pub const fn encoding(self) -> Option<Encoding> {
        match self {
            Self::EnvelopeJson => Some(Encoding::Json),
            Self::EnvelopeBin => Some(Encoding::Binary),
            Self::Raw => None,
        }
    }

    /// The smallest `--size` the payload fits in.
    pub const fn min_size_bytes(self) -> usize {
        match self {
            Self::EnvelopeJson => MIN_JSON_PAYLOAD_BYTES,
            Self::EnvelopeBin | Self::Raw => TS_BYTES,
        }
    }

    fn is_json(self) -> bool {
        self == Self::EnvelopeJson
    }
}

impl FromStr for FanoutMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "envelope-json" => Ok(Self::EnvelopeJson),
            "envelope-bin" => Ok(Self::EnvelopeBin),
            "raw" => Ok(Self::Raw),
            other => Err(format!(
                "unknown mode {other:?}: envelope-json, envelope-bin or raw"
            )),
        }
    }
}

impl fmt::Display for FanoutMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EnvelopeJson => "envelope-json",
            Self::EnvelopeBin => "envelope-bin",
            Self::Raw => "raw",
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// The server: the ringcast broker for the envelope modes, a broadcast server for raw.
    pub target: Target,
    /// Where the publishers connect, when not to `target`: another ringcast host sharing
    /// topics through Redis, for cross-host publish-to-receive latency.
    pub publish_target: Option<Target>,
    /// What the connections speak.
    pub mode: FanoutMode,
    /// Subscriber connections (N).
    pub subs: usize,
    /// Topics (T): subscriber `i` takes `fanout.{i % T}`, message `m` goes to `fanout.{m % T}`.
    /// Must be 1 in raw mode.
    pub topics: usize,
    /// Messages per second, all publishers together.
    pub rate: f64,
    /// Payload bytes per message, at least [`FanoutMode::min_size_bytes`].
    pub size_bytes: usize,
    /// Length of the measured window.
    pub duration: Duration,
    /// Publishing before the window opens, not measured.
    pub warmup: Duration,
    /// Processes for the subscribers; 0 picks one per 15,000. With 1 they run on a thread of
    /// this process.
    pub procs: usize,
    /// Publisher connections, taking messages in turn.
    pub publishers: usize,
    /// The server's process, for its CPU time over the window.
    pub server_pid: Option<u32>,
    /// Source addresses: subscribers take indexes `0..N`, publishers the next ones.
    pub sources: SourceAddrs,
    /// Deadline for opening and subscribing every connection.
    pub open_timeout: Duration,
    /// Draw a progress bar on stderr (when it is a terminal and the run lasts over a second).
    pub progress: bool,
}

impl FanoutConfig {
    /// The defaults for `target`: JSON envelope, 1000 subscribers on 1 topic, 1000 messages/s of
    /// 64 bytes from 1 publisher, 1 s warmup, 5 s window, processes chosen automatically.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            publish_target: None,
            mode: FanoutMode::default(),
            subs: 1000,
            topics: 1,
            rate: 1000.0,
            size_bytes: 64,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            procs: 0,
            publishers: 1,
            server_pid: None,
            sources: SourceAddrs::default(),
            open_timeout: Duration::from_secs(60),
            progress: false,
        }
    }

    fn procs(&self) -> usize {
        match self.procs {
            0 => self.subs.div_ceil(AUTO_CONNS_PER_PROCESS),
            n => n,
        }
    }
}

/// What one fan-out run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FanoutReport {
    /// `envelope-json`, `envelope-bin` or `raw`.
    pub mode: String,
    /// Subscriber connections.
    pub subs: usize,
    /// Topics.
    pub topics: usize,
    /// Processes that held the subscribers.
    pub procs: usize,
    /// Publisher connections.
    pub publishers: usize,
    /// Payload bytes per message.
    pub size_bytes: usize,
    /// The measured window, in seconds.
    pub window_secs: f64,
    /// Messages per second asked for.
    pub target_rate: f64,
    /// Messages per second actually sent while the window was open.
    pub achieved_rate: f64,
    /// The achieved rate fell more than [`BEHIND_TOLERANCE`] below the target (the publishers
    /// or the server could not keep up; latencies include the lateness).
    pub behind: bool,
    /// Messages due inside the window that were sent (they are the measured ones).
    pub published: u64,
    /// Messages due inside the window that were still unsent when the publishers stopped.
    pub unsent: u64,
    /// Publishes the broker refused with an error (envelope modes), over the whole run.
    pub publish_errors: u64,
    /// The first such error, `code: message`.
    pub first_publish_error: Option<String>,
    /// Deliveries the measured messages owe: each one to every subscriber of its topic.
    pub expected: u64,
    /// Of those, the deliveries received.
    pub received: u64,
    /// `expected - received`: dropped by the server (with or without a notice), lost, or still
    /// in flight.
    pub missing: u64,
    /// Of the missing, those after the last message each subscriber received: still in flight
    /// when the load stopped, and in the latency at the latency they had reached (a lower
    /// bound). Near `missing` when the server is behind rather than dropping.
    pub in_flight: u64,
    /// Messages the server announced as dropped (`dropped` notices, envelope modes), over the
    /// whole run.
    pub dropped: u64,
    /// `dropped` notices received.
    pub dropped_notices: u64,
    /// Messages whose seq did not follow the one before on that subscription with no notice in
    /// between (envelope modes).
    pub seq_errors: u64,
    /// Messages that carried no timestamp of this run (another load on the same server, or
    /// a message before the start).
    pub foreign: u64,
    /// Deliveries that arrived while the window was open, whenever their message was due.
    pub deliveries: u64,
    /// `deliveries` per second of the window.
    pub deliveries_per_sec: f64,
    /// Publish-to-receive latency of the measured deliveries, from each message's due time;
    /// with those in flight at the end at the latency they had reached (a lower bound).
    pub latency: LatencySummary,
    /// How late each measured message was queued for sending after its due time: the part of
    /// the latency spent before it left the client.
    pub send_lag: LatencySummary,
    /// Server CPU time per delivery (of those in `deliveries`), in microseconds (needs the
    /// server's pid).
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Server CPU time over the window, as a fraction of one core.
    pub server_cpu_util: Option<f64>,
    /// This load generator's CPU time over the window, all its processes, in cores.
    pub client_cpu_util: f64,
    /// CPU time over the window that neither the server nor the load generator used, in cores
    /// (see [`crate::echo::EchoReport::other_cpu_util`]; needs the server's pid).
    pub other_cpu_util: Option<f64>,
    /// Subscriber connections that failed during the load.
    pub errors: u64,
    /// The first such failure.
    pub first_error: Option<String>,
    /// Subscribers still short of some message (neither received nor announced as dropped)
    /// when the load ended.
    pub incomplete_subs: u64,
    /// The length of one timeline interval, in milliseconds.
    pub timeline_interval_ms: u64,
    /// Deliveries that arrived in each interval of the window, in order (the last may be
    /// partial).
    pub deliveries_timeline: Vec<u64>,
    /// The latency spectrum: points of (percentile, latency), ending at the maximum.
    pub latency_spectrum: Vec<SpectrumPoint>,
}

impl FanoutReport {
    /// One human-readable line.
    pub fn human(&self) -> String {
        let l = &self.latency;
        let behind = if self.behind {
            format!(
                ", BEHIND by {:.1}%",
                (1.0 - self.achieved_rate / self.target_rate) * 100.0
            )
        } else {
            String::new()
        };
        let mut line = format!(
            "fanout {mode}: {subs} subs over {topics} topic(s) in {procs} proc(s), {size} B at \
             {target:.0} msgs/s (sent {achieved:.0}/s{behind}), {win:.2} s: {dps:.0} \
             deliveries/s | received {received} of {expected} expected ({missing} missing, \
             {in_flight} of them in flight at the end; {dropped} dropped in {notices} notices) \
             | latency us p50 {p50:.1} p90 {p90:.1} p99 {p99:.1} p99.9 {p999:.1} max {max:.1}",
            mode = self.mode,
            subs = self.subs,
            topics = self.topics,
            procs = self.procs,
            size = self.size_bytes,
            target = self.target_rate,
            achieved = self.achieved_rate,
            win = self.window_secs,
            dps = self.deliveries_per_sec,
            received = self.received,
            expected = self.expected,
            missing = self.missing,
            in_flight = self.in_flight,
            dropped = self.dropped,
            notices = self.dropped_notices,
            p50 = l.p50_us,
            p90 = l.p90_us,
            p99 = l.p99_us,
            p999 = l.p999_us,
            max = l.max_us,
        );
        line += &format!(
            " | send lag us p50 {:.1} p99 {:.1} max {:.1}",
            self.send_lag.p50_us, self.send_lag.p99_us, self.send_lag.max_us
        );
        if let (Some(per), Some(util)) = (self.server_cpu_us_per_delivery, self.server_cpu_util) {
            line += &format!(
                " | server cpu {per:.3} us/delivery ({:.0}% of a core)",
                util * 100.0
            );
        }
        line += &format!(
            " | client cpu {:.0}% of a core",
            self.client_cpu_util * 100.0
        );
        if let Some(other) = self.other_cpu_util {
            line += &format!(" | other {:.0}%", other * 100.0);
        }
        if self.unsent > 0 {
            line += &format!(" | {} unsent", self.unsent);
        }
        for (n, what) in [
            (self.seq_errors, "seq errors"),
            (self.foreign, "foreign messages"),
            (self.incomplete_subs, "subs incomplete"),
        ] {
            if n > 0 {
                line += &format!(" | {n} {what}");
            }
        }
        if self.publish_errors > 0 {
            line += &format!(
                " | {} publishes refused (first: {})",
                self.publish_errors,
                self.first_publish_error.as_deref().unwrap_or("?")
            );
        }
        if self.errors > 0 {
            line += &format!(
                " | {} conn errors (first: {})",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
        line
    }

    /// Whether the run is sound: deliveries arrived, no publish was refused, no connection
    /// failed, no seq error or foreign message, and at most `max_missing` deliveries missing
    /// (when given; drops and lateness are the server's right under load).
    ///
    /// # Errors
    /// The first of those that does not hold.
    pub fn check(&self, max_missing: Option<u64>) -> Result<()> {
        ensure!(
            self.received + self.deliveries > 0,
            "no delivery arrived at any subscriber"
        );
        if self.publish_errors > 0 {
            let hint = if self
                .first_publish_error
                .as_deref()
                .is_some_and(|e| e.starts_with("rate_limited"))
            {
                " (run the broker with -c bench/ringcast-fanout.toml, or use more --publishers)"
            } else {
                ""
            };
            bail!(
                "the broker refused {} publishes; first: {}{hint}",
                self.publish_errors,
                self.first_publish_error.as_deref().unwrap_or("?")
            );
        }
        ensure!(
            self.errors == 0,
            "{} subscriber connections failed; first: {}",
            self.errors,
            self.first_error.as_deref().unwrap_or("?")
        );
        ensure!(
            self.seq_errors == 0,
            "{} messages broke their topic's sequence without a dropped notice",
            self.seq_errors
        );
        ensure!(
            self.foreign == 0,
            "{} messages were not from this run",
            self.foreign
        );
        if let Some(max) = max_missing {
            ensure!(
                self.missing <= max,
                "{} of {} deliveries missing, more than the {max} allowed",
                self.missing,
                self.expected
            );
        }
        Ok(())
    }
}

/// Writes `DIR/fanout-latency.svg` (the latency spectrum) and `DIR/fanout-deliveries.svg`
/// (deliveries per interval of the window, the full intervals, with the rate asked for times
/// the subscribers per topic dashed); returns the paths written.
///
/// # Errors
/// The directory or a file cannot be written.
pub fn plot(report: &FanoutReport, dir: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let what = format!(
        "fanout {}, {} subs / {} topic(s) x {} B, {:.0} msgs/s",
        report.mode, report.subs, report.topics, report.size_bytes, report.target_rate
    );
    let latency = dir.join("fanout-latency.svg");
    plot::spectrum_svg(
        &latency,
        &format!("Publish-to-receive latency (from due time): {what}"),
        "latency (us)",
        1.0,
        &[("", report.latency_spectrum.as_slice())],
    )?;
    let deliveries = dir.join("fanout-deliveries.svg");
    let ms = report.timeline_interval_ms.max(1);
    let full = ((report.window_secs * 1000.0) as u64 / ms) as usize;
    let counts = &report.deliveries_timeline[..full.min(report.deliveries_timeline.len())];
    let per_message = report.subs as f64 / report.topics.max(1) as f64;
    plot::timeline_svg(
        &deliveries,
        &format!("Deliveries per {ms} ms: {what}"),
        &format!("deliveries per {ms} ms"),
        ms,
        &[("", counts)],
        Some(report.target_rate * per_message * ms as f64 / 1000.0),
    )?;
    Ok(vec![latency, deliveries])
}

/// Runs the load and reports; see the module docs.
///
/// # Errors
/// A bad config; a connection, handshake or subscription fails before the load starts; a
/// worker process fails or misses a deadline; a publisher connection fails; or the server's
/// `/proc` entries cannot be read. Failures of subscriber connections during the load, drops
/// and refused publishes are counted in the report instead (see [`FanoutReport::check`]).
pub fn run_fanout(cfg: &FanoutConfig) -> Result<FanoutReport> {
    validate(cfg)?;
    let procs = cfg.procs();
    let parts = subscriber_parts(cfg, procs);
    let mut fleet = Fleet::start(&parts)?;
    let opened = fleet.ready(Instant::now() + cfg.open_timeout + SLACK)?;
    ensure!(
        opened == cfg.subs,
        "{opened} of {} subscribers are ready",
        cfg.subs
    );

    let mut poll = Poll::new().context("creating the epoll instance")?;
    let mut pubs = open_conns(
        cfg.publish_target.as_ref().unwrap_or(&cfg.target),
        cfg.mode,
        cfg.subs..cfg.subs + cfg.publishers,
        cfg.sources,
        cfg.open_timeout,
        poll.registry(),
    )?;

    let schedule = Schedule::new(cfg.rate);
    let plan = Plan {
        schedule,
        total: schedule.first_at_or_after(cfg.warmup + cfg.duration),
        first_measured: schedule.first_at_or_after(cfg.warmup),
        clock: Clock::now(),
    };
    let t0 = plan.clock.at + START_LEAD;
    fleet.tell(&Command::Go {
        t0_ns: plan.clock.ns(t0),
        total: plan.total,
    });
    fleet.started(t0)?;
    let outcome = publish(cfg, &mut poll, &mut pubs, &plan, t0);
    // Whatever happened, let the subscribers finish before reading their results.
    let sent = outcome.as_ref().map_or(0, |o| o.sent);
    fleet.tell(&Command::End { sent });
    close(poll, pubs);
    let outcome = outcome?;
    let results = fleet.results(Instant::now() + DRAIN_TIMEOUT + CLOSE_GRACE + SLACK)?;
    Ok(report(cfg, procs, &plan, &outcome, &results))
}

fn validate(cfg: &FanoutConfig) -> Result<()> {
    ensure!(cfg.subs > 0, "--subs must be at least 1");
    ensure!(cfg.topics > 0, "--topics must be at least 1");
    ensure!(
        cfg.mode != FanoutMode::Raw || cfg.topics == 1,
        "raw mode has one topic: every connection receives every message"
    );
    ensure!(cfg.publishers > 0, "--publishers must be at least 1");
    ensure!(
        cfg.rate.is_finite() && cfg.rate > 0.0,
        "--rate must be a positive number of messages per second"
    );
    ensure!(!cfg.duration.is_zero(), "--duration must be positive");
    ensure!(
        cfg.size_bytes >= cfg.mode.min_size_bytes(),
        "--size must be at least {} bytes in {} mode (the payload carries its timestamp)",
        cfg.mode.min_size_bytes(),
        cfg.mode
    );
    let procs = cfg.procs();
    ensure!(
        procs <= cfg.subs,
        "--procs {procs} is more than the {} subscribers",
        cfg.subs
    );
    // The publishers share this process with the subscribers when there is one process.
    let here = if procs == 1 { cfg.subs } else { 0 } + cfg.publishers;
    ensure!(
        cfg.subs.div_ceil(procs) <= MAX_CONNS_PER_PROCESS && here <= MAX_CONNS_PER_PROCESS,
        "{} subscribers over {procs} process(es) is more than {MAX_CONNS_PER_PROCESS} \
         connections per process; raise --procs",
        cfg.subs
    );
    // Fail before connecting anything if the sources run out.
    cfg.sources.for_index(cfg.subs + cfg.publishers - 1)?;
    Ok(())
}

/// The subscriber parts for `procs` processes.
fn subscriber_parts(cfg: &FanoutConfig, procs: usize) -> Vec<SubscriberPart> {
    let per = cfg.subs.div_ceil(procs);
    (0..procs)
        .map(|w| (w * per).min(cfg.subs)..((w + 1) * per).min(cfg.subs))
        .filter(|r| !r.is_empty())
        .map(|range| SubscriberPart {
            url: format!("ws://{}{}", cfg.target.host, cfg.target.path),
            mode: cfg.mode,
            first_index: range.start,
            count: range.len(),
            topics: cfg.topics,
            rate: cfg.rate,
            first_source: cfg.sources.first,
            per_addr: cfg.sources.per_addr,
            open_timeout: cfg.open_timeout,
            warmup: cfg.warmup,
            duration: cfg.duration,
        })
        .collect()
}

/// Builds the report from the publishers' outcome and the subscribers' results.
fn report(
    cfg: &FanoutConfig,
    procs: usize,
    plan: &Plan,
    outcome: &PublishOutcome,
    parts: &[SubscriberResult],
) -> FanoutReport {
    let mut latency = latency_histogram();
    let mut timeline = Vec::new();
    let mut t = SubscriberResult::default();
    for p in parts {
        record_buckets(&mut latency, &p.latency_ns);
        timeline::merge_counts(&mut timeline, &p.timeline);
        t.received += p.received;
        t.in_flight += p.in_flight;
        t.in_window += p.in_window;
        t.dropped += p.dropped;
        t.dropped_notices += p.dropped_notices;
        t.seq_errors += p.seq_errors;
        t.foreign += p.foreign;
        t.incomplete += p.incomplete;
        t.errors += p.errors;
        t.cpu_ns += p.cpu_ns;
        if t.first_error.is_none() {
            t.first_error.clone_from(&p.first_error);
        }
    }
    let w = &outcome.window;
    let secs = w.secs();
    let measured = plan.first_measured..plan.total;
    let sent = plan.first_measured.min(outcome.sent)..plan.total.min(outcome.sent);
    let published = sent.end - sent.start;
    let expected = expected_deliveries(cfg.subs, cfg.topics, sent);
    let achieved_rate = outcome.sent_in_window as f64 / secs;
    // Subscribers on a thread of this process are in its own CPU time already.
    let worker_cpu = if procs > 1 {
        Duration::from_nanos(t.cpu_ns)
    } else {
        Duration::ZERO
    };
    let client_cpu = w.client_cpu + worker_cpu;
    FanoutReport {
        mode: cfg.mode.to_string(),
        subs: cfg.subs,
        topics: cfg.topics,
        procs,
        publishers: cfg.publishers,
        size_bytes: cfg.size_bytes,
        window_secs: secs,
        target_rate: cfg.rate,
        achieved_rate,
        behind: achieved_rate < cfg.rate * (1.0 - BEHIND_TOLERANCE),
        published,
        unsent: (measured.end - measured.start) - published,
        publish_errors: outcome.errors,
        first_publish_error: outcome.first_error.clone(),
        expected,
        received: t.received,
        missing: expected.saturating_sub(t.received),
        in_flight: t.in_flight,
        dropped: t.dropped,
        dropped_notices: t.dropped_notices,
        seq_errors: t.seq_errors,
        foreign: t.foreign,
        deliveries: t.in_window,
        deliveries_per_sec: t.in_window as f64 / secs,
        latency: LatencySummary::from_histogram(&latency),
        send_lag: LatencySummary::from_histogram(&outcome.lag),
        server_cpu_us_per_delivery: w.server_cpu_us_per(t.in_window),
        server_cpu_util: w.server_util(),
        client_cpu_util: client_cpu.as_secs_f64() / secs,
        // Clamped at zero for the reason given at `window::Window::other_util`.
        other_cpu_util: w.server_cpu.map(|server| {
            ((w.machine_busy.as_secs_f64() - server.as_secs_f64() - client_cpu.as_secs_f64())
                / secs)
                .max(0.0)
        }),
        errors: t.errors,
        first_error: t.first_error,
        incomplete_subs: t.incomplete,
        timeline_interval_ms: timeline::INTERVAL.as_millis() as u64,
        deliveries_timeline: timeline,
        latency_spectrum: spectrum(&latency),
    }
}

/// How many of `0..n` fall on topic `t` of `topics` (message or subscriber `i` goes to topic
/// `i % topics`).
fn on_topic(n: u64, t: usize, topics: usize) -> u64 {
    let (t, topics) = (t as u64, topics.max(1) as u64);
    n / topics + u64::from(t < n % topics)
}

/// Deliveries that messages `range` owe to `subs` subscribers over `topics`.
fn expected_deliveries(subs: usize, topics: usize, range: Range<u64>) -> u64 {
    (0..topics)
        .map(|t| {
            let messages = on_topic(range.end, t, topics) - on_topic(range.start, t, topics);
            on_topic(subs as u64, t, topics).saturating_mul(messages)
        })
        .fold(0u64, u64::saturating_add)
}

fn topic_name(t: usize) -> String {
    format!("{TOPIC_PREFIX}{t}")
}

/// What the publishers follow.
#[derive(Debug, Clone, Copy)]
struct Plan {
    schedule: Schedule,
    /// Messages in the run: those due before the window ends.
    total: u64,
    /// The first message due inside the window.
    first_measured: u64,
    /// This process's reading of both clocks.
    clock: Clock,
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock every process of the host shares, and the one
/// `Instant` reads on Linux.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call; CLOCK_MONOTONIC
    // exists on every Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

/// One reading of `Instant` and [`monotonic_ns`] together, to turn one into the other with a
/// single clock read per event.
#[derive(Debug, Clone, Copy)]
struct Clock {
    at: Instant,
    ns: u64,
}

impl Clock {
    fn now() -> Self {
        let at = Instant::now();
        Self {
            ns: monotonic_ns(),
            at,
        }
    }

    /// `CLOCK_MONOTONIC` nanoseconds at `at`.
    fn ns(self, at: Instant) -> u64 {
        match at.checked_duration_since(self.at) {
            Some(d) => self.ns.saturating_add(d.as_nanos() as u64),
            None => self
                .ns
                .saturating_sub(self.at.duration_since(at).as_nanos() as u64),
        }
    }

    /// The instant at `ns` `CLOCK_MONOTONIC` nanoseconds.
    fn instant(self, ns: u64) -> Instant {
        if ns >= self.ns {
            self.at + Duration::from_nanos(ns - self.ns)
        } else {
            self.at
                .checked_sub(Duration::from_nanos(self.ns - ns))
                .unwrap_or(self.at)
        }
    }
}

/// Writes the payload of a message due at `ts_ns` into `out`: exactly `size` bytes (at least
/// the mode's minimum), see the module docs.
fn write_payload(json: bool, ts_ns: u64, size: usize, out: &mut Vec<u8>) {
    out.clear();
    if json {
        out.push(b'[');
        out.extend_from_slice(ts_ns.to_string().as_bytes());
        out.extend_from_slice(b",\"");
        let pad = size.saturating_sub(out.len() + 2);
        out.resize(out.len() + pad, b'x');
        out.extend_from_slice(b"\"]");
    } else {
        out.extend_from_slice(&ts_ns.to_le_bytes());
        out.extend((TS_BYTES..size).map(|i| (i % 251) as u8));
    }
}

/// The due time a payload carries, or `None` if it carries none.
fn read_ts(json: bool, payload: &[u8]) -> Option<u64> {
    if json {
        let rest = payload.strip_prefix(b"[")?;
        let digits = &rest[..rest.iter().position(|&b| b == b',')?];
        std::str::from_utf8(digits).ok()?.parse().ok()
    } else {
        Some(u64::from_le_bytes(
            payload.get(..TS_BYTES)?.try_into().ok()?,
        ))
    }
}

/// One process's share of the subscribers; the hidden `fanout-worker` subcommand takes it as
/// JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriberPart {
    /// `ws://` URL of the server.
    pub url: String,
    /// What the connections speak.
    pub mode: FanoutMode,
    /// Global index of the first subscriber: it picks the topic and the source address.
    pub first_index: usize,
    /// Subscribers in this part.
    pub count: usize,
    /// Topics in the run.
    pub topics: usize,
    /// See [`FanoutConfig::rate`]: the schedule, to tell which message a timestamp is.
    pub rate: f64,
    /// Source addresses, shared by all parts.
    pub first_source: u8,
    /// Connections per source address.
    pub per_addr: usize,
    /// Deadline for opening and subscribing.
    pub open_timeout: Duration,
    /// See [`FanoutConfig::warmup`].
    pub warmup: Duration,
    /// See [`FanoutConfig::duration`].
    pub duration: Duration,
}

impl SubscriberPart {
    fn sources(&self) -> SourceAddrs {
        SourceAddrs {
            first: self.first_source,
            per_addr: self.per_addr,
        }
    }
}

/// What one part measured; merged into a [`FanoutReport`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SubscriberResult {
    /// Deliveries received of messages due inside the window.
    pub received: u64,
    /// Deliveries of messages due inside the window still in flight at the end.
    pub in_flight: u64,
    /// Deliveries that arrived while the window was open.
    pub in_window: u64,
    /// Messages announced as dropped.
    pub dropped: u64,
    /// `dropped` notices.
    pub dropped_notices: u64,
    /// Seq breaks without a notice.
    pub seq_errors: u64,
    /// Messages with no timestamp of this run.
    pub foreign: u64,
    /// Subscribers still short of some message at the end.
    pub incomplete: u64,
    /// Connections that failed during the load.
    pub errors: u64,
    /// The first such failure.
    pub first_error: Option<String>,
    /// This process's CPU time over the window, in nanoseconds.
    pub cpu_ns: u64,
    /// Latencies of the measured deliveries, as `(nanoseconds, count)` buckets.
    pub latency_ns: Vec<(u64, u64)>,
    /// Deliveries per [`timeline::INTERVAL`] of the window.
    pub timeline: Vec<u64>,
}

/// From the parent to a subscriber part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Command {
    /// The start, in `CLOCK_MONOTONIC` nanoseconds, and the messages the schedule holds.
    Go { t0_ns: u64, total: u64 },
    /// The publishers are done, having sent messages `0..sent`.
    End { sent: u64 },
}

impl Command {
    fn line(self) -> String {
        match self {
            Self::Go { t0_ns, total } => format!("go {t0_ns} {total}"),
            Self::End { sent } => format!("end {sent}"),
        }
    }

    fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_ascii_whitespace();
        let command = words.next()?;
        let mut num = || words.next()?.parse::<u64>().ok();
        match command {
            "go" => Some(Self::Go {
                t0_ns: num()?,
                total: num()?,
            }),
            "end" => Some(Self::End { sent: num()? }),
            _ => None,
        }
    }
}

/// From a subscriber part to the parent, besides its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    /// This many subscribers are open and subscribed.
    Ready(usize),
    /// `go` arrived.
    Started,
}

/// The body of the hidden `fanout-worker` subcommand: runs `part`, taking commands from stdin
/// and printing `ready N`, `started` and `result JSON` on stdout (see the module docs).
///
/// # Errors
/// The part fails (the parent then sees no line from this process), or stdout cannot be
/// written.
pub fn fanout_worker(part: &SubscriberPart) -> Result<()> {
    let (tx, commands) = mpsc::channel();
    // Read stdin on a thread so that every wait for a command has a deadline. Its end (the
    // parent went away) drops the sender.
    thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { return };
            if let Some(command) = Command::parse(&line) {
                if tx.send(command).is_err() {
                    return;
                }
            }
        }
    });
    let mut out = io::stdout().lock();
    let result = run_part(part, &commands, &mut |signal| {
        match signal {
            Signal::Ready(n) => writeln!(out, "ready {n}")?,
            Signal::Started => writeln!(out, "started")?,
        }
        out.flush()?;
        Ok(())
    })?;
    writeln!(out, "result {}", serde_json::to_string(&result)?)?;
    out.flush()?;
    Ok(())
}

/// The subscriber parts, on a thread of this process or in worker processes.
enum Fleet {
    Local {
        commands: mpsc::Sender<Command>,
        signals: mpsc::Receiver<LocalSignal>,
    },
    Workers(Children),
}

/// What the local part's thread sends.
enum LocalSignal {
    Signal(Signal),
    Done(Result<SubscriberResult>),
}

impl Fleet {
    fn start(parts: &[SubscriberPart]) -> Result<Self> {
        if let [part] = parts {
            let part = part.clone();
            let (commands, command_rx) = mpsc::channel();
            let (tx, signals) = mpsc::channel();
            thread::Builder::new()
                .name("fanout-subscribers".into())
                .spawn(move || {
                    let signal_tx = tx.clone();
                    let result = run_part(&part, &command_rx, &mut |s| {
                        let _ = signal_tx.send(LocalSignal::Signal(s));
                        Ok(())
                    });
                    let _ = tx.send(LocalSignal::Done(result));
                })
                .context("starting the subscriber thread")?;
            return Ok(Self::Local { commands, signals });
        }
        let exe = std::env::current_exe().context("finding this executable")?;
        let arg_lists = parts
            .iter()
            .map(|p| {
                Ok(vec![
                    "fanout-worker".to_owned(),
                    "--config".to_owned(),
                    serde_json::to_string(p)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::Workers(Children::spawn(&exe, &arg_lists)?))
    }

    /// Waits until every part is subscribed; returns how many subscribers are.
    fn ready(&mut self, deadline: Instant) -> Result<usize> {
        match self {
            Self::Local { signals, .. } => match next_signal(signals, deadline)? {
                Signal::Ready(n) => Ok(n),
                other => bail!("the subscribers said {other:?} before they were ready"),
            },
            Self::Workers(children) => {
                let lines = all_lines(children, "ready ", deadline, "ready")?;
                Ok(lines
                    .iter()
                    .map(|l| l.trim().parse::<usize>().unwrap_or(0))
                    .sum())
            }
        }
    }

    /// Waits until every part has taken `go`.
    fn started(&mut self, deadline: Instant) -> Result<()> {
        match self {
            Self::Local { signals, .. } => match next_signal(signals, deadline)? {
                Signal::Started => Ok(()),
                other => bail!("the subscribers said {other:?} instead of started"),
            },
            Self::Workers(children) => {
                all_lines(children, "started", deadline, "started by the start time").map(drop)
            }
        }
    }

    /// Tells every part `command` (best effort: a part that has gone is skipped).
    fn tell(&mut self, command: &Command) {
        match self {
            Self::Local { commands, .. } => {
                let _ = commands.send(*command);
            }
            Self::Workers(children) => children.tell_all(&command.line()),
        }
    }

    /// Waits for every part's result.
    fn results(self, deadline: Instant) -> Result<Vec<SubscriberResult>> {
        match self {
            Self::Local { signals, .. } => loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match signals.recv_timeout(left) {
                    Ok(LocalSignal::Done(result)) => return Ok(vec![result?]),
                    Ok(LocalSignal::Signal(_)) => {}
                    Err(_) => bail!("the subscribers sent no result by the deadline"),
                }
            },
            Self::Workers(mut children) => {
                let lines = all_lines(&mut children, "result ", deadline, "done")?;
                children.finish(Duration::from_secs(5));
                lines
                    .iter()
                    .map(|l| serde_json::from_str(l).context("parsing a fanout worker's result"))
                    .collect()
            }
        }
    }
}

/// The next signal of the local part; its failure, if it failed, is the error.
fn next_signal(signals: &mpsc::Receiver<LocalSignal>, deadline: Instant) -> Result<Signal> {
    let left = deadline.saturating_duration_since(Instant::now());
    match signals.recv_timeout(left) {
        Ok(LocalSignal::Signal(s)) => Ok(s),
        Ok(LocalSignal::Done(Err(e))) => Err(e.context("the subscribers failed")),
        Ok(LocalSignal::Done(Ok(_))) => bail!("the subscribers ended early"),
        Err(_) => bail!("the subscribers missed their deadline"),
    }
}

/// Each worker's first line starting with `prefix` (the rest of it), or an error naming how
/// many were not `what` by the deadline (their own errors are on stderr).
fn all_lines(
    children: &mut Children,
    prefix: &str,
    deadline: Instant,
    what: &str,
) -> Result<Vec<String>> {
    let lines = children.collect(prefix, deadline, |_, _| {});
    let got = lines.iter().flatten().count();
    if got < children.len() {
        children.kill_all();
        bail!(
            "{got} of {} fanout workers were {what} (see their errors above)",
            children.len()
        );
    }
    Ok(lines.into_iter().flatten().collect())
}

/// Runs one part: opens and subscribes, signals `Ready`, waits for `go`, signals `Started`,
/// receives until done, closes.
fn run_part(
    part: &SubscriberPart,
    commands: &mpsc::Receiver<Command>,
    signal: &mut dyn FnMut(Signal) -> Result<()>,
) -> Result<SubscriberResult> {
    let target = Target::parse(&part.url)?;
    let poll = Poll::new().context("creating the epoll instance")?;
    let first = part.first_index;
    let mut conns = open_conns(
        &target,
        part.mode,
        first..first + part.count,
        part.sources(),
        part.open_timeout,
        poll.registry(),
    )?;
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.sub.topic = (first + i) % part.topics;
    }
    let mut subs = Subscribers {
        part,
        poll,
        events: Events::with_capacity(1024),
        scratch: vec![0u8; READ_BYTES],
        conns,
        tally: Tally::new(),
        span: None,
        expect: 0,
    };
    let outcome = subs.run(commands, signal);
    let Subscribers { poll, conns, .. } = subs;
    close(poll, conns);
    outcome
}

/// One part's connections and what they received.
struct Subscribers<'a> {
    part: &'a SubscriberPart,
    poll: Poll,
    events: Events,
    scratch: Vec<u8>,
    conns: Vec<Conn>,
    tally: Tally,
    /// Known once `go` has come.
    span: Option<Span>,
    /// Messages `0..expect` are (or will be) published.
    expect: u64,
}

/// The run as a subscriber process sees it once `go` has come.
#[derive(Debug)]
struct Span {
    clock: Clock,
    schedule: Schedule,
    /// The start, in `CLOCK_MONOTONIC` nanoseconds.
    t0_ns: u64,
    /// Indexes of the measured messages.
    measured: Range<u64>,
    /// Arrival times that count as inside the window.
    window: Range<Instant>,
    /// Deliveries per interval of the window.
    timeline: Timeline,
    /// This process's CPU time over the window.
    cpu: CpuWindow,
}

/// This process's CPU time over a window, read when the window opens and when it closes.
#[derive(Debug)]
struct CpuWindow {
    window: Range<Instant>,
    /// The reading as the window opened.
    start: Option<Duration>,
    /// The time spent in the window, once it has closed.
    spent: Option<Duration>,
}

impl CpuWindow {
    fn new(window: Range<Instant>) -> Self {
        Self {
            window,
            start: None,
            spent: None,
        }
    }

    /// Takes the readings a boundary passed by `now` calls for. Cheap otherwise, so it is
    /// called per event: one turn of the loop can take long under load.
    fn tick(&mut self, now: Instant) {
        match (self.start, self.spent) {
            (None, _) if now >= self.window.start => self.start = Some(procfs::self_cpu()),
            (Some(start), None) if now >= self.window.end => {
                self.spent = Some(procfs::self_cpu().saturating_sub(start));
            }
            _ => {}
        }
    }

    /// The CPU time spent in the window (up to now if it has not closed).
    fn spent(&self) -> Duration {
        match (self.start, self.spent) {
            (_, Some(spent)) => spent,
            (Some(start), None) => procfs::self_cpu().saturating_sub(start),
            (None, None) => Duration::ZERO,
        }
    }
}

/// A part's counts.
#[derive(Debug)]
struct Tally {
    latency: Histogram<u64>,
    acks: usize,
    received: u64,
    in_flight: u64,
    in_window: u64,
    dropped: u64,
    notices: u64,
    seq_errors: u64,
    foreign: u64,
    /// Live subscribers with every message received or announced as dropped.
    done: usize,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: latency_histogram(),
            acks: 0,
            received: 0,
            in_flight: 0,
            in_window: 0,
            dropped: 0,
            notices: 0,
            seq_errors: 0,
            foreign: 0,
            done: 0,
            errors: 0,
            first_error: None,
        }
    }
}

impl Subscribers<'_> {
    fn run(
        &mut self,
        commands: &mpsc::Receiver<Command>,
        signal: &mut dyn FnMut(Signal) -> Result<()>,
    ) -> Result<SubscriberResult> {
        self.subscribe()?;
        signal(Signal::Ready(self.conns.len()))?;

        let go_deadline = Instant::now() + self.part.open_timeout + SLACK;
        let (t0_ns, total) = loop {
            match commands.try_recv() {
                Ok(Command::Go { t0_ns, total }) => break (t0_ns, total),
                Ok(Command::End { .. }) => {}
                Err(mpsc::TryRecvError::Empty) => {
                    ensure!(
                        Instant::now() < go_deadline,
                        "no go from the parent in time"
                    );
                    self.turn(MAX_WAIT)?;
                }
                Err(mpsc::TryRecvError::Disconnected) => bail!("the parent went away before go"),
            }
        };
        let clock = Clock::now();
        let part = self.part;
        let window_ns = t0_ns + part.warmup.as_nanos() as u64;
        let window_at = clock.instant(window_ns);
        let window_end = window_at + part.duration;
        let schedule = Schedule::new(part.rate);
        self.span = Some(Span {
            clock,
            schedule,
            t0_ns,
            measured: schedule.first_at_or_after(part.warmup)..total,
            window: window_at..window_end,
            timeline: Timeline::new(window_at, timeline::INTERVAL, part.duration),
            cpu: CpuWindow::new(window_at..window_end),
        });
        self.expect = total;
        signal(Signal::Started)?;

        // The publishers stop DRAIN_TIMEOUT after the window at the latest; then `end`.
        let hard_deadline = window_end + DRAIN_TIMEOUT * 2 + SLACK;
        let mut end_at = None;
        loop {
            let now = Instant::now();
            if let Some(span) = &mut self.span {
                span.cpu.tick(now);
            }
            let live = self.conns.iter().filter(|c| !c.dead).count();
            if self.tally.done == live
                || now >= hard_deadline
                || end_at.is_some_and(|at| now >= at + DRAIN_TIMEOUT)
            {
                break;
            }
            match commands.try_recv() {
                Ok(Command::End { sent }) => {
                    self.expect = sent.min(total);
                    for conn in &mut self.conns {
                        check_done(conn, &mut self.tally, true, self.expect, part.topics);
                    }
                    end_at = Some(now);
                }
                Ok(Command::Go { .. }) | Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {
                    end_at.get_or_insert(now);
                }
            }
            let next = if now < window_at {
                window_at
            } else {
                window_end
            };
            let wait = next.saturating_duration_since(now).min(MAX_WAIT);
            self.turn(if wait.is_zero() { MAX_WAIT } else { wait })?;
        }
        let span = self.span.take().expect("set above");
        let cpu = span.cpu.spent();
        let end_ns = span.clock.ns(Instant::now());
        for conn in self.conns.iter().filter(|c| !c.dead) {
            record_in_flight(
                &conn.sub,
                &span,
                self.expect,
                part.topics,
                end_ns,
                &mut self.tally,
            );
        }
        let live = self.conns.iter().filter(|c| !c.dead).count();
        let t = &self.tally;
        Ok(SubscriberResult {
            received: t.received,
            in_flight: t.in_flight,
            in_window: t.in_window,
            dropped: t.dropped,
            dropped_notices: t.notices,
            seq_errors: t.seq_errors,
            foreign: t.foreign,
            incomplete: (live - t.done) as u64,
            errors: t.errors,
            first_error: t.first_error.clone(),
            cpu_ns: cpu.as_nanos() as u64,
            latency_ns: buckets(&t.latency),
            timeline: span.timeline.into_counts(part.duration),
        })
    }

    /// Envelope modes: subscribes every connection to its topic and waits (bounded) for every
    /// ack. Any failure fails the part.
    fn subscribe(&mut self) -> Result<()> {
        let Some(enc) = self.part.mode.encoding() else {
            return Ok(());
        };
        let registry = self.poll.registry();
        for conn in &mut self.conns {
            let request = envelope::encode_request(
                enc,
                &Request::Subscribe {
                    id: None,
                    topics: vec![SubscribeTopic {
                        topic: Cow::Owned(topic_name(conn.sub.topic)),
                        since: None,
                        epoch: None,
                    }],
                },
            );
            conn.ws.queue(enc.opcode(), &request);
            conn.ws.flush(registry)?;
        }
        let deadline = Instant::now() + self.part.open_timeout;
        while self.tally.acks < self.conns.len() {
            ensure!(
                Instant::now() < deadline,
                "{} of {} subscriptions acknowledged by the deadline",
                self.tally.acks,
                self.conns.len()
            );
            self.turn(MAX_WAIT)?;
            if let Some(e) = &self.tally.first_error {
                bail!("subscribing: {e}");
            }
        }
        Ok(())
    }

    /// Waits up to `wait` for readiness and handles it. A connection that fails is counted and
    /// left out from then on.
    fn turn(&mut self, wait: Duration) -> Result<()> {
        let Self {
            part,
            poll,
            events,
            scratch,
            conns,
            tally,
            span,
            expect,
        } = self;
        match poll.poll(events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e).context("epoll_wait"),
        }
        let registry = poll.registry();
        for event in events.iter() {
            let Some(conn) = conns.get_mut(event.token().0) else {
                continue;
            };
            if conn.dead {
                continue;
            }
            // One clock read per event: a turn over many busy connections can take long.
            let at = Instant::now();
            let at_ns = match span {
                Some(span) => {
                    span.cpu.tick(at);
                    span.clock.ns(at)
                }
                None => 0,
            };
            let before = tally.in_window;
            let result = conn.on_ready(
                event.is_readable() || event.is_read_closed(),
                event.is_writable(),
                scratch,
                registry,
                &mut |sub, msg| on_delivery(part.mode, sub, tally, span.as_ref(), at, at_ns, msg),
            );
            if let Some(span) = span {
                span.timeline.add(at, tally.in_window - before);
            }
            match result {
                Ok(()) => check_done(conn, tally, span.is_some(), *expect, part.topics),
                Err(e) => {
                    conn.dead = true;
                    conn.ws.deregister(registry);
                    if conn.sub.done {
                        tally.done -= 1;
                    }
                    tally.errors += 1;
                    tally.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        Ok(())
    }
}

/// Marks a subscriber done once the run has started and it has every message of its topic
/// among `0..expect` (received or announced as dropped).
fn check_done(conn: &mut Conn, tally: &mut Tally, started: bool, expect: u64, topics: usize) {
    if !started || conn.dead || conn.sub.done {
        return;
    }
    if conn.sub.got + conn.sub.dropped >= on_topic(expect, conn.sub.topic, topics) {
        conn.sub.done = true;
        tally.done += 1;
    }
}

/// Takes one message that arrived on a subscriber at `at` (`at_ns` in monotonic nanoseconds).
fn on_delivery(
    mode: FanoutMode,
    sub: &mut SubState,
    tally: &mut Tally,
    span: Option<&Span>,
    at: Instant,
    at_ns: u64,
    msg: &[u8],
) -> Result<()> {
    let payload = match mode.encoding() {
        None => msg,
        Some(enc) => match envelope::decode_server(enc, msg)? {
            ServerMessage::Message { seq, payload, .. } => {
                if sub.next_seq.is_some_and(|next| seq != next) {
                    tally.seq_errors += 1;
                }
                sub.next_seq = Some(seq.saturating_add(1));
                return take_payload(mode, sub, tally, span, at, at_ns, &payload.bytes);
            }
            ServerMessage::Dropped { count, next, .. } => {
                sub.dropped = sub.dropped.saturating_add(count);
                tally.dropped = tally.dropped.saturating_add(count);
                tally.notices += 1;
                sub.next_seq = Some(next);
                return Ok(());
            }
            ServerMessage::Ack { .. } => {
                if !sub.acked {
                    sub.acked = true;
                    tally.acks += 1;
                }
                return Ok(());
            }
            ServerMessage::Pong { .. } => return Ok(()),
            ServerMessage::Error { code, message, .. } => {
                bail!("the broker answered with an error: {code}: {message}")
            }
            ServerMessage::Reset { .. } => bail!("a reset notice for a subscription without since"),
            ServerMessage::Shutdown { reason } => bail!("the broker is shutting down: {reason}"),
        },
    };
    take_payload(mode, sub, tally, span, at, at_ns, payload)
}

/// Counts and times one delivered payload.
fn take_payload(
    mode: FanoutMode,
    sub: &mut SubState,
    tally: &mut Tally,
    span: Option<&Span>,
    at: Instant,
    at_ns: u64,
    payload: &[u8],
) -> Result<()> {
    let (Some(span), Some(ts)) = (span, read_ts(mode.is_json(), payload)) else {
        tally.foreign += 1;
        return Ok(());
    };
    let index = ts
        .checked_sub(span.t0_ns)
        .and_then(|offset| span.schedule.index_of(offset));
    let Some(m) = index.filter(|&m| m < span.measured.end) else {
        tally.foreign += 1;
        return Ok(());
    };
    sub.got += 1;
    sub.last = Some(sub.last.map_or(m, |last| last.max(m)));
    if span.measured.contains(&m) {
        tally.received += 1;
        record(
            &mut tally.latency,
            Duration::from_nanos(at_ns.saturating_sub(ts)),
        );
    }
    if span.window.contains(&at) {
        tally.in_window += 1;
    }
    Ok(())
}

/// Records the measured messages of `sub`'s topic among `0..sent` that come after the last one
/// it received (all of them if none) at the latency they had reached at `end_ns`, and counts
/// them in flight.
fn record_in_flight(
    sub: &SubState,
    span: &Span,
    sent: u64,
    topics: usize,
    end_ns: u64,
    tally: &mut Tally,
) {
    let from = sub.last.map_or(0, |last| last + 1).max(span.measured.start);
    let to = sent.min(span.measured.end);
    let (topic, topics) = (sub.topic as u64, topics.max(1) as u64);
    // The first message of the topic at or after `from`.
    let mut m = from + (topic + topics - from % topics) % topics;
    while m < to {
        let due_ns = span.t0_ns + span.schedule.offset_ns(m);
        record(
            &mut tally.latency,
            Duration::from_nanos(end_ns.saturating_sub(due_ns)),
        );
        tally.in_flight += 1;
        m += topics;
    }
}

/// What the publishers did.
#[derive(Debug)]
struct PublishOutcome {
    window: Window,
    /// Messages `0..sent` were sent.
    sent: u64,
    /// Messages sent while the window was open.
    sent_in_window: u64,
    /// Publishes refused with an error.
    errors: u64,
    first_error: Option<String>,
    /// How late each measured message was queued after its due time.
    lag: Histogram<u64>,
}

/// Publishes the schedule from `t0` on `conns`; see the module docs.
fn publish(
    cfg: &FanoutConfig,
    poll: &mut Poll,
    conns: &mut [Conn],
    plan: &Plan,
    t0: Instant,
) -> Result<PublishOutcome> {
    let waker = Arc::new(Waker::new(poll.registry(), WAKE).context("creating a waker")?);
    let _ticker = Ticker::start(Arc::clone(&waker), t0, plan.schedule, plan.total);
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; READ_BYTES];
    let mut progress = Progress::for_duration(cfg.progress, "fanout", cfg.warmup + cfg.duration);
    let enc = cfg.mode.encoding();
    let topics: Vec<String> = (0..cfg.topics).map(topic_name).collect();
    let mut payload = Vec::with_capacity(cfg.size_bytes);
    let measured = plan.first_measured..plan.total;
    let mut lag = latency_histogram();
    let (mut acked, mut errors, mut first_error) = (0u64, 0u64, None::<String>);

    let window_at = t0 + cfg.warmup;
    let window_end = window_at + cfg.duration;
    let drain_deadline = window_end + DRAIN_TIMEOUT;
    let mut window: Option<(WindowStart, u64)> = None;
    let mut closed: Option<(Window, u64)> = None;
    let mut next_m = 0u64;
    loop {
        let now = Instant::now();
        if window.is_none() && now >= window_at {
            window = Some((WindowStart::now(cfg.server_pid)?, next_m));
        }
        if let (Some((start, sent_at_open)), None) = (window, &closed) {
            if now >= window_end {
                closed = Some((start.end(cfg.server_pid)?, next_m - sent_at_open));
            }
        }
        if closed.is_some() {
            let flushed = conns.iter().all(|c| c.ws.queued_bytes() == 0);
            let answered = enc.is_none() || acked + errors >= next_m;
            if (next_m == plan.total && flushed && answered) || now >= drain_deadline {
                break;
            }
        }

        // Queue every message now due (unless its connection is backed up), then send.
        let first_released = next_m;
        while next_m < plan.total && t0 + plan.schedule.at(next_m) <= now {
            let conn = &mut conns[(next_m % conns.len() as u64) as usize];
            if conn.ws.queued_bytes() >= OUT_HIGH_BYTES {
                break;
            }
            let due = t0 + plan.schedule.at(next_m);
            write_payload(
                cfg.mode.is_json(),
                plan.clock.ns(due),
                cfg.size_bytes,
                &mut payload,
            );
            match enc {
                Some(enc) => {
                    let kind = if enc == Encoding::Json {
                        PayloadKind::Json
                    } else {
                        PayloadKind::Binary
                    };
                    let request = envelope::encode_request(
                        enc,
                        &Request::Publish {
                            id: None,
                            topic: Cow::Borrowed(&topics[(next_m % cfg.topics as u64) as usize]),
                            payload: Payload::new(kind, &payload),
                        },
                    );
                    conn.ws.queue(enc.opcode(), &request);
                }
                None => conn.ws.queue(OpCode::Binary, &payload),
            }
            if measured.contains(&next_m) {
                record(&mut lag, Instant::now().saturating_duration_since(due));
            }
            next_m += 1;
        }
        for i in 0..((next_m - first_released).min(conns.len() as u64)) {
            let c = ((first_released + i) % conns.len() as u64) as usize;
            conns[c]
                .ws
                .flush(poll.registry())
                .with_context(|| format!("publisher {c}"))?;
        }

        progress.update_time(now, now.saturating_duration_since(t0), || {
            format!("{next_m} of {} published", plan.total)
        });

        let wake = match (window, &closed) {
            (None, _) => window_at,
            (Some(_), None) => window_end,
            (Some(_), Some(_)) => drain_deadline,
        };
        let wait = wake.saturating_duration_since(now).min(MAX_WAIT);
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("epoll_wait"),
        }
        for event in &events {
            let c = event.token().0;
            let Some(conn) = conns.get_mut(c) else {
                continue;
            };
            conn.on_ready(
                event.is_readable() || event.is_read_closed(),
                event.is_writable(),
                &mut scratch,
                poll.registry(),
                &mut |_, msg| {
                    // Raw: the publisher's own copies, ignored. Envelope: acks and errors.
                    let Some(enc) = enc else { return Ok(()) };
                    match envelope::decode_server(enc, msg)? {
                        ServerMessage::Ack { .. } => acked += 1,
                        ServerMessage::Error { code, message, .. } => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{code}: {message}"));
                        }
                        ServerMessage::Shutdown { reason } => {
                            bail!("the broker is shutting down: {reason}")
                        }
                        _ => {}
                    }
                    Ok(())
                },
            )
            .with_context(|| format!("publisher {c}"))?;
        }
    }
    progress.finish();
    let (window, sent_in_window) = closed.expect("the loop only ends after the window closed");
    Ok(PublishOutcome {
        window,
        sent: next_m,
        sent_in_window,
        errors,
        first_error,
        lag,
    })
}

/// The thread that wakes the publishers' `Poll` at each due time: `epoll_wait` only counts in
/// milliseconds, a sleeping thread (with 1 ns of timer slack) in microseconds. Stopped and
/// joined on drop.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(waker: Arc<Waker>, t0: Instant, schedule: Schedule, total: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            set_timer_slack_ns(1);
            let mut m = 0;
            while m < total && !flag.load(Ordering::Relaxed) {
                let now = Instant::now();
                let due = t0 + schedule.at(m);
                if due > now {
                    // Bounded, so a stop is seen within MAX_WAIT.
                    thread::sleep((due - now).min(MAX_WAIT));
                    continue;
                }
                let _ = waker.wake();
                while m < total && t0 + schedule.at(m) <= now {
                    m += 1;
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A subscriber's progress through its topic.
#[derive(Debug, Default)]
struct SubState {
    /// Its topic's index.
    topic: usize,
    /// The subscribe was acknowledged.
    acked: bool,
    /// The seq the next message must carry (after the first, or after a `dropped` notice).
    next_seq: Option<u64>,
    /// Messages of this run received.
    got: u64,
    /// The index of the latest message received.
    last: Option<u64>,
    /// Messages announced as dropped.
    dropped: u64,
    /// Every message published so far is received or announced as dropped.
    done: bool,
}

/// One connection (a subscriber's, or a publisher's) and its subscriber state.
#[derive(Debug)]
struct Conn {
    /// Passes text messages on: the JSON envelope travels in them.
    ws: MioConn,
    /// Failed; ignored from then on.
    dead: bool,
    sub: SubState,
}

impl Conn {
    /// [`MioConn::on_ready`], with the subscriber's state passed to `on_message`.
    fn on_ready(
        &mut self,
        readable: bool,
        writable: bool,
        scratch: &mut [u8],
        registry: &Registry,
        on_message: &mut dyn FnMut(&mut SubState, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let Self { ws, sub, .. } = self;
        ws.on_ready(readable, writable, scratch, registry, |message| {
            on_message(sub, &message)
        })
    }
}

/// Opens connections `indexes` (each index picks its source address) in batches of
/// [`BATCH`], upgrades each offering `mode`'s subprotocol, and registers them readable with
/// `registry`, token `i` for the `i`-th. Any failure, or a server that does not select the
/// subprotocol, fails the whole set.
fn open_conns(
    target: &Target,
    mode: FanoutMode,
    indexes: Range<usize>,
    sources: SourceAddrs,
    open_timeout: Duration,
    registry: &Registry,
) -> Result<Vec<Conn>> {
    let deadline = Instant::now() + open_timeout;
    let protocols: Vec<&str> = mode
        .encoding()
        .map(Encoding::subprotocol)
        .into_iter()
        .collect();
    let mut conns = Vec::with_capacity(indexes.len());
    let mut start = indexes.start;
    while start < indexes.end {
        let batch = start..(start + BATCH).min(indexes.end);
        start = batch.end;
        // A batch at a time, so the first failure ends the open.
        let set = idle::open_range(
            &WorkerConfig {
                target: target.clone(),
                range: batch.clone(),
                raw: false,
                sources,
                open_timeout: deadline.saturating_duration_since(Instant::now()),
                lifetime: Duration::MAX,
            },
            &protocols,
        )?;
        if set.failed > 0 {
            bail!(
                "{} of {} connections failed to open; first: {}",
                set.failed,
                batch.len(),
                set.first_error.as_deref().unwrap_or("?")
            );
        }
        for conn in set.conns {
            let ws = MioConn::register(conn, Token(conns.len()), registry)?.passing_text();
            conns.push(Conn {
                ws,
                dead: false,
                sub: SubState::default(),
            });
        }
    }
    Ok(conns)
}

/// Closes the live connections with the idle load's blocking close, bounded by
/// [`CLOSE_GRACE`].
fn close(poll: Poll, conns: Vec<Conn>) {
    let live = OpenSet {
        conns: conns
            .into_iter()
            .filter(|c| !c.dead)
            .filter_map(|c| c.ws.into_blocking(poll.registry()))
            .collect(),
        ..OpenSet::default()
    };
    drop(poll);
    live.close(CLOSE_GRACE);
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use ringcast_protocol::{Codec, Event, Limits};

    use super::*;

    #[test]
    fn payloads_are_exactly_the_size_asked_and_carry_the_timestamp() {
        let mut out = Vec::new();
        for (json, size) in [(true, 25), (true, 64), (false, 8), (false, 64)] {
            for ts in [0, 1_234_567_890, u64::MAX] {
                write_payload(json, ts, size, &mut out);
                assert_eq!(out.len(), size, "json {json}, ts {ts}");
                assert_eq!(read_ts(json, &out), Some(ts));
            }
        }
        write_payload(true, 42, 64, &mut out);
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
        assert_eq!(read_ts(true, b"\"x\""), None);
        assert_eq!(read_ts(false, &[1, 2, 3]), None);
    }

    #[test]
    fn messages_and_subscribers_spread_over_topics() {
        assert_eq!(on_topic(10, 0, 3), 4);
        assert_eq!(on_topic(10, 1, 3), 3);
        assert_eq!(on_topic(10, 2, 3), 3);
        assert_eq!(on_topic(7, 0, 1), 7);
        // 5 subscribers over 2 topics (3 + 2), messages 4..10 (3 each).
        assert_eq!(expected_deliveries(5, 2, 4..10), 3 * 3 + 2 * 3);
        assert_eq!(expected_deliveries(5, 1, 4..10), 5 * 6);
        assert_eq!(expected_deliveries(5, 3, 7..7), 0);
    }

    #[test]
    fn commands_round_trip_as_lines() {
        for c in [
            Command::Go {
                t0_ns: 123_456_789,
                total: 42,
            },
            Command::End { sent: 7 },
        ] {
            assert_eq!(Command::parse(&c.line()), Some(c));
        }
        assert_eq!(Command::parse("go 1"), None);
        assert_eq!(Command::parse("hello"), None);
    }

    #[test]
    fn the_clock_converts_both_ways() {
        let clock = Clock::now();
        let later = clock.at + Duration::from_millis(5);
        assert_eq!(clock.ns(later), clock.ns + 5_000_000);
        assert_eq!(clock.instant(clock.ns + 5_000_000), later);
        let reading = monotonic_ns();
        assert!(reading >= clock.ns && reading - clock.ns < 60_000_000_000);
    }

    /// A run of 200 messages one nanosecond apart (so message `m` is due at `t0 + m`), the
    /// last 100 measured.
    fn span(clock: Clock) -> Span {
        Span {
            clock,
            schedule: Schedule::new(1e9),
            t0_ns: clock.ns,
            measured: 100..200,
            window: clock.at..clock.at + Duration::from_secs(1),
            timeline: Timeline::new(clock.at, timeline::INTERVAL, Duration::from_secs(1)),
            cpu: CpuWindow::new(clock.at..clock.at + Duration::from_secs(1)),
        }
    }

    fn deliver(
        enc: Encoding,
        sub: &mut SubState,
        tally: &mut Tally,
        span: &Span,
        frame: &bytes::Bytes,
    ) -> Result<()> {
        let mut buf = BytesMut::from(&frame[..]);
        let mut codec = Codec::client(Limits::default(), 1);
        let message = match codec.poll_event(&mut buf).unwrap().unwrap() {
            Event::Binary(b) => b,
            Event::Text(t) => t.into_bytes(),
            other => panic!("{other:?}"),
        };
        let mode = if enc == Encoding::Json {
            FanoutMode::EnvelopeJson
        } else {
            FanoutMode::EnvelopeBin
        };
        on_delivery(
            mode,
            sub,
            tally,
            Some(span),
            span.clock.at,
            span.clock.ns + 1000,
            &message,
        )
    }

    #[test]
    fn seq_must_follow_unless_a_dropped_notice_announced_the_gap() {
        for enc in [Encoding::Json, Encoding::Binary] {
            let span = span(Clock::now());
            let (mut sub, mut tally) = (SubState::default(), Tally::new());
            let mut data = Vec::new();
            write_payload(enc == Encoding::Json, span.t0_ns + 150, 32, &mut data);
            let kind = if enc == Encoding::Json {
                PayloadKind::Json
            } else {
                PayloadKind::Binary
            };
            let message =
                |seq| envelope::message_frame(enc, "fanout.0", seq, Payload::new(kind, &data));
            for frame in [
                message(7),
                message(8),
                envelope::dropped_frame(enc, "fanout.0", 3, 12),
                message(12),
            ] {
                deliver(enc, &mut sub, &mut tally, &span, &frame).unwrap();
            }
            assert_eq!((tally.seq_errors, tally.dropped, tally.notices), (0, 3, 1));
            assert_eq!((sub.got, tally.received), (3, 3));
            assert_eq!(tally.latency.len(), 3);
            assert_eq!(tally.latency.max(), tally.latency.highest_equivalent(850));
            deliver(enc, &mut sub, &mut tally, &span, &message(14)).unwrap();
            deliver(enc, &mut sub, &mut tally, &span, &message(14)).unwrap();
            assert_eq!(tally.seq_errors, 2, "a gap and a repeat");
            assert_eq!(sub.last, Some(150), "every message was the same one");
            let error = envelope::error_frame(enc, None, envelope::ErrorCode::BadTopic, "no", None);
            assert!(deliver(enc, &mut sub, &mut tally, &span, &error).is_err());
        }
    }

    #[test]
    fn messages_outside_the_run_are_foreign_and_outside_the_window_unmeasured() {
        let span = span(Clock::now());
        let (mut sub, mut tally) = (SubState::default(), Tally::new());
        let mut data = Vec::new();
        for (ts, foreign, measured) in [
            (span.t0_ns - 1, 1, 0),
            (span.t0_ns + 50, 1, 0),
            (span.t0_ns + 150, 1, 1),
            (span.t0_ns + 200, 2, 1),
        ] {
            write_payload(false, ts, 16, &mut data);
            let at = span.clock.at;
            take_payload(
                FanoutMode::Raw,
                &mut sub,
                &mut tally,
                Some(&span),
                at,
                span.t0_ns + 300,
                &data,
            )
            .unwrap();
            assert_eq!(
                (tally.foreign, tally.received),
                (foreign, measured),
                "ts {ts}"
            );
        }
        assert_eq!(sub.got, 2);
        assert_eq!(sub.last, Some(150));
        let (mut sub, mut tally) = (SubState::default(), Tally::new());
        take_payload(
            FanoutMode::Raw,
            &mut sub,
            &mut tally,
            None,
            span.clock.at,
            0,
            &data,
        )
        .unwrap();
        assert_eq!(tally.foreign, 1, "a message before go");
    }

    #[test]
    fn messages_after_the_last_received_are_in_flight_at_the_latency_reached() {
        let span = span(Clock::now());
        let end_ns = span.t0_ns + 1000;
        let mut tally = Tally::new();
        let sub = SubState {
            last: Some(150),
            ..SubState::default()
        };
        // Sent up to 180: 151..180 of the one topic are in flight, the oldest 849 ns late.
        record_in_flight(&sub, &span, 180, 1, end_ns, &mut tally);
        assert_eq!(tally.in_flight, 29);
        assert_eq!(tally.latency.max(), tally.latency.highest_equivalent(849));
        assert_eq!(tally.latency.min(), tally.latency.lowest_equivalent(821));

        // Nothing received on topic 1 of 3: 100, 103, ... 199 of the measured are in flight.
        let mut tally = Tally::new();
        let sub = SubState {
            topic: 1,
            ..SubState::default()
        };
        record_in_flight(&sub, &span, 200, 3, end_ns, &mut tally);
        assert_eq!(tally.in_flight, 34);
        // Received past the end of the measured ones: none in flight.
        let mut tally = Tally::new();
        let sub = SubState {
            last: Some(199),
            ..SubState::default()
        };
        record_in_flight(&sub, &span, 200, 1, end_ns, &mut tally);
        assert_eq!(tally.in_flight, 0);
    }

    #[test]
    fn cpu_is_read_as_the_window_opens_and_closes() {
        let t = Instant::now();
        let mut cpu = CpuWindow::new(t + Duration::from_secs(1)..t + Duration::from_secs(2));
        cpu.tick(t);
        assert_eq!(
            (cpu.start, cpu.spent, cpu.spent()),
            (None, None, Duration::ZERO)
        );
        cpu.tick(t + Duration::from_millis(1500));
        assert!(cpu.start.is_some() && cpu.spent.is_none());
        cpu.tick(t + Duration::from_secs(2));
        let spent = cpu.spent.expect("closed");
        cpu.tick(t + Duration::from_secs(3));
        assert_eq!(cpu.spent(), spent, "read once");
    }

    #[test]
    fn configs_that_cannot_run_are_refused() {
        let target = Target::parse("ws://127.0.0.1:9/").unwrap();
        let mut cfg = FanoutConfig::new(target);
        validate(&cfg).unwrap();
        let bad_ones: [fn(&mut FanoutConfig); 9] = [
            |c| c.subs = 0,
            |c| c.topics = 0,
            |c| {
                c.mode = FanoutMode::Raw;
                c.topics = 2;
            },
            |c| c.rate = 0.0,
            |c| c.size_bytes = 24,
            |c| {
                c.mode = FanoutMode::EnvelopeBin;
                c.size_bytes = 7;
            },
            |c| c.procs = 1001,
            |c| {
                c.subs = 20_000;
                c.procs = 1;
            },
            |c| c.publishers = 0,
        ];
        for bad in bad_ones {
            let mut c = cfg.clone();
            bad(&mut c);
            assert!(validate(&c).is_err(), "{c:?}");
        }
        cfg.subs = 30_000;
        assert_eq!(cfg.procs(), 2);
        validate(&cfg).unwrap();
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in [
            FanoutMode::EnvelopeJson,
            FanoutMode::EnvelopeBin,
            FanoutMode::Raw,
        ] {
            assert_eq!(mode.to_string().parse::<FanoutMode>(), Ok(mode));
        }
        assert!("json".parse::<FanoutMode>().is_err());
    }
}
