//! Starting a shard thread: pin it, build the monoio runtime with the configured driver and
//! nothing else, start the driver (io_uring: one task runs every socket through the socket
//! ring; epoll: an accept loop and a task per connection), report readiness, deliver the
//! inbox until told to stop, then drain. Sits above `shard/` and `driver/`: it is the one
//! place that picks a driver.

use std::{
    cell::{Cell, RefCell},
    io,
    net::TcpListener as StdListener,
    os::fd::OwnedFd,
    rc::Rc,
    sync::Arc,
    thread,
    time::Duration,
};

#[cfg(feature = "epoll")]
use bytes::BytesMut;
use crossbeam_channel::Sender;
use monoio::{io::Canceller, IoUringDriver, RuntimeBuilder};
#[cfg(feature = "epoll")]
use monoio::{net::TcpListener, LegacyDriver};
use tracing::{info, warn};

use crate::{
    api::handler::Handler,
    config::Driver,
    conn::table::{ConnTable, Settings},
    driver::{uring, uring_driver},
    error::Error,
    ops::{admission::Gate, metrics::ShardMetrics},
    pubsub::{bus::Inbox, hub::Hub, topic::Topic},
    shard::process::{deferrer, Shard},
    types::ids::ShardId,
};

/// What a shard thread needs to start.
#[derive(Debug)]
pub(crate) struct ShardSpec {
    pub(crate) id: ShardId,
    pub(crate) listener: StdListener,
    pub(crate) inbox: Inbox,
    pub(crate) core: Option<core_affinity::CoreId>,
    pub(crate) driver: Driver,
    pub(crate) uring_entries: u32,
    pub(crate) ring_buffers: u16,
    pub(crate) ring_buffer_bytes: usize,
    pub(crate) settings: Settings,
    pub(crate) metrics: Arc<ShardMetrics>,
    /// Every shard's counters, for `/metrics`.
    pub(crate) all_metrics: Arc<[Arc<ShardMetrics>]>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) gate: Arc<Gate>,
    /// The readiness canary's topic: messages of it are noted, not delivered.
    pub(crate) canary: Arc<Topic>,
    pub(crate) canary_interval: Duration,
    /// Gets `Ok` once the shard listens, or the error that stopped it from starting.
    pub(crate) ready: Sender<Result<(), Error>>,
}

/// Starts the shard's thread.
pub(crate) fn spawn<H, F>(spec: ShardSpec, factory: Arc<F>) -> io::Result<thread::JoinHandle<()>>
where
    H: Handler,
    F: Fn(ShardId) -> H + Send + Sync + 'static,
{
    thread::Builder::new()
        .name(format!("ringcast-shard-{}", spec.id))
        .spawn(move || run_thread(spec, &*factory))
}

fn run_thread<H: Handler>(spec: ShardSpec, factory: &(impl Fn(ShardId) -> H + ?Sized)) {
    let id = spec.id;
    let pinned = spec
        .core
        .map(|core| (core.id, core_affinity::set_for_current(core)));
    if let Some((core, false)) = pinned {
        warn!(shard = %id, core, "could not pin shard thread; running unpinned");
    }
    let core = pinned.and_then(|(core, ok)| ok.then_some(core));
    // For the log: the core's number, or "unpinned" (not `Some(3)`).
    let core_name = core.map_or_else(|| "unpinned".to_owned(), |c| c.to_string());
    let driver = spec.driver;
    let runtime_error = |source: io::Error, hint: &'static str| Error::Runtime {
        shard: id.index(),
        driver: driver.name(),
        source,
        hint,
    };
    match driver {
        Driver::IoUring => {
            let built = RuntimeBuilder::<IoUringDriver>::new()
                .with_entries(spec.uring_entries)
                .enable_timer()
                .build();
            match built {
                Ok(mut rt) => {
                    info!(shard = %id, driver = driver.name(), core = %core_name, "shard starting");
                    rt.block_on(run(spec, factory(id)));
                }
                Err(e) => {
                    let hint = "; is io_uring disabled (sysctl kernel.io_uring_disabled) or \
                                blocked by seccomp? set driver = \"epoll\" to run without it";
                    let _ = spec.ready.send(Err(runtime_error(e, hint)));
                }
            }
        }
        #[cfg(feature = "epoll")]
        Driver::Epoll => match RuntimeBuilder::<LegacyDriver>::new().enable_timer().build() {
            Ok(mut rt) => {
                info!(shard = %id, driver = driver.name(), core = %core_name, "shard starting");
                rt.block_on(run(spec, factory(id)));
            }
            Err(e) => {
                let _ = spec.ready.send(Err(runtime_error(e, "")));
            }
        },
        // `EngineConfig::validate` refuses `driver = "epoll"` in a build without the feature.
        #[cfg(not(feature = "epoll"))]
        Driver::Epoll => {
            let hint = "; this build of ringcast leaves out the `epoll` feature";
            let _ = spec
                .ready
                .send(Err(runtime_error(io::ErrorKind::Unsupported.into(), hint)));
        }
    }
}

/// The shard's main task: start the driver, wait for a stop, then close gracefully.
async fn run<H: Handler>(spec: ShardSpec, handler: H) {
    let ShardSpec {
        id,
        listener,
        inbox,
        driver,
        uring_entries,
        ring_buffers,
        ring_buffer_bytes,
        settings,
        metrics,
        all_metrics,
        hub,
        gate,
        canary,
        canary_interval,
        ready,
        ..
    } = spec;
    let addr = listener.local_addr().ok();
    #[cfg(feature = "epoll")]
    let listen_error = |source: io::Error| Error::Listen {
        addr: addr.unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
        source,
    };
    let shutdown_timeout = settings.shutdown_timeout;
    #[cfg(feature = "epoll")]
    let read_buffer_bytes = settings.read_buffer_bytes;
    let shard = Rc::new(Shard {
        id,
        table: RefCell::new(ConnTable::new(id, settings, metrics.clone(), hub, gate)),
        handler: RefCell::new(handler),
        #[cfg(feature = "epoll")]
        read_buf: RefCell::new(BytesMut::new()),
        metrics,
        all_metrics,
        deferred: RefCell::new(Vec::new()),
        deferrer: RefCell::new(None),
        stopped: Cell::new(false),
        canary,
        canary_interval,
    });

    // Start the driver. io_uring: one task runs every socket through the socket ring.
    // epoll: an accept loop and one task per connection, on monoio's poll-io.
    let canceller = Canceller::new();
    let ring_task = match driver {
        Driver::IoUring => {
            let socket_ring =
                match uring::SocketRing::new(uring_entries, ring_buffers, ring_buffer_bytes) {
                    Ok(r) => r,
                    Err(source) => {
                        let _ = ready.send(Err(Error::Runtime {
                            shard: id.index(),
                            driver: driver.name(),
                            source,
                            hint:
                                "; the io_uring driver needs Linux 6.0 or newer (multishot receive \
                               into provided buffers); set driver = \"epoll\" to run without it",
                        }));
                        return;
                    }
                };
            monoio::spawn(deferrer(shard.clone()));
            Some(monoio::spawn(uring_driver::run(
                shard.clone(),
                socket_ring,
                OwnedFd::from(listener),
            )))
        }
        #[cfg(feature = "epoll")]
        Driver::Epoll => {
            use crate::driver::poll_driver;
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(source) => {
                    let _ = ready.send(Err(listen_error(source)));
                    return;
                }
            };
            *shard.read_buf.borrow_mut() = BytesMut::with_capacity(read_buffer_bytes);
            monoio::spawn(poll_driver::accept_loop(
                shard.clone(),
                listener,
                canceller.handle(),
            ));
            monoio::spawn(deferrer(shard.clone()));
            None
        }
        // Never reached: `run_thread` answers the spawner before building a runtime.
        #[cfg(not(feature = "epoll"))]
        Driver::Epoll => return,
    };
    // A shard that just started counts as fresh until its first canary is due.
    shard
        .metrics
        .canary_at
        .set(crate::types::clock::When::from_instant(std::time::Instant::now()).as_nanos());
    let _ = ready.send(Ok(()));
    match addr {
        Some(addr) => info!(shard = %id, listen = %addr, "shard listening"),
        None => info!(shard = %id, "shard listening"),
    }

    // Deliver topic messages until told to stop; a closed inbox (engine dropped) means stop.
    while let Some(msg) = inbox.recv().await {
        if !shard.deliver(&inbox, msg).await {
            break; // a stop came in behind the deliveries
        }
    }

    let stop_at = std::time::Instant::now();
    shard.table.borrow_mut().begin_stop();
    let report = shard.drain(&inbox, stop_at).await;
    shard.table.borrow_mut().stop_accepting();
    canceller.cancel();
    let drained = monoio::time::timeout(
        shutdown_timeout.saturating_sub(stop_at.elapsed()),
        shard.wait_empty(),
    )
    .await
    .is_ok();
    let forced = shard.close_all_now();
    shard.metrics.drain_forced.add(forced as u64);
    info!(
        shard = %id,
        closed = report.closed,
        flushed = report.flushed,
        dropped = report.dropped,
        forced,
        "shard drained: connections closed with 1012, topic messages flushed and dropped"
    );
    if let Some(task) = ring_task {
        // The driver cancels what is still in flight, closes the sockets and returns.
        if monoio::time::timeout(Duration::from_secs(2), task)
            .await
            .is_err()
        {
            warn!(shard = %id, "socket ring did not drain in time");
        }
    }
    if drained {
        info!(shard = %id, "shard stopped");
    } else {
        warn!(shard = %id, forced, "shutdown timeout passed; closed remaining connections");
    }
    shard.stopped.set(true);
    let deferrer = shard.deferrer.borrow_mut().take();
    if let Some(w) = deferrer {
        w.wake();
    }
}
