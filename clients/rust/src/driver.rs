//! The client's one task: connects, resubscribes every topic from its last seq, pumps frames
//! through `ringcast-protocol`'s codec, answers the application's commands, and decides when
//! and how soon to reconnect. It owns every topic's position; nothing else mutates it.
//!
//! It must not implement any of the wire itself: handshake bytes, frames and envelopes all come
//! from `ringcast_protocol`.

use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    future::Future,
    io,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use ringcast_protocol::{
    envelope::{self, AckPosition, Dialect, Request, ServerMessage, SubscribeTopic},
    ClientHandshake, CloseCode, CloseFrame, Codec, Event as WsEvent, HandshakeError, HeadReader,
    Limits,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        tcp::{OwnedReadHalf, OwnedWriteHalf},
        TcpStream,
    },
    sync::{mpsc, oneshot, watch},
};

use crate::{
    config::{Config, Encoding, QueuePolicy, Token, Url},
    Data, Error, Event, Published, Status,
};

/// The largest response head the client reads at the upgrade.
const MAX_RESPONSE_HEAD_BYTES: usize = 16 * 1024;

/// The answer to a subscribe: the events' receiver and the subscription's generation.
pub(crate) type SubscribeReply = oneshot::Sender<Result<(mpsc::Receiver<Event>, u64), Error>>;

/// What the application asks of the task.
pub(crate) enum Command {
    Subscribe {
        topic: String,
        /// Resume after this seq, in this epoch if known.
        since: Option<(u64, Option<u64>)>,
        reply: SubscribeReply,
    },
    Unsubscribe {
        topic: String,
        /// Only the subscription of this generation: a newer one on the same topic stays.
        generation: u64,
    },
    Publish {
        topic: String,
        data: Data,
        reply: oneshot::Sender<Result<Published, Error>>,
    },
    Close,
}

/// One subscribed topic and where the application stands in it.
struct Topic {
    events: mpsc::Sender<Event>,
    generation: u64,
    /// The epoch (if known) and the last seq the application was given, or the position the
    /// subscription started from. What the next resubscribe sends as `since`.
    last: Option<(Option<u64>, u64)>,
    /// Whether the next message must be `last + 1` (false only before the first message of a
    /// subscription that started live, whose first seq may be later).
    contiguous: bool,
    /// Until the first ack: the caller's reply and the receiver it will get.
    waiting: Option<(SubscribeReply, mpsc::Receiver<Event>)>,
    /// Events that arrived before the first ack, delivered right after it.
    early: Vec<Event>,
}

/// What a subscribe's ack leaves to do.
#[derive(Default)]
struct Acked {
    /// Topics whose caller went away before the ack: unsubscribe them.
    abandoned: Vec<String>,
    /// Events held until the ack, now to deliver.
    early: Vec<(mpsc::Sender<Event>, Vec<Event>)>,
}

struct QueuedPublish {
    topic: String,
    data: Data,
    reply: oneshot::Sender<Result<Published, Error>>,
}

/// A request sent on this connection and not answered yet.
enum Inflight {
    Publish(oneshot::Sender<Result<Published, Error>>),
    /// The topics (and their generations) the subscribe named.
    Subscribe(Vec<(String, u64)>),
    /// Unsubscribe or ping: nothing waits on the answer.
    Other,
}

/// A subscribe to send again: the session it was refused on, and its topics with their
/// generations.
type Retry = (u64, Vec<(String, u64)>);

/// Why a session ended, which decides the delay before the next attempt.
enum End {
    /// The application closed the client.
    Stop,
    /// Close 1012 or a `shutdown` notice: reconnect after a random delay.
    Restart,
    /// Close 1008 "token expired": ask for a token and reconnect at once.
    TokenExpired,
    /// Anything else: back off.
    Lost,
}

/// Why an attempt to connect failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("upgrade: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("the server selected no ringcast subprotocol")]
    NoSubprotocol,
}

/// Frame bytes waiting for the writer above which the client takes no new command (it keeps
/// reading, so the server, which may have paused reading this connection until its replies
/// drain, is never waited on by a client that waits on it).
const MAX_PENDING_WRITE_BYTES: usize = 1 << 20;

/// The most bytes the writer gathers into one write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// An upgraded connection: the read half here, the write half in a writer task fed through a
/// channel, so sending never stops the client from reading.
struct Conn {
    reader: OwnedReadHalf,
    /// `None` once [`Conn::finish`] let the writer run out.
    writer: Option<mpsc::UnboundedSender<Bytes>>,
    /// Bytes handed to the writer and not yet written.
    pending: Arc<AtomicUsize>,
    /// Ends with the first write error (or when the channel closes).
    written: tokio::task::JoinHandle<io::Result<()>>,
    codec: Codec,
    dialect: Dialect,
    rbuf: BytesMut,
    wbuf: BytesMut,
}

impl Conn {
    fn new(stream: TcpStream, codec: Codec, dialect: Dialect, rbuf: BytesMut) -> Self {
        let (reader, write_half) = stream.into_split();
        let (writer, frames) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let written = tokio::spawn(write_loop(write_half, frames, pending.clone()));
        Self {
            reader,
            writer: Some(writer),
            pending,
            written,
            codec,
            dialect,
            rbuf,
            wbuf: BytesMut::with_capacity(1024),
        }
    }

    /// Queues one request for the writer.
    fn send(&mut self, req: &Request<'_>) -> io::Result<()> {
        if !self.codec.can_send() {
            return Err(io::Error::other("the connection is closing"));
        }
        let encoding = self.dialect.encoding();
        let payload = envelope::encode_request(encoding, req);
        self.codec
            .encode_frame(true, encoding.opcode(), &payload, &mut self.wbuf);
        let frame = self.wbuf.split().freeze();
        self.push(frame)
    }

    fn push(&mut self, frame: Bytes) -> io::Result<()> {
        self.pending.fetch_add(frame.len(), Ordering::Relaxed);
        self.writer
            .as_ref()
            .and_then(|w| w.send(frame).ok())
            .ok_or_else(|| io::Error::other("the writer stopped"))
    }

    /// Queues what the codec owes (pongs, the close echo).
    fn flush_transmits(&mut self) -> io::Result<()> {
        while let Some(frame) = self.codec.poll_transmit() {
            self.push(frame)?;
        }
        Ok(())
    }

    /// Lets the writer send what is queued (the close frame) and shut down, for at most
    /// `within`.
    async fn finish(mut self, within: Duration) {
        self.writer = None;
        let _ = tokio::time::timeout(within, &mut self.written).await;
    }

    /// Whether the writer has room for what a new command may add.
    fn can_take_commands(&self) -> bool {
        self.pending.load(Ordering::Relaxed) < MAX_PENDING_WRITE_BYTES
    }
}

impl Drop for Conn {
    /// A connection given up on (lost, silent) may have a write that never completes: the
    /// writer goes with it.
    fn drop(&mut self) {
        self.written.abort();
    }
}

/// Writes queued frames, several per write when they are waiting. Once the channel closes
/// (the session is over) it writes what is left and shuts the write side down.
async fn write_loop(
    mut half: OwnedWriteHalf,
    mut frames: mpsc::UnboundedReceiver<Bytes>,
    pending: Arc<AtomicUsize>,
) -> io::Result<()> {
    let mut batch = BytesMut::with_capacity(WRITE_BATCH_BYTES);
    while let Some(frame) = frames.recv().await {
        batch.extend_from_slice(&frame);
        while batch.len() < WRITE_BATCH_BYTES {
            match frames.try_recv() {
                Ok(frame) => batch.extend_from_slice(&frame),
                Err(_) => break,
            }
        }
        half.write_all(&batch).await?;
        pending.fetch_sub(batch.len(), Ordering::Relaxed);
        batch.clear();
    }
    half.shutdown().await
}

pub(crate) struct Driver {
    config: Config,
    url: Url,
    commands: mpsc::UnboundedReceiver<Command>,
    status: watch::Sender<Status>,
    topics: HashMap<String, Topic>,
    queue: VecDeque<QueuedPublish>,
    inflight: HashMap<u64, Inflight>,
    next_id: u64,
    next_generation: u64,
    /// Failed attempts since the last stable connection: the backoff exponent.
    attempt: u32,
    rng: fastrand::Rng,
    /// Counts connections, so a retry timer from an earlier one is ignored.
    session: u64,
    /// Subscribes refused with `rate_limited` or `unavailable`, due again after the server's
    /// hint: (session, topics with generations).
    retries: (mpsc::UnboundedSender<Retry>, mpsc::UnboundedReceiver<Retry>),
}

impl Driver {
    pub(crate) fn new(
        config: Config,
        commands: mpsc::UnboundedReceiver<Command>,
        status: watch::Sender<Status>,
    ) -> Result<Self, Error> {
        Ok(Self {
            url: Url::parse(&config.url)?,
            config,
            commands,
            status,
            topics: HashMap::new(),
            queue: VecDeque::new(),
            inflight: HashMap::new(),
            next_id: 1,
            next_generation: 1,
            attempt: 0,
            rng: fastrand::Rng::new(),
            session: 0,
            retries: mpsc::unbounded_channel(),
        })
    }

    pub(crate) async fn run(mut self) {
        let reason = self.reconnect_loop().await;
        self.stop(reason);
    }

    async fn reconnect_loop(&mut self) -> Error {
        let mut delay = Duration::ZERO;
        loop {
            if !delay.is_zero() && self.offline(tokio::time::sleep(delay)).await.is_none() {
                return Error::Closed;
            }
            let token = match &self.config.token {
                Token::None => None,
                Token::Static(token) => Some(token.clone()),
                Token::Callback(f) => match self.offline(f()).await {
                    None => return Error::Closed,
                    Some(Ok(token)) => Some(token),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "the token callback failed; backing off");
                        delay = self.backoff();
                        continue;
                    }
                },
            };
            let attempt = tokio::time::timeout(
                self.config.connect_timeout,
                connect(
                    self.url.clone(),
                    self.config.encoding,
                    self.config.headers.clone(),
                    token,
                    self.rng.u64(..),
                ),
            );
            let conn = match self.offline(attempt).await {
                None => return Error::Closed,
                Some(Ok(Ok(conn))) => conn,
                Some(Ok(Err(ConnectError::Status { status, body })))
                    if status == 401 || status == 403 =>
                {
                    return Error::Unauthorized { status, body };
                }
                Some(Ok(Err(e))) => {
                    delay = self.backoff();
                    self.log_failure(&e.to_string(), delay);
                    continue;
                }
                Some(Err(_)) => {
                    delay = self.backoff();
                    self.log_failure("timed out", delay);
                    continue;
                }
            };
            let started = Instant::now();
            let end = self.session(conn).await;
            self.connection_lost();
            if started.elapsed() >= self.config.stable_after {
                self.attempt = 0;
            }
            delay = match end {
                End::Stop => return Error::Closed,
                End::Restart => self.random_upto(self.config.restart_delay_max),
                End::TokenExpired => Duration::ZERO,
                End::Lost => self.backoff(),
            };
        }
    }

    /// The first failure in a row is a warning (an operator watching `ringcast sub` sees why
    /// nothing comes); the retries after it are debug lines.
    fn log_failure(&self, error: &str, retry_in: Duration) {
        if self.attempt <= 1 {
            tracing::warn!(url = %self.config.url, error, ?retry_in, "cannot connect; retrying");
        } else {
            tracing::debug!(url = %self.config.url, error, ?retry_in, attempt = self.attempt,
                "cannot connect; retrying");
        }
    }

    /// Full jitter: a random delay up to [`backoff_ceiling`] for this attempt.
    fn backoff(&mut self) -> Duration {
        let ceiling = backoff_ceiling(
            self.config.backoff_min,
            self.config.backoff_max,
            self.attempt,
        );
        self.attempt = self.attempt.saturating_add(1);
        self.random_upto(ceiling)
    }

    fn random_upto(&mut self, ceiling: Duration) -> Duration {
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.u64(0..=nanos))
    }

    /// Runs `fut` while answering commands as a disconnected client does. `None` when the
    /// application closed the client (or dropped every handle).
    async fn offline<F: Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Some(out),
                cmd = self.commands.recv() => match cmd {
                    None | Some(Command::Close) => return None,
                    Some(cmd) => self.command_offline(cmd),
                },
            }
        }
    }

    fn command_offline(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe {
                topic,
                since,
                reply,
            } => {
                self.add_topic(topic, since, reply);
            }
            Command::Unsubscribe { topic, generation } => {
                self.remove_topic(&topic, generation);
            }
            Command::Publish { topic, data, reply } => match self.config.queue {
                QueuePolicy::FailFast => {
                    let _ = reply.send(Err(Error::Disconnected));
                }
                QueuePolicy::Queue(max) if self.queue.len() >= max => {
                    let _ = reply.send(Err(Error::QueueFull));
                }
                QueuePolicy::Queue(_) => self.queue.push_back(QueuedPublish { topic, data, reply }),
            },
            Command::Close => {}
        }
    }

    /// Files a new subscription; `false` if the topic already has one (the caller was told).
    fn add_topic(
        &mut self,
        topic: String,
        since: Option<(u64, Option<u64>)>,
        reply: SubscribeReply,
    ) -> bool {
        if self.topics.contains_key(&topic) {
            let _ = reply.send(Err(Error::AlreadySubscribed(topic)));
            return false;
        }
        let (events, rx) = mpsc::channel(self.config.subscription_buffer);
        let generation = self.next_generation;
        self.next_generation += 1;
        self.topics.insert(
            topic,
            Topic {
                events,
                generation,
                last: since.map(|(seq, epoch)| (epoch, seq)),
                contiguous: since.is_some(),
                waiting: Some((reply, rx)),
                early: Vec::new(),
            },
        );
        true
    }

    fn remove_topic(&mut self, topic: &str, generation: u64) -> bool {
        if self.topics.get(topic).map(|t| t.generation) == Some(generation) {
            self.topics.remove(topic);
            return true;
        }
        false
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// One connection, from the resubscribe to its end.
    async fn session(&mut self, mut conn: Conn) -> End {
        self.session += 1;
        match self.resume(&mut conn).await {
            Ok(()) => {}
            Err(e) => {
                tracing::debug!(error = %e, "connection lost while resubscribing");
                return End::Lost;
            }
        }
        self.status.send_replace(Status::Connected);
        let liveness = self.config.liveness_timeout;
        let ping_every = if liveness.is_zero() {
            Duration::from_secs(86_400)
        } else {
            liveness / 3
        };
        let mut tick = tokio::time::interval(ping_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        let mut last_heard = Instant::now();
        let mut shutdown = false;
        loop {
            tokio::select! {
                read = conn.reader.read_buf(&mut conn.rbuf) => {
                    match read {
                        Ok(0) => return if shutdown { End::Restart } else { End::Lost },
                        Ok(_) => {}
                        Err(e) => {
                            tracing::debug!(error = %e, "read failed");
                            return if shutdown { End::Restart } else { End::Lost };
                        }
                    }
                    if let Some(end) = self.read_events(&mut conn, &mut shutdown).await {
                        // The close echo (if the server closed) goes out before the socket.
                        conn.finish(Duration::from_millis(500)).await;
                        return end;
                    }
                    // After delivering, which may have waited for the application.
                    last_heard = Instant::now();
                    if conn.flush_transmits().is_err() {
                        return End::Lost;
                    }
                }
                written = &mut conn.written => {
                    tracing::debug!(result = ?written, "the writer stopped");
                    return if shutdown { End::Restart } else { End::Lost };
                }
                cmd = self.commands.recv(), if conn.can_take_commands() => match cmd {
                    None | Some(Command::Close) => {
                        conn.codec.close(Some(CloseFrame::new(CloseCode::NORMAL, "client closed")));
                        let _ = conn.flush_transmits();
                        conn.finish(Duration::from_secs(1)).await;
                        return End::Stop;
                    }
                    Some(cmd) => {
                        if let Err(e) = self.command_online(&mut conn, cmd).await {
                            tracing::debug!(error = %e, "write failed");
                            return End::Lost;
                        }
                    }
                },
                Some((session, names)) = self.retries.1.recv() => {
                    if session == self.session {
                        if let Err(e) = self.resubscribe(&mut conn, names).await {
                            tracing::debug!(error = %e, "write failed");
                            return End::Lost;
                        }
                    }
                }
                _ = tick.tick(), if !liveness.is_zero() => {
                    if last_heard.elapsed() >= liveness {
                        tracing::warn!(url = %self.config.url, silent = ?last_heard.elapsed(),
                            "nothing heard from the server within liveness_timeout; reconnecting");
                        return End::Lost;
                    }
                    let id = self.take_id();
                    self.inflight.insert(id, Inflight::Other);
                    if conn.send(&Request::Ping { id: Some(id) }).is_err() {
                        return End::Lost;
                    }
                }
            }
        }
    }

    /// Subscribes every topic again from its last position, then sends the queued publishes.
    async fn resume(&mut self, conn: &mut Conn) -> io::Result<()> {
        let mut entries = Vec::with_capacity(self.topics.len());
        let mut resumed = Vec::new();
        for (name, topic) in &self.topics {
            entries.push((name.clone(), topic.generation, topic.last));
            if topic.waiting.is_none() {
                resumed.push((topic.events.clone(), topic.last.map(|(_, seq)| seq)));
            }
        }
        for (events, since) in resumed {
            let _ = events.send(Event::Resubscribed { since }).await;
        }
        if !entries.is_empty() {
            let id = self.take_id();
            let topics = entries
                .iter()
                .map(|(name, _, last)| SubscribeTopic {
                    topic: Cow::Borrowed(name.as_str()),
                    since: last.map(|(_, seq)| seq),
                    epoch: last.and_then(|(epoch, _)| epoch),
                })
                .collect();
            conn.send(&Request::Subscribe {
                id: Some(id),
                topics,
            })?;
            let names = entries.into_iter().map(|(n, g, _)| (n, g)).collect();
            self.inflight.insert(id, Inflight::Subscribe(names));
        }
        while let Some(publish) = self.queue.pop_front() {
            self.send_publish(conn, publish.topic, publish.data, publish.reply)
                .await?;
        }
        Ok(())
    }

    async fn send_publish(
        &mut self,
        conn: &mut Conn,
        topic: String,
        data: Data,
        reply: oneshot::Sender<Result<Published, Error>>,
    ) -> io::Result<()> {
        let id = self.take_id();
        let req = Request::Publish {
            id: Some(id),
            topic: Cow::Borrowed(&topic),
            payload: envelope::Data::new(data.kind, &data.bytes),
        };
        match conn.send(&req) {
            Ok(()) => {
                self.inflight.insert(id, Inflight::Publish(reply));
                Ok(())
            }
            Err(e) => {
                // Possibly partly written: its fate is unknown.
                let _ = reply.send(Err(Error::ConnectionLost));
                Err(e)
            }
        }
    }

    async fn command_online(&mut self, conn: &mut Conn, cmd: Command) -> io::Result<()> {
        match cmd {
            Command::Subscribe {
                topic,
                since,
                reply,
            } => {
                let generation = self.next_generation;
                if !self.add_topic(topic.clone(), since, reply) {
                    return Ok(());
                }
                let id = self.take_id();
                let req = Request::Subscribe {
                    id: Some(id),
                    topics: vec![SubscribeTopic {
                        topic: Cow::Borrowed(&topic),
                        since: since.map(|(seq, _)| seq),
                        epoch: since.and_then(|(_, epoch)| epoch),
                    }],
                };
                conn.send(&req)?;
                self.inflight
                    .insert(id, Inflight::Subscribe(vec![(topic, generation)]));
            }
            Command::Unsubscribe { topic, generation } => {
                if self.remove_topic(&topic, generation) {
                    self.send_unsubscribe(conn, &topic).await?;
                }
            }
            Command::Publish { topic, data, reply } => {
                self.send_publish(conn, topic, data, reply).await?;
            }
            Command::Close => {}
        }
        Ok(())
    }

    async fn send_unsubscribe(&mut self, conn: &mut Conn, topic: &str) -> io::Result<()> {
        let id = self.take_id();
        self.inflight.insert(id, Inflight::Other);
        conn.send(&Request::Unsubscribe {
            id: Some(id),
            topics: vec![Cow::Borrowed(topic)],
        })
    }

    /// Sends a subscribe again for those of `names` still subscribed (same generation), each
    /// from its position now.
    async fn resubscribe(&mut self, conn: &mut Conn, names: Vec<(String, u64)>) -> io::Result<()> {
        let names: Vec<(String, u64)> = names
            .into_iter()
            .filter(|(n, g)| self.topics.get(n).map(|t| t.generation) == Some(*g))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let id = self.take_id();
        let topics = names
            .iter()
            .map(|(n, _)| {
                let last = self.topics.get(n).and_then(|t| t.last);
                SubscribeTopic {
                    topic: Cow::Borrowed(n.as_str()),
                    since: last.map(|(_, seq)| seq),
                    epoch: last.and_then(|(epoch, _)| epoch),
                }
            })
            .collect();
        conn.send(&Request::Subscribe {
            id: Some(id),
            topics,
        })?;
        self.inflight.insert(id, Inflight::Subscribe(names));
        Ok(())
    }

    /// Handles every whole message in the read buffer. `Some` when the connection ended.
    async fn read_events(&mut self, conn: &mut Conn, shutdown: &mut bool) -> Option<End> {
        loop {
            let payload = match conn.codec.poll_event(&mut conn.rbuf) {
                Ok(None) => return None,
                Err(e) => {
                    tracing::warn!(error = %e, "the server broke the WebSocket protocol");
                    let _ = conn.flush_transmits();
                    return Some(End::Lost);
                }
                Ok(Some(WsEvent::Text(text))) => text.into_bytes(),
                Ok(Some(WsEvent::Binary(bytes))) => bytes,
                Ok(Some(WsEvent::Close(frame))) => {
                    let _ = conn.flush_transmits();
                    let (code, reason) = frame
                        .map(|f| (f.code.as_u16(), f.reason.as_str().to_owned()))
                        .unwrap_or((1005, String::new()));
                    tracing::info!(code, reason = %reason, "the server closed the connection");
                    return Some(if code == 1012 || *shutdown {
                        End::Restart
                    } else if code == 1008 && reason == "token expired" {
                        End::TokenExpired
                    } else {
                        End::Lost
                    });
                }
                Ok(Some(_)) => continue,
            };
            match self.handle_server(conn, payload).await {
                Ok(true) => *shutdown = true,
                Ok(false) => {}
                Err(_) => return Some(End::Lost),
            }
        }
    }

    /// One envelope from the server. `Ok(true)` for a `shutdown` notice.
    async fn handle_server(&mut self, conn: &mut Conn, frame: Bytes) -> io::Result<bool> {
        let msg = match envelope::decode_server(conn.dialect, &frame) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable message from the server, ignored");
                return Ok(false);
            }
        };
        match msg {
            ServerMessage::Message {
                topic,
                seq,
                payload,
            } => {
                let bytes = match payload.bytes {
                    Cow::Borrowed(b) => frame.slice_ref(b),
                    Cow::Owned(v) => Bytes::from(v),
                };
                let data = Data {
                    kind: payload.kind,
                    bytes,
                };
                self.on_message(&topic, seq, data).await;
            }
            ServerMessage::Ack { id, position } => {
                let acked = self.on_ack(id, position);
                for (events, early) in acked.early {
                    for event in early {
                        let _ = events.send(event).await;
                    }
                }
                for topic in acked.abandoned {
                    self.send_unsubscribe(conn, &topic).await?;
                }
            }
            ServerMessage::Error {
                id,
                code,
                message,
                retry_after_ms,
            } => {
                let err = Error::Server {
                    code: code.into_owned(),
                    message: message.into_owned(),
                    retry_after_ms,
                };
                self.on_error(id, err).await;
            }
            ServerMessage::Reset {
                topic,
                oldest,
                epoch,
            } => {
                if let Some(t) = self.topics.get_mut(&*topic) {
                    let epoch = epoch.filter(|&e| e != 0);
                    t.last = Some((epoch, oldest.saturating_sub(1)));
                    t.contiguous = true;
                    self.deliver(&topic, Event::Reset { oldest, epoch }).await;
                }
            }
            ServerMessage::Dropped { topic, count, next } => {
                if let Some(t) = self.topics.get_mut(&*topic) {
                    let epoch = t.last.and_then(|(e, _)| e);
                    t.last = Some((epoch, next.saturating_sub(1)));
                    t.contiguous = true;
                    self.deliver(&topic, Event::Dropped { count, next }).await;
                }
            }
            ServerMessage::Shutdown { reason } => {
                tracing::info!(reason = %reason, "the server is shutting down");
                return Ok(true);
            }
            ServerMessage::Pong { id } => {
                if let Some(id) = id {
                    self.inflight.remove(&id);
                }
            }
        }
        Ok(false)
    }

    /// Hands `event` to the topic's subscriber, waiting for room in its buffer. Held back
    /// while the subscribe awaits its ack: the receiver is not the application's yet, so a
    /// full buffer would never drain.
    async fn deliver(&mut self, topic: &str, event: Event) {
        let Some(t) = self.topics.get_mut(topic) else {
            return;
        };
        if t.waiting.is_some() {
            t.early.push(event);
            return;
        }
        // The common case (room in the buffer) without an async send or a sender clone.
        match t.events.try_send(event) {
            Err(mpsc::error::TrySendError::Full(event)) => {
                let events = t.events.clone();
                let _ = events.send(event).await;
            }
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    async fn on_message(&mut self, topic: &str, seq: u64, data: Data) {
        let Some(t) = self.topics.get_mut(topic) else {
            // Unsubscribed a moment ago.
            return;
        };
        let mut gap = None;
        if let Some((_, last)) = t.last {
            if seq <= last {
                // The server never repeats a seq within an epoch; guard the promise anyway.
                tracing::warn!(topic, seq, last, "a repeated seq was dropped");
                return;
            }
            if t.contiguous && seq > last + 1 {
                // A hole the server did not announce: announce it here.
                gap = Some(Event::Dropped {
                    count: seq - last - 1,
                    next: seq,
                });
            }
        }
        let epoch = t.last.and_then(|(e, _)| e);
        t.last = Some((epoch, seq));
        t.contiguous = true;
        if let Some(gap) = gap {
            self.deliver(topic, gap).await;
        }
        self.deliver(topic, Event::Message { seq, data }).await;
    }

    /// Answers the request `id` named. Returns topics whose subscriber went away before the
    /// ack, to unsubscribe.
    fn on_ack(&mut self, id: Option<u64>, position: AckPosition<'_>) -> Acked {
        let mut acked = Acked::default();
        let Some(inflight) = id.and_then(|id| self.inflight.remove(&id)) else {
            return acked;
        };
        match inflight {
            Inflight::Publish(reply) => {
                let published = match position {
                    AckPosition::Publish { epoch, seq } => Published { epoch, seq },
                    _ => Published { epoch: 0, seq: 0 },
                };
                let _ = reply.send(Ok(published));
            }
            Inflight::Subscribe(names) => {
                let positions: HashMap<&str, (u64, u64)> = match &position {
                    AckPosition::Subscribe(list) => {
                        list.iter().map(|p| (&*p.topic, (p.epoch, p.seq))).collect()
                    }
                    _ => HashMap::new(),
                };
                for (name, generation) in names {
                    let Some(t) = self.topics.get_mut(&name) else {
                        continue;
                    };
                    if t.generation != generation {
                        continue;
                    }
                    if let Some(&(epoch, seq)) = positions.get(name.as_str()) {
                        let epoch = (epoch != 0).then_some(epoch);
                        match &mut t.last {
                            // A live start: resume later from the subscription's start.
                            None => {
                                t.last = Some((epoch, seq));
                                t.contiguous = false;
                            }
                            // `since` without an epoch counted in the current one: learn it.
                            Some((known @ None, _)) => *known = epoch,
                            Some(_) => {}
                        }
                    }
                    if let Some((reply, rx)) = t.waiting.take() {
                        if reply.send(Ok((rx, generation))).is_err() {
                            self.topics.remove(&name);
                            acked.abandoned.push(name);
                        } else if !t.early.is_empty() {
                            let early = std::mem::take(&mut t.early);
                            acked.early.push((t.events.clone(), early));
                        }
                    }
                }
            }
            Inflight::Other => {}
        }
        acked
    }

    async fn on_error(&mut self, id: Option<u64>, err: Error) {
        match id.and_then(|id| self.inflight.remove(&id)) {
            Some(Inflight::Publish(reply)) => {
                let _ = reply.send(Err(err));
            }
            Some(Inflight::Subscribe(names)) if is_transient(&err) => {
                // Nothing of the request was done: ask again once the server says it may work.
                let wait = match &err {
                    Error::Server {
                        retry_after_ms: Some(ms),
                        ..
                    } if *ms > 0 => Duration::from_millis(*ms),
                    _ => self.config.backoff_min,
                };
                tracing::debug!(error = %err, ?wait, "subscribe refused for now; retrying");
                let (retry, session) = (self.retries.0.clone(), self.session);
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = retry.send((session, names));
                });
            }
            Some(Inflight::Subscribe(names)) => {
                for (name, generation) in names {
                    if self.topics.get(&name).map(|t| t.generation) != Some(generation) {
                        continue;
                    }
                    let Some(mut t) = self.topics.remove(&name) else {
                        continue;
                    };
                    tracing::warn!(topic = %name, error = %err, "subscribe refused");
                    match t.waiting.take() {
                        Some((reply, _)) => {
                            let _ = reply.send(Err(err.clone()));
                        }
                        None => {
                            let _ = t.events.send(Event::Stopped(err.clone())).await;
                        }
                    }
                }
            }
            Some(Inflight::Other) => {
                tracing::debug!(error = %err, "request refused");
            }
            None => tracing::warn!(error = %err, "error from the server"),
        }
    }

    /// The connection is gone: publishes in flight have an unknown fate, subscribes in flight
    /// are sent again with every topic.
    fn connection_lost(&mut self) {
        for (_, inflight) in self.inflight.drain() {
            if let Inflight::Publish(reply) = inflight {
                let _ = reply.send(Err(Error::ConnectionLost));
            }
        }
        self.status.send_if_modified(|s| {
            if *s == Status::Connected {
                *s = Status::Connecting;
                true
            } else {
                false
            }
        });
    }

    fn stop(&mut self, reason: Error) {
        if reason != Error::Closed {
            tracing::error!(url = %self.config.url, error = %reason, "client stopped");
        }
        self.connection_lost();
        self.status.send_replace(Status::Stopped(reason.clone()));
        for (_, mut t) in self.topics.drain() {
            match t.waiting.take() {
                Some((reply, _)) => {
                    let _ = reply.send(Err(reason.clone()));
                }
                None => {
                    // Best effort: a full buffer ends the stream without the reason, which
                    // `Client::stopped` still gives.
                    let _ = t.events.try_send(Event::Stopped(reason.clone()));
                }
            }
        }
        for publish in self.queue.drain(..) {
            let _ = publish.reply.send(Err(reason.clone()));
        }
        self.commands.close();
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Subscribe { reply, .. } => {
                    let _ = reply.send(Err(reason.clone()));
                }
                Command::Publish { reply, .. } => {
                    let _ = reply.send(Err(reason.clone()));
                }
                Command::Unsubscribe { .. } | Command::Close => {}
            }
        }
    }
}

/// Whether a refusal is worth repeating: the server did nothing and says it may work later.
fn is_transient(err: &Error) -> bool {
    matches!(err, Error::Server { code, .. } if code == "rate_limited" || code == "unavailable")
}

/// The largest delay before retry number `attempt` (0-based): `min` doubled per attempt, at
/// most `max`.
fn backoff_ceiling(min: Duration, max: Duration, attempt: u32) -> Duration {
    min.saturating_mul(1 << attempt.min(30)).min(max)
}

/// Opens TCP and performs the upgrade with `ringcast-protocol`'s client handshake.
async fn connect(
    url: Url,
    encoding: Encoding,
    headers: Vec<(String, String)>,
    token: Option<String>,
    seed: u64,
) -> Result<Conn, ConnectError> {
    let mut stream = TcpStream::connect(&url.authority).await?;
    stream.set_nodelay(true)?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut nonce = [0u8; 16];
    rng.fill(&mut nonce);
    let protocol = match encoding {
        Encoding::Json => envelope::JSON_SUBPROTOCOL,
        Encoding::Binary => envelope::BINARY_V2_SUBPROTOCOL,
    };
    let handshake = ClientHandshake::new(nonce, &[protocol]);
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut extra: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    if let Some(bearer) = &bearer {
        extra.push(("Authorization", bearer));
    }
    let request = handshake.request(&url.host_header, &url.target, &extra);
    stream.write_all(&request).await?;
    let mut buf = BytesMut::with_capacity(4096);
    let mut reader = HeadReader::new();
    let head_len = loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(
                io::Error::new(io::ErrorKind::UnexpectedEof, "closed during the upgrade").into(),
            );
        }
        if let Some(len) = reader.poll_head(&buf, MAX_RESPONSE_HEAD_BYTES)? {
            break len;
        }
    };
    let head = buf.split_to(head_len);
    match handshake.check_response(&head) {
        Ok(Some(selected)) => {
            let dialect =
                Dialect::from_subprotocol(&selected).ok_or(ConnectError::NoSubprotocol)?;
            let seed = rng.u64(..);
            Ok(Conn::new(
                stream,
                Codec::client(Limits::default(), seed),
                dialect,
                buf,
            ))
        }
        Ok(None) => Err(ConnectError::NoSubprotocol),
        Err(HandshakeError::Status(status)) => {
            // The body says why; give it a moment to arrive if it came in its own segment.
            if buf.is_empty() {
                let _ = tokio::time::timeout(Duration::from_millis(200), stream.read_buf(&mut buf))
                    .await;
            }
            let body: String = String::from_utf8_lossy(&buf)
                .trim()
                .chars()
                .take(200)
                .collect();
            Err(ConnectError::Status { status, body })
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_ceilings_double_from_min_up_to_max() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
        let ceilings: Vec<u128> = (0..10)
            .map(|a| backoff_ceiling(min, max, a).as_millis())
            .collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        assert_eq!(backoff_ceiling(min, max, u32::MAX), max, "no overflow");
    }

    #[tokio::test]
    async fn backoff_draws_full_jitter_under_each_ceiling() {
        let (_tx, rx) = mpsc::unbounded_channel();
        let (status, _) = watch::channel(Status::Connecting);
        let config = Config::new("ws://127.0.0.1:1/")
            .with_backoff(Duration::from_millis(100), Duration::from_millis(800));
        let mut driver = Driver::new(config, rx, status).unwrap();
        let mut by_attempt = vec![Duration::ZERO; 6];
        let mut below_half = 0;
        for _ in 0..200 {
            driver.attempt = 0;
            for slot in &mut by_attempt {
                let delay = driver.backoff();
                *slot = (*slot).max(delay);
                if delay < Duration::from_millis(50) {
                    below_half += 1;
                }
            }
        }
        for (attempt, worst) in by_attempt.iter().enumerate() {
            let ceiling = backoff_ceiling(
                Duration::from_millis(100),
                Duration::from_millis(800),
                attempt as u32,
            );
            assert!(
                *worst <= ceiling,
                "attempt {attempt}: {worst:?} > {ceiling:?}"
            );
            // Full jitter spreads up to the ceiling (200 draws each).
            assert!(*worst > ceiling / 2, "attempt {attempt}: never above half");
        }
        // ... and down to zero, not only near the ceiling.
        assert!(below_half > 0);
    }
}
