//! What a fan-out run measured: the report, built from the publishers' outcome and the
//! subscribers' results, its text, its check and its plots.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{
    echo::{spectrum, SpectrumPoint, BEHIND_TOLERANCE},
    plot,
    stats::{latency_histogram, record_buckets, LatencySummary},
    timeline,
    window::{CpuReport, Window},
};

use super::{
    config::FanoutConfig,
    message::expected_deliveries,
    publisher::{Plan, PublishOutcome},
    subscriber::SubscriberResult,
};

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
    /// The subscribers busy-polled their sockets ([`super::FanoutConfig::spin`]); their
    /// processes' CPU time then includes the spinning.
    #[serde(default)]
    pub spin: bool,
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
    /// Where the CPU time of the window went; the client's is that of all its processes.
    #[serde(flatten)]
    pub cpu: CpuReport,
    /// Subscriber connections that failed during the load.
    pub errors: u64,
    /// The first such failure.
    pub first_error: Option<String>,
    /// Subscribers still short of some message (neither received nor announced as dropped)
    /// when the load ended.
    pub incomplete_subs: u64,
    /// The subscribers' `epoll_wait` calls during the load, all processes: about one per
    /// burst of deliveries when they sleep, far more with `spin`.
    #[serde(default)]
    pub subscriber_polls: u64,
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
            "fanout {mode}{spin}: {subs} subs over {topics} topic(s) in {procs} proc(s), {size} B at \
             {target:.0} msgs/s (sent {achieved:.0}/s{behind}), {win:.2} s: {dps:.0} \
             deliveries/s | received {received} of {expected} expected ({missing} missing, \
             {in_flight} of them in flight at the end; {dropped} dropped in {notices} notices) \
             | latency us p50 {p50:.1} p90 {p90:.1} p99 {p99:.1} p99.9 {p999:.1} max {max:.1}",
            mode = self.mode,
            spin = if self.spin { " (spinning client)" } else { "" },
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
        line += &self
            .cpu
            .human(self.server_cpu_us_per_delivery, "delivery", 3);
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

/// Builds the report from the publishers' outcome and the subscribers' results.
pub(super) fn report(
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
        t.polls += p.polls;
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
    let w = Window {
        client_cpu: w.client_cpu + worker_cpu,
        ..*w
    };
    FanoutReport {
        mode: cfg.mode.to_string(),
        subs: cfg.subs,
        topics: cfg.topics,
        procs,
        publishers: cfg.publishers,
        spin: cfg.spin,
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
        cpu: w.cpu_report(),
        errors: t.errors,
        first_error: t.first_error,
        incomplete_subs: t.incomplete,
        subscriber_polls: t.polls,
        timeline_interval_ms: timeline::INTERVAL.as_millis() as u64,
        deliveries_timeline: timeline,
        latency_spectrum: spectrum(&latency),
    }
}
