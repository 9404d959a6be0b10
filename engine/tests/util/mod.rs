//! Helpers shared by the integration tests: engines on free ports, clients with deadlines,
//! a recording handler, and bounded waits. Every wait has a deadline; nothing sleeps and hopes.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ringcast::protocol::UpgradeRequest;
use ringcast::{
    CloseInfo, Ctx, Engine, EngineConfig, Handler, Message, ShardId, Upgrade, UpgradeCtx,
};
use tungstenite::{stream::MaybeTlsStream, WebSocket};

pub mod redis;

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub type Client = WebSocket<MaybeTlsStream<TcpStream>>;

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

/// Connects a tungstenite client to `/path`, with a read timeout so no test can hang.
pub fn connect(addr: SocketAddr, path: &str) -> Client {
    let (ws, _) = connect_with(addr, path, &[]).expect("upgrade");
    ws
}

/// Connects with extra request headers; returns the response too.
pub fn connect_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(Client, tungstenite::handshake::client::Response), tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut request = format!("ws://{addr}{path}").into_client_request()?;
    for (name, value) in headers {
        request.headers_mut().insert(
            tungstenite::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    let stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(DEADLINE))?;
    stream.set_write_timeout(Some(DEADLINE))?;
    let (ws, resp) =
        tungstenite::client(request, MaybeTlsStream::Plain(stream)).map_err(|e| match e {
            tungstenite::HandshakeError::Failure(e) => e,
            tungstenite::HandshakeError::Interrupted(_) => panic!("blocking handshake interrupted"),
        })?;
    Ok((ws, resp))
}

/// Sends one plain HTTP request and reads the whole response (the server closes after it):
/// (status, head, body).
pub fn http_get(addr: SocketAddr, request_line: &str) -> (u16, String, String) {
    let mut stream = raw(addr);
    write!(stream, "{request_line}\r\nHost: localhost\r\n\r\n").unwrap();
    let response = String::from_utf8(read_to_close(&mut stream)).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a whole response");
    let status = head[9..12].parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// Parses a `/metrics` body as a Prometheus scraper would.
pub fn parse_metrics(body: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("parses")
}

/// The sum over every series of `name` whose labels include all of `labels`.
pub fn metric_sum(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        })
        .sum()
}

/// The HTTP status of a refused upgrade, with its response; panics if it was accepted.
pub fn refused(
    result: Result<(Client, tungstenite::handshake::client::Response), tungstenite::Error>,
) -> (u16, tungstenite::http::Response<Option<Vec<u8>>>) {
    match result {
        Err(tungstenite::Error::Http(response)) => (response.status().as_u16(), *response),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("expected an HTTP refusal, the upgrade was accepted"),
    }
}

/// A raw TCP connection with read/write deadlines, for abusive or hand-made traffic.
pub fn raw(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.set_write_timeout(Some(DEADLINE)).unwrap();
    stream
}

/// Reads until the peer closes (or the deadline fails the test); returns everything read.
pub fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return out,
            Err(e) => panic!("read failed after {:?}: {e}", start.elapsed()),
        }
    }
}

/// A valid upgrade request head for `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Sends a valid upgrade on a raw stream and reads the 101 head; returns any bytes after it.
pub fn raw_upgrade(stream: &mut TcpStream) -> Vec<u8> {
    stream.write_all(upgrade_request("/").as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).expect("read 101");
        assert!(
            n > 0,
            "closed before 101: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(
                got.starts_with(b"HTTP/1.1 101"),
                "{}",
                String::from_utf8_lossy(&got)
            );
            return got.split_off(end + 4);
        }
    }
}

/// A masked client frame.
pub fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut buf = bytes::BytesMut::new();
    ringcast::protocol::encode_frame(
        &mut buf,
        fin,
        ringcast::protocol::OpCode::from_u8(opcode).unwrap(),
        payload,
        Some([0x37, 0xfa, 0x21, 0x3d]),
    );
    buf.to_vec()
}

/// Polls `cond` until it holds or the deadline passes (then panics with `what`).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends every message back to its sender, unchanged (what `ringcast serve --echo` runs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Echo;

impl Handler for Echo {
    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let _ = ctx.send(msg);
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
                let _ = ctx.send_text(ctx.shard().index().to_string());
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
                let _ = ctx.send_text(reply);
                return;
            }
        }
        let _ = ctx.send(msg);
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

/// A client over a raw socket that frames with the protocol crate, for traffic tungstenite
/// refuses to produce (unmasked frames, reserved bits, bad UTF-8).
pub struct RawClient {
    pub stream: TcpStream,
    codec: ringcast::protocol::Codec,
    buf: bytes::BytesMut,
}

impl RawClient {
    /// Connects and upgrades.
    pub fn connect(addr: SocketAddr) -> Self {
        let mut stream = raw(addr);
        let rest = raw_upgrade(&mut stream);
        Self {
            stream,
            codec: ringcast::protocol::Codec::client(Default::default(), 99),
            buf: bytes::BytesMut::from(&rest[..]),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next event from the server, or `None` once it closed the TCP connection.
    pub fn next_event(&mut self) -> Option<ringcast::protocol::Event> {
        let mut chunk = [0u8; 65536];
        loop {
            match self.codec.poll_event(&mut self.buf) {
                Ok(Some(ev)) => return Some(ev),
                Ok(None) => {}
                Err(e) => panic!("server broke the protocol: {e}"),
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    /// Reads until the server's close frame; returns its code and reason. Then expects the
    /// server to close the TCP connection.
    pub fn expect_close(&mut self) -> (u16, String) {
        loop {
            match self.next_event() {
                Some(ringcast::protocol::Event::Close(frame)) => {
                    let frame = frame.expect("close frame with a code");
                    // The server closes TCP after its close frame.
                    let rest = read_to_close(&mut self.stream);
                    assert!(rest.is_empty(), "bytes after the close frame: {rest:?}");
                    return (frame.code.as_u16(), frame.reason.to_string());
                }
                Some(_) => continue,
                None => panic!("connection closed without a close frame"),
            }
        }
    }
}
