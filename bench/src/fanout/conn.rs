//! One connection of the load, a publisher's or a subscriber's, and opening and closing them.

use std::{
    ops::Range,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use mio::{Poll, Registry, Token};
use ringcast_protocol::envelope::Encoding;

use crate::{
    echo::CLOSE_GRACE,
    idle::{self, OpenSet, WorkerConfig, BATCH},
    net::{SourceAddrs, Target},
    wsconn::MioConn,
};

use super::config::FanoutMode;

/// A subscriber's progress through its topic.
#[derive(Debug, Default)]
pub(super) struct SubState {
    /// Its topic's index.
    pub(super) topic: usize,
    /// The subscribe was acknowledged.
    pub(super) acked: bool,
    /// The seq the next message must carry (after the first, or after a `dropped` notice).
    pub(super) next_seq: Option<u64>,
    /// Messages of this run received.
    pub(super) got: u64,
    /// The index of the latest message received.
    pub(super) last: Option<u64>,
    /// Messages announced as dropped.
    pub(super) dropped: u64,
    /// Every message published so far is received or announced as dropped.
    pub(super) done: bool,
}

/// One connection (a subscriber's, or a publisher's) and its subscriber state.
#[derive(Debug)]
pub(super) struct Conn {
    /// Passes text messages on: the JSON envelope travels in them.
    pub(super) ws: MioConn,
    /// Failed; ignored from then on.
    pub(super) dead: bool,
    pub(super) sub: SubState,
}

impl Conn {
    /// [`MioConn::on_ready`], with the subscriber's state passed to `on_message`.
    pub(super) fn on_ready(
        &mut self,
        readable: bool,
        writable: bool,
        scratch: &mut [u8],
        registry: &Registry,
        on_message: &mut dyn FnMut(&mut SubState, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let Self { ws, sub, .. } = self;
        ws.on_ready(readable, writable, scratch, registry, |message| {
            on_message(sub, &message)
        })
    }
}

/// Opens connections `indexes` (each index picks its source address) in batches of
/// [`BATCH`], upgrades each offering `mode`'s subprotocol, and registers them readable with
/// `registry`, token `i` for the `i`-th. Any failure, or a server that does not select the
/// subprotocol, fails the whole set.
pub(super) fn open_conns(
    target: &Target,
    mode: FanoutMode,
    indexes: Range<usize>,
    sources: SourceAddrs,
    open_timeout: Duration,
    registry: &Registry,
) -> Result<Vec<Conn>> {
    let deadline = Instant::now() + open_timeout;
    let protocols: Vec<&str> = mode
        .encoding()
        .map(Encoding::subprotocol)
        .into_iter()
        .collect();
    let mut conns = Vec::with_capacity(indexes.len());
    let mut start = indexes.start;
    while start < indexes.end {
        let batch = start..(start + BATCH).min(indexes.end);
        start = batch.end;
        // A batch at a time, so the first failure ends the open.
        let set = idle::open_range(
            &WorkerConfig {
                target: target.clone(),
                range: batch.clone(),
                raw: false,
                sources,
                open_timeout: deadline.saturating_duration_since(Instant::now()),
                lifetime: Duration::MAX,
            },
            &protocols,
        )?;
        if set.failed > 0 {
            bail!(
                "{} of {} connections failed to open; first: {}",
                set.failed,
                batch.len(),
                set.first_error.as_deref().unwrap_or("?")
            );
        }
        for conn in set.conns {
            let ws = MioConn::register(conn, Token(conns.len()), registry)?.passing_text();
            conns.push(Conn {
                ws,
                dead: false,
                sub: SubState::default(),
            });
        }
    }
    Ok(conns)
}

/// Closes the live connections with the idle load's blocking close, bounded by
/// [`CLOSE_GRACE`].
pub(super) fn close(poll: Poll, conns: Vec<Conn>) {
    let live = OpenSet {
        conns: conns
            .into_iter()
            .filter(|c| !c.dead)
            .filter_map(|c| c.ws.into_blocking(poll.registry()))
            .collect(),
        ..OpenSet::default()
    };
    drop(poll);
    live.close(CLOSE_GRACE);
}
