//! The Redis broker backend against a real redis-server that each test starts on a free
//! loopback port: two engines sharing topics through it, resume on the other host, and
//! Redis killed and restarted mid-stream. Skipped (with a line on stderr) only where
//! redis-server is not installed and `CI` is not set; `.ci/run` installs it, and under CI a
//! missing redis-server fails the tests.

mod util;

use std::{
    io::{Read, Write},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use ringcast::{
    protocol::envelope::{self, AckPosition, Encoding, ServerMessage},
    Broker, Engine, EngineConfig, Payload, PublishError,
};
use tungstenite::Message as TMessage;
use util::{redis::Redis, Client};

/// An engine running the broker on the Redis at `url`, with fast reconnects, once it is
/// connected.
fn engine(url: &str, shards: usize) -> Engine {
    let mut config: EngineConfig = util::config(shards).with_broker_url(url);
    config.broker.reconnect_min_delay = Duration::from_millis(20);
    config.broker.reconnect_max_delay = Duration::from_millis(300);
    config.broker.command_timeout = Duration::from_secs(1);
    config.broker.health_interval = Duration::from_millis(200);
    config.pubsub.publish_rate_per_sec = 100_000;
    config.pubsub.publish_burst = 100_000;
    let engine = Engine::start(config, |_| Broker::new()).expect("start");
    let handle = engine.handle();
    util::wait_until("the redis bridge to connect", || handle.broker_ready());
    engine
}

fn client(addr: SocketAddr) -> Client {
    let (ws, _) = util::connect_with(
        addr,
        "/",
        &[("Sec-WebSocket-Protocol", Encoding::Json.subprotocol())],
    )
    .expect("upgrade");
    ws
}

/// What a subscriber saw, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Message { seq: u64, data: String },
    Ack(Option<u64>),
    Error { id: Option<u64>, code: String },
    Reset { oldest: u64, epoch: Option<u64> },
    Dropped { count: u64, next: u64 },
    Other(String),
}

fn next(ws: &mut Client) -> Got {
    loop {
        let bytes = match ws.read().expect("read") {
            TMessage::Text(t) => t.as_bytes().to_vec(),
            TMessage::Close(c) => panic!("closed: {c:?}"),
            _ => continue,
        };
        return match envelope::decode_server(Encoding::Json, &bytes).expect("envelope") {
            ServerMessage::Message { seq, payload, .. } => Got::Message {
                seq,
                data: String::from_utf8(payload.bytes.to_vec()).unwrap(),
            },
            ServerMessage::Ack { id, .. } => Got::Ack(id),
            ServerMessage::Error { id, code, .. } => Got::Error {
                id,
                code: code.to_string(),
            },
            ServerMessage::Reset { oldest, epoch, .. } => Got::Reset { oldest, epoch },
            ServerMessage::Dropped { count, next, .. } => Got::Dropped { count, next },
            other => Got::Other(format!("{other:?}")),
        };
    }
}

fn subscribe(ws: &mut Client, topic: &str, since: Option<u64>) {
    let since = since.map_or(String::new(), |s| format!(",\"since\":{s}"));
    ws.send(TMessage::text(format!(
        r#"{{"type":"subscribe","id":1,"topic":"{topic}"{since}}}"#
    )))
    .unwrap();
    assert_eq!(next(ws), Got::Ack(Some(1)));
}

/// Reads messages until one carries `last` as data; returns (seq, data) of every message.
fn read_until(ws: &mut Client, last: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    loop {
        match next(ws) {
            Got::Message { seq, data } => {
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

fn publish(engine: &Engine, topic: &str, data: &str) -> u64 {
    engine
        .handle()
        .publisher()
        .publish(topic, Payload::json(data.to_owned()).unwrap())
        .expect("publish")
        .seq
}

#[test]
fn a_message_published_on_one_host_reaches_both_with_the_same_seq_and_order() {
    let Some(redis) = Redis::start() else { return };
    let a = engine(&redis.url(), 2);
    let b = engine(&redis.url(), 2);
    // Two subscribers per host; `since: 0` replays anything published before the Redis
    // subscription was in place, so none of them can miss the start.
    let mut subs: Vec<Client> = (0..4)
        .map(|i| {
            let mut ws = client(if i % 2 == 0 {
                a.local_addr()
            } else {
                b.local_addr()
            });
            subscribe(&mut ws, "prices", Some(0));
            ws
        })
        .collect();
    // Publishers on both hosts at once: a WebSocket client on A, a feed thread on B.
    let mut ws_pub = client(a.local_addr());
    let feed = {
        let publisher = b.handle().publisher();
        thread::spawn(move || {
            (0..150)
                .map(|i| {
                    publisher
                        .publish("prices", Payload::json(format!("\"b{i}\"")).unwrap())
                        .unwrap()
                        .seq
                })
                .collect::<Vec<_>>()
        })
    };
    for i in 0..150 {
        ws_pub
            .send(TMessage::text(format!(
                r#"{{"type":"publish","id":{i},"topic":"prices","data":"a{i}"}}"#
            )))
            .unwrap();
    }
    for i in 0..150 {
        assert_eq!(
            next(&mut ws_pub),
            Got::Ack(Some(i)),
            "publish acks in order"
        );
    }
    let b_seqs = feed.join().unwrap();
    assert!(
        b_seqs.windows(2).all(|w| w[0] < w[1]),
        "one feed's seqs rise"
    );
    let end = publish(&a, "prices", "\"end\"");
    assert_eq!(end, 301);
    let seen: Vec<Vec<(u64, String)>> = subs
        .iter_mut()
        .map(|ws| read_until(ws, "\"end\""))
        .collect();
    let seqs: Vec<u64> = seen[0].iter().map(|m| m.0).collect();
    assert_eq!(
        seqs,
        (1..=301).collect::<Vec<_>>(),
        "every seq once, in order"
    );
    for other in &seen[1..] {
        assert_eq!(
            other, &seen[0],
            "every subscriber on both hosts saw the same"
        );
    }
    // Each host's feed kept its own order inside the merged one.
    let from_a: Vec<&str> = seen[0]
        .iter()
        .filter(|m| m.1.starts_with("\"a"))
        .map(|m| m.1.as_str())
        .collect();
    let expected: Vec<String> = (0..150).map(|i| format!("\"a{i}\"")).collect();
    assert_eq!(from_a, expected);
    assert!(a.handle().broker_stats().unwrap().publishes >= 151);
    assert!(b.handle().broker_stats().unwrap().messages_in >= 301);
}

#[test]
fn a_subscriber_resumes_on_the_other_host_with_no_gap_and_no_duplicate() {
    let Some(redis) = Redis::start() else { return };
    let a = engine(&redis.url(), 1);
    let b = engine(&redis.url(), 2);
    // A subscriber already on B keeps B's channel subscribed, so the resume below also
    // crosses live messages already on their way to B's shards.
    let mut resident = client(b.local_addr());
    subscribe(&mut resident, "t", Some(0));
    let mut first = client(a.local_addr());
    subscribe(&mut first, "t", Some(0));
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(Mutex::new(Vec::new()));
    let feed = {
        let publisher = a.handle().publisher();
        let (stop, published) = (stop.clone(), published.clone());
        thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Relaxed) {
                i += 1;
                let seq = publisher
                    .publish("t", Payload::json(i.to_string()).unwrap())
                    .unwrap()
                    .seq;
                published.lock().unwrap().push(seq);
            }
        })
    };
    // Read part of the stream on A, hang up, and resume on B.
    let mut seen = Vec::new();
    while seen.len() < 40 {
        match next(&mut first) {
            Got::Message { seq, .. } => seen.push(seq),
            other => panic!("{other:?}"),
        }
    }
    drop(first);
    let mut second = client(b.local_addr());
    subscribe(&mut second, "t", seen.last().copied());
    util::wait_until("more publishes after the resume", || {
        published.lock().unwrap().len() > seen.len() + 100
    });
    stop.store(true, Relaxed);
    feed.join().unwrap();
    let end = publish(&a, "t", "\"end\"");
    for (seq, _) in read_until(&mut second, "\"end\"") {
        seen.push(seq);
    }
    assert_eq!(
        seen,
        (1..=end).collect::<Vec<_>>(),
        "resume on another host: every seq exactly once"
    );
    let resident: Vec<u64> = read_until(&mut resident, "\"end\"")
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(resident, (1..=end).collect::<Vec<_>>());
}

/// A plain GET on the WebSocket port: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = util::raw(addr);
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_owned();
    (status, body)
}

/// Checks a subscriber's stream for honesty: each message has the seq expected next, a
/// `dropped` notice moves that expectation by its count (to its `next`), and a `reset`
/// starts a new numbering at its `oldest`. Returns the (epoch, seq) of every message.
fn check_honest(events: &[Got]) -> Vec<(u32, u64)> {
    let mut epoch = 0;
    let mut expected = 1;
    let mut out = Vec::new();
    for event in events {
        match event {
            Got::Message { seq, .. } => {
                assert_eq!(
                    *seq, expected,
                    "a gap or repeat without a notice: {events:?}"
                );
                out.push((epoch, *seq));
                expected += 1;
            }
            Got::Dropped { count, next } => {
                assert_eq!(expected + count, *next, "dropped notice adds up");
                expected = *next;
            }
            Got::Reset { oldest, .. } => {
                epoch += 1;
                expected = *oldest;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

#[test]
fn redis_killed_mid_stream_errors_publishes_loses_nothing_silently_and_recovers() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let a = engine(&redis.url(), 2);
    let b = engine(&redis.url(), 1);
    let mut subs: Vec<Client> = [a.local_addr(), b.local_addr()]
        .into_iter()
        .map(|addr| {
            let mut ws = client(addr);
            subscribe(&mut ws, "t", Some(0));
            ws
        })
        .collect();
    assert_eq!(http_get(a.local_addr(), "/readyz"), (200, "ready".into()));
    // A feed on A publishing all along: every outcome is recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(Vec::<Result<u64, PublishError>>::new()));
    let feed = {
        let publisher = a.handle().publisher();
        let (stop, outcomes) = (stop.clone(), outcomes.clone());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Relaxed) {
                i += 1;
                let r = publisher.publish("t", Payload::json(i.to_string()).unwrap());
                outcomes.lock().unwrap().push(r.map(|r| r.seq));
                if r.is_err() {
                    thread::yield_now();
                }
            }
        })
    };
    let count = |pred: fn(&Result<u64, PublishError>) -> bool| {
        outcomes.lock().unwrap().iter().filter(|r| pred(r)).count()
    };
    util::wait_until("publishes before the kill", || count(|r| r.is_ok()) > 200);
    redis.kill();
    let (ha, hb) = (a.handle(), b.handle());
    util::wait_until("both hosts to see Redis gone", || {
        !ha.broker_ready() && !hb.broker_ready()
    });
    assert_eq!(
        http_get(a.local_addr(), "/readyz"),
        (503, "broker unavailable".into())
    );
    util::wait_until("publishes refused while Redis is away", || {
        count(|r| *r == Err(PublishError::Unavailable)) > 20
    });
    // A broker client's publish is refused with `unavailable` too.
    let mut ws_pub = client(b.local_addr());
    ws_pub
        .send(TMessage::text(
            r#"{"type":"publish","id":9,"topic":"t","data":0}"#,
        ))
        .unwrap();
    assert_eq!(
        next(&mut ws_pub),
        Got::Error {
            id: Some(9),
            code: "unavailable".into()
        }
    );
    redis.restart();
    util::wait_until("both hosts back", || ha.broker_ready() && hb.broker_ready());
    assert_eq!(http_get(a.local_addr(), "/readyz"), (200, "ready".into()));
    let ok_before = count(|r| r.is_ok());
    util::wait_until("publishes after the restart", || {
        count(|r| r.is_ok()) > ok_before + 200
    });
    stop.store(true, Relaxed);
    feed.join().unwrap();
    let end = publish(&a, "t", "\"end\"");
    let outcomes = outcomes.lock().unwrap().clone();
    for r in &outcomes {
        assert!(
            matches!(r, Ok(_) | Err(PublishError::Unavailable)),
            "only unavailable: {r:?}"
        );
    }
    // The acked seqs of the new Redis: everything after the last refusal.
    let last_refusal = outcomes.iter().rposition(|r| r.is_err()).unwrap();
    let mut after: Vec<u64> = outcomes[last_refusal..]
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    after.push(end);
    assert!(after.len() > 200);
    assert!(after.windows(2).all(|w| w[0] < w[1]), "{after:?}");
    for ws in &mut subs {
        let mut events = Vec::new();
        loop {
            let got = next(ws);
            let done = matches!(&got, Got::Message { data, .. } if data == "\"end\"");
            events.push(got);
            if done {
                break;
            }
        }
        let seen = check_honest(&events);
        let epochs = seen.last().unwrap().0;
        assert!(
            epochs >= 1,
            "the new Redis's numbering was announced by a reset"
        );
        // Everything the new Redis acked reached every subscriber on both hosts.
        for seq in &after {
            assert!(
                seen.contains(&(epochs, *seq)),
                "acked seq {seq} after the restart was never delivered: {:?}",
                events
                    .iter()
                    .filter(|e| !matches!(e, Got::Message { .. }))
                    .collect::<Vec<_>>()
            );
        }
    }
    let stats = ha.broker_stats().unwrap();
    assert!(stats.reconnects >= 1 && stats.errors >= 1, "{stats:?}");
    assert!(stats.publish_errors >= 20, "{stats:?}");
}

/// Subscribers to `channel` on Redis, from PUBSUB NUMSUB.
fn redis_subscribers(redis: &Redis, channel: &str) -> u64 {
    let reply = redis.cmd(&["PUBSUB", "NUMSUB", channel]);
    let count = reply.lines().last().unwrap();
    count.trim_start_matches(':').parse().unwrap()
}

#[test]
fn redis_subscriptions_follow_local_interest_up_and_down() {
    let Some(redis) = Redis::start() else { return };
    let a = engine(&redis.url(), 2);
    assert_eq!(redis_subscribers(&redis, "ringcast:t"), 0);
    let mut one = client(a.local_addr());
    let mut two = client(a.local_addr());
    subscribe(&mut one, "t", None);
    subscribe(&mut two, "t", None);
    util::wait_until("the host's one Redis subscription", || {
        redis_subscribers(&redis, "ringcast:t") == 1
    });
    assert_eq!(redis_subscribers(&redis, "ringcast:other"), 0);
    one.send(TMessage::text(
        r#"{"type":"unsubscribe","id":2,"topic":"t"}"#,
    ))
    .unwrap();
    assert_eq!(next(&mut one), Got::Ack(Some(2)));
    drop(one);
    // The other local subscriber still wants it.
    publish(&a, "t", "1");
    assert!(matches!(next(&mut two), Got::Message { seq: 1, .. }));
    assert_eq!(redis_subscribers(&redis, "ringcast:t"), 1);
    drop(two);
    util::wait_until(
        "the Redis subscription to go with the last subscriber",
        || redis_subscribers(&redis, "ringcast:t") == 0,
    );
}

/// Subscribes from seq 0 and returns the epoch the ack reports.
fn subscribe_epoch(ws: &mut Client, topic: &str) -> u64 {
    ws.send(TMessage::text(format!(
        r#"{{"type":"subscribe","id":1,"topic":"{topic}","since":0}}"#
    )))
    .unwrap();
    let TMessage::Text(text) = ws.read().unwrap() else {
        panic!("text expected")
    };
    match envelope::decode_server(Encoding::Json, text.as_bytes()).unwrap() {
        ServerMessage::Ack {
            id: Some(1),
            position: AckPosition::Subscribe(entries),
        } => entries[0].epoch,
        other => panic!("expected the ack, got {other:?}"),
    }
}

#[test]
fn flushall_mid_stream_is_announced_by_a_reset_with_the_new_epoch() {
    let Some(redis) = Redis::start() else { return };
    let a = engine(&redis.url(), 1);
    let b = engine(&redis.url(), 2);
    let mut sub = client(b.local_addr());
    let old_epoch = subscribe_epoch(&mut sub, "t");
    assert_ne!(old_epoch, 0);
    assert_eq!(b.handle().broker_stats().unwrap().epoch, old_epoch);
    // A feed on A publishing all along: every acked (epoch, seq) is recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let feed = {
        let publisher = a.handle().publisher();
        let (stop, acked) = (stop.clone(), acked.clone());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Relaxed) {
                i += 1;
                let r = publisher.publish("t", Payload::json(i.to_string()).unwrap());
                let r = r.expect("Redis stays up: every publish is acked");
                assert_ne!(r.epoch, 0);
                acked.lock().unwrap().push((r.epoch, r.seq));
            }
        })
    };
    let count = |old: bool| {
        acked
            .lock()
            .unwrap()
            .iter()
            .filter(|(e, _)| (*e == old_epoch) == old)
            .count()
    };
    util::wait_until("publishes before the flush", || count(true) > 300);
    assert!(redis.cmd(&["FLUSHALL"]).starts_with("+OK"));
    util::wait_until("publishes in the new numbering", || count(false) > 300);
    stop.store(true, Relaxed);
    feed.join().unwrap();
    let end = a
        .handle()
        .publisher()
        .publish("t", Payload::json("\"end\"").unwrap())
        .unwrap();
    let new_epoch = end.epoch;
    assert_ne!(new_epoch, old_epoch, "the flush made a new epoch");
    let acked = acked.lock().unwrap().clone();
    // One epoch change: the old numbering, then the new one from 1.
    let switch = acked.iter().position(|(e, _)| *e != old_epoch).unwrap();
    assert!(acked[..switch].iter().all(|(e, _)| *e == old_epoch));
    assert!(acked[switch..].iter().all(|(e, _)| *e == new_epoch));
    assert_eq!(acked[switch].1, 1, "the new numbering starts at 1");

    let mut events = Vec::new();
    loop {
        let got = next(&mut sub);
        let done = matches!(&got, Got::Message { data, .. } if data == "\"end\"");
        events.push(got);
        if done {
            break;
        }
    }
    // The stream is honest: no gap or repeat without a notice.
    let seen = check_honest(&events);
    let resets: Vec<&Got> = events
        .iter()
        .filter(|e| matches!(e, Got::Reset { .. }))
        .collect();
    assert_eq!(
        resets,
        [&Got::Reset {
            oldest: 1,
            epoch: Some(new_epoch)
        }],
        "one reset, to seq 1 of the new epoch"
    );
    // Every acked publish of the new numbering was delivered after the reset.
    for &(_, seq) in &acked[switch..] {
        assert!(
            seen.contains(&(1, seq)),
            "acked seq {seq} of the new epoch lost"
        );
    }
    assert!(seen.contains(&(1, end.seq)));
    // Every acked publish of the old numbering was delivered before it, or covered by a
    // dropped notice (check_honest) or by the reset (after the last delivered one).
    let last_old = seen
        .iter()
        .filter(|(e, _)| *e == 0)
        .map(|(_, s)| *s)
        .max()
        .unwrap_or(0);
    assert!(
        last_old >= 300,
        "the old numbering was delivered up to the flush"
    );
    let stats = b.handle().broker_stats().unwrap();
    assert!(stats.resets >= 1, "{stats:?}");
    assert_eq!(stats.epoch, new_epoch);
    assert_eq!(a.handle().broker_stats().unwrap().epoch, new_epoch);
}

#[test]
fn redis_acks_carry_the_epoch_and_a_since_in_another_epoch_replays_from_the_oldest() {
    let Some(redis) = Redis::start() else { return };
    let a = engine(&redis.url(), 1);
    let b = engine(&redis.url(), 1);
    let epoch = a.handle().broker_stats().unwrap().epoch;
    assert_ne!(epoch, 0);
    // A broker client's publish is acked, from the bridge, with the epoch and its seq.
    let mut publ = client(a.local_addr());
    for seq in 1..=3u64 {
        publ.send(TMessage::text(format!(
            r#"{{"type":"publish","id":{seq},"topic":"t","data":{seq}}}"#
        )))
        .unwrap();
        let TMessage::Text(text) = publ.read().unwrap() else {
            panic!("text expected")
        };
        assert_eq!(
            envelope::decode_server(Encoding::Json, text.as_bytes()).unwrap(),
            ServerMessage::Ack {
                id: Some(seq),
                position: AckPosition::Publish { epoch, seq },
            }
        );
    }
    // On the other host: since 2 in the current epoch resumes at 3.
    let mut same = client(b.local_addr());
    same.send(TMessage::text(format!(
        r#"{{"type":"subscribe","id":1,"topic":"t","since":2,"epoch":{epoch}}}"#
    )))
    .unwrap();
    assert_eq!(next(&mut same), Got::Ack(Some(1)));
    assert_eq!(
        next(&mut same),
        Got::Message {
            seq: 3,
            data: "3".into()
        }
    );
    // Since 2 in another epoch: a reset to the oldest held, then everything from there.
    let mut other = client(b.local_addr());
    other
        .send(TMessage::text(format!(
            r#"{{"type":"subscribe","id":1,"topic":"t","since":2,"epoch":{}}}"#,
            epoch ^ 1
        )))
        .unwrap();
    assert_eq!(next(&mut other), Got::Ack(Some(1)));
    assert_eq!(
        next(&mut other),
        Got::Reset {
            oldest: 1,
            epoch: Some(epoch)
        }
    );
    let seqs: Vec<u64> = read_until(&mut other, "3").iter().map(|m| m.0).collect();
    assert_eq!(seqs, [1, 2, 3]);
}
