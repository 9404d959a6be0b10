//! Property tests of the codec: encode/decode round trips in both roles, chunking independence,
//! UTF-8 across fragment boundaries, and the message size limit.

mod util;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::sample::Index;
use ringcast_protocol::{
    encode_frame, CloseFrame, CloseState, Codec, Event, FrameHeader, Limits, OpCode, ProtocolError,
    Role,
};
use util::{entry, Control, Encoder, Item};

fn other(role: Role) -> Role {
    match role {
        Role::Server => Role::Client,
        Role::Client => Role::Server,
    }
}

fn any_role() -> impl Strategy<Value = Role> {
    prop_oneof![Just(Role::Server), Just(Role::Client)]
}

fn any_encoder() -> impl Strategy<Value = Encoder> {
    prop_oneof![Just(Encoder::Codec), Just(Encoder::Free)]
}

/// The wire for `items` then an optional close, sent by `sender`, and the events the receiver
/// must report.
fn conversation(
    items: &[Item],
    close: Option<&Option<CloseFrame>>,
    sender: Role,
    how: Encoder,
) -> (Vec<u8>, Vec<Event>) {
    let mut wire = util::encode_items(items, sender, how);
    let mut expected: Vec<Event> = items.iter().flat_map(Item::expected_events).collect();
    if let Some(close) = close {
        wire.extend(util::encode_close(close.as_ref(), sender));
        expected.push(Event::Close(close.clone()));
    }
    (wire, expected)
}

/// Encodes in one role, decodes in the other, then checks the replies the receiver owes by
/// decoding them on a codec of the sender's role.
fn round_trip(
    items: &[Item],
    close: &Option<Option<CloseFrame>>,
    sender: Role,
    how: Encoder,
) -> Result<(), TestCaseError> {
    let (mut wire, expected) = conversation(items, close.as_ref(), sender, how);
    if close.is_some() {
        // Nothing after the peer's close is read.
        wire.extend_from_slice(b"\x81\x05after");
    }
    let mut receiver = Codec::new(other(sender), Limits::default(), 1);
    let (events, error) = util::decode_whole(&mut receiver, &wire);
    prop_assert_eq!(error, None);
    prop_assert_eq!(&events, &expected);

    // The replies: a pong per ping, in order, then the close echo with the same code.
    let replies: Vec<u8> = util::transmits(&mut receiver).concat();
    let mut sender_codec = Codec::new(sender, Limits::default(), 2);
    let (reply_events, error) = util::decode_whole(&mut sender_codec, &replies);
    prop_assert_eq!(error, None);
    let mut expected_replies: Vec<Event> = items
        .iter()
        .flat_map(Item::pings)
        .map(|p| Event::Pong(Bytes::from(p)))
        .collect();
    if let Some(close) = close {
        let echo = close.as_ref().map(|f| CloseFrame::new(f.code, ""));
        expected_replies.push(Event::Close(echo));
        prop_assert_eq!(receiver.close_state(), CloseState::Closed);
        prop_assert_eq!(sender_codec.close_state(), CloseState::Closed);
    } else {
        prop_assert_eq!(receiver.close_state(), CloseState::Open);
    }
    prop_assert_eq!(reply_events, expected_replies);
    Ok(())
}

proptest! {
    #![proptest_config(util::config(256))]

    #[test]
    fn client_frames_decode_on_a_server_to_the_same_events(
        items in util::any_items(6, 300),
        close in prop::option::of(util::any_close()),
        how in any_encoder(),
    ) {
        round_trip(&items, &close, Role::Client, how)?;
    }

    #[test]
    fn server_frames_decode_on_a_client_to_the_same_events(
        items in util::any_items(6, 300),
        close in prop::option::of(util::any_close()),
        how in any_encoder(),
    ) {
        round_trip(&items, &close, Role::Server, how)?;
    }

    /// The same bytes fed whole, in arbitrary chunks appended to one buffer, and in arbitrary
    /// chunks whose leftovers move to a fresh buffer after each `Ok(None)` (the engine's
    /// pattern), give the same events and the same owed frames.
    #[test]
    fn any_chunking_gives_the_same_events(
        items in util::any_items(5, 400),
        close in prop::option::of(util::any_close()),
        sender in any_role(),
        cut_indices in prop::collection::vec(any::<Index>(), 0..40),
        fresh in any::<bool>(),
    ) {
        let (wire, expected) = conversation(&items, close.as_ref(), sender, Encoder::Codec);
        let cuts = util::cuts(&cut_indices, wire.len());
        let outcome =
            entry::codec_whole_and_chunked(other(sender), Limits::default(), &wire, &cuts, fresh);
        prop_assert_eq!(outcome.error, None);
        prop_assert_eq!(outcome.events, expected);
    }

    /// Byte by byte, leftovers always moved: every partial payload is unmasked in place, moved,
    /// and the rest unmasked at the right key offset in its new home.
    #[test]
    fn byte_at_a_time_into_fresh_buffers_gives_the_same_events(
        items in util::any_items(3, 200),
        sender in any_role(),
    ) {
        let (wire, expected) = conversation(&items, None, sender, Encoder::Codec);
        let cuts: Vec<usize> = (1..wire.len()).collect();
        let outcome = entry::run_codec(other(sender), Limits::default(), &wire, &cuts, true);
        prop_assert_eq!(outcome.error, None);
        prop_assert_eq!(outcome.events, expected);
    }
}

/// Invalid sequences, each impossible wherever it is inserted into valid text.
const BAD_UTF8: &[&[u8]] = &[
    b"\xFF",
    b"\x80",
    b"\xC0\x80",         // overlong NUL
    b"\xC1\xBF",         // overlong
    b"\xE0\x80\xAF",     // overlong '/'
    b"\xED\xA0\x80",     // UTF-16 surrogate
    b"\xED\xBF\xBF",     // UTF-16 surrogate
    b"\xF4\x90\x80\x80", // above U+10FFFF
    b"\xF5\x80\x80\x80",
    b"\xF0\x80\x80\xAF", // overlong
    b"\xE2\x82",         // truncated: fails on what follows, or at the end of the message
    b"\xF0\x9F\x98",     // truncated
    b"\xC3",             // truncated
];

/// A text message in fragments (cut anywhere, code points included) with controls between them,
/// masked by a client. Returns the wire and, for each payload byte, its position on the wire.
fn fragmented_text(
    payload: &[u8],
    cuts: &[usize],
    between: &[(usize, Control)],
) -> (Vec<u8>, Vec<usize>) {
    let mut wire = BytesMut::new();
    let mut positions = Vec::with_capacity(payload.len());
    let fragments = entry::chunks(payload, cuts);
    let last = fragments.len() - 1;
    for (i, fragment) in fragments.into_iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Text
        } else {
            OpCode::Continuation
        };
        encode_frame(&mut wire, i == last, opcode, fragment, Some([1, 2, 3, 4]));
        positions.extend(wire.len() - fragment.len()..wire.len());
        if i < last {
            for (_, c) in between.iter().filter(|(at, _)| *at == i) {
                let (op, p) = match c {
                    Control::Ping(p) => (OpCode::Ping, p),
                    Control::Pong(p) => (OpCode::Pong, p),
                };
                encode_frame(&mut wire, true, op, p, Some([5, 6, 7, 8]));
            }
        }
    }
    (wire.to_vec(), positions)
}

/// Feeds `wire` one byte at a time; returns the events, the error and how many bytes had been
/// fed when it happened.
fn feed_bytewise(codec: &mut Codec, wire: &[u8]) -> (Vec<Event>, Option<(ProtocolError, usize)>) {
    let mut buf = BytesMut::new();
    let mut events = Vec::new();
    for (i, byte) in wire.iter().enumerate() {
        buf.extend_from_slice(&[*byte]);
        let (evs, err) = util::drain(codec, &mut buf);
        events.extend(evs);
        if let Some(err) = err {
            return (events, Some((err, i + 1)));
        }
    }
    (events, None)
}

proptest! {
    #![proptest_config(util::config(256))]

    /// Valid text with one invalid sequence inserted anywhere, fragmented anywhere (code points
    /// split across fragments included), with controls between fragments: the codec fails with
    /// `InvalidUtf8` and close code 1007 exactly when the first impossible byte arrives, or at
    /// the end of the message when it ends inside a code point.
    #[test]
    fn bad_utf8_is_caught_at_every_fragment_boundary(
        text in util::any_text(24),
        at in any::<Index>(),
        bad in prop::sample::select(BAD_UTF8),
        cut_indices in prop::collection::vec(any::<Index>(), 0..6),
        between in prop::collection::vec((0usize..6, util::any_control()), 0..4),
    ) {
        let mut payload = text.into_bytes();
        let at = at.index(payload.len() + 1);
        payload.splice(at..at, bad.iter().copied());
        prop_assert!(std::str::from_utf8(&payload).is_err());
        let cuts = util::cuts(&cut_indices, payload.len());
        let (wire, positions) = fragmented_text(&payload, &cuts, &between);

        let mut server = Codec::server(Limits::default());
        let (events, failure) = feed_bytewise(&mut server, &wire);
        let (err, fed) = failure.expect("invalid text must fail");
        prop_assert_eq!(&err, &ProtocolError::InvalidUtf8);
        prop_assert_eq!(err.close_code().as_u16(), 1007);
        let expected_at = match entry::utf8_fail_point(&payload) {
            Some(n) => positions[n - 1] + 1,
            None => wire.len(),
        };
        prop_assert_eq!(fed, expected_at, "failed at the wrong byte");
        prop_assert!(events.iter().all(|e| matches!(e, Event::Ping(_) | Event::Pong(_))));

        // Whole, chunked and byte-wise agree, and the close that was queued says 1007.
        let outcome = entry::codec_whole_and_chunked(
            Role::Server, Limits::default(), &wire, &cuts, true);
        prop_assert_eq!(outcome.error, Some(ProtocolError::InvalidUtf8));
        let close = outcome.transmits.last().expect("a close is owed");
        let payload = entry::owed_frame(close, Role::Server, OpCode::Close);
        prop_assert_eq!(&payload[..2], &1007u16.to_be_bytes());
    }

    /// Valid text split anywhere never errors, and comes out whole.
    #[test]
    fn valid_text_split_anywhere_never_errors(
        text in util::any_text(24),
        cut_indices in prop::collection::vec(any::<Index>(), 0..6),
        between in prop::collection::vec((0usize..6, util::any_control()), 0..4),
    ) {
        let cuts = util::cuts(&cut_indices, text.len());
        let (wire, _) = fragmented_text(text.as_bytes(), &cuts, &between);
        let mut server = Codec::server(Limits::default());
        let (events, failure) = feed_bytewise(&mut server, &wire);
        prop_assert_eq!(failure, None);
        match events.last() {
            Some(Event::Text(t)) => prop_assert_eq!(t.as_str(), text.as_str()),
            other => prop_assert!(false, "expected the text last, got {:?}", other),
        }
    }
}

proptest! {
    #![proptest_config(util::config(256))]

    /// A message in fragments fails with `MessageTooLarge` on the header of the first fragment
    /// that takes the announced total past `max_message_bytes`, never earlier; a message at the
    /// limit passes.
    #[test]
    fn message_too_large_exactly_when_the_announced_total_crosses_the_limit(
        sizes in prop::collection::vec(0usize..80, 1..8),
        pivot in any::<Index>(),
        delta in -1isize..=1,
        text in any::<bool>(),
        ping_after in prop::option::of(0usize..8),
    ) {
        let mut wire = BytesMut::new();
        let mut header_ends = Vec::new();
        let last = sizes.len() - 1;
        for (i, size) in sizes.iter().enumerate() {
            let opcode = match (i, text) {
                (0, true) => OpCode::Text,
                (0, false) => OpCode::Binary,
                _ => OpCode::Continuation,
            };
            let start = wire.len();
            encode_frame(&mut wire, i == last, opcode, &vec![b'x'; *size], Some([4, 3, 2, 1]));
            let (_, header_len) = FrameHeader::parse(&wire[start..]).unwrap().unwrap();
            header_ends.push(start + header_len);
            if ping_after == Some(i) && i < last {
                // A control frame between fragments does not count towards the message.
                encode_frame(&mut wire, true, OpCode::Ping, &[b'p'; 125], Some([0; 4]));
            }
        }
        let totals: Vec<usize> = sizes
            .iter()
            .scan(0, |sum, s| {
                *sum += s;
                Some(*sum)
            })
            .collect();
        // A limit just below, at or just above one of the running totals.
        let max = totals[pivot.index(totals.len())].saturating_add_signed(delta);
        let limits = Limits::default().with_max_message_bytes(max);

        let mut server = Codec::server(limits);
        let (events, failure) = feed_bytewise(&mut server, &wire);
        match totals.iter().position(|&t| t > max) {
            Some(k) => {
                let (err, fed) = failure.expect("over the limit must fail");
                prop_assert_eq!(
                    &err,
                    &ProtocolError::MessageTooLarge { size: totals[k] as u64, max }
                );
                prop_assert_eq!(fed, header_ends[k], "failed on the wrong byte");
                prop_assert_eq!(err.close_code().as_u16(), 1009);
                prop_assert_eq!(server.close_state(), CloseState::Failed);
                // Pongs for the pings that came before, then the close.
                let owed = util::transmits(&mut server);
                let close = owed.last().expect("a close is owed");
                let payload = entry::owed_frame(close, Role::Server, OpCode::Close);
                prop_assert_eq!(&payload[..2], &1009u16.to_be_bytes());
            }
            None => {
                prop_assert_eq!(failure, None);
                let total = *totals.last().unwrap();
                let expected = if text {
                    Event::Text(String::from_utf8(vec![b'x'; total]).unwrap().into())
                } else {
                    Event::Binary(Bytes::from(vec![b'x'; total]))
                };
                prop_assert_eq!(events.last(), Some(&expected));
            }
        }
    }

    /// A frame over `max_frame_bytes` fails on its header with 1009, before its payload.
    #[test]
    fn frame_too_large_fails_on_its_header(
        max in 0usize..300,
        size in 0usize..600,
        role in any_role(),
    ) {
        let limits = Limits::default().with_max_frame_bytes(max);
        let mask = (other(role) == Role::Client).then_some([7; 4]);
        let mut wire = BytesMut::new();
        encode_frame(&mut wire, true, OpCode::Binary, &vec![0; size], mask);
        let (_, header_len) = FrameHeader::parse(&wire).unwrap().unwrap();
        let mut codec = Codec::new(role, limits, 3);
        let (events, failure) = feed_bytewise(&mut codec, &wire);
        if size > max {
            let (err, fed) = failure.expect("over the limit must fail");
            prop_assert_eq!(err, ProtocolError::FrameTooLarge { size: size as u64, max });
            prop_assert_eq!(fed, header_len);
        } else {
            prop_assert_eq!(failure, None);
            prop_assert_eq!(events, vec![Event::Binary(Bytes::from(vec![0; size]))]);
        }
    }
}

/// Payload lengths on both sides of each length encoding, through every role, chunked at a few
/// awkward places (inside the extended length, inside the mask key, mid-payload).
#[test]
fn length_encoding_edges_round_trip_in_pieces() {
    for len in [0usize, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
        let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        for sender in [Role::Client, Role::Server] {
            let mut codec = Codec::new(sender, Limits::default(), 9);
            let mut wire = BytesMut::new();
            codec.encode_frame(true, OpCode::Binary, &payload, &mut wire);
            let cuts = [1, 3, 5, 9, 11, 13, 20, len / 2, len.saturating_sub(1)];
            let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(wire.len())).collect();
            cuts.sort_unstable();
            for fresh in [false, true] {
                let outcome = entry::codec_whole_and_chunked(
                    other(sender),
                    Limits::default(),
                    &wire,
                    &cuts,
                    fresh,
                );
                assert_eq!(outcome.error, None, "len {len}");
                assert_eq!(
                    outcome.events,
                    vec![Event::Binary(Bytes::from(payload.clone()))],
                    "len {len}"
                );
            }
        }
    }
}
