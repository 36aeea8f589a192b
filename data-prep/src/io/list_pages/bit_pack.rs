//! Parquet's bit-level encodings as the list pages use them: RLE/bit-packed dictionary
//! indices (from u32 indices or bytes), `DELTA_BINARY_PACKED`, fixed-width packing, ULEB128
//! and zigzag.

#[cfg(test)]
/// Dictionary indices of a data page: one byte of bit width, then a single bit-packed run.
#[inline]
pub(super) fn dictionary_indices(indices: impl Iterator<Item = u32>, n: usize, width: u8, buf: &mut Vec<u8>) {
    indices_header(n, width, buf);
    pack_indices(indices, n, width, buf);
}

/// The start of a data page's `n` dictionary indices: the bit width, then the header of one
/// bit-packed run of `n` rounded up to groups of 8 (none for no values).
#[inline]
pub(super) fn indices_header(n: usize, width: u8, buf: &mut Vec<u8>) {
    buf.push(width);
    if n > 0 {
        uleb128(((n.div_ceil(8) as u64) << 1) | 1, buf);
    }
}

/// `n` indices bit-packed at `width`, the last group padded with zeros to 8: the body of the
/// run [`indices_header`] announces, or a stretch of it that ends on a group.
#[inline]
pub(super) fn pack_indices(mut indices: impl Iterator<Item = u32>, n: usize, width: u8, buf: &mut Vec<u8>) {
    if n == 0 {
        return;
    }
    buf.reserve(n.div_ceil(8) * width as usize + PACK_SLACK);
    // Staged a stretch at a time, so the packer sees whole groups of 8 in a slice.
    let mut stage = [0u32; 1024];
    let mut left = n;
    while left > 0 {
        let take = left.min(stage.len());
        for (slot, v) in stage[..take].iter_mut().zip(indices.by_ref()) {
            *slot = v;
        }
        // The run is whole groups of 8 values: the last one is padded with zeros.
        let padded = take.div_ceil(8) * 8;
        stage[take..padded].fill(0);
        pack(&stage[..padded], width, buf);
        left -= take;
    }
}

#[cfg(test)]
/// [`dictionary_indices`] for byte values that are their own indices (the bins).
#[inline]
pub(super) fn byte_indices(values: &[u8], width: u8, buf: &mut Vec<u8>) {
    indices_header(values.len(), width, buf);
    byte_pack(values, width, buf);
}

/// [`pack_indices`] for byte values that are their own indices, `width` at most 8: eight
/// values at a time in one 64-bit word, halved into place in three steps of masks and shifts
/// instead of a shift and an or per value (the bins' packing was 5% of a prep run).
#[inline]
pub(super) fn byte_pack(values: &[u8], width: u8, buf: &mut Vec<u8>) {
    macro_rules! widths {
        ($($w:literal)*) => {
            match width {
                0 => {}
                $($w => byte_pack_width::<$w>(values, buf),)*
                _ => pack_indices(values.iter().map(|&v| v as u32), values.len(), width, buf),
            }
        };
    }
    widths!(1 2 3 4 5 6 7 8);
}

#[inline]
pub(super) fn byte_pack_width<const W: u32>(values: &[u8], buf: &mut Vec<u8>) {
    if values.is_empty() {
        return;
    }
    let groups = values.len().div_ceil(8);
    let start = buf.len();
    let len = groups * W as usize;
    buf.resize(start + len + 8, 0);
    let dst = &mut buf[start..];
    // Eight values below 2^W in the bytes of x, packed into the low 8W bits.
    let pack = |x: u64| {
        let x = (x & 0x00FF_00FF_00FF_00FF) | ((x & 0xFF00_FF00_FF00_FF00) >> (8 - W));
        let x = (x & 0x0000_FFFF_0000_FFFF) | ((x & 0xFFFF_0000_FFFF_0000) >> (16 - 2 * W));
        (x & 0xFFFF_FFFF) | ((x >> 32) << (4 * W))
    };
    let mut groups_in = values.chunks_exact(8);
    let mut at = 0;
    for g in &mut groups_in {
        let x = u64::from_le_bytes(g.try_into().expect("8 bytes"));
        dst[at..at + 8].copy_from_slice(&pack(x).to_le_bytes());
        at += W as usize;
    }
    let rest = groups_in.remainder();
    if !rest.is_empty() {
        // The run is whole groups of 8: the last one is padded with zeros.
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        dst[at..at + 8].copy_from_slice(&pack(u64::from_le_bytes(last)).to_le_bytes());
    }
    buf.truncate(start + len);
}

/// Values per block of `DELTA_BINARY_PACKED`, in [`DELTA_MINIS`] miniblocks of 32.
pub(super) const DELTA_BLOCK: usize = 128;
pub(super) const DELTA_MINIS: usize = 4;

/// `DELTA_BINARY_PACKED` with blocks of 128 values in 4 miniblocks of 32, deltas in wrapping
/// 32-bit arithmetic as the format's INT32 type, a run at a time: the header, then the values
/// after the first in runs of whole blocks (but for the last run).
pub(super) struct DeltaPacker {
    prev: i32,
}

impl DeltaPacker {
    /// The header of `n` values starting with `first`.
    #[inline]
    pub(super) fn start(first: Option<i32>, n: usize, buf: &mut Vec<u8>) -> Self {
        uleb128(DELTA_BLOCK as u64, buf);
        uleb128(DELTA_MINIS as u64, buf);
        uleb128(n as u64, buf);
        uleb128(zigzag(first.unwrap_or(0) as i64), buf);
        DeltaPacker { prev: first.unwrap_or(0) }
    }

    #[inline]
    pub(super) fn blocks(&mut self, values: &[i32], buf: &mut Vec<u8>) {
        const MINI: usize = DELTA_BLOCK / DELTA_MINIS;
        // A reservation, not a limit: gene-id deltas (vocabularies below 2^16) fit in 2 bytes.
        buf.reserve(values.len() * 2 + PACK_SLACK);
        let mut deltas = [0i32; DELTA_BLOCK];
        let mut packed = [0u32; DELTA_BLOCK];
        let mut prev = self.prev;
        for block in values.chunks(DELTA_BLOCK) {
            let mut min = i32::MAX;
            for (d, &v) in deltas.iter_mut().zip(block) {
                *d = v.wrapping_sub(prev);
                prev = v;
                min = min.min(*d);
            }
            // The last block is padded with deltas equal to min (they pack to zero bits).
            deltas[block.len()..].fill(min);
            for (p, &d) in packed.iter_mut().zip(&deltas) {
                *p = d.wrapping_sub(min) as u32;
            }
            let mut widths = [0u8; DELTA_MINIS];
            let minis = block.len().div_ceil(MINI);
            for (m, w) in widths.iter_mut().enumerate().take(minis) {
                *w = bit_width(packed[m * MINI..(m + 1) * MINI].iter().fold(0, |a, &p| a | p) as u64);
            }
            // Miniblocks are 32 values, so the block header and every miniblock start on a byte.
            uleb128(zigzag(min as i64), buf);
            buf.extend_from_slice(&widths);
            for (m, &w) in widths.iter().enumerate().take(minis) {
                pack(&packed[m * MINI..(m + 1) * MINI], w, buf);
            }
        }
        self.prev = prev;
    }
}

/// Spare bytes the packer may write past its output (whole 32-byte words, then truncated).
pub(super) const PACK_SLACK: usize = 32;

/// Appends `values` (each below 2^width, width <= 32, a multiple of 8 of them) bit-packed least
/// significant bit first, Parquet's layout: exactly `values.len() / 8 * width` bytes.
#[inline]
pub(super) fn pack(values: &[u32], width: u8, out: &mut Vec<u8>) {
    debug_assert!(values.len().is_multiple_of(8) && width <= 32);
    macro_rules! widths {
        ($($w:literal)*) => {
            match width {
                0 => {}
                $($w => pack_width::<$w>(values, out),)*
                _ => unreachable!("bit width {width} above 32"),
            }
        };
    }
    widths!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32);
}

/// [`pack`] at a width known at compile time: each group of 8 values is W bytes whose bit
/// positions are constants, so a group is a few shifts and ors with no data-dependent
/// branches (a running bit count made every value wait on the one before).
#[inline]
pub(super) fn pack_width<const W: usize>(values: &[u32], out: &mut Vec<u8>) {
    pack_width_map::<W, u32>(values, |v| v, out)
}

/// [`pack_width`] of `map` of each value (`values.len()` a multiple of 8).
#[inline(always)]
pub(super) fn pack_width_map<const W: usize, T: Copy>(values: &[T], map: impl Fn(T) -> u32, out: &mut Vec<u8>) {
    let start = out.len();
    let len = values.len() / 8 * W;
    out.resize(start + len + PACK_SLACK, 0);
    let dst = &mut out[start..];
    for (g, group) in values.chunks_exact(8).enumerate() {
        let mut words = [0u64; 4];
        for (i, &v) in group.iter().enumerate() {
            let v = map(v);
            let (word, shift) = (i * W / 64, i * W % 64);
            words[word] |= (v as u64) << shift;
            if shift + W > 64 {
                words[word + 1] |= (v as u64) >> (64 - shift);
            }
        }
        let at = g * W;
        for (k, w) in words.iter().enumerate().take(W.div_ceil(8)) {
            dst[at + 8 * k..at + 8 * k + 8].copy_from_slice(&w.to_le_bytes());
        }
    }
    out.truncate(start + len);
}

#[inline]
pub(super) fn bit_width(max: u64) -> u8 {
    (64 - max.leading_zeros()) as u8
}

#[inline]
pub(super) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[inline]
pub(super) fn uleb128(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_packing_matches_the_format_examples() {
        // Parquet's Encodings.md: 0..=7 at width 3 packs to 10001000 11000110 11111010.
        let mut out = vec![0xAA];
        pack(&[0, 1, 2, 3, 4, 5, 6, 7], 3, &mut out);
        assert_eq!(out, vec![0xAA, 0b1000_1000, 0b1100_0110, 0b1111_1010]);
        // Every width, values crossing word boundaries, read back by a plain bit reader.
        for w in 0..=32u8 {
            let vals: Vec<u32> = (0..104u64).map(|i| ((i * 2_654_435_761) & ((1u64 << w) - 1)) as u32).collect();
            let mut out = vec![7u8];
            pack(&vals, w, &mut out);
            assert_eq!(out.len(), 1 + 104 * w as usize / 8);
            let bit = |k: usize| (out[1 + k / 8] >> (k % 8)) & 1;
            for (i, &v) in vals.iter().enumerate() {
                let back = (0..w as usize).fold(0u32, |acc, b| acc | (bit(i * w as usize + b) as u32) << b);
                assert_eq!(back, v, "width {w}, value {i}");
            }
        }
    }

    #[test]
    fn byte_indices_pack_as_the_general_path() {
        for width in 0..=8u8 {
            for n in [0usize, 1, 7, 8, 9, 16, 23, 1000] {
                let vals: Vec<u8> = (0..n as u64).map(|i| (((i * 2_654_435_761) >> 7) & ((1u64 << width) - 1)) as u8).collect();
                let (mut fast, mut general) = (vec![3u8], vec![3u8]);
                byte_indices(&vals, width, &mut fast);
                dictionary_indices(vals.iter().map(|&v| v as u32), n, width, &mut general);
                assert_eq!(fast, general, "width {width}, {n} values");
            }
        }
    }

    #[test]
    fn uleb128_and_zigzag() {
        let mut out = Vec::new();
        uleb128(624_485, &mut out);
        assert_eq!(out, vec![0xE5, 0x8E, 0x26]);
        assert_eq!([zigzag(0), zigzag(-1), zigzag(1), zigzag(-2)], [0, 1, 2, 3]);
    }
}
