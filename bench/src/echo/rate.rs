//! The fixed-rate (open) loop, wrk2 style: messages go out on a schedule that does not wait for
//! echoes, and each latency is measured from when its message was *meant* to be sent.
//!
//! The schedule: `R` messages per second in total, message `m` (counting from 0 across all
//! connections) due `m / R` seconds after the start, on connection `m % conns`. Each connection
//! therefore sends every `conns / R` seconds, the connections evenly staggered. Connections
//! pipeline: a message goes out when due whether or not earlier echoes are back, so a slow echo
//! does not hold back the next send (no coordinated omission). Echoes come back in order on a
//! connection, so echo `k` answers message `k`, whose due time is known from the schedule.
//!
//! When the client or the server falls behind (the loop wakes late, or a socket is full), the
//! late messages go out as soon as possible, still timed from their due time: the lateness is
//! part of the latency. A connection behind its schedule queues at most
//! 64 KiB beyond its socket buffer.
//!
//! What is measured: messages due inside the window (due time in `[warmup, warmup + duration)`).
//! After the window no new message becomes due; the loop keeps sending the window's late
//! messages and reading echoes until every one is back or [`DRAIN_TIMEOUT`] passes. A message
//! still unanswered then is recorded at the latency it had reached (a lower bound) and counted in
//! the report's `unanswered`. The achieved rate counts the messages actually sent while the window
//! was open, and the send lag (when each measured message was queued, after its due time) shows
//! how much of the latency is the client's own lateness or a full socket.
//!
//! Timing: `epoll_wait` has millisecond resolution, so the next due time is kept in a `timerfd`
//! (nanoseconds), re-armed only when it changes, and this thread's timer slack is set to 1 ns.
//! Only the epoll driver has this loop: monoio's timer wheel ticks in milliseconds.

use std::{
    io,
    ops::Range,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use hdrhistogram::Histogram;
use mio::{unix::SourceFd, Events, Interest, Token};

use super::{
    epoll::{self, Conn, Errors, MAX_WAIT},
    EchoConfig, Outcome,
};
use crate::{
    progress::Progress,
    stats::latency_histogram,
    timeline::{self, Timeline},
    window::{record, Window, WindowStart},
};

/// How long the loop waits, after the window, for the echoes of messages due inside it.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// The timer's token; connections use their index.
const TIMER: Token = Token(usize::MAX);

/// Bytes one `read` may return; the buffer is shared by all connections.
const READ_BYTES: usize = 64 << 10;

/// When message `m` is due: `m / rate` seconds from the start. The fan-out load follows the
/// same schedule.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    /// Nanoseconds between two messages (all connections together).
    period_ns: f64,
}

impl Schedule {
    /// The schedule for `rate` messages per second.
    pub(crate) fn new(rate: f64) -> Self {
        Self {
            period_ns: 1e9 / rate,
        }
    }

    /// How many nanoseconds after the start message `m` is due.
    pub(crate) fn offset_ns(&self, m: u64) -> u64 {
        (m as f64 * self.period_ns) as u64
    }

    /// How long after the start message `m` is due.
    pub(crate) fn at(&self, m: u64) -> Duration {
        Duration::from_nanos(self.offset_ns(m))
    }

    /// The message due exactly `offset_ns` after the start, if any.
    pub(crate) fn index_of(&self, offset_ns: u64) -> Option<u64> {
        let m = (offset_ns as f64 / self.period_ns).round() as u64;
        [m.saturating_sub(1), m, m + 1]
            .into_iter()
            .find(|&k| self.offset_ns(k) == offset_ns)
    }

    /// The first message due at or after `offset` from the start.
    pub(crate) fn first_at_or_after(&self, offset: Duration) -> u64 {
        let mut m = (offset.as_nanos() as f64 / self.period_ns).ceil() as u64;
        // Float rounding can land one off either way: settle it against `at`.
        while m > 0 && self.at(m - 1) >= offset {
            m -= 1;
        }
        while self.at(m) < offset {
            m += 1;
        }
        m
    }
}

/// Runs the fixed-rate loop at `rate` messages per second; see the module docs.
pub(super) fn run(cfg: &EchoConfig, rate: f64) -> Result<Outcome> {
    ensure!(
        rate.is_finite() && rate > 0.0,
        "--rate must be a positive number of messages per second"
    );
    let (mut poll, mut conns) = epoll::open(cfg)?;
    let n_conns = conns.len() as u64;
    let mut timer = TimerFd::new().context("creating a timerfd")?;
    poll.registry().register(
        &mut SourceFd(&timer.fd.as_raw_fd()),
        TIMER,
        Interest::READABLE,
    )?;
    set_timer_slack_ns(1);

    let payload = cfg.payload();
    let mut scratch = vec![0u8; READ_BYTES.max(cfg.size_bytes + 16)];
    let mut histogram = latency_histogram();
    let mut events = Events::with_capacity(1024);
    let mut errors = Errors::default();
    let mut progress = Progress::for_duration(cfg.progress, "echo", cfg.warmup + cfg.duration);

    let schedule = Schedule::new(rate);
    let first_measured = schedule.first_at_or_after(cfg.warmup);
    let end_m = schedule.first_at_or_after(cfg.warmup + cfg.duration);
    let t0 = Instant::now();
    let window_at = t0 + cfg.warmup;
    let window_end = window_at + cfg.duration;
    // Where message `m` falls: before the window, in it, or after.
    let measured = |m: u64| (first_measured..end_m).contains(&m);
    let mut next_m = 0u64;
    let c_of = |m: u64| m % n_conns;
    let mut lag = latency_histogram();

    let mut window: Option<(WindowStart, u64, u64)> = None;
    let mut closed: Option<(Window, u64, u64)> = None;
    let mut series = Timeline::new(window_at, timeline::INTERVAL, cfg.duration);
    let mut drain_deadline = None;
    loop {
        let now = Instant::now();
        if window.is_none() && now >= window_at {
            let start = WindowStart::now(cfg.server_pid)?;
            window = Some((start, sent_total(&conns), errors.count));
        }
        if let (Some((start, sent_start, errors_start)), None) = (window, closed) {
            if now >= window_end {
                let w = start.end(cfg.server_pid)?;
                closed = Some((
                    w,
                    sent_total(&conns) - sent_start,
                    errors.count - errors_start,
                ));
                drain_deadline = Some(now + DRAIN_TIMEOUT);
            }
        }
        if let Some(deadline) = drain_deadline {
            // Every message of the schedule released first: the window may close before the
            // loop has released its last messages, which are measured all the same.
            let all_back = next_m >= end_m && conns.iter().all(|c| c.dead || c.recvd >= c.due);
            if all_back || now >= deadline {
                break;
            }
        }
        if errors.count == n_conns {
            bail!(
                "every connection failed; first: {}",
                errors.first.as_deref().unwrap_or("?")
            );
        }

        // Release every message now due, then send on the connections they went to.
        let first_released = next_m;
        while next_m < end_m && t0 + schedule.at(next_m) <= now {
            conns[(next_m % n_conns) as usize].due += 1;
            next_m += 1;
        }
        let released = next_m - first_released;
        for i in 0..released.min(n_conns) {
            let conn = &mut conns[c_of(first_released + i) as usize];
            if conn.dead {
                continue;
            }
            let before = conn.sent;
            let pumped = conn.pump(&payload, poll.registry());
            note_lag(
                &mut lag,
                &schedule,
                t0,
                n_conns,
                c_of(first_released + i),
                before..conn.sent,
                &measured,
            );
            if let Err(e) = pumped {
                errors.note(conn, &e);
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }

        progress.update_time(now, (now - t0).min(cfg.warmup + cfg.duration), || {
            format!(
                "{} sent, {} round trips measured",
                sent_total(&conns),
                histogram.len()
            )
        });

        // Sleep until the next message is due or the phase changes, whichever is first.
        let mut wake = drain_deadline.unwrap_or(if now < window_at {
            window_at
        } else {
            window_end
        });
        if next_m < end_m {
            wake = wake.min(t0 + schedule.at(next_m));
        }
        let after = Instant::now();
        let wait = if wake <= after {
            Duration::ZERO
        } else {
            timer.arm(wake, after)?;
            MAX_WAIT
        };
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("epoll_wait"),
        }
        for event in &events {
            if event.token() == TIMER {
                timer.clear();
                continue;
            }
            let c = event.token().0;
            let Some(conn) = conns.get_mut(c) else {
                continue;
            };
            if conn.dead {
                continue;
            }
            let result = conn
                .on_ready(
                    event.is_readable() || event.is_read_closed(),
                    event.is_writable(),
                    &mut scratch,
                    &payload,
                    poll.registry(),
                )
                .and_then(|done| {
                    let at = Instant::now();
                    for k in conn.recvd - done..conn.recvd {
                        let m = k * n_conns + c as u64;
                        if measured(m) {
                            record(
                                &mut histogram,
                                at.saturating_duration_since(t0 + schedule.at(m)),
                            );
                        }
                    }
                    if closed.is_none() && at < window_end {
                        series.add(at, done);
                    }
                    // A writable socket may take what the schedule made due meanwhile.
                    let before = conn.sent;
                    let pumped = conn.pump(&payload, poll.registry());
                    note_lag(
                        &mut lag,
                        &schedule,
                        t0,
                        n_conns,
                        c as u64,
                        before..conn.sent,
                        &measured,
                    );
                    pumped
                });
            if let Err(e) = result {
                errors.note(conn, &e);
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }
    }
    progress.finish();

    // Messages due in the window that never came back count at the latency they reached.
    let end = Instant::now();
    let mut unanswered = 0;
    for (c, conn) in conns.iter().enumerate().filter(|(_, c)| !c.dead) {
        for k in conn.recvd..conn.due {
            let m = k * n_conns + c as u64;
            if measured(m) {
                record(
                    &mut histogram,
                    end.saturating_duration_since(t0 + schedule.at(m)),
                );
                unanswered += 1;
            }
        }
    }
    let (window, sent_in_window, errors_in_window) =
        closed.expect("the loop only ends after the window closed");
    let _ = poll
        .registry()
        .deregister(&mut SourceFd(&timer.fd.as_raw_fd()));
    epoll::close(poll, conns);

    Ok(Outcome {
        histogram,
        window,
        errors: errors_in_window,
        first_error: if errors_in_window > 0 {
            errors.first
        } else {
            None
        },
        throughput: series.into_counts(window.length),
        sent_in_window: Some(sent_in_window),
        unanswered,
        send_lag: Some(lag),
    })
}

/// Records how late messages `ks` of connection `c` were queued (now) after their due time,
/// for those inside the window.
fn note_lag(
    lag: &mut Histogram<u64>,
    schedule: &Schedule,
    t0: Instant,
    n_conns: u64,
    c: u64,
    ks: Range<u64>,
    measured: &impl Fn(u64) -> bool,
) {
    if ks.is_empty() {
        return;
    }
    let now = Instant::now();
    for k in ks {
        let m = k * n_conns + c;
        if measured(m) {
            record(lag, now.saturating_duration_since(t0 + schedule.at(m)));
        }
    }
}

/// Messages sent so far on all connections.
fn sent_total(conns: &[Conn]) -> u64 {
    conns.iter().map(|c| c.sent).sum()
}

/// A one-shot `timerfd` on `CLOCK_MONOTONIC` (the clock `Instant` reads on Linux).
#[derive(Debug)]
struct TimerFd {
    fd: OwnedFd,
    /// The instant it is armed for, so re-arming for the same instant is skipped.
    armed: Option<Instant>,
}

impl TimerFd {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with constant flags; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by timerfd_create and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, armed: None })
    }

    /// Arms the timer to fire at `at` (which is after `now`), unless it already is.
    fn arm(&mut self, at: Instant, now: Instant) -> io::Result<()> {
        if self.armed == Some(at) {
            return Ok(());
        }
        // A zero value would disarm the timer: fire after at least 1 ns.
        let left = at
            .saturating_duration_since(now)
            .max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: the fd is a live timerfd; `spec` is a valid itimerspec that outlives the
        // call, and a null old value is allowed.
        let rc =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = Some(at);
        Ok(())
    }

    /// Reads the expiry count so the fd stops being readable, and marks the timer unarmed.
    fn clear(&mut self) {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a u64 that outlives the call; errors (EAGAIN) are fine.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                std::ptr::from_mut(&mut count).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        self.armed = None;
    }
}

/// Sets this thread's timer slack (how late the kernel may fire its timers), best effort.
pub(crate) fn set_timer_slack_ns(ns: libc::c_ulong) {
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and touches no memory.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_due_evenly_across_the_second() {
        let s = Schedule::new(4.0);
        assert_eq!(s.at(0), Duration::ZERO);
        assert_eq!(s.at(1), Duration::from_millis(250));
        assert_eq!(s.at(4), Duration::from_secs(1));
    }

    #[test]
    fn the_first_message_at_or_after_an_offset_is_exact_at_boundaries() {
        let s = Schedule::new(4.0);
        assert_eq!(s.first_at_or_after(Duration::ZERO), 0);
        assert_eq!(s.first_at_or_after(Duration::from_millis(250)), 1);
        assert_eq!(s.first_at_or_after(Duration::from_millis(251)), 2);
        // An awkward rate: the boundary still agrees with `at`.
        let s = Schedule::new(3.0);
        for ms in [0, 1, 333, 334, 999, 1000, 5000] {
            let offset = Duration::from_millis(ms);
            let m = s.first_at_or_after(offset);
            assert!(s.at(m) >= offset, "{ms}");
            assert!(m == 0 || s.at(m - 1) < offset, "{ms}");
        }
    }

    #[test]
    fn a_timestamp_names_its_message_exactly() {
        for rate in [3.0, 1000.0, 2000.0, 7777.7, 1e6] {
            let s = Schedule::new(rate);
            for m in (0..5000).chain([1 << 20, 1 << 30]) {
                assert_eq!(s.index_of(s.offset_ns(m)), Some(m), "rate {rate}, m {m}");
            }
        }
        assert_eq!(Schedule::new(1000.0).index_of(1), None);
    }

    #[test]
    fn a_window_holds_rate_times_duration_messages() {
        let s = Schedule::new(1000.0);
        let first = s.first_at_or_after(Duration::from_secs(1));
        let end = s.first_at_or_after(Duration::from_secs(3));
        assert_eq!(end - first, 2000);
    }

    #[test]
    fn each_connection_sends_every_conns_over_rate_seconds() {
        // 4 connections at 100 msgs/s: connection 1 sends messages 1, 5, 9: 40 ms apart.
        let s = Schedule::new(100.0);
        let conns = 4;
        let gaps: Vec<Duration> = (0..3u64)
            .map(|k| s.at((k + 1) * conns + 1) - s.at(k * conns + 1))
            .collect();
        assert!(
            gaps.iter().all(|g| *g == Duration::from_millis(40)),
            "{gaps:?}"
        );
    }
}
