//! `ringcast serve` as a user runs it: the real binary on a free port, probed over HTTP as a
//! load balancer probes it, stopped with SIGTERM as systemd stops it.

mod util;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use util::{http_get, DEADLINE};

/// A running `ringcast serve`, killed when dropped, with its log (stderr) collected.
struct Server {
    child: Child,
    log: Arc<Mutex<String>>,
    addr: SocketAddr,
}

impl Server {
    /// Starts `ringcast serve --listen 127.0.0.1:0 ARGS` and waits (bounded) for it to log the
    /// address it listens on.
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringcast"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("RINGCAST_CONFIG")
            .env("RINGCAST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringcast serve");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut server = Server {
            child,
            log,
            addr: "127.0.0.1:0".parse().unwrap(),
        };
        let start = Instant::now();
        server.addr = loop {
            let found = server.log().lines().find_map(|line| {
                let rest = line.split("ringcast listening listen=").nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
            });
            if let Some(addr) = found {
                break addr;
            }
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("ringcast serve {args:?} exited {status}: {}", server.log());
            }
            assert!(
                start.elapsed() < DEADLINE,
                "ringcast serve {args:?} did not log its address: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        server
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) with a pid this test spawned and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < within,
                "still running {within:?} after SIGTERM: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Probes GET and HEAD of `/healthz` and `/readyz` for `span`; every answer must be 200.
/// Returns how many rounds of probes ran.
fn probe_for(server: &Server, span: Duration) -> usize {
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < span {
        for request in [
            "GET /healthz HTTP/1.1",
            "HEAD /healthz HTTP/1.1",
            "GET /readyz HTTP/1.1",
            "HEAD /readyz HTTP/1.1",
        ] {
            let (status, head, body) = http_get(server.addr, request);
            assert_eq!(
                status,
                200,
                "{request} after {:?}: {head}\r\n\r\n{body}",
                start.elapsed()
            );
            if request.starts_with("HEAD") {
                assert_eq!(body, "", "{request}: no body");
            }
        }
        rounds += 1;
        // A load balancer's pace, compressed: several probes per canary interval (1 s).
        std::thread::sleep(Duration::from_millis(100));
    }
    rounds
}

#[test]
fn health_and_readiness_stay_200_for_ten_seconds_with_any_shards_and_driver() {
    let variants: [&[&str]; 3] = [&[], &["--shards", "1"], &["--driver", "epoll"]];
    let probers: Vec<_> = variants
        .into_iter()
        .map(|args| {
            std::thread::spawn(move || {
                let server = Server::start(args);
                // Readiness used to die 3 canary intervals (3 s) after start.
                let rounds = probe_for(&server, Duration::from_secs(10));
                assert!(rounds >= 20, "{args:?}: only {rounds} rounds in 10 s");
                server.log()
            })
        })
        .collect();
    for (prober, args) in probers.into_iter().zip(variants) {
        let log = prober
            .join()
            .unwrap_or_else(|_| panic!("serve {args:?} failed"));
        assert!(
            !log.contains("Some("),
            "serve {args:?} logged an Option: {log}"
        );
    }
}

#[test]
fn sigterm_with_no_clients_exits_0_promptly() {
    let mut server = Server::start(&[]);
    assert_eq!(http_get(server.addr, "GET /readyz HTTP/1.1").0, 200);
    // No connection to drain: nothing to spread over the 2 s window.
    let status = server.terminate(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "{}", server.log());
    assert!(
        server.log().contains("ringcast stopped"),
        "{}",
        server.log()
    );
}

#[test]
fn the_startup_log_names_the_address_driver_and_connection_cap_plainly() {
    // More per shard than the open-files limit allows: the cap must come from that limit.
    let files = open_files_limit();
    let per_shard = format!("limits.max_connections_per_shard={}", files.min(1 << 24));
    let server = Server::start(&["--set", &per_shard]);
    let log = server.log();
    let listening = log
        .lines()
        .find(|l| l.contains("ringcast listening"))
        .unwrap();
    assert!(
        listening.contains(&format!("listen={} ", server.addr)),
        "{listening}"
    );
    assert!(listening.contains("driver=\"io_uring\""), "{listening}");
    // The shards' lines arrive in any order; each says where it listens, no `Some(...)`.
    wait_for_log(&server, "shard listening");
    let log = server.log();
    assert!(!log.contains("Some("), "{log}");
    assert!(!log.contains("io-uring"), "one spelling: {log}");
    // The log gives the effective cap and why it is lower than the configured one.
    let cap: u64 = listening
        .split("max_connections=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("max_connections in the listening line")
        .parse()
        .unwrap();
    assert!(cap < files, "cap {cap} with an open-files limit of {files}");
    assert!(
        cap > files.saturating_sub(1000),
        "cap {cap}: the limit less the engine's own files"
    );
    // The warning follows the listening line; wait for it rather than read too early.
    wait_for_log(&server, "connection cap below the configured");
    let log = server.log();
    let warning = log
        .lines()
        .find(|l| l.contains("connection cap below the configured"))
        .unwrap_or_else(|| panic!("no warning about the cap: {log}"));
    assert!(warning.contains("open-files limit"), "{warning}");
}

fn wait_for_log(server: &Server, what: &str) {
    util::wait_until(what, || server.log().contains(what));
}

/// This process's soft RLIMIT_NOFILE, which the child inherits.
fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes into the struct we own.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit.rlim_cur
}
