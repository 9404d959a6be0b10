//! The io_uring shard's own task runner: the few futures a shard runs besides its sockets,
//! their timers, and how other threads wake a parked shard.
//!
//! On the io_uring path a shard has one wait point, its ring (see `runtime.rs`). The loop
//! polls the tasks here whose waker fired, runs the socket driver, and parks in the ring
//! when nothing is ready. A waker from another thread (a publish, a stop) marks its task
//! ready and writes the shard's wake eventfd only if the shard advertised that it is parked
//! ([`Parker`]); a running or spinning shard sees the mark on its next turn, no system call.
//!
//! [`sleep`] and [`timeout`] work on either driver: in this loop they use its timers, on the
//! epoll driver (monoio) monoio's.

use std::{
    cell::RefCell,
    future::Future,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{Context, Poll, Wake, Waker},
    time::{Duration, Instant},
};

use slab::Slab;

use crate::ops::metrics::ShardMetrics;

/// How a parked shard is woken from another thread.
#[derive(Debug)]
pub(crate) struct Parker {
    /// The shard sleeps (or is about to) in its ring and needs the eventfd written.
    parked: AtomicBool,
    /// Read by an operation in the shard's ring.
    eventfd: OwnedFd,
    /// Counts the eventfd writes (wakes that cost a system call).
    metrics: Arc<ShardMetrics>,
}

impl Parker {
    /// A parker with a fresh eventfd, counting its wakes in `metrics`.
    pub(crate) fn new(metrics: Arc<ShardMetrics>) -> io::Result<Self> {
        // SAFETY: eventfd(2) with valid flags; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            parked: AtomicBool::new(false),
            // SAFETY: a descriptor we just created and own.
            eventfd: unsafe { OwnedFd::from_raw_fd(fd) },
            metrics,
        })
    }

    /// The eventfd the shard's ring reads.
    pub(crate) fn fd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// The shard is about to sleep: wakers must write the eventfd from now on. The caller
    /// looks for ready work after this and before sleeping (the other half of the handshake
    /// in [`Parker::unpark`]).
    pub(crate) fn park(&self) {
        self.parked.store(true, Ordering::SeqCst);
    }

    /// The shard is awake again.
    pub(crate) fn unparked(&self) {
        self.parked.store(false, Ordering::Relaxed);
    }

    /// Wakes the shard if it is parked: one eventfd write per park, however many wakers.
    /// Called after the waker marked its work (SeqCst), so either the shard sees the mark
    /// before sleeping or this sees `parked`.
    pub(crate) fn unpark(&self) {
        if self.parked.load(Ordering::SeqCst) && self.parked.swap(false, Ordering::SeqCst) {
            self.metrics.shard_wakes.incr();
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live buffer to a descriptor we own. A full
            // counter (EAGAIN) already means "wake", so the result needs no handling.
            unsafe { libc::write(self.eventfd.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
    }
}

/// A task's waker: marks the task ready, then wakes the shard if it is parked.
struct TaskWake {
    ready: AtomicBool,
    parker: Arc<Parker>,
}

impl Wake for TaskWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.store(true, Ordering::SeqCst);
        self.parker.unpark();
    }
}

type LocalTask = Pin<Box<dyn Future<Output = ()>>>;

/// The shard's tasks and timers.
pub(crate) struct Tasks {
    tasks: Vec<(Option<LocalTask>, Arc<TaskWake>, Waker)>,
    parker: Arc<Parker>,
}

/// Timers by key: when each fires, and the waker to call then (taken when it fires).
type Timers = Slab<(Instant, Option<Waker>)>;

thread_local! {
    /// This thread's timers while a shard loop runs on it (see [`sleep`]).
    static TIMERS: RefCell<Option<Timers>> = const { RefCell::new(None) };
}

impl Tasks {
    /// A task set whose wakers wake through `parker`; installs this thread's timers.
    pub(crate) fn new(parker: Arc<Parker>) -> Self {
        TIMERS.with(|t| *t.borrow_mut() = Some(Slab::new()));
        Self {
            tasks: Vec::new(),
            parker,
        }
    }

    /// Adds a task; it is polled on the next [`Tasks::run_ready`].
    pub(crate) fn spawn(&mut self, task: impl Future<Output = ()> + 'static) -> usize {
        let wake = Arc::new(TaskWake {
            ready: AtomicBool::new(true),
            parker: self.parker.clone(),
        });
        let waker = Waker::from(wake.clone());
        self.tasks.push((Some(Box::pin(task)), wake, waker));
        self.tasks.len() - 1
    }

    /// Whether task `id` has finished.
    pub(crate) fn finished(&self, id: usize) -> bool {
        self.tasks[id].0.is_none()
    }

    /// Polls every task marked ready, once each. Returns whether any ran.
    pub(crate) fn run_ready(&mut self) -> bool {
        let mut ran = false;
        for (task, wake, waker) in &mut self.tasks {
            let Some(fut) = task.as_mut() else { continue };
            if !wake.ready.swap(false, Ordering::SeqCst) {
                continue;
            }
            ran = true;
            if fut
                .as_mut()
                .poll(&mut Context::from_waker(waker))
                .is_ready()
            {
                *task = None;
            }
        }
        ran
    }

    /// Whether a task is marked ready (a waker fired since it last ran).
    pub(crate) fn any_ready(&self) -> bool {
        self.tasks
            .iter()
            .any(|(task, wake, _)| task.is_some() && wake.ready.load(Ordering::SeqCst))
    }

    /// Wakes the tasks whose timers passed; returns the next timer's deadline.
    pub(crate) fn fire_timers(&mut self, now: Instant) -> Option<Instant> {
        TIMERS.with(|t| {
            let mut t = t.borrow_mut();
            let timers = t.as_mut()?;
            let mut next: Option<Instant> = None;
            for (_, (at, waker)) in timers.iter_mut() {
                if *at <= now {
                    if let Some(w) = waker.take() {
                        w.wake();
                    }
                } else if waker.is_some() {
                    next = Some(next.map_or(*at, |n| n.min(*at)));
                }
            }
            next
        })
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        // Futures first (their timers remove themselves), then the timers.
        self.tasks.clear();
        TIMERS.with(|t| *t.borrow_mut() = None);
    }
}

/// Waits `after`, on the shard loop's timers (or monoio's on the epoll driver).
pub(crate) fn sleep(after: Duration) -> Sleep {
    let at = Instant::now() + after;
    let in_loop = TIMERS.with(|t| t.borrow().is_some());
    if in_loop {
        return Sleep::Loop { at, key: None };
    }
    #[cfg(feature = "epoll")]
    {
        Sleep::Monoio(Box::pin(monoio::time::sleep(after)))
    }
    #[cfg(not(feature = "epoll"))]
    {
        // Without the epoll driver every shard runs the loop; nothing else sleeps.
        Sleep::Loop { at, key: None }
    }
}

/// A [`sleep`].
pub(crate) enum Sleep {
    /// On the shard loop's timers, registered under `key` once polled.
    Loop { at: Instant, key: Option<usize> },
    /// On monoio's (epoll driver).
    #[cfg(feature = "epoll")]
    Monoio(Pin<Box<monoio::time::Sleep>>),
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut *self {
            Sleep::Loop { at, key } => {
                if Instant::now() >= *at {
                    return Poll::Ready(());
                }
                TIMERS.with(|t| {
                    let mut t = t.borrow_mut();
                    let Some(timers) = t.as_mut() else { return };
                    match key {
                        Some(k) => timers[*k].1 = Some(cx.waker().clone()),
                        None => *key = Some(timers.insert((*at, Some(cx.waker().clone())))),
                    }
                });
                Poll::Pending
            }
            #[cfg(feature = "epoll")]
            Sleep::Monoio(s) => s.as_mut().poll(cx),
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Sleep::Loop { key: Some(k), .. } = self {
            TIMERS.with(|t| {
                if let Some(timers) = t.borrow_mut().as_mut() {
                    timers.try_remove(*k);
                }
            });
        }
    }
}

/// Runs `fut` for at most `after`: `Err(())` if the time passed first.
pub(crate) async fn timeout<F: Future>(after: Duration, fut: F) -> Result<F::Output, ()> {
    let mut fut = std::pin::pin!(fut);
    let mut timer = std::pin::pin!(sleep(after));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        timer.as_mut().poll(cx).map(|()| Err(()))
    })
    .await
}
