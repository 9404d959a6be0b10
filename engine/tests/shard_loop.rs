//! The io_uring shard loop with real clients: a parked shard is woken by another thread's
//! publish (one eventfd write), a spinning shard (`[latency] mode = "always"`, `spin_us`) is
//! never woken yet delivers, and a shard's own publish reaches its own subscribers in the
//! same loop turn, not through its inbox.

mod util;

use std::time::{Duration, Instant};

use ringcast::{
    protocol::envelope::Dialect, Broker, Engine, EngineConfig, LatencyMode, Payload, Publisher,
};
use util::{config, BrokerClient, Got, DEADLINE};

fn broker(config: EngineConfig) -> Engine {
    Engine::start(config, |_| Broker::new()).expect("start")
}

/// Publishes `count` messages to `topic` from this thread and checks that `sub` gets each,
/// in order, with the data published.
fn publish_and_receive(publisher: &Publisher, sub: &mut BrokerClient, topic: &str, count: u64) {
    for i in 0..count {
        let seq = publisher
            .publish(topic, Payload::json(i.to_string()).unwrap())
            .expect("publish")
            .seq;
        match sub.recv() {
            Got::Message { seq: got, data, .. } => {
                assert_eq!(got, seq);
                assert_eq!(data, i.to_string().as_bytes());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Waits until `cond` holds, bounded by [`DEADLINE`].
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_parked_shard_is_woken_by_another_threads_publish() {
    let engine = broker(config(1));
    let mut sub = BrokerClient::connect(engine.local_addr(), Dialect::Json);
    sub.subscribe(1, "t", None);
    let publisher = engine.handle().publisher();
    // The subscriber waits for each message before the next is published, so the shard has
    // gone back to sleep in its ring each time: every one of these needs a wake.
    let before = engine.handle().metrics().total().shard_wakes;
    publish_and_receive(&publisher, &mut sub, "t", 20);
    let woken = engine.handle().metrics().total().shard_wakes - before;
    assert!(
        woken >= 1,
        "no eventfd wake for publishes to a parked shard"
    );
    engine.stop().unwrap();
}

#[test]
fn a_shard_that_always_spins_is_never_woken_and_still_delivers() {
    let mut cfg = config(1);
    cfg.latency.mode = LatencyMode::Always;
    let engine = broker(cfg);
    let mut sub = BrokerClient::connect(engine.local_addr(), Dialect::Json);
    sub.subscribe(1, "t", None);
    let publisher = engine.handle().publisher();
    publish_and_receive(&publisher, &mut sub, "t", 200);
    assert_eq!(
        engine.handle().metrics().total().shard_wakes,
        0,
        "a shard that never parks was woken"
    );
    // Deadlines still fire while it spins: the stop drains and the engine exits.
    engine.stop().unwrap();
}

#[test]
fn a_spinning_shard_is_not_woken_while_it_spins() {
    let mut cfg = config(1);
    // A long spin: the publishes below come well within it, each right after the last
    // delivery, so the shard is spinning, not parked, when they arrive.
    cfg.latency.spin_us = 500_000;
    let engine = broker(cfg);
    let mut sub = BrokerClient::connect(engine.local_addr(), Dialect::Json);
    sub.subscribe(1, "t", None);
    let publisher = engine.handle().publisher();
    let before = engine.handle().metrics().total().shard_wakes;
    publish_and_receive(&publisher, &mut sub, "t", 200);
    let woken = engine.handle().metrics().total().shard_wakes - before;
    // The first publish may find the shard parked (the subscribe's ack was a while ago on a
    // loaded machine); the rest come within the spin.
    assert!(
        woken <= 2,
        "a spinning shard was woken {woken} times for 200 publishes"
    );
    engine.stop().unwrap();
}

#[test]
fn a_shards_own_publish_reaches_its_subscribers_in_the_same_turn() {
    let mut cfg = config(1);
    // The readiness canary is published from another thread into the shard's inbox; one
    // waiting there sends a publish through the inbox too (behind it, keeping the order).
    // An hour's interval keeps it out of this test's few seconds.
    cfg.http.canary_interval = Duration::from_secs(3600);
    let engine = broker(cfg);
    let addr = engine.local_addr();
    let mut sub = BrokerClient::connect(addr, Dialect::Json);
    sub.subscribe(1, "t", None);
    let mut publisher = BrokerClient::connect(addr, Dialect::Json);
    let (in_before, local_before) = {
        let m = engine.handle().metrics().total();
        (m.published_in, m.published_local)
    };
    for i in 0..50u64 {
        match publisher.publish_json(100 + i, "t", &i.to_string()) {
            Got::Ack(id) => assert_eq!(id, Some(100 + i)),
            other => panic!("unexpected {other:?}"),
        }
        match sub.recv() {
            Got::Message { seq, data, .. } => {
                assert_eq!(seq, i + 1);
                assert_eq!(data, i.to_string().as_bytes());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Every publish found the inbox empty (nothing else publishes, not even the canary):
    // all 50 went straight to the subscriber, none through the inbox.
    wait_for("the counters", || {
        engine.handle().metrics().total().published_in - in_before >= 50
    });
    let m = engine.handle().metrics().total();
    assert_eq!(m.published_local - local_before, 50);
    assert_eq!(m.published_in - in_before, 50);
    engine.stop().unwrap();
}
