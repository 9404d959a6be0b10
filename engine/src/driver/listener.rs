//! Listening sockets and the accept back-off.
//!
//! Owns binding one `SO_REUSEPORT` listener per shard (all of them before any shard starts, so
//! a bad address fails `Engine::start` at once) and the back-off on failed accepts (descriptor
//! exhaustion), which both drivers' accept paths share.

use std::{
    io,
    net::{SocketAddr, TcpListener as StdListener},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use crate::{config::Driver, error::Error, ops::metrics::ShardMetrics, types::ids::ShardId};

/// Binds `count` listeners on `addr`, sharing one port through `SO_REUSEPORT`.
///
/// A plain bind is tried first so that a port already held by another process (even one that
/// also set `SO_REUSEPORT`) is reported as in use instead of silently sharing its traffic.
pub(crate) fn bind_all(
    addr: SocketAddr,
    count: usize,
    backlog: u32,
    driver: Driver,
) -> Result<Vec<StdListener>, Error> {
    let err = |source: io::Error| Error::Listen { addr, source };
    let mut addr_resolved = addr;
    if addr.port() != 0 {
        let probe = new_socket(addr, false).map_err(err)?;
        probe.bind(&addr.into()).map_err(err)?;
        drop(probe);
    }
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = new_socket(addr_resolved, true).map_err(err)?;
        socket.bind(&addr_resolved.into()).map_err(err)?;
        socket
            .listen(i32::try_from(backlog).unwrap_or(i32::MAX))
            .map_err(err)?;
        // io_uring accepts block in the kernel, not the thread; epoll needs non-blocking.
        socket
            .set_nonblocking(driver == Driver::Epoll)
            .map_err(err)?;
        if addr_resolved.port() == 0 {
            addr_resolved = socket
                .local_addr()
                .map_err(err)?
                .as_socket()
                .ok_or_else(|| err(io::Error::other("listener has no inet address")))?;
        }
        listeners.push(StdListener::from(socket));
    }
    Ok(listeners)
}

fn new_socket(addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    Ok(socket)
}

/// Whether an accept error means the process or system is out of file descriptors.
pub(crate) fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Longest pause between accept attempts while descriptors are exhausted.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// The pause after any other accept error.
const ERROR_PAUSE: Duration = Duration::from_millis(1);

/// How a shard's accepting backs off, for both drivers. With no descriptors left, accept
/// fails at once while the connection stays in the backlog: retrying immediately would spin a
/// core. It backs off (1 ms doubling to 200 ms), counts each failure, and logs once when the
/// condition starts and once when it ends. Other errors (the peer gave up in the backlog)
/// are counted and pause 1 ms, so a persistent one cannot spin either.
#[derive(Debug)]
pub(crate) struct AcceptBackoff {
    delay: Duration,
    /// Accept failures since descriptors ran out, while they are out.
    exhausted: Option<u64>,
}

impl AcceptBackoff {
    pub(crate) fn new() -> Self {
        Self {
            delay: Duration::from_millis(1),
            exhausted: None,
        }
    }

    /// An accept succeeded: ends an exhaustion (logging it) and resets the delay.
    pub(crate) fn accepted(&mut self, shard: ShardId) {
        if let Some(failures) = self.exhausted.take() {
            info!(shard = %shard, failures, "accepting again after running out of file descriptors");
            self.delay = Duration::from_millis(1);
        }
    }

    /// An accept failed with `e`: counts it and returns how long to pause before the next.
    pub(crate) fn failed(
        &mut self,
        shard: ShardId,
        metrics: &ShardMetrics,
        e: &io::Error,
    ) -> Duration {
        if !is_fd_exhaustion(e) {
            // ECONNABORTED and friends: the peer gave up in the backlog. Not ours to fix.
            metrics.accept_errors.incr();
            debug!(shard = %shard, error = %e, "accept failed");
            return ERROR_PAUSE;
        }
        metrics.accept_fd_exhausted.incr();
        match self.exhausted {
            None => {
                warn!(
                    shard = %shard,
                    error = %e,
                    "out of file descriptors: accept paused with back-off; raise the \
                     open-files limit (ulimit -n / LimitNOFILE) or lower \
                     limits.max_connections_per_shard"
                );
                self.exhausted = Some(1);
            }
            Some(n) => self.exhausted = Some(n + 1),
        }
        let pause = self.delay;
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_backs_off_doubling_to_the_cap_and_resets_on_accept() {
        let metrics = ShardMetrics::default();
        let shard = ShardId(0);
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let mut backoff = AcceptBackoff::new();
        let pauses: Vec<u64> = (0..10)
            .map(|_| backoff.failed(shard, &metrics, &emfile).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 32, 64, 128, 200, 200]);
        assert_eq!(metrics.accept_fd_exhausted.get(), 10);
        backoff.accepted(shard);
        assert_eq!(
            backoff.failed(shard, &metrics, &emfile),
            Duration::from_millis(1)
        );
        // Any other error pauses 1 ms and leaves the exhaustion delay alone.
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(backoff.failed(shard, &metrics, &aborted), ERROR_PAUSE);
        assert_eq!(metrics.accept_errors.get(), 1);
        assert_eq!(
            backoff.failed(shard, &metrics, &emfile),
            Duration::from_millis(2)
        );
    }
}
