//! The echo load, in one of two modes:
//! - closed loop (the default): each connection sends one message, waits for its echo,
//!   repeats; the rate is whatever the server sustains;
//! - fixed rate ([`EchoConfig::rate`]): messages go out on a schedule, pipelined, and latency
//!   is measured from each message's due time, so it is free of coordinated omission; see
//!   [`rate`] for the schedule and what happens when the load falls behind.
//!
//! One thread drives every connection, with one of two event loops ([`Driver`]):
//! - [`Driver::Epoll`] (the default): level-triggered readiness through mio; a round trip is
//!   one `write` and one `read`, and one `epoll_wait` serves every connection that is ready.
//! - [`Driver::Uring`]: monoio's io_uring runtime, one task per connection; a round trip is a
//!   send and a receive operation, submitted for all ready tasks in one `io_uring_enter`.
//!
//! On this project's 2-core VM the epoll loop costs the client less CPU per round trip, so it
//! is the default; the other is a cross-check that a result does not depend on the client.
//! The WebSocket side is the client role of `ringcast-protocol` (`ClientHandshake`,
//! `HeadReader`, `Codec::client`); `raw` sends bare bytes instead, for a TCP echo server.
//!
//! Besides latency percentiles, a report carries the latency spectrum
//! ([`EchoReport::latency_spectrum`]) and the round trips completed per 100 ms of the window
//! ([`EchoReport::throughput`]), which [`crate::plot::echo`] draws.
//!
//! Bounded: each connect and all handshakes have a deadline, the measured window ends on the
//! clock, the fixed-rate loop waits at most [`rate::DRAIN_TIMEOUT`] for the window's last
//! echoes, and closing waits at most [`CLOSE_GRACE`].

mod epoll;
pub mod rate;
mod uring;

use std::{fmt, str::FromStr, time::Duration};

use anyhow::{bail, ensure, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::{
    net::{SourceAddrs, Target},
    stats::LatencySummary,
    timeline,
    window::{CpuReport, Window},
};

/// How long connections get to finish their closing handshake after the window ends.
pub const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Which event loop drives the client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Driver {
    /// mio (epoll), level-triggered; the default.
    #[default]
    Epoll,
    /// monoio (io_uring), one task per connection.
    Uring,
}

impl FromStr for Driver {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "epoll" => Ok(Self::Epoll),
            "uring" => Ok(Self::Uring),
            other => Err(format!("unknown driver {other:?}: epoll or uring")),
        }
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Epoll => "epoll",
            Self::Uring => "uring",
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// The server.
    pub target: Target,
    /// Connections, each with one message in flight.
    pub conns: usize,
    /// Payload bytes per message (binary frames; with `raw`, bytes on the wire).
    pub size_bytes: usize,
    /// Length of the measured window.
    pub duration: Duration,
    /// Load before the window opens, not measured.
    pub warmup: Duration,
    /// Bare TCP bytes instead of WebSocket frames (no handshake, no framing).
    pub raw: bool,
    /// The server's process, for its CPU time over the window.
    pub server_pid: Option<u32>,
    /// Source addresses for the connections.
    pub sources: SourceAddrs,
    /// Limit for each TCP connect, and for all WebSocket handshakes together.
    pub connect_timeout: Duration,
    /// The client's event loop.
    pub driver: Driver,
    /// Messages per second in total for the fixed-rate mode; `None` for the closed loop.
    /// Needs [`Driver::Epoll`].
    pub rate: Option<f64>,
    /// Draw a progress bar on stderr (when it is a terminal and the run lasts over a second).
    pub progress: bool,
}

impl EchoConfig {
    /// The defaults for `target`: 100 connections, 20-byte messages, 1 s warmup, 5 s window,
    /// the epoll driver, closed loop, no progress bar.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            conns: 100,
            size_bytes: 20,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            raw: false,
            server_pid: None,
            sources: SourceAddrs::default(),
            connect_timeout: Duration::from_secs(10),
            driver: Driver::default(),
            rate: None,
            progress: false,
        }
    }

    /// The payload every message carries: a byte pattern rather than zeros, so a server that
    /// mangles data is caught.
    fn payload(&self) -> Vec<u8> {
        (0..self.size_bytes).map(|i| (i % 251) as u8).collect()
    }

    /// The largest frame and message the client codec accepts: the echo, with room to spare.
    fn max_message_bytes(&self) -> usize {
        self.size_bytes.max(1 << 16)
    }
}

/// What one echo run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EchoReport {
    /// `"ws"` or `"raw"`.
    pub mode: String,
    /// The client's event loop, `"epoll"` or `"uring"`.
    pub driver: String,
    /// Connections that completed the handshake and ran the loop.
    pub conns: usize,
    /// Payload bytes per message.
    pub size_bytes: usize,
    /// The measured window, in seconds.
    pub window_secs: f64,
    /// Round trips measured: closed loop, those completed inside the window; fixed rate, those
    /// whose message was due inside the window and whose echo came back.
    pub messages: u64,
    /// Round trips completed per second inside the window. Closed loop: `messages` per second
    /// of window. Fixed rate: echoes received inside the window, whenever their message was due
    /// (the sum of [`EchoReport::throughput`]).
    pub msgs_per_sec: f64,
    /// Round-trip latency of the measured messages. Fixed rate: from each message's due time,
    /// so lateness in sending counts.
    pub latency: LatencySummary,
    /// Server CPU time per round trip, in microseconds (needs the server's pid).
    pub server_cpu_us_per_msg: Option<f64>,
    /// Where the CPU time of the window went.
    #[serde(flatten)]
    pub cpu: CpuReport,
    /// Connections that failed after the handshake (reset, protocol error, wrong echo).
    pub errors: u64,
    /// The first such error, if any.
    pub first_error: Option<String>,
    /// Fixed rate: the messages per second asked for; `None` for the closed loop.
    #[serde(default)]
    pub target_rate: Option<f64>,
    /// Fixed rate: messages per second actually sent while the window was open.
    #[serde(default)]
    pub achieved_rate: Option<f64>,
    /// Fixed rate: the achieved rate fell more than [`BEHIND_TOLERANCE`] below the target (the
    /// load generator or the server could not keep up; latencies include the lateness).
    #[serde(default)]
    pub behind: bool,
    /// Fixed rate: messages due in the window that were never sent or never answered by the
    /// end of the drain; recorded in the latency at the latency they had reached (a lower
    /// bound), and not counted in `messages`.
    #[serde(default)]
    pub unanswered: u64,
    /// Fixed rate: how late each measured message was queued for sending after its due time
    /// (the loop woke late, or the socket was full): the part of the latency spent before the
    /// message left. Near zero when the client keeps up.
    #[serde(default)]
    pub send_lag: Option<LatencySummary>,
    /// The length of one throughput interval, in milliseconds.
    #[serde(default)]
    pub throughput_interval_ms: u64,
    /// Round trips completed in each interval of the window, in order (the last may be
    /// partial).
    #[serde(default)]
    pub throughput: Vec<u64>,
    /// The latency spectrum: points of (percentile, latency), ending at the maximum.
    #[serde(default)]
    pub latency_spectrum: Vec<SpectrumPoint>,
}

/// How far the achieved rate may fall below the target before a run counts as behind: 1%.
pub const BEHIND_TOLERANCE: f64 = 0.01;

/// One point of a latency spectrum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpectrumPoint {
    /// Percentile, 0 to 100: this share of values is at or below `latency_us`.
    pub percentile: f64,
    /// Latency in microseconds.
    pub latency_us: f64,
}

/// The spectrum of a histogram of nanoseconds, as HdrHistogram prints it: points packed
/// closer as the percentile nears 100 (5 per halving of the distance to 100), ending with the
/// maximum. Empty for an empty histogram.
pub fn spectrum(h: &Histogram<u64>) -> Vec<SpectrumPoint> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut points: Vec<SpectrumPoint> = h
        .iter_quantiles(5)
        .map(|v| SpectrumPoint {
            percentile: v.quantile_iterated_to() * 100.0,
            latency_us: v.value_iterated_to() as f64 / 1000.0,
        })
        .take_while(|p| p.percentile < 100.0)
        .collect();
    points.push(SpectrumPoint {
        percentile: 100.0,
        latency_us: h.max() as f64 / 1000.0,
    });
    points
}

impl EchoReport {
    /// One human-readable line.
    pub fn human(&self) -> String {
        let l = &self.latency;
        let fixed = match (self.target_rate, self.achieved_rate) {
            (Some(target), Some(achieved)) => format!(
                " at {target:.0} msgs/s (sent {achieved:.0}/s{behind})",
                behind = if self.behind {
                    format!(
                        ", BEHIND by {:.1}%: the client or server could not keep up",
                        (1.0 - achieved / target) * 100.0
                    )
                } else {
                    String::new()
                }
            ),
            _ => String::new(),
        };
        let mut line = format!(
            "echo {mode}/{driver}: {conns} conns x {size} B{fixed}, {win:.2} s: {rate:.0} msgs/s \
             | latency us p50 {p50:.1} p90 {p90:.1} p99 {p99:.1} p99.9 {p999:.1} max {max:.1}",
            mode = self.mode,
            driver = self.driver,
            conns = self.conns,
            size = self.size_bytes,
            win = self.window_secs,
            rate = self.msgs_per_sec,
            p50 = l.p50_us,
            p90 = l.p90_us,
            p99 = l.p99_us,
            p999 = l.p999_us,
            max = l.max_us,
        );
        line += &self.cpu.human(self.server_cpu_us_per_msg, "msg", 2);
        if let Some(lag) = &self.send_lag {
            line += &format!(
                " | send lag us p50 {:.1} p99 {:.1} max {:.1}",
                lag.p50_us, lag.p99_us, lag.max_us
            );
        }
        if self.unanswered > 0 {
            line += &format!(" | {} unanswered", self.unanswered);
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
}

/// Runs the load on this thread and reports.
///
/// # Errors
/// A bad config (a fixed rate with the uring driver), the event loop cannot start (for
/// `Uring`, io_uring unavailable), a connection or handshake fails before the load starts, or
/// the server's `/proc` entries cannot be read.
pub fn run_echo(cfg: &EchoConfig) -> Result<EchoReport> {
    ensure!(cfg.conns > 0, "--conns must be at least 1");
    ensure!(!cfg.duration.is_zero(), "--duration must be positive");
    ensure!(
        !cfg.raw || cfg.size_bytes > 0,
        "raw echo needs --size of at least 1 byte"
    );
    // Fail before connecting anything if the sources run out.
    cfg.sources.for_index(cfg.conns - 1)?;
    let outcome = match (cfg.driver, cfg.rate) {
        (Driver::Epoll, None) => epoll::run(cfg)?,
        (Driver::Epoll, Some(rate)) => rate::run(cfg, rate)?,
        (Driver::Uring, None) => uring::run(cfg)?,
        (Driver::Uring, Some(_)) => bail!(
            "--rate needs the epoll driver: monoio's timers tick in milliseconds, which would \
             add up to 1 ms of false lateness to each message"
        ),
    };
    let messages = outcome.histogram.len() - outcome.unanswered;
    let secs = outcome.window.secs();
    let achieved_rate = outcome.sent_in_window.map(|sent| sent as f64 / secs);
    Ok(EchoReport {
        mode: if cfg.raw { "raw" } else { "ws" }.to_owned(),
        driver: cfg.driver.to_string(),
        conns: cfg.conns,
        size_bytes: cfg.size_bytes,
        window_secs: secs,
        messages,
        msgs_per_sec: if cfg.rate.is_some() {
            outcome.throughput.iter().sum::<u64>() as f64 / secs
        } else {
            messages as f64 / secs
        },
        latency: LatencySummary::from_histogram(&outcome.histogram),
        server_cpu_us_per_msg: outcome.window.server_cpu_us_per(messages),
        cpu: outcome.window.cpu_report(),
        errors: outcome.errors,
        first_error: outcome.first_error,
        target_rate: cfg.rate,
        achieved_rate,
        behind: match (cfg.rate, achieved_rate) {
            (Some(target), Some(achieved)) => achieved < target * (1.0 - BEHIND_TOLERANCE),
            _ => false,
        },
        unanswered: outcome.unanswered,
        send_lag: outcome
            .send_lag
            .as_ref()
            .map(LatencySummary::from_histogram),
        throughput_interval_ms: timeline::INTERVAL.as_millis() as u64,
        throughput: outcome.throughput,
        latency_spectrum: spectrum(&outcome.histogram),
    })
}

/// What a driver hands back.
#[derive(Debug)]
struct Outcome {
    /// Round-trip latencies inside the window, in nanoseconds.
    histogram: Histogram<u64>,
    window: Window,
    /// Connections that failed inside the window.
    errors: u64,
    first_error: Option<String>,
    /// Round trips completed per [`timeline::INTERVAL`] of the window.
    throughput: Vec<u64>,
    /// Fixed rate: messages sent while the window was open.
    sent_in_window: Option<u64>,
    /// Fixed rate: measured messages never answered (they are in the histogram too).
    unanswered: u64,
    /// Fixed rate: how late each measured message was queued after its due time.
    send_lag: Option<Histogram<u64>>,
}
