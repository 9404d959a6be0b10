//! The one list of limits that bound connections, shared by [`doctor`](crate::doctor) (on a
//! host) and [`capacity`](crate::capacity) (across hosts), so that a limit has one name in
//! both.

use serde::Serialize;

/// A limit on connections: what binds a host in `ringcast doctor`, or what sets the number of
/// hosts in `ringcast capacity`.
///
/// The doctor reports every variant but [`Cpu`](Constraint::Cpu) (it reads no CPU cost of a
/// load); the capacity plan reports [`FileDescriptors`](Constraint::FileDescriptors),
/// [`Memory`](Constraint::Memory), [`Cpu`](Constraint::Cpu) and
/// [`Config`](Constraint::Config), never [`Conntrack`](Constraint::Conntrack) or
/// [`Ports`](Constraint::Ports), which depend on a host and how it is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Constraint {
    /// Open files: the process's soft limit, or the system's `fs.file-max`.
    FileDescriptors,
    /// Memory: the host's `MemAvailable` (doctor), or each host's RAM (capacity).
    Memory,
    /// Each host's cores, for message and delivery work (capacity only).
    Cpu,
    /// shards x `limits.max_connections_per_shard`: a setting, not a resource.
    Config,
    /// `nf_conntrack_max`, when connection tracking is loaded (doctor only).
    Conntrack,
    /// The ephemeral port range, for outbound targets (doctor only).
    Ports,
}

impl Constraint {
    /// The name used in text and JSON: `file-descriptors`, `memory`, `cpu`, `config`,
    /// `conntrack`, `ports`.
    pub fn name(self) -> &'static str {
        match self {
            Constraint::FileDescriptors => "file-descriptors",
            Constraint::Memory => "memory",
            Constraint::Cpu => "cpu",
            Constraint::Config => "config",
            Constraint::Conntrack => "conntrack",
            Constraint::Ports => "ports",
        }
    }
}
