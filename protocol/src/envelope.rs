//! The pub/sub broker's envelope: what clients send to the broker inside WebSocket messages
//! (subscribe, unsubscribe, publish, ping) and what the broker sends back (messages, acks,
//! errors and notices). `PROTOCOL.md` in this crate is the wire reference, byte for byte.
//!
//! Owns the two encodings, chosen per connection by WebSocket subprotocol: JSON in text frames
//! ([`JSON_SUBPROTOCOL`]) and a compact binary layout in binary frames ([`BINARY_SUBPROTOCOL`],
//! and [`BINARY_V2_SUBPROTOCOL`], whose acks, errors and resets carry more fields: see
//! [`Dialect`]); the topic rules ([`validate_topic`]); and the wire names of errors ([`ErrorCode`]). It does not
//! own topics, sequence numbers, history or delivery: the engine does, and this module only reads
//! and writes messages. No IO, no clock.
//!
//! Decoding borrows from the input wherever it can: a topic without escapes and a JSON payload are
//! slices of the message. Server messages are encoded straight into a complete frame
//! ([`message_frame`] and the other `*_frame` functions) in one buffer sized exactly in advance,
//! so a message encoded once can be queued to any number of connections.
//!
//! ```
//! use ringcast_protocol::envelope::{self, Data, Encoding, Request};
//!
//! let enc = Encoding::from_subprotocol("ringcast.v1.json").expect("ours");
//! let req = envelope::decode_request(enc, br#"{"type":"publish","id":3,"topic":"prices.BTC","data":{"p":1}}"#)?;
//! let Request::Publish { id, topic, payload } = req else { panic!() };
//! assert_eq!((id, &*topic, &*payload.bytes), (Some(3), "prices.BTC", &br#"{"p":1}"#[..]));
//!
//! // The broker sequences it and fans out one shared frame.
//! let frame = envelope::message_frame(enc, &topic, 42, payload);
//! assert_eq!(&frame[2..], br#"{"type":"message","topic":"prices.BTC","seq":42,"data":{"p":1}}"#);
//! # Ok::<(), envelope::DecodeError>(())
//! ```

use std::{borrow::Cow, fmt};

use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use bytes::{Buf, Bytes};

use crate::frame::{FrameHeader, OpCode, MAX_HEADER_BYTES};

mod binary;
mod json;

/// The subprotocol for the JSON encoding: one JSON object per text frame.
pub const JSON_SUBPROTOCOL: &str = "ringcast.v1.json";

/// The subprotocol for the binary encoding: one message per binary frame (`PROTOCOL.md`).
pub const BINARY_SUBPROTOCOL: &str = "ringcast.v1.bin";

/// The subprotocol for version 2 of the binary encoding: version 1 plus the epoch and seq in
/// acks, the epoch in resets and the retry hint in errors ([`Dialect::BinaryV2`]). Messages and
/// `dropped` notices are the same bytes in both versions.
pub const BINARY_V2_SUBPROTOCOL: &str = "ringcast.v2.bin";

/// The longest topic name, in bytes of UTF-8. The binary encoding stores a topic's length in
/// one byte.
pub const MAX_TOPIC_BYTES: usize = 255;

/// The largest epoch a server hands out: 2^53 - 1, the largest integer a JavaScript number
/// (an IEEE 754 double) holds exactly, so a browser can pass an epoch back in `since`
/// unchanged. Epochs are 1..=MAX_EPOCH; decoders accept any u64.
pub const MAX_EPOCH: u64 = (1 << 53) - 1;

/// The longest header of an unmasked (server) frame: 2 fixed bytes and 8 length bytes.
const SERVER_HEADER_MAX: usize = MAX_HEADER_BYTES - 4;

/// Which envelope encoding a connection speaks, fixed by the subprotocol agreed in the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// [`JSON_SUBPROTOCOL`]: JSON objects in text frames.
    Json,
    /// [`BINARY_SUBPROTOCOL`]: the binary layout in binary frames.
    Binary,
}

impl Encoding {
    /// The encoding a subprotocol name selects (exact, case-sensitive match), or `None` for a
    /// name that is not ours. Both binary versions select [`Encoding::Binary`]; see
    /// [`Dialect::from_subprotocol`] for the version.
    pub fn from_subprotocol(name: &str) -> Option<Self> {
        Dialect::from_subprotocol(name).map(Dialect::encoding)
    }

    /// The subprotocol name to select in the 101 response.
    pub const fn subprotocol(self) -> &'static str {
        match self {
            Self::Json => JSON_SUBPROTOCOL,
            Self::Binary => BINARY_SUBPROTOCOL,
        }
    }

    /// The frame opcode this encoding travels in: text for JSON, binary for binary.
    pub const fn opcode(self) -> OpCode {
        match self {
            Self::Json => OpCode::Text,
            Self::Binary => OpCode::Binary,
        }
    }
}

/// An encoding and the version of its replies: what a connection's subprotocol fixes.
///
/// Topic messages (and `dropped` notices) are the same in every dialect of an encoding, so they
/// take an [`Encoding`] and one frame serves every subscriber of that encoding. Acks, errors
/// and resets take a dialect: binary version 1 has no room for the fields added since
/// (epochs, seqs in acks, retry hints) and leaves them out, byte for byte as before; JSON and
/// binary version 2 carry them. Every function that takes a dialect also takes an [`Encoding`]
/// (binary meaning version 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// [`JSON_SUBPROTOCOL`]. Fields are added to JSON without a new version: clients ignore
    /// the fields they do not know.
    Json,
    /// [`BINARY_SUBPROTOCOL`]: the binary layout of version 1.
    BinaryV1,
    /// [`BINARY_V2_SUBPROTOCOL`]: version 1 plus the new fields of acks, errors and resets.
    BinaryV2,
}

impl Dialect {
    /// The dialect a subprotocol name selects (exact, case-sensitive match), or `None` for a
    /// name that is not ours.
    pub fn from_subprotocol(name: &str) -> Option<Self> {
        match name {
            JSON_SUBPROTOCOL => Some(Self::Json),
            BINARY_SUBPROTOCOL => Some(Self::BinaryV1),
            BINARY_V2_SUBPROTOCOL => Some(Self::BinaryV2),
            _ => None,
        }
    }

    /// The subprotocol name to select in the 101 response.
    pub const fn subprotocol(self) -> &'static str {
        match self {
            Self::Json => JSON_SUBPROTOCOL,
            Self::BinaryV1 => BINARY_SUBPROTOCOL,
            Self::BinaryV2 => BINARY_V2_SUBPROTOCOL,
        }
    }

    /// The encoding: what topic messages are framed in.
    pub const fn encoding(self) -> Encoding {
        match self {
            Self::Json => Encoding::Json,
            Self::BinaryV1 | Self::BinaryV2 => Encoding::Binary,
        }
    }
}

impl From<Encoding> for Dialect {
    /// JSON, or binary version 1.
    fn from(encoding: Encoding) -> Self {
        match encoding {
            Encoding::Json => Self::Json,
            Encoding::Binary => Self::BinaryV1,
        }
    }
}

/// What the `data` of a publish or message is. The broker never looks inside it beyond checking
/// that a JSON one is valid JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataKind {
    /// The text of exactly one JSON value. In the JSON encoding it is inlined as `"data"`.
    Json,
    /// Opaque bytes. In the JSON encoding they travel base64-encoded as `"data_b64"`.
    Binary,
}

/// The `data` of a publish or message, as it travels on the wire: its kind and its bytes.
///
/// This is the protocol's borrowed view; an embedder publishing through the engine passes the
/// engine's owned `ringcast::Payload` instead.
///
/// The bytes are borrowed from the decoded message where possible: always for the binary
/// encoding and for a JSON `"data"` value; a JSON `"data_b64"` value is decoded into an owned
/// buffer. A [`DataKind::Json`] value must hold one valid JSON value with no whitespace
/// around it: the decoders guarantee this, and encoders trust it (they inline the text as is).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Data<'a> {
    /// How the bytes are to be read.
    pub kind: DataKind,
    /// The bytes themselves.
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> Data<'a> {
    /// Data of `kind` borrowing `bytes`.
    pub const fn new(kind: DataKind, bytes: &'a [u8]) -> Self {
        Self {
            kind,
            bytes: Cow::Borrowed(bytes),
        }
    }

    /// JSON data: `text` must be one valid JSON value (not checked here).
    pub const fn json(text: &'a str) -> Self {
        Self::new(DataKind::Json, text.as_bytes())
    }

    /// Opaque binary data.
    pub const fn binary(bytes: &'a [u8]) -> Self {
        Self::new(DataKind::Binary, bytes)
    }

    /// The same data owning its bytes (copied if they were borrowed).
    pub fn into_owned(self) -> Data<'static> {
        Data {
            kind: self.kind,
            bytes: Cow::Owned(self.bytes.into_owned()),
        }
    }
}

/// One topic of a subscribe request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SubscribeTopic<'a> {
    /// The topic name (valid per [`validate_topic`] when it comes from [`decode_request`]).
    pub topic: Cow<'a, str>,
    /// Resume after this sequence number: replay `since + 1..` from history, then go live.
    /// `None` starts with the next message published.
    pub since: Option<u64>,
    /// The epoch `since` counts in (from an earlier ack or reset). When it is not the topic's
    /// current epoch, the numbering has restarted since: the server answers with a `reset` and
    /// replays from its oldest message. Only meaningful with `since` (the decoders reject it
    /// without).
    pub epoch: Option<u64>,
}

/// Where a topic stands: its epoch and a seq in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicPosition<'a> {
    /// The topic.
    pub topic: Cow<'a, str>,
    /// The topic's epoch: names one numbering of its seqs (never 0).
    pub epoch: u64,
    /// The topic's last assigned seq (0 when none yet).
    pub seq: u64,
}

/// What an ack reports beside its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AckPosition<'a> {
    /// Nothing: an unsubscribe, or a server (or binary version 1 connection) that does not say.
    Plain,
    /// A publish: where the message was ordered.
    Publish {
        /// The topic's epoch.
        epoch: u64,
        /// The message's seq.
        seq: u64,
    },
    /// A subscribe: each topic's epoch and last assigned seq, in request order. A subscription
    /// without `since` receives `seq + 1` or later first.
    Subscribe(Vec<TopicPosition<'a>>),
}

/// A request from a client, as the server decodes it.
///
/// Every request may carry an `id`, which the server echoes in the ack, error or pong it answers
/// with. Topics are borrowed from the input unless the JSON spelled them with escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// Subscribe to one or more topics (never zero when decoded).
    Subscribe {
        /// Echoed in the answer.
        id: Option<u64>,
        /// The topics, in request order, each with its resume point.
        topics: Vec<SubscribeTopic<'a>>,
    },
    /// Unsubscribe from one or more topics (never zero when decoded).
    Unsubscribe {
        /// Echoed in the answer.
        id: Option<u64>,
        /// The topics, in request order.
        topics: Vec<Cow<'a, str>>,
    },
    /// Publish one payload to one topic.
    Publish {
        /// Echoed in the answer.
        id: Option<u64>,
        /// The topic.
        topic: Cow<'a, str>,
        /// The payload: the wire's `data` or `data_b64` (a JSON one is valid JSON when decoded).
        payload: Data<'a>,
    },
    /// Ask for a pong (an application-level liveness check with an id, unlike a WebSocket ping).
    Ping {
        /// Echoed in the pong.
        id: Option<u64>,
    },
}

impl Request<'_> {
    /// The request's id, if it has one.
    pub const fn id(&self) -> Option<u64> {
        match self {
            Self::Subscribe { id, .. }
            | Self::Unsubscribe { id, .. }
            | Self::Publish { id, .. }
            | Self::Ping { id } => *id,
        }
    }
}

/// A message from the server, as a client decodes it ([`decode_server`]).
///
/// The `*_frame` functions encode each kind; [`encode_server`] encodes any of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage<'a> {
    /// A message published to a topic the client subscribes to.
    Message {
        /// The topic.
        topic: Cow<'a, str>,
        /// Its sequence number in the topic: strictly increasing by one per published message.
        seq: u64,
        /// The payload as published: the wire's `data` or `data_b64`.
        payload: Data<'a>,
    },
    /// A subscribe, unsubscribe or publish succeeded.
    Ack {
        /// The request's id.
        id: Option<u64>,
        /// The epochs and seqs the ack reports ([`AckPosition::Plain`] for none).
        position: AckPosition<'a>,
    },
    /// A request failed, or the connection is about to be closed for misbehaving.
    Error {
        /// The failed request's id, when it had one and it could be read.
        id: Option<u64>,
        /// The [`ErrorCode`] wire name. A string, so that a client can receive codes newer than
        /// itself; [`ErrorCode::from_wire`] reads the known ones.
        code: Cow<'a, str>,
        /// A short sentence for humans.
        message: Cow<'a, str>,
        /// Milliseconds until a retry may succeed (`rate_limited`, `unavailable`), if the
        /// server knows. Binary version 2 writes `None` (and `Some(0)`) as 0.
        retry_after_ms: Option<u64>,
    },
    /// A subscription's `since` was older than the history, or counted in another epoch, or the
    /// topic's numbering restarted under a live subscription: messages were lost before
    /// `oldest`, and delivery continues from `oldest`.
    Reset {
        /// The topic.
        topic: Cow<'a, str>,
        /// The oldest sequence number still held; the next message has this seq.
        oldest: u64,
        /// The topic's current epoch (never 0; binary version 2 writes `None` as 0).
        epoch: Option<u64>,
    },
    /// The client fell behind and `count` messages of the topic were not delivered to it.
    Dropped {
        /// The topic.
        topic: Cow<'a, str>,
        /// How many messages were skipped.
        count: u64,
        /// The seq of the next message the client will receive on this topic.
        next: u64,
    },
    /// The server is shutting down; a close frame follows.
    Shutdown {
        /// Why, for humans.
        reason: Cow<'a, str>,
    },
    /// The answer to a [`Request::Ping`].
    Pong {
        /// The ping's id.
        id: Option<u64>,
    },
}

/// Why a request failed: the wire names of errors, stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// `bad_request`: malformed message, missing field, wrong type, trailing or truncated bytes.
    BadRequest,
    /// `unknown_type`: the JSON `"type"` or the binary op is not one this server knows.
    UnknownType,
    /// `bad_topic`: a topic breaks the rules of [`validate_topic`].
    BadTopic,
    /// `bad_payload`: a payload marked JSON is not valid JSON, or `data_b64` is not base64.
    BadPayload,
    /// `too_many_subscriptions`: the connection's subscription limit would be exceeded.
    TooManySubscriptions,
    /// `rate_limited`: the connection spent its publish or subscribe budget; retry later.
    RateLimited,
    /// `forbidden`: the application does not allow this connection to do this.
    Forbidden,
    /// `unavailable`: the server cannot take the request now (saturated or stopping).
    Unavailable,
    /// `too_large`: the payload is larger than the server accepts.
    TooLarge,
    /// `not_subscribed`: an unsubscribe named a topic the connection is not subscribed to.
    NotSubscribed,
    /// `internal`: a bug or an unexpected condition in the server.
    Internal,
    /// `too_many_topics`: the server holds as many topics as it may; a request that would
    /// make a new one fails (topics that exist work as before).
    TooManyTopics,
}

impl ErrorCode {
    /// Every code, in declaration order.
    pub const ALL: [Self; 12] = [
        Self::BadRequest,
        Self::UnknownType,
        Self::BadTopic,
        Self::BadPayload,
        Self::TooManySubscriptions,
        Self::RateLimited,
        Self::Forbidden,
        Self::Unavailable,
        Self::TooLarge,
        Self::NotSubscribed,
        Self::Internal,
        Self::TooManyTopics,
    ];

    /// The snake_case wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::UnknownType => "unknown_type",
            Self::BadTopic => "bad_topic",
            Self::BadPayload => "bad_payload",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::RateLimited => "rate_limited",
            Self::Forbidden => "forbidden",
            Self::Unavailable => "unavailable",
            Self::TooLarge => "too_large",
            Self::NotSubscribed => "not_subscribed",
            Self::Internal => "internal",
            Self::TooManyTopics => "too_many_topics",
        }
    }

    /// The code with this wire name, or `None` for a name this version does not know.
    pub fn from_wire(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|code| code.as_str() == name)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message that could not be decoded. The server answers it with [`DecodeError::to_frame`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    /// The request's id, whenever it could be read (even from a message that fails later).
    pub id: Option<u64>,
    /// What kind of failure.
    pub code: ErrorCode,
    /// A short sentence naming the problem, such as `missing field "topic"`.
    pub message: String,
}

impl DecodeError {
    /// The error frame that answers the bad request.
    pub fn to_frame(&self, dialect: impl Into<Dialect>) -> Bytes {
        error_frame(dialect, self.id, self.code, &self.message, None)
    }
}

/// A decoding failure before the id is attached.
#[derive(Debug)]
struct Fail {
    code: ErrorCode,
    message: String,
}

impl Fail {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// A subscribe or unsubscribe naming more than `max` topics.
    fn too_many_topics(max: usize) -> Self {
        Self::new(
            ErrorCode::TooLarge,
            format!("request names more than {max} topics"),
        )
    }

    fn with_id(self, id: Option<u64>) -> DecodeError {
        DecodeError {
            id,
            code: self.code,
            message: self.message,
        }
    }
}

/// Checks a topic name: 1 to [`MAX_TOPIC_BYTES`] bytes of UTF-8, with no ASCII control
/// character (U+0000 to U+001F, U+007F) and no whitespace (`char::is_whitespace`, which covers
/// Unicode spaces and line breaks too). Anything else is allowed: dots, slashes, `*`, non-ASCII.
///
/// # Errors
/// A short sentence naming the first rule broken, such as `"topic contains whitespace"`. A
/// request that breaks it is answered with [`ErrorCode::BadTopic`].
pub fn validate_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        return Err("topic is empty");
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err("topic is longer than 255 bytes");
    }
    // Most topics are printable ASCII: one pass over the bytes settles them.
    if topic.bytes().all(|b| b.is_ascii_graphic()) {
        return Ok(());
    }
    for c in topic.chars() {
        if c.is_ascii_control() {
            return Err("topic contains an ASCII control character");
        }
        if c.is_whitespace() {
            return Err("topic contains whitespace");
        }
    }
    Ok(())
}

/// The deepest nesting of arrays and objects a JSON payload may have unless told otherwise
/// ([`DecodeOptions::max_json_depth`]): 64.
pub const DEFAULT_MAX_JSON_DEPTH: usize = 64;

/// The most topics one subscribe or unsubscribe may name unless told otherwise
/// ([`DecodeOptions::max_request_topics`]): 1,024.
pub const DEFAULT_MAX_REQUEST_TOPICS: usize = 1024;

/// What [`decode_request_with`] accepts beyond the wire format itself. A server sets these
/// from its configuration; [`decode_request`] uses the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DecodeOptions {
    /// The deepest nesting of arrays and objects a publish's JSON payload may have (`data`
    /// in JSON, a payload flagged JSON in binary): `{"a":[1]}` nests 2 deep, a scalar 0.
    /// Default [`DEFAULT_MAX_JSON_DEPTH`] (64). Deeper: [`ErrorCode::BadPayload`]. Parsers
    /// in other languages recurse per level (and many stop at a few hundred), so a server
    /// that forwarded such a payload would break its subscribers. Checked in one pass
    /// without recursion; free for a payload shorter than twice the limit or with no more
    /// opening brackets than it. A JSON request nesting deeper than one more level anywhere
    /// (any field) is refused before it is parsed, at the bracket past the limit, so the
    /// rest of it is never read (its `id` is kept if it came before).
    pub max_json_depth: usize,
    /// The most topics (entries, repeats included) one subscribe or unsubscribe may name.
    /// Default [`DEFAULT_MAX_REQUEST_TOPICS`] (1,024). More: [`ErrorCode::TooLarge`],
    /// found at the first entry past the limit (the rest is not read), so a request costs
    /// at most this many entries' work however long it is.
    pub max_request_topics: usize,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
            max_request_topics: DEFAULT_MAX_REQUEST_TOPICS,
        }
    }
}

impl DecodeOptions {
    /// Sets [`DecodeOptions::max_json_depth`].
    #[must_use]
    pub const fn max_json_depth(mut self, depth: usize) -> Self {
        self.max_json_depth = depth;
        self
    }

    /// Sets [`DecodeOptions::max_request_topics`].
    #[must_use]
    pub const fn max_request_topics(mut self, topics: usize) -> Self {
        self.max_request_topics = topics;
        self
    }
}

/// Decodes a client request from one message's payload (the text or binary frame's data),
/// with the default [`DecodeOptions`]: as [`decode_request_with`].
///
/// # Errors
/// As [`decode_request_with`].
pub fn decode_request(encoding: Encoding, input: &[u8]) -> Result<Request<'_>, DecodeError> {
    decode_request_with(encoding, input, DecodeOptions::default())
}

/// Decodes a client request from one message's payload (the text or binary frame's data).
///
/// A JSON request's unknown fields are ignored, and `null` counts as absent for `id` and `since`.
/// A JSON payload is the exact text of the `"data"` value, borrowed from `input`; a binary one
/// flagged JSON is checked to be valid JSON and trimmed of surrounding whitespace. Either is
/// checked against [`DecodeOptions::max_json_depth`].
///
/// # Errors
/// [`DecodeError`] with the request's id whenever it could be read (in JSON, an `id` seen before
/// a syntax error counts), and:
/// - [`ErrorCode::BadRequest`]: not JSON, not an object, a missing field or one of the wrong
///   type, `topic` and `topics` both present, no topic, a truncated binary field, trailing bytes.
/// - [`ErrorCode::UnknownType`]: an unknown `"type"` or binary op.
/// - [`ErrorCode::BadTopic`]: a topic that fails [`validate_topic`] (or is not UTF-8).
/// - [`ErrorCode::BadPayload`]: a binary payload flagged JSON that is not JSON, `data_b64`
///   that is not base64, or a JSON payload nested deeper than
///   [`DecodeOptions::max_json_depth`].
/// - [`ErrorCode::TooLarge`]: a subscribe or unsubscribe naming more topics than
///   [`DecodeOptions::max_request_topics`].
pub fn decode_request_with(
    encoding: Encoding,
    input: &[u8],
    options: DecodeOptions,
) -> Result<Request<'_>, DecodeError> {
    // A JSON request nesting deeper than its payload may (the object itself is one level)
    // is refused before it is parsed, at the bracket past the limit: the rest, however
    // long, is never read. Only the part before it is parsed, for the id.
    if encoding == Encoding::Json {
        let max = options.max_json_depth;
        if let Some(at) = depth_exceeded_at(input, max.saturating_add(1)) {
            let message = format!("data nests arrays and objects deeper than {max} levels");
            let id = json::read_id(&input[..at]);
            return Err(Fail::new(ErrorCode::BadPayload, message).with_id(id));
        }
    }
    let request = match encoding {
        Encoding::Json => json::decode_request(input, options.max_request_topics),
        Encoding::Binary => binary::decode_request(input, options.max_request_topics),
    }?;
    // A JSON request's `data` was checked with the whole request above (it sits one level
    // inside the object): only a binary request's JSON payload is left to check.
    if let Request::Publish { id, payload, .. } = &request {
        if encoding == Encoding::Binary
            && payload.kind == DataKind::Json
            && !json_depth_within(&payload.bytes, options.max_json_depth)
        {
            let max = options.max_json_depth;
            let message = format!("data nests arrays and objects deeper than {max} levels");
            return Err(Fail::new(ErrorCode::BadPayload, message).with_id(*id));
        }
    }
    Ok(request)
}

/// Whether the JSON text `json` nests arrays and objects at most `max_depth` deep
/// (`{"a":[1]}` nests 2 deep, a scalar 0); see [`DecodeOptions::max_json_depth`].
///
/// Meant for valid JSON (check that first): it counts brackets outside strings and does not
/// parse. It never recurses, so any depth is safe to check. A text shorter than
/// `2 * (max_depth + 1)` bytes, or with at most `max_depth` opening brackets anywhere, is
/// within at once (one vectorized count); any other is walked once, without branches per
/// byte when it has no backslash (string bounds are then the parity of the quotes).
pub fn json_depth_within(json: &[u8], max_depth: usize) -> bool {
    depth_exceeded_at(json, max_depth).is_none()
}

/// Where `json` first nests deeper than `max_depth`: an index at most 8 bytes past the
/// opening bracket that does it, or `None` when it never does (as [`json_depth_within`]).
fn depth_exceeded_at(json: &[u8], max_depth: usize) -> Option<usize> {
    // Every level costs an opening and a closing bracket.
    if json.len() < max_depth.saturating_add(1).saturating_mul(2) {
        return None;
    }
    if count_openers(json) <= max_depth {
        return None;
    }
    if json.contains(&b'\\') {
        depth_within_escaped(json, max_depth)
    } else {
        depth_within_unescaped(json, max_depth)
    }
}

/// What a byte is to the nesting count.
const OTHER: u8 = 0;
const OPEN: u8 = 1;
const CLOSE: u8 = 2;
const QUOTE: u8 = 3;
const BYTE_CLASS: [u8; 256] = {
    let mut class = [OTHER; 256];
    class[b'[' as usize] = OPEN;
    class[b'{' as usize] = OPEN;
    class[b']' as usize] = CLOSE;
    class[b'}' as usize] = CLOSE;
    class[b'"' as usize] = QUOTE;
    class
};

/// Opening brackets anywhere, strings included: an upper bound on the depth. `[` (0x5B) and
/// `{` (0x7B) are the only bytes that OR 0x20 maps to `{`; a count in `u8` lanes over chunks
/// of 255 bytes (which cannot overflow) is one the compiler vectorizes.
fn count_openers(json: &[u8]) -> usize {
    json.chunks(255)
        .map(|chunk| {
            let n = chunk
                .iter()
                .fold(0u8, |n, &b| n.wrapping_add(u8::from(b | 0x20 == b'{')));
            usize::from(n)
        })
        .sum()
}

/// The nesting check for text without a backslash: a quote always opens or closes a string,
/// so whether a byte is inside one is the parity of the quotes before it. Eight bytes at a
/// time (SWAR): a flag in the high bit of each byte for quotes and brackets, the quote parity
/// as a prefix XOR of the quote flags, and the depth moved by popcounts of the brackets
/// outside strings. A word is walked bracket by bracket only when its opening brackets could
/// pass the limit.
fn depth_within_unescaped(json: &[u8], max_depth: usize) -> Option<usize> {
    let max = i64::try_from(max_depth).unwrap_or(i64::MAX);
    let mut depth = 0i64;
    // All ones while the word boundary lies inside a string.
    let mut in_string = 0u64;
    let mut words = json.chunks_exact(8);
    let mut check = |word: [u8; 8]| -> bool {
        let w = u64::from_le_bytes(word);
        let folded = w | (LOW_BITS * 0x20); // `[` to `{`, `]` to `}`
        let quotes = byte_flags(w, b'"');
        let opens = byte_flags(folded, b'{');
        let closes = byte_flags(folded, b'}');
        if quotes | opens | closes == 0 {
            return true;
        }
        // Byte k's flag XORed into every later byte: set inside a string (and on the quote
        // that opens it, which is no bracket).
        let mut parity = quotes;
        parity ^= parity << 8;
        parity ^= parity << 16;
        parity ^= parity << 32;
        let inside = parity ^ in_string;
        in_string = if inside >> 63 != 0 { u64::MAX } else { 0 };
        let opens = opens & !inside;
        let closes = closes & !inside;
        if depth + i64::from(opens.count_ones()) <= max {
            depth += i64::from(opens.count_ones()) - i64::from(closes.count_ones());
            return true;
        }
        for byte in 0..8 {
            let flag = 0x80u64 << (8 * byte);
            if opens & flag != 0 {
                depth += 1;
                if depth > max {
                    return false;
                }
            } else if closes & flag != 0 {
                depth -= 1;
            }
        }
        true
    };
    let mut end = 0;
    for word in words.by_ref() {
        end += 8;
        let word: [u8; 8] = word.try_into().unwrap_or_default();
        if !check(word) {
            return Some(end);
        }
    }
    let mut last = [0u8; 8]; // NUL is neither a quote nor a bracket
    let rest = words.remainder();
    last[..rest.len()].copy_from_slice(rest);
    (!check(last)).then_some(json.len())
}

/// 0x01 in every byte.
const LOW_BITS: u64 = 0x0101_0101_0101_0101;

/// The high bit of byte `k` set where byte `k` of `w` equals `v`, and no other bit: exact (no
/// false positives), as the high bit is set only for a zero byte of `w ^ splat(v)`.
fn byte_flags(w: u64, v: u8) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let t = w ^ (LOW_BITS * u64::from(v));
    !(((t & !HIGH) + !HIGH) | t) & HIGH
}

/// The nesting check for text with backslashes: a walk that skips each string, escapes
/// included.
fn depth_within_escaped(json: &[u8], max_depth: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut bytes = json.iter();
    while let Some(&b) = bytes.next() {
        match BYTE_CLASS[usize::from(b)] {
            OPEN => {
                depth += 1;
                if depth > max_depth {
                    return Some(json.len() - bytes.len());
                }
            }
            CLOSE => depth = depth.saturating_sub(1),
            // Skip the string: brackets inside it do not nest.
            QUOTE => {
                while let Some(&c) = bytes.next() {
                    match c {
                        b'"' => break,
                        b'\\' => {
                            bytes.next();
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// Encodes a client request as a message payload (frame it as a client with
/// [`Codec::encode_frame`](crate::Codec::encode_frame) and [`Encoding::opcode`]).
///
/// Nothing is checked, so invalid requests can be sent on purpose. A subscribe with one topic is
/// written with `"topic"` in JSON, one with several with `"topics"`. In the binary encoding a
/// topic longer than [`MAX_TOPIC_BYTES`] cannot be represented and is written as an empty topic,
/// which the server rejects, rather than cut to a different topic.
pub fn encode_request(encoding: Encoding, req: &Request<'_>) -> Vec<u8> {
    let mut count = Counter(0);
    req.write(encoding, &mut count);
    let mut out = Vec::with_capacity(count.0);
    req.write(encoding, &mut out);
    out
}

/// Decodes a server message from one message's payload (the frame's data), for clients, tests
/// and the load generator. `dialect` is the one the server selected (an [`Encoding`] means
/// binary version 1).
///
/// Unknown fields are ignored. Topics are only required to be UTF-8: the client trusts the server
/// on topic rules.
///
/// # Errors
/// [`DecodeError`] as for [`decode_request`]: [`ErrorCode::BadRequest`] for a malformed message,
/// [`ErrorCode::UnknownType`] for an unknown type or op, [`ErrorCode::BadPayload`] for a payload
/// flagged JSON that is not JSON or bad base64.
pub fn decode_server(
    dialect: impl Into<Dialect>,
    input: &[u8],
) -> Result<ServerMessage<'_>, DecodeError> {
    match dialect.into() {
        Dialect::Json => json::decode_server(input),
        Dialect::BinaryV1 => binary::decode_server(input, binary::Version::V1),
        Dialect::BinaryV2 => binary::decode_server(input, binary::Version::V2),
    }
}

/// Encodes any server message as a complete frame: unmasked, FIN set, text for JSON and binary
/// for binary, in one buffer sized exactly. Clones of the result share it.
///
/// In the binary encoding a topic (or error code) longer than 255 bytes cannot be represented and
/// is written as empty; the engine only ever passes topics that passed [`validate_topic`].
/// Binary version 1 leaves out what it has no room for: an ack's position, an error's retry
/// hint and a reset's epoch.
pub fn encode_server(dialect: impl Into<Dialect>, msg: &ServerMessage<'_>) -> Bytes {
    let dialect = dialect.into();
    let encoding = dialect.encoding();
    let mut count = Counter(0);
    msg.write(dialect, &mut count);
    // The header goes right-aligned in the space reserved for the longest one, once the body's
    // length is known: one buffer, no copy of the body.
    let mut buf = Vec::with_capacity(SERVER_HEADER_MAX + count.0);
    buf.resize(SERVER_HEADER_MAX, 0);
    msg.write(dialect, &mut buf);
    let body_len = buf.len() - SERVER_HEADER_MAX;
    let (header, header_len) = FrameHeader::new(encoding.opcode(), body_len as u64).to_array();
    let start = SERVER_HEADER_MAX - header_len;
    buf[start..SERVER_HEADER_MAX].copy_from_slice(&header[..header_len]);
    let mut frame = Bytes::from(buf);
    frame.advance(start);
    frame
}

/// A topic message frame: `{"type":"message","topic":…,"seq":…,"data":…}` (or `"data_b64"` for
/// a binary payload), or binary op `0x81`. Encode once per published message and share it.
///
/// `payload` of [`DataKind::Json`] must be valid JSON: it is inlined unchecked.
pub fn message_frame(enc: Encoding, topic: &str, seq: u64, payload: Data<'_>) -> Bytes {
    encode_server(
        enc,
        &ServerMessage::Message {
            topic: Cow::Borrowed(topic),
            seq,
            payload,
        },
    )
}

/// The frame that acknowledges a request with nothing more to say (an unsubscribe):
/// `{"type":"ack","id":…}` (no `id` when `None`).
pub fn ack_frame(d: impl Into<Dialect>, id: Option<u64>) -> Bytes {
    encode_server(
        d,
        &ServerMessage::Ack {
            id,
            position: AckPosition::Plain,
        },
    )
}

/// The frame that acknowledges a publish: `{"type":"ack","id":…,"epoch":…,"seq":…}`, with the
/// topic's epoch and the message's seq. Binary version 1 writes a plain ack.
pub fn publish_ack_frame(d: impl Into<Dialect>, id: Option<u64>, epoch: u64, seq: u64) -> Bytes {
    encode_server(
        d,
        &ServerMessage::Ack {
            id,
            position: AckPosition::Publish { epoch, seq },
        },
    )
}

/// The frame that acknowledges a subscribe:
/// `{"type":"ack","id":…,"topics":[{"topic":…,"epoch":…,"seq":…},…]}`, one entry per topic in
/// request order with its epoch and last assigned seq. Binary version 1 writes a plain ack.
pub fn subscribe_ack_frame(
    d: impl Into<Dialect>,
    id: Option<u64>,
    topics: Vec<TopicPosition<'_>>,
) -> Bytes {
    encode_server(
        d,
        &ServerMessage::Ack {
            id,
            position: AckPosition::Subscribe(topics),
        },
    )
}

/// The frame that reports a failed request:
/// `{"type":"error","id":…,"code":"…","message":"…","retry_after_ms":…}` (no `id` when `None`,
/// no `retry_after_ms` when `None`). Give `retry_after_ms` (milliseconds until a retry may
/// succeed) with `rate_limited` and `unavailable`. Binary version 1 leaves the hint out.
pub fn error_frame(
    d: impl Into<Dialect>,
    id: Option<u64>,
    code: ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) -> Bytes {
    encode_server(
        d,
        &ServerMessage::Error {
            id,
            code: Cow::Borrowed(code.as_str()),
            message: Cow::Borrowed(message),
            retry_after_ms,
        },
    )
}

/// The notice that a subscription's `since` is older than the history or counted in another
/// epoch, or that a topic's numbering restarted: `{"type":"reset","topic":…,"oldest":…,"epoch":…}`,
/// where `oldest` is the oldest seq still held (the next one delivered) and `epoch` the topic's
/// current epoch. Binary version 1 leaves the epoch out.
pub fn reset_frame(d: impl Into<Dialect>, topic: &str, oldest: u64, epoch: u64) -> Bytes {
    encode_server(
        d,
        &ServerMessage::Reset {
            topic: Cow::Borrowed(topic),
            oldest,
            epoch: Some(epoch),
        },
    )
}

/// The notice that `count` messages of a topic were dropped for this client:
/// `{"type":"dropped","topic":…,"count":…,"next":…}`, where `next` is the seq of the next
/// message it will receive. Send it just before that message.
pub fn dropped_frame(enc: Encoding, topic: &str, count: u64, next: u64) -> Bytes {
    encode_server(
        enc,
        &ServerMessage::Dropped {
            topic: Cow::Borrowed(topic),
            count,
            next,
        },
    )
}

/// The notice that the server is shutting down: `{"type":"shutdown","reason":…}`.
pub fn shutdown_frame(enc: Encoding, reason: &str) -> Bytes {
    encode_server(
        enc,
        &ServerMessage::Shutdown {
            reason: Cow::Borrowed(reason),
        },
    )
}

/// The answer to a ping request: `{"type":"pong","id":…}` (no `id` when `None`).
pub fn pong_frame(enc: Encoding, id: Option<u64>) -> Bytes {
    encode_server(enc, &ServerMessage::Pong { id })
}

/// Where encoders write: a buffer, or a counter that sizes the buffer first.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
    fn put_base64(&mut self, data: &[u8]);

    fn put_u8(&mut self, byte: u8) {
        self.put(&[byte]);
    }

    fn put_u64_be(&mut self, n: u64) {
        self.put(&n.to_be_bytes());
    }
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }

    fn put_base64(&mut self, data: &[u8]) {
        let start = self.len();
        self.resize(start + base64_len(data.len()), 0);
        // Cannot fail: the room was sized by base64's own formula.
        let written = BASE64.encode_slice(data, &mut self[start..]).unwrap_or(0);
        self.truncate(start + written);
    }
}

/// Counts what would be written.
#[derive(Debug)]
struct Counter(usize);

impl Sink for Counter {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }

    fn put_base64(&mut self, data: &[u8]) {
        self.0 += base64_len(data.len());
    }
}

fn base64_len(n: usize) -> usize {
    // `None` only when the length overflows usize, which a slice's length cannot make it do.
    base64::encoded_len(n, true).unwrap_or(usize::MAX)
}

impl Request<'_> {
    fn write<S: Sink>(&self, encoding: Encoding, out: &mut S) {
        match encoding {
            Encoding::Json => json::write_request(self, out),
            Encoding::Binary => binary::write_request(self, out),
        }
    }
}

impl ServerMessage<'_> {
    fn write<S: Sink>(&self, dialect: Dialect, out: &mut S) {
        match dialect {
            Dialect::Json => json::write_server(self, out),
            Dialect::BinaryV1 => binary::write_server(self, out, binary::Version::V1),
            Dialect::BinaryV2 => binary::write_server(self, out, binary::Version::V2),
        }
    }
}

/// Decodes standard base64 (RFC 4648 §4, with padding).
fn decode_base64(text: &str) -> Result<Vec<u8>, Fail> {
    BASE64
        .decode(text)
        .map_err(|_| Fail::new(ErrorCode::BadPayload, "\"data_b64\" is not valid base64"))
}

/// A string for an error message: debug-quoted and cut to a few dozen characters.
fn shown(s: &str) -> String {
    const MAX: usize = 40;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}...", &s[..cut]),
        None => format!("{s:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written_len(enc: Dialect, msg: &ServerMessage<'_>) -> (usize, usize) {
        let mut count = Counter(0);
        msg.write(enc, &mut count);
        let mut out = Vec::new();
        msg.write(enc, &mut out);
        (count.0, out.len())
    }

    #[test]
    fn counted_length_is_the_written_length() {
        let topics = [
            "t",
            "a\"b\\c",
            "\u{1}\u{1f}\n\t",
            "κόσμε/𝄞",
            &"x".repeat(300),
        ];
        for enc in [Dialect::Json, Dialect::BinaryV1, Dialect::BinaryV2] {
            for topic in topics {
                for n in 0..6 {
                    let bytes = vec![0xA5; n];
                    let msgs = [
                        ServerMessage::Message {
                            topic: topic.into(),
                            seq: u64::MAX,
                            payload: Data::binary(&bytes),
                        },
                        ServerMessage::Message {
                            topic: topic.into(),
                            seq: 0,
                            payload: Data::json("[1,2]"),
                        },
                        ServerMessage::Error {
                            id: Some(10),
                            code: "bad_topic".into(),
                            message: topic.into(),
                            retry_after_ms: Some(250),
                        },
                        ServerMessage::Ack {
                            id: Some(1),
                            position: AckPosition::Publish {
                                epoch: u64::MAX,
                                seq: 7,
                            },
                        },
                        ServerMessage::Ack {
                            id: None,
                            position: AckPosition::Subscribe(vec![
                                TopicPosition {
                                    topic: topic.into(),
                                    epoch: 3,
                                    seq: 0,
                                },
                                TopicPosition {
                                    topic: "b".into(),
                                    epoch: 1,
                                    seq: 12_345_678,
                                },
                            ]),
                        },
                        ServerMessage::Reset {
                            topic: topic.into(),
                            oldest: 1,
                            epoch: Some(99),
                        },
                        ServerMessage::Dropped {
                            topic: topic.into(),
                            count: 9,
                            next: 10_000,
                        },
                        ServerMessage::Shutdown {
                            reason: topic.into(),
                        },
                    ];
                    for msg in &msgs {
                        let (counted, written) = written_len(enc, msg);
                        assert_eq!(counted, written, "{enc:?} {msg:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn frames_have_the_shortest_header_at_each_length_edge() {
        for len in [0usize, 100, 125, 126, 0xFFFF, 0x1_0000] {
            let bytes = vec![7u8; len];
            let frame = message_frame(Encoding::Binary, "t", 1, Data::binary(&bytes));
            let (header, used) = FrameHeader::parse(&frame).unwrap().unwrap();
            assert_eq!(used, header.encoded_len());
            assert_eq!(header.payload_len as usize, frame.len() - used);
            assert!(header.fin && header.mask.is_none() && header.rsv == 0);
        }
    }

    #[test]
    fn topic_rules() {
        assert_eq!(validate_topic("prices.BTC"), Ok(()));
        assert_eq!(validate_topic("κόσμε/*/#"), Ok(()));
        assert_eq!(validate_topic(&"a".repeat(255)), Ok(()));
        assert_eq!(validate_topic(""), Err("topic is empty"));
        assert_eq!(
            validate_topic(&"a".repeat(256)),
            Err("topic is longer than 255 bytes")
        );
        for bad in ["a\tb", "a\u{0}", "\u{7f}", "x\n"] {
            assert_eq!(
                validate_topic(bad),
                Err("topic contains an ASCII control character")
            );
        }
        for bad in ["a b", "a\u{a0}b", "a\u{2028}", "\u{3000}"] {
            assert_eq!(validate_topic(bad), Err("topic contains whitespace"));
        }
    }

    #[test]
    fn error_codes_round_trip_their_wire_names() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_wire(code.as_str()), Some(code));
            assert_eq!(code.to_string(), code.as_str());
        }
        assert_eq!(ErrorCode::from_wire("nope"), None);
    }

    #[test]
    fn shown_cuts_long_strings_on_a_char_boundary() {
        assert_eq!(shown("ab"), "\"ab\"");
        let long = "é".repeat(100);
        assert_eq!(shown(&long), format!("{:?}...", "é".repeat(40)));
    }
}
