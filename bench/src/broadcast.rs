//! The broadcast load: N clients in lockstep rounds, every message delivered to every client.
//!
//! This is the all-to-all test that uWebSockets' benchmarks made standard. In each round
//! every client sends one binary message, and the server relays each message to every
//! connected client, the sender included, so a round is N sends and N x N deliveries. A
//! client's round is done when it has received N messages; the next round starts when every
//! client is done. The figures are deliveries per second (rounds/s x N^2), the server's CPU
//! time per delivery, and the round latency: from the round's first send to its last
//! delivery.
//!
//! Each message carries its round number and sender (in its first 12 bytes, when it has
//! that many), so a message from another round, a duplicate or a mangled message fails the
//! run instead of counting.
//!
//! One thread drives every connection on one mio `Poll` (edge-triggered), like the echo
//! load's default driver; connections are opened and upgraded with blocking sockets first,
//! in batches ([`crate::idle`]). Bounded: each connect and all handshakes have a deadline,
//! rounds stop starting once the window's length has passed (or after a set count), a round
//! that makes no progress for [`BroadcastConfig::round_timeout`] fails the run, and closing
//! waits at most [`CLOSE_GRACE`].

use std::{
    io,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use mio::{Events, Poll, Token};
use serde::{Deserialize, Serialize};

use crate::{
    echo::CLOSE_GRACE,
    idle::{self, OpenSet, WorkerConfig, MAX_CONNS_PER_PROCESS},
    net::{SourceAddrs, Target},
    stats::{latency_histogram, LatencySummary},
    window::{record, CpuReport, WindowStart},
    wsconn::MioConn,
};

/// Bytes one `read` may return; the buffer is shared by all connections.
const READ_BYTES: usize = 64 << 10;

/// The longest one `epoll_wait` blocks, so a stalled round is noticed within this.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// Payload bytes that carry the round number (8, little-endian) and the sender's index (4);
/// shorter messages carry only the byte pattern.
pub const TAG_BYTES: usize = 12;

/// What to run.
#[derive(Debug, Clone)]
pub struct BroadcastConfig {
    /// The server: it must relay every message to every connected client, sender included.
    pub target: Target,
    /// Clients (N); a round is N sends and N x N deliveries.
    pub conns: usize,
    /// Payload bytes per message (binary frames).
    pub size_bytes: usize,
    /// Length of the measured window: no round starts after it has passed; the window ends
    /// with the round in progress, so it may run over by one round.
    pub duration: Duration,
    /// Rounds before the window opens, not measured, for this long.
    pub warmup: Duration,
    /// The most rounds in the window (`None`: only the duration bounds them).
    pub max_rounds: Option<u64>,
    /// A round with no delivery for this long fails the run.
    pub round_timeout: Duration,
    /// The server's process, for its CPU time over the window.
    pub server_pid: Option<u32>,
    /// Source addresses for the connections.
    pub sources: SourceAddrs,
    /// Limit for each TCP connect, and for all WebSocket handshakes together.
    pub connect_timeout: Duration,
}

impl BroadcastConfig {
    /// The defaults for `target`: 100 clients, 20-byte messages, 1 s warmup, 5 s window,
    /// 10 s round timeout.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            conns: 100,
            size_bytes: 20,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            max_rounds: None,
            round_timeout: Duration::from_secs(10),
            server_pid: None,
            sources: SourceAddrs::default(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// What one broadcast run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BroadcastReport {
    /// Clients (N).
    pub conns: usize,
    /// Payload bytes per message.
    pub size_bytes: usize,
    /// The measured window, in seconds: from the first measured round's start to the last
    /// one's end.
    pub window_secs: f64,
    /// Rounds completed before the window, not measured.
    pub warmup_rounds: u64,
    /// Rounds completed inside the window.
    pub rounds: u64,
    /// Messages delivered inside the window: rounds x N x N.
    pub deliveries: u64,
    /// Deliveries per second inside the window.
    pub deliveries_per_sec: f64,
    /// Rounds per second inside the window.
    pub rounds_per_sec: f64,
    /// Round latency (first send to last delivery of the round) inside the window.
    pub round_latency: LatencySummary,
    /// Server CPU time per delivery, in microseconds (needs the server's pid).
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Where the CPU time of the window went.
    #[serde(flatten)]
    pub cpu: CpuReport,
}

impl BroadcastReport {
    /// One human-readable line.
    pub fn human(&self) -> String {
        let l = &self.round_latency;
        let mut line = format!(
            "broadcast: {conns} clients x {size} B, {win:.2} s: {rate:.0} deliveries/s \
             ({rounds} rounds, {rps:.1} rounds/s) | round latency us p50 {p50:.1} p90 {p90:.1} \
             p99 {p99:.1} max {max:.1}",
            conns = self.conns,
            size = self.size_bytes,
            win = self.window_secs,
            rate = self.deliveries_per_sec,
            rounds = self.rounds,
            rps = self.rounds_per_sec,
            p50 = l.p50_us,
            p90 = l.p90_us,
            p99 = l.p99_us,
            max = l.max_us,
        );
        line += &self
            .cpu
            .human(self.server_cpu_us_per_delivery, "delivery", 3);
        line
    }
}

/// Runs the rounds on this thread and reports.
///
/// # Errors
/// A bad config; a connection or handshake fails before the load starts; any connection
/// fails, or a message is missing, extra, from another round or mangled, during the load; a
/// round stalls for [`BroadcastConfig::round_timeout`]; no round completes inside the window;
/// or the server's `/proc` entries cannot be read.
pub fn run_broadcast(cfg: &BroadcastConfig) -> Result<BroadcastReport> {
    validate(cfg)?;
    let set = idle::open_range(
        &WorkerConfig {
            target: cfg.target.clone(),
            range: 0..cfg.conns,
            raw: false,
            sources: cfg.sources,
            open_timeout: cfg.connect_timeout,
            lifetime: Duration::MAX,
        },
        &[],
    )?;
    if set.failed > 0 {
        bail!(
            "{} of {} connections failed to open; first: {}",
            set.failed,
            cfg.conns,
            set.first_error.as_deref().unwrap_or("?")
        );
    }
    let mut poll = Poll::new().context("creating the epoll instance")?;
    let mut conns = Vec::with_capacity(cfg.conns);
    for (i, conn) in set.conns.into_iter().enumerate() {
        conns.push(MioConn::register(conn, Token(i), poll.registry())?);
    }

    let mut lockstep = Lockstep {
        cfg,
        poll: &mut poll,
        events: Events::with_capacity(1024),
        scratch: vec![0u8; READ_BYTES.max(cfg.size_bytes + 16)],
        payload: vec![0u8; cfg.size_bytes],
        conns: &mut conns,
        tally: RoundTally::new(cfg.conns, cfg.size_bytes),
        round: 0,
    };
    let outcome = lockstep.run();

    // Close (bounded) whether or not the load succeeded.
    let live = OpenSet {
        conns: conns
            .into_iter()
            .filter_map(|c| c.into_blocking(poll.registry()))
            .collect(),
        ..OpenSet::default()
    };
    drop(poll);
    live.close(CLOSE_GRACE);
    outcome
}

fn validate(cfg: &BroadcastConfig) -> Result<()> {
    ensure!(cfg.conns > 0, "--conns must be at least 1");
    ensure!(
        cfg.conns <= MAX_CONNS_PER_PROCESS,
        "--conns {} is more than the {MAX_CONNS_PER_PROCESS} connections one process holds",
        cfg.conns
    );
    ensure!(!cfg.duration.is_zero(), "--duration must be positive");
    ensure!(
        !cfg.round_timeout.is_zero(),
        "--round-timeout must be positive"
    );
    ensure!(cfg.max_rounds != Some(0), "--max-rounds must be at least 1");
    // Fail before connecting anything if the sources run out.
    cfg.sources.for_index(cfg.conns - 1)?;
    Ok(())
}

/// The running load.
struct Lockstep<'a> {
    cfg: &'a BroadcastConfig,
    poll: &'a mut Poll,
    events: Events,
    scratch: Vec<u8>,
    /// The message being sent, rewritten per sender.
    payload: Vec<u8>,
    conns: &'a mut Vec<MioConn>,
    tally: RoundTally,
    /// The last round started, from 1.
    round: u64,
}

impl Lockstep<'_> {
    fn run(&mut self) -> Result<BroadcastReport> {
        let cfg = self.cfg;
        let started = Instant::now();
        let mut warmup_rounds = 0;
        while started.elapsed() < cfg.warmup {
            self.round()?;
            warmup_rounds += 1;
        }

        let mut histogram = latency_histogram();
        let window = WindowStart::now(cfg.server_pid)?;
        let end = window.at + cfg.duration;
        let mut rounds = 0u64;
        while Instant::now() < end && cfg.max_rounds.is_none_or(|max| rounds < max) {
            let latency = self.round()?;
            record(&mut histogram, latency);
            rounds += 1;
        }
        let window = window.end(cfg.server_pid)?;
        ensure!(rounds > 0, "no round completed inside the window");

        let n = cfg.conns as u64;
        let deliveries = rounds.saturating_mul(n).saturating_mul(n);
        let secs = window.secs();
        Ok(BroadcastReport {
            conns: cfg.conns,
            size_bytes: cfg.size_bytes,
            window_secs: secs,
            warmup_rounds,
            rounds,
            deliveries,
            deliveries_per_sec: deliveries as f64 / secs,
            rounds_per_sec: rounds as f64 / secs,
            round_latency: LatencySummary::from_histogram(&histogram),
            server_cpu_us_per_delivery: window.server_cpu_us_per(deliveries),
            cpu: window.cpu_report(),
        })
    }

    /// Runs one round: every client sends, then waits for N messages. Returns the time from
    /// the first send to the last delivery.
    fn round(&mut self) -> Result<Duration> {
        self.round += 1;
        let round = self.round;
        let n = self.conns.len();
        let tally = &mut self.tally;
        tally.begin(round);
        let started = Instant::now();
        for (sender, conn) in self.conns.iter_mut().enumerate() {
            fill_payload(&mut self.payload, round, sender);
            conn.send_binary(&self.payload, self.poll.registry())
                .with_context(|| format!("round {round}: client {sender} sending"))?;
        }
        let mut last_progress = started;
        while !tally.is_complete() {
            let stalled = last_progress.elapsed();
            if stalled >= self.cfg.round_timeout {
                bail!(
                    "round {round} stalled: no delivery for {stalled:.1?}; {} of {} deliveries \
                     arrived, {} of {n} clients have all {n} messages (does the server relay \
                     every message to every client, the sender included?)",
                    tally.delivered,
                    tally.expected(),
                    tally.complete_clients,
                );
            }
            let wait = (self.cfg.round_timeout - stalled).min(MAX_WAIT);
            match self.poll.poll(&mut self.events, Some(wait)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            }
            let before = tally.delivered;
            for event in &self.events {
                let client = event.token().0;
                let Some(conn) = self.conns.get_mut(client) else {
                    continue;
                };
                conn.on_ready(
                    event.is_readable() || event.is_read_closed(),
                    event.is_writable(),
                    &mut self.scratch,
                    self.poll.registry(),
                    |message| tally.take(client, &message),
                )
                .with_context(|| format!("round {round}: client {client}"))?;
            }
            if tally.delivered > before {
                last_progress = Instant::now();
            }
        }
        Ok(started.elapsed())
    }
}

/// Writes the message `sender` sends in `round`: the byte pattern, with the round number and
/// the sender's index in front when there is room ([`TAG_BYTES`]).
pub fn fill_payload(buf: &mut [u8], round: u64, sender: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    if buf.len() >= TAG_BYTES {
        buf[..8].copy_from_slice(&round.to_le_bytes());
        // Indexes are below MAX_CONNS_PER_PROCESS, far below u32::MAX.
        buf[8..12].copy_from_slice(&(sender as u32).to_le_bytes());
    }
}

/// The round and sender a message carries; `None` when it is shorter than [`TAG_BYTES`].
pub fn read_tag(message: &[u8]) -> Option<(u64, u32)> {
    let round = u64::from_le_bytes(message.get(..8)?.try_into().ok()?);
    let sender = u32::from_le_bytes(message.get(8..12)?.try_into().ok()?);
    Some((round, sender))
}

/// Deliveries counted in one round, with the checks each message must pass.
#[derive(Debug)]
struct RoundTally {
    round: u64,
    size_bytes: usize,
    /// A message as [`fill_payload`] writes it; everything after the tag must match.
    template: Vec<u8>,
    /// Messages each client received this round.
    received: Vec<u32>,
    /// Per client, the sum of the senders' indexes received (tagged messages only): all N
    /// senders once each sum to N(N-1)/2, which a duplicate paired with a loss rarely does.
    sender_sums: Vec<u64>,
    delivered: u64,
    complete_clients: usize,
}

impl RoundTally {
    /// A tally for `clients` clients and messages of `size_bytes`, before its first round.
    fn new(clients: usize, size_bytes: usize) -> Self {
        let mut template = vec![0u8; size_bytes];
        fill_payload(&mut template, 0, 0);
        Self {
            round: 0,
            size_bytes,
            template,
            received: vec![0; clients],
            sender_sums: vec![0; clients],
            delivered: 0,
            complete_clients: 0,
        }
    }

    /// Starts counting `round` from zero.
    fn begin(&mut self, round: u64) {
        self.round = round;
        self.received.fill(0);
        self.sender_sums.fill(0);
        self.delivered = 0;
        self.complete_clients = 0;
    }

    fn clients(&self) -> usize {
        self.received.len()
    }

    fn expected(&self) -> u64 {
        (self.clients() as u64).saturating_mul(self.clients() as u64)
    }

    fn is_complete(&self) -> bool {
        self.complete_clients == self.clients()
    }

    /// Counts one message `client` received.
    fn take(&mut self, client: usize, message: &[u8]) -> Result<()> {
        let n = self.clients();
        ensure!(
            message.len() == self.size_bytes,
            "a {}-byte message came; {} were sent",
            message.len(),
            self.size_bytes
        );
        let received = &mut self.received[client];
        ensure!(
            (*received as usize) < n,
            "more than {n} messages came in round {}",
            self.round
        );
        if let Some((round, sender)) = read_tag(message) {
            ensure!(
                round == self.round,
                "a message of round {round} came in round {}",
                self.round
            );
            ensure!(
                (sender as usize) < n,
                "a message from sender {sender} came; there are {n}"
            );
            self.sender_sums[client] += u64::from(sender);
        }
        let from = if message.len() >= TAG_BYTES {
            TAG_BYTES
        } else {
            0
        };
        ensure!(
            message[from..] == self.template[from..],
            "the message differs from the one sent"
        );
        *received += 1;
        self.delivered += 1;
        if *received as usize == n {
            if message.len() >= TAG_BYTES {
                let all = (n as u64) * (n as u64 - 1) / 2;
                ensure!(
                    self.sender_sums[client] == all,
                    "round {}: the senders of the {n} messages do not add up: a duplicate and a \
                     loss",
                    self.round
                );
            }
            self.complete_clients += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(size: usize, round: u64, sender: usize) -> Vec<u8> {
        let mut buf = vec![0u8; size];
        fill_payload(&mut buf, round, sender);
        buf
    }

    #[test]
    fn tags_round_trip_and_short_messages_carry_none() {
        let m = message(20, 7, 999);
        assert_eq!(read_tag(&m), Some((7, 999)));
        assert_eq!(m[12..], (12..20).collect::<Vec<u8>>());
        let short = message(11, 7, 3);
        assert_eq!(read_tag(&short), None);
        assert_eq!(short, (0..11).collect::<Vec<u8>>());
        let long = message(600, 1, 0);
        assert_eq!(long[251..253], [0, 1]);
    }

    #[test]
    fn a_round_completes_when_every_client_has_every_message() {
        let mut t = RoundTally::new(3, 20);
        t.begin(3);
        for sender in 0..3 {
            for client in 0..3 {
                assert!(!t.is_complete());
                t.take(client, &message(20, 3, sender)).unwrap();
            }
        }
        assert!(t.is_complete());
        assert_eq!(t.delivered, t.expected());
        assert_eq!(t.expected(), 9);
    }

    #[test]
    fn extra_stale_foreign_or_mangled_messages_fail() {
        let mut t = RoundTally::new(2, 20);
        t.begin(2);
        assert!(t.take(0, &message(20, 1, 0)).is_err(), "stale round");
        assert!(t.take(0, &message(20, 2, 5)).is_err(), "unknown sender");
        assert!(t.take(0, &message(21, 2, 0)).is_err(), "wrong size");
        let mut mangled = message(20, 2, 0);
        mangled[15] ^= 1;
        assert!(t.take(0, &mangled).is_err(), "mangled");
        t.take(0, &message(20, 2, 0)).unwrap();
        t.take(0, &message(20, 2, 1)).unwrap();
        assert!(t.take(0, &message(20, 2, 1)).is_err(), "a third message");
    }

    #[test]
    fn a_duplicate_in_place_of_a_message_fails_the_sender_check() {
        let mut t = RoundTally::new(3, 20);
        t.begin(1);
        t.take(0, &message(20, 1, 0)).unwrap();
        t.take(0, &message(20, 1, 1)).unwrap();
        assert!(t.take(0, &message(20, 1, 1)).is_err());
    }

    #[test]
    fn configs_that_cannot_run_are_refused() {
        let target = Target::parse("ws://127.0.0.1:9/").unwrap();
        let mut cfg = BroadcastConfig::new(target);
        validate(&cfg).unwrap();
        cfg.conns = 0;
        assert!(validate(&cfg).is_err());
        cfg.conns = MAX_CONNS_PER_PROCESS + 1;
        assert!(validate(&cfg).is_err());
        cfg.conns = 4;
        cfg.max_rounds = Some(0);
        assert!(validate(&cfg).is_err());
    }
}
