//! Plain HTTP on the WebSocket port: `/healthz`, `/readyz` and `/metrics` answered by the
//! engine (GET or HEAD), every other plain request a clear 426 or 405. `/metrics` is parsed as a
//! Prometheus scraper would parse it and checked for counters this test caused; without the
//! `metrics` feature it answers 404 naming the feature.

mod util;

use tungstenite::Message as WsMessage;
use util::*;

#[test]
fn health_and_readiness_answer_200() {
    let (engine, _) = start_recorder(config(2));
    let addr = engine.local_addr();
    assert_eq!(http_get(addr, "GET /healthz HTTP/1.1").0, 200);
    let (status, _, body) = http_get(addr, "GET /readyz?probe=lb HTTP/1.1");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    engine.stop().unwrap();
}

#[test]
fn other_plain_requests_get_426_or_405_and_paths_are_configurable() {
    let mut cfg = config(1);
    cfg.http.metrics_path = "/internal/metrics".into();
    cfg.http.health_path = String::new(); // off
    let (engine, _) = start_recorder(cfg);
    let addr = engine.local_addr();
    let (status, head, _) = http_get(addr, "GET /index.html HTTP/1.1");
    assert_eq!(status, 426);
    assert!(head.contains("Upgrade: websocket"), "{head}");
    assert_eq!(http_get(addr, "GET /healthz HTTP/1.1").0, 426, "turned off");
    assert_eq!(http_get(addr, "GET /metrics HTTP/1.1").0, 426, "moved");
    let metrics = if cfg!(feature = "metrics") { 200 } else { 404 };
    assert_eq!(http_get(addr, "GET /internal/metrics HTTP/1.1").0, metrics);
    let (status, head, _) = http_get(addr, "POST /internal/metrics HTTP/1.1");
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET"), "{head}");
    engine.stop().unwrap();
}

#[cfg(feature = "metrics")]
#[test]
fn metrics_parse_and_count_what_happened() {
    let (engine, _) = start_recorder(config(2));
    let addr = engine.local_addr();
    let mut ws = connect(addr, "/");
    for i in 0..3 {
        ws.send(WsMessage::text(format!("m{i}"))).unwrap();
        assert!(matches!(ws.read().unwrap(), WsMessage::Text(_)));
    }
    assert_eq!(http_get(addr, "GET /healthz HTTP/1.1").0, 200);
    wait_until("the /healthz connection released", || {
        engine.handle().metrics().total().connections_active == 1
    });
    let (status, head, body) = http_get(addr, "GET /metrics HTTP/1.1");
    assert_eq!(status, 200);
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    let scrape = parse_metrics(&body);
    let sum = |name: &str| -> f64 {
        let series = scrape.samples.iter().filter(|s| s.metric == name).count();
        assert_eq!(series, 2, "one series per shard for {name}");
        metric_sum(&scrape, name, &[])
    };
    assert_eq!(sum("ringcast_messages_in_total"), 3.0);
    assert_eq!(sum("ringcast_upgrades_accepted_total"), 1.0);
    assert_eq!(
        sum("ringcast_http_requests_total"),
        1.0,
        "the /healthz before"
    );
    // The WebSocket client and the scrape's own connection.
    assert_eq!(sum("ringcast_connections_active"), 2.0);
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "ringcast_messages_in_total" && s.labels.get("shard") == Some("1")));
    let help = scrape
        .docs
        .get("ringcast_pong_timeouts")
        .expect("help text");
    assert!(help.contains("pong_timeout"), "{help}");
    engine.stop().unwrap();
}

/// Without the OpenMetrics encoding `/metrics` is still the engine's path, answered 404 with
/// the reason (GET and HEAD), not a WebSocket-only 426 that would hide why.
#[cfg(not(feature = "metrics"))]
#[test]
fn metrics_without_the_feature_answer_404_naming_it() {
    let (engine, _) = start_recorder(config(1));
    let addr = engine.local_addr();
    let (status, head, body) = http_get(addr, "GET /metrics HTTP/1.1");
    assert_eq!(status, 404, "{head}");
    assert!(head.contains("text/plain"), "{head}");
    assert!(body.contains("`metrics` feature"), "{body}");
    let (status, _, body) = http_get(addr, "HEAD /metrics HTTP/1.1");
    assert_eq!((status, body.as_str()), (404, ""));
    // The counters are kept all the same: the scrape itself was counted.
    wait_until("both requests counted", || {
        engine.handle().metrics().total().http_requests == 2
    });
    engine.stop().unwrap();
}

/// Blocks its shard's thread on a "block" message until released (bounded), standing in for
/// a handler that hangs: the shard stops taking deliveries.
#[derive(Clone)]
struct Blocker {
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ringcast::Handler for Blocker {
    fn on_message(&mut self, ctx: &mut ringcast::Ctx<'_>, msg: ringcast::Message) {
        if msg.payload().as_ref() == b"block" {
            let start = std::time::Instant::now();
            while !self.release.load(std::sync::atomic::Ordering::Relaxed)
                && start.elapsed() < DEADLINE
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        } else {
            let status = ctx.send_text(ctx.shard().index().to_string());
            queued(ctx, status);
        }
    }
}

#[test]
fn readiness_turns_false_while_a_shard_takes_no_canary() {
    let mut cfg = config(2);
    cfg.http.canary_interval = std::time::Duration::from_millis(50);
    let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let blocker = Blocker {
        release: release.clone(),
    };
    let engine = ringcast::Engine::start(cfg, move |_| blocker.clone()).expect("start");
    let addr = engine.local_addr();
    let handle = engine.handle();
    // Every step waits on a condition: on a loaded host a shard that is merely descheduled for
    // three 50 ms intervals counts as stale too, so a single probe could read either way. What
    // the test proves holds regardless: readiness falls while shard 0 is blocked, the 503
    // names shard 0, and readiness comes back once it is released. An engine whose canary
    // missed a blocked shard, or never recovered, times out on one of these waits.
    wait_until("ready", || {
        handle.ready() && http_get(addr, "GET /readyz HTTP/1.1").0 == 200
    });
    // Find a connection on each shard, then block shard 0.
    let mut on_shard: [Option<Client>; 2] = [None, None];
    wait_until("a client on each shard", || {
        let mut ws = connect(addr, "/");
        ws.send(WsMessage::text("which")).unwrap();
        let WsMessage::Text(shard) = ws.read().unwrap() else {
            panic!("a shard number")
        };
        let i: usize = shard.as_str().parse().unwrap();
        on_shard[i].get_or_insert(ws);
        on_shard.iter().all(Option::is_some)
    });
    let blocked = on_shard[0].as_mut().unwrap();
    blocked.send(WsMessage::text("block")).unwrap();
    wait_until("not ready", || !handle.ready());
    // /readyz, answered by the shard still running (a probe landing on the blocked one waits
    // for it; such a probe is skipped by its read timeout, so use short ones).
    let mut answered = None;
    wait_until("a 503 from the running shard", || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_millis(200)))
            .unwrap();
        use std::io::{Read, Write};
        write!(stream, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut text = String::new();
        if stream.read_to_string(&mut text).is_ok() && text.starts_with("HTTP/1.1 503") {
            answered = Some(text);
            return true;
        }
        false
    });
    let text = answered.unwrap();
    assert!(text.contains("shard 0 is not taking deliveries"), "{text}");
    release.store(true, std::sync::atomic::Ordering::Relaxed);
    wait_until("ready again", || {
        handle.ready() && http_get(addr, "GET /readyz HTTP/1.1").0 == 200
    });
    drop(on_shard);
    engine.stop().unwrap();
}

#[test]
fn head_answers_as_get_does_without_the_body() {
    let (engine, _) = start_recorder(config(2));
    let addr = engine.local_addr();
    for path in ["/healthz", "/readyz"] {
        let (status, get_head, get_body) = http_get(addr, &format!("GET {path} HTTP/1.1"));
        assert_eq!(status, 200, "GET {path}");
        let (status, head, body) = http_get(addr, &format!("HEAD {path} HTTP/1.1"));
        assert_eq!(status, 200, "HEAD {path}: {head}");
        assert_eq!(head, get_head, "HEAD {path}: the GET answer's headers");
        assert!(
            head.contains(&format!("Content-Length: {}", get_body.len())),
            "{head}"
        );
        assert_eq!(body, "", "HEAD {path} has no body");
    }
    if cfg!(feature = "metrics") {
        let (status, head, body) = http_get(addr, "HEAD /metrics HTTP/1.1");
        assert_eq!(status, 200, "{head}");
        assert!(head.contains("application/openmetrics-text"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("a Content-Length")
            .parse()
            .unwrap();
        assert!(length > 0);
        assert_eq!(body, "");
    }
    // Other paths and methods are still refused, saying what is allowed.
    let (status, head, _) = http_get(addr, "HEAD /index.html HTTP/1.1");
    assert_eq!(status, 405, "{head}");
    let (status, _, _) = http_get(addr, "DELETE /readyz HTTP/1.1");
    assert_eq!(status, 405);
    engine.stop().unwrap();
}

#[test]
fn readiness_holds_while_another_thread_waits_from_the_start() {
    // Every probe must be 200, so the canary must not go stale merely because the host is
    // loaded: 250 ms makes that need a shard or the canary thread held off the CPU for 750 ms
    // (three intervals), which two busy loops on two cores do not come near. The regression
    // this guards (a waiting thread that stopped the canary) is stale for good after 750 ms.
    let interval = std::time::Duration::from_millis(250);
    let mut cfg = config(2);
    cfg.http.canary_interval = interval;
    let (engine, _) = start_recorder(cfg);
    let addr = engine.local_addr();
    let handle = engine.handle();
    // Waiting at once, as the binary does: the engine must run on, canary and all.
    let waiter = std::thread::spawn(move || engine.wait());
    // Well past the 3 intervals after which a shard without canaries counts as stuck, and
    // at least 20 probes however slowly each is answered.
    let watch = interval * 3 * 3;
    let start = std::time::Instant::now();
    let mut probes = 0;
    while start.elapsed() < watch || probes < 20 {
        assert!(
            start.elapsed() < DEADLINE,
            "{probes} probes in {DEADLINE:?}"
        );
        let (status, _, body) = http_get(addr, "GET /readyz HTTP/1.1");
        assert_eq!(
            (status, body.as_str()),
            (200, "ready\n"),
            "probe {probes} at {:?}",
            start.elapsed()
        );
        assert!(handle.ready());
        probes += 1;
        std::thread::sleep(interval / 5);
    }
    handle.stop();
    let deadline = std::time::Instant::now() + DEADLINE;
    while !waiter.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "wait() did not return"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    waiter.join().unwrap().unwrap();
}
