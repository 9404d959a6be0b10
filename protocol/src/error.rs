//! Errors of the protocol crate.
//!
//! Owns [`Error`] and its two families: [`ProtocolError`] (a peer broke RFC 6455 after the
//! upgrade; maps to a close code) and [`HandshakeError`] (the upgrade request or response was bad;
//! maps to an HTTP status). Nothing here performs IO.

use crate::close::CloseCode;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error this crate returns.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer broke the framing rules after the upgrade.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The upgrade request (server) or response (client) was not acceptable.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// A violation of RFC 6455 framing by the peer. The connection must be failed with
/// [`ProtocolError::close_code`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A frame had RSV1, RSV2 or RSV3 set while no extension was negotiated (§5.2); or RSV2
    /// or RSV3 with permessage-deflate, which only defines RSV1.
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    /// A control frame had RSV1 set: permessage-deflate never compresses control frames
    /// (RFC 7692 §6.1).
    #[error("RSV1 set on a control frame")]
    CompressedControl,
    /// A continuation frame had RSV1 set: only a message's first frame carries it
    /// (RFC 7692 §6.1).
    #[error("RSV1 set on a continuation frame")]
    CompressedContinuation,
    /// A compressed message was not valid deflate data (RFC 7692 §7.2.2).
    #[error("compressed message does not inflate")]
    InvalidDeflate,
    /// A frame used an opcode that RFC 6455 reserves (§5.2).
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// A client sent an unmasked frame to a server (§5.1).
    #[error("client frame is not masked")]
    UnmaskedFrame,
    /// A server sent a masked frame to a client (§5.1).
    #[error("server frame is masked")]
    MaskedFrame,
    /// A control frame had FIN clear (§5.5).
    #[error("fragmented control frame")]
    FragmentedControl,
    /// A control frame carried more than 125 bytes (§5.5).
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlTooLong(u64),
    /// A 64-bit payload length had its most significant bit set (§5.2).
    #[error("payload length has its most significant bit set")]
    InvalidLength,
    /// A continuation frame arrived with no fragmented message in progress (§5.4).
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// A text or binary frame arrived in the middle of a fragmented message (§5.4).
    #[error("new data frame while a fragmented message is unfinished")]
    ExpectedContinuation,
    /// A single frame was larger than [`Limits::max_frame_bytes`](crate::Limits).
    #[error("frame of {size} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// The length the frame header announced.
        size: u64,
        /// The configured limit.
        max: usize,
    },
    /// A message, summed over its fragments, was larger than
    /// [`Limits::max_message_bytes`](crate::Limits).
    #[error("message of at least {size} bytes exceeds the limit of {max}")]
    MessageTooLarge {
        /// The size reached when the limit was crossed.
        size: u64,
        /// The configured limit.
        max: usize,
    },
    /// A text message or a close reason was not valid UTF-8 (§5.6, §8.1).
    #[error("invalid UTF-8 in text payload")]
    InvalidUtf8,
    /// A close frame carried a one-byte payload (§5.5.1).
    #[error("close frame with a one-byte payload")]
    InvalidClosePayload,
    /// A close frame carried a code that may not be sent on the wire (§7.4).
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
}

impl ProtocolError {
    /// The close code to fail the connection with (RFC 6455 §7.4.1).
    pub fn close_code(&self) -> CloseCode {
        match self {
            Self::InvalidUtf8 | Self::InvalidDeflate => CloseCode::INVALID_PAYLOAD,
            Self::FrameTooLarge { .. } | Self::MessageTooLarge { .. } => CloseCode::TOO_BIG,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}

/// A failed upgrade. On the server side each maps to the HTTP status to answer with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The bytes were not a well-formed HTTP/1.1 message head.
    #[error("malformed HTTP head: {0}")]
    Malformed(&'static str),
    /// The head grew past the configured byte limit before it ended.
    #[error("request head exceeds {max} bytes")]
    HeadTooLarge {
        /// The configured limit.
        max: usize,
    },
    /// The head had more header lines than [`MAX_HEADERS`](crate::MAX_HEADERS).
    #[error("too many header lines")]
    TooManyHeaders,
    /// The request method was not GET (RFC 6455 §4.1).
    #[error("method {0} is not allowed; use GET")]
    MethodNotAllowed(String),
    /// The request was not HTTP/1.1 (RFC 6455 §4.1).
    #[error("HTTP/1.1 is required")]
    HttpVersion,
    /// The request had no Host header (RFC 6455 §4.1).
    #[error("missing Host header")]
    MissingHost,
    /// The request did not ask for `Upgrade: websocket`: a plain HTTP request.
    #[error("this endpoint speaks WebSocket only; send Upgrade: websocket")]
    NotWebSocket,
    /// The request's Connection header did not contain `upgrade`.
    #[error("Connection header must contain 'upgrade'")]
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Version` was missing or not 13 (RFC 6455 §4.4).
    #[error("unsupported WebSocket version; this server speaks 13")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` was missing, repeated, or did not decode to 16 bytes.
    #[error("Sec-WebSocket-Key must be 16 bytes in base64")]
    InvalidKey,
    /// The caller chose a subprotocol the client did not offer (RFC 6455 §4.2.2).
    #[error("subprotocol {0:?} was not offered by the client")]
    SubprotocolNotOffered(String),
    /// Client role: the server answered with a status other than 101.
    #[error("server answered {0} instead of 101")]
    Status(u16),
    /// Client role: the 101 response lacked `Upgrade: websocket` or `Connection: upgrade`.
    #[error("101 response lacks the upgrade headers")]
    MissingUpgradeHeaders,
    /// Client role: `Sec-WebSocket-Accept` did not match the key we sent.
    #[error("Sec-WebSocket-Accept does not match the key")]
    AcceptMismatch,
    /// Client role: the server selected a subprotocol we did not offer.
    #[error("server selected subprotocol {0:?} that was not offered")]
    UnexpectedSubprotocol(String),
    /// Client role: the server's `Sec-WebSocket-Extensions` answer is not one our offer allows
    /// (RFC 6455 §4.1, RFC 7692 §7.1).
    #[error("server's extension answer is not acceptable: {0}")]
    InvalidExtension(String),
}

impl HandshakeError {
    /// The HTTP status a server answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            Self::HeadTooLarge { .. } | Self::TooManyHeaders => 431,
            Self::MethodNotAllowed(_) => 405,
            Self::NotWebSocket | Self::UnsupportedVersion => 426,
            Self::SubprotocolNotOffered(_) => 500,
            Self::Status(_)
            | Self::MissingUpgradeHeaders
            | Self::AcceptMismatch
            | Self::UnexpectedSubprotocol(_)
            | Self::InvalidExtension(_) => 502,
            _ => 400,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_errors_map_to_rfc_close_codes() {
        assert_eq!(ProtocolError::InvalidUtf8.close_code().as_u16(), 1007);
        let big = ProtocolError::FrameTooLarge { size: 10, max: 5 };
        assert_eq!(big.close_code().as_u16(), 1009);
        assert_eq!(ProtocolError::ReservedBits.close_code().as_u16(), 1002);
        assert_eq!(ProtocolError::CompressedControl.close_code().as_u16(), 1002);
        assert_eq!(
            ProtocolError::CompressedContinuation.close_code().as_u16(),
            1002
        );
        assert_eq!(ProtocolError::InvalidDeflate.close_code().as_u16(), 1007);
    }

    #[test]
    fn handshake_errors_map_to_http_statuses() {
        assert_eq!(HandshakeError::HeadTooLarge { max: 1 }.status(), 431);
        assert_eq!(HandshakeError::UnsupportedVersion.status(), 426);
        assert_eq!(HandshakeError::NotWebSocket.status(), 426);
        assert_eq!(HandshakeError::InvalidKey.status(), 400);
        assert_eq!(
            HandshakeError::MethodNotAllowed("POST".into()).status(),
            405
        );
    }
}
