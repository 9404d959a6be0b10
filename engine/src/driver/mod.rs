//! Socket IO: the io_uring socket ring (`uring`), the io_uring driver that runs every socket
//! of a shard through it (`uring_driver`), the epoll driver (`poll_driver`, with the `epoll`
//! feature) and listening (`listener`). Drivers know sockets and buffers, not topics: they
//! call the shard's methods (`shard::process`) with the bytes they read and write what the
//! connection queued. All of the engine's io_uring `unsafe` lives here.

pub(crate) mod listener;
#[cfg(feature = "epoll")]
pub(crate) mod poll_driver;
pub(crate) mod uring;
pub(crate) mod uring_driver;
