//! `ringcast sub` and `ringcast pub`: what an operator types to check a running broker, on
//! `ringcast-client` (so they resume across restarts as any client of it does).
//!
//! Owns the command-line shape and the output lines; the protocol, reconnects and resume are
//! the client's.

use std::{io::IsTerminal, time::Duration};

use anyhow::{bail, Context as _, Result};
use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use clap::Args;
use ringcast_client::{Client, Config, Data, DataKind, Encoding, Error, Event, QueuePolicy};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};

/// Connection flags shared by `sub` and `pub`.
#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// Server URL: `ws://HOST:PORT/`.
    url: String,
    /// Speak JSON (`ringcast.v1.json`), the default.
    #[arg(long, conflicts_with = "bin")]
    json: bool,
    /// Speak the binary encoding (`ringcast.v2.bin`).
    #[arg(long)]
    bin: bool,
    /// Token (JWT) sent as `Authorization: Bearer` at each upgrade.
    #[arg(long, env = "RINGCAST_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ConnectArgs {
    fn config(&self) -> Config {
        let mut config = Config::new(self.url.clone()).with_encoding(if self.bin {
            Encoding::Binary
        } else {
            Encoding::Json
        });
        if let Some(token) = &self.token {
            config = config.with_token(token.clone());
        }
        config
    }
}

#[derive(Debug, Args)]
pub(crate) struct SubArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topics to print.
    #[arg(required = true)]
    topics: Vec<String>,
    /// Resume after this seq (on every topic): replay what the server still holds after it.
    #[arg(long)]
    since: Option<u64>,
    /// Exit after this many messages (all topics together).
    #[arg(long)]
    count: Option<u64>,
}

#[derive(Debug, Args)]
pub(crate) struct PubArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topic to publish to.
    topic: String,
    /// The payload: sent as JSON when it is one JSON value, else as bytes. Without it, each
    /// line of stdin is one publish.
    data: Option<String>,
    /// Publishes per second from stdin at most [default: as fast as the server takes them].
    #[arg(long)]
    rate: Option<f64>,
}

/// Runs `fut` on a fresh single-threaded tokio runtime.
fn block_on<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(fut)
}

/// Turns the client's reason to stop into the message an operator reads.
fn explain(error: Error) -> anyhow::Error {
    match error {
        Error::Unauthorized { status, body } => anyhow::anyhow!(
            "the server refused the token (HTTP {status}: {body}); pass a valid one with --token"
        ),
        other => other.into(),
    }
}

pub(crate) fn sub(args: SubArgs) -> Result<()> {
    block_on(async move {
        let client = Client::connect(args.connect.config())?;
        let human = std::io::stdout().is_terminal();
        let (tx, mut rx) = mpsc::channel::<(String, Event)>(1024);
        for topic in &args.topics {
            let mut subscription = match args.since {
                Some(since) => client.subscribe_from(topic, since).await,
                None => client.subscribe(topic).await,
            }
            .map_err(explain)
            .with_context(|| format!("subscribing to {topic}"))?;
            let tx = tx.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                while let Some(event) = subscription.next().await {
                    if tx.send((topic.clone(), event)).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut messages = 0;
        while let Some((topic, event)) = rx.recv().await {
            if let Event::Stopped(error) = event {
                return Err(explain(error)).with_context(|| format!("subscription to {topic}"));
            }
            let line = if human {
                human_line(&topic, &event)
            } else {
                json_line(&topic, &event)
            };
            crate::emit(&format!("{line}\n"))?;
            if matches!(event, Event::Message { .. }) {
                messages += 1;
                if args.count.is_some_and(|n| messages >= n) {
                    client.close();
                    return Ok(());
                }
            }
        }
        Err(explain(client.stopped().await))
    })
}

fn human_line(topic: &str, event: &Event) -> String {
    match event {
        Event::Message { seq, data } => format!("{topic} #{seq} {}", data.text()),
        Event::Dropped { count, next } => {
            format!("{topic}: {count} messages dropped, next #{next}")
        }
        Event::Reset { oldest, epoch } => match epoch {
            Some(epoch) => format!("{topic}: numbering reset, next #{oldest} (epoch {epoch})"),
            None => format!("{topic}: numbering reset, next #{oldest}"),
        },
        Event::Resubscribed { since } => match since {
            Some(since) => format!("{topic}: reconnected, resuming after #{since}"),
            None => format!("{topic}: reconnected"),
        },
        other => format!("{topic}: {other:?}"),
    }
}

/// One JSON object per event, in the protocol's own field names.
fn json_line(topic: &str, event: &Event) -> String {
    let topic = serde_json::to_string(topic).unwrap_or_default();
    match event {
        Event::Message { seq, data } => match data.kind {
            // The server checked it is one JSON value: inlined as sent.
            DataKind::Json => format!(
                r#"{{"event":"message","topic":{topic},"seq":{seq},"data":{}}}"#,
                data.text()
            ),
            DataKind::Binary => format!(
                r#"{{"event":"message","topic":{topic},"seq":{seq},"data_b64":"{}"}}"#,
                BASE64.encode(&data.bytes)
            ),
        },
        Event::Dropped { count, next } => {
            format!(r#"{{"event":"dropped","topic":{topic},"count":{count},"next":{next}}}"#)
        }
        Event::Reset { oldest, epoch } => format!(
            r#"{{"event":"reset","topic":{topic},"oldest":{oldest},"epoch":{}}}"#,
            epoch.map_or("null".to_owned(), |e| e.to_string())
        ),
        Event::Resubscribed { since } => format!(
            r#"{{"event":"resubscribed","topic":{topic},"since":{}}}"#,
            since.map_or("null".to_owned(), |s| s.to_string())
        ),
        other => format!(
            r#"{{"event":"other","topic":{topic},"debug":{}}}"#,
            serde_json::to_string(&format!("{other:?}")).unwrap_or_default()
        ),
    }
}

/// JSON when `text` is one JSON value, else its bytes.
fn payload(text: &str) -> Data {
    match serde_json::from_str::<serde::de::IgnoredAny>(text) {
        Ok(_) => Data::json(text.trim()),
        Err(_) => Data::binary(text.as_bytes().to_vec()),
    }
}

pub(crate) fn publish(args: PubArgs) -> Result<()> {
    if let Some(rate) = args.rate {
        if !(rate > 0.0 && rate.is_finite()) {
            bail!("--rate must be a positive number of publishes per second");
        }
    }
    block_on(async move {
        let config = args.connect.config().with_queue(QueuePolicy::Queue(4096));
        let client = Client::connect(config)?;
        if let Some(data) = &args.data {
            let ack = client
                .publish(&args.topic, payload(data))
                .await
                .map_err(explain)?;
            crate::emit(&format!("{}\n", ack.seq))?;
            client.close();
            return Ok(());
        }
        // Acks print in the order of the lines; up to 1024 publishes wait for theirs.
        let (acks_tx, mut acks) =
            mpsc::channel::<tokio::task::JoinHandle<Result<ringcast_client::Published>>>(1024);
        let printer = tokio::spawn(async move {
            let mut failed = 0u64;
            while let Some(handle) = acks.recv().await {
                match handle.await.context("a publish task")? {
                    Ok(ack) => crate::emit(&format!("{}\n", ack.seq))?,
                    Err(e) => {
                        eprintln!("ringcast pub: {e:#}");
                        failed += 1;
                    }
                }
            }
            anyhow::Ok(failed)
        });
        let mut pace = args.rate.map(|rate| {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        });
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        let mut number = 0u64;
        while let Some(text) = lines.next_line().await.context("reading stdin")? {
            number += 1;
            if text.trim().is_empty() {
                continue;
            }
            if let Some(tick) = &mut pace {
                tick.tick().await;
            }
            let publisher = client.clone();
            let topic = args.topic.clone();
            let handle = tokio::spawn(async move {
                publisher
                    .publish(&topic, payload(&text))
                    .await
                    .map_err(explain)
                    .with_context(|| format!("line {number}"))
            });
            if acks_tx.send(handle).await.is_err() {
                break;
            }
            if let ringcast_client::Status::Stopped(e) = client.status() {
                return Err(explain(e));
            }
        }
        drop(acks_tx);
        let failed = printer.await.context("the ack printer")??;
        client.close();
        if failed > 0 {
            bail!("{failed} publishes failed");
        }
        Ok(())
    })
}
