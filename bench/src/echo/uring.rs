//! The io_uring driver: monoio, one task per connection, on this thread.
//!
//! The ring is set up with `COOP_TASKRUN` and `TASKRUN_FLAG` (Linux 5.19+; without them on
//! older kernels): completions are not delivered by interrupting the loop, which saves CPU when
//! every task is busy.

use std::{
    cell::{Cell, RefCell},
    rc::Rc,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use bytes::{Buf as _, BytesMut};
use hdrhistogram::Histogram;
use monoio::{
    buf::IoBufMut as _,
    io::{AsyncReadRent as _, AsyncWriteRentExt as _},
    net::TcpStream,
    IoUringDriver, RuntimeBuilder,
};
use ringcast_protocol::{
    ClientHandshake, CloseCode, CloseFrame, Codec, Event, HeadReader, Limits, OpCode,
};

use super::{EchoConfig, Outcome, CLOSE_GRACE};
use crate::{
    net::{self, Target},
    progress::Progress,
    stats::latency_histogram,
    timeline::{self, Timeline},
    window::{record, WindowStart},
};

/// The largest upgrade response head accepted, in bytes.
const MAX_RESPONSE_HEAD_BYTES: usize = 16 << 10;

/// Space a receive buffer grows by when it runs low, in bytes.
const READ_CHUNK_BYTES: usize = 16 << 10;

/// The least free space offered to a receive, in bytes; below it the buffer grows (or, once
/// the consumed front is released, moves its few unread bytes back to the start).
const MIN_FREE_BYTES: usize = 4 << 10;

pub(super) fn run(cfg: &EchoConfig) -> Result<Outcome> {
    // Room for one send and one receive per connection, plus the timer.
    let entries = u32::try_from(cfg.conns.saturating_mul(2).clamp(256, 32_768))
        .expect("clamped to at most 32768");
    let mut urb = io_uring::IoUring::builder();
    urb.setup_coop_taskrun().setup_taskrun_flag();
    let mut rt = match RuntimeBuilder::<IoUringDriver>::new()
        .uring_builder(urb)
        .enable_timer()
        .with_entries(entries)
        .build()
    {
        Ok(rt) => rt,
        // An older kernel refuses the flags: run without them.
        Err(_) => RuntimeBuilder::<IoUringDriver>::new()
            .enable_timer()
            .with_entries(entries)
            .build()
            .context("starting the io_uring runtime")?,
    };
    rt.block_on(drive(cfg.clone()))
}

/// Where all connections are in the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Load runs, nothing is recorded.
    Warmup,
    /// Load runs and round trips are recorded.
    Measure,
    /// Each connection closes after its current round trip.
    Stop,
}

/// State the connection tasks share with the driver (one thread, so `Cell`s).
#[derive(Debug)]
struct Shared {
    phase: Cell<Phase>,
    ready: Cell<usize>,
    failed_setup: Cell<usize>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
    histogram: RefCell<Histogram<u64>>,
    /// Round trips per interval of the window; set as the window opens.
    series: RefCell<Option<Timeline>>,
    max_message_bytes: usize,
}

impl Shared {
    fn note_error(&self, err: &anyhow::Error, was_ready: bool) {
        if was_ready {
            self.errors.set(self.errors.get() + 1);
        } else {
            self.failed_setup.set(self.failed_setup.get() + 1);
        }
        self.first_error
            .borrow_mut()
            .get_or_insert_with(|| format!("{err:#}"));
    }

    /// Records a round trip whose message was sent at `start`.
    fn record(&self, start: Instant) {
        if self.phase.get() == Phase::Measure {
            let now = Instant::now();
            record(&mut self.histogram.borrow_mut(), now - start);
            if let Some(series) = &mut *self.series.borrow_mut() {
                series.add(now, 1);
            }
        }
    }
}

async fn drive(cfg: EchoConfig) -> Result<Outcome> {
    let shared = Rc::new(Shared {
        phase: Cell::new(Phase::Warmup),
        ready: Cell::new(0),
        failed_setup: Cell::new(0),
        errors: Cell::new(0),
        first_error: RefCell::new(None),
        histogram: RefCell::new(latency_histogram()),
        series: RefCell::new(None),
        max_message_bytes: cfg.max_message_bytes(),
    });
    let payload: Rc<[u8]> = cfg.payload().into();
    let target = Rc::new(cfg.target.clone());

    // Connect synchronously: on loopback a connect completes in the kernel, without waiting
    // for the server to accept. Tasks start their handshakes once this returns.
    let mut handles = Vec::with_capacity(cfg.conns);
    for i in 0..cfg.conns {
        let source = cfg.sources.for_index(i)?;
        let std = net::connect_from(source, cfg.target.addr, cfg.connect_timeout)
            .with_context(|| format!("connection {i} from {source} to {}", cfg.target.addr))?;
        std.set_nonblocking(true)?;
        let stream = TcpStream::from_std(std)?;
        let task = ConnTask {
            shared: Rc::clone(&shared),
            target: Rc::clone(&target),
            payload: Rc::clone(&payload),
        };
        handles.push(monoio::spawn(task.run(stream, cfg.raw)));
    }

    let handshake_deadline = Instant::now() + cfg.connect_timeout;
    loop {
        if shared.failed_setup.get() > 0 {
            bail!(
                "{} of {} connections failed their handshake; first: {}",
                shared.failed_setup.get(),
                cfg.conns,
                shared.first_error.borrow().as_deref().unwrap_or("?")
            );
        }
        if shared.ready.get() == cfg.conns {
            break;
        }
        if Instant::now() > handshake_deadline {
            bail!(
                "only {} of {} handshakes finished within {:?}",
                shared.ready.get(),
                cfg.conns,
                cfg.connect_timeout
            );
        }
        monoio::time::sleep(Duration::from_millis(5)).await;
    }

    let mut progress = Progress::for_duration(cfg.progress, "echo", cfg.warmup + cfg.duration);
    let born = Instant::now();
    sleep_with_progress(&mut progress, born, born + cfg.warmup, &shared).await;
    let start = WindowStart::now(cfg.server_pid)?;
    let errors_start = shared.errors.get();
    shared.series.replace(Some(Timeline::new(
        start.at,
        timeline::INTERVAL,
        cfg.duration,
    )));
    shared.phase.set(Phase::Measure);
    sleep_with_progress(&mut progress, born, start.at + cfg.duration, &shared).await;
    shared.phase.set(Phase::Stop);
    let window = start.end(cfg.server_pid)?;
    let errors = shared.errors.get() - errors_start;
    progress.finish();

    let close_deadline = Instant::now() + CLOSE_GRACE;
    for handle in handles {
        let left = close_deadline.saturating_duration_since(Instant::now());
        // A task that does not finish in time is dropped with the runtime.
        let _ = monoio::time::timeout(left, handle).await;
    }

    let histogram = shared.histogram.replace(latency_histogram());
    let first_error = shared.first_error.borrow().clone();
    let throughput = shared
        .series
        .take()
        .map_or_else(Vec::new, |s| s.into_counts(window.length));
    Ok(Outcome {
        histogram,
        window,
        errors,
        first_error: if errors > 0 { first_error } else { None },
        throughput,
        sent_in_window: None,
        unanswered: 0,
        send_lag: None,
    })
}

/// Sleeps until `until`, waking every [`crate::progress::REDRAW`] to move the bar.
async fn sleep_with_progress(
    progress: &mut Progress,
    born: Instant,
    until: Instant,
    shared: &Shared,
) {
    loop {
        let now = Instant::now();
        if now >= until {
            return;
        }
        progress.update_time(now, now - born, || {
            format!("{} round trips measured", shared.histogram.borrow().len())
        });
        let step = until - now;
        if progress.due(now + crate::progress::REDRAW) {
            monoio::time::sleep(step.min(crate::progress::REDRAW)).await;
        } else {
            monoio::time::sleep(step).await;
        }
    }
}

/// One connection's loop and what it shares.
struct ConnTask {
    shared: Rc<Shared>,
    target: Rc<Target>,
    payload: Rc<[u8]>,
}

impl ConnTask {
    async fn run(self, stream: TcpStream, raw: bool) {
        let mut ready = false;
        let result = if raw {
            self.raw_loop(stream, &mut ready).await
        } else {
            self.ws_loop(stream, &mut ready).await
        };
        if let Err(err) = result {
            self.shared.note_error(&err, ready);
        }
    }

    /// Marks this connection ready, so the driver can start the clock.
    fn set_ready(&self, ready: &mut bool) {
        *ready = true;
        self.shared.ready.set(self.shared.ready.get() + 1);
    }

    async fn ws_loop(&self, mut stream: TcpStream, ready: &mut bool) -> Result<()> {
        let handshake = ClientHandshake::new(fastrand::u128(..).to_ne_bytes(), &[]);
        let request = handshake.request(&self.target.host, &self.target.path, &[]);
        let (res, _) = stream.write_all(request).await;
        res.context("sending the upgrade request")?;

        let mut rbuf = BytesMut::with_capacity(READ_CHUNK_BYTES.max(self.payload.len() + 16));
        let mut head = HeadReader::new();
        let head_len = loop {
            if let Some(len) = head.poll_head(&rbuf, MAX_RESPONSE_HEAD_BYTES)? {
                break len;
            }
            rbuf = read_more(&mut stream, rbuf).await?;
        };
        handshake.check_response(&rbuf[..head_len])?;
        rbuf.advance(head_len);
        self.set_ready(ready);

        let max = self.shared.max_message_bytes;
        let limits = Limits::default()
            .with_max_frame_bytes(max)
            .with_max_message_bytes(max);
        let mut codec = Codec::client(limits, fastrand::u64(..));
        let mut wbuf = BytesMut::with_capacity(self.payload.len() + 16);
        while self.shared.phase.get() != Phase::Stop {
            wbuf.clear();
            codec.encode_frame(true, OpCode::Binary, &self.payload, &mut wbuf);
            let start = Instant::now();
            let (res, buf) = stream.write_all(wbuf).await;
            wbuf = buf;
            res.context("sending a message")?;
            loop {
                match codec.poll_event(&mut rbuf)? {
                    Some(Event::Binary(echo)) => {
                        ensure!(
                            echo[..] == self.payload[..],
                            "the echo differs from the message sent ({} bytes back)",
                            echo.len()
                        );
                        break;
                    }
                    Some(Event::Close(frame)) => bail!("the server closed: {frame:?}"),
                    // A ping: its pong is queued and flushed below. Pongs and text are ignored.
                    Some(_) => {}
                    None => rbuf = read_more(&mut stream, rbuf).await?,
                }
                flush_owed(&mut stream, &mut codec).await?;
            }
            self.shared.record(start);
        }

        // RFC 6455 §7: send a close, then read until the server's close and its TCP close.
        codec.close(Some(CloseFrame::new(CloseCode::NORMAL, "")));
        flush_owed(&mut stream, &mut codec).await?;
        loop {
            match codec.poll_event(&mut rbuf) {
                Ok(Some(Event::Close(_))) | Err(_) => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => match read_more(&mut stream, rbuf).await {
                    Ok(buf) => rbuf = buf,
                    Err(_) => return Ok(()),
                },
            }
        }
    }

    async fn raw_loop(&self, mut stream: TcpStream, ready: &mut bool) -> Result<()> {
        self.set_ready(ready);
        let size = self.payload.len();
        let mut wbuf = self.payload.to_vec();
        let mut rbuf = Vec::with_capacity(size.max(READ_CHUNK_BYTES));
        while self.shared.phase.get() != Phase::Stop {
            let start = Instant::now();
            let (res, buf) = stream.write_all(wbuf).await;
            wbuf = buf;
            res.context("sending a message")?;
            let mut got = 0;
            while got < size {
                let (res, buf) = stream.read(rbuf).await;
                rbuf = buf;
                match res.context("receiving the echo")? {
                    0 => bail!("the server closed the connection"),
                    n => got += n,
                }
            }
            ensure!(got == size, "{got} bytes came back for {size} sent");
            self.shared.record(start);
        }
        Ok(())
    }
}

/// Receives into the free space at the end of `buf`, growing it first if it has little.
async fn read_more(stream: &mut TcpStream, mut buf: BytesMut) -> Result<BytesMut> {
    if buf.capacity() - buf.len() < MIN_FREE_BYTES {
        buf.reserve(READ_CHUNK_BYTES);
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let (res, slice) = stream.read(buf.slice_mut(len..cap)).await;
    match res.context("receiving")? {
        0 => bail!("the server closed the connection"),
        _ => Ok(slice.into_inner()),
    }
}

/// Sends the frames the protocol obliges (pongs, close).
async fn flush_owed(stream: &mut TcpStream, codec: &mut Codec) -> Result<()> {
    while let Some(frame) = codec.poll_transmit() {
        let (res, _) = stream.write_all(frame).await;
        res.context("sending a control frame")?;
    }
    Ok(())
}
