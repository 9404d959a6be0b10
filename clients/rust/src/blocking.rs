//! A blocking face on the same client, for tools and scripts without an async runtime (the
//! `blocking` feature): it owns a one-worker tokio runtime on which the client's task runs,
//! and each call waits on it. Same behaviour, same events, same errors.
//!
//! ```no_run
//! use ringcast_client::{blocking::Client, Config, Data};
//!
//! let client = Client::connect(Config::new("ws://127.0.0.1:9000/"))?;
//! let mut news = client.subscribe("news")?;
//! client.publish("news", Data::json("1"))?;
//! println!("{:?}", news.next());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{sync::Arc, time::Duration};

use tokio::runtime::Runtime;

use crate::{Config, Data, Error, Event, Published, Status};

/// A blocking [`crate::Client`]. Cheap to clone (the runtime is shared).
#[derive(Debug, Clone)]
pub struct Client {
    runtime: Arc<Runtime>,
    inner: crate::Client,
}

impl Client {
    /// Starts a one-worker runtime and the client on it; returns at once.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad setting, or when the runtime cannot start.
    pub fn connect(config: Config) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ringcast-client")
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("starting the tokio runtime: {e}")))?;
        let inner = {
            let _guard = runtime.enter();
            crate::Client::connect(config)?
        };
        Ok(Self {
            runtime: Arc::new(runtime),
            inner,
        })
    }

    /// [`crate::Client::subscribe`], waiting for the ack.
    ///
    /// # Errors
    /// As [`crate::Client::subscribe`].
    pub fn subscribe(&self, topic: &str) -> Result<Subscription, Error> {
        let inner = self.runtime.block_on(self.inner.subscribe(topic))?;
        Ok(self.wrap(inner))
    }

    /// [`crate::Client::subscribe_from`], waiting for the ack.
    ///
    /// # Errors
    /// As [`crate::Client::subscribe`].
    pub fn subscribe_from(&self, topic: &str, since: u64) -> Result<Subscription, Error> {
        let inner = self
            .runtime
            .block_on(self.inner.subscribe_from(topic, since))?;
        Ok(self.wrap(inner))
    }

    fn wrap(&self, inner: crate::Subscription) -> Subscription {
        Subscription {
            runtime: self.runtime.clone(),
            inner,
        }
    }

    /// [`crate::Client::publish`], waiting for the ack.
    ///
    /// # Errors
    /// As [`crate::Client::publish`].
    pub fn publish(&self, topic: &str, data: Data) -> Result<Published, Error> {
        self.runtime.block_on(self.inner.publish(topic, data))
    }

    /// Where the connection stands now.
    pub fn status(&self) -> Status {
        self.inner.status()
    }

    /// Closes the connection and stops reconnecting.
    pub fn close(&self) {
        self.inner.close();
    }
}

/// A blocking [`crate::Subscription`]: an iterator of its events, each `next` waiting for
/// one (`None` once the subscription has ended). Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    runtime: Arc<Runtime>,
    inner: crate::Subscription,
}

impl Subscription {
    /// The topic.
    pub fn topic(&self) -> &str {
        self.inner.topic()
    }

    /// Waits up to `timeout` for the next event: `Ok(None)` once the subscription has ended,
    /// `Err(())` when the time ran out (no event is lost to it).
    #[allow(clippy::result_unit_err)]
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, ()> {
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, self.inner.next()).await })
            .map_err(|_| ())
    }
}

impl Iterator for Subscription {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        self.runtime.block_on(self.inner.next())
    }
}
