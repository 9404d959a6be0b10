//! Envelope frames the engine builds itself (PROTOCOL.md): error replies with their retry
//! hint. The error code of a refused publish is [`PublishError::error_code`](crate::PublishError::error_code).

use std::time::Duration;

use bytes::Bytes;
use ringcast_protocol::envelope::{self, Dialect, ErrorCode};

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
