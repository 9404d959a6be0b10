//! A non-blocking WebSocket client connection on mio: queue frames, flush what the socket
//! takes, read until drained and hand each complete message to the caller.
//!
//! Owns the byte shuffling between a socket and the client codec of `ringcast-protocol`
//! (pongs the codec owes are sent, a close from the server is an error). It must not measure
//! or decide what a message means; the load that drives it does. Connections come from
//! [`crate::idle::open_range`] (blocking, upgraded) and go back to blocking sockets for the
//! bounded close ([`MioConn::into_blocking`]).

use std::{
    io::{self, Read as _, Write as _},
    net,
};

use anyhow::{bail, Context as _, Result};
use bytes::{Buf as _, Bytes, BytesMut};
use mio::{net::TcpStream, Interest, Registry, Token};
use ringcast_protocol::{Codec, Event, OpCode};

use crate::idle::IdleConn;

/// One upgraded client connection registered with a mio `Poll` (edge-triggered).
#[derive(Debug)]
pub(crate) struct MioConn {
    token: Token,
    stream: TcpStream,
    codec: Codec,
    /// Received bytes not yet parsed.
    rbuf: BytesMut,
    /// Bytes queued to send.
    out: BytesMut,
    /// Whether writable readiness is registered (the socket buffer was full).
    wants_write: bool,
    /// Text messages are passed on like binary ones instead of refused.
    pass_text: bool,
}

impl MioConn {
    /// Makes an upgraded blocking connection non-blocking and registers it for readable
    /// readiness under `token`. Bytes that came after the upgrade response are parsed first.
    ///
    /// # Errors
    /// The connection is raw TCP (no codec), or the socket cannot be switched or registered.
    pub(crate) fn register(conn: IdleConn, token: Token, registry: &Registry) -> Result<Self> {
        let codec = conn
            .codec
            .context("a WebSocket connection is needed, not raw TCP")?;
        conn.stream.set_nonblocking(true)?;
        let mut stream = TcpStream::from_std(conn.stream);
        registry.register(&mut stream, token, Interest::READABLE)?;
        Ok(Self {
            token,
            stream,
            codec,
            rbuf: conn.rest,
            out: BytesMut::new(),
            wants_write: false,
            pass_text: false,
        })
    }

    /// Passes text messages on to `on_message` (as their UTF-8 bytes) instead of refusing
    /// them; the broker's JSON envelope travels in text messages.
    #[must_use]
    pub(crate) fn passing_text(mut self) -> Self {
        self.pass_text = true;
        self
    }

    /// Queues one binary message and sends what the socket takes.
    ///
    /// # Errors
    /// The socket failed.
    pub(crate) fn send_binary(&mut self, payload: &[u8], registry: &Registry) -> Result<()> {
        self.queue(OpCode::Binary, payload);
        self.flush(registry)
    }

    /// Queues one message without sending it (see [`MioConn::flush`]).
    pub(crate) fn queue(&mut self, opcode: OpCode, payload: &[u8]) {
        self.codec
            .encode_frame(true, opcode, payload, &mut self.out);
    }

    /// Bytes queued and not yet sent.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.out.len()
    }

    /// Writes queued bytes until done or the socket is full; asks for writable readiness only
    /// while bytes are left.
    ///
    /// # Errors
    /// The socket failed or accepted nothing.
    pub(crate) fn flush(&mut self, registry: &Registry) -> Result<()> {
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
        // Back to the start of the allocation, so the next frame needs no new one.
        self.out.clear();
        if self.wants_write {
            registry.reregister(&mut self.stream, self.token, Interest::READABLE)?;
            self.wants_write = false;
        }
        Ok(())
    }

    /// Handles one readiness event: flushes if writable, then (if readable) reads until the
    /// socket is drained and passes each complete binary message to `on_message`, in order.
    /// Text messages are refused unless [`MioConn::passing_text`]; pings are answered.
    ///
    /// A read that returns less than `scratch` drained the socket, so edge-triggered
    /// readiness is safe without the extra read that ends in `EWOULDBLOCK`.
    ///
    /// # Errors
    /// The socket failed or reached end of stream, the server broke the protocol or sent a
    /// close frame or a text message it refuses, or `on_message` failed.
    pub(crate) fn on_ready(
        &mut self,
        readable: bool,
        writable: bool,
        scratch: &mut [u8],
        registry: &Registry,
        mut on_message: impl FnMut(Bytes) -> Result<()>,
    ) -> Result<()> {
        if writable {
            self.flush(registry)?;
        }
        if !readable {
            return Ok(());
        }
        loop {
            let n = match self.stream.read(scratch) {
                Ok(0) => bail!("the server closed the connection"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("receiving"),
            };
            self.rbuf.extend_from_slice(&scratch[..n]);
            self.parse(&mut on_message, registry)?;
            if n < scratch.len() {
                break;
            }
        }
        Ok(())
    }

    fn parse(
        &mut self,
        on_message: &mut impl FnMut(Bytes) -> Result<()>,
        registry: &Registry,
    ) -> Result<()> {
        let mut owed = false;
        while let Some(event) = self.codec.poll_event(&mut self.rbuf)? {
            match event {
                Event::Binary(message) => on_message(message)?,
                Event::Text(text) if self.pass_text => on_message(text.into_bytes())?,
                Event::Text(text) => bail!("a text message ({} bytes) came", text.len()),
                Event::Close(frame) => bail!("the server closed: {frame:?}"),
                // A ping: send the pong the codec queued. Pongs are ignored.
                _ => {
                    while let Some(frame) = self.codec.poll_transmit() {
                        self.out.extend_from_slice(&frame);
                        owed = true;
                    }
                }
            }
        }
        if owed {
            self.flush(registry)?;
        }
        Ok(())
    }

    /// Stops readiness events for the connection (it failed and is left out), best effort.
    pub(crate) fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }

    /// Deregisters the connection and makes it blocking again, with any partly sent frame
    /// written out whole, so the caller can close it (see `OpenSet::close`).
    /// `None` if the socket failed on the way.
    pub(crate) fn into_blocking(mut self, registry: &Registry) -> Option<IdleConn> {
        let _ = registry.deregister(&mut self.stream);
        let mut stream = net::TcpStream::from(self.stream);
        if stream.set_nonblocking(false).is_err() || stream.write_all(&self.out).is_err() {
            return None;
        }
        Some(IdleConn {
            stream,
            codec: Some(self.codec),
            rest: BytesMut::new(),
        })
    }
}
