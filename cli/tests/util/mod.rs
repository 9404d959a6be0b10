//! The few helpers the binary's tests share, copied from `engine/tests/util` (only what these
//! tests use): clients with deadlines and bounded waits. Nothing sleeps and hopes.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use tungstenite::{stream::MaybeTlsStream, WebSocket};

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

pub type Client = WebSocket<MaybeTlsStream<TcpStream>>;

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

/// A raw TCP connection with read/write deadlines.
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

/// Polls `cond` until it holds or the deadline passes (then panics with `what`).
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
