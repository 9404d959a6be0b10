//! What publishing takes and answers: payloads, delivery formats, errors, receipts and the
//! counters of a topic and of the Redis bridge.

use std::time::Duration;

use bytes::Bytes;
use ringcast_protocol::{
    envelope::{Encoding, ErrorCode},
    Utf8Bytes,
};

/// What a published message carries.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Payload {
    /// The text of one JSON value. JSON subscribers get it as `data`, as is.
    Json(Bytes),
    /// Text that is not (necessarily) JSON. Envelope subscribers get it as a JSON string;
    /// raw subscribers as a text frame.
    Text(Utf8Bytes),
    /// Opaque bytes. JSON subscribers get them base64-encoded (`data_b64`).
    Binary(Bytes),
}

impl Payload {
    /// A JSON payload, checked to be one JSON value. Its nesting is checked when it is
    /// published, against the engine's `pubsub.max_json_depth` ([`PublishError::TooDeep`]):
    /// this constructor does not know the engine's config.
    ///
    /// # Errors
    /// [`PublishError::BadPayload`] if `json` is not valid JSON.
    pub fn json(json: impl Into<Bytes>) -> Result<Self, PublishError> {
        let json = json.into();
        serde_json::from_slice::<serde::de::IgnoredAny>(&json)
            .map_err(|_| PublishError::BadPayload)?;
        Ok(Payload::Json(json))
    }

    /// The payload's size in bytes.
    pub fn len(&self) -> usize {
        match self {
            Payload::Json(b) | Payload::Binary(b) => b.len(),
            Payload::Text(t) => t.as_bytes().len(),
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How a connection receives topic messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeliveryFormat {
    /// The payload alone, as a text or binary frame: no topic, no seq, no notices. For
    /// handlers that speak their own protocol (the broadcast benchmark server).
    Raw,
    /// The broker's envelope in the given encoding (PROTOCOL.md).
    Envelope(Encoding),
}

impl DeliveryFormat {
    pub(crate) fn index(self) -> usize {
        match self {
            DeliveryFormat::Raw => 0,
            DeliveryFormat::Envelope(Encoding::Json) => 1,
            DeliveryFormat::Envelope(Encoding::Binary) => 2,
        }
    }
}

/// The retry hint given with [`PublishError::Saturated`]: about the time a shard takes to
/// work through a batch of its inbox.
pub(crate) const SATURATED_RETRY: Duration = Duration::from_millis(100);

/// Why a publish was not made. Nothing was sequenced or delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The topic name breaks the topic rules (PROTOCOL.md).
    #[error("invalid topic name: {0}")]
    BadTopic(&'static str),
    /// The payload is larger than `pubsub.max_publish_bytes`.
    #[error("payload larger than pubsub.max_publish_bytes")]
    TooLarge,
    /// A JSON payload that is not valid JSON.
    #[error("payload is not valid JSON")]
    BadPayload,
    /// A JSON payload that nests arrays and objects deeper than `pubsub.max_json_depth`.
    #[error("payload nests arrays and objects deeper than pubsub.max_json_depth")]
    TooDeep,
    /// A shard with subscribers has twice `pubsub.max_pending_per_shard` deliveries waiting:
    /// slow down and retry.
    #[error("engine saturated: a shard's inbox is full")]
    Saturated,
    /// This connection spent its publish budget (`pubsub.publish_rate_per_sec`). The
    /// connection is not read until the budget allows the next publish;
    /// [`Ctx::retry_after`](crate::Ctx::retry_after) says when that is.
    #[error("publish rate limit exceeded")]
    RateLimited,
    /// The engine has stopped.
    #[error("engine stopped")]
    Stopped,
    /// The broker backend (Redis) cannot order the message now: it is unreachable, or did not
    /// answer within `broker.command_timeout`. When Redis went away after the publish was
    /// sent, the message may still have been sequenced; otherwise nothing was published.
    #[error("broker unavailable: the message could not be ordered")]
    Unavailable,
    /// The topic does not exist and the process holds `pubsub.max_topics` topics: nothing
    /// was published. Topics with no subscriber and no publish expire
    /// (`pubsub.topic_idle_timeout`), so a retry later may succeed.
    #[error("too many topics: the process holds pubsub.max_topics")]
    TooManyTopics,
}

impl PublishError {
    /// The error code this refusal gets on the wire (PROTOCOL.md, Errors): one mapping for
    /// the broker's immediate refusals and the Redis bridge's later ones.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            PublishError::BadTopic(_) => ErrorCode::BadTopic,
            PublishError::TooLarge => ErrorCode::TooLarge,
            PublishError::BadPayload | PublishError::TooDeep => ErrorCode::BadPayload,
            PublishError::RateLimited => ErrorCode::RateLimited,
            PublishError::TooManyTopics => ErrorCode::TooManyTopics,
            PublishError::Saturated | PublishError::Stopped | PublishError::Unavailable => {
                ErrorCode::Unavailable
            }
        }
    }
}

/// A publish that was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishReceipt {
    /// The sequence number the message got in its topic. 0 from [`Ctx::publish`] with the
    /// Redis backend: the message was handed to the Redis bridge, which assigns the seq
    /// later; a failure there is counted in the broker metrics (`publish_errors`).
    ///
    /// [`Ctx::publish`]: crate::Ctx::publish
    pub seq: u64,
    /// A shard with subscribers to the topic has more than `pubsub.max_pending_per_shard`
    /// deliveries waiting: the message is on its way, but a feed should slow down or shed.
    pub saturated: bool,
    /// The topic's epoch: names the numbering `seq` belongs to (PROTOCOL.md, Epochs). 0 with
    /// `seq` 0 (a publish the Redis bridge sequences later).
    pub epoch: u64,
}

/// Counters of one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicStats {
    /// The topic's epoch: changes whenever its numbering starts over (never 0).
    pub epoch: u64,
    /// The sequence number the next message will get (the first is 1).
    pub next_seq: u64,
    /// The oldest sequence number still in history, if any.
    pub oldest_held: Option<u64>,
    /// Messages in history.
    pub history_messages: usize,
    /// Shards with at least one subscriber.
    pub interested_shards: usize,
    /// Deliveries of this topic dropped by connections' overflow policies, all shards.
    pub dropped: u64,
}

/// The Redis bridge's state and counters, from
/// [`EngineHandle::broker_stats`](crate::EngineHandle::broker_stats). Only the Redis backend
/// (the `redis` feature) has them: without that feature they are never given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BrokerStats {
    /// Connected to Redis, with every local topic subscribed: publishes can be ordered.
    pub up: bool,
    /// Connection attempts after the first (each lost connection, each failed retry).
    pub reconnects: u64,
    /// Redis failures: refused connections, command errors and timeouts, lost connections.
    pub errors: u64,
    /// Publishes Redis sequenced for this host.
    pub publishes: u64,
    /// Publishes refused or failed: Redis away, an error or a timeout (each got
    /// `unavailable`).
    pub publish_errors: u64,
    /// Topic messages received from Redis and forwarded to shards.
    pub messages_in: u64,
    /// Messages fetched from history to fill a hole in a topic's stream (after a lost
    /// connection).
    pub repaired: u64,
    /// Messages neither received nor still in history when a hole was filled: subscribers
    /// got a `dropped` notice for them.
    pub lost: u64,
    /// Topic resets because Redis lost its data (a new epoch, seen while connected or on
    /// reconnect): one per local topic each time. Subscribers got a `reset` notice; acked
    /// messages of the old epoch they had not received are gone.
    pub resets: u64,
    /// The epoch of Redis's numbering, as this host last saw it (0 before it first
    /// connected).
    pub epoch: u64,
    /// Publish-to-receive lag of the latest message, in milliseconds, by Redis's clock at
    /// publish and this host's at receipt (clock skew between hosts adds to it).
    pub lag_ms: u64,
}
