//! # ringcast-protocol
//!
//! RFC 6455 WebSocket without IO: the upgrade handshake, frames, and the per-connection state
//! machine, for both roles, and the pub/sub broker's envelope carried inside the messages. Bytes
//! go in, events come out; events go in, bytes come out. There is no runtime, socket, thread or
//! clock here, so the same code runs inside the ringcast engine, its load generator, tests with
//! simulated time, and fuzzers.
//!
//! ## Driving a server connection, in order
//!
//! 1. Accumulate the request head until [`HeadReader::poll_head`] finds its end (or says 431).
//! 2. [`UpgradeRequest::parse`] it. On error, send [`error_response`] and close. Otherwise
//!    decide (auth, subprotocol) and send [`UpgradeRequest::accept`]'s 101.
//! 3. Make a [`Codec::server`]. For each read, append to a `BytesMut` and call
//!    [`Codec::poll_event`] until it returns `Ok(None)`.
//! 4. After each batch send [`Codec::poll_transmit`]'s frames (pongs, close echoes), then your
//!    own: [`server_frame`] encodes a message once into `Bytes` that any number of connections
//!    can share.
//! 5. When [`Codec::close_state`] is `Closed` or `Failed` and everything is flushed, close.
//!
//! ```
//! use bytes::BytesMut;
//! use ringcast_protocol::{
//!     server_frame, Codec, Event, HeadReader, Limits, OpCode, UpgradeRequest, ClientHandshake,
//! };
//!
//! // A client's request arrives (here made by the client side of this crate).
//! let client = ClientHandshake::new([1; 16], &[]);
//! let request = client.request("localhost", "/echo", &[]);
//! let len = HeadReader::new().poll_head(&request, 8192)?.expect("whole head");
//! let upgrade = UpgradeRequest::parse(&request[..len])?;
//! let response = upgrade.accept(None)?;
//! assert!(response.starts_with(b"HTTP/1.1 101"));
//!
//! // Then frames: a masked "hi" from the client.
//! let mut server = Codec::server(Limits::default());
//! let mut client_codec = Codec::client(Limits::default(), 7);
//! let mut wire = BytesMut::new();
//! client_codec.encode_frame(true, OpCode::Text, b"hi", &mut wire);
//! let Some(Event::Text(text)) = server.poll_event(&mut wire)? else { panic!() };
//! assert_eq!(text.as_str(), "hi");
//!
//! // Echo it: framed once, shareable.
//! let frame = server_frame(OpCode::Text, text.as_bytes());
//! assert_eq!(&frame[..], b"\x81\x02hi");
//! # Ok::<(), ringcast_protocol::Error>(())
//! ```
//!
//! ## The broker envelope
//!
//! [`envelope`] is what a ringcast broker and its clients say inside those messages: subscribe,
//! unsubscribe, publish and ping requests; messages with a per-topic `seq`, acks, errors and
//! notices back. Two encodings, picked by subprotocol
//! ([`envelope::Encoding::from_subprotocol`]): JSON in text frames and a compact binary layout
//! in binary frames. [`envelope::decode_request`] reads a request; [`envelope::message_frame`]
//! and its siblings write a whole server frame, ready to share like [`server_frame`]'s.
//! `PROTOCOL.md` in this crate is the wire reference.
//!
//! ## Features
//!
//! None. Masking uses a portable eight-bytes-at-a-time loop that the compiler vectorizes.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![deny(unsafe_op_in_unsafe_fn)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

// One public path per item. The codec core (frames, close codes, the state machine, the
// handshake, limits, UTF-8, errors) is used item by item, so it lives at the root and its
// modules are private. `envelope` and `mask` are families read through their module name
// (`envelope::message_frame`, `envelope::Request`, `mask::apply_mask_reference`), so they keep
// the module path and have no root re-export.
mod close;
mod codec;
pub mod deflate;
pub mod envelope;
mod error;
mod frame;
mod handshake;
mod limits;
pub mod mask;
mod utf8;

pub use close::{CloseCode, CloseFrame, ReconnectHint, MAX_REASON_BYTES};
pub use codec::{CloseState, Codec, Event, Role};
pub use error::{Error, HandshakeError, ProtocolError, Result};
pub use frame::{encode_frame, server_frame, FrameHeader, OpCode, MAX_HEADER_BYTES};
pub use handshake::{
    accept_key, error_response, http_response, reason_phrase, request_path, ClientHandshake,
    HeadReader, UpgradeRequest, MAX_HEADERS,
};
pub use limits::Limits;
pub use utf8::{InvalidUtf8, Utf8Bytes, Utf8Validator};
