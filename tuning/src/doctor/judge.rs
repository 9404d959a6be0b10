//! Judging a host: the most connections each limit allows, which binds first, the fix for each
//! shortfall, and the other findings ([`diagnose`], giving a [`Report`]).
//!
//! It works from a [`Host`] already read and never touches files; the report's text is
//! `render`'s.

use serde::Serialize;

use ringcast::{Driver, EngineConfig};

use super::{Host, KernelVersion, PortRange};
use crate::capacity::{bytes, group, Costs};
use crate::constraint::Constraint;

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

/// The most connections one limit allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LimitCheck {
    /// The limit. Never [`Constraint::Cpu`]: the doctor counts connections a host holds, not
    /// the CPU a load needs (that is [`capacity`](crate::capacity)'s).
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
    /// The limit that gives `max_connections` (never [`Constraint::Cpu`]).
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
        fixed_bytes: costs.fixed_bytes(shards),
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
        .map(|avail| engine.costs.connections_in(avail, engine.shards));
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
