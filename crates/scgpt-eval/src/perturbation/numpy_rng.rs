//! numpy's legacy global generator (`np.random.seed`, `np.random.choice`, `permutation`,
//! `shuffle`), draw for draw, so a split GEARS made with a seed is the split we make with it.
//!
//! numpy keeps the legacy `RandomState` stream frozen across versions: MT19937 seeded by
//! `init_genrand`, bounded integers by masked rejection (not Lemire's method, which the newer
//! `Generator` uses). `choice(n, k, replace=False)` is `permutation(n)[:k]`, and a permutation is
//! a Fisher-Yates shuffle from the last element down.

use anyhow::{bail, Result};

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// The state behind `np.random.seed(seed)` and the legacy `np.random.*` functions.
#[derive(Clone)]
pub struct LegacyRandomState {
    key: [u32; N],
    pos: usize,
}

impl LegacyRandomState {
    /// `np.random.seed(seed)`: numpy refuses seeds outside 0..2³², and so do we.
    pub fn new(seed: u64) -> Result<Self> {
        let Ok(mut s) = u32::try_from(seed) else {
            bail!("seed {seed} is out of range: numpy's legacy generator takes seeds in 0..=4294967295");
        };
        let mut key = [0u32; N];
        for (pos, k) in key.iter_mut().enumerate() {
            *k = s;
            s = 1_812_433_253u32.wrapping_mul(s ^ (s >> 30)).wrapping_add(pos as u32 + 1);
        }
        Ok(LegacyRandomState { key, pos: N })
    }

    fn generate(&mut self) {
        let twist = |a: u32, b: u32, far: u32| {
            let y = (a & UPPER_MASK) | (b & LOWER_MASK);
            far ^ (y >> 1) ^ (if y & 1 == 1 { MATRIX_A } else { 0 })
        };
        for i in 0..N {
            self.key[i] = twist(self.key[i], self.key[(i + 1) % N], self.key[(i + M) % N]);
        }
        self.pos = 0;
    }

    /// One tempered 32-bit output (`mt19937_next32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.pos == N {
            self.generate();
        }
        let mut y = self.key[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `mt19937_next64`: the first 32-bit draw is the high half.
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        (hi << 32) | self.next_u32() as u64
    }

    /// A uniform integer in `0..=max` by masked rejection (numpy's `random_interval`, which is
    /// also what legacy `randint` uses, `buffered_bounded_masked_uint32/64`). `max == 0` draws
    /// nothing.
    pub fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for shift in [1, 2, 4, 8, 16, 32] {
            mask |= mask >> shift;
        }
        if max <= u32::MAX as u64 {
            loop {
                let v = (self.next_u32() as u64) & mask;
                if v <= max {
                    return v;
                }
            }
        }
        loop {
            let v = self.next_u64() & mask;
            if v <= max {
                return v;
            }
        }
    }

    /// `np.random.shuffle(x)` (ndarray and list paths draw the same way).
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.interval(i as u64) as usize;
            x.swap(i, j);
        }
    }

    /// `np.random.permutation(n)`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        self.shuffle(&mut idx);
        idx
    }

    /// Indices of `np.random.choice(a, k, replace=False)` for `len(a) == n`.
    pub fn choice_without_replacement(&mut self, n: usize, k: usize) -> Result<Vec<usize>> {
        if k > n {
            bail!("cannot draw {k} of {n} items without replacement");
        }
        let mut idx = self.permutation(n);
        idx.truncate(k);
        Ok(idx)
    }

    /// Indices of `np.random.choice(a, k)` (with replacement), i.e. `randint(0, n, size=k)`.
    pub fn choice_with_replacement(&mut self, n: usize, k: usize) -> Result<Vec<usize>> {
        if k == 0 {
            return Ok(Vec::new());
        }
        if n == 0 {
            bail!("cannot draw {k} items from an empty list");
        }
        Ok((0..k).map(|_| self.interval(n as u64 - 1) as usize).collect())
    }

    /// `randint(low, high, size=k)` for `low < high` (int64, the legacy default dtype).
    pub fn randint(&mut self, low: i64, high: i64, k: usize) -> Result<Vec<i64>> {
        if k == 0 {
            return Ok(Vec::new());
        }
        if low >= high {
            bail!("randint needs low < high, got {low} and {high}");
        }
        let range = (high as i128 - 1 - low as i128) as u64;
        Ok((0..k).map(|_| (low as i128 + self.interval(range) as i128) as i64).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference MT19937 (init_genrand(5489)) starts 3499211612, 581869302, 3890346734.
    #[test]
    fn mt19937_matches_the_reference_stream() {
        let mut r = LegacyRandomState::new(5489).unwrap();
        assert_eq!([r.next_u32(), r.next_u32(), r.next_u32()], [3_499_211_612, 581_869_302, 3_890_346_734]);
    }

    #[test]
    fn seeds_above_32_bits_are_refused() {
        assert!(LegacyRandomState::new(1 << 32).is_err());
    }
}
