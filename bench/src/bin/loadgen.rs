//! `loadgen`: the benchmark load generator. A thin CLI over `ringcast_bench`; see the crate
//! docs for what each subcommand measures.
//!
//! Loopback only, and every loop is bounded in count and time.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use ringcast_bench::{
    compare::{run_compare, CompareConfig, DEFAULT_RINGCAST_CMD, SERVER_NAMES},
    echo::{run_echo, Driver, EchoConfig},
    idle::{idle_worker, run_idle, IdleConfig, WorkerConfig},
    net::{SourceAddrs, Target},
    parse_secs,
};

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    version,
    about = "Load generator for ringcast and its peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Closed-loop echo: each connection sends one message, waits for the echo, repeats.
    Echo(EchoArgs),
    /// Open and hold idle connections; report the server's memory per connection.
    Idle(IdleArgs),
    /// Run the echo (and idle) scenario against each server, pinned, in alternating rounds.
    Compare(CompareArgs),
    /// Holds a slice of `idle`'s connections in a child process.
    #[command(hide = true)]
    IdleWorker(WorkerArgs),
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
    /// Measured window, in seconds.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    duration: Duration,
    /// Unmeasured load before the window, in seconds.
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
    /// Send SIZE raw bytes and wait for SIZE bytes back (no WebSocket), for peer-raw-echo.
    #[arg(long)]
    raw: bool,
    /// The server's pid, to report its CPU time per message.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Limit for each connect and for all handshakes together, in seconds.
    #[arg(long, default_value = "10", value_parser = parse_secs)]
    connect_timeout: Duration,
    /// The client's event loop: epoll (mio) or uring (monoio).
    #[arg(long, default_value_t = Driver::Epoll)]
    driver: Driver,
    #[command(flatten)]
    sources: SourceArgs,
    /// Print the report as JSON instead of a line of text.
    #[arg(long)]
    json: bool,
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
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// Servers to run, comma-separated, in order.
    #[arg(long, value_delimiter = ',', default_values_t = SERVER_NAMES.map(String::from))]
    servers: Vec<String>,
    /// The ringcast command line; `{port}` is replaced with the port. Split on whitespace.
    #[arg(long, default_value = DEFAULT_RINGCAST_CMD)]
    ringcast_cmd: String,
    /// Directory of the peer-* binaries (default: beside this executable).
    #[arg(long)]
    peer_dir: Option<PathBuf>,
    /// Connections in the echo scenario.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 20)]
    size: usize,
    /// Measured window per round, in seconds.
    #[arg(long, default_value = "5", value_parser = parse_secs)]
    duration: Duration,
    /// Unmeasured load before each window, in seconds.
    #[arg(long, default_value = "1", value_parser = parse_secs)]
    warmup: Duration,
    /// Rounds per server (servers alternate within each round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also hold this many idle connections on each server and compare memory.
    #[arg(long)]
    idle: Option<usize>,
    /// Skip the echo rounds (with --idle: idle only).
    #[arg(long)]
    skip_echo: bool,
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
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
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
    match Cli::parse().command {
        Cmd::Echo(a) => {
            let mut cfg = EchoConfig::new(Target::parse(&a.url)?);
            cfg.conns = a.conns;
            cfg.size_bytes = a.size;
            cfg.duration = a.duration;
            cfg.warmup = a.warmup;
            cfg.raw = a.raw;
            cfg.server_pid = a.server_pid;
            cfg.sources = a.sources.sources();
            cfg.connect_timeout = a.connect_timeout;
            cfg.driver = a.driver;
            let report = run_echo(&cfg)?;
            emit(a.json, &report, report.human())?;
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
            let report = run_idle(&cfg)?;
            emit(a.json, &report, report.human())?;
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
            cfg.conns = a.conns;
            cfg.size_bytes = a.size;
            cfg.duration = a.duration;
            cfg.warmup = a.warmup;
            cfg.rounds = a.rounds;
            cfg.idle_conns = a.idle;
            cfg.skip_echo = a.skip_echo;
            cfg.base_port = a.base_port;
            cfg.server_core = a.server_core;
            cfg.load_core = a.load_core;
            cfg.max_other_cpu = a.max_other_cpu;
            cfg.retries = a.retries;
            cfg.driver = a.driver;
            let report = run_compare(&cfg)?;
            emit(a.json, &report, report.human())?;
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
    }
    Ok(())
}

/// Prints a report: JSON for tools, or its human-readable text.
fn emit(json: bool, report: &impl serde::Serialize, human: String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!("{}", human.trim_end());
    }
    Ok(())
}
