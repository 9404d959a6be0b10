//! Listening sockets and the accept loop.
//!
//! Owns binding one `SO_REUSEPORT` listener per shard (all of them before any shard starts, so
//! a bad address fails `Engine::start` at once) and each shard's accept loop: back-off on
//! descriptor exhaustion, a pause while the shard is full, and stopping on shutdown.

use std::{
    cell::Cell,
    future::poll_fn,
    io,
    net::{SocketAddr, TcpListener as StdListener},
    rc::Rc,
    task::Poll,
    time::Duration,
};

use monoio::{io::CancelHandle, net::TcpListener};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use crate::{api::handler::Handler, config::Driver, error::Error, shard::process::Shard};

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
fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Longest pause between accept attempts while descriptors are exhausted.
const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// Accepts connections until the shard stops.
///
/// With no descriptors left, accept fails at once while the connection stays in the backlog:
/// retrying immediately would spin a core. The loop backs off (1 ms doubling to 200 ms),
/// counts each failure, and logs once when the condition starts and once when it ends.
pub(crate) async fn accept_loop<H: Handler>(
    shard: Rc<Shard<H>>,
    listener: TcpListener,
    cancel: CancelHandle,
) {
    let mut backoff = Duration::from_millis(1);
    let exhausted_since: Cell<Option<u64>> = Cell::new(None);
    loop {
        if !wait_for_room(&shard).await {
            return;
        }
        match listener.cancelable_accept(cancel.clone()).await {
            Ok((stream, _peer)) => {
                if let Some(failures) = exhausted_since.take() {
                    info!(shard = %shard.id, failures, "accepting again after running out of file descriptors");
                    backoff = Duration::from_millis(1);
                }
                crate::driver::poll_driver::open_connection(&shard, stream);
            }
            Err(_) if shard.table.borrow().stopping => return,
            Err(e) if is_fd_exhaustion(&e) => {
                shard.metrics.accept_fd_exhausted.incr();
                match exhausted_since.get() {
                    None => {
                        warn!(
                            shard = %shard.id,
                            error = %e,
                            "out of file descriptors: accept paused with back-off; raise the \
                             open-files limit (ulimit -n / LimitNOFILE) or lower \
                             limits.max_connections_per_shard"
                        );
                        exhausted_since.set(Some(1));
                    }
                    Some(n) => exhausted_since.set(Some(n + 1)),
                }
                monoio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => {
                // ECONNABORTED and friends: the peer gave up in the backlog. Not ours to fix,
                // but a persistent error must not spin, so pause a little.
                shard.metrics.accept_errors.incr();
                debug!(shard = %shard.id, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Waits while the shard holds `max_connections`. Returns false once the shard is stopping.
async fn wait_for_room<H: Handler>(shard: &Shard<H>) -> bool {
    let mut counted = false;
    poll_fn(|cx| {
        let mut table = shard.table.borrow_mut();
        if table.stopping {
            return Poll::Ready(false);
        }
        if table.len() < table.settings.max_connections {
            return Poll::Ready(true);
        }
        if !counted {
            counted = true;
            table.metrics.accept_paused_full.incr();
            debug!(shard = %shard.id, "shard full: accept paused");
        }
        table.accept_waker = Some(cx.waker().clone());
        Poll::Pending
    })
    .await
}
