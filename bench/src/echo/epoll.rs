//! The epoll driver: one mio `Poll`, every connection on this thread.
//!
//! Connections are opened and upgraded with blocking sockets in batches (the same code as the
//! idle load), then made non-blocking and registered. A round trip is one `write` (the whole
//! frame, unless the socket buffer is full) and one `read` per readiness event: a read that
//! returns less than the buffer drained the socket, so edge-triggered readiness is safe without
//! the extra read that ends in `EWOULDBLOCK`.
//!
//! The [`Conn`] here also serves the fixed-rate loop ([`super::rate`]), which pipelines: a
//! connection may have many messages in flight, and [`Conn::pump`] sends what the schedule has
//! made due without queueing more than [`OUT_HIGH_BYTES`] at a time.

use std::{
    io::{self, Read as _, Write as _},
    net,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::{Buf as _, BytesMut};
use mio::{net::TcpStream, Events, Interest, Poll, Registry, Token};
use ringcast_protocol::{Codec, Event, OpCode};

use super::{EchoConfig, Outcome, CLOSE_GRACE};
use crate::{
    idle::{self, IdleConn, OpenSet, WorkerConfig},
    progress::Progress,
    stats::latency_histogram,
    timeline::{self, Timeline},
    window::{record, WindowStart},
};

/// Bytes one `read` may return; the buffer is shared by all connections.
const READ_BYTES: usize = 64 << 10;

/// The longest one `epoll_wait` blocks, so phase changes are never late by more.
pub(super) const MAX_WAIT: Duration = Duration::from_millis(50);

/// The most bytes [`Conn::pump`] queues before it waits for the socket to take them, so a
/// connection that falls behind its schedule holds at most this much beyond the socket buffer.
pub(super) const OUT_HIGH_BYTES: usize = 64 << 10;

/// Opens and upgrades every connection, then registers them, readable, with a new `Poll`.
pub(super) fn open(cfg: &EchoConfig) -> Result<(Poll, Vec<Conn>)> {
    let set = idle::open_range(
        &WorkerConfig {
            target: cfg.target.clone(),
            range: 0..cfg.conns,
            raw: cfg.raw,
            sources: cfg.sources,
            open_timeout: cfg.connect_timeout,
            lifetime: Duration::MAX,
        },
        &[],
    )?;
    if set.failed > 0 {
        bail!(
            "{} of {} connections failed to open; first: {}",
            set.failed,
            cfg.conns,
            set.first_error.as_deref().unwrap_or("?")
        );
    }

    let poll = Poll::new().context("creating the epoll instance")?;
    let mut conns = Vec::with_capacity(set.conns.len());
    for (i, conn) in set.conns.into_iter().enumerate() {
        conn.stream.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(conn.stream);
        poll.registry()
            .register(&mut stream, Token(i), Interest::READABLE)?;
        conns.push(Conn {
            token: Token(i),
            stream,
            codec: conn.codec,
            rbuf: BytesMut::with_capacity(cfg.size_bytes + 16),
            out: BytesMut::with_capacity(cfg.size_bytes + 16),
            wants_write: false,
            got: 0,
            sent: 0,
            recvd: 0,
            due: 0,
            sent_at: Instant::now(),
            dead: false,
        });
    }
    Ok((poll, conns))
}

/// The closed loop: one message in flight per connection.
pub(super) fn run(cfg: &EchoConfig) -> Result<Outcome> {
    let (mut poll, mut conns) = open(cfg)?;
    let payload = cfg.payload();
    let mut scratch = vec![0u8; READ_BYTES.max(cfg.size_bytes + 16)];
    let mut histogram = latency_histogram();
    let mut events = Events::with_capacity(1024);
    let mut errors = Errors::default();
    let mut progress = Progress::for_duration(cfg.progress, "echo", cfg.warmup + cfg.duration);

    for conn in &mut conns {
        if let Err(e) = conn.send(&payload, poll.registry()) {
            errors.note(conn, &e);
        }
    }

    let born = Instant::now();
    let warm_end = born + cfg.warmup;
    let mut window: Option<(WindowStart, Instant, u64)> = None;
    let mut series: Option<Timeline> = None;
    loop {
        let now = Instant::now();
        let next_change = match window {
            None if now >= warm_end => {
                let start = WindowStart::now(cfg.server_pid)?;
                window = Some((start, start.at + cfg.duration, errors.count));
                series = Some(Timeline::new(start.at, timeline::INTERVAL, cfg.duration));
                continue;
            }
            None => warm_end,
            Some((_, end, _)) if now >= end => break,
            Some((_, end, _)) => end,
        };
        if errors.count == conns.len() as u64 {
            bail!(
                "every connection failed; first: {}",
                errors.first.as_deref().unwrap_or("?")
            );
        }
        progress.update_time(now, now - born, || {
            format!("{} round trips measured", histogram.len())
        });
        let wait = next_change.saturating_duration_since(now).min(MAX_WAIT);
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("epoll_wait"),
        }
        for event in &events {
            let Some(conn) = conns.get_mut(event.token().0) else {
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
                    if done == 0 {
                        return Ok(());
                    }
                    let at = Instant::now();
                    if let Some(series) = &mut series {
                        record(&mut histogram, at - conn.sent_at);
                        series.add(at, 1);
                    }
                    conn.send(&payload, poll.registry())
                });
            if let Err(e) = result {
                errors.note(conn, &e);
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }
    }
    progress.finish();
    let (start, _, errors_at_start) = window.expect("the loop only ends inside the window");
    let window = start.end(cfg.server_pid)?;
    let errors_in_window = errors.count - errors_at_start;
    close(poll, conns);

    Ok(Outcome {
        histogram,
        window,
        errors: errors_in_window,
        first_error: if errors_in_window > 0 {
            errors.first
        } else {
            None
        },
        throughput: series.map_or_else(Vec::new, |s| s.into_counts(window.length)),
        sent_in_window: None,
        unanswered: 0,
        send_lag: None,
    })
}

/// Closes the live connections with the blocking code the idle load uses, bounded by
/// [`CLOSE_GRACE`].
pub(super) fn close(poll: Poll, conns: Vec<Conn>) {
    drop(poll);
    let mut live = OpenSet::default();
    for conn in conns.into_iter().filter(|c| !c.dead) {
        let mut stream = net::TcpStream::from(conn.stream);
        // A partly sent message must go out whole before the close frame.
        if stream.set_nonblocking(false).is_err() || stream.write_all(&conn.out).is_err() {
            continue;
        }
        live.conns.push(IdleConn {
            stream,
            codec: conn.codec,
            rest: BytesMut::new(),
        });
    }
    live.close(CLOSE_GRACE);
}

/// Connection failures.
#[derive(Debug, Default)]
pub(super) struct Errors {
    pub(super) count: u64,
    pub(super) first: Option<String>,
}

impl Errors {
    pub(super) fn note(&mut self, conn: &mut Conn, err: &anyhow::Error) {
        conn.dead = true;
        self.count += 1;
        self.first.get_or_insert_with(|| format!("{err:#}"));
    }
}

/// One client connection in the loop.
#[derive(Debug)]
pub(super) struct Conn {
    token: Token,
    pub(super) stream: TcpStream,
    /// The client codec; `None` for raw TCP.
    codec: Option<Codec>,
    /// Received bytes not yet parsed (WebSocket only).
    rbuf: BytesMut,
    /// Bytes queued to send.
    out: BytesMut,
    /// Whether writable readiness is registered (the socket buffer was full).
    wants_write: bool,
    /// Raw mode: bytes of the current echo received so far.
    got: usize,
    /// Messages queued to send so far.
    pub(super) sent: u64,
    /// Echoes received so far; they come back in order, so echo `k` answers message `k`.
    pub(super) recvd: u64,
    /// Fixed rate: messages the schedule has made due so far ([`Conn::pump`] sends them).
    pub(super) due: u64,
    /// Closed loop: when the message in flight was queued.
    sent_at: Instant,
    /// Failed; ignored from then on.
    pub(super) dead: bool,
}

impl Conn {
    /// Queues one message without sending it.
    fn queue(&mut self, payload: &[u8]) {
        match &mut self.codec {
            Some(codec) => codec.encode_frame(true, OpCode::Binary, payload, &mut self.out),
            None => self.out.extend_from_slice(payload),
        }
        self.sent += 1;
    }

    /// Queues the next message and sends what the socket takes (closed loop).
    fn send(&mut self, payload: &[u8], registry: &Registry) -> Result<()> {
        self.queue(payload);
        self.sent_at = Instant::now();
        self.flush(registry)
    }

    /// Sends messages until `self.due` are sent or the socket is full (fixed rate). Never
    /// queues more than [`OUT_HIGH_BYTES`] beyond what the socket took, so a connection behind
    /// its schedule costs bounded memory; the rest go out when the socket drains.
    pub(super) fn pump(&mut self, payload: &[u8], registry: &Registry) -> Result<()> {
        while self.sent < self.due && !self.wants_write {
            while self.sent < self.due && self.out.len() < OUT_HIGH_BYTES {
                self.queue(payload);
            }
            self.flush(registry)?;
        }
        Ok(())
    }

    /// Writes queued bytes until done or the socket is full; asks for writable readiness only
    /// while bytes are left.
    fn flush(&mut self, registry: &Registry) -> Result<()> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => bail!("the socket accepted no bytes"),
                Ok(n) => self.out.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.wants_write {
                        registry.reregister(
                            &mut self.stream,
                            self.token,
                            Interest::READABLE | Interest::WRITABLE,
                        )?;
                        self.wants_write = true;
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("sending"),
            }
        }
        // Reset to the start of the allocation, so the next frame needs no new one.
        self.out.clear();
        if self.wants_write {
            registry.reregister(&mut self.stream, self.token, Interest::READABLE)?;
            self.wants_write = false;
        }
        Ok(())
    }

    /// Handles readiness: sends what is queued, reads until the socket is drained. Returns how
    /// many echoes completed; they answer messages `recvd - n .. recvd`.
    pub(super) fn on_ready(
        &mut self,
        readable: bool,
        writable: bool,
        scratch: &mut [u8],
        payload: &[u8],
        registry: &Registry,
    ) -> Result<u64> {
        if writable {
            self.flush(registry)?;
        }
        if !readable {
            return Ok(0);
        }
        let mut done = 0;
        loop {
            let n = match self.stream.read(scratch) {
                Ok(0) => bail!("the server closed the connection"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(done),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("receiving"),
            };
            done += self.take(&scratch[..n], payload, registry)?;
            if n < scratch.len() {
                // Drained: edge-triggered readiness fires again when more arrives.
                return Ok(done);
            }
        }
    }

    /// Consumes received bytes; returns how many echoes they completed.
    fn take(&mut self, bytes: &[u8], payload: &[u8], registry: &Registry) -> Result<u64> {
        let Some(codec) = &mut self.codec else {
            let (done, got) = split_raw(self.got, bytes.len(), payload.len());
            ensure!(
                self.recvd + done < self.sent || (self.recvd + done == self.sent && got == 0),
                "more bytes came back than were sent ({} messages of {} bytes sent)",
                self.sent,
                payload.len()
            );
            self.got = got;
            self.recvd += done;
            return Ok(done);
        };
        self.rbuf.extend_from_slice(bytes);
        let mut owed = false;
        let mut done = 0;
        loop {
            match codec.poll_event(&mut self.rbuf)? {
                Some(Event::Binary(echo)) => {
                    ensure!(
                        echo[..] == payload[..],
                        "the echo differs from the message sent ({} bytes back)",
                        echo.len()
                    );
                    ensure!(
                        self.recvd < self.sent,
                        "an echo came back for a message never sent"
                    );
                    self.recvd += 1;
                    done += 1;
                }
                Some(Event::Close(frame)) => bail!("the server closed: {frame:?}"),
                // A ping: queue the pong the codec owes. Pongs and text are ignored.
                Some(_) => {
                    while let Some(frame) = codec.poll_transmit() {
                        self.out.extend_from_slice(&frame);
                        owed = true;
                    }
                }
                None => break,
            }
        }
        if owed {
            self.flush(registry)?;
        }
        Ok(done)
    }
}

/// Raw echoes have no framing: `got` bytes of an echo were in hand and `len` more arrived.
/// Returns the echoes of `size` bytes now complete and the bytes of the next one in hand.
fn split_raw(got: usize, len: usize, size: usize) -> (u64, usize) {
    let total = got + len;
    ((total / size) as u64, total % size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_complete_echoes_across_reads() {
        assert_eq!(split_raw(0, 5, 20), (0, 5));
        assert_eq!(split_raw(5, 15, 20), (1, 0));
        assert_eq!(split_raw(15, 50, 20), (3, 5));
    }
}
