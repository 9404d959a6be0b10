//! What a [`Client`](crate::Client) is told before it starts: where to connect, how to
//! authenticate, and every bound and delay of its reconnect loop. No IO here.

use std::{fmt, future::Future, pin::Pin, sync::Arc, time::Duration};

use crate::Error;

/// The envelope encoding to speak, offered as the WebSocket subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// `ringcast.v1.json`: JSON objects in text frames. Readable in any tool.
    #[default]
    Json,
    /// `ringcast.v2.bin`: the binary layout of version 2 in binary frames (acks carry the
    /// epoch and seq, which this client needs; version 1 binary is not offered).
    Binary,
}

/// What `publish` does while the client is not connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuePolicy {
    /// Fail at once with [`Error::Disconnected`].
    FailFast,
    /// Keep up to this many publishes and send them, in order, once connected; past it a
    /// publish fails with [`Error::QueueFull`]. Memory: the payloads themselves.
    Queue(usize),
}

/// The future a token callback returns: a fresh token, or why there is none.
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

/// Where the token sent at each upgrade comes from.
#[derive(Clone, Default)]
pub enum Token {
    /// No token: the server does not require one.
    #[default]
    None,
    /// The same token every time.
    Static(String),
    /// Called before every connection attempt (the first one included, and right after the
    /// server closed with 1008 "token expired"). An error is logged and counts as a failed
    /// attempt: the client backs off and calls it again.
    Callback(Arc<dyn Fn() -> TokenFuture + Send + Sync>),
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            // Never print a credential.
            Self::Static(_) => f.write_str("Static(..)"),
            Self::Callback(_) => f.write_str("Callback(..)"),
        }
    }
}

/// A client's settings. Build with [`Config::new`] and the `with_*` setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// `ws://HOST[:PORT][/PATH][?QUERY]`. Only `ws` (no TLS: put a proxy in front for `wss`).
    pub url: String,
    /// The encoding to offer. Default JSON.
    pub encoding: Encoding,
    /// The token sent as `Authorization: Bearer <token>`. Default none.
    pub token: Token,
    /// Extra request headers sent with every upgrade (for example `Origin`). Default none.
    pub headers: Vec<(String, String)>,
    /// Smallest backoff ceiling: the first retry waits a random time in `0..=backoff_min`.
    /// Default 100 ms.
    pub backoff_min: Duration,
    /// Largest backoff ceiling: each failed attempt doubles the ceiling up to this. Default
    /// 10 s.
    pub backoff_max: Duration,
    /// A connection that stayed up this long resets the backoff to `backoff_min`. Default 5 s.
    pub stable_after: Duration,
    /// After a close 1012 (service restart) or a `shutdown` notice, the client reconnects
    /// after a random delay in `0..=restart_delay_max`, so a fleet of clients does not return
    /// at once. Default 1 s.
    pub restart_delay_max: Duration,
    /// Time to open TCP and finish the upgrade. Default 5 s. Past it the attempt fails and
    /// backs off.
    pub connect_timeout: Duration,
    /// A connection the client heard nothing from (no frame of any kind) for this long is
    /// closed and replaced. The client sends a broker `ping` request every third of it, so a
    /// live server always answers in time; the ping is also what makes a server notice an
    /// expired token. Default 30 s; zero turns liveness off.
    pub liveness_timeout: Duration,
    /// What `publish` does while disconnected. Default `Queue(1024)`.
    pub queue: QueuePolicy,
    /// Events one subscription holds for the application. Default 1024. When it is full the
    /// client stops reading the socket (backpressure: the server's overflow policy decides,
    /// and announces each loss with `dropped`), so a slow reader never grows memory here.
    pub subscription_buffer: usize,
}

impl Config {
    /// Defaults for `url` (see each field).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            encoding: Encoding::Json,
            token: Token::None,
            headers: Vec::new(),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            stable_after: Duration::from_secs(5),
            restart_delay_max: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(5),
            liveness_timeout: Duration::from_secs(30),
            queue: QueuePolicy::Queue(1024),
            subscription_buffer: 1024,
        }
    }

    /// Speaks `encoding`.
    #[must_use]
    pub fn with_encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Sends `token` at every upgrade.
    #[must_use]
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Token::Static(token.into());
        self
    }

    /// Calls `f` for a fresh token before every connection attempt.
    #[must_use]
    pub fn with_token_fn<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        self.token = Token::Callback(Arc::new(move || Box::pin(f())));
        self
    }

    /// Adds a request header sent at every upgrade.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Backoff ceilings: from `min`, doubling per failed attempt, up to `max`.
    #[must_use]
    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }

    /// The largest random delay before reconnecting after a server restart.
    #[must_use]
    pub fn with_restart_delay_max(mut self, max: Duration) -> Self {
        self.restart_delay_max = max;
        self
    }

    /// See [`Config::liveness_timeout`].
    #[must_use]
    pub fn with_liveness_timeout(mut self, timeout: Duration) -> Self {
        self.liveness_timeout = timeout;
        self
    }

    /// See [`Config::queue`].
    #[must_use]
    pub fn with_queue(mut self, queue: QueuePolicy) -> Self {
        self.queue = queue;
        self
    }

    /// See [`Config::subscription_buffer`].
    #[must_use]
    pub fn with_subscription_buffer(mut self, events: usize) -> Self {
        self.subscription_buffer = events;
        self
    }

    /// Checks the URL and the bounds.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first bad setting.
    pub fn validate(&self) -> Result<(), Error> {
        Url::parse(&self.url)?;
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return Err(Error::Config(
                "backoff_min must be > 0 and <= backoff_max".into(),
            ));
        }
        if self.subscription_buffer == 0 {
            return Err(Error::Config("subscription_buffer must be > 0".into()));
        }
        if self.connect_timeout.is_zero() {
            return Err(Error::Config("connect_timeout must be > 0".into()));
        }
        Ok(())
    }
}

/// A parsed `ws://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Url {
    /// `host:port` to connect to.
    pub(crate) authority: String,
    /// The Host header: as written in the URL.
    pub(crate) host_header: String,
    /// Path and query, at least `/`.
    pub(crate) target: String,
}

impl Url {
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Config(format!("url {url:?}: {why}"));
        let rest = if let Some(rest) = url.strip_prefix("ws://") {
            rest
        } else if url.starts_with("wss://") {
            return Err(bad(
                "wss is not supported (no TLS in this client); use ws://",
            ));
        } else {
            return Err(bad("must start with ws://"));
        };
        let (host_port, target) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        if host_port.is_empty() || host_port.contains('@') {
            return Err(bad("no host (or user info, which is not supported)"));
        }
        // `[v6]:port`, `[v6]`, `host:port`, `host`.
        let has_port = match host_port.rfind(':') {
            Some(i) => !host_port[i..].contains(']'),
            None => false,
        };
        let authority = if has_port {
            let port = &host_port[host_port.rfind(':').map_or(0, |i| i + 1)..];
            if port.parse::<u16>().is_err() {
                return Err(bad("bad port"));
            }
            host_port.to_owned()
        } else {
            format!("{host_port}:80")
        };
        Ok(Self {
            authority,
            host_header: host_port.to_owned(),
            target,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_authority_host_and_target() {
        let u = Url::parse("ws://127.0.0.1:9000/").unwrap();
        assert_eq!(
            (
                u.authority.as_str(),
                u.host_header.as_str(),
                u.target.as_str()
            ),
            ("127.0.0.1:9000", "127.0.0.1:9000", "/")
        );
        let u = Url::parse("ws://example.com?overflow=drop-oldest").unwrap();
        assert_eq!(u.authority, "example.com:80");
        assert_eq!(u.target, "/?overflow=drop-oldest");
        let u = Url::parse("ws://[::1]:9/x/y").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.target.as_str()),
            ("[::1]:9", "/x/y")
        );
        for bad in ["http://a", "wss://a", "ws://", "ws://a:99999/", "ws://u@a/"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }
}
