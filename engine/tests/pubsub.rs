//! Pub/sub through the built-in broker with real clients: the JSON and binary envelopes,
//! ordering across shards and publisher threads, resume with `since`, each overflow policy,
//! malformed requests, the broadcast server, and thousands of subscribers in child processes.

mod util;

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use proptest::prelude::*;
use ringcast::{
    protocol::{
        envelope::{self, AckPosition, Dialect, Encoding, ServerMessage},
        CloseCode,
    },
    Broadcast, Broker, Driver, Engine, EngineConfig, Payload, PublishError, Publisher,
    RingOverflow,
};
use tungstenite::{protocol::frame::coding::CloseCode as TCloseCode, Message as TMessage};
use util::{config, Client, DEADLINE};

fn broker(config: EngineConfig) -> Engine {
    Engine::start(config, |_| Broker::new()).expect("start")
}

/// A client of the broker speaking `encoding`.
fn client(addr: SocketAddr, path: &str, encoding: Encoding) -> Client {
    let (ws, resp) = util::connect_with(
        addr,
        path,
        &[("Sec-WebSocket-Protocol", encoding.subprotocol())],
    )
    .expect("upgrade");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some(encoding.subprotocol())
    );
    ws
}

fn send_json(ws: &mut Client, json: &str) {
    ws.send(TMessage::text(json)).expect("send");
}

/// The next envelope from the server, as an owned value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Message {
        topic: String,
        seq: u64,
        data: Vec<u8>,
    },
    Ack(Option<u64>),
    Error {
        id: Option<u64>,
        code: String,
    },
    Reset {
        topic: String,
        oldest: u64,
    },
    Dropped {
        topic: String,
        count: u64,
        next: u64,
    },
    Pong(Option<u64>),
    Other(String),
}

fn next(ws: &mut Client, encoding: Encoding) -> Got {
    loop {
        let msg = ws.read().expect("read");
        let bytes = match msg {
            TMessage::Text(t) => t.as_bytes().to_vec(),
            TMessage::Binary(b) => b.to_vec(),
            TMessage::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        };
        let parsed = envelope::decode_server(encoding, &bytes).expect("server envelope");
        return match parsed {
            ServerMessage::Message {
                topic,
                seq,
                payload,
            } => Got::Message {
                topic: topic.to_string(),
                seq,
                data: payload.bytes.to_vec(),
            },
            ServerMessage::Ack { id, .. } => Got::Ack(id),
            ServerMessage::Error { id, code, .. } => Got::Error {
                id,
                code: code.to_string(),
            },
            ServerMessage::Reset { topic, oldest, .. } => Got::Reset {
                topic: topic.to_string(),
                oldest,
            },
            ServerMessage::Dropped { topic, count, next } => Got::Dropped {
                topic: topic.to_string(),
                count,
                next,
            },
            ServerMessage::Pong { id } => Got::Pong(id),
            other => Got::Other(format!("{other:?}")),
        };
    }
}

fn subscribe(ws: &mut Client, id: u64, topic: &str, since: Option<u64>) {
    let since = since.map_or(String::new(), |s| format!(",\"since\":{s}"));
    send_json(
        ws,
        &format!(r#"{{"type":"subscribe","id":{id},"topic":"{topic}"{since}}}"#),
    );
    assert_eq!(next(ws, Encoding::Json), Got::Ack(Some(id)));
}

fn json(s: &str) -> Payload {
    Payload::json(s.to_owned()).unwrap()
}

/// Publishes, retrying while the engine reports saturation (bounded by the deadline).
fn publish(publisher: &Publisher, topic: &str, payload: Payload) -> u64 {
    let start = Instant::now();
    loop {
        match publisher.publish(topic, payload.clone()) {
            Ok(r) => return r.seq,
            Err(PublishError::Saturated) => {
                assert!(start.elapsed() < DEADLINE, "saturated for too long");
                thread::yield_now();
            }
            Err(e) => panic!("publish: {e}"),
        }
    }
}

#[test]
fn json_clients_subscribe_publish_and_receive_in_the_documented_shape() {
    let engine = broker(config(1));
    let addr = engine.local_addr();
    let mut sub = client(addr, "/", Encoding::Json);
    let mut publ = client(addr, "/", Encoding::Json);
    subscribe(&mut sub, 1, "prices.BTC", None);
    send_json(
        &mut publ,
        r#"{"type":"publish","id":3,"topic":"prices.BTC","data":{"bid":42.5}}"#,
    );
    assert_eq!(next(&mut publ, Encoding::Json), Got::Ack(Some(3)));
    let TMessage::Text(text) = sub.read().unwrap() else {
        panic!("text expected")
    };
    assert_eq!(
        text.as_str(),
        r#"{"type":"message","topic":"prices.BTC","seq":1,"data":{"bid":42.5}}"#
    );
    send_json(&mut sub, r#"{"type":"ping","id":9}"#);
    assert_eq!(next(&mut sub, Encoding::Json), Got::Pong(Some(9)));
    send_json(
        &mut sub,
        r#"{"type":"unsubscribe","id":2,"topic":"prices.BTC"}"#,
    );
    assert_eq!(next(&mut sub, Encoding::Json), Got::Ack(Some(2)));
    send_json(
        &mut sub,
        r#"{"type":"unsubscribe","id":4,"topic":"prices.BTC"}"#,
    );
    assert_eq!(
        next(&mut sub, Encoding::Json),
        Got::Error {
            id: Some(4),
            code: "not_subscribed".into()
        }
    );
    engine.stop().unwrap();
}

#[test]
fn a_browser_without_a_subprotocol_speaks_json() {
    let engine = broker(config(1));
    let mut ws = util::connect(engine.local_addr(), "/");
    subscribe(&mut ws, 1, "t", None);
    engine.stop().unwrap();
}

#[test]
fn binary_clients_get_the_binary_envelope_and_json_clients_the_same_message() {
    let engine = broker(config(2));
    let addr = engine.local_addr();
    let mut bin = client(addr, "/", Encoding::Binary);
    let mut js = client(addr, "/", Encoding::Json);
    let req = envelope::Request::Subscribe {
        id: Some(7),
        topics: vec![envelope::SubscribeTopic {
            topic: "t".into(),
            since: None,
            epoch: None,
        }],
    };
    bin.send(TMessage::binary(envelope::encode_request(
        Encoding::Binary,
        &req,
    )))
    .unwrap();
    assert_eq!(next(&mut bin, Encoding::Binary), Got::Ack(Some(7)));
    subscribe(&mut js, 1, "t", None);
    let publisher = engine.handle().publisher();
    publish(&publisher, "t", Payload::Binary(vec![0, 1, 2, 255].into()));
    publish(&publisher, "t", json("[1,2]"));
    match next(&mut bin, Encoding::Binary) {
        Got::Message { seq: 1, data, .. } => assert_eq!(data, [0, 1, 2, 255]),
        other => panic!("{other:?}"),
    }
    match next(&mut bin, Encoding::Binary) {
        Got::Message { seq: 2, data, .. } => assert_eq!(data, b"[1,2]"),
        other => panic!("{other:?}"),
    }
    let TMessage::Text(first) = js.read().unwrap() else {
        panic!()
    };
    assert_eq!(
        first.as_str(),
        r#"{"type":"message","topic":"t","seq":1,"data_b64":"AAEC/w=="}"#
    );
    assert_eq!(
        next(&mut js, Encoding::Json),
        Got::Message {
            topic: "t".into(),
            seq: 2,
            data: b"[1,2]".to_vec()
        }
    );
    engine.stop().unwrap();
}

/// Connects broker clients until every shard holds at least `per_shard` of them.
fn clients_on_every_shard(engine: &Engine, per_shard: usize) -> Vec<Client> {
    let handle = engine.handle();
    let mut clients = Vec::new();
    for _ in 0..200 {
        let counts: Vec<u64> = handle
            .metrics()
            .shards
            .iter()
            .map(|s| s.connections_active)
            .collect();
        if counts.iter().all(|&c| c as usize >= per_shard) {
            return clients;
        }
        clients.push(client(engine.local_addr(), "/", Encoding::Json));
        let want = clients.len() as u64;
        util::wait_until("the connection to count", || {
            handle.metrics().total().connections_active >= want
        });
    }
    panic!("could not place {per_shard} clients on every shard");
}

#[test]
fn every_subscriber_on_every_shard_sees_one_order_with_two_publisher_threads() {
    let engine = broker(config(2));
    let mut subs = clients_on_every_shard(&engine, 2);
    for (i, ws) in subs.iter_mut().enumerate() {
        subscribe(ws, i as u64, "orders", None);
    }
    const EACH: u64 = 2000;
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let publisher = engine.handle().publisher();
            thread::spawn(move || {
                for i in 0..EACH {
                    publish(&publisher, "orders", json(&format!("[{p},{i}]")));
                }
            })
        })
        .collect();
    let mut orders = Vec::new();
    for ws in &mut subs {
        let mut order = Vec::new();
        let mut last_of = [None::<u64>; 2];
        for expected_seq in 1..=2 * EACH {
            match next(ws, Encoding::Json) {
                Got::Message { seq, data, .. } => {
                    assert_eq!(seq, expected_seq, "gap or reorder");
                    let v: (usize, u64) = serde_json::from_slice(&data).unwrap();
                    // Each publisher's own messages stay in its order.
                    assert!(last_of[v.0].is_none_or(|l| l < v.1));
                    last_of[v.0] = Some(v.1);
                    order.push(v);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        orders.push(order);
    }
    for p in publishers {
        p.join().unwrap();
    }
    assert!(
        orders.windows(2).all(|w| w[0] == w[1]),
        "subscribers disagree on the order"
    );
    engine.stop().unwrap();
}

/// Reads messages of `topic` until `seq == last`, checking that seqs increase by one from
/// `from`; returns them.
fn read_run(ws: &mut Client, from: u64, last: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    let mut expect = from;
    while expect <= last {
        match next(ws, Encoding::Json) {
            Got::Message { seq, .. } => {
                assert_eq!(seq, expect, "gap or duplicate");
                seen.push(seq);
                expect += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    seen
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    /// A publisher runs throughout; the client drops its connection at random points and
    /// resumes with `since` = the last seq it saw, on whichever shard it lands.
    #[test]
    fn resume_with_since_has_no_gap_and_no_duplicate(cuts in prop::collection::vec(1u64..60, 1..4)) {
        let engine = broker(config(2));
        let addr = engine.local_addr();
        let publisher = engine.handle().publisher();
        const TOTAL: u64 = 300;
        let mut ws = client(addr, "/", Encoding::Json);
        subscribe(&mut ws, 0, "feed", Some(0));
        let feed = thread::spawn(move || {
            for i in 0..TOTAL {
                publish(&publisher, "feed", json(&i.to_string()));
                if i % 16 == 0 {
                    thread::sleep(Duration::from_micros(200)); // spread over the cuts
                }
            }
        });
        let mut last = 0;
        for (n, cut) in cuts.iter().enumerate() {
            let upto = (last + cut).min(TOTAL);
            read_run(&mut ws, last + 1, upto);
            last = upto;
            drop(ws); // no close handshake: a dropped connection
            ws = client(addr, "/", Encoding::Json);
            subscribe(&mut ws, n as u64 + 1, "feed", Some(last));
        }
        read_run(&mut ws, last + 1, TOTAL);
        feed.join().unwrap();
        engine.stop().unwrap();
    }
}

#[test]
fn since_older_than_history_gets_a_reset_then_the_oldest_held() {
    let mut cfg = config(1);
    cfg.pubsub.history_max_messages = 10;
    let engine = broker(cfg);
    let publisher = engine.handle().publisher();
    for i in 0..50 {
        publish(&publisher, "h", json(&i.to_string()));
    }
    let mut ws = client(engine.local_addr(), "/", Encoding::Json);
    subscribe(&mut ws, 1, "h", Some(5));
    assert_eq!(
        next(&mut ws, Encoding::Json),
        Got::Reset {
            topic: "h".into(),
            oldest: 41
        }
    );
    read_run(&mut ws, 41, 50);
    // And a since from the future (another history) is reset to where this one stands.
    let mut other = client(engine.local_addr(), "/", Encoding::Json);
    subscribe(&mut other, 1, "h", Some(500));
    assert_eq!(
        next(&mut other, Encoding::Json),
        Got::Reset {
            topic: "h".into(),
            oldest: 51
        }
    );
    engine.stop().unwrap();
}

/// A subscriber that does not read: a raw socket with the upgrade and a subscribe sent.
fn stalled_subscriber(addr: SocketAddr, path: &str, topics: &[&str]) -> TcpStream {
    let mut s = util::raw(addr);
    let req = util::upgrade_request(path).replace(
        "\r\n\r\n",
        "\r\nSec-WebSocket-Protocol: ringcast.v1.json\r\n\r\n",
    );
    s.write_all(req.as_bytes()).unwrap();
    for (i, t) in topics.iter().enumerate() {
        let sub = format!(r#"{{"type":"subscribe","id":{i},"topic":"{t}"}}"#);
        s.write_all(&util::client_frame(1, true, sub.as_bytes()))
            .unwrap();
    }
    s
}

/// A stalled subscriber to `topic`, once its subscription has reached the hub.
fn subscribed_stalled(engine: &Engine, path: &str, topic: &str) -> TcpStream {
    let stalled = stalled_subscriber(engine.local_addr(), path, &[topic]);
    util::wait_until("the subscription", || {
        engine
            .handle()
            .publisher()
            .topic_stats(topic)
            .is_some_and(|s| s.interested_shards == 1)
    });
    stalled
}

/// Reads frames off a raw stream: the 101 first, then server frames until `done` says stop.
struct RawReader {
    stream: TcpStream,
    buf: bytes::BytesMut,
    codec: ringcast::protocol::Codec,
    upgraded: bool,
}

impl RawReader {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            buf: bytes::BytesMut::new(),
            codec: ringcast::protocol::Codec::client(Default::default(), 1),
            upgraded: false,
        }
    }

    /// The next message's payload, or the close code.
    fn next(&mut self) -> Result<Vec<u8>, CloseCode> {
        use ringcast::protocol::Event;
        loop {
            if !self.upgraded {
                if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    assert!(self.buf.starts_with(b"HTTP/1.1 101"));
                    let _ = self.buf.split_to(end + 4);
                    self.upgraded = true;
                    continue;
                }
            } else {
                match self.codec.poll_event(&mut self.buf).expect("valid frames") {
                    Some(Event::Text(t)) => return Ok(t.as_bytes().to_vec()),
                    Some(Event::Binary(b)) => return Ok(b.to_vec()),
                    Some(Event::Close(c)) => return Err(c.map_or(CloseCode::NO_STATUS, |c| c.code)),
                    Some(_) => continue,
                    None => {}
                }
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "closed without a close frame");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn next_json(&mut self) -> Result<Got, CloseCode> {
        let bytes = self.next()?;
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        Ok(match v["type"].as_str().unwrap() {
            "message" => Got::Message {
                topic: v["topic"].as_str().unwrap().into(),
                seq: v["seq"].as_u64().unwrap(),
                data: v["data"].to_string().into_bytes(),
            },
            "ack" => Got::Ack(v["id"].as_u64()),
            "dropped" => Got::Dropped {
                topic: v["topic"].as_str().unwrap().into(),
                count: v["count"].as_u64().unwrap(),
                next: v["next"].as_u64().unwrap(),
            },
            other => Got::Other(other.into()),
        })
    }
}

/// Publishes 16 KiB messages round-robin over `topics` until the stalled connection's ring
/// has dropped (or closed), then `extra` more; returns the last seq per topic.
fn flood(
    engine: &Engine,
    topics: &[&str],
    extra: usize,
    until: impl Fn(&Engine) -> bool,
) -> HashMap<String, u64> {
    let publisher = engine.handle().publisher();
    let payload = format!("\"{}\"", "x".repeat(16 << 10));
    let mut last = HashMap::new();
    let start = Instant::now();
    let mut i = 0usize;
    let mut after = None;
    loop {
        let topic = topics[i % topics.len()];
        let seq = publish(&publisher, topic, json(&payload));
        last.insert(topic.to_string(), seq);
        i += 1;
        if after.is_none() && until(engine) {
            after = Some(i);
        }
        if after.is_some_and(|a| i >= a + extra) {
            return last;
        }
        assert!(start.elapsed() < DEADLINE, "the ring never overflowed");
    }
}

fn overflow_config() -> EngineConfig {
    let mut cfg = config(1);
    cfg.pubsub.ring_max_messages = 8;
    cfg.pubsub.write_window_bytes = 16 << 10;
    cfg
}

fn dropped(engine: &Engine) -> bool {
    engine.handle().metrics().total().ring_dropped > 0
}

/// Reads everything a stalled subscriber got, checking that each topic's seqs only go up and
/// that every gap is announced, just before it, by a dropped notice with its exact count and
/// next seq. Returns (messages per topic, notices).
fn check_honest(
    reader: &mut RawReader,
    acks: usize,
    last: &HashMap<String, u64>,
) -> (usize, usize) {
    for _ in 0..acks {
        assert!(matches!(reader.next_json(), Ok(Got::Ack(_))));
    }
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut owed: HashMap<String, (u64, u64)> = HashMap::new();
    let (mut messages, mut notices) = (0, 0);
    while last.iter().any(|(t, &l)| {
        seen.get(t).copied().unwrap_or(0) < l && owed.get(t).is_none_or(|&(_, next)| next <= l)
    }) {
        match reader.next_json().expect("open") {
            Got::Message { topic, seq, .. } => {
                let prev = seen.get(&topic).copied().unwrap_or(0);
                assert!(seq > prev, "{topic}: {seq} after {prev}");
                match owed.remove(&topic) {
                    Some((count, next)) => {
                        assert_eq!(next, seq, "the notice named the next seq");
                        assert_eq!(count, seq - prev - 1, "the notice counted the gap");
                    }
                    None => assert_eq!(seq, prev + 1, "{topic}: a gap without a notice"),
                }
                seen.insert(topic, seq);
                messages += 1;
            }
            Got::Dropped { topic, count, next } => {
                notices += 1;
                owed.insert(topic, (count, next));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    for (topic, (count, next)) in owed {
        // A notice after the last message: the gap runs to the end.
        let prev = seen.get(&topic).copied().unwrap_or(0);
        assert_eq!(count, next - prev - 1);
        assert_eq!(next, last[&topic] + 1);
    }
    (messages, notices)
}

#[test]
fn drop_oldest_delivers_the_newest_with_an_honest_notice() {
    let engine = broker(overflow_config());
    let stalled = subscribed_stalled(&engine, "/?overflow=drop-oldest", "a");
    let last = flood(&engine, &["a"], 20, dropped);
    let mut reader = RawReader::new(stalled);
    let (messages, notices) = check_honest(&mut reader, 1, &last);
    assert!(
        notices >= 1 && messages >= 8,
        "{messages} messages, {notices} notices"
    );
    engine.stop().unwrap();
}

#[test]
fn ring_occupancy_lag_and_drops_by_policy_are_reported() {
    let mut cfg = overflow_config();
    cfg.http.canary_interval = Duration::from_millis(50);
    let engine = broker(cfg);
    let _stalled = subscribed_stalled(&engine, "/?overflow=drop-oldest", "a");
    flood(&engine, &["a"], 20, dropped);
    // Keep publishing until the kernel's socket buffers are full and messages wait in the
    // ring when a canary samples it.
    let publisher = engine.handle().publisher();
    let payload = format!("\"{}\"", "x".repeat(16 << 10));
    util::wait_until("the rings sampled", || {
        publish(&publisher, "a", json(&payload));
        let t = engine.handle().metrics().total();
        t.ring_waiting_messages > 0 && t.subscriber_lag_max_us > 0
    });
    let t = engine.handle().metrics().total();
    assert!(t.ring_waiting_messages <= 8, "bounded by the ring");
    assert!(t.ring_waiting_bytes >= t.ring_waiting_messages * (16 << 10));
    assert_eq!(t.ring_dropped_oldest, t.ring_dropped);
    assert_eq!(t.ring_dropped_newest + t.ring_dropped_conflated, 0);
    if cfg!(feature = "metrics") {
        let (_, _, body) = util::http_get(engine.local_addr(), "GET /metrics HTTP/1.1");
        let scrape = util::parse_metrics(&body);
        assert!(util::metric_sum(&scrape, "ringcast_ring_waiting_messages", &[]) > 0.0);
        assert!(util::metric_sum(&scrape, "ringcast_ring_dropped_oldest_total", &[]) > 0.0);
    }
    engine.stop().unwrap();
}

#[test]
fn drop_newest_keeps_the_prefix_and_says_what_was_lost() {
    let engine = broker(overflow_config());
    let stalled = subscribed_stalled(&engine, "/?overflow=drop-newest", "a");
    let last = flood(&engine, &["a"], 20, dropped);
    let mut reader = RawReader::new(stalled);
    let (_, notices) = check_honest(&mut reader, 1, &last);
    // Usually one gap, at the end; a second when the kernel's socket buffers grew mid-flood
    // and let the ring empty between drops. Each is announced (checked above).
    assert!(notices >= 1, "the gap was announced");
    engine.stop().unwrap();
}

#[test]
fn conflate_keeps_the_latest_per_topic() {
    let engine = broker(overflow_config());
    let stalled = stalled_subscriber(engine.local_addr(), "/?overflow=conflate", &["a", "b"]);
    util::wait_until("the subscriptions", || {
        let p = engine.handle().publisher();
        ["a", "b"]
            .iter()
            .all(|t| p.topic_stats(t).is_some_and(|s| s.interested_shards == 1))
    });
    let last = flood(&engine, &["a", "b"], 40, dropped);
    let mut reader = RawReader::new(stalled);
    let (_, notices) = check_honest(&mut reader, 2, &last);
    assert!(notices >= 2, "both topics conflated");
    engine.stop().unwrap();
}

#[test]
fn disconnect_policy_closes_a_slow_consumer_with_1008() {
    let engine = broker(overflow_config());
    let stalled = subscribed_stalled(&engine, "/?overflow=disconnect", "a");
    flood(&engine, &["a"], 0, |e| {
        e.handle().metrics().total().slow_consumer_closes > 0
    });
    let mut reader = RawReader::new(stalled);
    let code = loop {
        match reader.next() {
            Ok(_) => continue,
            Err(code) => break code,
        }
    };
    assert_eq!(code, CloseCode::POLICY);
    engine.stop().unwrap();
}

#[test]
fn a_stalled_reader_does_not_slow_the_others_and_stays_bounded_on_io_uring() {
    stalled_reader_does_not_slow_the_others(Driver::IoUring);
}

#[test]
#[cfg(feature = "epoll")]
fn a_stalled_reader_does_not_slow_the_others_and_stays_bounded_on_epoll() {
    stalled_reader_does_not_slow_the_others(Driver::Epoll);
}

fn stalled_reader_does_not_slow_the_others(driver: Driver) {
    let mut cfg = config(2).with_driver(driver);
    cfg.pubsub.ring_max_bytes = 256 << 10;
    let engine = broker(cfg);
    let addr = engine.local_addr();
    let _stalled = stalled_subscriber(addr, "/", &["wide"]);
    let mut fast = client(addr, "/?overflow=disconnect", Encoding::Json);
    subscribe(&mut fast, 1, "wide", None);
    util::wait_until("both subscriptions", || {
        engine.handle().metrics().total().connections_active == 2
    });
    let publisher = engine.handle().publisher();
    const COUNT: u64 = 6000;
    const SIZE: u64 = 4 << 10;
    let payload = format!("\"{}\"", "y".repeat(SIZE as usize));
    // The feed runs at the fast client's pace: at most 32 messages ahead of what it has read.
    let received = Arc::new(AtomicU64::new(0));
    let feed = {
        let received = received.clone();
        thread::spawn(move || {
            for i in 0..COUNT {
                let start = Instant::now();
                while i > received.load(Relaxed) + 32 {
                    assert!(
                        start.elapsed() < DEADLINE,
                        "the fast client stopped reading"
                    );
                    thread::yield_now();
                }
                publish(&publisher, "wide", json(&payload));
            }
        })
    };
    // The fast client gets every message, in order, however far behind the stalled one is
    // (its policy is disconnect: one drop would close it).
    for seq in 1..=COUNT {
        match next(&mut fast, Encoding::Json) {
            Got::Message { seq: got, .. } => assert_eq!(got, seq),
            other => panic!("unexpected {other:?}"),
        }
        received.store(seq, Relaxed);
    }
    feed.join().unwrap();
    let total = engine.handle().metrics().total();
    let stats = engine.handle().publisher().topic_stats("wide").unwrap();
    // 24 MiB went out; the stalled connection holds at most its ring, the write window and
    // the kernel's socket buffers (both ends, bounded by the sysctl maxima), and dropped the
    // rest: well under half of it.
    let sysctl_max = |name: &str| -> u64 {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse().ok())
            .unwrap_or(8 << 20)
    };
    let kept_bound = (256 << 10) + (64 << 10) + sysctl_max("tcp_wmem") + sysctl_max("tcp_rmem");
    let kept = (COUNT - stats.dropped) * SIZE;
    assert!(
        kept < kept_bound && kept < COUNT * SIZE / 2,
        "the stalled reader kept {kept} bytes of {} (dropped {}); bound {kept_bound}",
        COUNT * SIZE,
        stats.dropped
    );
    assert_eq!(total.slow_consumer_closes, 0);
    engine.stop().unwrap();
}

#[test]
fn malformed_requests_get_errors_naming_their_id_then_a_1008() {
    let mut cfg = config(1);
    cfg.pubsub.max_bad_requests = 8;
    let engine = broker(cfg);
    let mut ws = client(engine.local_addr(), "/", Encoding::Json);
    let cases: [(&str, Option<u64>, &str); 7] = [
        ("not json", None, "bad_request"),
        (r#"{"type":"fly","id":1}"#, Some(1), "unknown_type"),
        (r#"{"type":"subscribe","id":2}"#, Some(2), "bad_request"),
        (
            r#"{"type":"subscribe","id":3,"topic":"has space"}"#,
            Some(3),
            "bad_topic",
        ),
        (
            r#"{"type":"publish","id":4,"topic":"t"}"#,
            Some(4),
            "bad_request",
        ),
        (
            r#"{"type":"subscribe","id":5,"topic":"t","since":"x"}"#,
            Some(5),
            "bad_request",
        ),
        (r#"[1,2]"#, None, "bad_request"),
    ];
    for (text, id, code) in cases {
        send_json(&mut ws, text);
        assert_eq!(
            next(&mut ws, Encoding::Json),
            Got::Error {
                id,
                code: code.into()
            },
            "for {text}"
        );
    }
    // A binary message on the JSON subprotocol is refused, not a disconnect.
    ws.send(TMessage::binary(vec![1, 2, 3])).unwrap();
    assert!(matches!(next(&mut ws, Encoding::Json), Got::Error { .. }));
    // Still usable.
    subscribe(&mut ws, 10, "t", None);
    // The budget (8, refilled at 1/s) runs out within a few more.
    let mut closed = None;
    for _ in 0..20 {
        if ws.send(TMessage::text("garbage")).is_err() {
            break;
        }
        match ws.read() {
            Ok(TMessage::Close(Some(frame))) => {
                closed = Some(frame);
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let frame = closed.expect("closed with a close frame");
    assert_eq!(frame.code, TCloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "too many bad requests");
    engine.stop().unwrap();
}

#[test]
fn publish_budget_refuses_with_rate_limited_then_pauses_the_publisher() {
    let mut cfg = config(1);
    cfg.pubsub.publish_rate_per_sec = 1;
    cfg.pubsub.publish_burst = 3;
    let engine = broker(cfg);
    let mut ws = client(engine.local_addr(), "/", Encoding::Json);
    let start = Instant::now();
    let mut codes = Vec::new();
    for id in 0..5 {
        send_json(
            &mut ws,
            &format!(r#"{{"type":"publish","id":{id},"topic":"t","data":1}}"#),
        );
        codes.push(next(&mut ws, Encoding::Json));
    }
    assert_eq!(
        codes,
        [
            Got::Ack(Some(0)),
            Got::Ack(Some(1)),
            Got::Ack(Some(2)),
            Got::Error {
                id: Some(3),
                code: "rate_limited".into()
            },
            // Not read until the budget held a publish again (1 per second).
            Got::Ack(Some(4)),
        ]
    );
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "the fifth publish was taken after {:?}, before the budget refilled",
        start.elapsed()
    );
    engine.stop().unwrap();
}

#[test]
fn too_many_subscriptions_is_an_error_reply() {
    let mut cfg = config(1);
    cfg.pubsub.max_subscriptions_per_connection = 2;
    let engine = broker(cfg);
    let mut ws = client(engine.local_addr(), "/", Encoding::Json);
    subscribe(&mut ws, 1, "a", None);
    subscribe(&mut ws, 2, "b", None);
    send_json(&mut ws, r#"{"type":"subscribe","id":3,"topic":"c"}"#);
    assert_eq!(
        next(&mut ws, Encoding::Json),
        Got::Error {
            id: Some(3),
            code: "too_many_subscriptions".into()
        }
    );
    engine.stop().unwrap();
}

#[test]
fn an_unknown_overflow_policy_is_a_400() {
    let engine = broker(config(1));
    let err = util::connect_with(engine.local_addr(), "/?overflow=lose-it", &[]).unwrap_err();
    match err {
        tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 400),
        other => panic!("{other:?}"),
    }
    engine.stop().unwrap();
}

#[test]
fn the_broadcast_server_delivers_every_message_to_everyone() {
    let engine = Engine::start(config(2), |_| Broadcast::default()).unwrap();
    // on_open (the subscription) runs before the 101 goes out, so once every client is
    // connected every one is subscribed.
    let mut clients: Vec<Client> = (0..3)
        .map(|_| util::connect(engine.local_addr(), "/"))
        .collect();
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(TMessage::binary(vec![i as u8; 20])).unwrap();
    }
    for ws in &mut clients {
        let mut got: Vec<u8> = (0..3)
            .map(|_| match ws.read().unwrap() {
                TMessage::Binary(b) => {
                    assert_eq!(b.len(), 20);
                    b[0]
                }
                other => panic!("{other:?}"),
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2]);
    }
    engine.stop().unwrap();
}

/// Child process mode: open `RINGCAST_SUBS` raw subscribers to `RINGCAST_ADDR`, report ready
/// on stdout, then read `RINGCAST_COUNT` messages on each and report success.
#[test]
fn child_subscribers() {
    let Ok(addr) = std::env::var("RINGCAST_CHILD_ADDR") else {
        return; // only meaningful when started by many_subscribers_in_child_processes
    };
    let addr: SocketAddr = addr.parse().unwrap();
    let subs: usize = std::env::var("RINGCAST_SUBS").unwrap().parse().unwrap();
    let count: u64 = std::env::var("RINGCAST_COUNT").unwrap().parse().unwrap();
    let mut readers: Vec<RawReader> = (0..subs)
        .map(|_| RawReader::new(stalled_subscriber(addr, "/", &["many"])))
        .collect();
    for r in &mut readers {
        assert_eq!(r.next_json().unwrap(), Got::Ack(Some(0)));
    }
    println!("READY");
    std::io::stdout().flush().unwrap();
    for r in &mut readers {
        for seq in 1..=count {
            match r.next_json().unwrap() {
                Got::Message { seq: got, .. } => assert_eq!(got, seq),
                other => panic!("{other:?}"),
            }
        }
    }
    println!("DONE");
}

#[test]
fn thousands_of_subscribers_in_child_processes_get_every_message() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    const CHILDREN: usize = 3;
    const SUBS: usize = 1000;
    const COUNT: u64 = 20;
    let engine = broker(config(2));
    let addr = engine.local_addr();
    let exe = std::env::current_exe().unwrap();
    let mut children: Vec<_> = (0..CHILDREN)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "child_subscribers",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("RINGCAST_CHILD_ADDR", addr.to_string())
                .env("RINGCAST_SUBS", SUBS.to_string())
                .env("RINGCAST_COUNT", COUNT.to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut outputs: Vec<_> = children
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().unwrap()).lines())
        .collect();
    for out in &mut outputs {
        loop {
            let line = out.next().expect("child output").unwrap();
            if line.contains("READY") {
                break;
            }
        }
    }
    assert_eq!(
        engine.handle().metrics().total().connections_active,
        (CHILDREN * SUBS) as u64
    );
    let publisher = engine.handle().publisher();
    for i in 0..COUNT {
        publish(&publisher, "many", json(&i.to_string()));
    }
    for (out, child) in outputs.iter_mut().zip(&mut children) {
        assert!(out.any(|l| l.unwrap().contains("DONE")), "a child failed");
        assert!(child.wait().unwrap().success());
    }
    assert!(engine.handle().metrics().total().deliveries >= COUNT * (CHILDREN * SUBS) as u64);
    engine.stop().unwrap();
}

#[test]
fn envelope_clients_get_a_shutdown_notice_then_1012() {
    let engine = broker(config(1));
    let mut ws = client(engine.local_addr(), "/", Encoding::Json);
    subscribe(&mut ws, 1, "t", None);
    engine.handle().stop();
    let TMessage::Text(text) = ws.read().unwrap() else {
        panic!("a notice first")
    };
    assert_eq!(
        text.as_str(),
        r#"{"type":"shutdown","reason":"service restart"}"#
    );
    match ws.read().unwrap() {
        TMessage::Close(Some(frame)) => assert_eq!(frame.code, TCloseCode::Restart),
        other => panic!("{other:?}"),
    }
    engine.wait().unwrap();
}

#[test]
fn overflow_names_round_trip() {
    for p in [
        RingOverflow::DropOldest,
        RingOverflow::DropNewest,
        RingOverflow::Conflate,
        RingOverflow::Disconnect,
    ] {
        assert_eq!(RingOverflow::from_name(p.name()), Some(p));
    }
}

#[test]
fn delivery_latency_is_recorded_per_stage_and_scraped_as_histograms() {
    let engine = broker(config(2));
    let addr = engine.local_addr();
    let mut ws = client(addr, "/", Encoding::Json);
    subscribe(&mut ws, 1, "lat", None);
    let publisher = engine.handle().publisher();
    for i in 0..5 {
        publish(&publisher, "lat", json(&i.to_string()));
    }
    for _ in 0..5 {
        assert!(matches!(ws.read().unwrap(), TMessage::Text(_)));
    }
    let total = engine.handle().metrics().total();
    assert_eq!(total.inbox_latency.count(), 5, "one per message per shard");
    let batches = total.queued_latency.count();
    assert!((1..=5).contains(&batches), "one per batch moved: {batches}");
    // The oldest message of a batch moved while no earlier mark is outstanding is recorded
    // once written (the send completion may be handled just after the client read it).
    util::wait_until("a written record", || {
        engine.handle().metrics().total().written_latency.count() >= 1
    });
    let written = engine.handle().metrics().total().written_latency.count();
    assert!(written <= batches, "{written} written, {batches} batches");
    let p50 = total.queued_latency.quantile_bound(0.5).expect("recorded");
    assert!(p50 < std::time::Duration::from_secs(1), "{p50:?}");
    if cfg!(feature = "metrics") {
        let (status, _, body) = util::http_get(addr, "GET /metrics HTTP/1.1");
        assert_eq!(status, 200);
        let scrape = util::parse_metrics(&body);
        for stage in ["inbox", "queued", "written"] {
            let count: u64 = scrape
                .samples
                .iter()
                .filter(|s| s.metric == "ringcast_delivery_latency_seconds")
                .filter(|s| s.labels.get("stage") == Some(stage))
                .map(|s| match &s.value {
                    prometheus_parse::Value::Histogram(buckets) => {
                        buckets.iter().map(|b| b.count).fold(0.0, f64::max) as u64
                    }
                    other => panic!("{other:?}"),
                })
                .sum();
            match stage {
                "inbox" => assert_eq!(count, 5),
                "queued" => assert_eq!(count, batches),
                // A later batch's record may land between the two reads.
                _ => assert!((written..=batches).contains(&count), "written: {count}"),
            }
        }
    }
    engine.stop().unwrap();
}

// ---- Epochs, seqs in acks, and a stopped engine ----

/// A broker client speaking `dialect`, checked to have it selected.
fn client_in(addr: SocketAddr, dialect: Dialect) -> Client {
    let (ws, resp) = util::connect_with(
        addr,
        "/",
        &[("Sec-WebSocket-Protocol", dialect.subprotocol())],
    )
    .expect("upgrade");
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some(dialect.subprotocol())
    );
    ws
}

/// The next data message's payload (pings skipped).
fn next_raw(ws: &mut Client) -> Vec<u8> {
    loop {
        match ws.read().expect("read") {
            TMessage::Text(t) => return t.as_bytes().to_vec(),
            TMessage::Binary(b) => return b.to_vec(),
            TMessage::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        }
    }
}

/// Sends `req` in `dialect`'s encoding.
fn send_req(ws: &mut Client, dialect: Dialect, req: &envelope::Request<'_>) {
    let enc = dialect.encoding();
    let bytes = envelope::encode_request(enc, req);
    let msg = match enc {
        Encoding::Json => TMessage::text(String::from_utf8(bytes).unwrap()),
        Encoding::Binary => TMessage::binary(bytes),
    };
    ws.send(msg).expect("send");
}

fn subscribe_req(
    id: u64,
    topic: &str,
    since: Option<u64>,
    epoch: Option<u64>,
) -> envelope::Request<'_> {
    envelope::Request::Subscribe {
        id: Some(id),
        topics: vec![envelope::SubscribeTopic {
            topic: topic.into(),
            since,
            epoch,
        }],
    }
}

/// Subscribes and returns the (epoch, seq) its ack reports.
fn subscribe_at(
    ws: &mut Client,
    dialect: Dialect,
    id: u64,
    topic: &str,
    since: Option<u64>,
    epoch: Option<u64>,
) -> (u64, u64) {
    send_req(ws, dialect, &subscribe_req(id, topic, since, epoch));
    let bytes = next_raw(ws);
    match envelope::decode_server(dialect, &bytes).expect("envelope") {
        ServerMessage::Ack {
            id: Some(got),
            position: AckPosition::Subscribe(entries),
        } if got == id => {
            assert_eq!(entries.len(), 1, "{entries:?}");
            assert_eq!(entries[0].topic, topic);
            assert_ne!(entries[0].epoch, 0, "0 is never an epoch");
            (entries[0].epoch, entries[0].seq)
        }
        other => panic!("expected the subscribe's ack, got {other:?}"),
    }
}

/// The next message's seq and data, in `dialect`.
fn next_message(ws: &mut Client, dialect: Dialect) -> (u64, Vec<u8>) {
    let bytes = next_raw(ws);
    match envelope::decode_server(dialect, &bytes).expect("envelope") {
        ServerMessage::Message { seq, payload, .. } => (seq, payload.bytes.to_vec()),
        other => panic!("expected a message, got {other:?}"),
    }
}

#[test]
fn acks_carry_epochs_and_seqs_and_a_restart_is_a_reset_not_a_continuation() {
    for dialect in [Dialect::Json, Dialect::BinaryV2] {
        // The first life of the server.
        let first = broker(config(1));
        let mut sub = client_in(first.local_addr(), dialect);
        let (epoch1, seq) = subscribe_at(&mut sub, dialect, 1, "t", None, None);
        assert_eq!(seq, 0, "nothing published yet");
        let mut publ = client_in(first.local_addr(), dialect);
        for i in 1..=3u64 {
            let req = envelope::Request::Publish {
                id: Some(10 + i),
                topic: "t".into(),
                payload: envelope::Data::json("1"),
            };
            send_req(&mut publ, dialect, &req);
            let bytes = next_raw(&mut publ);
            assert_eq!(
                envelope::decode_server(dialect, &bytes).unwrap(),
                ServerMessage::Ack {
                    id: Some(10 + i),
                    position: AckPosition::Publish {
                        epoch: epoch1,
                        seq: i
                    },
                },
                "{dialect:?}"
            );
        }
        for i in 1..=3 {
            assert_eq!(next_message(&mut sub, dialect).0, i);
        }
        // A second subscriber's ack says where the topic stands.
        let mut late = client_in(first.local_addr(), dialect);
        assert_eq!(
            subscribe_at(&mut late, dialect, 2, "t", None, None),
            (epoch1, 3)
        );
        first.stop().unwrap();

        // The restarted server numbers the topic from 1 again, in another epoch.
        let second = broker(config(1));
        let publisher = second.handle().publisher();
        for data in ["\"a\"", "\"b\""] {
            let receipt = publisher.publish("t", json(data)).unwrap();
            assert_ne!(receipt.epoch, epoch1);
        }
        let mut back = client_in(second.local_addr(), dialect);
        let (epoch2, seq) = subscribe_at(&mut back, dialect, 3, "t", Some(3), Some(epoch1));
        assert_ne!(epoch2, epoch1, "a new process, a new numbering");
        assert_eq!(seq, 2);
        // seq 3 of the old numbering means nothing now: a reset to the oldest held, with
        // the new epoch, then everything from there.
        let bytes = next_raw(&mut back);
        assert_eq!(
            envelope::decode_server(dialect, &bytes).unwrap(),
            ServerMessage::Reset {
                topic: "t".into(),
                oldest: 1,
                epoch: Some(epoch2),
            }
        );
        assert_eq!(next_message(&mut back, dialect), (1, b"\"a\"".to_vec()));
        assert_eq!(next_message(&mut back, dialect), (2, b"\"b\"".to_vec()));
        // The same epoch: an ordinary resume, no reset.
        let mut resumed = client_in(second.local_addr(), dialect);
        assert_eq!(
            subscribe_at(&mut resumed, dialect, 4, "t", Some(1), Some(epoch2)),
            (epoch2, 2)
        );
        assert_eq!(next_message(&mut resumed, dialect), (2, b"\"b\"".to_vec()));
        // Nothing else was queued for it.
        send_req(
            &mut resumed,
            dialect,
            &envelope::Request::Ping { id: Some(5) },
        );
        assert!(matches!(
            envelope::decode_server(dialect, &next_raw(&mut resumed)).unwrap(),
            ServerMessage::Pong { id: Some(5) }
        ));
        second.stop().unwrap();
    }
}

#[test]
fn a_binary_v1_client_gets_the_old_acks_and_resets_byte_for_byte() {
    let engine = broker(config(1));
    let addr = engine.local_addr();
    // Offering both binary versions selects v2; offering v1 alone keeps v1.
    let (_, resp) = util::connect_with(
        addr,
        "/",
        &[(
            "Sec-WebSocket-Protocol",
            "ringcast.v1.bin, ringcast.v2.bin, ringcast.v1.json",
        )],
    )
    .expect("upgrade");
    assert_eq!(
        resp.headers().get("sec-websocket-protocol").unwrap(),
        "ringcast.v2.bin"
    );
    let mut v1 = client_in(addr, Dialect::BinaryV1);
    let id = |id: u64| [&[0x01][..], &id.to_be_bytes()].concat();
    send_req(
        &mut v1,
        Dialect::BinaryV1,
        &subscribe_req(1, "t", None, None),
    );
    assert_eq!(next_raw(&mut v1), [&[0x82][..], &id(1)].concat());
    let publish = envelope::Request::Publish {
        id: Some(2),
        topic: "t".into(),
        payload: envelope::Data::json("7"),
    };
    send_req(&mut v1, Dialect::BinaryV1, &publish);
    let mut acked = false;
    let mut message = false;
    // The ack and the message travel on different lanes: take both, in either order.
    for _ in 0..2 {
        let bytes = next_raw(&mut v1);
        if bytes == [&[0x82][..], &id(2)].concat() {
            acked = true;
        } else {
            assert_eq!(
                bytes,
                [&[0x81, 0x01][..], &1u64.to_be_bytes(), &[1, b't'], b"7"].concat()
            );
            message = true;
        }
    }
    assert!(acked && message);
    // A since ahead of everything published: the v1 reset, with no epoch in it.
    let mut other = client_in(addr, Dialect::BinaryV1);
    send_req(
        &mut other,
        Dialect::BinaryV1,
        &subscribe_req(3, "t", Some(9), None),
    );
    assert_eq!(next_raw(&mut other), [&[0x82][..], &id(3)].concat());
    assert_eq!(
        next_raw(&mut other),
        [&[0x84][..], &2u64.to_be_bytes(), &[1, b't']].concat()
    );
    engine.stop().unwrap();
}

#[test]
fn a_stopped_engine_refuses_publishes() {
    let engine = broker(config(1));
    let publisher = engine.handle().publisher();
    assert_eq!(publisher.publish("t", json("1")).unwrap().seq, 1);
    engine.stop().unwrap();
    for _ in 0..3 {
        assert_eq!(
            publisher.publish("t", json("1")),
            Err(PublishError::Stopped)
        );
    }
    let topic = publisher.topic("t").unwrap();
    assert_eq!(topic.publish(json("1")), Err(PublishError::Stopped));
}
