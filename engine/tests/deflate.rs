//! permessage-deflate through the engine: negotiation per mode, compressed echo both ways,
//! context takeover across many messages, and attacks (a decompression bomb, RSV1 where it
//! may not be, a compressed message without the extension), each answered with its close
//! code while a live client on the same shard keeps being served.

mod util;

use ringcast::protocol::{deflate::DeflateConfig, OpCode};
use ringcast::{CompressionMode, Engine, EngineConfig, ShardId};
use util::*;

fn start(mode: CompressionMode, tweak: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut config = config(1);
    config.compression.mode = mode;
    tweak(&mut config);
    Engine::start(config, |_: ShardId| Echo).expect("start engine")
}

fn json(n: usize) -> String {
    let mut s = format!("{{\"topic\":\"prices.eurusd\",\"seq\":{n},\"data\":[");
    let mut i = 0;
    while s.len() < 1000 {
        s += &format!(
            "{{\"bid\":1.{:04},\"ask\":1.{:04}}},",
            (n * 7 + i) % 10000,
            (n * 13 + i) % 10000
        );
        i += 1;
    }
    s.pop();
    s + "]}"
}

fn assert_echoes(client: &mut RawClient, text: &str) {
    client.send_message(OpCode::Text, text.as_bytes());
    assert_eq!(
        client.next_data().expect("echo"),
        text.as_bytes(),
        "echo of {} bytes",
        text.len()
    );
}

#[test]
fn shared_mode_agrees_and_echoes_compressed_json() {
    let engine = start(CompressionMode::Shared, |_| {});
    let (mut client, params) = RawClient::connect_deflate(
        engine.local_addr(),
        DeflateConfig::default().with_server_no_context_takeover(false),
    );
    let params = params.expect("the server agreed to permessage-deflate");
    assert!(params.server_no_context_takeover, "shared mode answers it");
    assert!(params.client_no_context_takeover, "shared mode asks it");
    for n in 0..20 {
        assert_echoes(&mut client, &json(n));
    }
    // Under the threshold (256 bytes by default): echoed uncompressed.
    assert_echoes(&mut client, "small");
    let m = engine.handle().metrics().total();
    assert_eq!(
        m.deflate_messages, 20,
        "the 20 JSON echoes were compressed, not the small one"
    );
    assert!(
        m.deflate_bytes_out * 2 < m.deflate_bytes_in,
        "JSON compresses to under half: {} -> {}",
        m.deflate_bytes_in,
        m.deflate_bytes_out
    );
}

#[test]
fn dedicated_mode_keeps_context_across_a_thousand_messages_at_every_window() {
    for bits in 9..=15u8 {
        let engine = start(CompressionMode::Dedicated, |c| {
            c.compression.window_bits = bits;
            c.compression.threshold_bytes = 0;
        });
        let offer = DeflateConfig::default()
            .with_server_no_context_takeover(false)
            .with_client_max_window_bits(bits)
            .with_threshold(0);
        let (mut client, params) = RawClient::connect_deflate(engine.local_addr(), offer);
        let params = params.expect("agreed");
        assert!(!params.server_no_context_takeover);
        assert_eq!(params.server_max_window_bits, bits);
        let count = if bits == 15 { 1000 } else { 100 };
        for n in 0..count {
            assert_echoes(&mut client, &json(n));
        }
        let m = engine.handle().metrics().total();
        assert_eq!(m.deflate_messages, count as u64, "window {bits}");
    }
}

#[test]
fn off_declines_and_a_compressed_message_then_fails_with_1002() {
    let engine = start(CompressionMode::Off, |_| {});
    let addr = engine.local_addr();
    let mut good = RawClient::connect(addr);
    let (mut bad, params) = RawClient::connect_deflate(addr, DeflateConfig::default());
    assert_eq!(params, None, "off: the 101 names no extension");
    // RSV1 on a text frame of a connection that did not agree to the extension.
    let mut frame = client_frame(0x1, true, b"\xf2\x48\xcd\xc9\xc9\x07\x00");
    frame[0] |= 0x40;
    bad.send_raw(&frame);
    let (code, reason) = bad.expect_close();
    assert_eq!(code, 1002, "{reason}");
    good.send_frame(0x1, true, b"still here");
    assert_eq!(good.next_data().unwrap(), b"still here");
}

/// One attack per connection, a live compressed client between each.
#[test]
fn attacks_get_their_close_codes_and_the_shard_keeps_serving() {
    let engine = start(CompressionMode::Shared, |c| {
        c.limits.max_message_bytes = 1 << 20;
    });
    let addr = engine.local_addr();
    let offer = DeflateConfig::default().with_threshold(0);
    let (mut good, _) = RawClient::connect_deflate(addr, offer);
    assert_echoes(&mut good, &json(0));

    type Attack = Box<dyn Fn(&mut RawClient)>;
    let attacks: Vec<(&str, Attack, u16)> = vec![
        (
            "a decompression bomb: 64 MiB of zeros in a few KiB, the limit 1 MiB",
            Box::new(|c: &mut RawClient| {
                c.send_message(OpCode::Binary, &vec![0u8; 64 << 20]);
            }),
            1009,
        ),
        (
            "RSV1 on a ping",
            Box::new(|c: &mut RawClient| {
                let mut f = client_frame(0x9, true, b"p");
                f[0] |= 0x40;
                c.send_raw(&f);
            }),
            1002,
        ),
        (
            "RSV1 on a continuation",
            Box::new(|c: &mut RawClient| {
                c.send_frame(0x1, false, b"first");
                let mut f = client_frame(0x0, true, b"second");
                f[0] |= 0x40;
                c.send_raw(&f);
            }),
            1002,
        ),
        (
            "deflate data that does not inflate",
            Box::new(|c: &mut RawClient| {
                let mut f = client_frame(0x2, true, &[0xff; 16]);
                f[0] |= 0x40;
                c.send_raw(&f);
            }),
            1007,
        ),
        (
            "text that is not UTF-8 once inflated",
            Box::new(|c: &mut RawClient| {
                // A stored deflate block holding the single byte 0xFF.
                let mut f = client_frame(0x1, true, &[0x00, 0x01, 0x00, 0xfe, 0xff, 0xff]);
                f[0] |= 0x40;
                c.send_raw(&f);
            }),
            1007,
        ),
    ];
    for (what, attack, expected) in attacks {
        let (mut bad, params) = RawClient::connect_deflate(addr, offer);
        assert!(params.is_some(), "{what}: agreed");
        attack(&mut bad);
        let (code, reason) = bad.expect_close();
        assert_eq!(code, expected, "{what}: {reason}");
        assert_echoes(&mut good, &json(1));
    }
    let m = engine.handle().metrics().total();
    assert_eq!(m.protocol_errors, 5);
}

#[test]
fn the_upgrade_hook_can_turn_compression_off_per_connection() {
    use ringcast::protocol::UpgradeRequest;
    use ringcast::{Ctx, Handler, Message, Upgrade, UpgradeCtx};
    struct NoDeflateOnPlain;
    impl Handler for NoDeflateOnPlain {
        fn on_upgrade(&mut self, req: &UpgradeRequest<'_>, _: &UpgradeCtx) -> Upgrade {
            if req.path() == "/" {
                Upgrade::accept().with_compression(CompressionMode::Off)
            } else {
                Upgrade::accept()
            }
        }
        fn on_message(&mut self, ctx: &mut Ctx<'_>, msg: Message) {
            let _ = ctx.send(msg);
        }
    }
    let mut config = config(1);
    config.compression.mode = CompressionMode::Shared;
    let engine = Engine::start(config, |_: ShardId| NoDeflateOnPlain).expect("start");
    let (_, params) = RawClient::connect_deflate(engine.local_addr(), DeflateConfig::default());
    assert_eq!(params, None, "the hook chose off");
}

fn subscriber(addr: std::net::SocketAddr, offer: Option<DeflateConfig>) -> RawClient {
    let mut c = match offer {
        Some(offer) => {
            let (c, params) = RawClient::connect_deflate(addr, offer);
            assert!(params.is_some(), "agreed");
            c
        }
        None => RawClient::connect(addr),
    };
    c.send_message(
        OpCode::Text,
        br#"{"type":"subscribe","id":1,"topic":"prices.eurusd"}"#,
    );
    let ack = c.next_data().expect("ack");
    assert!(
        String::from_utf8_lossy(&ack).contains("\"ack\""),
        "{}",
        String::from_utf8_lossy(&ack)
    );
    c
}

fn publish_json(engine: &Engine, n: usize) -> String {
    let body = json(n);
    engine
        .handle()
        .publisher()
        .publish(
            "prices.eurusd",
            ringcast::Payload::json(body.clone()).unwrap(),
        )
        .expect("publish");
    body
}

#[test]
fn fan_out_compresses_once_for_every_shared_subscriber() {
    let mut config = config(1);
    config.compression.mode = CompressionMode::Shared;
    let engine = Engine::start(config, |_| ringcast::Broker::new()).expect("start");
    let addr = engine.local_addr();
    let mut subs: Vec<RawClient> = (0..5)
        .map(|_| subscriber(addr, Some(DeflateConfig::default())))
        .collect();
    // One without the extension gets the plain frame of the same message.
    subs.push(subscriber(addr, None));
    for n in 0..10 {
        let body = publish_json(&engine, n);
        for s in &mut subs {
            let got = String::from_utf8(s.next_data().expect("message")).unwrap();
            assert!(got.contains(&body), "{got}");
        }
    }
    let m = engine.handle().metrics().total();
    assert_eq!(
        m.deflate_messages, 10,
        "each publish compressed once for the five shared subscribers"
    );
}

#[test]
fn fan_out_in_dedicated_mode_compresses_per_subscriber_with_its_context() {
    let mut config = config(1);
    config.compression.mode = CompressionMode::Dedicated;
    config.compression.window_bits = 10;
    let engine = Engine::start(config, |_| ringcast::Broker::new()).expect("start");
    let addr = engine.local_addr();
    let offer = DeflateConfig::default().with_server_no_context_takeover(false);
    let mut subs: Vec<RawClient> = (0..3).map(|_| subscriber(addr, Some(offer))).collect();
    for n in 0..100 {
        let body = publish_json(&engine, n);
        for s in &mut subs {
            let got = String::from_utf8(s.next_data().expect("message")).unwrap();
            assert!(got.contains(&body), "{got}");
        }
    }
    let m = engine.handle().metrics().total();
    assert_eq!(m.deflate_messages, 300, "once per subscriber per message");
}

/// The directory of the Node `ws` peer, or `None` (skipped loudly; a failure under CI) when
/// node or `npm ci --prefix bench/node` is missing.
fn node_ws() -> Option<String> {
    let install = "apt-get install nodejs npm, then npm ci --prefix bench/node";
    if !require("node", install) {
        return None;
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/node");
    if !std::path::Path::new(dir).join("node_modules/ws").is_dir() {
        assert!(
            !ringcast_testkit::under_ci(),
            "bench/node/node_modules/ws is missing and CI must run this test: {install}"
        );
        eprintln!("SKIPPED: bench/node/node_modules/ws is missing ({install})");
        return None;
    }
    Some(format!("{dir}/deflate.js"))
}

/// Node `ws` as the client: its compressor and decompressor against ours, at several
/// windows, with and without context takeover (1,000 messages with it at window 15).
#[test]
fn node_ws_clients_round_trip_through_ringcast_at_every_window() {
    let Some(script) = node_ws() else {
        return;
    };
    let cases = [
        (CompressionMode::Dedicated, 15, false, 1000),
        (CompressionMode::Dedicated, 12, false, 200),
        (CompressionMode::Dedicated, 9, false, 200),
        (CompressionMode::Shared, 15, true, 200),
        (CompressionMode::Shared, 10, true, 200),
    ];
    for (mode, bits, no_context, count) in cases {
        let engine = start(mode, |c| c.compression.threshold_bytes = 0);
        let mut node = process::Spawned::start({
            let mut cmd = std::process::Command::new("node");
            cmd.arg(&script)
                .arg("client")
                .arg(engine.local_addr().port().to_string())
                .arg(count.to_string())
                .arg(bits.to_string())
                .arg(if no_context { "1" } else { "0" });
            cmd
        });
        let status = node.wait_exit(std::time::Duration::from_secs(120));
        let log = node.final_log();
        assert!(status.success(), "{mode:?} bits {bits}: {log}");
        assert!(
            log.contains(&format!("ok {count} permessage-deflate")),
            "{mode:?} bits {bits}: {log}"
        );
        let m = engine.handle().metrics().total();
        assert_eq!(m.deflate_messages, count as u64, "{mode:?} bits {bits}");
    }
}

/// Node `ws` as the server: this crate's client codec against its compressor and
/// decompressor, at every window from 9 to 15, with context takeover.
#[test]
fn ringcast_clients_round_trip_through_a_node_ws_server_at_every_window() {
    let Some(script) = node_ws() else {
        return;
    };
    let port = free_port();
    let mut node = process::Spawned::start({
        let mut cmd = std::process::Command::new("node");
        cmd.arg(&script).arg("server").arg(port.to_string());
        cmd
    });
    node.wait_for_line("listening");
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    for bits in 9..=15u8 {
        let offer = DeflateConfig::default()
            .with_server_no_context_takeover(false)
            .with_server_max_window_bits(bits)
            .with_client_max_window_bits(bits)
            .with_threshold(0);
        let (mut client, params) = RawClient::connect_deflate(addr, offer);
        let params = params.expect("ws agreed");
        assert_eq!(params.server_max_window_bits, bits);
        let count = if bits == 15 { 1000 } else { 100 };
        for n in 0..count {
            assert_echoes(&mut client, &json(n));
        }
    }
}
