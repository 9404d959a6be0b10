//! Refusals that are not the client's fault do not close it, with real clients on both
//! drivers: a pipelining publisher over its rate limit gets `rate_limited` with a retry hint
//! and is slowed (not read while its budget is empty), never closed; `not_subscribed` and
//! `too_many_subscriptions` are not charged to the bad-request budget, malformed requests
//! are; a publisher that keeps publishing through a Redis outage, or into a saturated engine,
//! gets `unavailable` with a hint and stays connected.

mod util;

use std::{
    io::Write,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use ringcast::{
    protocol::{
        envelope::{self, AckPosition, Data, Dialect, Request, ServerMessage},
        Event, UpgradeRequest,
    },
    Broker, CloseInfo, Ctx, Driver, Engine, EngineConfig, Handler, Message, Upgrade, UpgradeCtx,
};
use tungstenite::Message as TMessage;
use util::{BrokerClient, Got, RawClient, DEADLINE};

fn broker(config: EngineConfig) -> Engine {
    Engine::start(config, |_| Broker::new()).expect("start")
}

fn client(addr: std::net::SocketAddr) -> BrokerClient {
    BrokerClient::connect(addr, Dialect::Json)
}

fn publish_request(id: u64) -> Request<'static> {
    Request::Publish {
        id: Some(id),
        topic: "t".into(),
        payload: Data::json("1"),
    }
}

/// A ping round trip: the connection is open and answering.
fn ping(c: &mut BrokerClient, id: u64) {
    c.send(&Request::Ping { id: Some(id) });
    assert_eq!(c.recv(), Got::Pong(Some(id)));
}

/// A publish's reply: `Ok(seq)` for an ack (0 from `ringcast.v1.bin`, whose acks carry no
/// seq), or the error's code and retry hint (which, when present, must be within
/// 1..=`max_ms`).
fn publish_reply(c: &mut BrokerClient, id: u64, max_ms: u64) -> Result<u64, (String, Option<u64>)> {
    let v1 = c.dialect == Dialect::BinaryV1;
    match c.next_message() {
        ServerMessage::Ack {
            id: Some(got),
            position,
        } if got == id => match position {
            AckPosition::Publish { seq, .. } => Ok(seq),
            AckPosition::Plain if v1 => Ok(0),
            other => panic!("not a publish's ack: {other:?}"),
        },
        ServerMessage::Error {
            id: got,
            code,
            retry_after_ms,
            ..
        } => {
            assert_eq!(got, Some(id), "the error names its request");
            if let Some(ms) = retry_after_ms {
                assert!((1..=max_ms).contains(&ms), "retry_after_ms {ms} of {code}");
            }
            Err((code.into_owned(), retry_after_ms))
        }
        other => panic!("expected the reply to publish {id}, got {other:?}"),
    }
}

fn pipelining_publisher_is_slowed_not_closed(driver: Driver) {
    const COUNT: u64 = 1100;
    let mut cfg = util::config(1).with_driver(driver);
    cfg.pubsub.publish_rate_per_sec = 1000;
    cfg.pubsub.publish_burst = 100;
    let engine = broker(cfg);
    let mut c = client(engine.local_addr());
    for id in 0..COUNT {
        c.write(&publish_request(id));
    }
    c.flush();
    let (mut acks, mut limited, mut last_hint) = (0, 0, 0);
    for id in 0..COUNT {
        // Replies come in request order. At 1000 per second the next token is never more
        // than 1 ms away.
        match publish_reply(&mut c, id, 1) {
            Ok(_) => acks += 1,
            Err((code, hint)) => {
                assert_eq!(code, "rate_limited");
                last_hint = hint.expect("rate_limited carries a hint");
                limited += 1;
            }
        }
    }
    assert!(acks >= 100, "the burst is acked: {acks} acks");
    assert!(
        limited > 20,
        "more refusals than the bad-request budget: {limited}"
    );
    // Not closed; after the hint the next publish is acked.
    ping(&mut c, 5000);
    thread::sleep(Duration::from_millis(last_hint));
    c.send(&publish_request(6000));
    assert!(
        publish_reply(&mut c, 6000, 1).is_ok(),
        "acked after the hint"
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
    let mut c = client(engine.local_addr());
    // Well over the budget (20) of refusals that are not malformed requests.
    for id in 0..30 {
        c.send_json(&format!(
            r#"{{"type":"unsubscribe","id":{id},"topic":"never"}}"#
        ));
        match c.next_message() {
            ServerMessage::Error {
                id: got,
                code,
                retry_after_ms,
                ..
            } => assert_eq!(
                (got, &*code, retry_after_ms),
                (Some(id), "not_subscribed", None),
                "no hint"
            ),
            other => panic!("{other:?}"),
        }
    }
    c.subscribe(100, "a", None);
    for id in 101..131 {
        c.send_json(&format!(r#"{{"type":"subscribe","id":{id},"topic":"b"}}"#));
        assert_eq!(
            c.recv(),
            Got::Error {
                id: Some(id),
                code: "too_many_subscriptions".into()
            }
        );
    }
    ping(&mut c, 200);
    assert_eq!(engine.handle().metrics().total().bad_requests, 0);
    // Malformed requests still spend it: 20 are answered, the 21st is answered and closes.
    for _ in 0..25 {
        c.ws.write(TMessage::text("not json")).unwrap();
    }
    c.ws.flush().unwrap();
    let (before, code, reason) = c.until_close();
    let bad = Got::Error {
        id: None,
        code: "bad_request".into(),
    };
    assert!(before.iter().all(|g| *g == bad), "{before:?}");
    assert_eq!(
        before.len(),
        21,
        "the request that spends the budget is answered too"
    );
    assert_eq!((code, reason.as_str()), (1008, "too many bad requests"));
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

    let mut flood = RawClient::connect(addr);
    flood
        .stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut writer = flood.stream.try_clone().unwrap();
    writer.set_write_timeout(Some(WINDOW * 2)).unwrap();
    let frames: Vec<u8> = (0..SENT)
        .flat_map(|id| {
            let text = format!(r#"{{"type":"publish","id":{id},"topic":"t","data":1}}"#);
            util::client_frame(0x1, true, text.as_bytes())
        })
        .collect();
    let write = thread::spawn(move || {
        // The kernel's buffers may not take it all while the server does not read: a
        // write timeout is the end of the flood, not a failure; any other error is.
        match writer.write_all(&frames) {
            Ok(()) => {}
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "the flood's write failed: {e}"
            ),
        }
    });

    let start = Instant::now();
    let mut replies = 0usize;
    let mut slowest = Duration::ZERO;
    let mut pings = 0;
    while start.elapsed() < WINDOW {
        // Drain what the flooder got so far (a read timeout ends each pass).
        while let Some(event) = flood.try_next_event() {
            match event {
                Event::Text(t) => {
                    let r = envelope::decode_server(Dialect::Json, t.as_bytes()).unwrap();
                    match Got::from_server(r) {
                        Got::Ack(_) => {}
                        Got::Error { code, .. } if code == "rate_limited" => {}
                        other => panic!("unexpected {other:?}"),
                    }
                    replies += 1;
                }
                Event::Close(frame) => panic!("the flooder was closed: {frame:?}"),
                _ => {}
            }
        }
        let t = Instant::now();
        pings += 1;
        ping(&mut other, 10 + pings);
        slowest = slowest.max(t.elapsed());
    }
    assert!(pings >= 5, "only {pings} round trips in the window");
    // Unthrottled, the flooder's backlog would hold the shard for seconds; a throttled one
    // costs the other client nothing. 250 ms leaves room for a loaded machine's scheduling.
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
    write.join().expect("the flood's writer");
    engine.stop().unwrap();
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
            return; // SKIPPED was printed; under CI a missing redis-server fails instead
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
        let mut c = client(engine.local_addr());
        c.send(&publish_request(0));
        assert!(
            publish_reply(&mut c, 0, 300).is_ok(),
            "acked while Redis is up"
        );

        redis.kill();
        util::wait_until("the bridge to notice", || !handle.broker_ready());
        // More refusals than the bad-request budget (20), one request at a time.
        let mut unavailable = 0;
        let mut id = 1;
        while unavailable < 40 {
            c.send(&publish_request(id));
            // A hint of at most the longest reconnect pause (300 ms).
            if let Err((code, hint)) = publish_reply(&mut c, id, 300) {
                assert_eq!(code, "unavailable");
                assert!(hint.is_some(), "unavailable carries a hint");
                unavailable += 1;
            }
            id += 1;
            assert!(id < 10_000, "Redis is away, yet publishes keep being acked");
        }
        // Threads outside the shards get the same hint.
        let publisher = handle.publisher();
        let err = publisher
            .publish("t", Payload::json("1").unwrap())
            .expect_err("Redis is away");
        assert_eq!(err, PublishError::Unavailable);
        let wait = publisher.retry_after(&err).expect("a hint");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(300),
            "{wait:?}"
        );

        // Redis comes back on the same port: the same connection publishes again.
        redis.restart();
        util::wait_until("the bridge to reconnect", || handle.broker_ready());
        loop {
            c.send(&publish_request(id));
            match publish_reply(&mut c, id, 300) {
                Ok(_) => break,
                Err((code, _)) => assert_eq!(code, "unavailable"),
            }
            id += 1;
            assert!(id < 20_000, "never acked again");
        }
        assert_eq!(handle.metrics().total().bad_requests, 0);
        engine.stop().unwrap();
    }
}

/// The hint in the binary encodings: `ringcast.v2.bin` carries it, `ringcast.v1.bin` (whose
/// error layout is unchanged) cannot.
#[test]
fn binary_v2_errors_carry_the_hint_and_v1_errors_are_unchanged() {
    let mut cfg = util::config(1);
    cfg.pubsub.publish_rate_per_sec = 1;
    cfg.pubsub.publish_burst = 1;
    let engine = broker(cfg);
    for dialect in [Dialect::BinaryV2, Dialect::BinaryV1] {
        let mut c = BrokerClient::connect(engine.local_addr(), dialect);
        // Both in one write, read together: the second finds the burst of one spent
        // whatever the load (a refill takes a second).
        c.write(&publish_request(0));
        c.write(&publish_request(1));
        c.flush();
        assert!(publish_reply(&mut c, 0, 1000).is_ok(), "{dialect:?}");
        let (code, retry) = publish_reply(&mut c, 1, 1000).expect_err("refused");
        assert_eq!(code, "rate_limited");
        match dialect {
            // One publish per second: the next is at most 1000 ms away (checked above).
            Dialect::BinaryV2 => assert!(retry.is_some(), "v2 carries the hint"),
            _ => assert_eq!(retry, None, "v1's error has no room for it"),
        }
    }
    engine.stop().unwrap();
}

/// A broker whose clients can hold their shard's thread, as a handler doing blocking work
/// would: the text message "hold" blocks the shard until `release` is set (at most
/// [`DEADLINE`]), and "shard?" answers the shard's index. Everything else goes to the broker.
struct Holding {
    broker: Broker,
    held: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
}

impl Handler for Holding {
    fn on_upgrade(&mut self, req: &UpgradeRequest<'_>, ctx: &UpgradeCtx) -> Upgrade {
        self.broker.on_upgrade(req, ctx)
    }

    fn on_open(&mut self, ctx: &mut Ctx<'_>) {
        self.broker.on_open(ctx);
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        if let Message::Text(text) = &msg {
            match text.as_str() {
                "hold" => {
                    self.held.store(true, Relaxed);
                    let start = Instant::now();
                    while !self.release.load(Relaxed) && start.elapsed() < DEADLINE {
                        thread::sleep(Duration::from_millis(1));
                    }
                    return;
                }
                "shard?" => {
                    let status = ctx.send_text(ctx.shard().index().to_string());
                    util::queued(ctx, status);
                    return;
                }
                _ => {}
            }
        }
        self.broker.on_message(ctx, msg);
    }

    fn on_close(&mut self, ctx: &mut Ctx<'_>, close: &CloseInfo) {
        self.broker.on_close(ctx, close);
    }
}

/// Sets the flag when dropped, so a failing test does not leave a shard held.
struct ReleaseOnDrop(Arc<AtomicBool>);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

/// The engine refuses a publish with `PublishError::Saturated` when a shard with subscribers
/// to the topic has twice `pubsub.max_pending_per_shard` deliveries waiting in its inbox; a
/// WebSocket publisher gets that as `unavailable` with a retry hint (PROTOCOL.md, Error
/// codes), is not charged for it and stays connected, and nothing was sequenced for it.
#[test]
fn a_saturated_engine_refuses_a_publish_with_unavailable_and_a_hint() {
    const MAX_PENDING: u64 = 4;
    let mut cfg = util::config(2);
    cfg.pubsub.max_pending_per_shard = MAX_PENDING as usize;
    let held = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let engine = {
        let (held, release) = (held.clone(), release.clone());
        Engine::start(cfg, move |_| Holding {
            broker: Broker::new(),
            held: held.clone(),
            release: release.clone(),
        })
        .expect("start")
    };
    let _release = ReleaseOnDrop(release.clone());
    let addr = engine.local_addr();
    // A subscriber and a publisher on different shards.
    let mut on_shard: [Option<BrokerClient>; 2] = [None, None];
    for _ in 0..100 {
        let mut c = client(addr);
        c.send_json("shard?");
        let shard: usize = String::from_utf8(c.next_bytes()).unwrap().parse().unwrap();
        on_shard[shard].get_or_insert(c);
        if on_shard.iter().all(Option::is_some) {
            break;
        }
    }
    let [Some(mut sub), Some(mut publ)] = on_shard else {
        panic!("100 connections all landed on one shard")
    };
    sub.subscribe(1, "t", None);
    sub.send_json("hold");
    util::wait_until("the subscriber's shard held", || held.load(Relaxed));
    // The held shard takes nothing out of its inbox: each publish leaves one more delivery
    // there, until there are twice max_pending_per_shard.
    let mut acked = 0;
    let hint = loop {
        let id = acked + 1;
        publ.send(&Request::Publish {
            id: Some(id),
            topic: "t".into(),
            payload: Data::json(&id.to_string()),
        });
        match publish_reply(&mut publ, id, 1000) {
            Ok(seq) => {
                assert_eq!(seq, id, "acked in order");
                acked += 1;
            }
            Err((code, hint)) => {
                assert_eq!(code, "unavailable", "after {acked} acks");
                break hint.expect("unavailable from a saturated engine carries a hint");
            }
        }
        assert!(acked <= 2 * MAX_PENDING, "{acked} acked: never saturated");
    };
    assert_eq!(
        acked,
        2 * MAX_PENDING,
        "refused at twice max_pending_per_shard"
    );
    ping(&mut publ, 100);
    assert_eq!(engine.handle().metrics().total().bad_requests, 0);

    // Released, the subscriber gets what was acked, and nothing for the refused publish:
    // after the hint the same connection publishes the next seq.
    release.store(true, Relaxed);
    for seq in 1..=acked {
        match sub.recv() {
            Got::Message { seq: got, data, .. } => {
                assert_eq!((got, data), (seq, seq.to_string().into_bytes()));
            }
            other => panic!("{other:?}"),
        }
    }
    thread::sleep(Duration::from_millis(hint));
    let start = Instant::now();
    let mut id = 1000;
    let seq = loop {
        publ.send(&publish_request(id));
        match publish_reply(&mut publ, id, 1000) {
            Ok(seq) => break seq,
            // The shard may still be working through its inbox.
            Err((code, hint)) => {
                assert_eq!(code, "unavailable");
                assert!(start.elapsed() < DEADLINE, "saturated for too long");
                thread::sleep(Duration::from_millis(hint.expect("a hint")));
            }
        }
        id += 1;
    };
    assert_eq!(seq, acked + 1, "the refused publish took no seq");
    assert!(matches!(sub.recv(), Got::Message { seq: got, .. } if got == seq));
    engine.stop().unwrap();
}
