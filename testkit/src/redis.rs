//! A real redis-server for the Redis backend's tests: started on a free loopback port with no
//! persistence, killed when dropped.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::DEADLINE;

/// A redis-server child process on a loopback port, killed when dropped.
#[derive(Debug)]
pub struct Redis {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
}

impl Redis {
    /// Starts redis-server on a free port, or `None` when it is not installed. Under CI
    /// (`CI` set), where `.ci/run` installs it, a missing redis-server fails the test instead.
    pub fn start() -> Option<Self> {
        if !crate::require("redis-server", "apt-get install redis-server") {
            return None;
        }
        let port = crate::free_port();
        Some(Self {
            child: Self::spawn(port),
            port,
        })
    }

    fn spawn(port: u16) -> Child {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let start = Instant::now();
        while !ping(port) {
            assert!(
                start.elapsed() < DEADLINE,
                "redis-server did not answer PING"
            );
            thread::sleep(Duration::from_millis(10));
        }
        child
    }

    /// The URL the engine's `[broker] url` takes.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no goodbye to the clients, and (no persistence) every key is gone.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// A fresh, empty redis-server on the same port.
    pub fn restart(&mut self) {
        self.child = Self::spawn(self.port);
    }

    /// One command, by RESP over a fresh connection; the raw reply (one read).
    pub fn cmd(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a Redis answers PING on `port`.
pub fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with("+PONG")
}
