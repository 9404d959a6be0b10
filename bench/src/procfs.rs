//! Readings from `/proc`: a process's CPU time and resident memory, the kernel's slab and TCP
//! socket memory, and this process's own CPU time.
//!
//! Owns parsing only. Every function reads once and returns; sampling over a window (start and
//! end) is the caller's job.

use std::{fs, time::Duration};

use anyhow::{bail, ensure, Context as _, Result};
use serde::{Deserialize, Serialize};

/// CPU time (user plus system) a process has used so far, over all its threads.
///
/// Read from fields 14 (`utime`) and 15 (`stime`) of `/proc/PID/stat`, which count clock ticks
/// (`sysconf(_SC_CLK_TCK)`, usually 100 a second), so the resolution is one tick.
///
/// # Errors
/// The process does not exist (any more) or the file does not parse.
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat_cpu(&stat, clock_ticks_per_sec()).with_context(|| format!("parsing {path}"))
}

/// Parses `utime + stime` out of a `/proc/PID/stat` line.
fn parse_stat_cpu(stat: &str, ticks_per_sec: u64) -> Result<Duration> {
    // The command name (field 2) is in parentheses and may itself hold spaces or parentheses,
    // so count fields from the last ')'.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("no ')' after the command name")?;
    // `rest` starts at field 3 (state), so field N is at index N - 3.
    let mut fields = rest.split_ascii_whitespace();
    let utime: u64 = fields.nth(14 - 3).context("no utime")?.parse()?;
    let stime: u64 = fields.next().context("no stime")?.parse()?;
    let ticks = utime.saturating_add(stime);
    Ok(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / ticks_per_sec.max(1),
    ))
}

/// Time all CPUs together were not idle: user, nice, system, irq, softirq and steal (time the
/// hypervisor gave to another guest) from the `cpu` line of `/proc/stat`.
///
/// Over a window, this less the time of the processes under test is what everything else
/// took: other processes, interrupts and softirqs not charged to them, and the hypervisor.
///
/// # Errors
/// `/proc/stat` cannot be read or has no `cpu` line.
pub fn machine_busy() -> Result<Duration> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_machine_busy(&stat, clock_ticks_per_sec()).context("parsing /proc/stat")
}

fn parse_machine_busy(stat: &str, ticks_per_sec: u64) -> Result<Duration> {
    let line = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .context("no cpu line")?;
    let fields: Vec<u64> = line
        .split_ascii_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(
        fields.len() >= 8,
        "the cpu line has {} fields",
        fields.len()
    );
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user].
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().map(|&i| fields[i]).sum();
    Ok(Duration::from_nanos(
        busy.saturating_mul(1_000_000_000) / ticks_per_sec.max(1),
    ))
}

/// Clock ticks per second, the unit of `/proc/PID/stat` CPU times.
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// CPU time (user plus system) this process has used so far, from `getrusage`.
pub fn self_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value (plain integers and timevals).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage; RUSAGE_SELF is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A process's resident memory, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessMemory {
    /// `VmRSS`: all resident pages (anonymous, file-backed and shared), in bytes.
    pub rss_bytes: u64,
    /// `RssAnon`: resident anonymous pages (heap, stacks, anonymous mappings), in bytes.
    pub rss_anon_bytes: u64,
}

/// Reads `VmRSS` and `RssAnon` of a process.
///
/// # Errors
/// The process does not exist (any more) or the file lacks those lines.
pub fn process_memory(pid: u32) -> Result<ProcessMemory> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(ProcessMemory {
        rss_bytes: kib_field(&status, "VmRSS:").with_context(|| format!("VmRSS in {path}"))?,
        rss_anon_bytes: kib_field(&status, "RssAnon:")
            .with_context(|| format!("RssAnon in {path}"))?,
    })
}

/// System-wide kernel memory that grows with the number of sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelMemory {
    /// `Slab` from `/proc/meminfo` (socket, inode, dentry, epoll and other kernel objects), in
    /// bytes.
    pub slab_bytes: u64,
    /// `SUnreclaim` from `/proc/meminfo`: the part of the slab the kernel cannot shrink, in
    /// bytes. Sockets live here.
    pub slab_unreclaimable_bytes: u64,
    /// `TCP: ... mem` from `/proc/net/sockstat`: pages charged to TCP socket buffers, in bytes.
    pub tcp_buffer_bytes: u64,
    /// `TCP: inuse` from `/proc/net/sockstat`: TCP sockets in use (both ends of a loopback
    /// connection count).
    pub tcp_sockets: u64,
    /// Bytes of slab objects in use (active objects times object size, summed over the caches
    /// in `/proc/slabinfo`, which needs root), leaving out `TIME_WAIT` sockets, which earlier
    /// runs leave behind and which expire on their own. Unlike `Slab`, this does not count
    /// free objects in slab pages kept from earlier runs, so it tracks live sockets more
    /// closely. `None` when `/proc/slabinfo` cannot be read.
    pub slab_objects_bytes: Option<u64>,
}

/// Reads [`KernelMemory`].
///
/// # Errors
/// `/proc/meminfo` or `/proc/net/sockstat` cannot be read or lacks a field.
pub fn kernel_memory() -> Result<KernelMemory> {
    let meminfo = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    let sockstat = fs::read_to_string("/proc/net/sockstat").context("reading sockstat")?;
    let tcp = sockstat
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .context("no TCP line in /proc/net/sockstat")?;
    let tcp_field = |name: &str| -> Result<u64> {
        let mut it = tcp.split_ascii_whitespace();
        while let Some(key) = it.next() {
            let value = it.next().context("sockstat key without a value")?;
            if key == name {
                return Ok(value.parse()?);
            }
        }
        bail!("no TCP {name} in /proc/net/sockstat")
    };
    Ok(KernelMemory {
        slab_bytes: kib_field(&meminfo, "Slab:").context("Slab in /proc/meminfo")?,
        slab_unreclaimable_bytes: kib_field(&meminfo, "SUnreclaim:")
            .context("SUnreclaim in /proc/meminfo")?,
        tcp_buffer_bytes: tcp_field("mem")?.saturating_mul(page_size()),
        tcp_sockets: tcp_field("inuse")?,
        slab_objects_bytes: fs::read_to_string("/proc/slabinfo")
            .ok()
            .map(|text| slab_objects_bytes(&text)),
    })
}

/// Sums `active_objs * objsize` over the caches of a `/proc/slabinfo` text, leaving out
/// `TIME_WAIT` sockets (`tw_sock_*`).
fn slab_objects_bytes(slabinfo: &str) -> u64 {
    slabinfo
        .lines()
        .filter(|l| !l.starts_with("slabinfo") && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_ascii_whitespace();
            let name = f.next()?;
            let active: u64 = f.next()?.parse().ok()?;
            let _total = f.next()?;
            let size: u64 = f.next()?.parse().ok()?;
            (!name.starts_with("tw_sock")).then(|| active.saturating_mul(size))
        })
        .sum()
}

/// The system page size in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// The value of a `Name:   123 kB` line, in bytes.
fn kib_field(text: &str, name: &str) -> Result<u64> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .with_context(|| format!("no {name} line"))?;
    let kib: u64 = line
        .split_ascii_whitespace()
        .next()
        .with_context(|| format!("{name} has no value"))?
        .parse()?;
    Ok(kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_counts_fields_after_a_command_name_with_spaces() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 5 0 0";
        assert_eq!(
            parse_stat_cpu(stat, 100).unwrap(),
            Duration::from_millis(3000)
        );
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 1 20 5000 700 3 4 5 0 0\ncpu0 50 0 10 2500 350 1 2 2 0 0\n";
        assert_eq!(
            parse_machine_busy(stat, 100).unwrap(),
            Duration::from_millis(1330)
        );
    }

    #[test]
    fn kib_fields_are_returned_in_bytes() {
        let status = "Name:\tx\nVmRSS:\t    2160 kB\nRssAnon:\t     156 kB\n";
        assert_eq!(kib_field(status, "VmRSS:").unwrap(), 2160 * 1024);
        assert_eq!(kib_field(status, "RssAnon:").unwrap(), 156 * 1024);
        assert!(kib_field(status, "Missing:").is_err());
    }

    #[test]
    fn slab_objects_sum_active_objects_without_time_wait() {
        let text = "slabinfo - version: 2.1\n# name <active_objs> <num_objs> <objsize> ...\n\
            TCP 10 13 2368 13 8 : tunables 0 0 0 : slabdata 1 1 0\n\
            tw_sock_TCP 100 100 256 16 1 : tunables 0 0 0 : slabdata 7 7 0\n\
            filp 3 21 192 21 1 : tunables 0 0 0 : slabdata 1 1 0\n";
        assert_eq!(slab_objects_bytes(text), 10 * 2368 + 3 * 192);
    }

    #[test]
    fn this_process_can_be_read() {
        let pid = std::process::id();
        assert!(process_memory(pid).unwrap().rss_bytes > 0);
        process_cpu(pid).unwrap();
        kernel_memory().unwrap();
        machine_busy().unwrap();
    }
}
