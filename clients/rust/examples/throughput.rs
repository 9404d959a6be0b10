//! What ringcast-client costs a subscriber, against the wire's ceiling in the same run.
//!
//! Two subscribers on one topic of a running server receive the same stream: one is a
//! `ringcast_client::Client` (resume bookkeeping, channels, events), the other a bare loop
//! over `ringcast-protocol`'s codec and envelope decoder on a tokio socket (what any client
//! must do at least). A third connection, also a `Client`, publishes `COUNT` messages of
//! `BYTES` bytes as fast as the server acks them (up to 1024 in flight). Each subscriber is
//! timed from its first message to its last; the ratio is the client's rate over the bare
//! loop's. The publisher's ack rate is printed too.
//!
//! ```sh
//! cargo build --release -p ringcast-cli
//! target/release/ringcast serve --shards 1 --set pubsub.publish_rate_per_sec=1000000 \
//!     --set pubsub.publish_burst=1000000 --set pubsub.ring_overflow='"disconnect"'
//! cargo run --release -p ringcast-client --example throughput -- ws://127.0.0.1:9000/ 200000 64
//! ```
//!
//! With `disconnect` as the ring policy a subscriber that falls behind is closed instead of
//! losing messages, so a run that completes counts every message at both subscribers.

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
    let bare = tokio::spawn(bare_count(bare, count));
    let timed = tokio::spawn(async move {
        let mut first = None;
        let mut got = 0u64;
        while let Some(event) = sub.next().await {
            match event {
                Event::Message { .. } => {
                    first.get_or_insert_with(Instant::now);
                    got += 1;
                    if got == count {
                        break;
                    }
                }
                other => return Err(format!("client subscriber: {other:?}")),
            }
        }
        Ok(first.map(|f| f.elapsed()).unwrap_or_default())
    });

    let publisher = Client::connect(Config::new(url))?;
    let payload = Data::json(format!("\"{}\"", "x".repeat(bytes.saturating_sub(2))));
    let start = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let acks = tokio::spawn(async move {
        while let Some(handle) = rx.recv().await {
            let handle: tokio::task::JoinHandle<_> = handle;
            handle.await??;
        }
        Result::Ok(start.elapsed())
    });
    for _ in 0..count {
        let (p, t, d) = (publisher.clone(), topic.clone(), payload.clone());
        tx.send(tokio::spawn(async move { p.publish(&t, d).await }))
            .await?;
    }
    drop(tx);
    let published = acks.await??;
    let client_time = timed.await?.map_err(|e| e.to_string())?;
    let bare_time = bare.await??;
    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    println!(
        "{count} messages of {bytes} B: publish+ack {:.0}/s; subscriber rate: \
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
    let mut first = None;
    let mut got = 0u64;
    loop {
        while let Some(event) = codec.poll_event(&mut buf)? {
            if let WsEvent::Text(text) = event {
                if let ServerMessage::Message { .. } =
                    envelope::decode_server(Dialect::Json, text.as_bytes())?
                {
                    first.get_or_insert_with(Instant::now);
                    got += 1;
                    if got == count {
                        return Ok(first.map(|f| f.elapsed()).unwrap_or_default());
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
