//! The `ringcast` command: runs the engine as any embedder would, through the public API
//! (`ringcast serve`), prints its config (`ringcast config`), and checks hosts and plans
//! capacity with `ringcast-tuning` (`ringcast doctor`, `ringcast capacity`), and prints and
//! publishes to a broker's topics with `ringcast-client` (`ringcast sub`, `ringcast pub`).

mod echo;
mod pubsub;

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use ringcast::{Auth, Broadcast, Broker, Driver, Engine, EngineConfig, Handler, ShardId};
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};
use tracing::{info, warn};

use crate::echo::Echo;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An io_uring, thread-per-core WebSocket engine.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Print the configuration in effect as a commented TOML file (defaults, then the file,
    /// then the environment, then flags), shards resolved; it loads back with --config.
    Config(ConfigArgs),
    /// Check this host for a target connection count: the binding limit and how to lift it.
    /// Exit status 0 when the target fits, 1 when it does not (or the host cannot be read).
    Doctor(DoctorArgs),
    /// Plan hosts for a load: hosts needed by open files, memory, CPU and config.
    Capacity(CapacityArgs),
    /// Print a broker's topics, one line per event (JSON lines, or text on a terminal),
    /// resuming across server restarts. Exits non-zero when the token is refused.
    Sub(pubsub::SubArgs),
    /// Publish DATA (or each line of stdin) to a topic and print each ack's seq.
    Pub(pubsub::PubArgs),
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// TOML file with settings; keys not in it keep their defaults.
    #[arg(long, short = 'c', env = "RINGCAST_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:9000].
    #[arg(long, env = "RINGCAST_LISTEN")]
    listen: Option<SocketAddr>,
    /// Number of shards; 0 means one per CPU [default: 0].
    #[arg(long, env = "RINGCAST_SHARDS")]
    shards: Option<usize>,
    /// IO driver: io_uring, or epoll where io_uring is unavailable [default: io_uring].
    #[arg(long, env = "RINGCAST_DRIVER", value_parser = parse_driver)]
    driver: Option<Driver>,
    /// Set any key of the config file, dotted, with its value written as in TOML:
    /// `--set limits.max_frame_bytes=1048576 --set timeouts.drain_window=5s`. Repeatable;
    /// applied after the file and after `RINGCAST__SECTION__KEY` environment variables
    /// (`RINGCAST__ADMISSION__MAX_CONNECTIONS_PER_IP=100`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Broker backend: `redis://HOST:PORT` orders topics in Redis, shared by every host
    /// using it (`[broker] url`) [default: in memory].
    #[arg(long, env = "RINGCAST_BROKER")]
    broker: Option<String>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Echo every message back to its sender (the Autobahn testee and benchmark target)
    /// instead of running the pub/sub broker.
    #[arg(long, conflicts_with = "broadcast")]
    echo: bool,
    /// All-to-all broadcast (the benchmark server): every connection is subscribed to one
    /// topic and every message it sends is published there, raw, through the broker's
    /// fan-out path.
    #[arg(long)]
    broadcast: bool,
}

#[derive(Debug, Args)]
struct DoctorArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Root of the host to read (/proc and /sys under it); another path reads a copy.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Connections to check for [default: shards x limits.max_connections_per_shard].
    #[arg(long)]
    target: Option<u64>,
    /// The connections are opened from this host to one address (a proxy in front of
    /// ringcast, a load generator): count ephemeral ports too.
    #[arg(long)]
    outbound: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Check what latency mode needs instead (isolated and tickless cores, IRQ affinity,
    /// frequency governor, transparent huge pages); exit status 1 when not ready.
    #[arg(long, conflicts_with_all = ["target", "outbound"])]
    latency: bool,
}

#[derive(Debug, Args)]
struct CapacityArgs {
    /// Users at peak.
    #[arg(long)]
    users: u64,
    /// Connections per user, on average.
    #[arg(long, default_value_t = 1.0)]
    conns_per_user: f64,
    /// Shards (cores given to ringcast) per host.
    #[arg(long)]
    shards_per_host: u64,
    /// RAM per host, in GiB.
    #[arg(long)]
    ram_gib: f64,
    /// Messages published per second, across the deployment.
    #[arg(long, default_value_t = 0.0)]
    msgs_per_sec: f64,
    /// Deliveries per message (subscribers that receive each one).
    #[arg(long, default_value_t = 1.0)]
    fanout: f64,
    /// Open-files limit of ringcast on each host [default: the tuned profile's 4194304].
    #[arg(long)]
    nofile: Option<u64>,
    /// Fraction of each shard's core that message work may use.
    #[arg(long, default_value_t = 0.5)]
    cpu_utilisation: f64,
    /// Fraction of RAM kept free for the OS and busy connections' queued data.
    #[arg(long, default_value_t = 0.25)]
    memory_headroom: f64,
    /// TOML file with settings (buffers, request head, max_connections_per_shard).
    #[arg(long, short = 'c', env = "RINGCAST_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_driver(s: &str) -> Result<Driver, String> {
    match s {
        "io-uring" | "io_uring" | "iouring" => Ok(Driver::IoUring),
        "epoll" => Ok(Driver::Epoll),
        other => Err(format!("unknown driver {other:?}; use io_uring or epoll")),
    }
}

impl ConfigArgs {
    fn load(&self) -> Result<EngineConfig> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                EngineConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))?
            }
            None => EngineConfig::default(),
        };
        // Environment first, then flags: flags win.
        let mut env: Vec<(String, String)> = std::env::vars()
            .filter_map(|(name, value)| {
                let key = name.strip_prefix("RINGCAST__")?;
                Some((key.to_ascii_lowercase().replace("__", "."), value))
            })
            .collect();
        env.sort();
        for (key, value) in env {
            config = config
                .set(&key, &value)
                .with_context(|| format!("in environment variable for {key}"))?;
        }
        for pair in &self.set {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--set {pair}: expected KEY=VALUE"))?;
            config = config
                .set(key.trim(), value.trim())
                .with_context(|| format!("in --set {pair}"))?;
        }
        if let Some(listen) = self.listen {
            config = config.with_listen(listen);
        }
        if let Some(shards) = self.shards {
            config = config.with_shards(shards);
        }
        if let Some(driver) = self.driver {
            config = config.with_driver(driver);
        }
        if let Some(url) = &self.broker {
            config = config.with_broker_url(url.clone());
        }
        config.validate()?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGCAST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Config(args) => args.load().and_then(|c| emit(&c.to_toml_documented())),
        Command::Doctor(args) => doctor(args),
        Command::Capacity(args) => capacity(args),
        Command::Sub(args) => pubsub::sub(args),
        Command::Pub(args) => pubsub::publish(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringcast: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let config = args.config.load()?;
    if args.echo {
        run(config, "echo", |_| Echo)
    } else if args.broadcast {
        run(config, "broadcast", |_| Broadcast::default())
    } else {
        let auth = Auth::from_config(&config.auth)?.map(Arc::new);
        run(config, "broker", move |_| Broker::with_auth(auth.clone()))
    }
}

fn run<H: Handler>(
    config: EngineConfig,
    mode: &str,
    factory: impl Fn(ShardId) -> H + Send + Sync + 'static,
) -> Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let engine = Engine::start(config.clone(), factory)?;
    let handle = engine.handle();
    let cap = connection_cap(&config.with_shards(handle.shards()));
    info!(
        listen = %handle.local_addr(),
        url = %format!("ws://{}/", handle.local_addr()),
        mode,
        shards = handle.shards(),
        driver = handle.driver().name(),
        broker = if handle.broker_stats().is_some() { "redis" } else { "memory" },
        max_connections = cap.max,
        "ringcast listening"
    );
    match &cap.lowered_by {
        Some(why) => warn!(
            max_connections = cap.max,
            configured = cap.configured,
            "connection cap below the configured {} (shards x limits.max_connections_per_shard): \
             {why}; `ringcast doctor` says how to lift it",
            cap.configured
        ),
        None => info!(
            max_connections = cap.max,
            "connection cap: shards x limits.max_connections_per_shard"
        ),
    }
    let stopper = std::thread::Builder::new()
        .name("ringcast-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    info!(
                        signal,
                        "draining: closing connections with 1012 over timeouts.drain_window \
                         (signal again to exit now)"
                    );
                    handle.stop();
                } else {
                    warn!(signal, "second signal: exiting without waiting");
                    std::process::exit(130);
                }
            }
        })
        .context("spawning the signal thread")?;
    drop(stopper);
    let after = engine.handle();
    engine.wait()?;
    let total = after.metrics().total();
    info!(
        accepted = total.connections_accepted,
        messages_in = total.messages_in,
        messages_out = total.messages_out,
        drain_flushed = total.drain_flushed,
        drain_dropped = total.drain_dropped,
        drain_forced = total.drain_forced,
        "ringcast stopped"
    );
    Ok(())
}

/// The most connections this process can hold, and why when that is below the config's.
#[derive(Debug)]
struct ConnectionCap {
    /// The smaller of the configured count and what the open-files limit leaves.
    max: u64,
    /// shards x `limits.max_connections_per_shard`.
    configured: u64,
    /// How the open-files limit was worked out, when it is the lower one.
    lowered_by: Option<String>,
}

/// The effective connection cap of `config` (shards resolved) on this host: the config's
/// count, or fewer when the open-files limit (less the descriptors the process and its
/// shards hold themselves) allows fewer, as `ringcast doctor` works it out.
fn connection_cap(config: &EngineConfig) -> ConnectionCap {
    use ringcast_tuning::doctor::{self, Constraint, Host, Target};
    let configured = config.shards as u64 * config.limits.max_connections_per_shard as u64;
    let files = Host::read(std::path::Path::new("/")).ok().and_then(|host| {
        doctor::diagnose(&host, config, Target::inbound(configured))
            .limits
            .into_iter()
            .find(|l| l.constraint == Constraint::FileDescriptors)
    });
    match files.and_then(|l| Some((l.max_connections?, l.how))) {
        Some((max, how)) if max < configured => ConnectionCap {
            max,
            configured,
            lowered_by: Some(how),
        },
        _ => ConnectionCap {
            max: configured,
            configured,
            lowered_by: None,
        },
    }
}

fn doctor(args: DoctorArgs) -> Result<()> {
    use ringcast_tuning::doctor::{self, Host, Target};
    if args.latency {
        let report = doctor::run_latency(&args.root)
            .with_context(|| format!("reading the host under {}", args.root.display()))?;
        match args.json {
            true => emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?,
            false => emit(&report.to_string())?,
        }
        if !report.ready {
            // The report says why; exit status 1 says "not ready".
            std::process::exit(1);
        }
        return Ok(());
    }
    let config = args.config.load()?;
    let host = Host::read(&args.root)
        .with_context(|| format!("reading the host under {}", args.root.display()))?;
    let connections = args.target.unwrap_or_else(|| {
        doctor::effective_shards(&host, &config) * config.limits.max_connections_per_shard as u64
    });
    let target = match args.outbound {
        true => Target::outbound(connections),
        false => Target::inbound(connections),
    };
    let report = doctor::diagnose(&host, &config, target);
    match args.json {
        true => emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?,
        false => emit(&report.to_string())?,
    }
    if !report.fits {
        // The report says why; exit status 1 says "does not fit".
        std::process::exit(1);
    }
    Ok(())
}

fn capacity(args: CapacityArgs) -> Result<()> {
    // Only the file: capacity plans for other hosts, so --shards and friends do not apply.
    let config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            EngineConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))?
        }
        None => EngineConfig::default(),
    };
    config.validate()?;
    let mut inputs = ringcast_tuning::capacity::Inputs::new(
        args.users,
        args.shards_per_host,
        (args.ram_gib * (1u64 << 30) as f64) as u64,
    )
    .with_connections_per_user(args.conns_per_user)
    .with_messages_per_sec(args.msgs_per_sec)
    .with_fanout(args.fanout)
    .with_cpu_utilisation(args.cpu_utilisation)
    .with_memory_headroom(args.memory_headroom);
    if let Some(nofile) = args.nofile {
        inputs = inputs.with_nofile_per_host(nofile);
    }
    let estimate = inputs.estimate(&config)?;
    match args.json {
        true => emit(&format!("{}\n", serde_json::to_string_pretty(&estimate)?)),
        false => emit(&estimate.to_string()),
    }
}

/// Writes a report to stdout and flushes it; a reader that stopped early (`| head`) is fine.
fn emit(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
