//! The Redis bridge under a client that toggles its subscriptions (issue 15): one client
//! subscribing, subscribing again and unsubscribing 64 topics with `since`, round after round,
//! must not stall pub/sub for the others. A live client beside it subscribes to a fresh topic,
//! publishes to it and waits for its message every 50 ms; its round trips stay short, and
//! every subscription the toggling client was acked is served honestly (its whole `since`
//! replayed, in order, with no notice of loss).
//!
//! `attack` runs the same load against any server: the ignored test
//! `against_a_running_server` points it at `RINGCAST_BRIDGE_ADDR` (a `ringcast serve --broker
//! redis://...` started by hand) and prints the live client's worst round trip.

mod util;

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use ringcast::{
    protocol::envelope::{self, Dialect},
    Broker, Engine, EngineConfig,
};
use util::{redis::Redis, subscribe_request, BrokerClient, Got, Honesty};

/// The toggled topics, as in the issue.
const TOPICS: usize = 64;
/// Rounds of subscribe, subscribe, unsubscribe, as in the issue (300 in 4 s).
const ROUNDS: usize = 300;
/// How long the rounds are spread over.
const SPREAD: Duration = Duration::from_secs(4);
/// Messages in each toggled topic's history before the rounds start.
const HISTORY: u64 = 10;
/// The live client's pace.
const LIVE_EVERY: Duration = Duration::from_millis(50);

/// What one run of the attack saw.
#[derive(Debug)]
struct Report {
    /// The live client's round trips: subscribe to a fresh topic, publish, its message back.
    live: Vec<Duration>,
    /// How long the toggling client's rounds took.
    rounds_took: Duration,
    /// Messages the toggling client received (replays, in every round).
    replayed: usize,
}

impl Report {
    fn worst(&self) -> Duration {
        self.live.iter().copied().max().unwrap_or_default()
    }

    fn quantile(&self, q: f64) -> Duration {
        let mut sorted = self.live.clone();
        sorted.sort();
        let at = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted.get(at).copied().unwrap_or_default()
    }
}

fn topic(i: usize) -> String {
    format!("toggle.{i}")
}

/// Publishes `data` to `topic` and reads its ack; returns the seq (this client subscribes to
/// nothing, so nothing else can come first).
fn publish_acked(client: &mut BrokerClient, id: u64, topic: &str, data: &str) -> u64 {
    client.send(&envelope::Request::Publish {
        id: Some(id),
        topic: topic.into(),
        payload: envelope::Data::new(envelope::DataKind::Json, data.as_bytes()),
    });
    match client.next_message() {
        envelope::ServerMessage::Ack {
            id: Some(got),
            position: envelope::AckPosition::Publish { seq, .. },
        } if got == id => seq,
        other => panic!("publish {id} to {topic}: {other:?}"),
    }
}

/// Reads until the ack of `id`, checking every envelope before it with `honesty`; returns how
/// many topic messages came.
fn until_ack(client: &mut BrokerClient, id: u64, honesty: &mut Honesty) -> usize {
    let mut messages = 0;
    loop {
        let got = client.recv();
        match &got {
            Got::Ack(Some(got)) if *got == id => return messages,
            Got::Message { .. } => messages += 1,
            Got::Error { .. } => panic!("request {id} refused: {got:?}"),
            _ => {}
        }
        honesty.observe(&got);
    }
}

/// The toggling client: `ROUNDS` rounds of subscribe (every topic, `since: 0`), subscribe
/// again (a repeat starts over, so it replays again), unsubscribe, paced over `SPREAD`. After
/// each subscribe's ack, every topic's messages must start again at seq 1 with nothing
/// skipped; after the unsubscribe's ack, none may come. Returns the messages received and
/// how long the rounds took.
fn toggle(addr: SocketAddr) -> (usize, Duration) {
    let mut client = BrokerClient::connect(addr, Dialect::Json);
    let names: Vec<String> = (0..TOPICS).map(topic).collect();
    let all: Vec<(&str, Option<u64>)> = names.iter().map(|n| (n.as_str(), Some(0))).collect();
    let mut honesty = Honesty::new();
    let mut received = 0;
    let start = Instant::now();
    let mut id = 0;
    for round in 0..ROUNDS {
        let due = start + SPREAD.mul_f64(round as f64 / ROUNDS as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        for _ in 0..2 {
            id += 1;
            client.send(&subscribe_request(id, &all));
            received += until_ack(&mut client, id, &mut honesty);
            for name in &names {
                honesty.resume(name, 0);
            }
        }
        id += 1;
        client.send(&envelope::Request::Unsubscribe {
            id: Some(id),
            topics: names.iter().map(|n| n.as_str().into()).collect(),
        });
        received += until_ack(&mut client, id, &mut honesty);
        for name in &names {
            assert_eq!(honesty.notices(name), 0, "{name}: a loss was announced");
            // Nothing after the unsubscribe's ack: a message now would be seq 1 again.
            honesty.resume(name, u64::MAX - 1);
        }
    }
    (received, start.elapsed())
}

/// The live client: every `LIVE_EVERY` until `stop`, subscribes to a fresh topic, publishes
/// to it and waits for its message (and both acks); returns each round trip.
fn live(addr: SocketAddr, stop: &AtomicBool) -> Vec<Duration> {
    let mut client = BrokerClient::connect(addr, Dialect::Json);
    let mut honesty = Honesty::new();
    let mut trips = Vec::new();
    let mut id = 0;
    let run = fastrand::u64(..);
    while !stop.load(Relaxed) {
        let next = Instant::now() + LIVE_EVERY;
        let topic = format!("live.{run}.{}", trips.len());
        let start = Instant::now();
        id += 1;
        client.subscribe(id, &topic, None);
        id += 1;
        let data = format!("{{\"trip\":{}}}", trips.len());
        client.send(&envelope::Request::Publish {
            id: Some(id),
            topic: topic.as_str().into(),
            payload: envelope::Data::new(envelope::DataKind::Json, data.as_bytes()),
        });
        let (mut acked, mut got) = (false, false);
        while !(acked && got) {
            let message = client.recv();
            honesty.observe(&message);
            match &message {
                Got::Ack(Some(a)) if *a == id => acked = true,
                Got::Message { topic: t, .. } if *t == topic => {
                    assert_eq!(message.text(), data);
                    got = true;
                }
                other => panic!("live client: {other:?}"),
            }
        }
        trips.push(start.elapsed());
        assert_eq!(honesty.message_count(&topic), 1);
        id += 1;
        client.send(&envelope::Request::Unsubscribe {
            id: Some(id),
            topics: vec![topic.as_str().into()],
        });
        assert_eq!(client.recv(), Got::Ack(Some(id)));
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
    trips
}

/// Runs the attack against the broker at `addr`: fills each toggled topic's history, then the
/// toggling client, a publisher adding to the toggled topics and the live client together.
/// Finally a subscriber with `since: 0` must get every toggled topic whole, honestly.
fn attack(addr: SocketAddr) -> Report {
    let mut publisher = BrokerClient::connect(addr, Dialect::Json);
    let mut last = vec![0u64; TOPICS];
    let mut id = 0;
    for _ in 0..HISTORY {
        for (i, seq) in last.iter_mut().enumerate() {
            id += 1;
            *seq = publish_acked(&mut publisher, id, &topic(i), &format!("{id}"));
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let live = {
        let stop = stop.clone();
        thread::spawn(move || live(addr, &stop))
    };
    let publishing = {
        let stop = stop.clone();
        thread::spawn(move || {
            // The toggled topics move while they are toggled: replays and live messages meet.
            while !stop.load(Relaxed) {
                id += 1;
                let i = (id as usize) % TOPICS;
                last[i] = publish_acked(&mut publisher, id, &topic(i), &format!("{id}"));
                thread::sleep(Duration::from_millis(5));
            }
            last
        })
    };
    let toggling = thread::spawn(move || toggle(addr));
    let toggled = toggling.join();
    stop.store(true, Relaxed);
    let live = live.join().expect("the live client");
    let last = publishing.join().expect("the publisher");
    let (replayed, rounds_took) = toggled.expect("the toggling client");

    let mut reader = BrokerClient::connect(addr, Dialect::Json);
    let names: Vec<String> = (0..TOPICS).map(topic).collect();
    let all: Vec<(&str, Option<u64>)> = names.iter().map(|n| (n.as_str(), Some(0))).collect();
    reader.send(&subscribe_request(1, &all));
    let mut honesty = Honesty::new();
    let mut left: HashMap<&str, u64> = names
        .iter()
        .map(|n| n.as_str())
        .zip(last.iter().copied())
        .collect();
    while !left.is_empty() {
        let got = reader.recv();
        honesty.observe(&got);
        if let Got::Message { topic, .. } = &got {
            if left
                .get(topic.as_str())
                .is_some_and(|&l| honesty.accounted(topic, l))
            {
                left.remove(topic.as_str());
            }
        }
    }
    for (name, seq) in names.iter().zip(last) {
        assert_eq!(honesty.notices(name), 0, "{name}: a loss was announced");
        assert_eq!(honesty.message_count(name) as u64, seq, "{name}: all of it");
    }
    Report {
        live,
        rounds_took,
        replayed,
    }
}

/// `INFO commandstats` of the Redis on `port`: how many times each command ran.
fn command_calls(port: u16) -> HashMap<String, u64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(util::DEADLINE)).unwrap();
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    // A bulk string: `$len\r\n` then len bytes and `\r\n`.
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "redis closed");
        text.extend_from_slice(&buf[..n]);
        let t = String::from_utf8_lossy(&text);
        if let Some((head, body)) = t.split_once("\r\n") {
            let len: usize = head.trim_start_matches('$').parse().unwrap();
            if body.len() >= len {
                break;
            }
        }
    }
    String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// CPU time (user + system) this process's thread named `name` has used.
fn thread_cpu(name: &str) -> Duration {
    let tick = 100; // USER_HZ on Linux
    for task in std::fs::read_dir("/proc/self/task").expect("procfs") {
        let path = task.unwrap().path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
        // After the `(comm)` field: state is field 3, utime 14 and stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let ticks = fields.get(10).unwrap_or(&0) + fields.get(11).unwrap_or(&0);
        return Duration::from_millis(ticks * 1000 / tick);
    }
    Duration::ZERO
}

fn engine(url: &str) -> Engine {
    let mut config: EngineConfig = util::config(2).with_broker_url(url);
    config.broker.command_timeout = Duration::from_secs(2);
    config.pubsub.publish_rate_per_sec = 100_000;
    config.pubsub.publish_burst = 100_000;
    // The toggling client makes ~58,000 topic changes in 4 s on purpose: this test is about the
    // bridge, so the per-connection subscribe budget (bounded.rs tests it) is out of the way.
    config.pubsub.subscribe_rate_per_sec = 1_000_000;
    config.pubsub.subscribe_burst = 1_000_000;
    // Every toggled topic's whole history fits a subscriber's ring: a loss would be the
    // bridge's.
    config.pubsub.ring_max_messages = 16_384;
    let engine = Engine::start(config, |_| Broker::new()).expect("start");
    let handle = engine.handle();
    util::wait_until("the redis bridge to connect", || handle.broker_ready());
    engine
}

#[test]
fn a_toggling_client_does_not_stall_the_live_client_and_loses_nothing() {
    let Some(redis) = Redis::start() else { return };
    let engine = engine(&redis.url());
    let cpu = thread_cpu("ringcast-redis");
    let report = attack(engine.local_addr());
    let cpu = thread_cpu("ringcast-redis") - cpu;
    let calls = command_calls(redis.port);
    let stats = engine.handle().broker_stats().expect("the redis backend");
    eprintln!("bridge: {stats:?}, cpu {cpu:?}");
    eprintln!(
        "live round trips: {} over {:?}, p50 {:?}, p99 {:?}, worst {:?}; toggling client: \
         {} messages replayed; redis calls: subscribe {}, unsubscribe {}, evalsha {}",
        report.live.len(),
        report.rounds_took,
        report.quantile(0.5),
        report.quantile(0.99),
        report.worst(),
        report.replayed,
        calls.get("subscribe").unwrap_or(&0),
        calls.get("unsubscribe").unwrap_or(&0),
        calls.get("evalsha").unwrap_or(&0),
    );
    assert!(
        report.rounds_took < SPREAD * 3,
        "the toggling client's acks were slow: {:?}",
        report.rounds_took
    );
    assert_eq!(
        (stats.reconnects, stats.errors, stats.lost, stats.resets),
        (0, 0, 0, 0),
        "the bridge kept its connection and lost nothing"
    );
    assert!(
        report.live.len() >= 20,
        "{} live round trips",
        report.live.len()
    );
    // The bound is 100 ms; a release server kept well within it (worst 7-8 ms by hand,
    // where the old bridge stalled the live client for 6-10 s). A debug build on the shared
    // 2-core machine measured p50 13-24 ms and a worst of 97-166 ms under load 15 (other
    // builds and busy loops; the bridge thread alone used 1.3-2.3 s of CPU over the 4 s), and
    // a worst of 26-28 ms once the machine was quiet. So a debug build gets 2.5 times the
    // bound, which still fails on a stall.
    let bound = Duration::from_millis(if cfg!(debug_assertions) { 250 } else { 100 });
    assert!(
        report.worst() < bound,
        "the live client's worst round trip was {:?}",
        report.worst()
    );
}

/// The same attack against a server started by hand, for before/after figures:
/// `RINGCAST_BRIDGE_ADDR=127.0.0.1:PORT cargo test -p ringcast --test redis_bridge --
/// --ignored --nocapture`.
#[test]
#[ignore = "needs a running `ringcast serve --broker redis://...` at RINGCAST_BRIDGE_ADDR"]
fn against_a_running_server() {
    let addr = std::env::var("RINGCAST_BRIDGE_ADDR")
        .expect("RINGCAST_BRIDGE_ADDR")
        .parse()
        .expect("an address");
    let report = attack(addr);
    println!(
        "live round trips: {}, p50 {:?}, p90 {:?}, p99 {:?}, worst {:?}; rounds took {:?}; \
         {} messages replayed",
        report.live.len(),
        report.quantile(0.5),
        report.quantile(0.9),
        report.quantile(0.99),
        report.worst(),
        report.rounds_took,
        report.replayed
    );
}
