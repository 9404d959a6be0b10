//! Messages into a shard from other threads.
//!
//! Owns each shard's inbox: a crossbeam channel plus a waker the shard's inbox task registers,
//! so a sender wakes a parked shard without the shard ever polling in a loop. It carries
//! commands (stop) and cross-shard fan-out (a published message for the shard's subscribers).

use std::{future::poll_fn, sync::Arc, task::Poll};

use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender, TryRecvError};

use crate::pubsub::topic::{BackendMsg, Published};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// A command for one shard.
#[derive(Debug)]
pub(crate) enum ShardMsg {
    /// Stop accepting, close every connection with 1012 (spread over `timeouts.drain_window`),
    /// and exit within the shutdown timeout.
    Stop,
    /// A topic message for the shard's local subscribers.
    Deliver(Arc<Published>),
    /// An answer or notice from a backend with its own thread (Redis).
    #[cfg_attr(
        not(feature = "redis"),
        allow(dead_code, reason = "only Redis sends these")
    )]
    Backend(BackendMsg),
}

/// The sending side, held by the engine handle (any thread).
#[derive(Debug, Clone)]
pub(crate) struct Mailbox {
    tx: Sender<ShardMsg>,
    waker: Arc<AtomicWaker>,
}

/// The receiving side, owned by the shard.
#[derive(Debug)]
pub(crate) struct Inbox {
    rx: Receiver<ShardMsg>,
    waker: Arc<AtomicWaker>,
}

pub(crate) fn channel() -> (Mailbox, Inbox) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let waker = Arc::new(AtomicWaker::new());
    (
        Mailbox {
            tx,
            waker: waker.clone(),
        },
        Inbox { rx, waker },
    )
}

impl Mailbox {
    /// Delivers `msg` and wakes the shard. Gives the message back if the shard has exited.
    pub(crate) fn send(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        self.tx.send(msg).map_err(|e| e.into_inner())?;
        self.waker.wake();
        Ok(())
    }
}

impl Inbox {
    /// The next message if one is there.
    pub(crate) fn try_recv(&self) -> Option<ShardMsg> {
        self.rx.try_recv().ok()
    }

    /// Waits for the next message; `None` once every mailbox is gone.
    ///
    /// # Cancel safety
    /// Cancel-safe: a message is only taken out of the channel when it is returned.
    pub(crate) async fn recv(&self) -> Option<ShardMsg> {
        poll_fn(|cx| {
            // Register before looking, so a send between the look and the return still wakes us.
            self.waker.register(cx.waker());
            match self.rx.try_recv() {
                Ok(msg) => Poll::Ready(Some(msg)),
                Err(TryRecvError::Disconnected) => Poll::Ready(None),
                Err(TryRecvError::Empty) => Poll::Pending,
            }
        })
        .await
    }
}

/// The shards' inboxes, shared by the hub and a backend's own thread.
#[derive(Debug)]
pub(crate) struct Fanout {
    pub(crate) mailboxes: Vec<Mailbox>,
    /// Deliveries sent to each shard's inbox and not yet taken out.
    pub(crate) pending: Box<[AtomicUsize]>,
}

impl Fanout {
    /// Sends one sequenced message to a shard's inbox, counted as pending there.
    pub(crate) fn hand_off(&self, shard: usize, msg: &Arc<Published>) {
        self.pending[shard].fetch_add(1, Relaxed);
        if self.mailboxes[shard]
            .send(ShardMsg::Deliver(msg.clone()))
            .is_err()
        {
            self.pending[shard].fetch_sub(1, Relaxed);
        }
    }

    /// Sends a message that is not a delivery (a reply, an attach) to a shard.
    #[cfg_attr(
        not(feature = "redis"),
        allow(dead_code, reason = "only Redis sends these")
    )]
    pub(crate) fn send(&self, shard: usize, msg: ShardMsg) {
        let _ = self.mailboxes[shard].send(msg);
    }
}
