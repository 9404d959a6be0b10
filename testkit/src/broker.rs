//! The broker's envelope client: one client for every test that speaks the pub/sub protocol,
//! and one honesty checker for what a subscriber receives.

use std::{collections::HashMap, net::SocketAddr};

use ringcast_protocol::envelope::{self, AckPosition, Dialect, ServerMessage};
use tungstenite::Message as WsMessage;

use crate::ws::{connect_with, Client};

/// One envelope from the server, owned, with the fields the tests compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    /// A topic message.
    Message {
        /// The topic.
        topic: String,
        /// Its seq.
        seq: u64,
        /// The payload bytes as published (JSON text for a JSON payload).
        data: Vec<u8>,
    },
    /// An ack, with the request's id.
    Ack(Option<u64>),
    /// An error reply.
    Error {
        /// The request's id.
        id: Option<u64>,
        /// The error code's wire name.
        code: String,
    },
    /// A reset notice.
    Reset {
        /// The topic.
        topic: String,
        /// The next seq delivered.
        oldest: u64,
        /// The topic's epoch, when the dialect carries it.
        epoch: Option<u64>,
    },
    /// A dropped notice.
    Dropped {
        /// The topic.
        topic: String,
        /// How many messages were skipped.
        count: u64,
        /// The next seq delivered.
        next: u64,
    },
    /// The shutdown notice, with its reason.
    Shutdown(String),
    /// A pong, with the ping's id.
    Pong(Option<u64>),
}

impl Got {
    /// The owned form of a decoded server message.
    pub fn from_server(message: ServerMessage<'_>) -> Self {
        match message {
            ServerMessage::Message {
                topic,
                seq,
                payload,
            } => Self::Message {
                topic: topic.into_owned(),
                seq,
                data: payload.bytes.into_owned(),
            },
            ServerMessage::Ack { id, .. } => Self::Ack(id),
            ServerMessage::Error { id, code, .. } => Self::Error {
                id,
                code: code.into_owned(),
            },
            ServerMessage::Reset {
                topic,
                oldest,
                epoch,
            } => Self::Reset {
                topic: topic.into_owned(),
                oldest,
                epoch,
            },
            ServerMessage::Dropped { topic, count, next } => Self::Dropped {
                topic: topic.into_owned(),
                count,
                next,
            },
            ServerMessage::Shutdown { reason } => Self::Shutdown(reason.into_owned()),
            ServerMessage::Pong { id } => Self::Pong(id),
        }
    }

    /// A message's data as UTF-8 text (panics on anything else).
    pub fn text(&self) -> &str {
        match self {
            Self::Message { data, .. } => std::str::from_utf8(data).expect("UTF-8 data"),
            other => panic!("not a message: {other:?}"),
        }
    }
}

/// A client of the broker over a real WebSocket, speaking one dialect.
#[derive(Debug)]
pub struct BrokerClient {
    /// The WebSocket, for sending or reading frames the helpers do not cover.
    pub ws: Client,
    /// The dialect the server selected.
    pub dialect: Dialect,
    /// The last frame's bytes (what [`BrokerClient::recv`] decoded).
    pub last: Vec<u8>,
}

impl BrokerClient {
    /// Connects to `/` asking for `dialect`'s subprotocol; asserts the server selected it.
    pub fn connect(addr: SocketAddr, dialect: Dialect) -> Self {
        Self::connect_to(addr, "/", dialect, &[])
    }

    /// Connects to `path` with extra headers, asking for `dialect`; asserts it was selected.
    pub fn connect_to(
        addr: SocketAddr,
        path: &str,
        dialect: Dialect,
        headers: &[(&str, &str)],
    ) -> Self {
        let mut all = vec![("Sec-WebSocket-Protocol", dialect.subprotocol())];
        all.extend_from_slice(headers);
        let (ws, response) = connect_with(addr, path, &all)
            .unwrap_or_else(|e| panic!("upgrade to {addr}{path}: {e}"));
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap()),
            Some(dialect.subprotocol()),
            "the server selected the asked subprotocol"
        );
        Self::from_ws(ws, dialect)
    }

    /// Wraps an upgraded WebSocket that negotiated `dialect`.
    pub fn from_ws(ws: Client, dialect: Dialect) -> Self {
        Self {
            ws,
            dialect,
            last: Vec::new(),
        }
    }

    /// Sends one request, encoded in this client's encoding.
    pub fn send(&mut self, request: &envelope::Request<'_>) {
        let bytes = envelope::encode_request(self.dialect.encoding(), request);
        let frame = match self.dialect {
            Dialect::Json => WsMessage::text(String::from_utf8(bytes).expect("JSON is UTF-8")),
            Dialect::BinaryV1 | Dialect::BinaryV2 => WsMessage::binary(bytes),
        };
        self.ws.send(frame).expect("send");
    }

    /// Buffers one request without flushing it: requests written this way and then sent by
    /// [`BrokerClient::flush`] leave in one write, so the server reads them together (a
    /// pipelining client, whatever the machine's load).
    pub fn write(&mut self, request: &envelope::Request<'_>) {
        let bytes = envelope::encode_request(self.dialect.encoding(), request);
        let frame = match self.dialect {
            Dialect::Json => WsMessage::text(String::from_utf8(bytes).expect("JSON is UTF-8")),
            Dialect::BinaryV1 | Dialect::BinaryV2 => WsMessage::binary(bytes),
        };
        self.ws.write(frame).expect("write");
    }

    /// Sends every request buffered by [`BrokerClient::write`].
    pub fn flush(&mut self) {
        self.ws.flush().expect("flush");
    }

    /// Sends a JSON text frame as is (for requests the encoder would not produce).
    pub fn send_json(&mut self, json: &str) {
        self.ws.send(WsMessage::text(json)).expect("send");
    }

    /// The next frame's bytes (pings and pongs skipped); panics on a close, naming it.
    pub fn next_bytes(&mut self) -> Vec<u8> {
        loop {
            let bytes = match self.ws.read() {
                Ok(WsMessage::Text(t)) => t.as_bytes().to_vec(),
                Ok(WsMessage::Binary(b)) => b.to_vec(),
                Ok(WsMessage::Close(c)) => panic!("closed: {c:?}"),
                Ok(_) => continue,
                Err(e) => panic!("read: {e}"),
            };
            self.last.clone_from(&bytes);
            return bytes;
        }
    }

    /// The next envelope, decoded (the bytes stay in [`BrokerClient::last`]).
    pub fn next_message(&mut self) -> ServerMessage<'_> {
        self.next_bytes();
        envelope::decode_server(self.dialect, &self.last).expect("a server envelope")
    }

    /// The next envelope, owned.
    pub fn recv(&mut self) -> Got {
        let message = self.next_message();
        Got::from_server(message)
    }

    /// The next envelope, which must be an ack for `id`; returns its position.
    pub fn expect_ack(&mut self, id: u64) -> AckPosition<'static> {
        match self.next_message() {
            ServerMessage::Ack {
                id: Some(got),
                position,
            } if got == id => match position {
                AckPosition::Plain => AckPosition::Plain,
                AckPosition::Publish { epoch, seq } => AckPosition::Publish { epoch, seq },
                AckPosition::Subscribe(topics) => AckPosition::Subscribe(
                    topics
                        .into_iter()
                        .map(|t| envelope::TopicPosition {
                            topic: t.topic.into_owned().into(),
                            epoch: t.epoch,
                            seq: t.seq,
                        })
                        .collect(),
                ),
            },
            other => panic!("expected the ack of {id}, got {other:?}"),
        }
    }

    /// Subscribes to `topic` (from `since` when given) and waits for the ack.
    pub fn subscribe(&mut self, id: u64, topic: &str, since: Option<u64>) {
        self.send(&subscribe_request(id, &[(topic, since)]));
        self.expect_ack(id);
    }

    /// Publishes JSON `data` to `topic` and returns the reply (an ack or an error; topic
    /// messages arriving first are returned too, so a subscriber-publisher reads in order).
    pub fn publish_json(&mut self, id: u64, topic: &str, data: &str) -> Got {
        self.send(&envelope::Request::Publish {
            id: Some(id),
            topic: topic.into(),
            payload: envelope::Data::new(envelope::DataKind::Json, data.as_bytes()),
        });
        self.recv()
    }

    /// Reads topic messages until one carries `last` as its data; returns every message's seq
    /// and data. Anything else than a message fails the test.
    pub fn read_until(&mut self, last: &str) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        loop {
            match self.recv() {
                Got::Message { seq, data, .. } => {
                    let data = String::from_utf8(data).expect("UTF-8 data");
                    let done = data == last;
                    out.push((seq, data));
                    if done {
                        return out;
                    }
                }
                other => panic!("unexpected {other:?} after {} messages", out.len()),
            }
        }
    }

    /// Reads until the server's close frame and returns its code and reason; every envelope
    /// before it is returned too (a shutdown notice, say).
    pub fn until_close(&mut self) -> (Vec<Got>, u16, String) {
        let mut before = Vec::new();
        loop {
            match self.ws.read() {
                Ok(WsMessage::Close(Some(frame))) => {
                    return (before, u16::from(frame.code), frame.reason.to_string())
                }
                Ok(WsMessage::Close(None)) => panic!("a close frame without a code"),
                Ok(WsMessage::Text(t)) => before.push(Got::from_server(
                    envelope::decode_server(self.dialect, t.as_bytes()).expect("envelope"),
                )),
                Ok(WsMessage::Binary(b)) => before.push(Got::from_server(
                    envelope::decode_server(self.dialect, &b).expect("envelope"),
                )),
                Ok(_) => continue,
                Err(e) => panic!("no close frame after {before:?}: {e}"),
            }
        }
    }
}

/// A subscribe request for `topics`, each with its `since`.
pub fn subscribe_request<'a>(id: u64, topics: &[(&'a str, Option<u64>)]) -> envelope::Request<'a> {
    envelope::Request::Subscribe {
        id: Some(id),
        topics: topics
            .iter()
            .map(|&(topic, since)| envelope::SubscribeTopic {
                topic: topic.into(),
                since,
                epoch: None,
            })
            .collect(),
    }
}

/// What one topic's stream has shown so far.
#[derive(Debug, Clone, Default)]
struct TopicState {
    /// The seq the next message must carry (a notice moves it).
    expected: u64,
    /// How many resets were seen.
    epoch: u32,
    /// (epoch, seq) of every message, in order.
    messages: Vec<(u32, u64)>,
    notices: usize,
}

/// The one honesty checker: what a subscriber receives, topic by topic, has no gap and no
/// repeat that is not announced. Each message carries the seq expected next; a `dropped`
/// notice moves that expectation by exactly its count (to its `next`); a `reset` starts a new
/// numbering at its `oldest`. Acks, errors, pongs and shutdown notices are not its business and
/// are ignored.
#[derive(Debug, Clone, Default)]
pub struct Honesty {
    topics: HashMap<String, TopicState>,
}

impl Honesty {
    /// A checker expecting every topic to start at seq 1.
    pub fn new() -> Self {
        Self::default()
    }

    /// Expects `topic` to continue after `seq` (a subscription with `since: seq`).
    pub fn resume(&mut self, topic: &str, seq: u64) {
        self.state(topic).expected = seq + 1;
    }

    fn state(&mut self, topic: &str) -> &mut TopicState {
        self.topics
            .entry(topic.to_owned())
            .or_insert_with(|| TopicState {
                expected: 1,
                ..TopicState::default()
            })
    }

    /// Checks one envelope; panics naming the broken rule.
    pub fn observe(&mut self, got: &Got) {
        match got {
            Got::Message { topic, seq, .. } => {
                let state = self.state(topic);
                assert_eq!(
                    *seq, state.expected,
                    "{topic}: seq {seq} where {} was next, with no notice",
                    state.expected
                );
                state.messages.push((state.epoch, *seq));
                state.expected += 1;
            }
            Got::Dropped { topic, count, next } => {
                let state = self.state(topic);
                assert_eq!(
                    state.expected + count,
                    *next,
                    "{topic}: a dropped notice of {count} from {} must name {} next",
                    state.expected,
                    state.expected + count
                );
                state.expected = *next;
                state.notices += 1;
            }
            Got::Reset { topic, oldest, .. } => {
                let state = self.state(topic);
                state.epoch += 1;
                state.expected = *oldest;
                state.notices += 1;
            }
            Got::Ack(_) | Got::Error { .. } | Got::Pong(_) | Got::Shutdown(_) => {}
        }
    }

    /// Checks every envelope in order.
    pub fn observe_all<'a>(&mut self, events: impl IntoIterator<Item = &'a Got>) {
        for got in events {
            self.observe(got);
        }
    }

    /// The seq `topic`'s next message must carry.
    pub fn expected(&self, topic: &str) -> u64 {
        self.topics.get(topic).map_or(1, |s| s.expected)
    }

    /// (epoch, seq) of every message of `topic` seen, in order; the epoch counts resets.
    pub fn messages(&self, topic: &str) -> Vec<(u32, u64)> {
        self.topics
            .get(topic)
            .map_or_else(Vec::new, |s| s.messages.clone())
    }

    /// How many messages of `topic` were seen.
    pub fn message_count(&self, topic: &str) -> usize {
        self.topics.get(topic).map_or(0, |s| s.messages.len())
    }

    /// How many dropped and reset notices `topic` had.
    pub fn notices(&self, topic: &str) -> usize {
        self.topics.get(topic).map_or(0, |s| s.notices)
    }

    /// Whether `topic` has been accounted for up to and including `last`: its next expected
    /// seq is past it (every message up to `last` was delivered or announced as dropped).
    pub fn accounted(&self, topic: &str, last: u64) -> bool {
        self.expected(topic) > last
    }
}

/// A live client beside an attack: on its own thread it subscribes to a topic of its own,
/// then every `interval` publishes to it and times the round trip from the publish to both
/// its ack and the message coming back. [`LiveProbe::finish`] stops it and reports.
///
/// ```no_run
/// # let addr: std::net::SocketAddr = "127.0.0.1:9000".parse().unwrap();
/// let probe = ringcast_testkit::broker::LiveProbe::start(addr, "live.probe");
/// // ... the attack ...
/// let report = probe.finish();
/// assert!(report.p99() < std::time::Duration::from_millis(50), "{report}");
/// ```
#[derive(Debug)]
pub struct LiveProbe {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<LiveReport>>,
}

/// What a [`LiveProbe`] measured.
#[derive(Debug, Clone, Default)]
pub struct LiveReport {
    /// Every round trip, in order.
    pub rounds: Vec<std::time::Duration>,
    /// Why the probe stopped early (a read or write failed, an error reply), if it did.
    pub failure: Option<String>,
}

impl LiveProbe {
    /// Connects (JSON dialect), subscribes to `topic` and returns once subscribed; rounds
    /// every 50 ms from then on.
    pub fn start(addr: SocketAddr, topic: &str) -> Self {
        Self::start_every(addr, topic, std::time::Duration::from_millis(50))
    }

    /// As [`LiveProbe::start`], one round every `interval` (the next starts at once when a
    /// round took longer).
    pub fn start_every(addr: SocketAddr, topic: &str, interval: std::time::Duration) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        use std::time::Instant;
        let mut client = BrokerClient::connect(addr, Dialect::Json);
        client.subscribe(1, topic, None);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let topic = topic.to_owned();
        let thread = std::thread::spawn(move || {
            let mut report = LiveReport::default();
            let start = Instant::now();
            let mut id = 1u64;
            while !stopped.load(Relaxed) {
                id += 1;
                let data = id.to_string();
                let sent = Instant::now();
                match round(&mut client, id, &topic, &data) {
                    Ok(()) => report.rounds.push(sent.elapsed()),
                    Err(why) => {
                        report.failure = Some(why);
                        break;
                    }
                }
                let next = start + interval * (report.rounds.len() as u32);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            report
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the probe after its current round and returns what it measured.
    pub fn finish(mut self) -> LiveReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .unwrap_or_else(|_| LiveReport {
                failure: Some("the probe thread panicked".into()),
                ..LiveReport::default()
            })
    }
}

impl Drop for LiveProbe {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One publish, then reads until both its ack and its message came back.
fn round(client: &mut BrokerClient, id: u64, topic: &str, data: &str) -> Result<(), String> {
    client.send(&envelope::Request::Publish {
        id: Some(id),
        topic: topic.into(),
        payload: envelope::Data::new(envelope::DataKind::Json, data.as_bytes()),
    });
    let (mut acked, mut echoed) = (false, false);
    while !(acked && echoed) {
        let bytes = match client.ws.read() {
            Ok(WsMessage::Text(t)) => t.as_bytes().to_vec(),
            Ok(WsMessage::Binary(b)) => b.to_vec(),
            Ok(WsMessage::Close(c)) => return Err(format!("closed: {c:?}")),
            Ok(_) => continue,
            Err(e) => return Err(format!("read after {id} rounds: {e}")),
        };
        let got = envelope::decode_server(client.dialect, &bytes)
            .map(Got::from_server)
            .map_err(|e| format!("not an envelope: {e}"))?;
        match got {
            Got::Ack(Some(got)) if got == id => acked = true,
            Got::Message { data: d, .. } if d == data.as_bytes() => echoed = true,
            Got::Error { code, .. } => return Err(format!("publish {id} refused: {code}")),
            _ => {}
        }
    }
    Ok(())
}

impl LiveReport {
    /// The longest round trip (zero with none).
    pub fn worst(&self) -> std::time::Duration {
        self.rounds.iter().copied().max().unwrap_or_default()
    }

    /// The 99th percentile round trip (nearest rank; zero with none).
    pub fn p99(&self) -> std::time::Duration {
        let mut sorted = self.rounds.clone();
        sorted.sort_unstable();
        let rank = (sorted.len() * 99).div_ceil(100);
        sorted
            .get(rank.saturating_sub(1))
            .copied()
            .unwrap_or_default()
    }

    /// Panics, naming the figures, unless the probe ran to the end with at least `rounds`
    /// rounds.
    pub fn assert_ran(&self, rounds: usize) {
        assert!(self.failure.is_none(), "the live client failed: {self}");
        assert!(
            self.rounds.len() >= rounds,
            "the live client made {} rounds, fewer than {rounds}: {self}",
            self.rounds.len()
        );
    }
}

impl std::fmt::Display for LiveReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} rounds, p99 {:?}, worst {:?}",
            self.rounds.len(),
            self.p99(),
            self.worst()
        )?;
        if let Some(why) = &self.failure {
            write!(f, ", stopped: {why}")?;
        }
        Ok(())
    }
}
