//! # ringcast-client
//!
//! A tokio client for the ringcast broker (`protocol/PROTOCOL.md`) that keeps the broker's
//! promise for the application: the client remembers the last seq (and epoch) of every topic
//! and resumes from it after every reconnect, so a subscription's stream has no duplicate, and
//! every gap is an event ([`Event::Dropped`], [`Event::Reset`]) rather than a silent hole.
//!
//! The wire is `ringcast-protocol`'s: its client handshake, codec and envelope. This crate adds
//! only the IO (one tokio task per [`Client`]) and the policy: reconnect with exponential
//! backoff and full jitter, a random delay after a server restart (close 1012 or a `shutdown`
//! notice), a fresh token after 1008 "token expired", a stop on 401/403 at the upgrade, a
//! liveness check, and a bounded queue of publishes while disconnected.
//!
//! ## Use, in order
//!
//! 1. [`Client::connect`] with a [`Config`] (inside a tokio runtime). It returns at once; the
//!    connection is made and remade in the background.
//! 2. [`Client::subscribe`] (or [`Client::subscribe_from`] to resume from a seq you stored)
//!    and read [`Event`]s from the [`Subscription`] (it is a `Stream`, or call
//!    [`Subscription::next`]). Dropping it unsubscribes.
//! 3. [`Client::publish`] and await the ack: the message's [`Published`] seq and epoch, or
//!    the server's error code.
//! 4. [`Client::close`] to say goodbye, or just drop every handle.
//!
//! ```no_run
//! use ringcast_client::{Client, Config, Data, Event};
//!
//! # async fn run() -> Result<(), ringcast_client::Error> {
//! let client = Client::connect(Config::new("ws://127.0.0.1:9000/"))?;
//! let mut prices = client.subscribe("prices.BTC").await?;
//! let ack = client.publish("prices.BTC", Data::json(r#"{"bid":42}"#)).await?;
//! println!("published as seq {}", ack.seq);
//! while let Some(event) = prices.next().await {
//!     match event {
//!         Event::Message { seq, data } => println!("{seq}: {}", data.text()),
//!         Event::Dropped { count, next } => println!("lost {count}, next is {next}"),
//!         Event::Reset { oldest, .. } => println!("history restarted at {oldest}"),
//!         Event::Resubscribed { .. } => println!("reconnected, resumed"),
//!         Event::Stopped(error) => return Err(error),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! `examples/print_topic.rs` is the same as a program:
//! `cargo run -p ringcast-client --example print_topic -- ws://127.0.0.1:9000/ prices.BTC`.
//!
//! ## What a publish guarantees
//!
//! A publish is sent once. If the connection is lost after it was sent and before its ack
//! arrived, it fails with [`Error::ConnectionLost`]: the server may or may not have ordered
//! it, and this client does not resend it (no duplicate publish). A publish made while
//! disconnected waits in the queue ([`QueuePolicy`]) and is sent after the resubscribe.
//!
//! ## Features
//!
//! - `blocking` (off by default): `blocking::Client`, the same client for code without an
//!   async runtime; it runs the client on a one-worker tokio runtime of its own. Do not use
//!   it from inside async code (its calls block, and dropping its runtime there panics).
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![deny(unsafe_op_in_unsafe_fn)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "blocking")]
#[cfg_attr(docsrs, doc(cfg(feature = "blocking")))]
pub mod blocking;
mod config;
mod driver;

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use ringcast_protocol::envelope;
use tokio::sync::{mpsc, oneshot, watch};

pub use config::{Config, Encoding, QueuePolicy, Token, TokenFuture};
pub use ringcast_protocol::envelope::DataKind;

/// A payload: JSON text or opaque bytes, as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    /// How the bytes are to be read.
    pub kind: DataKind,
    /// The bytes: one JSON value for [`DataKind::Json`].
    pub bytes: Bytes,
}

impl Data {
    /// JSON data. `text` must hold one JSON value (the server answers `bad_payload`
    /// otherwise).
    pub fn json(text: impl Into<String>) -> Self {
        Self {
            kind: DataKind::Json,
            bytes: Bytes::from(text.into()),
        }
    }

    /// Opaque bytes (base64 in the JSON encoding).
    pub fn binary(bytes: impl Into<Bytes>) -> Self {
        Self {
            kind: DataKind::Binary,
            bytes: bytes.into(),
        }
    }

    /// The bytes as text, with invalid UTF-8 replaced (JSON data is always valid).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.bytes)
    }
}

/// What a subscription delivers, in the topic's order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message published to the topic.
    Message {
        /// Its seq: exactly one more than the previous message's unless a notice came between.
        seq: u64,
        /// The payload as published.
        data: Data,
    },
    /// `count` messages were lost (the client fell behind and the server dropped them); the
    /// next message has seq `next`.
    Dropped {
        /// How many messages are missing.
        count: u64,
        /// The seq of the next message.
        next: u64,
    },
    /// The topic's numbering no longer continues what this subscription had: the history
    /// did not reach back far enough, or the numbering restarted (a new epoch: the in-memory
    /// server restarted, Redis lost its data). Delivery continues at seq `oldest`.
    Reset {
        /// The seq of the next message.
        oldest: u64,
        /// The topic's epoch now (`None` if the server did not say).
        epoch: Option<u64>,
    },
    /// The client reconnected and subscribed again, resuming after seq `since` (`None`: no
    /// message had been seen, so it resumes from where the first subscription started, or
    /// live).
    Resubscribed {
        /// The last seq seen before the reconnect.
        since: Option<u64>,
    },
    /// The subscription ended for good: the client stopped (401/403 at an upgrade,
    /// [`Client::close`]) or the server refused the resubscribe (`forbidden` for a new
    /// token, for example). Nothing follows.
    Stopped(Error),
}

/// Where a publish was ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// The topic's epoch (0 if the server did not know it yet: Redis backend, not connected).
    pub epoch: u64,
    /// The message's seq in that epoch.
    pub seq: u64,
}

/// Whether the client is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Connecting, or waiting to reconnect.
    Connecting,
    /// Upgraded and subscribed again.
    Connected,
    /// Stopped for good, and why.
    Stopped(Error),
}

/// Everything that can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is wrong (the URL, a bound).
    #[error("bad client config: {0}")]
    Config(String),
    /// The server refused the upgrade with 401 or 403: the token is missing, malformed,
    /// expired or forged. The client stops instead of retrying.
    #[error("the server refused the connection with HTTP {status}: {body}")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
        /// The server's explanation (response body), trimmed.
        body: String,
    },
    /// The server answered a request with an error (`PROTOCOL.md`, Error codes).
    #[error("{code}: {message}")]
    Server {
        /// The wire code (`forbidden`, `rate_limited`, ...).
        code: String,
        /// The server's sentence.
        message: String,
        /// Milliseconds until a retry may succeed, when the server said.
        retry_after_ms: Option<u64>,
    },
    /// A publish under [`QueuePolicy::FailFast`] while not connected.
    #[error("not connected")]
    Disconnected,
    /// A publish while not connected, with the queue already full.
    #[error("not connected and the publish queue is full")]
    QueueFull,
    /// The connection was lost after the publish was sent and before its ack: it may or may
    /// not have been ordered.
    #[error("connection lost before the ack: the publish may or may not have been made")]
    ConnectionLost,
    /// The topic name breaks the protocol's rules.
    #[error("bad topic: {0}")]
    BadTopic(&'static str),
    /// This client already has a live subscription to the topic.
    #[error("already subscribed to {0}")]
    AlreadySubscribed(String),
    /// The client was closed (or its task ended).
    #[error("the client is closed")]
    Closed,
}

/// A handle to one broker connection, kept alive in the background. Cheap to clone; the
/// connection closes when every clone and every [`Subscription`] is dropped, or on
/// [`Client::close`].
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::UnboundedSender<driver::Command>,
    status: watch::Receiver<Status>,
}

impl Client {
    /// Starts the client's task, which connects to `config.url` and reconnects as needed.
    /// Returns at once.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad URL or bound.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn connect(config: Config) -> Result<Self, Error> {
        config.validate()?;
        let (commands, rx) = mpsc::unbounded_channel();
        let (status_tx, status) = watch::channel(Status::Connecting);
        let driver = driver::Driver::new(config, rx, status_tx)?;
        tokio::spawn(driver.run());
        Ok(Self { commands, status })
    }

    /// Subscribes to `topic` from the next message published. Resolves once the server
    /// acked (waiting through reconnects if the client is not connected yet).
    ///
    /// # Errors
    /// [`Error::BadTopic`], [`Error::AlreadySubscribed`], the server's error
    /// ([`Error::Server`], `forbidden` for example), or why the client stopped.
    ///
    /// # Cancel safety
    /// Cancelling drops the subscription, which unsubscribes.
    pub async fn subscribe(&self, topic: &str) -> Result<Subscription, Error> {
        self.subscribe_at(topic, None).await
    }

    /// Subscribes to `topic` resuming after seq `since` (counted in the topic's current
    /// epoch): the server replays `since + 1` onwards, or sends a reset if its history does
    /// not reach back that far.
    ///
    /// # Errors
    /// As [`Client::subscribe`].
    pub async fn subscribe_from(&self, topic: &str, since: u64) -> Result<Subscription, Error> {
        self.subscribe_at(topic, Some((since, None))).await
    }

    /// Subscribes to `topic` resuming after seq `since` of epoch `epoch` (both as stored
    /// from an earlier [`Event`] or [`Published`]): if the topic's numbering restarted since,
    /// the server sends a [`Event::Reset`] instead of taking `since` for a position in the
    /// new numbering.
    ///
    /// # Errors
    /// As [`Client::subscribe`].
    pub async fn subscribe_from_epoch(
        &self,
        topic: &str,
        since: u64,
        epoch: u64,
    ) -> Result<Subscription, Error> {
        self.subscribe_at(topic, Some((since, Some(epoch)))).await
    }

    async fn subscribe_at(
        &self,
        topic: &str,
        since: Option<(u64, Option<u64>)>,
    ) -> Result<Subscription, Error> {
        envelope::validate_topic(topic).map_err(Error::BadTopic)?;
        let (reply, answer) = oneshot::channel();
        let cmd = driver::Command::Subscribe {
            topic: topic.to_owned(),
            since,
            reply,
        };
        self.commands.send(cmd).map_err(|_| self.stop_reason())?;
        let (events, generation) = answer.await.map_err(|_| self.stop_reason())??;
        Ok(Subscription {
            topic: topic.to_owned(),
            generation,
            events,
            commands: self.commands.clone(),
        })
    }

    /// Publishes `data` to `topic`; resolves with the ack.
    ///
    /// # Errors
    /// [`Error::Server`] with the server's code, [`Error::Disconnected`] or
    /// [`Error::QueueFull`] while disconnected (by [`QueuePolicy`]),
    /// [`Error::ConnectionLost`] when the outcome is unknown, [`Error::BadTopic`], or why the
    /// client stopped.
    ///
    /// # Cancel safety
    /// Cancelling does not take the publish back: once called, it is sent.
    pub async fn publish(&self, topic: &str, data: Data) -> Result<Published, Error> {
        envelope::validate_topic(topic).map_err(Error::BadTopic)?;
        let (reply, answer) = oneshot::channel();
        let cmd = driver::Command::Publish {
            topic: topic.to_owned(),
            data,
            reply,
        };
        self.commands.send(cmd).map_err(|_| self.stop_reason())?;
        answer.await.map_err(|_| self.stop_reason())?
    }

    /// Where the connection stands now.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Waits until the client is connected (and has subscribed again).
    ///
    /// # Errors
    /// Why the client stopped, if it did.
    pub async fn connected(&self) -> Result<(), Error> {
        let mut status = self.status.clone();
        let result = status
            .wait_for(|s| !matches!(s, Status::Connecting))
            .await
            .map(|s| s.clone());
        match result {
            Ok(Status::Connected) => Ok(()),
            Ok(Status::Stopped(e)) => Err(e),
            _ => Err(Error::Closed),
        }
    }

    /// Waits until the client stops for good, and returns why.
    pub async fn stopped(&self) -> Error {
        let mut status = self.status.clone();
        let result = status
            .wait_for(|s| matches!(s, Status::Stopped(_)))
            .await
            .map(|s| s.clone());
        match result {
            Ok(Status::Stopped(e)) => e,
            _ => Error::Closed,
        }
    }

    /// Closes the connection (close 1000) and stops reconnecting. Subscriptions end with
    /// [`Event::Stopped`]`(`[`Error::Closed`]`)`, pending publishes fail.
    pub fn close(&self) {
        let _ = self.commands.send(driver::Command::Close);
    }

    fn stop_reason(&self) -> Error {
        match &*self.status.borrow() {
            Status::Stopped(e) => e.clone(),
            _ => Error::Closed,
        }
    }
}

/// A topic's events. Ends after [`Event::Stopped`]; dropping it unsubscribes.
pub struct Subscription {
    topic: String,
    generation: u64,
    events: mpsc::Receiver<Event>,
    commands: mpsc::UnboundedSender<driver::Command>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The next event, or `None` once the subscription has ended.
    ///
    /// # Cancel safety
    /// Cancel safe: an event is never lost to a cancelled call.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl futures_core::Stream for Subscription {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.commands.send(driver::Command::Unsubscribe {
            topic: std::mem::take(&mut self.topic),
            generation: self.generation,
        });
    }
}
