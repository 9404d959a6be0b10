//! Entry functions shared by the fuzz targets (`fuzz/fuzz_targets/*.rs`, nightly) and by the
//! proptest driver `tests/fuzz_entry.rs` (stable): arbitrary bytes in, invariants asserted.
//!
//! Each function must not panic on any input except through one of its own assertions; an
//! assertion failing is a bug in the protocol crate. This file depends on `ringcast-protocol`,
//! `bytes` and `base64` only, so the fuzz crate can include it with `#[path]`.

use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use bytes::{Bytes, BytesMut};
use ringcast_protocol::{
    error_response, mask, ClientHandshake, CloseFrame, CloseState, Codec, Event, FrameHeader,
    HandshakeError, HeadReader, Limits, OpCode, ProtocolError, Role, UpgradeRequest, Utf8Validator,
    MAX_HEADER_BYTES,
};

/// Fuzz target `header`: frame headers, close payloads, UTF-8 and masking on raw bytes.
pub(crate) fn header(data: &[u8]) {
    frame_header(data);
    close_payload(data);
    let seed = data.first().copied().unwrap_or(0);
    utf8(data, &cuts_from_seed(seed, data.len()));
    masking(data);
}

/// Fuzz target `codec`: one control byte picks role, limits and buffer handling, one byte seeds
/// the chunking, the rest is the wire. Runs the wire whole and chunked and requires the same
/// outcome.
pub(crate) fn codec(data: &[u8]) {
    let [ctl, seed, wire @ ..] = data else {
        return;
    };
    let role = if ctl & 1 == 0 {
        Role::Server
    } else {
        Role::Client
    };
    let limits = match (ctl >> 1) & 3 {
        0 => Limits::default(),
        1 => Limits::default()
            .with_max_frame_bytes(16)
            .with_max_message_bytes(32),
        2 => Limits::default()
            .with_max_frame_bytes(200)
            .with_max_message_bytes(300),
        _ => Limits::default()
            .with_max_frame_bytes(0)
            .with_max_message_bytes(0),
    };
    let fresh = ctl & 0x08 != 0;
    codec_whole_and_chunked(
        role,
        limits,
        wire,
        &cuts_from_seed(*seed, wire.len()),
        fresh,
    );
}

/// Fuzz target `handshake`: the head reader in pieces, the server's request parser and the
/// client's response check.
pub(crate) fn handshake(data: &[u8]) {
    let [ctl, rest @ ..] = data else {
        return;
    };
    let max = if ctl & 1 == 0 {
        8192
    } else {
        usize::from(*ctl) * 4
    };
    head_reader(rest, &cuts_from_seed(*ctl, rest.len()), max);
    upgrade_request(rest);
    client_response(rest, *ctl);
}

/// Deterministic cut points in `0..=len`, ascending, from one seed byte (xorshift steps of
/// 1 to 32 bytes).
pub(crate) fn cuts_from_seed(seed: u8, len: usize) -> Vec<usize> {
    let mut x = u32::from(seed) | 0x1_0000;
    let mut pos = 0usize;
    let mut cuts = Vec::new();
    loop {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        pos += 1 + (x % 32) as usize;
        if pos >= len {
            return cuts;
        }
        cuts.push(pos);
    }
}

/// Splits `wire` at `cuts` (ascending; out-of-range or descending cuts are clamped).
pub(crate) fn chunks<'a>(wire: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut start = 0;
    for &cut in cuts {
        let end = cut.clamp(start, wire.len());
        out.push(&wire[start..end]);
        start = end;
    }
    out.push(&wire[start..]);
    out
}

/// One whole frame at the front of `bytes`: its header, its unmasked payload, and how many bytes
/// it used. `None` if the bytes do not start with a complete, parseable frame.
pub(crate) fn split_frame(bytes: &[u8]) -> Option<(FrameHeader, Vec<u8>, usize)> {
    let (header, header_len) = FrameHeader::parse(bytes).ok()??;
    let end = header_len.checked_add(usize::try_from(header.payload_len).ok()?)?;
    let mut payload = bytes.get(header_len..end)?.to_vec();
    if let Some(key) = header.mask {
        mask::apply_mask_reference(&mut payload, key, 0);
    }
    Some((header, payload, end))
}

/// Checks that `frame` is exactly one final frame with `opcode`, masked iff a client sent it,
/// and returns its payload.
pub(crate) fn owed_frame(frame: &[u8], role: Role, opcode: OpCode) -> Vec<u8> {
    let (header, payload, used) = split_frame(frame).expect("an owed frame is complete");
    assert_eq!(used, frame.len(), "one owed frame per poll_transmit");
    assert_eq!(header.opcode, opcode);
    assert!(header.fin && header.rsv == 0);
    assert_eq!(
        header.mask.is_some(),
        role == Role::Client,
        "masked iff client"
    );
    payload
}

/// Everything a codec did with one input.
#[derive(Debug, PartialEq)]
pub(crate) struct Outcome {
    /// Events in order.
    pub(crate) events: Vec<Event>,
    /// The error that failed the connection, if any.
    pub(crate) error: Option<ProtocolError>,
    /// Every frame `poll_transmit` returned, in order.
    pub(crate) transmits: Vec<Bytes>,
    /// The state at the end.
    pub(crate) state: CloseState,
}

/// Runs `wire` through a fresh codec in the chunks `cuts` gives, draining events after each
/// chunk and transmits after each event, and asserts the codec's obligations on the way:
/// each ping queues exactly one pong with its payload, a close is echoed with its code, an error
/// queues exactly one close with `err.close_code()`, and nothing is read after `Closed` or
/// `Failed`. With `fresh`, the bytes left after each `Ok(None)` move to a new `BytesMut`, as
/// the engine does.
pub(crate) fn run_codec(
    role: Role,
    limits: Limits,
    wire: &[u8],
    cuts: &[usize],
    fresh: bool,
) -> Outcome {
    let mut codec = Codec::new(role, limits, 0x5EED);
    assert_eq!(codec.role(), role);
    let mut out = Outcome {
        events: Vec::new(),
        error: None,
        transmits: Vec::new(),
        state: CloseState::Open,
    };
    let mut buf = BytesMut::new();
    for chunk in chunks(wire, cuts) {
        buf.extend_from_slice(chunk);
        loop {
            let before = codec.close_state();
            if matches!(before, CloseState::Closed | CloseState::Failed) {
                assert_eq!(
                    codec.poll_event(&mut buf),
                    Ok(None),
                    "read after {before:?}"
                );
                assert_eq!(codec.poll_transmit(), None, "owed frame after {before:?}");
                break;
            }
            match codec.poll_event(&mut buf) {
                Ok(Some(event)) => {
                    check_obligations(&mut codec, before, &event, &mut out.transmits);
                    out.events.push(event);
                }
                Ok(None) => {
                    assert_eq!(codec.poll_transmit(), None, "nothing owed without an event");
                    break;
                }
                Err(err) => {
                    check_failure(&mut codec, before, &err, &mut out.transmits);
                    out.error = Some(err);
                }
            }
        }
        if fresh {
            buf = BytesMut::from(&buf[..]);
        }
    }
    out.state = codec.close_state();
    out
}

fn check_obligations(
    codec: &mut Codec,
    before: CloseState,
    event: &Event,
    transmits: &mut Vec<Bytes>,
) {
    let role = codec.role();
    match event {
        Event::Ping(payload) if before == CloseState::Open => {
            let pong = codec.poll_transmit().expect("a ping is answered by a pong");
            assert_eq!(owed_frame(&pong, role, OpCode::Pong), payload[..]);
            transmits.push(pong);
            assert_eq!(codec.close_state(), before);
        }
        Event::Close(frame) => {
            assert_eq!(codec.close_state(), CloseState::Closed);
            if before == CloseState::Open {
                let echo = codec.poll_transmit().expect("a close is echoed");
                let expected = frame
                    .as_ref()
                    .map_or_else(Vec::new, |f| f.code.as_u16().to_be_bytes().to_vec());
                assert_eq!(owed_frame(&echo, role, OpCode::Close), expected);
                transmits.push(echo);
            }
            assert!(!codec.can_send());
        }
        Event::Text(_) | Event::Binary(_) | Event::Ping(_) | Event::Pong(_) => {
            assert_eq!(codec.close_state(), before);
        }
        other => panic!("unexpected event {other:?}"),
    }
    assert_eq!(
        codec.poll_transmit(),
        None,
        "one owed frame at most per event"
    );
}

fn check_failure(
    codec: &mut Codec,
    before: CloseState,
    err: &ProtocolError,
    transmits: &mut Vec<Bytes>,
) {
    assert_eq!(codec.close_state(), CloseState::Failed, "{err}");
    assert!(!codec.can_send());
    let code = err.close_code();
    assert!(matches!(code.as_u16(), 1002 | 1007 | 1009), "{err}: {code}");
    if before == CloseState::Open {
        let close = codec.poll_transmit().expect("an error queues a close");
        let payload = owed_frame(&close, codec.role(), OpCode::Close);
        let frame = CloseFrame::parse(&Bytes::from(payload))
            .expect("the failing close is itself valid")
            .expect("the failing close carries a code");
        assert_eq!(frame.code, code, "{err}");
        transmits.push(close);
    }
    assert_eq!(codec.poll_transmit(), None, "one close only");
}

/// Runs `wire` whole, then in `cuts`, and requires the same outcome.
pub(crate) fn codec_whole_and_chunked(
    role: Role,
    limits: Limits,
    wire: &[u8],
    cuts: &[usize],
    fresh: bool,
) -> Outcome {
    let whole = run_codec(role, limits, wire, &[], false);
    let chunked = run_codec(role, limits, wire, cuts, fresh);
    assert_eq!(
        whole, chunked,
        "chunking changed the outcome (cuts {cuts:?})"
    );
    whole
}

/// `FrameHeader::parse` on raw bytes: prefixes of a header are incomplete, the result does not
/// depend on what follows, and a parsed header re-encodes to something that parses back.
pub(crate) fn frame_header(data: &[u8]) {
    let parsed = FrameHeader::parse(data);
    match &parsed {
        Ok(Some((header, len))) => {
            assert!(*len <= data.len() && *len <= MAX_HEADER_BYTES);
            assert!(
                *len >= header.encoded_len(),
                "minimal encoding is never longer"
            );
            for cut in 0..*len {
                assert_eq!(FrameHeader::parse(&data[..cut]), Ok(None), "cut {cut}");
            }
            assert!(header.rsv <= 7);
            assert!(
                header.payload_len < 1 << 63,
                "RFC 6455 §5.2: the top bit must be 0"
            );
            let (bytes, n) = header.to_array();
            assert_eq!(n, header.encoded_len());
            let mut encoded = BytesMut::new();
            header.encode(&mut encoded);
            assert_eq!(&encoded[..], &bytes[..n]);
            assert_eq!(FrameHeader::parse(&bytes[..n]), Ok(Some((*header, n))));
        }
        Ok(None) => assert!(data.len() < MAX_HEADER_BYTES),
        Err(ProtocolError::ReservedOpcode(op)) => {
            assert!(matches!(op, 0x3..=0x7 | 0xB..=0xF));
        }
        Err(ProtocolError::InvalidLength) => assert!(data.len() >= 10),
        Err(other) => panic!("FrameHeader::parse returned {other:?}"),
    }
    if matches!(parsed, Ok(Some(_)) | Err(_)) {
        let mut longer = data.to_vec();
        longer.extend_from_slice(&[0xFF; MAX_HEADER_BYTES]);
        assert_eq!(FrameHeader::parse(&longer), parsed, "decided by a prefix");
    }
}

/// `CloseFrame::parse` on raw bytes.
pub(crate) fn close_payload(data: &[u8]) {
    match CloseFrame::parse(&Bytes::copy_from_slice(data)) {
        Ok(None) => assert!(data.is_empty()),
        Ok(Some(frame)) => {
            assert!(frame.code.is_valid_on_wire());
            // Re-encoding keeps what fits a control frame (125 bytes), cut at a char boundary.
            let payload = frame.to_payload();
            if data.len() <= 125 {
                assert_eq!(payload, data);
            } else {
                assert!(payload.len() >= 125 - 3 && payload.len() <= 125);
                assert!(data.starts_with(&payload), "cut one character at most");
            }
        }
        Err(ProtocolError::InvalidClosePayload) => assert_eq!(data.len(), 1),
        Err(ProtocolError::InvalidCloseCode(code)) => {
            assert_eq!(code.to_be_bytes(), data[..2]);
        }
        Err(ProtocolError::InvalidUtf8) => assert!(std::str::from_utf8(&data[2..]).is_err()),
        Err(other) => panic!("CloseFrame::parse returned {other:?}"),
    }
}

/// The payload length after which `bytes` can no longer be the start of valid UTF-8, if any:
/// the byte at index `n - 1` is the first impossible one.
pub(crate) fn utf8_fail_point(bytes: &[u8]) -> Option<usize> {
    let err = std::str::from_utf8(bytes).err()?;
    let seq = err.error_len()?;
    let end = err.valid_up_to() + seq;
    // std reports the maximal invalid prefix; the byte after it was needed to reject it unless
    // the prefix is impossible on its own (like 0xFF).
    let alone = std::str::from_utf8(&bytes[..end])
        .err()
        .and_then(|e| e.error_len());
    Some(if alone.is_some() { end } else { end + 1 })
}

/// `Utf8Validator` fed in pieces agrees with `str::from_utf8` on the whole, and fails in exactly
/// the piece that carries the first impossible byte.
pub(crate) fn utf8(data: &[u8], cuts: &[usize]) {
    let fail_at = utf8_fail_point(data);
    let mut validator = Utf8Validator::new();
    let mut end = 0;
    for piece in chunks(data, cuts) {
        end += piece.len();
        let result = validator.feed(piece);
        match fail_at {
            Some(at) if end >= at && end - piece.len() < at => {
                assert!(result.is_err(), "piece ending at {end} carries byte {at}");
                return;
            }
            _ => assert!(
                result.is_ok(),
                "piece ending at {end}, fail point {fail_at:?}"
            ),
        }
    }
    assert!(fail_at.is_none(), "never reached the fail point");
    assert_eq!(
        validator.finish().is_ok(),
        std::str::from_utf8(data).is_ok()
    );
    // finish resets the validator for the next message.
    assert!(validator.feed(b"ok").is_ok() && validator.finish().is_ok());
}

/// The fast mask equals the reference, whole and in two pieces.
pub(crate) fn masking(data: &[u8]) {
    let [a, b, c, d, offset, payload @ ..] = data else {
        return;
    };
    let key = [*a, *b, *c, *d];
    let offset = usize::from(*offset);
    let mut fast = payload.to_vec();
    let mut reference = payload.to_vec();
    mask::apply_mask(&mut fast, key, offset);
    mask::apply_mask_reference(&mut reference, key, offset);
    assert_eq!(fast, reference);
    let split = offset.min(payload.len());
    let mut pieces = payload.to_vec();
    let (front, back) = pieces.split_at_mut(split);
    mask::apply_mask(front, key, offset);
    mask::apply_mask(back, key, offset + split);
    assert_eq!(pieces, reference);
}

/// `HeadReader::poll_head` over a growing buffer gives what one call on the whole gives.
pub(crate) fn head_reader(data: &[u8], cuts: &[usize], max: usize) {
    let mut reader = HeadReader::new();
    let mut seen = 0;
    let mut result = Ok(None);
    for piece in chunks(data, cuts) {
        seen += piece.len();
        result = reader.poll_head(&data[..seen], max);
        if !matches!(result, Ok(None)) {
            break;
        }
    }
    assert_eq!(HeadReader::new().poll_head(&data[..seen], max), result);
    match result {
        Ok(Some(end)) => {
            assert!(end <= seen && end <= max);
            let head = &data[..end];
            assert!(
                head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"),
                "{head:?}"
            );
        }
        Ok(None) => assert!(seen <= max),
        Err(HandshakeError::HeadTooLarge { max: m }) => assert_eq!(m, max),
        Err(other) => panic!("poll_head returned {other:?}"),
    }
}

/// `UpgradeRequest::parse`: an accepted request yields a 101 that a client with the same key
/// accepts; a refused one yields an error response that a client reads as that status.
pub(crate) fn upgrade_request(data: &[u8]) {
    match UpgradeRequest::parse(data) {
        Ok(req) => {
            assert_eq!(req.method(), "GET");
            let rebuilt = match req.query() {
                Some(q) => format!("{}?{q}", req.path()),
                None => req.path().to_owned(),
            };
            assert_eq!(rebuilt, req.target());
            let nonce: [u8; 16] = BASE64
                .decode(req.key())
                .expect("an accepted key is base64")
                .try_into()
                .expect("an accepted key has 16 bytes");
            let offered: Vec<&str> = req.protocols().collect();
            let client = ClientHandshake::new(nonce, &offered);
            let response = req
                .accept(None)
                .expect("no subprotocol is always acceptable");
            assert_eq!(client.check_response(&response), Ok(None));
            if let Some(first) = offered.first() {
                let response = req.accept(Some(first)).expect("an offered subprotocol");
                assert_eq!(
                    client.check_response(&response),
                    Ok(Some((*first).to_owned()))
                );
            }
            let unknown = "\u{1F600}not-offered";
            assert_eq!(
                req.accept(Some(unknown)),
                Err(HandshakeError::SubprotocolNotOffered(unknown.to_owned()))
            );
        }
        Err(err) => {
            let status = err.status();
            assert!(matches!(status, 400 | 405 | 426 | 431), "{err}: {status}");
            let client = ClientHandshake::new([0; 16], &[]);
            assert_eq!(
                client.check_response(&error_response(&err)),
                Err(HandshakeError::Status(status))
            );
        }
    }
}

/// `ClientHandshake::check_response` on raw bytes: only a 101 with the right accept key passes.
pub(crate) fn client_response(data: &[u8], seed: u8) {
    let client = ClientHandshake::new([seed; 16], &["chat", "v2"]);
    match client.check_response(data) {
        Ok(protocol) => {
            assert!(protocol.is_none_or(|p| p == "chat" || p == "v2"));
            let key = ringcast_protocol::accept_key(BASE64.encode([seed; 16]).as_bytes());
            let text = String::from_utf8_lossy(data);
            assert!(text.contains(&key), "accepted without the accept key");
        }
        Err(err) => assert!(matches!(err.status(), 400 | 431 | 502), "{err}"),
    }
}
