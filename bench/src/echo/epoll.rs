//! The epoll driver: one mio `Poll`, every connection on this thread.
//!
//! Connections are opened and upgraded with blocking sockets in batches (the same code as the
//! idle load), then made non-blocking and registered. A round trip is one `write` (the whole
//! frame, unless the socket buffer is full) and one `read` per readiness event: a read that
//! returns less than the buffer drained the socket, so edge-triggered readiness is safe without
//! the extra read that ends in `EWOULDBLOCK`.

use std::{
    io::{self, Read as _, Write as _},
    net,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::{Buf as _, BytesMut};
use mio::{net::TcpStream, Events, Interest, Poll, Registry, Token};
use ringcast_protocol::{Codec, Event, OpCode};

use super::{record, EchoConfig, Outcome, WindowStart, CLOSE_GRACE};
use crate::{
    idle::{self, IdleConn, OpenSet, WorkerConfig},
    stats::latency_histogram,
};

/// Bytes one `read` may return; the buffer is shared by all connections.
const READ_BYTES: usize = 64 << 10;

/// The longest one `epoll_wait` blocks, so phase changes are never late by more.
const MAX_WAIT: Duration = Duration::from_millis(50);

pub(super) fn run(cfg: &EchoConfig) -> Result<Outcome> {
    let set = idle::open_range(&WorkerConfig {
        target: cfg.target.clone(),
        range: 0..cfg.conns,
        raw: cfg.raw,
        sources: cfg.sources,
        open_timeout: cfg.connect_timeout,
        lifetime: Duration::MAX,
    })?;
    if set.failed > 0 {
        bail!(
            "{} of {} connections failed to open; first: {}",
            set.failed,
            cfg.conns,
            set.first_error.as_deref().unwrap_or("?")
        );
    }

    let mut poll = Poll::new().context("creating the epoll instance")?;
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
            sent_at: Instant::now(),
            dead: false,
        });
    }

    let payload = cfg.payload();
    let mut scratch = vec![0u8; READ_BYTES.max(cfg.size_bytes + 16)];
    let mut histogram = latency_histogram();
    let mut events = Events::with_capacity(1024);
    let mut errors = Errors::default();

    for conn in &mut conns {
        if let Err(e) = conn.send(&payload, poll.registry()) {
            errors.note(conn, &e);
        }
    }

    let warm_end = Instant::now() + cfg.warmup;
    let mut window: Option<(WindowStart, Instant, u64)> = None;
    loop {
        let now = Instant::now();
        let next_change = match window {
            None if now >= warm_end => {
                let start = WindowStart::now(cfg.server_pid)?;
                window = Some((start, start.at + cfg.duration, errors.count));
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
        let wait = next_change.saturating_duration_since(now).min(MAX_WAIT);
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("epoll_wait"),
        }
        let measuring = window.is_some();
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
                .and_then(|done| match done {
                    Some(latency) => {
                        if measuring {
                            record(&mut histogram, latency);
                        }
                        conn.send(&payload, poll.registry())
                    }
                    None => Ok(()),
                });
            if let Err(e) = result {
                errors.note(conn, &e);
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }
    }
    let (start, _, errors_at_start) = window.expect("the loop only ends inside the window");
    let window = start.end(cfg.server_pid)?;
    let errors_in_window = errors.count - errors_at_start;

    // Close the live connections with the blocking code the idle load uses, bounded.
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
        });
    }
    live.close(CLOSE_GRACE);

    Ok(Outcome {
        histogram,
        window,
        errors: errors_in_window,
        first_error: if errors_in_window > 0 {
            errors.first
        } else {
            None
        },
    })
}

/// Connection failures.
#[derive(Debug, Default)]
struct Errors {
    count: u64,
    first: Option<String>,
}

impl Errors {
    fn note(&mut self, conn: &mut Conn, err: &anyhow::Error) {
        conn.dead = true;
        self.count += 1;
        self.first.get_or_insert_with(|| format!("{err:#}"));
    }
}

/// One client connection in the loop.
#[derive(Debug)]
struct Conn {
    token: Token,
    stream: TcpStream,
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
    /// When the message in flight was queued.
    sent_at: Instant,
    /// Failed; ignored from then on.
    dead: bool,
}

impl Conn {
    /// Queues the next message and sends what the socket takes.
    fn send(&mut self, payload: &[u8], registry: &Registry) -> Result<()> {
        match &mut self.codec {
            Some(codec) => codec.encode_frame(true, OpCode::Binary, payload, &mut self.out),
            None => self.out.extend_from_slice(payload),
        }
        self.sent_at = Instant::now();
        self.flush(registry)
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

    /// Handles readiness. Returns the round-trip time once the echo is complete.
    fn on_ready(
        &mut self,
        readable: bool,
        writable: bool,
        scratch: &mut [u8],
        payload: &[u8],
        registry: &Registry,
    ) -> Result<Option<Duration>> {
        if writable {
            self.flush(registry)?;
        }
        if !readable {
            return Ok(None);
        }
        loop {
            let n = match self.stream.read(scratch) {
                Ok(0) => bail!("the server closed the connection"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("receiving"),
            };
            if self.take(&scratch[..n], payload, registry)? {
                return Ok(Some(self.sent_at.elapsed()));
            }
            if n < scratch.len() {
                // Drained: edge-triggered readiness fires again when more arrives.
                return Ok(None);
            }
        }
    }

    /// Consumes received bytes; `true` once the whole echo has arrived.
    fn take(&mut self, bytes: &[u8], payload: &[u8], registry: &Registry) -> Result<bool> {
        let Some(codec) = &mut self.codec else {
            self.got += bytes.len();
            ensure!(
                self.got <= payload.len(),
                "{} bytes came back for {} sent",
                self.got,
                payload.len()
            );
            let done = self.got == payload.len();
            if done {
                self.got = 0;
            }
            return Ok(done);
        };
        self.rbuf.extend_from_slice(bytes);
        let mut owed = false;
        let done = loop {
            match codec.poll_event(&mut self.rbuf)? {
                Some(Event::Binary(echo)) => {
                    ensure!(
                        echo[..] == payload[..],
                        "the echo differs from the message sent ({} bytes back)",
                        echo.len()
                    );
                    break true;
                }
                Some(Event::Close(frame)) => bail!("the server closed: {frame:?}"),
                // A ping: queue the pong the codec owes. Pongs and text are ignored.
                Some(_) => {
                    while let Some(frame) = codec.poll_transmit() {
                        self.out.extend_from_slice(&frame);
                        owed = true;
                    }
                }
                None => break false,
            }
        };
        if owed {
            self.flush(registry)?;
        }
        Ok(done)
    }
}
