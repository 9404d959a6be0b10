//! Every envelope frame the engine builds itself (PROTOCOL.md), in one place: topic messages
//! in each delivery format, `reset` and `dropped` notices, the `shutdown` notice of a drain,
//! the answer to a publish the backend ordered later, and error replies with their retry hint.
//! The error code of a refused publish is
//! [`PublishError::error_code`](crate::PublishError::error_code). The built-in broker's own
//! replies (acks, pongs) are built in `broker.rs` from the protocol crate, as any handler's.

use std::time::Duration;

use bytes::Bytes;
use ringcast_protocol::{
    envelope::{self, DataKind, Dialect, Encoding, ErrorCode},
    server_frame, OpCode,
};

use crate::types::publish::{DeliveryFormat, Payload, PublishError, PublishReceipt};

/// A topic message's frame for `format`: the payload alone (raw) or the envelope's `message`.
pub(crate) fn message(format: DeliveryFormat, topic: &str, seq: u64, payload: &Payload) -> Bytes {
    match format {
        DeliveryFormat::Raw => match payload {
            Payload::Json(b) => server_frame(OpCode::Text, b),
            Payload::Text(t) => server_frame(OpCode::Text, t.as_bytes()),
            Payload::Binary(b) => server_frame(OpCode::Binary, b),
        },
        DeliveryFormat::Envelope(enc) => {
            let quoted;
            let (kind, bytes): (DataKind, &[u8]) = match payload {
                Payload::Json(b) => (DataKind::Json, b),
                Payload::Text(t) => {
                    quoted = json_string(t.as_str());
                    (DataKind::Json, &quoted)
                }
                Payload::Binary(b) => (DataKind::Binary, b),
            };
            envelope::message_frame(enc, topic, seq, envelope::Data::new(kind, bytes))
        }
    }
}

fn json_string(s: &str) -> Vec<u8> {
    // Serializing a str cannot fail.
    serde_json::to_vec(s).unwrap_or_default()
}

/// A `reset` notice: the subscriber's next message of `topic` is `oldest`, in `epoch`.
pub(crate) fn reset(d: Dialect, topic: &str, oldest: u64, epoch: u64) -> Bytes {
    envelope::reset_frame(d, topic, oldest, epoch)
}

/// A `dropped` notice: `count` messages of `topic` were dropped; the next is `next`.
pub(crate) fn dropped(enc: Encoding, topic: &str, count: u64, next: u64) -> Bytes {
    envelope::dropped_frame(enc, topic, count, next)
}

/// The `shutdown` notice sent before a drain's close 1012.
pub(crate) fn shutdown(enc: Encoding) -> Bytes {
    envelope::shutdown_frame(enc, "service restart")
}

/// The answer to a publish request the backend ordered later: its ack, or its error with
/// `retry` as the hint.
#[cfg_attr(
    not(feature = "redis"),
    allow(dead_code, reason = "only the Redis bridge answers publishes later")
)]
pub(crate) fn publish_reply(
    d: Dialect,
    id: Option<u64>,
    result: Result<PublishReceipt, PublishError>,
    retry: Option<Duration>,
) -> Bytes {
    match result {
        Ok(receipt) => envelope::publish_ack_frame(d, id, receipt.epoch, receipt.seq),
        Err(e) => error_frame(d, id, e.error_code(), &e.to_string(), retry),
    }
}

/// An envelope error reply (PROTOCOL.md, Errors) as the engine builds it: with
/// `retry_after_ms` (the hint rounded up to whole milliseconds, at least 1) when there is a
/// hint; binary v1 has no field for it. For a handler speaking the broker protocol, as
/// [`Broker`](crate::Broker) does.
pub fn error_frame(
    d: impl Into<Dialect>,
    id: Option<u64>,
    code: ErrorCode,
    message: &str,
    retry_after: Option<Duration>,
) -> Bytes {
    envelope::error_frame(d, id, code, message, retry_after.map(retry_ms))
}

/// A retry hint in whole milliseconds, rounded up, at least 1.
pub(crate) fn retry_ms(retry: Duration) -> u64 {
    u64::try_from(retry.as_micros().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .max(1)
}
