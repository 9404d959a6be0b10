//! What a handler sees of one connection: the upgrade decision, messages, the send status,
//! close information, pre-encoded shared frames and subscription answers. Plain data: no
//! logic depends on the layers above.

use std::net::SocketAddr;

use bytes::Bytes;
use ringcast_protocol::{server_frame, CloseCode, OpCode, Utf8Bytes};

use crate::{config::CompressionMode, types::ids::ShardId};

/// Facts about a connection being upgraded, beside the request itself.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeCtx {
    pub(crate) peer: SocketAddr,
    pub(crate) shard: ShardId,
}

impl UpgradeCtx {
    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The shard that will own the connection.
    pub fn shard(&self) -> ShardId {
        self.shard
    }
}

/// The handler's answer to an upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Upgrade {
    /// Complete the upgrade, optionally selecting one of the offered subprotocols. Selecting one
    /// the client did not offer is a bug in the handler: the client gets a 500.
    Accept {
        /// The subprotocol to answer with.
        subprotocol: Option<String>,
        /// Who the client is (set with [`Upgrade::with_user`]): counted against
        /// `admission.max_connections_per_user` and readable as
        /// [`ConnInfo::user`](crate::ConnInfo::user).
        user: Option<String>,
        /// permessage-deflate for this connection (set with [`Upgrade::with_compression`]);
        /// `None` keeps `compression.mode` from the config.
        compression: Option<CompressionMode>,
    },
    /// Refuse with an HTTP status and a plain-text body, then close.
    Reject {
        /// The HTTP status (401, 403, 429, 503, ...).
        status: u16,
        /// The body, for people reading it.
        body: String,
        /// Extra response headers (for example `Retry-After`).
        headers: Vec<(String, String)>,
    },
}

impl Upgrade {
    /// Accept with no subprotocol.
    pub fn accept() -> Self {
        Self::Accept {
            subprotocol: None,
            user: None,
            compression: None,
        }
    }

    /// Accept, selecting `subprotocol`.
    pub fn accept_subprotocol(subprotocol: impl Into<String>) -> Self {
        Self::Accept {
            subprotocol: Some(subprotocol.into()),
            user: None,
            compression: None,
        }
    }

    /// Names the user an acceptance is for; a rejection is returned unchanged.
    #[must_use]
    pub fn with_user(mut self, id: impl Into<String>) -> Self {
        if let Self::Accept { user, .. } = &mut self {
            *user = Some(id.into());
        }
        self
    }

    /// Chooses permessage-deflate's mode for an acceptance, overriding `compression.mode`
    /// (for example `Off` for a client whose traffic does not compress); a rejection is
    /// returned unchanged. The client still has to offer the extension.
    #[must_use]
    pub fn with_compression(mut self, mode: CompressionMode) -> Self {
        if let Self::Accept { compression, .. } = &mut self {
            *compression = Some(mode);
        }
        self
    }

    /// Refuse with `status` and `body`.
    pub fn reject(status: u16, body: impl Into<String>) -> Self {
        Self::Reject {
            status,
            body: body.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a response header to a rejection; an acceptance is returned unchanged.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        if let Self::Reject { headers, .. } = &mut self {
            headers.push((name.into(), value.into()));
        }
        self
    }
}

/// A whole WebSocket message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message (valid UTF-8).
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
}

impl Message {
    /// A text message.
    pub fn text(text: impl Into<Utf8Bytes>) -> Self {
        Self::Text(text.into())
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Self::Binary(data.into())
    }

    /// The payload bytes.
    pub fn payload(&self) -> &Bytes {
        match self {
            Self::Text(t) => t.as_bytes(),
            Self::Binary(b) => b,
        }
    }

    pub(crate) fn opcode(&self) -> OpCode {
        match self {
            Self::Text(_) => OpCode::Text,
            Self::Binary(_) => OpCode::Binary,
        }
    }
}

/// A message encoded once as a complete server frame. Sending it to many connections queues
/// the same bytes to each (a reference-count increment, not a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame(pub(crate) Bytes);

impl Frame {
    /// Encodes `msg`.
    pub fn new(msg: &Message) -> Self {
        Self(server_frame(msg.opcode(), msg.payload()))
    }

    /// Encodes a text message.
    pub fn text(text: &str) -> Self {
        Self(server_frame(OpCode::Text, text.as_bytes()))
    }

    /// Encodes a binary message.
    pub fn binary(data: &[u8]) -> Self {
        Self(server_frame(OpCode::Binary, data))
    }

    /// The frame's size on the wire, in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the frame is empty (never true for an encoded frame).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What happened to a message handed to a send method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a send can drop the message or close the connection"]
#[non_exhaustive]
pub enum Enqueue {
    /// Queued; it will be written in order.
    Queued,
    /// Not queued: the outbound queue was full and the policy is to drop (counted).
    Dropped,
    /// Not queued: the outbound queue was full and the connection is being closed with 1008.
    Disconnect,
    /// Not queued: the connection is closing, closed, or the id is stale.
    Closed,
}

/// Who ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseInitiator {
    /// The peer sent a close frame first.
    Peer,
    /// This side closed: the handler, a protocol failure, a limit, or shutdown.
    Server,
    /// The TCP connection ended without a completed closing handshake (code 1006).
    Transport,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseInfo {
    /// The close code: sent or received, 1005 for a close frame without code, 1006 if the
    /// connection dropped.
    pub code: CloseCode,
    /// The reason that came with it.
    pub reason: String,
    /// Who started it.
    pub initiator: CloseInitiator,
}

/// A subscription that was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Subscribed {
    /// The first seq the subscriber gets live (after any replay).
    pub live_from: u64,
    /// Messages replayed from history (queued on the data ring after this returns).
    pub replayed: u64,
    /// `since` was older than the topic's history, or newer than anything published, or
    /// counted in another epoch: the client will next see this seq (tell it with a `reset`
    /// notice carrying [`Subscribed::epoch`]). With the Redis backend the answer comes later,
    /// and the engine sends the notice itself.
    pub reset: Option<u64>,
    /// The topic's epoch: the numbering its seqs belong to (PROTOCOL.md, Epochs). With the
    /// Redis backend, the epoch the bridge last saw (0 before it first reached Redis).
    pub epoch: u64,
    /// The topic's last assigned seq (0 if none yet): the subscriber's first live message is
    /// `seq + 1` or later. With the Redis backend, the last this host has seen of it.
    pub seq: u64,
}

/// Why a subscription was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The topic name breaks the topic rules.
    #[error("invalid topic name: {0}")]
    BadTopic(&'static str),
    /// The connection has `pubsub.max_subscriptions_per_connection` subscriptions.
    #[error("too many subscriptions on this connection")]
    TooManySubscriptions,
    /// The topic does not exist and the process holds `pubsub.max_topics` topics.
    #[error("too many topics: the process holds pubsub.max_topics")]
    TooManyTopics,
}
