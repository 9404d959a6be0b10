//! The engine's admission checks with real clients: the origin allow-list (403), the
//! per-address cap under a burst from one address (429), and upgrade-rate shaping (503 with a
//! jittered `Retry-After`); each refusal counted by reason in `/metrics`.

mod util;

use std::{collections::HashSet, time::Duration};

use ringcast::RejectReason;
use util::*;

/// A TCP connection to `addr` from the loopback address `source`.
fn from_address(source: [u8; 4], addr: std::net::SocketAddr) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from((source, 0)).into())
        .unwrap();
    socket.connect(&addr.into()).unwrap();
    let stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream
}

#[test]
fn origins_off_the_list_get_403_and_listed_ones_upgrade() {
    let mut cfg = config(2);
    cfg.admission.allowed_origins = vec![
        "https://app.example.com".into(),
        "https://*.trusted.io".into(),
    ];
    let (engine, _) = start_recorder(cfg);
    let addr = engine.local_addr();
    connect_with(addr, "/", &[("Origin", "https://app.example.com")]).expect("listed");
    connect_with(addr, "/", &[("Origin", "https://desk.trusted.io")]).expect("pattern");
    connect_with(addr, "/", &[]).expect("no Origin: not a browser");
    for origin in ["https://evil.example", "http://app.example.com", "null"] {
        let (status, response) = refused(connect_with(addr, "/", &[("Origin", origin)]));
        assert_eq!(status, 403, "{origin}");
        let body = String::from_utf8(response.body().clone().unwrap()).unwrap();
        assert_eq!(body, "origin not allowed\n");
    }
    if cfg!(feature = "metrics") {
        let scrape = parse_metrics(&http_get(addr, "GET /metrics HTTP/1.1").2);
        let origin = [("reason", "origin")];
        assert_eq!(
            metric_sum(&scrape, "ringcast_upgrade_rejections_total", &origin),
            3.0
        );
        assert_eq!(
            metric_sum(&scrape, "ringcast_upgrade_rejections_total", &[]),
            3.0,
            "no other refusals"
        );
    }
    engine.stop().unwrap();
}

#[test]
fn a_required_origin_refuses_clients_without_one() {
    let mut cfg = config(1);
    cfg.admission.require_origin = true;
    let (engine, _) = start_recorder(cfg);
    let addr = engine.local_addr();
    assert_eq!(refused(connect_with(addr, "/", &[])).0, 403);
    connect_with(addr, "/", &[("Origin", "https://any.where")]).expect("any origin is listed");
    engine.stop().unwrap();
}

#[test]
fn the_per_address_cap_holds_under_a_burst_from_one_address() {
    const CAP: usize = 5;
    const BURST: usize = 40;
    let mut cfg = config(2);
    cfg.admission.max_connections_per_ip = CAP as u32;
    let (engine, _) = start_recorder(cfg);
    let addr = engine.local_addr();
    // Every client at once, from 127.0.0.1, over both shards.
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..BURST)
            .map(|_| s.spawn(move || connect_with(addr, "/", &[])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut open = Vec::new();
    let mut statuses = Vec::new();
    for r in results {
        match r {
            Ok((ws, _)) => open.push(ws),
            Err(e) => statuses.push(refused(Err(e)).0),
        }
    }
    assert_eq!(open.len(), CAP, "exactly the cap got through");
    assert!(statuses.iter().all(|&s| s == 429), "{statuses:?}");
    assert_eq!(statuses.len(), BURST - CAP);
    // Another address is counted apart.
    let mut other = from_address([127, 0, 0, 2], addr);
    raw_upgrade(&mut other); // asserts the 101
    let total = engine.handle().metrics().total();
    assert_eq!(total.rejected(RejectReason::IpCap), (BURST - CAP) as u64);
    // A place frees when a connection closes (counted on whichever shard held it).
    let mut ws = open.pop().unwrap();
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    drop(ws);
    wait_until("a freed place", || match connect_with(addr, "/", &[]) {
        Ok(_) => true,
        // Until the close is counted, still the cap's refusal, and nothing else.
        Err(e) => {
            assert_eq!(refused(Err(e)).0, 429);
            false
        }
    });
    engine.stop().unwrap();
}

#[test]
fn over_the_upgrade_rate_gets_503_with_a_spread_retry_after() {
    let mut cfg = config(1);
    cfg.admission.upgrades_per_sec = 1;
    cfg.admission.upgrade_burst = 3;
    cfg.admission.retry_after_max = Duration::from_secs(30);
    let (engine, _) = start_recorder(cfg);
    let addr = engine.local_addr();
    // Health checks are plain HTTP: never shaped.
    for _ in 0..5 {
        assert_eq!(http_get(addr, "GET /healthz HTTP/1.1").0, 200);
    }
    let mut accepted = 0;
    let mut waits = HashSet::new();
    let started = std::time::Instant::now();
    for _ in 0..40 {
        match connect_with(addr, "/", &[]) {
            Ok(_) => accepted += 1,
            Err(e) => {
                let (status, response) = refused(Err(e));
                assert_eq!(status, 503);
                let wait: u64 = response.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=30).contains(&wait), "{wait}");
                waits.insert(wait);
            }
        }
    }
    // The burst, plus at most what one per second refills while the loop runs: measured, not
    // assumed, since a loaded host stretches the loop (about 40 ms idle). Unshaped, all 40
    // would be accepted, which would take a 37 s loop to excuse.
    let elapsed = started.elapsed().as_secs_f64();
    assert!(accepted >= 3, "{accepted} accepted: less than the burst");
    assert!(
        accepted as f64 <= 3.0 + elapsed,
        "{accepted} accepted in {elapsed:.2} s: more than the burst of 3 and 1/s refill"
    );
    assert!(waits.len() >= 5, "Retry-After should be spread: {waits:?}");
    let total = engine.handle().metrics().total();
    assert_eq!(total.rejected(RejectReason::Rate), 40 - accepted);
    engine.stop().unwrap();
}

#[test]
fn at_the_memory_budget_upgrades_get_503_and_metrics_show_the_memory() {
    let mut cfg = config(2);
    // Below what any process holds: every upgrade is over budget.
    cfg.admission.memory_budget_bytes = 1 << 20;
    let (engine, _) = start_recorder(cfg);
    let addr = engine.local_addr();
    let (status, response) = refused(connect_with(addr, "/", &[]));
    assert_eq!(status, 503);
    assert!(response.headers().contains_key("retry-after"));
    let body = String::from_utf8(response.body().clone().unwrap()).unwrap();
    assert!(body.contains("memory budget"), "{body}");
    assert_eq!(
        engine
            .handle()
            .metrics()
            .total()
            .rejected(RejectReason::Memory),
        1
    );
    // Plain HTTP still answers: an operator can see why.
    if cfg!(feature = "metrics") {
        let scrape = parse_metrics(&http_get(addr, "GET /metrics HTTP/1.1").2);
        assert!(metric_sum(&scrape, "ringcast_memory_resident_bytes", &[]) > f64::from(1 << 20));
        assert_eq!(
            metric_sum(
                &scrape,
                "ringcast_upgrade_rejections_total",
                &[("reason", "memory")]
            ),
            1.0
        );
        let depths = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "ringcast_inbox_depth")
            .count();
        assert_eq!(depths, 2, "one inbox depth per shard");
    }
    engine.stop().unwrap();
}

#[test]
fn under_the_memory_budget_connections_count_their_kernel_share() {
    let mut cfg = config(1);
    cfg.admission.memory_budget_bytes = 1 << 40;
    cfg.admission.kernel_bytes_per_connection = 5000;
    let (engine, _) = start_recorder(cfg);
    let addr = engine.local_addr();
    let _clients: Vec<_> = (0..3).map(|_| connect(addr, "/")).collect();
    let memory = engine.handle().metrics().memory;
    assert_eq!(memory.connections, 3);
    assert_eq!(memory.kernel_estimate_bytes, 3 * 5000);
    assert!(memory.resident_bytes > 0);
    assert!(memory.per_connection_bytes() > 5000);
    engine.stop().unwrap();
}
