//! The fan-out load: N subscribers over T topics, publishers at a fixed rate, and the latency
//! from each message's publish time to its delivery at every subscriber.
//!
//! Three modes ([`FanoutMode`]):
//! - `envelope-json` and `envelope-bin`, against the ringcast broker (`ringcast serve`): each
//!   subscriber connection offers the mode's subprotocol (`ringcast.v1.json` or
//!   `ringcast.v1.bin`), subscribes to one topic (subscriber `i` to `fanout.{i % T}`) and waits
//!   for its ack before the load starts; the publisher connections publish round-robin over the
//!   topics and count the broker's acks and errors. The broker limits each connection's
//!   publishes (`pubsub.publish_rate_per_sec`, 1000 by default), so run it with
//!   `-c bench/ringcast-fanout.toml`, which lifts that limit, or spread the rate over more
//!   publishers ([`FanoutConfig::publishers`]).
//! - `raw`, against an all-to-all broadcast server (`ringcast serve --broadcast`,
//!   `peer-tokio-tungstenite-broadcast`, `bench/node/broadcast.js`): subscribers only connect,
//!   since every connection receives every message; the publishers send binary messages, and
//!   their own copies are read and ignored. `ringcast serve --broadcast` applies the same
//!   publish limit (silently: it drops what is over budget), so it needs the config file too.
//!
//! Publishing follows a schedule, as the fixed-rate echo does ([`crate::echo::rate`]): message
//! `m` is due `m / rate` seconds after the start, goes out on publisher `m % P` to topic
//! `fanout.{m % T}`, and is sent when due whether or not earlier ones were delivered. Its
//! payload carries its *due* time in `CLOCK_MONOTONIC` nanoseconds ([`monotonic_ns`]), a clock
//! every process of the host shares, so a subscriber in another process computes the latency
//! as receive time less due time: lateness in sending counts (no coordinated omission). A
//! binary payload (`envelope-bin`, `raw`) starts with the timestamp as [`TS_BYTES`]
//! little-endian bytes followed by a byte pattern; a JSON one is the array `[TS,"xx…x"]`. Both
//! are padded to exactly `--size` bytes. A subscriber reads the clock once per readiness event,
//! so messages that arrive in one read share a receive time.
//!
//! What is measured: messages due inside the window (`[warmup, warmup + duration)` after the
//! start). The report gives the deliveries expected for those that were sent (every subscriber
//! of the message's topic) and those received, the server's `dropped` notices (envelope modes),
//! the deliveries still in flight when the load stopped (see below),
//! the deliveries that arrived while the window was open (per second, and per 100 ms), latency
//! percentiles, the server's CPU time per delivery and the client's CPU time (all its
//! processes). In the envelope modes each subscriber checks that seq rises by exactly one except
//! where a `dropped` notice announced the gap; anything else is a seq error.
//!
//! A server that falls behind delivers late rather than not at all, and past the drain its
//! subscribers still wait for messages due in the window: leaving those out would report the
//! latency of the lucky ones only. So, as the fixed-rate echo does with unanswered messages,
//! each measured message a subscriber has not received when it stops, and that comes after the
//! last one it did receive (delivery is in order per topic), is recorded in the latency at the
//! latency it had reached, a lower bound, and counted as in flight. A message missing before
//! the last one received was dropped (announced or not) and has no latency.
//!
//! Spinning ([`FanoutConfig::spin`], `--spin`): the subscribers busy-poll their sockets
//! (`epoll_wait` with a zero timeout, yielding the core when nothing is ready) from `go` to the
//! end, so a delivery is read as it lands rather than after the client's own wake-up, which on
//! a VM can cost tens of microseconds. It costs a core per subscriber process, and helps only
//! on a core the client has to itself: on a crowded one a spinning thread loses the wake-up
//! priority a sleeping one has, and latency gets worse. The publishers still sleep until each
//! message is due (their lateness is the report's `send lag`).
//!
//! Processes: the subscribers are split over worker processes (this binary re-executed with the
//! hidden `fanout-worker` subcommand, see `workers.rs`), or run on a thread of this process when
//! there is one. Each drives all its connections from one thread on one mio `Poll`,
//! edge-triggered, like the echo load's default driver. The publishers run in this process: a
//! ticker thread sleeps (timer slack 1 ns) until each due time and wakes the publishers' `Poll`.
//! The processes talk in lines: a worker prints `ready N` once its N subscribers are
//! subscribed; the parent sends `go T0 TOTAL` (the start in monotonic nanoseconds, set
//! [`START_LEAD`] ahead, and how many messages the schedule holds); the worker answers
//! `started`; the parent sends `end SENT` once the publishers are done; the worker prints
//! `result JSON`, whose latency histogram travels as `(value, count)` buckets and is merged in
//! the parent.
//!
//! Bounded: opening and subscribing have a deadline, the publishers stop [`DRAIN_TIMEOUT`] after
//! the window even when behind, a subscriber process stops once each of its subscribers has
//! every message (or a notice of its loss) or [`DRAIN_TIMEOUT`] after `end`, and has a hard
//! deadline of its own, and closing waits at most [`CLOSE_GRACE`].
//!
//! Where things are: `config.rs`, the mode, the config, its checks and its split into parts;
//! `message.rs`, the shared clock, the payload and the topics; `publisher.rs`, the publishing
//! loop and its ticker; `subscriber.rs`, one part's subscribers and what they measure;
//! `fleet.rs`, the parts as a thread or worker processes and the lines they exchange;
//! `conn.rs`, opening and closing the connections; `report.rs`, the report and its plots.

mod config;
mod conn;
mod fleet;
mod message;
mod publisher;
mod report;
mod subscriber;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};
use mio::Poll;

use self::{
    config::{subscriber_parts, validate},
    conn::{close, open_conns},
    fleet::{Command, Fleet},
    message::Clock,
    publisher::{publish, Plan},
    report::report,
};
pub use self::{
    config::{FanoutConfig, FanoutMode},
    fleet::fanout_worker,
    message::monotonic_ns,
    report::{plot, FanoutReport},
    subscriber::{SubscriberPart, SubscriberResult},
};
use crate::echo::{
    rate::{Schedule, DRAIN_TIMEOUT},
    CLOSE_GRACE,
};

/// Bytes of the timestamp at the start of a binary payload (little-endian nanoseconds).
pub const TS_BYTES: usize = 8;

/// The smallest JSON payload: `[` + a timestamp of up to 20 digits + `,""]`.
pub const MIN_JSON_PAYLOAD_BYTES: usize = 25;

/// Topic `t` is named `fanout.{t}`.
pub const TOPIC_PREFIX: &str = "fanout.";

/// How far ahead of the first message the start is set, so that every subscriber process has
/// it before any message arrives (the parent checks that each answered `started` in time).
pub const START_LEAD: Duration = Duration::from_millis(500);

/// Bytes one `read` may return; the buffer is shared by one process's connections.
const READ_BYTES: usize = 64 << 10;

/// The longest one `epoll_wait` blocks, so phase changes and commands are never later.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// Margin on each deadline one process sets for another's work.
const SLACK: Duration = Duration::from_secs(10);

/// Runs the load and reports; see the module docs.
///
/// # Errors
/// A bad config; a connection, handshake or subscription fails before the load starts; a
/// worker process fails or misses a deadline; a publisher connection fails; or the server's
/// `/proc` entries cannot be read. Failures of subscriber connections during the load, drops
/// and refused publishes are counted in the report instead (see [`FanoutReport::check`]).
pub fn run_fanout(cfg: &FanoutConfig) -> Result<FanoutReport> {
    validate(cfg)?;
    let procs = cfg.procs();
    let parts = subscriber_parts(cfg, procs);
    let mut fleet = Fleet::start(&parts)?;
    let opened = fleet.ready(Instant::now() + cfg.open_timeout + SLACK)?;
    ensure!(
        opened == cfg.subs,
        "{opened} of {} subscribers are ready",
        cfg.subs
    );

    let mut poll = Poll::new().context("creating the epoll instance")?;
    let mut pubs = open_conns(
        cfg.publish_target.as_ref().unwrap_or(&cfg.target),
        cfg.mode,
        cfg.subs..cfg.subs + cfg.publishers,
        cfg.sources,
        cfg.open_timeout,
        poll.registry(),
    )?;

    let schedule = Schedule::new(cfg.rate);
    let plan = Plan {
        schedule,
        total: schedule.first_at_or_after(cfg.warmup + cfg.duration),
        first_measured: schedule.first_at_or_after(cfg.warmup),
        clock: Clock::now(),
    };
    let t0 = plan.clock.at + START_LEAD;
    fleet.tell(&Command::Go {
        t0_ns: plan.clock.ns(t0),
        total: plan.total,
    });
    fleet.started(t0)?;
    let outcome = publish(cfg, &mut poll, &mut pubs, &plan, t0);
    // Whatever happened, let the subscribers finish before reading their results.
    let sent = outcome.as_ref().map_or(0, |o| o.sent);
    fleet.tell(&Command::End { sent });
    close(poll, pubs);
    let outcome = outcome?;
    let results = fleet.results(Instant::now() + DRAIN_TIMEOUT + CLOSE_GRACE + SLACK)?;
    Ok(report(cfg, procs, &plan, &outcome, &results))
}
