//! `loadgen`: the benchmark load generator. A thin CLI over `ringcast_bench`; see the crate
//! docs for what each subcommand measures.
//!
//! Loopback only, and every loop is bounded in count and time.

use std::{path::PathBuf, time::Duration};

use anyhow::{ensure, Context as _, Result};
use clap::{Args, Parser, Subcommand};
use ringcast_bench::{
    abuse::{run_abuse, AbuseConfig, Attack},
    broadcast::{run_broadcast, BroadcastConfig},
    compare::{
        run_compare, CompareConfig, Load, Peer, PeerArg, Scenario as CompareScenario,
        DEFAULT_BROADCAST_LOADS, DEFAULT_ECHO_LOADS, DEFAULT_FANOUT_LOADS, DEFAULT_NODE_DIR,
        DEFAULT_RINGCAST_BROADCAST_CMD, DEFAULT_RINGCAST_CMD, DEFAULT_RINGCAST_FANOUT_CMD,
        SERVER_NAMES,
    },
    compare_plot::{plot_compare, LabeledReport},
    echo::{run_echo, Driver, EchoConfig},
    fanout::{self, fanout_worker, run_fanout, FanoutConfig, FanoutMode, SubscriberPart},
    idle::{idle_worker, run_idle, IdleConfig, WorkerConfig},
    net::{SourceAddrs, Target},
    parse_secs, plot,
    storm::{run_storm, storm_worker, Backoff, PartConfig, Scenario, StormConfig},
};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for ringcast and its peers"
)]
struct Cli {
    /// No progress bar on stderr (there is none anyway when stderr is not a terminal).
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Echo load: closed loop (send, wait for the echo, repeat), or a fixed rate with --rate.
    Echo(EchoArgs),
    /// Open and hold idle connections; report the server's memory per connection.
    Idle(IdleArgs),
    /// Lockstep broadcast: each round every client sends one message and waits for N.
    Broadcast(BroadcastArgs),
    /// Run the scenario matrix (echo, broadcast, fan-out; idle) against each server, pinned,
    /// in alternating rounds. Add any server with --peer NAME=CMD.
    Compare(CompareArgs),
    /// Plot saved `compare --json` reports: per echo and fan-out load, the latency spectrum and
    /// throughput over time of each server's median round, as SVG.
    PlotLatency(PlotArgs),
    /// Connection storms: churn (connect, hold, close, repeat) and a mass reconnect.
    Storm(StormArgs),
    /// Fan-out: N subscribers over T topics, a fixed publish rate, publish-to-receive latency.
    ///
    /// envelope-json / envelope-bin: against the ringcast broker. Its default publish limit
    /// (1000/s per connection) refuses faster publishing, so start it with the config in this
    /// repository, which lifts the limit and keeps the default rings:
    ///
    ///     ringcast serve -c bench/ringcast-fanout.toml --shards 1 --listen 127.0.0.1:9000
    ///
    /// raw: against a broadcast server (`ringcast serve --broadcast -c
    /// bench/ringcast-fanout.toml`, peer-tokio-tungstenite-broadcast, `node
    /// bench/node/broadcast.js PORT`); every connection receives every message.
    Fanout(FanoutArgs),
    /// Issue 15's abuse battery against a running broker, with a live client beside it.
    ///
    /// Each attack in turn, for --duration: sub-flood, publish-new, replay, toggle (for a
    /// server with --broker redis://), half-open, nesting. Prints per attack the live
    /// client's publish -> ack -> message round trips (every 50 ms) and fresh upgrades
    /// (every 100 ms), and what the server answered the attackers. Exits non-zero when the
    /// live client's worst round trip exceeds --max-rtt.
    ///
    ///     ringcast serve --shards 2 --listen 127.0.0.1:9000
    Abuse(AbuseArgs),
    /// Holds a slice of `idle`'s connections in a child process.
    #[command(hide = true)]
    IdleWorker(WorkerArgs),
    /// Runs a slice of `storm`'s connections in a child process.
    #[command(hide = true)]
    StormWorker(PartArgs),
    /// Runs a slice of `fanout`'s subscribers in a child process.
    #[command(hide = true)]
    FanoutWorker(PartArgs),
}

/// Source address flags shared by the subcommands that connect.
#[derive(Debug, Args)]
struct SourceArgs {
    /// Last octet of the first source address (connections use 127.0.0.X, X+1, ...).
    #[arg(long, default_value_t = 2)]
    first_source: u8,
    /// Connections per source address (one address has about 28,000 ephemeral ports).
    #[arg(long, default_value_t = 20_000)]
    per_addr: usize,
}

impl SourceArgs {
    fn sources(&self) -> SourceAddrs {
        SourceAddrs {
            first: self.first_source,
            per_addr: self.per_addr,
        }
    }
}

/// The measured window, shared by the loads that run for a time and measure after a warmup.
#[derive(Debug, Args)]
struct WindowArgs {
    /// Measured window, in seconds.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    duration: Duration,
    /// Unmeasured load before the window, in seconds.
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
}

/// The server's process, for the loads that report its CPU time per unit of work.
#[derive(Debug, Args)]
struct ServerCpuArgs {
    /// The server's pid, to report its CPU time per message or delivery.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// How the report is printed, shared by every subcommand that reports.
#[derive(Debug, Args)]
struct OutputArgs {
    /// Print the report as JSON instead of text.
    #[arg(long)]
    json: bool,
}

impl OutputArgs {
    /// Prints a report: JSON for tools, or its human-readable text.
    fn emit(&self, report: &impl serde::Serialize, human: &str) -> Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(report)?);
        } else {
            println!("{}", human.trim_end());
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
struct EchoArgs {
    /// Server URL, ws://HOST:PORT/PATH (loopback only).
    #[arg(long)]
    url: String,
    /// Connections, each with one message in flight.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 20)]
    size: usize,
    #[command(flatten)]
    window: WindowArgs,
    /// Send SIZE raw bytes and wait for SIZE bytes back (no WebSocket), for peer-raw-echo.
    #[arg(long)]
    raw: bool,
    #[command(flatten)]
    server: ServerCpuArgs,
    /// Limit for each connect and for all handshakes together, in seconds.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    connect_timeout: Duration,
    /// The client's event loop: epoll (mio) or uring (monoio).
    #[arg(long, default_value_t = Driver::Epoll)]
    driver: Driver,
    /// Fixed rate: send this many messages per second in total, pipelined, on a schedule,
    /// and measure latency from each message's due time (no coordinated omission). Without
    /// it, the closed loop. Needs the epoll driver.
    #[arg(long)]
    rate: Option<f64>,
    /// Write the latency spectrum and throughput over time as SVG plots into this directory.
    #[arg(long)]
    plot_dir: Option<PathBuf>,
    /// Exit non-zero when more connections than this fail during the window (a run with no
    /// round trip at all always exits non-zero).
    #[arg(long)]
    max_errors: Option<u64>,
    #[command(flatten)]
    sources: SourceArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
struct StormArgs {
    /// Server URL, ws://HOST:PORT/PATH, or tcp://HOST:PORT with --raw (loopback only).
    #[arg(long)]
    url: String,
    /// churn, mass or both (churn first).
    #[arg(long, default_value_t = Scenario::Both)]
    scenario: Scenario,
    /// Churn: concurrent slots; mass: connections to open, drop and reconnect.
    #[arg(long, default_value_t = 1000)]
    conns: usize,
    /// Processes to spread them over (0: one per 15,000 connections).
    #[arg(long, default_value_t = 0)]
    procs: usize,
    /// Churn: how long to churn, in seconds.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    duration: Duration,
    /// Churn: how long each connection is held once upgraded, in seconds.
    #[arg(long, default_value = "0.1", value_parser = parse_secs)]
    hold: Duration,
    /// Mass: how long all connections get to come back, in seconds.
    #[arg(long, default_value = "30", value_parser = parse_secs)]
    reconnect_timeout: Duration,
    /// Limit for one attempt (connect plus upgrade), in seconds.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    attempt_timeout: Duration,
    /// Backoff ceiling after the first failed attempt, in seconds (doubles per failure).
    #[arg(long, default_value = "0.1", value_parser = parse_secs)]
    backoff_base: Duration,
    /// Largest backoff ceiling, in seconds (the wait is uniform in [0, ceiling)).
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    backoff_cap: Duration,
    /// Mass: deadline for opening the connections before the storm, in seconds.
    #[arg(long, default_value = "120", value_parser = parse_secs)]
    open_timeout: Duration,
    /// Plain TCP connections, no upgrade (for peer-raw-echo).
    #[arg(long)]
    raw: bool,
    /// Exit non-zero when more than this percentage of churn attempts fail (the mass
    /// reconnect retries failures, so there only "not all back" fails the run).
    #[arg(long, default_value_t = 1.0)]
    max_failure_pct: f64,
    /// Write the upgrades over time and the reconnect-time spectrum as SVG plots here.
    #[arg(long)]
    plot_dir: Option<PathBuf>,
    #[command(flatten)]
    sources: SourceArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
struct FanoutArgs {
    /// Server URL, ws://HOST:PORT/PATH (loopback only).
    #[arg(long)]
    url: String,
    /// The publishers' server, when not --url: another ringcast host sharing topics through
    /// Redis (`serve --broker redis://...`), for cross-host latency.
    #[arg(long)]
    publish_url: Option<String>,
    /// envelope-json or envelope-bin (the ringcast broker), or raw (a broadcast server).
    #[arg(long, default_value_t = FanoutMode::EnvelopeJson)]
    mode: FanoutMode,
    /// Subscriber connections.
    #[arg(long, default_value_t = 1000)]
    subs: usize,
    /// Topics: subscriber i takes fanout.{i % topics} (1 in raw mode).
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Messages per second in total, on a fixed schedule, round-robin over the topics; latency
    /// counts from each message's due time.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Payload bytes per message: binary, 8 bytes of timestamp first; JSON, [ts,"x..."], at
    /// least 25.
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[command(flatten)]
    window: WindowArgs,
    /// Processes for the subscribers (0: one per 15,000; 1: a thread of this one).
    #[arg(long, default_value_t = 0)]
    procs: usize,
    /// Publisher connections, taking messages in turn.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    #[command(flatten)]
    server: ServerCpuArgs,
    /// Deadline for opening and subscribing every connection, in seconds.
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    open_timeout: Duration,
    /// The subscribers busy-poll their sockets instead of sleeping in epoll_wait, so latency
    /// measures the server rather than the client's wake-ups (costs a core per subscriber
    /// process; the publisher still sleeps until each message is due).
    #[arg(long)]
    spin: bool,
    /// Exit non-zero when more deliveries than this are missing (dropped or lost).
    #[arg(long)]
    max_missing: Option<u64>,
    /// Write the latency spectrum and deliveries over time as SVG plots into this directory.
    #[arg(long)]
    plot_dir: Option<PathBuf>,
    #[command(flatten)]
    sources: SourceArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
struct AbuseArgs {
    /// The broker's URL, ws://HOST:PORT/PATH (loopback only).
    #[arg(long)]
    url: String,
    /// Attacks to run, in order, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sub-flood,publish-new,replay,toggle,half-open,nesting"
    )]
    attacks: Vec<Attack>,
    /// How long each attack lasts, in seconds.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    duration: Duration,
    /// Attacking connections per attack (half-open: see --halfopen-conns).
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Exit non-zero when the live client's worst round trip exceeds this, in seconds.
    #[arg(long, default_value = "0.1", value_parser = parse_secs)]
    max_rtt: Duration,
    /// Half-open: connections in all, half dribbling and half silent (this process holds
    /// them, so stay under its open-files limit).
    #[arg(long, default_value_t = 4000)]
    halfopen_conns: usize,
    /// Half-open: source addresses they come from, 127.0.0.2 onwards.
    #[arg(long, default_value_t = 8)]
    halfopen_sources: u8,
    /// Half-open: a dribbling connection sends one byte of its request this often, in
    /// seconds.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    dribble_every: Duration,
    /// Half-open: a connection the server closed is opened again after this, in seconds.
    #[arg(long, default_value = "0.5", value_parser = parse_secs)]
    reopen_after: Duration,
    /// Replay: entries of the huge subscribe (33 bytes each; 100,000 is 3.3 MB).
    #[arg(long, default_value_t = 100_000)]
    replay_repeats: usize,
    /// Replay: messages of history its topic gets first.
    #[arg(long, default_value_t = 1000)]
    replay_history: usize,
    /// Nesting: depth of the payload's arrays.
    #[arg(long, default_value_t = 100_000)]
    nest_depth: usize,
    /// The server's pid, to report its RSS after each attack.
    #[arg(long)]
    server_pid: Option<u32>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
struct PlotArgs {
    /// Reports of `loadgen compare --json`, as PATH or LABEL=PATH (lines then read
    /// "LABEL: server", to draw runs side by side).
    #[arg(required = true, value_name = "[LABEL=]REPORT")]
    reports: Vec<String>,
    /// Where the SVG files go.
    #[arg(long, default_value = "bench/plots")]
    out: PathBuf,
}

#[derive(Debug, Args)]
struct PartArgs {
    /// The part to run (storm or fanout), as JSON.
    #[arg(long)]
    config: String,
}

#[derive(Debug, Args)]
struct IdleArgs {
    /// Server URL, ws://HOST:PORT/PATH (loopback only).
    #[arg(long)]
    url: String,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 10_000)]
    conns: usize,
    /// Processes to hold them (0: one per 15,000 connections).
    #[arg(long, default_value_t = 0)]
    procs: usize,
    /// Seconds to hold them after measuring.
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    hold: Duration,
    /// The server's pid, whose memory is measured.
    #[arg(long)]
    server_pid: u32,
    /// Plain TCP connections, no upgrade (for peer-raw-echo).
    #[arg(long)]
    raw: bool,
    /// Deadline for opening all connections, in seconds.
    #[arg(long, default_value = "120", value_parser = parse_secs)]
    open_timeout: Duration,
    /// Deadline for the server's RSS to stop changing, in seconds.
    #[arg(long, default_value = "15", value_parser = parse_secs)]
    settle_timeout: Duration,
    #[command(flatten)]
    sources: SourceArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
struct BroadcastArgs {
    /// Server URL, ws://HOST:PORT/PATH (loopback only); it must relay every message to every
    /// client, the sender included.
    #[arg(long)]
    url: String,
    /// Clients (N): a round is N sends and N x N deliveries.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Payload bytes per message (the first 12 carry the round and sender).
    #[arg(long, default_value_t = 20)]
    size: usize,
    #[command(flatten)]
    window: WindowArgs,
    /// At most this many rounds in the window.
    #[arg(long)]
    max_rounds: Option<u64>,
    /// Fail when a round has had no delivery for this many seconds.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    round_timeout: Duration,
    #[command(flatten)]
    server: ServerCpuArgs,
    /// Limit for each connect and for all handshakes together, in seconds.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    connect_timeout: Duration,
    #[command(flatten)]
    sources: SourceArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Servers to run, comma-separated, in order.
    #[arg(long, value_delimiter = ',', default_values_t = SERVER_NAMES.map(String::from))]
    servers: Vec<String>,
    /// The ringcast echo command line; `{port}` is replaced with the port. Split on whitespace.
    #[arg(long, default_value = DEFAULT_RINGCAST_CMD)]
    ringcast_cmd: String,
    /// The ringcast broadcast command line, like --ringcast-cmd. If it exits at start (no
    /// broadcast mode yet), ringcast is skipped for the broadcast scenario.
    #[arg(long, default_value = DEFAULT_RINGCAST_BROADCAST_CMD)]
    ringcast_broadcast_cmd: String,
    /// The ringcast fan-out command line (a broadcast server without the publish limit).
    #[arg(long, default_value = DEFAULT_RINGCAST_FANOUT_CMD)]
    ringcast_fanout_cmd: String,
    /// Another server to compare: NAME=CMD serves every scenario with CMD, NAME@echo=CMD,
    /// NAME@broadcast=CMD or NAME@fanout=CMD one scenario (fan-out falls back to the
    /// broadcast command). CMD is split on whitespace; {port} is replaced with the port to
    /// listen on at 127.0.0.1. Repeat for more peers or scenarios; peers run after --servers.
    #[arg(long = "peer", value_name = "NAME[@SCENARIO]=CMD")]
    peers: Vec<PeerArg>,
    /// Directory of the peer-* binaries (default: beside this executable).
    #[arg(long)]
    peer_dir: Option<PathBuf>,
    /// Directory of the Node peers and their node_modules (`npm ci --prefix DIR`).
    #[arg(long, default_value = DEFAULT_NODE_DIR)]
    node_dir: PathBuf,
    /// Scenarios to run, comma-separated: echo, broadcast, fanout.
    #[arg(long, value_delimiter = ',', default_values_t = CompareScenario::ALL)]
    scenario: Vec<CompareScenario>,
    /// Echo loads, comma-separated CONNSxBYTES (`k` = 1024 bytes).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_ECHO_LOADS)]
    echo_loads: Vec<Load>,
    /// Broadcast loads, comma-separated NxBYTES (N clients).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_BROADCAST_LOADS)]
    broadcast_loads: Vec<Load>,
    /// Fan-out loads, comma-separated SUBSxBYTES@RATE (messages per second, `k` = 1000).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_FANOUT_LOADS)]
    fanout_loads: Vec<Load>,
    /// Fan-out subscribers sleep in epoll_wait instead of busy-polling (`fanout --spin`).
    #[arg(long)]
    no_spin: bool,
    /// Processes for the fan-out subscribers, all on the load core (1: a thread beside the
    /// publisher). A million deliveries a second need more than one.
    #[arg(long, default_value_t = 1)]
    fanout_procs: usize,
    /// One echo load of this many connections instead of --echo-loads (with --size).
    #[arg(long)]
    conns: Option<usize>,
    /// Payload bytes of that one echo load (default 20; with or without --conns).
    #[arg(long)]
    size: Option<usize>,
    #[command(flatten)]
    window: WindowArgs,
    /// Rounds per server (servers alternate within each round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also hold this many idle connections on each server and compare memory.
    #[arg(long)]
    idle: Option<usize>,
    /// Leave the echo scenario out (with --idle and --scenario echo: idle only).
    #[arg(long)]
    skip_echo: bool,
    /// Fail a broadcast run when a round has had no delivery for this many seconds.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    round_timeout: Duration,
    /// First port to try; each server launch takes the next free port.
    #[arg(long, default_value_t = 19_100)]
    base_port: u16,
    /// Core the servers are pinned to.
    #[arg(long, default_value_t = 0)]
    server_core: usize,
    /// Core the load generator is pinned to.
    #[arg(long, default_value_t = 1)]
    load_core: usize,
    /// A round where everything else took more CPU than this (in cores) is run again.
    #[arg(long, default_value_t = 0.25)]
    max_other_cpu: f64,
    /// How often a noisy round is run again before its least noisy try is kept.
    #[arg(long, default_value_t = 2)]
    retries: usize,
    /// The load generator's event loop: epoll (mio) or uring (monoio).
    #[arg(long, default_value_t = Driver::Epoll)]
    driver: Driver,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
struct WorkerArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    first_index: usize,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    raw: bool,
    #[arg(long, value_parser = parse_secs)]
    open_timeout: Duration,
    #[arg(long, value_parser = parse_secs)]
    lifetime: Duration,
    #[command(flatten)]
    sources: SourceArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let progress = !cli.quiet;
    match cli.command {
        Cmd::Echo(a) => {
            let mut cfg = EchoConfig::new(Target::parse(&a.url)?);
            cfg.conns = a.conns;
            cfg.size_bytes = a.size;
            cfg.duration = a.window.duration;
            cfg.warmup = a.window.warmup;
            cfg.raw = a.raw;
            cfg.server_pid = a.server.server_pid;
            cfg.sources = a.sources.sources();
            cfg.connect_timeout = a.connect_timeout;
            cfg.driver = a.driver;
            cfg.rate = a.rate;
            cfg.progress = progress;
            let report = run_echo(&cfg)?;
            a.output.emit(&report, &report.human())?;
            if let Some(dir) = &a.plot_dir {
                for path in plot::echo(&report, dir)? {
                    eprintln!("wrote {}", path.display());
                }
            }
            ensure!(report.messages > 0, "no round trip was measured");
            if let Some(max) = a.max_errors {
                ensure!(
                    report.errors <= max,
                    "{} connections failed, more than the {max} allowed",
                    report.errors
                );
            }
        }
        Cmd::Storm(a) => {
            let mut cfg = StormConfig::new(Target::parse(&a.url)?);
            cfg.scenario = a.scenario;
            cfg.conns = a.conns;
            cfg.procs = a.procs;
            cfg.duration = a.duration;
            cfg.hold = a.hold;
            cfg.reconnect_timeout = a.reconnect_timeout;
            cfg.attempt_timeout = a.attempt_timeout;
            cfg.backoff = Backoff {
                base: a.backoff_base,
                cap: a.backoff_cap,
            };
            cfg.open_timeout = a.open_timeout;
            cfg.raw = a.raw;
            cfg.sources = a.sources.sources();
            cfg.progress = progress;
            let report = run_storm(&cfg)?;
            a.output.emit(&report, &report.human())?;
            if let Some(dir) = &a.plot_dir {
                for path in plot::storm(&report, dir)? {
                    eprintln!("wrote {}", path.display());
                }
            }
            report.check(a.max_failure_pct)?;
        }
        Cmd::Idle(a) => {
            let mut cfg = IdleConfig::new(Target::parse(&a.url)?, a.server_pid);
            cfg.conns = a.conns;
            cfg.procs = a.procs;
            cfg.hold = a.hold;
            cfg.raw = a.raw;
            cfg.sources = a.sources.sources();
            cfg.open_timeout = a.open_timeout;
            cfg.settle_timeout = a.settle_timeout;
            cfg.progress = progress;
            let report = run_idle(&cfg)?;
            a.output.emit(&report, &report.human())?;
        }
        Cmd::Broadcast(a) => {
            let mut cfg = BroadcastConfig::new(Target::parse(&a.url)?);
            cfg.conns = a.conns;
            cfg.size_bytes = a.size;
            cfg.duration = a.window.duration;
            cfg.warmup = a.window.warmup;
            cfg.max_rounds = a.max_rounds;
            cfg.round_timeout = a.round_timeout;
            cfg.server_pid = a.server.server_pid;
            cfg.sources = a.sources.sources();
            cfg.connect_timeout = a.connect_timeout;
            let report = run_broadcast(&cfg)?;
            a.output.emit(&report, &report.human())?;
        }
        Cmd::Fanout(a) => {
            let mut cfg = FanoutConfig::new(Target::parse(&a.url)?);
            cfg.publish_target = a.publish_url.as_deref().map(Target::parse).transpose()?;
            cfg.mode = a.mode;
            cfg.subs = a.subs;
            cfg.topics = a.topics;
            cfg.rate = a.rate;
            cfg.size_bytes = a.size;
            cfg.duration = a.window.duration;
            cfg.warmup = a.window.warmup;
            cfg.procs = a.procs;
            cfg.publishers = a.publishers;
            cfg.server_pid = a.server.server_pid;
            cfg.sources = a.sources.sources();
            cfg.open_timeout = a.open_timeout;
            cfg.progress = progress;
            cfg.spin = a.spin;
            let report = run_fanout(&cfg)?;
            a.output.emit(&report, &report.human())?;
            if let Some(dir) = &a.plot_dir {
                for path in fanout::plot(&report, dir)? {
                    eprintln!("wrote {}", path.display());
                }
            }
            report.check(a.max_missing)?;
        }
        Cmd::Abuse(a) => {
            let mut cfg = AbuseConfig::new(Target::parse(&a.url)?);
            cfg.attacks = a.attacks;
            cfg.duration = a.duration;
            cfg.connections = a.connections;
            cfg.max_rtt = a.max_rtt;
            cfg.halfopen_conns = a.halfopen_conns;
            cfg.halfopen_sources = a.halfopen_sources;
            cfg.dribble_every = a.dribble_every;
            cfg.reopen_after = a.reopen_after;
            cfg.replay_repeats = a.replay_repeats;
            cfg.replay_history = a.replay_history;
            cfg.nest_depth = a.nest_depth;
            cfg.server_pid = a.server_pid;
            let report = run_abuse(&cfg)?;
            a.output.emit(&report, &report.human())?;
            report.check()?;
        }
        Cmd::Compare(a) => {
            let peer_dir = match a.peer_dir {
                Some(dir) => dir,
                None => std::env::current_exe()?
                    .parent()
                    .context("this executable has no directory")?
                    .to_owned(),
            };
            let mut cfg = CompareConfig::new(peer_dir);
            cfg.servers = a.servers;
            cfg.ringcast_cmd = a.ringcast_cmd;
            cfg.ringcast_broadcast_cmd = a.ringcast_broadcast_cmd;
            cfg.ringcast_fanout_cmd = a.ringcast_fanout_cmd;
            for peer in a.peers {
                Peer::add(&mut cfg.peers, peer)?;
            }
            cfg.fanout_loads = a.fanout_loads;
            cfg.spin = !a.no_spin;
            cfg.fanout_procs = a.fanout_procs;
            cfg.node_dir = a.node_dir;
            cfg.scenarios = a.scenario;
            if a.skip_echo {
                cfg.scenarios.retain(|&s| s != CompareScenario::Echo);
            }
            cfg.echo_loads = match (a.conns, a.size) {
                (None, None) => a.echo_loads,
                (conns, size) => vec![Load::new(conns.unwrap_or(100), size.unwrap_or(20))],
            };
            cfg.broadcast_loads = a.broadcast_loads;
            cfg.round_timeout = a.round_timeout;
            cfg.duration = a.window.duration;
            cfg.warmup = a.window.warmup;
            cfg.rounds = a.rounds;
            cfg.idle_conns = a.idle;
            cfg.base_port = a.base_port;
            cfg.server_core = a.server_core;
            cfg.load_core = a.load_core;
            cfg.max_other_cpu = a.max_other_cpu;
            cfg.retries = a.retries;
            cfg.driver = a.driver;
            let report = run_compare(&cfg)?;
            a.output.emit(&report, &report.human())?;
        }
        Cmd::PlotLatency(a) => {
            let reports = a
                .reports
                .iter()
                .map(|r| LabeledReport::read(r))
                .collect::<Result<Vec<_>>>()?;
            for path in plot_compare(&reports, &a.out)? {
                println!("wrote {}", path.display());
            }
        }
        Cmd::IdleWorker(a) => {
            let cfg = WorkerConfig {
                target: Target::parse(&a.url)?,
                range: a.first_index..a.first_index.saturating_add(a.count),
                raw: a.raw,
                sources: a.sources.sources(),
                open_timeout: a.open_timeout,
                lifetime: a.lifetime,
            };
            idle_worker(&cfg)?;
        }
        Cmd::StormWorker(a) => {
            let part: PartConfig =
                serde_json::from_str(&a.config).context("parsing the storm worker's config")?;
            storm_worker(&part)?;
        }
        Cmd::FanoutWorker(a) => {
            let part: SubscriberPart =
                serde_json::from_str(&a.config).context("parsing the fanout worker's config")?;
            fanout_worker(&part)?;
        }
    }
    Ok(())
}
