//! What permessage-deflate costs an idle connection, counted by a global allocator: the heap
//! a codec holds after the upgrade and after a message each way, per mode. Prints the figures
//! (`cargo test -p ringcast-protocol --test deflate_memory -- --nocapture`, bench/RESULTS.md)
//! and asserts the property the engine relies on: without context takeover an idle connection
//! holds no compressor or decompressor.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering::Relaxed},
};

use bytes::BytesMut;
use ringcast_protocol::{
    deflate::{negotiate, DeflateConfig},
    Codec, Event, Limits, OpCode,
};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Relaxed)
}

fn message() -> Vec<u8> {
    let mut s = String::from("{\"topic\":\"prices.eurusd\",\"data\":[");
    let mut i = 0;
    while s.len() < 1000 {
        s += &format!(
            "{{\"bid\":1.{:04},\"ask\":1.{:04}}},",
            i * 7 % 10000,
            i * 13 % 10000
        );
        i += 1;
    }
    s.pop();
    (s + "]}").into_bytes()
}

/// Heap held by a server codec with `mode`'s parameters: (after the upgrade, after one
/// message in and one out), over a codec without compression.
fn held(config: &DeflateConfig, offer: &str) -> (isize, isize) {
    let params = negotiate(config, [offer.as_bytes()]).expect("agreed");
    let mut client = Codec::client(Limits::default(), 1).with_deflate(params, config);
    let msg = message();
    let mut wire = BytesMut::new();
    client.encode_message(OpCode::Text, &msg, &mut wire);
    // Warm the per-thread pools, so what they keep is not counted as the connection's.
    {
        let mut warm = Codec::server(Limits::default()).with_deflate(params, config);
        let mut w = wire.clone();
        assert!(matches!(warm.poll_event(&mut w), Ok(Some(Event::Text(_)))));
        let mut out = BytesMut::new();
        warm.encode_message(OpCode::Text, &msg, &mut out);
    }
    let base = live();
    let plain = Codec::server(Limits::default());
    let plain_bytes = live() - base;
    drop(plain);

    let base = live();
    let mut server = Codec::server(Limits::default()).with_deflate(params, config);
    let idle = live() - base;
    let mut input = BytesMut::from(&wire[..]);
    let event = server.poll_event(&mut input).unwrap().unwrap();
    let mut out = BytesMut::new();
    server.encode_message(OpCode::Text, &msg, &mut out);
    drop((event, out, input));
    let after = live() - base;
    drop(server);
    (idle - plain_bytes, after - plain_bytes)
}

#[test]
fn idle_connections_hold_no_deflate_state_without_context_takeover() {
    let shared = DeflateConfig::default()
        .with_server_no_context_takeover(true)
        .with_client_no_context_takeover(true);
    let (idle, after) = held(&shared, "permessage-deflate; client_max_window_bits");
    println!("shared: {idle} B after the upgrade, {after} B after a message each way");
    assert!(after < 256, "shared holds only its settings: {after} B");
    assert_eq!(idle, after, "nothing kept after a message");

    for bits in [15u8, 12, 10] {
        let dedicated = DeflateConfig::default()
            .with_server_no_context_takeover(false)
            .with_server_max_window_bits(bits)
            .with_client_max_window_bits(bits);
        let (idle, after) = held(&dedicated, "permessage-deflate; client_max_window_bits");
        println!(
            "dedicated, window bits {bits}: {idle} B after the upgrade, {after} B after a \
             message each way"
        );
        assert!(idle < 256, "nothing before first use: {idle} B");
        assert!(
            after > 4096,
            "context takeover keeps both states: {after} B"
        );
    }
    lower_memory_levels_hold_less();
}

/// A lower memory level holds fewer bytes per dedicated connection. Called from the one test:
/// the allocator counts every thread, and a second test (or the harness reporting one) running
/// alongside would be counted too.
fn lower_memory_levels_hold_less() {
    for bits in [15u8, 10] {
        let mut last = isize::MAX;
        for mem_level in [9u8, 8, 4, 1] {
            let dedicated = DeflateConfig::default()
                .with_server_no_context_takeover(false)
                .with_server_max_window_bits(bits)
                .with_client_max_window_bits(bits)
                .with_mem_level(mem_level);
            let (_, after) = held(&dedicated, "permessage-deflate; client_max_window_bits");
            println!(
                "dedicated, window bits {bits}, mem_level {mem_level}: {after} B after a \
                 message each way"
            );
            assert!(
                after < last,
                "mem_level {mem_level} holds less than the level above: {after} B"
            );
            last = after;
        }
    }
}
