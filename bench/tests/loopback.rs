//! The load generator against small in-test servers on loopback: both echo drivers, raw echo,
//! and the idle load. Short windows; every server thread ends on its own (a read timeout).

mod common;

use std::{io::Write as _, net::SocketAddr, time::Duration};

use common::{raw_echo, spawn_server, ws_echo};

use ringcast_bench::{
    echo::{run_echo, Driver, EchoConfig},
    idle::{run_idle, IdleConfig},
    net::Target,
};

fn echo_config(addr: SocketAddr, driver: Driver) -> EchoConfig {
    let mut cfg = EchoConfig::new(Target::parse(&format!("ws://{addr}/echo")).unwrap());
    cfg.conns = 4;
    cfg.size_bytes = 100;
    cfg.warmup = Duration::from_millis(100);
    cfg.duration = Duration::from_millis(300);
    cfg.server_pid = Some(std::process::id());
    cfg.driver = driver;
    cfg
}

#[test]
fn both_drivers_measure_a_websocket_echo_server() {
    for driver in [Driver::Epoll, Driver::Uring] {
        let addr = spawn_server(4, ws_echo);
        let report = run_echo(&echo_config(addr, driver)).unwrap();
        assert_eq!(report.errors, 0, "{driver}: {:?}", report.first_error);
        assert!(report.messages > 0, "{driver}: {report:?}");
        assert!(report.latency.p50_us > 0.0, "{driver}: {report:?}");
        assert!(report.server_cpu_us_per_msg.is_some(), "{driver}");
        assert_eq!(report.driver, driver.to_string());
    }
}

#[test]
fn raw_mode_measures_a_tcp_echo_server() {
    for driver in [Driver::Epoll, Driver::Uring] {
        let addr = spawn_server(4, raw_echo);
        let mut cfg = echo_config(addr, driver);
        cfg.raw = true;
        let report = run_echo(&cfg).unwrap();
        assert_eq!(report.errors, 0, "{driver}: {:?}", report.first_error);
        assert!(report.messages > 0, "{driver}: {report:?}");
        assert_eq!(report.mode, "raw");
    }
}

#[test]
fn a_server_that_refuses_the_upgrade_fails_the_run() {
    let addr = spawn_server(4, |mut s| {
        let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
    });
    let err = run_echo(&echo_config(addr, Driver::Epoll)).unwrap_err();
    // The refusal itself, not any failure (a connect error would fail the run too).
    let text = format!("{err:#}");
    assert!(text.contains("404"), "{text}");
}

#[test]
fn idle_connections_are_opened_measured_and_closed() {
    let addr = spawn_server(50, ws_echo);
    let mut cfg = IdleConfig::new(
        Target::parse(&format!("ws://{addr}/")).unwrap(),
        std::process::id(),
    );
    cfg.conns = 50;
    cfg.hold = Duration::ZERO;
    cfg.settle_timeout = Duration::from_millis(500);
    let report = run_idle(&cfg).unwrap();
    assert_eq!(report.opened, 50);
    assert_eq!(report.failed, 0);
    assert_eq!(report.procs, 1);
    assert_eq!(report.closed_cleanly, 50);
}
