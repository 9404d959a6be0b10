//! The progress bar loadgen draws on stderr while a run goes on.
//!
//! Owns when a bar is shown: only when asked for (the CLI's default, off with `--quiet`), only
//! when stderr is a terminal, and only once the run has lasted [`SHOW_AFTER`], so short runs and
//! scripts (`--json` on stdout, stderr to a file or pipe) see nothing. It never writes to
//! stdout, and it is cleared when the run ends.
//!
//! Cheap to call from a hot loop: [`Progress::update`] returns at once unless [`REDRAW`] has
//! passed since the last redraw, and the caller passes the current instant.

use std::{
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How long a run goes on before its bar appears.
pub const SHOW_AFTER: Duration = Duration::from_secs(1);

/// The least time between two redraws.
pub const REDRAW: Duration = Duration::from_millis(100);

/// A progress bar that may never be drawn; see the module docs.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    born: Instant,
    shown: bool,
    last: Instant,
}

impl Progress {
    /// A bar that draws nothing.
    pub fn hidden() -> Self {
        let now = Instant::now();
        Self {
            bar: None,
            born: now,
            shown: false,
            last: now,
        }
    }

    /// A bar counting up to `len` (any unit: milliseconds, connections), labelled `label`.
    /// Hidden when `enabled` is false or stderr is not a terminal.
    pub fn new(enabled: bool, label: &str, len: u64) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Self::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {msg}")
            .expect("the template is a constant that parses");
        bar.set_style(style);
        bar.set_prefix(label.to_owned());
        let now = Instant::now();
        Self {
            bar: Some(bar),
            born: now,
            shown: false,
            last: now,
        }
    }

    /// A bar over a run of `total` time, updated with [`Progress::update_time`].
    pub fn for_duration(enabled: bool, label: &str, total: Duration) -> Self {
        let ms = u64::try_from(total.as_millis()).unwrap_or(u64::MAX).max(1);
        Self::new(enabled, label, ms)
    }

    /// Whether an update at `now` would redraw; callers with a costly message check this first.
    pub fn due(&self, now: Instant) -> bool {
        self.bar.is_some() && now.saturating_duration_since(self.last) >= REDRAW
    }

    /// Moves the bar to `pos` with the message `msg()` (built only when a redraw is due).
    pub fn update(&mut self, now: Instant, pos: u64, msg: impl FnOnce() -> String) {
        if !self.due(now) {
            return;
        }
        let Some(bar) = &self.bar else { return };
        self.last = now;
        if !self.shown {
            if now.saturating_duration_since(self.born) < SHOW_AFTER {
                return;
            }
            bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(10));
            self.shown = true;
        }
        bar.set_position(pos);
        bar.set_message(msg());
    }

    /// [`Progress::update`] for a bar made by [`Progress::for_duration`]: `elapsed` of the run.
    pub fn update_time(&mut self, now: Instant, elapsed: Duration, msg: impl FnOnce() -> String) {
        let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        self.update(now, ms, msg);
    }

    /// Clears the bar from the terminal.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disabled_bar_is_never_due() {
        let p = Progress::new(false, "x", 10);
        assert!(!p.due(Instant::now() + Duration::from_secs(5)));
    }

    #[test]
    fn updates_on_a_hidden_bar_do_nothing() {
        let mut p = Progress::hidden();
        p.update(Instant::now(), 3, || {
            unreachable!("no message is built for a hidden bar")
        });
        p.finish();
    }
}
