//! `peer-tokio-tungstenite`: a WebSocket echo server on tokio's current-thread runtime with
//! tokio-tungstenite, written the way its examples are. Echoes text and binary messages;
//! tungstenite answers pings and close frames itself.
//!
//! tungstenite's defaults stand unless a flag says otherwise. Note that its default
//! `read_buffer_size` (128 KiB) is zero-filled before each read, which costs CPU per message
//! and makes that much of each connection's buffer resident; `--read-buffer-bytes` tunes it.
//!
//! One thread, so `taskset -c 0` pins all of it. Logs nothing per message; runs until killed.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{self, protocol::WebSocketConfig};

#[derive(Debug, Parser)]
#[command(about = "tokio-tungstenite WebSocket echo server (benchmark peer)")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// tungstenite's `read_buffer_size` (default: tungstenite's own, 128 KiB).
    #[arg(long)]
    read_buffer_bytes: Option<usize>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    let mut config = WebSocketConfig::default();
    if let Some(bytes) = args.read_buffer_bytes {
        config = config.read_buffer_size(bytes);
    }
    rt.block_on(serve(args.listen, config))
}

async fn serve(addr: SocketAddr, config: WebSocketConfig) -> Result<()> {
    let listener = TcpListener::from_std(ringcast_bench::net::listen(addr)?)
        .with_context(|| format!("listening on {addr}"))?;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    // A failed connection only ends that connection.
                    let _ = echo(stream, config).await;
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

async fn echo(stream: TcpStream, config: WebSocketConfig) -> Result<(), tungstenite::Error> {
    stream.set_nodelay(true)?;
    let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    while let Some(msg) = ws.next().await {
        let msg = msg?;
        if msg.is_text() || msg.is_binary() {
            ws.send(msg).await?;
        }
    }
    Ok(())
}
