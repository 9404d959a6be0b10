//! Payload masking (RFC 6455 §5.3): XOR with a 4-byte key that repeats.
//!
//! Owns the fast path used on every masked payload and the byte-at-a-time reference it is tested
//! against. Both take an `offset` so a payload can be unmasked piece by piece as it arrives.

/// Applies `mask` to `buf` in place, as if `buf` began at byte `offset` of the payload.
///
/// Works eight bytes at a time on the body; the compiler widens the loop to SIMD where the
/// target allows. Equal to [`apply_mask_reference`] for every length, offset and alignment.
#[inline]
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let s = offset & 3;
    let key = [
        mask[s],
        mask[(s + 1) & 3],
        mask[(s + 2) & 3],
        mask[(s + 3) & 3],
    ];
    let word = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let bytes: [u8; 8] = (&*chunk)
            .try_into()
            .expect("chunks_exact_mut(8) yields 8-byte chunks");
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
    }
    // Each chunk covered the key exactly twice, so the tail starts at key[0] again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Byte-at-a-time masking: the definition [`apply_mask`] must match.
pub fn apply_mask_reference(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= mask[(offset + i) & 3];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_path_equals_reference_at_every_length_offset_and_alignment() {
        let mask = [0x6d, 0xb6, 0xb2, 0x80];
        let data: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..=64 {
            for align in 0..8 {
                for offset in 0..8 {
                    let mut fast = data[..len + align].to_vec();
                    let mut slow = fast.clone();
                    apply_mask(&mut fast[align..], mask, offset);
                    apply_mask_reference(&mut slow[align..], mask, offset);
                    assert_eq!(fast, slow, "len {len} align {align} offset {offset}");
                }
            }
        }
    }

    #[test]
    fn masking_in_pieces_equals_masking_at_once() {
        let mask = [1, 2, 3, 4];
        let mut whole: Vec<u8> = (0..100).collect();
        let mut pieces = whole.clone();
        apply_mask(&mut whole, mask, 0);
        let (a, rest) = pieces.split_at_mut(13);
        let (b, c) = rest.split_at_mut(40);
        apply_mask(a, mask, 0);
        apply_mask(b, mask, 13);
        apply_mask(c, mask, 53);
        assert_eq!(whole, pieces);
    }
}
