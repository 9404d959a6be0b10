//! Child processes for tests: killed when dropped, their stderr collected line by line, and
//! waits on their log and their exit that are bounded.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::DEADLINE;

/// A child process, killed (SIGKILL) and reaped when dropped, with its stderr collected.
#[derive(Debug)]
pub struct Spawned {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Set once stderr reached its end (every line is in `log`).
    log_closed: Arc<AtomicBool>,
    what: String,
}

impl Spawned {
    /// Spawns `command` with stdin and stdout null and stderr collected.
    pub fn start(mut command: Command) -> Self {
        let what = format!("{command:?}");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let log_closed = Arc::new(AtomicBool::new(false));
        let closed = log_closed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
            closed.store(true, Ordering::Release);
        });
        Self {
            child,
            log,
            log_closed,
            what,
        }
    }

    /// Wraps a child spawned by the caller (its stderr is not collected unless piped and not
    /// taken): only the kill-on-drop.
    pub fn from_child(child: Child) -> Self {
        let what = format!("pid {}", child.id());
        Self {
            child,
            log: Arc::default(),
            log_closed: Arc::new(AtomicBool::new(true)),
            what,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The child itself.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Every stderr line so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Every stderr line so far, joined with newlines.
    pub fn log(&self) -> String {
        self.log_lines().join("\n")
    }

    /// Waits (bounded) for a stderr line that `pick` maps to `Some`; fails if the child exits or
    /// the deadline passes first, showing the log.
    pub fn wait_for_log<T>(&mut self, what: &str, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(found) = self.log.lock().unwrap().iter().find_map(|l| pick(l)) {
                return found;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                // The line may be among the last ones, still on their way from the pipe.
                let log = self.final_log();
                if let Some(found) = log.lines().find_map(&mut pick) {
                    return found;
                }
                panic!(
                    "{} exited {status} before {what}:\n{}",
                    self.what,
                    self.log()
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{}: no {what} within {DEADLINE:?}:\n{}",
                self.what,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every stderr line, once stderr has reached its end (the child exited, with any process
    /// that shared its stderr): waits for that (bounded), so a line written just before the
    /// exit is not missed. Call it after the exit (e.g. after [`Spawned::wait_exit`]).
    pub fn final_log(&self) -> String {
        let start = Instant::now();
        while !self.log_closed.load(Ordering::Acquire) {
            assert!(
                start.elapsed() < DEADLINE,
                "{}: stderr still open {DEADLINE:?} later:\n{}",
                self.what,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.log()
    }

    /// Waits (bounded) for a stderr line containing `needle`.
    pub fn wait_for_line(&mut self, needle: &str) -> String {
        self.wait_for_log(&format!("a log line with {needle:?}"), |l| {
            l.contains(needle).then(|| l.to_owned())
        })
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on a child this value owns and has not reaped (reaping happens only
        // through `wait_exit` or drop, which take `&mut self`).
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }

    /// Waits up to `within` for the exit status; fails the test showing the log if the child
    /// is still running then.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        self.try_wait_exit(within).unwrap_or_else(|| {
            panic!(
                "{} still running {within:?} later:\n{}",
                self.what,
                self.log()
            )
        })
    }

    /// Waits up to `within` for the exit status; `None` if the child is still running.
    pub fn try_wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if start.elapsed() >= within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until `addr` accepts TCP connections.
pub fn wait_accepting(addr: SocketAddr) {
    crate::wait_until(&format!("{addr} to accept"), || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
    });
}
