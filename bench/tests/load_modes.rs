//! The fixed-rate echo and the connection storms against small in-test servers on loopback.
//! Short windows and small counts; every server thread ends on its own (a read timeout), and
//! each listener accepts a bounded number of connections.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    time::Duration,
};

use common::{raw_echo, spawn_server, ws_echo};

use ringcast_bench::{
    echo::{run_echo, Driver, EchoConfig, EchoReport},
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

/// The checks every fixed-rate run passes however loaded the host is, for `rate` messages
/// per second over `rate_config`'s 0.1 s warm-up and 0.5 s window. A loaded host makes the
/// loop late, and lateness moves messages in time but never changes how many the schedule
/// makes due, nor lets the loop send one before it is due; so these count messages instead
/// of bounding rates with margins.
fn assert_on_schedule(report: &EchoReport, rate: f64) {
    assert_eq!(report.errors, 0, "{:?}", report.first_error);
    assert_eq!(report.target_rate, Some(rate));
    // Exactly the messages due in the window were measured, answered or not: a schedule off
    // its rate (per connection instead of in total, say) measures another count.
    let due = rate * 0.5;
    let measured = (report.messages + report.unanswered) as f64;
    assert!(
        (measured - due).abs() <= 1.0,
        "{measured} measured, {due} due: {report:?}"
    );
    // Sent while the window was open: never more than the whole schedule (the warm-up's and
    // the window's messages, none after it), and at least every measured message that was
    // sent within its lag of being due (each goes out after the window opens, and the report's
    // send lag is how late the latest one was).
    let sent = report.achieved_rate.expect("a fixed rate reports it") * report.window_secs;
    assert!(
        sent <= rate * 0.6 + 1.0,
        "{sent} sent in the window: {report:?}"
    );
    let lag = report.send_lag.as_ref().expect("a fixed rate reports it");
    let late = lag.max_us / 1e6;
    assert!(
        sent >= rate * (0.5 - late) * 0.99 - 1.0,
        "{sent} sent in the window with the latest send {late:.3} s late: {report:?}"
    );
    // The throughput series covers the window, one count per 100 ms.
    assert_eq!(report.throughput_interval_ms, 100);
    let intervals = (report.window_secs * 10.0).ceil() as usize;
    assert!(
        report.throughput.len().abs_diff(intervals) <= 1,
        "{} intervals for {:.3} s: {report:?}",
        report.throughput.len(),
        report.window_secs
    );
}

#[test]
fn a_fixed_rate_run_reports_the_target_and_the_achieved_rate() {
    let addr = spawn_server(4, ws_echo);
    let report = run_echo(&rate_config(addr, 2000.0)).unwrap();
    assert_on_schedule(&report, 2000.0);
    // Unanswered means no echo a second after the window closed; the in-test echo answers
    // at once, so most are back.
    assert!(report.messages > 500, "{report:?}");
    assert_eq!(report.latency_spectrum.last().unwrap().percentile, 100.0);
}

#[test]
fn a_fixed_rate_run_pipelines_raw_echoes() {
    let addr = spawn_server(4, raw_echo);
    let mut cfg = rate_config(addr, 4000.0);
    cfg.raw = true;
    cfg.size_bytes = 7;
    let report = run_echo(&cfg).unwrap();
    assert_on_schedule(&report, 4000.0);
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
    // 10 slots cycling every 20 ms and a bit for 0.5 s: about 20 rounds each when idle. More
    // than one round is the behaviour (a slot upgrades again after its close); a loaded host
    // only has to fit a second 20 ms cycle into half a second.
    assert!(churn.upgrades > 10, "{report:?}");
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
    // A port nothing listens on (bound and released).
    let addr = SocketAddr::from(([127, 0, 0, 1], ringcast_testkit::free_port()));
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
    // Fails for the refusals, even with every failure allowed: nothing was upgraded.
    let err = report.check(100.0).unwrap_err().to_string();
    assert!(err.contains("no connection was upgraded"), "{err}");
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
