//! Protocol micro-benchmarks. Each group puts its subject beside a ceiling measured in the same
//! run: unmasking beside a plain copy of the same bytes, UTF-8 validation beside std's
//! one-shot check, header parsing beside a read of the same bytes.
//!
//! `cargo bench -p ringcast-protocol` (add `-- --quick` for a fast pass).

use std::hint::black_box;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast_protocol::{
    encode_frame, mask, server_frame, Codec, FrameHeader, Limits, OpCode, Utf8Validator,
};

const SIZES: [usize; 3] = [20, 1024, 65536];

fn unmask(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmask");
    for len in SIZES {
        let src = vec![0xA5u8; len];
        let mut dst = vec![0u8; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("copy (ceiling)", len), &len, |b, _| {
            b.iter(|| dst.copy_from_slice(black_box(&src)))
        });
        group.bench_with_input(BenchmarkId::new("fast", len), &len, |b, _| {
            b.iter(|| mask::apply_mask(black_box(&mut dst), [1, 2, 3, 4], 0))
        });
        group.bench_with_input(BenchmarkId::new("reference", len), &len, |b, _| {
            b.iter(|| mask::apply_mask_reference(black_box(&mut dst), [1, 2, 3, 4], 0))
        });
    }
    group.finish();
}

fn header(c: &mut Criterion) {
    let mut group = c.benchmark_group("header_parse");
    for (name, len, masked) in [
        ("7-bit, masked", 20u64, true),
        ("16-bit, masked", 1024, true),
        ("64-bit, masked", 1 << 20, true),
        ("7-bit, unmasked", 20, false),
    ] {
        let header = FrameHeader {
            fin: true,
            rsv: 0,
            opcode: OpCode::Binary,
            mask: masked.then_some([9, 8, 7, 6]),
            payload_len: len,
        };
        let (bytes, n) = header.to_array();
        group.bench_function(name, |b| {
            b.iter(|| FrameHeader::parse(black_box(&bytes[..n])))
        });
    }
    group.finish();
}

fn utf8(c: &mut Criterion) {
    let mut group = c.benchmark_group("utf8");
    let ascii = "ringcast ".repeat(7282).into_bytes(); // ~64 KiB
    let mixed = "κόσμε 𝄞 中文 ascii ".repeat(2340).into_bytes(); // ~64 KiB
    for (name, text) in [("ascii", &ascii), ("mixed", &mixed)] {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(BenchmarkId::new("std from_utf8 (ceiling)", name), |b| {
            b.iter(|| std::str::from_utf8(black_box(text)).is_ok())
        });
        group.bench_function(BenchmarkId::new("validator whole", name), |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                v.feed(black_box(text)).and_then(|()| v.finish()).is_ok()
            })
        });
        group.bench_function(BenchmarkId::new("validator 1 KiB pieces", name), |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                for piece in text.chunks(1024) {
                    if v.feed(black_box(piece)).is_err() {
                        return false;
                    }
                }
                v.finish().is_ok()
            })
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    for len in SIZES {
        let payload = vec![b'a'; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("header to_array", len), &len, |b, _| {
            b.iter(|| FrameHeader::new(OpCode::Binary, black_box(len as u64)).to_array())
        });
        group.bench_with_input(
            BenchmarkId::new("server_frame (shared)", len),
            &len,
            |b, _| b.iter(|| server_frame(OpCode::Binary, black_box(&payload))),
        );
        let mut buf = BytesMut::with_capacity(len + 14);
        group.bench_with_input(
            BenchmarkId::new("client frame, masked", len),
            &len,
            |b, _| {
                b.iter(|| {
                    buf.clear();
                    encode_frame(
                        &mut buf,
                        true,
                        OpCode::Binary,
                        black_box(&payload),
                        Some([1, 2, 3, 4]),
                    );
                })
            },
        );
    }
    group.finish();
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec_parse");
    for len in SIZES {
        let payload = vec![b'a'; len];
        let mut wire = BytesMut::new();
        for _ in 0..64 {
            encode_frame(
                &mut wire,
                true,
                OpCode::Binary,
                &payload,
                Some([9, 8, 7, 6]),
            );
        }
        let wire = wire.freeze();
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_with_input(BenchmarkId::new("64 masked frames", len), &len, |b, _| {
            b.iter(|| {
                let mut codec = Codec::server(Limits::default());
                let mut buf = BytesMut::from(&wire[..]);
                let mut n = 0;
                while let Ok(Some(_)) = codec.poll_event(&mut buf) {
                    n += 1;
                }
                assert_eq!(n, 64);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, unmask, header, utf8, encode, parse);
criterion_main!(benches);
