//! Connections: the shard's table of them, each one's state between events, its outbound
//! queue, and the shard-local side of pub/sub that needs the table (subscribe, deliver,
//! refill). Performs no reads or writes itself: the drivers in `driver/` move the bytes.

pub(crate) mod outbound;
pub(crate) mod pending;
pub(crate) mod table;
pub(crate) mod topics;
