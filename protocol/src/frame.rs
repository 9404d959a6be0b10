//! Frame headers (RFC 6455 §5.2): parsing from a read buffer and encoding into a caller's buffer.
//!
//! Owns the wire layout of one header. It does not know about messages, fragments or roles:
//! the codec applies those rules on top.

use bytes::{BufMut, Bytes, BytesMut};

use crate::{error::ProtocolError, mask::apply_mask};

/// The longest a frame header can be: 2 fixed bytes, 8 length bytes, 4 mask bytes.
pub const MAX_HEADER_BYTES: usize = 14;

/// A frame's opcode (RFC 6455 §5.2). Reserved opcodes are rejected when parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: a text frame (UTF-8).
    Text,
    /// 0x2: a binary frame.
    Binary,
    /// 0x8: starts or answers the closing handshake.
    Close,
    /// 0x9: asks for a pong.
    Ping,
    /// 0xA: answers a ping, or an unsolicited heartbeat.
    Pong,
}

impl OpCode {
    /// Decodes the low nibble of a header's first byte.
    ///
    /// # Errors
    /// [`ProtocolError::ReservedOpcode`] for 0x3 to 0x7 and 0xB to 0xF.
    pub fn from_u8(v: u8) -> Result<Self, ProtocolError> {
        Ok(match v {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            other => return Err(ProtocolError::ReservedOpcode(other)),
        })
    }

    /// The 4-bit wire value.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    /// Whether this is a control frame (close, ping, pong).
    pub const fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// One frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN: this is the last frame of its message.
    pub fin: bool,
    /// RSV1..RSV3 as the low three bits (RSV1 = 0b100). Non-zero only with an extension.
    pub rsv: u8,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, present on every client-to-server frame.
    pub mask: Option<[u8; 4]>,
    /// The payload length in bytes.
    pub payload_len: u64,
}

impl FrameHeader {
    /// A final, unmasked header: what a server sends for a whole message.
    pub const fn new(opcode: OpCode, payload_len: u64) -> Self {
        Self {
            fin: true,
            rsv: 0,
            opcode,
            mask: None,
            payload_len,
        }
    }

    /// Parses a header from the start of `buf`.
    ///
    /// Returns `Ok(None)` while the header is incomplete, otherwise the header and its length.
    /// Non-minimal length encodings are accepted, as most peers do.
    ///
    /// # Errors
    /// A reserved opcode, or a 64-bit length with its top bit set.
    pub fn parse(buf: &[u8]) -> Result<Option<(Self, usize)>, ProtocolError> {
        let &[b0, b1, ..] = buf else {
            return Ok(None);
        };
        let opcode = OpCode::from_u8(b0 & 0x0F)?;
        let masked = b1 & 0x80 != 0;
        let (payload_len, mut len) = match b1 & 0x7F {
            126 => {
                let Some(ext) = buf.get(2..4) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([ext[0], ext[1]])), 4)
            }
            127 => {
                let Some(ext) = buf.get(2..10) else {
                    return Ok(None);
                };
                let n = u64::from_be_bytes(ext.try_into().expect("slice of 8 bytes"));
                if n & (1 << 63) != 0 {
                    return Err(ProtocolError::InvalidLength);
                }
                (n, 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = if masked {
            let Some(key) = buf.get(len..len + 4) else {
                return Ok(None);
            };
            len += 4;
            Some([key[0], key[1], key[2], key[3]])
        } else {
            None
        };
        let header = Self {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x07,
            opcode,
            mask,
            payload_len,
        };
        Ok(Some((header, len)))
    }

    /// The number of bytes [`FrameHeader::encode`] writes.
    pub const fn encoded_len(&self) -> usize {
        let len = match self.payload_len {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        };
        if self.mask.is_some() {
            len + 4
        } else {
            len
        }
    }

    /// Writes the header into `dst` (any [`BufMut`], including a `&mut [u8]` on the stack).
    ///
    /// # Panics
    /// If `dst` has less than [`FrameHeader::encoded_len`] bytes of room.
    pub fn encode(&self, dst: &mut impl BufMut) {
        let b0 = (u8::from(self.fin) << 7) | ((self.rsv & 0x07) << 4) | self.opcode.as_u8();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        dst.put_u8(b0);
        match self.payload_len {
            n @ 0..=125 => dst.put_u8(mask_bit | n as u8),
            n @ 126..=0xFFFF => {
                dst.put_u8(mask_bit | 126);
                dst.put_u16(n as u16);
            }
            n => {
                dst.put_u8(mask_bit | 127);
                dst.put_u64(n);
            }
        }
        if let Some(key) = self.mask {
            dst.put_slice(&key);
        }
    }

    /// The header as a small array plus its length, for writing without an allocation.
    pub fn to_array(&self) -> ([u8; MAX_HEADER_BYTES], usize) {
        let mut out = [0u8; MAX_HEADER_BYTES];
        let len = self.encoded_len();
        self.encode(&mut &mut out[..]);
        (out, len)
    }
}

/// Encodes one frame, header and payload, into `dst`. With `mask` the payload is masked as it
/// is copied (client role); without, it is copied as is (server role).
pub fn encode_frame(
    dst: &mut BytesMut,
    fin: bool,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    let header = FrameHeader {
        fin,
        rsv: 0,
        opcode,
        mask,
        payload_len: payload.len() as u64,
    };
    dst.reserve(header.encoded_len() + payload.len());
    header.encode(dst);
    let start = dst.len();
    dst.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut dst[start..], key, 0);
    }
}

/// A complete unmasked frame (header and payload in one buffer), as a server sends it.
///
/// Encode a message once and queue clones of the result to any number of connections: a clone
/// is a reference-count increment, never a copy.
pub fn server_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(MAX_HEADER_BYTES + payload.len());
    encode_frame(&mut buf, true, opcode, payload, None);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_returns_none_until_the_header_is_whole() {
        let header = FrameHeader {
            fin: true,
            rsv: 0,
            opcode: OpCode::Binary,
            mask: Some([1, 2, 3, 4]),
            payload_len: 70_000,
        };
        let (bytes, len) = header.to_array();
        assert_eq!(len, 14);
        for cut in 0..len {
            assert_eq!(FrameHeader::parse(&bytes[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(FrameHeader::parse(&bytes[..len]), Ok(Some((header, len))));
    }

    #[test]
    fn length_encodings_round_trip_at_their_edges() {
        for n in [0u64, 125, 126, 0xFFFF, 0x1_0000, u64::from(u32::MAX) + 1] {
            let header = FrameHeader::new(OpCode::Text, n);
            let (bytes, len) = header.to_array();
            assert_eq!(len, header.encoded_len());
            let (parsed, used) = FrameHeader::parse(&bytes[..len]).unwrap().unwrap();
            assert_eq!((parsed, used), (header, len));
        }
    }

    #[test]
    fn reserved_opcodes_and_huge_lengths_are_errors() {
        assert_eq!(
            FrameHeader::parse(&[0x83, 0x00]),
            Err(ProtocolError::ReservedOpcode(3))
        );
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(FrameHeader::parse(&huge), Err(ProtocolError::InvalidLength));
    }

    #[test]
    fn server_frame_is_header_then_payload() {
        let frame = server_frame(OpCode::Text, b"hi");
        assert_eq!(&frame[..], &[0x81, 0x02, b'h', b'i']);
    }
}
