//! Property tests of permessage-deflate through the codec: any sequence of messages, with or
//! without context takeover, at any window, read in any chunking, comes out as sent; and no
//! input, however crafted, makes the receiver produce more than the message limit.

use bytes::BytesMut;
use proptest::prelude::*;
use ringcast_protocol::{
    deflate::{negotiate, DeflateConfig},
    Codec, Event, Limits, OpCode, ProtocolError, Role,
};

fn pair(bits: u8, no_context: bool, sender: Role) -> (Codec, Codec) {
    let config = DeflateConfig::default()
        .with_server_no_context_takeover(no_context)
        .with_client_no_context_takeover(no_context)
        .with_server_max_window_bits(bits)
        .with_client_max_window_bits(bits)
        .with_threshold(0);
    let offer = config.offer();
    let params = negotiate(&config, [offer.as_bytes()]).expect("own offer accepted");
    let server = Codec::server(Limits::default()).with_deflate(params, &config);
    let client = Codec::client(Limits::default(), 11).with_deflate(params, &config);
    match sender {
        Role::Server => (server, client),
        Role::Client => (client, server),
    }
}

fn any_message() -> impl Strategy<Value = (bool, Vec<u8>)> {
    prop_oneof![
        // Text: repetitive JSON-ish, compressible.
        ("[a-z\"{}:,0-9 ]{0,600}").prop_map(|s| (true, s.into_bytes())),
        // Binary: anything.
        proptest::collection::vec(any::<u8>(), 0..600).prop_map(|b| (false, b)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn compressed_messages_round_trip_in_any_chunking(
        messages in proptest::collection::vec(any_message(), 1..20),
        bits in 9u8..=15,
        no_context in any::<bool>(),
        server_sends in any::<bool>(),
        chunk in 1usize..200,
    ) {
        let sender_role = if server_sends { Role::Server } else { Role::Client };
        let (mut sender, mut receiver) = pair(bits, no_context, sender_role);
        let mut wire = BytesMut::new();
        for (text, payload) in &messages {
            let op = if *text { OpCode::Text } else { OpCode::Binary };
            sender.encode_message(op, payload, &mut wire);
        }
        let mut got = Vec::new();
        let mut buf = BytesMut::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(ev) = receiver.poll_event(&mut buf).expect("valid stream") {
                got.push(ev);
            }
        }
        prop_assert_eq!(got.len(), messages.len());
        for (ev, (text, payload)) in got.iter().zip(&messages) {
            match ev {
                Event::Text(t) => {
                    prop_assert!(*text);
                    prop_assert_eq!(t.as_bytes().as_ref(), &payload[..]);
                }
                Event::Binary(b) => {
                    prop_assert!(!*text);
                    prop_assert_eq!(b.as_ref(), &payload[..]);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }

    #[test]
    fn arbitrary_compressed_payloads_never_exceed_the_limit(
        body in proptest::collection::vec(any::<u8>(), 0..2000),
        max in 1usize..4096,
    ) {
        let config = DeflateConfig::default();
        let params = negotiate(&config, [&b"permessage-deflate"[..]]).unwrap();
        let limits = Limits::default().with_max_message_bytes(max);
        let mut server = Codec::server(limits).with_deflate(params, &config);
        let mut frame = BytesMut::new();
        let header = ringcast_protocol::FrameHeader {
            fin: true,
            rsv: 0b100,
            opcode: OpCode::Binary,
            mask: Some([1, 2, 3, 4]),
            payload_len: body.len() as u64,
        };
        header.encode(&mut frame);
        let start = frame.len();
        frame.extend_from_slice(&body);
        ringcast_protocol::mask::apply_mask(&mut frame[start..], [1, 2, 3, 4], 0);
        match server.poll_event(&mut frame) {
            Ok(Some(Event::Binary(b))) => prop_assert!(b.len() <= max),
            Ok(other) => prop_assert!(false, "unexpected {:?}", other),
            Err(ProtocolError::MessageTooLarge { .. } | ProtocolError::InvalidDeflate) => {}
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }
}
