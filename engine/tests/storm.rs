//! A reconnect storm against upgrade-rate shaping: 5,000 connects arrive at once; each gets an
//! answer (101 within the rate, else 503 with a `Retry-After` in range), no more are admitted
//! than the buckets allow, and a client that was already connected keeps getting its echoes
//! throughout, each between a few storm connects rather than behind the storm.

mod util;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use ringcast::{Engine, RejectReason};
use tungstenite::Message as WsMessage;
use util::*;

const STORM: usize = 5_000;
const THREADS: usize = 8;
const RATE: u32 = 200; // per shard per second
const BURST: u32 = 100; // per shard
const SHARDS: usize = 2;
const RETRY_AFTER_MAX: u64 = 20;

/// One storm connect: the status line's code and, for a 503, its `Retry-After`. The stream
/// is returned while it is open (a 101) so the test holds it.
fn storm_connect(addr: SocketAddr) -> (u16, Option<u64>, Option<TcpStream>) {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(upgrade_request("/").as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).expect("an answer, not a hang");
        assert!(n > 0, "closed without an answer");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head[9..12].parse().unwrap();
    let retry = head
        .lines()
        .find_map(|l| l.strip_prefix("Retry-After: "))
        .map(|v| v.trim().parse().unwrap());
    (status, retry, (status == 101).then_some(stream))
}

#[test]
fn a_storm_of_5000_connects_is_shaped_while_a_live_client_keeps_its_latency() {
    let mut cfg = config(SHARDS);
    cfg.admission.upgrades_per_sec = RATE;
    cfg.admission.upgrade_burst = BURST;
    cfg.admission.retry_after_max = Duration::from_secs(RETRY_AFTER_MAX);
    let engine = Engine::start(cfg, |_| Echo).expect("start");
    let addr = engine.local_addr();
    // The live client connects before the storm (it spends one token).
    let mut live = connect(addr, "/");
    let storming = AtomicBool::new(true);
    // Storm connects answered so far: the probe's clock in the engine's own work, which a
    // loaded host slows down together with the engine.
    let answered = AtomicUsize::new(0);
    let started = Instant::now();
    let (probes, results) = std::thread::scope(|s| {
        let probe = s.spawn(|| {
            let mut probes = Vec::new();
            let mut i = 0u64;
            while storming.load(Ordering::Relaxed) || probes.len() < 20 {
                i += 1;
                let sent = Instant::now();
                let before = answered.load(Ordering::Relaxed);
                live.send(WsMessage::text(i.to_string())).unwrap();
                assert_eq!(live.read().unwrap(), WsMessage::text(i.to_string()));
                let during = answered.load(Ordering::Relaxed) - before;
                probes.push((sent.elapsed(), during, storming.load(Ordering::Relaxed)));
                // Paced, not flat out: the probe measures, it is not load.
                std::thread::sleep(Duration::from_millis(2));
                assert!(started.elapsed() < 4 * DEADLINE, "the storm never ended");
            }
            probes
        });
        let answered = &answered;
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                s.spawn(move || {
                    (0..STORM / THREADS)
                        .map(|_| {
                            let result = storm_connect(addr);
                            answered.fetch_add(1, Ordering::Relaxed);
                            result
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<_> = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        storming.store(false, Ordering::Relaxed);
        (probe.join().unwrap(), results)
    });
    let elapsed = started.elapsed().as_secs_f64();
    let accepted = results.iter().filter(|r| r.0 == 101).count();
    let shaped: Vec<u64> = results
        .iter()
        .filter(|r| r.0 == 503)
        .map(|r| r.1.expect("a 503 says when to retry"))
        .collect();
    assert_eq!(
        accepted + shaped.len(),
        STORM,
        "every connect got 101 or 503"
    );
    assert!(shaped.iter().all(|s| (1..=RETRY_AFTER_MAX).contains(s)));
    let distinct: std::collections::HashSet<_> = shaped.iter().collect();
    assert!(
        distinct.len() as u64 >= RETRY_AFTER_MAX / 2,
        "retries spread: {distinct:?}"
    );
    // Admitted: at most the buckets' burst plus their refill over the storm's length.
    let allowed = (SHARDS as f64) * (f64::from(BURST) + f64::from(RATE) * elapsed);
    assert!(
        (accepted as f64) <= allowed + 1.0,
        "{accepted} admitted in {elapsed:.2} s; the buckets allow {allowed:.0}"
    );
    assert!(accepted >= BURST as usize, "{accepted} admitted");
    let total = engine.handle().metrics().total();
    assert_eq!(total.rejected(RejectReason::Rate), shaped.len() as u64);
    // The live client: every echo came back (the probe asserts each), and it was served
    // all through the storm, not after it. Measured in storm connects answered while each
    // echo was out, not in milliseconds: a loaded 2-core host stretches every wall-clock
    // latency (the storm, the engine, this probe and the busy loops share the cores), while
    // an engine that put the live connection behind the storm's backlog shows as an echo
    // spanning a large share of the 5,000 connects however fast the host is. A fair shard
    // answers the echo within a few dozen storm connects (p99 about 15, max about 30 here,
    // idle or beside two busy loops; unshaped the same), so the bounds below leave room.
    let in_storm: Vec<_> = probes.iter().filter(|p| p.2).collect();
    assert!(
        in_storm.len() >= 10,
        "only {} echoes while the storm ran",
        in_storm.len()
    );
    let mut spans: Vec<usize> = in_storm.iter().map(|p| p.1).collect();
    spans.sort();
    let mut rtts: Vec<Duration> = in_storm.iter().map(|p| p.0).collect();
    rtts.sort();
    let pct = |n: usize, q: usize| n * q / 100;
    let (span_p99, span_max) = (spans[pct(spans.len(), 99)], *spans.last().unwrap());
    eprintln!(
        "storm: {STORM} connects in {elapsed:.2} s, {accepted} admitted, {} shaped; live \
         client {} echoes in the storm, rtt p50 {:?} p99 {:?} max {:?}; storm connects \
         answered per echo p50 {} p99 {span_p99} max {span_max}",
        shaped.len(),
        rtts.len(),
        rtts[pct(rtts.len(), 50)],
        rtts[pct(rtts.len(), 99)],
        rtts.last().unwrap(),
        spans[pct(spans.len(), 50)],
    );
    assert!(
        span_p99 <= STORM / 20,
        "a live echo waited for {span_p99} storm connects (p99)"
    );
    assert!(
        span_max <= STORM / 5,
        "a live echo waited for {span_max} storm connects"
    );
    drop(results);
    engine.stop().unwrap();
}
