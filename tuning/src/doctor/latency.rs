//! `ringcast doctor --latency`: whether a host is ready for the engine's latency mode, and the
//! exact fix for each thing that is not.
//!
//! Latency mode (`[latency]` in the config, off by default) keeps a busy shard polling its
//! completions and inbox for `spin_us` before it parks, or for good in its `always` mode. A
//! spinning shard only pays off on a core nothing else wants: otherwise the scheduler, the
//! timer tick, interrupts and other processes take the core away at the worst moment, and
//! spinning costs a core for nothing. So the doctor checks, from files under a root directory
//! like the capacity doctor ([`LatencyHost::read`]):
//!
//! | check | reads | ready when |
//! |---|---|---|
//! | `isolated-cores` | `sys/devices/system/cpu/isolated`, else `isolcpus=` in `proc/cmdline` | some online cores are isolated and at least one is not (for the OS) |
//! | `nohz-full` | `sys/devices/system/cpu/nohz_full`, else `nohz_full=` in `proc/cmdline` | every isolated core runs tickless |
//! | `irq-affinity` | `proc/irq/*/smp_affinity_list`, `proc/irq/default_smp_affinity` | no interrupt may land on an isolated core |
//! | `cpu-governor` | `sys/devices/system/cpu/cpu*/cpufreq/scaling_governor` | every core runs `performance` (no cpufreq, as in most VMs: unknown, the hypervisor decides) |
//! | `transparent-hugepage` | `sys/kernel/mm/transparent_hugepage/{enabled,defrag}` | not `always`: khugepaged and direct compaction stall a shard for milliseconds |
//!
//! It only reads. `tuning/profiles/latency/apply.sh` applies what can be applied at run time
//! (IRQ affinity, governor, huge pages); isolation needs the kernel command line and a reboot.

use std::{
    collections::BTreeSet,
    fmt, fs, io,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// A set of CPU numbers, in order.
pub type CpuSet = BTreeSet<u32>;

/// The facts `ringcast doctor --latency` reads. A fact that could not be read is `None` (or
/// empty), with its path in [`LatencyHost::unreadable`] when it should have been there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LatencyHost {
    /// The root directory the facts were read under.
    pub root: PathBuf,
    /// Online CPUs (`sys/devices/system/cpu/online`).
    pub online: CpuSet,
    /// The kernel's own arguments (`proc/cmdline`, up to a `--`).
    pub cmdline: Option<String>,
    /// Cores isolated from the scheduler (`isolcpus=`).
    pub isolated: CpuSet,
    /// Cores without the periodic tick when they run one task (`nohz_full=`).
    pub nohz_full: CpuSet,
    /// Cores whose RCU callbacks run elsewhere (`rcu_nocbs=`).
    pub rcu_nocbs: CpuSet,
    /// Each interrupt's allowed CPUs (`proc/irq/N/smp_affinity_list`), by IRQ number.
    pub irqs: Vec<(u32, CpuSet)>,
    /// The CPUs new interrupts get (`proc/irq/default_smp_affinity`).
    pub default_irq_affinity: Option<CpuSet>,
    /// Each core's frequency governor, when cpufreq is there.
    pub governors: Vec<(u32, String)>,
    /// The selected transparent huge pages mode.
    pub thp_enabled: Option<String>,
    /// The selected transparent huge pages defrag mode.
    pub thp_defrag: Option<String>,
    /// Files that should have been there but could not be read or parsed, relative to `root`.
    pub unreadable: Vec<String>,
}

impl LatencyHost {
    /// Reads every fact under `root` (`/` for this host).
    ///
    /// # Errors
    /// `root` is not a directory.
    pub fn read(root: &Path) -> io::Result<Self> {
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not a directory", root.display()),
            ));
        }
        let mut host = Self {
            root: root.to_owned(),
            ..Self::default()
        };
        let read = |rel: &str| fs::read_to_string(root.join(rel)).ok();
        let mut unreadable = Vec::new();
        // A CPU list file: absent is `None`; malformed is `None` and unreadable.
        let mut list = |rel: &str| {
            let text = read(rel)?;
            let set = parse_cpu_list(&text);
            if set.is_none() {
                unreadable.push(rel.to_owned());
            }
            set
        };
        let online = list("sys/devices/system/cpu/online");
        let isolated = list("sys/devices/system/cpu/isolated");
        let nohz_full = list("sys/devices/system/cpu/nohz_full");
        host.online = online.unwrap_or_default();
        host.cmdline = read("proc/cmdline").map(|c| kernel_args(&c).to_owned());
        let arg = |name: &str| {
            host.cmdline
                .as_deref()
                .and_then(|c| cmdline_cpus(c, name))
                .unwrap_or_default()
        };
        let (isolcpus, nohz, nocbs) = (arg("isolcpus"), arg("nohz_full"), arg("rcu_nocbs"));
        // The sysfs files say what the kernel made of its arguments; empty when none.
        host.isolated = isolated.unwrap_or(isolcpus);
        host.nohz_full = nohz_full.unwrap_or(nohz);
        host.rcu_nocbs = nocbs;
        if host.online.is_empty() {
            unreadable.push("sys/devices/system/cpu/online".to_owned());
        }
        if host.cmdline.is_none() {
            unreadable.push("proc/cmdline".to_owned());
        }

        match fs::read_dir(root.join("proc/irq")) {
            Ok(dir) => {
                for entry in dir.flatten() {
                    let Some(irq) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                        continue;
                    };
                    let rel = format!("proc/irq/{irq}/smp_affinity_list");
                    match read(&rel).as_deref().and_then(parse_cpu_list) {
                        Some(cpus) => host.irqs.push((irq, cpus)),
                        None => unreadable.push(rel),
                    }
                }
                host.irqs.sort();
                host.default_irq_affinity = read("proc/irq/default_smp_affinity")
                    .as_deref()
                    .and_then(parse_cpu_mask);
            }
            Err(_) => unreadable.push("proc/irq".to_owned()),
        }

        for &cpu in &host.online {
            if let Some(g) = read(&format!(
                "sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor"
            )) {
                host.governors.push((cpu, g.trim().to_owned()));
            }
        }
        let thp = |f: &str| {
            read(&format!("sys/kernel/mm/transparent_hugepage/{f}"))
                .as_deref()
                .and_then(selected)
        };
        host.thp_enabled = thp("enabled");
        host.thp_defrag = thp("defrag");
        host.unreadable = unreadable;
        Ok(host)
    }
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckStatus {
    /// Ready.
    Ok,
    /// Not ready; the fixes say how.
    Fix,
    /// Could not be told from this host (no cpufreq in a VM, say).
    Unknown,
}

/// One thing latency mode needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LatencyCheck {
    /// A short tag: `isolated-cores`, `nohz-full`, `irq-affinity`, `cpu-governor`,
    /// `transparent-hugepage`.
    pub topic: &'static str,
    /// How it came out.
    pub status: CheckStatus,
    /// What was found and why it matters, for people.
    pub message: String,
    /// Commands or lines that fix it.
    pub fixes: Vec<String>,
}

/// The answer of [`judge_latency`]. `Display` is the text for people; serialize it for JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LatencyReport {
    /// Every check is [`CheckStatus::Ok`].
    pub ready: bool,
    /// The cores fit for spinning shards: isolated and tickless.
    pub spin_cores: CpuSet,
    /// The cores proposed for isolation when none are isolated: every online core but the
    /// lowest (left to the OS and interrupts); empty with one core.
    pub proposed_isolated: CpuSet,
    /// Each check, in the order of the table in the module docs.
    pub checks: Vec<LatencyCheck>,
    /// The facts read.
    pub host: LatencyHost,
}

/// Reads the host under `root` and judges it: [`LatencyHost::read`], then [`judge_latency`].
///
/// # Errors
/// As [`LatencyHost::read`].
pub fn run_latency(root: &Path) -> io::Result<LatencyReport> {
    Ok(judge_latency(&LatencyHost::read(root)?))
}

/// Judges `host` for latency mode; see the module docs.
pub fn judge_latency(host: &LatencyHost) -> LatencyReport {
    let online = &host.online;
    let isolated: CpuSet = host.isolated.intersection(online).copied().collect();
    let housekeeping: CpuSet = online.difference(&isolated).copied().collect();
    let proposed: CpuSet = if isolated.is_empty() {
        online.iter().skip(1).copied().collect()
    } else {
        isolated.clone()
    };
    let shard_cores = if proposed.is_empty() {
        "N-M".to_owned()
    } else {
        cpu_list(&proposed)
    };
    let os_cores = if isolated.is_empty() {
        online.iter().next().map_or("0".to_owned(), u32::to_string)
    } else {
        cpu_list(&housekeeping)
    };
    let grub = format!(
        "add `isolcpus=managed_irq,domain,{shard_cores} nohz_full={shard_cores} \
         rcu_nocbs={shard_cores}` to GRUB_CMDLINE_LINUX in /etc/default/grub, then \
         `update-grub` and reboot"
    );
    let mut checks = Vec::new();

    checks.push(if online.len() < 2 {
        LatencyCheck {
            topic: "isolated-cores",
            status: CheckStatus::Fix,
            message: format!(
                "{} online core(s): a spinning shard needs a core of its own and the OS another",
                online.len()
            ),
            fixes: vec!["run latency mode on a host with at least 2 cores".to_owned()],
        }
    } else if isolated.is_empty() {
        LatencyCheck {
            topic: "isolated-cores",
            status: CheckStatus::Fix,
            message: "no isolated cores: the scheduler puts other work on the shard cores, and \
                      a spinning shard competes with it (latency `always` mode is for \
                      isolated cores only)"
                .to_owned(),
            fixes: vec![
                grub.clone(),
                format!(
                    "then run ringcast on them: CPUAffinity={shard_cores} in the unit \
                     (tuning/profiles/ringcast.service), shards = 0, pin_shards = true"
                ),
            ],
        }
    } else if housekeeping.is_empty() {
        LatencyCheck {
            topic: "isolated-cores",
            status: CheckStatus::Fix,
            message: format!(
                "every online core is isolated ({}): nothing is left for the OS and interrupts",
                cpu_list(&isolated)
            ),
            fixes: vec![format!(
                "leave at least core {} out of isolcpus=",
                online.iter().next().copied().unwrap_or(0)
            )],
        }
    } else {
        LatencyCheck {
            topic: "isolated-cores",
            status: CheckStatus::Ok,
            message: format!(
                "cores {} are isolated; {} are left to the OS",
                cpu_list(&isolated),
                cpu_list(&housekeeping)
            ),
            fixes: Vec::new(),
        }
    });

    let ticking: CpuSet = isolated.difference(&host.nohz_full).copied().collect();
    checks.push(if isolated.is_empty() {
        LatencyCheck {
            topic: "nohz-full",
            status: CheckStatus::Fix,
            message: "no isolated cores to run tickless".to_owned(),
            fixes: vec![format!("nohz_full={shard_cores} with the isolcpus= above")],
        }
    } else if ticking.is_empty() {
        LatencyCheck {
            topic: "nohz-full",
            status: CheckStatus::Ok,
            message: format!(
                "isolated cores {} run without the periodic tick",
                cpu_list(&isolated)
            ),
            fixes: Vec::new(),
        }
    } else {
        LatencyCheck {
            topic: "nohz-full",
            status: CheckStatus::Fix,
            message: format!(
                "isolated cores {} still take the timer tick (up to 1000 interruptions a \
                 second each)",
                cpu_list(&ticking)
            ),
            fixes: vec![format!(
                "add `nohz_full={0} rcu_nocbs={0}` to the kernel command line and reboot",
                cpu_list(&isolated)
            )],
        }
    });

    let irq_fix = |target: &str| {
        vec![
            format!(
                "for f in /proc/irq/*/smp_affinity_list; do echo {target} > $f 2>/dev/null; \
                 done   (some IRQs refuse; per-CPU timers cannot move)"
            ),
            format!("echo {} > /proc/irq/default_smp_affinity", cpu_mask(target)),
            format!(
                "stop irqbalance (`systemctl disable --now irqbalance`) or set \
                 IRQBALANCE_BANNED_CPULIST={shard_cores} in /etc/default/irqbalance"
            ),
            "or: sudo tuning/profiles/latency/apply.sh --apply".to_owned(),
        ]
    };
    checks.push(if isolated.is_empty() {
        LatencyCheck {
            topic: "irq-affinity",
            status: CheckStatus::Fix,
            message: format!(
                "no isolated cores to keep interrupts off; {} of {} IRQs may land on any core",
                host.irqs.iter().filter(|(_, c)| c.len() > 1).count(),
                host.irqs.len()
            ),
            fixes: irq_fix(&os_cores),
        }
    } else {
        let on_isolated: Vec<u32> = host
            .irqs
            .iter()
            .filter(|(_, cpus)| !cpus.is_disjoint(&isolated))
            .map(|(irq, _)| *irq)
            .collect();
        let default_bad = host
            .default_irq_affinity
            .as_ref()
            .is_some_and(|d| !d.is_disjoint(&isolated));
        if on_isolated.is_empty() && !default_bad {
            LatencyCheck {
                topic: "irq-affinity",
                status: CheckStatus::Ok,
                message: format!("all {} IRQs stay off the isolated cores", host.irqs.len()),
                fixes: Vec::new(),
            }
        } else {
            let mut message = format!(
                "{} of {} IRQs may land on isolated cores {}",
                on_isolated.len(),
                host.irqs.len(),
                cpu_list(&isolated)
            );
            if !on_isolated.is_empty() {
                let shown: Vec<String> = on_isolated.iter().take(8).map(u32::to_string).collect();
                message += &format!(
                    " (IRQ {}{})",
                    shown.join(", "),
                    if on_isolated.len() > 8 { ", ..." } else { "" }
                );
            }
            if default_bad {
                message += "; new IRQs default to them too";
            }
            LatencyCheck {
                topic: "irq-affinity",
                status: CheckStatus::Fix,
                message,
                fixes: irq_fix(&os_cores),
            }
        }
    });

    let slow: Vec<&(u32, String)> = host
        .governors
        .iter()
        .filter(|(_, g)| g != "performance")
        .collect();
    checks.push(if host.governors.is_empty() {
        LatencyCheck {
            topic: "cpu-governor",
            status: CheckStatus::Unknown,
            message: "no cpufreq: the frequency is not the guest's to set (a VM), or the \
                      driver is not loaded; ask for fixed-frequency or dedicated vCPUs"
                .to_owned(),
            fixes: Vec::new(),
        }
    } else if slow.is_empty() {
        LatencyCheck {
            topic: "cpu-governor",
            status: CheckStatus::Ok,
            message: format!(
                "all {} cores run the performance governor",
                host.governors.len()
            ),
            fixes: Vec::new(),
        }
    } else {
        let governors: BTreeSet<&str> = slow.iter().map(|(_, g)| g.as_str()).collect();
        LatencyCheck {
            topic: "cpu-governor",
            status: CheckStatus::Fix,
            message: format!(
                "{} of {} cores run {}: a core that ramps its clock up on demand answers the \
                 first messages of a burst slowly",
                slow.len(),
                host.governors.len(),
                governors.into_iter().collect::<Vec<_>>().join(", ")
            ),
            fixes: vec![
                "cpupower frequency-set -g performance".to_owned(),
                "or: echo performance | tee /sys/devices/system/cpu/cpu*/cpufreq/scaling_governor"
                    .to_owned(),
            ],
        }
    });

    let thp_bad = host.thp_enabled.as_deref() == Some("always")
        || host.thp_defrag.as_deref() == Some("always");
    checks.push(match (&host.thp_enabled, thp_bad) {
        (None, _) => LatencyCheck {
            topic: "transparent-hugepage",
            status: CheckStatus::Unknown,
            message: "sys/kernel/mm/transparent_hugepage is not there".to_owned(),
            fixes: Vec::new(),
        },
        (Some(enabled), false) => LatencyCheck {
            topic: "transparent-hugepage",
            status: CheckStatus::Ok,
            message: format!(
                "enabled {enabled}, defrag {}: no compaction stalls behind a shard's back",
                host.thp_defrag.as_deref().unwrap_or("?")
            ),
            fixes: Vec::new(),
        },
        (Some(enabled), true) => LatencyCheck {
            topic: "transparent-hugepage",
            status: CheckStatus::Fix,
            message: format!(
                "enabled {enabled}, defrag {}: khugepaged and direct compaction can stall a \
                 shard for milliseconds",
                host.thp_defrag.as_deref().unwrap_or("?")
            ),
            fixes: vec![
                "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled".to_owned(),
                "echo defer+madvise > /sys/kernel/mm/transparent_hugepage/defrag".to_owned(),
            ],
        },
    });

    LatencyReport {
        ready: checks.iter().all(|c| c.status == CheckStatus::Ok),
        spin_cores: isolated.intersection(&host.nohz_full).copied().collect(),
        proposed_isolated: if isolated.is_empty() {
            proposed
        } else {
            CpuSet::new()
        },
        checks,
        host: host.clone(),
    }
}

impl fmt::Display for LatencyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = &self.host;
        writeln!(
            f,
            "ringcast doctor --latency: {} ({} online cores; read under {})",
            if self.ready {
                "ready for latency mode"
            } else {
                "not ready for latency mode"
            },
            h.online.len(),
            h.root.display()
        )?;
        writeln!(f)?;
        for c in &self.checks {
            let tag = match c.status {
                CheckStatus::Ok => "ok",
                CheckStatus::Fix => "FIX",
                CheckStatus::Unknown => "?",
            };
            writeln!(f, "  [{tag:>3}] {:<21} {}", c.topic, c.message)?;
            for fix in &c.fixes {
                writeln!(f, "        fix: {fix}")?;
            }
        }
        writeln!(f)?;
        if self.spin_cores.is_empty() {
            writeln!(
                f,
                "Latency mode: no core is isolated and tickless, so keep `[latency]` off or use \
                 a short `spin_us` (a shard spins only after it has been busy, and parks when \
                 idle); `always` would burn a shared core."
            )?;
        } else {
            writeln!(
                f,
                "Latency mode: cores {} are fit for spinning shards: run ringcast there \
                 (CPUAffinity={}, one shard per core) with `[latency]` `always`; each such \
                 shard keeps its core at 100% even when idle.",
                cpu_list(&self.spin_cores),
                cpu_list(&self.spin_cores)
            )?;
        }
        if !h.unreadable.is_empty() {
            writeln!(f, "Could not read: {}", h.unreadable.join(", "))?;
        }
        Ok(())
    }
}

/// The kernel's own arguments: `proc/cmdline` up to a `--` (what follows is init's).
fn kernel_args(cmdline: &str) -> &str {
    let cmdline = cmdline.trim();
    match cmdline.find(" -- ") {
        Some(at) => &cmdline[..at],
        None => cmdline.strip_suffix(" --").unwrap_or(cmdline),
    }
}

/// The CPU list of `name=` on a kernel command line. `isolcpus=` may start with flags
/// (`managed_irq,domain,2-15`): they are skipped.
fn cmdline_cpus(cmdline: &str, name: &str) -> Option<CpuSet> {
    let value = cmdline
        .split_whitespace()
        .rev()
        .find_map(|a| a.strip_prefix(name)?.strip_prefix('='))?;
    let cpus: Vec<&str> = value
        .split(',')
        .filter(|p| p.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    parse_cpu_list(&cpus.join(","))
}

/// `0-3,8,10-11` as a set; empty text is the empty set; `None` when malformed.
fn parse_cpu_list(list: &str) -> Option<CpuSet> {
    let mut set = CpuSet::new();
    for part in list
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 65_536 {
                    return None;
                }
                set.extend(a..=b);
            }
            None => {
                set.insert(part.parse().ok()?);
            }
        }
    }
    Some(set)
}

/// A hex CPU mask as written in `/proc/irq/default_smp_affinity` (`ff`, `00000000,000000ff`).
fn parse_cpu_mask(mask: &str) -> Option<CpuSet> {
    let digits: String = mask.trim().chars().filter(|&c| c != ',').collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut set = CpuSet::new();
    for (i, c) in digits.chars().rev().enumerate() {
        let nibble = c.to_digit(16)?;
        for bit in 0..4 {
            if nibble & (1 << bit) != 0 {
                set.insert(i as u32 * 4 + bit);
            }
        }
    }
    Some(set)
}

/// A set written as a CPU list with ranges: `0-3,8`.
pub fn cpu_list(set: &CpuSet) -> String {
    let mut out = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end = it.next().unwrap_or(end);
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(",")
}

/// A CPU list as a hex mask (for `default_smp_affinity`); `1` when it cannot be parsed.
fn cpu_mask(list: &str) -> String {
    let set = parse_cpu_list(list).unwrap_or_default();
    let Some(&top) = set.iter().next_back() else {
        return "1".to_owned();
    };
    let mut nibbles = vec![0u32; top as usize / 4 + 1];
    for cpu in set {
        nibbles[cpu as usize / 4] |= 1 << (cpu % 4);
    }
    nibbles
        .iter()
        .rev()
        .map(|n| char::from_digit(*n, 16).unwrap_or('0'))
        .collect()
}

/// The bracketed word of `always [madvise] never`, or a lone word (a copy of a host whose
/// profile wrote the file).
fn selected(text: &str) -> Option<String> {
    let Some(start) = text.find('[').map(|i| i + 1) else {
        let word = text.trim();
        return (!word.is_empty() && !word.contains(' ')).then(|| word.to_owned());
    };
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_and_masks_round_trip() {
        let set = parse_cpu_list("0-3,8,10-11\n").unwrap();
        assert_eq!(cpu_list(&set), "0-3,8,10-11");
        assert_eq!(parse_cpu_list("").unwrap(), CpuSet::new());
        assert!(parse_cpu_list("3-1").is_none());
        assert!(parse_cpu_list("x").is_none());
        assert_eq!(
            parse_cpu_mask("3\n").unwrap(),
            parse_cpu_list("0-1").unwrap()
        );
        assert_eq!(
            parse_cpu_mask("00000000,00000101").unwrap(),
            parse_cpu_list("0,8").unwrap()
        );
        assert_eq!(cpu_mask("0-1"), "3");
        assert_eq!(cpu_mask("0,8"), "101");
    }

    #[test]
    fn kernel_arguments_stop_at_the_init_separator() {
        let c = "quiet isolcpus=managed_irq,domain,2-3 nohz_full=2-3 -- --init isolcpus=9";
        let args = kernel_args(c);
        assert_eq!(cmdline_cpus(args, "isolcpus"), parse_cpu_list("2-3"));
        assert_eq!(cmdline_cpus(args, "nohz_full"), parse_cpu_list("2-3"));
        assert_eq!(cmdline_cpus(args, "rcu_nocbs"), None);
    }
}
