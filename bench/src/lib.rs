//! # ringcast-bench
//!
//! The benchmark suite: a load generator, peer servers to compare ringcast against, and the
//! comparison that runs them side by side. Everything targets loopback only
//! ([`net::Target`] refuses other addresses) and every load loop is bounded in count and time.
//!
//! ## Binaries
//!
//! - `loadgen`: the load generator, a thin CLI over this library.
//!   - `echo`: N connections in a closed loop (send one message, wait for its echo), reporting
//!     msgs/s, latency percentiles and the server's CPU time per message ([`echo`]). With
//!     `--rate R`, a fixed rate instead: R messages/s on a schedule, pipelined, latency timed
//!     from each message's due time (no coordinated omission; [`echo::rate`]).
//!     `--plot-dir DIR` draws the latency spectrum and throughput over time as SVG ([`plot`]).
//!   - `idle`: open and hold N connections, reporting the server's RSS and the kernel's memory
//!     per connection ([`idle`]).
//!   - `broadcast`: N clients in lockstep rounds, each sending one message that the server
//!     delivers to all N, reporting deliveries/s, round latency and the server's CPU time per
//!     delivery ([`broadcast`]).
//!   - `fanout`: N subscribers over T topics and publishers at a fixed rate, against the
//!     ringcast broker (JSON or binary envelope) or a broadcast server (raw); each message
//!     carries its due time, so every subscriber reports publish-to-receive latency, besides
//!     deliveries/s, drops and the server's CPU time per delivery ([`fanout`]).
//!   - `storm`: connection churn (connect, hold, close, repeat; upgrades/s and failures by
//!     reason) and a mass reconnect (drop N at once, reconnect with jittered backoff; time
//!     until all are back) ([`storm`]).
//!   - `abuse`: issue 15's attacks on the broker one after another (subscribe floods, publishes
//!     to new topics, a huge replaying subscribe, subscription toggling, half-open
//!     connections, a nesting bomb), each for a bounded time, with a live client doing a
//!     publish -> ack -> message round trip every 50 ms beside them; reports the live client's
//!     p50/p99/worst and what the server answered each attack, and fails past `--max-rtt`
//!     ([`abuse`]).
//!   - `compare`: the scenario matrix (echo, broadcast and fan-out loads, and idle) against
//!     each server in turn, built-in or given with `--peer NAME=CMD`, server and load pinned
//!     to different cores, medians with min and max over alternating rounds ([`compare`]).
//!   - `plot-latency`: SVG plots of saved compare reports, latency spectra and throughput
//!     with one line per server ([`compare_plot`]).
//! - `peer-tokio-tungstenite`, `peer-fastwebsockets`: WebSocket echo servers on a tokio
//!   current-thread runtime, the way each library's examples write them.
//! - `peer-tokio-tungstenite-broadcast`: a broadcast server with tokio-tungstenite and a
//!   `tokio::sync::broadcast` channel.
//! - `peer-raw-echo`: a TCP echo server on monoio's io_uring runtime with no WebSocket framing,
//!   the ceiling a WebSocket server can approach.
//! - `bench/node`: Node `ws` echo and broadcast servers (`npm ci --prefix bench/node`).
//!
//! Each server is single-threaded, so `taskset -c 0` pins all of it to one core.
//!
//! While a run lasts over a second, `loadgen` draws a progress bar on stderr if stderr is a
//! terminal (`--quiet` turns it off); reports go to stdout, as text or `--json`.
//!
//! ```text
//! cargo build -p ringcast-bench --release
//! target/release/loadgen compare --rounds 3 --duration 5 --idle 10000
//! ```
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod abuse;
pub mod broadcast;
pub mod compare;
pub mod compare_plot;
pub mod echo;
pub mod fanout;
pub mod idle;
pub mod net;
pub mod plot;
pub mod procfs;
pub mod progress;
pub mod stats;
pub mod storm;
pub mod timeline;
mod window;
mod workers;
mod wsconn;

use std::time::Duration;

pub use window::CpuReport;

/// Parses a number of seconds (`5`, `0.5`) into a `Duration`, for command-line flags.
///
/// # Errors
/// Not a number, negative, or not finite.
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}
