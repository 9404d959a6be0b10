//! What only the engine's integration tests need: engine configs on free ports and the test
//! handlers (echo, recorder). The clients, raw sockets, HTTP probes, broker client, honesty
//! checker, processes and redis-server come from `ringcast-testkit`, shared with the binary's
//! and the load generator's tests, and are re-exported here.
#![allow(dead_code, unused_imports, unreachable_pub, missing_docs)]

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use ringcast::protocol::UpgradeRequest;
use ringcast::{
    CloseInfo, Ctx, Engine, EngineConfig, Enqueue, Handler, Message, ShardId, Upgrade, UpgradeCtx,
};
pub use ringcast_testkit::{
    broker::{self, subscribe_request, BrokerClient, Got, Honesty},
    free_port,
    http::{self, http_get, metric_sum, parse_metrics},
    process,
    raw::{self, client_frame, raw, raw_upgrade, read_to_close, upgrade_request, RawClient},
    redis, require, wait_for, wait_until,
    ws::{self, connect, connect_with, expect_close, refused, Client},
    DEADLINE,
};

/// A config for tests: a free port on 127.0.0.1, `shards` shards, short timeouts.
pub fn config(shards: usize) -> EngineConfig {
    let mut config = EngineConfig::default()
        .with_listen("127.0.0.1:0".parse().unwrap())
        .with_shards(shards);
    config.timeouts.handshake_timeout = Duration::from_millis(500);
    config.timeouts.close_timeout = Duration::from_millis(500);
    config.timeouts.shutdown_timeout = Duration::from_secs(2);
    // Close at once on stop; the drain tests set a window of their own.
    config.timeouts.drain_window = Duration::ZERO;
    config
}

/// Sends every message back to its sender, unchanged (what `ringcast serve --echo` runs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

impl Handler for Echo {
    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let status = ctx.send(msg);
        queued(ctx, status);
    }
}

/// Checks a test handler's send: anything but `Queued` closes the connection with 1011 and a
/// reason naming the status, so the client's next read fails at once saying why instead of
/// timing out after [`DEADLINE`].
pub fn queued(ctx: &mut Ctx<'_>, status: Enqueue) {
    if status != Enqueue::Queued {
        ctx.close(1011.into(), &format!("test handler: send was {status:?}"));
    }
}

/// What the recording handler saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    Open { shard: usize, path: String },
    Message(Message),
    Close(CloseInfo),
}

/// Echoes messages and records every hook call into a shared log. Text "close:CODE" makes the
/// server close with CODE; text "shard?" answers the shard index; "whoami" answers the path.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    pub log: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    pub fn closes(&self) -> Vec<CloseInfo> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Close(c) => Some(c),
                _ => None,
            })
            .collect()
    }
}

impl Handler for Recorder {
    fn on_upgrade(&mut self, req: &UpgradeRequest<'_>, _ctx: &UpgradeCtx) -> Upgrade {
        if req.path() == "/private" && req.header("authorization") != Some(b"Bearer ok") {
            return Upgrade::reject(401, "token required")
                .with_header("WWW-Authenticate", "Bearer");
        }
        match req.protocols().find(|p| *p == "echo.v1") {
            Some(p) => Upgrade::accept_subprotocol(p),
            None => Upgrade::accept(),
        }
    }

    fn on_open(&mut self, ctx: &mut Ctx<'_>) {
        let path = ctx.info().path().to_owned();
        self.log.lock().unwrap().push(Seen::Open {
            shard: ctx.shard().index(),
            path,
        });
    }

    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        self.log.lock().unwrap().push(Seen::Message(msg.clone()));
        if let Message::Text(text) = &msg {
            if let Some(code) = text.strip_prefix("close:") {
                let code: u16 = code.parse().unwrap();
                ctx.close(code.into(), "asked to");
                return;
            }
            if text.as_str() == "shard?" {
                let status = ctx.send_text(ctx.shard().index().to_string());
                queued(ctx, status);
                return;
            }
            if text.as_str() == "whoami" {
                let info = ctx.info();
                let ua = info
                    .header("user-agent")
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                let reply = format!(
                    "{} {} {} {}",
                    info.path(),
                    info.query().unwrap_or(""),
                    info.subprotocol().unwrap_or("-"),
                    ua
                );
                let status = ctx.send_text(reply);
                queued(ctx, status);
                return;
            }
        }
        let status = ctx.send(msg);
        queued(ctx, status);
    }

    fn on_close(&mut self, _ctx: &mut Ctx<'_>, close: &CloseInfo) {
        self.log.lock().unwrap().push(Seen::Close(close.clone()));
    }
}

/// Starts an engine running a `Recorder` shared by all shards.
pub fn start_recorder(config: EngineConfig) -> (Engine, Recorder) {
    let recorder = Recorder::default();
    let shared = recorder.clone();
    let engine = Engine::start(config, move |_: ShardId| shared.clone()).expect("start engine");
    (engine, recorder)
}
