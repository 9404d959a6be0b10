//! `peer-fastwebsockets`: a WebSocket echo server on tokio's current-thread runtime with
//! fastwebsockets, the shape of its `examples/echo_server.rs`: hyper 1 serves the upgrade,
//! a `FragmentCollector` reassembles messages, auto-pong and auto-close answer control frames.
//!
//! One thread, so `taskset -c 0` pins all of it. Logs nothing per message; runs until killed.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use fastwebsockets::{upgrade, FragmentCollector, OpCode, WebSocketError};
use http_body_util::Empty;
use hyper::{
    body::{Bytes, Incoming},
    server::conn::http1,
    service::service_fn,
    Request, Response,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(about = "fastwebsockets WebSocket echo server (benchmark peer)")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    rt.block_on(serve(args.listen))
}

async fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::from_std(ringcast_bench::net::listen(addr)?)
        .with_context(|| format!("listening on {addr}"))?;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                if stream.set_nodelay(true).is_err() {
                    continue;
                }
                tokio::spawn(async move {
                    let io = TokioIo::new(stream);
                    // A failed connection only ends that connection.
                    let _ = http1::Builder::new()
                        .serve_connection(io, service_fn(upgrade_to_echo))
                        .with_upgrades()
                        .await;
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

async fn upgrade_to_echo(
    mut req: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let (response, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        let _ = tokio::task::unconstrained(echo(fut)).await;
    });
    Ok(response)
}

async fn echo(fut: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = fut.await?;
    ws.set_auto_pong(true);
    ws.set_auto_close(true);
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
    Ok(())
}
