//! Broker envelope micro-benchmarks: encoding a topic message into a shareable frame, and
//! decoding a publish request, each beside a ceiling from the same run (framing the bare payload;
//! a validating `serde_json` pass over the same bytes). Each JSON-payload decode also runs with
//! the nesting check switched off (no limit), in the same run, and `json_depth` times the
//! check alone: its cost, without the drift between two runs on a shared machine.
//!
//! `cargo bench -p ringcast-protocol --bench envelope` (add `-- --quick` for a fast pass).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast_protocol::envelope::{
    decode_request, decode_request_with, encode_request, json_depth_within, message_frame, Data,
    DecodeOptions, Encoding, Request, DEFAULT_MAX_JSON_DEPTH,
};
use ringcast_protocol::server_frame;
use serde_json::value::RawValue;

/// What `#[derive(Deserialize)]` would read for a publish, for comparison.
#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct DerivedPublish<'a> {
    #[serde(rename = "type")]
    ty: &'a str,
    id: Option<u64>,
    topic: &'a str,
    #[serde(borrow)]
    data: &'a RawValue,
}

const SIZES: [usize; 2] = [20, 1024];

/// A JSON string value of exactly `len` bytes, quotes included.
fn json_payload(len: usize) -> String {
    format!("\"{}\"", "a".repeat(len - 2))
}

/// An ordinary structured JSON value of about `len` bytes: an object holding an array of
/// small objects, each with a nested array (many brackets, little depth: the nesting check's
/// slow path).
fn json_object_payload(len: usize) -> String {
    let mut items = Vec::new();
    let mut size = 12;
    let mut i = 0;
    while size < len {
        let item = format!(r#"{{"id":{i},"px":101.25,"tags":["a","b"],"q":{{"n":3}}}}"#);
        size += item.len() + 1;
        items.push(item);
        i += 1;
    }
    format!(r#"{{"items":[{}]}}"#, items.join(","))
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope_encode");
    for len in SIZES {
        let json = json_payload(len);
        let bytes = vec![0xA5u8; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(
            BenchmarkId::new("server_frame bare (ceiling)", len),
            &len,
            |b, _| b.iter(|| server_frame(Encoding::Json.opcode(), black_box(json.as_bytes()))),
        );
        for (name, enc, payload) in [
            ("message_frame json", Encoding::Json, Data::json(&json)),
            (
                "message_frame json, base64",
                Encoding::Json,
                Data::binary(&bytes),
            ),
            (
                "message_frame binary",
                Encoding::Binary,
                Data::binary(&bytes),
            ),
        ] {
            group.bench_with_input(BenchmarkId::new(name, len), &len, |b, _| {
                b.iter(|| {
                    message_frame(enc, black_box("prices.BTC"), black_box(42), payload.clone())
                })
            });
        }
    }
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope_decode");
    for len in SIZES {
        let json = json_payload(len);
        let publish = |payload| Request::Publish {
            id: Some(7),
            topic: "prices.BTC".into(),
            payload,
        };
        let json_wire = encode_request(Encoding::Json, &publish(Data::json(&json)));
        let bin_wire = encode_request(Encoding::Binary, &publish(Data::json(&json)));
        let bin_opaque = encode_request(Encoding::Binary, &publish(Data::binary(json.as_bytes())));
        let object = json_object_payload(len);
        let json_object_wire = encode_request(Encoding::Json, &publish(Data::json(&object)));
        let bin_object_wire = encode_request(Encoding::Binary, &publish(Data::json(&object)));
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(
            BenchmarkId::new("serde_json validate (ceiling)", len),
            &len,
            |b, _| b.iter(|| serde_json::from_slice::<&RawValue>(black_box(&json_wire)).is_ok()),
        );
        group.bench_with_input(
            BenchmarkId::new("serde derive struct (reference)", len),
            &len,
            |b, _| {
                b.iter(|| {
                    serde_json::from_slice::<DerivedPublish<'_>>(black_box(&json_wire)).is_ok()
                })
            },
        );
        for (name, enc, wire) in [
            ("publish json", Encoding::Json, &json_wire),
            (
                "publish json, object payload",
                Encoding::Json,
                &json_object_wire,
            ),
            ("publish binary, json payload", Encoding::Binary, &bin_wire),
            (
                "publish binary, json object payload",
                Encoding::Binary,
                &bin_object_wire,
            ),
            (
                "publish binary, opaque payload",
                Encoding::Binary,
                &bin_opaque,
            ),
        ] {
            group.bench_with_input(BenchmarkId::new(name, len), &len, |b, _| {
                b.iter(|| decode_request(enc, black_box(wire)).is_ok())
            });
            if !name.contains("opaque") {
                let unchecked = DecodeOptions::default().max_json_depth(usize::MAX);
                let name = format!("{name}, no depth check");
                group.bench_with_input(BenchmarkId::new(name, len), &len, |b, _| {
                    b.iter(|| decode_request_with(enc, black_box(wire), unchecked).is_ok())
                });
            }
        }
    }
    group.finish();
}

fn depth(c: &mut Criterion) {
    let mut group = c.benchmark_group("json_depth");
    for len in SIZES {
        for (name, json) in [
            ("string", json_payload(len)),
            ("object", json_object_payload(len)),
        ] {
            group.throughput(Throughput::Bytes(json.len() as u64));
            group.bench_with_input(BenchmarkId::new(name, len), &len, |b, _| {
                b.iter(|| json_depth_within(black_box(json.as_bytes()), DEFAULT_MAX_JSON_DEPTH))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, encode, decode, depth);
criterion_main!(benches);
