//! Connections: the slab entry and the shard's table of them.
//!
//! Owns everything one connection holds between events (protocol state, outbound queue, the
//! unfinished tail of its input, its deadline, its upgrade facts) and the table operations a
//! handler can reach through `Ctx`: send, close, look up by id. It performs no reads or writes
//! itself; a driver (`driver/`) moves the bytes and `shard/process.rs` decides what they mean.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    sync::Arc,
    task::Waker,
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
#[cfg(feature = "epoll")]
use monoio::net::tcp::stream_poll::TcpStreamPoll;
use ringcast_protocol::{
    CloseCode, CloseFrame, Codec, FrameHeader, HeadReader, Limits, UpgradeRequest,
};
use slab::Slab;
use tracing::warn;

use crate::types::{
    clock::{Stamp, When},
    ids::{ConnId, ShardId},
};
use crate::{
    config::{EngineConfig, HttpConfig, OverflowPolicy, PubSubConfig},
    conn::{outbound::Outbound, pending::Pending},
    ops::{
        admission::{Gate, RejectReason},
        metrics::ShardMetrics,
    },
    pubsub::{
        data_ring::{ConnPubSub, LocalTopics, TokenBucket},
        hub::Hub,
    },
    types::{
        message::{CloseInfo, CloseInitiator, Enqueue, Frame, Message},
        publish::DeliveryFormat,
    },
};

/// What the upgrade told us about a connection: a view into the connection's state.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo<'a> {
    conn: &'a Conn,
}

impl<'a> ConnInfo<'a> {
    /// The peer's address (`0.0.0.0:0` if the kernel no longer knows it).
    pub fn peer_addr(&self) -> SocketAddr {
        let unknown = || SocketAddr::from(([0, 0, 0, 0], 0));
        match &self.conn.socket {
            // One getpeername(2): kept out of the connection to keep idle connections small.
            Socket::Ring(fd) => socket2::SockRef::from(fd)
                .peer_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .unwrap_or_else(unknown),
            // Read once at accept and cached by the stream.
            #[cfg(feature = "epoll")]
            Socket::Poll(p) => p.io.peer_addr().unwrap_or_else(|_| unknown()),
        }
    }

    /// The request target (path and query) of the upgrade; empty before it completes.
    pub fn target(&self) -> &'a str {
        if self.conn.upgrade.head_kept() {
            self.request().map_or("", |r| r.target())
        } else {
            std::str::from_utf8(self.conn.upgrade.request()).unwrap_or_default()
        }
    }

    /// The path of the upgrade request, without the query.
    pub fn path(&self) -> &'a str {
        let target = self.target();
        target.split_once('?').map_or(target, |(p, _)| p)
    }

    /// The query string of the upgrade request, if any.
    pub fn query(&self) -> Option<&'a str> {
        self.target().split_once('?').map(|(_, q)| q)
    }

    /// The subprotocol selected at the upgrade.
    pub fn subprotocol(&self) -> Option<&'a str> {
        self.conn.upgrade.subprotocol()
    }

    /// The user the handler named when it accepted the upgrade
    /// ([`Upgrade::with_user`](crate::Upgrade::with_user)); for the broker with token auth,
    /// the token's `sub`.
    pub fn user(&self) -> Option<&'a str> {
        self.conn.upgrade.user()
    }

    /// The whole upgrade request, headers included, parsed again from the kept head. `None`
    /// when `io.keep_request_head` is false.
    pub fn request(&self) -> Option<UpgradeRequest<'a>> {
        if !self.conn.upgrade.head_kept() {
            return None;
        }
        UpgradeRequest::parse(self.conn.upgrade.request()).ok()
    }

    /// The first header with this name (ASCII case-insensitive), from the kept head.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.request().and_then(|r| r.header(name))
    }
}

/// Where a connection is in its life.
#[derive(Debug)]
pub(crate) enum Phase {
    /// Reading the upgrade request.
    Handshake(HeadReader),
    /// Upgraded: frames flow.
    Open(Codec),
    /// The last bytes (an HTTP error, the final close frame) are queued: flush them, then shut
    /// down our side.
    Flushing,
    /// Our side is shut down: read and discard until the peer closes or the deadline passes.
    HalfClosed,
    /// Finished (`on_close` ran); the io_uring driver waits here for operations still in
    /// flight on the socket before it closes the descriptor and frees the slot.
    Closed,
}

/// The socket, as the shard's driver operates it.
#[derive(Debug)]
pub(crate) enum Socket {
    /// io_uring driver: the raw socket, operated through the shard's socket ring.
    Ring(OwnedFd),
    /// epoll driver: a monoio poll-io stream driven by its own task (boxed: the fallback path
    /// pays for its size, not every connection).
    #[cfg(feature = "epoll")]
    Poll(Box<PollSocket>),
}

impl Socket {
    /// The socket's descriptor.
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Socket::Ring(fd) => fd.as_raw_fd(),
            #[cfg(feature = "epoll")]
            Socket::Poll(p) => p.io.as_raw_fd(),
        }
    }
}

/// A connection driven by its own task (epoll driver).
#[cfg(feature = "epoll")]
#[derive(Debug)]
pub(crate) struct PollSocket {
    pub(crate) io: TcpStreamPoll,
    /// The task's waker, so other tasks can wake it to write or close.
    pub(crate) waker: Option<Waker>,
}

/// The state of a connection's operations on the socket ring (io_uring driver), in 8 bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UringOps {
    /// The slot of the send in flight in the driver's send table, or `NO_SEND`.
    send: u32,
    flags: u8,
}

const NO_SEND: u32 = u32::MAX;
const RECV_ARMED: u8 = 1;
const RECV_CANCELLING: u8 = 1 << 1;
const SEND_CANCELLING: u8 = 1 << 2;
const DIRTY: u8 = 1 << 3;
const SHUTDOWN_PENDING: u8 = 1 << 4;
const EVICTED: u8 = 1 << 5;

impl Default for UringOps {
    fn default() -> Self {
        Self {
            send: NO_SEND,
            flags: 0,
        }
    }
}

macro_rules! flag {
    ($get:ident, $set:ident, $bit:ident, $doc:literal) => {
        #[doc = $doc]
        pub(crate) fn $get(&self) -> bool {
            self.flags & $bit != 0
        }

        pub(crate) fn $set(&mut self, on: bool) {
            if on {
                self.flags |= $bit;
            } else {
                self.flags &= !$bit;
            }
        }
    };
}

impl UringOps {
    flag!(
        recv_armed,
        set_recv_armed,
        RECV_ARMED,
        "A multishot receive is armed (or being cancelled)."
    );
    flag!(
        recv_cancelling,
        set_recv_cancelling,
        RECV_CANCELLING,
        "A cancellation of the receive has not completed."
    );
    flag!(
        send_cancelling,
        set_send_cancelling,
        SEND_CANCELLING,
        "A cancellation of the send has not completed."
    );
    flag!(
        dirty,
        set_dirty,
        DIRTY,
        "The connection is in the driver's dirty list."
    );
    flag!(
        shutdown_pending,
        set_shutdown_pending,
        SHUTDOWN_PENDING,
        "A write shutdown was submitted and has not completed: the descriptor must stay open."
    );
    flag!(
        evicted,
        set_evicted,
        EVICTED,
        "Evicted before its upgrade (counted in `Pending::evicting` until released). Kept \
         here for both drivers."
    );

    /// The slot of the send in flight, if any.
    pub(crate) fn send_slot(&self) -> Option<u32> {
        (self.send != NO_SEND).then_some(self.send)
    }

    pub(crate) fn set_send_slot(&mut self, slot: Option<u32>) {
        self.send = slot.unwrap_or(NO_SEND);
    }
}

/// One connection's state between events: a slab entry.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) gen: u32,
    pub(crate) socket: Socket,
    /// Read anywhere; assigned only by the session transitions below (`Conn::open`,
    /// `ConnTable::flush_and_close`, `ConnTable::half_closed`, `Conn::end_sends`,
    /// `Conn::finished`), so the state machine is in one place.
    pub(crate) phase: Phase,
    pub(crate) out: Outbound,
    /// Received bytes of a frame (or head) that is not complete yet.
    pub(crate) tail: Tail,
    /// When the connection's current deadline (handshake, close, flush) passes.
    pub(crate) deadline: Option<When>,
    /// The subprotocol and the upgrade request head (or only its target when heads are not
    /// kept), in one allocation.
    upgrade: UpgradeFacts,
    /// How the connection is ending, once that is known (boxed: rare, and per connection).
    pub(crate) close: Option<Box<CloseInfo>>,
    /// Subscriptions, the data ring and budgets, once the connection uses pub/sub.
    pub(crate) pubsub: Option<Box<ConnPubSub>>,
    pub(crate) uring: UringOps,
    /// When the last bytes arrived from the peer (any frame: liveness).
    pub(crate) heard: Stamp,
    /// When the peer last sent a message (text or binary: idleness).
    pub(crate) spoke: Stamp,
    /// When the outstanding ping went out, while nothing has been heard since.
    pub(crate) ping_out: Option<Stamp>,
    /// Until when the connection is paused: its publish budget is empty (see
    /// [`ConnTable::throttle`]). Cleared by the deadline that ends it, or a close.
    pub(crate) throttle: Option<Stamp>,
}

/// The session state machine: the only code that assigns [`Phase`]. Handshake → Open (the
/// upgrade) → Flushing (the last bytes are queued) → HalfClosed (our side is shut down) →
/// Closed (`on_close` ran); a refused upgrade goes Handshake → Flushing.
impl Conn {
    /// The upgrade completed: frames flow.
    pub(crate) fn open(&mut self, codec: Codec) {
        self.phase = Phase::Open(codec);
    }

    /// The connection is ending and `on_close` is about to run: from here sends return
    /// `Enqueue::Closed`.
    pub(crate) fn end_sends(&mut self) {
        self.phase = Phase::HalfClosed;
    }

    /// `on_close` ran: the connection is finished (the io_uring driver still waits here for
    /// operations in flight).
    pub(crate) fn finished(&mut self) {
        self.phase = Phase::Closed;
    }
}

impl Conn {
    fn new(gen: u32, socket: Socket) -> Self {
        Self {
            gen,
            socket,
            phase: Phase::Handshake(HeadReader::new()),
            out: Outbound::default(),
            tail: Tail::default(),
            deadline: None,
            upgrade: UpgradeFacts::default(),
            close: None,
            pubsub: None,
            uring: UringOps::default(),
            heard: Stamp::START,
            spoke: Stamp::START,
            ping_out: None,
            throttle: None,
        }
    }

    pub(crate) fn info(&self) -> ConnInfo<'_> {
        ConnInfo { conn: self }
    }

    /// Records the upgrade's facts.
    pub(crate) fn set_upgraded(
        &mut self,
        req: &UpgradeRequest<'_>,
        head: &[u8],
        facts: Upgraded<'_>,
    ) {
        let request = if facts.head_kept {
            head
        } else {
            req.target().as_bytes()
        };
        self.upgrade = UpgradeFacts::new(&facts, request);
    }

    /// The user the handler named at the upgrade, and the address counted for the
    /// per-address cap: what the connection holds in the admission counts.
    pub(crate) fn admitted(&self) -> (Option<&str>, Option<IpAddr>) {
        (self.upgrade.user(), self.upgrade.counted_ip())
    }

    /// The upgrade completed and `on_open` ran, so `on_close` is owed.
    pub(crate) fn opened(&self) -> bool {
        self.upgrade.is_set()
    }

    /// Moves the codec's owed frames (pongs, close frames) onto the outbound queue. They are
    /// control frames: never subject to the outbound limit.
    pub(crate) fn queue_transmits(&mut self) {
        if let Phase::Open(codec) = &mut self.phase {
            while let Some(frame) = codec.poll_transmit() {
                self.out.push_encoded(frame);
            }
        }
    }

    /// Records how the connection ends, unless that is already known.
    pub(crate) fn note_close(&mut self, code: CloseCode, reason: &str, by: CloseInitiator) {
        if self.close.is_none() {
            self.close = Some(Box::new(CloseInfo {
                code,
                reason: reason.to_owned(),
                initiator: by,
            }));
        }
    }
}

/// Received bytes of an unfinished frame or head, boxed: most connections have none, so an
/// idle one pays 8 bytes instead of a `BytesMut`'s 32.
#[derive(Debug, Default)]
pub(crate) struct Tail(Option<Box<BytesMut>>);

impl Tail {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|b| b.is_empty())
    }

    #[cfg(feature = "epoll")]
    pub(crate) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |b| b.len())
    }

    #[cfg(feature = "epoll")]
    pub(crate) fn as_slice(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], |b| &b[..])
    }

    /// The buffer, created if there is none.
    pub(crate) fn get_mut(&mut self) -> &mut BytesMut {
        self.0.get_or_insert_with(Default::default)
    }

    /// Takes the bytes out, leaving nothing.
    pub(crate) fn take(&mut self) -> BytesMut {
        self.0.take().map(|b| *b).unwrap_or_default()
    }

    /// Keeps `buf` if it holds bytes; frees everything if it is empty.
    pub(crate) fn put(&mut self, buf: BytesMut) {
        self.0 = (!buf.is_empty()).then(|| Box::new(buf));
    }
}

/// What the upgrade settled, in one buffer: a 5-byte header (flags, the subprotocol's
/// length, the user's length), the peer address when it was counted against
/// `admission.max_connections_per_ip` (4 or 16 bytes), the subprotocol, the user, then the
/// request (the whole head, or only its target). Empty until the upgrade completes.
#[derive(Debug, Default)]
struct UpgradeFacts(Box<[u8]>);

impl UpgradeFacts {
    /// Flag: the request is the whole head.
    const HEAD_KEPT: u8 = 1;
    /// Flag: an IPv4 address (4 bytes) follows the header.
    const IP4: u8 = 2;
    /// Flag: an IPv6 address (16 bytes) follows the header.
    const IP6: u8 = 4;
    const HEADER: usize = 5;

    fn new(facts: &Upgraded<'_>, request: &[u8]) -> Self {
        // Header values are capped by max_header_bytes, far below 64 KiB.
        fn clip(s: &str) -> &[u8] {
            &s.as_bytes()[..s.len().min(usize::from(u16::MAX))]
        }
        let sub = clip(facts.subprotocol.unwrap_or_default());
        let user = clip(facts.user.unwrap_or_default());
        let (ip_flag, ip): (u8, Vec<u8>) = match facts.counted_ip {
            None => (0, Vec::new()),
            Some(IpAddr::V4(a)) => (Self::IP4, a.octets().to_vec()),
            Some(IpAddr::V6(a)) => (Self::IP6, a.octets().to_vec()),
        };
        let flags = ip_flag | if facts.head_kept { Self::HEAD_KEPT } else { 0 };
        let mut buf =
            Vec::with_capacity(Self::HEADER + ip.len() + sub.len() + user.len() + request.len());
        buf.push(flags);
        buf.extend_from_slice(&(sub.len() as u16).to_be_bytes());
        buf.extend_from_slice(&(user.len() as u16).to_be_bytes());
        buf.extend_from_slice(&ip);
        buf.extend_from_slice(sub);
        buf.extend_from_slice(user);
        buf.extend_from_slice(request);
        Self(buf.into_boxed_slice())
    }

    /// Set at the upgrade: empty before it.
    fn is_set(&self) -> bool {
        !self.0.is_empty()
    }

    fn flags(&self) -> u8 {
        self.0.first().copied().unwrap_or(0)
    }

    fn head_kept(&self) -> bool {
        self.flags() & Self::HEAD_KEPT != 0
    }

    fn len_at(&self, at: usize) -> usize {
        match self.0.get(at..at + 2) {
            Some(&[a, b]) => usize::from(u16::from_be_bytes([a, b])),
            _ => 0,
        }
    }

    fn ip_len(&self) -> usize {
        match self.flags() {
            f if f & Self::IP4 != 0 => 4,
            f if f & Self::IP6 != 0 => 16,
            _ => 0,
        }
    }

    /// The peer address counted against the per-address cap, if it was.
    fn counted_ip(&self) -> Option<IpAddr> {
        let at = Self::HEADER;
        match self.ip_len() {
            4 => <[u8; 4]>::try_from(&self.0[at..at + 4])
                .ok()
                .map(IpAddr::from),
            16 => <[u8; 16]>::try_from(&self.0[at..at + 16])
                .ok()
                .map(IpAddr::from),
            _ => None,
        }
    }

    /// The text at `at` of `len` bytes, if any.
    fn text(&self, at: usize, len: usize) -> Option<&str> {
        (len > 0)
            .then(|| std::str::from_utf8(self.0.get(at..at + len)?).ok())
            .flatten()
    }

    fn subprotocol(&self) -> Option<&str> {
        self.text(Self::HEADER + self.ip_len(), self.len_at(1))
    }

    fn user(&self) -> Option<&str> {
        self.text(
            Self::HEADER + self.ip_len() + self.len_at(1),
            self.len_at(3),
        )
    }

    fn request(&self) -> &[u8] {
        let at = Self::HEADER + self.ip_len() + self.len_at(1) + self.len_at(3);
        self.0.get(at..).unwrap_or_default()
    }
}

/// What an accepted upgrade settled, beside the request itself.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Upgraded<'a> {
    pub(crate) subprotocol: Option<&'a str>,
    pub(crate) user: Option<&'a str>,
    /// The peer address, when it was counted against the per-address cap.
    pub(crate) counted_ip: Option<IpAddr>,
    pub(crate) head_kept: bool,
}

/// The answer to a connection refused at accept: its address holds
/// `admission.max_pending_handshakes_per_ip` unfinished upgrades.
pub(crate) fn pending_ip_refusal() -> Bytes {
    ringcast_protocol::http_response(429, &[], "too many unfinished upgrades from this address")
}

/// The answer to an unfinished upgrade evicted to make room for a new connection.
pub(crate) fn evicted_response() -> Bytes {
    ringcast_protocol::http_response(
        503,
        &[("Retry-After", "1")],
        "server busy: unfinished upgrades are dropped, oldest first; send the request at once",
    )
}

/// The answer to an upgrade while the engine drains.
pub(crate) fn draining_response() -> Bytes {
    ringcast_protocol::http_response(503, &[("Retry-After", "1")], "server shutting down")
}

/// Per-shard settings copied out of the config, read on the hot path.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) limits: Limits,
    pub(crate) max_outbound_bytes: usize,
    pub(crate) overflow: OverflowPolicy,
    pub(crate) max_connections: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) ping_interval: Duration,
    pub(crate) pong_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    #[cfg(feature = "epoll")]
    pub(crate) read_buffer_bytes: usize,
    #[cfg(feature = "epoll")]
    pub(crate) max_reads_per_turn: usize,
    pub(crate) keep_request_head: bool,
    pub(crate) tcp_nodelay: bool,
    pub(crate) pubsub: PubSubConfig,
    pub(crate) http: HttpConfig,
    /// Upgrades per second and burst per shard; 0 is unshaped.
    pub(crate) upgrade_rate: (u32, u32),
    pub(crate) drain_window: Duration,
    pub(crate) compression: crate::config::CompressionConfig,
}

impl Settings {
    pub(crate) fn new(config: &EngineConfig) -> Self {
        Self {
            limits: config.protocol_limits(),
            max_outbound_bytes: config.limits.max_outbound_bytes,
            overflow: config.limits.outbound_overflow,
            max_connections: config.limits.max_connections_per_shard,
            handshake_timeout: config.timeouts.handshake_timeout,
            close_timeout: config.timeouts.close_timeout,
            shutdown_timeout: config.timeouts.shutdown_timeout,
            ping_interval: config.timeouts.ping_interval,
            pong_timeout: config.timeouts.pong_timeout,
            idle_timeout: config.timeouts.idle_timeout,
            #[cfg(feature = "epoll")]
            read_buffer_bytes: config.io.read_buffer_bytes,
            #[cfg(feature = "epoll")]
            max_reads_per_turn: config.io.max_reads_per_turn,
            keep_request_head: config.io.keep_request_head,
            tcp_nodelay: config.io.tcp_nodelay,
            pubsub: config.pubsub.clone(),
            http: config.http.clone(),
            upgrade_rate: {
                let a = &config.admission;
                let burst = if a.upgrade_burst == 0 {
                    a.upgrades_per_sec
                } else {
                    a.upgrade_burst
                };
                (a.upgrades_per_sec, burst)
            },
            drain_window: config.timeouts.drain_window,
            compression: config.compression.clone(),
        }
    }
}

/// The most slab entries reserved up front (virtual memory only until used).
const MAX_SLAB_RESERVE: usize = 1 << 18;

/// Slab entries and timer-heap entries a shard reserves at start: the connection cap, plus
/// the evicted connections a full shard may hold while their sockets close.
pub(crate) fn reservation(settings: &Settings) -> usize {
    settings.max_connections.min(MAX_SLAB_RESERVE) + crate::conn::pending::EVICT_IN_FLIGHT
}

/// A shard's connections and the operations on them.
#[derive(Debug)]
pub(crate) struct ConnTable {
    pub(crate) shard: ShardId,
    pub(crate) conns: Slab<Conn>,
    pub(crate) settings: Settings,
    pub(crate) metrics: Arc<ShardMetrics>,
    next_gen: u32,
    /// Set once the shard stops: no new connections, every open one is being closed.
    pub(crate) stopping: bool,
    /// Set when a stop begins: the listener still accepts through the drain window, but
    /// upgrades get 503 and readiness answers 503 "draining" (so load balancers see it).
    pub(crate) draining: bool,
    /// The accept loop, parked while the table is full.
    pub(crate) accept_waker: Option<Waker>,
    /// The shard's main task, parked while stopping until the table is empty.
    pub(crate) empty_waker: Option<Waker>,
    /// io_uring driver: connections with work for the driver (writes, phase changes).
    pub(crate) dirty: Vec<usize>,
    /// io_uring driver: deadlines as (when, slot, generation); stale entries are skipped.
    pub(crate) timers: BinaryHeap<Reverse<(When, u32, u32)>>,
    /// io_uring driver: its task, woken when work arrives from outside it.
    pub(crate) driver_waker: Option<Waker>,
    /// io_uring driver: its task is running now (so it need not be woken).
    pub(crate) driver_running: bool,
    /// A publish from one of this shard's connections is delivered to the shard's own
    /// subscribers at once, not through its inbox (io_uring driver).
    pub(crate) same_turn_delivery: bool,
    /// Topics with subscribers here.
    pub(crate) topics: LocalTopics,
    /// Every topic of the process.
    pub(crate) hub: Arc<Hub>,
    /// The drivers' coarse clock, read when bytes arrive: set once per io_uring loop turn,
    /// and before each read on the epoll driver.
    pub(crate) now: Stamp,
    /// Admission checks shared by every shard.
    pub(crate) gate: Arc<Gate>,
    /// This shard's upgrade rate (`admission.upgrades_per_sec`), when shaped.
    pub(crate) upgrade_bucket: Option<TokenBucket>,
    /// Connections still sending their upgrade request, oldest first.
    pub(crate) pending: Pending,
}

impl ConnTable {
    pub(crate) fn new(
        shard: ShardId,
        settings: Settings,
        metrics: Arc<ShardMetrics>,
        hub: Arc<Hub>,
        gate: Arc<Gate>,
    ) -> Self {
        // Reserve the slab and the timer heap once: growing by doubling left every old copy
        // resident (about 700 bytes per connection at 10,000 for the slab; about 55 for the
        // heap, which holds an entry per open connection since heartbeats). Untouched pages
        // of a reservation cost no RSS.
        let reserve = reservation(&settings);
        let settings_rate = settings.upgrade_rate;
        Self {
            shard,
            conns: Slab::with_capacity(reserve),
            settings,
            metrics,
            next_gen: 0,
            stopping: false,
            draining: false,
            accept_waker: None,
            empty_waker: None,
            dirty: Vec::new(),
            timers: BinaryHeap::with_capacity(reserve),
            driver_waker: None,
            driver_running: false,
            same_turn_delivery: false,
            topics: LocalTopics::default(),
            hub,
            now: Stamp::now(),
            gate,
            upgrade_bucket: (settings_rate.0 > 0)
                .then(|| TokenBucket::new(f64::from(settings_rate.0), f64::from(settings_rate.1))),
            pending: Pending::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.conns.len()
    }

    /// Adds a connection in its handshake phase, with its handshake deadline, to the
    /// pending list (counted under `pending_ip` from [`ConnTable::admit_pending`]); returns
    /// its slab key and generation.
    pub(crate) fn insert(&mut self, socket: Socket, pending_ip: Option<IpAddr>) -> (usize, u32) {
        self.next_gen = self.next_gen.wrapping_add(1);
        let gen = self.next_gen;
        let key = self.conns.insert(Conn::new(gen, socket));
        self.pending.add(key, gen, pending_ip);
        self.set_deadline(key, self.settings.handshake_timeout);
        (key, gen)
    }

    /// At accept, before the connection is inserted: counts it under its peer's address
    /// (`admission.max_pending_handshakes_per_ip`). `Ok` with the address counted (`None`
    /// when addresses are not capped or the peer is already gone), `Err` when the address
    /// holds the cap: the caller refuses it ([`pending_ip_refusal`]) and counts the refusal
    /// with [`ConnTable::refused_pending`].
    pub(crate) fn admit_pending(
        &mut self,
        peer: impl FnOnce() -> Option<SocketAddr>,
    ) -> Result<Option<IpAddr>, ()> {
        if !self.gate.counts_pending() {
            return Ok(None);
        }
        let Some(peer) = peer() else {
            return Ok(None);
        };
        let key = crate::ops::admission::pending_key(peer.ip());
        if self.gate.acquire_pending(key) {
            Ok(Some(key))
        } else {
            Err(())
        }
    }

    /// Counts (and logs, rate-limited) a connection refused at accept by
    /// [`ConnTable::admit_pending`].
    pub(crate) fn refused_pending(&mut self) {
        self.metrics.rejected(RejectReason::PendingIpCap);
        self.pending.shed(self.shard, 0, 1, None);
    }

    /// The connection leaves its handshake phase (upgraded, refused, or ending): off the
    /// pending list, and its count under its address given back. Called by every transition
    /// out of `Phase::Handshake`; nothing for a connection in another phase.
    pub(crate) fn left_handshake(&mut self, key: usize) {
        let conn = &self.conns[key];
        if !matches!(conn.phase, Phase::Handshake(_)) {
            return;
        }
        if let Some(ip) = self.pending.remove(key, conn.gen) {
            self.gate.release_pending(ip);
        }
    }

    /// Arms (or re-arms) the connection's single deadline.
    pub(crate) fn set_deadline(&mut self, key: usize, after: Duration) {
        let when = When::from_instant(Instant::now() + after);
        let conn = &mut self.conns[key];
        conn.deadline = Some(when);
        match conn.socket {
            Socket::Ring(_) => self.timers.push(Reverse((when, key as u32, conn.gen))),
            #[cfg(feature = "epoll")]
            Socket::Poll(_) => {}
        }
    }

    /// Pauses connection `key` for `wait` (its publish or subscribe budget is empty; the
    /// refusal's retry hint names the same wait): the rest of what was read waits, unparsed, in its tail
    /// (`Shard::process` stops), and its socket is not read (`wants_read`). Its deadline
    /// ends the pause (`Shard::end_throttle`), armed here unless it is due sooner. A
    /// connection that is closing is not paused: its peer's close frame must be read.
    pub(crate) fn throttle(&mut self, key: usize, wait: Duration) {
        let conn = &mut self.conns[key];
        let Phase::Open(codec) = &conn.phase else {
            return;
        };
        if codec.close_state() != ringcast_protocol::CloseState::Open {
            return;
        }
        // Millisecond stamps: round up, so the pause never ends before the bucket refills.
        let wait = Duration::from_millis(wait.as_micros().div_ceil(1000).max(1) as u64);
        let now = Instant::now();
        if conn.throttle.is_none() {
            self.metrics.throttled.incr();
        }
        conn.throttle = Some(Stamp::from_instant(now + wait));
        let when = When::from_instant(now + wait);
        if conn.deadline.is_none_or(|d| d > when) {
            self.set_deadline(key, wait);
        }
    }

    /// Tells the connection's driver there is work for it: bytes to write, a phase change.
    /// `running` is the connection whose code is running now (epoll driver: its own task
    /// notices without a wake).
    #[cfg_attr(not(feature = "epoll"), allow(unused_variables))]
    pub(crate) fn notify(&mut self, key: usize, running: usize) {
        let conn = &mut self.conns[key];
        match &mut conn.socket {
            Socket::Ring(_) => {
                if !conn.uring.dirty() {
                    conn.uring.set_dirty(true);
                    self.dirty.push(key);
                }
                if !self.driver_running {
                    if let Some(w) = &self.driver_waker {
                        w.wake_by_ref();
                    }
                }
            }
            #[cfg(feature = "epoll")]
            Socket::Poll(p) => {
                if key != running {
                    if let Some(w) = p.waker.take() {
                        w.wake();
                    }
                }
            }
        }
    }

    pub(crate) fn id_of(&self, key: usize) -> ConnId {
        ConnId {
            shard: self.shard,
            slot: key as u32,
            gen: self.conns[key].gen,
        }
    }

    /// The slab key of a live connection with this id.
    pub(crate) fn key_of(&self, id: ConnId) -> Option<usize> {
        let key = id.slot as usize;
        (id.shard == self.shard && self.conns.get(key).is_some_and(|c| c.gen == id.gen))
            .then_some(key)
    }

    pub(crate) fn info(&self, key: usize) -> ConnInfo<'_> {
        self.conns[key].info()
    }

    /// Queues `msg`, compressed when the connection negotiated permessage-deflate and the
    /// message reaches the threshold. It is compressed only once it is sure to be queued: with
    /// context takeover a compressed message that was then dropped would corrupt the peer's
    /// decompression context.
    pub(crate) fn send_message(&mut self, key: usize, msg: &Message, running: usize) -> Enqueue {
        let payload = msg.payload();
        let header = FrameHeader::new(msg.opcode(), payload.len() as u64);
        // The uncompressed size stands for the compressed one in the limit check (an upper
        // bound within a few bytes).
        let len = header.encoded_len() + payload.len();
        self.enqueue(key, len, running, |conn, metrics| {
            if let Phase::Open(codec) = &mut conn.phase {
                if codec.compresses(payload.len()) {
                    let started = std::time::Instant::now();
                    if let Some(frame) = codec.compressed_message(msg.opcode(), payload) {
                        metrics.deflated(started, payload.len(), &frame);
                        conn.out.push_encoded(frame);
                        return;
                    }
                }
            }
            conn.out.push_frame(&header, payload.clone())
        })
    }

    pub(crate) fn send_frame(&mut self, key: usize, frame: &Frame, running: usize) -> Enqueue {
        self.enqueue(key, frame.len(), running, |conn, _| {
            conn.out.push_encoded(frame.0.clone())
        })
    }

    fn enqueue(
        &mut self,
        key: usize,
        len: usize,
        running: usize,
        push: impl FnOnce(&mut Conn, &ShardMetrics),
    ) -> Enqueue {
        let max = self.settings.max_outbound_bytes;
        let conn = &mut self.conns[key];
        let Phase::Open(codec) = &conn.phase else {
            return Enqueue::Closed;
        };
        if !codec.can_send() {
            return Enqueue::Closed;
        }
        let queued = conn.out.len_bytes();
        // A reply to the connection being handled is always queued: that connection's reads
        // pause instead (see `wants_read`), which bounds it. The policy is for traffic from
        // elsewhere. An empty queue always takes one message, so an oversized one can go.
        let reply = key == running;
        if !reply && queued > 0 && queued.saturating_add(len) > max {
            return match self.settings.overflow {
                OverflowPolicy::DropNewest => {
                    self.metrics.outbound_dropped.incr();
                    Enqueue::Dropped
                }
                OverflowPolicy::Disconnect => {
                    self.metrics.slow_consumer_closes.incr();
                    let dropped = self.conns[key].out.truncate_unstarted();
                    self.metrics.outbound_dropped.add(1);
                    tracing::debug!(conn = %self.id_of(key), dropped, "slow consumer");
                    self.close(
                        key,
                        CloseCode::POLICY,
                        "slow consumer",
                        CloseInitiator::Server,
                        running,
                    );
                    Enqueue::Disconnect
                }
            };
        }
        let conn = &mut self.conns[key];
        push(conn, &self.metrics);
        self.metrics.messages_out.incr();
        if queued == 0 {
            self.notify(key, running);
        }
        Enqueue::Queued
    }

    /// Starts the closing handshake on `key`: queue the close frame, arm the close deadline.
    pub(crate) fn close(
        &mut self,
        key: usize,
        code: CloseCode,
        reason: &str,
        by: CloseInitiator,
        running: usize,
    ) {
        let close_timeout = self.settings.close_timeout;
        let code = if code.is_valid_on_wire() {
            code
        } else {
            warn!(
                code = code.as_u16(),
                "close code may not be sent; using 1011 instead"
            );
            CloseCode::INTERNAL_ERROR
        };
        let conn = &mut self.conns[key];
        let Phase::Open(codec) = &mut conn.phase else {
            return;
        };
        if codec.close(Some(CloseFrame::new(code, reason))) {
            // A paused connection is read again: its peer's close frame must come in.
            conn.throttle = None;
            conn.note_close(code, reason, by);
            conn.queue_transmits();
            self.set_deadline(key, close_timeout);
            self.notify(key, running);
        }
    }

    /// Marks the shard as draining: ones still in the handshake get 503, as will every
    /// upgrade from now on (the listener still accepts, so probes get an answer). Open
    /// connections are closed afterwards, one by one, by [`ConnTable::drain_close`]; then
    /// [`ConnTable::stop_accepting`].
    pub(crate) fn begin_stop(&mut self) {
        self.draining = true;
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            match conn.phase {
                Phase::Handshake(_) => {
                    self.reject(key, RejectReason::Draining, draining_response());
                    self.notify(key, usize::MAX);
                }
                Phase::Flushing | Phase::HalfClosed => self.notify(key, usize::MAX),
                Phase::Open(_) | Phase::Closed => {}
            }
        }
        if let Some(w) = &self.driver_waker {
            w.wake_by_ref();
        }
    }

    /// Refuses an upgrade: counts it under `reason`, queues the HTTP answer and closes.
    pub(crate) fn reject(&mut self, key: usize, reason: RejectReason, response: Bytes) {
        self.metrics.rejected(reason);
        self.respond_and_close(key, response);
    }

    /// Queues an HTTP response to a connection still in its handshake, then flushes and
    /// closes it within `close_timeout`.
    pub(crate) fn respond_and_close(&mut self, key: usize, response: Bytes) {
        self.conns[key].out.push_encoded(response);
        self.flush_and_close(key);
    }

    /// Everything the connection owes is queued (an HTTP error, the final close frame): flush
    /// it, then shut down our side, within `close_timeout`.
    pub(crate) fn flush_and_close(&mut self, key: usize) {
        self.left_handshake(key);
        self.conns[key].phase = Phase::Flushing;
        self.set_deadline(key, self.settings.close_timeout);
    }

    /// The driver sent our FIN after flushing: read and discard until the peer closes or
    /// `close_timeout` passes (the half-close).
    pub(crate) fn half_closed(&mut self, key: usize) {
        self.conns[key].phase = Phase::HalfClosed;
        self.set_deadline(key, self.settings.close_timeout);
    }

    /// The drain window is over: stop accepting and wait for the table to empty.
    pub(crate) fn stop_accepting(&mut self) {
        self.stopping = true;
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        if let Some(w) = &self.driver_waker {
            w.wake_by_ref();
        }
    }

    /// Drain: ends one open connection with 1012 "service restart", after what is queued for
    /// it (all of a must-deliver connection's data ring, see `flush_for_close`) and, for
    /// envelope clients, a `shutdown` notice. The connection has `time_left` (until the
    /// shutdown deadline, not `close_timeout`) to take what was flushed and answer: a
    /// must-deliver client may be reading a full data ring. Returns (messages flushed,
    /// messages dropped).
    pub(crate) fn drain_close(&mut self, key: usize, time_left: Duration) -> (u64, u64) {
        let conn = &self.conns[key];
        if !matches!(&conn.phase, Phase::Open(codec) if codec.can_send()) {
            return (0, 0);
        }
        let (flushed, dropped) = self.flush_for_close(key);
        let conn = &mut self.conns[key];
        if let Some(DeliveryFormat::Envelope(enc)) = conn.pubsub.as_ref().map(|ps| ps.format) {
            conn.out.push_encoded(crate::pubsub::notices::shutdown(enc));
        }
        self.close(
            key,
            CloseCode::SERVICE_RESTART,
            "service restart",
            CloseInitiator::Server,
            usize::MAX,
        );
        self.set_deadline(key, time_left);
        self.metrics.drain_flushed.add(flushed);
        self.metrics.drain_dropped.add(dropped);
        (flushed, dropped)
    }
}
