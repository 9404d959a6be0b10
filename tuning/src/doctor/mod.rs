//! `ringcast doctor`: how many connections a host can hold, which limit binds first, and the
//! exact fix for each shortfall.
//!
//! Owns reading a host's facts from the files under a root directory ([`Host::read`]: `/` for
//! the running host, a fixture tree in tests), and judging them against an [`EngineConfig`] and
//! a [`Target`] ([`diagnose`], giving a [`Report`]). The report prints as text for people
//! (`Display`) and serializes to JSON for tools.
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
//!   ([`Costs::fixed_fds`]).
//! - **Memory**: `MemAvailable` less the shards' fixed costs, divided by the user and kernel
//!   bytes of an idle connection measured by the bench ([`Costs`], figures in
//!   [`capacity`](crate::capacity)). Busy connections add what is queued for them.
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

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use serde::{Serialize, Serializer};

use ringcast::{Driver, EngineConfig};

use crate::capacity::{bytes, group, Costs};

/// The oldest kernel the io_uring driver runs on: multishot receive into provided buffers.
pub const MIN_KERNEL_IO_URING: KernelVersion = KernelVersion { major: 6, minor: 0 };

/// The largest `fs.nr_open` Linux accepts on 64-bit hosts (`sysctl_nr_open_max` in
/// `fs/file.c`: `INT_MAX` rounded down to a multiple of 64).
const NR_OPEN_MAX: u64 = 2_147_483_584;

/// The ephemeral port range of the sysctl profile (`tuning/profiles/sysctl.conf`):
/// `10240 65535`, 55,296 ports.
const PROFILE_PORTS: PortRange = PortRange {
    low: 10_240,
    high: 65_535,
};

/// A `major.minor` kernel version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KernelVersion {
    /// The major number (6 in 6.1.0).
    pub major: u32,
    /// The minor number (1 in 6.1.0).
    pub minor: u32,
}

impl KernelVersion {
    /// Parses the start of a release string such as `6.8.0-45-generic`.
    pub fn parse(release: &str) -> Option<Self> {
        let mut parts = release.trim().splitn(3, '.');
        let mut number = || -> Option<u32> {
            let part = parts.next()?;
            let end = part
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(part.len());
            part[..end].parse().ok()
        };
        Some(Self {
            major: number()?,
            minor: number()?,
        })
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// One value of a resource limit. Serializes as a number, or the string `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rlim {
    /// A finite limit.
    Value(u64),
    /// No limit.
    Unlimited,
}

impl Rlim {
    /// The limit, with `Unlimited` as `u64::MAX`.
    pub fn get(self) -> u64 {
        match self {
            Rlim::Value(v) => v,
            Rlim::Unlimited => u64::MAX,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "unlimited" => Some(Rlim::Unlimited),
            n => n.parse().ok().map(Rlim::Value),
        }
    }
}

impl Serialize for Rlim {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Rlim::Value(v) => s.serialize_u64(*v),
            Rlim::Unlimited => s.serialize_str("unlimited"),
        }
    }
}

impl fmt::Display for Rlim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rlim::Value(v) => f.write_str(&group(*v)),
            Rlim::Unlimited => f.write_str("unlimited"),
        }
    }
}

/// A soft and a hard resource limit, as `proc/self/limits` lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rlimit {
    /// The limit in force; a process may raise it up to `hard` itself (`ulimit -n`).
    pub soft: Rlim,
    /// The ceiling for `soft`; only root raises it.
    pub hard: Rlim,
}

/// An ephemeral port range, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortRange {
    /// The first port.
    pub low: u32,
    /// The last port.
    pub high: u32,
}

impl PortRange {
    /// Ports in the range.
    pub fn len(&self) -> u64 {
        u64::from(self.high.saturating_sub(self.low)) + u64::from(self.high >= self.low)
    }

    /// Whether the range holds no port.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The facts `ringcast doctor` reads from a host. `None` is a fact that could not be read;
/// its path is then in [`Host::unreadable`] (except for files that are legitimately absent:
/// `io_uring_disabled` before Linux 6.6, `file-nr`, and conntrack when not loaded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Host {
    /// The root directory the facts were read under.
    pub root: PathBuf,
    /// `kernel.osrelease`, as written.
    pub kernel: Option<String>,
    /// The version parsed from it.
    pub kernel_version: Option<KernelVersion>,
    /// `kernel.io_uring_disabled`: 0 allowed, 1 only for root and `kernel.io_uring_group`,
    /// 2 disabled. `None` when the file is absent (kernels before 6.6: allowed).
    pub io_uring_disabled: Option<u8>,
    /// Open files (`RLIMIT_NOFILE`).
    pub nofile: Option<Rlimit>,
    /// Locked memory (`RLIMIT_MEMLOCK`), in bytes. io_uring charges its rings to it only
    /// before Linux 5.12, older than the io_uring driver supports, so it is reported, not judged.
    pub memlock: Option<Rlimit>,
    /// `fs.nr_open`: the highest open-files limit any process may have.
    pub nr_open: Option<u64>,
    /// `fs.file-max`: open files for the whole system.
    pub file_max: Option<u64>,
    /// Files open on the whole system now (first field of `fs.file-nr`).
    pub files_open: Option<u64>,
    /// `net.ipv4.ip_local_port_range`.
    pub ip_local_port_range: Option<PortRange>,
    /// `net.core.somaxconn`: the kernel's cap on every listener's accept backlog.
    pub somaxconn: Option<u64>,
    /// `net.netfilter.nf_conntrack_max`, when connection tracking is loaded.
    pub conntrack_max: Option<u64>,
    /// `net.netfilter.nf_conntrack_count`, when connection tracking is loaded.
    pub conntrack_count: Option<u64>,
    /// `MemTotal`, in bytes.
    pub mem_total_bytes: Option<u64>,
    /// `MemAvailable`, in bytes: what can be allocated without swapping.
    pub mem_available_bytes: Option<u64>,
    /// Online CPUs.
    pub cores: Option<u64>,
    /// CPUs the reading process may run on (`Cpus_allowed_list`); `None` when
    /// `proc/self/status` is absent.
    pub cpus_allowed: Option<u64>,
    /// The selected transparent huge pages mode (`always`, `madvise` or `never`).
    pub transparent_hugepage: Option<String>,
    /// Files that should have been there but could not be read or parsed, relative to `root`.
    pub unreadable: Vec<String>,
}

impl Host {
    /// Reads every fact under `root` (`/` for this host).
    ///
    /// # Errors
    /// `root` is not a directory, or `proc/sys/kernel/osrelease` cannot be read under it (not a
    /// Linux root). Any other missing fact is `None` and listed in [`Host::unreadable`].
    pub fn read(root: &Path) -> io::Result<Host> {
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", root.display()),
            ));
        }
        let mut reader = Reader {
            root,
            unreadable: Vec::new(),
        };
        let kernel = fs::read_to_string(root.join("proc/sys/kernel/osrelease"))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{}: {e}; is {} a Linux root?",
                        root.join("proc/sys/kernel/osrelease").display(),
                        root.display()
                    ),
                )
            })?
            .trim()
            .to_owned();
        let limits = reader.required("proc/self/limits");
        let limit = |name: &str| limits.as_deref().and_then(|t| parse_limit(t, name));
        let (nofile, memlock) = (limit("Max open files"), limit("Max locked memory"));
        if limits.is_some() && nofile.is_none() {
            reader.unreadable.push("proc/self/limits".into());
        }
        let meminfo = reader.required("proc/meminfo");
        let mem = |key: &str| meminfo.as_deref().and_then(|t| parse_meminfo(t, key));
        let cores = match reader.optional("sys/devices/system/cpu/online") {
            Some(list) => count_cpu_list(&list),
            None => reader
                .required("proc/cpuinfo")
                .map(|t| {
                    t.lines()
                        .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
                        .count() as u64
                })
                .filter(|&n| n > 0),
        };
        let host = Host {
            root: root.to_owned(),
            kernel_version: KernelVersion::parse(&kernel),
            kernel: Some(kernel),
            io_uring_disabled: reader
                .optional("proc/sys/kernel/io_uring_disabled")
                .and_then(|t| t.trim().parse().ok()),
            nofile,
            memlock,
            nr_open: reader.number("proc/sys/fs/nr_open"),
            file_max: reader.number("proc/sys/fs/file-max"),
            files_open: reader
                .optional("proc/sys/fs/file-nr")
                .and_then(|t| t.split_whitespace().next()?.parse().ok()),
            ip_local_port_range: reader
                .required("proc/sys/net/ipv4/ip_local_port_range")
                .and_then(|t| {
                    let mut it = t.split_whitespace().map(str::parse::<u32>);
                    Some(PortRange {
                        low: it.next()?.ok()?,
                        high: it.next()?.ok()?,
                    })
                }),
            somaxconn: reader.number("proc/sys/net/core/somaxconn"),
            conntrack_max: reader
                .optional("proc/sys/net/netfilter/nf_conntrack_max")
                .and_then(|t| t.trim().parse().ok()),
            conntrack_count: reader
                .optional("proc/sys/net/netfilter/nf_conntrack_count")
                .and_then(|t| t.trim().parse().ok()),
            mem_total_bytes: mem("MemTotal"),
            mem_available_bytes: mem("MemAvailable"),
            cores,
            cpus_allowed: reader.optional("proc/self/status").and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .and_then(count_cpu_list)
            }),
            transparent_hugepage: reader
                .optional("sys/kernel/mm/transparent_hugepage/enabled")
                .and_then(|t| selected_mode(&t)),
            unreadable: Vec::new(),
        };
        if host.mem_available_bytes.is_none() && meminfo.is_some() {
            reader.unreadable.push("proc/meminfo".into());
        }
        if host.cores.is_none() {
            reader
                .unreadable
                .push("sys/devices/system/cpu/online".into());
        }
        reader.unreadable.dedup();
        Ok(Host {
            unreadable: reader.unreadable,
            ..host
        })
    }
}

struct Reader<'a> {
    root: &'a Path,
    unreadable: Vec<String>,
}

impl Reader<'_> {
    /// A file that may be absent on a healthy host.
    fn optional(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.root.join(rel)).ok()
    }

    /// A file every Linux host has: noted when it cannot be read.
    fn required(&mut self, rel: &str) -> Option<String> {
        let text = self.optional(rel);
        if text.is_none() {
            self.unreadable.push(rel.to_owned());
        }
        text
    }

    /// A required file holding one number.
    fn number(&mut self, rel: &str) -> Option<u64> {
        let n = self.required(rel)?.trim().parse().ok();
        if n.is_none() {
            self.unreadable.push(rel.to_owned());
        }
        n
    }
}

/// The soft and hard values of the line starting with `name` in `proc/self/limits`.
fn parse_limit(text: &str, name: &str) -> Option<Rlimit> {
    let rest = text.lines().find_map(|l| l.strip_prefix(name))?;
    let mut fields = rest.split_whitespace();
    Some(Rlimit {
        soft: Rlim::parse(fields.next()?)?,
        hard: Rlim::parse(fields.next()?)?,
    })
}

/// A `proc/meminfo` value in bytes (the file gives kB).
fn parse_meminfo(text: &str, key: &str) -> Option<u64> {
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// CPUs in a list such as `0-3,8,10-11`.
fn count_cpu_list(list: &str) -> Option<u64> {
    let mut n = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u64>().ok()?.checked_sub(a.parse().ok()?)? + 1,
            None => part.parse::<u64>().map(|_| 1).ok()?,
        };
    }
    (n > 0).then_some(n)
}

/// The bracketed word of `always [madvise] never`.
fn selected_mode(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_owned())
}

/// How many connections to check for, and how they are opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Target {
    /// Connections the host should hold at once.
    pub connections: u64,
    /// Whether they are opened from this host to one destination address (a proxy in front of
    /// ringcast, or a load generator), so that each takes an ephemeral port.
    pub outbound: bool,
}

impl Target {
    /// `connections` accepted by ringcast on this host: ephemeral ports do not limit them.
    pub fn inbound(connections: u64) -> Self {
        Self {
            connections,
            outbound: false,
        }
    }

    /// `connections` opened from this host to one destination: each takes an ephemeral port.
    pub fn outbound(connections: u64) -> Self {
        Self {
            connections,
            outbound: true,
        }
    }
}

/// Whether the io_uring driver can run on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum IoUring {
    /// Kernel new enough and io_uring allowed for every process.
    Available,
    /// `kernel.io_uring_disabled = 1`: only root and members of `kernel.io_uring_group`.
    Restricted,
    /// `kernel.io_uring_disabled = 2`: nobody.
    Disabled,
    /// The kernel is older than [`MIN_KERNEL_IO_URING`].
    KernelTooOld,
    /// The kernel version could not be parsed.
    Unknown,
}

impl IoUring {
    /// Judges the host's kernel version and `io_uring_disabled`.
    pub fn of(host: &Host) -> Self {
        match (host.kernel_version, host.io_uring_disabled) {
            (None, _) => IoUring::Unknown,
            (Some(v), _) if v < MIN_KERNEL_IO_URING => IoUring::KernelTooOld,
            (_, Some(2..)) => IoUring::Disabled,
            (_, Some(1)) => IoUring::Restricted,
            _ => IoUring::Available,
        }
    }

    /// The name used in text and JSON.
    pub fn name(self) -> &'static str {
        match self {
            IoUring::Available => "available",
            IoUring::Restricted => "restricted",
            IoUring::Disabled => "disabled",
            IoUring::KernelTooOld => "kernel-too-old",
            IoUring::Unknown => "unknown",
        }
    }
}

/// What bounds the connections a host can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Constraint {
    /// Open files: the process's soft limit, or the system's `fs.file-max`.
    FileDescriptors,
    /// `MemAvailable`.
    Memory,
    /// shards x `limits.max_connections_per_shard`.
    Config,
    /// `nf_conntrack_max`, when connection tracking is loaded.
    Conntrack,
    /// The ephemeral port range (outbound targets only).
    Ports,
}

impl Constraint {
    /// The name used in text and JSON (`file-descriptors`, `memory`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Constraint::FileDescriptors => "file-descriptors",
            Constraint::Memory => "memory",
            Constraint::Config => "config",
            Constraint::Conntrack => "conntrack",
            Constraint::Ports => "ports",
        }
    }
}

/// The most connections one limit allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LimitCheck {
    /// The limit.
    pub constraint: Constraint,
    /// The most connections it allows; `None` when a fact it needs could not be read.
    pub max_connections: Option<u64>,
    /// Whether it applies to this target (ports apply only to outbound targets).
    pub counted: bool,
    /// Connections missing to reach the target; 0 when it fits, is unknown or is not counted.
    pub short_by: u64,
    /// How the maximum was worked out, for people.
    pub how: String,
    /// Commands or config lines that lift the limit to the target, when it falls short.
    pub fixes: Vec<String>,
}

/// How serious a [`Finding`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// The target cannot be met (ringcast would not start, for one).
    Error,
    /// Worth fixing; the target may still be met.
    Warning,
}

/// Something found besides the connection limits: io_uring, backlog, huge pages, unreadable
/// facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Finding {
    /// How serious it is.
    pub severity: Severity,
    /// A short tag: `io-uring`, `somaxconn`, `transparent-hugepage`, `shards`, `unreadable`.
    pub topic: &'static str,
    /// What is wrong and why it matters.
    pub message: String,
    /// Commands or config lines that fix it.
    pub fixes: Vec<String>,
}

/// The engine side of the report: the effective config and what it costs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct EngineFacts {
    /// The configured driver (`io_uring` or `epoll`).
    pub driver: &'static str,
    /// Shards the engine would run.
    pub shards: u64,
    /// Where `shards` comes from: `config`, or `cores` when the config says 0.
    pub shards_from: &'static str,
    /// `limits.max_connections_per_shard`.
    pub max_connections_per_shard: u64,
    /// The port of `listen` (0: a free port picked at start).
    pub listen_port: u16,
    /// `io.listen_backlog`.
    pub listen_backlog: u32,
    /// `io.keep_request_head`.
    pub keep_request_head: bool,
    /// The costs used.
    pub costs: Costs,
    /// Descriptors the process and its shards hold besides connections.
    pub fixed_fds: u64,
    /// Memory the shards hold besides connections, in bytes.
    pub fixed_bytes: u64,
}

/// The answer of [`diagnose`]. `Display` is the text for people; serialize it for JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Report {
    /// The target checked.
    pub target: Target,
    /// Whether the host can hold the target: every counted limit is known and reaches it, and
    /// no finding is an error. A limit that could not be read makes this false: the doctor
    /// cannot vouch for it.
    pub fits: bool,
    /// The most connections the host holds: the smallest counted, known limit.
    pub max_connections: Option<u64>,
    /// The limit that gives `max_connections`.
    pub binding: Option<Constraint>,
    /// Whether the io_uring driver can run.
    pub io_uring: IoUring,
    /// The facts read.
    pub host: Host,
    /// The effective config and its costs.
    pub engine: EngineFacts,
    /// Every limit, in the order file descriptors, memory, config, conntrack (when loaded),
    /// ports.
    pub limits: Vec<LimitCheck>,
    /// Everything else worth knowing, errors first.
    pub findings: Vec<Finding>,
}

/// Reads the host under `root` and judges it: [`Host::read`], then [`diagnose`].
///
/// # Errors
/// As [`Host::read`].
pub fn run(root: &Path, config: &EngineConfig, target: Target) -> io::Result<Report> {
    Ok(diagnose(&Host::read(root)?, config, target))
}

/// Shards the engine would run on `host` with `config`: the config's `shards`, or when it is 0
/// one per CPU the process may use ([`Host::cpus_allowed`], else [`Host::cores`]; 1 when both
/// are unknown).
pub fn effective_shards(host: &Host, config: &EngineConfig) -> u64 {
    match config.shards {
        0 => host.cpus_allowed.or(host.cores).unwrap_or(1),
        n => n as u64,
    }
}

/// Judges `host` against `config` for `target`: the most connections each limit allows, the
/// binding one, and the fix for each shortfall.
pub fn diagnose(host: &Host, config: &EngineConfig, target: Target) -> Report {
    let costs = Costs::for_config(config);
    let shards = effective_shards(host, config);
    let shards_from = if config.shards == 0 {
        "cores"
    } else {
        "config"
    };
    let engine = EngineFacts {
        driver: config.driver.name(),
        shards,
        shards_from,
        max_connections_per_shard: config.limits.max_connections_per_shard as u64,
        listen_port: config.listen.port(),
        listen_backlog: config.io.listen_backlog,
        keep_request_head: config.io.keep_request_head,
        costs,
        fixed_fds: costs.fixed_fds(shards),
        fixed_bytes: shards * costs.fixed_bytes_per_shard,
    };
    let want = target.connections;
    let mut limits = vec![
        fd_limit(host, &engine, want),
        memory_limit(host, &engine, want),
        config_limit(&engine, want),
    ];
    if let Some(max) = host.conntrack_max {
        limits.push(conntrack_limit(host, &engine, max, want));
    }
    limits.push(port_limit(host, target));

    let io_uring = IoUring::of(host);
    let mut findings = Vec::new();
    if config.driver == Driver::IoUring {
        io_uring_findings(host, io_uring, &mut findings);
    }
    other_findings(host, &engine, &mut findings);
    findings.sort_by_key(|f| f.severity != Severity::Error);

    let binding = limits
        .iter()
        .filter(|l| l.counted)
        .filter_map(|l| Some((l.max_connections?, l.constraint)))
        .min_by_key(|&(max, _)| max);
    let fits = limits
        .iter()
        .all(|l| !l.counted || (l.max_connections.is_some() && l.short_by == 0))
        && findings.iter().all(|f| f.severity != Severity::Error);
    Report {
        target,
        fits,
        max_connections: binding.map(|b| b.0),
        binding: binding.map(|b| b.1),
        io_uring,
        host: host.clone(),
        engine,
        limits,
        findings,
    }
}

/// A limit that allows `max` connections (or an unknown number) against `want`.
fn limit(
    constraint: Constraint,
    max: Option<u64>,
    counted: bool,
    want: u64,
    how: String,
    fixes: impl FnOnce() -> Vec<String>,
) -> LimitCheck {
    let short_by = match max {
        Some(max) if counted => want.saturating_sub(max),
        _ => 0,
    };
    LimitCheck {
        constraint,
        max_connections: max,
        counted,
        short_by,
        how,
        fixes: if short_by > 0 { fixes() } else { Vec::new() },
    }
}

/// `n` rounded up to a multiple of 1024, for limits people type.
fn round_up(n: u64) -> u64 {
    n.div_ceil(1024).saturating_mul(1024)
}

fn fd_limit(host: &Host, engine: &EngineFacts, want: u64) -> LimitCheck {
    let soft = host.nofile.map(|l| l.soft.get());
    let system_free = host
        .file_max
        .map(|max| max.saturating_sub(host.files_open.unwrap_or(0)));
    let max = soft.map(|soft| {
        soft.min(system_free.unwrap_or(u64::MAX))
            .saturating_sub(engine.fixed_fds)
    });
    let how = match host.nofile {
        Some(l) => {
            let system = match system_free.filter(|&free| free < l.soft.get()) {
                Some(free) => format!(
                    ", and fs.file-max leaves only {} free system-wide",
                    group(free)
                ),
                None => String::new(),
            };
            format!(
                "soft open-files limit {} (hard {}){system} - {} for the process and its {} shards",
                l.soft, l.hard, engine.fixed_fds, engine.shards
            )
        }
        None => "open-files limit unknown: proc/self/limits unreadable".to_owned(),
    };
    limit(Constraint::FileDescriptors, max, true, want, how, || {
        let need = round_up(want.saturating_add(engine.fixed_fds));
        if need > NR_OPEN_MAX {
            return vec![format!(
                "# {} descriptors are more than Linux gives one process (fs.nr_open at most {}): \
                 spread the connections over hosts (see ringcast capacity)",
                group(need),
                group(NR_OPEN_MAX)
            )];
        }
        let mut fixes = Vec::new();
        if host.nr_open.is_some_and(|n| n < need) {
            fixes.push(format!("sysctl -w fs.nr_open={need}"));
        }
        if system_free.is_some_and(|free| free < need) {
            let open = host.files_open.unwrap_or(0);
            fixes.push(format!(
                "sysctl -w fs.file-max={}",
                round_up(open.saturating_add(need))
            ));
        }
        if let Some(l) = host.nofile {
            if l.hard.get() < need {
                fixes.push(format!(
                    "echo 'ringcast hard nofile {need}' >> /etc/security/limits.d/90-ringcast.conf"
                ));
            }
            if l.soft.get() < need {
                fixes.push(format!(
                    "echo 'ringcast soft nofile {need}' >> /etc/security/limits.d/90-ringcast.conf"
                ));
                fixes.push(format!(
                    "ulimit -n {need}   # in the shell that starts ringcast, after the hard limit allows it"
                ));
            }
        }
        if host.nofile.is_none_or(|l| l.soft.get() < need) {
            fixes.push(format!(
                "LimitNOFILE={need}   # [Service] of the systemd unit (tuning/profiles/ringcast.service)"
            ));
        }
        if need <= crate::capacity::DEFAULT_NOFILE_PER_HOST {
            fixes.push(
                "tuning/profiles/apply.sh --apply   # sysctl profile, limits and unit for 4,194,304 files"
                    .to_owned(),
            );
        }
        fixes
    })
}

fn memory_limit(host: &Host, engine: &EngineFacts, want: u64) -> LimitCheck {
    let per_conn = engine.costs.bytes_per_connection();
    let max = host
        .mem_available_bytes
        .map(|avail| avail.saturating_sub(engine.fixed_bytes) / per_conn);
    let how = match host.mem_available_bytes {
        Some(avail) => format!(
            "(MemAvailable {} - {} shards x {} fixed) / ({} B user + {} B kernel per idle connection)",
            bytes(avail),
            engine.shards,
            bytes(engine.costs.fixed_bytes_per_shard),
            engine.costs.user_bytes_per_connection,
            engine.costs.kernel_bytes_per_connection
        ),
        None => "memory unknown: MemAvailable missing from proc/meminfo".to_owned(),
    };
    limit(Constraint::Memory, max, true, want, how, || {
        let need = engine
            .fixed_bytes
            .saturating_add(want.saturating_mul(per_conn));
        let have = host.mem_available_bytes.unwrap_or(0);
        let mut fixes = vec![format!(
            "# {} connections need {} available; {} is: add {} of RAM or free it",
            group(want),
            bytes(need),
            bytes(have),
            bytes(need.saturating_sub(have))
        )];
        if engine.keep_request_head {
            let saved = crate::capacity::IDLE_USER_BYTES_PER_CONNECTION
                - crate::capacity::IDLE_USER_BYTES_PER_CONNECTION_NO_HEAD;
            fixes.push(format!(
                "[io] keep_request_head = false   # ringcast.toml: {saved} B less per connection; ConnInfo keeps only the request target"
            ));
        }
        if let Some(max) = max.filter(|&m| m > 0) {
            fixes.push(format!(
                "# or spread {} connections over {} hosts like this one (see ringcast capacity)",
                group(want),
                want.div_ceil(max)
            ));
        }
        fixes
    })
}

fn config_limit(engine: &EngineFacts, want: u64) -> LimitCheck {
    let max = engine
        .shards
        .saturating_mul(engine.max_connections_per_shard);
    let how = format!(
        "{} shards x limits.max_connections_per_shard {}",
        engine.shards,
        group(engine.max_connections_per_shard)
    );
    limit(Constraint::Config, Some(max), true, want, how, || {
        vec![format!(
            "[limits] max_connections_per_shard = {}   # ringcast.toml",
            want.div_ceil(engine.shards.max(1))
        )]
    })
}

fn conntrack_limit(host: &Host, engine: &EngineFacts, max: u64, want: u64) -> LimitCheck {
    let used = host.conntrack_count.unwrap_or(0);
    let how = format!(
        "net.netfilter.nf_conntrack_max {} - {} entries in use (every tracked connection takes one)",
        group(max),
        group(used)
    );
    limit(
        Constraint::Conntrack,
        Some(max.saturating_sub(used)),
        true,
        want,
        how,
        || {
            let mut fixes = vec![format!(
                "sysctl -w net.netfilter.nf_conntrack_max={}",
                round_up(used.saturating_add(want))
            )];
            if engine.listen_port != 0 {
                // Or keep ringcast's connections out of the table altogether.
                let port = engine.listen_port;
                fixes.push(format!(
                    "iptables -t raw -A PREROUTING -p tcp --dport {port} -j NOTRACK"
                ));
                fixes.push(format!(
                    "iptables -t raw -A OUTPUT -p tcp --sport {port} -j NOTRACK"
                ));
            }
            fixes
        },
    )
}

fn port_limit(host: &Host, target: Target) -> LimitCheck {
    let ports = host.ip_local_port_range.map(|r| r.len());
    let how = match host.ip_local_port_range {
        Some(r) if target.outbound => format!(
            "net.ipv4.ip_local_port_range {}-{}: one port per connection per source address and destination",
            r.low, r.high
        ),
        Some(r) => format!(
            "net.ipv4.ip_local_port_range {}-{}: counts only for connections opened from this host (--outbound)",
            r.low, r.high
        ),
        None => "port range unknown: proc/sys/net/ipv4/ip_local_port_range unreadable".to_owned(),
    };
    let want = target.connections;
    limit(Constraint::Ports, ports, target.outbound, want, how, || {
        let mut fixes = Vec::new();
        let mut per_address = ports.unwrap_or(0);
        if per_address < PROFILE_PORTS.len() {
            fixes.push(format!(
                "sysctl -w net.ipv4.ip_local_port_range=\"{} {}\"",
                PROFILE_PORTS.low, PROFILE_PORTS.high
            ));
            per_address = PROFILE_PORTS.len();
        }
        if want > per_address {
            fixes.push(format!(
                "# and open them from {} source addresses (nginx proxy_bind, HAProxy source): {} ports each",
                want.div_ceil(per_address),
                group(per_address)
            ));
        }
        fixes
    })
}

fn io_uring_findings(host: &Host, state: IoUring, findings: &mut Vec<Finding>) {
    let epoll = [
        "driver = \"epoll\"   # ringcast.toml".to_owned(),
        "ringcast serve --driver epoll".to_owned(),
    ];
    let (severity, message, mut fixes) = match state {
        IoUring::Available => return,
        IoUring::Disabled => (
            Severity::Error,
            "kernel.io_uring_disabled = 2: io_uring is off for every process, so `ringcast serve` \
             with driver = \"io_uring\" will not start"
                .to_owned(),
            vec!["sysctl -w kernel.io_uring_disabled=0".to_owned()],
        ),
        IoUring::Restricted => (
            Severity::Warning,
            "kernel.io_uring_disabled = 1: io_uring only for root and members of the group \
             in kernel.io_uring_group; ringcast run as another user will not start"
                .to_owned(),
            vec![
                "sysctl -w kernel.io_uring_disabled=0".to_owned(),
                "SupplementaryGroups=<the group whose id is in /proc/sys/kernel/io_uring_group>   # systemd unit"
                    .to_owned(),
            ],
        ),
        IoUring::KernelTooOld => (
            Severity::Error,
            format!(
                "kernel {} is older than {MIN_KERNEL_IO_URING}: the io_uring driver needs multishot \
                 receive into provided buffers, so `ringcast serve` will not start",
                host.kernel.as_deref().unwrap_or("?")
            ),
            vec![format!("# upgrade the kernel to {MIN_KERNEL_IO_URING} or newer")],
        ),
        IoUring::Unknown => (
            Severity::Warning,
            format!(
                "kernel release {:?} not understood: cannot tell whether io_uring is usable",
                host.kernel.as_deref().unwrap_or("")
            ),
            Vec::new(),
        ),
    };
    fixes.extend(epoll);
    findings.push(Finding {
        severity,
        topic: "io-uring",
        message,
        fixes,
    });
}

fn other_findings(host: &Host, engine: &EngineFacts, findings: &mut Vec<Finding>) {
    if let Some(max) = host
        .somaxconn
        .filter(|&m| m < u64::from(engine.listen_backlog))
    {
        findings.push(Finding {
            severity: Severity::Warning,
            topic: "somaxconn",
            message: format!(
                "net.core.somaxconn = {max} caps each listener's accept backlog below io.listen_backlog = {}: \
                 a connection storm overflows the queue and clients retry after SYN timeouts",
                engine.listen_backlog
            ),
            fixes: vec![format!("sysctl -w net.core.somaxconn={}", engine.listen_backlog)],
        });
    }
    if host.transparent_hugepage.as_deref() == Some("always") {
        findings.push(Finding {
            severity: Severity::Warning,
            topic: "transparent-hugepage",
            message:
                "transparent huge pages = always: the bench measured 1,476 B instead of 694 B \
                      per idle connection with them (bench/RESULTS.md); the ringcast binary's \
                      allocator opts out (mimalloc no_thp), an embedder's may not"
                    .to_owned(),
            fixes: vec!["echo madvise > /sys/kernel/mm/transparent_hugepage/enabled".to_owned()],
        });
    }
    if let Some(cpus) = host
        .cpus_allowed
        .or(host.cores)
        .filter(|&c| engine.shards_from == "config" && engine.shards > c)
    {
        findings.push(Finding {
            severity: Severity::Warning,
            topic: "shards",
            message: format!(
                "{} shards on {cpus} CPUs: shards share cores, and each waits for the others",
                engine.shards
            ),
            fixes: vec!["shards = 0   # ringcast.toml: one per core".to_owned()],
        });
    }
    for path in &host.unreadable {
        findings.push(Finding {
            severity: Severity::Warning,
            topic: "unreadable",
            message: format!("could not read {path}: the facts it holds are unknown"),
            fixes: Vec::new(),
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.host;
        let e = &self.engine;
        let unknown = || "?".to_owned();
        writeln!(
            f,
            "ringcast doctor: host at {}, target {} {} connections",
            h.root.display(),
            group(self.target.connections),
            if self.target.outbound {
                "outbound"
            } else {
                "inbound"
            }
        )?;
        writeln!(f)?;
        writeln!(f, "host")?;
        writeln!(
            f,
            "  kernel        {} (io_uring {}{})",
            h.kernel.as_deref().unwrap_or("?"),
            self.io_uring.name(),
            h.io_uring_disabled
                .map(|d| format!(", kernel.io_uring_disabled = {d}"))
                .unwrap_or_default()
        )?;
        let rl = |l: Option<Rlimit>| {
            l.map(|l| format!("soft {}, hard {}", l.soft, l.hard))
                .unwrap_or_else(unknown)
        };
        writeln!(
            f,
            "  open files    {} (fs.nr_open {}, fs.file-max {}{})",
            rl(h.nofile),
            h.nr_open.map(group).unwrap_or_else(unknown),
            h.file_max.map(group).unwrap_or_else(unknown),
            h.files_open
                .map(|n| format!(", {} open", group(n)))
                .unwrap_or_default()
        )?;
        writeln!(f, "  memlock       {}", rl(h.memlock))?;
        writeln!(
            f,
            "  memory        {} total, {} available",
            h.mem_total_bytes.map(bytes).unwrap_or_else(unknown),
            h.mem_available_bytes.map(bytes).unwrap_or_else(unknown)
        )?;
        writeln!(
            f,
            "  cores         {} online{}",
            h.cores.map(group).unwrap_or_else(unknown),
            h.cpus_allowed
                .map(|n| format!(", {} this process may use", group(n)))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "  ports         {}",
            h.ip_local_port_range
                .map(|r| format!("{}-{} ({})", r.low, r.high, group(r.len())))
                .unwrap_or_else(unknown)
        )?;
        writeln!(
            f,
            "  somaxconn     {}",
            h.somaxconn.map(group).unwrap_or_else(unknown)
        )?;
        if let Some(max) = h.conntrack_max {
            writeln!(
                f,
                "  conntrack     {} of {} in use",
                h.conntrack_count.map(group).unwrap_or_else(unknown),
                group(max)
            )?;
        }
        writeln!(
            f,
            "  huge pages    {}",
            h.transparent_hugepage.as_deref().unwrap_or("?")
        )?;
        writeln!(f)?;
        writeln!(f, "engine (effective config)")?;
        writeln!(
            f,
            "  driver {}, {} shards (from {}), {} connections per shard, backlog {}",
            e.driver,
            e.shards,
            e.shards_from,
            group(e.max_connections_per_shard),
            e.listen_backlog
        )?;
        writeln!(
            f,
            "  per connection {} B user + {} B kernel (idle, measured); per shard {} and {} descriptors",
            e.costs.user_bytes_per_connection,
            e.costs.kernel_bytes_per_connection,
            bytes(e.costs.fixed_bytes_per_shard),
            e.costs.fds_per_shard
        )?;
        writeln!(f)?;
        writeln!(f, "max connections")?;
        for l in &self.limits {
            let max = l.max_connections.map(group).unwrap_or_else(unknown);
            let verdict = if !l.counted {
                "not counted".to_owned()
            } else if l.max_connections.is_none() {
                "unknown".to_owned()
            } else if l.short_by > 0 {
                format!("short by {}", group(l.short_by))
            } else {
                "ok".to_owned()
            };
            let mark = if self.binding == Some(l.constraint) {
                "  <- binding"
            } else {
                ""
            };
            writeln!(
                f,
                "  {:<17} {:>14}  {verdict}{mark}",
                l.constraint.name(),
                max
            )?;
            writeln!(f, "    {}", l.how)?;
        }
        writeln!(f)?;
        let at_most = match (self.binding, self.max_connections) {
            (Some(b), Some(max)) => format!("at most {} (binding: {})", group(max), b.name()),
            _ => "at most ? (no limit could be read)".to_owned(),
        };
        let want = group(self.target.connections);
        let errors: Vec<_> = self
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.topic)
            .collect();
        let unknown_limits: Vec<_> = self
            .limits
            .iter()
            .filter(|l| l.counted && l.max_connections.is_none())
            .map(|l| l.constraint.name())
            .collect();
        if self.fits {
            writeln!(f, "verdict: fits {want} connections, {at_most}")?;
        } else if !errors.is_empty() {
            writeln!(
                f,
                "verdict: does NOT fit {want} connections: {} error (see findings); the limits allow {at_most}",
                errors.join(", ")
            )?;
        } else if self.limits.iter().any(|l| l.short_by > 0) {
            writeln!(f, "verdict: does NOT fit {want} connections: {at_most}")?;
        } else {
            writeln!(
                f,
                "verdict: cannot vouch for {want} connections: {} unknown (see findings)",
                unknown_limits.join(", ")
            )?;
        }
        let shortfalls: Vec<_> = self.limits.iter().filter(|l| !l.fixes.is_empty()).collect();
        if !shortfalls.is_empty() {
            writeln!(f)?;
            writeln!(f, "fixes")?;
            for l in shortfalls {
                writeln!(f, "  {}:", l.constraint.name())?;
                for fix in &l.fixes {
                    writeln!(f, "    {fix}")?;
                }
            }
        }
        if !self.findings.is_empty() {
            writeln!(f)?;
            writeln!(f, "findings")?;
            for finding in &self.findings {
                let severity = match finding.severity {
                    Severity::Error => "error",
                    Severity::Warning => "warning",
                };
                writeln!(f, "  {severity} ({}): {}", finding.topic, finding.message)?;
                for fix in &finding.fixes {
                    writeln!(f, "    {fix}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_parse_from_release_strings() {
        let v = |s| KernelVersion::parse(s);
        assert_eq!(
            v("6.8.0-45-generic"),
            Some(KernelVersion { major: 6, minor: 8 })
        );
        assert_eq!(
            v("5.15.0\n"),
            Some(KernelVersion {
                major: 5,
                minor: 15
            })
        );
        assert_eq!(v("6.1+"), Some(KernelVersion { major: 6, minor: 1 }));
        assert_eq!(
            v("6.10rc1"),
            Some(KernelVersion {
                major: 6,
                minor: 10
            })
        );
        assert_eq!(v("linux"), None);
        assert!(v("5.19").unwrap() < MIN_KERNEL_IO_URING);
    }

    #[test]
    fn cpu_lists_count_ranges_and_singles() {
        assert_eq!(count_cpu_list("0-3,8,10-11\n"), Some(7));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
    }

    #[test]
    fn limits_lines_give_soft_and_hard_with_unlimited() {
        let text = "Limit                     Soft Limit           Hard Limit           Units\n\
                    Max locked memory         8388608              unlimited            bytes\n\
                    Max open files            1024                 524288               files\n";
        assert_eq!(
            parse_limit(text, "Max open files"),
            Some(Rlimit {
                soft: Rlim::Value(1024),
                hard: Rlim::Value(524_288)
            })
        );
        assert_eq!(
            parse_limit(text, "Max locked memory").unwrap().hard,
            Rlim::Unlimited
        );
    }

    #[test]
    fn meminfo_values_are_bytes_and_thp_mode_is_the_bracketed_one() {
        let text = "MemTotal:       16384 kB\nMemAvailable:    8192 kB\n";
        assert_eq!(parse_meminfo(text, "MemTotal"), Some(16 << 20));
        assert_eq!(parse_meminfo(text, "MemAvailable"), Some(8 << 20));
        assert_eq!(parse_meminfo(text, "MemFree"), None);
        assert_eq!(
            selected_mode("always [madvise] never\n").as_deref(),
            Some("madvise")
        );
    }

    #[test]
    fn port_ranges_count_both_ends() {
        let r = PortRange {
            low: 32_768,
            high: 60_999,
        };
        assert_eq!(r.len(), 28_232);
        assert!(PortRange { low: 2, high: 1 }.is_empty());
    }
}
