//! Topics across shards: sequencing, history, the hand-off of each published message to the
//! shards with subscribers, the per-connection data ring, the envelope frames the engine
//! builds, and the Redis backend. Knows nothing of connections' sockets or the table that
//! holds them (that is `conn/`).

pub(crate) mod bus;
pub(crate) mod canary;
pub(crate) mod data_ring;
pub(crate) mod hub;
pub(crate) mod notices;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(not(feature = "redis"))]
#[path = "redis_off.rs"]
pub(crate) mod redis;
pub(crate) mod topic;
