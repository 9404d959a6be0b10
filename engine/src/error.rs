//! The engine's errors.
//!
//! Owns [`Error`] (what `Engine::start` and `Engine::wait` return) and [`ConfigError`]. A
//! connection's own failures never become an `Error`: they close that connection and count.

use std::io;

/// A `Result` whose error defaults to the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the engine could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was rejected by [`EngineConfig::validate`](crate::EngineConfig::validate).
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// Binding or configuring the listening sockets failed (address in use, permission).
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: io::Error,
    },
    /// A shard's runtime could not be built; for io_uring the message says how to allow epoll.
    #[error("shard {shard}: cannot start the {driver} runtime: {source}{hint}")]
    Runtime {
        /// The shard that failed.
        shard: usize,
        /// The driver it tried.
        driver: &'static str,
        /// The OS error.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A shard thread could not be spawned.
    #[error("cannot spawn shard thread: {0}")]
    Spawn(io::Error),
    /// A shard thread panicked (a bug: please report it with the log).
    #[error("shard {0} panicked")]
    ShardPanicked(usize),
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The TOML did not parse, had an unknown key, or a value of the wrong type.
    #[error("{0}")]
    Toml(String),
    /// A value is out of its range.
    #[error("{key} {why}")]
    Invalid {
        /// The dotted key, as written in the TOML file.
        key: &'static str,
        /// The rule it broke.
        why: &'static str,
    },
}
