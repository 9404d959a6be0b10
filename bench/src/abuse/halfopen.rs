//! The half-open attack: connections that dribble an upgrade request one byte every
//! `dribble_every` (never finishing it) and connections that send nothing, from
//! `halfopen_sources` source addresses (127.0.0.2 onwards). Every connection the server closes
//! is counted by the status it answered (408 handshake timeout, 429 too many unfinished
//! upgrades from the address, 503 no room) and opened again after `reopen_after`.
//!
//! One thread drives them all with mio (epoll): non-blocking connects bound to their source
//! address, reads only on readiness, dribbles and reopens when due. Bounded: the loop ends at
//! the attack's end, and at most `halfopen_conns` connections are open at once.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use mio::{net::TcpStream, Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::{report::Tally, AbuseConfig};
use crate::{
    idle::raise_fd_limit,
    net::{set_bind_address_no_port, Target},
};

/// The upgrade request the dribbling connections send, all but its last byte.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Version: 13\r\n\r\n";

/// How often the loop wakes to dribble and reopen when no socket is readable.
const TICK: Duration = Duration::from_millis(20);

/// One attacking connection's state.
#[derive(Debug)]
struct Slot {
    stream: Option<TcpStream>,
    source: Ipv4Addr,
    dribble: bool,
    /// Request bytes sent so far.
    sent: usize,
    next_byte: Instant,
    reopen_at: Instant,
    /// What the server answered so far.
    answer: Vec<u8>,
}

/// Runs the attack until `end`.
pub(super) fn run(cfg: &AbuseConfig, end: Instant) -> Result<Tally> {
    raise_fd_limit();
    let mut tally = Tally::default();
    let mut poll = Poll::new().context("creating the poll")?;
    let mut events = Events::with_capacity(1024);
    let start = Instant::now();
    let sources = u32::from(cfg.halfopen_sources.max(1));
    let mut slots: Vec<Slot> = (0..cfg.halfopen_conns)
        .map(|i| Slot {
            stream: None,
            source: Ipv4Addr::new(127, 0, 0, 2 + (i as u32 % sources) as u8),
            dribble: i % 2 == 0,
            sent: 0,
            // Spread the dribblers' bytes over the period.
            next_byte: start + cfg.dribble_every.mul_f64((i % 100) as f64 / 100.0),
            reopen_at: start,
            answer: Vec::new(),
        })
        .collect();
    let mut scratch = [0u8; 1024];
    while Instant::now() < end {
        let now = Instant::now();
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.stream.is_none() {
                if now >= slot.reopen_at {
                    slot.reopen_at = now + cfg.reopen_after;
                    match open(&cfg.target, slot.source) {
                        Ok(mut s) => {
                            poll.registry()
                                .register(&mut s, Token(i), Interest::READABLE)?;
                            slot.stream = Some(s);
                            slot.sent = 0;
                            slot.answer.clear();
                            tally.sent += 1;
                        }
                        Err(e) => tally.fail(&e.into()),
                    }
                }
                continue;
            }
            if slot.dribble && now >= slot.next_byte && slot.sent < REQUEST.len() - 1 {
                slot.next_byte = now + cfg.dribble_every;
                if let Some(s) = &mut slot.stream {
                    if let Ok(n) = s.write(&REQUEST[slot.sent..=slot.sent]) {
                        slot.sent += n;
                    }
                }
            }
        }
        let left = end.saturating_duration_since(Instant::now());
        poll.poll(&mut events, Some(left.min(TICK)))?;
        for event in &events {
            let slot = &mut slots[event.token().0];
            let Some(stream) = &mut slot.stream else {
                continue;
            };
            let closed = loop {
                match stream.read(&mut scratch) {
                    Ok(0) => break true,
                    Ok(n) => slot.answer.extend_from_slice(&scratch[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break true,
                }
            };
            if closed {
                let mut s = slot.stream.take().expect("checked above");
                let _ = poll.registry().deregister(&mut s);
                tally.answer(&classify(&slot.answer));
                slot.reopen_at = Instant::now() + cfg.reopen_after;
            }
        }
    }
    Ok(tally)
}

/// `http STATUS` from a response's status line, or `no answer`.
fn classify(answer: &[u8]) -> String {
    match answer.get(9..12).and_then(|s| std::str::from_utf8(s).ok()) {
        Some(status) if answer.starts_with(b"HTTP/1.1 ") => format!("http {status}"),
        _ => "no answer".to_owned(),
    }
}

/// Starts a non-blocking connect from `source` to the target.
fn open(target: &Target, source: Ipv4Addr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    set_bind_address_no_port(&socket)?;
    socket.bind(&SockAddr::from(SocketAddrV4::new(source, 0)))?;
    match socket.connect(&SockAddr::from(target.addr)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}
