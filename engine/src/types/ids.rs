//! Identifiers of shards and connections.

use std::fmt;

/// Identifies a shard: its index, from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub(crate) u16);

impl ShardId {
    /// The shard's index, from 0 to `shards - 1`.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identifies a connection for its whole life: shard, slot, and a generation that makes an id
/// kept after the connection closed miss, rather than reach the next connection in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    pub(crate) shard: ShardId,
    pub(crate) slot: u32,
    pub(crate) gen: u32,
}

impl ConnId {
    /// The shard that owns the connection.
    pub fn shard(self) -> ShardId {
        self.shard
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.shard.0, self.slot, self.gen)
    }
}
