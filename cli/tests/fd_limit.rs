//! Running out of file descriptors: the server (a real `ringcast` process under a low
//! `ulimit -n`) backs off, counts, logs once, and serves the waiting clients once descriptors
//! free up. A child process, because the limit is per process.

mod util;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
};

use tungstenite::Message as WsMessage;
use util::*;

struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Server {
    /// Starts `ringcast serve` with `ulimit -n` set to `nofile` and waits for it to listen.
    fn start(nofile: u32) -> (Server, SocketAddr) {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = probe.local_addr().unwrap();
        drop(probe);
        let script = format!(
            "ulimit -n {nofile} && exec {} serve --echo --shards 1 --listen {addr}",
            env!("CARGO_BIN_EXE_ringcast")
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .env("RINGCAST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            lines,
            seen: Vec::new(),
        };
        server.wait_for_line("ringcast listening");
        (server, addr)
    }

    fn wait_for_line(&mut self, needle: &str) {
        loop {
            let line = self
                .lines
                .recv_timeout(DEADLINE)
                .unwrap_or_else(|_| panic!("no log line with {needle:?}; saw {:#?}", self.seen));
            let found = line.contains(needle);
            self.seen.push(line);
            if found {
                return;
            }
        }
    }

    fn has_seen(&mut self, needle: &str) -> bool {
        self.drain();
        self.seen.iter().any(|l| l.contains(needle))
    }

    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn out_of_descriptors_backs_off_logs_once_and_recovers() {
    // 64 descriptors: stdio, the ring, epoll, eventfd and listener take a handful; the rest
    // are connections.
    let (mut server, addr) = Server::start(64);
    let mut clients = Vec::new();
    // Upgrade clients until one hangs in the backlog (bounded: never more than 100).
    let (tx, rx) = mpsc::channel();
    let mut waiting = Vec::new();
    for i in 0..100 {
        let tx = tx.clone();
        let handle = thread::spawn(move || {
            let result = connect_with(addr, "/", &[]);
            let _ = tx.send(i);
            result
        });
        // A client counts as waiting only once the server has said it is out of
        // descriptors; a merely slow upgrade is waited for.
        let mut upgraded = rx
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_ok();
        if !upgraded && !server.has_seen("accept paused with back-off") {
            upgraded = rx.recv_timeout(DEADLINE).is_ok();
        }
        if upgraded {
            clients.push(handle.join().unwrap().expect("upgrade").0);
        } else {
            waiting.push(handle);
            if waiting.len() == 5 {
                break;
            }
        }
    }
    assert_eq!(waiting.len(), 5, "the server never ran out of descriptors");
    assert!(
        clients.len() > 40,
        "only {} connections before EMFILE",
        clients.len()
    );
    // The clients served so far still work.
    for ws in clients.iter_mut().take(3) {
        ws.send(WsMessage::text("still here")).unwrap();
        assert_eq!(ws.read().unwrap(), WsMessage::text("still here"));
    }
    // Free ten descriptors: the five waiting clients get in.
    for mut ws in clients.drain(..10) {
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
    }
    for handle in waiting {
        let (mut ws, _) = handle
            .join()
            .unwrap()
            .expect("upgrade after descriptors freed");
        ws.send(WsMessage::text("in")).unwrap();
        assert_eq!(ws.read().unwrap(), WsMessage::text("in"));
    }
    server.wait_for_line("accepting again");
    server.drain();
    let warnings = server
        .seen
        .iter()
        .filter(|l| l.contains("accept paused with back-off"))
        .count();
    assert_eq!(warnings, 1, "logged once per episode: {:#?}", server.seen);
}
