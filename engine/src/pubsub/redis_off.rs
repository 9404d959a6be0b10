//! The Redis backend's stand-in when the `redis` feature is off: a bridge that cannot exist.
//!
//! `EngineConfig::validate` refuses a `redis://` URL in such a build (naming the feature), so
//! [`Bridge::start`] is never reached with one; it fails anyway rather than pretend. `Bridge`
//! has no values, so the hub's Redis paths compile to nothing and the hub's code stays the
//! same in both builds.

use std::{sync::Arc, time::Duration};

use crate::{
    config::BrokerConfig,
    pubsub::{
        bus::Fanout,
        topic::{ReplyTo, Topic},
    },
    types::publish::{BrokerStats, Payload, PublishError},
};

/// No Redis bridge in this build.
#[derive(Debug)]
pub(crate) enum Bridge {}

impl Bridge {
    /// Always fails: the Redis backend is not built in.
    pub(crate) fn start(
        _config: &BrokerConfig,
        _history_max_messages: usize,
        _fanout: Arc<Fanout>,
    ) -> Result<Self, &'static str> {
        Err("the ringcast crate was built without its `redis` feature")
    }

    pub(crate) fn publish(
        &self,
        _topic: Arc<Topic>,
        _payload: Payload,
        _reply: ReplyTo,
    ) -> Result<(), PublishError> {
        match *self {}
    }

    pub(crate) fn attach(
        &self,
        _topic: Arc<Topic>,
        _shard: u16,
        _first: bool,
        _since: Option<u64>,
        _epoch: Option<u64>,
        _token: u64,
    ) {
        match *self {}
    }

    pub(crate) fn epoch(&self) -> u64 {
        match *self {}
    }

    pub(crate) fn detach(&self, _topic: Arc<Topic>, _shard: u16) {
        match *self {}
    }

    pub(crate) fn is_up(&self) -> bool {
        match *self {}
    }

    pub(crate) fn retry_hint(&self) -> Duration {
        match *self {}
    }

    pub(crate) fn reply_wait(&self) -> Duration {
        match *self {}
    }

    pub(crate) fn stats(&self) -> BrokerStats {
        match *self {}
    }

    pub(crate) fn stop(&self) {
        match *self {}
    }
}
