//! The Redis broker backend against a real redis-server that each test starts on a free
//! loopback port: two engines sharing topics through it, resume on the other host, one
//! host's link cut while Redis keeps its data (the hole filled from history, or announced as
//! dropped past what history keeps), and Redis killed and restarted mid-stream, with and
//! without its data. Skipped (with a line on stderr) only where redis-server is not installed
//! and `CI` is not set; `.ci/run` installs it, and under CI a missing redis-server fails the
//! tests ([`Redis::start`]).

mod util;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use ringcast::{
    protocol::envelope::{AckPosition, Dialect},
    Broker, Engine, EngineConfig, Payload, PublishError,
};
use util::{http, redis::Redis, BrokerClient, Got, Honesty};

/// Reconnects within 20-300 ms, a 1 s command timeout, and no publish rate limit, so a test
/// is bound by Redis and the engine, not by the defaults made for production.
fn fast(config: &mut EngineConfig) {
    config.broker.reconnect_min_delay = Duration::from_millis(20);
    config.broker.reconnect_max_delay = Duration::from_millis(300);
    config.broker.command_timeout = Duration::from_secs(1);
    config.broker.health_interval = Duration::from_millis(200);
    config.pubsub.publish_rate_per_sec = 100_000;
    config.pubsub.publish_burst = 100_000;
}

/// An engine running the broker on the Redis at `url`, with fast reconnects, once it is
/// connected.
fn engine(url: &str, shards: usize) -> Engine {
    engine_with(url, shards, |_| {})
}

/// [`engine`], with `tweak` applied to its config last.
fn engine_with(url: &str, shards: usize, tweak: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut config: EngineConfig = util::config(shards).with_broker_url(url);
    fast(&mut config);
    tweak(&mut config);
    let engine = Engine::start(config, |_| Broker::new()).expect("start");
    let handle = engine.handle();
    util::wait_until("the redis bridge to connect", || handle.broker_ready());
    engine
}

/// A JSON broker client on `addr`.
fn client(addr: SocketAddr) -> BrokerClient {
    BrokerClient::connect(addr, Dialect::Json)
}

/// A JSON broker client on `addr`, subscribed to `topic` from `since`.
fn subscriber(addr: SocketAddr, topic: &str, since: Option<u64>) -> BrokerClient {
    let mut ws = client(addr);
    ws.subscribe(1, topic, since);
    ws
}

/// Publishes JSON `data` from the engine's own publisher; returns its seq.
fn publish(engine: &Engine, topic: &str, data: &str) -> u64 {
    engine
        .handle()
        .publisher()
        .publish(topic, Payload::json(data.to_owned()).unwrap())
        .expect("publish")
        .seq
}

/// A message's (seq, data as text), or `None` for anything else.
fn seq_data(got: &Got) -> Option<(u64, String)> {
    match got {
        Got::Message { seq, .. } => Some((*seq, got.text().to_owned())),
        _ => None,
    }
}

/// Reads a subscriber's stream until the message whose data is `last`, checking each
/// envelope with `honesty` (no gap and no repeat without a notice). Only topic messages and
/// notices may come: an ack, error, pong or shutdown fails the test. Returns every envelope.
fn honest_until(ws: &mut BrokerClient, honesty: &mut Honesty, last: &str) -> Vec<Got> {
    let mut events = Vec::new();
    loop {
        let got = ws.recv();
        assert!(
            matches!(
                got,
                Got::Message { .. } | Got::Dropped { .. } | Got::Reset { .. }
            ),
            "a subscriber got {got:?} after {events:?}"
        );
        honesty.observe(&got);
        let done = matches!(&got, Got::Message { .. } if got.text() == last);
        events.push(got);
        if done {
            return events;
        }
    }
}

/// The notices among `events`.
fn notices(events: &[Got]) -> Vec<&Got> {
    events
        .iter()
        .filter(|e| !matches!(e, Got::Message { .. }))
        .collect()
}

/// `ringcast_broker_{name}_total` on `addr`'s `/metrics` (the counter must exist).
fn broker_counter(addr: SocketAddr, name: &str) -> u64 {
    let scrape = http::scrape(addr);
    let metric = format!("ringcast_broker_{name}_total");
    assert!(http::has_metric(&scrape, &metric), "{metric} in /metrics");
    http::metric_sum(&scrape, &metric, &[]) as u64
}

#[test]
fn a_message_published_on_one_host_reaches_both_with_the_same_seq_and_order() {
    let Some(redis) = Redis::start() else { return };
    let a = engine(&redis.url(), 2);
    let b = engine(&redis.url(), 2);
    // Two subscribers per host; `since: 0` replays anything published before the Redis
    // subscription was in place, so none of them can miss the start.
    let mut subs: Vec<BrokerClient> = (0..4)
        .map(|i| {
            let addr = if i % 2 == 0 {
                a.local_addr()
            } else {
                b.local_addr()
            };
            subscriber(addr, "prices", Some(0))
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
        ws_pub.send_json(&format!(
            r#"{{"type":"publish","id":{i},"topic":"prices","data":"a{i}"}}"#
        ));
    }
    for i in 0..150 {
        assert_eq!(ws_pub.recv(), Got::Ack(Some(i)), "publish acks in order");
    }
    let b_seqs = feed.join().unwrap();
    assert!(
        b_seqs.windows(2).all(|w| w[0] < w[1]),
        "one feed's seqs rise"
    );
    let end = publish(&a, "prices", "\"end\"");
    assert_eq!(end, 301);
    let seen: Vec<Vec<(u64, String)>> =
        subs.iter_mut().map(|ws| ws.read_until("\"end\"")).collect();
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
    let mut resident = subscriber(b.local_addr(), "t", Some(0));
    let mut first = subscriber(a.local_addr(), "t", Some(0));
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
        match first.recv() {
            Got::Message { seq, .. } => seen.push(seq),
            other => panic!("{other:?}"),
        }
    }
    drop(first);
    let mut second = subscriber(b.local_addr(), "t", seen.last().copied());
    util::wait_until("more publishes after the resume", || {
        published.lock().unwrap().len() > seen.len() + 100
    });
    stop.store(true, Relaxed);
    feed.join().unwrap();
    let end = publish(&a, "t", "\"end\"");
    for (seq, _) in second.read_until("\"end\"") {
        seen.push(seq);
    }
    assert_eq!(
        seen,
        (1..=end).collect::<Vec<_>>(),
        "resume on another host: every seq exactly once"
    );
    let resident: Vec<u64> = resident
        .read_until("\"end\"")
        .into_iter()
        .map(|m| m.0)
        .collect();
    assert_eq!(resident, (1..=end).collect::<Vec<_>>());
}

/// `/readyz` on `addr`: (status, body).
fn readyz(addr: SocketAddr) -> (u16, String) {
    let r = http::request(addr, "GET", "/readyz");
    (r.status, r.body.trim().to_owned())
}

#[test]
fn a_hole_cut_on_one_host_is_filled_from_history_when_its_link_comes_back() {
    let Some(redis) = Redis::start() else { return };
    let a = engine(&redis.url(), 1);
    // B logs in as its own user, so its link alone can be cut while Redis runs on.
    let b = engine(&redis.user_url("host_b"), 2);
    let mut sub = subscriber(b.local_addr(), "t", Some(0));
    let mut honesty = Honesty::new();
    for i in 1..=5 {
        assert_eq!(publish(&a, "t", &i.to_string()), i);
    }
    // B has forwarded up to 5 before its link goes.
    honest_until(&mut sub, &mut honesty, "5");
    let repaired = broker_counter(b.local_addr(), "repaired");
    let lost = broker_counter(b.local_addr(), "lost");
    assert!(redis.cut("host_b") >= 2, "B's command and pubsub links");
    let hb = b.handle();
    util::wait_until("B to see its link gone", || !hb.broker_ready());
    assert_eq!(readyz(b.local_addr()), (503, "broker unavailable".into()));
    // A, still connected, publishes the hole: 50 messages B's channel never carries to B.
    for i in 6..=55 {
        assert_eq!(publish(&a, "t", &i.to_string()), i, "A is unaffected");
    }
    redis.mend("host_b");
    util::wait_until("B back", || hb.broker_ready());
    assert_eq!(readyz(b.local_addr()), (200, "ready".into()));
    assert_eq!(publish(&a, "t", "\"end\""), 56);
    let events = honest_until(&mut sub, &mut honesty, "\"end\"");
    assert_eq!(notices(&events), Vec::<&Got>::new(), "history held it all");
    assert_eq!(
        honesty.messages("t"),
        (1..=56).map(|s| (0, s)).collect::<Vec<_>>(),
        "every seq once, in order, the hole included"
    );
    let data: Vec<(u64, String)> = events.iter().filter_map(seq_data).collect();
    assert_eq!(
        data[..50],
        (6..=55).map(|s| (s, s.to_string())).collect::<Vec<_>>()[..]
    );
    // The reconnect read exactly the hole (6..=55) from history; nothing was lost.
    assert_eq!(
        broker_counter(b.local_addr(), "repaired"),
        repaired + 50,
        "ringcast_broker_repaired_total counts the 50 read from history"
    );
    assert_eq!(
        broker_counter(b.local_addr(), "lost"),
        lost,
        "ringcast_broker_lost_total: nothing lost"
    );
    let stats = hb.broker_stats().unwrap();
    assert!(stats.reconnects >= 1 && stats.resets == 0, "{stats:?}");
}

#[test]
fn a_hole_larger_than_history_is_announced_as_dropped_with_its_exact_count() {
    let Some(redis) = Redis::start() else { return };
    // Redis keeps 8 messages per topic (the publishing host's setting trims the stream).
    let small = |c: &mut EngineConfig| c.pubsub.history_max_messages = 8;
    let a = engine_with(&redis.url(), 1, small);
    let b = engine_with(&redis.user_url("host_b"), 1, small);
    let mut sub = subscriber(b.local_addr(), "t", Some(0));
    let mut honesty = Honesty::new();
    for i in 1..=5 {
        assert_eq!(publish(&a, "t", &i.to_string()), i);
    }
    honest_until(&mut sub, &mut honesty, "5");
    let repaired = broker_counter(b.local_addr(), "repaired");
    let lost = broker_counter(b.local_addr(), "lost");
    redis.cut("host_b");
    let hb = b.handle();
    util::wait_until("B to see its link gone", || !hb.broker_ready());
    // A hole of 30 (6..=35): history keeps 28..=35, so 6..=27 (22) are gone for B.
    for i in 6..=35 {
        assert_eq!(publish(&a, "t", &i.to_string()), i);
    }
    redis.mend("host_b");
    util::wait_until("B back", || hb.broker_ready());
    assert_eq!(publish(&a, "t", "\"end\""), 36);
    let events = honest_until(&mut sub, &mut honesty, "\"end\"");
    assert_eq!(
        notices(&events),
        [&Got::Dropped {
            topic: "t".into(),
            count: 22,
            next: 28
        }],
        "one dropped notice for exactly what history no longer held"
    );
    let seqs: Vec<u64> = honesty.messages("t").iter().map(|m| m.1).collect();
    assert_eq!(seqs, (1..=5).chain(28..=36).collect::<Vec<_>>());
    assert_eq!(
        broker_counter(b.local_addr(), "lost"),
        lost + 22,
        "ringcast_broker_lost_total counts the 22 announced"
    );
    assert_eq!(
        broker_counter(b.local_addr(), "repaired"),
        repaired + 8,
        "ringcast_broker_repaired_total counts the 8 history held"
    );
}

/// A feed publishing to `topic` on `engine` until stopped, recording every outcome in order.
struct Feed {
    stop: Arc<AtomicBool>,
    outcomes: Arc<Mutex<Vec<Result<u64, PublishError>>>>,
    thread: thread::JoinHandle<()>,
}

impl Feed {
    fn start(engine: &Engine, topic: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let publisher = engine.handle().publisher();
        let (s, o) = (stop.clone(), outcomes.clone());
        let thread = thread::spawn(move || {
            let mut i = 0u64;
            while !s.load(Relaxed) {
                i += 1;
                let r = publisher.publish(topic, Payload::json(i.to_string()).unwrap());
                o.lock().unwrap().push(r.map(|r| r.seq));
                if r.is_err() {
                    thread::yield_now();
                }
            }
        });
        Self {
            stop,
            outcomes,
            thread,
        }
    }

    /// How many outcomes so far match `pred`.
    fn count(&self, pred: fn(&Result<u64, PublishError>) -> bool) -> usize {
        self.outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|r| pred(r))
            .count()
    }

    /// Stops the feed; every outcome, in order. Only acks and `unavailable` may be among them.
    fn finish(self) -> Vec<Result<u64, PublishError>> {
        self.stop.store(true, Relaxed);
        self.thread.join().unwrap();
        let outcomes = self.outcomes.lock().unwrap().clone();
        for r in &outcomes {
            assert!(
                matches!(r, Ok(_) | Err(PublishError::Unavailable)),
                "only unavailable: {r:?}"
            );
        }
        outcomes
    }
}

/// Kills Redis under a running feed and brings it back: waits for 200 acks, kills it, waits
/// for both hosts to see it gone and for 20 refusals, restarts it, waits for both hosts back
/// and 200 more acks.
fn kill_and_restart(redis: &mut Redis, feed: &Feed, a: &Engine, b: &Engine) {
    util::wait_until("publishes before the kill", || {
        feed.count(|r| r.is_ok()) > 200
    });
    redis.kill();
    let (ha, hb) = (a.handle(), b.handle());
    util::wait_until("both hosts to see Redis gone", || {
        !ha.broker_ready() && !hb.broker_ready()
    });
    assert_eq!(readyz(a.local_addr()), (503, "broker unavailable".into()));
    util::wait_until("publishes refused while Redis is away", || {
        feed.count(|r| *r == Err(PublishError::Unavailable)) > 20
    });
    // A broker client's publish is refused with `unavailable` too.
    let mut ws_pub = client(b.local_addr());
    ws_pub.send_json(r#"{"type":"publish","id":9,"topic":"t","data":0}"#);
    assert_eq!(
        ws_pub.recv(),
        Got::Error {
            id: Some(9),
            code: "unavailable".into()
        }
    );
    redis.restart();
    util::wait_until("both hosts back", || ha.broker_ready() && hb.broker_ready());
    assert_eq!(readyz(a.local_addr()), (200, "ready".into()));
    let ok_before = feed.count(|r| r.is_ok());
    util::wait_until("publishes after the restart", || {
        feed.count(|r| r.is_ok()) > ok_before + 200
    });
}

#[test]
fn redis_killed_mid_stream_errors_publishes_loses_nothing_silently_and_recovers() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let a = engine(&redis.url(), 2);
    let b = engine(&redis.url(), 1);
    let mut subs: Vec<BrokerClient> = [a.local_addr(), b.local_addr()]
        .into_iter()
        .map(|addr| subscriber(addr, "t", Some(0)))
        .collect();
    assert_eq!(readyz(a.local_addr()), (200, "ready".into()));
    // A feed on A publishing all along: every outcome is recorded.
    let feed = Feed::start(&a, "t");
    kill_and_restart(&mut redis, &feed, &a, &b);
    let outcomes = feed.finish();
    let end = publish(&a, "t", "\"end\"");
    // The acks of the old Redis: everything before the first refusal.
    let first_refusal = outcomes.iter().position(|r| r.is_err()).unwrap();
    let before: Vec<u64> = outcomes[..first_refusal]
        .iter()
        .map(|r| *r.as_ref().unwrap())
        .collect();
    assert_eq!(before, (1..=before.len() as u64).collect::<Vec<_>>());
    // The acks of the new Redis: everything after the last refusal.
    let last_refusal = outcomes.iter().rposition(|r| r.is_err()).unwrap();
    let mut after: Vec<u64> = outcomes[last_refusal..]
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    after.push(end);
    assert!(after.len() > 200);
    assert!(after.windows(2).all(|w| w[0] < w[1]), "{after:?}");
    for (host, ws) in subs.iter_mut().enumerate() {
        let mut honesty = Honesty::new();
        let events = honest_until(ws, &mut honesty, "\"end\"");
        let seen = honesty.messages("t");
        let epochs = seen.last().unwrap().0;
        assert!(
            epochs >= 1,
            "the new Redis's numbering was announced by a reset"
        );
        // What the old Redis acked before the kill came in order from seq 1 up to some seq
        // (the honesty check), and the reset announced the rest as gone with the data.
        // Nothing more can be promised here: a host that notices Redis gone through its
        // command link drops what its channel link still held unread (a publishing host lags
        // behind on its channel), and with the data lost nothing can fill that; the test
        // below keeps the data and checks that every acked seq arrives.
        let old = seen.iter().filter(|(e, _)| *e == 0).count() as u64;
        assert!(
            old <= before.len() as u64 + 1,
            "host {host}: the old numbering delivered 1..={old}, past the {} acked (and one \
             in flight)",
            before.len()
        );
        // Everything the new Redis acked reached every subscriber on both hosts.
        for seq in &after {
            assert!(
                seen.contains(&(epochs, *seq)),
                "host {host}: acked seq {seq} after the restart was never delivered: {:?}",
                notices(&events)
            );
        }
    }
    let stats = a.handle().broker_stats().unwrap();
    assert!(stats.reconnects >= 1 && stats.errors >= 1, "{stats:?}");
    assert!(stats.publish_errors >= 20, "{stats:?}");
}

#[test]
fn redis_killed_and_restarted_with_its_data_delivers_every_acked_seq_once() {
    let Some(mut redis) = Redis::start_persistent() else {
        return;
    };
    let a = engine(&redis.url(), 2);
    let b = engine(&redis.url(), 1);
    let epoch = a.handle().broker_stats().unwrap().epoch;
    let mut subs: Vec<BrokerClient> = [a.local_addr(), b.local_addr()]
        .into_iter()
        .map(|addr| subscriber(addr, "t", Some(0)))
        .collect();
    let feed = Feed::start(&a, "t");
    kill_and_restart(&mut redis, &feed, &a, &b);
    let outcomes = feed.finish();
    let end = publish(&a, "t", "\"end\"");
    let acked: Vec<u64> = outcomes
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .chain([end])
        .collect();
    assert!(acked.windows(2).all(|w| w[0] < w[1]), "{acked:?}");
    for ws in &mut subs {
        let mut honesty = Honesty::new();
        let events = honest_until(ws, &mut honesty, "\"end\"");
        // Redis came back with its data: the same numbering, no notice, and every seq it
        // sequenced (each acked one, and any whose ack the kill cut off) exactly once.
        assert_eq!(notices(&events), Vec::<&Got>::new());
        assert_eq!(
            honesty.messages("t"),
            (1..=end).map(|s| (0, s)).collect::<Vec<_>>()
        );
    }
    for host in [&a, &b] {
        let stats = host.handle().broker_stats().unwrap();
        assert_eq!(stats.epoch, epoch, "the data was kept: {stats:?}");
        assert!(stats.reconnects >= 1 && stats.resets == 0, "{stats:?}");
        assert_eq!(stats.lost, 0, "{stats:?}");
    }
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
    let mut one = subscriber(a.local_addr(), "t", None);
    let mut two = subscriber(a.local_addr(), "t", None);
    util::wait_until("the host's one Redis subscription", || {
        redis_subscribers(&redis, "ringcast:t") == 1
    });
    assert_eq!(redis_subscribers(&redis, "ringcast:other"), 0);
    one.send_json(r#"{"type":"unsubscribe","id":2,"topic":"t"}"#);
    assert_eq!(one.recv(), Got::Ack(Some(2)));
    drop(one);
    // The other local subscriber still wants it.
    publish(&a, "t", "1");
    assert!(matches!(two.recv(), Got::Message { seq: 1, .. }));
    assert_eq!(redis_subscribers(&redis, "ringcast:t"), 1);
    drop(two);
    util::wait_until(
        "the Redis subscription to go with the last subscriber",
        || redis_subscribers(&redis, "ringcast:t") == 0,
    );
}

/// Subscribes from seq 0 and returns the epoch the ack reports.
fn subscribe_epoch(ws: &mut BrokerClient, topic: &str) -> u64 {
    ws.send_json(&format!(
        r#"{{"type":"subscribe","id":1,"topic":"{topic}","since":0}}"#
    ));
    match ws.expect_ack(1) {
        AckPosition::Subscribe(entries) => entries[0].epoch,
        other => panic!("expected a subscribe ack, got {other:?}"),
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

    // The stream is honest: no gap or repeat without a notice.
    let mut honesty = Honesty::new();
    let events = honest_until(&mut sub, &mut honesty, "\"end\"");
    let seen = honesty.messages("t");
    let resets: Vec<&Got> = events
        .iter()
        .filter(|e| matches!(e, Got::Reset { .. }))
        .collect();
    assert_eq!(
        resets,
        [&Got::Reset {
            topic: "t".into(),
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
    // dropped notice (the honesty check) or by the reset (after the last delivered one).
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
        publ.send_json(&format!(
            r#"{{"type":"publish","id":{seq},"topic":"t","data":{seq}}}"#
        ));
        assert_eq!(publ.expect_ack(seq), AckPosition::Publish { epoch, seq });
    }
    // On the other host: since 2 in the current epoch resumes at 3.
    let mut same = client(b.local_addr());
    same.send_json(&format!(
        r#"{{"type":"subscribe","id":1,"topic":"t","since":2,"epoch":{epoch}}}"#
    ));
    assert_eq!(same.recv(), Got::Ack(Some(1)));
    let got = same.recv();
    assert_eq!(seq_data(&got), Some((3, "3".into())), "{got:?}");
    // Since 2 in another epoch: a reset to the oldest held, then everything from there.
    let mut other = client(b.local_addr());
    other.send_json(&format!(
        r#"{{"type":"subscribe","id":1,"topic":"t","since":2,"epoch":{}}}"#,
        epoch ^ 1
    ));
    assert_eq!(other.recv(), Got::Ack(Some(1)));
    assert_eq!(
        other.recv(),
        Got::Reset {
            topic: "t".into(),
            oldest: 1,
            epoch: Some(epoch)
        }
    );
    let seqs: Vec<u64> = other.read_until("3").iter().map(|m| m.0).collect();
    assert_eq!(seqs, [1, 2, 3]);
    // Since 99, past anything Redis sequenced: a reset to the next seq, which then comes.
    let mut ahead = client(b.local_addr());
    ahead.send_json(&format!(
        r#"{{"type":"subscribe","id":1,"topic":"t","since":99,"epoch":{epoch}}}"#
    ));
    assert_eq!(ahead.recv(), Got::Ack(Some(1)));
    assert_eq!(
        ahead.recv(),
        Got::Reset {
            topic: "t".into(),
            oldest: 4,
            epoch: Some(epoch)
        }
    );
    assert_eq!(publish(&a, "t", "4"), 4);
    let got = ahead.recv();
    assert_eq!(seq_data(&got), Some((4, "4".into())), "{got:?}");
}
