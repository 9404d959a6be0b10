//! The binary encoding: one message per binary frame, integers big-endian, byte by byte as
//! `PROTOCOL.md` lays it out.
//!
//! Every message starts with an op byte. Every client op is followed by the id field (a flag
//! byte, then eight bytes when the flag is 1), so the id of a request can be read even when the
//! op is unknown or the rest is malformed. Topics and error codes are a length byte and UTF-8.
//!
//! Version 2 (`ringcast.v2.bin`) differs from version 1 only in the server's ack, error and
//! reset, which carry epochs, seqs and retry hints; requests are read the same in both (an
//! entry's epoch flag is accepted from either).

use std::borrow::Cow;

use serde_json::value::RawValue;

use super::{
    validate_topic, AckPosition, Data, DataKind, DecodeError, ErrorCode, Fail, Request,
    ServerMessage, Sink, SubscribeTopic, TopicPosition, MAX_TOPIC_BYTES,
};

/// Which layout of the server's ack, error and reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    /// `ringcast.v1.bin`: the ack is the id field alone, the error has no retry hint, the reset
    /// no epoch.
    V1,
    /// `ringcast.v2.bin`.
    V2,
}

const SUBSCRIBE: u8 = 0x01;
const UNSUBSCRIBE: u8 = 0x02;
const PUBLISH: u8 = 0x03;
const PING: u8 = 0x04;

const MESSAGE: u8 = 0x81;
const ACK: u8 = 0x82;
const ERROR: u8 = 0x83;
const RESET: u8 = 0x84;
const DROPPED: u8 = 0x85;
const SHUTDOWN: u8 = 0x86;
const PONG: u8 = 0x87;

/// Subscribe entry flags: a `since` follows.
const FLAG_SINCE: u8 = 0x01;
/// Subscribe entry flags: an `epoch` follows (after the `since`).
const FLAG_EPOCH: u8 = 0x02;
/// Publish and message flags: the payload is JSON text.
const FLAG_JSON: u8 = 0x01;

/// Version 2 ack kinds, after the id field.
const ACK_PLAIN: u8 = 0;
const ACK_PUBLISH: u8 = 1;
const ACK_SUBSCRIBE: u8 = 2;

/// Id field flag values.
const NO_ID: u8 = 0x00;
const HAS_ID: u8 = 0x01;

/// A cursor over one message. Every read names the field it reads, for the error message.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], Fail> {
        if self.rest.len() < n {
            return Err(truncated(what));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &str) -> Result<u8, Fail> {
        let (&b, tail) = self.rest.split_first().ok_or_else(|| truncated(what))?;
        self.rest = tail;
        Ok(b)
    }

    fn u64(&mut self, what: &str) -> Result<u64, Fail> {
        let (head, tail) = self
            .rest
            .split_first_chunk::<8>()
            .ok_or_else(|| truncated(what))?;
        self.rest = tail;
        Ok(u64::from_be_bytes(*head))
    }

    /// A flags byte whose only defined bit is `defined`.
    fn flags(&mut self, defined: u8, what: &str) -> Result<u8, Fail> {
        let flags = self.u8(what)?;
        if flags & !defined != 0 {
            return Err(Fail::bad_request(format!(
                "undefined bits set in {what} ({flags:#04x})"
            )));
        }
        Ok(flags)
    }

    /// The id field: `0x00`, or `0x01` and a u64.
    fn id(&mut self) -> Result<Option<u64>, Fail> {
        match self.u8("the id flag")? {
            NO_ID => Ok(None),
            HAS_ID => Ok(Some(self.u64("the id")?)),
            other => Err(Fail::bad_request(format!(
                "id flag is {other:#04x}, not 0x00 or 0x01"
            ))),
        }
    }

    /// A length byte and that many bytes.
    fn short_bytes(&mut self, what: &str) -> Result<&'a [u8], Fail> {
        let Some((&len, tail)) = self.rest.split_first() else {
            return Err(truncated(&format!("{what} length")));
        };
        self.rest = tail;
        self.take(usize::from(len), what)
    }

    /// A length byte and that many bytes of UTF-8.
    fn short_str(&mut self, what: &str) -> Result<&'a str, Fail> {
        let bytes = self.short_bytes(what)?;
        std::str::from_utf8(bytes)
            .map_err(|_| Fail::bad_request(format!("{what} is not valid UTF-8")))
    }

    /// A topic that passes [`validate_topic`] (a client's). Bad UTF-8 is a bad topic too.
    fn topic(&mut self) -> Result<Cow<'a, str>, Fail> {
        let bytes = self.short_bytes("the topic")?;
        let topic = std::str::from_utf8(bytes)
            .map_err(|_| Fail::new(ErrorCode::BadTopic, "topic is not valid UTF-8"))?;
        validate_topic(topic).map_err(|why| Fail::new(ErrorCode::BadTopic, why))?;
        Ok(Cow::Borrowed(topic))
    }

    /// Everything left, as UTF-8.
    fn rest_str(&mut self, what: &str) -> Result<&'a str, Fail> {
        let rest = std::mem::take(&mut self.rest);
        std::str::from_utf8(rest)
            .map_err(|_| Fail::bad_request(format!("{what} is not valid UTF-8")))
    }

    /// Everything left, as a payload of the kind `flags` says.
    fn payload(&mut self, flags: u8) -> Result<Data<'a>, Fail> {
        let rest = std::mem::take(&mut self.rest);
        if flags & FLAG_JSON == 0 {
            return Ok(Data::binary(rest));
        }
        // Checked, and trimmed of surrounding whitespace as a JSON `data` value would be.
        let json = serde_json::from_slice::<&RawValue>(rest).map_err(|_| {
            Fail::new(
                ErrorCode::BadPayload,
                "payload flagged JSON is not valid JSON",
            )
        })?;
        Ok(Data::json(json.get()))
    }

    fn end(&self, what: &str) -> Result<(), Fail> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(Fail::bad_request(format!(
                "{} trailing bytes after {what}",
                self.rest.len()
            )))
        }
    }
}

fn truncated(what: &str) -> Fail {
    Fail::bad_request(format!("message truncated in {what}"))
}

/// Decodes a request; a subscribe or unsubscribe naming more than `max_topics` topics is
/// refused at the first entry past it.
pub(super) fn decode_request(input: &[u8], max_topics: usize) -> Result<Request<'_>, DecodeError> {
    let mut r = Reader { rest: input };
    let op = r
        .u8("the op")
        .map_err(|_| Fail::bad_request("empty message").with_id(None))?;
    let id = r.id();
    if !matches!(op, SUBSCRIBE | UNSUBSCRIBE | PUBLISH | PING) {
        let fail = Fail::new(ErrorCode::UnknownType, format!("unknown op {op:#04x}"));
        return Err(fail.with_id(id.ok().flatten()));
    }
    let id = id.map_err(|fail| fail.with_id(None))?;
    request(op, id, &mut r, max_topics).map_err(|fail| fail.with_id(id))
}

fn request<'a>(
    op: u8,
    id: Option<u64>,
    r: &mut Reader<'a>,
    max_topics: usize,
) -> Result<Request<'a>, Fail> {
    Ok(match op {
        SUBSCRIBE => {
            let mut topics = Vec::new();
            while !r.is_empty() {
                if topics.len() == max_topics {
                    return Err(Fail::too_many_topics(max_topics));
                }
                let flags = r.flags(FLAG_SINCE | FLAG_EPOCH, "the entry flags")?;
                if flags == FLAG_EPOCH {
                    return Err(Fail::bad_request("entry has an epoch without a since"));
                }
                let since = if flags & FLAG_SINCE != 0 {
                    Some(r.u64("the since")?)
                } else {
                    None
                };
                let epoch = if flags & FLAG_EPOCH != 0 {
                    Some(r.u64("the epoch")?)
                } else {
                    None
                };
                topics.push(SubscribeTopic {
                    topic: r.topic()?,
                    since,
                    epoch,
                });
            }
            if topics.is_empty() {
                return Err(Fail::bad_request("subscribe names no topic"));
            }
            Request::Subscribe { id, topics }
        }
        UNSUBSCRIBE => {
            let mut topics = Vec::new();
            while !r.is_empty() {
                if topics.len() == max_topics {
                    return Err(Fail::too_many_topics(max_topics));
                }
                topics.push(r.topic()?);
            }
            if topics.is_empty() {
                return Err(Fail::bad_request("unsubscribe names no topic"));
            }
            Request::Unsubscribe { id, topics }
        }
        PUBLISH => {
            let flags = r.flags(FLAG_JSON, "the publish flags")?;
            let topic = r.topic()?;
            Request::Publish {
                id,
                topic,
                payload: r.payload(flags)?,
            }
        }
        _ => {
            r.end("a ping")?;
            Request::Ping { id }
        }
    })
}

pub(super) fn decode_server(
    input: &[u8],
    version: Version,
) -> Result<ServerMessage<'_>, DecodeError> {
    let mut r = Reader { rest: input };
    let op = r
        .u8("the op")
        .map_err(|_| Fail::bad_request("empty message").with_id(None))?;
    let id = match op {
        ACK | ERROR | PONG => r.id().map_err(|fail| fail.with_id(None))?,
        _ => None,
    };
    server(op, id, version, &mut r).map_err(|fail| fail.with_id(id))
}

/// A version 2 field where 0 means none.
fn nonzero(n: u64) -> Option<u64> {
    (n != 0).then_some(n)
}

fn server<'a>(
    op: u8,
    id: Option<u64>,
    version: Version,
    r: &mut Reader<'a>,
) -> Result<ServerMessage<'a>, Fail> {
    let v2 = version == Version::V2;
    let msg = match op {
        MESSAGE => {
            let flags = r.flags(FLAG_JSON, "the message flags")?;
            let seq = r.u64("the seq")?;
            let topic = Cow::Borrowed(r.short_str("the topic")?);
            ServerMessage::Message {
                topic,
                seq,
                payload: r.payload(flags)?,
            }
        }
        ACK => ServerMessage::Ack {
            id,
            position: if v2 {
                ack_position(r)?
            } else {
                AckPosition::Plain
            },
        },
        ERROR => {
            let retry_after_ms = if v2 {
                nonzero(r.u64("the retry_after_ms")?)
            } else {
                None
            };
            ServerMessage::Error {
                id,
                code: Cow::Borrowed(r.short_str("the code")?),
                message: Cow::Borrowed(r.rest_str("the message")?),
                retry_after_ms,
            }
        }
        RESET => {
            let oldest = r.u64("the oldest")?;
            let epoch = if v2 {
                nonzero(r.u64("the epoch")?)
            } else {
                None
            };
            ServerMessage::Reset {
                topic: Cow::Borrowed(r.short_str("the topic")?),
                oldest,
                epoch,
            }
        }
        DROPPED => {
            let count = r.u64("the count")?;
            let next = r.u64("the next")?;
            ServerMessage::Dropped {
                topic: Cow::Borrowed(r.short_str("the topic")?),
                count,
                next,
            }
        }
        SHUTDOWN => ServerMessage::Shutdown {
            reason: Cow::Borrowed(r.rest_str("the reason")?),
        },
        PONG => ServerMessage::Pong { id },
        other => {
            return Err(Fail::new(
                ErrorCode::UnknownType,
                format!("unknown op {other:#04x}"),
            ))
        }
    };
    r.end("the message")?;
    Ok(msg)
}

/// A version 2 ack's kind byte and what follows it.
fn ack_position<'a>(r: &mut Reader<'a>) -> Result<AckPosition<'a>, Fail> {
    Ok(match r.u8("the ack kind")? {
        ACK_PLAIN => AckPosition::Plain,
        ACK_PUBLISH => {
            let epoch = r.u64("the epoch")?;
            let seq = r.u64("the seq")?;
            AckPosition::Publish { epoch, seq }
        }
        ACK_SUBSCRIBE => {
            let mut entries = Vec::new();
            while !r.is_empty() {
                let epoch = r.u64("the epoch")?;
                let seq = r.u64("the seq")?;
                entries.push(TopicPosition {
                    topic: Cow::Borrowed(r.short_str("the topic")?),
                    epoch,
                    seq,
                });
            }
            AckPosition::Subscribe(entries)
        }
        other => {
            return Err(Fail::bad_request(format!(
                "ack kind is {other:#04x}, not 0, 1 or 2"
            )))
        }
    })
}

pub(super) fn write_request<S: Sink>(req: &Request<'_>, out: &mut S) {
    match req {
        Request::Subscribe { id, topics } => {
            out.put_u8(SUBSCRIBE);
            put_id(out, *id);
            for entry in topics {
                let mut flags = 0;
                if entry.since.is_some() {
                    flags |= FLAG_SINCE;
                }
                if entry.epoch.is_some() {
                    flags |= FLAG_EPOCH;
                }
                out.put_u8(flags);
                if let Some(since) = entry.since {
                    out.put_u64_be(since);
                }
                if let Some(epoch) = entry.epoch {
                    out.put_u64_be(epoch);
                }
                put_short_str(out, &entry.topic);
            }
        }
        Request::Unsubscribe { id, topics } => {
            out.put_u8(UNSUBSCRIBE);
            put_id(out, *id);
            for topic in topics {
                put_short_str(out, topic);
            }
        }
        Request::Publish { id, topic, payload } => {
            out.put_u8(PUBLISH);
            put_id(out, *id);
            out.put_u8(payload_flags(payload));
            put_short_str(out, topic);
            out.put(&payload.bytes);
        }
        Request::Ping { id } => {
            out.put_u8(PING);
            put_id(out, *id);
        }
    }
}

pub(super) fn write_server<S: Sink>(msg: &ServerMessage<'_>, out: &mut S, version: Version) {
    let v2 = version == Version::V2;
    match msg {
        ServerMessage::Message {
            topic,
            seq,
            payload,
        } => {
            out.put_u8(MESSAGE);
            out.put_u8(payload_flags(payload));
            out.put_u64_be(*seq);
            put_short_str(out, topic);
            out.put(&payload.bytes);
        }
        ServerMessage::Ack { id, position } => {
            out.put_u8(ACK);
            put_id(out, *id);
            if v2 {
                match position {
                    AckPosition::Plain => out.put_u8(ACK_PLAIN),
                    AckPosition::Publish { epoch, seq } => {
                        out.put_u8(ACK_PUBLISH);
                        out.put_u64_be(*epoch);
                        out.put_u64_be(*seq);
                    }
                    AckPosition::Subscribe(entries) => {
                        out.put_u8(ACK_SUBSCRIBE);
                        for entry in entries {
                            out.put_u64_be(entry.epoch);
                            out.put_u64_be(entry.seq);
                            put_short_str(out, &entry.topic);
                        }
                    }
                }
            }
        }
        ServerMessage::Error {
            id,
            code,
            message,
            retry_after_ms,
        } => {
            out.put_u8(ERROR);
            put_id(out, *id);
            if v2 {
                out.put_u64_be(retry_after_ms.unwrap_or(0));
            }
            put_short_str(out, code);
            out.put(message.as_bytes());
        }
        ServerMessage::Reset {
            topic,
            oldest,
            epoch,
        } => {
            out.put_u8(RESET);
            out.put_u64_be(*oldest);
            if v2 {
                out.put_u64_be(epoch.unwrap_or(0));
            }
            put_short_str(out, topic);
        }
        ServerMessage::Dropped { topic, count, next } => {
            out.put_u8(DROPPED);
            out.put_u64_be(*count);
            out.put_u64_be(*next);
            put_short_str(out, topic);
        }
        ServerMessage::Shutdown { reason } => {
            out.put_u8(SHUTDOWN);
            out.put(reason.as_bytes());
        }
        ServerMessage::Pong { id } => {
            out.put_u8(PONG);
            put_id(out, *id);
        }
    }
}

fn payload_flags(payload: &Data<'_>) -> u8 {
    match payload.kind {
        DataKind::Json => FLAG_JSON,
        DataKind::Binary => 0,
    }
}

fn put_id<S: Sink>(out: &mut S, id: Option<u64>) {
    match id {
        None => out.put_u8(NO_ID),
        Some(id) => {
            out.put_u8(HAS_ID);
            out.put_u64_be(id);
        }
    }
}

/// A length byte and the string. One longer than a length byte can say is written empty: a
/// receiver then rejects it instead of reading a different, cut string.
fn put_short_str<S: Sink>(out: &mut S, s: &str) {
    match u8::try_from(s.len()) {
        Ok(len) => {
            out.put_u8(len);
            out.put(s.as_bytes());
        }
        Err(_) => out.put_u8(0),
    }
}

// The length byte is what bounds a topic.
const _: () = assert!(MAX_TOPIC_BYTES == u8::MAX as usize);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layouts_are_byte_exact() {
        let mut out = Vec::new();
        write_request(
            &Request::Subscribe {
                id: Some(1),
                topics: vec![
                    SubscribeTopic {
                        topic: "a".into(),
                        since: Some(41),
                        epoch: None,
                    },
                    SubscribeTopic {
                        topic: "bc".into(),
                        since: None,
                        epoch: None,
                    },
                ],
            },
            &mut out,
        );
        assert_eq!(
            out,
            [
                &[0x01, 0x01][..],
                &1u64.to_be_bytes(),
                &[0x01],
                &41u64.to_be_bytes(),
                &[1, b'a', 0x00, 2, b'b', b'c'],
            ]
            .concat()
        );

        out.clear();
        write_request(
            &Request::Publish {
                id: None,
                topic: "t".into(),
                payload: Data::json("[1]"),
            },
            &mut out,
        );
        assert_eq!(out, b"\x03\x00\x01\x01t[1]");
    }

    #[test]
    fn over_long_strings_are_written_empty() {
        let mut out = Vec::new();
        put_short_str(&mut out, &"x".repeat(256));
        assert_eq!(out, [0]);
        out.clear();
        put_short_str(&mut out, &"x".repeat(255));
        assert_eq!(out.len(), 256);
    }
}
