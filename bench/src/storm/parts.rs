//! A storm's parts: splitting the slots over processes, running them here or in workers
//! (with the lines they exchange), and preparing and running one part.

use std::{
    io::{self, BufRead as _, Write as _},
    net::Shutdown,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    idle::{self, WorkerConfig},
    net::Target,
    progress::Progress,
    workers::{slices, Children},
};

use super::{
    config::{PartConfig, PartKind, StormConfig},
    engine::Engine,
    report::PartResult,
};

/// How often a worker reports progress to its parent.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);
/// A running tally for progress.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Tally {
    pub(super) upgrades: u64,
    pub(super) back: usize,
    pub(super) failed: u64,
}

/// The part configs for `procs` processes.
fn part_configs(cfg: &StormConfig, kind: PartKind, procs: usize) -> Vec<PartConfig> {
    let url = format!(
        "{}://{}{}",
        if cfg.raw { "tcp" } else { "ws" },
        cfg.target.host,
        cfg.target.path
    );
    slices(cfg.conns, procs)
        .map(|range| PartConfig {
            url: url.clone(),
            kind,
            first_index: range.start,
            count: range.len(),
            sources: cfg.sources,
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
pub(super) fn run_parts(
    cfg: &StormConfig,
    kind: PartKind,
    procs: usize,
) -> Result<Vec<PartResult>> {
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

    let mut children = Children::spawn_parts("storm-worker", &parts)?;
    let ready_deadline = Instant::now() + cfg.open_timeout + Duration::from_secs(10);
    children.collect_all(
        "ready",
        ready_deadline,
        |_, _| {},
        "storm workers were ready by the deadline",
    )?;
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
            sources: part.sources,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        stats::{buckets, latency_histogram},
        storm::report::mass_report,
    };

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
