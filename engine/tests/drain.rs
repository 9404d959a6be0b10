//! Graceful drain: close 1012 spread over the drain window, everything queued for a
//! must-deliver subscriber delivered before its close, a loss-tolerant one's cut announced,
//! and the counters that report both.

mod util;

use std::time::{Duration, Instant};

use ringcast::{
    protocol::envelope::{AckPosition, Dialect},
    Broker, Engine, EngineConfig, Payload,
};
use tungstenite::Message as WsMessage;
use util::*;

/// How late a close may be seen after the moment the drain schedule allows it: the shard
/// closes on a 10 ms tick, and its thread and the reader threads wake within tens of
/// milliseconds even beside two busy loops on two cores. An engine that closed everyone at the
/// end of the window would be a whole window late for the first.
const SLACK: Duration = Duration::from_millis(500);

#[test]
fn closes_are_1012_spread_over_the_drain_window() {
    const CLIENTS: usize = 30;
    const WINDOW: Duration = Duration::from_secs(1);
    let mut cfg = config(2);
    cfg.timeouts.drain_window = WINDOW;
    cfg.timeouts.shutdown_timeout = Duration::from_secs(5);
    let (engine, recorder) = start_recorder(cfg);
    let addr = engine.local_addr();
    // Each client with its shard (the recorder answers "shard?"): the drain spreads each
    // shard's own connections over the window.
    let clients: Vec<(usize, Client)> = (0..CLIENTS)
        .map(|_| {
            let mut ws = connect(addr, "/");
            ws.send(WsMessage::text("shard?")).unwrap();
            let shard = ws.read().unwrap().to_text().unwrap().parse().unwrap();
            (shard, ws)
        })
        .collect();
    assert!(recorder.closes().is_empty());
    let stop_at = Instant::now();
    engine.handle().stop();
    let arrivals: Vec<(usize, Duration)> = std::thread::scope(|s| {
        let readers: Vec<_> = clients
            .into_iter()
            .map(|(shard, mut ws)| {
                s.spawn(move || {
                    let (code, reason) = expect_close(&mut ws);
                    let at = stop_at.elapsed();
                    assert_eq!((code, reason.as_str()), (1012, "service restart"));
                    (shard, at)
                })
            })
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    engine.wait().unwrap();
    // A shard with n connections closes its j-th (0-based, in a shuffled order) once j/n of
    // the window has passed since it took the stop, which was after `stop_at`: so the j-th
    // close seen from that shard can never come earlier (load only delays), and comes at most
    // SLACK later. Closing all at once breaks the first bound; all at the end, the second.
    for shard in 0..2 {
        let mut at: Vec<Duration> = arrivals
            .iter()
            .filter(|(s, _)| *s == shard)
            .map(|&(_, at)| at)
            .collect();
        at.sort_unstable();
        let n = at.len() as u32;
        for (j, &t) in at.iter().enumerate() {
            let due = WINDOW * j as u32 / n;
            assert!(
                t >= due && t <= due + SLACK,
                "shard {shard}: close {j} of {n} seen at {t:?}, due at {due:?}: {at:?}"
            );
        }
    }
    let closes = recorder.closes();
    assert_eq!(closes.len(), CLIENTS);
    assert!(closes.iter().all(|c| c.code.as_u16() == 1012));
}

#[test]
fn through_the_drain_window_readiness_and_upgrades_answer_503() {
    let mut cfg = config(2);
    cfg.timeouts.drain_window = Duration::from_secs(3);
    cfg.timeouts.shutdown_timeout = Duration::from_secs(8);
    let (engine, recorder) = start_recorder(cfg);
    let addr = engine.local_addr();
    let mut open = connect(addr, "/"); // gives the drain something to spread
    wait_until("open", || recorder.seen().len() == 1);
    let handle = engine.handle();
    assert!(handle.ready());
    handle.stop();
    assert!(!handle.ready());
    // Both shards answer once each has taken the stop (load balancers probe /readyz).
    wait_until("every shard draining", || {
        (0..8).all(|_| http_get(addr, "GET /readyz HTTP/1.1").0 == 503)
    });
    let (_, _, body) = http_get(addr, "GET /readyz HTTP/1.1");
    assert_eq!(body, "draining\n");
    let (status, response) = refused(connect_with(addr, "/", &[]));
    assert_eq!(status, 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(expect_close(&mut open), (1012, "service restart".into()));
    drop(open);
    engine.wait().unwrap();
    assert!(
        handle
            .metrics()
            .total()
            .rejected(ringcast::RejectReason::Draining)
            >= 1
    );
}

fn broker(cfg: EngineConfig) -> Engine {
    Engine::start(cfg, |_| Broker::new()).expect("start")
}

/// A JSON subscriber to `topic` that has its ack and then reads nothing until asked.
fn subscriber(addr: std::net::SocketAddr, path: &str, topic: &str) -> BrokerClient {
    let mut c = BrokerClient::connect_to(addr, path, Dialect::Json, &[]);
    c.send(&subscribe_request(1, &[(topic, None)]));
    match c.expect_ack(1) {
        AckPosition::Subscribe(topics) => {
            assert_eq!(topics.len(), 1, "{topics:?}");
            assert_eq!(topics[0].topic, topic);
        }
        other => panic!("not a subscribe's ack: {other:?}"),
    }
    c
}

/// Reads a drained subscriber to its close: (message seqs, dropped notices as (count, next),
/// whether the shutdown notice came just before the close, close code).
fn read_to_drain_close(c: &mut BrokerClient) -> (Vec<u64>, Vec<(u64, u64)>, bool, u16) {
    let (before, code, _) = c.until_close();
    let notice_last = before.last() == Some(&Got::Shutdown("service restart".into()));
    let (mut seqs, mut notices) = (Vec::new(), Vec::new());
    for got in &before[..before.len() - usize::from(notice_last)] {
        match got {
            Got::Message { seq, .. } => seqs.push(*seq),
            Got::Dropped { count, next, .. } => notices.push((*count, *next)),
            other => panic!("unexpected {other:?} before the close"),
        }
    }
    (seqs, notices, notice_last, code)
}

fn drain_config() -> EngineConfig {
    let mut cfg = config(1);
    cfg.pubsub.ring_max_messages = 8192;
    cfg.pubsub.ring_max_bytes = 64 << 20;
    cfg.pubsub.history_max_messages = 0;
    cfg.timeouts.shutdown_timeout = Duration::from_secs(20);
    cfg
}

/// Publishes `count` messages of about 4 KiB to `topic`; returns once every one is on the
/// subscribers' side of the shard (delivered to their data rings or beyond).
fn publish_and_settle(engine: &Engine, topic: &str, count: u64, subscribers: u64) {
    let publisher = engine.handle().publisher();
    let payload = format!("\"{}\"", "x".repeat(4 << 10));
    for _ in 0..count {
        publisher
            .publish(topic, Payload::json(payload.clone()).unwrap())
            .expect("publish");
    }
    wait_until("every delivery offered", || {
        engine.handle().metrics().total().deliveries >= count * subscribers
    });
}

#[test]
fn a_must_deliver_subscriber_gets_everything_queued_before_its_close() {
    const COUNT: u64 = 3000; // about 12 MiB: far more than the socket buffers hold
    let engine = broker(drain_config());
    let mut ws = subscriber(engine.local_addr(), "/?overflow=disconnect", "orders");
    publish_and_settle(&engine, "orders", COUNT, 1);
    let handle = engine.handle();
    handle.stop();
    let (seqs, notices, notice_last, code) = read_to_drain_close(&mut ws);
    assert_eq!(code, 1012);
    assert!(
        notice_last,
        "the shutdown notice comes right before the close"
    );
    assert!(notices.is_empty(), "nothing dropped: {notices:?}");
    assert_eq!(
        seqs,
        (1..=COUNT).collect::<Vec<_>>(),
        "every message, in order"
    );
    drop(ws);
    engine.wait().unwrap();
    let total = handle.metrics().total();
    assert!(total.drain_flushed > 0, "part of it waited in the ring");
    assert_eq!(total.drain_dropped, 0);
    assert_eq!(total.slow_consumer_closes, 0);
}

#[test]
fn a_loss_tolerant_subscriber_is_cut_at_its_close_and_told_so() {
    const COUNT: u64 = 3000;
    let engine = broker(drain_config());
    let addr = engine.local_addr();
    let mut ws = subscriber(addr, "/?overflow=drop-oldest", "ticks");
    publish_and_settle(&engine, "ticks", COUNT, 1);
    let handle = engine.handle();
    handle.stop();
    let (seqs, notices, notice_last, code) = read_to_drain_close(&mut ws);
    assert_eq!(code, 1012);
    assert!(notice_last);
    // A prefix, then one notice for the rest: exact count, next seq after the last.
    let got = seqs.len() as u64;
    assert_eq!(seqs, (1..=got).collect::<Vec<_>>());
    assert_eq!(notices, vec![(COUNT - got, COUNT + 1)]);
    drop(ws);
    engine.wait().unwrap();
    let total = handle.metrics().total();
    assert_eq!(total.drain_dropped, COUNT - got);
    assert!(total.drain_dropped > 0);
}
