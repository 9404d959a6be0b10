//! The fuzz targets' entry functions (`tests/entry/mod.rs`, shared with `fuzz/`) run on stable
//! under proptest: arbitrary bytes, and bytes shaped like frames and upgrade heads so that the
//! deeper states are reached too. Every entry function asserts its own invariants.

mod util;

use bytes::BytesMut;
use proptest::prelude::*;
use proptest::sample::Index;
use ringcast_protocol::{
    ClientHandshake, FrameHeader, HeadReader, Limits, OpCode, Role, UpgradeRequest,
};
use util::entry;

/// A frame with every header field free, including the ones a peer must not set.
#[derive(Debug, Clone)]
struct RawFrame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    payload: Vec<u8>,
    /// Announce a length other than the payload's (truncated or oversized frames).
    length: Option<u64>,
}

impl RawFrame {
    fn encode(&self, wire: &mut Vec<u8>) {
        let len = self.length.unwrap_or(self.payload.len() as u64);
        wire.push(u8::from(self.fin) << 7 | (self.rsv & 7) << 4 | (self.opcode & 0xF));
        let mask_bit = if self.masked { 0x80 } else { 0 };
        match len {
            0..=125 => wire.push(mask_bit | len as u8),
            126..=0xFFFF => {
                wire.push(mask_bit | 126);
                wire.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                wire.push(mask_bit | 127);
                wire.extend_from_slice(&len.to_be_bytes());
            }
        }
        let key = [0x37, 0xFA, 0x21, 0x3D];
        if self.masked {
            wire.extend_from_slice(&key);
        }
        let start = wire.len();
        wire.extend_from_slice(&self.payload);
        if self.masked {
            ringcast_protocol::mask::apply_mask(&mut wire[start..], key, 0);
        }
    }
}

fn any_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => util::any_text(20).prop_map(String::into_bytes),
        2 => prop::collection::vec(any::<u8>(), 0..40),
        // A close payload: a code (often a valid one) and a reason.
        2 => (prop_oneof![1000u16..=1015, 2990u16..=3010, 4990u16..=5010, any::<u16>()],
              util::any_text(8))
            .prop_map(|(code, reason)| {
                let mut p = code.to_be_bytes().to_vec();
                p.extend_from_slice(reason.as_bytes());
                p
            }),
        1 => Just(vec![0x03]),
        1 => prop::collection::vec(any::<u8>(), 120..=130),
    ]
}

fn any_raw_frame() -> impl Strategy<Value = RawFrame> {
    let opcode = prop_oneof![
        8 => prop::sample::select(vec![0u8, 1, 2, 8, 9, 10]),
        1 => 0u8..16,
    ];
    let length = prop_oneof![
        12 => Just(None),
        1 => prop::sample::select(vec![126u64, 65_536, 1 << 40, u64::MAX]).prop_map(Some),
    ];
    (
        prop::bool::weighted(0.8),
        prop_oneof![9 => Just(0u8), 1 => 0u8..8],
        opcode,
        prop::bool::weighted(0.9),
        any_payload(),
        length,
    )
        .prop_map(|(fin, rsv, opcode, masked, payload, length)| RawFrame {
            fin,
            rsv,
            opcode,
            masked,
            payload,
            length,
        })
}

/// A valid upgrade request from the client side of this crate.
fn any_request() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<[u8; 16]>(),
        "[a-z0-9.-]{1,20}(:[0-9]{1,5})?",
        "/[a-zA-Z0-9/_.~-]{0,20}(\\?[a-z0-9=&]{0,10})?",
        prop::collection::vec("[a-z0-9.]{1,8}", 0..3),
        prop::collection::vec(("X-[A-Za-z-]{1,10}", "[ -~]{0,20}"), 0..3),
    )
        .prop_map(|(nonce, host, target, protocols, extra)| {
            let protocols: Vec<&str> = protocols.iter().map(String::as_str).collect();
            let extra: Vec<(&str, &str)> = extra
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            ClientHandshake::new(nonce, &protocols).request(&host, &target, &extra)
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(Index, usize),
    Insert(Index, u8),
    Replace(Index, u8),
    Flip(Index),
    DuplicateLine(Index),
}

fn any_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1usize..8).prop_map(|(i, n)| Mutation::Delete(i, n)),
        (
            any::<Index>(),
            prop::sample::select(b"\r\n: ,\t\x00\xFFaA".to_vec())
        )
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Replace(i, b)),
        any::<Index>().prop_map(Mutation::Flip),
        any::<Index>().prop_map(Mutation::DuplicateLine),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        if bytes.is_empty() {
            break;
        }
        match m {
            Mutation::Delete(i, n) => {
                let at = i.index(bytes.len());
                let end = (at + n).min(bytes.len());
                bytes.drain(at..end);
            }
            Mutation::Insert(i, b) => {
                let at = i.index(bytes.len() + 1);
                bytes.insert(at, *b);
            }
            Mutation::Replace(i, b) => {
                let at = i.index(bytes.len());
                bytes[at] = *b;
            }
            Mutation::Flip(i) => {
                // Case flips keep a request valid where names are case-insensitive.
                let at = i.index(bytes.len());
                bytes[at] ^= 0x20;
            }
            Mutation::DuplicateLine(i) => {
                let at = i.index(bytes.len());
                let start = bytes[..at]
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |p| p + 1);
                if let Some(len) = bytes[start..].iter().position(|&b| b == b'\n') {
                    let line = bytes[start..=start + len].to_vec();
                    bytes.splice(start..start, line);
                }
            }
        }
    }
    bytes
}

proptest! {
    #![proptest_config(util::config(1024))]

    #[test]
    fn header_entry_holds_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..80)) {
        entry::header(&data);
    }

    #[test]
    fn header_entry_holds_on_header_shaped_bytes(
        b0 in any::<u8>(),
        len in prop_oneof![0u8..=125, Just(126), Just(127)],
        masked in any::<bool>(),
        rest in prop::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut data = vec![b0, len | if masked { 0x80 } else { 0 }];
        data.extend(rest);
        entry::frame_header(&data);
    }

    #[test]
    fn utf8_entry_holds_on_arbitrary_bytes_and_pieces(
        data in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..40),
            util::any_text(16).prop_map(String::into_bytes),
        ],
        cut_indices in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        entry::utf8(&data, &util::cuts(&cut_indices, data.len()));
    }

    #[test]
    fn codec_entry_holds_on_arbitrary_bytes(
        data in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        entry::codec(&data);
    }

    /// Frames with random header fields (reserved bits and opcodes, wrong masking, fragmented
    /// or oversized controls, bad close codes, bad UTF-8, lying lengths), run through the codec
    /// entry in every role, limit set and buffer handling the control byte selects.
    #[test]
    fn codec_entry_holds_on_frame_soup(
        frames in prop::collection::vec(any_raw_frame(), 0..8),
        ctl in any::<u8>(),
        seed in any::<u8>(),
    ) {
        let mut data = vec![ctl, seed];
        for f in &frames {
            f.encode(&mut data);
        }
        entry::codec(&data);
    }

    #[test]
    fn handshake_entry_holds_on_arbitrary_bytes(
        data in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        entry::handshake(&data);
    }

    /// Valid requests are accepted; mutated ones go through the entry's checks (an accepted
    /// one must complete with a client, a refused one must map to its status).
    #[test]
    fn handshake_entry_holds_on_mutated_requests(
        request in any_request(),
        mutations in prop::collection::vec(any_mutation(), 0..4),
        ctl in any::<u8>(),
        trailing in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let len = HeadReader::new().poll_head(&request, 8192).unwrap();
        prop_assert_eq!(len, Some(request.len()));
        prop_assert!(UpgradeRequest::parse(&request).is_ok());
        let mut data = vec![ctl & !1];
        data.extend(mutate(request, &mutations));
        data.extend(trailing);
        entry::handshake(&data);
    }

    /// 101 responses for the entry's client, mutated, through `check_response`.
    #[test]
    fn client_response_entry_holds_on_mutated_responses(
        seed in any::<u8>(),
        protocol in prop::option::of(prop::sample::select(vec!["chat", "v2"])),
        mutations in prop::collection::vec(any_mutation(), 0..3),
    ) {
        let client = ClientHandshake::new([seed; 16], &["chat", "v2"]);
        let request = client.request("example.com", "/", &[]);
        let response = UpgradeRequest::parse(&request).unwrap().accept(protocol).unwrap();
        prop_assert_eq!(
            client.check_response(&response),
            Ok(protocol.map(str::to_owned))
        );
        entry::client_response(&mutate(response.to_vec(), &mutations), seed);
    }
}

/// Every header the encoder can produce goes through the header entry, and the codec entry sees
/// the same frame in each role and limit set.
#[test]
fn entries_hold_on_every_encoded_header_shape() {
    for opcode in [
        OpCode::Text,
        OpCode::Binary,
        OpCode::Continuation,
        OpCode::Ping,
    ] {
        for len in [0u64, 125, 126, 0xFFFF, 0x1_0000] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let header = FrameHeader {
                    fin: true,
                    rsv: 0,
                    opcode,
                    mask,
                    payload_len: len,
                };
                let (bytes, n) = header.to_array();
                entry::header(&bytes[..n]);
                for ctl in 0..16u8 {
                    let mut data = vec![ctl, 7];
                    data.extend_from_slice(&bytes[..n]);
                    data.extend(std::iter::repeat_n(b'a', 200));
                    entry::codec(&data);
                }
            }
        }
    }
}

/// The codec entry's obligations checks see each kind of failure at least once, so a codec that
/// stopped queueing its close would be caught (this test fails if the frame soup never reaches
/// an error path).
#[test]
fn codec_entry_reaches_each_failure() {
    let cases: &[(&[u8], Role)] = &[
        (b"\x81\x01x", Role::Server),                // unmasked
        (b"\x81\x81\0\0\0\0x", Role::Client),        // masked
        (b"\xC1\x81\0\0\0\0x", Role::Server),        // RSV1
        (b"\x83\x80\0\0\0\0", Role::Server),         // reserved opcode
        (b"\x09\x80\0\0\0\0", Role::Server),         // fragmented ping
        (b"\x80\x80\0\0\0\0", Role::Server),         // continuation with no message
        (b"\x88\x81\0\0\0\0\x03", Role::Server),     // one-byte close payload
        (b"\x88\x82\0\0\0\0\x03\xED", Role::Server), // close code 1005
        (b"\x81\x81\0\0\0\0\xFF", Role::Server),     // bad UTF-8
    ];
    for (wire, role) in cases {
        let outcome =
            entry::codec_whole_and_chunked(*role, Limits::default(), wire, &[1, 2, 3], true);
        assert!(outcome.error.is_some(), "{wire:?}");
        assert_eq!(outcome.transmits.len(), 1, "{wire:?}");
    }
    let mut big = BytesMut::new();
    ringcast_protocol::encode_frame(&mut big, true, OpCode::Binary, &[0; 17], Some([0; 4]));
    let outcome = entry::run_codec(
        Role::Server,
        Limits::default().with_max_frame_bytes(16),
        &big,
        &[],
        false,
    );
    assert!(matches!(
        outcome.error,
        Some(ringcast_protocol::ProtocolError::FrameTooLarge { size: 17, max: 16 })
    ));
}
