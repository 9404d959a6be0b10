//! The broadcast load against small in-test servers on loopback (a relay that delivers every
//! message to every client, and an echo server that does not, which must fail the run rather
//! than hang), and the CI smoke test of the broadcast peers: this crate's
//! `peer-tokio-tungstenite-broadcast` and, when installed, Node `ws` (`bench/node`). Short
//! windows; every in-test server thread ends on its own (a deadline), every peer process is
//! killed when its test ends.

mod relay;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use ringcast_bench::{
    broadcast::{run_broadcast, BroadcastConfig},
    net::Target,
};

use relay::spawn_relay;

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
    cfg.round_timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = run_broadcast(&cfg).unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("stalled"), "{text}");
    assert!(text.contains("3 of 9 deliveries"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A peer server process, killed when dropped.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `argv` (with `{port}` replaced by a free port) and waits, bounded, until it accepts.
fn start_peer(argv: &[&str]) -> (Peer, SocketAddr) {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let port = addr.port().to_string();
    let args: Vec<String> = argv.iter().map(|a| a.replace("{port}", &port)).collect();
    let peer = Peer(
        Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "{argv:?} did not accept");
        thread::sleep(Duration::from_millis(20));
    }
    (peer, addr)
}

/// The CI smoke test of the broadcast peers: four clients for a fraction of a second.
fn smoke(argv: &[&str]) {
    let (peer, addr) = start_peer(argv);
    let mut cfg = config(addr, 4);
    cfg.server_pid = Some(peer.0.id());
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

#[test]
fn the_node_ws_broadcast_peer_relays_to_everyone_when_installed() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/node");
    let node_found = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !node_found || !Path::new(dir).join("node_modules/ws").is_dir() {
        eprintln!("skipped: needs node on PATH and `npm ci --prefix bench/node`");
        return;
    }
    smoke(&["node", &format!("{dir}/broadcast.js"), "{port}"]);
}
