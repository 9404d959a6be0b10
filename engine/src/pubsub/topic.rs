//! A topic and its messages: [`Published`] (a message framed at most once per delivery format
//! and shared by every subscriber on every shard), [`Topic`] (sequence, history, interested
//! shards) and what a backend tells a shard about them.

use std::{
    collections::VecDeque,
    fmt,
    sync::{atomic::AtomicU64, Arc, Mutex, OnceLock},
    time::Instant,
};

use bytes::Bytes;
use ringcast_protocol::envelope::{self, Dialect};

use ringcast_protocol::{deflate::deflate_server_frame, Codec, FrameHeader};

use crate::config::CompressionConfig;
use crate::ops::metrics::ShardMetrics;
use crate::pubsub::notices;
use crate::types::{
    clock::When,
    publish::{DeliveryFormat, Payload, PublishError, PublishReceipt},
};

/// A published message, shared by every shard that delivers it.
pub(crate) struct Published {
    pub(crate) topic: Arc<Topic>,
    pub(crate) seq: u64,
    pub(crate) payload: Payload,
    /// When it was sequenced (for the delivery latency histograms), read once here so that
    /// each delivery copies 8 bytes instead of converting an `Instant`.
    pub(crate) at: When,
    /// The frame for each delivery format, made by the first shard that needs it.
    pub(crate) frames: [OnceLock<Bytes>; 3],
    /// The frame for each delivery format compressed with permessage-deflate without context
    /// (`None`: under the threshold), made by the first shard with a subscriber that agreed
    /// to `server_no_context_takeover`, then shared by every such subscriber on every shard.
    pub(crate) deflated: [OnceLock<Option<Bytes>>; 3],
}

impl fmt::Debug for Published {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Published")
            .field("topic", &self.topic.name)
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Published {
    /// A message sequenced elsewhere (by a backend outside this process).
    pub(crate) fn new(topic: Arc<Topic>, seq: u64, payload: Payload) -> Self {
        Self {
            topic,
            seq,
            payload,
            at: When::from_instant(Instant::now()),
            frames: Default::default(),
            deflated: Default::default(),
        }
    }

    /// The complete WebSocket frame of this message for `format`, encoded once.
    pub(crate) fn frame(&self, format: DeliveryFormat) -> &Bytes {
        self.frames[format.index()].get_or_init(|| self.encode(format))
    }

    /// The frame of this message for `format` as a subscriber with `codec` receives it:
    /// compressed once for everyone who agreed to `server_no_context_takeover` with a window
    /// at least `compression.window_bits`, when it reaches the threshold; otherwise plain
    /// (a dedicated connection compresses it itself as it is written, see `refill_within`).
    pub(crate) fn frame_for(
        &self,
        format: DeliveryFormat,
        codec: &Codec,
        compression: &CompressionConfig,
        metrics: &ShardMetrics,
    ) -> &Bytes {
        let plain = self.frame(format);
        let shared = codec.deflate_params().is_some_and(|p| {
            p.server_no_context_takeover && p.server_max_window_bits >= compression.window_bits
        });
        if !shared {
            return plain;
        }
        let deflated = self.deflated[format.index()].get_or_init(|| {
            let (header, header_len) = FrameHeader::parse(plain).ok().flatten()?;
            let payload = &plain[header_len..];
            if payload.len() < compression.threshold_bytes {
                return None;
            }
            let started = Instant::now();
            let frame = deflate_server_frame(
                header.opcode,
                payload,
                compression.window_bits,
                compression.level,
                compression.mem_level,
            );
            metrics.deflated(started, payload.len(), &frame);
            Some(frame)
        });
        deflated.as_ref().unwrap_or(plain)
    }

    fn encode(&self, format: DeliveryFormat) -> Bytes {
        notices::message(format, &self.topic.name, self.seq, &self.payload)
    }
}

/// One topic: its sequence, history and the shards that want it.
pub(crate) struct Topic {
    pub(crate) name: Arc<str>,
    /// The numbering its seqs belong to. In memory: random and nonzero, fixed when the topic
    /// is made (so a restarted process or a topic made again has another). With Redis: the
    /// epoch the bridge last saw for it (0 before it saw any).
    pub(crate) epoch: AtomicU64,
    /// With Redis: the last seq this host's bridge forwarded or sequenced (in memory the
    /// state's `next_seq` says it).
    pub(crate) seen: AtomicU64,
    pub(crate) state: Mutex<TopicState>,
    pub(crate) dropped: AtomicU64,
}

impl Topic {
    pub(crate) fn new(name: Arc<str>) -> Self {
        Self {
            name,
            epoch: AtomicU64::new(new_epoch()),
            seen: AtomicU64::new(0),
            state: Mutex::new(TopicState {
                next_seq: 1,
                history: VecDeque::new(),
                history_bytes: 0,
                snapshot: None,
                interest: Vec::new(),
                last_active: Instant::now(),
                removed: false,
                queued: false,
            }),
            dropped: AtomicU64::new(0),
        }
    }
}

/// A fresh epoch: random in `1..=MAX_EPOCH` (never 0, and exact as a JavaScript number).
pub(crate) fn new_epoch() -> u64 {
    fastrand::u64(1..=envelope::MAX_EPOCH)
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topic").field("name", &self.name).finish()
    }
}

pub(crate) struct TopicState {
    /// The seq the next message gets; the first is 1.
    pub(crate) next_seq: u64,
    /// The last messages, oldest first, with consecutive seqs.
    pub(crate) history: VecDeque<Arc<Published>>,
    pub(crate) history_bytes: usize,
    /// `history` as one shared slice, made by the first replay after the history changed and
    /// shared by every replay until the next change: a subscriber's replay costs one
    /// reference count under the lock, not one per message.
    pub(crate) snapshot: Option<Arc<[Arc<Published>]>>,
    /// Shards with at least one local subscriber (every backend: expiry reads it).
    pub(crate) interest: Vec<u16>,
    /// The last publish, or the moment the last subscriber left: a topic with no interest
    /// expires `pubsub.topic_idle_timeout` after it.
    pub(crate) last_active: Instant,
    /// Expired: no longer in the registry. Whoever holds this `Arc` looks the name up again
    /// (`Hub::topic`), so nothing is published to or attached to a topic nobody can reach.
    pub(crate) removed: bool,
    /// In the hub's expiry queue.
    pub(crate) queued: bool,
}

/// The messages a new subscriber is replayed: a shared history slice from `from` on.
#[derive(Debug, Clone, Default)]
pub(crate) struct Replay {
    msgs: Option<Arc<[Arc<Published>]>>,
    from: usize,
}

impl Replay {
    /// The messages of `msgs` from index `from` on.
    pub(crate) fn new(msgs: Arc<[Arc<Published>]>, from: usize) -> Self {
        Self {
            from: from.min(msgs.len()),
            msgs: Some(msgs),
        }
    }

    /// How many messages it replays.
    pub(crate) fn len(&self) -> usize {
        self.msgs.as_ref().map_or(0, |m| m.len() - self.from)
    }

    /// The messages, oldest first.
    pub(crate) fn messages(&self) -> &[Arc<Published>] {
        self.msgs.as_ref().map_or(&[], |m| &m[self.from..])
    }
}

/// What a shard learns when a connection subscribes.
#[derive(Debug)]
pub(crate) struct Attach {
    /// Messages from this seq on reach the shard through its inbox; older ones in the inbox
    /// are not for the new subscriber.
    pub(crate) live_from: u64,
    /// History to replay to the new subscriber (seq `since + 1` up to `live_from - 1`).
    pub(crate) replay: Replay,
    /// How many messages `replay` held.
    pub(crate) replayed: usize,
    /// `since` was older than the history (or from a different history or epoch): the oldest
    /// seq the client will get.
    pub(crate) reset: Option<u64>,
    /// The topic's epoch (0: not known yet, a backend that answers later).
    pub(crate) epoch: u64,
}

/// Where the outcome of a publish goes when the backend sequences it later.
#[derive(Debug)]
#[cfg_attr(
    not(feature = "redis"),
    allow(dead_code, reason = "only Redis reads it")
)]
pub(crate) enum ReplyTo {
    /// Nobody waits (a handler's `Ctx::publish`); a failure is only counted.
    Nobody,
    /// A broker client's publish request: its ack or error goes on the control lane.
    Conn {
        conn: crate::ConnId,
        id: Option<u64>,
        dialect: Dialect,
    },
    /// A thread blocked in [`Publisher::publish`].
    Thread(crossbeam_channel::Sender<Result<PublishReceipt, PublishError>>),
}

/// What became of a publish handed to the backend.
#[derive(Debug)]
pub(crate) enum Publish {
    /// Sequenced and handed to the shards.
    Done(PublishReceipt),
    /// Handed to the backend; its outcome goes where the `ReplyTo` said. `saturated` as in
    /// [`PublishReceipt`].
    Pending { saturated: bool },
}

/// What a backend with its own thread tells a shard, in the shard's inbox beside the
/// deliveries (so in order with them).
#[derive(Debug)]
#[cfg_attr(
    not(feature = "redis"),
    allow(dead_code, reason = "only Redis sends these")
)]
pub(crate) enum BackendMsg {
    /// The answer to an attach that was `Pending`.
    Attached(Box<Attached>),
    /// An ack or error for a broker client's publish, for its control lane.
    Reply { conn: crate::ConnId, frame: Bytes },
    /// `count` messages of `topic` up to seq `last` will never come: subscribers that
    /// expected them get a `dropped` notice.
    Gap {
        topic: Arc<Topic>,
        count: u64,
        last: u64,
    },
    /// The topic's seq started over in a new `epoch` (the backend lost its data):
    /// subscribers get a `reset` notice and take messages from `next` on.
    Rebase {
        topic: Arc<Topic>,
        next: u64,
        epoch: u64,
    },
}

/// A pending attach's answer.
#[derive(Debug)]
pub(crate) struct Attached {
    pub(crate) topic: Arc<Topic>,
    /// The token the shard gave with the attach.
    pub(crate) token: u64,
    /// Live messages from this seq on follow in the inbox.
    pub(crate) live_from: u64,
    /// History after the subscriber's `since`, up to `live_from - 1`.
    pub(crate) replay: Vec<Arc<Published>>,
    /// As [`Attach::reset`].
    pub(crate) reset: Option<u64>,
    /// The topic's epoch.
    pub(crate) epoch: u64,
}

/// What a shard learns when a connection subscribes.
#[derive(Debug)]
pub(crate) enum AttachStart {
    /// At once (in-memory backend).
    Ready(Attach),
    /// Later, as `ShardMsg::Backend(BackendMsg::Attached)` with the attach's token; until
    /// then the subscriber gets no topic messages.
    Pending,
}
