//! A client and a server driven through in-memory byte pipes, in the spirit of quinn-proto's
//! test `Pair`: the upgrade handshake, then two codecs, with no sockets. Each step delivers at
//! most `mtu` bytes each way, so frames arrive in pieces. The codec has no timers, so the pair
//! counts steps instead of simulating a clock.

mod util;

use bytes::{Buf, Bytes, BytesMut};
use ringcast_protocol::{
    server_frame, ClientHandshake, CloseCode, CloseFrame, CloseState, Codec, Event, HeadReader,
    Limits, OpCode, ProtocolError, UpgradeRequest,
};

/// One end of the connection.
#[derive(Debug)]
struct Endpoint {
    codec: Codec,
    /// Received bytes the codec has not consumed yet.
    inbound: BytesMut,
    events: Vec<Event>,
    error: Option<ProtocolError>,
    /// Every close state this end went through, in order, starting with `Open`.
    states: Vec<CloseState>,
    /// Echo each text and binary message back, as an echo server does.
    echo: bool,
    /// Frames written to the wire, decoded, for counting.
    sent: Vec<(OpCode, Vec<u8>)>,
}

impl Endpoint {
    fn new(codec: Codec, inbound: BytesMut) -> Self {
        Self {
            codec,
            inbound,
            events: Vec::new(),
            error: None,
            states: vec![CloseState::Open],
            echo: false,
            sent: Vec::new(),
        }
    }

    fn note_state(&mut self) {
        let now = self.codec.close_state();
        if self.states.last() != Some(&now) {
            self.states.push(now);
        }
    }

    /// Writes `frame` to `out` and records it.
    fn write(&mut self, frame: &[u8], out: &mut Vec<u8>) {
        let mut rest = frame;
        while !rest.is_empty() {
            let (header, payload, used) = util::entry::split_frame(rest).expect("whole frames");
            self.sent.push((header.opcode, payload));
            rest = &rest[used..];
        }
        out.extend_from_slice(frame);
    }

    /// Polls every event the inbound bytes hold; after each one sends what the codec owes and
    /// then what the application answers, in that order (the codec's driving loop).
    fn poll(&mut self, out: &mut Vec<u8>) {
        loop {
            let event = match self.codec.poll_event(&mut self.inbound) {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(err) => {
                    assert!(self.error.is_none(), "one error per connection");
                    self.error = Some(err);
                    break;
                }
            };
            while let Some(frame) = self.codec.poll_transmit() {
                self.write(&frame, out);
            }
            if self.echo && self.codec.can_send() {
                let reply = match &event {
                    Event::Text(t) => Some((OpCode::Text, t.as_bytes().clone())),
                    Event::Binary(b) => Some((OpCode::Binary, b.clone())),
                    _ => None,
                };
                if let Some((opcode, payload)) = reply {
                    let mut frame = BytesMut::new();
                    self.codec.encode_frame(true, opcode, &payload, &mut frame);
                    self.write(&frame, out);
                }
            }
            self.events.push(event);
            self.note_state();
        }
        // A failed connection still owes its close.
        while let Some(frame) = self.codec.poll_transmit() {
            self.write(&frame, out);
        }
        self.note_state();
    }

    /// Starts the closing handshake from the application.
    fn close(&mut self, frame: Option<CloseFrame>, out: &mut Vec<u8>) -> bool {
        let started = self.codec.close(frame);
        while let Some(frame) = self.codec.poll_transmit() {
            self.write(&frame, out);
        }
        self.note_state();
        started
    }

    /// Sends a message the application chose, a data message in fragments of `fragment` bytes.
    fn send(&mut self, opcode: OpCode, payload: &[u8], fragment: usize, out: &mut Vec<u8>) {
        assert!(self.codec.can_send());
        let mut frame = BytesMut::new();
        let pieces: Vec<&[u8]> = if payload.is_empty() || opcode.is_control() {
            vec![payload]
        } else {
            payload.chunks(fragment.max(1)).collect()
        };
        let last = pieces.len() - 1;
        for (i, piece) in pieces.into_iter().enumerate() {
            let op = if i == 0 { opcode } else { OpCode::Continuation };
            self.codec.encode_frame(i == last, op, piece, &mut frame);
        }
        self.write(&frame, out);
    }

    fn sent_count(&self, opcode: OpCode) -> usize {
        self.sent.iter().filter(|(op, _)| *op == opcode).count()
    }
}

/// Both ends and the bytes in flight between them.
#[derive(Debug)]
struct Pair {
    client: Endpoint,
    server: Endpoint,
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    /// The most bytes delivered each way per step.
    mtu: usize,
    steps: usize,
}

impl Pair {
    /// Runs the upgrade through `HeadReader`, `UpgradeRequest` and `ClientHandshake`, with the
    /// server's first frame (`greeting`) written right behind its 101, in the same write.
    fn connect(mtu: usize, greeting: Option<&str>) -> Self {
        let client_hs = ClientHandshake::new(*b"0123456789abcdef", &["chat", "v2"]);
        let request = client_hs.request("localhost:9000", "/echo?room=1", &[]);

        // The server reads the head in pieces of `mtu` bytes.
        let mut server_in = BytesMut::new();
        let mut reader = HeadReader::new();
        let mut pending = &request[..];
        let head_len = loop {
            let n = mtu.min(pending.len());
            server_in.extend_from_slice(&pending[..n]);
            pending = &pending[n..];
            if let Some(len) = reader.poll_head(&server_in, 8192).unwrap() {
                break len;
            }
            assert!(!pending.is_empty(), "the request ends its head");
        };
        let upgrade = UpgradeRequest::parse(&server_in[..head_len]).unwrap();
        assert_eq!((upgrade.path(), upgrade.query()), ("/echo", Some("room=1")));
        let mut to_client = upgrade.accept(Some("v2")).unwrap().to_vec();
        server_in.advance(head_len);
        let mut server = Endpoint::new(Codec::server(Limits::default()), server_in);
        server.echo = true;
        if let Some(text) = greeting {
            server.write(&server_frame(OpCode::Text, text.as_bytes()), &mut to_client);
        }

        // The client reads the response head in pieces, keeping what follows it.
        let mut client_in = BytesMut::new();
        let mut reader = HeadReader::new();
        let mut pending = &to_client[..];
        let head_len = loop {
            let n = mtu.min(pending.len());
            client_in.extend_from_slice(&pending[..n]);
            pending = &pending[n..];
            if let Some(len) = reader.poll_head(&client_in, 8192).unwrap() {
                break len;
            }
            assert!(!pending.is_empty(), "the response ends its head");
        };
        assert_eq!(
            client_hs.check_response(&client_in[..head_len]),
            Ok(Some("v2".to_owned()))
        );
        client_in.advance(head_len);
        let client = Endpoint::new(Codec::client(Limits::default(), 0xD1CE), client_in);
        let mut pair = Self {
            client,
            server,
            to_server: Vec::new(),
            to_client: pending.to_vec(),
            mtu,
            steps: 0,
        };
        // Bytes that came with the head are already in the client's buffer.
        pair.client.poll(&mut pair.to_server);
        pair
    }

    /// One step: up to `mtu` bytes each way, then each end polls.
    fn step(&mut self) -> bool {
        let to_server = self.mtu.min(self.to_server.len());
        let to_client = self.mtu.min(self.to_client.len());
        if to_server == 0 && to_client == 0 {
            return false;
        }
        self.steps += 1;
        self.server
            .inbound
            .extend_from_slice(&self.to_server[..to_server]);
        self.to_server.drain(..to_server);
        self.client
            .inbound
            .extend_from_slice(&self.to_client[..to_client]);
        self.to_client.drain(..to_client);
        self.server.poll(&mut self.to_client);
        self.client.poll(&mut self.to_server);
        true
    }

    /// Steps until nothing is in flight.
    fn drive(&mut self) {
        while self.step() {
            assert!(self.steps < 1_000_000, "the pair does not settle");
        }
    }

    fn client_send(&mut self, opcode: OpCode, payload: &[u8], fragment: usize) {
        self.client
            .send(opcode, payload, fragment, &mut self.to_server);
    }

    fn server_send(&mut self, opcode: OpCode, payload: &[u8], fragment: usize) {
        self.server
            .send(opcode, payload, fragment, &mut self.to_client);
    }
}

const MTUS: [usize; 4] = [1, 3, 100, usize::MAX];

fn text(s: &str) -> Event {
    Event::Text(s.to_owned().into())
}

#[test]
fn bytes_behind_the_101_are_the_first_frame() {
    for mtu in MTUS {
        let mut pair = Pair::connect(mtu, Some("welcome"));
        pair.drive();
        assert_eq!(pair.client.events, vec![text("welcome")], "mtu {mtu}");
        assert_eq!(pair.client.error, None);
    }
}

#[test]
fn echo_returns_every_message_unchanged() {
    let big: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
    let msgs: Vec<(OpCode, Vec<u8>, usize)> = vec![
        (OpCode::Text, b"hello".to_vec(), 100),
        (OpCode::Text, Vec::new(), 1),
        (OpCode::Text, "κόσμε 𝄞".as_bytes().to_vec(), 1),
        (OpCode::Binary, vec![0, 1, 2, 255], 2),
        (OpCode::Binary, big.clone(), 65_536),
        (OpCode::Binary, big, usize::MAX),
    ];
    for mtu in [3, 100, usize::MAX] {
        let mut pair = Pair::connect(mtu, None);
        for (op, payload, fragment) in &msgs {
            pair.client_send(*op, payload, *fragment);
        }
        pair.drive();
        let expected: Vec<Event> = msgs
            .iter()
            .map(|(op, p, _)| match op {
                OpCode::Text => text(std::str::from_utf8(p).unwrap()),
                _ => Event::Binary(Bytes::from(p.clone())),
            })
            .collect();
        assert_eq!(pair.server.events, expected, "mtu {mtu}");
        assert_eq!(pair.client.events, expected, "mtu {mtu}");
        assert_eq!(
            (pair.client.error.as_ref(), pair.server.error.as_ref()),
            (None, None)
        );
        assert_eq!(pair.client.codec.close_state(), CloseState::Open);
    }
}

#[test]
fn each_ping_gets_exactly_one_pong_both_ways() {
    for mtu in MTUS {
        let mut pair = Pair::connect(mtu, None);
        for i in 0..20u8 {
            pair.client_send(OpCode::Ping, &[i; 3], 1);
            pair.server_send(OpCode::Ping, &[100 + i], 1);
            if i % 5 == 0 {
                // A message in fragments: the pongs may go out between them.
                pair.client_send(OpCode::Binary, &[i; 10], 3);
            }
        }
        pair.drive();
        let pings_from_client: Vec<Event> = (0..20u8)
            .map(|i| Event::Ping(Bytes::from(vec![i; 3])))
            .collect();
        let pongs_to_client: Vec<Event> = (0..20u8)
            .map(|i| Event::Pong(Bytes::from(vec![i; 3])))
            .collect();
        let pings_from_server: Vec<Event> = (0..20u8)
            .map(|i| Event::Ping(Bytes::from(vec![100 + i])))
            .collect();
        let pongs_to_server: Vec<Event> = (0..20u8)
            .map(|i| Event::Pong(Bytes::from(vec![100 + i])))
            .collect();
        let of = |events: &[Event], ping: bool| -> Vec<Event> {
            events
                .iter()
                .filter(|e| matches!((e, ping), (Event::Ping(_), true) | (Event::Pong(_), false)))
                .cloned()
                .collect()
        };
        assert_eq!(
            of(&pair.server.events, true),
            pings_from_client,
            "mtu {mtu}"
        );
        assert_eq!(of(&pair.client.events, false), pongs_to_client, "mtu {mtu}");
        assert_eq!(
            of(&pair.client.events, true),
            pings_from_server,
            "mtu {mtu}"
        );
        assert_eq!(of(&pair.server.events, false), pongs_to_server, "mtu {mtu}");
        assert_eq!(pair.client.sent_count(OpCode::Pong), 20);
        assert_eq!(pair.server.sent_count(OpCode::Pong), 20);
    }
}

#[test]
fn an_unsolicited_pong_gets_no_answer() {
    let mut pair = Pair::connect(usize::MAX, None);
    pair.client_send(OpCode::Pong, b"heartbeat", 1);
    pair.drive();
    assert_eq!(
        pair.server.events,
        vec![Event::Pong(Bytes::from_static(b"heartbeat"))]
    );
    assert!(pair.server.sent.is_empty());
    assert!(pair.client.events.is_empty());
}

#[test]
fn client_initiated_close_completes_on_both_sides_with_the_same_code() {
    for mtu in MTUS {
        let mut pair = Pair::connect(mtu, None);
        pair.client_send(OpCode::Text, b"last words", 4);
        let frame = CloseFrame::new(CloseCode::NORMAL, "done");
        assert!(pair.client.close(Some(frame.clone()), &mut pair.to_server));
        assert!(!pair.client.codec.can_send());
        assert!(
            !pair.client.close(None, &mut pair.to_server),
            "one close only"
        );
        pair.drive();

        // The message sent before the close is still delivered and echoed.
        assert_eq!(
            pair.server.events,
            vec![text("last words"), Event::Close(Some(frame))],
            "mtu {mtu}"
        );
        let echo = CloseFrame::new(CloseCode::NORMAL, "");
        assert_eq!(
            pair.client.events,
            vec![text("last words"), Event::Close(Some(echo))],
            "mtu {mtu}"
        );
        use CloseState::*;
        assert_eq!(pair.client.states, vec![Open, CloseSent, Closed]);
        assert_eq!(pair.server.states, vec![Open, Closed]);
        assert_eq!(pair.client.sent_count(OpCode::Close), 1);
        assert_eq!(pair.server.sent_count(OpCode::Close), 1);
        // Nothing is read after the handshake.
        pair.client_send_raw(b"\x81\x85\0\0\0\0after");
        pair.drive();
        assert_eq!(pair.server.events.len(), 2);
    }
}

impl Pair {
    /// Bytes the client writes without its codec (a broken or hostile client).
    fn client_send_raw(&mut self, bytes: &[u8]) {
        self.to_server.extend_from_slice(bytes);
    }
}

#[test]
fn server_initiated_close_completes_on_both_sides_with_the_same_code() {
    for mtu in MTUS {
        let mut pair = Pair::connect(mtu, None);
        let frame = CloseFrame::new(CloseCode::GOING_AWAY, "shutting down");
        assert!(pair.server.close(Some(frame.clone()), &mut pair.to_client));
        pair.drive();
        assert_eq!(pair.client.events, vec![Event::Close(Some(frame))]);
        assert_eq!(
            pair.server.events,
            vec![Event::Close(Some(CloseFrame::new(
                CloseCode::GOING_AWAY,
                ""
            )))]
        );
        use CloseState::*;
        assert_eq!(
            pair.server.states,
            vec![Open, CloseSent, Closed],
            "mtu {mtu}"
        );
        assert_eq!(pair.client.states, vec![Open, Closed], "mtu {mtu}");
    }
}

#[test]
fn a_close_without_a_code_is_echoed_without_one() {
    let mut pair = Pair::connect(7, None);
    assert!(pair.client.close(None, &mut pair.to_server));
    pair.drive();
    assert_eq!(pair.server.events, vec![Event::Close(None)]);
    assert_eq!(pair.client.events, vec![Event::Close(None)]);
    assert_eq!(pair.client.codec.close_state(), CloseState::Closed);
    assert_eq!(pair.server.codec.close_state(), CloseState::Closed);
}

#[test]
fn simultaneous_closes_cross_and_neither_is_echoed() {
    for mtu in MTUS {
        let mut pair = Pair::connect(mtu, None);
        let from_client = CloseFrame::new(CloseCode::NORMAL, "client");
        let from_server = CloseFrame::new(CloseCode::GOING_AWAY, "server");
        assert!(pair
            .client
            .close(Some(from_client.clone()), &mut pair.to_server));
        assert!(pair
            .server
            .close(Some(from_server.clone()), &mut pair.to_client));
        pair.drive();
        assert_eq!(pair.server.events, vec![Event::Close(Some(from_client))]);
        assert_eq!(pair.client.events, vec![Event::Close(Some(from_server))]);
        assert_eq!(pair.client.sent_count(OpCode::Close), 1, "mtu {mtu}");
        assert_eq!(pair.server.sent_count(OpCode::Close), 1, "mtu {mtu}");
        use CloseState::*;
        assert_eq!(pair.client.states, vec![Open, CloseSent, Closed]);
        assert_eq!(pair.server.states, vec![Open, CloseSent, Closed]);
    }
}

#[test]
fn a_ping_after_our_close_gets_no_pong() {
    let mut pair = Pair::connect(usize::MAX, None);
    assert!(pair.client.close(None, &mut pair.to_server));
    // The server pings before it has read the client's close.
    pair.server_send(OpCode::Ping, b"still there?", 1);
    pair.drive();
    assert_eq!(
        pair.client.events,
        vec![
            Event::Ping(Bytes::from_static(b"still there?")),
            Event::Close(None)
        ]
    );
    assert_eq!(pair.client.sent_count(OpCode::Pong), 0);
}

#[test]
fn an_unmasked_client_frame_fails_the_server_with_1002() {
    for mtu in MTUS {
        let mut pair = Pair::connect(mtu, None);
        pair.client_send(OpCode::Text, b"fine", 100);
        // Unmasked, then a valid frame that must never be read.
        pair.client_send_raw(&server_frame(OpCode::Text, b"bad"));
        pair.client_send(OpCode::Text, b"never read", 100);
        pair.drive();

        assert_eq!(
            pair.server.error,
            Some(ProtocolError::UnmaskedFrame),
            "mtu {mtu}"
        );
        assert_eq!(
            pair.server.events,
            vec![text("fine")],
            "no events after the failure"
        );
        assert_eq!(pair.server.codec.close_state(), CloseState::Failed);
        // The server sent the echo of "fine" and exactly one close: 1002.
        let closes: Vec<&Vec<u8>> = pair
            .server
            .sent
            .iter()
            .filter(|(op, _)| *op == OpCode::Close)
            .map(|(_, p)| p)
            .collect();
        assert_eq!(closes.len(), 1);
        assert_eq!(&closes[0][..2], &1002u16.to_be_bytes());
        // The client sees the echo, then the 1002, and echoes it; the failed server reads no
        // more.
        assert!(matches!(
            &pair.client.events[..],
            [Event::Text(t), Event::Close(Some(f))]
                if t.as_str() == "fine" && f.code == CloseCode::PROTOCOL_ERROR
        ));
        assert_eq!(pair.client.codec.close_state(), CloseState::Closed);
        assert_eq!(pair.client.sent_count(OpCode::Close), 1);
        assert!(
            !pair.server.inbound.is_empty(),
            "the failed server consumed nothing more"
        );
        use CloseState::*;
        assert_eq!(pair.server.states, vec![Open, Failed]);
    }
}

#[test]
fn invalid_text_from_the_server_fails_the_client_with_1007() {
    let mut pair = Pair::connect(2, None);
    // A code point split across two fragments, then broken in the second.
    pair.to_client.extend_from_slice(b"\x01\x02a\xF0");
    pair.to_client.extend_from_slice(b"\x80\x02\x9F\x41");
    pair.drive();
    assert_eq!(pair.client.error, Some(ProtocolError::InvalidUtf8));
    assert_eq!(pair.client.codec.close_state(), CloseState::Failed);
    assert!(matches!(
        &pair.server.events[..],
        [Event::Close(Some(f))] if f.code == CloseCode::INVALID_PAYLOAD
    ));
    // The server echoes the 1007 and is closed; the failed client reads nothing more.
    assert_eq!(pair.server.codec.close_state(), CloseState::Closed);
    assert!(pair.client.events.is_empty());
}

/// `CloseFrame`'s fields are public, so a caller can build one whose reason is longer than a
/// control frame allows. The close that goes out must still be a valid control frame: the
/// reason is cut to 123 bytes at a character boundary, and the peer reads it without failing.
#[test]
fn a_close_reason_too_long_for_a_control_frame_is_cut_to_fit() {
    for len in [123, 124, 200, 1000] {
        let reason = "é".repeat(len / 2) + &"x".repeat(len % 2);
        let frame = CloseFrame {
            code: CloseCode::GOING_AWAY,
            reason: reason.clone().into(),
        };
        let mut pair = Pair::connect(usize::MAX, None);
        assert!(pair.server.close(Some(frame), &mut pair.to_client));
        pair.drive();
        assert_eq!(pair.client.error, None, "reason of {len} bytes");
        let [Event::Close(Some(got))] = &pair.client.events[..] else {
            panic!("expected one close, got {:?}", pair.client.events);
        };
        assert_eq!(got.code, CloseCode::GOING_AWAY);
        assert!(got.reason.len() <= 123 && reason.starts_with(got.reason.as_str()));
        assert!(got.reason.len() >= 122, "cut no more than one character");
    }
}
