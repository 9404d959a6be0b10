//! Envelope frames the engine builds itself (PROTOCOL.md): error replies with their retry
//! hint.

use std::time::Duration;

use bytes::Bytes;
use ringcast_protocol::envelope::{self, Dialect, ErrorCode};

use crate::types::publish::PublishError;

/// The error code a refused publish gets on the wire (PROTOCOL.md, Errors): one mapping for
/// the broker's immediate refusals and the Redis bridge's later ones.
pub(crate) fn publish_error_code(e: PublishError) -> ErrorCode {
    match e {
        PublishError::BadTopic(_) => ErrorCode::BadTopic,
        PublishError::TooLarge => ErrorCode::TooLarge,
        PublishError::BadPayload => ErrorCode::BadPayload,
        PublishError::RateLimited => ErrorCode::RateLimited,
        PublishError::Saturated | PublishError::Stopped | PublishError::Unavailable => {
            ErrorCode::Unavailable
        }
    }
}

/// An error reply, with `retry_after_ms` (rounded up to whole milliseconds, at least 1) when
/// there is a hint (binary v1 has no field for it).
pub(crate) fn error_frame(
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
