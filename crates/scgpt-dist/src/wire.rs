//! What the TCP backend puts on the wire besides its frame headers: the operation codes and
//! the little-endian encoding of the element types, cut into chunks.

use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    AllReduceMean = 1,
    AllReduceSumF64 = 2,
    Broadcast = 3,
    AllGather = 4,
    Barrier = 5,
    BroadcastBytes = 6,
}

impl Op {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Op::AllReduceMean => "all_reduce_mean",
            Op::AllReduceSumF64 => "all_reduce_sum_f64",
            Op::Broadcast => "broadcast",
            Op::AllGather => "all_gather",
            Op::Barrier => "barrier",
            Op::BroadcastBytes => "broadcast_bytes",
        }
    }

    pub(crate) fn name_of(code: u8) -> &'static str {
        [Op::AllReduceMean, Op::AllReduceSumF64, Op::Broadcast, Op::AllGather, Op::Barrier, Op::BroadcastBytes]
            .into_iter()
            .find(|op| *op as u8 == code)
            .map_or("an unknown operation", Op::name)
    }
}

/// Element types that travel on the wire.
pub(crate) trait Elem: Copy + Send + Default {
    const SIZE: usize;
    fn put(self, out: &mut [u8]);
    fn get(b: &[u8]) -> Self;
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
}

impl Elem for f32 {
    const SIZE: usize = 4;
    fn put(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> f32 {
        f32::from_le_bytes(b.try_into().expect("4 bytes"))
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
}

impl Elem for f64 {
    const SIZE: usize = 8;
    fn put(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
    fn get(b: &[u8]) -> f64 {
        f64::from_le_bytes(b.try_into().expect("8 bytes"))
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(x: f64) -> f64 {
        x
    }
}

impl Elem for u8 {
    const SIZE: usize = 1;
    fn put(self, out: &mut [u8]) {
        out[0] = self;
    }
    fn get(b: &[u8]) -> u8 {
        b[0]
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(x: f64) -> u8 {
        x as u8
    }
}

/// Append the little-endian encoding of `src` to `out`.
pub(crate) fn encode<T: Elem>(src: &[T], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + src.len() * T::SIZE, 0);
    for (x, b) in src.iter().zip(out[start..].chunks_exact_mut(T::SIZE)) {
        x.put(b);
    }
}

pub(crate) fn decode<T: Elem>(bytes: &[u8], dst: &mut [T]) {
    for (x, b) in dst.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
        *x = T::get(b);
    }
}

pub(crate) fn chunk_elems<T: Elem>(chunk_bytes: usize) -> usize {
    (chunk_bytes / T::SIZE).max(1)
}

/// Chunk boundaries; an empty buffer still has one (empty) chunk so that every operation
/// carries at least one reply frame, which is where an abort can arrive.
pub(crate) fn chunks(len: usize, per: usize) -> impl Iterator<Item = Range<usize>> {
    let n = len.div_ceil(per).max(1);
    (0..n).map(move |i| (i * per).min(len)..((i + 1) * per).min(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ranges_cover_and_never_vanish() {
        assert_eq!(chunks(0, 4).collect::<Vec<_>>(), vec![0..0]);
        assert_eq!(chunks(4, 4).collect::<Vec<_>>(), vec![0..4]);
        assert_eq!(chunks(9, 4).collect::<Vec<_>>(), vec![0..4, 4..8, 8..9]);
        assert_eq!(chunk_elems::<f64>(3), 1);
    }

    #[test]
    fn encoding_round_trips() {
        let xs = [1.5f32, -0.0, f32::MIN_POSITIVE, f32::MAX, f32::NAN];
        let mut b = vec![9u8];
        encode(&xs, &mut b);
        assert_eq!(b.len(), 1 + 20);
        let mut ys = [0f32; 5];
        decode(&b[1..], &mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            assert_eq!(x.to_bits(), y.to_bits());
        }
    }

    #[test]
    fn op_names_cover_codes() {
        assert_eq!(Op::name_of(Op::AllGather as u8), "all_gather");
        assert_eq!(Op::name_of(200), "an unknown operation");
    }
}
