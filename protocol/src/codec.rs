//! The connection state machine after the upgrade: frames in, events out.
//!
//! Owns framing rules that span frames (fragmentation, control frames between fragments, UTF-8
//! across fragments, the closing handshake, size limits) and the replies the protocol obliges
//! (a pong for each ping, the close echo, the close that fails a connection). It reads from a
//! caller's `BytesMut` and never does IO, never allocates per frame on the unfragmented path,
//! and never copies a payload unless a message arrives in several fragments.

use bytes::{Buf, Bytes, BytesMut};

use crate::{
    close::CloseFrame,
    deflate::{compressed_frame, DeflateConfig, DeflateParams, Deflater, Inflater},
    error::ProtocolError,
    frame::{encode_frame, FrameHeader, OpCode},
    limits::Limits,
    mask::apply_mask,
    utf8::{Utf8Bytes, Utf8Validator},
};

/// Which end of the connection a codec speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Expects masked frames, sends unmasked ones.
    Server,
    /// Expects unmasked frames, sends masked ones.
    Client,
}

/// What the peer sent, one whole message or control frame at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A complete text message, validated as UTF-8.
    Text(Utf8Bytes),
    /// A complete binary message.
    Binary(Bytes),
    /// A ping. The matching pong is already queued; see [`Codec::poll_transmit`].
    Ping(Bytes),
    /// A pong.
    Pong(Bytes),
    /// The peer's close frame (`None` when it carried no code). If this side had not sent a
    /// close yet, the echo is queued and the handshake is complete: the server should flush and
    /// close the TCP connection.
    Close(Option<CloseFrame>),
}

/// Progress of the closing handshake (RFC 6455 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseState {
    /// Data flows both ways.
    Open,
    /// This side sent a close frame and waits for the peer's.
    CloseSent,
    /// Both close frames have been exchanged (or the echo is queued). Nothing more is read.
    Closed,
    /// The peer broke the protocol; the failing close frame is queued. Nothing more is read.
    Failed,
}

/// The frame whose header has been consumed and whose payload is still arriving.
#[derive(Debug, Clone, Copy)]
struct Partial {
    header: FrameHeader,
    /// Payload bytes at the front of the caller's buffer already unmasked and validated.
    done: usize,
}

/// A message arriving in several fragments, reassembled here.
#[derive(Debug)]
struct Fragmented {
    text: bool,
    /// The first frame had RSV1: the joined payloads are inflated when the message ends.
    compressed: bool,
    data: BytesMut,
}

/// permessage-deflate, once negotiated: both directions' settings and their (lazily
/// allocated) state.
#[derive(Debug)]
struct Deflate {
    params: DeflateParams,
    threshold: usize,
    tx: Deflater,
    rx: Inflater,
}

/// A sans-IO WebSocket connection.
///
/// Drive it in this order, repeating while the connection lives:
/// 1. read bytes from the socket onto the end of a `BytesMut`;
/// 2. call [`Codec::poll_event`] with that buffer until it returns `Ok(None)`, handling each
///    event (an `Err` means the connection has failed);
/// 3. send what [`Codec::poll_transmit`] returns (pongs, close frames), then your own frames;
/// 4. once [`Codec::close_state`] is `Closed` or `Failed` and the transmits are flushed, close
///    the socket (a server closes first, RFC 6455 §7.1.1).
///
/// Bytes left in the buffer after `poll_event` returns `Ok(None)` belong to a frame still
/// arriving; some may already be unmasked in place. Keep them, in order, at the front of the
/// next buffer you pass (moving them to another buffer is fine).
#[derive(Debug)]
pub struct Codec {
    role: Role,
    state: CloseState,
    utf8: Utf8Validator,
    /// The limits, kept in 32 bits (a codec exists per connection); larger limits act as
    /// 4 GiB - 1, more than a connection could buffer anyway.
    max_frame_bytes: u32,
    max_message_bytes: u32,
    partial: Option<Partial>,
    /// Boxed: only a message in several fragments needs it, and a server holds a codec per
    /// connection, most of them idle.
    fragmented: Option<Box<Fragmented>>,
    /// Freed whenever it empties, for the same reason. Rarely more than one frame long.
    owed: Vec<Bytes>,
    /// SplitMix64 state for client masking keys.
    mask_state: u64,
    /// permessage-deflate, when negotiated (boxed: most connections of a server without
    /// compression never have it).
    deflate: Option<Box<Deflate>>,
}

impl Codec {
    /// A server-side codec.
    pub fn server(limits: Limits) -> Self {
        Self::new(Role::Server, limits, 0)
    }

    /// A client-side codec. `seed` starts the generator of masking keys; take it from a random
    /// source (RFC 6455 §5.3 asks for keys an intermediary cannot predict). The generator is
    /// SplitMix64: fast, not cryptographic.
    pub fn client(limits: Limits, seed: u64) -> Self {
        Self::new(Role::Client, limits, seed)
    }

    /// A codec for `role`.
    pub fn new(role: Role, limits: Limits, seed: u64) -> Self {
        Self {
            role,
            state: CloseState::Open,
            max_frame_bytes: u32::try_from(limits.max_frame_bytes).unwrap_or(u32::MAX),
            max_message_bytes: u32::try_from(limits.max_message_bytes).unwrap_or(u32::MAX),
            partial: None,
            fragmented: None,
            utf8: Utf8Validator::new(),
            owed: Vec::new(),
            mask_state: seed,
            deflate: None,
        }
    }

    /// Turns on permessage-deflate as `params` agreed (the server's answer), with `config`'s
    /// level and threshold for what this side sends. From here a data frame's RSV1 means a
    /// compressed message, and [`Codec::encode_message`] compresses.
    #[must_use]
    pub fn with_deflate(mut self, params: DeflateParams, config: &DeflateConfig) -> Self {
        let (tx_bits, tx_reset, rx_bits, rx_reset) = match self.role {
            Role::Server => (
                params.server_max_window_bits,
                params.server_no_context_takeover,
                params.client_max_window_bits,
                params.client_no_context_takeover,
            ),
            Role::Client => (
                params.client_max_window_bits,
                params.client_no_context_takeover,
                params.server_max_window_bits,
                params.server_no_context_takeover,
            ),
        };
        self.deflate = Some(Box::new(Deflate {
            params,
            threshold: config.threshold,
            tx: Deflater::new(tx_bits, config.level, config.mem_level, tx_reset),
            rx: Inflater::new(rx_bits, rx_reset),
        }));
        self
    }

    /// The permessage-deflate parameters in force, if it was negotiated.
    pub fn deflate_params(&self) -> Option<DeflateParams> {
        self.deflate.as_ref().map(|d| d.params)
    }

    /// Whether a message of `len` bytes would be sent compressed by
    /// [`Codec::encode_message`]: permessage-deflate is on and `len` reaches its threshold.
    pub fn compresses(&self, len: usize) -> bool {
        self.deflate.as_ref().is_some_and(|d| len >= d.threshold)
    }

    /// Whether compressor or decompressor state is allocated now. Without context takeover
    /// in a direction its state is released after each message, so an idle connection holds
    /// none.
    pub fn holds_deflate_state(&self) -> (bool, bool) {
        self.deflate.as_ref().map_or((false, false), |d| {
            (d.tx.is_allocated(), d.rx.is_allocated())
        })
    }

    /// Encodes a whole message as one frame: compressed (RSV1 set) when
    /// [`Codec::compresses`] its length, otherwise as [`Codec::encode_frame`] would. Call it
    /// only while [`Codec::can_send`] holds.
    pub fn encode_message(&mut self, opcode: OpCode, payload: &[u8], dst: &mut BytesMut) {
        if !self.compresses(payload.len()) {
            self.encode_frame(true, opcode, payload, dst);
            return;
        }
        let frame = self.compress_message(opcode, payload);
        dst.extend_from_slice(&frame);
    }

    /// A whole message as one frame, compressed when [`Codec::compresses`] its length
    /// (otherwise `None`).
    pub fn compressed_message(&mut self, opcode: OpCode, payload: &[u8]) -> Option<Bytes> {
        self.compresses(payload.len())
            .then(|| self.compress_message(opcode, payload))
    }

    fn compress_message(&mut self, opcode: OpCode, payload: &[u8]) -> Bytes {
        let mask = self.next_mask();
        let deflate = self.deflate.as_mut().expect("compresses() checked it");
        let mut body = Vec::new();
        deflate.tx.compress(payload, &mut body);
        compressed_frame(opcode, &body, mask)
    }

    /// The role this codec plays.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Where the closing handshake stands.
    pub fn close_state(&self) -> CloseState {
        self.state
    }

    /// Whether data frames may still be sent: no close frame has gone out.
    pub fn can_send(&self) -> bool {
        self.state == CloseState::Open
    }

    /// The payload length of the frame now arriving, if its header has been read. A caller can
    /// size its buffer for the whole frame at once.
    pub fn partial_frame_len(&self) -> Option<usize> {
        self.partial.map(|p| p.header.payload_len as usize)
    }

    /// Parses the next event from the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds no complete frame, and always after the connection
    /// is closed or failed. Payloads are split off `buf` without copying, except for messages
    /// in several fragments, which are reassembled.
    ///
    /// # Errors
    /// The peer broke the protocol. The failing close frame (with
    /// [`ProtocolError::close_code`]) is queued for [`Codec::poll_transmit`] and the state is
    /// `Failed`.
    pub fn poll_event(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, ProtocolError> {
        loop {
            if matches!(self.state, CloseState::Closed | CloseState::Failed) {
                return Ok(None);
            }
            let mut partial = match self.partial {
                Some(p) => p,
                None => {
                    let parsed = FrameHeader::parse(buf).map_err(|e| self.fail(e))?;
                    let Some((header, header_len)) = parsed else {
                        return Ok(None);
                    };
                    self.check_header(&header).map_err(|e| self.fail(e))?;
                    buf.advance(header_len);
                    Partial { header, done: 0 }
                }
            };
            // check_header bounded the length by max_frame_bytes, a usize.
            let len = partial.header.payload_len as usize;
            let avail = buf.len().min(len);
            if avail > partial.done {
                let fresh = &mut buf[partial.done..avail];
                if let Some(key) = partial.header.mask {
                    apply_mask(fresh, key, partial.done);
                }
                if self.is_plain_text(&partial.header) {
                    // Validate as bytes arrive, so bad text fails before the frame ends.
                    if self.utf8.feed(fresh).is_err() {
                        return Err(self.fail(ProtocolError::InvalidUtf8));
                    }
                }
                partial.done = avail;
            }
            if avail < len {
                self.partial = Some(partial);
                return Ok(None);
            }
            self.partial = None;
            let payload = buf.split_to(len).freeze();
            if let Some(event) = self.complete_frame(partial.header, payload)? {
                return Ok(Some(event));
            }
        }
    }

    /// The next frame the protocol obliges this side to send (pong, close echo, failing close),
    /// fully encoded.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.owed.is_empty() {
            return None;
        }
        let frame = self.owed.remove(0);
        if self.owed.is_empty() {
            self.owed = Vec::new();
        }
        Some(frame)
    }

    /// Starts the closing handshake by queueing a close frame (`None` sends one with no code).
    /// Returns `false`, queueing nothing, if a close frame was already sent or the connection
    /// already failed. The code is sent as given: check [`CloseCode::is_valid_on_wire`] first
    /// (the engine replaces an unsendable code with 1011).
    ///
    /// [`CloseCode::is_valid_on_wire`]: crate::CloseCode::is_valid_on_wire
    pub fn close(&mut self, frame: Option<CloseFrame>) -> bool {
        if self.state != CloseState::Open {
            return false;
        }
        self.queue_close(frame.as_ref());
        self.state = CloseState::CloseSent;
        true
    }

    /// Encodes one data frame into `dst`, masked when this is a client. Call it only while
    /// [`Codec::can_send`] holds (RFC 6455 §5.5.1: no data after a close frame).
    pub fn encode_frame(&mut self, fin: bool, opcode: OpCode, payload: &[u8], dst: &mut BytesMut) {
        let mask = self.next_mask();
        encode_frame(dst, fin, opcode, payload, mask);
    }

    fn next_mask(&mut self) -> Option<[u8; 4]> {
        if self.role == Role::Server {
            return None;
        }
        // SplitMix64 (Steele, Lea, Flood 2014).
        self.mask_state = self.mask_state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.mask_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Some((z as u32).to_ne_bytes())
    }

    /// Whether this frame's payload is text to validate as it arrives (a compressed message
    /// is validated after it is inflated).
    fn is_plain_text(&self, header: &FrameHeader) -> bool {
        match header.opcode {
            OpCode::Text => header.rsv & 0b100 == 0,
            OpCode::Continuation => self
                .fragmented
                .as_ref()
                .is_some_and(|f| f.text && !f.compressed),
            _ => false,
        }
    }

    /// Per-frame rules that need no payload: RFC 6455 §5.1, §5.2, §5.4, §5.5 and the limits.
    fn check_header(&self, h: &FrameHeader) -> Result<(), ProtocolError> {
        if h.rsv & 0b011 != 0 || (h.rsv != 0 && self.deflate.is_none()) {
            return Err(ProtocolError::ReservedBits);
        }
        if h.rsv != 0 {
            // RSV1 with permessage-deflate (RFC 7692 §6.1).
            if h.opcode.is_control() {
                return Err(ProtocolError::CompressedControl);
            }
            if h.opcode == OpCode::Continuation {
                return Err(ProtocolError::CompressedContinuation);
            }
        }
        match (self.role, h.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        if h.opcode.is_control() {
            if !h.fin {
                return Err(ProtocolError::FragmentedControl);
            }
            if h.payload_len > 125 {
                return Err(ProtocolError::ControlTooLong(h.payload_len));
            }
            return Ok(());
        }
        match (h.opcode, &self.fragmented) {
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ProtocolError::ExpectedContinuation)
            }
            _ => {}
        }
        if h.payload_len > u64::from(self.max_frame_bytes) {
            return Err(ProtocolError::FrameTooLarge {
                size: h.payload_len,
                max: self.max_frame_bytes as usize,
            });
        }
        let so_far = self.fragmented.as_ref().map_or(0, |f| f.data.len() as u64);
        let total = so_far.saturating_add(h.payload_len);
        if total > u64::from(self.max_message_bytes) {
            return Err(ProtocolError::MessageTooLarge {
                size: total,
                max: self.max_message_bytes as usize,
            });
        }
        Ok(())
    }

    /// Handles a frame whose payload is complete (unmasked, and for text validated so far).
    /// Returns the event it finishes, if any.
    fn complete_frame(
        &mut self,
        header: FrameHeader,
        payload: Bytes,
    ) -> Result<Option<Event>, ProtocolError> {
        match header.opcode {
            OpCode::Text | OpCode::Binary if header.fin => {
                let text = header.opcode == OpCode::Text;
                if header.rsv & 0b100 != 0 {
                    let payload = self.inflate(&payload, text)?;
                    return self.finish_message(text, payload).map(Some);
                }
                self.finish_message(text, payload).map(Some)
            }
            OpCode::Text | OpCode::Binary => {
                self.fragmented = Some(Box::new(Fragmented {
                    text: header.opcode == OpCode::Text,
                    compressed: header.rsv & 0b100 != 0,
                    data: BytesMut::from(&payload[..]),
                }));
                Ok(None)
            }
            OpCode::Continuation => {
                let frag = self
                    .fragmented
                    .as_mut()
                    .expect("check_header rejects a continuation with no message");
                frag.data.extend_from_slice(&payload);
                if !header.fin {
                    return Ok(None);
                }
                let frag = self.fragmented.take().expect("checked just above");
                if frag.compressed {
                    let payload = self.inflate(&frag.data, frag.text)?;
                    return self.finish_message(frag.text, payload).map(Some);
                }
                self.finish_message(frag.text, frag.data.freeze()).map(Some)
            }
            OpCode::Ping => {
                if self.state == CloseState::Open {
                    let mut pong = BytesMut::with_capacity(payload.len() + 14);
                    let mask = self.next_mask();
                    encode_frame(&mut pong, true, OpCode::Pong, &payload, mask);
                    self.owed.push(pong.freeze());
                }
                Ok(Some(Event::Ping(payload)))
            }
            OpCode::Pong => Ok(Some(Event::Pong(payload))),
            OpCode::Close => {
                let frame = CloseFrame::parse(&payload).map_err(|e| self.fail(e))?;
                if self.state == CloseState::Open {
                    // Echo the code we received (§5.5.1); an empty close gets an empty echo.
                    let echo = frame.as_ref().map(|f| CloseFrame {
                        code: f.code,
                        reason: Utf8Bytes::new(),
                    });
                    self.queue_close(echo.as_ref());
                }
                self.state = CloseState::Closed;
                Ok(Some(Event::Close(frame)))
            }
        }
    }

    /// Inflates a compressed message, bounded by the message limit after inflation; text is
    /// fed to the UTF-8 validator (which `finish_message` then finishes).
    fn inflate(&mut self, compressed: &[u8], text: bool) -> Result<Bytes, ProtocolError> {
        let max = self.max_message_bytes as usize;
        let deflate = self
            .deflate
            .as_mut()
            .expect("check_header refuses RSV1 without deflate");
        let payload = deflate
            .rx
            .inflate(compressed, max)
            .map_err(|e| self.fail(e))?;
        if text && self.utf8.feed(&payload).is_err() {
            return Err(self.fail(ProtocolError::InvalidUtf8));
        }
        Ok(payload)
    }

    fn finish_message(&mut self, text: bool, payload: Bytes) -> Result<Event, ProtocolError> {
        if !text {
            return Ok(Event::Binary(payload));
        }
        if self.utf8.finish().is_err() {
            return Err(self.fail(ProtocolError::InvalidUtf8));
        }
        Ok(Event::Text(Utf8Bytes::from_validated(payload)))
    }

    fn queue_close(&mut self, frame: Option<&CloseFrame>) {
        let payload = frame.map(CloseFrame::to_payload).unwrap_or_default();
        let mut out = BytesMut::with_capacity(payload.len() + 14);
        let mask = self.next_mask();
        encode_frame(&mut out, true, OpCode::Close, &payload, mask);
        self.owed.push(out.freeze());
    }

    /// Fails the connection: queue a close with the error's code unless one went out already.
    fn fail(&mut self, err: ProtocolError) -> ProtocolError {
        if self.state == CloseState::Open {
            let frame = CloseFrame::new(err.close_code(), &err.to_string());
            self.queue_close(Some(&frame));
        }
        self.state = CloseState::Failed;
        self.partial = None;
        self.fragmented = None;
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::close::CloseCode;

    fn client_frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut buf = BytesMut::new();
        encode_frame(
            &mut buf,
            fin,
            opcode,
            payload,
            Some([0x11, 0x22, 0x33, 0x44]),
        );
        buf.to_vec()
    }

    fn events(codec: &mut Codec, bytes: &[u8]) -> Vec<Result<Event, ProtocolError>> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        loop {
            match codec.poll_event(&mut buf) {
                Ok(Some(ev)) => out.push(Ok(ev)),
                Ok(None) => return out,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }

    #[test]
    fn unfragmented_text_is_delivered_without_copy() {
        let mut codec = Codec::server(Limits::default());
        let bytes = client_frame(OpCode::Text, true, b"hello");
        let mut buf = BytesMut::from(&bytes[..]);
        let payload_ptr = buf[6..].as_ptr();
        let ev = codec.poll_event(&mut buf).unwrap().unwrap();
        match ev {
            Event::Text(t) => {
                assert_eq!(t.as_str(), "hello");
                assert_eq!(t.as_ptr(), payload_ptr, "payload must be split, not copied");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn fragments_with_a_ping_between_reassemble() {
        let mut codec = Codec::server(Limits::default());
        let mut bytes = client_frame(OpCode::Text, false, "frag".as_bytes());
        bytes.extend(client_frame(OpCode::Ping, true, b"p"));
        bytes.extend(client_frame(OpCode::Continuation, true, "ment".as_bytes()));
        let evs = events(&mut codec, &bytes);
        assert_eq!(
            evs,
            vec![
                Ok(Event::Ping(Bytes::from_static(b"p"))),
                Ok(Event::Text(Utf8Bytes::from_static("fragment"))),
            ]
        );
        assert_eq!(
            codec.poll_transmit().unwrap(),
            Bytes::from_static(&[0x8A, 1, b'p'])
        );
    }

    #[test]
    fn unmasked_client_frame_fails_with_1002() {
        let mut codec = Codec::server(Limits::default());
        let evs = events(&mut codec, &[0x81, 0x01, b'x']);
        assert_eq!(evs, vec![Err(ProtocolError::UnmaskedFrame)]);
        let close = codec.poll_transmit().unwrap();
        assert_eq!(&close[..4], &[0x88, close[1], 0x03, 0xEA]);
        assert_eq!(codec.close_state(), CloseState::Failed);
    }

    #[test]
    fn oversized_frame_fails_on_the_header_alone() {
        let mut codec = Codec::server(Limits::default().with_max_frame_bytes(10));
        let bytes = client_frame(OpCode::Binary, true, &[0; 11]);
        let evs = events(&mut codec, &bytes[..8]);
        assert_eq!(
            evs,
            vec![Err(ProtocolError::FrameTooLarge { size: 11, max: 10 })]
        );
        let close = codec.poll_transmit().unwrap();
        assert_eq!(&close[2..4], &1009u16.to_be_bytes());
    }

    #[test]
    fn invalid_utf8_fails_before_the_frame_is_complete() {
        let mut codec = Codec::server(Limits::default());
        let bytes = client_frame(OpCode::Text, true, b"abc\xFFdefghijkl");
        // Header (6 bytes) plus the first 4 payload bytes only.
        let evs = events(&mut codec, &bytes[..10]);
        assert_eq!(evs, vec![Err(ProtocolError::InvalidUtf8)]);
    }

    #[test]
    fn close_is_echoed_with_its_code() {
        let mut codec = Codec::server(Limits::default());
        let evs = events(
            &mut codec,
            &client_frame(OpCode::Close, true, b"\x03\xE8bye"),
        );
        assert_eq!(
            evs,
            vec![Ok(Event::Close(Some(CloseFrame::new(
                CloseCode::NORMAL,
                "bye"
            ))))]
        );
        assert_eq!(
            codec.poll_transmit().unwrap(),
            Bytes::from_static(&[0x88, 2, 0x03, 0xE8])
        );
        assert_eq!(codec.close_state(), CloseState::Closed);
    }

    #[test]
    fn close_after_our_close_completes_without_a_second_echo() {
        let mut codec = Codec::server(Limits::default());
        assert!(codec.close(Some(CloseFrame::new(CloseCode::GOING_AWAY, "bye"))));
        assert!(!codec.close(None));
        let _ours = codec.poll_transmit().unwrap();
        let evs = events(&mut codec, &client_frame(OpCode::Close, true, b"\x03\xE9"));
        assert_eq!(evs.len(), 1);
        assert!(codec.poll_transmit().is_none());
        assert_eq!(codec.close_state(), CloseState::Closed);
    }

    #[test]
    fn client_masks_and_server_reads_it() {
        let mut client = Codec::client(Limits::default(), 42);
        let mut server = Codec::server(Limits::default());
        let mut wire = BytesMut::new();
        client.encode_frame(true, OpCode::Binary, b"payload", &mut wire);
        assert_ne!(
            &wire[wire.len() - 7..],
            b"payload",
            "client frames are masked"
        );
        let ev = server.poll_event(&mut wire).unwrap().unwrap();
        assert_eq!(ev, Event::Binary(Bytes::from_static(b"payload")));
    }

    fn deflate_pair(params_offer: &str) -> (Codec, Codec) {
        let config = DeflateConfig::default();
        let params =
            crate::deflate::negotiate(&config, [params_offer.as_bytes()]).expect("accepted");
        (
            Codec::server(Limits::default()).with_deflate(params, &config),
            Codec::client(Limits::default(), 9).with_deflate(params, &config),
        )
    }

    fn rsv1_frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut bytes = client_frame(opcode, fin, payload);
        bytes[0] |= 0x40;
        bytes
    }

    #[test]
    fn compressed_messages_round_trip_both_ways() {
        let (mut server, mut client) = deflate_pair("permessage-deflate; client_max_window_bits");
        let text = "{\"price\":1.2345,\"qty\":100}".repeat(20);
        for _ in 0..3 {
            let mut wire = BytesMut::new();
            client.encode_message(OpCode::Text, text.as_bytes(), &mut wire);
            assert_eq!(wire[0] & 0x40, 0x40, "RSV1 set");
            assert!(wire.len() < text.len() / 2);
            let ev = server.poll_event(&mut wire).unwrap().unwrap();
            assert_eq!(ev, Event::Text(Utf8Bytes::from(text.clone())));
            let mut wire = BytesMut::new();
            server.encode_message(OpCode::Binary, text.as_bytes(), &mut wire);
            let ev = client.poll_event(&mut wire).unwrap().unwrap();
            assert_eq!(ev, Event::Binary(Bytes::from(text.clone())));
        }
        // Under the threshold: sent plain, RSV1 clear.
        let mut wire = BytesMut::new();
        server.encode_message(OpCode::Text, b"hi", &mut wire);
        assert_eq!(&wire[..], b"\x81\x02hi");
        // server_no_context_takeover (the default): nothing held between messages.
        assert!(!server.holds_deflate_state().0);
    }

    #[test]
    fn a_compressed_message_in_fragments_inflates_once_whole() {
        let (mut server, mut client) = deflate_pair("permessage-deflate");
        let text = "fragmented and compressed ".repeat(10);
        let Some(frame) = client.compressed_message(OpCode::Text, text.as_bytes()) else {
            panic!("over the threshold");
        };
        // Unmask the client's frame to cut its payload in two fragments.
        let (h, hl) = FrameHeader::parse(&frame).unwrap().unwrap();
        let mut body = frame[hl..].to_vec();
        crate::mask::apply_mask(&mut body, h.mask.unwrap(), 0);
        let (a, b) = body.split_at(body.len() / 2);
        let mut bytes = rsv1_frame(OpCode::Text, false, a);
        bytes.extend(client_frame(OpCode::Ping, true, b"p"));
        bytes.extend(client_frame(OpCode::Continuation, true, b));
        let evs = events(&mut server, &bytes);
        assert_eq!(
            evs,
            vec![
                Ok(Event::Ping(Bytes::from_static(b"p"))),
                Ok(Event::Text(Utf8Bytes::from(text))),
            ]
        );
    }

    fn close_code_of(codec: &mut Codec) -> u16 {
        let close = codec.poll_transmit().unwrap();
        u16::from_be_bytes([close[2], close[3]])
    }

    #[test]
    fn rsv1_rules_fail_with_their_close_codes() {
        // No extension negotiated: RSV1 is a reserved bit.
        let mut plain = Codec::server(Limits::default());
        let evs = events(&mut plain, &rsv1_frame(OpCode::Text, true, b"x"));
        assert_eq!(evs, vec![Err(ProtocolError::ReservedBits)]);
        assert_eq!(close_code_of(&mut plain), 1002);

        let cases: [(Vec<u8>, ProtocolError, u16); 5] = [
            (
                rsv1_frame(OpCode::Ping, true, b"x"),
                ProtocolError::CompressedControl,
                1002,
            ),
            (
                [
                    client_frame(OpCode::Text, false, b"a"),
                    rsv1_frame(OpCode::Continuation, true, b"b"),
                ]
                .concat(),
                ProtocolError::CompressedContinuation,
                1002,
            ),
            (
                {
                    let mut f = client_frame(OpCode::Text, true, b"x");
                    f[0] |= 0x20;
                    f
                },
                ProtocolError::ReservedBits,
                1002,
            ),
            (
                rsv1_frame(OpCode::Binary, true, &[0xFF; 8]),
                ProtocolError::InvalidDeflate,
                1007,
            ),
            (
                // "\xFF" compressed at level 0: a stored block, deflate-valid, bad UTF-8.
                rsv1_frame(OpCode::Text, true, &[0x00, 0x01, 0x00, 0xFE, 0xFF, 0xFF]),
                ProtocolError::InvalidUtf8,
                1007,
            ),
        ];
        for (bytes, err, code) in cases {
            let (mut server, _) = deflate_pair("permessage-deflate");
            let evs = events(&mut server, &bytes);
            assert_eq!(evs, vec![Err(err.clone())], "{err}");
            assert_eq!(close_code_of(&mut server), code, "{err}");
        }
    }

    #[test]
    fn a_bomb_is_refused_with_1009_after_inflation() {
        let config = DeflateConfig::default().with_level(9);
        let params = crate::deflate::negotiate(&config, [&b"permessage-deflate"[..]]).unwrap();
        let limits = Limits::default().with_max_message_bytes(1 << 20);
        let mut server = Codec::server(limits).with_deflate(params, &config);
        let mut client = Codec::client(Limits::default(), 3).with_deflate(params, &config);
        let mut wire = BytesMut::new();
        client.encode_message(OpCode::Binary, &vec![0u8; 64 << 20], &mut wire);
        assert!(wire.len() < 128 << 10, "{}", wire.len());
        let evs = events(&mut server, &wire);
        assert!(
            matches!(evs[..], [Err(ProtocolError::MessageTooLarge { max, .. })] if max == 1 << 20),
            "{evs:?}"
        );
        assert_eq!(close_code_of(&mut server), 1009);
    }
}
