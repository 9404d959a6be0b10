//! Rendering a [`Report`] as text for people; JSON is its derived `Serialize`.
//!
//! It only formats what the report holds: no limit is worked out here, so the text and the JSON
//! cannot disagree.

use std::fmt;

use super::{Report, Rlimit, Severity};
use crate::capacity::{bytes, group};

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
