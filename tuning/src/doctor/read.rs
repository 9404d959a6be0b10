//! Reading a host: the facts under a root directory ([`Host::read`]), and the parsers of the
//! files they come from.
//!
//! It only reads and parses: what a fact means for connections is `judge`'s. A file that
//! cannot be read leaves its fact unknown ([`Host::unreadable`]); only a root that is not a
//! Linux root fails the read.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use serde::{Serialize, Serializer};

use crate::capacity::group;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::MIN_KERNEL_IO_URING;

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
