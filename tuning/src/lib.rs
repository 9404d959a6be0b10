//! # ringcast-tuning
//!
//! Host checks and capacity planning for the [`ringcast`] engine, behind `ringcast doctor` and
//! `ringcast capacity`. Apart from the engine, so that an embedder linking `ringcast` does not
//! compile them.
//!
//! - [`doctor`]: reads a host's limits (files under a root directory: `/`, or a fixture tree)
//!   and says how many connections it can hold, which limit binds first, and how to lift it.
//! - [`capacity`]: plans hosts for a load without a host: hosts needed by open files, memory,
//!   CPU and the config's connection cap. It owns the measured costs both use, except the
//!   kernel's memory per connection, which the engine owns
//!   ([`ringcast::KERNEL_BYTES_PER_CONNECTION`], the default of
//!   `admission.kernel_bytes_per_connection`).
//!
//! Both read only the engine's public API ([`ringcast::EngineConfig`] and its parts). The host
//! profiles that lift the limits the doctor reports (`tuning/profiles`), the proxy snippets
//! (`tuning/proxy`) and the guide (`tuning/README.md`) live in this crate's folder.
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod capacity;
mod constraint;
pub mod doctor;
