//! Plain data shared by every layer: ids, clock types, what a handler sees of a connection,
//! and what publishing takes and answers. Nothing here imports another engine module except
//! its siblings, so any layer may use it.

pub(crate) mod clock;
pub(crate) mod ids;
pub(crate) mod message;
pub(crate) mod publish;
