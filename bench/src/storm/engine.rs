//! One process's slots on one mio loop: the attempts (connect, upgrade, hold, close), their
//! timers and backoff, and why an attempt failed.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    fmt,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use bytes::BytesMut;
use hdrhistogram::Histogram;
use mio::{net::TcpStream, Events, Interest, Poll, Token};
use ringcast_protocol::{
    ClientHandshake, CloseCode, CloseFrame, Codec, HandshakeError, HeadReader, Limits,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    net::{set_bind_address_no_port, SourceAddrs, Target},
    stats::{buckets, latency_histogram},
    timeline::{self, Timeline},
    window::record,
};

use super::{
    config::{Backoff, PartConfig, PartKind},
    parts::Tally,
    report::PartResult,
    CLOSE_TIMEOUT,
};

/// The largest upgrade response head accepted, in bytes.
const MAX_RESPONSE_HEAD_BYTES: usize = 16 << 10;

/// The longest one `epoll_wait` blocks.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// The most timers handled between two polls, so a burst of due attempts (the mass
/// reconnect starts every slot at once) interleaves with the completions of the first ones
/// instead of issuing every connect before reading any answer.
const MAX_TIMERS_PER_POLL: usize = 128;

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connect was refused (RST to the SYN: nothing listening, or the accept queue
    /// overflowed with `tcp_abort_on_overflow`).
    Refused,
    /// The connect or the upgrade took longer than the attempt timeout (a full accept queue
    /// drops SYNs, which the client resends after 1 s, 3 s, ...).
    Timeout,
    /// The server answered the upgrade with this HTTP status instead of 101.
    Http(u16),
    /// The connection was reset or aborted during the attempt.
    Reset,
    /// The server closed the connection before answering the upgrade.
    Closed,
    /// No source port was free (`EADDRNOTAVAIL`): too many connections per source address.
    NoPorts,
    /// Anything else (a malformed response, a local error).
    Other,
}

impl Failure {
    /// Classifies an IO error.
    pub fn from_io(err: &io::Error) -> Self {
        match err.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::TimedOut => Self::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Self::Reset,
            io::ErrorKind::UnexpectedEof => Self::Closed,
            io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse => Self::NoPorts,
            _ => Self::Other,
        }
    }

    /// The key this failure is counted under in a report.
    pub fn key(&self) -> String {
        match self {
            Self::Refused => "refused".to_owned(),
            Self::Timeout => "timeout".to_owned(),
            Self::Http(code) => format!("http {code}"),
            Self::Reset => "reset".to_owned(),
            Self::Closed => "closed".to_owned(),
            Self::NoPorts => "no ports".to_owned(),
            Self::Other => "other".to_owned(),
        }
    }
}

/// Where one slot is.
#[derive(Debug)]
enum State {
    /// Waiting for its timer to start an attempt.
    Waiting,
    /// TCP connect in progress.
    Connecting(TcpStream),
    /// Upgrade request sent, response head not complete.
    Upgrading {
        stream: TcpStream,
        handshake: ClientHandshake,
        buf: BytesMut,
    },
    /// Upgraded (or, raw, connected) and held.
    Open(TcpStream),
    /// Close sent; waiting for the server's TCP close.
    Closing(TcpStream),
    /// Finished for this run.
    Done,
}

#[derive(Debug)]
struct Slot {
    /// Global index: picks the source address.
    index: usize,
    state: State,
    /// Bumped for each new socket; part of its token, so events of a closed socket are
    /// ignored.
    stream_gen: u32,
    /// Bumped for each timer set; older timers are ignored.
    timer_gen: u64,
    /// Failed attempts in a row, for the backoff.
    failures: u32,
    /// When the current attempt started.
    attempt_at: Instant,
    /// Mass: whether it has come back.
    back: bool,
}

/// One process's slots on one mio loop.
pub(super) struct Engine {
    kind: PartKind,
    target: Target,
    raw: bool,
    sources: SourceAddrs,
    hold: Duration,
    attempt_timeout: Duration,
    backoff: Backoff,
    poll: Poll,
    slots: Vec<Slot>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    t0: Instant,
    /// No attempt starts, and no upgrade counts, from here on.
    stop_at: Instant,
    /// Set once the run stops: the deadline for closing.
    closing_until: Option<Instant>,
    rng: fastrand::Rng,
    scratch: Vec<u8>,
    upgrade: Histogram<u64>,
    reconnect: Histogram<u64>,
    series: Timeline,
    result: PartResult,
    tally: Tally,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("kind", &self.kind)
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

/// A token: slot index in the low 32 bits, socket generation above.
fn token(slot: usize, gen: u32) -> Token {
    Token(slot | ((gen as usize) << 32))
}

fn untoken(token: Token) -> (usize, u32) {
    (token.0 & 0xffff_ffff, (token.0 >> 32) as u32)
}

impl Engine {
    pub(super) fn new(
        part: &PartConfig,
        target: &Target,
        slots: usize,
        t0: Instant,
    ) -> Result<Self> {
        ensure!(slots < 1 << 32, "too many slots for one process");
        let span = match part.kind {
            PartKind::Churn => part.duration,
            PartKind::Mass => part.reconnect_timeout,
        };
        let mut engine = Self {
            kind: part.kind,
            target: target.clone(),
            raw: part.raw,
            sources: part.sources,
            hold: part.hold,
            attempt_timeout: part.attempt_timeout,
            backoff: part.backoff,
            poll: Poll::new().context("creating the epoll instance")?,
            slots: (0..slots)
                .map(|i| Slot {
                    index: part.first_index + i,
                    state: State::Waiting,
                    stream_gen: 0,
                    timer_gen: 0,
                    failures: 0,
                    attempt_at: t0,
                    back: false,
                })
                .collect(),
            timers: BinaryHeap::with_capacity(slots),
            t0,
            stop_at: t0 + span,
            closing_until: None,
            rng: fastrand::Rng::new(),
            scratch: vec![0u8; 16 << 10],
            upgrade: latency_histogram(),
            reconnect: latency_histogram(),
            series: Timeline::new(t0, timeline::INTERVAL, span),
            result: PartResult::default(),
            tally: Tally::default(),
        };
        // Churn: starts spread over one hold period, so the slots do not move in lockstep.
        // Mass: all at once; that is the storm.
        for s in 0..slots {
            let at = match part.kind {
                PartKind::Churn => t0 + part.hold.mul_f64(engine.rng.f64()),
                PartKind::Mass => t0,
            };
            engine.set_timer(s, at);
        }
        Ok(engine)
    }

    fn set_timer(&mut self, s: usize, at: Instant) {
        let slot = &mut self.slots[s];
        slot.timer_gen += 1;
        self.timers.push(Reverse((at, s, slot.timer_gen)));
    }

    /// Forgets the slot's timer.
    fn clear_timer(&mut self, s: usize) {
        self.slots[s].timer_gen += 1;
    }

    /// Runs until every slot is done or the closing deadline passes.
    pub(super) fn run(&mut self, tick: &mut dyn FnMut(Tally)) -> Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if self.closing_until.is_none() && (now >= self.stop_at || self.all_back()) {
                self.stop(now);
            }
            if let Some(until) = self.closing_until {
                if now >= until || self.slots.iter().all(|s| matches!(s.state, State::Done)) {
                    break;
                }
            }
            let mut handled = 0;
            while let Some(Reverse((at, s, gen))) = self.timers.peek().copied() {
                if at > now || handled == MAX_TIMERS_PER_POLL {
                    break;
                }
                self.timers.pop();
                if self.slots[s].timer_gen == gen {
                    self.on_timer(s, now);
                    handled += 1;
                }
            }
            tick(self.tally);

            let mut wake = self.closing_until.unwrap_or(self.stop_at);
            if let Some(Reverse((at, _, _))) = self.timers.peek() {
                wake = wake.min(*at);
            }
            // Timers left over from a capped batch are due already: poll without blocking.
            let wait = wake.saturating_duration_since(Instant::now()).min(MAX_WAIT);
            match self.poll.poll(&mut events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            }
            for event in &events {
                let (s, gen) = untoken(event.token());
                if self.slots.get(s).is_some_and(|slot| slot.stream_gen == gen) {
                    self.on_event(s, event.is_writable() || event.is_error());
                }
            }
        }
        Ok(())
    }

    fn all_back(&self) -> bool {
        self.kind == PartKind::Mass && self.result.back == self.slots.len()
    }

    /// The run is over: attempts in flight are dropped, open connections start closing.
    fn stop(&mut self, now: Instant) {
        self.closing_until = Some(now + CLOSE_TIMEOUT);
        for s in 0..self.slots.len() {
            match std::mem::replace(&mut self.slots[s].state, State::Done) {
                State::Waiting | State::Done => self.clear_timer(s),
                State::Connecting(_) | State::Upgrading { .. } => {
                    self.result.abandoned += 1;
                    self.clear_timer(s);
                }
                State::Open(stream) => self.begin_close(s, stream, now),
                closing @ State::Closing(_) => self.slots[s].state = closing,
            }
        }
    }

    fn on_timer(&mut self, s: usize, now: Instant) {
        match std::mem::replace(&mut self.slots[s].state, State::Done) {
            State::Waiting => self.start_attempt(s, now),
            State::Connecting(_) | State::Upgrading { .. } => {
                self.fail(s, Failure::Timeout, "the attempt timed out", now);
            }
            State::Open(stream) => self.begin_close(s, stream, now),
            State::Closing(_) => {
                self.result.unclean_closes += 1;
                self.next(s, now);
            }
            State::Done => {}
        }
    }

    /// Starts a connect, or marks the slot done once the run has stopped.
    fn start_attempt(&mut self, s: usize, now: Instant) {
        if now >= self.stop_at || self.closing_until.is_some() {
            self.slots[s].state = State::Done;
            return;
        }
        self.result.attempts += 1;
        let slot = &mut self.slots[s];
        slot.attempt_at = now;
        slot.stream_gen = slot.stream_gen.wrapping_add(1);
        let gen = slot.stream_gen;
        let connected = self
            .sources
            .for_index(slot.index)
            .map_err(|e| io::Error::other(format!("{e:#}")))
            .and_then(|source| connect_nonblocking(source, self.target.addr));
        match connected {
            Ok(mut stream) => {
                if let Err(e) = self.poll.registry().register(
                    &mut stream,
                    token(s, gen),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    self.fail(s, Failure::Other, &format!("registering: {e}"), now);
                    return;
                }
                self.slots[s].state = State::Connecting(stream);
                self.set_timer(s, now + self.attempt_timeout);
            }
            Err(e) => self.fail(s, Failure::from_io(&e), &format!("connecting: {e}"), now),
        }
    }

    /// Counts a failed attempt and schedules the retry after a backoff.
    fn fail(&mut self, s: usize, why: Failure, msg: &str, now: Instant) {
        *self.result.failures.entry(why.key()).or_default() += 1;
        self.result
            .first_failure
            .get_or_insert_with(|| format!("{}: {msg}", why.key()));
        self.tally.failed += 1;
        let slot = &mut self.slots[s];
        slot.state = State::Waiting;
        slot.failures = slot.failures.saturating_add(1);
        let wait = self.backoff.wait(slot.failures, self.rng.f64());
        self.set_timer(s, now + wait);
    }

    /// After a close: churn starts the next attempt at once; otherwise the slot is done.
    fn next(&mut self, s: usize, now: Instant) {
        self.slots[s].state = State::Waiting;
        if self.kind == PartKind::Churn && self.closing_until.is_none() {
            self.start_attempt(s, now);
        } else {
            self.slots[s].state = State::Done;
            self.clear_timer(s);
        }
    }

    fn on_event(&mut self, s: usize, writable: bool) {
        let now = Instant::now();
        match std::mem::replace(&mut self.slots[s].state, State::Done) {
            State::Connecting(stream) => self.on_connecting(s, stream, writable, now),
            State::Upgrading {
                stream,
                handshake,
                buf,
            } => self.on_upgrading(s, stream, handshake, buf, now),
            State::Open(mut stream) => match drain(&mut stream, &mut self.scratch) {
                Ok(false) => self.slots[s].state = State::Open(stream),
                Ok(true) | Err(_) => {
                    self.result.dropped_by_server += 1;
                    if self.slots[s].back {
                        self.slots[s].back = false;
                        self.result.back -= 1;
                        self.tally.back = self.result.back;
                    }
                    self.clear_timer(s);
                    drop(stream);
                    self.slots[s].state = State::Waiting;
                    self.set_timer(s, now);
                }
            },
            State::Closing(mut stream) => match drain(&mut stream, &mut self.scratch) {
                Ok(false) => self.slots[s].state = State::Closing(stream),
                Ok(true) => {
                    self.result.closed_cleanly += 1;
                    drop(stream);
                    self.next(s, now);
                }
                Err(_) => {
                    self.result.unclean_closes += 1;
                    drop(stream);
                    self.next(s, now);
                }
            },
            other => self.slots[s].state = other,
        }
    }

    fn on_connecting(&mut self, s: usize, mut stream: TcpStream, writable: bool, now: Instant) {
        match stream.take_error() {
            Ok(Some(e)) | Err(e) => {
                return self.fail(s, Failure::from_io(&e), &format!("connecting: {e}"), now);
            }
            Ok(None) => {}
        }
        match stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected && !writable => {
                // A spurious wakeup: still connecting.
                self.slots[s].state = State::Connecting(stream);
                return;
            }
            Err(e) => return self.fail(s, Failure::from_io(&e), &format!("connecting: {e}"), now),
        }
        let _ = stream.set_nodelay(true);
        if self.raw {
            return self.upgraded(s, stream, now);
        }
        let handshake = ClientHandshake::new(self.rng.u128(..).to_ne_bytes(), &[]);
        let request = handshake.request(&self.target.host, &self.target.path, &[]);
        match stream.write(&request) {
            Ok(n) if n == request.len() => {}
            Ok(_) => return self.fail(s, Failure::Other, "the upgrade request was cut short", now),
            Err(e) => {
                return self.fail(s, Failure::from_io(&e), &format!("sending: {e}"), now);
            }
        }
        let gen = self.slots[s].stream_gen;
        if let Err(e) =
            self.poll
                .registry()
                .reregister(&mut stream, token(s, gen), Interest::READABLE)
        {
            return self.fail(s, Failure::Other, &format!("registering: {e}"), now);
        }
        self.slots[s].state = State::Upgrading {
            stream,
            handshake,
            buf: BytesMut::with_capacity(512),
        };
    }

    fn on_upgrading(
        &mut self,
        s: usize,
        mut stream: TcpStream,
        handshake: ClientHandshake,
        mut buf: BytesMut,
        now: Instant,
    ) {
        // A server that refuses (a 503 under shaping, say) answers and closes at once; a
        // loop that runs late reads the answer and the close together, and the answer is
        // what counts.
        let mut closed = false;
        loop {
            match stream.read(&mut self.scratch) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => buf.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return self.fail(s, Failure::from_io(&e), &format!("receiving: {e}"), now);
                }
            }
        }
        match HeadReader::new().poll_head(&buf, MAX_RESPONSE_HEAD_BYTES) {
            Ok(None) if closed => {
                self.fail(s, Failure::Closed, "closed during the upgrade", now);
            }
            Ok(None) => {
                self.slots[s].state = State::Upgrading {
                    stream,
                    handshake,
                    buf,
                };
            }
            Ok(Some(len)) => match handshake.check_response(&buf[..len]) {
                Ok(_) if closed => {
                    self.fail(s, Failure::Closed, "closed right after the upgrade", now);
                }
                Ok(_) => self.upgraded(s, stream, now),
                Err(HandshakeError::Status(code)) => {
                    self.fail(s, Failure::Http(code), &format!("status {code}"), now);
                }
                Err(e) => self.fail(s, Failure::Other, &format!("bad response: {e}"), now),
            },
            Err(e) => self.fail(s, Failure::Other, &format!("bad response: {e}"), now),
        }
    }

    /// An attempt succeeded: count it and hold the connection.
    fn upgraded(&mut self, s: usize, mut stream: TcpStream, now: Instant) {
        let slot = &mut self.slots[s];
        slot.failures = 0;
        let gen = slot.stream_gen;
        let took = now - slot.attempt_at;
        if now < self.stop_at {
            self.result.upgrades += 1;
            self.tally.upgrades += 1;
            record(&mut self.upgrade, took);
            self.series.add(now, 1);
        }
        if self.kind == PartKind::Mass && !self.slots[s].back {
            self.slots[s].back = true;
            self.result.back += 1;
            self.tally.back = self.result.back;
            record(&mut self.reconnect, now - self.t0);
            if self.result.back == self.slots.len() {
                self.result.all_back_ns =
                    Some(u64::try_from((now - self.t0).as_nanos()).unwrap_or(u64::MAX));
            }
        }
        if let Err(e) =
            self.poll
                .registry()
                .reregister(&mut stream, token(s, gen), Interest::READABLE)
        {
            return self.fail(s, Failure::Other, &format!("registering: {e}"), now);
        }
        self.slots[s].state = State::Open(stream);
        match self.kind {
            PartKind::Churn => self.set_timer(s, now + self.hold),
            PartKind::Mass => self.clear_timer(s),
        }
    }

    /// Sends the close (raw: shuts down the write side) and waits for the server's close.
    fn begin_close(&mut self, s: usize, mut stream: TcpStream, now: Instant) {
        let sent = if self.raw {
            stream.shutdown(Shutdown::Write)
        } else {
            let mut codec = Codec::client(Limits::default(), self.rng.u64(..));
            codec.close(Some(CloseFrame::new(CloseCode::NORMAL, "")));
            let mut res = Ok(());
            while let Some(frame) = codec.poll_transmit() {
                res = res.and_then(|()| match stream.write(&frame) {
                    Ok(n) if n == frame.len() => Ok(()),
                    Ok(_) => Err(io::Error::other("the close frame was cut short")),
                    Err(e) => Err(e),
                });
            }
            res
        };
        if sent.is_err() {
            self.result.unclean_closes += 1;
            drop(stream);
            self.clear_timer(s);
            return self.next(s, now);
        }
        self.slots[s].state = State::Closing(stream);
        let until = self.closing_until.unwrap_or(now + CLOSE_TIMEOUT);
        self.set_timer(s, until.min(now + CLOSE_TIMEOUT));
    }

    pub(super) fn finish(mut self) -> PartResult {
        self.result.upgrade_ns = buckets(&self.upgrade);
        self.result.reconnect_ns = buckets(&self.reconnect);
        let span = self.stop_at - self.t0;
        let len = match self.kind {
            PartKind::Churn => span,
            PartKind::Mass => self
                .result
                .all_back_ns
                .map_or(span, |ns| Duration::from_nanos(ns).min(span)),
        };
        self.result.timeline = self.series.into_counts(len);
        self.result
    }
}

/// Reads and discards what is there; `true` at end of stream.
fn drain(stream: &mut TcpStream, scratch: &mut [u8]) -> io::Result<bool> {
    loop {
        match stream.read(scratch) {
            Ok(0) => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Starts a non-blocking connect from `source` (port picked at connect time, as in
/// [`crate::net::connect_from`]) to `dest`.
fn connect_nonblocking(source: Ipv4Addr, dest: SocketAddrV4) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    set_bind_address_no_port(&socket)?;
    socket.bind(&SockAddr::from(SocketAddrV4::new(source, 0)))?;
    match socket.connect(&SockAddr::from(dest)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_keyed_by_reason() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(Failure::from_io(&refused), Failure::Refused);
        let no_port = io::Error::from_raw_os_error(libc::EADDRNOTAVAIL);
        assert_eq!(Failure::from_io(&no_port), Failure::NoPorts);
        let reset = io::Error::from_raw_os_error(libc::ECONNRESET);
        assert_eq!(Failure::from_io(&reset), Failure::Reset);
        assert_eq!(Failure::Http(503).key(), "http 503");
        assert_eq!(Failure::Timeout.key(), "timeout");
    }

    #[test]
    fn tokens_carry_the_slot_and_the_socket_generation() {
        assert_eq!(untoken(token(12_345, 7)), (12_345, 7));
        assert_eq!(untoken(token(0, u32::MAX)), (0, u32::MAX));
    }
}
