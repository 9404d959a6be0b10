//! Issue 15, "Also": a handler that panics costs its connection, not its shard (1011, 500 for
//! an upgrade, a count in `/metrics`, the other connections served throughout); and a JSON
//! payload nested deeper than `pubsub.max_json_depth` is refused with `bad_payload` over the
//! wire (JSON and binary dialects) and `PublishError::TooDeep` for an embedder's publish.

mod util;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

use ringcast::protocol::{
    envelope::{self, Dialect, ServerMessage},
    UpgradeRequest,
};
use ringcast::{
    Broker, CloseInfo, Ctx, Driver, Engine, EngineConfig, Handler, Message, Payload, PublishError,
    Upgrade, UpgradeCtx,
};
use tungstenite::Message as WsMessage;
use util::*;

/// Echoes, but panics on a text starting "panic" (in `on_message`), for a path of `/panic-open` (in
/// `on_open`), for a path of `/panic-upgrade` (in `on_upgrade`), and in `on_close` for a
/// connection whose path is `/panic-close`. Counts the `on_close` calls it sees.
#[derive(Debug, Clone, Default)]
struct Panicky {
    closes: Arc<AtomicUsize>,
}

impl Handler for Panicky {
    fn on_upgrade(&mut self, req: &UpgradeRequest<'_>, _ctx: &UpgradeCtx) -> Upgrade {
        if req.path() == "/panic-upgrade" {
            panic!("on_upgrade blew up");
        }
        Upgrade::accept()
    }

    fn on_open(&mut self, ctx: &mut Ctx<'_>) {
        if ctx.info().path() == "/panic-open" {
            panic!("on_open blew up");
        }
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        if let Message::Text(t) = &msg {
            if t.as_str().starts_with("panic") {
                // Something queued before the panic still goes out: the table stays whole.
                let _ = ctx.send_text("about to panic");
                panic!("secret detail: on_message blew up on {}", t.as_str());
            }
        }
        let status = ctx.send(msg);
        queued(ctx, status);
    }

    fn on_close(&mut self, ctx: &mut Ctx<'_>, _close: &CloseInfo) {
        self.closes.fetch_add(1, Ordering::SeqCst);
        if ctx.info().path() == "/panic-close" {
            panic!("on_close blew up");
        }
    }
}

/// Every log line of this test binary's engines (one global subscriber, no colors).
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static Mutex<Vec<u8>> = Box::leak(Box::default());
        tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || LogWriter(logs))
            .init();
        logs
    })
}

/// Appends to the captured log.
struct LogWriter(&'static Mutex<Vec<u8>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The captured log lines that contain `needle`.
fn log_lines(needle: &str) -> Vec<String> {
    let logs = String::from_utf8(logs().lock().unwrap().clone()).unwrap();
    logs.lines()
        .filter(|l| l.contains(needle))
        .map(str::to_owned)
        .collect()
}

fn start_panicky() -> (Engine, Panicky) {
    start_panicky_on(Driver::IoUring)
}

fn start_panicky_on(driver: Driver) -> (Engine, Panicky) {
    logs();
    let handler = Panicky::default();
    let shared = handler.clone();
    let config = config(1).with_driver(driver);
    let engine = Engine::start(config, move |_| shared.clone()).expect("start engine");
    (engine, handler)
}

fn echo_once(ws: &mut Client, text: &str) {
    ws.send(WsMessage::text(text)).expect("send");
    assert_eq!(ws.read().expect("echo"), WsMessage::text(text));
}

fn panics_counted(engine: &Engine) -> (u64, f64) {
    let scraped = http::scrape(engine.local_addr());
    (
        engine.handle().metrics().total().handler_panics,
        metric_sum(&scraped, "ringcast_handler_panics_total", &[]),
    )
}

#[test]
fn a_panic_in_on_message_closes_that_connection_with_1011_and_the_shard_serves_on() {
    panic_in_on_message(Driver::IoUring, "panic-logged");
}

#[test]
#[cfg(feature = "epoll")]
fn a_panic_in_on_message_closes_that_connection_with_1011_on_epoll_too() {
    panic_in_on_message(Driver::Epoll, "panic-logged-epoll");
}

/// The victim sends `trigger` (a text starting "panic", unique to the test for its log line).
fn panic_in_on_message(driver: Driver, trigger: &str) {
    let (engine, handler) = start_panicky_on(driver);
    let addr = engine.local_addr();
    let mut bystander = connect(addr, "/");
    let mut victim = connect(addr, "/");
    echo_once(&mut bystander, "before");
    echo_once(&mut victim, "before");
    assert_eq!(panics_counted(&engine), (0, 0.0));

    victim.send(WsMessage::text(trigger)).unwrap();
    assert_eq!(
        victim.read().unwrap(),
        WsMessage::text("about to panic"),
        "what the hook queued before panicking is sent"
    );
    let (code, reason) = expect_close(&mut victim);
    assert_eq!(code, 1011);
    assert_eq!(reason, "internal error");
    assert!(
        !reason.contains("secret"),
        "the panic message stays in the log"
    );

    // The same shard (one shard) goes on serving the other connection, and new ones.
    for i in 0..20 {
        echo_once(&mut bystander, &format!("after {i}"));
    }
    let mut newcomer = connect(addr, "/");
    echo_once(&mut newcomer, "new");
    assert_eq!(panics_counted(&engine), (1, 1.0));
    // Logged once, with the panic's message and where it was raised.
    let lines = log_lines(&format!("blew up on {trigger} "));
    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert!(
        line.contains("ERROR") && line.contains("handler panicked"),
        "{line}"
    );
    assert!(
        line.contains("on_message") && line.contains("panics.rs:"),
        "{line}"
    );
    // on_close ran for the connection whose hook panicked.
    wait_until("on_close of the victim", || {
        handler.closes.load(Ordering::SeqCst) == 1
    });
    assert_eq!(
        engine
            .handle()
            .metrics()
            .total()
            .closes(1011, ringcast::CloseInitiator::Server),
        1
    );
    engine.stop().unwrap();
}

#[test]
fn a_panic_in_on_message_stops_later_messages_already_sent() {
    let (engine, _handler) = start_panicky();
    let mut bystander = connect(engine.local_addr(), "/");
    // Three messages in one write: the ones after the panic are never handled (no echo, no
    // second panic).
    let mut client = RawClient::connect(engine.local_addr());
    let mut wire = client_frame(0x1, true, b"panic");
    wire.extend(client_frame(0x1, true, b"panic"));
    wire.extend(client_frame(0x1, true, b"echo me"));
    client.send_raw(&wire);
    assert_eq!(client.next_data().unwrap(), b"about to panic");
    assert_eq!(client.expect_close().0, 1011);
    assert_eq!(engine.handle().metrics().total().handler_panics, 1);
    echo_once(&mut bystander, "still here");
    engine.stop().unwrap();
}

#[test]
fn a_panic_in_on_open_closes_with_1011_and_one_in_on_upgrade_answers_500() {
    let (engine, handler) = start_panicky();
    let addr = engine.local_addr();
    let mut bystander = connect(addr, "/");
    echo_once(&mut bystander, "before");

    let mut opened = connect(addr, "/panic-open");
    assert_eq!(
        expect_close(&mut opened),
        (1011, "internal error".to_owned())
    );
    wait_until("on_close after a panicking on_open", || {
        handler.closes.load(Ordering::SeqCst) == 1
    });
    echo_once(&mut bystander, "between");

    let (status, response) = refused(connect_with(addr, "/panic-upgrade", &[]));
    assert_eq!(status, 500);
    let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
    assert!(
        !body.contains("blew up"),
        "no panic text in the response: {body}"
    );
    echo_once(&mut bystander, "after");
    assert_eq!(panics_counted(&engine), (2, 2.0));
    // The refused upgrade never opened: no on_close for it.
    assert_eq!(handler.closes.load(Ordering::SeqCst), 1);
    assert_eq!(
        engine
            .handle()
            .metrics()
            .total()
            .rejected(ringcast::RejectReason::Handler),
        1
    );
    engine.stop().unwrap();
}

#[test]
fn a_panic_in_on_close_is_only_counted() {
    let (engine, handler) = start_panicky();
    let addr = engine.local_addr();
    let mut bystander = connect(addr, "/");
    let mut closing = connect(addr, "/panic-close");
    echo_once(&mut closing, "hi");
    closing.close(None).unwrap();
    while closing.read().is_ok() {}
    wait_until("the panicking on_close", || {
        engine.handle().metrics().total().handler_panics == 1
    });
    assert_eq!(handler.closes.load(Ordering::SeqCst), 1);
    echo_once(&mut bystander, "after");
    // The slot was freed as usual.
    wait_until("the connection gone", || {
        engine.handle().metrics().total().connections_active == 1
    });
    engine.stop().unwrap();
}

/// A JSON value nested exactly `depth` deep.
fn nested(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

/// Publishes `data` as JSON and returns the reply, with the error's message when it is one.
fn publish(client: &mut BrokerClient, id: u64, data: &str) -> (Got, String) {
    let got = client.publish_json(id, "deep", data);
    let message = match envelope::decode_server(client.dialect, &client.last) {
        Ok(ServerMessage::Error { message, .. }) => message.into_owned(),
        _ => String::new(),
    };
    (got, message)
}

fn depth_limit_holds_on_the_wire(config: EngineConfig, limit: usize) {
    let engine = Engine::start(config, |_| Broker::new()).expect("start");
    let addr = engine.local_addr();
    for dialect in [Dialect::Json, Dialect::BinaryV1, Dialect::BinaryV2] {
        let mut subscriber = BrokerClient::connect(addr, Dialect::Json);
        subscriber.subscribe(1, "deep", None);
        let mut client = BrokerClient::connect(addr, dialect);
        let (got, _) = publish(&mut client, 1, &nested(limit));
        assert_eq!(
            got,
            Got::Ack(Some(1)),
            "{dialect:?}: depth {limit} accepted"
        );

        let (got, message) = publish(&mut client, 2, &nested(limit + 1));
        let refused = Got::Error {
            id: Some(2),
            code: "bad_payload".into(),
        };
        assert_eq!(got, refused, "{dialect:?}: depth {}", limit + 1);
        assert!(message.contains("nests"), "{dialect:?}: {message}");

        let start = Instant::now();
        let (got, _) = publish(&mut client, 3, &nested(100_000));
        let took = start.elapsed();
        assert_eq!(
            got,
            Got::Error {
                id: Some(3),
                code: "bad_payload".into()
            },
            "{dialect:?}"
        );
        assert!(
            took < Duration::from_secs(2),
            "{dialect:?}: 100,000 deep took {took:?}"
        );

        // The subscriber got the accepted one, then the next accepted one: nothing between.
        let (got, _) = publish(&mut client, 4, "\"end\"");
        assert_eq!(got, Got::Ack(Some(4)));
        let seen = subscriber.read_until("\"end\"");
        let data: Vec<&str> = seen.iter().map(|(_, d)| d.as_str()).collect();
        assert_eq!(data, [nested(limit).as_str(), "\"end\""], "{dialect:?}");
    }
    engine.stop().unwrap();
}

#[test]
fn json_nested_past_the_default_depth_is_bad_payload_in_every_dialect() {
    depth_limit_holds_on_the_wire(config(1), 64);
}

#[test]
fn json_depth_follows_the_config() {
    let mut config = config(1);
    config.pubsub.max_json_depth = 3;
    depth_limit_holds_on_the_wire(config, 3);
}

#[test]
fn an_embedders_json_publish_gets_the_same_limit() {
    let mut config = config(1);
    config.pubsub.max_json_depth = 5;
    let engine = Engine::start(config, |_| Broker::new()).expect("start");
    let publisher = engine.handle().publisher();
    let ok = Payload::json(nested(5)).expect("valid JSON");
    assert!(publisher.publish("deep", ok).is_ok());
    let deep = Payload::json(nested(6)).expect("valid JSON: depth is checked at publish");
    assert_eq!(publisher.publish("deep", deep), Err(PublishError::TooDeep));
    let very = Payload::json(nested(100_000)).expect("valid JSON");
    assert_eq!(publisher.publish("deep", very), Err(PublishError::TooDeep));
    // Binary payloads are opaque: brackets there are not nesting.
    let bytes = Payload::Binary(nested(1000).into_bytes().into());
    assert!(publisher.publish("deep", bytes).is_ok());
    assert_eq!(
        PublishError::TooDeep.error_code(),
        envelope::ErrorCode::BadPayload
    );
    engine.stop().unwrap();
}

#[test]
fn a_zero_json_depth_is_a_config_error() {
    let mut config = config(1);
    config.pubsub.max_json_depth = 0;
    let err = config.validate().expect_err("0 is refused");
    assert!(err.to_string().contains("pubsub.max_json_depth"), "{err}");
    assert!(EngineConfig::default()
        .to_toml_documented()
        .contains("max_json_depth = 64"));
}
