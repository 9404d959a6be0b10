//! Capacity planning without a host: how many hosts a deployment needs, and which limit decides.
//!
//! Owns the measured per-connection costs ([`Costs`], shared with [`doctor`](crate::doctor)),
//! the planning inputs ([`Inputs`]) and the answer ([`Estimate`]): hosts needed by open files,
//! by memory, by CPU and by the config's connection cap, with the binding one named. It reads
//! nothing from the machine it runs on and opens nothing; every figure comes from the inputs,
//! the [`EngineConfig`], the constants below and the engine's kernel cost per connection
//! ([`ringcast::KERNEL_BYTES_PER_CONNECTION`]).
//!
//! # Where the figures come from
//!
//! Every constant cites `bench/RESULTS.md`: the run of 2026-11-23 on a 2-core VM (Linux 6.18),
//! reproduced with
//!
//! ```sh
//! cargo build --release -p ringcast-cli
//! cargo build --release -p ringcast-bench --bins
//! target/release/loadgen compare --rounds 3 --duration 4 --idle 10000
//! ```
//!
//! and, for the default config's idle figure, `loadgen idle --conns 10000 --hold 0` against
//! `ringcast serve --echo --shards 1`.
//!
//! Rerun it on the hardware you plan for and compare before trusting a plan near its edge.
//!
//! # Example
//!
//! ```
//! use ringcast::EngineConfig;
//! use ringcast_tuning::capacity::{Constraint, Inputs};
//!
//! // 500,000 users with one connection each, on hosts of 8 shards and 32 GiB.
//! let inputs = Inputs::new(500_000, 8, 32 << 30)
//!     .with_messages_per_sec(5_000.0)
//!     .with_fanout(100.0);
//! let estimate = inputs.estimate(&EngineConfig::default()).unwrap();
//! assert_eq!(estimate.connections, 500_000);
//! assert!(estimate.hosts >= 1);
//! println!("{estimate}");
//! ```

use std::fmt;

use serde::Serialize;

use ringcast::{ConfigError, Driver, EngineConfig};

pub use crate::constraint::Constraint;

/// Server RSS per idle upgraded connection, in bytes, with `[io] keep_request_head = true`.
///
/// `bench/RESULTS.md`, "Idle, 10,000 connections" (run of 2026-11-23, when keeping the head
/// was the default): 415 B of server RSS per connection (`target/release/loadgen compare
/// --rounds 3 --duration 4 --idle 10000`). It includes the slab entry, the kept upgrade head,
/// allocator overhead and rounding.
pub const IDLE_USER_BYTES_PER_CONNECTION: u64 = 415;

/// Server RSS per idle upgraded connection, in bytes, with the default
/// `[io] keep_request_head = false`.
///
/// `bench/RESULTS.md`, "Idle, 10,000 connections": 270 B (`loadgen idle --conns 10000
/// --hold 0` against `ringcast serve --echo --shards 1`).
pub const IDLE_USER_BYTES_PER_CONNECTION_NO_HEAD: u64 = 270;

/// Server CPU per message, in nanoseconds.
///
/// `bench/RESULTS.md`, "Echo, closed loop", ringcast row, 100 conns x 20 B: 3.84 us of
/// server CPU per echoed message (one frame received and parsed, one frame sent), median of 3
/// rounds, server at 98% of one core.
pub const CPU_NANOS_PER_MESSAGE: u64 = 3_840;

/// Server CPU per delivery (one frame sent to one subscriber) when sends are batched, in
/// nanoseconds: the floor, reached when each connection receives many messages per second.
///
/// `bench/RESULTS.md`, "Broadcast, all-to-all lockstep", ringcast row, N = 100 clients x 20 B:
/// 0.196 us of server CPU per delivery, median of 3 rounds, at 5,004,896 deliveries/s, 50,049
/// per connection per second: each send carries many frames.
pub const CPU_NANOS_PER_DELIVERY: u64 = 196;

/// Server CPU per delivery when every message is a send of its own, in nanoseconds: the cost
/// at low rates per connection.
///
/// `bench/RESULTS.md`, fan-out "Within capacity", `ringcast --broadcast`, R = 50: 3.79 us of
/// server CPU per delivery at 250,352 deliveries/s to 5,000 subscribers, 50 per connection per
/// second (one frame per send, and on loopback the receiver's wakeup too).
pub const CPU_NANOS_PER_DELIVERY_UNBATCHED: u64 = 3_790;

/// Measured CPU per delivery by deliveries per connection per second, rising rate: the
/// unbatched point, `ringcast --broadcast` at R = 200 (0.912 us at 200 per connection per
/// second, `bench/RESULTS.md` fan-out "Within capacity"), and the batched point.
/// [`cpu_nanos_per_delivery_at`] interpolates between them.
pub const CPU_NANOS_PER_DELIVERY_BY_RATE: [(f64, u64); 3] = [
    (50.0, CPU_NANOS_PER_DELIVERY_UNBATCHED),
    (200.0, 912),
    (50_049.0, CPU_NANOS_PER_DELIVERY),
];

/// Server CPU per delivery, in nanoseconds, when each connection receives `rate` deliveries
/// per second: the more frames wait for a connection, the more one send carries. Below the
/// lowest measured rate, the unbatched cost ([`CPU_NANOS_PER_DELIVERY_UNBATCHED`]); above the
/// highest, the batched one ([`CPU_NANOS_PER_DELIVERY`]); between measured points, straight
/// lines on log-log axes.
pub fn cpu_nanos_per_delivery_at(rate: f64) -> f64 {
    let points = CPU_NANOS_PER_DELIVERY_BY_RATE;
    let (first, last) = (points[0], points[points.len() - 1]);
    // NaN falls here too: the dear end, never the cheap one.
    if rate.is_nan() || rate <= first.0 {
        return first.1 as f64;
    }
    if rate >= last.0 {
        return last.1 as f64;
    }
    let i = points
        .iter()
        .position(|p| p.0 >= rate)
        .unwrap_or(points.len() - 1);
    let ((r0, c0), (r1, c1)) = (points[i - 1], points[i]);
    let t = (rate.ln() - r0.ln()) / (r1.ln() - r0.ln());
    ((c0 as f64).ln() + t * ((c1 as f64).ln() - (c0 as f64).ln())).exp()
}

/// Open descriptors of a ringcast process besides its shards and connections. Counted in
/// `/proc/PID/fd` of `ringcast serve` with 1 and 4 shards: 7 (stdin, stdout, stderr, the
/// signal handler's socket pair, a pipe, one more), doubled for logs and an embedder's own.
pub const FDS_PER_PROCESS: u64 = 16;

/// Descriptors each shard holds besides its connections, io_uring driver. Counted in
/// `/proc/PID/fd` of `ringcast serve --driver io_uring` with 1 and 4 shards: the listener, two
/// rings (the runtime's and the socket ring), two eventfds and one epoll instance.
pub const FDS_PER_SHARD_IO_URING: u64 = 6;

/// Descriptors each shard holds besides its connections, epoll driver. Counted as for
/// [`FDS_PER_SHARD_IO_URING`]: the listener, the epoll instance and its wake-up eventfd.
pub const FDS_PER_SHARD_EPOLL: u64 = 3;

/// Kernel memory of one io_uring per submission entry, in bytes: a 64-byte submission entry,
/// its 4-byte index, and two 16-byte completion entries (the completion queue is twice the
/// submission queue). From the io_uring ABI, not measured.
const RING_BYTES_PER_ENTRY: u64 = 64 + 4 + 2 * 16;

/// Bytes of one provided-buffer descriptor in a buffer ring (`io_uring_buf`).
const BUF_RING_ENTRY_BYTES: u64 = 16;

/// Open files per host a plan assumes unless told otherwise: the `LimitNOFILE` of
/// `tuning/profiles/ringcast.service` (and `fs.nr_open` of the sysctl profile).
pub const DEFAULT_NOFILE_PER_HOST: u64 = 4_194_304;

/// What one ringcast process costs, for one [`EngineConfig`].
///
/// The per-connection figures are measured (see the constants in this module); the per-shard
/// ones follow from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Costs {
    /// Server RSS per idle connection, in bytes ([`IDLE_USER_BYTES_PER_CONNECTION`], or
    /// [`IDLE_USER_BYTES_PER_CONNECTION_NO_HEAD`] when the request head is not kept).
    pub user_bytes_per_connection: u64,
    /// Kernel memory per idle connection, in bytes: the engine's figure,
    /// [`ringcast::KERNEL_BYTES_PER_CONNECTION`].
    pub kernel_bytes_per_connection: u64,
    /// Memory each shard holds whatever its connections, in bytes. io_uring driver: the
    /// receive pool (`io.ring_buffers` x `io.ring_buffer_bytes`, touched at start), its buffer
    /// ring, and the two rings (`io.uring_entries` each). epoll driver: the read buffer
    /// (`io.read_buffer_bytes`). Thread stacks and the allocator's own arenas are not counted.
    pub fixed_bytes_per_shard: u64,
    /// Descriptors each shard holds besides its connections ([`FDS_PER_SHARD_IO_URING`] or
    /// [`FDS_PER_SHARD_EPOLL`]).
    pub fds_per_shard: u64,
    /// Descriptors of the process itself ([`FDS_PER_PROCESS`]).
    pub fds_per_process: u64,
    /// Server CPU per message received, in nanoseconds ([`CPU_NANOS_PER_MESSAGE`]).
    pub cpu_nanos_per_message: u64,
    /// Server CPU per delivery sent when sends are batched (a high rate per connection), in
    /// nanoseconds ([`CPU_NANOS_PER_DELIVERY`]).
    pub cpu_nanos_per_delivery_batched: u64,
    /// Server CPU per delivery sent when each is a send of its own (a low rate per
    /// connection), in nanoseconds ([`CPU_NANOS_PER_DELIVERY_UNBATCHED`]).
    pub cpu_nanos_per_delivery_unbatched: u64,
}

impl Costs {
    /// The costs of a process running `config`.
    pub fn for_config(config: &EngineConfig) -> Costs {
        let io = &config.io;
        let (fixed_bytes_per_shard, fds_per_shard) = match config.driver {
            Driver::IoUring => (
                u64::from(io.ring_buffers) * (io.ring_buffer_bytes as u64 + BUF_RING_ENTRY_BYTES)
                    + 2 * u64::from(io.uring_entries) * RING_BYTES_PER_ENTRY,
                FDS_PER_SHARD_IO_URING,
            ),
            // `Driver` is non-exhaustive: epoll, and any driver added later until it is
            // measured, costs one read buffer per shard.
            _ => (io.read_buffer_bytes as u64, FDS_PER_SHARD_EPOLL),
        };
        Costs {
            user_bytes_per_connection: if io.keep_request_head {
                IDLE_USER_BYTES_PER_CONNECTION
            } else {
                IDLE_USER_BYTES_PER_CONNECTION_NO_HEAD
            },
            kernel_bytes_per_connection: ringcast::KERNEL_BYTES_PER_CONNECTION,
            fixed_bytes_per_shard,
            fds_per_shard,
            fds_per_process: FDS_PER_PROCESS,
            cpu_nanos_per_message: CPU_NANOS_PER_MESSAGE,
            cpu_nanos_per_delivery_batched: CPU_NANOS_PER_DELIVERY,
            cpu_nanos_per_delivery_unbatched: CPU_NANOS_PER_DELIVERY_UNBATCHED,
        }
    }

    /// User plus kernel memory per idle connection, in bytes.
    pub fn bytes_per_connection(&self) -> u64 {
        self.user_bytes_per_connection + self.kernel_bytes_per_connection
    }

    /// Descriptors a process with `shards` shards holds besides its connections.
    pub fn fixed_fds(&self, shards: u64) -> u64 {
        self.fds_per_process + shards * self.fds_per_shard
    }

    /// Memory `shards` shards hold besides their connections, in bytes.
    pub fn fixed_bytes(&self, shards: u64) -> u64 {
        shards * self.fixed_bytes_per_shard
    }

    /// Idle connections that fit in `bytes` of memory once `shards` shards have taken their
    /// fixed share: the memory limit of both the doctor (`MemAvailable`) and the plan (each
    /// host's usable RAM).
    pub fn connections_in(&self, bytes: u64, shards: u64) -> u64 {
        bytes
            .saturating_sub(self.fixed_bytes(shards))
            .checked_div(self.bytes_per_connection())
            .unwrap_or(0)
    }
}

/// What a plan needs: load and host shape. Build with [`Inputs::new`] and the `with_*`
/// setters; [`Inputs::estimate`] answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Inputs {
    /// Users at peak.
    pub users: u64,
    /// Connections each user holds on average. Default 1.
    pub connections_per_user: f64,
    /// Shards (cores given to ringcast) per host, 1 to 1024.
    pub shards_per_host: u64,
    /// RAM per host, in bytes.
    pub ram_per_host_bytes: u64,
    /// Messages per second published (received by ringcast), across the whole deployment.
    /// Default 0.
    pub messages_per_sec: f64,
    /// Deliveries per message: how many connections receive each one. Default 1.
    pub fanout: f64,
    /// Open-files limit of the ringcast process on each host. Default
    /// [`DEFAULT_NOFILE_PER_HOST`], the tuned profile's.
    pub nofile_per_host: u64,
    /// Fraction of each shard's core that message work may use, in (0, 1]. Default 0.5: latency
    /// percentiles grow fast as a core nears full load; 0.8 suits throughput-first loads.
    pub cpu_utilisation: f64,
    /// Fraction of RAM kept free for the OS, page cache, other processes and busy connections'
    /// queued data (idle costs only are counted per connection), in [0, 1). Default 0.25.
    pub memory_headroom: f64,
}

impl Inputs {
    /// A plan for `users` users on hosts of `shards_per_host` shards and `ram_per_host_bytes`
    /// of RAM, every other input at its default.
    pub fn new(users: u64, shards_per_host: u64, ram_per_host_bytes: u64) -> Self {
        Self {
            users,
            connections_per_user: 1.0,
            shards_per_host,
            ram_per_host_bytes,
            messages_per_sec: 0.0,
            fanout: 1.0,
            nofile_per_host: DEFAULT_NOFILE_PER_HOST,
            cpu_utilisation: 0.5,
            memory_headroom: 0.25,
        }
    }

    /// Sets [`Inputs::connections_per_user`].
    #[must_use]
    pub fn with_connections_per_user(mut self, n: f64) -> Self {
        self.connections_per_user = n;
        self
    }

    /// Sets [`Inputs::messages_per_sec`].
    #[must_use]
    pub fn with_messages_per_sec(mut self, n: f64) -> Self {
        self.messages_per_sec = n;
        self
    }

    /// Sets [`Inputs::fanout`].
    #[must_use]
    pub fn with_fanout(mut self, n: f64) -> Self {
        self.fanout = n;
        self
    }

    /// Sets [`Inputs::nofile_per_host`].
    #[must_use]
    pub fn with_nofile_per_host(mut self, n: u64) -> Self {
        self.nofile_per_host = n;
        self
    }

    /// Sets [`Inputs::cpu_utilisation`].
    #[must_use]
    pub fn with_cpu_utilisation(mut self, fraction: f64) -> Self {
        self.cpu_utilisation = fraction;
        self
    }

    /// Sets [`Inputs::memory_headroom`].
    #[must_use]
    pub fn with_memory_headroom(mut self, fraction: f64) -> Self {
        self.memory_headroom = fraction;
        self
    }

    /// Hosts needed by each limit for these inputs and `config` (its driver, buffers, request
    /// head and `limits.max_connections_per_shard`; its `shards` is ignored in favour of
    /// [`Inputs::shards_per_host`]).
    ///
    /// Per host: open files hold `nofile_per_host` minus the process's and shards' own
    /// descriptors; memory holds `ram x (1 - headroom)` minus the shards' fixed costs, divided
    /// by the user and kernel bytes of an idle connection; CPU gives `shards x utilisation`
    /// cores to `messages x cpu_per_message + messages x fanout x cpu_per_delivery`, where
    /// `cpu_per_delivery` follows the deliveries each connection receives per second
    /// ([`cpu_nanos_per_delivery_at`]: 3,790 ns at 50 or fewer, 196 ns when batched); the config
    /// caps connections at `shards x max_connections_per_shard`. Each limit's need in hosts'
    /// worth is rounded up to whole hosts, at least 1. The binding limit is the one the load
    /// uses most of (largest [`HostsNeeded::hosts_exact`]; on an exact tie, the first in the
    /// order file descriptors, memory, CPU, config), so one is named even when a single host
    /// holds everything.
    ///
    /// Not modelled: forwarding a message between hosts (each message is counted once, on one
    /// host), connection churn (handshakes), pings, and uneven spread across shards.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the input that is out of range, or a host so small that
    /// its fixed costs leave room for no connection.
    pub fn estimate(&self, config: &EngineConfig) -> Result<Estimate, ConfigError> {
        self.validate()?;
        let costs = Costs::for_config(config);
        let shards = self.shards_per_host;
        let connections = (self.users as f64 * self.connections_per_user).ceil() as u64;
        let deliveries_per_sec = self.messages_per_sec * self.fanout;

        let fd_per_host = self.nofile_per_host.saturating_sub(costs.fixed_fds(shards));
        let usable = (self.ram_per_host_bytes as f64 * (1.0 - self.memory_headroom)) as u64;
        let memory_per_host = costs.connections_in(usable, shards);
        let config_per_host = shards.saturating_mul(config.limits.max_connections_per_shard as u64);
        let cores_per_host = shards as f64 * self.cpu_utilisation;
        // Deliveries each connection receives per second decide how well sends batch.
        let per_connection = match connections {
            0 => 0.0,
            n => deliveries_per_sec / n as f64,
        };
        let cpu_nanos_per_delivery = cpu_nanos_per_delivery_at(per_connection);
        let cpu_cores_needed = (self.messages_per_sec * costs.cpu_nanos_per_message as f64
            + deliveries_per_sec * cpu_nanos_per_delivery)
            / 1e9;
        check(
            fd_per_host > 0,
            "nofile_per_host",
            "leaves no descriptor for connections after the shards' own",
        )?;
        check(
            memory_per_host > 0,
            "ram_per_host",
            "leaves no memory for connections after the headroom and the shards' fixed costs",
        )?;

        let by_connections = |per_host: u64| connections as f64 / per_host as f64;
        let mut limits = vec![
            HostsNeeded {
                constraint: Constraint::FileDescriptors,
                per_host: fd_per_host as f64,
                unit: Unit::Connections,
                hosts_exact: by_connections(fd_per_host),
                hosts: 0,
                how: format!(
                    "{} open files - {} for the process and its {} shards",
                    group(self.nofile_per_host),
                    costs.fixed_fds(shards),
                    shards
                ),
            },
            HostsNeeded {
                constraint: Constraint::Memory,
                per_host: memory_per_host as f64,
                unit: Unit::Connections,
                hosts_exact: by_connections(memory_per_host),
                hosts: 0,
                how: format!(
                    "({} RAM x {:.2} - {} shards x {}) / ({} B user + {} B kernel per connection)",
                    bytes(self.ram_per_host_bytes),
                    1.0 - self.memory_headroom,
                    shards,
                    bytes(costs.fixed_bytes_per_shard),
                    costs.user_bytes_per_connection,
                    costs.kernel_bytes_per_connection
                ),
            },
            HostsNeeded {
                constraint: Constraint::Cpu,
                per_host: cores_per_host,
                unit: Unit::Cores,
                hosts_exact: cpu_cores_needed / cores_per_host,
                hosts: 0,
                how: format!(
                    "{} msgs/s x {} ns + {} deliveries/s x {:.0} ns = {:.2} cores; {} shards x {:.2} \
                     busy per host. Per delivery at {:.1} per connection per s: {} ns batched \
                     (50,049/s) to {} ns unbatched (50/s or fewer)",
                    group(self.messages_per_sec.ceil() as u64),
                    costs.cpu_nanos_per_message,
                    group(deliveries_per_sec.ceil() as u64),
                    cpu_nanos_per_delivery,
                    cpu_cores_needed,
                    shards,
                    self.cpu_utilisation,
                    per_connection,
                    costs.cpu_nanos_per_delivery_batched,
                    costs.cpu_nanos_per_delivery_unbatched,
                ),
            },
            HostsNeeded {
                constraint: Constraint::Config,
                per_host: config_per_host as f64,
                unit: Unit::Connections,
                hosts_exact: by_connections(config_per_host),
                hosts: 0,
                how: format!(
                    "{} shards x limits.max_connections_per_shard {}",
                    shards,
                    group(config.limits.max_connections_per_shard as u64)
                ),
            },
        ];
        for l in &mut limits {
            l.hosts = (l.hosts_exact.ceil() as u64).max(1);
        }
        let binding = limits.iter().fold(&limits[0], |best, l| {
            if l.hosts_exact > best.hosts_exact {
                l
            } else {
                best
            }
        });
        let (binding, hosts) = (binding.constraint, binding.hosts);
        Ok(Estimate {
            inputs: self.clone(),
            connections,
            deliveries_per_sec,
            deliveries_per_connection_per_sec: per_connection,
            cpu_nanos_per_delivery,
            cpu_cores_needed,
            costs,
            max_connections_per_shard: config.limits.max_connections_per_shard as u64,
            limits,
            binding,
            hosts,
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check(
            (1..=1024).contains(&self.shards_per_host),
            "shards_per_host",
            "must be between 1 and 1024, as the config's shards",
        )?;
        check(self.ram_per_host_bytes > 0, "ram_per_host", "must be > 0")?;
        check(
            self.connections_per_user.is_finite() && self.connections_per_user >= 0.0,
            "connections_per_user",
            "must be a finite number >= 0",
        )?;
        check(
            self.messages_per_sec.is_finite() && self.messages_per_sec >= 0.0,
            "messages_per_sec",
            "must be a finite number >= 0",
        )?;
        check(
            self.fanout.is_finite() && self.fanout >= 0.0,
            "fanout",
            "must be a finite number >= 0",
        )?;
        check(
            self.cpu_utilisation > 0.0 && self.cpu_utilisation <= 1.0,
            "cpu_utilisation",
            "must be in (0, 1]",
        )?;
        check(
            (0.0..1.0).contains(&self.memory_headroom),
            "memory_headroom",
            "must be in [0, 1)",
        )
    }
}

/// The unit of [`HostsNeeded::per_host`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Unit {
    /// Connections one host can hold.
    Connections,
    /// Cores one host gives to message work.
    Cores,
}

/// Hosts needed by one limit.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct HostsNeeded {
    /// The limit: file descriptors, memory, CPU or config; never [`Constraint::Conntrack`] or
    /// [`Constraint::Ports`], which only a host read by the [`doctor`](crate::doctor) has.
    pub constraint: Constraint,
    /// What one host offers under this limit, in [`HostsNeeded::unit`]s.
    pub per_host: f64,
    /// Connections, or cores for [`Constraint::Cpu`].
    pub unit: Unit,
    /// What the load needs of this limit, in hosts' worth: 0.25 is a quarter of one host's.
    pub hosts_exact: f64,
    /// Hosts needed: `hosts_exact` rounded up, at least 1.
    pub hosts: u64,
    /// How `per_host` was worked out, for people.
    pub how: String,
}

/// The answer of [`Inputs::estimate`]. Its `Display` is the text for people; serialize it for
/// JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Estimate {
    /// The inputs, as given.
    pub inputs: Inputs,
    /// Connections at peak: users x connections per user, rounded up.
    pub connections: u64,
    /// Messages per second x fan-out.
    pub deliveries_per_sec: f64,
    /// Deliveries each connection receives per second: `deliveries_per_sec / connections`.
    pub deliveries_per_connection_per_sec: f64,
    /// The CPU per delivery the verdict uses, in nanoseconds: [`cpu_nanos_per_delivery_at`]
    /// of `deliveries_per_connection_per_sec`, between the batched and the unbatched cost.
    pub cpu_nanos_per_delivery: f64,
    /// Cores the message and delivery work needs, across the deployment, at
    /// `cpu_nanos_per_delivery`.
    pub cpu_cores_needed: f64,
    /// The costs used.
    pub costs: Costs,
    /// The config's `limits.max_connections_per_shard`.
    pub max_connections_per_shard: u64,
    /// Hosts needed by each limit, in the order file descriptors, memory, CPU, config.
    pub limits: Vec<HostsNeeded>,
    /// The limit that needs the most hosts.
    pub binding: Constraint,
    /// Hosts needed: the binding limit's count.
    pub hosts: u64,
}

impl Estimate {
    /// When the config's connection cap binds: the `limits.max_connections_per_shard` that
    /// would let the next limit decide, and the hosts that limit needs. `None` otherwise.
    pub fn config_fix(&self) -> Option<(u64, u64)> {
        if self.binding != Constraint::Config {
            return None;
        }
        let hosts = self
            .limits
            .iter()
            .filter(|l| l.constraint != Constraint::Config)
            .map(|l| l.hosts)
            .max()?;
        let per_shard = self
            .connections
            .div_ceil(hosts * self.inputs.shards_per_host)
            .max(1);
        (per_shard > self.max_connections_per_shard).then_some((per_shard, hosts))
    }
}

impl fmt::Display for Estimate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inputs;
        let c = &self.costs;
        writeln!(
            f,
            "ringcast capacity: {} connections ({} users x {}), {} msgs/s x fan-out {} = {} deliveries/s",
            group(self.connections),
            group(i.users),
            i.connections_per_user,
            group(i.messages_per_sec.ceil() as u64),
            i.fanout,
            group(self.deliveries_per_sec.ceil() as u64),
        )?;
        writeln!(
            f,
            "per host: {} shards, {} RAM ({:.0}% kept free), {} open files, cores at most {:.0}% busy",
            i.shards_per_host,
            bytes(i.ram_per_host_bytes),
            i.memory_headroom * 100.0,
            group(i.nofile_per_host),
            i.cpu_utilisation * 100.0,
        )?;
        writeln!(
            f,
            "costs: {} B user + {} B kernel per idle connection, {} per shard, \
             {} ns CPU per message, {} to {} ns per delivery (bench/RESULTS.md): \
             {:.0} ns used, at {:.1} deliveries per connection per s",
            c.user_bytes_per_connection,
            c.kernel_bytes_per_connection,
            bytes(c.fixed_bytes_per_shard),
            c.cpu_nanos_per_message,
            c.cpu_nanos_per_delivery_batched,
            c.cpu_nanos_per_delivery_unbatched,
            self.cpu_nanos_per_delivery,
            self.deliveries_per_connection_per_sec,
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "{:<18} {:>22} {:>12} {:>7}",
            "limit", "per host", "need", "hosts"
        )?;
        for l in &self.limits {
            let per_host = match l.unit {
                Unit::Connections => format!("{} conns", group(l.per_host as u64)),
                Unit::Cores => format!("{:.2} cores", l.per_host),
            };
            let mark = if l.constraint == self.binding {
                "  <- binding"
            } else {
                ""
            };
            writeln!(
                f,
                "{:<18} {:>22} {:>12.2} {:>7}{mark}",
                l.constraint.name(),
                per_host,
                l.hosts_exact,
                group(l.hosts)
            )?;
            writeln!(f, "  {}", l.how)?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "hosts needed: {} (binding: {})",
            group(self.hosts),
            self.binding.name()
        )?;
        if let Some((per_shard, hosts)) = self.config_fix() {
            writeln!(
                f,
                "  with [limits] max_connections_per_shard = {per_shard} in ringcast.toml: {} {}",
                group(hosts),
                if hosts == 1 { "host" } else { "hosts" }
            )?;
        }
        Ok(())
    }
}

fn check(ok: bool, key: &'static str, why: &'static str) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid { key, why })
    }
}

/// `n` with thousands separators: `1,048,576`.
pub(crate) fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// A byte count for people: `512 B`, `4.2 MiB`, `31.4 GiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_puts_separators_every_three_digits() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1_000), "1,000");
        assert_eq!(group(4_194_304), "4,194,304");
    }

    #[test]
    fn bytes_picks_the_largest_unit_below_1024() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(4 << 20), "4.0 MiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn default_costs_follow_the_config_not_copied_numbers() {
        let config = EngineConfig::default();
        let costs = Costs::for_config(&config);
        let io = &config.io;
        assert_eq!(
            costs.fixed_bytes_per_shard,
            u64::from(io.ring_buffers) * (io.ring_buffer_bytes as u64 + 16)
                + 2 * u64::from(io.uring_entries) * 100
        );
        let mut epoll = config.with_driver(Driver::Epoll);
        epoll.io.keep_request_head = false;
        let costs = Costs::for_config(&epoll);
        assert_eq!(
            costs.fixed_bytes_per_shard,
            epoll.io.read_buffer_bytes as u64
        );
        assert_eq!(costs.fds_per_shard, FDS_PER_SHARD_EPOLL);
        assert_eq!(
            costs.user_bytes_per_connection,
            IDLE_USER_BYTES_PER_CONNECTION_NO_HEAD
        );
    }

    #[test]
    fn connections_in_memory_come_after_the_shards_fixed_share() {
        let costs = Costs::for_config(&EngineConfig::default());
        let per = costs.bytes_per_connection();
        let fixed = costs.fixed_bytes(4);
        assert_eq!(fixed, 4 * costs.fixed_bytes_per_shard);
        assert_eq!(costs.connections_in(fixed + 10 * per + per - 1, 4), 10);
        assert_eq!(costs.connections_in(fixed + 10 * per, 4), 10);
        // Less than the shards' own share holds nothing, and does not wrap.
        assert_eq!(costs.connections_in(fixed - 1, 4), 0);
        assert_eq!(costs.connections_in(0, 4), 0);
    }

    #[test]
    fn cpu_per_delivery_falls_with_the_rate_per_connection_between_the_measured_points() {
        assert_eq!(cpu_nanos_per_delivery_at(0.0), 3_790.0);
        assert_eq!(cpu_nanos_per_delivery_at(f64::NAN), 3_790.0);
        assert_eq!(cpu_nanos_per_delivery_at(50.0), 3_790.0);
        assert!((cpu_nanos_per_delivery_at(200.0) - 912.0).abs() < 1e-6);
        assert_eq!(cpu_nanos_per_delivery_at(50_049.0), 196.0);
        assert_eq!(cpu_nanos_per_delivery_at(1e9), 196.0);
        // log-log: halfway between 50 and 200 (100/s) is the geometric mean of the costs.
        let mid = cpu_nanos_per_delivery_at(100.0);
        assert!((mid - (3_790.0f64 * 912.0).sqrt()).abs() < 1e-6, "{mid}");
        let mut last = f64::INFINITY;
        for rate in [1.0, 60.0, 150.0, 400.0, 5_000.0, 40_000.0, 60_000.0] {
            let cost = cpu_nanos_per_delivery_at(rate);
            assert!(
                cost <= last && (196.0..=3_790.0).contains(&cost),
                "{rate}: {cost}"
            );
            last = cost;
        }
    }

    #[test]
    fn a_config_fix_is_offered_only_when_the_config_binds() {
        let config = EngineConfig::default();
        let estimate = Inputs::new(2_000_000, 8, 32 << 30)
            .estimate(&config)
            .unwrap();
        assert_eq!(estimate.binding, Constraint::Config);
        // 8 x 65,536 = 524,288 per host: 4 hosts; every other limit needs 1.
        assert_eq!(estimate.hosts, 4);
        assert_eq!(estimate.config_fix(), Some((250_000, 1)));
        let small = Inputs::new(1_000, 8, 32 << 30).estimate(&config).unwrap();
        assert_eq!(small.config_fix(), None);
    }
}
