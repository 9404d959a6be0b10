//! Plain HTTP on the WebSocket port: `/healthz`, `/readyz` and `/metrics` answered by the
//! engine, every other plain request a clear 426 or 405. `/metrics` is parsed as a
//! Prometheus scraper would parse it and checked for counters this test caused.

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
    assert_eq!(http_get(addr, "GET /internal/metrics HTTP/1.1").0, 200);
    let (status, head, _) = http_get(addr, "POST /internal/metrics HTTP/1.1");
    assert_eq!(status, 405);
    assert!(head.contains("Allow: GET"), "{head}");
    engine.stop().unwrap();
}

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
