//! The JSON encoding: one object per text frame.
//!
//! Decoding is two steps. First one pass over the object collects each known field: `data` and
//! `topics` as raw JSON slices, the others as scalars (unknown fields are skipped, duplicates
//! noted, and the `id` kept as soon as it is read, so that a later syntax error can still name
//! it). Then each field the message type needs is checked for its type, with a precise error.
//! No `serde_json::Value` tree is built. Encoding writes the JSON by hand, with an escaper that
//! matches `serde_json`'s output.

use std::{borrow::Cow, fmt};

use serde::de::{self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{
    decode_base64, shown, validate_topic, AckPosition, Data, DataKind, DecodeError, ErrorCode,
    Fail, Request, ServerMessage, Sink, SubscribeTopic, TopicPosition,
};

/// Every field name any message uses. An index into [`Fields::val`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum F {
    Type,
    Id,
    Topic,
    Topics,
    Since,
    Data,
    DataB64,
    Seq,
    Code,
    Message,
    Oldest,
    Count,
    Next,
    Reason,
    Epoch,
    RetryAfterMs,
}

const FIELD_COUNT: usize = 16;
const _: () = assert!(F::RetryAfterMs as usize + 1 == FIELD_COUNT && FIELD_COUNT <= 16);

impl F {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "type" => Self::Type,
            "id" => Self::Id,
            "topic" => Self::Topic,
            "topics" => Self::Topics,
            "since" => Self::Since,
            "data" => Self::Data,
            "data_b64" => Self::DataB64,
            "seq" => Self::Seq,
            "code" => Self::Code,
            "message" => Self::Message,
            "oldest" => Self::Oldest,
            "count" => Self::Count,
            "next" => Self::Next,
            "reason" => Self::Reason,
            "epoch" => Self::Epoch,
            "retry_after_ms" => Self::RetryAfterMs,
            _ => return None,
        })
    }

    /// Kept as raw JSON text rather than read as a scalar.
    const fn is_raw(self) -> bool {
        matches!(self, Self::Data | Self::Topics)
    }

    const fn name(self) -> &'static str {
        match self {
            Self::Type => "type",
            Self::Id => "id",
            Self::Topic => "topic",
            Self::Topics => "topics",
            Self::Since => "since",
            Self::Data => "data",
            Self::DataB64 => "data_b64",
            Self::Seq => "seq",
            Self::Code => "code",
            Self::Message => "message",
            Self::Oldest => "oldest",
            Self::Count => "count",
            Self::Next => "next",
            Self::Reason => "reason",
            Self::Epoch => "epoch",
            Self::RetryAfterMs => "retry_after_ms",
        }
    }
}

/// One field's value as the first step reads it: `data` and `topics` as raw JSON text, every
/// other field as a scalar, so that nothing is parsed twice.
#[derive(Debug, Clone)]
enum Val<'a> {
    Raw(&'a RawValue),
    Str(Cow<'a, str>),
    U64(u64),
    Null,
    /// Any other value (negative or fractional number, bool, array, object).
    Other,
}

/// The known fields of one object.
#[derive(Debug)]
struct Fields<'a> {
    val: [Option<Val<'a>>; FIELD_COUNT],
    /// Bit `f` set: field `f` appeared more than once.
    duplicated: u16,
}

impl<'a> Fields<'a> {
    const fn new() -> Self {
        Self {
            val: [const { None }; FIELD_COUNT],
            duplicated: 0,
        }
    }

    /// The field's value, `None` when absent.
    fn val(&self, f: F) -> Result<Option<&Val<'a>>, Fail> {
        if self.duplicated & (1 << f as u16) != 0 {
            return Err(Fail::bad_request(format!(
                "duplicate field \"{}\"",
                f.name()
            )));
        }
        Ok(self.val[f as usize].as_ref())
    }

    /// A field kept as raw JSON ([`F::is_raw`]).
    fn raw(&self, f: F) -> Result<Option<&'a RawValue>, Fail> {
        Ok(match self.val(f)? {
            Some(Val::Raw(raw)) => Some(raw),
            _ => None,
        })
    }

    /// An optional unsigned integer field; `null` counts as absent.
    fn u64(&self, f: F) -> Result<Option<u64>, Fail> {
        match self.val(f)? {
            None | Some(Val::Null) => Ok(None),
            Some(Val::U64(n)) => Ok(Some(*n)),
            Some(_) => Err(Fail::bad_request(format!(
                "field \"{}\" must be an unsigned integer",
                f.name()
            ))),
        }
    }

    fn required_u64(&self, f: F) -> Result<u64, Fail> {
        self.u64(f)?.ok_or_else(|| missing(f))
    }

    /// An optional string field, borrowed unless it has escapes.
    fn str(&self, f: F) -> Result<Option<Cow<'a, str>>, Fail> {
        match self.val(f)? {
            None => Ok(None),
            Some(Val::Str(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Fail::bad_request(format!(
                "field \"{}\" must be a string",
                f.name()
            ))),
        }
    }

    fn required_str(&self, f: F) -> Result<Cow<'a, str>, Fail> {
        self.str(f)?.ok_or_else(|| missing(f))
    }

    /// A required topic: a string that passes [`validate_topic`].
    fn topic(&self) -> Result<Cow<'a, str>, Fail> {
        let topic = self.required_str(F::Topic)?;
        validate_topic(&topic).map_err(|why| Fail::new(ErrorCode::BadTopic, why))?;
        Ok(topic)
    }

    /// The payload: `data` (JSON, borrowed) or `data_b64` (binary, decoded).
    fn payload(&self) -> Result<Data<'a>, Fail> {
        match (self.raw(F::Data)?, self.str(F::DataB64)?) {
            (Some(_), Some(_)) => Err(Fail::bad_request(
                "fields \"data\" and \"data_b64\" exclude each other",
            )),
            (Some(data), None) => Ok(Data::new(DataKind::Json, data.get().as_bytes())),
            (None, Some(b64)) => Ok(Data {
                kind: DataKind::Binary,
                bytes: Cow::Owned(decode_base64(&b64)?),
            }),
            (None, None) => Err(missing(F::Data)),
        }
    }
}

fn missing(f: F) -> Fail {
    Fail::bad_request(format!("missing field \"{}\"", f.name()))
}

/// Reads a JSON string value, borrowing it when it has no escapes.
fn string(raw: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<CowStr<'_>>(raw.get())
        .ok()
        .map(|s| s.0)
}

/// A string that borrows from the input when it can (serde's own `Cow<str>` always copies).
struct CowStr<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for CowStr<'de> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(CowStrVisitor)
    }
}

struct CowStrVisitor;

impl<'de> Visitor<'de> for CowStrVisitor {
    type Value = CowStr<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(CowStr(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(CowStr(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(CowStr(Cow::Owned(v)))
    }
}

/// Collects the known fields of one object; records a valid `id` in `id` as soon as it is read.
struct FieldsVisitor<'s, 'de> {
    fields: &'s mut Fields<'de>,
    id: &'s mut Option<u64>,
}

impl<'de> Visitor<'de> for FieldsVisitor<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let fields = self.fields;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let Some(f) = key else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let val = if f.is_raw() {
                Val::Raw(map.next_value()?)
            } else {
                map.next_value_seed(ScalarSeed)?
            };
            if f == F::Id {
                *self.id = match val {
                    Val::U64(id) => Some(id),
                    _ => None,
                };
            }
            if fields.val[f as usize].replace(val).is_some() {
                fields.duplicated |= 1 << f as u16;
            }
        }
        Ok(())
    }
}

/// Any value, read as a [`Val`] scalar: strings and unsigned integers kept, anything else only
/// classified (and skipped over).
struct ScalarSeed;

impl<'de> DeserializeSeed<'de> for ScalarSeed {
    type Value = Val<'de>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ScalarSeed {
    type Value = Val<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Val::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Val::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Val::Str(Cow::Owned(v)))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Val::U64(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(u64::try_from(v).map_or(Val::Other, Val::U64))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Val::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Val::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Val::Null)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Val::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Val::Other)
    }
}

/// A key: `Some` for a known field name, `None` for any other (escaped names are compared after
/// unescaping).
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<F>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Option<F>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(F::from_name(v))
    }
}

/// The first step: the object's known fields into `fields` (filled in place: it is large enough
/// that moving it around costs more than parsing a small message), or why `input` is not a JSON
/// object.
fn parse_object<'a>(
    input: &'a [u8],
    id: &mut Option<u64>,
    fields: &mut Fields<'a>,
) -> Result<(), Fail> {
    let mut de = serde_json::Deserializer::from_slice(input);
    let parsed = de
        .deserialize_map(FieldsVisitor { fields, id })
        .and_then(|()| de.end());
    parsed.map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Fail::bad_request("message is not a JSON object"),
        _ => Fail::bad_request(format!("invalid JSON: {e}")),
    })
}

/// The `id` of a request cut short (`input` is its beginning), when it was read before the
/// cut.
pub(super) fn read_id(input: &[u8]) -> Option<u64> {
    let mut id = None;
    let mut fields = Fields::new();
    let _ = parse_object(input, &mut id, &mut fields);
    id
}

/// Decodes a request; a subscribe or unsubscribe naming more than `max_topics` topics is
/// refused at the first entry past it.
pub(super) fn decode_request(input: &[u8], max_topics: usize) -> Result<Request<'_>, DecodeError> {
    let mut id = None;
    let mut fields = Fields::new();
    let request = parse_object(input, &mut id, &mut fields).and_then(|()| {
        // A wrongly typed id fails here; the first step left `id` empty for it.
        id = fields.u64(F::Id)?;
        request(&fields, id, max_topics)
    });
    request.map_err(|fail| fail.with_id(id))
}

fn request<'a>(
    fields: &Fields<'a>,
    id: Option<u64>,
    max_topics: usize,
) -> Result<Request<'a>, Fail> {
    let ty = fields.required_str(F::Type)?;
    Ok(match &*ty {
        "subscribe" => Request::Subscribe {
            id,
            topics: subscribe_topics(fields, max_topics)?,
        },
        "unsubscribe" => Request::Unsubscribe {
            id,
            topics: unsubscribe_topics(fields, max_topics)?,
        },
        "publish" => Request::Publish {
            id,
            topic: fields.topic()?,
            payload: fields.payload()?,
        },
        "ping" => Request::Ping { id },
        other => return Err(unknown_type(other)),
    })
}

fn unknown_type(ty: &str) -> Fail {
    Fail::new(
        ErrorCode::UnknownType,
        format!("unknown type {}", shown(ty)),
    )
}

fn subscribe_topics<'a>(
    fields: &Fields<'a>,
    max_topics: usize,
) -> Result<Vec<SubscribeTopic<'a>>, Fail> {
    let Some(list) = topic_list(fields, max_topics)? else {
        return subscribe_entry(fields).map(|entry| vec![entry]);
    };
    for f in [F::Since, F::Epoch] {
        if fields.u64(f)?.is_some() {
            return Err(Fail::bad_request(format!(
                "with \"topics\", \"{}\" goes inside each entry",
                f.name()
            )));
        }
    }
    list.into_iter()
        .enumerate()
        .map(|(i, item)| {
            if item.get().starts_with('{') {
                let mut fields = Fields::new();
                parse_object(item.get().as_bytes(), &mut None, &mut fields)?;
                subscribe_entry(&fields).map_err(|fail| in_entry(i, fail))
            } else {
                Ok(SubscribeTopic {
                    topic: list_topic(i, item, "a topic string or an object with \"topic\"")?,
                    since: None,
                    epoch: None,
                })
            }
        })
        .collect()
}

/// A subscribe's `topic`, `since` and `epoch` (top level, or one entry of `topics`).
fn subscribe_entry<'a>(fields: &Fields<'a>) -> Result<SubscribeTopic<'a>, Fail> {
    let topic = fields.topic()?;
    let since = fields.u64(F::Since)?;
    let epoch = fields.u64(F::Epoch)?;
    if epoch.is_some() && since.is_none() {
        return Err(Fail::bad_request("\"epoch\" without \"since\""));
    }
    Ok(SubscribeTopic {
        topic,
        since,
        epoch,
    })
}

fn unsubscribe_topics<'a>(
    fields: &Fields<'a>,
    max_topics: usize,
) -> Result<Vec<Cow<'a, str>>, Fail> {
    match topic_list(fields, max_topics)? {
        None => Ok(vec![fields.topic()?]),
        Some(list) => list
            .into_iter()
            .enumerate()
            .map(|(i, item)| list_topic(i, item, "a topic string"))
            .collect(),
    }
}

/// The raw entries of `topics`, or `None` when the request uses `topic` instead. More than
/// `max_topics` entries: [`ErrorCode::TooLarge`], at the first one past it.
fn topic_list<'a>(
    fields: &Fields<'a>,
    max_topics: usize,
) -> Result<Option<Vec<&'a RawValue>>, Fail> {
    let Some(raw) = fields.raw(F::Topics)? else {
        return Ok(None);
    };
    if fields.val(F::Topic)?.is_some() {
        return Err(Fail::bad_request(
            "fields \"topic\" and \"topics\" exclude each other",
        ));
    }
    let mut over = false;
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let list = de
        .deserialize_seq(CappedList {
            max: max_topics,
            over: &mut over,
        })
        .map_err(|_| {
            if over {
                Fail::too_many_topics(max_topics)
            } else {
                Fail::bad_request("field \"topics\" must be an array")
            }
        })?;
    if list.is_empty() {
        return Err(Fail::bad_request("field \"topics\" is empty"));
    }
    Ok(Some(list))
}

/// A JSON array's raw entries, at most `max` of them: at the next one it sets `over` and
/// fails without reading further.
struct CappedList<'s> {
    max: usize,
    over: &'s mut bool,
}

impl<'de> Visitor<'de> for CappedList<'_> {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut list = Vec::new();
        while let Some(item) = seq.next_element::<&RawValue>()? {
            if list.len() == self.max {
                *self.over = true;
                return Err(de::Error::custom("too many entries"));
            }
            list.push(item);
        }
        Ok(list)
    }
}

/// Entry `i` of `topics` as a plain topic string.
fn list_topic<'a>(i: usize, item: &'a RawValue, expected: &str) -> Result<Cow<'a, str>, Fail> {
    let topic =
        string(item).ok_or_else(|| Fail::bad_request(format!("topics[{i}] must be {expected}")))?;
    validate_topic(&topic).map_err(|why| in_entry(i, Fail::new(ErrorCode::BadTopic, why)))?;
    Ok(topic)
}

fn in_entry(i: usize, fail: Fail) -> Fail {
    Fail::new(fail.code, format!("topics[{i}]: {}", fail.message))
}

pub(super) fn decode_server(input: &[u8]) -> Result<ServerMessage<'_>, DecodeError> {
    let mut id = None;
    let mut fields = Fields::new();
    let msg = parse_object(input, &mut id, &mut fields).and_then(|()| {
        id = fields.u64(F::Id)?;
        server(&fields, id)
    });
    msg.map_err(|fail| fail.with_id(id))
}

fn server<'a>(fields: &Fields<'a>, id: Option<u64>) -> Result<ServerMessage<'a>, Fail> {
    let ty = fields.required_str(F::Type)?;
    Ok(match &*ty {
        "message" => ServerMessage::Message {
            topic: fields.required_str(F::Topic)?,
            seq: fields.required_u64(F::Seq)?,
            payload: fields.payload()?,
        },
        "ack" => ServerMessage::Ack {
            id,
            position: ack_position(fields)?,
        },
        "error" => ServerMessage::Error {
            id,
            code: fields.required_str(F::Code)?,
            message: fields.required_str(F::Message)?,
            retry_after_ms: fields.u64(F::RetryAfterMs)?,
        },
        "reset" => ServerMessage::Reset {
            topic: fields.required_str(F::Topic)?,
            oldest: fields.required_u64(F::Oldest)?,
            epoch: fields.u64(F::Epoch)?,
        },
        "dropped" => ServerMessage::Dropped {
            topic: fields.required_str(F::Topic)?,
            count: fields.required_u64(F::Count)?,
            next: fields.required_u64(F::Next)?,
        },
        "shutdown" => ServerMessage::Shutdown {
            reason: fields.required_str(F::Reason)?,
        },
        "pong" => ServerMessage::Pong { id },
        other => return Err(unknown_type(other)),
    })
}

/// An ack's `topics` (a subscribe's), or `epoch` and `seq` (a publish's), or neither.
fn ack_position<'a>(fields: &Fields<'a>) -> Result<AckPosition<'a>, Fail> {
    if let Some(raw) = fields.raw(F::Topics)? {
        let list: Vec<&RawValue> = serde_json::from_str(raw.get())
            .map_err(|_| Fail::bad_request("field \"topics\" must be an array"))?;
        let entries = list
            .into_iter()
            .enumerate()
            .map(|(i, item)| {
                let mut fields = Fields::new();
                parse_object(item.get().as_bytes(), &mut None, &mut fields)
                    .map_err(|_| Fail::bad_request(format!("topics[{i}] must be an object")))?;
                let entry = || {
                    Ok(TopicPosition {
                        topic: fields.required_str(F::Topic)?,
                        epoch: fields.required_u64(F::Epoch)?,
                        seq: fields.required_u64(F::Seq)?,
                    })
                };
                entry().map_err(|fail| in_entry(i, fail))
            })
            .collect::<Result<_, Fail>>()?;
        return Ok(AckPosition::Subscribe(entries));
    }
    match (fields.u64(F::Epoch)?, fields.u64(F::Seq)?) {
        (None, None) => Ok(AckPosition::Plain),
        (Some(epoch), Some(seq)) => Ok(AckPosition::Publish { epoch, seq }),
        (Some(_), None) => Err(missing(F::Seq)),
        (None, Some(_)) => Err(missing(F::Epoch)),
    }
}

pub(super) fn write_request<S: Sink>(req: &Request<'_>, out: &mut S) {
    match req {
        Request::Subscribe { id, topics } => {
            open(out, "subscribe", *id);
            if let [one] = topics.as_slice() {
                field_str(out, "topic", &one.topic);
                field_resume(out, one);
            } else {
                out.put(b",\"topics\":[");
                for (i, entry) in topics.iter().enumerate() {
                    if i > 0 {
                        out.put(b",");
                    }
                    if entry.since.is_none() && entry.epoch.is_none() {
                        put_str(out, &entry.topic);
                    } else {
                        out.put(b"{\"topic\":");
                        put_str(out, &entry.topic);
                        field_resume(out, entry);
                        out.put(b"}");
                    }
                }
                out.put(b"]");
            }
        }
        Request::Unsubscribe { id, topics } => {
            open(out, "unsubscribe", *id);
            if let [one] = topics.as_slice() {
                field_str(out, "topic", one);
            } else {
                out.put(b",\"topics\":[");
                for (i, topic) in topics.iter().enumerate() {
                    if i > 0 {
                        out.put(b",");
                    }
                    put_str(out, topic);
                }
                out.put(b"]");
            }
        }
        Request::Publish { id, topic, payload } => {
            open(out, "publish", *id);
            field_str(out, "topic", topic);
            field_payload(out, payload);
        }
        Request::Ping { id } => open(out, "ping", *id),
    }
    out.put(b"}");
}

pub(super) fn write_server<S: Sink>(msg: &ServerMessage<'_>, out: &mut S) {
    match msg {
        ServerMessage::Message {
            topic,
            seq,
            payload,
        } => {
            open(out, "message", None);
            field_str(out, "topic", topic);
            field_u64(out, "seq", *seq);
            field_payload(out, payload);
        }
        ServerMessage::Ack { id, position } => {
            open(out, "ack", *id);
            match position {
                AckPosition::Plain => {}
                AckPosition::Publish { epoch, seq } => {
                    field_u64(out, "epoch", *epoch);
                    field_u64(out, "seq", *seq);
                }
                AckPosition::Subscribe(entries) => {
                    out.put(b",\"topics\":[");
                    for (i, entry) in entries.iter().enumerate() {
                        if i > 0 {
                            out.put(b",");
                        }
                        out.put(b"{\"topic\":");
                        put_str(out, &entry.topic);
                        field_u64(out, "epoch", entry.epoch);
                        field_u64(out, "seq", entry.seq);
                        out.put(b"}");
                    }
                    out.put(b"]");
                }
            }
        }
        ServerMessage::Error {
            id,
            code,
            message,
            retry_after_ms,
        } => {
            open(out, "error", *id);
            field_str(out, "code", code);
            field_str(out, "message", message);
            if let Some(ms) = retry_after_ms {
                field_u64(out, "retry_after_ms", *ms);
            }
        }
        ServerMessage::Reset {
            topic,
            oldest,
            epoch,
        } => {
            open(out, "reset", None);
            field_str(out, "topic", topic);
            field_u64(out, "oldest", *oldest);
            if let Some(epoch) = epoch {
                field_u64(out, "epoch", *epoch);
            }
        }
        ServerMessage::Dropped { topic, count, next } => {
            open(out, "dropped", None);
            field_str(out, "topic", topic);
            field_u64(out, "count", *count);
            field_u64(out, "next", *next);
        }
        ServerMessage::Shutdown { reason } => {
            open(out, "shutdown", None);
            field_str(out, "reason", reason);
        }
        ServerMessage::Pong { id } => open(out, "pong", *id),
    }
    out.put(b"}");
}

/// `{"type":"<ty>"` and `,"id":<id>` when there is one. `ty` needs no escaping.
fn open<S: Sink>(out: &mut S, ty: &str, id: Option<u64>) {
    out.put(b"{\"type\":\"");
    out.put(ty.as_bytes());
    out.put(b"\"");
    if let Some(id) = id {
        field_u64(out, "id", id);
    }
}

/// `,"<name>":` for a name that needs no escaping.
fn key<S: Sink>(out: &mut S, name: &str) {
    out.put(b",\"");
    out.put(name.as_bytes());
    out.put(b"\":");
}

fn field_str<S: Sink>(out: &mut S, name: &str, value: &str) {
    key(out, name);
    put_str(out, value);
}

fn field_u64<S: Sink>(out: &mut S, name: &str, value: u64) {
    key(out, name);
    put_u64(out, value);
}

/// A subscribe entry's `,"since":…` and `,"epoch":…`, each when present.
fn field_resume<S: Sink>(out: &mut S, entry: &SubscribeTopic<'_>) {
    if let Some(since) = entry.since {
        field_u64(out, "since", since);
    }
    if let Some(epoch) = entry.epoch {
        field_u64(out, "epoch", epoch);
    }
}

fn field_payload<S: Sink>(out: &mut S, payload: &Data<'_>) {
    match payload.kind {
        DataKind::Json => {
            key(out, "data");
            out.put(&payload.bytes);
        }
        DataKind::Binary => {
            key(out, "data_b64");
            out.put(b"\"");
            out.put_base64(&payload.bytes);
            out.put(b"\"");
        }
    }
}

/// A decimal integer.
fn put_u64<S: Sink>(out: &mut S, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put(&digits[at..]);
}

/// A JSON string literal, escaped exactly as `serde_json` escapes it (RFC 8259 §7): `"` and `\`,
/// the short forms `\b \f \n \r \t`, `\u00xx` with lowercase hex for other control characters,
/// and everything else (DEL, non-ASCII) as is.
fn put_str<S: Sink>(out: &mut S, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.put(b"\"");
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let unicode;
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            0x08 => b"\\b",
            0x0C => b"\\f",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1F => {
                unicode = [
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 0xF)],
                ];
                &unicode
            }
            _ => continue,
        };
        out.put(&bytes[start..i]);
        out.put(escape);
        start = i + 1;
    }
    out.put(&bytes[start..]);
    out.put(b"\"");
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn escaped(s: &str) -> String {
        let mut out = Vec::new();
        put_str(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escapes_every_ascii_byte_as_serde_json_does() {
        for b in 0u8..=0x7F {
            let s = char::from(b).to_string();
            assert_eq!(
                escaped(&s),
                serde_json::to_string(&s).unwrap(),
                "byte {b:#x}"
            );
        }
    }

    #[test]
    fn integers_are_written_in_decimal() {
        for n in [0, 1, 9, 10, 99, 100, 12_345, u64::MAX] {
            let mut out = Vec::new();
            put_u64(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }

    #[test]
    fn escaped_keys_are_recognized_and_unknown_ones_skipped() {
        let mut fields = Fields::new();
        parse_object(
            br#"{"typ\u0065":"ping","x":{"id":9},"id":7,"y":[1,{"z":null}]}"#,
            &mut None,
            &mut fields,
        )
        .unwrap();
        assert_eq!(fields.required_str(F::Type).unwrap(), "ping");
        assert_eq!(fields.u64(F::Id).unwrap(), Some(7));
    }

    #[test]
    fn topics_without_escapes_are_borrowed() {
        let mut fields = Fields::new();
        parse_object(br#"{"topic":"a.b","since":1}"#, &mut None, &mut fields).unwrap();
        assert!(matches!(fields.topic().unwrap(), Cow::Borrowed("a.b")));
        let mut fields = Fields::new();
        parse_object(br#"{"topic":"a\u002eb"}"#, &mut None, &mut fields).unwrap();
        assert!(matches!(fields.topic().unwrap(), Cow::Owned(t) if t == "a.b"));
    }

    proptest! {
        #[test]
        fn escaper_matches_serde_json(s in any::<String>()) {
            prop_assert_eq!(escaped(&s), serde_json::to_string(&s).unwrap());
        }
    }
}
