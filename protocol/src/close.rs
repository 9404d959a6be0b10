//! Close codes (RFC 6455 §7.4) and close frames.
//!
//! Owns which codes may travel on the wire and what each one tells a client about reconnecting.
//! It does not decide when to close: that is the codec's and the engine's business.

use std::fmt;

use crate::{error::ProtocolError, utf8::Utf8Bytes};

/// A WebSocket close status code.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(u16);

impl CloseCode {
    /// 1000: the purpose of the connection was fulfilled.
    pub const NORMAL: Self = Self(1000);
    /// 1001: the endpoint is going away (server shutdown, page navigation).
    pub const GOING_AWAY: Self = Self(1001);
    /// 1002: the peer broke the protocol.
    pub const PROTOCOL_ERROR: Self = Self(1002);
    /// 1003: the endpoint cannot accept this kind of data.
    pub const UNSUPPORTED_DATA: Self = Self(1003);
    /// 1005: reported locally when a close frame had no code. Never sent.
    pub const NO_STATUS: Self = Self(1005);
    /// 1006: reported locally when the connection dropped without a close frame. Never sent.
    pub const ABNORMAL: Self = Self(1006);
    /// 1007: a message's data was inconsistent with its type (bad UTF-8 in text).
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// 1008: a policy was violated (budgets, slow consumer, auth).
    pub const POLICY: Self = Self(1008);
    /// 1009: a message was too big to process.
    pub const TOO_BIG: Self = Self(1009);
    /// 1010: the client expected an extension the server did not negotiate.
    pub const MANDATORY_EXTENSION: Self = Self(1010);
    /// 1011: the server hit an unexpected condition.
    pub const INTERNAL_ERROR: Self = Self(1011);
    /// 1012: the service is restarting; reconnect after a pause.
    pub const SERVICE_RESTART: Self = Self(1012);
    /// 1013: try again later (overload).
    pub const TRY_AGAIN_LATER: Self = Self(1013);
    /// 1014: a gateway or proxy got an invalid answer upstream.
    pub const BAD_GATEWAY: Self = Self(1014);

    /// Wraps a raw code without checking it.
    pub const fn new(code: u16) -> Self {
        Self(code)
    }

    /// The numeric code.
    pub const fn as_u16(self) -> u16 {
        self.0
    }

    /// Whether the code may appear in a close frame on the wire (RFC 6455 §7.4.1 and §7.4.2,
    /// plus the IANA registrations 1012 to 1014). 1005, 1006 and 1015 are local-only; 1004 and
    /// everything below 1000, in 1016..=2999, or above 4999 is reserved or undefined.
    pub const fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }

    /// What a client should do after a close with this code.
    pub const fn reconnect_hint(self) -> ReconnectHint {
        match self.0 {
            // Done, or the client sent something it will send again.
            1000 | 1002 | 1003 | 1007 | 1009 | 1010 => ReconnectHint::DoNotReconnect,
            // A policy (budget, slow consumer), a server fault, a restart or overload: coming
            // straight back would meet the same condition.
            1008 | 1011 | 1012 | 1013 => ReconnectHint::AfterBackoff,
            _ => ReconnectHint::Reconnect,
        }
    }
}

impl fmt::Debug for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CloseCode({})", self.0)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        Self(code)
    }
}

/// Whether a client should reconnect after a close, derived from the close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReconnectHint {
    /// Reconnecting would hit the same failure: fix the client or stop.
    DoNotReconnect,
    /// Reconnect, with the usual jittered backoff.
    Reconnect,
    /// The server is restarting or overloaded: reconnect after a longer, jittered pause.
    AfterBackoff,
}

/// The payload of a close frame: a code and a UTF-8 reason of at most 123 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The close code.
    pub code: CloseCode,
    /// Why the connection is closing, for people reading logs.
    pub reason: Utf8Bytes,
}

/// The longest reason that fits a control frame next to the 2-byte code (§5.5).
pub const MAX_REASON_BYTES: usize = 123;

impl CloseFrame {
    /// Builds a close frame, cutting the reason at a character boundary to fit 123 bytes.
    pub fn new(code: CloseCode, reason: &str) -> Self {
        Self {
            code,
            reason: Utf8Bytes::from(fit_reason(reason).to_owned()),
        }
    }

    /// Parses a close frame payload (§5.5.1). An empty payload is `Ok(None)`.
    ///
    /// # Errors
    /// A one-byte payload, a code not valid on the wire, or a reason that is not UTF-8.
    pub fn parse(payload: &bytes::Bytes) -> Result<Option<Self>, ProtocolError> {
        match payload.len() {
            0 => Ok(None),
            1 => Err(ProtocolError::InvalidClosePayload),
            _ => {
                let code = CloseCode(u16::from_be_bytes([payload[0], payload[1]]));
                if !code.is_valid_on_wire() {
                    return Err(ProtocolError::InvalidCloseCode(code.0));
                }
                let reason = Utf8Bytes::try_from(payload.slice(2..))
                    .map_err(|_| ProtocolError::InvalidUtf8)?;
                Ok(Some(Self { code, reason }))
            }
        }
    }

    /// The payload bytes of this close frame: the code in network order, then the reason. The
    /// fields are public, so the reason may be longer than a control frame allows; it is cut at
    /// a character boundary to [`MAX_REASON_BYTES`] here, as in [`CloseFrame::new`].
    pub fn to_payload(&self) -> Vec<u8> {
        let reason = fit_reason(self.reason.as_str());
        let mut out = Vec::with_capacity(2 + reason.len());
        out.extend_from_slice(&self.code.0.to_be_bytes());
        out.extend_from_slice(reason.as_bytes());
        out
    }
}

/// The longest prefix of `reason` that ends on a character boundary and fits a close frame
/// (§5.5).
fn fit_reason(reason: &str) -> &str {
    let mut end = reason.len().min(MAX_REASON_BYTES);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_validity_matches_rfc_and_iana() {
        for ok in [
            1000, 1001, 1002, 1003, 1007, 1011, 1012, 1014, 3000, 3999, 4000, 4999,
        ] {
            assert!(CloseCode(ok).is_valid_on_wire(), "{ok} should be valid");
        }
        for bad in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(
                !CloseCode(bad).is_valid_on_wire(),
                "{bad} should be invalid"
            );
        }
    }

    #[test]
    fn reason_is_cut_at_a_char_boundary() {
        let long = "é".repeat(100); // 200 bytes
        let frame = CloseFrame::new(CloseCode::NORMAL, &long);
        assert!(frame.reason.len() <= MAX_REASON_BYTES);
        assert_eq!(frame.reason.len() % 2, 0);
    }

    #[test]
    fn parse_rejects_bad_payloads() {
        use bytes::Bytes;
        assert_eq!(CloseFrame::parse(&Bytes::new()), Ok(None));
        assert_eq!(
            CloseFrame::parse(&Bytes::from_static(&[3])),
            Err(ProtocolError::InvalidClosePayload)
        );
        assert_eq!(
            CloseFrame::parse(&Bytes::from_static(&[0x03, 0xEC])),
            Err(ProtocolError::InvalidCloseCode(1004))
        );
        assert_eq!(
            CloseFrame::parse(&Bytes::from_static(&[0x03, 0xE8, 0xFF])),
            Err(ProtocolError::InvalidUtf8)
        );
        let ok = CloseFrame::parse(&Bytes::from_static(b"\x03\xE8bye"))
            .unwrap()
            .unwrap();
        assert_eq!(ok.code, CloseCode::NORMAL);
        assert_eq!(ok.reason.as_str(), "bye");
    }

    #[test]
    fn reconnect_hints_follow_the_code() {
        assert_eq!(
            CloseCode::SERVICE_RESTART.reconnect_hint(),
            ReconnectHint::AfterBackoff
        );
        assert_eq!(
            CloseCode::POLICY.reconnect_hint(),
            ReconnectHint::AfterBackoff
        );
        assert_eq!(
            CloseCode::INVALID_PAYLOAD.reconnect_hint(),
            ReconnectHint::DoNotReconnect
        );
        assert_eq!(
            CloseCode::GOING_AWAY.reconnect_hint(),
            ReconnectHint::Reconnect
        );
    }
}
