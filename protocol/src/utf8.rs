//! UTF-8 for text messages: an incremental validator and a validated `Bytes` wrapper.
//!
//! Owns validation across fragment (and partial frame) boundaries: the unfinished code point at
//! the end of one piece is carried into the next, and an invalid sequence is reported as soon as
//! its first impossible byte arrives (RFC 6455 §8.1 "fail fast"). The byte checks themselves are
//! std's `str::from_utf8`; this module only stitches pieces together.

use std::{fmt, ops::Deref};

use bytes::Bytes;

/// A UTF-8 error: the bytes seen so far can never become valid text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidUtf8;

/// Validates UTF-8 fed in pieces of any size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Utf8Validator {
    /// Bytes of a code point that started in an earlier piece and is not finished yet.
    partial: [u8; 4],
    partial_len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub const fn new() -> Self {
        Self {
            partial: [0; 4],
            partial_len: 0,
        }
    }

    /// Validates the next piece of the text.
    ///
    /// # Errors
    /// [`InvalidUtf8`] as soon as the bytes so far cannot be the prefix of valid UTF-8.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), InvalidUtf8> {
        if self.partial_len > 0 {
            let have = usize::from(self.partial_len);
            let need = sequence_len(self.partial[0]).ok_or(InvalidUtf8)?;
            let take = (need - have).min(input.len());
            let mut cp = self.partial;
            cp[have..have + take].copy_from_slice(&input[..take]);
            match std::str::from_utf8(&cp[..have + take]) {
                Ok(_) => {
                    self.partial_len = 0;
                    input = &input[take..];
                }
                Err(e) if e.error_len().is_some() => return Err(InvalidUtf8),
                Err(_) => {
                    // Still a valid prefix and the piece is used up.
                    self.partial = cp;
                    self.partial_len = (have + take) as u8;
                    return Ok(());
                }
            }
        }
        match std::str::from_utf8(input) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(InvalidUtf8),
            Err(e) => {
                let rest = &input[e.valid_up_to()..];
                self.partial[..rest.len()].copy_from_slice(rest);
                self.partial_len = rest.len() as u8;
                Ok(())
            }
        }
    }

    /// Ends the message.
    ///
    /// # Errors
    /// [`InvalidUtf8`] if the text stopped in the middle of a code point.
    pub fn finish(&mut self) -> Result<(), InvalidUtf8> {
        let unfinished = self.partial_len != 0;
        *self = Self::new();
        if unfinished {
            Err(InvalidUtf8)
        } else {
            Ok(())
        }
    }
}

/// The length of the sequence a leading byte starts, or `None` if it cannot lead one.
fn sequence_len(lead: u8) -> Option<usize> {
    match lead {
        0x00..=0x7F => Some(1),
        0xC2..=0xDF => Some(2),
        0xE0..=0xEF => Some(3),
        0xF0..=0xF4 => Some(4),
        _ => None,
    }
}

/// `Bytes` known to hold valid UTF-8: a text message's payload, shared without copying.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Utf8Bytes(Bytes);

impl Utf8Bytes {
    /// An empty string.
    pub const fn new() -> Self {
        Self(Bytes::new())
    }

    /// A string from a static.
    pub const fn from_static(s: &'static str) -> Self {
        Self(Bytes::from_static(s.as_bytes()))
    }

    /// Wraps bytes the caller has already validated, for the codec's own use.
    pub(crate) fn from_validated(bytes: Bytes) -> Self {
        debug_assert!(std::str::from_utf8(&bytes).is_ok());
        Self(bytes)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor validates the bytes or takes them from a `str`; the inner
        // `Bytes` is never handed out mutably.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The underlying bytes, shared.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Unwraps the bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl Deref for Utf8Bytes {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl TryFrom<Bytes> for Utf8Bytes {
    type Error = InvalidUtf8;
    fn try_from(bytes: Bytes) -> Result<Self, InvalidUtf8> {
        std::str::from_utf8(&bytes).map_err(|_| InvalidUtf8)?;
        Ok(Self(bytes))
    }
}

impl From<String> for Utf8Bytes {
    fn from(s: String) -> Self {
        Self(Bytes::from(s))
    }
}

impl From<&'static str> for Utf8Bytes {
    fn from(s: &'static str) -> Self {
        Self::from_static(s)
    }
}

impl fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_split(bytes: &[u8], at: &[usize]) -> Result<(), InvalidUtf8> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &cut in at {
            v.feed(&bytes[start..cut])?;
            start = cut;
        }
        v.feed(&bytes[start..])?;
        v.finish()
    }

    #[test]
    fn valid_text_split_anywhere_is_valid() {
        let text = "κόσμε ascii 𝄞 中文".as_bytes();
        for i in 0..=text.len() {
            for j in i..=text.len() {
                assert_eq!(feed_split(text, &[i, j]), Ok(()), "cuts {i} {j}");
            }
        }
    }

    #[test]
    fn invalid_byte_fails_in_the_piece_that_carries_it() {
        // 0xED 0xA0 0x80 is a surrogate: invalid as soon as 0xA0 follows 0xED.
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"ok \xED"), Ok(()));
        assert_eq!(v.feed(b"\xA0"), Err(InvalidUtf8));
    }

    #[test]
    fn unfinished_code_point_fails_at_finish() {
        let mut v = Utf8Validator::new();
        assert_eq!(v.feed(b"ab\xF0\x9F"), Ok(()));
        assert_eq!(v.finish(), Err(InvalidUtf8));
        // finish resets, so the validator is ready for the next message.
        assert_eq!(v.feed(b"fine"), Ok(()));
        assert_eq!(v.finish(), Ok(()));
    }

    #[test]
    fn one_byte_pieces_of_a_four_byte_code_point() {
        let mut v = Utf8Validator::new();
        for b in "𝄞".as_bytes() {
            assert_eq!(v.feed(&[*b]), Ok(()));
        }
        assert_eq!(v.finish(), Ok(()));
    }
}
