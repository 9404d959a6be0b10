//! Messages over real sockets with a tungstenite client: every message kind, big messages,
//! many clients across shards, upgrade facts reaching the handler. Run on io_uring and epoll.

mod util;

use std::{collections::HashSet, thread};

use ringcast::{Driver, Message};
use tungstenite::Message as WsMessage;
use util::*;

fn round_trips(driver: Driver) {
    let (engine, recorder) = start_recorder(config(2).with_driver(driver));
    let mut ws = connect(engine.local_addr(), "/echo");
    ws.send(WsMessage::text("héllo")).unwrap();
    assert_eq!(ws.read().unwrap(), WsMessage::text("héllo"));
    ws.send(WsMessage::binary(vec![0u8, 1, 2, 255])).unwrap();
    assert_eq!(ws.read().unwrap(), WsMessage::binary(vec![0u8, 1, 2, 255]));
    ws.send(WsMessage::Ping(b"are you there".to_vec().into()))
        .unwrap();
    assert_eq!(
        ws.read().unwrap(),
        WsMessage::Pong(b"are you there".to_vec().into())
    );
    ws.send(WsMessage::text("")).unwrap();
    assert_eq!(ws.read().unwrap(), WsMessage::text(""));
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    wait_until("on_close", || recorder.closes().len() == 1);
    let seen = recorder.seen();
    assert!(matches!(&seen[0], Seen::Open { path, .. } if path == "/echo"));
    assert_eq!(seen[1], Seen::Message(Message::text("héllo")));
    engine.stop().unwrap();
}

#[test]
fn text_binary_ping_and_empty_messages_round_trip_on_io_uring() {
    round_trips(Driver::IoUring);
}

#[test]
#[cfg(feature = "epoll")]
fn text_binary_ping_and_empty_messages_round_trip_on_epoll() {
    round_trips(Driver::Epoll);
}

#[test]
fn fragmented_message_with_a_ping_between_fragments_is_reassembled() {
    let (engine, recorder) = start_recorder(config(1));
    let mut client = RawClient::connect(engine.local_addr());
    let mut wire = client_frame(0x1, false, "frag".as_bytes());
    wire.extend(client_frame(0x9, true, b"mid"));
    wire.extend(client_frame(0x0, false, "men".as_bytes()));
    // A multi-byte character split across fragments.
    let split = "t é".as_bytes();
    wire.extend(client_frame(0x0, false, &split[..3]));
    wire.extend(client_frame(0x0, true, &split[3..]));
    client.send_raw(&wire);
    use ringcast::protocol::Event;
    assert_eq!(
        client.next_event(),
        Some(Event::Pong(bytes::Bytes::from_static(b"mid")))
    );
    match client.next_event() {
        Some(Event::Text(t)) => assert_eq!(t.as_str(), "fragment é"),
        other => panic!("expected the reassembled text, got {other:?}"),
    }
    assert!(recorder
        .seen()
        .contains(&Seen::Message(Message::text("fragment é"))));
    engine.stop().unwrap();
}

#[test]
fn one_mib_messages_round_trip_in_both_kinds() {
    let (engine, _recorder) = start_recorder(config(1));
    let mut ws = connect(engine.local_addr(), "/");
    let binary: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 31 % 251) as u8).collect();
    ws.send(WsMessage::binary(binary.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), WsMessage::binary(binary));
    let text: String = "ringcast ".repeat((1 << 20) / 9);
    ws.send(WsMessage::text(text.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), WsMessage::text(text));
    engine.stop().unwrap();
}

#[test]
fn many_concurrent_clients_are_spread_over_both_shards() {
    let (engine, _recorder) = start_recorder(config(2));
    let addr = engine.local_addr();
    let clients: Vec<_> = (0..64)
        .map(|i| {
            thread::spawn(move || {
                let mut ws = connect(addr, "/");
                ws.send(WsMessage::text("shard?")).unwrap();
                let shard = ws.read().unwrap().into_text().unwrap().to_string();
                for round in 0..20 {
                    let msg = format!("client {i} round {round}");
                    ws.send(WsMessage::text(msg.clone())).unwrap();
                    assert_eq!(ws.read().unwrap(), WsMessage::text(msg));
                }
                shard
            })
        })
        .collect();
    let shards: HashSet<String> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(shards, HashSet::from(["0".to_owned(), "1".to_owned()]));
    let metrics = engine.handle().metrics();
    assert_eq!(metrics.shards.len(), 2);
    assert!(metrics.shards.iter().all(|s| s.upgrades_accepted > 0));
    assert_eq!(metrics.total().messages_in, 64 * 21);
    engine.stop().unwrap();
}

#[test]
fn path_query_subprotocol_and_headers_reach_the_handler() {
    let mut cfg = config(1);
    cfg.io.keep_request_head = true; // headers after the upgrade are opt-in
    let (engine, _recorder) = start_recorder(cfg);
    let (mut ws, resp) = connect_with(
        engine.local_addr(),
        "/room/7?since=41",
        &[
            ("Sec-WebSocket-Protocol", "other.v9, echo.v1"),
            ("User-Agent", "ringcast-test"),
        ],
    )
    .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "echo.v1");
    ws.send(WsMessage::text("whoami")).unwrap();
    assert_eq!(
        ws.read().unwrap(),
        WsMessage::text("/room/7 since=41 echo.v1 ringcast-test")
    );
    engine.stop().unwrap();
}

#[test]
fn without_the_kept_head_path_query_and_subprotocol_remain_but_headers_do_not() {
    let (engine, _recorder) = start_recorder(config(1));
    let (mut ws, _) = connect_with(
        engine.local_addr(),
        "/room/7?since=41",
        &[
            ("Sec-WebSocket-Protocol", "echo.v1"),
            ("User-Agent", "ringcast-test"),
        ],
    )
    .unwrap();
    ws.send(WsMessage::text("whoami")).unwrap();
    assert_eq!(
        ws.read().unwrap(),
        WsMessage::text("/room/7 since=41 echo.v1 ")
    );
    engine.stop().unwrap();
}

#[test]
fn handler_rejection_answers_with_its_status_and_headers() {
    let (engine, recorder) = start_recorder(config(1));
    let addr = engine.local_addr();
    match connect_with(addr, "/private", &[]) {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 401);
            assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let (mut ws, _) = connect_with(addr, "/private", &[("Authorization", "Bearer ok")]).unwrap();
    ws.send(WsMessage::text("in")).unwrap();
    assert_eq!(ws.read().unwrap(), WsMessage::text("in"));
    assert_eq!(engine.handle().metrics().total().upgrades_rejected, 1);
    // The rejected request never opened a connection.
    assert_eq!(
        recorder
            .seen()
            .iter()
            .filter(|s| matches!(s, Seen::Open { .. }))
            .count(),
        1
    );
    engine.stop().unwrap();
}
