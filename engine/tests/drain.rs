//! Graceful drain: close 1012 spread over the drain window, everything queued for a
//! must-deliver subscriber delivered before its close, a loss-tolerant one's cut announced,
//! and the counters that report both.

mod util;

use std::time::{Duration, Instant};

use ringcast::{Broker, Engine, EngineConfig, Payload};
use serde_json::Value;
use tungstenite::Message as WsMessage;
use util::*;

#[test]
fn closes_are_1012_spread_over_the_drain_window() {
    const CLIENTS: usize = 30;
    let mut cfg = config(2);
    cfg.timeouts.drain_window = Duration::from_secs(1);
    cfg.timeouts.shutdown_timeout = Duration::from_secs(5);
    let (engine, recorder) = start_recorder(cfg);
    let addr = engine.local_addr();
    let clients: Vec<Client> = (0..CLIENTS).map(|_| connect(addr, "/")).collect();
    wait_until("every client open", || recorder.seen().len() == CLIENTS);
    let stop_at = Instant::now();
    engine.handle().stop();
    let arrivals: Vec<Duration> = std::thread::scope(|s| {
        let readers: Vec<_> = clients
            .into_iter()
            .map(|mut ws| {
                s.spawn(move || match ws.read() {
                    Ok(WsMessage::Close(Some(frame))) => {
                        let at = stop_at.elapsed();
                        assert_eq!(u16::from(frame.code), 1012);
                        assert_eq!(frame.reason.as_str(), "service restart");
                        while ws.read().is_ok() {} // answer, then see the server close
                        at
                    }
                    other => panic!("expected close 1012, got {other:?}"),
                })
            })
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    engine.wait().unwrap();
    let first = arrivals.iter().min().unwrap();
    let last = arrivals.iter().max().unwrap();
    assert!(
        *last - *first >= Duration::from_millis(500),
        "closes not spread: {first:?} to {last:?}"
    );
    assert!(
        *last < Duration::from_secs(3),
        "the last close came at {last:?}"
    );
    let buckets: std::collections::HashSet<u128> =
        arrivals.iter().map(|a| a.as_millis() / 100).collect();
    assert!(buckets.len() >= 5, "closes bunched: {arrivals:?}");
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
    while open.read().is_ok() {} // its 1012, answered
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
fn subscriber(addr: std::net::SocketAddr, path: &str, topic: &str) -> Client {
    let (mut ws, _) = connect_with(
        addr,
        path,
        &[("Sec-WebSocket-Protocol", "ringcast.v1.json")],
    )
    .expect("upgrade");
    let sub = format!(r#"{{"type":"subscribe","id":1,"topic":"{topic}"}}"#);
    ws.send(WsMessage::text(sub)).unwrap();
    let ack: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(
        (&ack["type"], &ack["id"]),
        (&"ack".into(), &1.into()),
        "{ack}"
    );
    assert_eq!(ack["topics"][0]["topic"], topic, "{ack}");
    ws
}

/// Reads a drained subscriber to its close: (message seqs, dropped notices as (count, next),
/// whether the shutdown notice came just before the close, close code).
fn read_to_drain_close(ws: &mut Client) -> (Vec<u64>, Vec<(u64, u64)>, bool, u16) {
    let (mut seqs, mut notices, mut last_type) = (Vec::new(), Vec::new(), String::new());
    loop {
        match ws.read().expect("open until the close") {
            WsMessage::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                last_type = v["type"].as_str().unwrap().to_owned();
                match last_type.as_str() {
                    "message" => seqs.push(v["seq"].as_u64().unwrap()),
                    "dropped" => {
                        notices.push((v["count"].as_u64().unwrap(), v["next"].as_u64().unwrap()))
                    }
                    "shutdown" => {}
                    other => panic!("unexpected {other}"),
                }
            }
            WsMessage::Close(Some(frame)) => {
                return (seqs, notices, last_type == "shutdown", frame.code.into())
            }
            WsMessage::Ping(_) | WsMessage::Pong(_) => {}
            other => panic!("{other:?}"),
        }
    }
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
