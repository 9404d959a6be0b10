//! Child processes that each run a slice of a load: this binary re-executed with a hidden
//! worker subcommand, talking over lines of text (the parent writes to each child's stdin; the
//! child answers on its stdout).
//!
//! Owns starting, listening to and stopping the children; what the lines say belongs to the
//! load ([`crate::idle`], [`crate::storm`]). One process holds at most about 19,000 sockets
//! (the open-files limit is 20,000 and cannot be raised), which is why larger loads split.
//! Every wait has a deadline, and children still running when a [`Children`] is dropped are
//! killed by pid.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    ops::Range,
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::Serialize;

/// Running children and the lines they print.
#[derive(Debug)]
pub(crate) struct Children {
    children: Vec<Child>,
    stdins: Vec<Option<ChildStdin>>,
    /// `(child, Some(line))` for each line, `(child, None)` once its stdout ends.
    lines: mpsc::Receiver<(usize, Option<String>)>,
    /// Children whose stdout has ended.
    ended: Vec<bool>,
}

impl Children {
    /// Starts `exe` once per argument list, stdin and stdout piped, stderr inherited.
    ///
    /// # Errors
    /// A child cannot be started (those already started are killed).
    pub(crate) fn spawn(exe: &Path, arg_lists: &[Vec<String>]) -> Result<Self> {
        let (tx, lines) = mpsc::channel();
        let mut this = Self {
            children: Vec::with_capacity(arg_lists.len()),
            stdins: Vec::with_capacity(arg_lists.len()),
            lines,
            ended: vec![false; arg_lists.len()],
        };
        for args in arg_lists {
            let mut child = match Command::new(exe)
                .args(args)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
            {
                Ok(c) => c,
                Err(e) => {
                    this.kill_all();
                    return Err(e).context("starting a worker process");
                }
            };
            let stdout = child.stdout.take().expect("stdout was piped");
            this.stdins.push(child.stdin.take());
            this.children.push(child);
            let index = this.children.len() - 1;
            let tx = tx.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send((index, Some(line))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((index, None));
            });
        }
        Ok(this)
    }

    /// Starts this executable once per part, as `SUBCOMMAND --config JSON` (the hidden
    /// worker subcommands of `loadgen`), see [`Children::spawn`].
    ///
    /// # Errors
    /// This executable cannot be found, a part does not serialize, or a child cannot be
    /// started.
    pub(crate) fn spawn_parts(subcommand: &str, parts: &[impl Serialize]) -> Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let arg_lists = parts
            .iter()
            .map(|p| {
                Ok(vec![
                    subcommand.to_owned(),
                    "--config".to_owned(),
                    serde_json::to_string(p)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        Self::spawn(&exe, &arg_lists)
    }

    /// How many children there are.
    pub(crate) fn len(&self) -> usize {
        self.children.len()
    }

    /// Waits until each child has printed a line starting with `prefix`, or has exited, or
    /// `deadline` passes. Returns, per child, the rest of its first such line (`None` for a
    /// child that exited or missed the deadline). Other lines go to `other(child, line)`.
    pub(crate) fn collect(
        &mut self,
        prefix: &str,
        deadline: Instant,
        mut other: impl FnMut(usize, &str),
    ) -> Vec<Option<String>> {
        let mut found: Vec<Option<String>> = vec![None; self.children.len()];
        loop {
            let waiting = (0..found.len()).any(|i| found[i].is_none() && !self.ended[i]);
            if !waiting {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((i, Some(line))) => match line.strip_prefix(prefix) {
                    Some(rest) if found[i].is_none() => found[i] = Some(rest.to_owned()),
                    _ => other(i, &line),
                },
                Ok((i, None)) => self.ended[i] = true,
                Err(_) => break,
            }
        }
        found
    }

    /// [`Children::collect`] where every child must answer: the rest of each child's line, or,
    /// when some did not, kills them all and fails with `GOT of N {what}`.
    ///
    /// # Errors
    /// A child exited or missed the deadline without the line.
    pub(crate) fn collect_all(
        &mut self,
        prefix: &str,
        deadline: Instant,
        other: impl FnMut(usize, &str),
        what: &str,
    ) -> Result<Vec<String>> {
        let lines = self.collect(prefix, deadline, other);
        let got = lines.iter().flatten().count();
        if got < self.len() {
            self.kill_all();
            bail!("{got} of {} {what}", self.len());
        }
        Ok(lines.into_iter().flatten().collect())
    }

    /// Writes `line` to every child's stdin (best effort: a child that exited is skipped).
    pub(crate) fn tell_all(&mut self, line: &str) {
        for stdin in self.stdins.iter_mut().flatten() {
            let _ = writeln!(stdin, "{line}");
            let _ = stdin.flush();
        }
    }

    /// Closes every child's stdin, waits up to `within` for all to exit, and kills the rest.
    pub(crate) fn finish(&mut self, within: Duration) {
        self.stdins.clear();
        let deadline = Instant::now() + within;
        for child in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill_all();
    }

    /// Kills (by pid) and reaps every child still running.
    pub(crate) fn kill_all(&mut self) {
        for child in &mut self.children {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `0..total` cut into `parts` slices of equal length (the last may be shorter), leaving out
/// empty ones.
pub(crate) fn slices(total: usize, parts: usize) -> impl Iterator<Item = Range<usize>> {
    let per = total.div_ceil(parts.max(1));
    (0..parts)
        .map(move |w| (w * per).min(total)..((w + 1) * per).min(total))
        .filter(|r| !r.is_empty())
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_collected_per_child_and_others_passed_on() {
        let sh = Path::new("/bin/sh");
        let script = |s: &str| vec!["-c".to_owned(), s.to_owned()];
        let mut kids = Children::spawn(
            sh,
            &[
                script("echo progress 1; echo ready 5 0; read x; echo got $x"),
                script("echo ready 7 1; read x; echo got $x"),
            ],
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut others = Vec::new();
        let ready = kids.collect("ready ", deadline, |i, l| others.push((i, l.to_owned())));
        assert_eq!(ready, vec![Some("5 0".to_owned()), Some("7 1".to_owned())]);
        assert_eq!(others, vec![(0, "progress 1".to_owned())]);
        kids.tell_all("go");
        let got = kids.collect("got ", deadline, |_, _| {});
        assert_eq!(got, vec![Some("go".to_owned()), Some("go".to_owned())]);
        kids.finish(Duration::from_secs(5));
    }

    #[test]
    fn a_child_that_exits_early_is_not_waited_for() {
        let mut kids = Children::spawn(
            Path::new("/bin/sh"),
            &[vec!["-c".to_owned(), "exit 3".to_owned()]],
        )
        .unwrap();
        let started = Instant::now();
        let ready = kids.collect("ready ", started + Duration::from_secs(30), |_, _| {});
        assert_eq!(ready, vec![None]);
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
