//! `ringcast serve` as a user runs it: the real binary on a free port, probed over HTTP as a
//! load balancer probes it, used by broker clients in both encodings, scraped as Prometheus
//! scrapes it, and stopped with SIGTERM as systemd stops it (a second signal to exit now). Each
//! with its defaults, `--shards 1`, `--driver epoll`, and `--broker redis://...` against a
//! real redis-server.

mod util;

use std::time::{Duration, Instant};

use ringcast::protocol::envelope::{self, Dialect};
use tungstenite::{protocol::CloseFrame, Message as WsMessage};
use util::{http, http_get, metric_sum, wait_until, BrokerClient, Got, Honesty, Server};

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
    // A long drain window, which a server with connections would wait out.
    let mut server = Server::start(&[
        "--set",
        "timeouts.drain_window=30s",
        "--set",
        "timeouts.shutdown_timeout=60s",
    ]);
    assert_eq!(http_get(server.addr, "GET /readyz HTTP/1.1").0, 200);
    // No connection to drain: nothing to spread over the window, so the exit is prompt. 5 s
    // is a tenth of a second's work (stop the shards, log) on a loaded machine many times
    // over, and a sixth of the window it must not wait out.
    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(5));
    let log = server.final_log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("ringcast stopped"), "{log}");
}

#[test]
fn the_startup_log_names_the_address_driver_and_connection_cap_plainly() {
    // More per shard than the open-files limit allows: the cap must come from that limit.
    let files = open_files_limit();
    let per_shard = format!("limits.max_connections_per_shard={}", files.min(1 << 24));
    let mut server = Server::start(&["--set", &per_shard]);
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
    server.wait_for_line("shard listening");
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
    server.wait_for_line("connection cap below the configured");
    let log = server.log();
    let warning = log
        .lines()
        .find(|l| l.contains("connection cap below the configured"))
        .unwrap_or_else(|| panic!("no warning about the cap: {log}"));
    assert!(warning.contains("open-files limit"), "{warning}");
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

/// The drain settings of the end-to-end runs: a window and a close timeout short enough to
/// wait out, and a shutdown deadline (10 s, the default) well past their sum plus [`MARGIN`],
/// so an exit inside the bound is the drain's doing, not the deadline's.
const DRAIN_WINDOW: Duration = Duration::from_secs(2);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// What a loaded 2-core machine may add to the drain's own timers before the process is
/// seen to exit: waking the signal thread, the shards' 1012 sends and the client's replies,
/// joining the shards and the test's 5 ms exit poll. Each is a few milliseconds when idle and
/// stays well under a second beside two busy loops (the shards get half a core each); 3 s
/// still keeps the bound (6 s) below the shutdown deadline (10 s), so a drain that hangs on a
/// connection is caught.
const MARGIN: Duration = Duration::from_secs(3);

/// The flags every end-to-end run adds: the drain above, and a bad-request budget of 2 so a
/// client is closed with 1008 after 3 malformed requests.
const E2E_FLAGS: [&str; 8] = [
    "--set",
    "timeouts.drain_window=2s",
    "--set",
    "timeouts.close_timeout=1s",
    "--set",
    "timeouts.shutdown_timeout=10s",
    "--set",
    "pubsub.max_bad_requests=2",
];

const TOPIC: &str = "e2e.topic";

/// Publishes JSON `data` on [`TOPIC`] from `client`, itself a subscriber, and returns the
/// message it receives back; its ack for `id` must come too, in either order.
fn publish_to_self(client: &mut BrokerClient, id: u64, data: &str) -> Got {
    client.send(&envelope::Request::Publish {
        id: Some(id),
        topic: TOPIC.into(),
        payload: envelope::Data::new(envelope::DataKind::Json, data.as_bytes()),
    });
    let (mut acked, mut message) = (false, None);
    while !acked || message.is_none() {
        match client.recv() {
            Got::Ack(Some(got)) if got == id && !acked => acked = true,
            got @ Got::Message { .. } if message.is_none() => message = Some(got),
            other => panic!("publish {id}: unexpected {other:?}"),
        }
    }
    message.unwrap()
}

/// The sum of `name` over shards in a fresh scrape.
fn metric(server: &Server, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&http::scrape(server.addr), name, labels)
}

/// Waits (bounded) until `name{labels}` sums to `want`: the counters of a close move when the
/// server has finished the connection, a moment after the client saw the close.
fn wait_metric(server: &Server, name: &str, labels: &[(&str, &str)], want: f64) {
    wait_until(&format!("{name}{labels:?} = {want}"), || {
        metric(server, name, labels) == want
    });
}

/// Sends malformed requests until the server closes with 1008; returns what came before the
/// close. Bounded: a budget of 2 closes at the third, and the test gives up at the tenth.
fn bad_requests_until_1008(client: &mut BrokerClient) -> Vec<Got> {
    let mut before = Vec::new();
    for _ in 0..10 {
        client.send_json("not json");
        match client.ws.read() {
            Ok(WsMessage::Text(t)) => before.push(Got::from_server(
                envelope::decode_server(client.dialect, t.as_bytes()).expect("an envelope"),
            )),
            Ok(WsMessage::Close(Some(frame))) => {
                assert_eq!(u16::from(frame.code), 1008, "{frame:?} after {before:?}");
                assert_eq!(frame.reason, "too many bad requests");
                return before;
            }
            other => panic!("unexpected {other:?} after {before:?}"),
        }
    }
    panic!("no 1008 after 10 malformed requests: {before:?}");
}

/// `ringcast serve ARGS` end to end, as a user runs it: the broker in both encodings, the
/// counters in `/metrics`, the close metric for a client's and the server's close, and a
/// SIGTERM drain with clients connected.
fn end_to_end(args: &[&str]) {
    let all: Vec<&str> = E2E_FLAGS
        .iter()
        .copied()
        .chain(args.iter().copied())
        .collect();
    let mut server = Server::start(&all);
    let addr = server.addr;

    // Pub/sub: a JSON and a binary client subscribe, each publishes, both receive both
    // messages in order.
    let mut json = BrokerClient::connect(addr, Dialect::Json);
    let mut binary = BrokerClient::connect(addr, Dialect::BinaryV2);
    json.subscribe(1, TOPIC, None);
    binary.subscribe(1, TOPIC, None);
    let first = publish_to_self(&mut json, 2, r#"{"from":"json"}"#);
    assert_eq!(binary.recv(), first);
    let second = publish_to_self(&mut binary, 2, r#"{"from":"binary"}"#);
    assert_eq!(json.recv(), second);
    // Both clients saw the same two messages (compared above), numbered 1 and 2.
    let mut seen = Honesty::new();
    seen.observe_all([&first, &second]);
    assert_eq!(seen.messages(TOPIC), [(0, 1), (0, 2)]);
    assert_eq!(first.text(), r#"{"from":"json"}"#);
    assert_eq!(second.text(), r#"{"from":"binary"}"#);

    // /metrics parses and counts exactly what the clients did: two upgrades, four requests
    // (two subscribes, two publishes), each message delivered to both subscribers.
    let scrape = http::scrape(addr);
    for (name, want) in [
        ("ringcast_upgrades_accepted_total", 2.0),
        ("ringcast_upgrades_rejected_total", 0.0),
        ("ringcast_messages_in_total", 4.0),
        ("ringcast_deliveries_total", 4.0),
        ("ringcast_connections_active", 3.0), // the two clients and this scrape
    ] {
        assert_eq!(metric_sum(&scrape, name, &[]), want, "{name}");
    }
    if all.contains(&"--broker") {
        assert_eq!(metric_sum(&scrape, "ringcast_broker_up", &[]), 1.0);
        assert_eq!(
            metric_sum(&scrape, "ringcast_broker_publishes_total", &[]),
            2.0
        );
        assert_eq!(
            metric_sum(&scrape, "ringcast_broker_messages_in_total", &[]),
            2.0
        );
    }

    // A close by the client (1000) and one by the server (1008, too many bad requests),
    // each counted under its code and initiator.
    json.ws
        .close(Some(CloseFrame {
            code: 1000.into(),
            reason: "done".into(),
        }))
        .expect("send close");
    loop {
        match json.ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing handshake: {e}"),
        }
    }
    let peer_1000 = [("code", "1000"), ("initiator", "peer")];
    wait_metric(&server, "ringcast_closes_total", &peer_1000, 1.0);
    let mut bad = BrokerClient::connect(addr, Dialect::Json);
    let errors = bad_requests_until_1008(&mut bad);
    // Every bad request is answered, the third (over the budget of 2) too, just before the
    // 1008, as PROTOCOL.md promises.
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors
            .iter()
            .all(|e| matches!(e, Got::Error { code, .. } if code == "bad_request")),
        "{errors:?}"
    );
    let server_1008 = [("code", "1008"), ("initiator", "server")];
    wait_metric(&server, "ringcast_closes_total", &server_1008, 1.0);
    let scrape = http::scrape(addr);
    assert_eq!(
        metric_sum(&scrape, "ringcast_closes_total", &[]),
        2.0,
        "only those two closes: {:?}",
        scrape.samples
    );

    // SIGTERM with two subscribers connected, both answering the close as clients do.
    let mut again = BrokerClient::connect(addr, Dialect::Json);
    again.subscribe(1, TOPIC, None);
    let readers: Vec<_> = [binary, again]
        .into_iter()
        .map(|mut client| std::thread::spawn(move || close_from_server(&mut client)))
        .collect();
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    for reader in readers {
        let (before, code, reason) = reader.join().expect("reader");
        assert_eq!(before, [Got::Shutdown("service restart".into())]);
        assert_eq!((code, reason.as_str()), (1012, "service restart"));
    }
    // Within the window plus the close timeout. (A client that never answers the close is
    // given until the shutdown deadline instead: see the silent-client test.)
    let bound = DRAIN_WINDOW + CLOSE_TIMEOUT + MARGIN;
    let status = server.wait_exit(bound.saturating_sub(start.elapsed()));
    let took = start.elapsed();
    let log = server.final_log();
    assert_eq!(status.code(), Some(0), "{log}");
    // Not at once: with connections, the listener stays up for the whole window (so load
    // balancers see 503 "draining", not a refused connection) and the process exits after.
    assert!(
        took >= DRAIN_WINDOW,
        "exited {took:?} after SIGTERM, inside the {DRAIN_WINDOW:?} drain window"
    );
    let stopped = log
        .lines()
        .find(|l| l.contains("ringcast stopped"))
        .unwrap_or_else(|| panic!("no `ringcast stopped` line: {log}"));
    assert!(stopped.contains("drain_forced=0"), "{stopped}");
}

/// Reads to the server's close frame (returning it and the envelopes before it), then on to
/// the end of the connection: tungstenite sends its answer to the close on that next read, as
/// any client that goes on reading does, so the server sees a completed closing handshake.
fn close_from_server(client: &mut BrokerClient) -> (Vec<Got>, u16, String) {
    let closed = client.until_close();
    match client.ws.read() {
        Err(tungstenite::Error::ConnectionClosed) => closed,
        other => panic!("{other:?} after the close {closed:?}"),
    }
}

#[test]
fn serve_with_defaults_end_to_end() {
    end_to_end(&[]);
}

#[test]
fn serve_with_one_shard_end_to_end() {
    end_to_end(&["--shards", "1"]);
}

#[test]
fn serve_with_the_epoll_driver_end_to_end() {
    end_to_end(&["--driver", "epoll"]);
}

#[test]
fn serve_with_redis_end_to_end() {
    let Some(redis) = util::redis::Redis::start() else {
        return; // `require` printed SKIPPED (and fails under CI)
    };
    end_to_end(&["--broker", &redis.url()]);
}

/// A second signal during the drain: the process exits at once with status 130 (the shell's
/// code for "ended by a signal"), not waiting out the window, as the first signal's log line
/// promises ("signal again to exit now").
fn second_signal_exits_at_once(args: &[&str]) {
    // A window far longer than the test: only the second signal can end it early.
    let mut all = vec![
        "--set",
        "timeouts.drain_window=60s",
        "--set",
        "timeouts.shutdown_timeout=90s",
    ];
    all.extend_from_slice(args);
    let mut server = Server::start(&all);
    let mut client = BrokerClient::connect(server.addr, Dialect::Json);
    client.subscribe(1, TOPIC, None);
    server.signal(libc::SIGTERM);
    // The one connection is closed at the start of the window (each gets a moment spread
    // over it; the first share is due at once).
    let (before, code, _) = close_from_server(&mut client);
    assert_eq!(before, [Got::Shutdown("service restart".into())]);
    assert_eq!(code, 1012);
    // Draining: the listener stays for the window, readiness says so once every shard has
    // taken the stop (each logs it; they take it a few milliseconds apart), and the close is
    // counted as the server's.
    server.wait_for_lines("shard draining", server.shards());
    let ready = http::request(server.addr, "GET", "/readyz");
    assert_eq!((ready.status, ready.body.trim()), (503, "draining"));
    let server_1012 = [("code", "1012"), ("initiator", "server")];
    wait_metric(&server, "ringcast_closes_total", &server_1012, 1.0);
    assert!(
        server.try_wait_exit(Duration::ZERO).is_none(),
        "still draining"
    );

    server.signal(libc::SIGTERM);
    // At once: the signal thread wakes and calls exit(2). 2 s is that plus a loaded machine's
    // scheduling delay many times over, and a thirtieth of the window.
    let status = server.wait_exit(Duration::from_secs(2));
    let log = server.final_log();
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(
        log.contains("second signal: exiting without waiting"),
        "{log}"
    );
    assert!(!log.contains("ringcast stopped"), "no orderly stop: {log}");
}

/// A client that never reads (so never answers the close) does not hold the exit past the
/// shutdown deadline. The drain gives it until that deadline, not `timeouts.close_timeout`:
/// a must-deliver client may still be reading what was flushed to it.
#[test]
fn a_client_that_never_answers_the_close_holds_the_exit_only_until_the_shutdown_deadline() {
    let shutdown_timeout = Duration::from_secs(4);
    let mut server = Server::start(&[
        "--set",
        "timeouts.drain_window=1s",
        "--set",
        "timeouts.close_timeout=1s",
        "--set",
        "timeouts.shutdown_timeout=4s",
    ]);
    let mut reader = BrokerClient::connect(server.addr, Dialect::Json);
    reader.subscribe(1, TOPIC, None);
    let mut silent = BrokerClient::connect(server.addr, Dialect::Json);
    silent.subscribe(1, TOPIC, None);
    let start = Instant::now();
    server.signal(libc::SIGTERM);
    let (before, code, _) = close_from_server(&mut reader);
    assert_eq!(
        (before, code),
        (vec![Got::Shutdown("service restart".into())], 1012)
    );
    // MARGIN: as in the end-to-end runs.
    let bound = shutdown_timeout + MARGIN;
    let status = server.wait_exit(bound.saturating_sub(start.elapsed()));
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "not before the window's end"
    );
    let log = server.final_log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("ringcast stopped"), "{log}");
    // The silent client's socket holds the notice and the close, unread.
    let (before, code, _) = silent.until_close();
    assert_eq!(
        (before, code),
        (vec![Got::Shutdown("service restart".into())], 1012)
    );
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once() {
    second_signal_exits_at_once(&[]);
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once_with_one_shard() {
    second_signal_exits_at_once(&["--shards", "1"]);
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once_with_epoll() {
    second_signal_exits_at_once(&["--driver", "epoll"]);
}

#[test]
fn a_second_signal_during_the_drain_exits_at_once_with_redis() {
    let Some(redis) = util::redis::Redis::start() else {
        return; // `require` printed SKIPPED (and fails under CI)
    };
    second_signal_exits_at_once(&["--broker", &redis.url()]);
}

/// `auth.query_param` puts tokens in URLs, which proxies and access logs keep: the binary
/// warns at startup when it is set, and says nothing of it when it is not.
#[test]
fn the_query_param_risk_is_logged_at_startup_only_when_set() {
    let secret = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../engine/tests/keys/hs256.secret"
    );
    let secret = format!("auth.hs256_secret_file={secret}");
    let auth = ["--set", "auth.required=true", "--set", &secret];
    let with: Vec<&str> = auth
        .iter()
        .copied()
        .chain(["--set", "auth.query_param=token"])
        .collect();
    let server = Server::start(&with);
    // The warning is logged while the auth keys load, before the engine starts: the
    // listening line (which `start` waited for) comes after it.
    let log = server.log();
    let warning = log
        .lines()
        .find(|l| l.contains("auth.query_param is set"))
        .unwrap_or_else(|| panic!("no query-parameter warning: {log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("param=token"), "{warning}");
    assert!(
        warning.contains("proxy and access logs"),
        "says why: {warning}"
    );

    let server = Server::start(&auth);
    let log = server.log();
    assert!(!log.contains("query_param"), "{log}");
    // Auth is on all the same: an upgrade without a token is refused.
    let (status, _) = util::refused(util::connect_with(server.addr, "/", &[]));
    assert_eq!(status, 401);
}
