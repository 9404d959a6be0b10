//! Differential tests against tungstenite: our encoder into its decoder and its encoder into
//! ours, in both roles, over an in-memory stream. Both must agree on every message, on the
//! replies the protocol obliges (pong, close echo) and on close codes, and both must refuse the
//! same broken frames.

mod util;

use std::io::{self, Read, Write};

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use ringcast_protocol::{
    CloseCode, CloseFrame, CloseState, Codec, Event, Limits, OpCode, ProtocolError, Role,
};
use tungstenite::{
    protocol::{
        frame::{
            coding::{Data, OpCode as TOpCode},
            Frame,
        },
        CloseFrame as TCloseFrame, Role as TRole, WebSocketConfig,
    },
    Message, WebSocket,
};
use util::Item;

/// One end of an in-memory connection: reads what the test pushed, records what is written.
/// An empty input reads as `WouldBlock`, as a non-blocking socket would.
#[derive(Debug, Default)]
struct Mem {
    input: Vec<u8>,
    read: usize,
    output: Vec<u8>,
}

impl Read for Mem {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = &self.input[self.read..];
        if rest.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.read += n;
        Ok(n)
    }
}

impl Write for Mem {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A message as both libraries see it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

impl From<&Event> for Msg {
    fn from(e: &Event) -> Self {
        match e {
            Event::Text(t) => Msg::Text(t.as_str().to_owned()),
            Event::Binary(b) => Msg::Binary(b.to_vec()),
            Event::Ping(b) => Msg::Ping(b.to_vec()),
            Event::Pong(b) => Msg::Pong(b.to_vec()),
            Event::Close(f) => Msg::Close(
                f.as_ref()
                    .map(|f| (f.code.as_u16(), f.reason.as_str().to_owned())),
            ),
            other => panic!("unexpected event {other:?}"),
        }
    }
}

impl From<&Message> for Msg {
    fn from(m: &Message) -> Self {
        match m {
            Message::Text(t) => Msg::Text(t.as_str().to_owned()),
            Message::Binary(b) => Msg::Binary(b.to_vec()),
            Message::Ping(b) => Msg::Ping(b.to_vec()),
            Message::Pong(b) => Msg::Pong(b.to_vec()),
            Message::Close(f) => Msg::Close(
                f.as_ref()
                    .map(|f| (u16::from(f.code), f.reason.as_str().to_owned())),
            ),
            Message::Frame(_) => panic!("tungstenite never reads a raw frame"),
        }
    }
}

impl Msg {
    fn to_tungstenite(&self) -> Message {
        match self {
            Msg::Text(t) => Message::text(t.clone()),
            Msg::Binary(b) => Message::binary(b.clone()),
            Msg::Ping(b) => Message::Ping(Bytes::from(b.clone())),
            Msg::Pong(b) => Message::Pong(Bytes::from(b.clone())),
            Msg::Close(f) => Message::Close(f.as_ref().map(|(code, reason)| TCloseFrame {
                code: (*code).into(),
                reason: reason.clone().into(),
            })),
        }
    }

    /// Encodes this message with our codec, as one frame (a close goes through `close()`).
    fn encode(&self, codec: &mut Codec, wire: &mut BytesMut) {
        let (opcode, payload) = match self {
            Msg::Text(t) => (OpCode::Text, t.as_bytes()),
            Msg::Binary(b) => (OpCode::Binary, &b[..]),
            Msg::Ping(b) => (OpCode::Ping, &b[..]),
            Msg::Pong(b) => (OpCode::Pong, &b[..]),
            Msg::Close(f) => {
                let frame = f
                    .as_ref()
                    .map(|(code, reason)| CloseFrame::new(CloseCode::new(*code), reason));
                assert!(codec.close(frame));
                wire.extend_from_slice(&codec.poll_transmit().expect("close() queues a frame"));
                return;
            }
        };
        codec.encode_frame(true, opcode, payload, wire);
    }
}

fn their_role(ours: Role) -> TRole {
    match ours {
        Role::Server => TRole::Client,
        Role::Client => TRole::Server,
    }
}

fn tungstenite(role: TRole, config: Option<WebSocketConfig>) -> WebSocket<Mem> {
    WebSocket::from_raw_socket(Mem::default(), role, config)
}

/// Gives `bytes` to tungstenite and reads until it would block or fails. Each `read` first
/// flushes the pong or close reply the previous message obliged.
fn tung_read(ws: &mut WebSocket<Mem>, bytes: &[u8]) -> (Vec<Msg>, Option<tungstenite::Error>) {
    ws.get_mut().input.extend_from_slice(bytes);
    let mut out = Vec::new();
    loop {
        match ws.read() {
            Ok(m) => out.push(Msg::from(&m)),
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                return (out, None)
            }
            Err(e) => return (out, Some(e)),
        }
    }
}

fn tung_output(ws: &mut WebSocket<Mem>) -> Vec<u8> {
    std::mem::take(&mut ws.get_mut().output)
}

fn our_read(codec: &mut Codec, bytes: &[u8]) -> (Vec<Msg>, Option<ProtocolError>) {
    let (events, err) = util::decode_whole(codec, bytes);
    (events.iter().map(Msg::from).collect(), err)
}

fn our_output(codec: &mut Codec) -> Vec<u8> {
    util::transmits(codec).concat()
}

/// Payloads at every length-encoding edge, a 1 MiB one, and text that is not ASCII.
fn corpus() -> Vec<Msg> {
    let mut msgs = vec![
        Msg::Text(String::new()),
        Msg::Text("hello".into()),
        Msg::Text("κόσμε 𝄞 中文 \u{10FFFF}".into()),
        Msg::Text("é".repeat(40_000)),
        Msg::Ping(Vec::new()),
        Msg::Ping(vec![0xAB; 125]),
        Msg::Pong(Vec::new()),
        Msg::Pong(vec![0xCD; 125]),
    ];
    for len in [0usize, 1, 125, 126, 127, 65_535, 65_536, 1 << 20] {
        msgs.push(Msg::Binary((0..len).map(|i| (i % 251) as u8).collect()));
        msgs.push(Msg::Text("a".repeat(len)));
    }
    msgs
}

fn pongs_for(msgs: &[Msg]) -> Vec<Msg> {
    msgs.iter()
        .filter_map(|m| match m {
            Msg::Ping(p) => Some(Msg::Pong(p.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn our_frames_decode_in_tungstenite_in_both_roles() {
    for ours in [Role::Client, Role::Server] {
        let mut codec = Codec::new(ours, Limits::default(), 11);
        let mut ws = tungstenite(their_role(ours), None);
        let msgs = corpus();
        let mut wire = BytesMut::new();
        for m in &msgs {
            m.encode(&mut codec, &mut wire);
        }
        let (read, err) = tung_read(&mut ws, &wire);
        assert!(err.is_none(), "{ours:?}: {err:?}");
        assert_eq!(read, msgs, "{ours:?}");
        // Tungstenite's pongs decode here, one per ping, in order.
        let (replies, err) = our_read(&mut codec, &tung_output(&mut ws));
        assert_eq!(err, None);
        assert_eq!(replies, pongs_for(&msgs), "{ours:?}");
    }
}

#[test]
fn tungstenite_frames_decode_here_in_both_roles() {
    for ours in [Role::Client, Role::Server] {
        let mut codec = Codec::new(ours, Limits::default(), 12);
        let mut ws = tungstenite(their_role(ours), None);
        let msgs = corpus();
        for m in &msgs {
            ws.send(m.to_tungstenite()).unwrap();
        }
        let (read, err) = our_read(&mut codec, &tung_output(&mut ws));
        assert_eq!(err, None, "{ours:?}");
        assert_eq!(read, msgs, "{ours:?}");
        // Our pongs decode in tungstenite, one per ping, in order.
        let (replies, err) = tung_read(&mut ws, &our_output(&mut codec));
        assert!(err.is_none(), "{err:?}");
        assert_eq!(replies, pongs_for(&msgs), "{ours:?}");
    }
}

/// A text message in five fragments, cut inside code points, with a ping and a pong between
/// fragments; then a binary one in three fragments.
/// One frame to write: FIN, opcode, payload.
type FrameSpec = (bool, OpCode, Vec<u8>);

fn fragmented() -> (Vec<FrameSpec>, Vec<Msg>) {
    let text = "fragments 𝄞 cut 中文 inside code points";
    let b = text.as_bytes();
    let cut = [0, 11, 13, 27, 28, b.len()];
    let mut frames = Vec::new();
    for (i, w) in cut.windows(2).enumerate() {
        let op = if i == 0 {
            OpCode::Text
        } else {
            OpCode::Continuation
        };
        frames.push((w[1] == b.len(), op, b[w[0]..w[1]].to_vec()));
        if i == 1 {
            frames.push((true, OpCode::Ping, b"between".to_vec()));
        }
        if i == 2 {
            frames.push((true, OpCode::Pong, Vec::new()));
        }
    }
    frames.push((false, OpCode::Binary, vec![1; 70_000]));
    frames.push((false, OpCode::Continuation, Vec::new()));
    frames.push((true, OpCode::Continuation, vec![2; 3]));
    let mut binary = vec![1; 70_000];
    binary.extend([2; 3]);
    let msgs = vec![
        Msg::Ping(b"between".to_vec()),
        Msg::Pong(Vec::new()),
        Msg::Text(text.into()),
        Msg::Binary(binary),
    ];
    (frames, msgs)
}

fn tung_opcode(op: OpCode) -> TOpCode {
    match op {
        OpCode::Text => TOpCode::Data(Data::Text),
        OpCode::Binary => TOpCode::Data(Data::Binary),
        OpCode::Continuation => TOpCode::Data(Data::Continue),
        other => panic!("{other:?} is sent as a message"),
    }
}

#[test]
fn fragmented_messages_agree_in_both_directions_and_roles() {
    let (frames, msgs) = fragmented();
    for ours in [Role::Client, Role::Server] {
        // Ours to tungstenite.
        let mut codec = Codec::new(ours, Limits::default(), 13);
        let mut ws = tungstenite(their_role(ours), None);
        let mut wire = BytesMut::new();
        for (fin, op, payload) in &frames {
            codec.encode_frame(*fin, *op, payload, &mut wire);
        }
        let (read, err) = tung_read(&mut ws, &wire);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(read, msgs, "ours {ours:?} to tungstenite");

        // Tungstenite to ours.
        let mut codec = Codec::new(ours, Limits::default(), 14);
        let mut ws = tungstenite(their_role(ours), None);
        for (fin, op, payload) in &frames {
            let message = match op {
                OpCode::Ping => Message::Ping(Bytes::from(payload.clone())),
                OpCode::Pong => Message::Pong(Bytes::from(payload.clone())),
                _ => Message::Frame(Frame::message(payload.clone(), tung_opcode(*op), *fin)),
            };
            ws.write(message).unwrap();
        }
        ws.flush().unwrap();
        let (read, err) = our_read(&mut codec, &tung_output(&mut ws));
        assert_eq!(err, None);
        assert_eq!(read, msgs, "tungstenite to ours {ours:?}");
    }
}

/// Codes both libraries accept on the wire.
const SHARED_CODES: &[u16] = &[
    1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 3999, 4000, 4999,
];

#[test]
fn closing_handshake_we_start_is_echoed_by_tungstenite_with_our_code() {
    let codes = SHARED_CODES.iter().map(|&c| Some((c, "bye 👋".to_owned())));
    for close in codes.chain([None]) {
        for ours in [Role::Client, Role::Server] {
            let mut codec = Codec::new(ours, Limits::default(), 15);
            let mut ws = tungstenite(their_role(ours), None);
            let mut wire = BytesMut::new();
            Msg::Close(close.clone()).encode(&mut codec, &mut wire);
            assert_eq!(codec.close_state(), CloseState::CloseSent);
            let (read, _) = tung_read(&mut ws, &wire);
            assert_eq!(read, vec![Msg::Close(close.clone())], "{ours:?}");
            // Tungstenite echoes the frame it got, reason included.
            let (echo, err) = our_read(&mut codec, &tung_output(&mut ws));
            assert_eq!(err, None);
            assert_eq!(echo, vec![Msg::Close(close.clone())], "{ours:?}");
            assert_eq!(codec.close_state(), CloseState::Closed);
            assert_eq!(codec.poll_transmit(), None, "no echo of an echo");
        }
    }
}

#[test]
fn closing_handshake_tungstenite_starts_is_echoed_here_with_its_code() {
    let codes = SHARED_CODES.iter().map(|&c| Some((c, "going".to_owned())));
    for close in codes.chain([None]) {
        for ours in [Role::Client, Role::Server] {
            let mut codec = Codec::new(ours, Limits::default(), 16);
            let mut ws = tungstenite(their_role(ours), None);
            ws.close(close.as_ref().map(|(code, reason)| TCloseFrame {
                code: (*code).into(),
                reason: reason.clone().into(),
            }))
            .unwrap();
            let (read, err) = our_read(&mut codec, &tung_output(&mut ws));
            assert_eq!(err, None);
            assert_eq!(read, vec![Msg::Close(close.clone())], "{ours:?}");
            assert_eq!(codec.close_state(), CloseState::Closed);
            // We echo the code without the reason.
            let (echo, _) = tung_read(&mut ws, &our_output(&mut codec));
            let expected = close.as_ref().map(|(code, _)| (*code, String::new()));
            assert_eq!(echo, vec![Msg::Close(expected)], "{ours:?}");
        }
    }
}

/// A close code that may not travel on the wire: we fail the connection with 1002 and
/// tungstenite answers 1002 too.
#[test]
fn invalid_close_codes_get_1002_from_both() {
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65_535] {
        for sender in [Role::Client, Role::Server] {
            let frame = CloseFrame::new(CloseCode::new(code), "");
            let wire = util::encode_close(Some(&frame), sender);

            let mut codec = Codec::new(other(sender), Limits::default(), 17);
            let (_, err) = our_read(&mut codec, &wire);
            assert_eq!(err, Some(ProtocolError::InvalidCloseCode(code)));
            let (reply, _) = our_read(
                &mut Codec::new(sender, Limits::default(), 0),
                &our_output(&mut codec),
            );
            assert!(
                matches!(&reply[..], [Msg::Close(Some((1002, _)))]),
                "{code}: {reply:?}"
            );

            let mut ws = tungstenite(their_role(sender), None);
            let (read, _) = tung_read(&mut ws, &wire);
            assert!(
                matches!(&read[..], [Msg::Close(Some((1002, _)))]),
                "{code}: {read:?}"
            );
            let (reply, _) = our_read(
                &mut Codec::new(sender, Limits::default(), 0),
                &tung_output(&mut ws),
            );
            assert!(
                matches!(&reply[..], [Msg::Close(Some((1002, _)))]),
                "{code}: {reply:?}"
            );
        }
    }
}

/// 1014 (Bad Gateway) is registered with IANA, and we accept it; tungstenite 0.30 treats it as
/// reserved and answers 1002. This pins the one difference we know of, so a change on either
/// side shows up here.
#[test]
fn close_code_1014_is_accepted_here_and_refused_by_tungstenite() {
    let frame = CloseFrame::new(CloseCode::BAD_GATEWAY, "");
    let wire = util::encode_close(Some(&frame), Role::Client);
    let mut server = Codec::server(Limits::default());
    assert_eq!(
        our_read(&mut server, &wire).0,
        vec![Msg::Close(Some((1014, String::new())))]
    );
    let mut ws = tungstenite(TRole::Server, None);
    assert!(matches!(
        &tung_read(&mut ws, &wire).0[..],
        [Msg::Close(Some((1002, _)))]
    ));
}

fn other(role: Role) -> Role {
    match role {
        Role::Server => Role::Client,
        Role::Client => Role::Server,
    }
}

fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut wire = Vec::new();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    wire.push(u8::from(fin) << 7 | opcode);
    match payload.len() {
        n @ 0..=125 => wire.push(mask_bit | n as u8),
        n => {
            wire.push(mask_bit | 126);
            wire.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    let mut body = payload.to_vec();
    if let Some(key) = mask {
        wire.extend_from_slice(&key);
        ringcast_protocol::mask::apply_mask_reference(&mut body, key, 0);
    }
    wire.extend(body);
    wire
}

/// How tungstenite's refusal maps to a close code, for comparing with ours.
fn tung_close_code(err: &tungstenite::Error) -> u16 {
    match err {
        tungstenite::Error::Utf8(_) => 1007,
        tungstenite::Error::Capacity(_) => 1009,
        tungstenite::Error::Protocol(_) => 1002,
        other => panic!("unexpected tungstenite error {other}"),
    }
}

/// Broken frames from a client: both refuse, with the same close code.
#[test]
fn broken_client_frames_are_refused_by_both_with_the_same_code() {
    let m = Some([0x11, 0x22, 0x33, 0x44]);
    let cat = |parts: &[Vec<u8>]| parts.concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("rsv1", {
            let mut f = frame(true, 1, b"x", m);
            f[0] |= 0x40;
            f
        }),
        ("rsv3", {
            let mut f = frame(true, 2, b"x", m);
            f[0] |= 0x10;
            f
        }),
        ("reserved data opcode", frame(true, 3, b"x", m)),
        ("reserved control opcode", frame(true, 0xB, b"", m)),
        ("unmasked", frame(true, 1, b"x", None)),
        ("fragmented ping", frame(false, 9, b"", m)),
        ("ping of 126 bytes", frame(true, 9, &[0; 126], m)),
        ("lone continuation", frame(true, 0, b"x", m)),
        (
            "text inside a fragmented message",
            cat(&[frame(false, 1, b"a", m), frame(true, 1, b"b", m)]),
        ),
        ("one-byte close", frame(true, 8, b"\x03", m)),
        ("invalid UTF-8", frame(true, 1, b"ok\xFF", m)),
        ("surrogate", frame(true, 1, b"\xED\xA0\x80", m)),
        (
            "invalid UTF-8 across fragments",
            cat(&[frame(false, 1, b"a\xF0\x9F", m), frame(true, 0, b"\x98", m)]),
        ),
        (
            "text ending inside a code point",
            cat(&[frame(false, 1, b"a\xE2", m), frame(true, 0, b"\x82", m)]),
        ),
        (
            "close reason not UTF-8",
            frame(true, 8, b"\x03\xE8\xC0\xAF", m),
        ),
        ("message over the limit", frame(true, 2, &[0; 300], m)),
        (
            "fragments over the limit",
            cat(&[frame(false, 2, &[0; 200], m), frame(true, 0, &[0; 57], m)]),
        ),
    ];
    let limit = 256;
    for (name, wire) in cases {
        let mut codec = Codec::server(Limits::default().with_max_message_bytes(limit));
        let (_, ours) = our_read(&mut codec, &wire);
        let ours = ours.unwrap_or_else(|| panic!("{name}: we accepted it"));
        let config = WebSocketConfig::default()
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let mut ws = tungstenite(TRole::Server, Some(config));
        let (_, theirs) = tung_read(&mut ws, &wire);
        let theirs = theirs.unwrap_or_else(|| panic!("{name}: tungstenite accepted it"));
        assert_eq!(
            ours.close_code().as_u16(),
            tung_close_code(&theirs),
            "{name}: ours {ours}, theirs {theirs}"
        );
    }
}

/// A 64-bit length with its most significant bit set (RFC 6455 §5.2 forbids it): both refuse.
/// We fail with 1002 on the header; tungstenite 0.30 reads it as a length and refuses it as too
/// big (1009).
#[test]
fn a_length_with_the_top_bit_set_is_refused_by_both() {
    let mut wire = vec![0x82, 0xFF];
    wire.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
    wire.extend_from_slice(&[0, 0, 0, 0]);
    wire.extend_from_slice(b"hello");
    let (_, ours) = our_read(&mut Codec::server(Limits::default()), &wire);
    assert_eq!(ours, Some(ProtocolError::InvalidLength));
    let (_, theirs) = tung_read(&mut tungstenite(TRole::Server, None), &wire);
    assert_eq!(
        tung_close_code(&theirs.expect("tungstenite refuses it")),
        1009
    );
}

/// A masked frame from a server: both refuse.
#[test]
fn masked_server_frames_are_refused_by_both() {
    let wire = frame(true, 1, b"hi", Some([1, 2, 3, 4]));
    let (_, ours) = our_read(&mut Codec::client(Limits::default(), 1), &wire);
    assert_eq!(ours, Some(ProtocolError::MaskedFrame));
    let (_, theirs) = tung_read(&mut tungstenite(TRole::Client, None), &wire);
    assert_eq!(
        tung_close_code(&theirs.expect("tungstenite refuses it")),
        1002
    );
}

fn item_msgs(items: &[Item]) -> Vec<Msg> {
    items
        .iter()
        .flat_map(Item::expected_events)
        .map(|e| Msg::from(&e))
        .collect()
}

/// Writes `items` through tungstenite: whole messages as messages, fragments as raw frames.
fn tung_write_items(ws: &mut WebSocket<Mem>, items: &[Item]) {
    let control = |c: &util::Control| match c {
        util::Control::Ping(p) => Message::Ping(Bytes::from(p.clone())),
        util::Control::Pong(p) => Message::Pong(Bytes::from(p.clone())),
    };
    for item in items {
        match item {
            Item::Control(c) => ws.write(control(c)).unwrap(),
            Item::Message {
                text,
                payload,
                cuts,
                between,
            } => {
                let fragments = util::entry::chunks(payload, cuts);
                let last = fragments.len() - 1;
                for (i, fragment) in fragments.into_iter().enumerate() {
                    let op = match (i, text) {
                        (0, true) => Data::Text,
                        (0, false) => Data::Binary,
                        _ => Data::Continue,
                    };
                    let f = Frame::message(fragment.to_vec(), TOpCode::Data(op), i == last);
                    ws.write(Message::Frame(f)).unwrap();
                    if i < last {
                        for (_, c) in between.iter().filter(|(at, _)| *at == i) {
                            ws.write(control(c)).unwrap();
                        }
                    }
                }
            }
        }
    }
    ws.flush().unwrap();
}

proptest! {
    #![proptest_config(util::config(128))]

    /// Random conversations (fragments, controls between fragments, any unicode) read the same
    /// in both libraries, whichever wrote them and in either role, and the pongs each owes
    /// decode on the other side.
    #[test]
    fn random_conversations_agree(
        items in util::any_items(6, 300),
        ours in prop_oneof![Just(Role::Server), Just(Role::Client)],
    ) {
        let expected = item_msgs(&items);
        let pings: Vec<Msg> = items
            .iter()
            .flat_map(Item::pings)
            .map(Msg::Pong)
            .collect();

        // Ours writes, tungstenite reads.
        let wire = util::encode_items(&items, ours, util::Encoder::Codec);
        let mut ws = tungstenite(their_role(ours), None);
        let (read, err) = tung_read(&mut ws, &wire);
        prop_assert!(err.is_none(), "{:?}", err);
        prop_assert_eq!(&read, &expected);
        let mut codec = Codec::new(ours, Limits::default(), 3);
        let (pongs, err) = our_read(&mut codec, &tung_output(&mut ws));
        prop_assert_eq!(err, None);
        prop_assert_eq!(&pongs, &pings);

        // Tungstenite writes, ours reads.
        let mut ws = tungstenite(their_role(ours), None);
        tung_write_items(&mut ws, &items);
        let mut codec = Codec::new(ours, Limits::default(), 4);
        let (read, err) = our_read(&mut codec, &tung_output(&mut ws));
        prop_assert_eq!(err, None);
        prop_assert_eq!(&read, &expected);
        let (pongs, err) = tung_read(&mut ws, &our_output(&mut codec));
        prop_assert!(err.is_none(), "{:?}", err);
        prop_assert_eq!(&pongs, &pings);
    }
}
