//! `ringcast doctor`: how many connections a host can hold, which limit binds first, and the
//! exact fix for each shortfall.
//!
//! Owns reading a host's facts from the files under a root directory ([`Host::read`]: `/` for
//! the running host, a fixture tree in tests), and judging them against an [`EngineConfig`] and
//! a [`Target`] ([`diagnose`], giving a [`Report`]). The report prints as text for people
//! (`Display`) and serializes to JSON for tools. The code keeps the three apart: `read.rs`
//! reads the host, `judge.rs` works out the limits and findings, `render.rs` writes the text;
//! every public item is re-exported here.
//!
//! `--latency` ([`run_latency`], `latency.rs`) asks another question: whether the host is
//! ready for the engine's latency mode (isolated cores, tickless cores, IRQ affinity, the
//! frequency governor, transparent huge pages), with the fix for each shortfall.
//!
//! It only reads files. It never changes the host, and never opens a socket or a ring to probe:
//! a probe would need the privileges and descriptors it is meant to count.
//!
//! # What is read, under the root
//!
//! | fact | file |
//! |---|---|
//! | kernel version | `proc/sys/kernel/osrelease` |
//! | io_uring allowed | `proc/sys/kernel/io_uring_disabled` (absent before Linux 6.6: allowed) |
//! | open files, memlock (soft, hard) | `proc/self/limits`: the limits of the doctor process, which a `ringcast serve` started the same way inherits |
//! | `fs.nr_open`, `fs.file-max`, files in use | `proc/sys/fs/nr_open`, `proc/sys/fs/file-max`, `proc/sys/fs/file-nr` |
//! | ephemeral ports | `proc/sys/net/ipv4/ip_local_port_range` |
//! | accept backlog cap | `proc/sys/net/core/somaxconn` |
//! | connection tracking (when loaded) | `proc/sys/net/netfilter/nf_conntrack_max`, `nf_conntrack_count` |
//! | memory | `MemTotal`, `MemAvailable` in `proc/meminfo` |
//! | cores | `sys/devices/system/cpu/online`, else `processor` lines of `proc/cpuinfo` |
//! | CPUs the process may use | `Cpus_allowed_list` in `proc/self/status` (as for the limits: the doctor's own, which `ringcast serve` started the same way inherits) |
//! | transparent huge pages | `sys/kernel/mm/transparent_hugepage/enabled` |
//!
//! A service started by systemd gets the unit's limits (`LimitNOFILE=`), not the shell's:
//! check those with `systemctl show ringcast -p LimitNOFILE`.
//!
//! # How the maxima are worked out
//!
//! - **File descriptors**: the soft open-files limit (and the system-wide `fs.file-max` less
//!   the files already open), less the process's and shards' own descriptors
//!   ([`Costs::fixed_fds`](crate::capacity::Costs::fixed_fds)).
//! - **Memory**: `MemAvailable` less the shards' fixed costs, divided by the user and kernel
//!   bytes of an idle connection measured by the bench ([`Costs`](crate::capacity::Costs),
//!   figures in [`capacity`](crate::capacity)). Busy connections add what is queued for them.
//! - **Config**: shards x `limits.max_connections_per_shard`.
//! - **Connection tracking**, when the module is loaded: `nf_conntrack_max` less the entries in
//!   use.
//! - **Ports**, only for a target opened *from* this host to one destination (a proxy in front
//!   of ringcast, a load generator; [`Target::outbound`]): the size of the ephemeral port range,
//!   per source address.
//!
//! Shards are the config's `shards`, or when it is 0 one per CPU the process may use, as the
//! engine counts them (`CPUAffinity=`, `taskset` and cpusets make them fewer than the online
//! cores); one per online core when `proc/self/status` is missing.

use std::{io, path::Path};

use ringcast::EngineConfig;

mod judge;
mod latency;
mod read;
mod render;

pub use crate::constraint::Constraint;
pub use judge::{
    diagnose, effective_shards, EngineFacts, Finding, IoUring, LimitCheck, Report, Severity,
    Target, MIN_KERNEL_IO_URING,
};
pub use latency::{
    cpu_list, judge_latency, run_latency, CheckStatus, CpuSet, LatencyCheck, LatencyHost,
    LatencyReport,
};
pub use read::{Host, KernelVersion, PortRange, Rlim, Rlimit};

/// Reads the host under `root` and judges it: [`Host::read`], then [`diagnose`].
///
/// # Errors
/// As [`Host::read`].
pub fn run(root: &Path, config: &EngineConfig, target: Target) -> io::Result<Report> {
    Ok(diagnose(&Host::read(root)?, config, target))
}
