//! permessage-deflate (RFC 7692): negotiating it in the upgrade, and the raw deflate streams
//! the codec compresses and inflates messages with.
//!
//! Owns the parameters (what an endpoint is willing to do, [`DeflateConfig`], and what both
//! ends agreed, [`DeflateParams`]), reading and writing `Sec-WebSocket-Extensions` for both
//! roles, and the compressor and decompressor state. Framing rules that involve RSV1 live in
//! the codec, which calls into here.
//!
//! ## Window bits 8
//!
//! zlib (and zlib-rs) cannot produce a raw deflate stream with a 256-byte window: asked for 8
//! it fails. So an offer whose `server_max_window_bits` is 8 is **declined** (answering 9
//! would break RFC 7692 §7.1.2.1, which makes the offered value an upper bound); the next
//! offer, if any, is tried. `client_max_window_bits=8` is accepted: it bounds what the peer
//! produces, and a decoder with a 512-byte window reads a 256-byte-window stream.
//!
//! ## Memory
//!
//! A codec allocates its compressor and decompressor on first use. With no context takeover
//! in a direction the state is returned after each message to a small per-thread pool
//! ([`POOL_SIZE`] of each kind per window size), so an idle connection holds none and a
//! thread-per-core server reuses a few per shard. With context takeover the state must live
//! as long as the connection (that is what the peer relies on).

use std::cell::RefCell;
use std::fmt::Write as _;

use bytes::{Bytes, BytesMut};
use flate2::{Decompress, FlushDecompress, Status};
use zlib_rs::{Deflate as Compress, DeflateConfig as ZConfig, DeflateFlush};

use crate::error::{HandshakeError, ProtocolError};

/// The extension token.
pub const EXTENSION_NAME: &str = "permessage-deflate";

/// The bytes RFC 7692 §7.2.1 strips from the end of each compressed message (the end of a
/// sync flush) and §7.2.2 appends before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xFF, 0xFF];

/// Compressors (and, separately, decompressors) kept per thread for reuse by connections
/// without context takeover.
pub const POOL_SIZE: usize = 4;

/// What one endpoint is willing to do. Used by both roles: a server answers offers with it
/// ([`negotiate`]), a client builds its offer from it ([`DeflateConfig::offer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeflateConfig {
    /// The server compresses each message on its own, keeping no context between messages.
    /// Server: always answered (`server_no_context_takeover`), which lets one compressed frame
    /// be shared by every subscriber. Client: requested in the offer. Default true.
    pub server_no_context_takeover: bool,
    /// The client compresses each message on its own. Server: always asked for, so the
    /// server's decompressor can be released between messages. Client: offered. Default false.
    pub client_no_context_takeover: bool,
    /// The largest window the server compresses with, as a power of two (9 to 15). Server: its
    /// own cap (answered when below 15). Client: requested when below 15. Default 15.
    pub server_max_window_bits: u8,
    /// The largest window the client compresses with (9 to 15; a client's offer of 8 is
    /// accepted). Server: asked of clients that signal support, when below 15. Client: offered.
    /// Default 15.
    pub client_max_window_bits: u8,
    /// Compression level, 0 (store) to 9 (smallest). Default 1: fastest, most of the gain on
    /// JSON (bench/RESULTS.md).
    pub level: u8,
    /// Messages shorter than this many bytes are sent uncompressed (RSV1 clear), as RFC 7692
    /// §6 allows. Default 64.
    pub threshold: usize,
    /// The compressor's memory level, 1 to 9 (zlib's `memLevel`): its hash table has
    /// `2^(mem_level + 7)` entries and its pending buffer grows in step. Default 8 (zlib's
    /// default). Lower saves memory per compressor (bench/RESULTS.md: bytes per connection,
    /// and the ratio, unchanged at level 1, worse at level 6 below 4); it matters where a
    /// compressor lives as long as a connection (context takeover).
    pub mem_level: u8,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        Self {
            server_no_context_takeover: true,
            client_no_context_takeover: false,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
            level: 1,
            mem_level: 8,
            threshold: 64,
        }
    }
}

impl DeflateConfig {
    /// Sets [`DeflateConfig::server_no_context_takeover`].
    #[must_use]
    pub fn with_server_no_context_takeover(mut self, on: bool) -> Self {
        self.server_no_context_takeover = on;
        self
    }

    /// Sets [`DeflateConfig::client_no_context_takeover`].
    #[must_use]
    pub fn with_client_no_context_takeover(mut self, on: bool) -> Self {
        self.client_no_context_takeover = on;
        self
    }

    /// Sets [`DeflateConfig::server_max_window_bits`], clamped to 9..=15.
    #[must_use]
    pub fn with_server_max_window_bits(mut self, bits: u8) -> Self {
        self.server_max_window_bits = bits.clamp(9, 15);
        self
    }

    /// Sets [`DeflateConfig::client_max_window_bits`], clamped to 8..=15.
    #[must_use]
    pub fn with_client_max_window_bits(mut self, bits: u8) -> Self {
        self.client_max_window_bits = bits.clamp(8, 15);
        self
    }

    /// Sets [`DeflateConfig::level`], clamped to 0..=9.
    #[must_use]
    pub fn with_level(mut self, level: u8) -> Self {
        self.level = level.min(9);
        self
    }

    /// Sets [`DeflateConfig::mem_level`], clamped to 1..=9.
    #[must_use]
    pub fn with_mem_level(mut self, mem_level: u8) -> Self {
        self.mem_level = mem_level.clamp(1, 9);
        self
    }

    /// Sets [`DeflateConfig::threshold`].
    #[must_use]
    pub fn with_threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }

    /// Client role: the `Sec-WebSocket-Extensions` value offering permessage-deflate.
    pub fn offer(&self) -> String {
        extension_value(
            self.server_no_context_takeover,
            self.client_no_context_takeover,
            self.server_max_window_bits.clamp(9, 15),
            // Offered bare at 15: the server may then choose any client window.
            Some(self.client_max_window_bits.clamp(8, 15)),
        )
    }

    /// Client role: checks the server's `Sec-WebSocket-Extensions` answer to
    /// [`DeflateConfig::offer`] (RFC 7692 §7.1). `None` (no header) means declined.
    ///
    /// # Errors
    /// [`HandshakeError::InvalidExtension`] for an answer the offer does not allow: another
    /// extension, an unknown or repeated parameter, a bad value, a window larger than asked,
    /// `client_max_window_bits` larger than offered, or a requested
    /// `server_no_context_takeover` left out.
    pub fn check_answer(
        &self,
        answer: Option<&str>,
    ) -> Result<Option<DeflateParams>, HandshakeError> {
        let Some(answer) = answer else {
            return Ok(None);
        };
        let bad = |why: &str| HandshakeError::InvalidExtension(format!("{why}: {answer}"));
        let extensions = parse_extensions(answer).ok_or_else(|| bad("malformed"))?;
        let [ext] = &extensions[..] else {
            return Err(bad("expected one extension"));
        };
        if !ext.name.eq_ignore_ascii_case(EXTENSION_NAME) {
            return Err(bad("extension not offered"));
        }
        let p = Parsed::from_params(&ext.params).ok_or_else(|| bad("bad parameter"))?;
        if self.server_no_context_takeover && !p.server_no_context_takeover {
            return Err(bad("server_no_context_takeover was requested"));
        }
        let server_bits = match p.server_max_window_bits {
            Some(n) if n > self.server_max_window_bits => {
                return Err(bad("server_max_window_bits above the one asked for"))
            }
            Some(n) => n,
            None if self.server_max_window_bits < 15 => {
                return Err(bad("server_max_window_bits was requested"))
            }
            None => 15,
        };
        let client_bits = match p.client_max_window_bits {
            Some(None) => return Err(bad("client_max_window_bits needs a value")),
            Some(Some(n)) => n,
            None => self.client_max_window_bits,
        };
        Ok(Some(DeflateParams {
            server_no_context_takeover: p.server_no_context_takeover,
            client_no_context_takeover: p.client_no_context_takeover
                || self.client_no_context_takeover,
            server_max_window_bits: server_bits,
            client_max_window_bits: client_bits.min(self.client_max_window_bits),
        }))
    }
}

/// What both ends agreed, as the server answered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server compresses each message on its own.
    pub server_no_context_takeover: bool,
    /// The client compresses each message on its own.
    pub client_no_context_takeover: bool,
    /// The server's compression window, as a power of two (9 to 15).
    pub server_max_window_bits: u8,
    /// The client's compression window, as a power of two (8 to 15).
    pub client_max_window_bits: u8,
    // Whether the answer names server_max_window_bits / client_max_window_bits follows from
    // the values (below 15).
}

impl DeflateParams {
    /// Server role: the `Sec-WebSocket-Extensions` value for the 101.
    pub fn answer(&self) -> String {
        extension_value(
            self.server_no_context_takeover,
            self.client_no_context_takeover,
            self.server_max_window_bits,
            (self.client_max_window_bits < 15).then_some(self.client_max_window_bits),
        )
    }
}

/// One permessage-deflate extension value, as an offer or an answer. Window bits of 15 are
/// the default and left out; `client_bits` of `Some(15)` is written bare
/// (`client_max_window_bits` with no value, an offer's "any window"), `None` at 15 not at all.
fn extension_value(
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_bits: u8,
    client_bits: Option<u8>,
) -> String {
    let mut out = String::from(EXTENSION_NAME);
    if server_no_context_takeover {
        out.push_str("; server_no_context_takeover");
    }
    if client_no_context_takeover {
        out.push_str("; client_no_context_takeover");
    }
    if server_bits < 15 {
        let _ = write!(out, "; server_max_window_bits={server_bits}");
    }
    match client_bits {
        Some(15) => out.push_str("; client_max_window_bits"),
        Some(bits) => {
            let _ = write!(out, "; client_max_window_bits={bits}");
        }
        None => {}
    }
    out
}

/// Server role: the first acceptable permessage-deflate offer among `Sec-WebSocket-Extensions`
/// header values (one header or several, each with one or more comma-separated offers), or
/// `None` to decline (the 101 then names no extension). An offer is unacceptable when it is
/// malformed, repeats or misspells a parameter, has a value out of range, or asks for
/// `server_max_window_bits=8` (see the module docs). Other extensions are ignored.
pub fn negotiate<'a>(
    config: &DeflateConfig,
    headers: impl IntoIterator<Item = &'a [u8]>,
) -> Option<DeflateParams> {
    for value in headers {
        let Ok(value) = std::str::from_utf8(value) else {
            continue;
        };
        for offer in split_outside_quotes(value, ',') {
            let Some(ext) = parse_extension(offer) else {
                continue;
            };
            if !ext.name.eq_ignore_ascii_case(EXTENSION_NAME) {
                continue;
            }
            if let Some(params) = accept_offer(config, &ext.params) {
                return Some(params);
            }
        }
    }
    None
}

fn accept_offer(config: &DeflateConfig, params: &[(&str, Option<&str>)]) -> Option<DeflateParams> {
    let p = Parsed::from_params(params)?;
    let mut server_bits = config.server_max_window_bits.clamp(9, 15);
    if let Some(n) = p.server_max_window_bits {
        if n < 9 {
            return None;
        }
        server_bits = server_bits.min(n);
    }
    let client_bits = match p.client_max_window_bits {
        // The client did not say it supports the parameter: it may use up to 15.
        None => 15,
        Some(offered) => config
            .client_max_window_bits
            .clamp(8, 15)
            .min(offered.unwrap_or(15)),
    };
    Some(DeflateParams {
        server_no_context_takeover: p.server_no_context_takeover
            || config.server_no_context_takeover,
        client_no_context_takeover: p.client_no_context_takeover
            || config.client_no_context_takeover,
        server_max_window_bits: server_bits,
        client_max_window_bits: client_bits,
    })
}

/// An offer's or an answer's parameters, each at most once.
#[derive(Debug, Default)]
struct Parsed {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: present without a value.
    client_max_window_bits: Option<Option<u8>>,
}

impl Parsed {
    fn from_params(params: &[(&str, Option<&str>)]) -> Option<Self> {
        let mut p = Self::default();
        let bits = |v: &str| v.parse::<u8>().ok().filter(|n| (8..=15).contains(n));
        for &(name, value) in params {
            match name.to_ascii_lowercase().as_str() {
                "server_no_context_takeover"
                    if !p.server_no_context_takeover && value.is_none() =>
                {
                    p.server_no_context_takeover = true;
                }
                "client_no_context_takeover"
                    if !p.client_no_context_takeover && value.is_none() =>
                {
                    p.client_no_context_takeover = true;
                }
                "server_max_window_bits" if p.server_max_window_bits.is_none() => {
                    p.server_max_window_bits = Some(bits(value?)?);
                }
                "client_max_window_bits" if p.client_max_window_bits.is_none() => {
                    p.client_max_window_bits = Some(match value {
                        None => None,
                        Some(v) => Some(bits(v)?),
                    });
                }
                _ => return None,
            }
        }
        Some(p)
    }
}

#[derive(Debug)]
struct Extension<'a> {
    name: &'a str,
    params: Vec<(&'a str, Option<&'a str>)>,
}

fn parse_extensions(value: &str) -> Option<Vec<Extension<'_>>> {
    split_outside_quotes(value, ',')
        .map(parse_extension)
        .collect()
}

/// One `name; param; param=value; param="value"` element (RFC 6455 §9.1).
fn parse_extension(element: &str) -> Option<Extension<'_>> {
    let mut parts = split_outside_quotes(element, ';');
    let name = parts.next()?.trim();
    if !is_token(name) {
        return None;
    }
    let mut params = Vec::new();
    for part in parts {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
            None => (part.trim(), None),
        };
        if !is_token(key) {
            return None;
        }
        params.push((key, value));
    }
    Some(Extension { name, params })
}

fn unquote(v: &str) -> Option<&str> {
    let v = match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"')?,
        None => v,
    };
    is_token(v).then_some(v)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// Splits on `sep` outside double quotes, skipping empty elements.
fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || loop {
        let cur = rest?;
        let mut quoted = false;
        let mut cut = None;
        for (i, c) in cur.char_indices() {
            match c {
                '"' => quoted = !quoted,
                c if c == sep && !quoted => {
                    cut = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let (item, next) = match cut {
            Some(i) => (&cur[..i], Some(&cur[i + 1..])),
            None => (cur, None),
        };
        rest = next;
        if !item.trim().is_empty() {
            return Some(item);
        }
    })
}

thread_local! {
    static DEFLATERS: RefCell<Vec<(Key, Box<Compress>)>> = const { RefCell::new(Vec::new()) };
    static INFLATERS: RefCell<Vec<(u8, Box<Decompress>)>> = const { RefCell::new(Vec::new()) };
}

/// What a pooled compressor was made with: window bits, level, memory level.
type Key = (u8, u8, u8);

/// One direction's compressor: raw deflate with a window of `window_bits`.
pub(crate) struct Deflater {
    window_bits: u8,
    level: u8,
    mem_level: u8,
    /// No context takeover: back to the pool after each message.
    reset: bool,
    /// Boxed: an idle connection pays a pointer, not the inline stream struct.
    state: Option<Box<Compress>>,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater")
            .field("window_bits", &self.window_bits)
            .field("level", &self.level)
            .field("mem_level", &self.mem_level)
            .field("reset", &self.reset)
            .field("allocated", &self.state.is_some())
            .finish()
    }
}

impl Deflater {
    pub(crate) fn new(window_bits: u8, level: u8, mem_level: u8, reset: bool) -> Self {
        Self {
            window_bits: window_bits.clamp(9, 15),
            level: level.min(9),
            mem_level: mem_level.clamp(1, 9),
            reset,
            state: None,
        }
    }

    /// Whether it holds compressor state now (an idle connection without context takeover
    /// holds none).
    pub(crate) fn is_allocated(&self) -> bool {
        self.state.is_some()
    }

    /// Compresses one message's payload, appending the deflate bytes (without the final
    /// `00 00 FF FF`) to `dst`.
    pub(crate) fn compress(&mut self, payload: &[u8], dst: &mut Vec<u8>) {
        let key = (self.window_bits, self.level, self.mem_level);
        let state = self.state.get_or_insert_with(|| take_deflater(key));
        compress_into(state, payload, dst);
        if self.reset {
            if let Some(mut state) = self.state.take() {
                state.reset();
                give_deflater(key, state);
            }
        }
    }
}

/// Compresses `payload` as one sync-flushed message and strips the flush tail.
fn compress_into(state: &mut Compress, payload: &[u8], dst: &mut Vec<u8>) {
    if payload.is_empty() {
        // Nothing to add to the window. A second sync flush in a row produces nothing (zlib
        // answers Z_BUF_ERROR), so an empty message is written as the first byte of an empty
        // stored block, which the peer completes with the 00 00 FF FF it appends.
        dst.push(0x00);
        return;
    }
    let start = dst.len();
    dst.reserve(payload.len() / 2 + 64);
    let mut input = payload;
    loop {
        if dst.capacity() - dst.len() < 64 {
            dst.reserve(dst.len().max(256));
        }
        let (before_in, before_out) = (state.total_in(), dst.len());
        // Into the spare capacity, zeroed first (safe code; the copy is small next to deflate).
        dst.resize(dst.capacity(), 0);
        let before_total_out = state.total_out();
        // Only a stream error (impossible with our own parameters) fails here.
        let _ = state.compress(input, &mut dst[before_out..], DeflateFlush::SyncFlush);
        dst.truncate(before_out + (state.total_out() - before_total_out) as usize);
        let used = (state.total_in() - before_in) as usize;
        input = &input[used..];
        let room = dst.capacity() - dst.len() >= 64;
        // Done once all input is taken and the flush fit with room to spare.
        if input.is_empty() && room && dst[start..].ends_with(&TAIL) {
            break;
        }
        // No progress with room to spare: nothing more will come (never loop forever).
        if used == 0 && dst.len() == before_out && room {
            break;
        }
    }
    if dst[start..].ends_with(&TAIL) {
        dst.truncate(dst.len() - TAIL.len());
    }
    if dst.len() == start {
        // An empty message compresses to a single empty stored block's first byte.
        dst.push(0x00);
    }
}

fn take_deflater(key: Key) -> Box<Compress> {
    DEFLATERS
        .with(|pool| {
            let mut pool = pool.borrow_mut();
            let at = pool.iter().position(|(k, _)| *k == key)?;
            Some(pool.swap_remove(at).1)
        })
        .unwrap_or_else(|| {
            let (bits, level, mem_level) = key;
            // Raw deflate (negative window bits), as RFC 7692 frames carry it.
            Box::new(Compress::new_with_config(ZConfig {
                level: level.into(),
                window_bits: -i32::from(bits),
                mem_level: mem_level.into(),
                ..ZConfig::default()
            }))
        })
}

fn give_deflater(key: Key, state: Box<Compress>) {
    DEFLATERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.iter().filter(|(k, _)| *k == key).count() < POOL_SIZE {
            pool.push((key, state));
        }
    });
}

fn take_inflater(bits: u8) -> Box<Decompress> {
    INFLATERS
        .with(|pool| {
            let mut pool = pool.borrow_mut();
            let at = pool.iter().position(|(b, _)| *b == bits)?;
            Some(pool.swap_remove(at).1)
        })
        .unwrap_or_else(|| Box::new(Decompress::new_with_window_bits(false, bits)))
}

fn give_inflater(bits: u8, state: Box<Decompress>) {
    INFLATERS.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.iter().filter(|(b, _)| *b == bits).count() < POOL_SIZE {
            pool.push((bits, state));
        }
    });
}

/// One direction's decompressor.
#[derive(Debug)]
pub(crate) struct Inflater {
    window_bits: u8,
    reset: bool,
    /// Boxed, as `Deflater::state`.
    state: Option<Box<Decompress>>,
}

impl Inflater {
    pub(crate) fn new(window_bits: u8, reset: bool) -> Self {
        Self {
            // A 512-byte window decodes a 256-byte-window stream; zlib has no raw 8.
            window_bits: window_bits.clamp(9, 15),
            reset,
            state: None,
        }
    }

    pub(crate) fn is_allocated(&self) -> bool {
        self.state.is_some()
    }

    /// Inflates one message (its frames' payloads joined), refusing to produce more than
    /// `max` bytes: the output buffer never grows past `max + 1`.
    pub(crate) fn inflate(&mut self, input: &[u8], max: usize) -> Result<Bytes, ProtocolError> {
        let bits = self.window_bits;
        let state = self.state.get_or_insert_with(|| take_inflater(bits));
        let result = inflate_bounded(state, input, max);
        if self.reset || result.is_err() {
            if let Some(mut state) = self.state.take() {
                state.reset(false);
                give_inflater(bits, state);
            }
        }
        result
    }
}

fn inflate_bounded(
    state: &mut Decompress,
    input: &[u8],
    max: usize,
) -> Result<Bytes, ProtocolError> {
    let limit = max.saturating_add(1);
    let mut out: Vec<u8> =
        Vec::with_capacity(input.len().saturating_mul(3).clamp(64, limit.min(64 << 10)));
    for chunk in [input, &TAIL[..]] {
        let mut rest = chunk;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= limit {
                    return Err(ProtocolError::MessageTooLarge {
                        size: out.len() as u64,
                        max,
                    });
                }
                let grow = out.len().max(4096).min(limit - out.len());
                out.reserve_exact(grow);
            }
            let (before_in, before_out) = (state.total_in(), out.len());
            let status = state
                .decompress_vec(rest, &mut out, FlushDecompress::Sync)
                .map_err(|_| ProtocolError::InvalidDeflate)?;
            rest = &rest[(state.total_in() - before_in) as usize..];
            if out.len() > max {
                return Err(ProtocolError::MessageTooLarge {
                    size: out.len() as u64,
                    max,
                });
            }
            if status == Status::StreamEnd {
                // A final block: a new message must start a new stream.
                state.reset(false);
                if !rest.is_empty() && chunk != TAIL {
                    return Err(ProtocolError::InvalidDeflate);
                }
                break;
            }
            let progressed = out.len() > before_out || state.total_in() > before_in;
            if rest.is_empty() && out.len() < out.capacity() {
                break;
            }
            if !progressed && out.len() < out.capacity() {
                return Err(ProtocolError::InvalidDeflate);
            }
        }
    }
    Ok(Bytes::from(out))
}

/// Compresses one message for a server frame with no context takeover, with a per-thread
/// pooled compressor: what a fan-out shares among every subscriber that agreed to
/// `server_no_context_takeover` with a window of at least `window_bits`. Returns the frame,
/// header (RSV1 set) and payload.
pub fn deflate_server_frame(
    opcode: crate::OpCode,
    payload: &[u8],
    window_bits: u8,
    level: u8,
    mem_level: u8,
) -> Bytes {
    let mut deflater = Deflater::new(window_bits, level, mem_level, true);
    let mut body = Vec::new();
    deflater.compress(payload, &mut body);
    compressed_frame(opcode, &body, None)
}

/// A whole frame with RSV1 set around an already compressed payload.
pub(crate) fn compressed_frame(opcode: crate::OpCode, body: &[u8], mask: Option<[u8; 4]>) -> Bytes {
    let header = crate::FrameHeader {
        fin: true,
        rsv: 0b100,
        opcode,
        mask,
        payload_len: body.len() as u64,
    };
    let mut out = BytesMut::with_capacity(header.encoded_len() + body.len());
    header.encode(&mut out);
    let start = out.len();
    out.extend_from_slice(body);
    if let Some(key) = mask {
        crate::mask::apply_mask(&mut out[start..], key, 0);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(config: &DeflateConfig, headers: &[&str]) -> Option<DeflateParams> {
        negotiate(config, headers.iter().map(|h| h.as_bytes()))
    }

    fn plain() -> DeflateConfig {
        DeflateConfig::default().with_server_no_context_takeover(false)
    }

    #[test]
    fn a_bare_offer_is_accepted_with_defaults() {
        let p = neg(&plain(), &["permessage-deflate"]).unwrap();
        assert_eq!(p.answer(), "permessage-deflate");
        let p = neg(&DeflateConfig::default(), &["permessage-deflate"]).unwrap();
        assert_eq!(p.answer(), "permessage-deflate; server_no_context_takeover");
    }

    #[test]
    fn all_four_parameters_are_understood() {
        let p = neg(
            &plain(),
            &[
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
               server_max_window_bits=10; client_max_window_bits=12",
            ],
        )
        .unwrap();
        assert_eq!(
            p,
            DeflateParams {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: 10,
                client_max_window_bits: 12,
            }
        );
        assert_eq!(
            p.answer(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10; client_max_window_bits=12"
        );
    }

    #[test]
    fn client_max_window_bits_without_value_lets_the_server_choose() {
        let config = plain().with_client_max_window_bits(11);
        let p = neg(&config, &["permessage-deflate; client_max_window_bits"]).unwrap();
        assert_eq!(p.client_max_window_bits, 11);
        assert_eq!(p.answer(), "permessage-deflate; client_max_window_bits=11");
        // Not offered: the server may not ask for it.
        let p = neg(&config, &["permessage-deflate"]).unwrap();
        assert_eq!(p.answer(), "permessage-deflate");
    }

    #[test]
    fn the_first_acceptable_offer_wins_across_headers() {
        let p = neg(
            &plain(),
            &[
                "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=8",
                "permessage-deflate; bogus, permessage-deflate; server_max_window_bits=9",
                "permessage-deflate",
            ],
        )
        .unwrap();
        assert_eq!(p.server_max_window_bits, 9);
    }

    #[test]
    fn bad_offers_are_declined() {
        for offer in [
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010x",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits; client_max_window_bits=10",
            "permessage-deflate; mystery",
            "deflate-frame",
            "",
        ] {
            assert_eq!(neg(&plain(), &[offer]), None, "{offer}");
        }
    }

    #[test]
    fn quoted_values_are_read() {
        let p = neg(
            &plain(),
            &["permessage-deflate; client_max_window_bits=\"10\""],
        )
        .unwrap();
        assert_eq!(p.client_max_window_bits, 10);
    }

    #[test]
    fn client_max_window_bits_8_is_accepted() {
        let p = neg(&plain(), &["permessage-deflate; client_max_window_bits=8"]).unwrap();
        assert_eq!(p.client_max_window_bits, 8);
    }

    #[test]
    fn the_client_checks_the_answer_against_its_offer() {
        let offer = DeflateConfig::default().with_server_max_window_bits(10);
        assert_eq!(
            offer.offer(),
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; \
             client_max_window_bits"
        );
        let ok = offer
            .check_answer(Some(
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=9",
            ))
            .unwrap()
            .unwrap();
        assert_eq!(ok.server_max_window_bits, 9);
        assert_eq!(offer.check_answer(None), Ok(None));
        for bad in [
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=11",
            "permessage-deflate; server_no_context_takeover",
            "x-other",
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=9, permessage-deflate",
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=9; client_max_window_bits",
        ] {
            assert!(offer.check_answer(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn compress_and_inflate_round_trip_with_and_without_context() {
        for (reset, mem_level) in [(false, 8), (true, 8), (false, 1), (false, 4), (true, 9)] {
            for bits in 9..=15 {
                let mut d = Deflater::new(bits, 6, mem_level, reset);
                let mut i = Inflater::new(bits, reset);
                for n in 0..50 {
                    let msg = format!("{{\"seq\":{n},\"data\":\"{}\"}}", "abc".repeat(n * 7));
                    let mut body = Vec::new();
                    d.compress(msg.as_bytes(), &mut body);
                    let out = i.inflate(&body, 1 << 20).unwrap();
                    assert_eq!(&out[..], msg.as_bytes());
                    assert_eq!(d.is_allocated(), !reset);
                    assert_eq!(i.is_allocated(), !reset);
                }
            }
        }
    }

    #[test]
    fn inflate_stops_at_the_limit_without_allocating_the_bomb() {
        let mut d = Deflater::new(15, 9, 8, true);
        let mut body = Vec::new();
        d.compress(&vec![0u8; 8 << 20], &mut body);
        assert!(body.len() < 16 << 10, "{}", body.len());
        let mut i = Inflater::new(15, true);
        let err = i.inflate(&body, 1 << 20).unwrap_err();
        assert!(matches!(err, ProtocolError::MessageTooLarge { max, .. } if max == 1 << 20));
        assert_eq!(err.close_code().as_u16(), 1009);
    }

    #[test]
    fn empty_messages_between_others_keep_the_context_and_never_hang() {
        // A sync flush right after another produces nothing: this used to loop forever.
        let mut d = Deflater::new(15, 1, 8, false);
        let mut i = Inflater::new(15, false);
        for msg in [&b"abcabc"[..], b"", b"", b"abcabcabc", b""] {
            let mut body = Vec::new();
            d.compress(msg, &mut body);
            assert_eq!(&i.inflate(&body, 1000).unwrap()[..], msg);
        }
    }

    #[test]
    fn garbage_fails_to_inflate() {
        let mut i = Inflater::new(15, false);
        assert_eq!(
            i.inflate(&[0xFF, 0xFF, 0xFF, 0xFF], 1000),
            Err(ProtocolError::InvalidDeflate)
        );
    }
}
