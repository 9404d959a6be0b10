//! The closed-loop echo load: each connection sends one message, waits for its echo, repeats.
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
//! Bounded: each connect and all handshakes have a deadline, the measured window ends on the
//! clock, and closing waits at most [`CLOSE_GRACE`].

mod epoll;
mod uring;

use std::{
    fmt,
    str::FromStr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::{
    net::{SourceAddrs, Target},
    procfs,
    stats::LatencySummary,
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
}

impl EchoConfig {
    /// The defaults for `target`: 100 connections, 20-byte messages, 1 s warmup, 5 s window,
    /// the epoll driver.
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
    /// Round trips completed inside the window.
    pub messages: u64,
    /// Round trips per second inside the window.
    pub msgs_per_sec: f64,
    /// Round-trip latency inside the window.
    pub latency: LatencySummary,
    /// Server CPU time per round trip, in microseconds (needs the server's pid).
    pub server_cpu_us_per_msg: Option<f64>,
    /// Server CPU time over the window, as a fraction of one core.
    pub server_cpu_util: Option<f64>,
    /// This load generator's CPU time over the window, as a fraction of one core. Near 1.0 the
    /// client may be the bottleneck.
    pub client_cpu_util: f64,
    /// CPU time over the window that neither the server nor this client used, in cores: other
    /// processes, interrupts and softirqs not charged to either, and hypervisor steal. A noisy
    /// neighbour shows up here (needs the server's pid).
    pub other_cpu_util: Option<f64>,
    /// Connections that failed after the handshake (reset, protocol error, wrong echo).
    pub errors: u64,
    /// The first such error, if any.
    pub first_error: Option<String>,
}

impl EchoReport {
    /// One human-readable line.
    pub fn human(&self) -> String {
        let l = &self.latency;
        let mut line = format!(
            "echo {mode}/{driver}: {conns} conns x {size} B, {win:.2} s: {rate:.0} msgs/s | \
             latency us p50 {p50:.1} p90 {p90:.1} p99 {p99:.1} p99.9 {p999:.1} max {max:.1}",
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
        if let (Some(per), Some(util)) = (self.server_cpu_us_per_msg, self.server_cpu_util) {
            line += &format!(
                " | server cpu {per:.2} us/msg ({:.0}% of a core)",
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

/// Runs the closed loop on this thread and reports.
///
/// # Errors
/// A bad config, the event loop cannot start (for `Uring`, io_uring unavailable), a connection
/// or handshake fails before the load starts, or the server's `/proc` entries cannot be read.
pub fn run_echo(cfg: &EchoConfig) -> Result<EchoReport> {
    ensure!(cfg.conns > 0, "--conns must be at least 1");
    ensure!(!cfg.duration.is_zero(), "--duration must be positive");
    ensure!(
        !cfg.raw || cfg.size_bytes > 0,
        "raw echo needs --size of at least 1 byte"
    );
    // Fail before connecting anything if the sources run out.
    cfg.sources.for_index(cfg.conns - 1)?;
    let outcome = match cfg.driver {
        Driver::Epoll => epoll::run(cfg)?,
        Driver::Uring => uring::run(cfg)?,
    };
    let messages = outcome.histogram.len();
    let secs = outcome.window.window.as_secs_f64();
    let server_cpu = outcome.window.server_cpu;
    Ok(EchoReport {
        mode: if cfg.raw { "raw" } else { "ws" }.to_owned(),
        driver: cfg.driver.to_string(),
        conns: cfg.conns,
        size_bytes: cfg.size_bytes,
        window_secs: secs,
        messages,
        msgs_per_sec: messages as f64 / secs,
        latency: LatencySummary::from_histogram(&outcome.histogram),
        server_cpu_us_per_msg: server_cpu
            .filter(|_| messages > 0)
            .map(|c| c.as_secs_f64() * 1e6 / messages as f64),
        server_cpu_util: server_cpu.map(|c| c.as_secs_f64() / secs),
        client_cpu_util: outcome.window.client_cpu.as_secs_f64() / secs,
        other_cpu_util: server_cpu.map(|server| {
            let w = &outcome.window;
            (w.machine_busy.as_secs_f64() - server.as_secs_f64() - w.client_cpu.as_secs_f64())
                / secs
        }),
        errors: outcome.errors,
        first_error: outcome.first_error,
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
}

/// The measured window: its length and the CPU time spent in it.
#[derive(Debug, Clone, Copy)]
struct Window {
    window: Duration,
    server_cpu: Option<Duration>,
    client_cpu: Duration,
    /// All CPUs' busy time, see [`procfs::machine_busy`].
    machine_busy: Duration,
}

/// Readings taken as the window opens.
#[derive(Debug, Clone, Copy)]
struct WindowStart {
    at: Instant,
    server_cpu: Option<Duration>,
    client_cpu: Duration,
    machine_busy: Duration,
}

impl WindowStart {
    fn now(server_pid: Option<u32>) -> Result<Self> {
        Ok(Self {
            server_cpu: server_pid.map(procfs::process_cpu).transpose()?,
            client_cpu: procfs::self_cpu(),
            machine_busy: procfs::machine_busy()?,
            at: Instant::now(),
        })
    }

    fn end(self, server_pid: Option<u32>) -> Result<Window> {
        let window = self.at.elapsed();
        let client_cpu = procfs::self_cpu().saturating_sub(self.client_cpu);
        let machine_busy = procfs::machine_busy()?.saturating_sub(self.machine_busy);
        let server_cpu = match (server_pid, self.server_cpu) {
            (Some(pid), Some(before)) => Some(procfs::process_cpu(pid)?.saturating_sub(before)),
            _ => None,
        };
        Ok(Window {
            window,
            server_cpu,
            client_cpu,
            machine_busy,
        })
    }
}

/// Records a latency into a histogram of nanoseconds.
fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    histogram.saturating_record(ns);
}
