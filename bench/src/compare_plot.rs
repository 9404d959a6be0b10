//! `loadgen plot-latency`: SVG plots of saved `loadgen compare --json` reports, one latency
//! plot and one throughput plot per scenario and load, every server (of every report) a line.
//!
//! For each server the round drawn is its median round by p99 latency (the middle one of the
//! rounds sorted by p99; the lower middle for an even count), so the plot shows a typical run
//! rather than the best or the worst. Echo and fan-out rounds carry a latency spectrum and a
//! timeline (round trips, deliveries per interval); broadcast rounds carry neither, so
//! broadcast is left out. Several reports can share the plots, each with a label (`spin`,
//! `default`): a line is then named `label: server`. That is how a latency-mode run is drawn
//! against a default run.
//!
//! Files are named `{scenario}-{load}-latency.svg` and `{scenario}-{load}-throughput.svg`
//! (`echo-100x20-latency.svg`, `fanout-10x64@1000-throughput.svg`). Drawing is
//! [`crate::plot`]'s.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::{
    echo::{EchoReport, SpectrumPoint},
    fanout::FanoutReport,
    plot,
};

/// A compare report read back, with the label its lines get (empty: just the server name).
#[derive(Debug, Clone)]
pub struct LabeledReport {
    /// Prefix of each line's name, or empty.
    pub label: String,
    /// The JSON of `loadgen compare --json`.
    pub report: Value,
}

impl LabeledReport {
    /// Reads `LABEL=PATH` or `PATH` (no label).
    ///
    /// # Errors
    /// The file cannot be read or is not JSON.
    pub fn read(arg: &str) -> Result<Self> {
        let (label, path) = match arg.split_once('=') {
            Some((label, path)) if !Path::new(arg).exists() => (label, path),
            _ => ("", arg),
        };
        let text = fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        let report = serde_json::from_str(&text)
            .with_context(|| format!("{path}: not the JSON of loadgen compare --json"))?;
        Ok(Self {
            label: label.to_owned(),
            report,
        })
    }
}

/// One line of a plot: its name, spectrum and timeline.
struct Line {
    name: String,
    spectrum: Vec<SpectrumPoint>,
    timeline: Vec<u64>,
    interval_ms: u64,
    /// What the timeline should reach per interval (fan-out: rate x subscribers), if known.
    target: Option<f64>,
}

/// Draws every echo and fan-out load of `reports` into `dir`; returns the paths written.
///
/// # Errors
/// A report is not a compare report, holds no echo or fan-out round, or a file cannot be
/// written.
pub fn plot_compare(reports: &[LabeledReport], dir: &Path) -> Result<Vec<PathBuf>> {
    // (scenario, load) -> lines, in the order met.
    let mut plots: BTreeMap<(String, String), (Vec<Line>, String)> = BTreeMap::new();
    for r in reports {
        let scenarios = r.report["scenarios"]
            .as_array()
            .context("not a compare report: no \"scenarios\"")?;
        for s in scenarios {
            let scenario = s["scenario"].as_str().unwrap_or_default().to_owned();
            let load = load_name(&s["load"]);
            let title = title(&scenario, &s["load"], s["spin"].as_bool().unwrap_or(false));
            for server in s["servers"].as_array().into_iter().flatten() {
                let name = server["name"].as_str().unwrap_or("?");
                let name = if r.label.is_empty() {
                    name.to_owned()
                } else {
                    format!("{}: {name}", r.label)
                };
                let rounds = server["rounds"].as_array().cloned().unwrap_or_default();
                let line = match scenario.as_str() {
                    "echo" => {
                        median_round::<EchoReport>(&rounds, |e| e.latency.p99_us)?.map(|e| Line {
                            name,
                            spectrum: e.latency_spectrum,
                            timeline: full(&e.throughput, e.window_secs, e.throughput_interval_ms),
                            interval_ms: e.throughput_interval_ms,
                            target: None,
                        })
                    }
                    "fanout" => {
                        median_round::<FanoutReport>(&rounds, |f| f.latency.p99_us)?.map(|f| Line {
                            name,
                            spectrum: f.latency_spectrum,
                            timeline: full(
                                &f.deliveries_timeline,
                                f.window_secs,
                                f.timeline_interval_ms,
                            ),
                            interval_ms: f.timeline_interval_ms,
                            target: Some(
                                f.target_rate * f.subs as f64 / f.topics.max(1) as f64
                                    * f.timeline_interval_ms as f64
                                    / 1000.0,
                            ),
                        })
                    }
                    _ => None,
                };
                if let Some(line) = line {
                    plots
                        .entry((scenario.clone(), load.clone()))
                        .or_insert_with(|| (Vec::new(), title.clone()))
                        .0
                        .push(line);
                }
            }
        }
    }
    if plots.is_empty() {
        bail!("no echo or fan-out round with figures in the reports: nothing to plot");
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for ((scenario, load), (lines, title)) in &plots {
        let latency = dir.join(format!("{scenario}-{load}-latency.svg"));
        let spectra: Vec<(&str, &[SpectrumPoint])> = lines
            .iter()
            .map(|l| (l.name.as_str(), l.spectrum.as_slice()))
            .collect();
        let what = if scenario == "fanout" {
            "Publish-to-receive latency (from due time)"
        } else {
            "Round-trip latency"
        };
        plot::spectrum_svg(
            &latency,
            &format!("{what}: {title}"),
            "latency (us)",
            1.0,
            &spectra,
        )?;
        written.push(latency);

        let interval_ms = lines.first().map_or(100, |l| l.interval_ms.max(1));
        let throughput = dir.join(format!("{scenario}-{load}-throughput.svg"));
        let counts: Vec<(&str, &[u64])> = lines
            .iter()
            .map(|l| (l.name.as_str(), l.timeline.as_slice()))
            .collect();
        let unit = if scenario == "fanout" {
            "deliveries"
        } else {
            "round trips"
        };
        plot::timeline_svg(
            &throughput,
            &format!("{unit} per {interval_ms} ms: {title}"),
            &format!("{unit} per {interval_ms} ms"),
            interval_ms,
            &counts,
            lines.iter().find_map(|l| l.target),
        )?;
        written.push(throughput);
    }
    Ok(written)
}

/// The round with the median `key` (the lower middle for an even count), parsed as `T`;
/// `None` when there are no rounds.
fn median_round<T: DeserializeOwned>(rounds: &[Value], key: fn(&T) -> f64) -> Result<Option<T>> {
    let mut parsed = rounds
        .iter()
        .map(|r| serde_json::from_value::<T>(r.clone()))
        .collect::<Result<Vec<T>, _>>()
        .context("a round of the report does not parse")?;
    parsed.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = parsed.len().saturating_sub(1) / 2;
    Ok((!parsed.is_empty()).then(|| parsed.swap_remove(mid)))
}

/// The full intervals of a timeline (the last, partial one left out).
fn full(counts: &[u64], window_secs: f64, interval_ms: u64) -> Vec<u64> {
    let n = ((window_secs * 1000.0) as u64 / interval_ms.max(1)) as usize;
    counts[..n.min(counts.len())].to_vec()
}

/// `100x20`, `10x64@1000`: the load as compare writes it.
fn load_name(load: &Value) -> String {
    let conns = load["conns"].as_u64().unwrap_or(0);
    let size = load["size_bytes"].as_u64().unwrap_or(0);
    match load["rate_per_sec"].as_u64() {
        Some(rate) => format!("{conns}x{size}@{rate}"),
        None => format!("{conns}x{size}"),
    }
}

fn title(scenario: &str, load: &Value, spin: bool) -> String {
    let conns = load["conns"].as_u64().unwrap_or(0);
    let size = load["size_bytes"].as_u64().unwrap_or(0);
    match (scenario, load["rate_per_sec"].as_u64()) {
        ("fanout", rate) => format!(
            "fan-out, {conns} subscribers x {size} B at {} msg/s{}",
            rate.unwrap_or(0),
            if spin { ", spinning client" } else { "" }
        ),
        _ => format!("{scenario}, {conns} conns x {size} B"),
    }
}
