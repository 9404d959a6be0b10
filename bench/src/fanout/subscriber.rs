//! One part of the subscribers: opening and subscribing, receiving and timing each delivery,
//! and its result.

use std::{
    borrow::Cow,
    io,
    ops::Range,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use hdrhistogram::Histogram;
use mio::{Events, Poll};
use ringcast_protocol::envelope::{self, Request, ServerMessage, SubscribeTopic};
use serde::{Deserialize, Serialize};

use crate::{
    echo::rate::{Schedule, DRAIN_TIMEOUT},
    net::{SourceAddrs, Target},
    procfs,
    stats::{buckets, latency_histogram},
    timeline::{self, Timeline},
    window::record,
};

use super::{
    config::FanoutMode,
    conn::{close, open_conns, Conn, SubState},
    fleet::{Command, Signal},
    message::{on_topic, read_ts, topic_name, Clock},
    MAX_WAIT, READ_BYTES, SLACK,
};

/// One process's share of the subscribers; the hidden `fanout-worker` subcommand takes it as
/// JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriberPart {
    /// `ws://` URL of the server.
    pub url: String,
    /// What the connections speak.
    pub mode: FanoutMode,
    /// Global index of the first subscriber: it picks the topic and the source address.
    pub first_index: usize,
    /// Subscribers in this part.
    pub count: usize,
    /// Topics in the run.
    pub topics: usize,
    /// See [`FanoutConfig::rate`](super::FanoutConfig::rate): the schedule, to tell which
    /// message a timestamp is.
    pub rate: f64,
    /// Source addresses, shared by all parts.
    #[serde(flatten)]
    pub sources: SourceAddrs,
    /// Deadline for opening and subscribing.
    pub open_timeout: Duration,
    /// See [`FanoutConfig::warmup`](super::FanoutConfig::warmup).
    pub warmup: Duration,
    /// See [`FanoutConfig::duration`](super::FanoutConfig::duration).
    pub duration: Duration,
    /// Busy-poll the sockets during the load instead of sleeping (see
    /// [`super::FanoutConfig::spin`]).
    pub spin: bool,
}

/// What one part measured; merged into a [`super::FanoutReport`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SubscriberResult {
    /// Deliveries received of messages due inside the window.
    pub received: u64,
    /// Deliveries of messages due inside the window still in flight at the end.
    pub in_flight: u64,
    /// Deliveries that arrived while the window was open.
    pub in_window: u64,
    /// Messages announced as dropped.
    pub dropped: u64,
    /// `dropped` notices.
    pub dropped_notices: u64,
    /// Seq breaks without a notice.
    pub seq_errors: u64,
    /// Messages with no timestamp of this run.
    pub foreign: u64,
    /// Subscribers still short of some message at the end.
    pub incomplete: u64,
    /// Connections that failed during the load.
    pub errors: u64,
    /// The first such failure.
    pub first_error: Option<String>,
    /// This process's CPU time over the window, in nanoseconds.
    pub cpu_ns: u64,
    /// `epoll_wait` calls from `go` to the end: about one per burst of deliveries when the
    /// subscribers sleep, far more when they spin.
    #[serde(default)]
    pub polls: u64,
    /// Latencies of the measured deliveries, as `(nanoseconds, count)` buckets.
    pub latency_ns: Vec<(u64, u64)>,
    /// Deliveries per [`timeline::INTERVAL`] of the window.
    pub timeline: Vec<u64>,
}

/// Runs one part: opens and subscribes, signals `Ready`, waits for `go`, signals `Started`,
/// receives until done, closes.
pub(super) fn run_part(
    part: &SubscriberPart,
    commands: &mpsc::Receiver<Command>,
    signal: &mut dyn FnMut(Signal) -> Result<()>,
) -> Result<SubscriberResult> {
    let target = Target::parse(&part.url)?;
    let poll = Poll::new().context("creating the epoll instance")?;
    let first = part.first_index;
    let mut conns = open_conns(
        &target,
        part.mode,
        first..first + part.count,
        part.sources,
        part.open_timeout,
        poll.registry(),
    )?;
    for (i, conn) in conns.iter_mut().enumerate() {
        conn.sub.topic = (first + i) % part.topics;
    }
    let mut subs = Subscribers {
        part,
        poll,
        events: Events::with_capacity(1024),
        scratch: vec![0u8; READ_BYTES],
        conns,
        tally: Tally::new(),
        span: None,
        expect: 0,
    };
    let outcome = subs.run(commands, signal);
    let Subscribers { poll, conns, .. } = subs;
    close(poll, conns);
    outcome
}

/// One part's connections and what they received.
struct Subscribers<'a> {
    part: &'a SubscriberPart,
    poll: Poll,
    events: Events,
    scratch: Vec<u8>,
    conns: Vec<Conn>,
    tally: Tally,
    /// Known once `go` has come.
    span: Option<Span>,
    /// Messages `0..expect` are (or will be) published.
    expect: u64,
}

/// The run as a subscriber process sees it once `go` has come.
#[derive(Debug)]
struct Span {
    clock: Clock,
    schedule: Schedule,
    /// The start, in `CLOCK_MONOTONIC` nanoseconds.
    t0_ns: u64,
    /// Indexes of the measured messages.
    measured: Range<u64>,
    /// Arrival times that count as inside the window.
    window: Range<Instant>,
    /// Deliveries per interval of the window.
    timeline: Timeline,
    /// This process's CPU time over the window.
    cpu: CpuWindow,
}

/// This process's CPU time over a window, read when the window opens and when it closes.
#[derive(Debug)]
struct CpuWindow {
    window: Range<Instant>,
    /// The reading as the window opened.
    start: Option<Duration>,
    /// The time spent in the window, once it has closed.
    spent: Option<Duration>,
}

impl CpuWindow {
    fn new(window: Range<Instant>) -> Self {
        Self {
            window,
            start: None,
            spent: None,
        }
    }

    /// Takes the readings a boundary passed by `now` calls for. Cheap otherwise, so it is
    /// called per event: one turn of the loop can take long under load.
    fn tick(&mut self, now: Instant) {
        match (self.start, self.spent) {
            (None, _) if now >= self.window.start => self.start = Some(procfs::self_cpu()),
            (Some(start), None) if now >= self.window.end => {
                self.spent = Some(procfs::self_cpu().saturating_sub(start));
            }
            _ => {}
        }
    }

    /// The CPU time spent in the window (up to now if it has not closed).
    fn spent(&self) -> Duration {
        match (self.start, self.spent) {
            (_, Some(spent)) => spent,
            (Some(start), None) => procfs::self_cpu().saturating_sub(start),
            (None, None) => Duration::ZERO,
        }
    }
}

/// A part's counts.
#[derive(Debug)]
struct Tally {
    latency: Histogram<u64>,
    acks: usize,
    received: u64,
    in_flight: u64,
    in_window: u64,
    dropped: u64,
    notices: u64,
    seq_errors: u64,
    foreign: u64,
    /// Live subscribers with every message received or announced as dropped.
    done: usize,
    errors: u64,
    first_error: Option<String>,
    /// `epoll_wait` calls once `go` came.
    polls: u64,
}

impl Tally {
    fn new() -> Self {
        Self {
            latency: latency_histogram(),
            acks: 0,
            received: 0,
            in_flight: 0,
            in_window: 0,
            dropped: 0,
            notices: 0,
            seq_errors: 0,
            foreign: 0,
            done: 0,
            errors: 0,
            first_error: None,
            polls: 0,
        }
    }
}

impl Subscribers<'_> {
    fn run(
        &mut self,
        commands: &mpsc::Receiver<Command>,
        signal: &mut dyn FnMut(Signal) -> Result<()>,
    ) -> Result<SubscriberResult> {
        self.subscribe()?;
        signal(Signal::Ready(self.conns.len()))?;

        let go_deadline = Instant::now() + self.part.open_timeout + SLACK;
        let (t0_ns, total) = loop {
            match commands.try_recv() {
                Ok(Command::Go { t0_ns, total }) => break (t0_ns, total),
                Ok(Command::End { .. }) => {}
                Err(mpsc::TryRecvError::Empty) => {
                    ensure!(
                        Instant::now() < go_deadline,
                        "no go from the parent in time"
                    );
                    self.turn(MAX_WAIT)?;
                }
                Err(mpsc::TryRecvError::Disconnected) => bail!("the parent went away before go"),
            }
        };
        let clock = Clock::now();
        let part = self.part;
        let window_ns = t0_ns + part.warmup.as_nanos() as u64;
        let window_at = clock.instant(window_ns);
        let window_end = window_at + part.duration;
        let schedule = Schedule::new(part.rate);
        self.span = Some(Span {
            clock,
            schedule,
            t0_ns,
            measured: schedule.first_at_or_after(part.warmup)..total,
            window: window_at..window_end,
            timeline: Timeline::new(window_at, timeline::INTERVAL, part.duration),
            cpu: CpuWindow::new(window_at..window_end),
        });
        self.expect = total;
        signal(Signal::Started)?;

        // The publishers stop DRAIN_TIMEOUT after the window at the latest; then `end`.
        let hard_deadline = window_end + DRAIN_TIMEOUT * 2 + SLACK;
        let mut end_at = None;
        loop {
            let now = Instant::now();
            if let Some(span) = &mut self.span {
                span.cpu.tick(now);
            }
            let live = self.conns.iter().filter(|c| !c.dead).count();
            if self.tally.done == live
                || now >= hard_deadline
                || end_at.is_some_and(|at| now >= at + DRAIN_TIMEOUT)
            {
                break;
            }
            match commands.try_recv() {
                Ok(Command::End { sent }) => {
                    self.expect = sent.min(total);
                    for conn in &mut self.conns {
                        check_done(conn, &mut self.tally, true, self.expect, part.topics);
                    }
                    end_at = Some(now);
                }
                Ok(Command::Go { .. }) | Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => {
                    end_at.get_or_insert(now);
                }
            }
            let next = if now < window_at {
                window_at
            } else {
                window_end
            };
            let wait = if part.spin {
                Duration::ZERO
            } else {
                match next.saturating_duration_since(now).min(MAX_WAIT) {
                    Duration::ZERO => MAX_WAIT,
                    wait => wait,
                }
            };
            self.turn(wait)?;
        }
        let span = self.span.take().expect("set above");
        let cpu = span.cpu.spent();
        let end_ns = span.clock.ns(Instant::now());
        for conn in self.conns.iter().filter(|c| !c.dead) {
            record_in_flight(
                &conn.sub,
                &span,
                self.expect,
                part.topics,
                end_ns,
                &mut self.tally,
            );
        }
        let live = self.conns.iter().filter(|c| !c.dead).count();
        let t = &self.tally;
        Ok(SubscriberResult {
            received: t.received,
            in_flight: t.in_flight,
            in_window: t.in_window,
            dropped: t.dropped,
            dropped_notices: t.notices,
            seq_errors: t.seq_errors,
            foreign: t.foreign,
            incomplete: (live - t.done) as u64,
            errors: t.errors,
            first_error: t.first_error.clone(),
            cpu_ns: cpu.as_nanos() as u64,
            polls: t.polls,
            latency_ns: buckets(&t.latency),
            timeline: span.timeline.into_counts(part.duration),
        })
    }

    /// Envelope modes: subscribes every connection to its topic and waits (bounded) for every
    /// ack. Any failure fails the part.
    fn subscribe(&mut self) -> Result<()> {
        let Some(enc) = self.part.mode.encoding() else {
            return Ok(());
        };
        let registry = self.poll.registry();
        for conn in &mut self.conns {
            let request = envelope::encode_request(
                enc,
                &Request::Subscribe {
                    id: None,
                    topics: vec![SubscribeTopic {
                        topic: Cow::Owned(topic_name(conn.sub.topic)),
                        since: None,
                        epoch: None,
                    }],
                },
            );
            conn.ws.queue(enc.opcode(), &request);
            conn.ws.flush(registry)?;
        }
        let deadline = Instant::now() + self.part.open_timeout;
        while self.tally.acks < self.conns.len() {
            ensure!(
                Instant::now() < deadline,
                "{} of {} subscriptions acknowledged by the deadline",
                self.tally.acks,
                self.conns.len()
            );
            self.turn(MAX_WAIT)?;
            if let Some(e) = &self.tally.first_error {
                bail!("subscribing: {e}");
            }
        }
        Ok(())
    }

    /// Waits up to `wait` for readiness and handles it. A connection that fails is counted and
    /// left out from then on.
    fn turn(&mut self, wait: Duration) -> Result<()> {
        let Self {
            part,
            poll,
            events,
            scratch,
            conns,
            tally,
            span,
            expect,
        } = self;
        let polled = poll.poll(events, Some(wait));
        if span.is_some() {
            tally.polls += 1;
        }
        match polled {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e).context("epoll_wait"),
        }
        if wait.is_zero() && events.is_empty() {
            // Spinning: let whatever else is runnable on this core (the publisher, when it
            // shares the core) go first; with nothing else, this returns at once.
            thread::yield_now();
        }
        let registry = poll.registry();
        for event in events.iter() {
            let Some(conn) = conns.get_mut(event.token().0) else {
                continue;
            };
            if conn.dead {
                continue;
            }
            // One clock read per event: a turn over many busy connections can take long.
            let at = Instant::now();
            let at_ns = match span {
                Some(span) => {
                    span.cpu.tick(at);
                    span.clock.ns(at)
                }
                None => 0,
            };
            let arrival = Arrival {
                span: span.as_ref(),
                at,
                at_ns,
            };
            let before = tally.in_window;
            let result = conn.on_ready(
                event.is_readable() || event.is_read_closed(),
                event.is_writable(),
                scratch,
                registry,
                &mut |sub, msg| on_delivery(part.mode, sub, tally, &arrival, msg),
            );
            if let Some(span) = span {
                span.timeline.add(at, tally.in_window - before);
            }
            match result {
                Ok(()) => check_done(conn, tally, span.is_some(), *expect, part.topics),
                Err(e) => {
                    conn.dead = true;
                    conn.ws.deregister(registry);
                    if conn.sub.done {
                        tally.done -= 1;
                    }
                    tally.errors += 1;
                    tally.first_error.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
        Ok(())
    }
}

/// Marks a subscriber done once the run has started and it has every message of its topic
/// among `0..expect` (received or announced as dropped).
fn check_done(conn: &mut Conn, tally: &mut Tally, started: bool, expect: u64, topics: usize) {
    if !started || conn.dead || conn.sub.done {
        return;
    }
    if conn.sub.got + conn.sub.dropped >= on_topic(expect, conn.sub.topic, topics) {
        conn.sub.done = true;
        tally.done += 1;
    }
}

/// When a readiness event's messages arrived, read once per event.
#[derive(Debug, Clone, Copy)]
struct Arrival<'a> {
    /// The run, once `go` has come.
    span: Option<&'a Span>,
    at: Instant,
    /// `at` in `CLOCK_MONOTONIC` nanoseconds (0 before `go`).
    at_ns: u64,
}

/// Takes one message that arrived on a subscriber.
fn on_delivery(
    mode: FanoutMode,
    sub: &mut SubState,
    tally: &mut Tally,
    arrival: &Arrival<'_>,
    msg: &[u8],
) -> Result<()> {
    let payload = match mode.encoding() {
        None => msg,
        Some(enc) => match envelope::decode_server(enc, msg)? {
            ServerMessage::Message { seq, payload, .. } => {
                if sub.next_seq.is_some_and(|next| seq != next) {
                    tally.seq_errors += 1;
                }
                sub.next_seq = Some(seq.saturating_add(1));
                return take_payload(mode, sub, tally, arrival, &payload.bytes);
            }
            ServerMessage::Dropped { count, next, .. } => {
                sub.dropped = sub.dropped.saturating_add(count);
                tally.dropped = tally.dropped.saturating_add(count);
                tally.notices += 1;
                sub.next_seq = Some(next);
                return Ok(());
            }
            ServerMessage::Ack { .. } => {
                if !sub.acked {
                    sub.acked = true;
                    tally.acks += 1;
                }
                return Ok(());
            }
            ServerMessage::Pong { .. } => return Ok(()),
            ServerMessage::Error { code, message, .. } => {
                bail!("the broker answered with an error: {code}: {message}")
            }
            ServerMessage::Reset { .. } => bail!("a reset notice for a subscription without since"),
            ServerMessage::Shutdown { reason } => bail!("the broker is shutting down: {reason}"),
        },
    };
    take_payload(mode, sub, tally, arrival, payload)
}

/// Counts and times one delivered payload.
fn take_payload(
    mode: FanoutMode,
    sub: &mut SubState,
    tally: &mut Tally,
    arrival: &Arrival<'_>,
    payload: &[u8],
) -> Result<()> {
    let Arrival { span, at, at_ns } = *arrival;
    let (Some(span), Some(ts)) = (span, read_ts(mode.is_json(), payload)) else {
        tally.foreign += 1;
        return Ok(());
    };
    let index = ts
        .checked_sub(span.t0_ns)
        .and_then(|offset| span.schedule.index_of(offset));
    let Some(m) = index.filter(|&m| m < span.measured.end) else {
        tally.foreign += 1;
        return Ok(());
    };
    sub.got += 1;
    sub.last = Some(sub.last.map_or(m, |last| last.max(m)));
    if span.measured.contains(&m) {
        tally.received += 1;
        record(
            &mut tally.latency,
            Duration::from_nanos(at_ns.saturating_sub(ts)),
        );
    }
    if span.window.contains(&at) {
        tally.in_window += 1;
    }
    Ok(())
}

/// Records the measured messages of `sub`'s topic among `0..sent` that come after the last one
/// it received (all of them if none) at the latency they had reached at `end_ns`, and counts
/// them in flight.
fn record_in_flight(
    sub: &SubState,
    span: &Span,
    sent: u64,
    topics: usize,
    end_ns: u64,
    tally: &mut Tally,
) {
    let from = sub.last.map_or(0, |last| last + 1).max(span.measured.start);
    let to = sent.min(span.measured.end);
    let (topic, topics) = (sub.topic as u64, topics.max(1) as u64);
    // The first message of the topic at or after `from`.
    let mut m = from + (topic + topics - from % topics) % topics;
    while m < to {
        let due_ns = span.t0_ns + span.schedule.offset_ns(m);
        record(
            &mut tally.latency,
            Duration::from_nanos(end_ns.saturating_sub(due_ns)),
        );
        tally.in_flight += 1;
        m += topics;
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use ringcast_protocol::{
        envelope::{Data, DataKind, Encoding},
        Codec, Event, Limits,
    };

    use super::*;
    use crate::fanout::message::write_payload;

    /// A run of 200 messages one nanosecond apart (so message `m` is due at `t0 + m`), the
    /// last 100 measured.
    fn span(clock: Clock) -> Span {
        Span {
            clock,
            schedule: Schedule::new(1e9),
            t0_ns: clock.ns,
            measured: 100..200,
            window: clock.at..clock.at + Duration::from_secs(1),
            timeline: Timeline::new(clock.at, timeline::INTERVAL, Duration::from_secs(1)),
            cpu: CpuWindow::new(clock.at..clock.at + Duration::from_secs(1)),
        }
    }

    fn deliver(
        enc: Encoding,
        sub: &mut SubState,
        tally: &mut Tally,
        span: &Span,
        frame: &bytes::Bytes,
    ) -> Result<()> {
        let mut buf = BytesMut::from(&frame[..]);
        let mut codec = Codec::client(Limits::default(), 1);
        let message = match codec.poll_event(&mut buf).unwrap().unwrap() {
            Event::Binary(b) => b,
            Event::Text(t) => t.into_bytes(),
            other => panic!("{other:?}"),
        };
        let mode = if enc == Encoding::Json {
            FanoutMode::EnvelopeJson
        } else {
            FanoutMode::EnvelopeBin
        };
        let arrival = Arrival {
            span: Some(span),
            at: span.clock.at,
            at_ns: span.clock.ns + 1000,
        };
        on_delivery(mode, sub, tally, &arrival, &message)
    }

    #[test]
    fn seq_must_follow_unless_a_dropped_notice_announced_the_gap() {
        for enc in [Encoding::Json, Encoding::Binary] {
            let span = span(Clock::now());
            let (mut sub, mut tally) = (SubState::default(), Tally::new());
            let mut data = Vec::new();
            write_payload(enc == Encoding::Json, span.t0_ns + 150, 32, &mut data);
            let kind = if enc == Encoding::Json {
                DataKind::Json
            } else {
                DataKind::Binary
            };
            let message =
                |seq| envelope::message_frame(enc, "fanout.0", seq, Data::new(kind, &data));
            for frame in [
                message(7),
                message(8),
                envelope::dropped_frame(enc, "fanout.0", 3, 12),
                message(12),
            ] {
                deliver(enc, &mut sub, &mut tally, &span, &frame).unwrap();
            }
            assert_eq!((tally.seq_errors, tally.dropped, tally.notices), (0, 3, 1));
            assert_eq!((sub.got, tally.received), (3, 3));
            assert_eq!(tally.latency.len(), 3);
            assert_eq!(tally.latency.max(), tally.latency.highest_equivalent(850));
            deliver(enc, &mut sub, &mut tally, &span, &message(14)).unwrap();
            deliver(enc, &mut sub, &mut tally, &span, &message(14)).unwrap();
            assert_eq!(tally.seq_errors, 2, "a gap and a repeat");
            assert_eq!(sub.last, Some(150), "every message was the same one");
            let error = envelope::error_frame(enc, None, envelope::ErrorCode::BadTopic, "no", None);
            assert!(deliver(enc, &mut sub, &mut tally, &span, &error).is_err());
        }
    }

    #[test]
    fn messages_outside_the_run_are_foreign_and_outside_the_window_unmeasured() {
        let span = span(Clock::now());
        let (mut sub, mut tally) = (SubState::default(), Tally::new());
        let mut data = Vec::new();
        for (ts, foreign, measured) in [
            (span.t0_ns - 1, 1, 0),
            (span.t0_ns + 50, 1, 0),
            (span.t0_ns + 150, 1, 1),
            (span.t0_ns + 200, 2, 1),
        ] {
            write_payload(false, ts, 16, &mut data);
            let arrival = Arrival {
                span: Some(&span),
                at: span.clock.at,
                at_ns: span.t0_ns + 300,
            };
            take_payload(FanoutMode::Raw, &mut sub, &mut tally, &arrival, &data).unwrap();
            assert_eq!(
                (tally.foreign, tally.received),
                (foreign, measured),
                "ts {ts}"
            );
        }
        assert_eq!(sub.got, 2);
        assert_eq!(sub.last, Some(150));
        let (mut sub, mut tally) = (SubState::default(), Tally::new());
        let before_go = Arrival {
            span: None,
            at: span.clock.at,
            at_ns: 0,
        };
        take_payload(FanoutMode::Raw, &mut sub, &mut tally, &before_go, &data).unwrap();
        assert_eq!(tally.foreign, 1, "a message before go");
    }

    #[test]
    fn messages_after_the_last_received_are_in_flight_at_the_latency_reached() {
        let span = span(Clock::now());
        let end_ns = span.t0_ns + 1000;
        let mut tally = Tally::new();
        let sub = SubState {
            last: Some(150),
            ..SubState::default()
        };
        // Sent up to 180: 151..180 of the one topic are in flight, the oldest 849 ns late.
        record_in_flight(&sub, &span, 180, 1, end_ns, &mut tally);
        assert_eq!(tally.in_flight, 29);
        assert_eq!(tally.latency.max(), tally.latency.highest_equivalent(849));
        assert_eq!(tally.latency.min(), tally.latency.lowest_equivalent(821));

        // Nothing received on topic 1 of 3: 100, 103, ... 199 of the measured are in flight.
        let mut tally = Tally::new();
        let sub = SubState {
            topic: 1,
            ..SubState::default()
        };
        record_in_flight(&sub, &span, 200, 3, end_ns, &mut tally);
        assert_eq!(tally.in_flight, 34);
        // Received past the end of the measured ones: none in flight.
        let mut tally = Tally::new();
        let sub = SubState {
            last: Some(199),
            ..SubState::default()
        };
        record_in_flight(&sub, &span, 200, 1, end_ns, &mut tally);
        assert_eq!(tally.in_flight, 0);
    }

    #[test]
    fn cpu_is_read_as_the_window_opens_and_closes() {
        let t = Instant::now();
        let mut cpu = CpuWindow::new(t + Duration::from_secs(1)..t + Duration::from_secs(2));
        cpu.tick(t);
        assert_eq!(
            (cpu.start, cpu.spent, cpu.spent()),
            (None, None, Duration::ZERO)
        );
        cpu.tick(t + Duration::from_millis(1500));
        assert!(cpu.start.is_some() && cpu.spent.is_none());
        cpu.tick(t + Duration::from_secs(2));
        let spent = cpu.spent.expect("closed");
        cpu.tick(t + Duration::from_secs(3));
        assert_eq!(cpu.spent(), spent, "read once");
    }
}
