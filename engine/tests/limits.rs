//! Connection caps: a full shard stops accepting and resumes when a slot frees.

mod util;

use std::{sync::mpsc, thread, time::Duration};

use tungstenite::Message as WsMessage;
use util::*;

#[test]
fn a_full_shard_pauses_accepting_until_a_connection_closes() {
    let mut config = config(1);
    config.limits.max_connections_per_shard = 2;
    config.timeouts.handshake_timeout = Duration::from_secs(30);
    let (engine, _recorder) = start_recorder(config);
    let addr = engine.local_addr();
    let mut first = connect(addr, "/");
    let _second = connect(addr, "/");
    let (done_tx, done_rx) = mpsc::channel();
    let third = thread::spawn(move || {
        // TCP connects (the kernel queues it); the upgrade waits for a free slot.
        let mut ws = connect(addr, "/");
        done_tx.send(()).unwrap();
        ws.send(WsMessage::text("third")).unwrap();
        ws.read().unwrap()
    });
    wait_until("accept paused", || {
        engine.handle().metrics().total().accept_paused_full == 1
    });
    let metrics = engine.handle().metrics().total();
    assert_eq!(
        metrics.connections_accepted, 2,
        "the third was not accepted"
    );
    // Empty: not upgraded, and the thread is still waiting (Disconnected would mean its
    // connect failed outright, which is not a paused accept).
    assert_eq!(
        done_rx.try_recv(),
        Err(mpsc::TryRecvError::Empty),
        "third upgraded while the shard was full"
    );

    first.close(None).unwrap();
    while first.read().is_ok() {}
    done_rx
        .recv_timeout(DEADLINE)
        .expect("third upgraded once a slot freed");
    assert_eq!(third.join().unwrap(), WsMessage::text("third"));
    assert_eq!(engine.handle().metrics().total().connections_accepted, 3);
    engine.stop().unwrap();
}

#[test]
fn config_errors_are_reported_by_start_naming_the_key() {
    let mut config = config(1);
    config.limits.max_connections_per_shard = 0;
    let err = ringcast::Engine::start(config, |_| util::Echo).unwrap_err();
    assert!(
        err.to_string().contains("limits.max_connections_per_shard"),
        "{err}"
    );
}

#[test]
fn a_port_held_by_another_listener_is_reported_not_shared() {
    let (engine, _recorder) = start_recorder(config(1));
    let taken = config(1).with_listen(engine.local_addr());
    let err = ringcast::Engine::start(taken, |_| util::Echo).unwrap_err();
    assert!(err.to_string().contains("cannot listen"), "{err}");
    engine.stop().unwrap();
}
