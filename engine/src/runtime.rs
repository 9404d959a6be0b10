//! Starting a shard thread and running its loop: pin it, start the configured driver, report
//! readiness, deliver the inbox until told to stop, then drain. Sits above `shard/` and
//! `driver/`: it is the one place that picks a driver.
//!
//! io_uring: the shard loop below owns the shard's one ring and sleeps only there (one wait
//! point). Each turn polls the shard's few tasks whose wakers fired (the inbox and drain,
//! see `shard/local.rs`), turns the socket driver (`driver/uring_driver.rs`), and enters the
//! ring once: submit, run completion work, and, when nothing is ready, wait for a completion
//! or the next deadline. Other threads wake a parked shard through an eventfd the ring reads;
//! with `[latency]` the shard first spins, and nobody needs to wake it. epoll: monoio's
//! legacy runtime, an accept loop and a task per connection.

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
#[cfg(feature = "epoll")]
use monoio::{io::Canceller, net::TcpListener, LegacyDriver, RuntimeBuilder};
use tracing::{info, warn};

use crate::{
    api::handler::Handler,
    config::Driver,
    config::LatencyMode,
    conn::table::{ConnTable, Settings},
    driver::{uring, uring_driver},
    error::Error,
    ops::{admission::Gate, metrics::ShardMetrics},
    pubsub::{bus::Inbox, hub::Hub, topic::Topic},
    shard::{
        local::{self, Parker, Tasks},
        process::{deferrer, Shard},
    },
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
    /// `[latency]`: how long an idle shard spins before it parks.
    pub(crate) spin: Duration,
    pub(crate) latency_mode: LatencyMode,
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
            let parker = match Parker::new(spec.metrics.clone()) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    let _ = spec.ready.send(Err(runtime_error(e, "")));
                    return;
                }
            };
            let ring = uring::SocketRing::new(
                spec.uring_entries,
                spec.ring_buffers,
                spec.ring_buffer_bytes,
                parker.fd(),
            );
            match ring {
                Ok(ring) => {
                    info!(
                        shard = %id,
                        driver = driver.name(),
                        core = %core_name,
                        ring = ring.mode().name(),
                        spin = ?spec.spin,
                        latency = spec.latency_mode.name(),
                        "shard starting"
                    );
                    run_uring(spec, factory(id), ring, parker);
                }
                Err(e) => {
                    let hint = "; the io_uring driver needs Linux 6.0 or newer (multishot \
                                receive into provided buffers) and io_uring enabled (sysctl \
                                kernel.io_uring_disabled, seccomp); set driver = \"epoll\" to \
                                run without it";
                    let _ = spec.ready.send(Err(runtime_error(e, hint)));
                }
            }
        }
        #[cfg(feature = "epoll")]
        Driver::Epoll => match RuntimeBuilder::<LegacyDriver>::new().enable_timer().build() {
            Ok(mut rt) => {
                info!(shard = %id, driver = driver.name(), core = %core_name, "shard starting");
                rt.block_on(run_epoll(spec, factory(id)));
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

/// The shard's state, built from its spec; returns the parts the loop keeps.
fn new_shard<H: Handler>(spec: ShardSpec, handler: H) -> (Rc<Shard<H>>, Parts) {
    let ShardSpec {
        id,
        listener,
        inbox,
        settings,
        metrics,
        all_metrics,
        hub,
        gate,
        canary,
        canary_interval,
        ready,
        spin,
        latency_mode,
        ..
    } = spec;
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
    let parts = Parts {
        listener,
        inbox,
        ready,
        shutdown_timeout,
        #[cfg(feature = "epoll")]
        read_buffer_bytes,
        spin,
        latency_mode,
    };
    (shard, parts)
}

/// What the loop keeps of a shard's spec besides the shard.
struct Parts {
    listener: StdListener,
    inbox: Inbox,
    ready: Sender<Result<(), Error>>,
    shutdown_timeout: Duration,
    #[cfg(feature = "epoll")]
    read_buffer_bytes: usize,
    spin: Duration,
    latency_mode: LatencyMode,
}

/// Reports the shard ready and listening.
fn report_ready<H>(shard: &Shard<H>, listener: &StdListener, ready: &Sender<Result<(), Error>>) {
    // A shard that just started counts as fresh until its first canary is due.
    shard
        .metrics
        .canary_at
        .set(crate::types::clock::When::from_instant(std::time::Instant::now()).as_nanos());
    let _ = ready.send(Ok(()));
    match listener.local_addr().ok() {
        Some(addr) => info!(shard = %shard.id, listen = %addr, "shard listening"),
        None => info!(shard = %shard.id, "shard listening"),
    }
}

/// How the shard's life ended: whether every connection closed within the shutdown timeout,
/// and how many were closed at once when it passed.
#[derive(Debug, Clone, Copy)]
struct Ended {
    drained: bool,
    forced: usize,
}

/// Deliver topic messages until told to stop (a closed inbox, the engine dropped, means
/// stop), then drain: close every connection with 1012 over the drain window, stop
/// accepting (`stop_accepting` runs then too), and wait for the table to empty within the
/// shutdown timeout.
async fn lifecycle<H: Handler>(
    shard: Rc<Shard<H>>,
    inbox: Inbox,
    shutdown_timeout: Duration,
    stop_accepting: impl FnOnce(),
) -> Ended {
    while let Some(msg) = inbox.recv().await {
        if !shard.deliver(&inbox, msg).await {
            break; // a stop came in behind the deliveries
        }
    }
    let stop_at = std::time::Instant::now();
    shard.table.borrow_mut().begin_stop();
    let report = shard.drain(&inbox, stop_at).await;
    shard.table.borrow_mut().stop_accepting();
    stop_accepting();
    let drained = local::timeout(
        shutdown_timeout.saturating_sub(stop_at.elapsed()),
        shard.wait_empty(),
    )
    .await
    .is_ok();
    let forced = shard.close_all_now();
    shard.metrics.drain_forced.add(forced as u64);
    info!(
        shard = %shard.id,
        closed = report.closed,
        flushed = report.flushed,
        dropped = report.dropped,
        forced,
        "shard drained: connections closed with 1012, topic messages flushed and dropped"
    );
    Ended { drained, forced }
}

/// The last words of a shard: log how it ended and let its deferrer task end.
fn stopped<H>(shard: &Shard<H>, ended: Ended) {
    if ended.drained {
        info!(shard = %shard.id, "shard stopped");
    } else {
        warn!(shard = %shard.id, forced = ended.forced, "shutdown timeout passed; closed remaining connections");
    }
    shard.stopped.set(true);
    let deferrer = shard.deferrer.borrow_mut().take();
    if let Some(w) = deferrer {
        w.wake();
    }
}

/// How long a stopping shard waits for the kernel to finish its sockets' operations.
const RING_DRAIN: Duration = Duration::from_secs(2);

/// The io_uring shard loop: one ring, one wait point (see the module docs).
fn run_uring<H: Handler>(
    spec: ShardSpec,
    handler: H,
    ring: uring::SocketRing,
    parker: Arc<Parker>,
) {
    let (shard, parts) = new_shard(spec, handler);
    let Parts {
        listener,
        inbox,
        ready,
        shutdown_timeout,
        spin,
        latency_mode,
        ..
    } = parts;
    let mut tasks = Tasks::new(parker.clone());
    let ended = Rc::new(Cell::new(None));
    let life = {
        let (shard, ended) = (shard.clone(), ended.clone());
        tasks.spawn(async move {
            let how = lifecycle(shard, inbox, shutdown_timeout, || {}).await;
            ended.set(Some(how));
        })
    };
    tasks.spawn(deferrer(shard.clone()));
    report_ready(&shard, &listener, &ready);
    let mut driver = uring_driver::Driver::new(&shard, ring, OwnedFd::from(listener));
    let always = matches!(latency_mode, LatencyMode::Always);
    let mut ring_deadline: Option<std::time::Instant> = None;
    loop {
        let now = std::time::Instant::now();
        tasks.fire_timers(now);
        tasks.run_ready();
        if tasks.finished(life) {
            let at = *ring_deadline.get_or_insert(now + RING_DRAIN);
            if driver.finished() {
                break;
            }
            if now >= at {
                warn!(shard = %shard.id, "socket ring did not drain in time");
                break;
            }
        }
        driver.turn(now);
        if driver.busy() || tasks.any_ready() {
            enter(&shard, &mut driver, None);
            continue;
        }
        let deadline = [
            driver.next_deadline(),
            tasks.fire_timers(std::time::Instant::now()),
            ring_deadline,
        ]
        .into_iter()
        .flatten()
        .min();
        if (always || !spin.is_zero()) && spin_for_work(&mut driver, &tasks, spin, always, deadline)
        {
            continue;
        }
        // Advertise the park, then look once more: a waker that missed the flag marked its
        // task before this look.
        parker.park();
        if tasks.any_ready() {
            parker.unparked();
            continue;
        }
        let timeout = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        enter(&shard, &mut driver, Some(timeout));
        parker.unparked();
    }
    drop(driver);
    drop(tasks);
    if let Some(how) = ended.get() {
        stopped(&shard, how);
    }
}

/// Enters the shard's ring: submit, run completion work, and with `wait` sleep there.
fn enter<H: Handler>(
    shard: &Shard<H>,
    driver: &mut uring_driver::Driver<'_, H>,
    wait: Option<Option<Duration>>,
) {
    if let Err(e) = driver.ring.enter(wait) {
        tracing::error!(shard = %shard.id, error = %e, "io_uring enter failed");
    }
}

/// `[latency]`: polls the ring's completions and the tasks' wake marks for up to `spin`
/// (without end when `always`, until `deadline`) instead of parking. Submits what is queued
/// first. True when work turned up.
fn spin_for_work<H: Handler>(
    driver: &mut uring_driver::Driver<'_, H>,
    tasks: &Tasks,
    spin: Duration,
    always: bool,
    deadline: Option<std::time::Instant>,
) -> bool {
    if let Err(e) = driver.ring.enter(None) {
        tracing::error!(error = %e, "io_uring enter failed");
    }
    let start = std::time::Instant::now();
    let mut turns = 0u32;
    loop {
        if driver.ring.has_completions() || tasks.any_ready() {
            return true;
        }
        if driver.ring.work_pending() {
            if let Err(e) = driver.ring.enter(None) {
                tracing::error!(error = %e, "io_uring enter failed");
            }
            continue;
        }
        std::hint::spin_loop();
        turns = turns.wrapping_add(1);
        if turns % 64 == 0 {
            let now = std::time::Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return true;
            }
            if !always && now.duration_since(start) >= spin {
                return false;
            }
        }
    }
}

/// The epoll shard: monoio's legacy runtime runs an accept loop and a task per connection.
#[cfg(feature = "epoll")]
async fn run_epoll<H: Handler>(spec: ShardSpec, handler: H) {
    let (shard, parts) = new_shard(spec, handler);
    let Parts {
        listener,
        inbox,
        ready,
        shutdown_timeout,
        read_buffer_bytes,
        ..
    } = parts;
    let canceller = Canceller::new();
    let addr = listener.local_addr().ok();
    let monoio_listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(source) => {
            let _ = ready.send(Err(Error::Listen {
                addr: addr.unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
                source,
            }));
            return;
        }
    };
    *shard.read_buf.borrow_mut() = BytesMut::with_capacity(read_buffer_bytes);
    monoio::spawn(crate::driver::poll_driver::accept_loop(
        shard.clone(),
        monoio_listener,
        canceller.handle(),
    ));
    monoio::spawn(deferrer(shard.clone()));
    // A shard that just started counts as fresh until its first canary is due.
    shard
        .metrics
        .canary_at
        .set(crate::types::clock::When::from_instant(std::time::Instant::now()).as_nanos());
    let _ = ready.send(Ok(()));
    match addr {
        Some(addr) => info!(shard = %shard.id, listen = %addr, "shard listening"),
        None => info!(shard = %shard.id, "shard listening"),
    }
    let ended = lifecycle(shard.clone(), inbox, shutdown_timeout, || {
        canceller.cancel();
    })
    .await;
    stopped(&shard, ended);
}
