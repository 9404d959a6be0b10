//! A real redis-server for the Redis backend's tests: started on a free loopback port, with no
//! persistence ([`Redis::start`]) or with its data kept across a kill in a temp dir of its own
//! ([`Redis::start_persistent`]), killed when dropped. [`Redis::user_url`], [`Redis::cut`] and
//! [`Redis::mend`] cut one engine's link to it while the others stay connected.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::PathBuf,
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
    /// With persistence: the directory holding its append-only file, removed on drop.
    dir: Option<PathBuf>,
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
            child: Self::spawn(port, None),
            port,
            dir: None,
        })
    }

    /// Like [`Redis::start`], but every write goes to an append-only file (fsynced before
    /// the reply) in a fresh dir of its own (under `/dev/shm` where it exists), so [`Redis::kill`] then [`Redis::restart`] brings it
    /// back with its data: what it acked before the kill is still there.
    pub fn start_persistent() -> Option<Self> {
        if !crate::require("redis-server", "apt-get install redis-server") {
            return None;
        }
        let port = crate::free_port();
        // tmpfs where there is one: the fsync before each reply then costs nothing on a disk
        // busy with builds, and a process kill (what the tests do) keeps its files all the same.
        let shm = PathBuf::from("/dev/shm");
        let base = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "ringcast-redis-{}-{port}-{}",
            std::process::id(),
            nanos_now()
        ));
        std::fs::create_dir_all(&dir).expect("create the redis data dir");
        Some(Self {
            child: Self::spawn(port, Some(&dir)),
            port,
            dir: Some(dir),
        })
    }

    fn spawn(port: u16, dir: Option<&PathBuf>) -> Child {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""]);
        match dir {
            Some(dir) => command
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .arg("--dir")
                .arg(dir),
            None => command
                .args(["--appendonly", "no"])
                .arg("--dir")
                .arg(std::env::temp_dir()),
        };
        let child = command
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

    /// A redis-server on the same port again: empty, or (persistent) with the data it had.
    pub fn restart(&mut self) {
        self.child = Self::spawn(self.port, self.dir.as_ref());
    }

    /// The URL of an engine that logs in as ACL user `user` (password: the name again),
    /// creating the user with every right. Give it to one engine so [`Redis::cut`] can cut
    /// that engine's link alone.
    pub fn user_url(&self, user: &str) -> String {
        let pass = format!(">{user}");
        let reply = self.cmd(&["ACL", "SETUSER", user, "on", &pass, "~*", "&*", "+@all"]);
        assert!(reply.starts_with("+OK"), "ACL SETUSER {user}: {reply}");
        format!("redis://{user}:{user}@127.0.0.1:{}", self.port)
    }

    /// Cuts `user`'s link while Redis keeps running with its data: the user is disabled (its
    /// reconnects fail to log in) and its connections are killed. Returns how many were.
    pub fn cut(&self, user: &str) -> u64 {
        let reply = self.cmd(&["ACL", "SETUSER", user, "off"]);
        assert!(reply.starts_with("+OK"), "ACL SETUSER {user} off: {reply}");
        let reply = self.cmd(&["CLIENT", "KILL", "USER", user]);
        reply
            .trim()
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("CLIENT KILL USER {user}: {reply}"))
    }

    /// Lets `user` log in again after [`Redis::cut`].
    pub fn mend(&self, user: &str) {
        let reply = self.cmd(&["ACL", "SETUSER", user, "on"]);
        assert!(reply.starts_with("+OK"), "ACL SETUSER {user} on: {reply}");
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
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Nanoseconds since the Unix epoch: a suffix that makes a temp dir name unique.
fn nanos_now() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
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
