//! The idle-connection load: open many WebSocket connections, hold them, and measure what
//! they cost the server in user-space memory (its RSS) and the kernel (slab, socket buffers).
//!
//! Connections are opened with blocking sockets in batches of [`BATCH`]: connect the batch and
//! send every upgrade request, then read every response. One process holds at most
//! [`MAX_CONNS_PER_PROCESS`] (the open-files limit is 20,000 and cannot be raised), so a larger
//! count is split over child processes (see `workers.rs`): this binary re-executed with the
//! hidden `idle-worker` subcommand, which reports `ready OPENED FAILED` on stdout, holds until
//! its stdin says `close` (or ends, or its own deadline passes), closes, and reports
//! `closed N`.
//!
//! Kernel numbers are system-wide and, on loopback, include both ends of every connection
//! (the client's sockets too). Every wait has a deadline.

use std::{
    io::{self, BufRead as _, Read as _, Write as _},
    net::{Shutdown, TcpStream},
    ops::Range,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::{Buf as _, BytesMut};
use ringcast_protocol::{ClientHandshake, CloseCode, CloseFrame, Codec, HeadReader, Limits};
use serde::{Deserialize, Serialize};

use crate::{
    net::{self, SourceAddrs, Target},
    procfs::{self, KernelMemory, ProcessMemory},
    progress::Progress,
    workers::{slices, Children},
};

/// Connections opened (and closed) together: connected and sent their request before the
/// first response is read. Well under the listen backlog the peers ask for.
pub const BATCH: usize = 256;

/// The most connections one process holds: the 20,000 open-files limit less some headroom.
pub const MAX_CONNS_PER_PROCESS: usize = 19_000;

/// Above this many connections the work is split over child processes by default.
pub const AUTO_CONNS_PER_PROCESS: usize = 15_000;

/// How long one connect, one response or one close may take.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// How long closing all of one holder's connections may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest upgrade response head accepted, in bytes.
const MAX_RESPONSE_HEAD_BYTES: usize = 16 << 10;

/// What to run.
#[derive(Debug, Clone)]
pub struct IdleConfig {
    /// The server.
    pub target: Target,
    /// Connections to open.
    pub conns: usize,
    /// Processes to spread them over; 0 picks `ceil(conns / 15000)`. With 1 this process
    /// holds them itself.
    pub procs: usize,
    /// How long to keep them open after measuring.
    pub hold: Duration,
    /// The server's process, whose memory is measured.
    pub server_pid: u32,
    /// Plain TCP connections (no upgrade), for a raw TCP server.
    pub raw: bool,
    /// Source addresses for the connections.
    pub sources: SourceAddrs,
    /// Deadline for opening all connections.
    pub open_timeout: Duration,
    /// Deadline for the server's RSS to stop changing once all are open.
    pub settle_timeout: Duration,
    /// Draw a progress bar on stderr while opening (when it is a terminal and opening takes
    /// over a second; with one process only).
    pub progress: bool,
}

impl IdleConfig {
    /// The defaults for `target` and `server_pid`: 10,000 connections, processes chosen
    /// automatically, held 1 s.
    pub fn new(target: Target, server_pid: u32) -> Self {
        Self {
            target,
            conns: 10_000,
            procs: 0,
            hold: Duration::from_secs(1),
            server_pid,
            raw: false,
            sources: SourceAddrs::default(),
            open_timeout: Duration::from_secs(120),
            settle_timeout: Duration::from_secs(15),
            progress: false,
        }
    }
}

/// What one idle run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleReport {
    /// `"ws"` or `"raw"`.
    pub mode: String,
    /// Connections asked for.
    pub conns_requested: usize,
    /// Connections open (handshake complete) while measuring.
    pub opened: usize,
    /// Connections that failed to open.
    pub failed: usize,
    /// Processes that held them.
    pub procs: usize,
    /// Seconds to open them all.
    pub open_secs: f64,
    /// Seconds until the server's RSS stopped changing.
    pub settle_secs: f64,
    /// Whether it stopped changing before the deadline.
    pub settled: bool,
    /// The server's memory before the first connection.
    pub server_before: ProcessMemory,
    /// The server's memory with all connections open.
    pub server_after: ProcessMemory,
    /// Kernel memory before the first connection.
    pub kernel_before: KernelMemory,
    /// Kernel memory with all connections open.
    pub kernel_after: KernelMemory,
    /// Server `VmRSS` growth per open connection, in bytes.
    pub rss_bytes_per_conn: f64,
    /// Server `RssAnon` growth per open connection, in bytes.
    pub rss_anon_bytes_per_conn: f64,
    /// Growth of slab objects in use per connection, in bytes (both ends of the loopback
    /// connection); see [`KernelMemory::slab_objects_bytes`]. The most direct kernel figure.
    pub kernel_slab_objects_bytes_per_conn: Option<f64>,
    /// `Slab` growth per connection, in bytes (both ends). Low when earlier runs left free
    /// objects in slab pages.
    pub kernel_slab_bytes_per_conn: f64,
    /// `SUnreclaim` growth per connection, in bytes (both ends).
    pub kernel_unreclaimable_bytes_per_conn: f64,
    /// TCP socket buffer growth per connection, in bytes (both ends).
    pub kernel_tcp_buffer_bytes_per_conn: f64,
    /// Connections closed with a complete closing handshake (or, raw, an orderly TCP close).
    pub closed_cleanly: usize,
}

impl IdleReport {
    /// A few human-readable lines.
    pub fn human(&self) -> String {
        let kib = |b: u64| b as f64 / 1024.0;
        format!(
            "idle {mode}: {opened}/{req} conns open ({failed} failed) over {procs} process(es) in \
             {open:.1} s; server settled in {settle:.1} s{unsettled}\n  \
             server user space: {rss:.0} B/conn VmRSS, {anon:.0} B/conn RssAnon \
             (VmRSS {rb:.0} -> {ra:.0} KiB)\n  \
             kernel (both ends): {objects} B/conn slab objects, {slab:.0} B/conn Slab, \
             {unrec:.0} B/conn SUnreclaim, {tcp:.0} B/conn TCP buffers\n  \
             closed cleanly: {closed}",
            mode = self.mode,
            opened = self.opened,
            req = self.conns_requested,
            failed = self.failed,
            procs = self.procs,
            open = self.open_secs,
            settle = self.settle_secs,
            unsettled = if self.settled { "" } else { " (not settled)" },
            rss = self.rss_bytes_per_conn,
            anon = self.rss_anon_bytes_per_conn,
            rb = kib(self.server_before.rss_bytes),
            ra = kib(self.server_after.rss_bytes),
            objects = self
                .kernel_slab_objects_bytes_per_conn
                .map_or_else(|| "-".to_owned(), |b| format!("{b:.0}")),
            slab = self.kernel_slab_bytes_per_conn,
            unrec = self.kernel_unreclaimable_bytes_per_conn,
            tcp = self.kernel_tcp_buffer_bytes_per_conn,
            closed = self.closed_cleanly,
        )
    }
}

/// The processes `conns` connections are spread over: `procs`, or for 0 one per
/// [`AUTO_CONNS_PER_PROCESS`].
///
/// # Errors
/// That puts more than [`MAX_CONNS_PER_PROCESS`] connections in one process.
pub(crate) fn processes(conns: usize, procs: usize) -> Result<usize> {
    let procs = if procs == 0 {
        conns.div_ceil(AUTO_CONNS_PER_PROCESS)
    } else {
        procs
    };
    ensure!(
        conns.div_ceil(procs) <= MAX_CONNS_PER_PROCESS,
        "{conns} connections over {procs} process(es) is more than {MAX_CONNS_PER_PROCESS} per \
         process; raise --procs"
    );
    Ok(procs)
}

/// Opens, measures, holds and closes; see the module docs.
///
/// # Errors
/// A bad config, the server's `/proc` entries cannot be read, a worker process fails or
/// misses its deadline, or no connection at all could be opened.
pub fn run_idle(cfg: &IdleConfig) -> Result<IdleReport> {
    ensure!(cfg.conns > 0, "--conns must be at least 1");
    let procs = processes(cfg.conns, cfg.procs)?;
    // Fail before opening anything if the sources run out.
    cfg.sources.for_index(cfg.conns - 1)?;

    let server_before = procfs::process_memory(cfg.server_pid)?;
    let kernel_before = procfs::kernel_memory()?;
    let started = Instant::now();
    let mut holder = if procs == 1 {
        let worker = WorkerConfig {
            target: cfg.target.clone(),
            range: 0..cfg.conns,
            raw: cfg.raw,
            sources: cfg.sources,
            open_timeout: cfg.open_timeout,
            lifetime: Duration::MAX,
        };
        let mut bar = Progress::new(cfg.progress, "idle", cfg.conns as u64);
        let set = open_range_with(&worker, &[], &mut |set| {
            let opened = set.conns.len();
            bar.update(Instant::now(), opened as u64, || {
                format!("{opened} open, {} failed", set.failed)
            });
        })?;
        bar.finish();
        Holder::Local(set)
    } else {
        Holder::Workers(Workers::spawn(cfg, procs)?)
    };
    let (opened, failed) = holder.counts();
    let open_secs = started.elapsed().as_secs_f64();
    if opened == 0 {
        holder.close();
        bail!("no connection could be opened");
    }

    let settle_start = Instant::now();
    let (server_after, settled) = settle(cfg.server_pid, cfg.settle_timeout)?;
    let settle_secs = settle_start.elapsed().as_secs_f64();
    let kernel_after = procfs::kernel_memory()?;

    thread::sleep(cfg.hold);
    let closed_cleanly = holder.close();

    let per = |before: u64, after: u64| (after as f64 - before as f64) / opened as f64;
    Ok(IdleReport {
        mode: if cfg.raw { "raw" } else { "ws" }.to_owned(),
        conns_requested: cfg.conns,
        opened,
        failed,
        procs,
        open_secs,
        settle_secs,
        settled,
        server_before,
        server_after,
        kernel_before,
        kernel_after,
        rss_bytes_per_conn: per(server_before.rss_bytes, server_after.rss_bytes),
        rss_anon_bytes_per_conn: per(server_before.rss_anon_bytes, server_after.rss_anon_bytes),
        kernel_slab_objects_bytes_per_conn: kernel_before
            .slab_objects_bytes
            .zip(kernel_after.slab_objects_bytes)
            .map(|(before, after)| per(before, after)),
        kernel_slab_bytes_per_conn: per(kernel_before.slab_bytes, kernel_after.slab_bytes),
        kernel_unreclaimable_bytes_per_conn: per(
            kernel_before.slab_unreclaimable_bytes,
            kernel_after.slab_unreclaimable_bytes,
        ),
        kernel_tcp_buffer_bytes_per_conn: per(
            kernel_before.tcp_buffer_bytes,
            kernel_after.tcp_buffer_bytes,
        ),
        closed_cleanly,
    })
}

/// Polls the server's memory every 200 ms until `VmRSS` is unchanged (within 64 KiB) for five
/// readings in a row, or `timeout` passes. Returns the last reading and whether it settled.
fn settle(pid: u32, timeout: Duration) -> Result<(ProcessMemory, bool)> {
    const INTERVAL: Duration = Duration::from_millis(200);
    const STABLE_READINGS: u32 = 5;
    const TOLERANCE_BYTES: u64 = 64 << 10;
    let deadline = Instant::now() + timeout;
    let mut last = procfs::process_memory(pid)?;
    let mut stable = 0;
    while Instant::now() < deadline {
        thread::sleep(INTERVAL);
        let now = procfs::process_memory(pid)?;
        if now.rss_bytes.abs_diff(last.rss_bytes) <= TOLERANCE_BYTES {
            stable += 1;
            if stable >= STABLE_READINGS {
                return Ok((now, true));
            }
        } else {
            stable = 0;
        }
        last = now;
    }
    Ok((last, false))
}

/// Who holds the connections: this process, or worker processes.
enum Holder {
    Local(OpenSet),
    Workers(Workers),
}

impl Holder {
    fn counts(&self) -> (usize, usize) {
        match self {
            Self::Local(set) => (set.conns.len(), set.failed),
            Self::Workers(w) => (w.opened, w.failed),
        }
    }

    /// Closes everything; returns how many closed cleanly.
    fn close(&mut self) -> usize {
        match self {
            Self::Local(set) => std::mem::take(set).close(CLOSE_TIMEOUT),
            Self::Workers(w) => w.close(),
        }
    }
}

/// What one holder (this process or a worker) opens.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The server.
    pub target: Target,
    /// Global connection indexes to open (they pick the source addresses).
    pub range: Range<usize>,
    /// Plain TCP instead of WebSocket.
    pub raw: bool,
    /// Source addresses, shared by all holders.
    pub sources: SourceAddrs,
    /// Deadline for opening.
    pub open_timeout: Duration,
    /// The longest a worker process lives before closing on its own.
    pub lifetime: Duration,
}

/// Open connections and the count that failed to open.
#[derive(Debug, Default)]
pub(crate) struct OpenSet {
    pub(crate) conns: Vec<IdleConn>,
    pub(crate) failed: usize,
    pub(crate) first_error: Option<String>,
}

/// An open, upgraded (unless raw) blocking connection.
#[derive(Debug)]
pub(crate) struct IdleConn {
    pub(crate) stream: TcpStream,
    /// The client codec; `None` for raw TCP.
    pub(crate) codec: Option<Codec>,
    /// Bytes that came after the upgrade response, not yet parsed.
    pub(crate) rest: BytesMut,
}

/// Opens the connections of `cfg.range`, in batches, until done or the open deadline passes
/// (the rest count as failed). Each upgrade offers `protocols` (none: no subprotocol header);
/// when some are offered, a server that selects none of them fails that connection.
pub(crate) fn open_range(cfg: &WorkerConfig, protocols: &[&str]) -> Result<OpenSet> {
    open_range_with(cfg, protocols, &mut |_| {})
}

/// [`open_range`], calling `batch_done(set)` after each batch (for a progress bar).
pub(crate) fn open_range_with(
    cfg: &WorkerConfig,
    protocols: &[&str],
    batch_done: &mut dyn FnMut(&OpenSet),
) -> Result<OpenSet> {
    raise_fd_limit();
    let deadline = Instant::now() + cfg.open_timeout;
    let mut set = OpenSet {
        conns: Vec::with_capacity(cfg.range.len()),
        ..OpenSet::default()
    };
    let indexes: Vec<usize> = cfg.range.clone().collect();
    for batch in indexes.chunks(BATCH) {
        if Instant::now() > deadline {
            set.failed += batch.len();
            continue;
        }
        // Connect the whole batch and send every request, then read every response.
        let mut pending = Vec::with_capacity(batch.len());
        for &i in batch {
            match start_conn(cfg, protocols, i, deadline) {
                Ok(p) => pending.push(p),
                Err(e) => set.fail(&e),
            }
        }
        for (stream, handshake) in pending {
            match finish_conn(stream, handshake.as_ref(), protocols, deadline) {
                Ok(conn) => set.conns.push(conn),
                Err(e) => set.fail(&e),
            }
        }
        batch_done(&set);
    }
    Ok(set)
}

impl OpenSet {
    fn fail(&mut self, err: &anyhow::Error) {
        self.failed += 1;
        self.first_error.get_or_insert_with(|| format!("{err:#}"));
    }

    /// Closes every connection, a batch at a time: send the close frame (raw: shut down the
    /// write side), then read until the server's TCP close, all `within` a limit. Returns how
    /// many closed cleanly; the rest are dropped (reset or plain TCP close).
    pub(crate) fn close(self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        let mut clean = 0;
        let mut conns = self.conns;
        while !conns.is_empty() {
            let batch: Vec<IdleConn> = conns.drain(..conns.len().min(BATCH)).collect();
            let mut sent = Vec::with_capacity(batch.len());
            for mut conn in batch {
                if send_close(&mut conn).is_ok() {
                    sent.push(conn);
                }
            }
            for conn in sent {
                if Instant::now() < deadline && await_eof(&conn.stream, deadline) {
                    clean += 1;
                }
            }
        }
        clean
    }
}

fn send_close(conn: &mut IdleConn) -> io::Result<()> {
    match &mut conn.codec {
        Some(codec) => {
            codec.close(Some(CloseFrame::new(CloseCode::NORMAL, "")));
            while let Some(frame) = codec.poll_transmit() {
                conn.stream.write_all(&frame)?;
            }
            Ok(())
        }
        None => conn.stream.shutdown(Shutdown::Write),
    }
}

/// Reads (and discards the server's close frame) until end of stream; `false` on error or
/// timeout.
fn await_eof(stream: &TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 512];
    let mut stream = stream;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left.min(IO_TIMEOUT))).is_err() {
            return false;
        }
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

/// Connects connection `index` and sends its upgrade request, offering `protocols`.
fn start_conn(
    cfg: &WorkerConfig,
    protocols: &[&str],
    index: usize,
    deadline: Instant,
) -> Result<(TcpStream, Option<ClientHandshake>)> {
    let source = cfg.sources.for_index(index)?;
    let timeout = deadline
        .saturating_duration_since(Instant::now())
        .min(IO_TIMEOUT)
        .max(Duration::from_millis(1));
    let mut stream = net::connect_from(source, cfg.target.addr, timeout)
        .with_context(|| format!("connecting from {source}"))?;
    if cfg.raw {
        return Ok((stream, None));
    }
    let handshake = ClientHandshake::new(fastrand::u128(..).to_ne_bytes(), protocols);
    stream.write_all(&handshake.request(&cfg.target.host, &cfg.target.path, &[]))?;
    Ok((stream, Some(handshake)))
}

/// Reads and checks the upgrade response, and that the server selected one of `protocols`
/// if any were offered. Keeps any bytes that came after the response head.
fn finish_conn(
    mut stream: TcpStream,
    handshake: Option<&ClientHandshake>,
    protocols: &[&str],
    deadline: Instant,
) -> Result<IdleConn> {
    let Some(handshake) = handshake else {
        return Ok(IdleConn {
            stream,
            codec: None,
            rest: BytesMut::new(),
        });
    };
    let mut buf = BytesMut::with_capacity(1024);
    let mut head = HeadReader::new();
    let mut chunk = [0u8; 1024];
    let head_len = loop {
        if let Some(len) = head.poll_head(&buf, MAX_RESPONSE_HEAD_BYTES)? {
            break len;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(
            !left.is_zero(),
            "the open deadline passed during the handshake"
        );
        stream.set_read_timeout(Some(left.min(IO_TIMEOUT)))?;
        match stream
            .read(&mut chunk)
            .context("reading the upgrade response")?
        {
            0 => bail!("the server closed during the handshake"),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let selected = handshake.check_response(&buf[..head_len])?;
    if !protocols.is_empty() {
        // Only ringcast's envelope subprotocols are ever offered.
        ensure!(
            selected.as_deref().is_some_and(|p| protocols.contains(&p)),
            "the server did not select the subprotocol {} (is it the ringcast broker?)",
            protocols.join(" or ")
        );
    }
    buf.advance(head_len);
    Ok(IdleConn {
        stream,
        codec: Some(Codec::client(Limits::default(), fastrand::u64(..))),
        rest: buf,
    })
}

/// Raises the soft open-files limit to the hard one (best effort).
pub(crate) fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max
    {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit read just above, with cur raised to max.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// The body of the hidden `idle-worker` subcommand: opens `cfg.range`, prints
/// `ready OPENED FAILED` to stdout, holds until stdin says `close` or ends (or `cfg.lifetime`
/// passes), closes, prints `closed N` and returns.
///
/// # Errors
/// Stdout cannot be written.
pub fn idle_worker(cfg: &WorkerConfig) -> Result<()> {
    let born = Instant::now();
    let set = open_range(cfg, &[])?;
    if let Some(err) = &set.first_error {
        eprintln!("idle-worker: {} failed, first: {err}", set.failed);
    }
    let mut out = io::stdout().lock();
    writeln!(out, "ready {} {}", set.conns.len(), set.failed)?;
    out.flush()?;

    // Read stdin on a thread so the wait itself has a deadline.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        loop {
            line.clear();
            match io::stdin().lock().read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.trim() == "close" => break,
                Ok(_) => {}
            }
        }
        let _ = tx.send(());
    });
    let left = cfg.lifetime.saturating_sub(born.elapsed());
    let _ = rx.recv_timeout(left);

    let closed = set.close(CLOSE_TIMEOUT);
    writeln!(out, "closed {closed}")?;
    out.flush()?;
    Ok(())
}

/// Worker processes holding connections for [`run_idle`].
struct Workers {
    children: Children,
    opened: usize,
    failed: usize,
}

impl Workers {
    /// Starts `procs` workers over equal slices of the connections and waits (bounded) for
    /// each to report `ready`.
    fn spawn(cfg: &IdleConfig, procs: usize) -> Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        // Long enough for the parent to settle, hold and close; a worker never outlives it.
        let lifetime = cfg.open_timeout + cfg.settle_timeout + cfg.hold + Duration::from_secs(60);
        let url = format!("ws://{}{}", cfg.target.host, cfg.target.path);
        let mut arg_lists = Vec::with_capacity(procs);
        for range in slices(cfg.conns, procs) {
            let mut args: Vec<String> = vec!["idle-worker".into(), "--url".into(), url.clone()];
            for (flag, value) in [
                ("--first-index", range.start.to_string()),
                ("--count", range.len().to_string()),
                ("--first-source", cfg.sources.first.to_string()),
                ("--per-addr", cfg.sources.per_addr.to_string()),
                ("--open-timeout", cfg.open_timeout.as_secs_f64().to_string()),
                ("--lifetime", lifetime.as_secs_f64().to_string()),
            ] {
                args.push(flag.to_owned());
                args.push(value);
            }
            if cfg.raw {
                args.push("--raw".to_owned());
            }
            arg_lists.push(args);
        }
        let mut children = Children::spawn(&exe, &arg_lists)?;
        let deadline = Instant::now() + cfg.open_timeout + Duration::from_secs(10);
        let ready = children.collect_all(
            "ready ",
            deadline,
            |_, _| {},
            "idle workers were ready by the deadline",
        )?;
        let (mut opened, mut failed) = (0, 0);
        for line in &ready {
            let mut parts = line.split_ascii_whitespace();
            let mut num = || parts.next().and_then(|n| n.parse::<usize>().ok());
            opened += num().unwrap_or(0);
            failed += num().unwrap_or(0);
        }
        Ok(Self {
            children,
            opened,
            failed,
        })
    }

    /// Tells every worker to close, waits (bounded) for their `closed N` lines and exits, and
    /// kills any that miss the deadline. Returns the total closed cleanly.
    fn close(&mut self) -> usize {
        self.children.tell_all("close");
        let deadline = Instant::now() + Duration::from_secs(90);
        let closed = self
            .children
            .collect("closed ", deadline, |_, _| {})
            .iter()
            .flatten()
            .map(|n| n.trim().parse::<usize>().unwrap_or(0))
            .sum();
        self.children.finish(Duration::from_secs(5));
        closed
    }
}
