//! Refusals that are not the client's fault do not close it, with real clients on both
//! drivers: a pipelining publisher over its rate limit gets `rate_limited` with a retry hint
//! and is slowed (not read while its budget is empty), never closed; `not_subscribed` and
//! `too_many_subscriptions` are not charged to the bad-request budget, malformed requests
//! are; a publisher that keeps publishing through a Redis outage gets `unavailable` with a
//! hint and stays connected.

mod util;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use ringcast::{Broker, Driver, Engine, EngineConfig};
use serde_json::Value;
use tungstenite::{protocol::frame::coding::CloseCode as TCloseCode, Message as TMessage};
use util::Client;

fn broker(config: EngineConfig) -> Engine {
    Engine::start(config, |_| Broker::new()).expect("start")
}

fn client(addr: SocketAddr) -> Client {
    let (ws, _) = util::connect_with(addr, "/", &[("Sec-WebSocket-Protocol", "ringcast.v1.json")])
        .expect("upgrade");
    ws
}

/// The next reply as JSON; panics on a close (with its frame) or after the read timeout.
fn reply(ws: &mut Client) -> Value {
    loop {
        match ws.read().expect("a reply") {
            TMessage::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
            TMessage::Close(frame) => panic!("closed: {frame:?}"),
            _ => continue,
        }
    }
}

fn publish_json(id: u64) -> TMessage {
    TMessage::text(format!(
        r#"{{"type":"publish","id":{id},"topic":"t","data":{id}}}"#
    ))
}

/// A ping round trip: the connection is open and answering.
fn ping(ws: &mut Client, id: u64) {
    ws.send(TMessage::text(format!(r#"{{"type":"ping","id":{id}}}"#)))
        .unwrap();
    loop {
        let r = reply(ws);
        if r["type"] == "pong" {
            assert_eq!(r["id"], id);
            return;
        }
    }
}

/// The hint of an error reply, checked to be present and within `max_ms`.
fn hint(r: &Value, max_ms: u64) -> u64 {
    let ms = r["retry_after_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no retry_after_ms in {r}"));
    assert!((1..=max_ms).contains(&ms), "retry_after_ms {ms} in {r}");
    ms
}

fn pipelining_publisher_is_slowed_not_closed(driver: Driver) {
    const COUNT: u64 = 1100;
    let mut cfg = util::config(1).with_driver(driver);
    cfg.pubsub.publish_rate_per_sec = 1000;
    cfg.pubsub.publish_burst = 100;
    let engine = broker(cfg);
    let mut ws = client(engine.local_addr());
    for id in 0..COUNT {
        ws.write(publish_json(id)).unwrap();
    }
    ws.flush().unwrap();
    let (mut acks, mut limited, mut last_hint) = (0, 0, 0);
    for expect in 0..COUNT {
        let r = reply(&mut ws);
        assert_eq!(r["id"], expect, "replies in request order: {r}");
        match r["type"].as_str() {
            Some("ack") => acks += 1,
            Some("error") => {
                assert_eq!(r["code"], "rate_limited", "{r}");
                // At 1000 per second the next token is never more than 1 ms away.
                last_hint = hint(&r, 1);
                limited += 1;
            }
            _ => panic!("unexpected {r}"),
        }
    }
    assert!(acks >= 100, "the burst is acked: {acks} acks");
    assert!(
        limited > 20,
        "more refusals than the bad-request budget: {limited}"
    );
    // Not closed; after the hint the next publish is acked.
    ping(&mut ws, 5000);
    thread::sleep(Duration::from_millis(last_hint));
    ws.send(publish_json(6000)).unwrap();
    let r = reply(&mut ws);
    assert_eq!(
        (r["type"].as_str(), r["id"].as_u64()),
        (Some("ack"), Some(6000))
    );
    let m = engine.handle().metrics().total();
    assert_eq!(m.bad_requests, 0, "rate_limited is not a bad request");
    assert!(m.throttled >= 1, "the publisher was paused");
    engine.stop().unwrap();
}

#[test]
fn pipelining_publisher_is_slowed_not_closed_io_uring() {
    pipelining_publisher_is_slowed_not_closed(Driver::IoUring);
}

#[test]
#[cfg(feature = "epoll")]
fn pipelining_publisher_is_slowed_not_closed_epoll() {
    pipelining_publisher_is_slowed_not_closed(Driver::Epoll);
}

fn only_malformed_requests_spend_the_bad_request_budget(driver: Driver) {
    let mut cfg = util::config(1).with_driver(driver);
    cfg.pubsub.max_subscriptions_per_connection = 1;
    let engine = broker(cfg);
    let mut ws = client(engine.local_addr());
    // Well over the budget (20) of refusals that are not malformed requests.
    for id in 0..30 {
        ws.send(TMessage::text(format!(
            r#"{{"type":"unsubscribe","id":{id},"topic":"never"}}"#
        )))
        .unwrap();
        let r = reply(&mut ws);
        assert_eq!(
            (r["code"].as_str(), r["id"].as_u64()),
            (Some("not_subscribed"), Some(id))
        );
        assert!(r.get("retry_after_ms").is_none(), "no hint: {r}");
    }
    ws.send(TMessage::text(
        r#"{"type":"subscribe","id":100,"topic":"a"}"#,
    ))
    .unwrap();
    assert_eq!(reply(&mut ws)["type"], "ack");
    for id in 101..131 {
        ws.send(TMessage::text(format!(
            r#"{{"type":"subscribe","id":{id},"topic":"b"}}"#
        )))
        .unwrap();
        assert_eq!(reply(&mut ws)["code"], "too_many_subscriptions");
    }
    ping(&mut ws, 200);
    assert_eq!(engine.handle().metrics().total().bad_requests, 0);
    // Malformed requests still spend it: 20 are answered, the 21st is answered and closes.
    for _ in 0..25 {
        ws.write(TMessage::text("not json")).unwrap();
    }
    ws.flush().unwrap();
    let mut errors = 0;
    let frame = loop {
        match ws.read().expect("a reply or the close") {
            TMessage::Text(t) => {
                let r: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_eq!(r["code"], "bad_request", "{r}");
                errors += 1;
            }
            TMessage::Close(frame) => break frame.expect("a close frame with a code"),
            _ => {}
        }
    };
    assert_eq!(
        errors, 21,
        "the request that spends the budget is answered too"
    );
    assert_eq!(frame.code, TCloseCode::Policy);
    assert_eq!(frame.reason.as_str(), "too many bad requests");
    engine.stop().unwrap();
}

#[test]
fn only_malformed_requests_spend_the_bad_request_budget_io_uring() {
    only_malformed_requests_spend_the_bad_request_budget(Driver::IoUring);
}

#[test]
#[cfg(feature = "epoll")]
fn only_malformed_requests_spend_the_bad_request_budget_epoll() {
    only_malformed_requests_spend_the_bad_request_budget(Driver::Epoll);
}

/// A client that floods publishes over raw TCP, while the replies are counted: the shard
/// stops reading it while its budget is empty, so in a bounded window it answers far fewer
/// than were sent, and another client on the same shard keeps a fast round trip meanwhile.
fn a_flooding_client_is_not_read_while_its_budget_is_empty(driver: Driver) {
    const SENT: usize = 20_000;
    const WINDOW: Duration = Duration::from_millis(1500);
    let mut cfg = util::config(1).with_driver(driver);
    // One publish per 500 ms after the first: each refusal pauses reading for about that.
    cfg.pubsub.publish_rate_per_sec = 2;
    cfg.pubsub.publish_burst = 1;
    cfg.io.read_buffer_bytes = 4096;
    let engine = broker(cfg);
    let addr = engine.local_addr();
    let mut other = client(addr);
    ping(&mut other, 1);

    let mut stream = util::raw(addr);
    let rest = util::raw_upgrade(&mut stream);
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut flood = Replies {
        stream,
        codec: ringcast::protocol::Codec::client(Default::default(), 99),
        buf: bytes::BytesMut::from(&rest[..]),
    };
    writer.set_write_timeout(Some(WINDOW * 2)).unwrap();
    let frames: Vec<u8> = (0..SENT)
        .flat_map(|id| {
            let text = format!(r#"{{"type":"publish","id":{id},"topic":"t","data":1}}"#);
            util::client_frame(0x1, true, text.as_bytes())
        })
        .collect();
    let write = thread::spawn(move || {
        // The kernel's buffers may not take it all while the server does not read: a
        // write timeout is the end of the flood, not a failure.
        let _ = writer.write_all(&frames);
    });

    let start = Instant::now();
    let mut replies = 0usize;
    let mut slowest = Duration::ZERO;
    let mut pings = 0;
    while start.elapsed() < WINDOW {
        // Drain what the flooder got so far (a read timeout ends each pass).
        loop {
            match flood.next() {
                Some(ringcast::protocol::Event::Text(t)) => {
                    let r: Value = serde_json::from_slice(t.as_bytes()).unwrap();
                    assert!(
                        r["type"] == "ack" || r["code"] == "rate_limited",
                        "unexpected {r}"
                    );
                    replies += 1;
                }
                Some(ringcast::protocol::Event::Close(frame)) => {
                    panic!("the flooder was closed: {frame:?}")
                }
                Some(_) => {}
                None => break,
            }
        }
        let t = Instant::now();
        pings += 1;
        ping(&mut other, 10 + pings);
        slowest = slowest.max(t.elapsed());
    }
    assert!(pings >= 5, "only {pings} round trips in the window");
    assert!(
        slowest < Duration::from_millis(250),
        "a round trip of the other client took {slowest:?} while the flood went on"
    );
    assert!(replies > 0, "the flooder got answers");
    assert!(
        replies < SENT / 2,
        "the flooder was read on: {replies} replies of {SENT} sent in {WINDOW:?}"
    );
    assert!(engine.handle().metrics().total().throttled >= 1);
    drop(flood);
    let _ = write.join();
    engine.stop().unwrap();
}

/// The client end of a raw flooding connection: events as they come, `None` at the read
/// timeout.
struct Replies {
    stream: TcpStream,
    codec: ringcast::protocol::Codec,
    buf: bytes::BytesMut,
}

impl Replies {
    fn next(&mut self) -> Option<ringcast::protocol::Event> {
        let mut chunk = [0u8; 65536];
        loop {
            if let Some(ev) = self.codec.poll_event(&mut self.buf).expect("a valid frame") {
                return Some(ev);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("the server closed the flooder's connection"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return None
                }
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }
}

#[test]
fn a_flooding_client_is_not_read_while_its_budget_is_empty_io_uring() {
    a_flooding_client_is_not_read_while_its_budget_is_empty(Driver::IoUring);
}

#[test]
#[cfg(feature = "epoll")]
fn a_flooding_client_is_not_read_while_its_budget_is_empty_epoll() {
    a_flooding_client_is_not_read_while_its_budget_is_empty(Driver::Epoll);
}

/// The Redis backend keeps the retry hints through an outage (needs the `redis` feature).
#[cfg(feature = "redis")]
mod redis_outage {
    use ringcast::{Payload, PublishError};
    use util::redis::Redis;

    use super::*;

    #[test]
    fn a_publisher_keeps_publishing_through_a_redis_outage() {
        let Some(mut redis) = Redis::start() else {
            return;
        };
        let url = redis.url();
        let mut cfg = util::config(1).with_broker_url(&url);
        cfg.broker.reconnect_min_delay = Duration::from_millis(20);
        cfg.broker.reconnect_max_delay = Duration::from_millis(300);
        cfg.broker.command_timeout = Duration::from_secs(1);
        cfg.broker.health_interval = Duration::from_millis(100);
        let engine = broker(cfg);
        let handle = engine.handle();
        util::wait_until("the redis bridge to connect", || handle.broker_ready());
        let mut ws = client(engine.local_addr());
        ws.send(publish_json(0)).unwrap();
        assert_eq!(reply(&mut ws)["type"], "ack");

        redis.kill();
        util::wait_until("the bridge to notice", || !handle.broker_ready());
        // More refusals than the bad-request budget (20), one request at a time.
        let mut unavailable = 0;
        let mut id = 1;
        while unavailable < 40 {
            ws.send(publish_json(id)).unwrap();
            let r = reply(&mut ws);
            assert_eq!(r["id"], id);
            if r["type"] == "error" {
                assert_eq!(r["code"], "unavailable", "{r}");
                // At most the longest reconnect pause (300 ms).
                hint(&r, 300);
                unavailable += 1;
            }
            id += 1;
            assert!(id < 10_000, "Redis is away, yet publishes keep being acked");
        }
        // Threads outside the shards get the same hint.
        let publisher = handle.publisher();
        let err = publisher
            .publish("t", Payload::json("1").unwrap())
            .unwrap_err();
        assert_eq!(err, PublishError::Unavailable);
        let wait = publisher.retry_after(&err).expect("a hint");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(300),
            "{wait:?}"
        );

        // Redis comes back on the same port: the same connection publishes again.
        redis.restart();
        util::wait_until("the bridge to reconnect", || handle.broker_ready());
        let acked = loop {
            ws.send(publish_json(id)).unwrap();
            let r = reply(&mut ws);
            if r["type"] == "ack" {
                break r;
            }
            assert_eq!(r["code"], "unavailable", "{r}");
            id += 1;
            assert!(id < 20_000, "never acked again");
        };
        assert_eq!(acked["id"], id);
        assert_eq!(handle.metrics().total().bad_requests, 0);
        engine.stop().unwrap();
    }
}

/// The hint in the binary encodings: `ringcast.v2.bin` carries it, `ringcast.v1.bin` (whose
/// error layout is unchanged) cannot.
#[test]
fn binary_v2_errors_carry_the_hint_and_v1_errors_are_unchanged() {
    use ringcast::protocol::envelope::{self, Data, Dialect, Encoding, Request, ServerMessage};
    let mut cfg = util::config(1);
    cfg.pubsub.publish_rate_per_sec = 1;
    cfg.pubsub.publish_burst = 1;
    let engine = broker(cfg);
    for (subprotocol, dialect) in [
        (envelope::BINARY_V2_SUBPROTOCOL, Dialect::BinaryV2),
        (envelope::BINARY_SUBPROTOCOL, Dialect::BinaryV1),
    ] {
        let (mut ws, _) = util::connect_with(
            engine.local_addr(),
            "/",
            &[("Sec-WebSocket-Protocol", subprotocol)],
        )
        .expect("upgrade");
        let mut errors = Vec::new();
        for id in 0..2 {
            let req = Request::Publish {
                id: Some(id),
                topic: "t".into(),
                payload: Data::json("1"),
            };
            ws.send(TMessage::binary(envelope::encode_request(
                Encoding::Binary,
                &req,
            )))
            .unwrap();
            let bytes = loop {
                if let TMessage::Binary(b) = ws.read().expect("a reply") {
                    break b;
                }
            };
            if let ServerMessage::Error {
                id,
                code,
                retry_after_ms,
                ..
            } = envelope::decode_server(dialect, &bytes).expect("a server message")
            {
                errors.push((id, code.to_string(), retry_after_ms));
            }
        }
        assert_eq!(errors.len(), 1, "{subprotocol}: {errors:?}");
        let (id, code, retry) = errors.pop().unwrap();
        assert_eq!((id, code.as_str()), (Some(1), "rate_limited"));
        match dialect {
            // One publish per second: the next is at most 1000 ms away.
            Dialect::BinaryV2 => assert!(
                retry.is_some_and(|ms| (1..=1000).contains(&ms)),
                "{retry:?}"
            ),
            _ => assert_eq!(retry, None),
        }
    }
    engine.stop().unwrap();
}
