//! `peer-raw-echo`: the ceiling. A TCP echo server with no WebSocket framing on monoio's
//! io_uring runtime: each connection reads into its buffer and writes the same bytes back.
//! A WebSocket server on the same runtime can approach this, not pass it.
//!
//! One thread, so `taskset -c 0` pins all of it. Logs nothing per message; runs until killed.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use monoio::{
    io::{AsyncReadRent as _, AsyncWriteRentExt as _},
    net::{TcpListener, TcpStream},
    IoUringDriver, RuntimeBuilder,
};

/// Each connection's buffer, in bytes. Only the pages a read touches become resident.
const BUFFER_BYTES: usize = 8 << 10;

#[derive(Debug, Parser)]
#[command(about = "raw TCP echo server on io_uring (benchmark ceiling)")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut rt = RuntimeBuilder::<IoUringDriver>::new()
        .enable_timer()
        .with_entries(4096)
        .build()
        .context("starting the io_uring runtime")?;
    rt.block_on(serve(args.listen))
}

async fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::from_std(ringcast_bench::net::listen(addr)?)
        .with_context(|| format!("listening on {addr}"))?;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if stream.set_nodelay(true).is_ok() {
                    monoio::spawn(echo(stream));
                }
            }
            Err(e) => {
                // Out of fds, or the peer gave up: back off rather than spin.
                eprintln!("accept: {e}");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn echo(mut stream: TcpStream) {
    let mut buf = Vec::with_capacity(BUFFER_BYTES);
    loop {
        let (res, b) = stream.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let (res, b) = stream.write_all(buf).await;
        buf = b;
        if res.is_err() {
            return;
        }
    }
}
