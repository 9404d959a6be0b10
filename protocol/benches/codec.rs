//! Codec micro-benchmarks: masking against its reference, and parsing small and large frames.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringcast_protocol::{encode_frame, mask, Codec, Limits, OpCode};

fn masking(c: &mut Criterion) {
    let mut group = c.benchmark_group("mask");
    for len in [20usize, 1024, 65536] {
        let mut buf = vec![0xA5u8; len];
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("fast", len), &len, |b, _| {
            b.iter(|| mask::apply_mask(&mut buf, [1, 2, 3, 4], 0))
        });
        group.bench_with_input(BenchmarkId::new("reference", len), &len, |b, _| {
            b.iter(|| mask::apply_mask_reference(&mut buf, [1, 2, 3, 4], 0))
        });
    }
    group.finish();
}

fn parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for len in [20usize, 1024, 65536] {
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
        group.bench_with_input(BenchmarkId::new("64_frames", len), &len, |b, _| {
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

criterion_group!(benches, masking, parsing);
criterion_main!(benches);
