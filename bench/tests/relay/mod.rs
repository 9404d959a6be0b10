//! The in-test relay shared by the broadcast and fan-out integration tests: a WebSocket server
//! on a thread that delivers every message to every client, and can lose messages on purpose.
//! It ends on its own once all clients have closed or [`RELAY_LIFETIME`] passes.

use std::{
    io,
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tungstenite::WebSocket;

/// The longest the in-test relay lives.
const RELAY_LIFETIME: Duration = Duration::from_secs(30);

/// A single-threaded relay: accepts `clients` WebSocket connections, then sends the `n`-th
/// message (from 1) any of them sends to all of them (the sender included) if `relay(n)`,
/// until all have closed or [`RELAY_LIFETIME`] passes. Polls non-blocking sockets, pausing
/// briefly when idle.
pub(crate) fn spawn_relay(clients: usize, relay: fn(usize) -> bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let deadline = Instant::now() + RELAY_LIFETIME;
        let mut conns: Vec<WebSocket<TcpStream>> = Vec::new();
        for stream in listener.incoming().take(clients) {
            let Ok(stream) = stream else { return };
            stream.set_nodelay(true).unwrap();
            let Ok(ws) = tungstenite::accept(stream) else {
                return;
            };
            ws.get_ref().set_nonblocking(true).unwrap();
            conns.push(ws);
        }
        let mut seen = 0usize;
        while !conns.is_empty() && Instant::now() < deadline {
            let mut incoming = Vec::new();
            let mut idle = true;
            conns.retain_mut(|ws| match ws.read() {
                Ok(msg) => {
                    idle = false;
                    if msg.is_binary() || msg.is_text() {
                        incoming.push(msg);
                    }
                    true
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Push out what an earlier send or a close reply left queued.
                    !matches!(ws.flush(), Err(e) if !would_block(&e))
                }
                Err(_) => false,
            });
            for msg in incoming {
                seen += 1;
                if !relay(seen) {
                    continue;
                }
                for ws in &mut conns {
                    // A full socket keeps the frame queued; the flush above sends it later.
                    let _ = ws.send(msg.clone());
                }
            }
            if idle {
                thread::sleep(Duration::from_micros(200));
            }
        }
    });
    addr
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
}
