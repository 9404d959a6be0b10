//! The `ringcast` command: runs the engine as any embedder would, through the public API.

use std::{io::IsTerminal, net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use ringcast::{Broadcast, Broker, Driver, Echo, Engine, EngineConfig, Handler, ShardId};
use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};
use tracing::{info, warn};

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
    /// Print the effective configuration as TOML (defaults, then the file, then flags).
    Config(ConfigArgs),
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
    /// IO driver: io-uring, or epoll where io_uring is unavailable [default: io-uring].
    #[arg(long, env = "RINGCAST_DRIVER", value_parser = parse_driver)]
    driver: Option<Driver>,
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

fn parse_driver(s: &str) -> Result<Driver, String> {
    match s {
        "io-uring" | "io_uring" | "iouring" => Ok(Driver::IoUring),
        "epoll" => Ok(Driver::Epoll),
        other => Err(format!("unknown driver {other:?}; use io-uring or epoll")),
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
        if let Some(listen) = self.listen {
            config = config.with_listen(listen);
        }
        if let Some(shards) = self.shards {
            config = config.with_shards(shards);
        }
        if let Some(driver) = self.driver {
            config = config.with_driver(driver);
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
        Command::Config(args) => args.load().map(|c| print!("{}", c.to_toml())),
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
        run(config, "broker", |_| Broker)
    }
}

fn run<H: Handler>(
    config: EngineConfig,
    mode: &str,
    factory: impl Fn(ShardId) -> H + Send + Sync + 'static,
) -> Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let engine = Engine::start(config, factory)?;
    let handle = engine.handle();
    info!(
        listen = %handle.local_addr(),
        url = %format!("ws://{}/", handle.local_addr()),
        mode,
        shards = handle.shards(),
        driver = handle.driver().name(),
        "ringcast listening"
    );
    let stopper = std::thread::Builder::new()
        .name("ringcast-signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    info!(
                        signal,
                        "stopping: closing connections (signal again to exit now)"
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
        "ringcast stopped"
    );
    Ok(())
}
