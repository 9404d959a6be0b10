//! A blocking client of the broker's JSON dialect (`ringcast.v1.json`), for the attackers and
//! the live client: send a request, read what comes back until a deadline.
//!
//! Every read and write is bounded: reads wait at most until the caller's deadline, writes at
//! most [`WRITE_TIMEOUT`] (a server that stops reading, as it does when a budget is spent,
//! fails the write rather than holding the attacker).

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    ops::Range,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use bytes::BytesMut;
use ringcast_protocol::{envelope::Encoding, Codec, Event, OpCode};
use serde_json::Value;

use crate::{
    idle::{self, WorkerConfig},
    net::{SourceAddrs, Target},
};

/// The longest one request may take to write.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the server sent.
#[derive(Debug)]
pub(super) enum Got {
    /// One envelope message.
    Json(Value),
    /// A close frame: its code (none if the frame had none) and reason.
    Closed(Option<u16>, String),
}

/// One upgraded connection speaking the JSON dialect.
#[derive(Debug)]
pub(super) struct JsonClient {
    stream: TcpStream,
    codec: Codec,
    rbuf: BytesMut,
    out: BytesMut,
}

impl JsonClient {
    /// Connects from `source`, upgrades offering `ringcast.v1.json`, and fails unless the
    /// server selects it, all within `timeout`.
    ///
    /// # Errors
    /// The connection or the upgrade failed.
    pub(super) fn open(target: &Target, source: Ipv4Addr, timeout: Duration) -> Result<Self> {
        let last = source.octets()[3];
        let set = idle::open_range(
            &WorkerConfig {
                target: target.clone(),
                range: Range { start: 0, end: 1 },
                raw: false,
                sources: SourceAddrs {
                    first: last,
                    per_addr: 1,
                },
                open_timeout: timeout,
                lifetime: Duration::MAX,
            },
            &[Encoding::Json.subprotocol()],
        )?;
        let Some(conn) = set.conns.into_iter().next() else {
            bail!(
                "upgrade from {source} failed: {}",
                set.first_error.as_deref().unwrap_or("?")
            );
        };
        conn.stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(Self {
            stream: conn.stream,
            codec: conn.codec.context("a WebSocket connection")?,
            rbuf: conn.rest,
            out: BytesMut::new(),
        })
    }

    /// Sends one request (a text message).
    ///
    /// # Errors
    /// The socket failed or took longer than [`WRITE_TIMEOUT`].
    pub(super) fn send(&mut self, request: &str) -> Result<()> {
        self.out.clear();
        self.codec
            .encode_frame(true, OpCode::Text, request.as_bytes(), &mut self.out);
        self.stream
            .write_all(&self.out)
            .context("sending a request")
    }

    /// The next message from the server, or `None` if none came by `deadline`.
    ///
    /// # Errors
    /// The socket failed or ended without a close frame, or the server broke the protocol.
    pub(super) fn recv(&mut self, deadline: Instant) -> Result<Option<Got>> {
        let mut scratch = [0u8; 16 * 1024];
        loop {
            if let Some(got) = self.poll()? {
                return Ok(Some(got));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            match self.stream.read(&mut scratch) {
                Ok(0) => bail!("the server closed the connection without a close frame"),
                Ok(n) => self.rbuf.extend_from_slice(&scratch[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e).context("receiving"),
            }
        }
    }

    /// Parses one message out of what was read, answering pings on the way.
    fn poll(&mut self) -> Result<Option<Got>> {
        while let Some(event) = self.codec.poll_event(&mut self.rbuf)? {
            match event {
                Event::Text(text) => {
                    let value = serde_json::from_slice(text.as_bytes())
                        .context("the server sent a text message that is not JSON")?;
                    return Ok(Some(Got::Json(value)));
                }
                Event::Binary(_) => bail!("a binary message came on a JSON connection"),
                Event::Close(frame) => {
                    let (code, reason) = frame.map_or((None, String::new()), |f| {
                        (Some(f.code.as_u16()), f.reason.to_string())
                    });
                    return Ok(Some(Got::Closed(code, reason)));
                }
                _ => {
                    while let Some(frame) = self.codec.poll_transmit() {
                        self.stream.write_all(&frame)?;
                    }
                }
            }
        }
        Ok(None)
    }
}

/// What an answer to a request says, for counting: `ack`, the error's code, `close CODE`,
/// or `None` for a message that answers no request (a topic message, `reset`, `dropped`).
pub(super) fn answer_kind(got: &Got) -> Option<String> {
    match got {
        Got::Closed(code, _) => Some(match code {
            Some(c) => format!("close {c}"),
            None => "close".to_owned(),
        }),
        Got::Json(v) => match v.get("type").and_then(Value::as_str) {
            Some("ack") => Some("ack".to_owned()),
            Some("error") => Some(
                v.get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("error")
                    .to_owned(),
            ),
            Some("pong") => Some("pong".to_owned()),
            _ => None,
        },
    }
}
