//! Runs the same scenario against several servers, each pinned to one core and the load to
//! another, alternating servers round by round (A B A B ...) so slow drifts in a noisy machine
//! hit every server alike.
//!
//! Each round starts a fresh server (`taskset -c SERVER_CORE`), waits (bounded) for its port,
//! runs this binary's `echo` (or `idle`) subcommand pinned with `taskset -c LOAD_CORE`, reads
//! its JSON report, and kills the server. Each launch gets a port of its own, so a server
//! killed in one round cannot answer for the next.

use std::{
    fs::File,
    io::Read as _,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde::{de::DeserializeOwned, Serialize};

use crate::{
    echo::{Driver, EchoReport},
    idle::IdleReport,
    stats::median,
};

/// The ringcast command when none is given: `{port}` is replaced with the port to listen on.
pub const DEFAULT_RINGCAST_CMD: &str =
    "target/release/ringcast serve --echo --shards 1 --listen 127.0.0.1:{port}";

/// The servers [`run_compare`] knows, in the order it runs them.
pub const SERVER_NAMES: [&str; 4] = [
    "ringcast",
    "fastwebsockets",
    "tokio-tungstenite",
    "raw-echo",
];

/// How long a started server gets to accept on its port.
const PORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between the port accepting and the load starting, so start-up work is done.
const STARTUP_PAUSE: Duration = Duration::from_millis(300);

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Server names, from [`SERVER_NAMES`].
    pub servers: Vec<String>,
    /// The ringcast command line, split on whitespace, with `{port}` replaced.
    pub ringcast_cmd: String,
    /// Where the `peer-*` binaries are (by default, beside this executable).
    pub peer_dir: PathBuf,
    /// Connections in the echo scenario.
    pub conns: usize,
    /// Message payload bytes.
    pub size_bytes: usize,
    /// Measured window per round.
    pub duration: Duration,
    /// Unmeasured load before each window.
    pub warmup: Duration,
    /// Rounds per server.
    pub rounds: usize,
    /// Also run the idle scenario with this many connections (once per server).
    pub idle_conns: Option<usize>,
    /// Skip the echo rounds (idle only).
    pub skip_echo: bool,
    /// First port to try; each launch takes the next free one.
    pub base_port: u16,
    /// The core the servers are pinned to.
    pub server_core: usize,
    /// The core the load generator is pinned to.
    pub load_core: usize,
    /// A round in which everything else used more than this much CPU (in cores; see
    /// [`EchoReport::other_cpu_util`]) is noisy and is run again.
    pub max_other_cpu: f64,
    /// How many times a noisy round is run again before its least noisy try is kept.
    pub retries: usize,
    /// The load generator's event loop.
    pub driver: Driver,
}

impl CompareConfig {
    /// The defaults: all servers, 100 connections x 20 B, 1 s warmup, 5 s window, 3 rounds,
    /// servers on core 0 and load on core 1.
    pub fn new(peer_dir: PathBuf) -> Self {
        Self {
            servers: SERVER_NAMES.iter().map(|s| (*s).to_owned()).collect(),
            ringcast_cmd: DEFAULT_RINGCAST_CMD.to_owned(),
            peer_dir,
            conns: 100,
            size_bytes: 20,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            rounds: 3,
            idle_conns: None,
            skip_echo: false,
            base_port: 19_100,
            server_core: 0,
            load_core: 1,
            max_other_cpu: 0.25,
            retries: 2,
            driver: Driver::default(),
        }
    }
}

/// One server's results.
#[derive(Debug, Clone, Serialize)]
pub struct ServerResult {
    /// The server's name.
    pub name: String,
    /// Why it was not run, if it was not.
    pub skipped: Option<String>,
    /// Each successful echo round.
    pub rounds: Vec<EchoReport>,
    /// Errors from rounds that failed.
    pub failures: Vec<String>,
    /// Tries thrown away as noisy (too much other CPU), then run again.
    pub noisy_retries: usize,
    /// Rounds kept although every try was noisy.
    pub noisy_rounds: usize,
    /// Median round trips per second over the rounds.
    pub median_msgs_per_sec: Option<f64>,
    /// Median server CPU microseconds per round trip.
    pub median_cpu_us_per_msg: Option<f64>,
    /// Median of the rounds' p50 latency, in microseconds.
    pub median_p50_us: Option<f64>,
    /// Median of the rounds' p99 latency, in microseconds.
    pub median_p99_us: Option<f64>,
    /// Median CPU (in cores) used by everything else during the rounds.
    pub median_other_cpu: Option<f64>,
    /// Median msgs/s divided by ringcast's.
    pub throughput_vs_ringcast: Option<f64>,
    /// Median CPU per message divided by ringcast's.
    pub cpu_per_msg_vs_ringcast: Option<f64>,
    /// The idle scenario, if it ran.
    pub idle: Option<IdleReport>,
    /// RSS per idle connection divided by ringcast's.
    pub idle_rss_vs_ringcast: Option<f64>,
}

/// Everything [`run_compare`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    /// Connections in the echo scenario.
    pub conns: usize,
    /// Message payload bytes.
    pub size_bytes: usize,
    /// Measured window per round, in seconds.
    pub duration_secs: f64,
    /// Rounds per server.
    pub rounds: usize,
    /// Per server, in run order.
    pub servers: Vec<ServerResult>,
}

impl CompareReport {
    /// A table for people.
    pub fn human(&self) -> String {
        let opt = |v: Option<f64>, prec: usize| match v {
            Some(v) => format!("{v:.prec$}"),
            None => "-".to_owned(),
        };
        let mut out = format!(
            "echo: {} conns x {} B, {:.1} s window, median of {} rounds\n{:<18} {:>12} {:>11} \
             {:>9} {:>9} {:>9} {:>9} {:>7}\n",
            self.conns,
            self.size_bytes,
            self.duration_secs,
            self.rounds,
            "server",
            "msgs/s",
            "cpu us/msg",
            "p50 us",
            "p99 us",
            "x tput",
            "x cpu",
            "other%"
        );
        for s in &self.servers {
            if let Some(why) = &s.skipped {
                out += &format!("{:<18} skipped: {why}\n", s.name);
                continue;
            }
            let mut notes = Vec::new();
            if !s.failures.is_empty() {
                notes.push(format!("{} failed: {}", s.failures.len(), s.failures[0]));
            }
            if s.noisy_rounds > 0 {
                notes.push(format!("{} noisy rounds kept", s.noisy_rounds));
            }
            out += &format!(
                "{:<18} {:>12} {:>11} {:>9} {:>9} {:>9} {:>9} {:>7}{}\n",
                s.name,
                opt(s.median_msgs_per_sec, 0),
                opt(s.median_cpu_us_per_msg, 2),
                opt(s.median_p50_us, 1),
                opt(s.median_p99_us, 1),
                opt(s.throughput_vs_ringcast, 2),
                opt(s.cpu_per_msg_vs_ringcast, 2),
                opt(s.median_other_cpu.map(|o| o * 100.0), 0),
                if notes.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", notes.join("; "))
                }
            );
        }
        if self.servers.iter().any(|s| s.idle.is_some()) {
            out += &format!(
                "idle:\n{:<18} {:>8} {:>12} {:>12} {:>14} {:>9}\n",
                "server", "open", "RSS B/conn", "anon B/conn", "kernel B/conn", "x RSS"
            );
            for s in &self.servers {
                if let Some(i) = &s.idle {
                    out += &format!(
                        "{:<18} {:>8} {:>12.0} {:>12.0} {:>14.0} {:>9}\n",
                        s.name,
                        i.opened,
                        i.rss_bytes_per_conn,
                        i.rss_anon_bytes_per_conn,
                        i.kernel_slab_objects_bytes_per_conn
                            .unwrap_or(i.kernel_unreclaimable_bytes_per_conn),
                        opt(s.idle_rss_vs_ringcast, 2)
                    );
                }
            }
            out += "(kernel: slab objects in use, or SUnreclaim without /proc/slabinfo; both \
                    ends of each loopback connection)\n";
        }
        out += "x tput, x cpu, x RSS: the server's median divided by ringcast's; other%: CPU \
                that went to anything but the server and the load (noise)\n";
        out
    }
}

/// How to start one server.
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

/// Runs the comparison; see the module docs. A server whose binary is missing is skipped with
/// the reason in its result; a round that fails is recorded and the others go on.
///
/// # Errors
/// An unknown server name, or `taskset` or this executable cannot be found.
pub fn run_compare(cfg: &CompareConfig) -> Result<CompareReport> {
    let exe = std::env::current_exe().context("finding this executable")?;
    if find_program("taskset").is_none() {
        bail!("taskset (util-linux) is needed to pin the server and the load");
    }
    let mut specs = Vec::new();
    let mut results = Vec::new();
    for name in &cfg.servers {
        let spec = server_spec(name, cfg)?;
        let skipped = match spec.argv.first() {
            Some(program) if find_program(program).is_some() => None,
            Some(program) => Some(format!(
                "{program} not found (build it, or pass its command line)"
            )),
            None => Some("empty command line".to_owned()),
        };
        if let Some(why) = &skipped {
            eprintln!("compare: skipping {name}: {why}");
        }
        results.push(ServerResult {
            name: name.clone(),
            skipped,
            rounds: Vec::new(),
            failures: Vec::new(),
            noisy_retries: 0,
            noisy_rounds: 0,
            median_msgs_per_sec: None,
            median_cpu_us_per_msg: None,
            median_p50_us: None,
            median_p99_us: None,
            median_other_cpu: None,
            throughput_vs_ringcast: None,
            cpu_per_msg_vs_ringcast: None,
            idle: None,
            idle_rss_vs_ringcast: None,
        });
        specs.push(spec);
    }

    let mut ports = PortPicker::new(cfg.base_port);
    if !cfg.skip_echo {
        for round in 0..cfg.rounds {
            for (spec, result) in specs.iter().zip(&mut results) {
                if result.skipped.is_some() {
                    continue;
                }
                eprintln!("compare: round {}/{} {}", round + 1, cfg.rounds, spec.name);
                match echo_round_quiet(&exe, spec, cfg, &mut ports, result) {
                    Ok(report) => result.rounds.push(report),
                    Err(e) => {
                        eprintln!("  failed: {e:#}");
                        result.failures.push(format!("{e:#}"));
                    }
                }
            }
        }
    }
    if let Some(conns) = cfg.idle_conns {
        for (spec, result) in specs.iter().zip(&mut results) {
            if result.skipped.is_some() {
                continue;
            }
            eprintln!("compare: idle {conns} conns {}", spec.name);
            match idle_run(&exe, spec, cfg, conns, ports.next()?) {
                Ok(report) => {
                    eprintln!("  {}", report.human().replace('\n', "\n  "));
                    result.idle = Some(report);
                }
                Err(e) => {
                    eprintln!("  failed: {e:#}");
                    result.failures.push(format!("idle: {e:#}"));
                }
            }
        }
    }

    summarize(&mut results);
    Ok(CompareReport {
        conns: cfg.conns,
        size_bytes: cfg.size_bytes,
        duration_secs: cfg.duration.as_secs_f64(),
        rounds: cfg.rounds,
        servers: results,
    })
}

fn summarize(results: &mut [ServerResult]) {
    for r in results.iter_mut() {
        let pick = |f: fn(&EchoReport) -> Option<f64>| {
            median(&r.rounds.iter().filter_map(f).collect::<Vec<_>>())
        };
        r.median_msgs_per_sec = pick(|e| Some(e.msgs_per_sec));
        r.median_cpu_us_per_msg = pick(|e| e.server_cpu_us_per_msg);
        r.median_p50_us = pick(|e| Some(e.latency.p50_us));
        r.median_p99_us = pick(|e| Some(e.latency.p99_us));
        r.median_other_cpu = pick(|e| e.other_cpu_util);
    }
    let Some(base) = results.iter().find(|r| r.name == "ringcast").cloned() else {
        return;
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    for r in results.iter_mut() {
        r.throughput_vs_ringcast = ratio(r.median_msgs_per_sec, base.median_msgs_per_sec);
        r.cpu_per_msg_vs_ringcast = ratio(r.median_cpu_us_per_msg, base.median_cpu_us_per_msg);
        r.idle_rss_vs_ringcast = ratio(
            r.idle.as_ref().map(|i| i.rss_bytes_per_conn),
            base.idle.as_ref().map(|i| i.rss_bytes_per_conn),
        );
    }
}

fn server_spec(name: &str, cfg: &CompareConfig) -> Result<ServerSpec> {
    let peer = |bin: &str| {
        vec![
            cfg.peer_dir.join(bin).to_string_lossy().into_owned(),
            "--listen".to_owned(),
            "127.0.0.1:{port}".to_owned(),
        ]
    };
    let (argv, raw) = match name {
        "ringcast" => (
            cfg.ringcast_cmd
                .split_ascii_whitespace()
                .map(str::to_owned)
                .collect(),
            false,
        ),
        "fastwebsockets" => (peer("peer-fastwebsockets"), false),
        "tokio-tungstenite" => (peer("peer-tokio-tungstenite"), false),
        "raw-echo" => (peer("peer-raw-echo"), true),
        other => bail!(
            "unknown server {other:?}; known: {}",
            SERVER_NAMES.join(", ")
        ),
    };
    Ok(ServerSpec {
        name: name.to_owned(),
        argv,
        raw,
    })
}

/// One round, run again (up to `cfg.retries` times) while it is noisy; keeps the least noisy
/// try.
fn echo_round_quiet(
    exe: &Path,
    spec: &ServerSpec,
    cfg: &CompareConfig,
    ports: &mut PortPicker,
    result: &mut ServerResult,
) -> Result<EchoReport> {
    let mut best: Option<EchoReport> = None;
    for attempt in 0..=cfg.retries {
        let report = echo_round(exe, spec, cfg, ports.next()?)?;
        eprintln!("  {}", report.human());
        let other = report.other_cpu_util.unwrap_or(0.0);
        let quieter = best
            .as_ref()
            .is_none_or(|b| other < b.other_cpu_util.unwrap_or(0.0));
        if quieter {
            best = Some(report);
        }
        if other <= cfg.max_other_cpu {
            break;
        }
        if attempt < cfg.retries {
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

/// One echo round: start the server, load it, kill it.
fn echo_round(exe: &Path, spec: &ServerSpec, cfg: &CompareConfig, port: u16) -> Result<EchoReport> {
    let server = Server::start(spec, cfg.server_core, port)?;
    let mut args = vec![
        "echo".to_owned(),
        "--url".to_owned(),
        format!("ws://127.0.0.1:{port}/"),
        "--conns".to_owned(),
        cfg.conns.to_string(),
        "--size".to_owned(),
        cfg.size_bytes.to_string(),
        "--duration".to_owned(),
        cfg.duration.as_secs_f64().to_string(),
        "--warmup".to_owned(),
        cfg.warmup.as_secs_f64().to_string(),
        "--server-pid".to_owned(),
        server.pid().to_string(),
        "--driver".to_owned(),
        cfg.driver.to_string(),
        "--json".to_owned(),
    ];
    if spec.raw {
        args.push("--raw".to_owned());
    }
    let limit = cfg.warmup + cfg.duration + Duration::from_secs(60);
    let result = run_pinned_json(exe, &args, cfg.load_core, limit);
    server.stop();
    result
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
                bail!(
                    "{} exited ({status}) before accepting; its output:\n{}",
                    spec.name,
                    text.trim_end()
                );
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
        assert!(server_spec("nginx", &cfg).is_err());
        assert!(server_spec("raw-echo", &cfg).unwrap().raw);
    }
}
