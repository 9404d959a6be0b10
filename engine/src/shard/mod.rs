//! What a shard does with a connection, whatever drives its socket: the upgrade, the HTTP
//! endpoints, the codec, handler calls, deadlines and liveness, the inbox's deliveries, the
//! drain and the end of a connection. Called by the drivers in `driver/`; knows no socket.

pub(crate) mod local;
pub(crate) mod process;
