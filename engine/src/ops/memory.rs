//! Memory as the kernel reports it: the process's resident set and the host's TCP buffer
//! memory, for `/metrics` and for admission by memory budget.
//!
//! Owns reading `/proc/self/statm` and `/proc/net/sockstat`. Each read is one small file;
//! callers sample, they do not read per connection.

use std::fs;

/// The size of a memory page, in bytes.
fn page_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions; a failure returns -1.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// The process's resident memory (RSS), in bytes.
pub(crate) fn resident_bytes() -> Option<u64> {
    let statm = fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_bytes())
}

/// The memory the host's TCP sockets hold in kernel buffers (every process's), in bytes:
/// the `mem` pages of the `TCP:` line of `/proc/net/sockstat`.
pub(crate) fn host_tcp_bytes() -> Option<u64> {
    let sockstat = fs::read_to_string("/proc/net/sockstat").ok()?;
    parse_tcp_mem_pages(&sockstat).map(|pages| pages * page_bytes())
}

fn parse_tcp_mem_pages(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "mem" {
            return words.next()?.parse().ok();
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockstat_tcp_mem_is_found() {
        let text = "sockets: used 13\nTCP: inuse 1 orphan 0 tw 16 alloc 1 mem 419\n\
                    UDP: inuse 0 mem 7\n";
        assert_eq!(parse_tcp_mem_pages(text), Some(419));
        assert_eq!(parse_tcp_mem_pages("UDP: inuse 0 mem 7\n"), None);
    }

    #[test]
    fn this_process_has_resident_memory() {
        assert!(resident_bytes().unwrap() > 1 << 20);
        assert!(host_tcp_bytes().is_some());
    }
}
