//! Runs the same scenarios against several servers, each pinned to one core and the load to
//! another, alternating servers round by round (A B A B ...) so slow drifts in a noisy machine
//! hit every server alike.
//!
//! The matrix is a list of scenarios, each with its loads ([`Load`], connections x payload):
//! - [`Scenario::Echo`]: the closed-loop echo ([`crate::echo`]); by default 100 x 20 B,
//!   1000 x 20 B and 100 x 1 KiB ([`DEFAULT_ECHO_LOADS`]).
//! - [`Scenario::Broadcast`]: the lockstep all-to-all rounds ([`crate::broadcast`]); by default
//!   N = 100 and N = 1000 with 20 B messages ([`DEFAULT_BROADCAST_LOADS`]).
//! - [`Scenario::Fanout`]: the fixed-rate fan-out in raw mode ([`crate::fanout`]) against each
//!   server's broadcast command: one publisher, N subscribers, publish-to-receive latency
//!   corrected for coordinated omission; by default 10 and 100 subscribers at 1,000 and 10,000
//!   msg/s of 64 B ([`DEFAULT_FANOUT_LOADS`]), the subscribers busy-polling with
//!   [`CompareConfig::spin`].
//!
//! plus, once per server, the idle scenario if asked for. Not every server has a peer for
//! every scenario (fastwebsockets and raw-echo have no broadcast server); those are reported
//! as skipped. ringcast's broadcast command is configurable; while ringcast has no broadcast
//! mode, the command exits at start and ringcast is skipped for the broadcast scenario with
//! its output as the reason. The Node `ws` servers (`node-ws`, from `bench/node`) run when
//! `node` is on `PATH` and `bench/node/node_modules` exists.
//!
//! External peers come from the command line ([`Peer`], `--peer NAME=CMD`, or
//! `NAME@SCENARIO=CMD` for a peer that serves one scenario with that command): anyone can put
//! their own build of another server (uWebSockets, say) beside ringcast without this crate
//! knowing it. A peer's fan-out command is its broadcast command unless given.
//!
//! Each round starts a fresh server (`taskset -c SERVER_CORE`), waits (bounded) for its port,
//! runs this binary's `echo` or `broadcast` subcommand (or `idle`) pinned with
//! `taskset -c LOAD_CORE`, reads its JSON report, and kills the server. Each launch gets a port
//! of its own, so a server killed in one round cannot answer for the next. Each figure is
//! reported as the median over the rounds with their minimum and maximum, and as the median's
//! ratio to ringcast's.

use std::{
    fmt,
    fs::File,
    io::Read as _,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    str::FromStr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{
    broadcast::BroadcastReport,
    echo::{Driver, EchoReport},
    fanout::FanoutReport,
    idle::IdleReport,
    stats::{median, LatencySummary},
};

/// The ringcast echo command when none is given: `{port}` is replaced with the port to listen
/// on.
pub const DEFAULT_RINGCAST_CMD: &str =
    "target/release/ringcast serve --echo --shards 1 --listen 127.0.0.1:{port}";

/// The ringcast broadcast command when none is given. ringcast has no broadcast mode yet, so
/// this exits at start and ringcast is skipped for the broadcast scenario.
pub const DEFAULT_RINGCAST_BROADCAST_CMD: &str =
    "target/release/ringcast serve --broadcast --shards 1 --listen 127.0.0.1:{port}";

/// The ringcast command for the fan-out scenario when none is given: the broadcast server with
/// the per-connection publish limit lifted (`bench/ringcast-fanout.toml`, relative to the
/// workspace root, where compare is meant to be run).
pub const DEFAULT_RINGCAST_FANOUT_CMD: &str =
    "target/release/ringcast serve --broadcast --shards 1 \
     -c bench/ringcast-fanout.toml --listen 127.0.0.1:{port}";

/// The servers [`run_compare`] knows, in the order it runs them.
pub const SERVER_NAMES: [&str; 5] = [
    "ringcast",
    "fastwebsockets",
    "tokio-tungstenite",
    "node-ws",
    "raw-echo",
];

/// Where the Node peers (`echo.js`, `broadcast.js`, `node_modules`) are when not told: this
/// crate's `node` directory, as it was when this binary was built.
pub const DEFAULT_NODE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/node");

/// The echo loads compare runs when not told: 100 x 20 B, 1000 x 20 B, 100 x 1 KiB.
pub const DEFAULT_ECHO_LOADS: [Load; 3] = [
    Load::new(100, 20),
    Load::new(1000, 20),
    Load::new(100, 1024),
];

/// The broadcast loads compare runs when not told: N = 100 and N = 1000, 20 B messages.
pub const DEFAULT_BROADCAST_LOADS: [Load; 2] = [Load::new(100, 20), Load::new(1000, 20)];

/// The fan-out loads compare runs when not told: 10 and 100 subscribers at 1,000 and 10,000
/// msg/s of 64 B.
pub const DEFAULT_FANOUT_LOADS: [Load; 4] = [
    Load::new(10, 64).at_rate(1000),
    Load::new(10, 64).at_rate(10_000),
    Load::new(100, 64).at_rate(1000),
    Load::new(100, 64).at_rate(10_000),
];

/// The publish rate of a fan-out load written without `@RATE`.
pub const DEFAULT_FANOUT_RATE: u64 = 1000;

/// How long a started server gets to accept on its port.
const PORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between the port accepting and the load starting, so start-up work is done.
const STARTUP_PAUSE: Duration = Duration::from_millis(300);

/// A kind of load in the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Closed-loop echo; the unit of work is a round trip.
    Echo,
    /// Lockstep all-to-all rounds; the unit of work is a delivery.
    Broadcast,
    /// Fixed-rate fan-out through a broadcast server; the unit of work is a delivery.
    Fanout,
}

impl Scenario {
    /// Every scenario, in the order compare runs them.
    pub const ALL: [Self; 3] = [Self::Echo, Self::Broadcast, Self::Fanout];

    /// What one unit of work is called in reports.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Echo => "msg",
            Self::Broadcast | Self::Fanout => "delivery",
        }
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "echo" => Ok(Self::Echo),
            "broadcast" => Ok(Self::Broadcast),
            "fanout" => Ok(Self::Fanout),
            other => Err(format!(
                "unknown scenario {other:?}: echo, broadcast or fanout"
            )),
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Echo => "echo",
            Self::Broadcast => "broadcast",
            Self::Fanout => "fanout",
        })
    }
}

/// One load of a scenario: connections (for broadcast, the clients N; for fan-out, the
/// subscribers), payload bytes per message and, for fan-out, the publish rate.
///
/// Written `CONNSxBYTES` (`100x20`, `100x1k`: `k` or `KiB` is 1024 bytes) or just `CONNS`
/// (20 bytes), then `@RATE` for fan-out (`10x64@10k`: messages per second, `k` is 1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Connections.
    pub conns: usize,
    /// Payload bytes per message.
    pub size_bytes: usize,
    /// Messages per second (fan-out only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_sec: Option<u64>,
}

impl Load {
    /// `conns` connections with `size_bytes` messages.
    pub const fn new(conns: usize, size_bytes: usize) -> Self {
        Self {
            conns,
            size_bytes,
            rate_per_sec: None,
        }
    }

    /// This load published at `rate_per_sec` messages per second (fan-out).
    pub const fn at_rate(self, rate_per_sec: u64) -> Self {
        Self {
            rate_per_sec: Some(rate_per_sec),
            ..self
        }
    }
}

impl FromStr for Load {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (s, rate) = match s.split_once('@') {
            Some((load, rate)) => (load, Some(rate.trim())),
            None => (s, None),
        };
        let rate_per_sec = rate
            .map(|r| {
                let (digits, unit) = match r.strip_suffix(['k', 'K']) {
                    Some(d) => (d, 1000),
                    None => (r, 1),
                };
                digits
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .and_then(|n| n.checked_mul(unit))
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("{s:?}: bad rate {r:?} (messages per second)"))
            })
            .transpose()?;
        let (conns, size) = s.split_once(['x', 'X']).unwrap_or((s, "20"));
        let conns: usize = conns
            .trim()
            .parse()
            .map_err(|e| format!("{s:?}: connections: {e}"))?;
        let size = size.trim();
        let (digits, unit) = match size
            .strip_suffix("KiB")
            .or_else(|| size.strip_suffix(['k', 'K']))
        {
            Some(d) => (d, 1024),
            None => (size, 1),
        };
        let size_bytes = digits
            .trim()
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_mul(unit))
            .ok_or_else(|| format!("{s:?}: bad payload size {size:?}"))?;
        if conns == 0 {
            return Err(format!("{s:?}: at least 1 connection"));
        }
        Ok(Self {
            conns,
            size_bytes,
            rate_per_sec,
        })
    }
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.conns, self.size_bytes)?;
        match self.rate_per_sec {
            Some(rate) => write!(f, "@{rate}"),
            None => Ok(()),
        }
    }
}

/// A server given on the command line: a name and the command that serves each scenario
/// (`{port}` in it is replaced with the port to listen on, on 127.0.0.1). A scenario without a
/// command is skipped for this peer; fan-out falls back to the broadcast command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peer {
    /// The name in the tables.
    pub name: String,
    /// The echo server's command line.
    pub echo: Option<String>,
    /// The all-to-all broadcast server's command line.
    pub broadcast: Option<String>,
    /// The fan-out server's command line (by default, `broadcast`).
    pub fanout: Option<String>,
}

impl Peer {
    /// The command line for `scenario`, if this peer serves it.
    pub fn command(&self, scenario: Scenario) -> Option<&str> {
        match scenario {
            Scenario::Echo => self.echo.as_deref(),
            Scenario::Broadcast => self.broadcast.as_deref(),
            Scenario::Fanout => self.fanout.as_deref().or(self.broadcast.as_deref()),
        }
    }

    /// Adds `arg` to the peers: a new peer, or another scenario's command for a peer named
    /// before.
    ///
    /// # Errors
    /// The name is one of [`SERVER_NAMES`], or the command has no `{port}`.
    pub fn add(peers: &mut Vec<Self>, arg: PeerArg) -> Result<()> {
        ensure!(
            !SERVER_NAMES.contains(&arg.name.as_str()),
            "--peer {}: that name is a built-in server; pick another",
            arg.name
        );
        ensure!(
            arg.cmd.contains("{port}"),
            "--peer {}: the command must say where to listen with {{port}}: {:?}",
            arg.name,
            arg.cmd
        );
        let i = match peers.iter().position(|p| p.name == arg.name) {
            Some(i) => i,
            None => {
                peers.push(Self {
                    name: arg.name.clone(),
                    ..Self::default()
                });
                peers.len() - 1
            }
        };
        let peer = &mut peers[i];
        let cmd = Some(arg.cmd);
        match arg.scenario {
            None => {
                peer.echo.clone_from(&cmd);
                peer.broadcast.clone_from(&cmd);
                peer.fanout = cmd;
            }
            Some(Scenario::Echo) => peer.echo = cmd,
            Some(Scenario::Broadcast) => peer.broadcast = cmd,
            Some(Scenario::Fanout) => peer.fanout = cmd,
        }
        Ok(())
    }
}

/// One `--peer` argument: `NAME=CMD` (every scenario) or `NAME@SCENARIO=CMD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerArg {
    /// The peer's name.
    pub name: String,
    /// The scenario the command serves, or `None` for all.
    pub scenario: Option<Scenario>,
    /// The command line, split on whitespace at launch.
    pub cmd: String,
}

impl FromStr for PeerArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (head, cmd) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=CMD or NAME@SCENARIO=CMD"))?;
        let (name, scenario) = match head.split_once('@') {
            Some((name, scenario)) => (name, Some(scenario.trim().parse::<Scenario>()?)),
            None => (head, None),
        };
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(format!("{s:?}: the peer needs a name without spaces"));
        }
        if cmd.trim().is_empty() {
            return Err(format!("{s:?}: empty command"));
        }
        Ok(Self {
            name: name.to_owned(),
            scenario,
            cmd: cmd.trim().to_owned(),
        })
    }
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Server names, from [`SERVER_NAMES`].
    pub servers: Vec<String>,
    /// The ringcast echo command line, split on whitespace, with `{port}` replaced.
    pub ringcast_cmd: String,
    /// The ringcast broadcast command line, like `ringcast_cmd`. If it exits before accepting,
    /// ringcast is skipped for the broadcast scenario.
    pub ringcast_broadcast_cmd: String,
    /// The ringcast fan-out command line, like `ringcast_broadcast_cmd`.
    pub ringcast_fanout_cmd: String,
    /// Servers from the command line, run after the built-in ones in `servers`.
    pub peers: Vec<Peer>,
    /// Where the `peer-*` binaries are (by default, beside this executable).
    pub peer_dir: PathBuf,
    /// Where the Node peers are ([`DEFAULT_NODE_DIR`]).
    pub node_dir: PathBuf,
    /// Scenarios to run, in order.
    pub scenarios: Vec<Scenario>,
    /// Loads of the echo scenario.
    pub echo_loads: Vec<Load>,
    /// Loads of the broadcast scenario.
    pub broadcast_loads: Vec<Load>,
    /// Loads of the fan-out scenario (subscribers x bytes @ rate).
    pub fanout_loads: Vec<Load>,
    /// The fan-out subscribers busy-poll their sockets (`loadgen fanout --spin`).
    pub spin: bool,
    /// Processes for the fan-out subscribers (`loadgen fanout --procs`), all on the load
    /// core; 1 runs them on a thread beside the publisher. With `spin` each one spins.
    pub fanout_procs: usize,
    /// Measured window per round.
    pub duration: Duration,
    /// Unmeasured load before each window.
    pub warmup: Duration,
    /// A broadcast round with no delivery for this long fails that run.
    pub round_timeout: Duration,
    /// Rounds per server and load.
    pub rounds: usize,
    /// Also run the idle scenario with this many connections (once per server).
    pub idle_conns: Option<usize>,
    /// First port to try; each launch takes the next free one.
    pub base_port: u16,
    /// The core the servers are pinned to.
    pub server_core: usize,
    /// The core the load generator is pinned to.
    pub load_core: usize,
    /// A round in which everything else used more than this much CPU (in cores; see
    /// [`crate::CpuReport::other_util`]) is noisy and is run again.
    pub max_other_cpu: f64,
    /// How many times a noisy round is run again before its least noisy try is kept.
    pub retries: usize,
    /// The echo load generator's event loop.
    pub driver: Driver,
}

impl CompareConfig {
    /// The defaults: all built-in servers, every scenario with its default loads, spinning
    /// fan-out subscribers, 1 s warmup, 5 s window, 3 rounds, servers on core 0 and load on
    /// core 1.
    pub fn new(peer_dir: PathBuf) -> Self {
        Self {
            servers: SERVER_NAMES.iter().map(|s| (*s).to_owned()).collect(),
            ringcast_cmd: DEFAULT_RINGCAST_CMD.to_owned(),
            ringcast_broadcast_cmd: DEFAULT_RINGCAST_BROADCAST_CMD.to_owned(),
            ringcast_fanout_cmd: DEFAULT_RINGCAST_FANOUT_CMD.to_owned(),
            peers: Vec::new(),
            peer_dir,
            node_dir: PathBuf::from(DEFAULT_NODE_DIR),
            scenarios: Scenario::ALL.to_vec(),
            echo_loads: DEFAULT_ECHO_LOADS.to_vec(),
            broadcast_loads: DEFAULT_BROADCAST_LOADS.to_vec(),
            fanout_loads: DEFAULT_FANOUT_LOADS.to_vec(),
            spin: true,
            fanout_procs: 1,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            round_timeout: Duration::from_secs(10),
            rounds: 3,
            idle_conns: None,
            base_port: 19_100,
            server_core: 0,
            load_core: 1,
            max_other_cpu: 0.25,
            retries: 2,
            driver: Driver::default(),
        }
    }

    fn loads(&self, scenario: Scenario) -> &[Load] {
        match scenario {
            Scenario::Echo => &self.echo_loads,
            Scenario::Broadcast => &self.broadcast_loads,
            Scenario::Fanout => &self.fanout_loads,
        }
    }

    /// Every server to run: the built-in ones, then the peers not already listed.
    pub fn all_servers(&self) -> Vec<String> {
        let mut all = self.servers.clone();
        for p in &self.peers {
            if !all.contains(&p.name) {
                all.push(p.name.clone());
            }
        }
        all
    }
}

/// A figure over the rounds: median, minimum and maximum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

impl Figure {
    /// The figure of `values` (NaNs left out); `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Self> {
        let median = median(values)?;
        let finite = || values.iter().copied().filter(|v| !v.is_nan());
        Some(Self {
            median,
            min: finite().fold(f64::INFINITY, f64::min),
            max: finite().fold(f64::NEG_INFINITY, f64::max),
        })
    }
}

/// One round's report, from the scenario's load generator.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum RoundReport {
    /// From `loadgen echo` (boxed: the echo report is much larger than the broadcast one).
    Echo(Box<EchoReport>),
    /// From `loadgen broadcast`.
    Broadcast(BroadcastReport),
    /// From `loadgen fanout --mode raw` (boxed, like echo).
    Fanout(Box<FanoutReport>),
}

impl RoundReport {
    fn human(&self) -> String {
        match self {
            Self::Echo(r) => r.human(),
            Self::Broadcast(r) => r.human(),
            Self::Fanout(r) => r.human(),
        }
    }

    /// Messages (echo) or deliveries (broadcast) per second.
    fn rate(&self) -> f64 {
        match self {
            Self::Echo(r) => r.msgs_per_sec,
            Self::Broadcast(r) => r.deliveries_per_sec,
            Self::Fanout(r) => r.deliveries_per_sec,
        }
    }

    /// Server CPU microseconds per unit of work.
    fn cpu_us(&self) -> Option<f64> {
        match self {
            Self::Echo(r) => r.server_cpu_us_per_msg,
            Self::Broadcast(r) => r.server_cpu_us_per_delivery,
            Self::Fanout(r) => r.server_cpu_us_per_delivery,
        }
    }

    /// Round-trip (echo), round (broadcast) or publish-to-receive (fan-out) latency
    /// percentiles, in microseconds.
    fn latency(&self) -> &LatencySummary {
        match self {
            Self::Echo(r) => &r.latency,
            Self::Broadcast(r) => &r.round_latency,
            Self::Fanout(r) => &r.latency,
        }
    }

    fn other_cpu(&self) -> Option<f64> {
        match self {
            Self::Echo(r) => r.cpu.other_util,
            Self::Broadcast(r) => r.cpu.other_util,
            Self::Fanout(r) => r.cpu.other_util,
        }
    }
}

/// One server's results for one load of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ServerResult {
    /// The server's name.
    pub name: String,
    /// Why it was not run, if it was not.
    pub skipped: Option<String>,
    /// Each successful round.
    pub rounds: Vec<RoundReport>,
    /// Errors from rounds that failed.
    pub failures: Vec<String>,
    /// Tries thrown away as noisy (too much other CPU), then run again.
    pub noisy_retries: usize,
    /// Rounds kept although every try was noisy.
    pub noisy_rounds: usize,
    /// Messages (echo) or deliveries (broadcast) per second.
    pub rate: Option<Figure>,
    /// Server CPU microseconds per message (echo) or delivery (broadcast).
    pub cpu_us: Option<Figure>,
    /// The rounds' p50 latency (echo: round trip; broadcast: round), in microseconds.
    pub p50_us: Option<Figure>,
    /// The rounds' p99 latency, in microseconds.
    pub p99_us: Option<Figure>,
    /// The rounds' p99.9 latency, in microseconds.
    pub p999_us: Option<Figure>,
    /// The rounds' largest latency, in microseconds.
    pub max_us: Option<Figure>,
    /// CPU (in cores) used by everything else during the rounds.
    pub other_cpu: Option<Figure>,
    /// Median rate divided by ringcast's.
    pub rate_vs_ringcast: Option<f64>,
    /// Median CPU per unit of work divided by ringcast's.
    pub cpu_vs_ringcast: Option<f64>,
}

impl ServerResult {
    fn new(name: &str, skipped: Option<String>) -> Self {
        Self {
            name: name.to_owned(),
            skipped,
            rounds: Vec::new(),
            failures: Vec::new(),
            noisy_retries: 0,
            noisy_rounds: 0,
            rate: None,
            cpu_us: None,
            p50_us: None,
            p99_us: None,
            p999_us: None,
            max_us: None,
            other_cpu: None,
            rate_vs_ringcast: None,
            cpu_vs_ringcast: None,
        }
    }
}

/// The results of one load of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// The scenario.
    pub scenario: Scenario,
    /// Connections (broadcast: clients) and payload size.
    pub load: Load,
    /// What one unit of work is: `"msg"` (a round trip) or `"delivery"`.
    pub unit: String,
    /// Fan-out: the subscribers busy-polled their sockets.
    pub spin: bool,
    /// Per server, in run order.
    pub servers: Vec<ServerResult>,
}

/// One server's idle run.
#[derive(Debug, Clone, Serialize)]
pub struct IdleResult {
    /// The server's name.
    pub name: String,
    /// The report, if the run succeeded.
    pub report: Option<IdleReport>,
    /// Why it was not run, or how it failed.
    pub failure: Option<String>,
    /// RSS per idle connection divided by ringcast's.
    pub rss_vs_ringcast: Option<f64>,
}

/// Everything [`run_compare`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// Measured window per round, in seconds.
    pub duration_secs: f64,
    /// Rounds per server and load.
    pub rounds: usize,
    /// Per scenario and load, in run order.
    pub scenarios: Vec<ScenarioResult>,
    /// Connections in the idle scenario, if it ran.
    pub idle_conns: Option<usize>,
    /// Per server, if the idle scenario ran.
    pub idle: Vec<IdleResult>,
}

impl CompareReport {
    /// Tables for people: one per scenario and load, then idle.
    pub fn human(&self) -> String {
        let mut out = String::new();
        for s in &self.scenarios {
            out += &scenario_table(s, self.duration_secs, self.rounds);
            out.push('\n');
        }
        if self
            .idle
            .iter()
            .any(|i| i.report.is_some() || i.failure.is_some())
        {
            out += &format!(
                "idle, {} conns:\n{:<18} {:>8} {:>12} {:>12} {:>14} {:>9}\n",
                self.idle_conns.unwrap_or(0),
                "server",
                "open",
                "RSS B/conn",
                "anon B/conn",
                "kernel B/conn",
                "x RSS"
            );
            for i in &self.idle {
                match (&i.report, &i.failure) {
                    (Some(r), _) => {
                        out += &format!(
                            "{:<18} {:>8} {:>12.0} {:>12.0} {:>14.0} {:>9}\n",
                            i.name,
                            r.opened,
                            r.rss_bytes_per_conn,
                            r.rss_anon_bytes_per_conn,
                            r.kernel_slab_objects_bytes_per_conn
                                .unwrap_or(r.kernel_unreclaimable_bytes_per_conn),
                            opt(i.rss_vs_ringcast, 2)
                        );
                    }
                    (None, Some(why)) => out += &format!("{:<18} {why}\n", i.name),
                    (None, None) => {}
                }
            }
            out += "(kernel: slab objects in use, or SUnreclaim without /proc/slabinfo; both \
                    ends of each loopback connection)\n\n";
        }
        out += "Figures: median (min-max) over the rounds. x rate, x cpu, x RSS: the server's \
                median divided by ringcast's. other%: median CPU that went to anything but the \
                server and the load (noise).\n";
        out
    }
}

fn scenario_table(s: &ScenarioResult, duration_secs: f64, rounds: usize) -> String {
    let (title, rate, latency, latency_text): (_, _, _, fn(f64) -> String) = match s.scenario {
        Scenario::Echo => (
            format!("echo: {} conns x {} B", s.load.conns, s.load.size_bytes),
            "msgs/s",
            "rtt p50 us",
            latency_text,
        ),
        Scenario::Broadcast => (
            format!(
                "broadcast: {} clients x {} B ({} deliveries a round)",
                s.load.conns,
                s.load.size_bytes,
                s.load.conns.saturating_mul(s.load.conns)
            ),
            "deliveries/s",
            "round p50 ms",
            latency_ms_text,
        ),
        Scenario::Fanout => (
            format!(
                "fan-out (raw{}): {} subscribers x {} B at {} msg/s, latency from each \
                 message's due time",
                if s.spin { ", spinning client" } else { "" },
                s.load.conns,
                s.load.size_bytes,
                s.load.rate_per_sec.unwrap_or(DEFAULT_FANOUT_RATE)
            ),
            "deliveries/s",
            "p50 us",
            latency_text,
        ),
    };
    let tail = s.scenario == Scenario::Fanout;
    let mut out = format!(
        "{title}, {duration_secs:.1} s window, {rounds} rounds\n{:<18} {:>24} {:>22} {:>22} \
         {:>22} {:>7} {:>7} {:>7}\n",
        "server",
        rate,
        format!("cpu us/{}", s.unit),
        latency,
        latency.replace("p50", "p99"),
        "x rate",
        "x cpu",
        "other%"
    );
    if tail {
        out.insert_str(
            out.len() - 1,
            &format!(" {:>22} {:>22}", "p99.9 us", "max us"),
        );
    }
    let ringcast_measured = s
        .servers
        .iter()
        .any(|r| r.name == "ringcast" && r.rate.is_some());
    for r in &s.servers {
        if let Some(why) = &r.skipped {
            out += &format!("{:<18} skipped: {why}\n", r.name);
            continue;
        }
        let mut notes = Vec::new();
        if !r.failures.is_empty() {
            notes.push(format!("{} failed: {}", r.failures.len(), r.failures[0]));
        }
        if r.noisy_rounds > 0 {
            notes.push(format!("{} noisy rounds kept", r.noisy_rounds));
        }
        out += &format!(
            "{:<18} {:>24} {:>22} {:>22} {:>22} {:>7} {:>7} {:>7}{}{}\n",
            r.name,
            figure(r.rate.as_ref(), rate_text),
            figure(r.cpu_us.as_ref(), cpu_text),
            figure(r.p50_us.as_ref(), latency_text),
            figure(r.p99_us.as_ref(), latency_text),
            opt(r.rate_vs_ringcast, 2),
            opt(r.cpu_vs_ringcast, 2),
            opt(r.other_cpu.map(|o| o.median * 100.0), 0),
            if tail {
                format!(
                    " {:>22} {:>22}",
                    figure(r.p999_us.as_ref(), latency_text),
                    figure(r.max_us.as_ref(), latency_text)
                )
            } else {
                String::new()
            },
            if notes.is_empty() {
                String::new()
            } else {
                format!("  ({})", notes.join("; "))
            }
        );
    }
    if !ringcast_measured {
        out += "(no ringcast figures in this table, so no ratios)\n";
    }
    out
}

fn opt(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(v) => format!("{v:.prec$}"),
        None => "-".to_owned(),
    }
}

/// `median (min-max)`, or just the median when every round gave the same value.
fn figure(f: Option<&Figure>, text: fn(f64) -> String) -> String {
    match f {
        None => "-".to_owned(),
        Some(f) if f.min == f.max => text(f.median),
        Some(f) => format!("{} ({}-{})", text(f.median), text(f.min), text(f.max)),
    }
}

/// A rate with a k or M suffix and four significant digits or so.
fn rate_text(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.3}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// CPU microseconds: three decimals below 1 us (a broadcast delivery), two above.
fn cpu_text(v: f64) -> String {
    if v < 1.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.2}")
    }
}

/// Latency microseconds: one decimal below 10 ms.
fn latency_text(v: f64) -> String {
    if v < 10_000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// Latency microseconds shown as milliseconds, for broadcast rounds: two decimals below
/// 10 ms, one above.
fn latency_ms_text(v: f64) -> String {
    let ms = v / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.1}")
    }
}

/// How to start one server for one scenario.
#[derive(Debug, Clone)]
struct ServerSpec {
    name: String,
    /// Command line; `{port}` is replaced at launch.
    argv: Vec<String>,
    /// Whether it speaks raw TCP rather than WebSocket.
    raw: bool,
}

impl ServerSpec {
    fn argv(&self, port: u16) -> Vec<String> {
        self.argv
            .iter()
            .map(|a| a.replace("{port}", &port.to_string()))
            .collect()
    }
}

/// A server's spec for `scenario`, or why it cannot run there.
type Prepared = Result<ServerSpec, String>;

/// Runs the comparison; see the module docs. A server whose binary is missing, or that has no
/// peer for a scenario, is skipped with the reason in its result; a round that fails is
/// recorded and the others go on.
///
/// # Errors
/// An unknown server name, nothing to run, or `taskset` or this executable cannot be found.
pub fn run_compare(cfg: &CompareConfig) -> Result<CompareReport> {
    let exe = std::env::current_exe().context("finding this executable")?;
    if find_program("taskset").is_none() {
        bail!("taskset (util-linux) is needed to pin the server and the load");
    }
    ensure!(
        cfg.scenarios.iter().any(|&s| !cfg.loads(s).is_empty()) || cfg.idle_conns.is_some(),
        "nothing to run: no scenario with a load, and no idle run"
    );
    ensure!(
        cfg.rounds > 0 || cfg.idle_conns.is_some(),
        "--rounds must be at least 1"
    );
    for name in &cfg.servers {
        ensure!(
            SERVER_NAMES.contains(&name.as_str()) || cfg.peers.iter().any(|p| &p.name == name),
            "unknown server {name:?}; known: {} (or add one with --peer NAME=CMD)",
            SERVER_NAMES.join(", ")
        );
    }
    for p in &cfg.peers {
        ensure!(
            !SERVER_NAMES.contains(&p.name.as_str()),
            "peer {:?} has the name of a built-in server",
            p.name
        );
    }
    let servers = cfg.all_servers();

    let mut ports = PortPicker::new(cfg.base_port);
    let mut scenarios = Vec::new();
    for &scenario in &cfg.scenarios {
        let mut specs: Vec<Prepared> = servers
            .iter()
            .map(|name| prepare(name, scenario, cfg))
            .collect();
        for (name, spec) in servers.iter().zip(&specs) {
            if let Err(why) = spec {
                eprintln!("compare: {scenario}: skipping {name}: {why}");
            }
        }
        for &load in cfg.loads(scenario) {
            let mut results: Vec<ServerResult> = servers
                .iter()
                .zip(&specs)
                .map(|(name, spec)| ServerResult::new(name, spec.as_ref().err().cloned()))
                .collect();
            for round in 0..cfg.rounds {
                for (spec, result) in specs.iter_mut().zip(&mut results) {
                    let Ok(ready) = spec else { continue };
                    eprintln!(
                        "compare: {scenario} {load} round {}/{} {}",
                        round + 1,
                        cfg.rounds,
                        ready.name
                    );
                    let run = RoundRun {
                        exe: &exe,
                        spec: ready,
                        scenario,
                        load,
                        cfg,
                    };
                    match run.quiet(&mut ports, result) {
                        Ok(report) => result.rounds.push(report),
                        Err(e) => match unsupported_broadcast(&e, ready, scenario) {
                            Some(why) => {
                                eprintln!("  skipping {} for {scenario}: {why}", ready.name);
                                result.skipped = Some(why.clone());
                                *spec = Err(why);
                            }
                            None => {
                                eprintln!("  failed: {e:#}");
                                result.failures.push(format!("{e:#}"));
                            }
                        },
                    }
                }
            }
            summarize(&mut results);
            scenarios.push(ScenarioResult {
                scenario,
                load,
                unit: scenario.unit().to_owned(),
                spin: scenario == Scenario::Fanout && cfg.spin,
                servers: results,
            });
        }
    }

    let mut idle = Vec::new();
    if let Some(conns) = cfg.idle_conns {
        for name in &servers {
            let mut result = IdleResult {
                name: name.clone(),
                report: None,
                failure: None,
                rss_vs_ringcast: None,
            };
            match prepare(name, Scenario::Echo, cfg) {
                Err(why) => result.failure = Some(format!("skipped: {why}")),
                Ok(spec) => {
                    eprintln!("compare: idle {conns} conns {name}");
                    match idle_run(&exe, &spec, cfg, conns, ports.next()?) {
                        Ok(report) => {
                            eprintln!("  {}", report.human().replace('\n', "\n  "));
                            result.report = Some(report);
                        }
                        Err(e) => {
                            eprintln!("  failed: {e:#}");
                            result.failure = Some(format!("failed: {e:#}"));
                        }
                    }
                }
            }
            idle.push(result);
        }
        let base = idle
            .iter()
            .find(|i| i.name == "ringcast")
            .and_then(|i| i.report.as_ref())
            .map(|r| r.rss_bytes_per_conn);
        for i in &mut idle {
            i.rss_vs_ringcast = ratio(i.report.as_ref().map(|r| r.rss_bytes_per_conn), base);
        }
    }

    Ok(CompareReport {
        duration_secs: cfg.duration.as_secs_f64(),
        rounds: cfg.rounds,
        scenarios,
        idle_conns: cfg.idle_conns,
        idle,
    })
}

/// `a / b` when both are known and `b` is positive.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Fills in each server's figures and its ratios to ringcast's.
fn summarize(results: &mut [ServerResult]) {
    for r in results.iter_mut() {
        let pick = |f: fn(&RoundReport) -> Option<f64>| {
            Figure::of(&r.rounds.iter().filter_map(f).collect::<Vec<_>>())
        };
        r.rate = pick(|e| Some(e.rate()));
        r.cpu_us = pick(RoundReport::cpu_us);
        r.p50_us = pick(|e| Some(e.latency().p50_us));
        r.p99_us = pick(|e| Some(e.latency().p99_us));
        r.p999_us = pick(|e| Some(e.latency().p999_us));
        r.max_us = pick(|e| Some(e.latency().max_us));
        r.other_cpu = pick(RoundReport::other_cpu);
    }
    let Some(base) = results.iter().find(|r| r.name == "ringcast").cloned() else {
        return;
    };
    let med = |f: Option<Figure>| f.map(|f| f.median);
    for r in results.iter_mut() {
        r.rate_vs_ringcast = ratio(med(r.rate), med(base.rate));
        r.cpu_vs_ringcast = ratio(med(r.cpu_us), med(base.cpu_us));
    }
}

/// How `name` runs in `scenario`, or why it cannot (no peer for the scenario, a program
/// missing, the Node packages not installed).
///
/// # Panics
/// `name` is neither one of [`SERVER_NAMES`] nor a peer (checked by [`run_compare`] first).
fn prepare(name: &str, scenario: Scenario, cfg: &CompareConfig) -> Prepared {
    let spec = server_spec(name, scenario, cfg)
        .expect("server names are checked before preparing")
        .ok_or_else(|| format!("no {scenario} server for {name}"))?;
    match spec.argv.first() {
        None => return Err("empty command line".to_owned()),
        Some(program) if find_program(program).is_none() => {
            return Err(if program == "node" {
                "node is not on PATH".to_owned()
            } else {
                format!("{program} not found (build it, or pass its command line)")
            });
        }
        Some(_) => {}
    }
    if name == "node-ws" {
        let modules = cfg.node_dir.join("node_modules").join("ws");
        if !modules.is_dir() {
            return Err(format!(
                "{} is missing; install the pinned ws with `npm ci --prefix {}`",
                modules.display(),
                cfg.node_dir.display()
            ));
        }
    }
    Ok(spec)
}

/// The spec of a known server in `scenario`; `Ok(None)` when it has no peer for it.
///
/// # Errors
/// An unknown name.
fn server_spec(name: &str, scenario: Scenario, cfg: &CompareConfig) -> Result<Option<ServerSpec>> {
    let peer = |bin: &str| {
        vec![
            cfg.peer_dir.join(bin).to_string_lossy().into_owned(),
            "--listen".to_owned(),
            "127.0.0.1:{port}".to_owned(),
        ]
    };
    let node = |script: &str| {
        vec![
            "node".to_owned(),
            cfg.node_dir.join(script).to_string_lossy().into_owned(),
            "{port}".to_owned(),
        ]
    };
    let split = |cmd: &str| cmd.split_ascii_whitespace().map(str::to_owned).collect();
    if let Some(peer) = cfg.peers.iter().find(|p| p.name == name) {
        return Ok(peer.command(scenario).map(|cmd| ServerSpec {
            name: name.to_owned(),
            argv: split(cmd),
            raw: false,
        }));
    }
    // Fan-out runs against each server's broadcast server.
    let broadcast = scenario != Scenario::Echo;
    let argv = match name {
        "ringcast" if scenario == Scenario::Fanout => split(&cfg.ringcast_fanout_cmd),
        "ringcast" if broadcast => split(&cfg.ringcast_broadcast_cmd),
        "ringcast" => split(&cfg.ringcast_cmd),
        "fastwebsockets" if broadcast => return Ok(None),
        "fastwebsockets" => peer("peer-fastwebsockets"),
        "tokio-tungstenite" if broadcast => peer("peer-tokio-tungstenite-broadcast"),
        "tokio-tungstenite" => peer("peer-tokio-tungstenite"),
        "node-ws" if broadcast => node("broadcast.js"),
        "node-ws" => node("echo.js"),
        "raw-echo" if broadcast => return Ok(None),
        "raw-echo" => peer("peer-raw-echo"),
        other => bail!(
            "unknown server {other:?}; known: {}",
            SERVER_NAMES.join(", ")
        ),
    };
    Ok(Some(ServerSpec {
        name: name.to_owned(),
        argv,
        raw: name == "raw-echo",
    }))
}

/// For ringcast in the broadcast scenario, a server that exits before accepting means its
/// command has no broadcast mode (yet): the reason to skip it, with the first line it printed.
fn unsupported_broadcast(
    err: &anyhow::Error,
    spec: &ServerSpec,
    scenario: Scenario,
) -> Option<String> {
    if scenario == Scenario::Echo || spec.name != "ringcast" {
        return None;
    }
    let exited = err.downcast_ref::<ExitedEarly>()?;
    let first_line = exited
        .output
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Some(format!(
        "the broadcast command exited at start ({}): {first_line} (set \
         --ringcast-broadcast-cmd once ringcast serves broadcast)",
        exited.status
    ))
}

/// A server exited before accepting on its port.
#[derive(Debug)]
struct ExitedEarly {
    name: String,
    status: String,
    output: String,
}

impl fmt::Display for ExitedEarly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} exited ({}) before accepting; its output:\n{}",
            self.name, self.status, self.output
        )
    }
}

impl std::error::Error for ExitedEarly {}

/// One round of one server under one load.
struct RoundRun<'a> {
    exe: &'a Path,
    spec: &'a ServerSpec,
    scenario: Scenario,
    load: Load,
    cfg: &'a CompareConfig,
}

impl RoundRun<'_> {
    /// The round, run again (up to `cfg.retries` times) while it is noisy; keeps the least
    /// noisy try.
    fn quiet(&self, ports: &mut PortPicker, result: &mut ServerResult) -> Result<RoundReport> {
        let mut best: Option<RoundReport> = None;
        for attempt in 0..=self.cfg.retries {
            let report = self.once(ports.next()?)?;
            eprintln!("  {}", report.human());
            let other = report.other_cpu().unwrap_or(0.0);
            let quieter = best
                .as_ref()
                .is_none_or(|b| other < b.other_cpu().unwrap_or(0.0));
            if quieter {
                best = Some(report);
            }
            if other <= self.cfg.max_other_cpu {
                break;
            }
            if attempt < self.cfg.retries {
                eprintln!(
                    "  noisy: {:.0}% of a core went elsewhere; running the round again",
                    other * 100.0
                );
                result.noisy_retries += 1;
            } else {
                result.noisy_rounds += 1;
            }
        }
        Ok(best.expect("at least one try ran"))
    }

    /// Starts the server, loads it with this scenario's subcommand, kills it.
    fn once(&self, port: u16) -> Result<RoundReport> {
        let cfg = self.cfg;
        let server = Server::start(self.spec, cfg.server_core, port)?;
        let (subcommand, conns) = match self.scenario {
            Scenario::Echo => ("echo", "--conns"),
            Scenario::Broadcast => ("broadcast", "--conns"),
            Scenario::Fanout => ("fanout", "--subs"),
        };
        let mut args: Vec<String> = [
            subcommand,
            "--url",
            &format!("ws://127.0.0.1:{port}/"),
            conns,
            &self.load.conns.to_string(),
            "--size",
            &self.load.size_bytes.to_string(),
            "--duration",
            &cfg.duration.as_secs_f64().to_string(),
            "--warmup",
            &cfg.warmup.as_secs_f64().to_string(),
            "--server-pid",
            &server.pid().to_string(),
            "--json",
        ]
        .map(str::to_owned)
        .to_vec();
        let mut limit = cfg.warmup + cfg.duration + Duration::from_secs(60);
        let result = match self.scenario {
            Scenario::Echo => {
                args.extend(["--driver".to_owned(), cfg.driver.to_string()]);
                if self.spec.raw {
                    args.push("--raw".to_owned());
                }
                run_pinned_json(self.exe, &args, cfg.load_core, limit)
                    .map(|r| RoundReport::Echo(Box::new(r)))
            }
            Scenario::Broadcast => {
                args.extend([
                    "--round-timeout".to_owned(),
                    cfg.round_timeout.as_secs_f64().to_string(),
                ]);
                // The window may run over by one round, and a stall takes the round timeout.
                limit += cfg.round_timeout * 2;
                run_pinned_json(self.exe, &args, cfg.load_core, limit).map(RoundReport::Broadcast)
            }
            Scenario::Fanout => {
                let rate = self.load.rate_per_sec.unwrap_or(DEFAULT_FANOUT_RATE);
                args.extend(
                    [
                        "--mode",
                        "raw",
                        "--procs",
                        &cfg.fanout_procs.to_string(),
                        "--rate",
                        &rate.to_string(),
                    ]
                    .map(str::to_owned),
                );
                if cfg.spin {
                    args.push("--spin".to_owned());
                }
                // The subscribers may drain for up to the drain timeout after the window.
                limit += crate::echo::rate::DRAIN_TIMEOUT * 2;
                run_pinned_json(self.exe, &args, cfg.load_core, limit)
                    .map(|r| RoundReport::Fanout(Box::new(r)))
            }
        };
        server.stop();
        result
    }
}

/// One idle run: start the server, hold `conns` idle connections on it, kill it.
fn idle_run(
    exe: &Path,
    spec: &ServerSpec,
    cfg: &CompareConfig,
    conns: usize,
    port: u16,
) -> Result<IdleReport> {
    let server = Server::start(spec, cfg.server_core, port)?;
    let mut args = vec![
        "idle".to_owned(),
        "--url".to_owned(),
        format!("ws://127.0.0.1:{port}/"),
        "--conns".to_owned(),
        conns.to_string(),
        "--hold".to_owned(),
        "0".to_owned(),
        "--server-pid".to_owned(),
        server.pid().to_string(),
        "--json".to_owned(),
    ];
    if spec.raw {
        args.push("--raw".to_owned());
    }
    let result = run_pinned_json(exe, &args, cfg.load_core, Duration::from_secs(400));
    server.stop();
    result
}

/// A server process started for one round; killed on `stop` or drop.
#[derive(Debug)]
struct Server {
    child: Child,
}

impl Server {
    /// Starts `spec` pinned to `core` and waits (bounded) until `port` accepts.
    fn start(spec: &ServerSpec, core: usize, port: u16) -> Result<Self> {
        let argv = spec.argv(port);
        let log_path = std::env::temp_dir().join(format!("ringcast-bench-{}.log", spec.name));
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new("taskset")
            .arg("-c")
            .arg(core.to_string())
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", argv.join(" ")))?;
        let mut server = Self { child };
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        let deadline = Instant::now() + PORT_TIMEOUT;
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                let mut text = String::new();
                let _ = File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
                return Err(ExitedEarly {
                    name: spec.name.clone(),
                    status: status.to_string(),
                    output: text.trim_end().to_owned(),
                }
                .into());
            }
            if TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not accept on {addr} within {PORT_TIMEOUT:?}",
                    spec.name
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        thread::sleep(STARTUP_PAUSE);
        Ok(server)
    }

    fn pid(&self) -> u32 {
        // taskset execs the command, so its pid is the server's.
        self.child.id()
    }

    fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs this binary pinned to `core` with `args`, killing it after `limit`, and parses the
/// JSON it prints.
fn run_pinned_json<T: DeserializeOwned>(
    exe: &Path,
    args: &[String],
    core: usize,
    limit: Duration,
) -> Result<T> {
    let mut child = Command::new("taskset")
        .arg("-c")
        .arg(core.to_string())
        .arg(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the load generator")?;
    let mut stdout = child.stdout.take().expect("stdout was piped");
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the load generator ran past {limit:?} and was killed");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let text = reader.join().unwrap_or_default();
    if !status.success() {
        bail!("the load generator failed ({status})");
    }
    serde_json::from_str(text.trim()).context("parsing the load generator's JSON")
}

/// Hands out ports from a base, skipping any that cannot be bound right now.
#[derive(Debug)]
struct PortPicker {
    next: u16,
}

impl PortPicker {
    fn new(base: u16) -> Self {
        Self { next: base }
    }

    fn next(&mut self) -> Result<u16> {
        for _ in 0..1000 {
            let port = self.next;
            self.next = self.next.checked_add(1).context("ran out of ports")?;
            if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(port);
            }
        }
        bail!("no free port found after {}", self.next)
    }
}

/// The path of `program`: as given if it contains a `/`, else the first match on `PATH`.
fn find_program(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_placeholders_are_replaced() {
        let spec = ServerSpec {
            name: "x".to_owned(),
            argv: vec![
                "srv".to_owned(),
                "--listen".to_owned(),
                "127.0.0.1:{port}".to_owned(),
            ],
            raw: false,
        };
        assert_eq!(spec.argv(9000)[2], "127.0.0.1:9000");
    }

    #[test]
    fn missing_programs_are_not_found() {
        assert!(find_program("/nonexistent/ringcast").is_none());
        assert!(find_program("sh").is_some());
    }

    #[test]
    fn unknown_servers_are_an_error() {
        let cfg = CompareConfig::new(PathBuf::from("."));
        assert!(server_spec("nginx", Scenario::Echo, &cfg).is_err());
        let raw = server_spec("raw-echo", Scenario::Echo, &cfg)
            .unwrap()
            .unwrap();
        assert!(raw.raw);
    }

    #[test]
    fn only_some_servers_have_a_broadcast_peer() {
        let cfg = CompareConfig::new(PathBuf::from("/peers"));
        let spec = |name| server_spec(name, Scenario::Broadcast, &cfg).unwrap();
        assert!(spec("fastwebsockets").is_none());
        assert!(spec("raw-echo").is_none());
        let tt = spec("tokio-tungstenite").unwrap();
        assert_eq!(tt.argv[0], "/peers/peer-tokio-tungstenite-broadcast");
        let node = spec("node-ws").unwrap();
        assert_eq!(node.argv[0], "node");
        assert!(node.argv[1].ends_with("broadcast.js"), "{:?}", node.argv);
        assert_eq!(node.argv(9000)[2], "9000");
        let ringcast = spec("ringcast").unwrap();
        assert!(ringcast.argv.contains(&"--broadcast".to_owned()));
        assert!(prepare("fastwebsockets", Scenario::Broadcast, &cfg).is_err());
    }

    #[test]
    fn node_without_its_packages_says_how_to_install_them() {
        let mut cfg = CompareConfig::new(PathBuf::from("."));
        cfg.node_dir = PathBuf::from("/nonexistent/node-peers");
        if find_program("node").is_some() {
            let why = prepare("node-ws", Scenario::Echo, &cfg).unwrap_err();
            assert!(
                why.contains("npm ci --prefix /nonexistent/node-peers"),
                "{why}"
            );
        }
    }

    #[test]
    fn a_ringcast_without_broadcast_is_skipped_not_failed() {
        let cfg = CompareConfig::new(PathBuf::from("."));
        let spec = server_spec("ringcast", Scenario::Broadcast, &cfg)
            .unwrap()
            .unwrap();
        let exited: anyhow::Error = ExitedEarly {
            name: "ringcast".to_owned(),
            status: "exit status: 2".to_owned(),
            output: "\nerror: unexpected argument '--broadcast' found\n\nUsage: ...".to_owned(),
        }
        .into();
        let why = unsupported_broadcast(&exited, &spec, Scenario::Broadcast).unwrap();
        assert!(why.contains("unexpected argument '--broadcast'"), "{why}");
        assert!(unsupported_broadcast(&exited, &spec, Scenario::Echo).is_none());
        let other = anyhow::anyhow!("the load generator failed");
        assert!(unsupported_broadcast(&other, &spec, Scenario::Broadcast).is_none());
    }

    #[test]
    fn loads_parse_with_sizes_and_suffixes() {
        assert_eq!("100x20".parse::<Load>(), Ok(Load::new(100, 20)));
        assert_eq!("100x1k".parse::<Load>(), Ok(Load::new(100, 1024)));
        assert_eq!("100x2KiB".parse::<Load>(), Ok(Load::new(100, 2048)));
        assert_eq!("1000".parse::<Load>(), Ok(Load::new(1000, 20)));
        assert_eq!("4X0".parse::<Load>(), Ok(Load::new(4, 0)));
        assert!("0x20".parse::<Load>().is_err());
        assert!("x20".parse::<Load>().is_err());
        assert!("10xlots".parse::<Load>().is_err());
        assert_eq!(Load::new(100, 1024).to_string(), "100x1024");
        assert_eq!("echo".parse(), Ok(Scenario::Echo));
        assert!("storm".parse::<Scenario>().is_err());
    }

    #[test]
    fn fanout_loads_carry_a_rate() {
        assert_eq!(
            "10x64@10k".parse::<Load>(),
            Ok(Load::new(10, 64).at_rate(10_000))
        );
        assert_eq!(
            "100@500".parse::<Load>(),
            Ok(Load::new(100, 20).at_rate(500))
        );
        assert!("10x64@0".parse::<Load>().is_err());
        assert!("10x64@fast".parse::<Load>().is_err());
        assert_eq!(Load::new(10, 64).at_rate(1000).to_string(), "10x64@1000");
        assert_eq!("fanout".parse(), Ok(Scenario::Fanout));
    }

    #[test]
    fn peers_gather_their_commands_by_scenario() {
        let mut peers = Vec::new();
        let arg = |s: &str| s.parse::<PeerArg>().unwrap();
        Peer::add(&mut peers, arg("uws@echo=/tmp/uws/echo {port}")).unwrap();
        Peer::add(&mut peers, arg("uws@broadcast=/tmp/uws/pubsub {port}")).unwrap();
        Peer::add(&mut peers, arg("other=srv --port {port}")).unwrap();
        assert_eq!(peers.len(), 2);
        let uws = &peers[0];
        assert_eq!(uws.command(Scenario::Echo), Some("/tmp/uws/echo {port}"));
        // Fan-out falls back to the broadcast server.
        assert_eq!(
            uws.command(Scenario::Fanout),
            Some("/tmp/uws/pubsub {port}")
        );
        assert_eq!(
            peers[1].command(Scenario::Broadcast),
            Some("srv --port {port}")
        );
        assert!(Peer::add(&mut peers, arg("ringcast=x {port}")).is_err());
        assert!(Peer::add(&mut peers, arg("x=srv 9000")).is_err());
        assert!("=srv".parse::<PeerArg>().is_err());
        assert!("a b=srv".parse::<PeerArg>().is_err());
        assert!("x@idle=srv".parse::<PeerArg>().is_err());

        let mut cfg = CompareConfig::new(PathBuf::from("."));
        cfg.servers = vec!["ringcast".to_owned()];
        cfg.peers = peers;
        assert_eq!(cfg.all_servers(), ["ringcast", "uws", "other"]);
        let spec = server_spec("uws", Scenario::Fanout, &cfg).unwrap().unwrap();
        assert_eq!(spec.argv(9000), ["/tmp/uws/pubsub", "9000"]);
        assert!(server_spec("other", Scenario::Echo, &cfg)
            .unwrap()
            .is_some());
        let ringcast = server_spec("ringcast", Scenario::Fanout, &cfg)
            .unwrap()
            .unwrap();
        assert!(ringcast
            .argv
            .contains(&"bench/ringcast-fanout.toml".to_owned()));
    }

    #[test]
    fn figures_keep_median_min_and_max() {
        let f = Figure::of(&[3.0, 1.0, f64::NAN, 2.0]).unwrap();
        assert_eq!((f.median, f.min, f.max), (2.0, 1.0, 3.0));
        assert!(Figure::of(&[]).is_none());
        assert_eq!(figure(Some(&f), cpu_text), "2.00 (1.00-3.00)");
        let one = Figure::of(&[0.5]).unwrap();
        assert_eq!(figure(Some(&one), cpu_text), "0.500");
        assert_eq!(figure(None, cpu_text), "-");
        assert_eq!(rate_text(2_345_678.0), "2.346M");
        assert_eq!(rate_text(225_473.0), "225.5k");
    }

    #[test]
    fn ratios_are_against_ringcast_medians() {
        let mut ringcast = ServerResult::new("ringcast", None);
        ringcast.rounds = vec![];
        let mut results = vec![ringcast, ServerResult::new("peer", None)];
        results[0].rate = Some(Figure {
            median: 100.0,
            min: 90.0,
            max: 110.0,
        });
        results[1].rate = Some(Figure {
            median: 50.0,
            min: 40.0,
            max: 60.0,
        });
        // summarize recomputes figures from rounds, so check the ratio step alone.
        let base = results[0].rate.map(|f| f.median);
        assert_eq!(ratio(results[1].rate.map(|f| f.median), base), Some(0.5));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        summarize(&mut results);
        assert!(results[1].rate.is_none(), "no rounds, no figure");
    }
}
