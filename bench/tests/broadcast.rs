//! The broadcast load against small in-test servers on loopback (a relay that delivers every
//! message to every client, and an echo server that does not, which must fail the run rather
//! than hang), and the CI smoke test of the broadcast peers: this crate's
//! `peer-tokio-tungstenite-broadcast` and Node `ws` (`bench/node`; skipped loudly when node or
//! its modules are missing, a failure under CI). Short windows; every in-test server thread
//! ends on its own (a deadline), every peer process is killed when its test ends.

mod relay;

use std::{
    net::{SocketAddr, TcpListener},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use ringcast_bench::{
    broadcast::{run_broadcast, BroadcastConfig},
    net::Target,
};

use relay::spawn_relay;
use ringcast_testkit::{
    free_port,
    process::{wait_accepting, Spawned},
};

/// The longest an in-test echo server connection waits for its client.
const SERVER_LIFETIME: Duration = Duration::from_secs(30);

/// Echoes each message back to its sender only: one thread per connection.
fn spawn_echo(clients: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().take(clients) {
            let Ok(stream) = stream else { continue };
            stream.set_read_timeout(Some(SERVER_LIFETIME)).unwrap();
            thread::spawn(move || {
                let Ok(mut ws) = tungstenite::accept(stream) else {
                    return;
                };
                while let Ok(msg) = ws.read() {
                    if msg.is_binary() && ws.send(msg).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn config(addr: SocketAddr, clients: usize) -> BroadcastConfig {
    let mut cfg = BroadcastConfig::new(Target::parse(&format!("ws://{addr}/")).unwrap());
    cfg.conns = clients;
    cfg.warmup = Duration::from_millis(100);
    cfg.duration = Duration::from_millis(300);
    cfg.round_timeout = Duration::from_secs(5);
    cfg.server_pid = Some(std::process::id());
    cfg
}

#[test]
fn every_round_delivers_n_squared_messages() {
    let addr = spawn_relay(5, |_| true);
    let report = run_broadcast(&config(addr, 5)).unwrap();
    assert!(report.rounds > 0, "{report:?}");
    assert_eq!(report.deliveries, report.rounds * 25);
    assert!(report.deliveries_per_sec > 0.0);
    assert!(report.round_latency.p50_us > 0.0, "{report:?}");
    assert!(report.server_cpu_us_per_delivery.is_some());
    assert!(report.human().contains("5 clients x 20 B"));
}

#[test]
fn max_rounds_ends_the_window_early_and_short_messages_work() {
    let addr = spawn_relay(3, |_| true);
    let mut cfg = config(addr, 3);
    cfg.size_bytes = 4;
    cfg.warmup = Duration::ZERO;
    cfg.duration = Duration::from_secs(20);
    cfg.max_rounds = Some(7);
    let started = Instant::now();
    let report = run_broadcast(&cfg).unwrap();
    assert_eq!(report.rounds, 7);
    assert_eq!(report.warmup_rounds, 0);
    assert_eq!(report.deliveries, 7 * 9);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_server_that_does_not_relay_fails_the_round_instead_of_hanging() {
    let addr = spawn_echo(3);
    let mut cfg = config(addr, 3);
    // Long enough for the echo threads to answer on a loaded host (each echo is immediate),
    // so exactly the 3 echoes of the 9 deliveries arrive before the round stalls.
    cfg.round_timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = run_broadcast(&cfg).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("stalled"), "{text}");
    assert!(text.contains("3 of 9 deliveries"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Starts `argv` (with `{port}` replaced by a free port) as a child killed when dropped, and
/// waits, bounded, until it accepts.
fn start_peer(argv: &[&str]) -> (Spawned, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let port = addr.port().to_string();
    let args: Vec<String> = argv.iter().map(|a| a.replace("{port}", &port)).collect();
    let mut command = Command::new(&args[0]);
    command.args(&args[1..]);
    let peer = Spawned::start(command);
    wait_accepting(addr);
    (peer, addr)
}

/// The CI smoke test of the broadcast peers: four clients for a fraction of a second.
fn smoke(argv: &[&str]) {
    let (peer, addr) = start_peer(argv);
    let mut cfg = config(addr, 4);
    cfg.server_pid = Some(peer.id());
    let report = run_broadcast(&cfg).unwrap();
    assert!(report.rounds > 0, "{argv:?}: {report:?}");
    assert_eq!(report.deliveries, report.rounds * 16);
    assert!(report.server_cpu_us_per_delivery.is_some());
}

#[test]
fn the_tokio_tungstenite_broadcast_peer_relays_to_everyone() {
    smoke(&[
        env!("CARGO_BIN_EXE_peer-tokio-tungstenite-broadcast"),
        "--listen",
        "127.0.0.1:{port}",
    ]);
}

/// Needs node and `npm ci --prefix bench/node` (`.ci/run` does both): skipped loudly without
/// them, and a failure under CI.
#[test]
fn the_node_ws_broadcast_peer_relays_to_everyone() {
    let install = "apt-get install nodejs npm, then npm ci --prefix bench/node";
    if !ringcast_testkit::require("node", install) {
        return;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/node");
    if !Path::new(dir).join("node_modules/ws").is_dir() {
        assert!(
            !ringcast_testkit::under_ci(),
            "bench/node/node_modules/ws is missing and CI must run this test: {install}"
        );
        eprintln!("SKIPPED: bench/node/node_modules/ws is missing ({install})");
        return;
    }
    smoke(&["node", &format!("{dir}/broadcast.js"), "{port}"]);
}
