//! Heartbeats and idleness: the server pings quiet connections, drops a peer that does not
//! answer within the pong deadline, leaves answering and busy peers alone, and closes idle
//! ones with 1001 when asked to. Real sockets, both drivers; every wait is bounded.

mod util;

use std::time::{Duration, Instant};

use ringcast::{protocol::Event, CloseInitiator, Driver, EngineConfig};
use tungstenite::Message as WsMessage;
use util::*;

fn liveness_config(driver: Driver, ping: u64, pong: u64, idle: u64) -> EngineConfig {
    let mut config = config(1).with_driver(driver);
    config.timeouts.ping_interval = Duration::from_millis(ping);
    config.timeouts.pong_timeout = Duration::from_millis(pong);
    config.timeouts.idle_timeout = Duration::from_millis(idle);
    config
}

/// A peer that reads the ping but never answers is dropped after the pong deadline, with
/// 1006 and the reason in `on_close`, and the slot is freed.
fn silent_peer_is_dropped(driver: Driver) {
    let (engine, recorder) = start_recorder(liveness_config(driver, 150, 150, 0));
    // Taken before the connect: the server's quiet clock starts at the upgrade, later, so
    // the lower bound below holds however late this thread runs (a loaded host only makes
    // the ping later).
    let start = Instant::now();
    let mut client = RawClient::connect(engine.local_addr());
    match client.next_event() {
        Some(Event::Ping(payload)) => assert!(payload.is_empty()),
        other => panic!("expected the server's ping, got {other:?}"),
    }
    let pinged = start.elapsed();
    // Less a millisecond: the engine's clock counts whole milliseconds.
    assert!(
        pinged >= Duration::from_millis(149),
        "pinged after {pinged:?}, before the 150 ms ping interval"
    );
    // The codec owes a pong; this client never sends it. The server drops TCP.
    assert!(
        client.next_event().is_none(),
        "expected the connection dropped"
    );
    wait_until("on_close", || !recorder.closes().is_empty());
    let close = &recorder.closes()[0];
    assert_eq!(close.code.as_u16(), 1006);
    assert_eq!(close.reason, "no pong within pong_timeout");
    assert_eq!(close.initiator, CloseInitiator::Server);
    wait_until("the slot freed", || {
        engine.handle().metrics().total().connections_active == 0
    });
    let m = engine.handle().metrics().total();
    assert_eq!((m.pings_sent, m.pong_timeouts), (1, 1));
    engine.stop().unwrap();
}

#[test]
fn a_silent_peer_is_dropped_after_the_pong_deadline_on_io_uring() {
    silent_peer_is_dropped(Driver::IoUring);
}

#[test]
#[cfg(feature = "epoll")]
fn a_silent_peer_is_dropped_after_the_pong_deadline_on_epoll() {
    silent_peer_is_dropped(Driver::Epoll);
}

/// tungstenite answers pings as it reads: such a client is pinged again and again and
/// stays connected. It reads for more than two pong deadlines, so an engine that did not
/// take its pongs as life would have dropped it; the pong leaves with the very next read
/// (microseconds), so the 500 ms deadline holds on a loaded host.
fn answering_peer_stays(driver: Driver) {
    const PONG: Duration = Duration::from_millis(500);
    let (engine, recorder) = start_recorder(liveness_config(driver, 100, 500, 0));
    let mut ws = connect(engine.local_addr(), "/");
    let start = Instant::now();
    let mut pings = 0;
    while pings < 4 || start.elapsed() < 2 * PONG + Duration::from_millis(200) {
        assert!(
            start.elapsed() < DEADLINE,
            "only {pings} pings in {DEADLINE:?}"
        );
        match ws.read().expect("the connection stays open") {
            WsMessage::Ping(_) => pings += 1, // the pong goes out with the next read
            other => panic!("unexpected {other:?}"),
        }
    }
    ws.send(WsMessage::text("still here")).unwrap();
    loop {
        match ws.read().unwrap() {
            WsMessage::Text(t) => {
                assert_eq!(t.as_str(), "still here");
                break;
            }
            WsMessage::Ping(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(recorder.closes().is_empty(), "{:?}", recorder.closes());
    let m = engine.handle().metrics().total();
    assert!(m.pings_sent >= 4, "{m:?}");
    assert_eq!(m.pong_timeouts, 0);
    engine.stop().unwrap();
}

#[test]
fn a_peer_that_answers_pings_stays_connected_on_io_uring() {
    answering_peer_stays(Driver::IoUring);
}

#[test]
#[cfg(feature = "epoll")]
fn a_peer_that_answers_pings_stays_connected_on_epoll() {
    answering_peer_stays(Driver::Epoll);
}

/// Traffic proves life: a peer that keeps sending is never pinged. The client sends every
/// 20 ms against a 1 s interval for 2.5 intervals: an engine that pinged on its clock
/// regardless of traffic sends two pings, while a busy client would have to stall for 50 of
/// its periods (a second, which no loaded host here comes near) to earn one.
#[test]
fn a_busy_peer_is_not_pinged() {
    let (engine, _recorder) = start_recorder(liveness_config(Driver::IoUring, 1000, 1000, 0));
    let mut ws = connect(engine.local_addr(), "/");
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        ws.send(WsMessage::binary(vec![sent as u8])).unwrap();
        sent += 1;
        match ws.read().unwrap() {
            WsMessage::Binary(b) => assert_eq!(b.len(), 1),
            other => panic!("a busy peer got {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20)); // the client's send period
    }
    assert_eq!(engine.handle().metrics().total().pings_sent, 0);
    engine.stop().unwrap();
}

/// With pings off and an idle timeout, a peer that sends nothing gets a clean 1001, and one
/// that keeps sending messages does not. The talker sends every 20 ms against a 1 s idle
/// timeout: only a stall of 50 of its periods would close it.
#[test]
fn an_idle_peer_is_closed_with_1001_and_a_talking_one_is_not() {
    let (engine, recorder) = start_recorder(liveness_config(Driver::IoUring, 0, 0, 1000));
    // Before the connect, so the lower bound on the close below holds however late this
    // thread runs: the server's idle clock starts at the upgrade.
    let start = Instant::now();
    let mut idle = RawClient::connect(engine.local_addr());
    let mut talker = connect(engine.local_addr(), "/");
    // The talker sends every 20 ms until the idle one has been closed.
    let mut closed = None;
    std::thread::scope(|s| {
        let handle = s.spawn(|| idle.expect_close());
        while !handle.is_finished() {
            assert!(start.elapsed() < DEADLINE, "the idle peer was never closed");
            talker.send(WsMessage::text("hi")).unwrap();
            assert!(matches!(talker.read().unwrap(), WsMessage::Text(_)));
            std::thread::sleep(Duration::from_millis(20));
        }
        closed = Some(handle.join().unwrap());
    });
    let (code, reason) = closed.unwrap();
    assert_eq!((code, reason.as_str()), (1001, "idle timeout"));
    let took = start.elapsed();
    // Less a millisecond: the engine's clock counts whole milliseconds.
    assert!(
        took >= Duration::from_millis(999),
        "closed after {took:?}, before the 1 s idle timeout"
    );
    // The talker is still open: one more round trip.
    talker.send(WsMessage::text("still")).unwrap();
    assert!(matches!(talker.read().unwrap(), WsMessage::Text(_)));
    let m = engine.handle().metrics().total();
    assert_eq!((m.idle_timeouts, m.pings_sent), (1, 0));
    wait_until("on_close of the idle peer", || recorder.closes().len() == 1);
    engine.stop().unwrap();
}

#[test]
fn liveness_settings_are_validated() {
    let mut config = EngineConfig::default();
    config.timeouts.pong_timeout = Duration::ZERO;
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("timeouts.pong_timeout"), "{err}");
    config.timeouts.ping_interval = Duration::ZERO; // pings off: no pong deadline needed
    config.validate().unwrap();
    config.timeouts.idle_timeout = Duration::from_secs(2 * 24 * 3600);
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("timeouts.idle_timeout"), "{err}");
    let parsed =
        EngineConfig::from_toml("[timeouts]\nping_interval = \"0s\"\nidle_timeout = \"5m\"\n")
            .unwrap();
    assert_eq!(parsed.timeouts.ping_interval, Duration::ZERO);
    assert_eq!(parsed.timeouts.idle_timeout, Duration::from_secs(300));
}
