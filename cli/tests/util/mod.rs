//! The binary's tests use the workspace's shared test client and helpers (`ringcast-testkit`);
//! this re-exports them under the names the tests use, and adds [`Server`]: the one way the
//! tests run `ringcast serve`.
#![allow(dead_code, unused_imports, unreachable_pub, missing_docs)]

use std::{
    net::SocketAddr,
    ops::{Deref, DerefMut},
    process::Command,
};

pub use ringcast_testkit::{
    broker::{self, BrokerClient, Got, Honesty},
    free_port,
    http::{self, http_get, metric_sum, parse_metrics},
    process::{self, Spawned},
    raw::{self, raw, read_to_close},
    redis, require, wait_for, wait_until,
    ws::{self, connect, connect_with, expect_close, refused, Client},
    DEADLINE,
};

/// The `ringcast` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_ringcast");

/// A running `ringcast serve` (a [`Spawned`] child: killed when dropped, its log collected)
/// and the address it logged. Derefs to the [`Spawned`] for the log, signals and exit.
#[derive(Debug)]
pub struct Server {
    process: Spawned,
    /// The address the server logged in its `ringcast listening` line.
    pub addr: SocketAddr,
}

impl Server {
    /// `ringcast serve --listen 127.0.0.1:0 ARGS` with the log at `info` and no config file
    /// or `RINGCAST_*` setting inherited from the test's environment (so a developer's shell
    /// cannot change what a test runs).
    pub fn command(args: &[&str]) -> Command {
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args);
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("RINGCAST") {
                command.env_remove(name);
            }
        }
        command.env("RINGCAST_LOG", "info");
        command
    }

    /// Starts `ringcast serve --listen 127.0.0.1:0 ARGS` ([`Server::command`]) and waits
    /// (bounded) for the address it listens on.
    pub fn start(args: &[&str]) -> Self {
        Self::spawn(Self::command(args))
    }

    /// Starts `command`, a process that runs `ringcast serve` (the binary itself, or a shell
    /// that `exec`s it), and waits (bounded, failing if it exits first) for the address its
    /// `ringcast listening` line names.
    pub fn spawn(command: Command) -> Self {
        let mut process = Spawned::start(command);
        let addr = process.wait_for_log("the `ringcast listening` line", listen_addr);
        Self { process, addr }
    }

    /// The shard count the `ringcast listening` line names (`shards=N`, resolved: never 0).
    pub fn shards(&self) -> usize {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| listen_addr(l).is_some())
            .expect("the listening line, which `start` waited for");
        line.split(" shards=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no shards=N in {line:?}"))
    }

    /// Waits (bounded) until `needle` appears on `count` log lines (one per shard, say).
    pub fn wait_for_lines(&self, needle: &str, count: usize) {
        wait_until(&format!("{count} log lines with {needle:?}"), || {
            self.log_lines()
                .iter()
                .filter(|l| l.contains(needle))
                .count()
                >= count
        });
    }
}

/// `command` run by `sh -c` after the shell line `prelude` (`ulimit -n 64`, say, for a limit
/// that is per process): the shell then `exec`s the command with its arguments and environment
/// changes, so the process signalled and waited for is the command itself.
pub fn after_shell(prelude: &str, command: &Command) -> Command {
    let mut shell = Command::new("sh");
    shell
        .arg("-c")
        .arg(format!("{prelude} && exec \"$0\" \"$@\""))
        .arg(command.get_program())
        .args(command.get_args());
    for (name, value) in command.get_envs() {
        match value {
            Some(value) => shell.env(name, value),
            None => shell.env_remove(name),
        };
    }
    shell
}

/// The address in a `ringcast listening listen=ADDR ...` log line.
pub fn listen_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.split("ringcast listening listen=").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

impl Deref for Server {
    type Target = Spawned;
    fn deref(&self) -> &Spawned {
        &self.process
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Spawned {
        &mut self.process
    }
}
