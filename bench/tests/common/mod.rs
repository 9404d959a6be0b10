//! In-test servers shared by the load generator's integration tests: a WebSocket echo and a
//! raw TCP echo on threads, each ending on its own (a read timeout).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

/// How long an in-test server connection waits for the client before giving up.
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts a listener whose connections are served on threads by `serve`; it accepts at most
/// `max_conns`.
pub(crate) fn spawn_server(max_conns: usize, serve: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming().take(max_conns) {
            let Ok(stream) = stream else { continue };
            stream.set_read_timeout(Some(SERVER_IDLE_TIMEOUT)).unwrap();
            stream.set_nodelay(true).unwrap();
            thread::spawn(move || serve(stream));
        }
    });
    addr
}

pub(crate) fn ws_echo(stream: TcpStream) {
    let Ok(mut ws) = tungstenite::accept(stream) else {
        return;
    };
    // tungstenite answers pings and the close frame itself; reading ends with an error once
    // the connection is closed.
    while let Ok(msg) = ws.read() {
        if (msg.is_binary() || msg.is_text()) && ws.send(msg).is_err() {
            return;
        }
    }
}

pub(crate) fn raw_echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}
