//! Operating the engine: admission (origins, per-IP and per-user caps, upgrade rate), token
//! auth, memory readings and the metric counters. Below pub/sub and connections, so every
//! layer may count and check; reads nothing of them.

pub(crate) mod admission;
#[cfg(feature = "jwt")]
pub(crate) mod auth;
#[cfg(not(feature = "jwt"))]
#[path = "auth_off.rs"]
pub(crate) mod auth;
pub(crate) mod memory;
pub(crate) mod metrics;
