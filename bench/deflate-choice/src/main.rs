//! Compares flate2 over zlib-rs (streaming, with and without context takeover) against
//! libdeflater (whole buffer) on 1,000 JSON messages of about 1 KiB: time per message and
//! compressed size. `cargo run --release --manifest-path bench/deflate-choice/Cargo.toml`
//! (`-- mem_level`: only zlib-rs's memLevel rows).

use std::time::Instant;
use flate2::{Compress, Decompress, Compression, FlushCompress, FlushDecompress};

fn json(i: usize) -> Vec<u8> {
    let mut s = String::from("{\"topic\":\"prices.eurusd\",\"seq\":");
    s += &i.to_string();
    s += ",\"data\":[";
    let mut k = 0u64;
    while s.len() < 1000 {
        k = k.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407 + i as u64);
        s += &format!("{{\"bid\":{}.{:04},\"ask\":{}.{:04},\"vol\":{}}},", 1 + (k >> 60), (k >> 20) % 10000, 1 + (k >> 61), (k >> 30) % 10000, (k >> 40) % 100000);
    }
    s.pop(); s += "]}";
    s.into_bytes()
}

/// zlib-rs's own compressor at levels 1 and 6 with context takeover (dedicated mode), per
/// window and memLevel: what `compression.mem_level` trades. `... -- mem_level` runs only this.
fn mem_levels(msgs: &[Vec<u8>], n: usize) {
    use zlib_rs::{Deflate, DeflateConfig, DeflateFlush};
    let total = msgs.len() * n;
    for (level, bits) in [(1i32, 15i32), (1, 10), (6, 15), (6, 10)] {
        for mem_level in [8i32, 4, 1] {
            let config = DeflateConfig { level, window_bits: -bits, mem_level, ..DeflateConfig::default() };
            let mut c = Deflate::new_with_config(config);
            let mut out = vec![0u8; 4096];
            let mut bytes = 0usize;
            let t = Instant::now();
            for _ in 0..n { for m in msgs {
                let before = c.total_out();
                c.compress(m, &mut out, DeflateFlush::SyncFlush).unwrap();
                bytes += (c.total_out() - before) as usize - 4;
            }}
            let el = t.elapsed();
            println!("zlib-rs level {level} takeover window {bits} mem_level {mem_level}: {:.0} ns/msg, ratio {:.3}", el.as_nanos() as f64 / total as f64, bytes as f64 / (total * msgs[0].len()) as f64);
        }
    }
}

fn main() {
    let msgs: Vec<Vec<u8>> = (0..1000).map(json).collect();
    let n = 200usize;
    let total = msgs.len() * n;
    if std::env::args().nth(1).as_deref() == Some("mem_level") {
        return mem_levels(&msgs, n);
    }
    for level in [1u32, 6] {
    // flate2 zlib-rs, no context takeover (reset per message), window 15
    let mut c = Compress::new_with_window_bits(Compression::new(level), false, 15);
    let mut out = Vec::with_capacity(4096);
    let mut bytes = 0usize;
    let t = Instant::now();
    for _ in 0..n { for m in &msgs {
        out.clear(); c.reset();
        c.compress_vec(m, &mut out, FlushCompress::Sync).unwrap();
        bytes += out.len() - 4;
    }}
    let el = t.elapsed();
    println!("flate2+zlib-rs level {level} no-takeover: {:.0} ns/msg, ratio {:.3}", el.as_nanos() as f64 / total as f64, bytes as f64 / (total * msgs[0].len()) as f64);
    // flate2 zlib-rs context takeover
    let mut c = Compress::new_with_window_bits(Compression::new(level), false, 15);
    let mut bytes = 0usize;
    let t = Instant::now();
    for _ in 0..n { for m in &msgs {
        out.clear();
        c.compress_vec(m, &mut out, FlushCompress::Sync).unwrap();
        bytes += out.len() - 4;
    }}
    let el = t.elapsed();
    println!("flate2+zlib-rs level {level} takeover: {:.0} ns/msg, ratio {:.3}", el.as_nanos() as f64 / total as f64, bytes as f64 / (total * msgs[0].len()) as f64);
    // libdeflater whole buffer
    let mut ld = libdeflater::Compressor::new(libdeflater::CompressionLvl::new(level as i32).unwrap());
    let mut buf = vec![0u8; 4096];
    let mut bytes = 0usize;
    let t = Instant::now();
    for _ in 0..n { for m in &msgs {
        bytes += ld.deflate_compress(m, &mut buf).unwrap();
    }}
    let el = t.elapsed();
    println!("libdeflater level {level} whole-buffer: {:.0} ns/msg, ratio {:.3}", el.as_nanos() as f64 / total as f64, bytes as f64 / (total * msgs[0].len()) as f64);
    }
    // inflate
    let mut c = Compress::new_with_window_bits(Compression::new(1), false, 15);
    let comp: Vec<Vec<u8>> = msgs.iter().map(|m| { let mut o = Vec::with_capacity(4096); c.reset(); c.compress_vec(m, &mut o, FlushCompress::Sync).unwrap(); o }).collect();
    let mut d = Decompress::new_with_window_bits(false, 15);
    let mut out = Vec::with_capacity(4096);
    let t = Instant::now();
    for _ in 0..n { for m in &comp { out.clear(); d.reset(false); d.decompress_vec(m, &mut out, FlushDecompress::Sync).unwrap(); }}
    println!("flate2+zlib-rs inflate: {:.0} ns/msg", t.elapsed().as_nanos() as f64 / total as f64);
    let mut ld = libdeflater::Decompressor::new();
    let mut buf = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..n { for m in &comp { let mut v = m.clone(); v.extend_from_slice(&[1,0,0,0xff,0xff]); ld.deflate_decompress(&v, &mut buf).unwrap(); }}
    println!("libdeflater inflate (incl. clone): {:.0} ns/msg", t.elapsed().as_nanos() as f64 / total as f64);
    println!("msg len {}", msgs[0].len());
    mem_levels(&msgs, n);
}
