//! The publishers: the schedule they follow, the ticker thread that wakes them, and the loop
//! that publishes and reads the broker's acks.

use std::{
    borrow::Cow,
    io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use hdrhistogram::Histogram;
use mio::{Events, Poll, Token, Waker};
use ringcast_protocol::{
    envelope::{self, Data, DataKind, Encoding, Request, ServerMessage},
    OpCode,
};

use crate::{
    echo::rate::{set_timer_slack_ns, Schedule, DRAIN_TIMEOUT},
    progress::Progress,
    stats::latency_histogram,
    window::{record, Window, WindowStart},
};

use super::{
    config::FanoutConfig,
    conn::Conn,
    message::{topic_name, write_payload, Clock},
    MAX_WAIT, READ_BYTES,
};

/// The most bytes queued on one publisher connection beyond what its socket took; past it the
/// publishers fall behind their schedule (the lateness counts in the latency) rather than queue
/// more.
const OUT_HIGH_BYTES: usize = 64 << 10;

/// The publishers' `Waker` token; connections use their index.
const WAKE: Token = Token(usize::MAX);

/// What the publishers follow.
#[derive(Debug, Clone, Copy)]
pub(super) struct Plan {
    pub(super) schedule: Schedule,
    /// Messages in the run: those due before the window ends.
    pub(super) total: u64,
    /// The first message due inside the window.
    pub(super) first_measured: u64,
    /// This process's reading of both clocks.
    pub(super) clock: Clock,
}

/// What the publishers did.
#[derive(Debug)]
pub(super) struct PublishOutcome {
    pub(super) window: Window,
    /// Messages `0..sent` were sent.
    pub(super) sent: u64,
    /// Messages sent while the window was open.
    pub(super) sent_in_window: u64,
    /// Publishes refused with an error.
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    /// How late each measured message was queued after its due time.
    pub(super) lag: Histogram<u64>,
}

/// Publishes the schedule from `t0` on `conns`; see the module docs.
pub(super) fn publish(
    cfg: &FanoutConfig,
    poll: &mut Poll,
    conns: &mut [Conn],
    plan: &Plan,
    t0: Instant,
) -> Result<PublishOutcome> {
    let waker = Arc::new(Waker::new(poll.registry(), WAKE).context("creating a waker")?);
    let _ticker = Ticker::start(Arc::clone(&waker), t0, plan.schedule, plan.total);
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; READ_BYTES];
    let mut progress = Progress::for_duration(cfg.progress, "fanout", cfg.warmup + cfg.duration);
    let enc = cfg.mode.encoding();
    let topics: Vec<String> = (0..cfg.topics).map(topic_name).collect();
    let mut payload = Vec::with_capacity(cfg.size_bytes);
    let measured = plan.first_measured..plan.total;
    let mut lag = latency_histogram();
    let (mut acked, mut errors, mut first_error) = (0u64, 0u64, None::<String>);

    let window_at = t0 + cfg.warmup;
    let window_end = window_at + cfg.duration;
    let drain_deadline = window_end + DRAIN_TIMEOUT;
    let mut window: Option<(WindowStart, u64)> = None;
    let mut closed: Option<(Window, u64)> = None;
    let mut next_m = 0u64;
    loop {
        let now = Instant::now();
        if window.is_none() && now >= window_at {
            window = Some((WindowStart::now(cfg.server_pid)?, next_m));
        }
        if let (Some((start, sent_at_open)), None) = (window, &closed) {
            if now >= window_end {
                closed = Some((start.end(cfg.server_pid)?, next_m - sent_at_open));
            }
        }
        if closed.is_some() {
            let flushed = conns.iter().all(|c| c.ws.queued_bytes() == 0);
            let answered = enc.is_none() || acked + errors >= next_m;
            if (next_m == plan.total && flushed && answered) || now >= drain_deadline {
                break;
            }
        }

        // Queue every message now due (unless its connection is backed up), then send.
        let first_released = next_m;
        while next_m < plan.total && t0 + plan.schedule.at(next_m) <= now {
            let conn = &mut conns[(next_m % conns.len() as u64) as usize];
            if conn.ws.queued_bytes() >= OUT_HIGH_BYTES {
                break;
            }
            let due = t0 + plan.schedule.at(next_m);
            write_payload(
                cfg.mode.is_json(),
                plan.clock.ns(due),
                cfg.size_bytes,
                &mut payload,
            );
            match enc {
                Some(enc) => {
                    let kind = if enc == Encoding::Json {
                        DataKind::Json
                    } else {
                        DataKind::Binary
                    };
                    let request = envelope::encode_request(
                        enc,
                        &Request::Publish {
                            id: None,
                            topic: Cow::Borrowed(&topics[(next_m % cfg.topics as u64) as usize]),
                            payload: Data::new(kind, &payload),
                        },
                    );
                    conn.ws.queue(enc.opcode(), &request);
                }
                None => conn.ws.queue(OpCode::Binary, &payload),
            }
            if measured.contains(&next_m) {
                record(&mut lag, Instant::now().saturating_duration_since(due));
            }
            next_m += 1;
        }
        for i in 0..((next_m - first_released).min(conns.len() as u64)) {
            let c = ((first_released + i) % conns.len() as u64) as usize;
            conns[c]
                .ws
                .flush(poll.registry())
                .with_context(|| format!("publisher {c}"))?;
        }

        progress.update_time(now, now.saturating_duration_since(t0), || {
            format!("{next_m} of {} published", plan.total)
        });

        let wake = match (window, &closed) {
            (None, _) => window_at,
            (Some(_), None) => window_end,
            (Some(_), Some(_)) => drain_deadline,
        };
        let wait = wake.saturating_duration_since(now).min(MAX_WAIT);
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("epoll_wait"),
        }
        for event in &events {
            let c = event.token().0;
            let Some(conn) = conns.get_mut(c) else {
                continue;
            };
            conn.on_ready(
                event.is_readable() || event.is_read_closed(),
                event.is_writable(),
                &mut scratch,
                poll.registry(),
                &mut |_, msg| {
                    // Raw: the publisher's own copies, ignored. Envelope: acks and errors.
                    let Some(enc) = enc else { return Ok(()) };
                    match envelope::decode_server(enc, msg)? {
                        ServerMessage::Ack { .. } => acked += 1,
                        ServerMessage::Error { code, message, .. } => {
                            errors += 1;
                            first_error.get_or_insert_with(|| format!("{code}: {message}"));
                        }
                        ServerMessage::Shutdown { reason } => {
                            bail!("the broker is shutting down: {reason}")
                        }
                        _ => {}
                    }
                    Ok(())
                },
            )
            .with_context(|| format!("publisher {c}"))?;
        }
    }
    progress.finish();
    let (window, sent_in_window) = closed.expect("the loop only ends after the window closed");
    Ok(PublishOutcome {
        window,
        sent: next_m,
        sent_in_window,
        errors,
        first_error,
        lag,
    })
}

/// The thread that wakes the publishers' `Poll` at each due time: `epoll_wait` only counts in
/// milliseconds, a sleeping thread (with 1 ns of timer slack) in microseconds. Stopped and
/// joined on drop.
struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(waker: Arc<Waker>, t0: Instant, schedule: Schedule, total: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            set_timer_slack_ns(1);
            let mut m = 0;
            while m < total && !flag.load(Ordering::Relaxed) {
                let now = Instant::now();
                let due = t0 + schedule.at(m);
                if due > now {
                    // Bounded, so a stop is seen within MAX_WAIT.
                    thread::sleep((due - now).min(MAX_WAIT));
                    continue;
                }
                let _ = waker.wake();
                while m < total && t0 + schedule.at(m) <= now {
                    m += 1;
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
