//! Bounded under abuse (issue 15): no client can grow the topic registry without limit or
//! stall a shard with one request. Each attack runs beside a live client doing a publish ->
//! ack -> message round trip every 50 ms (`LiveProbe`), whose round trips must stay short.
//!
//! Round trips are held to 50 ms, as the issue asks, in a release build; a debug build gets a
//! margin (see [`DEBUG_ROUND_TRIP_BOUND`]). Absolute memory figures are in bench/RESULTS.md;
//! here the registry's own counts and gauges are asserted.

mod util;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use ringcast::{
    protocol::envelope::{self, Dialect},
    Broker, Engine, EngineConfig, Payload, HISTORY_MESSAGE_BYTES, TOPIC_BYTES,
};
use ringcast_testkit::broker::{LiveProbe, LiveReport};
use util::*;

const ROUND_TRIP_BOUND: Duration = Duration::from_millis(50);

/// The bound a debug build is held to instead, with its margin: a debug build does the
/// shards' work (parsing, masking, UTF-8 checks, topic bookkeeping) 20 to 30 times slower,
/// and the suite runs on a loaded 2-core machine (load average 20 when these were written;
/// debug p99s of 40 to 60 ms seen there). A release build (`cargo test --release`) is held to
/// [`ROUND_TRIP_BOUND`]; bench/RESULTS.md has its figures.
const DEBUG_ROUND_TRIP_BOUND: Duration = Duration::from_millis(150);

fn round_trip_bound() -> Duration {
    if cfg!(debug_assertions) {
        DEBUG_ROUND_TRIP_BOUND
    } else {
        ROUND_TRIP_BOUND
    }
}

fn broker(config: EngineConfig) -> Engine {
    Engine::start(config, |_| Broker::new()).expect("start")
}

/// Replies by kind: "ack", or the error code.
#[derive(Debug, Default)]
struct Tally(HashMap<String, u64>);

impl Tally {
    fn count(&mut self, got: &Got) {
        let key = match got {
            Got::Ack(_) => "ack".to_owned(),
            Got::Error { code, .. } => code.clone(),
            _ => return,
        };
        *self.0.entry(key).or_default() += 1;
    }

    fn get(&self, key: &str) -> u64 {
        self.0.get(key).copied().unwrap_or(0)
    }

    fn add(&mut self, other: Tally) {
        for (k, v) in other.0 {
            *self.0.entry(k).or_default() += v;
        }
    }
}

/// Samples the registry's topic count until stopped; returns the highest seen.
fn watch_topics(engine: &Engine) -> (Arc<AtomicBool>, thread::JoinHandle<u64>) {
    let handle = engine.handle();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = thread::spawn(move || {
        let mut most = 0;
        while !stopped.load(Relaxed) {
            most = most.max(handle.metrics().topics.topics);
            thread::sleep(Duration::from_millis(5));
        }
        most
    });
    (stop, thread)
}

/// `conns` clients, each sending `requests(conn, k)` (k counting up) in batches of 50 and
/// reading every reply, until `until`. Returns the replies by kind.
fn flood(
    addr: SocketAddr,
    conns: usize,
    until: Instant,
    requests: fn(usize, u64) -> Vec<envelope::Request<'static>>,
) -> Tally {
    let threads: Vec<_> = (0..conns)
        .map(|conn| {
            thread::spawn(move || {
                let mut client = BrokerClient::connect(addr, Dialect::Json);
                let mut tally = Tally::default();
                let mut k = 0;
                while Instant::now() < until {
                    let mut sent = 0;
                    for _ in 0..50 {
                        k += 1;
                        for request in requests(conn, k) {
                            client.send(&request);
                            sent += 1;
                        }
                    }
                    for _ in 0..sent {
                        let got = client.recv();
                        tally.count(&got);
                    }
                }
                tally
            })
        })
        .collect();
    let mut all = Tally::default();
    for t in threads {
        all.add(t.join().expect("a flooding client"));
    }
    all
}

fn check_live(report: &LiveReport, what: &str) {
    report.assert_ran(20);
    let mut slow: Vec<_> = report.rounds.iter().enumerate().collect();
    slow.sort_by_key(|(_, d)| std::cmp::Reverse(**d));
    slow.truncate(4);
    eprintln!("{what}: live client {report}; slowest (round, time) {slow:?}");
    let bound = round_trip_bound();
    assert!(
        report.p99() < bound,
        "{what}: the live client's p99 {:?} is not under {bound:?}: {report}",
        report.p99()
    );
}

/// Waits until only the live client's topic is left; fails naming the counts.
fn expired_but_live(engine: &Engine) {
    let start = Instant::now();
    loop {
        let m = engine.handle().metrics();
        if m.topics.topics == 1 {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "topics did not expire: {:?}",
            m.topics
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn bounded_config(max_topics: usize) -> EngineConfig {
    let mut config = config(2);
    config.pubsub.max_topics = max_topics;
    config.pubsub.topic_idle_timeout = Duration::from_secs(1);
    config
}

#[test]
fn a_subscribe_unsubscribe_flood_stays_at_the_topic_cap_and_expires() {
    let cap = 300;
    let engine = broker(bounded_config(cap));
    let addr = engine.local_addr();
    let probe = LiveProbe::start(addr, "live.probe");
    let (stop, most) = watch_topics(&engine);
    let tally = flood(
        addr,
        4,
        Instant::now() + Duration::from_secs(4),
        |conn, k| {
            let name = format!("flood.{conn}.{k}");
            vec![
                envelope::Request::Subscribe {
                    id: Some(2 * k),
                    topics: vec![envelope::SubscribeTopic {
                        topic: name.clone().into(),
                        since: None,
                        epoch: None,
                    }],
                },
                envelope::Request::Unsubscribe {
                    id: Some(2 * k + 1),
                    topics: vec![name.into()],
                },
            ]
        },
    );
    stop.store(true, Relaxed);
    let most = most.join().unwrap();
    eprintln!("replies {tally:?}, most topics {most}");
    let totals = engine.handle().metrics();
    assert!(most <= cap as u64, "{most} topics, over the cap of {cap}");
    assert!(tally.get("ack") > 0);
    // Every refusal was answered and counted, and never charged as a bad request.
    assert!(tally.get("too_many_topics") > 0, "{tally:?}");
    assert_eq!(totals.topics.refused, tally.get("too_many_topics"));
    assert!(
        tally.get("rate_limited") > 0,
        "the subscribe budget: {tally:?}"
    );
    assert_eq!(totals.total().subscribes_refused, tally.get("rate_limited"));
    assert_eq!(totals.total().bad_requests, 0);
    // Flooded topics had no subscriber left: they expire, the live client's stays.
    expired_but_live(&engine);
    let report = probe.finish();
    // The live client's topic holds one of the cap's places, so the flood filled at most
    // `cap - 1`, and every one of those expired (more, if some expired mid-flood and came back).
    let expired = engine.handle().metrics().topics.expired;
    assert!(expired >= cap as u64 - 1, "{expired} expired");
    assert!(engine
        .handle()
        .publisher()
        .topic_stats("live.probe")
        .is_some());
    let scrape = http::scrape(addr);
    assert_eq!(metric_sum(&scrape, "ringcast_topics", &[]), 1.0);
    assert!(metric_sum(&scrape, "ringcast_topics_expired_total", &[]) >= cap as f64 - 1.0);
    check_live(&report, "subscribe/unsubscribe flood");
}

#[test]
fn a_flood_of_publishes_to_new_names_stays_at_the_topic_cap_and_expires() {
    let cap = 300;
    let engine = broker(bounded_config(cap));
    let addr = engine.local_addr();
    let probe = LiveProbe::start(addr, "live.probe");
    let (stop, most) = watch_topics(&engine);
    let stop_memory = Arc::new(AtomicBool::new(false));
    let memory_peak = Arc::new(AtomicU64::new(0));
    let memory = {
        let (handle, stop, peak) = (engine.handle(), stop_memory.clone(), memory_peak.clone());
        thread::spawn(move || {
            while !stop.load(Relaxed) {
                let bytes = handle.metrics().memory.topics_estimate_bytes;
                peak.fetch_max(bytes, Relaxed);
                thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let tally = flood(
        addr,
        4,
        Instant::now() + Duration::from_secs(4),
        |conn, k| {
            vec![envelope::Request::Publish {
                id: Some(k),
                topic: format!("pub.{conn}.{k}").into(),
                payload: envelope::Data::new(envelope::DataKind::Json, b"[1,2,3,4,5,6,7,8]"),
            }]
        },
    );
    stop.store(true, Relaxed);
    stop_memory.store(true, Relaxed);
    memory.join().unwrap();
    let most = most.join().unwrap();
    eprintln!("replies {tally:?}, most topics {most}");
    let totals = engine.handle().metrics();
    assert!(most <= cap as u64, "{most} topics, over the cap of {cap}");
    assert!(tally.get("ack") > cap as u64, "{tally:?}");
    assert!(tally.get("too_many_topics") > 0, "{tally:?}");
    assert_eq!(totals.topics.refused, tally.get("too_many_topics"));
    assert_eq!(totals.total().bad_requests, 0);
    // The memory gauge counts the topics and what they hold, and is bounded by the cap: each
    // flooded topic holds one message of 17 bytes; the live client's holds its rounds (up to
    // the history's 1024 messages, of up to 4 bytes).
    let per_topic = TOPIC_BYTES + HISTORY_MESSAGE_BYTES + 17;
    let live = 1024;
    let bound = cap as u64 * per_topic + live * (HISTORY_MESSAGE_BYTES + 4);
    let peak = memory_peak.load(Relaxed);
    assert!(peak > 100 * per_topic, "the gauge counts topics: {peak}");
    assert!(peak <= bound, "topic memory {peak} over the cap's {bound}");
    expired_but_live(&engine);
    let report = probe.finish();
    let after = engine.handle().metrics();
    assert!(after.topics.history_messages <= live, "{:?}", after.topics);
    assert!(after.memory.topics_estimate_bytes <= TOPIC_BYTES + live * (HISTORY_MESSAGE_BYTES + 4));
    check_live(&report, "publish flood");
}

#[test]
fn an_expired_topic_comes_back_in_a_new_epoch_and_a_resume_gets_a_reset() {
    let engine = broker(bounded_config(100));
    let addr = engine.local_addr();
    let mut client = BrokerClient::connect(addr, Dialect::Json);
    client.subscribe(1, "t", None);
    let mut epoch = 0;
    for i in 0..3 {
        match client.publish_json(10 + i, "t", "1") {
            Got::Ack(_) => {}
            other => panic!("publish: {other:?}"),
        }
        let pos = envelope::decode_server(Dialect::Json, &client.last).unwrap();
        if let envelope::ServerMessage::Ack {
            position: envelope::AckPosition::Publish { epoch: e, .. },
            ..
        } = pos
        {
            epoch = e;
        }
        assert!(matches!(client.recv(), Got::Message { seq, .. } if seq == i + 1));
    }
    assert_ne!(epoch, 0);
    client.send(&envelope::Request::Unsubscribe {
        id: Some(20),
        topics: vec!["t".into()],
    });
    assert_eq!(client.recv(), Got::Ack(Some(20)));
    let publisher = engine.handle().publisher();
    wait_until("t to expire", || publisher.topic_stats("t").is_none());
    // Resuming after seq 3 of the old epoch: a reset to the new numbering, nothing replayed.
    client.send(&envelope::Request::Subscribe {
        id: Some(21),
        topics: vec![envelope::SubscribeTopic {
            topic: "t".into(),
            since: Some(3),
            epoch: Some(epoch),
        }],
    });
    let envelope::AckPosition::Subscribe(positions) = client.expect_ack(21) else {
        panic!("a subscribe ack")
    };
    let new_epoch = positions[0].epoch;
    assert_ne!(new_epoch, epoch);
    assert_eq!(positions[0].seq, 0);
    assert_eq!(
        client.recv(),
        Got::Reset {
            topic: "t".into(),
            oldest: 1,
            epoch: Some(new_epoch)
        }
    );
    let receipt = publisher.publish("t", Payload::json("7").unwrap()).unwrap();
    assert_eq!((receipt.seq, receipt.epoch), (1, new_epoch));
    assert!(matches!(client.recv(), Got::Message { seq: 1, .. }));
}

#[test]
fn subscribe_budget_refuses_with_a_retry_hint_and_duplicates_subscribe_once() {
    let mut config = config(1);
    config.pubsub.subscribe_rate_per_sec = 10;
    config.pubsub.subscribe_burst = 4;
    let engine = broker(config);
    let addr = engine.local_addr();
    let mut client = BrokerClient::connect(addr, Dialect::Json);
    // Three entries, two of them the same topic: subscribed once, listed once in the ack.
    client.send_json(r#"{"type":"subscribe","id":1,"topics":["a","b",{"topic":"a","since":0}]}"#);
    let envelope::AckPosition::Subscribe(positions) = client.expect_ack(1) else {
        panic!("a subscribe ack")
    };
    let names: Vec<_> = positions.iter().map(|p| p.topic.to_string()).collect();
    assert_eq!(names, ["a", "b"]);
    // The request cost 3 of 4 tokens: two more topics are over budget.
    client.send_json(r#"{"type":"subscribe","id":2,"topics":["c","d"]}"#);
    let refused = client.next_bytes();
    let reply: serde_json::Value = serde_json::from_slice(&refused).unwrap();
    assert_eq!(reply["code"], "rate_limited", "{reply}");
    let retry = reply["retry_after_ms"].as_u64().expect("a retry hint");
    assert!(
        (1..=200).contains(&retry),
        "{retry} ms for one token at 10/s"
    );
    // After the hint, it passes; nothing of the refused request was done meanwhile.
    thread::sleep(Duration::from_millis(retry + 50));
    client.send_json(r#"{"type":"unsubscribe","id":3,"topics":["a","a"]}"#);
    assert_eq!(client.recv(), Got::Ack(Some(3)));
    let m = engine.handle().metrics().total();
    assert_eq!((m.subscribes_refused, m.bad_requests), (1, 0));
    assert!(engine.handle().publisher().topic_stats("c").is_none());
}

/// Writes a frame made beforehand (`client_frame`) on the client's socket.
fn send_frame(client: &mut BrokerClient, frame: &[u8]) {
    use std::io::Write;
    match client.ws.get_mut() {
        tungstenite::stream::MaybeTlsStream::Plain(s) => s.write_all(frame).expect("write"),
        _ => unreachable!("plain TCP"),
    }
}

/// A subscribe request naming `topic` with `since: 0`, `repeats` times.
fn repeating_subscribe(id: u64, topic: &str, repeats: usize) -> String {
    let entry = format!(r#"{{"topic":"{topic}","since":0}},"#);
    let mut request = format!(r#"{{"type":"subscribe","id":{id},"topics":["#);
    for _ in 0..repeats {
        request.push_str(&entry);
    }
    request.pop();
    request.push_str("]}");
    request
}

#[test]
fn a_subscribe_repeating_one_topic_100000_times_does_not_stall_the_shards() {
    let mut config = config(2);
    // The attackers must get their whole replay: a ring holds the 1,000 messages.
    config.pubsub.ring_max_messages = 2048;
    let engine = broker(config);
    let addr = engine.local_addr();
    let publisher = engine.handle().publisher();
    for i in 0..1000 {
        publisher
            .publish("live.topic", Payload::json(format!("{i}")).unwrap())
            .unwrap();
    }
    // 3.3 MB: over the largest request the broker parses (a publish of 1 MiB in base64).
    let huge = repeating_subscribe(1, "live.topic", 100_000);
    assert!(huge.len() > 3_000_000);
    // Under it: parsed, the repeats merged into one subscription. Both framed and masked
    // here, before the live client starts: the test's own CPU is not what is measured.
    let huge: Arc<[u8]> = client_frame(1, true, huge.as_bytes()).into();
    let repeats = repeating_subscribe(2, "live.topic", 1000);
    let repeats: Arc<[u8]> = client_frame(1, true, repeats.as_bytes()).into();
    let attackers: Vec<_> = (0..4)
        .map(|_| BrokerClient::connect(addr, Dialect::Json))
        .collect();
    let probe = LiveProbe::start(addr, "live.probe");
    thread::sleep(Duration::from_millis(200)); // rounds before the attack, for comparison
    let threads: Vec<_> = attackers
        .into_iter()
        .map(|mut client| {
            let (huge, repeats) = (huge.clone(), repeats.clone());
            thread::spawn(move || {
                let t = Instant::now();
                send_frame(&mut client, &huge);
                match client.recv() {
                    Got::Error { id: None, code } => assert_eq!(code, "too_large"),
                    other => panic!("expected too_large, got {other:?}"),
                }
                let refused = t.elapsed();
                send_frame(&mut client, &repeats);
                let envelope::AckPosition::Subscribe(positions) = client.expect_ack(2) else {
                    panic!("a subscribe ack")
                };
                let acked = t.elapsed();
                assert_eq!(positions.len(), 1, "the topic subscribed once");
                let replay = client.read_until("999");
                eprintln!(
                    "attacker: refused after {refused:?}, acked after {acked:?}, replayed \
                     after {:?}",
                    t.elapsed()
                );
                assert_eq!(replay.len(), 1000, "replayed once");
                assert_eq!(replay[0].0, 1);
            })
        })
        .collect();
    for t in threads {
        t.join().expect("an attacker got its answers");
    }
    thread::sleep(Duration::from_millis(200));
    let report = probe.finish();
    report.assert_ran(8);
    eprintln!("100,000-repeat subscribe: live client {report}");
    // Margin: the 13 MB the attackers send are still received, unmasked and checked as UTF-8
    // before the broker refuses them unparsed, and the shards' io_uring loop takes every
    // completion before it yields to the inbox task that delivers the live client's message.
    // A release build does that in a few ms (bench/RESULTS.md); a debug build on a loaded
    // 2-core machine took 0.3 to 0.7 s. The bound for debug builds still fails the old
    // behaviour, which replayed the history 100,000 times per request (6.5 to 12.9 s in
    // release).
    let bound = if cfg!(debug_assertions) {
        Duration::from_millis(1500)
    } else {
        ROUND_TRIP_BOUND
    };
    assert!(
        report.worst() < bound,
        "the live client's worst round trip {:?} is not under {bound:?}: {report}",
        report.worst()
    );
}

#[test]
fn a_subscribe_naming_30000_topics_is_refused_too_large_without_stalling_the_shards() {
    let mut config = config(2);
    assert_eq!(config.pubsub.max_topics_per_request, 1024);
    // The refusal is charged as 1,024 topics, the subscribe at the cap as many again.
    config.pubsub.subscribe_burst = 2048;
    let engine = broker(config);
    let addr = engine.local_addr();
    let publisher = engine.handle().publisher();
    for i in 0..1000 {
        publisher
            .publish("live.topic", Payload::json(format!("{i}")).unwrap())
            .unwrap();
    }
    // 1 MB, under the largest request the broker parses: before the per-request cap, each
    // was parsed whole (30,000 entries validated and looked up) in one loop turn.
    let many = repeating_subscribe(1, "live.topic", 30_000);
    assert!(many.len() > 900_000 && many.len() < 1_400_000);
    let many: Arc<[u8]> = client_frame(1, true, many.as_bytes()).into();
    // At the cap: served (merged into one subscription, one replay).
    let at_cap = repeating_subscribe(2, "live.topic", 1024);
    let at_cap: Arc<[u8]> = client_frame(1, true, at_cap.as_bytes()).into();
    let attackers: Vec<_> = (0..4)
        .map(|_| BrokerClient::connect(addr, Dialect::Json))
        .collect();
    let probe = LiveProbe::start(addr, "live.probe");
    thread::sleep(Duration::from_millis(200)); // rounds before the attack, for comparison
    let threads: Vec<_> = attackers
        .into_iter()
        .map(|mut client| {
            let (many, at_cap) = (many.clone(), at_cap.clone());
            thread::spawn(move || {
                let t = Instant::now();
                {
                    send_frame(&mut client, &many);
                    match client.recv() {
                        Got::Error { id, code } => {
                            assert_eq!((id, code.as_str()), (Some(1), "too_large"))
                        }
                        other => panic!("expected too_large, got {other:?}"),
                    }
                }
                send_frame(&mut client, &at_cap);
                let envelope::AckPosition::Subscribe(positions) = client.expect_ack(2) else {
                    panic!("a subscribe ack")
                };
                assert_eq!(positions.len(), 1, "the topic subscribed once");
                let acked = t.elapsed();
                assert_eq!(client.read_until("999").len(), 1000, "replayed once");
                eprintln!(
                    "attacker: refused, then acked after {acked:?}, replayed after {:?}",
                    t.elapsed()
                );
            })
        })
        .collect();
    for t in threads {
        t.join().expect("an attacker got its answers");
    }
    thread::sleep(Duration::from_millis(200));
    let report = probe.finish();
    report.assert_ran(8);
    eprintln!("30,000-topic subscribes: live client {report}");
    // Counted as malformed (under the budget of 20: none was closed).
    assert_eq!(engine.handle().metrics().total().bad_requests, 4);
    // Margin as in the 100,000-repeat test above: the 4 MB are still received, unmasked,
    // checked as UTF-8 and scanned once as JSON (up to the end of the object) before the
    // list is cut at entry 1,025, which a debug build does some 30 times slower.
    let bound = if cfg!(debug_assertions) {
        Duration::from_millis(1500)
    } else {
        ROUND_TRIP_BOUND
    };
    assert!(
        report.worst() < bound,
        "the live client's worst round trip {:?} is not under {bound:?}: {report}",
        report.worst()
    );
}

#[test]
fn publishes_nested_100000_deep_are_refused_at_the_limit_without_stalling_the_shards() {
    let engine = broker(config(2));
    let addr = engine.local_addr();
    // 200 KB each; `id` first, so the refusal names it. Before the early refusal, each was
    // scanned whole as JSON (and once more for its brackets) before the depth check.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let publish = format!(r#"{{"type":"publish","id":7,"topic":"deep","data":{deep}}}"#);
    let publish: Arc<[u8]> = client_frame(1, true, publish.as_bytes()).into();
    let attackers: Vec<_> = (0..8)
        .map(|_| BrokerClient::connect(addr, Dialect::Json))
        .collect();
    let probe = LiveProbe::start(addr, "live.probe");
    thread::sleep(Duration::from_millis(200)); // rounds before the attack, for comparison
    let threads: Vec<_> = attackers
        .into_iter()
        .map(|mut client| {
            let publish = publish.clone();
            thread::spawn(move || {
                // Under the bad-request budget (20): none is closed.
                for _ in 0..15 {
                    send_frame(&mut client, &publish);
                    match client.recv() {
                        Got::Error { id, code } => {
                            assert_eq!((id, code.as_str()), (Some(7), "bad_payload"))
                        }
                        other => panic!("expected bad_payload, got {other:?}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("an attacker got its answers");
    }
    thread::sleep(Duration::from_millis(200));
    let report = probe.finish();
    report.assert_ran(8);
    eprintln!("100,000-deep publishes: live client {report}");
    assert_eq!(engine.handle().metrics().total().bad_requests, 8 * 15);
    assert!(engine.handle().publisher().topic_stats("deep").is_none());
    // The 24 MB are still received, unmasked and checked as UTF-8 (a debug build does that
    // some 30 times slower; margin as above); only the parsing is gone.
    let bound = if cfg!(debug_assertions) {
        Duration::from_millis(1500)
    } else {
        ROUND_TRIP_BOUND
    };
    assert!(
        report.worst() < bound,
        "the live client's worst round trip {:?} is not under {bound:?}: {report}",
        report.worst()
    );
}

#[test]
fn a_request_over_the_topic_cap_is_charged_to_the_subscribe_budget() {
    let mut config = config(1);
    config.pubsub.max_topics_per_request = 3;
    config.pubsub.subscribe_rate_per_sec = 10;
    config.pubsub.subscribe_burst = 4;
    let engine = broker(config);
    let mut client = BrokerClient::connect(engine.local_addr(), Dialect::Json);
    client.send_json(r#"{"type":"unsubscribe","id":1,"topics":["a","b","c","d"]}"#);
    let reply: serde_json::Value = serde_json::from_slice(&client.next_bytes()).unwrap();
    assert_eq!(
        (&reply["id"], &reply["code"], &reply["message"]),
        (
            &serde_json::json!(1),
            &serde_json::json!("too_large"),
            &serde_json::json!("request names more than 3 topics")
        ),
        "{reply}"
    );
    // Charged as 3 topics of the 4-token burst: two more are over budget, and the refusal
    // made none of them.
    client.send_json(r#"{"type":"subscribe","id":2,"topics":["a","b"]}"#);
    let reply: serde_json::Value = serde_json::from_slice(&client.next_bytes()).unwrap();
    assert_eq!(reply["code"], "rate_limited", "{reply}");
    assert!(reply["retry_after_ms"].as_u64().is_some(), "{reply}");
    let m = engine.handle().metrics().total();
    assert_eq!((m.bad_requests, m.subscribes_refused), (1, 1));
    assert!(engine.handle().publisher().topic_stats("a").is_none());
}
