//! The embedder's API inside a shard: the [`Handler`](crate::Handler) hooks and the
//! [`Ctx`](crate::Ctx) they act through, a view over the connection table and the hub.

pub(crate) mod handler;
pub(crate) mod hooks;
