//! `ringcast-client` against the real `ringcast serve`, as a service using it meets the
//! server: a subscriber across a `kill -9` and restart of its host with the Redis backend (no
//! gap, no duplicate), across a restart of the in-memory server (a `Reset`), behind a slow
//! reader with drop-oldest (every message received or counted as dropped), across a token that
//! expires mid-stream (refreshed through the callback), refused with 401 (stops), and against a
//! server gone silent (liveness). Then `ringcast sub` and `ringcast pub` as an operator runs
//! them.

mod util;

use std::{
    future::Future,
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ringcast::protocol::{HeadReader, UpgradeRequest};
use ringcast_client::{Client, Config, Data, Encoding, Error, Event, Subscription};
use util::{free_port, redis::Redis, wait_for, wait_until, Server, BIN, DEADLINE};

/// `ringcast serve --listen 127.0.0.1:PORT --shards 1 ARGS`, without any `RINGCAST*`
/// setting from the test's environment: a fixed port, so it can be restarted where clients
/// look for it.
fn serve_at(port: u16, args: &[&str]) -> Server {
    let mut command = Command::new(BIN);
    command
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shards",
            "1",
        ])
        .args(["--set", "timeouts.drain_window=0s"])
        .args(args);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("RINGCAST") {
            command.env_remove(name);
        }
    }
    command.env("RINGCAST_LOG", "info");
    Server::spawn(command)
}

/// A client config for `port` with reconnects fast enough for a test.
fn config(port: u16) -> Config {
    Config::new(format!("ws://127.0.0.1:{port}/"))
        .with_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .with_restart_delay_max(Duration::from_millis(100))
}

/// The next event, or the test fails after [`DEADLINE`].
async fn next(sub: &mut Subscription) -> Event {
    tokio::time::timeout(DEADLINE, sub.next())
        .await
        .unwrap_or_else(|_| panic!("no event on {} within {DEADLINE:?}", sub.topic()))
        .unwrap_or_else(|| panic!("the subscription to {} ended", sub.topic()))
}

/// Reads events until the message whose data is `last`; returns every event.
async fn until_data(sub: &mut Subscription, last: &str) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = next(sub).await;
        let done = matches!(&event, Event::Message { data, .. } if data.text() == last);
        events.push(event);
        if done {
            return events;
        }
    }
}

/// The (seq, data) of each message among `events`.
fn messages(events: &[Event]) -> Vec<(u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message { seq, data } => Some((*seq, data.text().into_owned())),
            _ => None,
        })
        .collect()
}

async fn publish_range(client: &Client, topic: &str, range: std::ops::RangeInclusive<u32>) {
    for i in range {
        client
            .publish(topic, Data::json(i.to_string()))
            .await
            .unwrap_or_else(|e| panic!("publish {i}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_kill_9_and_restart_resumes_with_no_gap_and_no_duplicate() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let (port_a, port_b) = (free_port(), free_port());
    let broker = ["--broker", &redis.url()];
    let mut host_a = serve_at(port_a, &broker);
    host_a.wait_for_line("redis bridge up");
    let mut host_b = serve_at(port_b, &broker);
    host_b.wait_for_line("redis bridge up");

    let subscriber = Client::connect(config(port_a)).unwrap();
    let mut sub = subscriber.subscribe("orders").await.unwrap();
    let publisher = Client::connect(config(port_b)).unwrap();
    publish_range(&publisher, "orders", 1..=50).await;
    let mut events = until_data(&mut sub, "50").await;

    // The subscriber's host dies without a word; the topic goes on through the other host.
    host_a.signal(libc::SIGKILL);
    host_a.wait_exit(DEADLINE);
    publish_range(&publisher, "orders", 51..=100).await;
    drop(host_a);
    let mut host_a = serve_at(port_a, &broker);
    host_a.wait_for_line("redis bridge up");
    publish_range(&publisher, "orders", 101..=150).await;
    events.extend(until_data(&mut sub, "150").await);

    let got = messages(&events);
    let want: Vec<(u64, String)> = (1..=150u64).map(|i| (i, i.to_string())).collect();
    assert_eq!(got, want, "every message once, in order");
    let notices: Vec<_> = events
        .iter()
        .filter(|e| !matches!(e, Event::Message { .. }))
        .collect();
    assert_eq!(
        notices,
        [&Event::Resubscribed { since: Some(50) }],
        "one reconnect, resumed after 50, and no loss to announce"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_in_memory_server_gives_a_reset_in_a_new_epoch() {
    let port = free_port();
    let mut server = serve_at(port, &[]);
    let client = Client::connect(config(port)).unwrap();
    let mut sub = client.subscribe("news").await.unwrap();
    let first = client.publish("news", Data::json("1")).await.unwrap();
    client.publish("news", Data::json("2")).await.unwrap();
    assert_eq!(
        messages(&until_data(&mut sub, "2").await),
        [(1, "1".into()), (2, "2".into())]
    );

    server.signal(libc::SIGTERM);
    server.wait_exit(DEADLINE);
    drop(server);
    let _server = serve_at(port, &[]);
    assert_eq!(next(&mut sub).await, Event::Resubscribed { since: Some(2) });
    client.publish("news", Data::json("3")).await.unwrap();
    let events = until_data(&mut sub, "3").await;
    let Event::Reset {
        oldest: 1,
        epoch: Some(epoch),
    } = events[0]
    else {
        panic!("a reset to seq 1 in a known epoch first: {events:?}");
    };
    assert_ne!(
        epoch, first.epoch,
        "a restarted server numbers in a new epoch"
    );
    assert_eq!(messages(&events), [(1, "3".into())]);
    assert_eq!(events.len(), 2, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_from_replays_history_in_order_even_into_a_one_event_buffer() {
    let port = free_port();
    let _server = serve_at(port, &[]);
    let publisher = Client::connect(config(port)).unwrap();
    publish_range(&publisher, "hist", 1..=20).await;
    // The replay may reach the client around the ack; with room for one event it must still
    // come whole, in order, after the subscribe resolves.
    let reader = Client::connect(config(port).with_subscription_buffer(1)).unwrap();
    let mut sub = reader.subscribe_from("hist", 5).await.unwrap();
    let events = until_data(&mut sub, "20").await;
    let want: Vec<(u64, String)> = (6..=20u64).map(|i| (i, i.to_string())).collect();
    assert_eq!(messages(&events), want);
    assert_eq!(events.len(), want.len(), "no notice: {events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_with_drop_oldest_sees_every_message_or_its_drop() {
    let port = free_port();
    let _server = serve_at(
        port,
        &[
            "--set",
            "pubsub.ring_max_messages=8",
            "--set",
            "pubsub.ring_max_bytes=65536",
            "--set",
            "pubsub.publish_rate_per_sec=1000000",
            "--set",
            "pubsub.publish_burst=1000000",
        ],
    );
    // The client reads the socket only as the application takes events (one at a time here),
    // so the server's ring overflows while the application sleeps.
    let slow = Config::new(format!("ws://127.0.0.1:{port}/?overflow=drop-oldest"))
        .with_encoding(Encoding::Binary)
        .with_subscription_buffer(1);
    let subscriber = Client::connect(slow).unwrap();
    let mut sub = subscriber.subscribe("ticks").await.unwrap();
    let publisher = Client::connect(config(port)).unwrap();
    const COUNT: u64 = 4000;
    let payload = format!("\"{}\"", "x".repeat(4000));
    let acks: Vec<_> = (0..COUNT)
        .map(|_| {
            let (publisher, payload) = (publisher.clone(), payload.clone());
            tokio::spawn(async move { publisher.publish("ticks", Data::json(payload)).await })
        })
        .collect();
    let mut last = 0;
    for ack in acks {
        last = last.max(ack.await.unwrap().expect("publish").seq);
    }
    assert_eq!(last, COUNT);

    let (mut received, mut dropped, mut notices, mut previous) = (0, 0, 0, 0);
    loop {
        match next(&mut sub).await {
            Event::Message { seq, .. } => {
                assert!(seq > previous, "seq {seq} after {previous}");
                previous = seq;
                received += 1;
                if seq == COUNT {
                    break;
                }
            }
            Event::Dropped { count, next } => {
                assert_eq!(next, previous + count + 1, "a drop names the next seq");
                dropped += count;
                notices += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        notices > 0,
        "the slow reader was never behind: nothing tested"
    );
    assert_eq!(
        received + dropped,
        COUNT,
        "{received} received + {dropped} dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_subscribe_is_retried_after_the_servers_hint() {
    let port = free_port();
    let _server = serve_at(
        port,
        &[
            "--set",
            "pubsub.subscribe_rate_per_sec=2",
            "--set",
            "pubsub.subscribe_burst=1",
        ],
    );
    let client = Client::connect(config(port)).unwrap();
    let _first = client.subscribe("one").await.unwrap();
    // Over budget: refused with rate_limited and a hint, then taken on the retry.
    let start = std::time::Instant::now();
    let mut second = client.subscribe("two").await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(200),
        "the second subscribe was not held back: {:?}",
        start.elapsed()
    );
    client.publish("two", Data::json("1")).await.unwrap();
    assert_eq!(
        messages(&until_data(&mut second, "1").await),
        [(1, "1".into())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_while_disconnected_queue_up_to_the_bound_or_fail_fast() {
    use ringcast_client::QueuePolicy;
    let port = free_port();
    // No server yet.
    let fail_fast = Client::connect(config(port).with_queue(QueuePolicy::FailFast)).unwrap();
    assert_eq!(
        fail_fast.publish("q", Data::json("0")).await,
        Err(Error::Disconnected)
    );
    let queued = Client::connect(config(port).with_queue(QueuePolicy::Queue(2))).unwrap();
    // Polled once each: a publish hands its command to the client's task on its first poll,
    // so these two are ahead of the third.
    let mut first = Box::pin(queued.publish("q", Data::json("1")));
    let mut second = Box::pin(queued.publish("q", Data::json("2")));
    for publish in [&mut first, &mut second] {
        let pending = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(publish.as_mut().poll(cx).is_pending())
        })
        .await;
        assert!(pending, "a publish answered while no server runs");
    }
    assert_eq!(
        queued.publish("q", Data::json("3")).await,
        Err(Error::QueueFull)
    );
    let _server = serve_at(port, &[]);
    let mut seqs = [first.await.unwrap().seq, second.await.unwrap().seq];
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        [1, 2],
        "both queued publishes made once the server is up"
    );
}

/// An HS256 token for every topic, valid for `secs` seconds.
fn token(secs: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "sub": "tester", "exp": now + secs, "subscribe": ["*"], "publish": ["*"]
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

const SECRET: &str = "client-test-secret";

/// A server requiring HS256 tokens signed with [`SECRET`], with no leeway on expiry.
fn auth_server(port: u16) -> (Server, tempdir::Dir) {
    let dir = tempdir::Dir::new("ringcast-client-auth");
    let secret = dir.path.join("hs256.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let file = format!("auth.hs256_secret_file={:?}", secret.display().to_string());
    let server = serve_at(
        port,
        &[
            "--set",
            "auth.required=true",
            "--set",
            &file,
            "--set",
            "auth.leeway=\"0s\"",
        ],
    );
    (server, dir)
}

/// A temp dir removed on drop.
mod tempdir {
    #[derive(Debug)]
    pub(crate) struct Dir {
        pub(crate) path: std::path::PathBuf,
    }
    impl Dir {
        pub(crate) fn new(name: &str) -> Self {
            let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Self { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_mid_stream_is_refreshed_through_the_callback() {
    let port = free_port();
    let (_server, _dir) = auth_server(port);
    let calls = Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    // Each token lives 2 s; the client pings every 100 ms, which is when the server notices.
    let subscriber = Client::connect(
        config(port)
            .with_liveness_timeout(Duration::from_millis(300))
            .with_token_fn(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { Ok(token(2)) }
            }),
    )
    .unwrap();
    let mut sub = subscriber.subscribe("feed").await.unwrap();
    let publisher = Client::connect(config(port).with_token(token(600))).unwrap();
    let start = std::time::Instant::now();
    let mut sent = 0u32;
    while start.elapsed() < Duration::from_millis(5500) {
        sent += 1;
        publish_range(&publisher, "feed", sent..=sent).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = until_data(&mut sub, &sent.to_string()).await;
    let want: Vec<(u64, String)> = (1..=sent).map(|i| (u64::from(i), i.to_string())).collect();
    assert_eq!(
        messages(&events),
        want,
        "no gap, no duplicate across the refreshes"
    );
    let resumes = events
        .iter()
        .filter(|e| matches!(e, Event::Resubscribed { .. }))
        .count();
    assert!(
        events
            .iter()
            .all(|e| matches!(e, Event::Message { .. } | Event::Resubscribed { .. })),
        "{events:?}"
    );
    let calls = calls.load(Ordering::SeqCst);
    assert!(
        resumes >= 2,
        "the token (2 s) expired at least twice in 5.5 s: {resumes}"
    );
    assert_eq!(calls as usize, resumes + 1, "one token per connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_at_the_upgrade_stops_the_client_instead_of_retrying() {
    let port = free_port();
    let (server, _dir) = auth_server(port);
    let client = Client::connect(config(port).with_token("not-a-jwt")).unwrap();
    let refused = client.subscribe("x").await.unwrap_err();
    let Error::Unauthorized { status: 401, .. } = refused else {
        panic!("expected 401, got {refused:?}");
    };
    assert_eq!(client.stopped().await, refused);
    assert!(matches!(
        client.publish("x", Data::json("1")).await,
        Err(Error::Unauthorized { .. })
    ));
    // One attempt, not a loop of them.
    let scrape = util::http::scrape(server.addr);
    let refusals = util::metric_sum(&scrape, "ringcast_upgrade_rejections_total", &[]);
    assert_eq!(refusals, 1.0, "exactly one upgrade was refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_gone_silent_is_left_and_reconnected() {
    // A fake server: completes the upgrade, then says nothing (a dead peer behind a NAT).
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let held = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            let mut reader = HeadReader::new();
            let len = loop {
                let n = stream.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(len) = reader.poll_head(&buf, 8192).unwrap() {
                    break len;
                }
            };
            let req = UpgradeRequest::parse(&buf[..len]).unwrap();
            let response = req.accept(Some("ringcast.v1.json")).unwrap();
            stream.write_all(&response).unwrap();
            held.lock().unwrap().push(stream);
        }
    });
    let client =
        Client::connect(config(port).with_liveness_timeout(Duration::from_millis(300))).unwrap();
    client.connected().await.unwrap();
    wait_until(
        "the client to leave the silent connection and come back",
        || accepted.lock().unwrap().len() >= 2,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_answers_server_pings_so_a_quiet_subscriber_stays_connected() {
    let port = free_port();
    let server = serve_at(
        port,
        &[
            "--set",
            "timeouts.ping_interval=\"100ms\"",
            "--set",
            "timeouts.pong_timeout=\"100ms\"",
        ],
    );
    // No liveness pings of its own: the server's pings are all that cross the connection.
    let client = Client::connect(config(port).with_liveness_timeout(Duration::ZERO)).unwrap();
    let mut sub = client.subscribe("quiet").await.unwrap();
    // Ten ping rounds, each of which would drop a client that did not answer.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    client.publish("quiet", Data::json("1")).await.unwrap();
    assert_eq!(
        next(&mut sub).await,
        Event::Message {
            seq: 1,
            data: Data::json("1")
        },
        "the first event is the message: no reconnect came before it"
    );
    let scrape = util::http::scrape(server.addr);
    assert_eq!(
        util::metric_sum(&scrape, "ringcast_upgrades_accepted_total", &[]),
        1.0,
        "the client's one connection, never replaced"
    );
}

#[test]
fn the_blocking_client_subscribes_publishes_and_resumes_across_a_restart() {
    use ringcast_client::blocking;
    let port = free_port();
    let mut server = serve_at(port, &[]);
    let client = blocking::Client::connect(config(port)).unwrap();
    let mut sub = client.subscribe("plain").unwrap();
    assert_eq!(client.publish("plain", Data::json("1")).unwrap().seq, 1);
    let mut next = || {
        sub.next_timeout(DEADLINE)
            .expect("an event within the deadline")
            .expect("the subscription goes on")
    };
    assert_eq!(
        next(),
        Event::Message {
            seq: 1,
            data: Data::json("1")
        }
    );
    server.signal(libc::SIGTERM);
    server.wait_exit(DEADLINE);
    drop(server);
    let _server = serve_at(port, &[]);
    assert_eq!(next(), Event::Resubscribed { since: Some(1) });
    assert!(matches!(next(), Event::Reset { oldest: 1, .. }));
}

/// Spawns `ringcast ARGS` with stdout read line by line into the returned list.
fn spawn_lines(args: &[&str]) -> (util::Spawned, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RINGCAST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    (util::Spawned::from_child(child), lines)
}

/// `ringcast pub URL TOPIC ARGS` with `stdin`; its stdout, after checking it exited 0.
fn run_pub(url: &str, topic: &str, args: &[&str], stdin: &str) -> String {
    let mut child = Command::new(BIN)
        .args(["pub", url, topic])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ringcast pub {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn ringcast_sub_prints_json_lines_across_a_server_restart_and_pub_prints_seqs() {
    let port = free_port();
    let url = format!("ws://127.0.0.1:{port}/");
    let mut server = serve_at(port, &[]);
    let (_sub, lines) = spawn_lines(&["sub", &url, "a", "b", "--bin"]);
    // `sub` has subscribed once a publish reaches it: publish until one does (those before
    // it went to no subscriber).
    wait_for("ringcast sub to receive", || {
        run_pub(&url, "a", &[r#"{"n":1}"#], "");
        (!lines.lock().unwrap().is_empty()).then_some(())
    });
    assert_eq!(
        run_pub(&url, "b", &["--rate", "1000"], "x\n\"y\"\n"),
        "1\n2\n"
    );
    let on = |topic: &str, lines: &[String]| -> Vec<String> {
        let tag = format!(r#""topic":"{topic}""#);
        lines.iter().filter(|l| l.contains(&tag)).cloned().collect()
    };
    let before = wait_for("both messages of b", || {
        let lines = lines.lock().unwrap();
        (on("b", &lines).len() >= 2).then(|| lines.clone())
    });
    assert_eq!(
        on("b", &before),
        [
            r#"{"event":"message","topic":"b","seq":1,"data_b64":"eA=="}"#,
            r#"{"event":"message","topic":"b","seq":2,"data":"y"}"#,
        ]
    );
    // Every line of a is a message of {"n":1}, numbered on from the first one delivered.
    let a_lines = on("a", &before);
    let seqs: Vec<u64> = a_lines
        .iter()
        .map(|l| {
            assert!(l.ends_with(r#","data":{"n":1}}"#), "{l}");
            l.strip_prefix(r#"{"event":"message","topic":"a","seq":"#)
                .and_then(|rest| rest.split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("a message line: {l}"))
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    let a_last = *seqs.last().expect("a line of a");
    let already = before.len();

    server.signal(libc::SIGTERM);
    server.wait_exit(DEADLINE);
    drop(server);
    let _server = serve_at(port, &[]);
    assert_eq!(run_pub(&url, "b", &[], "3\n"), "1\n");
    let got = wait_for("the resumed stream of b", || {
        let lines = lines.lock().unwrap();
        lines
            .iter()
            .any(|l| l.contains(r#""topic":"b","seq":1,"data":3"#))
            .then(|| lines[already..].to_vec())
    });
    assert!(
        got.contains(&r#"{"event":"resubscribed","topic":"b","since":2}"#.to_owned()),
        "{got:?}"
    );
    assert!(
        got.contains(&format!(
            r#"{{"event":"resubscribed","topic":"a","since":{a_last}}}"#
        )),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|l| l.starts_with(r#"{"event":"reset","topic":"b","oldest":1,"epoch":"#)),
        "{got:?}"
    );

    // --since replays what the server holds after it; --count ends the command.
    let (mut replay, lines) = spawn_lines(&["sub", &url, "b", "--since", "0", "--count", "1"]);
    assert!(replay.wait_exit(DEADLINE).success());
    wait_until("the replayed line", || !lines.lock().unwrap().is_empty());
    assert_eq!(
        lines.lock().unwrap()[..],
        [r#"{"event":"message","topic":"b","seq":1,"data":3}"#]
    );
}

#[test]
fn ringcast_sub_and_pub_exit_non_zero_with_a_clear_message_on_a_refused_token() {
    let port = free_port();
    let (_server, _dir) = auth_server(port);
    let url = format!("ws://127.0.0.1:{port}/");
    for args in [
        vec!["sub", &url, "t", "--token", "bad"],
        vec!["pub", &url, "t", "1", "--token", "bad"],
    ] {
        let out = Command::new(BIN)
            .args(&args)
            .stdin(Stdio::null())
            .env_remove("RINGCAST_TOKEN")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains("the server refused the token (HTTP 401"),
            "{args:?}: {stderr}"
        );
    }
}
