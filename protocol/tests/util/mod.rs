//! Helpers shared by the integration tests: message plans, their encoding in either role, and
//! feeding wire bytes to a codec in chunks.
// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

#[path = "../entry/mod.rs"]
pub(crate) mod entry;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proptest::sample::Index;
use ringcast_protocol::{
    encode_frame, server_frame, CloseCode, CloseFrame, Codec, Event, Limits, OpCode, ProtocolError,
    Role, Utf8Bytes,
};

/// proptest's config with `cases` unless `PROPTEST_CASES` asks for more (or fewer).
pub(crate) fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// A control frame that may be sent between the fragments of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

/// One step of a conversation: a control frame, or a data message sent in fragments with
/// control frames between them.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    Control(Control),
    Message {
        text: bool,
        payload: Vec<u8>,
        /// Fragment boundaries, ascending, within `0..=payload.len()`; none for a single frame.
        cuts: Vec<usize>,
        /// `(i, control)`: `control` goes after fragment `i` (never after the last).
        between: Vec<(usize, Control)>,
    },
}

impl Item {
    /// The events a receiver reports for this item, in order.
    pub(crate) fn expected_events(&self) -> Vec<Event> {
        match self {
            Item::Control(c) => vec![control_event(c)],
            Item::Message {
                text,
                payload,
                cuts,
                between,
            } => {
                // Controls go out after their fragment, in fragment order.
                let fragments = cuts.len() + 1;
                let mut out: Vec<Event> = (0..fragments - 1)
                    .flat_map(|i| between.iter().filter(move |(at, _)| *at == i))
                    .map(|(_, c)| control_event(c))
                    .collect();
                out.push(if *text {
                    let s = String::from_utf8(payload.clone()).expect("text items hold UTF-8");
                    Event::Text(Utf8Bytes::from(s))
                } else {
                    Event::Binary(Bytes::from(payload.clone()))
                });
                out
            }
        }
    }

    /// The payloads of the pings in this item, in wire order.
    pub(crate) fn pings(&self) -> Vec<Vec<u8>> {
        self.expected_events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Ping(p) => Some(p.to_vec()),
                _ => None,
            })
            .collect()
    }
}

fn control_event(c: &Control) -> Event {
    match c {
        Control::Ping(p) => Event::Ping(Bytes::from(p.clone())),
        Control::Pong(p) => Event::Pong(Bytes::from(p.clone())),
    }
}

/// How a sender writes frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoder {
    /// `Codec::encode_frame` of a codec in this role.
    Codec,
    /// The free `encode_frame` (masked with a fixed key for a client), and `server_frame` for
    /// whole server messages.
    Free,
}

/// Encodes items as `sender` would send them.
pub(crate) fn encode_items(items: &[Item], sender: Role, how: Encoder) -> Vec<u8> {
    let mut codec = Codec::new(sender, Limits::default(), 0xC0FFEE);
    let mut wire = BytesMut::new();
    let mut frame = |fin: bool, opcode: OpCode, payload: &[u8], wire: &mut BytesMut| match how {
        Encoder::Codec => codec.encode_frame(fin, opcode, payload, wire),
        Encoder::Free if sender == Role::Server && fin => {
            wire.extend_from_slice(&server_frame(opcode, payload));
        }
        Encoder::Free => {
            let mask = (sender == Role::Client).then_some([0xA1, 0xB2, 0xC3, 0xD4]);
            encode_frame(wire, fin, opcode, payload, mask);
        }
    };
    for item in items {
        match item {
            Item::Control(c) => {
                let (op, p) = control_parts(c);
                frame(true, op, p, &mut wire);
            }
            Item::Message {
                text,
                payload,
                cuts,
                between,
            } => {
                let fragments = entry::chunks(payload, cuts);
                let last = fragments.len() - 1;
                for (i, fragment) in fragments.into_iter().enumerate() {
                    let opcode = match (i, text) {
                        (0, true) => OpCode::Text,
                        (0, false) => OpCode::Binary,
                        _ => OpCode::Continuation,
                    };
                    frame(i == last, opcode, fragment, &mut wire);
                    if i < last {
                        for (_, c) in between.iter().filter(|(at, _)| *at == i) {
                            let (op, p) = control_parts(c);
                            frame(true, op, p, &mut wire);
                        }
                    }
                }
            }
        }
    }
    wire.to_vec()
}

fn control_parts(c: &Control) -> (OpCode, &[u8]) {
    match c {
        Control::Ping(p) => (OpCode::Ping, p),
        Control::Pong(p) => (OpCode::Pong, p),
    }
}

/// A close frame as `sender` sends it.
pub(crate) fn encode_close(frame: Option<&CloseFrame>, sender: Role) -> Vec<u8> {
    let payload = frame.map(CloseFrame::to_payload).unwrap_or_default();
    let mask = (sender == Role::Client).then_some([9, 8, 7, 6]);
    let mut wire = BytesMut::new();
    encode_frame(&mut wire, true, OpCode::Close, &payload, mask);
    wire.to_vec()
}

/// Every event `wire` yields when fed whole, and the error that ended it, if any.
pub(crate) fn decode_whole(codec: &mut Codec, wire: &[u8]) -> (Vec<Event>, Option<ProtocolError>) {
    let mut buf = BytesMut::from(wire);
    drain(codec, &mut buf)
}

/// Polls until `Ok(None)` or an error.
pub(crate) fn drain(codec: &mut Codec, buf: &mut BytesMut) -> (Vec<Event>, Option<ProtocolError>) {
    let mut events = Vec::new();
    loop {
        match codec.poll_event(buf) {
            Ok(Some(ev)) => events.push(ev),
            Ok(None) => return (events, None),
            Err(e) => return (events, Some(e)),
        }
    }
}

/// Every frame `poll_transmit` owes, in order.
pub(crate) fn transmits(codec: &mut Codec) -> Vec<Bytes> {
    std::iter::from_fn(|| codec.poll_transmit()).collect()
}

/// Sorted cut points in `0..=len` from proptest indices.
pub(crate) fn cuts(indices: &[Index], len: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = indices.iter().map(|i| i.index(len + 1)).collect();
    cuts.sort_unstable();
    cuts
}

/// Arbitrary unicode, every scalar value possible.
pub(crate) fn any_text(max_chars: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..=max_chars).prop_map(String::from_iter)
}

/// A ping or pong with at most 125 bytes.
pub(crate) fn any_control() -> impl Strategy<Value = Control> {
    let payload = prop::collection::vec(any::<u8>(), 0..=125);
    prop_oneof![
        payload.clone().prop_map(Control::Ping),
        payload.prop_map(Control::Pong),
    ]
}

/// A data message, fragmented or not, possibly with control frames between its fragments.
pub(crate) fn any_message(max_len: usize) -> impl Strategy<Value = Item> {
    let payload = prop_oneof![
        any_text(max_len / 4).prop_map(|s| (true, s.into_bytes())),
        prop::collection::vec(any::<u8>(), 0..=max_len).prop_map(|b| (false, b)),
    ];
    let cut_indices = prop::collection::vec(any::<Index>(), 0..5);
    let between = prop::collection::vec((0usize..5, any_control()), 0..4);
    (payload, cut_indices, between).prop_map(|((text, payload), cut_indices, between)| {
        let cuts = cuts(&cut_indices, payload.len());
        Item::Message {
            text,
            payload,
            cuts,
            between,
        }
    })
}

/// A conversation: messages and lone control frames.
pub(crate) fn any_items(max_items: usize, max_len: usize) -> impl Strategy<Value = Vec<Item>> {
    let item = prop_oneof![
        3 => any_message(max_len),
        1 => any_control().prop_map(Item::Control),
    ];
    prop::collection::vec(item, 0..=max_items)
}

/// A close frame that is valid on the wire, or none.
pub(crate) fn any_close() -> impl Strategy<Value = Option<CloseFrame>> {
    let code = prop_oneof![
        prop::sample::select(vec![
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011
        ]),
        3000u16..=4999,
    ];
    prop::option::of((code, any_text(40)).prop_map(|(c, r)| CloseFrame::new(CloseCode::new(c), &r)))
}
