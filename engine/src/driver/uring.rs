//! The socket ring: the io_uring on which a shard runs its sockets (io_uring driver).
//!
//! Owns the ring and the eventfd that wakes the shard's monoio runtime when completions
//! arrive, the provided-buffer pool that multishot receives fill, the table of sends in
//! flight (whose memory the kernel reads until they complete), and the encoding of operations
//! in `user_data`. It knows nothing of WebSocket or connections beyond a slot and a generation:
//! `uring_driver.rs` decides what to submit and what completions mean.
//!
//! Every `unsafe` here is about memory the kernel reads or writes after a call returns: the
//! buffer ring, the provided buffers, and the send headers and iovecs. Each stays alive and
//! unmoved until the kernel is done with it, as the SAFETY comments say.

use std::{
    fmt, io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    ptr::NonNull,
    rc::Rc,
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
}

const KIND_ACCEPT: u64 = 1;
const KIND_RECV: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_IGNORE: u64 = 4;
const KIND_SHUTDOWN: u64 = 5;

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
    /// Read by the shard's monoio runtime; the kernel signals it for every completion.
    eventfd: Rc<monoio::fs::File>,
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
    /// buffers of `buffer_bytes` each. Must run on the shard's thread, inside its runtime.
    ///
    /// # Errors
    /// The kernel lacks a feature used here (multishot receive needs Linux 6.0, provided
    /// buffer rings 5.19), or memory or descriptors ran out.
    pub(crate) fn new(entries: u32, buffers: u16, buffer_bytes: usize) -> io::Result<Self> {
        // COOP_TASKRUN: completing work (a receive after data arrives) does not interrupt this
        // thread while it runs; it is done when the thread next enters the kernel, and a
        // sleeping thread is still woken for it (task_work's TWA_SIGNAL_NO_IPI), which posts
        // the completion and signals the eventfd monoio waits on. Not DEFER_TASKRUN: that runs
        // the work only when this ring is entered, and the thread sleeps in monoio's ring.
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(entries)?;
        // SAFETY: eventfd(2) with valid flags; the result is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just created and own.
        let efd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let pool = BufPool::new(&ring, buffers, buffer_bytes)?;
        let eventfd = Rc::new(monoio::fs::File::from_std(std::fs::File::from(efd))?);
        Ok(Self {
            ring,
            pool,
            sends: Slab::new(),
            spare_sends: Vec::new(),
            backlog: Vec::new(),
            eventfd,
        })
    }

    /// The eventfd the kernel signals on every completion.
    pub(crate) fn eventfd(&self) -> Rc<monoio::fs::File> {
        self.eventfd.clone()
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

    /// Submits what was queued. Never waits.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        if self.backlog.is_empty() && self.ring.submission().is_empty() {
            return Ok(());
        }
        loop {
            while !self.backlog.is_empty() {
                let entry = self.backlog[0].clone();
                // SAFETY: as in `push`.
                if unsafe { self.ring.submission().push(&entry) }.is_err() {
                    break;
                }
                self.backlog.remove(0);
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            if self.backlog.is_empty() {
                return Ok(());
            }
            if !self.ring.completion().is_empty() {
                // The caller drains completions, which makes room, then submits again.
                return Ok(());
            }
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
