//! SVG plots of reports: the latency spectrum and throughput over time.
//!
//! Owns drawing only; the data come from the reports ([`EchoReport::latency_spectrum`],
//! [`EchoReport::throughput`]), so a report read back from JSON plots the same. Output is SVG
//! through plotters' SVG backend with its built-in approximate text metrics: no system fonts,
//! no font libraries, nothing to install. It never runs load.
//!
//! - The latency spectrum follows HdrHistogram's plots: the x axis is the percentile on a log
//!   scale of `1 / (1 - p)`, so 90%, 99%, 99.9% ... are evenly spaced and the tail is visible;
//!   the last point of each line is the maximum.
//! - Throughput over time: round trips (or upgrades) per interval, one point per interval,
//!   with the target as a dashed line for a fixed-rate run. A last, partial interval is not
//!   drawn.
//!
//! Several reports can share a plot (one line each, e.g. one per server in a comparison):
//! [`echo_series`].

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use crate::{
    echo::{EchoReport, SpectrumPoint},
    storm::StormReport,
};

/// Plot size in pixels.
const SIZE: (u32, u32) = (960, 540);

/// How far right of the last percentile the maximum is drawn, in decades of `1 / (1 - p)`.
const MAX_OFFSET: f64 = 0.3;

/// Writes `DIR/echo-latency.svg` and `DIR/echo-throughput.svg` for one echo report; returns
/// the paths written.
///
/// # Errors
/// The directory or a file cannot be written.
pub fn echo(report: &EchoReport, dir: &Path) -> Result<Vec<PathBuf>> {
    echo_series(&[("", report)], dir, "echo")
}

/// Writes `DIR/PREFIX-latency.svg` and `DIR/PREFIX-throughput.svg` with one line per
/// `(name, report)`; returns the paths written. For a comparison: pass one report per server
/// (e.g. its median round) and the names become the legend.
///
/// # Errors
/// The directory or a file cannot be written.
pub fn echo_series(
    series: &[(&str, &EchoReport)],
    dir: &Path,
    prefix: &str,
) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let Some((_, first)) = series.first() else {
        return Ok(Vec::new());
    };
    let what = format!(
        "echo {}, {} conns x {} B{}",
        first.mode,
        first.conns,
        first.size_bytes,
        first
            .target_rate
            .map_or_else(String::new, |r| format!(", {r:.0} msgs/s fixed rate"))
    );

    let latency_path = dir.join(format!("{prefix}-latency.svg"));
    let lines: Vec<(&str, &[SpectrumPoint])> = series
        .iter()
        .map(|(name, r)| (*name, r.latency_spectrum.as_slice()))
        .collect();
    let title = if first.target_rate.is_some() {
        format!("Latency by percentile (from due time): {what}")
    } else {
        format!("Latency by percentile: {what}")
    };
    spectrum_svg(&latency_path, &title, "latency (us)", 1.0, &lines)?;

    let throughput_path = dir.join(format!("{prefix}-throughput.svg"));
    let interval_ms = first.throughput_interval_ms.max(1);
    let counts: Vec<(&str, &[u64])> = series
        .iter()
        .map(|(name, r)| (*name, full_intervals(r)))
        .collect();
    let target = first
        .target_rate
        .map(|rate| rate * interval_ms as f64 / 1000.0);
    timeline_svg(
        &throughput_path,
        &format!("Round trips per {interval_ms} ms: {what}"),
        &format!("round trips per {interval_ms} ms"),
        interval_ms,
        &counts,
        target,
    )?;
    Ok(vec![latency_path, throughput_path])
}

/// Writes the storm plots into `dir`: `storm-churn-upgrades.svg` (upgrades per interval),
/// `storm-mass-upgrades.svg` (reconnections per interval from the mass close) and
/// `storm-mass-reconnect.svg` (the spectrum of reconnect times), for the scenarios that ran;
/// returns the paths written.
///
/// # Errors
/// The directory or a file cannot be written.
pub fn storm(report: &StormReport, dir: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    if let Some(c) = &report.churn {
        let path = dir.join("storm-churn-upgrades.svg");
        timeline_svg(
            &path,
            &format!(
                "Churn: upgrades per {} ms, {} slots, hold {:.0} ms",
                c.interval_ms, report.conns, c.hold_ms
            ),
            &format!("upgrades per {} ms", c.interval_ms),
            c.interval_ms.max(1),
            &[("", &c.timeline)],
            None,
        )?;
        written.push(path);
    }
    if let Some(m) = &report.mass {
        let path = dir.join("storm-mass-upgrades.svg");
        timeline_svg(
            &path,
            &format!(
                "Mass reconnect: reconnections per {} ms, {} connections",
                m.interval_ms, m.opened
            ),
            &format!("reconnections per {} ms", m.interval_ms),
            m.interval_ms.max(1),
            &[("", &m.timeline)],
            None,
        )?;
        written.push(path);
        let path = dir.join("storm-mass-reconnect.svg");
        spectrum_svg(
            &path,
            &format!(
                "Mass reconnect: time to reconnect by percentile, {} connections",
                m.opened
            ),
            "reconnect time (ms)",
            1000.0,
            &[("", &m.reconnect_spectrum)],
        )?;
        written.push(path);
    }
    Ok(written)
}

/// The throughput counts of whole intervals: the window ends a little after its nominal
/// length, and the sliver of an interval after the last whole one would plot as a false drop.
fn full_intervals(r: &EchoReport) -> &[u64] {
    let interval_secs = r.throughput_interval_ms.max(1) as f64 / 1000.0;
    let whole = (r.window_secs / interval_secs + 1e-9).floor() as usize;
    &r.throughput[..r.throughput.len().min(whole.max(1))]
}

/// Where percentile `p` (0 to 100) sits on the log axis: `log10(1 / (1 - p / 100))`.
fn percentile_x(p: f64) -> f64 {
    let rest = (1.0 - p / 100.0).max(1e-12);
    -rest.log10()
}

/// The label of axis position `x`: the inverse of [`percentile_x`], as few decimals as needed
/// (0%, 90%, 99%, 99.9% ...).
fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let decimals = if x <= 2.0 {
        0
    } else {
        (x - 2.0).ceil() as usize
    };
    format!("{p:.decimals$}%")
}

/// An axis number with as many decimals as the axis' range needs.
fn axis_number(v: f64, max: f64) -> String {
    if max >= 100.0 {
        format!("{v:.0}")
    } else if max >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// The points of one spectrum on the log axis; the maximum (percentile 100) goes
/// [`MAX_OFFSET`] right of the point before it.
fn spectrum_points(points: &[SpectrumPoint]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(points.len());
    for p in points {
        let x = if p.percentile >= 100.0 {
            out.last().map_or(0.0, |(x, _)| x + MAX_OFFSET)
        } else {
            percentile_x(p.percentile)
        };
        out.push((x, p.latency_us));
    }
    out
}

/// Draws latency spectra, one line per `(name, points)`, into the SVG file `path`; the y axis
/// shows each latency divided by `divisor` (1 for microseconds, 1000 for milliseconds).
///
/// # Errors
/// The file cannot be written.
pub fn spectrum_svg(
    path: &Path,
    title: &str,
    y_desc: &str,
    divisor: f64,
    lines: &[(&str, &[SpectrumPoint])],
) -> Result<()> {
    let lines: Vec<(&str, Vec<(f64, f64)>)> = lines
        .iter()
        .map(|(name, pts)| {
            let pts = spectrum_points(pts)
                .into_iter()
                .map(|(x, y)| (x, y / divisor))
                .collect();
            (*name, pts)
        })
        .collect();
    let x_max = lines
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|(x, _)| *x))
        .fold(1.0f64, f64::max)
        .ceil();
    let y_max = lines
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|(_, y)| *y))
        .fold(1.0f64, f64::max)
        * 1.05;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    draw(&root, |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .margin_right(48)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc(y_desc)
            .x_labels(x_max as usize + 1)
            .x_label_formatter(&|x| percentile_label(*x))
            .y_label_formatter(&|y| axis_number(*y, y_max))
            .draw()?;
        for (i, (name, pts)) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let series =
                chart.draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?;
            if !name.is_empty() {
                series
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
            }
        }
        if lines.iter().any(|(name, _)| !name.is_empty()) {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        Ok(())
    })
    .with_context(|| format!("drawing {}", path.display()))
}

/// Draws counts per interval over time, one line per `(name, counts)`, with an optional
/// dashed `target` level, into the SVG file `path`.
///
/// # Errors
/// The file cannot be written.
pub fn timeline_svg(
    path: &Path,
    title: &str,
    y_desc: &str,
    interval_ms: u64,
    lines: &[(&str, &[u64])],
    target: Option<f64>,
) -> Result<()> {
    let step = interval_ms as f64 / 1000.0;
    let x_max = lines
        .iter()
        .map(|(_, c)| c.len() as f64 * step)
        .fold(step, f64::max);
    let y_max = lines
        .iter()
        .flat_map(|(_, c)| c.iter().map(|v| *v as f64))
        .chain(target)
        .fold(1.0f64, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    draw(&root, |root| {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .margin_right(48)
            .x_label_area_size(40)
            .y_label_area_size(80)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds into the window")
            .y_desc(y_desc)
            .y_label_formatter(&|y| axis_number(*y, y_max))
            .draw()?;
        for (i, (name, counts)) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            // Each count is drawn at the middle of its interval.
            let pts = counts
                .iter()
                .enumerate()
                .map(|(j, v)| ((j as f64 + 0.5) * step, *v as f64));
            let series = chart.draw_series(LineSeries::new(pts, color.stroke_width(2)))?;
            if !name.is_empty() {
                series
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color));
            }
        }
        if let Some(level) = target {
            chart
                .draw_series(DashedLineSeries::new(
                    [(0.0, level), (x_max, level)],
                    8,
                    6,
                    BLACK.stroke_width(1),
                ))?
                .label("target")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
        }
        if target.is_some() || lines.iter().any(|(name, _)| !name.is_empty()) {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        Ok(())
    })
    .with_context(|| format!("drawing {}", path.display()))
}

/// Runs `f` on the drawing area and writes the file, turning plotters' error (generic over
/// the backend) into a plain message.
fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    f: impl FnOnce(
        &DrawingArea<DB, plotters::coord::Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    f(root).map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_evenly_spaced_by_nines() {
        assert!((percentile_x(0.0) - 0.0).abs() < 1e-9);
        assert!((percentile_x(90.0) - 1.0).abs() < 1e-9);
        assert!((percentile_x(99.0) - 2.0).abs() < 1e-9);
        assert!((percentile_x(99.9) - 3.0).abs() < 1e-6);
    }

    #[test]
    fn axis_labels_show_the_nines() {
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(percentile_label(5.0), "99.999%");
    }

    #[test]
    fn the_maximum_is_drawn_past_the_last_percentile() {
        let pts = spectrum_points(&[
            SpectrumPoint {
                percentile: 0.0,
                latency_us: 1.0,
            },
            SpectrumPoint {
                percentile: 99.0,
                latency_us: 5.0,
            },
            SpectrumPoint {
                percentile: 100.0,
                latency_us: 9.0,
            },
        ]);
        assert_eq!(pts.len(), 3);
        assert!((pts[2].0 - (2.0 + MAX_OFFSET)).abs() < 1e-9);
        assert_eq!(pts[2].1, 9.0);
    }

    #[test]
    fn a_partial_last_interval_is_not_drawn() {
        let old = r#"{"mode":"ws","driver":"epoll","conns":1,"size_bytes":1,
            "window_secs":1.0004,"messages":0,"msgs_per_sec":0,
            "latency":{"p50_us":0,"p90_us":0,"p99_us":0,"p999_us":0,"max_us":0,"mean_us":0},
            "server_cpu_us_per_msg":null,"server_cpu_util":null,"client_cpu_util":0,
            "other_cpu_util":null,"errors":0,"first_error":null}"#;
        // A report from before the throughput samples existed still reads, without them.
        let report: EchoReport = serde_json::from_str(old).unwrap();
        assert!(report.throughput.is_empty() && report.target_rate.is_none());
        let new = old.replace(
            "null}",
            r#"null,"throughput_interval_ms":100,"throughput":[5,5,5,5,5,5,5,5,5,5,1]}"#,
        );
        let report: EchoReport = serde_json::from_str(&new).unwrap();
        assert_eq!(report.throughput.len(), 11);
        assert_eq!(full_intervals(&report).len(), 10);
    }

    #[test]
    fn svg_files_are_written_without_system_fonts() {
        let dir = std::env::temp_dir().join(format!("ringcast-plot-test-{}", std::process::id()));
        let path = dir.join("t.svg");
        fs::create_dir_all(&dir).unwrap();
        spectrum_svg(
            &path,
            "t",
            "latency (us)",
            1.0,
            &[(
                "a",
                &[
                    SpectrumPoint {
                        percentile: 50.0,
                        latency_us: 10.0,
                    },
                    SpectrumPoint {
                        percentile: 100.0,
                        latency_us: 20.0,
                    },
                ],
            )],
        )
        .unwrap();
        let svg = fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("90%"), "the percentile axis is labelled");
        timeline_svg(&path, "t", "n", 100, &[("", &[1, 2, 3])], Some(2.0)).unwrap();
        assert!(fs::read_to_string(&path).unwrap().contains("<polyline"));
        fs::remove_dir_all(&dir).unwrap();
    }
}
