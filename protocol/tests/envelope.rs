//! The broker envelope (`envelope.rs`, `PROTOCOL.md`): every JSON shape, the exact server
//! output in both encodings, malformed input of every kind, round trips under proptest, and the
//! frames the encoders return.

mod util;

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use ringcast_protocol::envelope::{
    ack_frame, decode_request, decode_server, dropped_frame, encode_request, encode_server,
    error_frame, message_frame, pong_frame, publish_ack_frame, reset_frame, shutdown_frame,
    subscribe_ack_frame, validate_topic, AckPosition, Data, DataKind, DecodeError, Dialect,
    Encoding, ErrorCode, Request, ServerMessage, SubscribeTopic, TopicPosition, BINARY_SUBPROTOCOL,
    BINARY_V2_SUBPROTOCOL, JSON_SUBPROTOCOL, MAX_TOPIC_BYTES,
};
use ringcast_protocol::envelope::{
    decode_request_with, json_depth_within, DecodeOptions, DEFAULT_MAX_JSON_DEPTH,
    DEFAULT_MAX_REQUEST_TOPICS,
};
use ringcast_protocol::{Codec, Event, FrameHeader, Limits, OpCode};
use serde_json::{json, Value};

const ENCODINGS: [Encoding; 2] = [Encoding::Json, Encoding::Binary];
const DIALECTS: [Dialect; 3] = [Dialect::Json, Dialect::BinaryV1, Dialect::BinaryV2];

fn json_req(input: &str) -> Result<Request<'_>, DecodeError> {
    decode_request(Encoding::Json, input.as_bytes())
}

fn sub(topic: &str, since: Option<u64>) -> SubscribeTopic<'_> {
    SubscribeTopic {
        topic: topic.into(),
        since,
        epoch: None,
    }
}

/// A subscribe entry resuming after `since` in `epoch`.
fn sub_in(topic: &str, since: u64, epoch: u64) -> SubscribeTopic<'_> {
    SubscribeTopic {
        topic: topic.into(),
        since: Some(since),
        epoch: Some(epoch),
    }
}

fn pos(topic: &str, epoch: u64, seq: u64) -> TopicPosition<'_> {
    TopicPosition {
        topic: topic.into(),
        epoch,
        seq,
    }
}

/// The frame's header, checked to be what a server must send, and its payload.
fn split_frame(frame: &Bytes, enc: Encoding) -> &[u8] {
    let (header, used) = FrameHeader::parse(frame)
        .expect("valid header")
        .expect("whole header");
    assert!(header.fin, "FIN set");
    assert_eq!(header.rsv, 0);
    assert_eq!(header.mask, None, "server frames are unmasked");
    assert_eq!(header.opcode, enc.opcode());
    assert_eq!(header.payload_len, (frame.len() - used) as u64);
    &frame[used..]
}

/// The JSON text of a JSON-encoded server frame.
fn body(frame: &Bytes) -> &str {
    std::str::from_utf8(split_frame(frame, Encoding::Json)).expect("UTF-8")
}

/// A server frame run through a client codec: the message it delivers.
fn through_client_codec(frame: &Bytes, enc: Encoding) -> Bytes {
    let mut client = Codec::client(Limits::default(), 7);
    let mut wire = BytesMut::from(&frame[..]);
    let event = client.poll_event(&mut wire).expect("valid frame");
    assert!(wire.is_empty(), "one frame, consumed whole");
    match (event, enc) {
        (Some(Event::Text(text)), Encoding::Json) => text.into_bytes(),
        (Some(Event::Binary(bytes)), Encoding::Binary) => bytes,
        (other, _) => panic!("unexpected event {other:?}"),
    }
}

fn err(code: ErrorCode, id: Option<u64>, message: &str) -> DecodeError {
    DecodeError {
        id,
        code,
        message: message.to_owned(),
    }
}

// ---- Encodings ----

#[test]
fn encodings_map_to_their_subprotocols_and_opcodes() {
    assert_eq!(JSON_SUBPROTOCOL, "ringcast.v1.json");
    assert_eq!(BINARY_SUBPROTOCOL, "ringcast.v1.bin");
    for enc in ENCODINGS {
        assert_eq!(Encoding::from_subprotocol(enc.subprotocol()), Some(enc));
    }
    assert_eq!(Encoding::Json.opcode(), OpCode::Text);
    assert_eq!(Encoding::Binary.opcode(), OpCode::Binary);
    assert_eq!(Encoding::from_subprotocol("ringcast.v1.JSON"), None);
    assert_eq!(Encoding::from_subprotocol("ringcast.v2.json"), None);
    assert_eq!(Encoding::from_subprotocol(""), None);
    // Both binary versions frame messages the same way.
    assert_eq!(BINARY_V2_SUBPROTOCOL, "ringcast.v2.bin");
    assert_eq!(
        Encoding::from_subprotocol(BINARY_V2_SUBPROTOCOL),
        Some(Encoding::Binary)
    );
}

#[test]
fn dialects_map_to_their_subprotocols_and_encodings() {
    for d in DIALECTS {
        assert_eq!(Dialect::from_subprotocol(d.subprotocol()), Some(d));
    }
    assert_eq!(Dialect::Json.encoding(), Encoding::Json);
    assert_eq!(Dialect::BinaryV1.encoding(), Encoding::Binary);
    assert_eq!(Dialect::BinaryV2.encoding(), Encoding::Binary);
    assert_eq!(Dialect::from(Encoding::Json), Dialect::Json);
    assert_eq!(Dialect::from(Encoding::Binary), Dialect::BinaryV1);
    assert_eq!(Dialect::BinaryV2.subprotocol(), "ringcast.v2.bin");
    assert_eq!(Dialect::from_subprotocol("ringcast.v3.bin"), None);
    assert_eq!(Dialect::from_subprotocol("ringcast.v2.BIN"), None);
}

// ---- JSON requests ----

#[test]
fn json_subscribe_shapes() {
    assert_eq!(
        json_req(r#"{"type":"subscribe","id":1,"topic":"prices.BTC","since":41}"#),
        Ok(Request::Subscribe {
            id: Some(1),
            topics: vec![sub("prices.BTC", Some(41))],
        })
    );
    assert_eq!(
        json_req(r#"{"type":"subscribe","topic":"prices.BTC"}"#),
        Ok(Request::Subscribe {
            id: None,
            topics: vec![sub("prices.BTC", None)],
        })
    );
    assert_eq!(
        json_req(
            r#"{"type":"subscribe","id":7,"topics":["a",{"topic":"b","since":5},{"topic":"c"}]}"#
        ),
        Ok(Request::Subscribe {
            id: Some(7),
            topics: vec![sub("a", None), sub("b", Some(5)), sub("c", None)],
        })
    );
    // null counts as absent for id and since; unknown fields and whitespace are fine.
    assert_eq!(
        json_req(
            " {\n \"since\" : null, \"extra\": {\"id\": 99}, \"id\":null, \"type\" : \"subscribe\", \"topic\":\"x\" }\t"
        ),
        Ok(Request::Subscribe {
            id: None,
            topics: vec![sub("x", None)],
        })
    );
}

#[test]
fn json_subscribe_with_epoch_shapes() {
    assert_eq!(
        json_req(r#"{"type":"subscribe","id":1,"topic":"x","since":10,"epoch":7}"#),
        Ok(Request::Subscribe {
            id: Some(1),
            topics: vec![sub_in("x", 10, 7)],
        })
    );
    assert_eq!(
        json_req(
            r#"{"type":"subscribe","topics":[{"topic":"a","since":1,"epoch":18446744073709551615},"b",{"topic":"c","since":2}]}"#
        ),
        Ok(Request::Subscribe {
            id: None,
            topics: vec![sub_in("a", 1, u64::MAX), sub("b", None), sub("c", Some(2))],
        })
    );
    // null is absent, as for since.
    assert_eq!(
        json_req(r#"{"type":"subscribe","topic":"x","since":3,"epoch":null}"#),
        Ok(Request::Subscribe {
            id: None,
            topics: vec![sub("x", Some(3))],
        })
    );
}

#[test]
fn json_unsubscribe_publish_and_ping_shapes() {
    assert_eq!(
        json_req(r#"{"type":"unsubscribe","id":2,"topic":"prices.BTC"}"#),
        Ok(Request::Unsubscribe {
            id: Some(2),
            topics: vec!["prices.BTC".into()],
        })
    );
    assert_eq!(
        json_req(r#"{"type":"unsubscribe","topics":["a","b"]}"#),
        Ok(Request::Unsubscribe {
            id: None,
            topics: vec!["a".into(), "b".into()],
        })
    );
    for data in [
        r#"{"p":1.5,"q":[true,null]}"#,
        r#""text""#,
        "42",
        "-1e9",
        "null",
        "[]",
        r#"{"nested":{"deep":["\u00e9\"\\"]}}"#,
    ] {
        let input = format!(r#"{{"type":"publish","id":3,"topic":"prices.BTC","data": {data} }}"#);
        assert_eq!(
            json_req(&input),
            Ok(Request::Publish {
                id: Some(3),
                topic: "prices.BTC".into(),
                payload: Data::json(data),
            }),
            "{input}"
        );
    }
    assert_eq!(
        json_req(r#"{"type":"publish","topic":"t","data_b64":"AAEC/w=="}"#),
        Ok(Request::Publish {
            id: None,
            topic: "t".into(),
            payload: Data::binary(&[0, 1, 2, 255]),
        })
    );
    assert_eq!(
        json_req(r#"{"type":"publish","topic":"t","data_b64":""}"#),
        Ok(Request::Publish {
            id: None,
            topic: "t".into(),
            payload: Data::binary(&[]),
        })
    );
    assert_eq!(
        json_req(r#"{"type":"ping","id":4}"#),
        Ok(Request::Ping { id: Some(4) })
    );
    assert_eq!(
        json_req(r#"{"type":"ping"}"#),
        Ok(Request::Ping { id: None })
    );
    assert_eq!(
        json_req(r#"{"type":"ping","id":18446744073709551615}"#),
        Ok(Request::Ping { id: Some(u64::MAX) })
    );
}

#[test]
fn json_payloads_and_plain_topics_are_borrowed() {
    let input = br#"{"type":"publish","topic":"a.b","data":[1,2,3]}"#;
    let Ok(Request::Publish { topic, payload, .. }) = decode_request(Encoding::Json, input) else {
        panic!("publish");
    };
    assert!(matches!(topic, Cow::Borrowed("a.b")));
    assert!(matches!(payload.bytes, Cow::Borrowed(b"[1,2,3]")));
    assert_eq!(payload.kind, DataKind::Json);
}

#[test]
fn json_topics_with_escapes_decode() {
    assert_eq!(
        json_req(r#"{"type":"subscribe","topic":"q\"uo\\te\u00e9/\ud834\udd1e"}"#),
        Ok(Request::Subscribe {
            id: None,
            topics: vec![sub("q\"uo\\teé/𝄞", None)],
        })
    );
}

#[test]
fn malformed_json_requests_name_the_problem_and_the_id() {
    use ErrorCode::*;
    let cases: &[(&str, ErrorCode, Option<u64>, &str)] = &[
        (
            "",
            BadRequest,
            None,
            "invalid JSON: EOF while parsing a value at line 1 column 0",
        ),
        (
            "nope",
            BadRequest,
            None,
            "invalid JSON: expected ident at line 1 column 2",
        ),
        (
            r#"[{"type":"ping"}]"#,
            BadRequest,
            None,
            "message is not a JSON object",
        ),
        ("42", BadRequest, None, "message is not a JSON object"),
        (
            r#""ping""#,
            BadRequest,
            None,
            "message is not a JSON object",
        ),
        // The id is kept when a syntax error comes after it.
        (
            r#"{"id":5,"type":"ping""#,
            BadRequest,
            Some(5),
            "invalid JSON: EOF while parsing an object at line 1 column 21",
        ),
        (
            r#"{"id":6,"type":"ping"} x"#,
            BadRequest,
            Some(6),
            "invalid JSON: trailing characters at line 1 column 24",
        ),
        (
            r#"{"id":1}"#,
            BadRequest,
            Some(1),
            r#"missing field "type""#,
        ),
        (
            r#"{"id":1,"type":7}"#,
            BadRequest,
            Some(1),
            r#"field "type" must be a string"#,
        ),
        (
            r#"{"id":2,"type":"frobnicate"}"#,
            UnknownType,
            Some(2),
            r#"unknown type "frobnicate""#,
        ),
        (
            r#"{"id":"2","type":"ping"}"#,
            BadRequest,
            None,
            r#"field "id" must be an unsigned integer"#,
        ),
        (
            r#"{"id":-2,"type":"ping"}"#,
            BadRequest,
            None,
            r#"field "id" must be an unsigned integer"#,
        ),
        (
            r#"{"id":2.5,"type":"ping"}"#,
            BadRequest,
            None,
            r#"field "id" must be an unsigned integer"#,
        ),
        (
            r#"{"id":18446744073709551616,"type":"ping"}"#,
            BadRequest,
            None,
            r#"field "id" must be an unsigned integer"#,
        ),
        (
            r#"{"id":3,"type":"ping","type":"ping"}"#,
            BadRequest,
            Some(3),
            r#"duplicate field "type""#,
        ),
        (
            r#"{"id":3,"type":"subscribe"}"#,
            BadRequest,
            Some(3),
            r#"missing field "topic""#,
        ),
        (
            r#"{"id":3,"type":"subscribe","topic":5}"#,
            BadRequest,
            Some(3),
            r#"field "topic" must be a string"#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topic":"a","topics":["b"]}"#,
            BadRequest,
            Some(4),
            r#"fields "topic" and "topics" exclude each other"#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topics":[]}"#,
            BadRequest,
            Some(4),
            r#"field "topics" is empty"#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topics":"a"}"#,
            BadRequest,
            Some(4),
            r#"field "topics" must be an array"#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topics":["a",3]}"#,
            BadRequest,
            Some(4),
            r#"topics[1] must be a topic string or an object with "topic""#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topics":[{"since":1}]}"#,
            BadRequest,
            Some(4),
            r#"topics[0]: missing field "topic""#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topics":[{"topic":"a","since":"1"}]}"#,
            BadRequest,
            Some(4),
            r#"topics[0]: field "since" must be an unsigned integer"#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topics":["a"],"since":3}"#,
            BadRequest,
            Some(4),
            r#"with "topics", "since" goes inside each entry"#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topics":["a"],"epoch":3}"#,
            BadRequest,
            Some(4),
            r#"with "topics", "epoch" goes inside each entry"#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topic":"a","epoch":3}"#,
            BadRequest,
            Some(4),
            r#""epoch" without "since""#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topic":"a","since":null,"epoch":3}"#,
            BadRequest,
            Some(4),
            r#""epoch" without "since""#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topics":["a",{"topic":"b","epoch":3}]}"#,
            BadRequest,
            Some(4),
            r#"topics[1]: "epoch" without "since""#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topic":"a","since":1,"epoch":"3"}"#,
            BadRequest,
            Some(4),
            r#"field "epoch" must be an unsigned integer"#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topics":[{"topic":"a","since":1,"epoch":-3}]}"#,
            BadRequest,
            Some(4),
            r#"topics[0]: field "epoch" must be an unsigned integer"#,
        ),
        (
            r#"{"id":4,"type":"subscribe","topic":"a","since":1,"epoch":1,"epoch":2}"#,
            BadRequest,
            Some(4),
            r#"duplicate field "epoch""#,
        ),
        (
            r#"{"id":5,"type":"subscribe","topic":"a","since":"41"}"#,
            BadRequest,
            Some(5),
            r#"field "since" must be an unsigned integer"#,
        ),
        (
            r#"{"id":5,"type":"subscribe","topic":"a","since":-1}"#,
            BadRequest,
            Some(5),
            r#"field "since" must be an unsigned integer"#,
        ),
        (
            r#"{"id":5,"type":"subscribe","topic":""}"#,
            BadTopic,
            Some(5),
            "topic is empty",
        ),
        (
            r#"{"id":5,"type":"subscribe","topic":"a b"}"#,
            BadTopic,
            Some(5),
            "topic contains whitespace",
        ),
        (
            r#"{"id":5,"type":"subscribe","topic":"a\tb"}"#,
            BadTopic,
            Some(5),
            "topic contains an ASCII control character",
        ),
        (
            r#"{"id":5,"type":"subscribe","topic":"a\u0000"}"#,
            BadTopic,
            Some(5),
            "topic contains an ASCII control character",
        ),
        (
            r#"{"id":5,"type":"subscribe","topics":["ok",{"topic":"no way"}]}"#,
            BadTopic,
            Some(5),
            "topics[1]: topic contains whitespace",
        ),
        (
            r#"{"id":6,"type":"unsubscribe"}"#,
            BadRequest,
            Some(6),
            r#"missing field "topic""#,
        ),
        (
            r#"{"id":6,"type":"unsubscribe","topics":[{"topic":"a"}]}"#,
            BadRequest,
            Some(6),
            "topics[0] must be a topic string",
        ),
        (
            r#"{"id":6,"type":"unsubscribe","topics":["a",""]}"#,
            BadTopic,
            Some(6),
            "topics[1]: topic is empty",
        ),
        (
            r#"{"id":7,"type":"publish","data":1}"#,
            BadRequest,
            Some(7),
            r#"missing field "topic""#,
        ),
        (
            r#"{"id":7,"type":"publish","topic":"t"}"#,
            BadRequest,
            Some(7),
            r#"missing field "data""#,
        ),
        (
            r#"{"id":7,"type":"publish","topic":"t","data":1,"data_b64":"AA=="}"#,
            BadRequest,
            Some(7),
            r#"fields "data" and "data_b64" exclude each other"#,
        ),
        (
            r#"{"id":7,"type":"publish","topic":"t","data_b64":"!!"}"#,
            BadPayload,
            Some(7),
            r#""data_b64" is not valid base64"#,
        ),
        (
            r#"{"id":7,"type":"publish","topic":"t","data_b64":5}"#,
            BadRequest,
            Some(7),
            r#"field "data_b64" must be a string"#,
        ),
        (
            r#"{"id":7,"type":"publish","topic":"t","data":tru}"#,
            BadRequest,
            Some(7),
            "invalid JSON: expected ident at line 1 column 48",
        ),
    ];
    for &(input, code, id, message) in cases {
        assert_eq!(json_req(input), Err(err(code, id, message)), "{input}");
    }
    let long = "a".repeat(MAX_TOPIC_BYTES + 1);
    assert_eq!(
        json_req(&format!(
            r#"{{"id":9,"type":"publish","topic":"{long}","data":1}}"#
        )),
        Err(err(BadTopic, Some(9), "topic is longer than 255 bytes"))
    );
    // An unknown type is cut in the message.
    let ty = "x".repeat(1000);
    let e = json_req(&format!(r#"{{"type":"{ty}"}}"#)).unwrap_err();
    assert_eq!(e.code, UnknownType);
    assert!(e.message.len() < 80, "{}", e.message);
}

// ---- Binary requests ----

fn bin_id(id: Option<u64>) -> Vec<u8> {
    match id {
        None => vec![0],
        Some(id) => [&[1][..], &id.to_be_bytes()].concat(),
    }
}

#[test]
fn binary_requests_decode() {
    let subscribe = [
        &[0x01][..],
        &bin_id(Some(1)),
        &[0x01],
        &41u64.to_be_bytes(),
        &[10],
        b"prices.BTC",
        &[0x00, 1, b'x'],
    ]
    .concat();
    assert_eq!(
        decode_request(Encoding::Binary, &subscribe),
        Ok(Request::Subscribe {
            id: Some(1),
            topics: vec![sub("prices.BTC", Some(41)), sub("x", None)],
        })
    );
    assert_eq!(
        decode_request(Encoding::Binary, b"\x02\x00\x01a\x02bc"),
        Ok(Request::Unsubscribe {
            id: None,
            topics: vec!["a".into(), "bc".into()],
        })
    );
    assert_eq!(
        decode_request(Encoding::Binary, b"\x03\x00\x00\x01t\x00\xff"),
        Ok(Request::Publish {
            id: None,
            topic: "t".into(),
            payload: Data::binary(b"\x00\xff"),
        })
    );
    assert_eq!(
        decode_request(Encoding::Binary, b"\x03\x00\x00\x01t"),
        Ok(Request::Publish {
            id: None,
            topic: "t".into(),
            payload: Data::binary(b""),
        })
    );
    // A JSON payload is checked and trimmed.
    assert_eq!(
        decode_request(Encoding::Binary, b"\x03\x00\x01\x01t {\"a\": [1]}\n"),
        Ok(Request::Publish {
            id: None,
            topic: "t".into(),
            payload: Data::json("{\"a\": [1]}"),
        })
    );
    // Entry flag bit 1: an epoch follows the since.
    let resume = [
        &[0x01][..],
        &bin_id(None),
        &[0x03],
        &10u64.to_be_bytes(),
        &7u64.to_be_bytes(),
        &[1, b'x'],
    ]
    .concat();
    assert_eq!(
        decode_request(Encoding::Binary, &resume),
        Ok(Request::Subscribe {
            id: None,
            topics: vec![sub_in("x", 10, 7)],
        })
    );
    assert_eq!(
        encode_request(
            Encoding::Binary,
            &Request::Subscribe {
                id: None,
                topics: vec![sub_in("x", 10, 7)],
            }
        ),
        resume
    );
    let ping = [&[0x04][..], &bin_id(Some(4))].concat();
    assert_eq!(
        decode_request(Encoding::Binary, &ping),
        Ok(Request::Ping { id: Some(4) })
    );
}

#[test]
fn malformed_binary_requests_name_the_problem_and_the_id() {
    use ErrorCode::*;
    let id = bin_id(Some(9));
    let with_id = |op: u8, rest: &[u8]| [&[op][..], &id, rest].concat();
    let cases: Vec<(Vec<u8>, ErrorCode, Option<u64>, &str)> = vec![
        (vec![], BadRequest, None, "empty message"),
        (
            vec![0x01],
            BadRequest,
            None,
            "message truncated in the id flag",
        ),
        (
            vec![0x01, 0x02],
            BadRequest,
            None,
            "id flag is 0x02, not 0x00 or 0x01",
        ),
        (
            vec![0x01, 0x01, 0, 0, 0],
            BadRequest,
            None,
            "message truncated in the id",
        ),
        (
            with_id(0x09, b"whatever"),
            UnknownType,
            Some(9),
            "unknown op 0x09",
        ),
        (vec![0x7f], UnknownType, None, "unknown op 0x7f"),
        (vec![0x81, 0x00], UnknownType, None, "unknown op 0x81"),
        // subscribe
        (
            with_id(0x01, b""),
            BadRequest,
            Some(9),
            "subscribe names no topic",
        ),
        (
            with_id(0x01, b"\x01\x00\x00"),
            BadRequest,
            Some(9),
            "message truncated in the since",
        ),
        (
            with_id(0x01, b"\x01"),
            BadRequest,
            Some(9),
            "message truncated in the since",
        ),
        (
            with_id(0x01, b"\x00"),
            BadRequest,
            Some(9),
            "message truncated in the topic length",
        ),
        (
            with_id(0x01, b"\x00\x05ab"),
            BadRequest,
            Some(9),
            "message truncated in the topic",
        ),
        (
            with_id(0x01, b"\x04\x01a"),
            BadRequest,
            Some(9),
            "undefined bits set in the entry flags (0x04)",
        ),
        (
            with_id(0x01, b"\x02\x00\x00\x00\x00\x00\x00\x00\x07\x01a"),
            BadRequest,
            Some(9),
            "entry has an epoch without a since",
        ),
        (
            with_id(0x01, b"\x03\x00\x00\x00\x00\x00\x00\x00\x07\x00\x01"),
            BadRequest,
            Some(9),
            "message truncated in the epoch",
        ),
        (
            with_id(0x01, b"\x00\x00"),
            BadTopic,
            Some(9),
            "topic is empty",
        ),
        (
            with_id(0x01, b"\x00\x03a b"),
            BadTopic,
            Some(9),
            "topic contains whitespace",
        ),
        (
            with_id(0x01, b"\x00\x02a\x7f"),
            BadTopic,
            Some(9),
            "topic contains an ASCII control character",
        ),
        (
            with_id(0x01, b"\x00\x02\xff\xfe"),
            BadTopic,
            Some(9),
            "topic is not valid UTF-8",
        ),
        (
            with_id(0x01, b"\x00\x01a\x00"),
            BadRequest,
            Some(9),
            "message truncated in the topic length",
        ),
        // unsubscribe
        (
            with_id(0x02, b""),
            BadRequest,
            Some(9),
            "unsubscribe names no topic",
        ),
        (
            with_id(0x02, b"\x03ab"),
            BadRequest,
            Some(9),
            "message truncated in the topic",
        ),
        (
            with_id(0x02, b"\x01a\x00"),
            BadTopic,
            Some(9),
            "topic is empty",
        ),
        // publish
        (
            with_id(0x03, b""),
            BadRequest,
            Some(9),
            "message truncated in the publish flags",
        ),
        (
            with_id(0x03, b"\x00"),
            BadRequest,
            Some(9),
            "message truncated in the topic length",
        ),
        (
            with_id(0x03, b"\x00\x02a"),
            BadRequest,
            Some(9),
            "message truncated in the topic",
        ),
        (
            with_id(0x03, b"\x80\x01a"),
            BadRequest,
            Some(9),
            "undefined bits set in the publish flags (0x80)",
        ),
        (
            with_id(0x03, b"\x00\x00"),
            BadTopic,
            Some(9),
            "topic is empty",
        ),
        (
            with_id(0x03, b"\x01\x01a"),
            BadPayload,
            Some(9),
            "payload flagged JSON is not valid JSON",
        ),
        (
            with_id(0x03, b"\x01\x01a{\"x\":"),
            BadPayload,
            Some(9),
            "payload flagged JSON is not valid JSON",
        ),
        (
            with_id(0x03, b"\x01\x01a1 2"),
            BadPayload,
            Some(9),
            "payload flagged JSON is not valid JSON",
        ),
        // ping
        (
            with_id(0x04, b"\x00"),
            BadRequest,
            Some(9),
            "1 trailing bytes after a ping",
        ),
    ];
    for (input, code, id, message) in cases {
        assert_eq!(
            decode_request(Encoding::Binary, &input),
            Err(err(code, id, message)),
            "{input:02x?}"
        );
    }
}

// ---- Server messages ----

#[test]
fn server_json_output_is_exact() {
    let j = Encoding::Json;
    let cases: Vec<(Bytes, &str)> = vec![
        (
            message_frame(j, "prices.BTC", 42, Data::json(r#"{"p":1}"#)),
            r#"{"type":"message","topic":"prices.BTC","seq":42,"data":{"p":1}}"#,
        ),
        (
            message_frame(j, "prices.BTC", 0, Data::binary(&[0, 1, 2, 255])),
            r#"{"type":"message","topic":"prices.BTC","seq":0,"data_b64":"AAEC/w=="}"#,
        ),
        (
            message_frame(j, "t", 1, Data::binary(&[])),
            r#"{"type":"message","topic":"t","seq":1,"data_b64":""}"#,
        ),
        (ack_frame(j, Some(1)), r#"{"type":"ack","id":1}"#),
        (ack_frame(j, None), r#"{"type":"ack"}"#),
        (
            publish_ack_frame(j, Some(3), 7, 42),
            r#"{"type":"ack","id":3,"epoch":7,"seq":42}"#,
        ),
        (
            subscribe_ack_frame(j, Some(1), vec![pos("x", 7, 41)]),
            r#"{"type":"ack","id":1,"topics":[{"topic":"x","epoch":7,"seq":41}]}"#,
        ),
        (
            subscribe_ack_frame(j, None, vec![pos("a\"b", 1, 0), pos("c", u64::MAX, 9)]),
            r#"{"type":"ack","topics":[{"topic":"a\"b","epoch":1,"seq":0},{"topic":"c","epoch":18446744073709551615,"seq":9}]}"#,
        ),
        (
            error_frame(j, Some(1), ErrorCode::BadTopic, "topic is empty", None),
            r#"{"type":"error","id":1,"code":"bad_topic","message":"topic is empty"}"#,
        ),
        (
            error_frame(
                j,
                None,
                ErrorCode::BadRequest,
                r#"missing field "topic""#,
                None,
            ),
            r#"{"type":"error","code":"bad_request","message":"missing field \"topic\""}"#,
        ),
        (
            error_frame(j, Some(3), ErrorCode::RateLimited, "slow down", Some(250)),
            r#"{"type":"error","id":3,"code":"rate_limited","message":"slow down","retry_after_ms":250}"#,
        ),
        (
            reset_frame(j, "prices.BTC", 100, 7),
            r#"{"type":"reset","topic":"prices.BTC","oldest":100,"epoch":7}"#,
        ),
        (
            dropped_frame(j, "prices.BTC", 7, 57),
            r#"{"type":"dropped","topic":"prices.BTC","count":7,"next":57}"#,
        ),
        (
            shutdown_frame(j, "server restarting"),
            r#"{"type":"shutdown","reason":"server restarting"}"#,
        ),
        (pong_frame(j, Some(4)), r#"{"type":"pong","id":4}"#),
        (pong_frame(j, None), r#"{"type":"pong"}"#),
        (
            message_frame(j, "q\"b\\s/é\u{1}", u64::MAX, Data::json("null")),
            r#"{"type":"message","topic":"q\"b\\s/é\u0001","seq":18446744073709551615,"data":null}"#,
        ),
    ];
    for (frame, expected) in &cases {
        assert_eq!(body(frame), *expected);
        assert_eq!(&through_client_codec(frame, j)[..], expected.as_bytes());
    }
}

#[test]
fn server_json_parses_with_serde_json() {
    let j = Encoding::Json;
    let parse = |frame: &Bytes| -> Value { serde_json::from_str(body(frame)).expect("valid JSON") };
    assert_eq!(
        parse(&message_frame(
            j,
            "a\"\\\n☃",
            42,
            Data::json(r#"{"p":[1,"x"]}"#)
        )),
        json!({"type": "message", "topic": "a\"\\\n☃", "seq": 42, "data": {"p": [1, "x"]}})
    );
    assert_eq!(
        parse(&message_frame(j, "b", 1, Data::binary(b"hello"))),
        json!({"type": "message", "topic": "b", "seq": 1, "data_b64": "aGVsbG8="})
    );
    assert_eq!(
        parse(&ack_frame(j, Some(1))),
        json!({"type": "ack", "id": 1})
    );
    assert_eq!(
        parse(&error_frame(
            j,
            Some(2),
            ErrorCode::RateLimited,
            "slow \"down\"\u{0}",
            Some(1500),
        )),
        json!({"type": "error", "id": 2, "code": "rate_limited", "message": "slow \"down\"\u{0}", "retry_after_ms": 1500})
    );
    assert_eq!(
        parse(&reset_frame(j, "t", 100, 5)),
        json!({"type": "reset", "topic": "t", "oldest": 100, "epoch": 5})
    );
    assert_eq!(
        parse(&publish_ack_frame(j, Some(1), 5, 6)),
        json!({"type": "ack", "id": 1, "epoch": 5, "seq": 6})
    );
    assert_eq!(
        parse(&subscribe_ack_frame(j, Some(1), vec![pos("t", 5, 6)])),
        json!({"type": "ack", "id": 1, "topics": [{"topic": "t", "epoch": 5, "seq": 6}]})
    );
    assert_eq!(
        parse(&dropped_frame(j, "t", 7, 57)),
        json!({"type": "dropped", "topic": "t", "count": 7, "next": 57})
    );
    assert_eq!(
        parse(&shutdown_frame(j, "bye")),
        json!({"type": "shutdown", "reason": "bye"})
    );
    assert_eq!(
        parse(&pong_frame(j, Some(4))),
        json!({"type": "pong", "id": 4})
    );
    for code in ErrorCode::ALL {
        let v = parse(&error_frame(j, None, code, "m", None));
        assert_eq!(v["code"], code.as_str());
    }
}

#[test]
fn server_binary_output_is_exact() {
    let b = Encoding::Binary;
    let cat = |parts: &[&[u8]]| parts.concat();
    let cases: Vec<(Bytes, Vec<u8>)> = vec![
        (
            message_frame(b, "t", 42, Data::json("[1]")),
            cat(&[&[0x81, 0x01], &42u64.to_be_bytes(), &[1, b't'], b"[1]"]),
        ),
        (
            message_frame(b, "t", 42, Data::binary(b"\x00\x01")),
            cat(&[&[0x81, 0x00], &42u64.to_be_bytes(), &[1, b't'], b"\x00\x01"]),
        ),
        (
            ack_frame(b, Some(1)),
            cat(&[&[0x82, 0x01], &1u64.to_be_bytes()]),
        ),
        (ack_frame(b, None), vec![0x82, 0x00]),
        // Version 1 has no room for the newer fields: its acks, errors and resets are the
        // bytes they always were.
        (
            publish_ack_frame(b, Some(1), 7, 42),
            cat(&[&[0x82, 0x01], &1u64.to_be_bytes()]),
        ),
        (
            subscribe_ack_frame(b, None, vec![pos("x", 7, 41)]),
            vec![0x82, 0x00],
        ),
        (
            error_frame(b, Some(3), ErrorCode::BadTopic, "topic is empty", None),
            cat(&[
                &[0x83, 0x01],
                &3u64.to_be_bytes(),
                &[9],
                b"bad_topic",
                b"topic is empty",
            ]),
        ),
        (
            error_frame(b, None, ErrorCode::RateLimited, "slow", Some(250)),
            cat(&[&[0x83, 0x00], &[12], b"rate_limited", b"slow"]),
        ),
        (
            reset_frame(b, "t", 100, 7),
            cat(&[&[0x84], &100u64.to_be_bytes(), &[1, b't']]),
        ),
        (
            dropped_frame(b, "t", 7, 57),
            cat(&[
                &[0x85],
                &7u64.to_be_bytes(),
                &57u64.to_be_bytes(),
                &[1, b't'],
            ]),
        ),
        (shutdown_frame(b, "bye"), b"\x86bye".to_vec()),
        (
            pong_frame(b, Some(4)),
            cat(&[&[0x87, 0x01], &4u64.to_be_bytes()]),
        ),
        (pong_frame(b, None), vec![0x87, 0x00]),
    ];
    for (frame, expected) in &cases {
        assert_eq!(split_frame(frame, b), &expected[..]);
        assert_eq!(&through_client_codec(frame, b)[..], &expected[..]);
    }
}

#[test]
fn server_binary_v2_output_is_exact() {
    let b = Dialect::BinaryV2;
    let cat = |parts: &[&[u8]]| parts.concat();
    let cases: Vec<(Bytes, Vec<u8>)> = vec![
        // Messages and dropped notices are version 1's bytes.
        (
            message_frame(Encoding::Binary, "t", 42, Data::json("[1]")),
            cat(&[&[0x81, 0x01], &42u64.to_be_bytes(), &[1, b't'], b"[1]"]),
        ),
        (ack_frame(b, None), vec![0x82, 0x00, 0x00]),
        (
            ack_frame(b, Some(2)),
            cat(&[&[0x82, 0x01], &2u64.to_be_bytes(), &[0x00]]),
        ),
        (
            publish_ack_frame(b, Some(3), 7, 42),
            cat(&[
                &[0x82, 0x01],
                &3u64.to_be_bytes(),
                &[0x01],
                &7u64.to_be_bytes(),
                &42u64.to_be_bytes(),
            ]),
        ),
        (
            subscribe_ack_frame(b, None, vec![pos("x", 7, 41), pos("yz", 8, 0)]),
            cat(&[
                &[0x82, 0x00, 0x02],
                &7u64.to_be_bytes(),
                &41u64.to_be_bytes(),
                &[1, b'x'],
                &8u64.to_be_bytes(),
                &0u64.to_be_bytes(),
                &[2, b'y', b'z'],
            ]),
        ),
        (
            error_frame(b, Some(3), ErrorCode::RateLimited, "slow", Some(250)),
            cat(&[
                &[0x83, 0x01],
                &3u64.to_be_bytes(),
                &250u64.to_be_bytes(),
                &[12],
                b"rate_limited",
                b"slow",
            ]),
        ),
        (
            error_frame(b, None, ErrorCode::BadTopic, "x", None),
            cat(&[&[0x83, 0x00], &0u64.to_be_bytes(), &[9], b"bad_topic", b"x"]),
        ),
        (
            reset_frame(b, "t", 100, 7),
            cat(&[
                &[0x84],
                &100u64.to_be_bytes(),
                &7u64.to_be_bytes(),
                &[1, b't'],
            ]),
        ),
        (
            dropped_frame(Encoding::Binary, "t", 7, 57),
            cat(&[
                &[0x85],
                &7u64.to_be_bytes(),
                &57u64.to_be_bytes(),
                &[1, b't'],
            ]),
        ),
        (pong_frame(Encoding::Binary, None), vec![0x87, 0x00]),
    ];
    for (frame, expected) in &cases {
        assert_eq!(split_frame(frame, Encoding::Binary), &expected[..]);
        assert_eq!(
            &through_client_codec(frame, Encoding::Binary)[..],
            &expected[..]
        );
    }
}

#[test]
fn server_messages_decode_with_their_new_fields() {
    let j = |s: &'static str| decode_server(Dialect::Json, s.as_bytes());
    assert_eq!(
        j(r#"{"type":"ack","id":3,"epoch":7,"seq":42}"#),
        Ok(ServerMessage::Ack {
            id: Some(3),
            position: AckPosition::Publish { epoch: 7, seq: 42 },
        })
    );
    assert_eq!(
        j(r#"{"type":"ack","id":1,"topics":[{"topic":"x","epoch":7,"seq":41,"more":1}]}"#),
        Ok(ServerMessage::Ack {
            id: Some(1),
            position: AckPosition::Subscribe(vec![pos("x", 7, 41)]),
        })
    );
    // An old server's ack, and an unsubscribe's.
    assert_eq!(
        j(r#"{"type":"ack","id":2}"#),
        Ok(ServerMessage::Ack {
            id: Some(2),
            position: AckPosition::Plain,
        })
    );
    assert_eq!(
        j(r#"{"type":"reset","topic":"t","oldest":1}"#),
        Ok(ServerMessage::Reset {
            topic: "t".into(),
            oldest: 1,
            epoch: None,
        })
    );
    assert_eq!(
        j(r#"{"type":"error","code":"unavailable","message":"m","retry_after_ms":null}"#),
        Ok(ServerMessage::Error {
            id: None,
            code: "unavailable".into(),
            message: "m".into(),
            retry_after_ms: None,
        })
    );
    // Binary version 1 reads the old layouts; version 2 the new ones.
    let v2_reset = [
        &[0x84][..],
        &5u64.to_be_bytes(),
        &9u64.to_be_bytes(),
        b"\x01t",
    ]
    .concat();
    assert_eq!(
        decode_server(Dialect::BinaryV2, &v2_reset),
        Ok(ServerMessage::Reset {
            topic: "t".into(),
            oldest: 5,
            epoch: Some(9),
        })
    );
    // Read as v1, the epoch is bytes the v1 layout does not have: refused, saying so.
    let err = decode_server(Dialect::BinaryV1, &v2_reset).unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest, "{err:?}");
    assert_eq!(err.message, "9 trailing bytes after the message");
    assert_eq!(
        decode_server(Encoding::Binary, b"\x82\x00"),
        Ok(ServerMessage::Ack {
            id: None,
            position: AckPosition::Plain,
        })
    );
    assert_eq!(
        decode_server(Dialect::BinaryV2, b"\x82\x00\x02"),
        Ok(ServerMessage::Ack {
            id: None,
            position: AckPosition::Subscribe(vec![]),
        })
    );
}

#[test]
fn every_frame_encoder_gives_a_decodable_frame_of_its_encoding() {
    for d in DIALECTS {
        let enc = d.encoding();
        let frames = [
            (message_frame(enc, "t", 1, Data::json("1")), "message"),
            (ack_frame(d, Some(1)), "ack"),
            (publish_ack_frame(d, Some(1), 2, 3), "ack"),
            (subscribe_ack_frame(d, Some(1), vec![pos("t", 2, 3)]), "ack"),
            (
                error_frame(d, None, ErrorCode::Internal, "x", Some(5)),
                "error",
            ),
            (reset_frame(d, "t", 1, 2), "reset"),
            (dropped_frame(enc, "t", 1, 2), "dropped"),
            (shutdown_frame(enc, "x"), "shutdown"),
            (pong_frame(enc, Some(1)), "pong"),
        ];
        for (frame, kind) in &frames {
            let payload = through_client_codec(frame, enc);
            let msg = decode_server(d, &payload).expect(kind);
            let name = match msg {
                ServerMessage::Message { .. } => "message",
                ServerMessage::Ack { .. } => "ack",
                ServerMessage::Error { .. } => "error",
                ServerMessage::Reset { .. } => "reset",
                ServerMessage::Dropped { .. } => "dropped",
                ServerMessage::Shutdown { .. } => "shutdown",
                ServerMessage::Pong { .. } => "pong",
            };
            assert_eq!(name, *kind);
        }
    }
}

#[test]
fn frames_over_125_and_65535_bytes_use_the_longer_length_forms() {
    for enc in ENCODINGS {
        for len in [100usize, 200, 70_000] {
            let data = vec![b'7'; len];
            let text = std::str::from_utf8(&data).unwrap();
            let frame = message_frame(enc, "t", 1, Data::json(text));
            let payload = through_client_codec(&frame, enc);
            let Ok(ServerMessage::Message { payload: p, .. }) = decode_server(enc, &payload) else {
                panic!("message");
            };
            assert_eq!(&*p.bytes, &data[..]);
        }
    }
}

#[test]
fn decode_errors_answer_with_an_error_frame() {
    for d in DIALECTS {
        let e = err(ErrorCode::UnknownType, Some(8), r#"unknown type "x""#);
        let frame = e.to_frame(d);
        assert_eq!(
            decode_server(d, split_frame(&frame, d.encoding())),
            Ok(ServerMessage::Error {
                id: Some(8),
                code: "unknown_type".into(),
                message: r#"unknown type "x""#.into(),
                retry_after_ms: None,
            })
        );
    }
    assert_eq!(
        err(ErrorCode::BadTopic, None, "topic is empty").to_string(),
        "bad_topic: topic is empty"
    );
}

#[test]
fn malformed_server_messages_are_errors() {
    use ErrorCode::*;
    let j = |s: &str| {
        decode_server(Encoding::Json, s.as_bytes())
            .map(drop)
            .map_err(|e| (e.code, e.message))
    };
    assert_eq!(
        j(r#"{"type":"message","topic":"t","data":1}"#),
        Err((BadRequest, r#"missing field "seq""#.into()))
    );
    assert_eq!(
        j(r#"{"type":"reset","topic":"t"}"#),
        Err((BadRequest, r#"missing field "oldest""#.into()))
    );
    assert_eq!(
        j(r#"{"type":"dropped","topic":"t","count":1}"#),
        Err((BadRequest, r#"missing field "next""#.into()))
    );
    assert_eq!(
        j(r#"{"type":"error","code":"x"}"#),
        Err((BadRequest, r#"missing field "message""#.into()))
    );
    assert_eq!(
        j(r#"{"type":"shutdown"}"#),
        Err((BadRequest, r#"missing field "reason""#.into()))
    );
    assert_eq!(
        j(r#"{"type":"hello"}"#),
        Err((UnknownType, r#"unknown type "hello""#.into()))
    );
    assert_eq!(
        j(r#"{"type":"ack","id":1,"epoch":7}"#),
        Err((BadRequest, r#"missing field "seq""#.into()))
    );
    assert_eq!(
        j(r#"{"type":"ack","id":1,"seq":7}"#),
        Err((BadRequest, r#"missing field "epoch""#.into()))
    );
    assert_eq!(
        j(r#"{"type":"ack","seq":"7","epoch":1}"#),
        Err((
            BadRequest,
            r#"field "seq" must be an unsigned integer"#.into()
        ))
    );
    assert_eq!(
        j(r#"{"type":"ack","topics":{"topic":"x"}}"#),
        Err((BadRequest, r#"field "topics" must be an array"#.into()))
    );
    assert_eq!(
        j(r#"{"type":"ack","topics":["x"]}"#),
        Err((BadRequest, "topics[0] must be an object".into()))
    );
    assert_eq!(
        j(r#"{"type":"ack","topics":[{"topic":"x","seq":1}]}"#),
        Err((BadRequest, r#"topics[0]: missing field "epoch""#.into()))
    );
    assert_eq!(
        j(r#"{"type":"reset","topic":"t","oldest":1,"epoch":-1}"#),
        Err((
            BadRequest,
            r#"field "epoch" must be an unsigned integer"#.into()
        ))
    );
    assert_eq!(
        j(r#"{"type":"error","code":"x","message":"m","retry_after_ms":1.5}"#),
        Err((
            BadRequest,
            r#"field "retry_after_ms" must be an unsigned integer"#.into()
        ))
    );
    let v2 = |s: &[u8]| {
        decode_server(Dialect::BinaryV2, s)
            .map(drop)
            .map_err(|e| (e.code, e.message))
    };
    assert_eq!(
        v2(b"\x82\x00"),
        Err((BadRequest, "message truncated in the ack kind".into()))
    );
    assert_eq!(
        v2(b"\x82\x00\x03"),
        Err((BadRequest, "ack kind is 0x03, not 0, 1 or 2".into()))
    );
    assert_eq!(
        v2(b"\x82\x00\x00\x00"),
        Err((BadRequest, "1 trailing bytes after the message".into()))
    );
    assert_eq!(
        v2(&[&[0x82, 0x00, 0x01][..], &7u64.to_be_bytes()].concat()),
        Err((BadRequest, "message truncated in the seq".into()))
    );
    assert_eq!(
        v2(&[
            &[0x82, 0x00, 0x02][..],
            &7u64.to_be_bytes(),
            &1u64.to_be_bytes(),
            &[2, b'x']
        ]
        .concat()),
        Err((BadRequest, "message truncated in the topic".into()))
    );
    assert_eq!(
        v2(b"\x83\x00\x00\x00"),
        Err((BadRequest, "message truncated in the retry_after_ms".into()))
    );
    assert_eq!(
        v2(&[&[0x84][..], &1u64.to_be_bytes(), &[1, b't']].concat()),
        Err((BadRequest, "message truncated in the epoch".into()))
    );
    let b = |s: &[u8]| {
        decode_server(Encoding::Binary, s)
            .map(drop)
            .map_err(|e| (e.code, e.message))
    };
    assert_eq!(b(b""), Err((BadRequest, "empty message".into())));
    assert_eq!(b(b"\x01\x00"), Err((UnknownType, "unknown op 0x01".into())));
    assert_eq!(
        b(b"\x81\x00\x00"),
        Err((BadRequest, "message truncated in the seq".into()))
    );
    assert_eq!(
        b(b"\x82\x00\x00"),
        Err((BadRequest, "1 trailing bytes after the message".into()))
    );
    assert_eq!(
        b(b"\x86\xff"),
        Err((BadRequest, "the reason is not valid UTF-8".into()))
    );
    let mut msg = vec![0x81, 0x01];
    msg.extend_from_slice(&1u64.to_be_bytes());
    msg.extend_from_slice(b"\x01t{");
    assert_eq!(
        b(&msg),
        Err((BadPayload, "payload flagged JSON is not valid JSON".into()))
    );
}

#[test]
fn requests_travel_through_a_client_and_a_server_codec() {
    let req = Request::Publish {
        id: Some(77),
        topic: "prices.ETH".into(),
        payload: Data::json(r#"{"bid":1,"ask":2}"#),
    };
    for enc in ENCODINGS {
        let mut client = Codec::client(Limits::default(), 3);
        let mut server = Codec::server(Limits::default());
        let mut wire = BytesMut::new();
        client.encode_frame(true, enc.opcode(), &encode_request(enc, &req), &mut wire);
        let data = match server.poll_event(&mut wire).unwrap() {
            Some(Event::Text(t)) => t.into_bytes(),
            Some(Event::Binary(b)) => b,
            other => panic!("{other:?}"),
        };
        assert_eq!(decode_request(enc, &data), Ok(req.clone()));
    }
}

#[test]
fn request_json_output_is_exact() {
    let j = |req: &Request<'_>| String::from_utf8(encode_request(Encoding::Json, req)).unwrap();
    assert_eq!(
        j(&Request::Subscribe {
            id: Some(1),
            topics: vec![sub("prices.BTC", Some(41))]
        }),
        r#"{"type":"subscribe","id":1,"topic":"prices.BTC","since":41}"#
    );
    assert_eq!(
        j(&Request::Subscribe {
            id: None,
            topics: vec![sub("a", None), sub("b", Some(5))]
        }),
        r#"{"type":"subscribe","topics":["a",{"topic":"b","since":5}]}"#
    );
    assert_eq!(
        j(&Request::Subscribe {
            id: Some(1),
            topics: vec![sub_in("x", 10, 7)]
        }),
        r#"{"type":"subscribe","id":1,"topic":"x","since":10,"epoch":7}"#
    );
    assert_eq!(
        j(&Request::Subscribe {
            id: None,
            topics: vec![sub("a", None), sub_in("b", 5, 2)]
        }),
        r#"{"type":"subscribe","topics":["a",{"topic":"b","since":5,"epoch":2}]}"#
    );
    assert_eq!(
        j(&Request::Unsubscribe {
            id: Some(2),
            topics: vec!["prices.BTC".into()]
        }),
        r#"{"type":"unsubscribe","id":2,"topic":"prices.BTC"}"#
    );
    assert_eq!(
        j(&Request::Publish {
            id: Some(3),
            topic: "t".into(),
            payload: Data::json("[1]")
        }),
        r#"{"type":"publish","id":3,"topic":"t","data":[1]}"#
    );
    assert_eq!(
        j(&Request::Publish {
            id: None,
            topic: "t".into(),
            payload: Data::binary(b"hi")
        }),
        r#"{"type":"publish","topic":"t","data_b64":"aGk="}"#
    );
    assert_eq!(
        j(&Request::Ping { id: Some(4) }),
        r#"{"type":"ping","id":4}"#
    );
}

#[test]
fn over_long_topics_never_reach_a_binary_server_as_another_topic() {
    let long = "a".repeat(MAX_TOPIC_BYTES + 1);
    let req = Request::Unsubscribe {
        id: Some(1),
        topics: vec![long.as_str().into()],
    };
    assert_eq!(
        decode_request(Encoding::Binary, &encode_request(Encoding::Binary, &req)),
        Err(err(ErrorCode::BadTopic, Some(1), "topic is empty"))
    );
    // JSON can carry it, and the server names the rule.
    assert_eq!(
        decode_request(Encoding::Json, &encode_request(Encoding::Json, &req)),
        Err(err(
            ErrorCode::BadTopic,
            Some(1),
            "topic is longer than 255 bytes"
        ))
    );
}

// ---- Property tests ----

fn valid_topic() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        4 => "[a-zA-Z0-9._/*:#-]{1,24}",
        2 => r#"[a-z"\\/é漢𝄞\u{80}-\u{9f}]{1,30}"#,
        1 => "[a-z]{200,255}",
    ]
    .prop_filter("valid topic", |t| validate_topic(t).is_ok())
}

fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e9f64..1e9).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(any::<String>(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .prop_map(|v| v.to_string())
}

fn payload() -> impl Strategy<Value = Data<'static>> {
    prop_oneof![
        json_text().prop_map(|t| Data {
            kind: DataKind::Json,
            bytes: Cow::Owned(t.into_bytes()),
        }),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| Data {
            kind: DataKind::Binary,
            bytes: Cow::Owned(b),
        }),
    ]
}

fn request() -> impl Strategy<Value = Request<'static>> {
    let id = any::<Option<u64>>();
    // An epoch only ever comes with a since.
    let entry = (valid_topic(), any::<Option<u64>>(), any::<Option<u64>>()).prop_map(
        |(t, since, epoch)| SubscribeTopic {
            topic: Cow::Owned(t),
            since,
            epoch: since.and(epoch),
        },
    );
    prop_oneof![
        (id.clone(), prop::collection::vec(entry, 1..5))
            .prop_map(|(id, topics)| Request::Subscribe { id, topics }),
        (id.clone(), prop::collection::vec(valid_topic(), 1..5)).prop_map(|(id, topics)| {
            Request::Unsubscribe {
                id,
                topics: topics.into_iter().map(Cow::Owned).collect(),
            }
        }),
        (id.clone(), valid_topic(), payload()).prop_map(|(id, topic, payload)| {
            Request::Publish {
                id,
                topic: Cow::Owned(topic),
                payload,
            }
        }),
        id.prop_map(|id| Request::Ping { id }),
    ]
}

fn server_message() -> impl Strategy<Value = ServerMessage<'static>> {
    let id = any::<Option<u64>>();
    let topic = valid_topic().prop_map(Cow::Owned);
    prop_oneof![
        (topic.clone(), any::<u64>(), payload()).prop_map(|(topic, seq, payload)| {
            ServerMessage::Message {
                topic,
                seq,
                payload,
            }
        }),
        (id.clone(), ack_position()).prop_map(|(id, position)| ServerMessage::Ack { id, position }),
        (
            id.clone(),
            "[a-z_]{1,30}",
            any::<String>(),
            prop::option::of(1..=u64::MAX)
        )
            .prop_map(|(id, code, message, retry_after_ms)| {
                ServerMessage::Error {
                    id,
                    code: Cow::Owned(code),
                    message: Cow::Owned(message),
                    retry_after_ms,
                }
            }),
        (topic.clone(), any::<u64>(), prop::option::of(1..=u64::MAX)).prop_map(
            |(topic, oldest, epoch)| ServerMessage::Reset {
                topic,
                oldest,
                epoch
            }
        ),
        (topic, any::<u64>(), any::<u64>())
            .prop_map(|(topic, count, next)| ServerMessage::Dropped { topic, count, next }),
        any::<String>().prop_map(|r| ServerMessage::Shutdown {
            reason: Cow::Owned(r)
        }),
        id.prop_map(|id| ServerMessage::Pong { id }),
    ]
}

fn ack_position() -> impl Strategy<Value = AckPosition<'static>> {
    let entry =
        (valid_topic(), 1..=u64::MAX, any::<u64>()).prop_map(|(topic, epoch, seq)| TopicPosition {
            topic: Cow::Owned(topic),
            epoch,
            seq,
        });
    prop_oneof![
        Just(AckPosition::Plain),
        (1..=u64::MAX, any::<u64>()).prop_map(|(epoch, seq)| AckPosition::Publish { epoch, seq }),
        prop::collection::vec(entry, 0..4).prop_map(AckPosition::Subscribe),
    ]
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop_oneof![Just(Encoding::Json), Just(Encoding::Binary)]
}

fn dialect() -> impl Strategy<Value = Dialect> {
    prop_oneof![
        Just(Dialect::Json),
        Just(Dialect::BinaryV1),
        Just(Dialect::BinaryV2)
    ]
}

/// What a client of dialect `d` reads back from `msg`: version 1 has no room for the newer
/// fields.
fn as_read_in(d: Dialect, msg: &ServerMessage<'static>) -> ServerMessage<'static> {
    let mut msg = msg.clone();
    if d == Dialect::BinaryV1 {
        match &mut msg {
            ServerMessage::Ack { position, .. } => *position = AckPosition::Plain,
            ServerMessage::Error { retry_after_ms, .. } => *retry_after_ms = None,
            ServerMessage::Reset { epoch, .. } => *epoch = None,
            _ => {}
        }
    }
    msg
}

proptest! {
    #![proptest_config(util::config(256))]

    #[test]
    fn requests_round_trip(enc in encoding(), req in request()) {
        let wire = encode_request(enc, &req);
        prop_assert_eq!(decode_request(enc, &wire), Ok(req));
    }

    #[test]
    fn server_messages_round_trip_through_frames(d in dialect(), msg in server_message()) {
        let enc = d.encoding();
        let frame = encode_server(d, &msg);
        let payload = split_frame(&frame, enc);
        let expected = as_read_in(d, &msg);
        prop_assert_eq!(decode_server(d, payload), Ok(expected.clone()));
        let delivered = through_client_codec(&frame, enc);
        prop_assert_eq!(decode_server(d, &delivered), Ok(expected));
    }

    #[test]
    fn binary_v1_server_frames_are_the_old_bytes(msg in server_message()) {
        // Encoding the message with the newer fields stripped gives the same v1 bytes.
        let v1 = encode_server(Dialect::BinaryV1, &msg);
        prop_assert_eq!(v1.clone(), encode_server(Encoding::Binary, &as_read_in(Dialect::BinaryV1, &msg)));
        // Messages and dropped notices are the same in both versions.
        if matches!(msg, ServerMessage::Message { .. } | ServerMessage::Dropped { .. } | ServerMessage::Shutdown { .. } | ServerMessage::Pong { .. }) {
            prop_assert_eq!(v1, encode_server(Dialect::BinaryV2, &msg));
        }
    }

    #[test]
    fn server_json_is_what_serde_json_reads(msg in server_message()) {
        let frame = encode_server(Encoding::Json, &msg);
        let v: Value = serde_json::from_str(body(&frame)).expect("valid JSON");
        match &msg {
            ServerMessage::Message { topic, seq, payload } => {
                prop_assert_eq!(&v["topic"], &Value::from(&**topic));
                prop_assert_eq!(&v["seq"], &Value::from(*seq));
                if payload.kind == DataKind::Json {
                    let data: Value = serde_json::from_slice(&payload.bytes).unwrap();
                    prop_assert_eq!(&v["data"], &data);
                }
            }
            ServerMessage::Error { message, .. } => {
                prop_assert_eq!(&v["message"], &Value::from(&**message));
            }
            ServerMessage::Shutdown { reason } => {
                prop_assert_eq!(&v["reason"], &Value::from(&**reason));
            }
            _ => {}
        }
    }

    #[test]
    fn json_topics_with_any_characters_round_trip(id in any::<Option<u64>>(), topic in valid_topic()) {
        let req = Request::Unsubscribe { id, topics: vec![Cow::Owned(topic.clone())] };
        let wire = encode_request(Encoding::Json, &req);
        let v: Value = serde_json::from_slice(&wire).unwrap();
        prop_assert_eq!(&v["topic"], &Value::from(topic));
        prop_assert_eq!(decode_request(Encoding::Json, &wire), Ok(req));
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(d in dialect(), bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        let _ = decode_request(d.encoding(), &bytes);
        let _ = decode_server(d, &bytes);
    }

    #[test]
    fn decoders_never_panic_on_damaged_messages(
        d in dialect(),
        req in request(),
        msg in server_message(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let enc = d.encoding();
        let mut wire = encode_request(enc, &req);
        let mut server = split_frame(&encode_server(d, &msg), enc).to_vec();
        for w in [&mut wire, &mut server] {
            if !w.is_empty() {
                let at = flip.index(w.len());
                w[at] = byte;
            }
            let _ = decode_request(enc, w);
            let _ = decode_server(d, w);
            let keep = cut.index(w.len() + 1);
            let _ = decode_request(enc, &w[..keep]);
            let _ = decode_server(d, &w[..keep]);
        }
    }

    #[test]
    fn every_proper_prefix_of_a_binary_ping_or_publish_is_rejected_or_shorter(req in request(), cut in any::<prop::sample::Index>()) {
        let wire = encode_request(Encoding::Binary, &req);
        let keep = cut.index(wire.len());
        match decode_request(Encoding::Binary, &wire[..keep]) {
            Err(e) => prop_assert!(matches!(e.code, ErrorCode::BadRequest | ErrorCode::BadPayload | ErrorCode::BadTopic), "{:?}", e),
            // Cut between subscribe entries or inside a binary payload: a valid, shorter request.
            Ok(shorter) => prop_assert!(matches!(
                (&req, &shorter),
                (Request::Subscribe { .. }, Request::Subscribe { .. })
                    | (Request::Unsubscribe { .. }, Request::Unsubscribe { .. })
                    | (Request::Publish { .. }, Request::Publish { .. })
            ), "{:?} from {:?}", shorter, req),
        }
    }
}

/// Every JSON example in PROTOCOL.md decodes; the server ones are exactly what the encoder writes.
#[test]
fn protocol_md_examples_hold() {
    let doc = include_str!("../PROTOCOL.md");
    let (client, server) = doc
        .split_once("### Server to client")
        .expect("client section first");
    let server = server
        .split_once("## Binary encoding")
        .expect("then binary")
        .0;
    let json_lines = |section: &'static str| {
        section
            .split("```json\n")
            .skip(1)
            .flat_map(|block| block.split_once("```").expect("closed block").0.lines())
            .collect::<Vec<_>>()
    };
    let client_lines = json_lines(client);
    let server_lines = json_lines(server);
    assert!(client_lines.len() >= 8 && server_lines.len() >= 8);
    for line in client_lines {
        let req = json_req(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        // Requests re-encode to the same meaning.
        let again = encode_request(Encoding::Json, &req);
        assert_eq!(decode_request(Encoding::Json, &again), Ok(req), "{line}");
    }
    for line in server_lines {
        let msg = decode_server(Encoding::Json, line.as_bytes())
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(body(&encode_server(Encoding::Json, &msg)), line);
    }

    // The binary examples, byte for byte.
    let subscribe = Request::Subscribe {
        id: Some(1),
        topics: vec![sub("prices.BTC", Some(41)), sub("x", None)],
    };
    let hex = "01 01 00 00 00 00 00 00 00 01 01 00 00 00 00 00 00 00 29 \
               0a 70 72 69 63 65 73 2e 42 54 43 00 01 78";
    assert_eq!(encode_request(Encoding::Binary, &subscribe), unhex(hex));
    let publish = Request::Publish {
        id: None,
        topic: "t".into(),
        payload: Data::json("[1]"),
    };
    assert_eq!(
        encode_request(Encoding::Binary, &publish),
        unhex("03 00 01 01 74 5b 31 5d")
    );
    let frame = message_frame(Encoding::Binary, "t", 42, Data::json("[1]"));
    assert_eq!(
        split_frame(&frame, Encoding::Binary),
        unhex("81 01 00 00 00 00 00 00 00 2a 01 74 5b 31 5d")
    );
    assert!(doc.contains("`03 00 01 01 74 5b 31 5d`"));
    assert!(doc.contains("`81 01 00 00 00 00 00 00 00 2a 01 74 5b 31 5d`"));

    // The epoch examples: each hex string appears in the doc and is what the encoder writes.
    let resume = Request::Subscribe {
        id: None,
        topics: vec![sub_in("x", 10, 7)],
    };
    let bin = Encoding::Binary;
    let v2 = Dialect::BinaryV2;
    let payload = |frame: Bytes| split_frame(&frame, bin).to_vec();
    let examples: Vec<(&str, Vec<u8>)> = vec![
        (
            "01 00 03 00 00 00 00 00 00 00 0a 00 00 00 00 00 00 00 07 01 78",
            encode_request(bin, &resume),
        ),
        (
            "82 01 00 00 00 00 00 00 00 03",
            payload(publish_ack_frame(bin, Some(3), 7, 42)),
        ),
        (
            "82 01 00 00 00 00 00 00 00 03 01 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00 2a",
            payload(publish_ack_frame(v2, Some(3), 7, 42)),
        ),
        (
            "82 00",
            payload(subscribe_ack_frame(bin, None, vec![pos("x", 7, 41)])),
        ),
        (
            "82 00 02 00 00 00 00 00 00 00 07 00 00 00 00 00 00 00 29 01 78",
            payload(subscribe_ack_frame(v2, None, vec![pos("x", 7, 41)])),
        ),
        (
            "84 00 00 00 00 00 00 00 64 01 74",
            payload(reset_frame(bin, "t", 100, 7)),
        ),
        (
            "84 00 00 00 00 00 00 00 64 00 00 00 00 00 00 00 07 01 74",
            payload(reset_frame(v2, "t", 100, 7)),
        ),
        (
            "83 00 0c 72 61 74 65 5f 6c 69 6d 69 74 65 64 73 6c 6f 77",
            payload(error_frame(
                bin,
                None,
                ErrorCode::RateLimited,
                "slow",
                Some(250),
            )),
        ),
        (
            "83 00 00 00 00 00 00 00 00 fa 0c 72 61 74 65 5f 6c 69 6d 69 74 65 64 73 6c 6f 77",
            payload(error_frame(
                v2,
                None,
                ErrorCode::RateLimited,
                "slow",
                Some(250),
            )),
        ),
    ];
    for (hex, bytes) in examples {
        assert!(doc.contains(&format!("`{hex}`")), "{hex} is in PROTOCOL.md");
        assert_eq!(bytes, unhex(hex), "{hex}");
    }
    assert!(doc.contains("| `ringcast.v2.bin`"));
}

fn unhex(hex: &str) -> Vec<u8> {
    hex.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

#[test]
fn deep_nesting_is_an_error_or_a_payload_never_a_stack_overflow() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    // A publish's `data` this deep is refused by the depth limit (`bad_payload`, see
    // `json_nesting_past_the_limit_is_bad_payload`); the rest are never forwarded.
    let publish = format!(r#"{{"type":"publish","id":1,"topic":"t","data":{deep}}}"#);
    let e = json_req(&publish).expect_err("too deep");
    assert_eq!((e.id, e.code), (Some(1), ErrorCode::BadPayload), "{e}");
    // Any field this deep is refused the same way, before the request is parsed (the id,
    // read before the deep part, is kept).
    for input in [
        format!(r#"{{"type":"ping","id":1,"unknown":{deep}}}"#),
        format!(r#"{{"type":"ping","id":1,"since":{deep}}}"#),
        format!(r#"{{"id":1,"type":"subscribe","topics":[{{"topic":"t","x":{deep}}}]}}"#),
    ] {
        let e = json_req(&input).expect_err("too deep");
        assert_eq!((e.id, e.code), (Some(1), ErrorCode::BadPayload), "{e}");
    }
    // After the deep part, the id is not read: the rest of the request never is.
    let late_id = format!(r#"{{"type":"publish","topic":"t","data":{deep},"id":1}}"#);
    let e = json_req(&late_id).expect_err("too deep");
    assert_eq!((e.id, e.code), (None, ErrorCode::BadPayload), "{e}");
    // Garbage after the bracket past the limit is never looked at either.
    let tail = format!(r#"{{"id":2,"data":{}#not json"#, "[".repeat(200));
    let e = json_req(&tail).expect_err("too deep");
    assert_eq!((e.id, e.code), (Some(2), ErrorCode::BadPayload), "{e}");
}

/// A JSON value nested exactly `depth` deep, alternating arrays and objects, with a string
/// holding brackets at the bottom (which must not count).
fn nested(depth: usize) -> String {
    let mut open = String::new();
    let mut close = String::new();
    for level in 0..depth {
        if level % 2 == 0 {
            open.push('[');
            close.insert(0, ']');
        } else {
            open.push_str(r#"{"k":"#);
            close.insert(0, '}');
        }
    }
    format!(r#"{open}"[{{[\"]}}"{close}"#)
}

/// A publish of `data` as JSON in `enc`, id 9.
fn publish_wire(enc: Encoding, data: &str) -> Vec<u8> {
    let req = Request::Publish {
        id: Some(9),
        topic: "t".into(),
        payload: Data::json(data),
    };
    encode_request(enc, &req)
}

#[test]
fn json_nesting_up_to_the_limit_is_accepted() {
    assert_eq!(DEFAULT_MAX_JSON_DEPTH, 64);
    assert_eq!(DecodeOptions::default().max_json_depth, 64);
    for enc in ENCODINGS {
        let data = nested(64);
        let wire = publish_wire(enc, &data);
        match decode_request(enc, &wire) {
            Ok(Request::Publish { payload, .. }) => {
                assert_eq!(
                    (payload.kind, &*payload.bytes),
                    (DataKind::Json, data.as_bytes())
                )
            }
            other => panic!("{enc:?}: depth 64 refused: {other:?}"),
        }
    }
}

#[test]
fn json_nesting_past_the_limit_is_bad_payload() {
    for enc in ENCODINGS {
        let e = decode_request(enc, &publish_wire(enc, &nested(65))).expect_err("depth 65");
        assert_eq!(
            (e.id, e.code),
            (Some(9), ErrorCode::BadPayload),
            "{enc:?}: {e}"
        );
        assert!(
            e.message.contains("nests") && e.message.contains("64"),
            "{e}"
        );
        // Under a configured limit: the same text passes a higher one and fails a lower one.
        let higher = DecodeOptions::default().max_json_depth(65);
        assert!(decode_request_with(enc, &publish_wire(enc, &nested(65)), higher).is_ok());
        let lower = DecodeOptions::default().max_json_depth(3);
        assert!(decode_request_with(enc, &publish_wire(enc, &nested(3)), lower).is_ok());
        let e = decode_request_with(enc, &publish_wire(enc, &nested(4)), lower).expect_err("4");
        assert_eq!(e.code, ErrorCode::BadPayload, "{enc:?}");
        assert!(e.message.contains("deeper than 3"), "{e}");
    }
    // A binary payload is opaque: brackets there are not JSON nesting.
    let brackets = nested(1000);
    let bin = Request::Publish {
        id: None,
        topic: "t".into(),
        payload: Data::binary(brackets.as_bytes()),
    };
    for enc in ENCODINGS {
        assert!(
            decode_request(enc, &encode_request(enc, &bin)).is_ok(),
            "{enc:?}"
        );
    }
}

#[test]
fn json_nesting_100_000_deep_is_refused_fast() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let wide = format!("[{}1]", "[1],".repeat(100_000));
    for enc in ENCODINGS {
        let wire = publish_wire(enc, &deep);
        let start = std::time::Instant::now();
        let e = decode_request(enc, &wire).expect_err("100,000 deep");
        let took = start.elapsed();
        assert_eq!(e.code, ErrorCode::BadPayload, "{enc:?}: {e}");
        // Validation walks the 200 KB once; a debug build does it in a few ms.
        assert!(
            took < std::time::Duration::from_millis(500),
            "{enc:?}: {took:?}"
        );
        // Wide but shallow is fine, however many brackets.
        assert!(
            decode_request(enc, &publish_wire(enc, &wide)).is_ok(),
            "{enc:?}"
        );
    }
}

#[test]
fn json_depth_counts_brackets_outside_strings_only() {
    for (text, depth) in [
        ("1", 0),
        ("\"[[[[\"", 0),
        ("[]", 1),
        (r#"{"a":[1]}"#, 2),
        (r#"[{"[":"]"},[[]]]"#, 3),
        (r#"["\\", [["\"[[["]]]"#, 3),
        (r#" [ [ ] , { } ] "#, 2),
    ] {
        assert!(
            json_depth_within(text.as_bytes(), depth),
            "{text} within {depth}"
        );
        if depth > 0 {
            assert!(
                !json_depth_within(text.as_bytes(), depth - 1),
                "{text} over {}",
                depth - 1
            );
        }
    }
    // The short cuts: short text, few openers.
    assert!(!json_depth_within(b"[[[]]]", 2));
    assert!(json_depth_within(&nested(10).into_bytes(), 10));
    assert!(!json_depth_within(&nested(10).into_bytes(), 9));
}

/// The depth of a parsed value, recursively (the reference for the one-pass count).
fn value_depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(value_depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// JSON text whose strings hold brackets but no escapes (the word-at-a-time path), nested up
/// to 8 deep, long enough to span many words.
fn bracket_json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<u32>().prop_map(Value::from),
        "[\\[\\]{}a :,]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(8, 64, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
            prop::collection::btree_map("[\\[\\]{}a]{0,4}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .prop_map(|v| v.to_string())
}

proptest! {
    #[test]
    fn json_depth_matches_a_parser_with_brackets_in_strings(
        text in bracket_json_text(),
        max in 0usize..9,
    ) {
        let value: Value = serde_json::from_str(&text).expect("valid");
        let depth = value_depth(&value);
        prop_assert_eq!(json_depth_within(text.as_bytes(), max), depth <= max, "{} depth {}", text, depth);
    }

    #[test]
    fn json_depth_matches_a_parser(text in json_text(), max in 0usize..5) {
        let value: Value = serde_json::from_str(&text).expect("valid");
        let depth = value_depth(&value);
        prop_assert_eq!(json_depth_within(text.as_bytes(), max), depth <= max, "{} depth {}", text, depth);
    }
}

/// A subscribe (entries with `since`, so JSON writes objects) or an unsubscribe naming
/// `n` topics, `t0`, `t1`, ..., in `enc`.
fn many_topics_wire(enc: Encoding, subscribe: bool, n: usize) -> Vec<u8> {
    let names: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    let req = if subscribe {
        Request::Subscribe {
            id: Some(4),
            topics: names
                .iter()
                .map(|t| SubscribeTopic {
                    topic: t.as_str().into(),
                    since: Some(0),
                    epoch: None,
                })
                .collect(),
        }
    } else {
        Request::Unsubscribe {
            id: Some(4),
            topics: names.iter().map(|t| t.as_str().into()).collect(),
        }
    };
    encode_request(enc, &req)
}

fn topic_count(req: &Request<'_>) -> usize {
    match req {
        Request::Subscribe { topics, .. } => topics.len(),
        Request::Unsubscribe { topics, .. } => topics.len(),
        other => panic!("not a topic request: {other:?}"),
    }
}

#[test]
fn a_request_naming_more_topics_than_the_limit_is_too_large() {
    assert_eq!(DEFAULT_MAX_REQUEST_TOPICS, 1024);
    assert_eq!(DecodeOptions::default().max_request_topics, 1024);
    for enc in ENCODINGS {
        for subscribe in [true, false] {
            let at = many_topics_wire(enc, subscribe, 1024);
            let req = decode_request(enc, &at).expect("1,024 topics");
            assert_eq!(topic_count(&req), 1024, "{enc:?} {subscribe}");
            let e = decode_request(enc, &many_topics_wire(enc, subscribe, 1025)).expect_err("1025");
            assert_eq!(
                (e.id, e.code),
                (Some(4), ErrorCode::TooLarge),
                "{enc:?}: {e}"
            );
            assert_eq!(e.message, "request names more than 1024 topics");
            // A configured limit, repeats counted: 3 pass, 4 do not.
            let three = DecodeOptions::default().max_request_topics(3);
            let wire = many_topics_wire(enc, subscribe, 3);
            let ok = decode_request_with(enc, &wire, three).expect("3 topics");
            assert_eq!(topic_count(&ok), 3);
            let e = decode_request_with(enc, &many_topics_wire(enc, subscribe, 4), three)
                .expect_err("4 topics");
            assert_eq!(e.code, ErrorCode::TooLarge, "{enc:?}: {e}");
        }
    }
}
