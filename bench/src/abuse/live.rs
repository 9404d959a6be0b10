//! The live client beside the attacks: a publish -> ack -> message round trip on its own
//! topic every `live_interval`, and a fresh connection's upgrade every [`UPGRADE_EVERY`], each
//! timed and kept with the time it started, so a run can cut them per attack.

use std::{
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use super::{
    client::{Got, JsonClient},
    report::Sample,
    AbuseConfig,
};
use anyhow::{bail, Result};

/// The live client's topic.
pub(super) const LIVE_TOPIC: &str = "abuse.live";
/// The longest one round trip (or upgrade) may take before it counts as failed.
pub(super) const ROUND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a fresh connection upgrades beside the attacks.
pub(super) const UPGRADE_EVERY: Duration = Duration::from_millis(100);
/// The live client's source address: the attackers use 127.0.0.2 onwards.
const LIVE_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

/// The running live client: two threads recording samples until stopped.
#[derive(Debug)]
pub(super) struct Live {
    stop: Arc<AtomicBool>,
    /// Round trips: when each started and how long it took (`None`: failed).
    pub(super) rtts: Arc<Mutex<Vec<Sample>>>,
    /// Upgrades of fresh connections, likewise.
    pub(super) upgrades: Arc<Mutex<Vec<Sample>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Live {
    /// Starts both threads and waits (bounded by [`ROUND_TIMEOUT`] twice) for the first round
    /// trip to succeed, so a run against a server that is not a broker fails at once.
    ///
    /// # Errors
    /// No round trip succeeded in time.
    pub(super) fn start(cfg: &AbuseConfig) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let rtts = Arc::new(Mutex::new(Vec::new()));
        let upgrades = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (cfg, stop, rtts) = (cfg.clone(), stop.clone(), rtts.clone());
            threads.push(thread::spawn(move || round_trips(&cfg, &stop, &rtts)));
        }
        {
            let (cfg, stop, upgrades) = (cfg.clone(), stop.clone(), upgrades.clone());
            threads.push(thread::spawn(move || {
                fresh_upgrades(&cfg, &stop, &upgrades)
            }));
        }
        let live = Self {
            stop,
            rtts,
            upgrades,
            threads,
        };
        let deadline = Instant::now() + 2 * ROUND_TIMEOUT + cfg.open_timeout;
        while Instant::now() < deadline {
            if live.rtts.lock().unwrap().iter().any(|s| s.took.is_some()) {
                return Ok(live);
            }
            thread::sleep(Duration::from_millis(10));
        }
        live.stop();
        bail!("the live client made no round trip (is the server the ringcast broker?)")
    }

    /// Stops both threads and waits for them.
    pub(super) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Publishes to [`LIVE_TOPIC`] every `live_interval` and waits for both the ack and the message
/// back; reconnects (and records a failure) when the connection breaks.
fn round_trips(cfg: &AbuseConfig, stop: &AtomicBool, rtts: &Mutex<Vec<Sample>>) {
    let mut client: Option<JsonClient> = None;
    let mut id = 0u64;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
        // Keep the schedule, but skip rounds missed while one was late.
        next = (next + cfg.live_interval).max(Instant::now());
        let at = Instant::now();
        let took = match &mut client {
            Some(c) => {
                id += 1;
                round_trip(c, id).ok()
            }
            None => {
                client = subscribed(cfg).ok();
                continue;
            }
        };
        if took.is_none() {
            client = None;
        }
        rtts.lock().unwrap().push(Sample { at, took });
    }
}

/// A connection subscribed to [`LIVE_TOPIC`].
fn subscribed(cfg: &AbuseConfig) -> Result<JsonClient> {
    let mut c = JsonClient::open(&cfg.target, LIVE_SOURCE, cfg.open_timeout)?;
    c.send(&format!(
        r#"{{"type":"subscribe","id":0,"topic":"{LIVE_TOPIC}"}}"#
    ))?;
    let deadline = Instant::now() + ROUND_TIMEOUT;
    loop {
        match c.recv(deadline)? {
            Some(Got::Json(v)) if v["type"] == "ack" => return Ok(c),
            Some(Got::Json(v)) if v["type"] == "error" => bail!("live subscribe refused: {v}"),
            Some(Got::Closed(code, reason)) => bail!("closed: {code:?} {reason}"),
            Some(Got::Json(_)) => {}
            None => bail!("no answer to the live subscribe"),
        }
    }
}

/// One publish of `id` and the wait for its ack and its message.
fn round_trip(c: &mut JsonClient, id: u64) -> Result<Duration> {
    let start = Instant::now();
    c.send(&format!(
        r#"{{"type":"publish","id":{id},"topic":"{LIVE_TOPIC}","data":{id}}}"#
    ))?;
    let deadline = start + ROUND_TIMEOUT;
    let (mut acked, mut echoed) = (false, false);
    while !(acked && echoed) {
        match c.recv(deadline)? {
            Some(Got::Json(v)) => match v["type"].as_str() {
                Some("ack") if v["id"] == id => acked = true,
                Some("message") if v["data"].as_u64() == Some(id) => echoed = true,
                Some("error") if v["id"] == id => bail!("live publish refused: {v}"),
                _ => {}
            },
            Some(Got::Closed(code, reason)) => bail!("closed: {code:?} {reason}"),
            None => bail!("round trip {id} timed out"),
        }
    }
    Ok(start.elapsed())
}

/// Opens a fresh connection every [`UPGRADE_EVERY`] and times its upgrade.
fn fresh_upgrades(cfg: &AbuseConfig, stop: &AtomicBool, upgrades: &Mutex<Vec<Sample>>) {
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        }
        next = (next + UPGRADE_EVERY).max(Instant::now());
        let at = Instant::now();
        let took = JsonClient::open(&cfg.target, LIVE_SOURCE, ROUND_TIMEOUT)
            .ok()
            .map(|_| at.elapsed());
        upgrades.lock().unwrap().push(Sample { at, took });
    }
}
