//! What a fan-out run is asked to do: the mode, the config and its checks, and its split
//! into subscriber parts.

use std::{fmt, str::FromStr, time::Duration};

use anyhow::{ensure, Result};
use ringcast_protocol::envelope::Encoding;
use serde::{Deserialize, Serialize};

use crate::{
    idle::{AUTO_CONNS_PER_PROCESS, MAX_CONNS_PER_PROCESS},
    net::{SourceAddrs, Target},
    workers::slices,
};

use super::{subscriber::SubscriberPart, MIN_JSON_PAYLOAD_BYTES, TS_BYTES};

/// What the subscribers speak, and to which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FanoutMode {
    /// The broker's JSON envelope (`ringcast.v1.json`, text frames).
    #[default]
    EnvelopeJson,
    /// The broker's binary envelope (`ringcast.v1.bin`, binary frames).
    EnvelopeBin,
    /// Bare binary messages through an all-to-all broadcast server; one topic.
    Raw,
}

impl FanoutMode {
    /// The envelope encoding, or `None` for raw.
    pub const fn encoding(self) -> Option<Encoding> {
        match self {
            Self::EnvelopeJson => Some(Encoding::Json),
            Self::EnvelopeBin => Some(Encoding::Binary),
            Self::Raw => None,
        }
    }

    /// The smallest `--size` the payload fits in.
    pub const fn min_size_bytes(self) -> usize {
        match self {
            Self::EnvelopeJson => MIN_JSON_PAYLOAD_BYTES,
            Self::EnvelopeBin | Self::Raw => TS_BYTES,
        }
    }

    pub(super) fn is_json(self) -> bool {
        self == Self::EnvelopeJson
    }
}

impl FromStr for FanoutMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "envelope-json" => Ok(Self::EnvelopeJson),
            "envelope-bin" => Ok(Self::EnvelopeBin),
            "raw" => Ok(Self::Raw),
            other => Err(format!(
                "unknown mode {other:?}: envelope-json, envelope-bin or raw"
            )),
        }
    }
}

impl fmt::Display for FanoutMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EnvelopeJson => "envelope-json",
            Self::EnvelopeBin => "envelope-bin",
            Self::Raw => "raw",
        })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// The server: the ringcast broker for the envelope modes, a broadcast server for raw.
    pub target: Target,
    /// Where the publishers connect, when not to `target`: another ringcast host sharing
    /// topics through Redis, for cross-host publish-to-receive latency.
    pub publish_target: Option<Target>,
    /// What the connections speak.
    pub mode: FanoutMode,
    /// Subscriber connections (N).
    pub subs: usize,
    /// Topics (T): subscriber `i` takes `fanout.{i % T}`, message `m` goes to `fanout.{m % T}`.
    /// Must be 1 in raw mode.
    pub topics: usize,
    /// Messages per second, all publishers together.
    pub rate: f64,
    /// Payload bytes per message, at least [`FanoutMode::min_size_bytes`].
    pub size_bytes: usize,
    /// Length of the measured window.
    pub duration: Duration,
    /// Publishing before the window opens, not measured.
    pub warmup: Duration,
    /// Processes for the subscribers; 0 picks one per 15,000. With 1 they run on a thread of
    /// this process.
    pub procs: usize,
    /// Publisher connections, taking messages in turn.
    pub publishers: usize,
    /// The server's process, for its CPU time over the window.
    pub server_pid: Option<u32>,
    /// Source addresses: subscribers take indexes `0..N`, publishers the next ones.
    pub sources: SourceAddrs,
    /// Deadline for opening and subscribing every connection.
    pub open_timeout: Duration,
    /// Draw a progress bar on stderr (when it is a terminal and the run lasts over a second).
    pub progress: bool,
    /// The subscribers busy-poll their sockets (`epoll_wait` with a zero timeout) from the
    /// start of the load to its end instead of sleeping in `epoll_wait`, so a delivery is read
    /// without the client's own wake-up in its latency. Costs one core per subscriber process
    /// for the run.
    pub spin: bool,
}

impl FanoutConfig {
    /// The defaults for `target`: JSON envelope, 1000 subscribers on 1 topic, 1000 messages/s of
    /// 64 bytes from 1 publisher, 1 s warmup, 5 s window, processes chosen automatically.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            publish_target: None,
            mode: FanoutMode::default(),
            subs: 1000,
            topics: 1,
            rate: 1000.0,
            size_bytes: 64,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            procs: 0,
            publishers: 1,
            server_pid: None,
            sources: SourceAddrs::default(),
            open_timeout: Duration::from_secs(60),
            progress: false,
            spin: false,
        }
    }

    pub(super) fn procs(&self) -> usize {
        match self.procs {
            0 => self.subs.div_ceil(AUTO_CONNS_PER_PROCESS),
            n => n,
        }
    }
}

pub(super) fn validate(cfg: &FanoutConfig) -> Result<()> {
    ensure!(cfg.subs > 0, "--subs must be at least 1");
    ensure!(cfg.topics > 0, "--topics must be at least 1");
    ensure!(
        cfg.mode != FanoutMode::Raw || cfg.topics == 1,
        "raw mode has one topic: every connection receives every message"
    );
    ensure!(cfg.publishers > 0, "--publishers must be at least 1");
    ensure!(
        cfg.rate.is_finite() && cfg.rate > 0.0,
        "--rate must be a positive number of messages per second"
    );
    ensure!(!cfg.duration.is_zero(), "--duration must be positive");
    ensure!(
        cfg.size_bytes >= cfg.mode.min_size_bytes(),
        "--size must be at least {} bytes in {} mode (the payload carries its timestamp)",
        cfg.mode.min_size_bytes(),
        cfg.mode
    );
    let procs = cfg.procs();
    ensure!(
        procs <= cfg.subs,
        "--procs {procs} is more than the {} subscribers",
        cfg.subs
    );
    // The publishers share this process with the subscribers when there is one process.
    let here = if procs == 1 { cfg.subs } else { 0 } + cfg.publishers;
    ensure!(
        cfg.subs.div_ceil(procs) <= MAX_CONNS_PER_PROCESS && here <= MAX_CONNS_PER_PROCESS,
        "{} subscribers over {procs} process(es) is more than {MAX_CONNS_PER_PROCESS} \
         connections per process; raise --procs",
        cfg.subs
    );
    // Fail before connecting anything if the sources run out.
    cfg.sources.for_index(cfg.subs + cfg.publishers - 1)?;
    Ok(())
}

/// The subscriber parts for `procs` processes.
pub(super) fn subscriber_parts(cfg: &FanoutConfig, procs: usize) -> Vec<SubscriberPart> {
    slices(cfg.subs, procs)
        .map(|range| SubscriberPart {
            url: format!("ws://{}{}", cfg.target.host, cfg.target.path),
            mode: cfg.mode,
            first_index: range.start,
            count: range.len(),
            topics: cfg.topics,
            rate: cfg.rate,
            sources: cfg.sources,
            open_timeout: cfg.open_timeout,
            warmup: cfg.warmup,
            duration: cfg.duration,
            spin: cfg.spin,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_that_cannot_run_are_refused() {
        let target = Target::parse("ws://127.0.0.1:9/").unwrap();
        let mut cfg = FanoutConfig::new(target);
        validate(&cfg).unwrap();
        let bad_ones: [fn(&mut FanoutConfig); 9] = [
            |c| c.subs = 0,
            |c| c.topics = 0,
            |c| {
                c.mode = FanoutMode::Raw;
                c.topics = 2;
            },
            |c| c.rate = 0.0,
            |c| c.size_bytes = 24,
            |c| {
                c.mode = FanoutMode::EnvelopeBin;
                c.size_bytes = 7;
            },
            |c| c.procs = 1001,
            |c| {
                c.subs = 20_000;
                c.procs = 1;
            },
            |c| c.publishers = 0,
        ];
        for bad in bad_ones {
            let mut c = cfg.clone();
            bad(&mut c);
            assert!(validate(&c).is_err(), "{c:?}");
        }
        cfg.subs = 30_000;
        assert_eq!(cfg.procs(), 2);
        validate(&cfg).unwrap();
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in [
            FanoutMode::EnvelopeJson,
            FanoutMode::EnvelopeBin,
            FanoutMode::Raw,
        ] {
            assert_eq!(mode.to_string().parse::<FanoutMode>(), Ok(mode));
        }
        assert!("json".parse::<FanoutMode>().is_err());
    }
}
