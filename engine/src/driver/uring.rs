//! The shard's ring: the one io_uring a shard runs its sockets in and sleeps in (io_uring
//! driver).
//!
//! Owns the ring and its setup flags (SINGLE_ISSUER with DEFER_TASKRUN where the kernel allows),
//! the read on the shard's wake eventfd that other threads write when the shard is parked, the
//! provided-buffer pool that multishot receives fill, the table of sends in flight (whose
//! memory the kernel reads until they complete), entering the kernel (submit, run completion
//! work, and optionally wait with a timeout), and the encoding of operations in `user_data`. It knows nothing of WebSocket or connections beyond a slot and a generation:
//! `uring_driver.rs` decides what to submit and what completions mean.
//!
//! Every `unsafe` here is about memory the kernel reads or writes after a call returns: the
//! buffer ring, the provided buffers, and the send headers and iovecs. Each stays alive and
//! unmoved until the kernel is done with it, as the SAFETY comments say.

use std::{
    fmt, io,
    os::fd::RawFd,
    ptr::NonNull,
    sync::atomic::{AtomicU16, Ordering},
};

use bytes::BytesMut;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;

use crate::conn::outbound::{Batch, MAX_IOV};

/// The buffer group id of the provided-buffer pool.
const BUF_GROUP: u16 = 0;

/// What a completion belongs to, in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// The multishot accept on the shard's listener.
    Accept,
    /// A connection's multishot receive.
    Recv { key: usize, gen: u32 },
    /// A send in flight, by its slot in the send table.
    Send { slot: u32 },
    /// A connection's write shutdown. Tracked, not ignored: the kernel may look the descriptor
    /// up only when an io-wq worker runs the shutdown, so the descriptor must stay open (and
    /// its number unused by a new connection) until the completion arrives.
    Shutdown { key: usize, gen: u32 },
    /// Anything whose completion needs no handling (cancellations).
    Ignore,
    /// The read on the shard's wake eventfd: another thread woke the parked shard.
    Wake,
}

const KIND_ACCEPT: u64 = 1;
const KIND_RECV: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_IGNORE: u64 = 4;
const KIND_SHUTDOWN: u64 = 5;
const KIND_WAKE: u64 = 6;

/// `IORING_ENTER_GETEVENTS`: run completion work and reap (and wait for `min_complete`).
const ENTER_GETEVENTS: u32 = 1;

/// A connection's slot and generation in `user_data` below the kind byte.
fn encode_conn(kind: u64, key: usize, gen: u32) -> u64 {
    // 24 bits of generation are plenty to tell a stale completion from a live one.
    kind << 56 | (u64::from(gen) & 0xFF_FFFF) << 32 | key as u64 & 0xFFFF_FFFF
}

fn decode_conn(data: u64) -> (usize, u32) {
    (
        (data & 0xFFFF_FFFF) as usize,
        ((data >> 32) & 0xFF_FFFF) as u32,
    )
}

impl Op {
    fn encode(self) -> u64 {
        match self {
            Op::Accept => KIND_ACCEPT << 56,
            Op::Recv { key, gen } => encode_conn(KIND_RECV, key, gen),
            Op::Send { slot } => KIND_SEND << 56 | u64::from(slot),
            Op::Shutdown { key, gen } => encode_conn(KIND_SHUTDOWN, key, gen),
            Op::Ignore => KIND_IGNORE << 56,
            Op::Wake => KIND_WAKE << 56,
        }
    }

    fn decode(data: u64) -> Op {
        match data >> 56 {
            KIND_ACCEPT => Op::Accept,
            KIND_RECV => {
                let (key, gen) = decode_conn(data);
                Op::Recv { key, gen }
            }
            KIND_SHUTDOWN => {
                let (key, gen) = decode_conn(data);
                Op::Shutdown { key, gen }
            }
            KIND_SEND => Op::Send {
                slot: (data & 0xFFFF_FFFF) as u32,
            },
            KIND_WAKE => Op::Wake,
            _ => Op::Ignore,
        }
    }

    /// Whether a completion for `self` belongs to a connection of generation `gen`.
    pub(crate) fn matches_gen(recv_gen: u32, gen: u32) -> bool {
        recv_gen == gen & 0xFF_FFFF
    }
}

/// One completion, decoded.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Completion {
    pub(crate) op: Op,
    pub(crate) result: i32,
    /// The provided buffer the kernel filled, for receives.
    pub(crate) buffer: Option<u16>,
    /// More completions will come for this multishot operation.
    pub(crate) more: bool,
}

/// A send in flight: the chunks it writes and the header and iovecs the kernel reads. Boxed
/// in the send table so its address does not change while the kernel holds it.
pub(crate) struct SendSlot {
    pub(crate) batch: Batch,
    pub(crate) key: usize,
    pub(crate) gen: u32,
    /// Sized to the batch, so a one-frame send does not carry room for [`MAX_IOV`].
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

/// Completed send slots kept for reuse; beyond this they are freed, so a burst of sends does
/// not leave its peak memory behind.
const MAX_SPARE_SENDS: usize = 64;

impl fmt::Debug for SendSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendSlot")
            .field("key", &self.key)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl SendSlot {
    fn new() -> Box<Self> {
        Box::new(Self {
            batch: Batch::default(),
            key: 0,
            gen: 0,
            iov: Vec::new(),
            // SAFETY: msghdr is a plain C struct for which all-zero is the empty header.
            msg: unsafe { std::mem::zeroed() },
        })
    }
}

/// Provided buffers: the kernel picks one for each receive completion, so an idle connection
/// holds none. Each buffer is a `BytesMut`, so payloads are split from it without copying;
/// a buffer goes back to the kernel once no payload refers to it any more.
pub(crate) struct BufPool {
    /// The ring of buffer descriptors shared with the kernel (mmap'd, page aligned).
    entries: NonNull<types::BufRingEntry>,
    entries_bytes: usize,
    /// By buffer id: the buffer while the kernel may fill it.
    provided: Vec<Option<BytesMut>>,
    /// Buffers the driver is done with but that payloads still share.
    waiting: Vec<(u16, BytesMut)>,
    buf_bytes: usize,
    mask: u16,
    tail: u16,
    unpublished: bool,
    available: usize,
}

impl fmt::Debug for BufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufPool")
            .field("buffers", &self.provided.len())
            .field("buf_bytes", &self.buf_bytes)
            .field("available", &self.available)
            .field("waiting", &self.waiting.len())
            .finish()
    }
}

impl BufPool {
    fn new(ring: &IoUring, count: u16, buf_bytes: usize) -> io::Result<Self> {
        let entries_bytes = usize::from(count) * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping; checked for failure below and unmapped in Drop.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                entries_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let entries = NonNull::new(mem.cast::<types::BufRingEntry>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        let mut pool = Self {
            entries,
            entries_bytes,
            provided: (0..count).map(|_| None).collect(),
            waiting: Vec::new(),
            buf_bytes,
            mask: count - 1,
            tail: 0,
            unpublished: false,
            available: 0,
        };
        // SAFETY: the descriptor ring lives until Drop, which runs after the ring that uses
        // it (SocketRing drops its IoUring first), and is page aligned by mmap.
        unsafe {
            ring.submitter()
                .register_buf_ring(entries.as_ptr() as u64, count, BUF_GROUP)?;
        }
        for bid in 0..count {
            // Touch every page now: the pool is a fixed per-shard cost, paid at start rather
            // than as page faults on the hot path.
            let mut buf = BytesMut::zeroed(buf_bytes);
            buf.clear();
            pool.provide(bid, buf);
        }
        pool.publish();
        Ok(pool)
    }

    /// Hands `buf` (empty, at least `buf_bytes` of capacity) to the kernel as buffer `bid`.
    fn provide(&mut self, bid: u16, mut buf: BytesMut) {
        debug_assert!(buf.is_empty() && buf.capacity() >= self.buf_bytes);
        // SAFETY: `tail & mask` indexes the mapped ring. The kernel writes into `buf` only
        // while it sits in `provided`, which keeps its allocation alive and unmoved until the
        // kernel hands it back in a completion.
        unsafe {
            let entry = &mut *self
                .entries
                .as_ptr()
                .add(usize::from(self.tail & self.mask));
            entry.set_addr(buf.as_mut_ptr() as u64);
            entry.set_len(self.buf_bytes as u32);
            entry.set_bid(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        self.provided[usize::from(bid)] = Some(buf);
        self.unpublished = true;
        self.available += 1;
    }

    /// Makes buffers provided since the last call visible to the kernel.
    pub(crate) fn publish(&mut self) {
        if self.unpublished {
            // SAFETY: the tail field of the mapped ring, as io_uring_buf_ring_advance does.
            let tail =
                unsafe { &*types::BufRingEntry::tail(self.entries.as_ptr()).cast::<AtomicU16>() };
            tail.store(self.tail, Ordering::Release);
            self.unpublished = false;
        }
    }

    /// Takes the buffer the kernel filled with `len` bytes.
    pub(crate) fn take(&mut self, bid: u16, len: usize) -> BytesMut {
        let mut buf = self.provided[usize::from(bid)]
            .take()
            .expect("the kernel completes each provided buffer once");
        self.available -= 1;
        assert!(len <= buf.capacity(), "a receive longer than its buffer");
        // SAFETY: the completion says the kernel wrote `len` bytes at the start of this
        // buffer, which is within its capacity (checked above).
        unsafe { buf.set_len(len) };
        buf
    }

    /// Returns a buffer the driver is done with. If payloads split from it are still alive it
    /// waits here until they are dropped (see [`BufPool::reclaim`]).
    pub(crate) fn give_back(&mut self, bid: u16, mut buf: BytesMut) {
        buf.clear();
        if buf.try_reclaim(self.buf_bytes) {
            self.provide(bid, buf);
        } else {
            self.waiting.push((bid, buf));
        }
    }

    /// Re-provides waiting buffers whose payloads are gone. When fewer than a quarter of the
    /// buffers are left, waiting ones are replaced by fresh allocations instead (their old
    /// memory stays with whoever still holds a payload).
    pub(crate) fn reclaim(&mut self) {
        let low = self.available < self.provided.len() / 4;
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].1.try_reclaim(self.buf_bytes) {
                let (bid, buf) = self.waiting.swap_remove(i);
                self.provide(bid, buf);
            } else if low {
                // The old memory stays with the payloads that share it.
                let (bid, _shared) = self.waiting.swap_remove(i);
                self.provide(bid, BytesMut::with_capacity(self.buf_bytes));
            } else {
                i += 1;
            }
        }
    }

    /// Buffers the kernel can fill now.
    pub(crate) fn available(&self) -> usize {
        self.available
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; the ring that used it is gone.
        unsafe {
            libc::munmap(self.entries.as_ptr().cast(), self.entries_bytes);
        }
    }
}

/// A shard's socket ring with its buffer pool and send table.
pub(crate) struct SocketRing {
    // Field order is drop order: the ring (and every operation in it) goes before the memory
    // those operations point into.
    ring: IoUring,
    pub(crate) pool: BufPool,
    sends: Slab<Box<SendSlot>>,
    /// Slots whose send completed, kept boxed so the next send reuses the allocation.
    #[allow(clippy::vec_box)]
    spare_sends: Vec<Box<SendSlot>>,
    /// Entries that did not fit the submission queue; pushed first at the next submit.
    backlog: Vec<squeue::Entry>,
    /// How the kernel runs completion work for this ring (the setup flags it accepted).
    mode: TaskRun,
    /// The shard's wake eventfd, read by an operation in this ring (see [`Op::Wake`]).
    wake_fd: RawFd,
    /// Where that read puts the eventfd's counter (boxed: the kernel writes it).
    wake_buf: Box<u64>,
    /// The wake read is in flight.
    wake_armed: bool,
}

/// How the kernel runs a ring's completion work (receives after data arrives, and so on):
/// the setup flags the kernel accepted, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TaskRun {
    /// `SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG` (Linux 6.1): the work runs only when the
    /// shard enters the ring to reap, never interrupting it; no wake-up IPIs.
    Deferred,
    /// `SINGLE_ISSUER | COOP_TASKRUN | TASKRUN_FLAG` (Linux 6.0): the work runs at the shard's
    /// next kernel entry; a sleeping shard is still woken for it.
    Cooperative,
    /// No flags: the kernel interrupts the shard to run the work.
    Plain,
}

impl TaskRun {
    /// The name logged at start.
    pub(crate) fn name(self) -> &'static str {
        match self {
            TaskRun::Deferred => "single-issuer+defer-taskrun",
            TaskRun::Cooperative => "single-issuer+coop-taskrun",
            TaskRun::Plain => "plain",
        }
    }
}

/// Builds a ring of `entries` with the best [`TaskRun`] the kernel accepts.
fn build_ring(entries: u32) -> io::Result<(IoUring, TaskRun)> {
    let deferred = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .build(entries);
    let first = match deferred {
        Ok(ring) => return Ok((ring, TaskRun::Deferred)),
        Err(e) => e,
    };
    let coop = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(entries);
    if let Ok(ring) = coop {
        tracing::warn!(error = %first, "io_uring refused DEFER_TASKRUN; using COOP_TASKRUN");
        return Ok((ring, TaskRun::Cooperative));
    }
    let ring = IoUring::builder().build(entries)?;
    tracing::warn!(error = %first, "io_uring refused DEFER_TASKRUN and COOP_TASKRUN; using none");
    Ok((ring, TaskRun::Plain))
}

impl fmt::Debug for SocketRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketRing")
            .field("pool", &self.pool)
            .field("sends_in_flight", &self.sends.len())
            .finish_non_exhaustive()
    }
}

impl SocketRing {
    /// Sets up the ring (`entries` submission slots) and a pool of `buffers` provided
    /// buffers of `buffer_bytes` each; `wake_fd` is the shard's wake eventfd, which must stay
    /// open as long as the ring. Must run on the shard's thread: the ring is single-issuer.
    ///
    /// # Errors
    /// The kernel lacks a feature used here (multishot receive needs Linux 6.0, provided
    /// buffer rings 5.19), or memory or descriptors ran out.
    pub(crate) fn new(
        entries: u32,
        buffers: u16,
        buffer_bytes: usize,
        wake_fd: RawFd,
    ) -> io::Result<Self> {
        let (ring, mode) = build_ring(entries)?;
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks EXT_ARG (Linux 5.11): a shard cannot wait with a timeout",
            ));
        }
        let pool = BufPool::new(&ring, buffers, buffer_bytes)?;
        let mut ring = Self {
            ring,
            pool,
            sends: Slab::new(),
            spare_sends: Vec::new(),
            backlog: Vec::new(),
            mode,
            wake_fd,
            wake_buf: Box::new(0),
            wake_armed: false,
        };
        ring.arm_wake();
        Ok(ring)
    }

    /// The setup flags the kernel accepted.
    pub(crate) fn mode(&self) -> TaskRun {
        self.mode
    }

    /// Arms the read on the wake eventfd unless it is in flight. Called again after each
    /// [`Op::Wake`] completion (see [`SocketRing::woken`]).
    pub(crate) fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let buf: *mut u64 = &mut *self.wake_buf;
        // SAFETY (for `push`): the 8 bytes live in a box owned by this ring, which is dropped
        // after the ring itself (field order), so the kernel never writes freed memory.
        let entry = opcode::Read::new(types::Fd(self.wake_fd), buf.cast(), 8)
            .build()
            .user_data(Op::Wake.encode());
        self.push(entry);
        self.wake_armed = true;
    }

    /// The wake read completed: re-arm it.
    pub(crate) fn woken(&mut self) {
        self.wake_armed = false;
        self.arm_wake();
    }

    fn push(&mut self, entry: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push(entry);
            return;
        }
        // SAFETY: every entry built in this module points only at memory that outlives the
        // operation (see the SAFETY notes where each is built).
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.backlog.push(entry);
        }
    }

    /// Arms a multishot accept on `listener`.
    pub(crate) fn accept(&mut self, listener: RawFd) {
        let entry = opcode::AcceptMulti::new(types::Fd(listener))
            .build()
            .user_data(Op::Accept.encode());
        self.push(entry);
    }

    /// Cancels the multishot accept.
    pub(crate) fn cancel_accept(&mut self) {
        self.cancel(Op::Accept.encode());
    }

    /// Arms a multishot receive into the pool on `fd` for connection `key` of generation `gen`.
    pub(crate) fn recv(&mut self, fd: RawFd, key: usize, gen: u32) {
        let entry = opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP)
            .build()
            .user_data(Op::Recv { key, gen }.encode());
        self.push(entry);
    }

    /// Cancels connection `key`'s receive; its last completion will not have `more` set.
    pub(crate) fn cancel_recv(&mut self, key: usize, gen: u32) {
        self.cancel(Op::Recv { key, gen }.encode());
    }

    /// Cancels the send in `slot`.
    pub(crate) fn cancel_send(&mut self, slot: u32) {
        self.cancel(Op::Send { slot }.encode());
    }

    fn cancel(&mut self, target: u64) {
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(Op::Ignore.encode());
        self.push(entry);
    }

    /// Shuts down the write side of `fd`, connection `key` of generation `gen` (sends FIN once
    /// queued data is out). `fd` must stay open until the [`Op::Shutdown`] completion.
    pub(crate) fn shutdown_write(&mut self, fd: RawFd, key: usize, gen: u32) {
        let entry = opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR)
            .build()
            .user_data(Op::Shutdown { key, gen }.encode());
        self.push(entry);
    }

    /// Starts a send of up to [`MAX_IOV`] chunks from `fill` for connection `key`; returns
    /// its slot. `fill` moves the chunks into the slot's batch.
    pub(crate) fn send(
        &mut self,
        fd: RawFd,
        key: usize,
        gen: u32,
        fill: impl FnOnce(&mut Batch),
    ) -> u32 {
        let mut slot = self.spare_sends.pop().unwrap_or_else(SendSlot::new);
        fill(&mut slot.batch);
        slot.key = key;
        slot.gen = gen;
        let id = self.sends.insert(slot) as u32;
        self.submit_send(fd, id);
        id
    }

    /// (Re)submits the unwritten rest of the batch in `slot`.
    pub(crate) fn submit_send(&mut self, fd: RawFd, slot: u32) {
        let s = &mut self.sends[slot as usize];
        let chunks = s.batch.len().min(MAX_IOV);
        s.iov.clear();
        s.iov.resize(
            chunks,
            libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
        );
        let n = s.batch.fill_iovecs(&mut s.iov);
        s.msg.msg_iov = s.iov.as_mut_ptr();
        s.msg.msg_iovlen = n;
        let msg: *const libc::msghdr = &s.msg;
        // SAFETY (for `push`): the header, its iovecs and the bytes they point to live in the
        // boxed slot and its batch, which stay in the send table, unmoved, until the send
        // completes (`finish_send`).
        let entry = opcode::SendMsg::new(types::Fd(fd), msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(Op::Send { slot }.encode());
        self.push(entry);
    }

    /// The send in `slot`.
    pub(crate) fn send_slot(&mut self, slot: u32) -> &mut SendSlot {
        &mut self.sends[slot as usize]
    }

    /// Frees `slot` after its last completion; returns the batch's leftovers to the caller
    /// through `abandon` if any remain.
    pub(crate) fn finish_send(&mut self, slot: u32, abandon: impl FnOnce(&mut Batch)) {
        let mut s = self.sends.remove(slot as usize);
        if !s.batch.is_empty() {
            abandon(&mut s.batch);
        }
        if self.spare_sends.len() < MAX_SPARE_SENDS {
            s.iov = Vec::new();
            self.spare_sends.push(s);
        }
        if self.sends.is_empty() && self.sends.capacity() > MAX_SPARE_SENDS {
            self.sends.shrink_to_fit();
        }
    }

    /// Submits what was queued and runs the ring's pending completion work, so that
    /// completions are visible; with `wait`, then sleeps until at least one completion is
    /// posted or the timeout (`None`: none) passes. One system call unless the submission
    /// queue overflowed into the backlog.
    pub(crate) fn enter(&mut self, wait: Option<Option<std::time::Duration>>) -> io::Result<()> {
        loop {
            while !self.backlog.is_empty() {
                let entry = self.backlog[0].clone();
                // SAFETY: as in `push`.
                if unsafe { self.ring.submission().push(&entry) }.is_err() {
                    break;
                }
                self.backlog.remove(0);
            }
            // A wait with work still in the backlog would stall it: submit it first.
            let waiting = wait.filter(|_| self.backlog.is_empty());
            let to_submit = self.ring.submission().len() as u32;
            let submitter = self.ring.submitter();
            let result = match waiting {
                None => {
                    // SAFETY: no argument; the flags are valid for this ring.
                    unsafe {
                        submitter.enter::<libc::sigset_t>(to_submit, 0, ENTER_GETEVENTS, None)
                    }
                }
                Some(timeout) => {
                    let ts = timeout.map(|t| {
                        types::Timespec::new()
                            .sec(t.as_secs())
                            .nsec(t.subsec_nanos())
                    });
                    let args = match &ts {
                        Some(ts) => types::SubmitArgs::new().timespec(ts),
                        None => types::SubmitArgs::new(),
                    };
                    submitter.submit_with_args(1, &args)
                }
            };
            match result {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EBUSY | libc::ETIME | libc::EINTR | libc::EAGAIN)
                    ) => {}
                Err(e) => return Err(e),
            }
            if self.backlog.is_empty() {
                return Ok(());
            }
            if !self.ring.completion().is_empty() {
                // The caller drains completions, which makes room, then enters again.
                return Ok(());
            }
        }
    }

    /// Whether the kernel has completion work waiting to run (only known with
    /// `TASKRUN_FLAG`, see [`TaskRun`]): a spinning shard enters the ring only then.
    pub(crate) fn work_pending(&self) -> bool {
        match self.mode {
            TaskRun::Deferred | TaskRun::Cooperative => {
                // SAFETY: reading the shared flags word only; nothing is pushed meanwhile.
                unsafe { self.ring.submission_shared() }.taskrun()
            }
            TaskRun::Plain => true,
        }
    }

    /// The next completion, if any.
    pub(crate) fn next(&mut self) -> Option<Completion> {
        let cqe = self.ring.completion().next()?;
        let flags = cqe.flags();
        Some(Completion {
            op: Op::decode(cqe.user_data()),
            result: cqe.result(),
            buffer: cqueue::buffer_select(flags),
            more: cqueue::more(flags),
        })
    }

    /// Whether completions are waiting.
    pub(crate) fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Whether sends are still in flight.
    pub(crate) fn sends_in_flight(&self) -> usize {
        self.sends.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_every_kind() {
        for op in [
            Op::Accept,
            Op::Recv {
                key: 123_456,
                gen: 0xAB_CDEF,
            },
            Op::Send { slot: 7 },
            Op::Shutdown {
                key: 42,
                gen: 0x12_3456,
            },
            Op::Ignore,
            Op::Wake,
        ] {
            assert_eq!(Op::decode(op.encode()), op);
        }
        // Generations are kept to 24 bits; matches_gen compares them that way.
        let Op::Recv { gen, .. } = Op::decode(
            Op::Recv {
                key: 1,
                gen: 0x1AB_CDEF,
            }
            .encode(),
        ) else {
            panic!()
        };
        assert!(Op::matches_gen(gen, 0x1AB_CDEF));
        assert!(!Op::matches_gen(gen, 0x1AB_CDEE));
    }
}
