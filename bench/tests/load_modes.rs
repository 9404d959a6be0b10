//! The fixed-rate echo and the connection storms against small in-test servers on loopback.
//! Short windows and small counts; every server thread ends on its own (a read timeout), and
//! each listener accepts a bounded number of connections.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    time::Duration,
};

use common::{raw_echo, spawn_server, ws_echo};

use ringcast_bench::{
    echo::{run_echo, Driver, EchoConfig},
    net::Target,
    storm::{run_storm, Backoff, Scenario, StormConfig},
};

fn rate_config(addr: SocketAddr, rate: f64) -> EchoConfig {
    let mut cfg = EchoConfig::new(Target::parse(&format!("ws://{addr}/echo")).unwrap());
    cfg.conns = 4;
    cfg.size_bytes = 100;
    cfg.warmup = Duration::from_millis(100);
    cfg.duration = Duration::from_millis(500);
    cfg.rate = Some(rate);
    cfg
}

#[test]
fn a_fixed_rate_run_reports_the_target_and_the_achieved_rate() {
    let addr = spawn_server(4, ws_echo);
    let report = run_echo(&rate_config(addr, 2000.0)).unwrap();
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert_eq!(report.target_rate, Some(2000.0));
    let achieved = report.achieved_rate.unwrap();
    // A loaded machine may lag a little; the schedule itself must not be off by much.
    assert!(achieved > 1000.0 && achieved < 2200.0, "{report:?}");
    // 2000/s over 0.5 s is 1000 messages due in the window.
    assert!(report.messages + report.unanswered <= 1000, "{report:?}");
    assert!(report.messages > 500, "{report:?}");
    assert_eq!(report.throughput_interval_ms, 100);
    assert!((5..=7).contains(&report.throughput.len()), "{report:?}");
    assert!(report.send_lag.is_some());
    assert_eq!(report.latency_spectrum.last().unwrap().percentile, 100.0);
}

#[test]
fn a_fixed_rate_run_pipelines_raw_echoes() {
    let addr = spawn_server(4, raw_echo);
    let mut cfg = rate_config(addr, 4000.0);
    cfg.raw = true;
    cfg.size_bytes = 7;
    let report = run_echo(&cfg).unwrap();
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert!(report.messages > 1000, "{report:?}");
}

#[test]
fn a_fixed_rate_needs_the_epoll_driver() {
    let addr = spawn_server(4, ws_echo);
    let mut cfg = rate_config(addr, 1000.0);
    cfg.driver = Driver::Uring;
    let err = run_echo(&cfg).unwrap_err();
    assert!(format!("{err}").contains("epoll"), "{err}");
}

#[test]
fn the_closed_loop_reports_throughput_per_interval() {
    let addr = spawn_server(4, ws_echo);
    let mut cfg = rate_config(addr, 1.0);
    cfg.rate = None;
    let report = run_echo(&cfg).unwrap();
    assert_eq!(report.target_rate, None);
    assert_eq!(report.achieved_rate, None);
    assert_eq!(report.throughput.iter().sum::<u64>(), report.messages);
}

fn storm_config(addr: SocketAddr, scenario: Scenario) -> StormConfig {
    let mut cfg = StormConfig::new(Target::parse(&format!("ws://{addr}/")).unwrap());
    cfg.scenario = scenario;
    cfg.conns = 10;
    cfg.duration = Duration::from_millis(500);
    cfg.hold = Duration::from_millis(20);
    cfg.reconnect_timeout = Duration::from_secs(10);
    cfg.attempt_timeout = Duration::from_secs(5);
    cfg
}

#[test]
fn churn_upgrades_holds_and_closes_repeatedly() {
    let addr = spawn_server(2000, ws_echo);
    let report = run_storm(&storm_config(addr, Scenario::Churn)).unwrap();
    let churn = report.churn.as_ref().unwrap();
    assert!(report.mass.is_none());
    // 10 slots cycling every 20 ms and a bit for 0.5 s: well over one round each.
    assert!(churn.upgrades > 20, "{report:?}");
    assert_eq!(churn.failed, 0, "{report:?}");
    assert!(churn.closed_cleanly >= churn.upgrades - 10, "{report:?}");
    assert!(churn.upgrades_per_sec > 0.0);
    report.check(0.0).unwrap();
}

#[test]
fn a_mass_reconnect_brings_every_connection_back() {
    let addr = spawn_server(100, ws_echo);
    let report = run_storm(&storm_config(addr, Scenario::Mass)).unwrap();
    let mass = report.mass.as_ref().unwrap();
    assert_eq!(mass.opened, 10, "{report:?}");
    assert_eq!(mass.back, 10, "{report:?}");
    assert!(mass.all_back_secs.is_some(), "{report:?}");
    assert_eq!(mass.attempts, 10 + mass.failed);
    assert!(mass.reconnect.max_us > 0.0);
    report.check(0.0).unwrap();
}

#[test]
fn refused_connects_are_counted_by_reason_and_fail_the_check() {
    // Bind and drop a listener: nothing listens on the port any more.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = storm_config(addr, Scenario::Churn);
    cfg.conns = 2;
    cfg.duration = Duration::from_millis(300);
    cfg.backoff = Backoff {
        base: Duration::from_millis(10),
        cap: Duration::from_millis(40),
    };
    let report = run_storm(&cfg).unwrap();
    let churn = report.churn.as_ref().unwrap();
    assert_eq!(churn.upgrades, 0);
    assert!(
        churn.failures.get("refused").copied().unwrap_or(0) > 2,
        "{report:?}"
    );
    assert!(report.check(100.0).is_err());
}

#[test]
fn an_http_error_status_is_counted_under_its_code() {
    let addr = spawn_server(1000, |mut s| {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
    });
    let mut cfg = storm_config(addr, Scenario::Churn);
    cfg.conns = 2;
    cfg.duration = Duration::from_millis(300);
    cfg.backoff = Backoff {
        base: Duration::from_millis(10),
        cap: Duration::from_millis(40),
    };
    let report = run_storm(&cfg).unwrap();
    let churn = report.churn.as_ref().unwrap();
    assert!(
        churn.failures.get("http 503").copied().unwrap_or(0) > 0,
        "{report:?}"
    );
    assert_eq!(churn.upgrades, 0);
}
