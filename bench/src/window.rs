//! The measured window of a load: how long it lasted and the CPU time the server, this client
//! and everything else spent in it.
//!
//! Owns only the readings at the window's two ends ([`procfs`]); what counts as one unit of
//! work (a round trip, a delivery) and the division by it belong to each load. Shared by the
//! loads that report CPU per unit of work (echo, broadcast, fanout), which report it as a
//! [`CpuReport`].

use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::procfs;

/// Readings taken as the window opens.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WindowStart {
    /// When it opened.
    pub(crate) at: Instant,
    server_cpu: Option<Duration>,
    client_cpu: Duration,
    machine_busy: Duration,
}

/// A closed window: its length and the CPU time spent in it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// Wall-clock length.
    pub(crate) length: Duration,
    /// The server's CPU time (user plus system, all threads), if its pid was given.
    pub(crate) server_cpu: Option<Duration>,
    /// This process's CPU time.
    pub(crate) client_cpu: Duration,
    /// All CPUs' busy time, see [`procfs::machine_busy`].
    pub(crate) machine_busy: Duration,
}

impl WindowStart {
    /// Opens a window now, reading the server's CPU time if `server_pid` is given.
    pub(crate) fn now(server_pid: Option<u32>) -> Result<Self> {
        Ok(Self {
            server_cpu: server_pid.map(procfs::process_cpu).transpose()?,
            client_cpu: procfs::self_cpu(),
            machine_busy: procfs::machine_busy()?,
            at: Instant::now(),
        })
    }

    /// Closes the window now. `server_pid` must be the one it was opened with.
    pub(crate) fn end(self, server_pid: Option<u32>) -> Result<Window> {
        let length = self.at.elapsed();
        let client_cpu = procfs::self_cpu().saturating_sub(self.client_cpu);
        let machine_busy = procfs::machine_busy()?.saturating_sub(self.machine_busy);
        let server_cpu = match (server_pid, self.server_cpu) {
            (Some(pid), Some(before)) => Some(procfs::process_cpu(pid)?.saturating_sub(before)),
            _ => None,
        };
        Ok(Window {
            length,
            server_cpu,
            client_cpu,
            machine_busy,
        })
    }
}

impl Window {
    /// Server CPU microseconds per unit of work, when the server was measured and work was
    /// done.
    pub(crate) fn server_cpu_us_per(&self, units: u64) -> Option<f64> {
        self.server_cpu
            .filter(|_| units > 0)
            .map(|c| c.as_secs_f64() * 1e6 / units as f64)
    }

    /// The server's CPU time as a fraction of one core.
    pub(crate) fn server_util(&self) -> Option<f64> {
        self.server_cpu.map(|c| c.as_secs_f64() / self.secs())
    }

    /// This client's CPU time as a fraction of one core.
    pub(crate) fn client_util(&self) -> f64 {
        self.client_cpu.as_secs_f64() / self.secs()
    }

    /// CPU time, in cores, that neither the server nor this client used: other processes,
    /// interrupts and softirqs charged to neither, and hypervisor steal. Needs the server's
    /// pid. The machine's total comes from `/proc/stat`, which the kernel samples by tick,
    /// while the two processes' times are exact, so over a short window this can come out
    /// below zero; it is clamped at zero.
    pub(crate) fn other_util(&self) -> Option<f64> {
        self.server_cpu.map(|server| {
            ((self.machine_busy.as_secs_f64()
                - server.as_secs_f64()
                - self.client_cpu.as_secs_f64())
                / self.secs())
            .max(0.0)
        })
    }

    /// The length in seconds, never zero (so rates stay finite).
    pub(crate) fn secs(&self) -> f64 {
        self.length.as_secs_f64().max(1e-9)
    }

    /// The utilization figures of the window, for a report.
    pub(crate) fn cpu_report(&self) -> CpuReport {
        CpuReport {
            server_util: self.server_util(),
            client_util: self.client_util(),
            other_util: self.other_util(),
        }
    }
}

/// Where the CPU time of a measured window went, in cores (1.0 is one core busy for the whole
/// window). Every load that measures the server's CPU reports it, flattened into its report:
/// the JSON keys are `server_cpu_util`, `client_cpu_util` and `other_cpu_util`.
///
/// The server's CPU time per unit of work stays beside it in each report, under the name of
/// its unit (`server_cpu_us_per_msg`, `server_cpu_us_per_delivery`), and is passed to
/// [`CpuReport::human`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuReport {
    /// The server's CPU time over the window, as a fraction of one core (needs the server's
    /// pid).
    #[serde(rename = "server_cpu_util")]
    pub server_util: Option<f64>,
    /// This load generator's CPU time over the window (all its processes), as a fraction of
    /// one core. Near 1.0 for one process, the client may be the bottleneck.
    #[serde(rename = "client_cpu_util")]
    pub client_util: f64,
    /// CPU time over the window that neither the server nor the load generator used, in
    /// cores: other processes, interrupts and softirqs not charged to either, and hypervisor
    /// steal. A noisy neighbour shows up here (needs the server's pid). The machine's total is
    /// sampled by tick while the processes' times are exact, so it is clamped at zero.
    #[serde(rename = "other_cpu_util")]
    pub other_util: Option<f64>,
}

impl CpuReport {
    /// The report line's CPU part: ` | server cpu 1.25 us/msg (40% of a core) | client cpu
    /// 60% of a core | other 3%`, the server's part only with its per-unit figure
    /// (`per_unit`, in microseconds per `unit`, with `decimals` decimals) and the other part
    /// only when it was measured.
    pub fn human(&self, per_unit: Option<f64>, unit: &str, decimals: usize) -> String {
        let mut line = String::new();
        if let (Some(per), Some(util)) = (per_unit, self.server_util) {
            line += &format!(
                " | server cpu {per:.decimals$} us/{unit} ({:.0}% of a core)",
                util * 100.0
            );
        }
        line += &format!(" | client cpu {:.0}% of a core", self.client_util * 100.0);
        if let Some(other) = self.other_util {
            line += &format!(" | other {:.0}%", other * 100.0);
        }
        line
    }
}

/// Records a latency into a histogram of nanoseconds, clamping what does not fit.
pub(crate) fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    histogram.saturating_record(ns);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(secs: u64, server_ms: Option<u64>, client_ms: u64, busy_ms: u64) -> Window {
        Window {
            length: Duration::from_secs(secs),
            server_cpu: server_ms.map(Duration::from_millis),
            client_cpu: Duration::from_millis(client_ms),
            machine_busy: Duration::from_millis(busy_ms),
        }
    }

    #[test]
    fn per_unit_and_utilization_figures() {
        let w = window(2, Some(1000), 500, 1700);
        assert_eq!(w.server_cpu_us_per(1000), Some(1000.0));
        assert_eq!(w.server_cpu_us_per(0), None);
        assert_eq!(w.server_util(), Some(0.5));
        assert_eq!(w.client_util(), 0.25);
        let other = w.other_util().unwrap();
        assert!((other - 0.1).abs() < 1e-9, "{other}");
    }

    #[test]
    fn other_cpu_never_reads_below_zero() {
        let w = window(1, Some(600), 600, 1000);
        assert_eq!(w.other_util(), Some(0.0));
    }

    #[test]
    fn without_a_server_pid_there_are_no_server_figures() {
        let w = window(1, None, 100, 200);
        assert_eq!(w.server_cpu_us_per(10), None);
        assert_eq!(w.server_util(), None);
        assert_eq!(w.other_util(), None);
    }

    #[test]
    fn the_cpu_report_reads_as_one_line_and_keeps_its_json_keys() {
        let cpu = window(2, Some(1000), 500, 1700).cpu_report();
        assert_eq!(
            cpu.human(Some(1.5), "msg", 2),
            " | server cpu 1.50 us/msg (50% of a core) | client cpu 25% of a core | other 10%"
        );
        let no_server = window(1, None, 100, 200).cpu_report();
        assert_eq!(
            no_server.human(None, "delivery", 3),
            " | client cpu 10% of a core"
        );
        let json = serde_json::to_value(cpu).unwrap();
        assert_eq!(json["server_cpu_util"], 0.5);
        assert_eq!(json["client_cpu_util"], 0.25);
        assert!(json["other_cpu_util"].is_number());
    }

    #[test]
    fn a_window_reads_this_process() {
        let pid = std::process::id();
        let w = WindowStart::now(Some(pid)).unwrap().end(Some(pid)).unwrap();
        assert!(w.server_cpu.is_some());
    }
}
