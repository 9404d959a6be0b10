//! `peer-tokio-tungstenite-broadcast`: a WebSocket broadcast server on tokio's current-thread
//! runtime with tokio-tungstenite and a `tokio::sync::broadcast` channel, written the way a
//! tokio user would: each connection's task reads messages and sends them into the channel,
//! and a second task per connection forwards what its receiver gets to the socket, one
//! `send` (write and flush) per message. Every text and binary message goes to every
//! connection, the sender included; tungstenite answers pings and close frames itself.
//!
//! Lagging: a receiver that falls more than `--capacity` messages behind loses the oldest
//! (tokio's broadcast semantics). The lost count is printed to stderr and the connection goes
//! on, so a benchmark round waiting for those messages stalls and fails rather than counting
//! them. The default capacity holds far more than one lockstep round of the largest
//! benchmark (one message per connection), so this does not happen there.
//!
//! One thread, so `taskset -c 0` pins all of it. Logs nothing per message; runs until killed.

use std::{net::SocketAddr, time::Duration};

use anyhow::{ensure, Context as _, Result};
use clap::Parser;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::broadcast::{self, error::RecvError},
};
use tokio_tungstenite::tungstenite::{self, protocol::WebSocketConfig, Message};

#[derive(Debug, Parser)]
#[command(
    about = "tokio-tungstenite broadcast server over tokio::sync::broadcast (benchmark peer)"
)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Messages the broadcast channel holds before the slowest receiver starts losing them.
    #[arg(long, default_value_t = 65_536)]
    capacity: usize,
    /// tungstenite's `read_buffer_size` (default: tungstenite's own, 128 KiB).
    #[arg(long)]
    read_buffer_bytes: Option<usize>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.capacity > 0, "--capacity must be at least 1");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let mut config = WebSocketConfig::default();
    if let Some(bytes) = args.read_buffer_bytes {
        config = config.read_buffer_size(bytes);
    }
    rt.block_on(serve(args.listen, config, args.capacity))
}

async fn serve(addr: SocketAddr, config: WebSocketConfig, capacity: usize) -> Result<()> {
    let listener = TcpListener::from_std(ringcast_bench::net::listen(addr)?)
        .with_context(|| format!("listening on {addr}"))?;
    let (tx, _) = broadcast::channel::<Message>(capacity);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    // A failed connection only ends that connection.
                    let _ = relay(stream, config, tx).await;
                });
            }
            Err(e) => {
                // Out of fds, or the peer gave up: back off rather than spin.
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn relay(
    stream: TcpStream,
    config: WebSocketConfig,
    tx: broadcast::Sender<Message>,
) -> Result<(), tungstenite::Error> {
    stream.set_nodelay(true)?;
    // Subscribe before the handshake ends, so a client that sees the 101 is already counted.
    let mut rx = tx.subscribe();
    let ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    let (mut sink, mut source) = ws.split();
    let forward = tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(msg) => {
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
                Err(RecvError::Lagged(lost)) => {
                    eprintln!("a receiver lagged: {lost} messages lost");
                }
                Err(RecvError::Closed) => break,
            }
        }
    });
    while let Some(msg) = source.next().await {
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                forward.abort();
                return Err(e);
            }
        };
        if msg.is_text() || msg.is_binary() {
            // Fails only when no receiver is left at all; then there is no one to tell.
            let _ = tx.send(msg);
        }
    }
    forward.abort();
    Ok(())
}
