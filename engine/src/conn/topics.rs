//! A shard's side of pub/sub, the part that needs the connection table: subscribe and
//! unsubscribe, delivery of one published message to every local subscriber, a backend's
//! answers (`handle_backend`), and the move of data-ring messages onto the socket's queue.
//!
//! The per-connection state itself ([`ConnPubSub`], the data ring, drop notices, budgets) is
//! `pubsub/data_ring.rs`. The data ring is the only place topic data may be dropped: acks,
//! errors and notices go straight onto the connection's outbound queue (the lossless control
//! lane).

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering::Relaxed, Arc},
    time::Instant,
};

use bytes::Bytes;
use ringcast_protocol::{
    envelope::{self, Dialect, Encoding},
    CloseCode, Codec, FrameHeader,
};

use crate::pubsub::data_ring::{ConnPubSub, Item, LocalTopic, Offer, Sub, PENDING};
use crate::pubsub::notices;
use crate::{
    config::RingOverflow,
    conn::table::{ConnTable, Phase},
    ops::metrics::ShardMetrics,
    pubsub::topic::{Attach, AttachStart, Attached, BackendMsg, Published, Replay, Topic},
    types::{
        clock::When,
        message::{CloseInitiator, SubscribeError},
        publish::{DeliveryFormat, PublishError},
    },
};

impl ConnTable {
    /// The connection's pub/sub state, made on first use.
    pub(crate) fn pubsub(&mut self, key: usize) -> &mut ConnPubSub {
        let settings = &self.settings.pubsub;
        self.conns[key]
            .pubsub
            .get_or_insert_with(|| Box::new(ConnPubSub::new(settings)))
    }

    /// The hub's topic for `name`, from the local table when this shard already has it.
    pub(crate) fn local_topic(&self, name: &str) -> Option<Arc<Topic>> {
        let &id = self.topics.by_name.get(name)?;
        Some(self.topics.topics[id as usize].topic.clone())
    }

    /// Subscribes connection `key` to `topic`; a repeated subscription starts over (so a
    /// `since` replays again). Queues the replay onto the data ring.
    ///
    /// # Errors
    /// `TooManySubscriptions` at `pubsub.max_subscriptions_per_connection`;
    /// `TooManyTopics` when the topic expired meanwhile and cannot be made again now.
    pub(crate) fn subscribe(
        &mut self,
        key: usize,
        topic: Arc<Topic>,
        since: Option<u64>,
        epoch: Option<u64>,
    ) -> Result<Attach, SubscribeError> {
        if self.is_subscribed(key, &topic.name) {
            self.unsubscribe(key, &topic.name);
        }
        let max = self.settings.pubsub.max_subscriptions_per_connection;
        if self.pubsub(key).subs.len() >= max {
            return Err(SubscribeError::TooManySubscriptions);
        }
        let shard = self.shard.0;
        let existing = self.topics.by_name.get(&*topic.name).copied();
        self.topics.last_token += 1;
        let token = self.topics.last_token;
        let (fresh, start) = self
            .hub
            .attach(&topic, shard, existing.is_none(), since, epoch, token)
            .map_err(|e| match e {
                PublishError::BadTopic(why) => SubscribeError::BadTopic(why),
                _ => SubscribeError::TooManyTopics,
            })?;
        // The topic expired between the lookup and the attach: the one made again counts.
        let topic = fresh.unwrap_or(topic);
        let id = match existing {
            Some(id) => id,
            None => {
                let id = self.topics.topics.insert(LocalTopic {
                    topic: topic.clone(),
                    subs: Vec::new(),
                    pending: Vec::new(),
                }) as u32;
                self.topics.by_name.insert(topic.name.clone(), id);
                id
            }
        };
        let mut attach = match start {
            AttachStart::Ready(attach) => attach,
            AttachStart::Pending => {
                self.topics.topics[id as usize]
                    .pending
                    .push((token, key as u32));
                Attach {
                    live_from: PENDING,
                    replay: Replay::default(),
                    replayed: 0,
                    reset: None,
                    epoch: self.hub.known_epoch(&topic),
                }
            }
        };
        let local = &mut self.topics.topics[id as usize];
        let index = local.subs.len() as u32;
        local.subs.push(Sub {
            key: key as u32,
            live_from: attach.live_from,
        });
        self.pubsub(key).subs.push((id, index));
        let replay = std::mem::take(&mut attach.replay);
        for msg in replay.messages() {
            if let Offer::Disconnect = self.offer(key, id, msg) {
                self.slow_consumer(key);
                break;
            }
        }
        self.notify(key, usize::MAX);
        Ok(attach)
    }

    fn is_subscribed(&self, key: usize, name: &str) -> bool {
        let Some(&id) = self.topics.by_name.get(name) else {
            return false;
        };
        self.conns[key]
            .pubsub
            .as_ref()
            .is_some_and(|ps| ps.subs.iter().any(|&(t, _)| t == id))
    }

    /// Ends connection `key`'s subscription to `name`; false if it had none. Its messages of
    /// that topic still in the ring are dropped with it (the client asked to stop).
    pub(crate) fn unsubscribe(&mut self, key: usize, name: &str) -> bool {
        let Some(&id) = self.topics.by_name.get(name) else {
            return false;
        };
        let Some(ps) = self.conns[key].pubsub.as_mut() else {
            return false;
        };
        let Some(pos) = ps.subs.iter().position(|&(t, _)| t == id) else {
            return false;
        };
        let (_, index) = ps.subs.swap_remove(pos);
        let mut freed = 0;
        ps.data_ring.retain(|item| {
            let keep = item.topic != id;
            if !keep {
                freed += item.frame.len();
            }
            keep
        });
        ps.data_ring_bytes -= freed;
        ps.drops.retain(|d| d.topic != id);
        self.remove_sub(id, index);
        true
    }

    /// Ends every subscription of connection `key` (it is closing).
    pub(crate) fn unsubscribe_all(&mut self, key: usize) {
        let Some(ps) = self.conns[key].pubsub.as_mut() else {
            return;
        };
        let subs = std::mem::take(&mut ps.subs);
        ps.data_ring.clear();
        ps.data_ring_bytes = 0;
        ps.drops.clear();
        for (id, index) in subs {
            self.remove_sub(id, index);
        }
    }

    /// Removes the subscriber at `index` of local topic `id`, fixing the back-pointer of the
    /// one moved into its place, and the topic itself when it was the last.
    fn remove_sub(&mut self, id: u32, index: u32) {
        let local = &mut self.topics.topics[id as usize];
        let gone = local.subs.swap_remove(index as usize);
        if gone.live_from == PENDING {
            local.pending.retain(|&(_, key)| key != gone.key);
        }
        if let Some(moved) = local.subs.get(index as usize) {
            let moved_key = moved.key as usize;
            if let Some(ps) = self.conns[moved_key].pubsub.as_mut() {
                if let Some(entry) = ps.subs.iter_mut().find(|(t, _)| *t == id) {
                    entry.1 = index;
                }
            }
        }
        if local.subs.is_empty() {
            let local = self.topics.topics.remove(id as usize);
            self.topics.by_name.remove(&*local.topic.name);
            self.hub.detach(&local.topic, self.shard.0);
        }
    }

    /// Queues one published message to every local subscriber of its topic.
    pub(crate) fn deliver(&mut self, msg: &Published) {
        let Some(&id) = self.topics.by_name.get(&*msg.topic.name) else {
            return; // the last subscriber left while it was on its way
        };
        let mut slow = Vec::new();
        let count = self.topics.topics[id as usize].subs.len();
        for i in 0..count {
            let sub = self.topics.topics[id as usize].subs[i];
            if msg.seq < sub.live_from {
                continue;
            }
            let key = sub.key as usize;
            match self.offer(key, id, msg) {
                Offer::Queued => self.notify(key, usize::MAX),
                Offer::Disconnect => slow.push(key),
            }
        }
        self.metrics.deliveries.add(count as u64);
        for key in slow {
            self.slow_consumer(key);
        }
    }

    /// Handles an answer or notice from a backend with its own thread.
    pub(crate) fn handle_backend(&mut self, msg: BackendMsg) {
        match msg {
            BackendMsg::Attached(attached) => self.attached(*attached),
            BackendMsg::Reply { conn, frame } => {
                if let Some(key) = self.key_of(conn) {
                    self.push_control(key, frame);
                }
            }
            BackendMsg::Gap { topic, count, last } => {
                let Some(&id) = self.topics.by_name.get(&*topic.name) else {
                    return;
                };
                let first = last + 1 - count;
                let subs = self.topics.topics[id as usize].subs.clone();
                for sub in subs {
                    let from = first.max(sub.live_from);
                    if sub.live_from == PENDING || from > last {
                        continue;
                    }
                    let key = sub.key as usize;
                    if let Some(ps) = self.conns[key].pubsub.as_mut() {
                        ps.note_drops(id, &topic.name, last - from + 1, last);
                    }
                    self.notify(key, usize::MAX);
                }
            }
            BackendMsg::Rebase { topic, next, epoch } => {
                let Some(&id) = self.topics.by_name.get(&*topic.name) else {
                    return;
                };
                let mut keys = Vec::new();
                for sub in &mut self.topics.topics[id as usize].subs {
                    if sub.live_from != PENDING {
                        sub.live_from = next;
                        keys.push(sub.key as usize);
                    }
                }
                for key in keys {
                    // What the data ring holds of the old numbering was handed over before the
                    // new one began: it goes out first. The reset travels on the control lane,
                    // which would otherwise overtake it (a reset, then old seqs, then 1..).
                    // Rare (Redis lost its data), and the ring is bounded.
                    self.refill_within(key, usize::MAX);
                    if let Some(ps) = self.conns[key].pubsub.as_mut() {
                        // Drops counted in the old numbering mean nothing in the new one.
                        ps.drops.retain(|d| d.topic != id);
                    }
                    self.reset_notice(key, &topic.name, next, epoch);
                }
            }
        }
    }

    /// A pending subscriber's replay arrived: queue it, then let live messages through.
    fn attached(&mut self, a: Attached) {
        let Some(&id) = self.topics.by_name.get(&*a.topic.name) else {
            return; // every subscriber left meanwhile
        };
        let local = &mut self.topics.topics[id as usize];
        let Some(pos) = local.pending.iter().position(|&(t, _)| t == a.token) else {
            return; // this subscriber left meanwhile
        };
        let (_, key) = local.pending.swap_remove(pos);
        if let Some(sub) = local.subs.iter_mut().find(|s| s.key == key) {
            sub.live_from = a.live_from;
        }
        let key = key as usize;
        if let Some(oldest) = a.reset {
            self.reset_notice(key, &a.topic.name, oldest, a.epoch);
        }
        for msg in &a.replay {
            if let Offer::Disconnect = self.offer(key, id, msg) {
                self.slow_consumer(key);
                return;
            }
        }
        self.notify(key, usize::MAX);
    }

    /// The dialect of connection `key`'s notices and replies, if it takes the envelope: its
    /// delivery encoding, binary version 2 when that is the subprotocol it chose.
    pub(crate) fn reply_dialect(&self, key: usize) -> Option<Dialect> {
        let conn = &self.conns[key];
        match conn.pubsub.as_ref()?.format {
            DeliveryFormat::Envelope(Encoding::Binary)
                if conn.info().subprotocol() == Some(envelope::BINARY_V2_SUBPROTOCOL) =>
            {
                Some(Dialect::BinaryV2)
            }
            DeliveryFormat::Envelope(enc) => Some(enc.into()),
            DeliveryFormat::Raw => None,
        }
    }

    /// Queues a `reset` notice for an envelope subscriber.
    fn reset_notice(&mut self, key: usize, topic: &str, oldest: u64, epoch: u64) {
        if let Some(d) = self.reply_dialect(key) {
            self.push_control(key, notices::reset(d, topic, oldest, epoch));
        }
    }

    /// Queues a frame on connection `key`'s control lane (never dropped).
    pub(crate) fn push_control(&mut self, key: usize, frame: Bytes) {
        let conn = &mut self.conns[key];
        if !matches!(&conn.phase, Phase::Open(codec) if codec.can_send()) {
            return;
        }
        conn.out.push_encoded(frame);
        self.metrics.messages_out.incr();
        self.notify(key, usize::MAX);
    }

    /// Puts `msg` on connection `key`'s data ring, applying its overflow policy.
    fn offer(&mut self, key: usize, topic: u32, msg: &Published) -> Offer {
        let max_messages = self.settings.pubsub.ring_max_messages;
        let max_bytes = self.settings.pubsub.ring_max_bytes;
        let topics = &self.topics;
        let metrics = &self.metrics;
        let conn = &mut self.conns[key];
        let Phase::Open(codec) = &conn.phase else {
            return Offer::Queued; // closing: it would never be sent
        };
        if !codec.can_send() {
            return Offer::Queued;
        }
        let Some(ps) = conn.pubsub.as_mut() else {
            return Offer::Queued;
        };
        let frame = msg
            .frame_for(ps.format, codec, &self.settings.compression, metrics)
            .clone();
        let len = frame.len();
        let fits = |ps: &ConnPubSub| {
            ps.data_ring.is_empty()
                || (ps.data_ring.len() < max_messages && ps.data_ring_bytes + len <= max_bytes)
        };
        if !fits(ps) {
            let mut dropped = 0u64;
            match ps.overflow {
                RingOverflow::Disconnect => return Offer::Disconnect,
                RingOverflow::DropNewest => {
                    ps.note_drop(topic, &msg.topic.name, msg.seq);
                    msg.topic.dropped.fetch_add(1, Relaxed);
                    metrics.ring_dropped.incr();
                    metrics.ring_dropped_newest.incr();
                    return Offer::Queued;
                }
                RingOverflow::Conflate => {
                    if let Some(pos) = ps.data_ring.iter().rposition(|it| it.topic == topic) {
                        let old = &mut ps.data_ring[pos];
                        let old_seq = old.seq;
                        ps.data_ring_bytes = ps.data_ring_bytes - old.frame.len() + len;
                        *old = Item {
                            frame,
                            seq: msg.seq,
                            topic,
                            at: msg.at,
                        };
                        ps.note_drop(topic, &msg.topic.name, old_seq);
                        msg.topic.dropped.fetch_add(1, Relaxed);
                        metrics.ring_dropped.incr();
                        metrics.ring_dropped_conflated.incr();
                        return Offer::Queued;
                    }
                }
                RingOverflow::DropOldest => {}
            }
            // Drop the oldest until the new one fits.
            while !fits(ps) {
                let Some(old) = ps.data_ring.pop_front() else {
                    break;
                };
                ps.data_ring_bytes -= old.frame.len();
                let local = &topics.topics[old.topic as usize];
                local.topic.dropped.fetch_add(1, Relaxed);
                ps.note_drop(old.topic, &local.topic.name, old.seq);
                dropped += 1;
            }
            metrics.ring_dropped.add(dropped);
            metrics.ring_dropped_oldest.add(dropped);
        }
        ps.data_ring_bytes += len;
        ps.data_ring.push_back(Item {
            frame,
            seq: msg.seq,
            topic,
            at: msg.at,
        });
        Offer::Queued
    }

    /// Samples this shard's data rings: messages and bytes waiting over all connections, and
    /// the age of the oldest waiting message, into the shard's gauges. O(connections): run
    /// once per readiness canary (default once a second), about a millisecond per 100,000
    /// connections.
    pub(crate) fn sample_rings(&mut self, now: When) {
        let (mut messages, mut bytes, mut oldest) = (0u64, 0u64, None::<u64>);
        for (_, conn) in &self.conns {
            let Some(ps) = conn.pubsub.as_ref() else {
                continue;
            };
            messages += ps.data_ring.len() as u64;
            bytes += ps.data_ring_bytes as u64;
            if let Some(first) = ps.data_ring.front() {
                let at = first.at.as_nanos();
                oldest = Some(oldest.map_or(at, |o| o.min(at)));
            }
        }
        let lag_us = oldest.map_or(0, |at| now.as_nanos().saturating_sub(at) / 1000);
        self.metrics.ring_waiting_messages.set(messages);
        self.metrics.ring_waiting_bytes.set(bytes);
        self.metrics.subscriber_lag_max_us.set(lag_us);
    }

    /// Closes a connection whose ring overflowed under the disconnect policy.
    fn slow_consumer(&mut self, key: usize) {
        self.metrics.slow_consumer_closes.incr();
        if let Some(ps) = self.conns[key].pubsub.as_mut() {
            ps.data_ring.clear();
            ps.data_ring_bytes = 0;
        }
        tracing::debug!(conn = %self.id_of(key), "slow consumer: data ring full");
        self.close(
            key,
            CloseCode::POLICY,
            "slow consumer",
            CloseInitiator::Server,
            usize::MAX,
        );
    }

    /// Moves topic messages from connection `key`'s data ring onto its outbound queue while
    /// less than the write window is queued there, each preceded by the drop notice owed for
    /// its topic. Called by the drivers before they write. Returns true if messages are
    /// still waiting (the window is full).
    pub(crate) fn refill(&mut self, key: usize) -> bool {
        self.refill_within(key, self.settings.pubsub.write_window_bytes)
    }

    /// Before a drain's close frame: a must-deliver connection (`disconnect` policy) has its
    /// whole data ring moved onto the outbound queue, ahead of the close; a loss-tolerant one
    /// keeps a write window's worth and drops the rest. Returns (moved, dropped) messages.
    pub(crate) fn flush_for_close(&mut self, key: usize) -> (u64, u64) {
        let Some(ps) = self.conns[key].pubsub.as_ref() else {
            return (0, 0);
        };
        let (waiting, must) = (ps.data_ring.len(), ps.overflow == RingOverflow::Disconnect);
        if waiting == 0 {
            return (0, 0);
        }
        let window = match must {
            true => usize::MAX,
            false => self.settings.pubsub.write_window_bytes,
        };
        self.refill_within(key, window);
        let Some(ps) = self.conns[key].pubsub.as_mut() else {
            return (0, 0);
        };
        let dropped = ps.data_ring.len();
        // Every drop is announced, as on overflow: the notices go out after what was moved
        // (the ring is empty now, so the refill below only writes them).
        while let Some(item) = ps.data_ring.pop_front() {
            let local = &self.topics.topics[item.topic as usize];
            local.topic.dropped.fetch_add(1, Relaxed);
            ps.note_drop(item.topic, &local.topic.name, item.seq);
        }
        ps.data_ring_bytes = 0;
        self.refill_within(key, window);
        ((waiting - dropped) as u64, dropped as u64)
    }

    fn refill_within(&mut self, key: usize, window: usize) -> bool {
        let conn = &mut self.conns[key];
        let Some(ps) = conn.pubsub.as_mut() else {
            return false;
        };
        // Nothing may follow a close frame.
        let Phase::Open(codec) = &mut conn.phase else {
            return false;
        };
        if !codec.can_send() {
            return false;
        }
        // Context takeover (dedicated): each message is compressed for this connection as it
        // leaves the ring, the only point after which it is never dropped.
        let dedicated = codec
            .deflate_params()
            .is_some_and(|p| !p.server_no_context_takeover);
        if ps.data_ring.is_empty() && ps.drops.is_empty() {
            return false;
        }
        let encoding = match ps.format {
            DeliveryFormat::Envelope(enc) => Some(enc),
            DeliveryFormat::Raw => None,
        };
        // The lag: how old the first (oldest) message moved is. Once per batch, not per
        // message: per message it cost 10-15% of the per-delivery CPU in the broadcast bench.
        if conn.out.len_bytes() < window {
            if let Some(oldest) = ps.data_ring.front() {
                let now = When::from_instant(Instant::now()).as_nanos();
                let age = now.saturating_sub(oldest.at.as_nanos());
                self.metrics.queued_latency.record_nanos(age);
            }
        }
        while conn.out.len_bytes() < window {
            let Some(item) = ps.data_ring.pop_front() else {
                break;
            };
            ps.data_ring_bytes -= item.frame.len();
            // Every gap of this topic before this message, announced as one: nothing of the
            // topic was delivered between them, or their notices would have gone already.
            if let Some((name, count, _)) = ps.take_gaps(item.topic, item.seq) {
                if let Some(enc) = encoding {
                    conn.out
                        .push_encoded(notices::dropped(enc, &name, count, item.seq));
                }
            }
            let frame = if dedicated {
                compress_for(codec, item.frame, &self.metrics)
            } else {
                item.frame
            };
            conn.out.push_encoded(frame);
            if ps.write_mark.is_none() {
                ps.write_mark = Some((item.at, conn.out.len_bytes()));
            }
            self.metrics.messages_out.incr();
        }
        if ps.data_ring.is_empty() {
            // The gaps after the last message of each topic: one notice per topic.
            while let Some(topic) = ps.drops.first().map(|d| d.topic) {
                let (name, count, last) =
                    ps.take_gaps(topic, u64::MAX).expect("the topic has a gap");
                if let Some(enc) = encoding {
                    conn.out
                        .push_encoded(notices::dropped(enc, &name, count, last + 1));
                }
            }
            if ps.data_ring.capacity() > 64 {
                ps.data_ring = VecDeque::new();
            }
        }
        !ps.data_ring.is_empty()
    }
}

/// `frame` (a plain server frame) compressed with `codec`'s own context when it reaches the
/// threshold; otherwise, or if it is compressed already, `frame` itself.
fn compress_for(codec: &mut Codec, frame: Bytes, metrics: &ShardMetrics) -> Bytes {
    let Ok(Some((header, header_len))) = FrameHeader::parse(&frame) else {
        return frame;
    };
    let payload = &frame[header_len..];
    if header.rsv != 0 || !codec.compresses(payload.len()) {
        return frame;
    }
    let started = Instant::now();
    let Some(out) = codec.compressed_message(header.opcode, payload) else {
        return frame;
    };
    metrics
        .deflate_nanos
        .add(started.elapsed().as_nanos() as u64);
    metrics.deflate_messages.incr();
    metrics.deflate_bytes_in.add(payload.len() as u64);
    let body = FrameHeader::parse(&out)
        .ok()
        .flatten()
        .map_or(0, |(h, _)| h.payload_len);
    metrics.deflate_bytes_out.add(body);
    out
}
