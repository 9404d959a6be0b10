//! What ringcast-client costs a subscriber, against the wire's ceiling in the same run.
//!
//! Two subscribers on one topic of a running server get the same stream: one is a
//! `ringcast_client::Client` (resume bookkeeping, channels, events), the other a bare loop
//! over `ringcast-protocol`'s codec and envelope decoder on a tokio socket (what any client
//! must do at least). A third connection, also a `Client`, first publishes `COUNT` messages of
//! `BYTES` bytes (up to 1024 awaiting their acks) while neither subscriber reads, so the server
//! holds the stream for both; then the bare loop drains it alone, then the client does. The
//! ratio is the client's drain rate over the bare loop's. The publisher's ack rate is printed
//! too.
//!
//! ```sh
//! cargo build --release -p ringcast-cli
//! target/release/ringcast serve --shards 1 --set pubsub.publish_rate_per_sec=1000000 \
//!     --set pubsub.publish_burst=1000000 --set pubsub.ring_overflow='"disconnect"' \
//!     --set pubsub.ring_max_messages=300000 --set pubsub.ring_max_bytes=268435456
//! cargo run --release -p ringcast-client --example throughput -- ws://127.0.0.1:9000/ 200000 64
//! ```
//!
//! The ring holds the whole stream for each subscriber; with `disconnect` as its policy an
//! overflow closes the subscriber instead of losing messages, so a run that completes
//! counts every message at both.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use ringcast_client::{Client, Config, Data, Event};
use ringcast_protocol::{
    envelope::{self, Dialect, Request, ServerMessage, SubscribeTopic},
    ClientHandshake, Codec, Event as WsEvent, HeadReader, Limits,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "ws://127.0.0.1:9000/".into());
    let count: u64 = args.next().map_or(Ok(200_000), |s| s.parse())?;
    let bytes: usize = args.next().map_or(Ok(64), |s| s.parse())?;
    let topic = format!("throughput.{}", std::process::id());

    let client = Client::connect(Config::new(url.clone()))?;
    let mut sub = client.subscribe(&topic).await?;
    let bare = bare_subscriber(&url, &topic).await?;

    // Publish everything first, while neither subscriber reads: the server holds the stream
    // for both (its ring must be large enough; with `disconnect` an overflow fails the run).
    let publisher = Client::connect(Config::new(url))?;
    // Connected first: while connecting, publishes past the queue bound (1024) would fail.
    publisher.connected().await?;
    let payload = Data::json(format!("\"{}\"", "x".repeat(bytes.saturating_sub(2))));
    let start = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<
        tokio::task::JoinHandle<
            std::result::Result<ringcast_client::Published, ringcast_client::Error>,
        >,
    >(1024);
    let acks = tokio::spawn(async move {
        while let Some(handle) = rx.recv().await {
            handle.await?.map_err(|e| format!("publish: {e}"))?;
        }
        Result::Ok(start.elapsed())
    });
    for _ in 0..count {
        let (p, t, d) = (publisher.clone(), topic.clone(), payload.clone());
        if tx
            .send(tokio::spawn(async move { p.publish(&t, d).await }))
            .await
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let published = acks.await??;

    // Then each drains the same stream alone, one after the other.
    let bare_time = bare_count(bare, count).await?;
    let drain = Instant::now();
    let mut got = 0u64;
    while got < count {
        match sub.next().await {
            Some(Event::Message { .. }) => got += 1,
            other => return Err(format!("client subscriber after {got}: {other:?}").into()),
        }
    }
    let client_time = drain.elapsed();
    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    println!(
        "{count} messages of {bytes} B: publish+ack {:.0}/s; draining alone: \
         ringcast-client {:.0}/s, bare codec loop {:.0}/s, ratio {:.2}",
        rate(published),
        rate(client_time),
        rate(bare_time),
        rate(client_time) / rate(bare_time),
    );
    Ok(())
}

/// A subscriber with nothing but the protocol crate: upgrade, one subscribe, then frames.
async fn bare_subscriber(url: &str, topic: &str) -> Result<(TcpStream, Codec, BytesMut)> {
    let rest = url.strip_prefix("ws://").ok_or("ws:// only")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = TcpStream::connect(authority).await?;
    let handshake = ClientHandshake::new(fastrand_nonce(), &[envelope::JSON_SUBPROTOCOL]);
    stream
        .write_all(&handshake.request(authority, &format!("/{path}"), &[]))
        .await?;
    let mut buf = BytesMut::with_capacity(1 << 16);
    let mut reader = HeadReader::new();
    let len = loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err("closed during the upgrade".into());
        }
        if let Some(len) = reader.poll_head(&buf, 16384)? {
            break len;
        }
    };
    handshake.check_response(&buf.split_to(len))?;
    let mut codec = Codec::client(Limits::default(), 7);
    let req = Request::Subscribe {
        id: Some(1),
        topics: vec![SubscribeTopic {
            topic: topic.into(),
            since: None,
            epoch: None,
        }],
    };
    let mut out = BytesMut::new();
    let payload = envelope::encode_request(envelope::Encoding::Json, &req);
    codec.encode_frame(true, envelope::Encoding::Json.opcode(), &payload, &mut out);
    stream.write_all(&out).await?;
    // Wait for the ack, so the stream starts with the first publish.
    loop {
        while let Some(event) = codec.poll_event(&mut buf)? {
            if let WsEvent::Text(text) = event {
                if let ServerMessage::Ack { .. } =
                    envelope::decode_server(Dialect::Json, text.as_bytes())?
                {
                    return Ok((stream, codec, buf));
                }
            }
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err("closed before the ack".into());
        }
    }
}

async fn bare_count(
    (mut stream, mut codec, mut buf): (TcpStream, Codec, BytesMut),
    count: u64,
) -> Result<Duration> {
    let start = Instant::now();
    let mut got = 0u64;
    loop {
        while let Some(event) = codec.poll_event(&mut buf)? {
            if let WsEvent::Text(text) = event {
                if let ServerMessage::Message { .. } =
                    envelope::decode_server(Dialect::Json, text.as_bytes())?
                {
                    got += 1;
                    if got == count {
                        return Ok(start.elapsed());
                    }
                }
            }
        }
        while let Some(frame) = codec.poll_transmit() {
            stream.write_all(&frame).await?;
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(1 << 16);
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(format!("bare subscriber closed after {got}").into());
        }
    }
}

fn fastrand_nonce() -> [u8; 16] {
    let mut nonce = [0u8; 16];
    fastrand::fill(&mut nonce);
    nonce
}
