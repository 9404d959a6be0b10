//! The subscriber parts seen from the parent (a thread of this process or worker
//! processes), and the line protocol between them.

use std::{
    io::{self, BufRead as _, Write as _},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::workers::Children;

use super::subscriber::{run_part, SubscriberPart, SubscriberResult};

/// From the parent to a subscriber part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    /// The start, in `CLOCK_MONOTONIC` nanoseconds, and the messages the schedule holds.
    Go { t0_ns: u64, total: u64 },
    /// The publishers are done, having sent messages `0..sent`.
    End { sent: u64 },
}

impl Command {
    pub(super) fn line(self) -> String {
        match self {
            Self::Go { t0_ns, total } => format!("go {t0_ns} {total}"),
            Self::End { sent } => format!("end {sent}"),
        }
    }

    pub(super) fn parse(line: &str) -> Option<Self> {
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
pub(super) enum Signal {
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
pub(super) enum Fleet {
    Local {
        commands: mpsc::Sender<Command>,
        signals: mpsc::Receiver<LocalSignal>,
    },
    Workers(Children),
}

/// What the local part's thread sends.
pub(super) enum LocalSignal {
    Signal(Signal),
    Done(Result<SubscriberResult>),
}

impl Fleet {
    pub(super) fn start(parts: &[SubscriberPart]) -> Result<Self> {
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
        Ok(Self::Workers(Children::spawn_parts(
            "fanout-worker",
            parts,
        )?))
    }

    /// Waits until every part is subscribed; returns how many subscribers are.
    pub(super) fn ready(&mut self, deadline: Instant) -> Result<usize> {
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
    pub(super) fn started(&mut self, deadline: Instant) -> Result<()> {
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
    pub(super) fn tell(&mut self, command: &Command) {
        match self {
            Self::Local { commands, .. } => {
                let _ = commands.send(*command);
            }
            Self::Workers(children) => children.tell_all(&command.line()),
        }
    }

    /// Waits for every part's result.
    pub(super) fn results(self, deadline: Instant) -> Result<Vec<SubscriberResult>> {
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
    children.collect_all(
        prefix,
        deadline,
        |_, _| {},
        &format!("fanout workers were {what} (see their errors above)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
