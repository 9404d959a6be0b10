//! The one test client and the helpers that every test crate of the workspace shares: clients
//! with deadlines, the broker's envelope client and its honesty checker, raw sockets for traffic
//! a well-behaved client never sends, HTTP probes and `/metrics` parsing, child processes that
//! are killed when dropped, a real redis-server, and the rule for tools a test needs.
//!
//! Every wait has a deadline ([`DEADLINE`]); nothing sleeps and hopes. It is wire-level only
//! (it speaks to a server over sockets and does not link the engine), so the engine's own
//! integration tests use it as well as the binary's and the load generator's.

pub mod broker;
pub mod http;
pub mod process;
pub mod raw;
pub mod redis;
pub mod ws;

use std::time::{Duration, Instant};

pub use broker::{BrokerClient, Got, Honesty};
pub use ws::{connect, connect_with, refused, Client};

/// How long any single wait in a test may take before the test fails.
///
/// Generous on purpose: the suite runs on a loaded 2-core machine (and is checked beside two
/// busy loops), so a wait that normally takes milliseconds may take a second or more.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `cond` every 5 ms until it holds; panics naming `what` once [`DEADLINE`] passes.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(what, || cond().then_some(()));
}

/// Polls `f` every 5 ms until it returns `Some`; panics naming `what` once [`DEADLINE`] passes.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether the tests run under CI (`CI` set), where every tool a test needs is installed by
/// `.ci/run` and a missing one is a failure, not a skip.
pub fn under_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Whether `program` runs (`program --version` exits 0). When it does not: under CI the test
/// fails naming `install`; elsewhere it prints `SKIPPED ... (install)` on stderr and returns
/// false, so the caller returns early. The one rule for tests that need a tool.
pub fn require(program: &str, install: &str) -> bool {
    let found = std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            !under_ci(),
            "{program} is not installed and CI must run the tests that need it: {install}"
        );
        eprintln!("SKIPPED: {program} is not installed ({install})");
    }
    found
}

/// Whether the test runs as root (effective uid 0), which `what` needs. When it does not:
/// under CI (which runs as root) the test fails; elsewhere it prints `SKIPPED ...` on stderr
/// and returns false, so the caller skips that part. The rule of [`require`], for privilege.
pub fn require_root(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            !under_ci(),
            "not root, and CI must run {what} (CI runs the tests as root)"
        );
        eprintln!("SKIPPED: {what} needs root (run the tests as root to include it)");
    }
    root
}

/// A free TCP port on 127.0.0.1 (bound, read and released; a race with other processes is
/// possible but rare, and the caller's bind then fails loudly).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}
