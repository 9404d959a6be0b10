//! Size limits the codec and the handshake enforce.
//!
//! Owns the numbers only; the codec checks frames and messages against them, the handshake
//! checks the request head. No serde here: the engine's config maps onto this struct.

/// Limits on what a peer may send. Every limit is enforced with a close code or HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Limits {
    /// Largest single frame payload accepted, in bytes. Default 16 MiB. Over it the connection
    /// is closed with 1009 as soon as the frame header arrives, before its payload is read.
    /// Memory: a frame is buffered whole before it is delivered, so this bounds one read buffer.
    /// Values above 4 GiB - 1 act as 4 GiB - 1.
    pub max_frame_bytes: usize,
    /// Largest message accepted, summed over its fragments, in bytes. Default 16 MiB. Over it
    /// the connection is closed with 1009 when the fragment that crosses it announces its length.
    /// Memory: a fragmented message is reassembled, so this bounds one reassembly buffer.
    /// Values above 4 GiB - 1 act as 4 GiB - 1.
    pub max_message_bytes: usize,
    /// Largest HTTP upgrade request head (request line plus headers), in bytes. Default 8 KiB.
    /// Over it the upgrade is refused with 431.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 16 << 20,
            max_message_bytes: 16 << 20,
            max_header_bytes: 8 << 10,
        }
    }
}

impl Limits {
    /// Sets [`Limits::max_frame_bytes`].
    #[must_use]
    pub fn with_max_frame_bytes(mut self, bytes: usize) -> Self {
        self.max_frame_bytes = bytes;
        self
    }

    /// Sets [`Limits::max_message_bytes`].
    #[must_use]
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// Sets [`Limits::max_header_bytes`].
    #[must_use]
    pub fn with_max_header_bytes(mut self, bytes: usize) -> Self {
        self.max_header_bytes = bytes;
        self
    }
}
