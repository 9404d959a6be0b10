//! Abusive and broken clients get a clear answer (HTTP status or close code) while a
//! well-behaved client on the same shard keeps working. One shard, so they all share it.

mod util;

use std::io::Write;

use ringcast::{Ctx, Engine, Handler, Message, OverflowPolicy};
use tungstenite::Message as WsMessage;
use util::*;

fn status_of(response: &[u8]) -> String {
    let text = String::from_utf8_lossy(response);
    text.lines().next().unwrap_or_default().to_owned()
}

/// Sends `request` on a raw socket and returns the whole response (the server closes).
fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = raw(addr);
    stream.write_all(request).unwrap();
    String::from_utf8_lossy(&read_to_close(&mut stream)).into_owned()
}

fn assert_alive(good: &mut Client, round: &str) {
    good.send(WsMessage::text(round)).unwrap();
    assert_eq!(
        good.read().unwrap(),
        WsMessage::text(round),
        "after {round}"
    );
}

#[test]
fn bad_upgrades_get_their_http_status_while_a_good_client_keeps_working() {
    let mut config = config(1);
    config.limits.max_header_bytes = 1024;
    let (engine, _recorder) = start_recorder(config);
    let addr = engine.local_addr();
    let mut good = connect(addr, "/");

    let garbage = exchange(
        addr,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    );
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    assert_alive(&mut good, "after garbage");

    let plain = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        plain.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
        "{plain}"
    );
    assert!(plain.contains("Upgrade: websocket\r\n"), "{plain}");
    assert_alive(&mut good, "after plain http");

    let old = upgrade_request("/").replace("Version: 13", "Version: 8");
    let old = exchange(addr, old.as_bytes());
    assert!(old.starts_with("HTTP/1.1 426 "), "{old}");
    assert!(old.contains("Sec-WebSocket-Version: 13\r\n"), "{old}");
    assert_alive(&mut good, "after version 8");

    let post = upgrade_request("/").replace("GET", "POST");
    let post = exchange(addr, post.as_bytes());
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    assert!(post.contains("Allow: GET\r\n"), "{post}");

    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(2000)
    );
    let huge = exchange(addr, huge.as_bytes());
    assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");
    assert_alive(&mut good, "after 431");

    // Half a handshake, then silence: 408 once the handshake timeout (500 ms) passes.
    let mut half = raw(addr);
    half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpg").unwrap();
    assert_alive(&mut good, "while a half handshake waits");
    let timed_out = String::from_utf8_lossy(&read_to_close(&mut half)).into_owned();
    assert_eq!(
        status_of(timed_out.as_bytes()),
        "HTTP/1.1 408 Request Timeout"
    );
    assert_alive(&mut good, "after 408");

    let metrics = engine.handle().metrics().total();
    assert_eq!(metrics.upgrades_rejected, 6);
    assert_eq!(metrics.handshake_timeouts, 1);
    engine.stop().unwrap();
}

#[test]
fn frame_abuse_is_closed_with_a_code_while_a_good_client_keeps_working() {
    let mut config = config(1);
    config.limits.max_frame_bytes = 64 << 10;
    let (engine, _recorder) = start_recorder(config);
    let addr = engine.local_addr();
    let mut good = connect(addr, "/");

    let mut unmasked = RawClient::connect(addr);
    unmasked.send_raw(&[0x82, 0x03, 1, 2, 3]);
    assert_eq!(unmasked.expect_close().0, 1002);
    assert_alive(&mut good, "after unmasked");

    // Announces 1 GiB: refused on the header, before any payload is buffered.
    let mut oversized = RawClient::connect(addr);
    let mut header = vec![0x82, 0xFF];
    header.extend_from_slice(&(1u64 << 30).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    oversized.send_raw(&header);
    assert_eq!(oversized.expect_close().0, 1009);
    assert_alive(&mut good, "after oversized");

    // Random bytes after a good upgrade.
    let mut noisy = RawClient::connect(addr);
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    noisy.send_raw(&noise);
    let (code, _) = noisy.expect_close();
    assert!([1002, 1007, 1009].contains(&code), "code {code}");
    assert_alive(&mut good, "after noise");
    engine.stop().unwrap();
}

#[test]
fn a_client_that_sends_without_reading_is_paused_not_buffered_and_others_go_on() {
    let mut config = config(1);
    config.limits.max_outbound_bytes = 256 << 10;
    let (engine, _recorder) = start_recorder(config);
    let addr = engine.local_addr();
    let mut good = connect(addr, "/");
    let mut hog = RawClient::connect(addr);
    hog.stream.set_nonblocking(true).unwrap();
    // Echo traffic the hog never reads: 64 KiB frames until the kernel buffers are full and
    // the server has stopped reading it (bounded at 256 MiB so the loop ends regardless).
    let frame = client_frame(0x2, true, &vec![7u8; 64 << 10]);
    let mut sent = 0usize;
    let mut blocked_rounds = 0;
    while sent < 256 << 20 && blocked_rounds < 200 {
        // Resume mid-frame after a short write, so the stream stays well-formed.
        match hog.stream.write(&frame[sent % frame.len()..]) {
            Ok(n) => {
                sent += n;
                blocked_rounds = 0;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                blocked_rounds += 1;
                // The good client is served while the hog is stuck.
                assert_alive(&mut good, "while the hog is blocked");
            }
            Err(e) => panic!("hog write failed: {e}"),
        }
    }
    assert!(
        blocked_rounds >= 200,
        "the server kept reading the hog: {sent} bytes"
    );
    assert!(
        sent < 64 << 20,
        "server buffered {sent} bytes for a client that does not read"
    );
    // The hog was paused, not disconnected.
    assert_eq!(engine.handle().metrics().total().slow_consumer_closes, 0);
    assert_eq!(engine.handle().metrics().total().connections_active, 2);
    engine.stop().unwrap();
}

/// "sink" makes this connection the sink; "flood N" (from any other connection) sends N
/// 64 KiB frames to the sink at once and answers with how many were dropped.
#[derive(Default)]
struct Flooder {
    sink: Option<ringcast::ConnId>,
}

impl Handler for Flooder {
    fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
        let text = String::from_utf8_lossy(msg.payload()).into_owned();
        if text == "sink" {
            self.sink = Some(ctx.id());
            let status = ctx.send_text("ok");
            queued(ctx, status);
        } else if let Some(n) = text.strip_prefix("flood ") {
            let sink = self.sink.expect("a sink first");
            let frame = ringcast::Frame::binary(&vec![1u8; 64 << 10]);
            let mut dropped = 0;
            for _ in 0..n.parse::<usize>().unwrap() {
                match ctx.send_frame_to(sink, &frame) {
                    ringcast::Enqueue::Dropped => dropped += 1,
                    ringcast::Enqueue::Queued => {}
                    other => {
                        let status = ctx.send_text(format!("{other:?}"));
                        queued(ctx, status);
                        return;
                    }
                }
            }
            let status = ctx.send_text(format!("dropped {dropped}"));
            queued(ctx, status);
        }
    }
}

/// A sink that is not reading and a sender to flood it; both on one shard.
fn sink_and_sender(policy: OverflowPolicy) -> (Engine, RawClient, Client) {
    let mut config = config(1);
    config.limits.max_outbound_bytes = 256 << 10;
    config.limits.outbound_overflow = policy;
    let engine = Engine::start(config, |_| Flooder::default()).unwrap();
    let mut sink = RawClient::connect(engine.local_addr());
    sink.send_raw(&client_frame(0x1, true, b"sink"));
    assert!(matches!(
        sink.next_event(),
        Some(ringcast::protocol::Event::Text(_))
    ));
    let sender = connect(engine.local_addr(), "/");
    (engine, sink, sender)
}

#[test]
fn overflow_disconnects_a_slow_consumer_with_1008() {
    let (engine, mut sink, mut sender) = sink_and_sender(OverflowPolicy::Disconnect);
    sender.send(WsMessage::text("flood 16")).unwrap();
    assert_eq!(sender.read().unwrap(), WsMessage::text("Disconnect"));
    // Frames not yet started were discarded; the close frame follows what was in flight.
    let (code, reason) = sink.expect_close();
    assert_eq!((code, reason.as_str()), (1008, "slow consumer"));
    assert_eq!(engine.handle().metrics().total().slow_consumer_closes, 1);
    sender.send(WsMessage::text("flood 0")).unwrap();
    assert_eq!(
        sender.read().unwrap(),
        WsMessage::text("dropped 0"),
        "the sender goes on"
    );
    engine.stop().unwrap();
}

#[test]
fn overflow_with_drop_policy_drops_and_keeps_the_connection() {
    let (engine, mut sink, mut sender) = sink_and_sender(OverflowPolicy::DropNewest);
    sender.send(WsMessage::text("flood 16")).unwrap();
    // 256 KiB hold three 64 KiB frames with their headers (the first always fits); 13 drop.
    assert_eq!(sender.read().unwrap(), WsMessage::text("dropped 13"));
    for _ in 0..3 {
        match sink.next_event() {
            Some(ringcast::protocol::Event::Binary(b)) => assert_eq!(b.len(), 64 << 10),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(engine.handle().metrics().total().outbound_dropped, 13);
    // Drained, the sink takes new traffic again.
    sender.send(WsMessage::text("flood 1")).unwrap();
    assert_eq!(sender.read().unwrap(), WsMessage::text("dropped 0"));
    assert!(matches!(
        sink.next_event(),
        Some(ringcast::protocol::Event::Binary(_))
    ));
    // Nothing else was queued for the sink: the 13 drops were dropped, not delivered late.
    // The server answers a close after whatever it still had queued, so the next frame the
    // sink reads must be the close echo itself.
    sink.send_frame(0x8, true, &1000u16.to_be_bytes());
    match sink.next_event() {
        Some(ringcast::protocol::Event::Close(Some(frame))) => {
            assert_eq!(frame.code.as_u16(), 1000)
        }
        other => panic!("expected the close echo and nothing before it, got {other:?}"),
    }
    engine.stop().unwrap();
}
