//! Per-cell quantile binning exactly as the original's `binning` (spec §3.1).
//!
//! Over a cell's nonzero values, `n_bins - 1` edges are taken at evenly spaced quantiles with
//! numpy's default linear interpolation (duplicate edges kept). A value strictly between edges
//! gets a fixed bin; a value equal to a run of tied edges gets a bin drawn uniformly over the
//! tied range, `ceil(l - U (l - r))`, as the original's `_digitize`. [`TieBreak::Lowest`] picks
//! the lowest bin of that range instead, so the output is the same on every run. Zeros stay 0.

use rand::Rng;

use crate::small_int;

/// The original hard-codes 51 bins in its collators: values 1..=50 for nonzero genes.
pub const DEFAULT_N_BINS: usize = 51;

/// How values that sit on tied quantile edges are assigned.
pub enum TieBreak<'a, R: Rng> {
    /// Uniform over the tied bins, as the original (but from a seeded RNG).
    Random(&'a mut R),
    /// The lowest tied bin: deterministic.
    Lowest,
}

/// Reusable buffers so binning a cell allocates nothing in the steady state.
#[derive(Default)]
pub struct Binner {
    sorted: Vec<f32>,
    edges: Vec<f64>,
    /// Counting-sort histogram for small integer counts.
    hist: Vec<u32>,
    /// One 32-bit draw per value for random tie-breaking, drawn in bulk (a draw per call kept
    /// the generator's state in memory: a store-to-load chain through every value).
    draws: Vec<u32>,
    /// The digits (l, l - r) of each value 0..=max + 1 of a cell on the small-integer path, in
    /// the low and high byte.
    lut_pair: Vec<u16>,
}

/// Counts below this use the counting-sort and lookup-table path (the common case for UMI data).
pub const SMALL_INT_LIMIT: u32 = 4096;

impl Binner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bin a row that may contain zeros: zeros give 0, nonzeros 1..n_bins-1.
    pub fn bin_row<R: Rng>(&mut self, row: &[f32], n_bins: usize, ties: TieBreak<'_, R>, out: &mut Vec<u8>) {
        out.clear();
        self.sorted.clear();
        self.sorted.extend(row.iter().copied().filter(|&v| v != 0.0));
        if self.sorted.is_empty() {
            out.resize(row.len(), 0);
            return;
        }
        let n = self.sorted.len();
        self.prepare_edges(n_bins);
        let random = self.take_draws(ties, n);
        let (edges, draws) = (&self.edges, &self.draws);
        let mut k = 0;
        out.extend(row.iter().map(|&v| {
            if v == 0.0 {
                return 0;
            }
            let (l, r) = digits(v as f64, edges);
            k += 1;
            if random {
                pick(l, r, draws[k - 1])
            } else {
                lowest(l, r)
            }
        }));
    }

    /// Fills `draws` with `n` draws for random ties; false for [`TieBreak::Lowest`].
    fn take_draws<R: Rng>(&mut self, ties: TieBreak<'_, R>, n: usize) -> bool {
        match ties {
            TieBreak::Lowest => false,
            TieBreak::Random(rng) => {
                // Grown only: zeroing n slots before filling them was 1.5% of a prep run.
                if self.draws.len() < n {
                    self.draws.resize(n, 0);
                }
                rng.fill(&mut self.draws[..n]);
                true
            }
        }
    }

    /// Bin values that are all nonzero (the shard layout stores only expressed genes).
    pub fn bin_nonzero<R: Rng>(&mut self, values: &[f32], n_bins: usize, ties: TieBreak<'_, R>, out: &mut Vec<u8>) {
        out.clear();
        self.append_nonzero_bins(values, n_bins, ties, out);
    }

    /// [`Binner::bin_nonzero`], appending the bins to `out` (a chunk's bins, written in place).
    pub fn append_nonzero_bins<R: Rng>(&mut self, values: &[f32], n_bins: usize, ties: TieBreak<'_, R>, out: &mut Vec<u8>) {
        if values.is_empty() {
            return;
        }
        if let Some(max) = small_int_max(values) {
            // SAFETY: small_int_max checked every value.
            unsafe { self.append_small_int_bins(values, max, n_bins, ties, out) };
            return;
        }
        self.sorted.clear();
        self.sorted.extend_from_slice(values);
        self.prepare_edges(n_bins);
        let random = self.take_draws(ties, values.len());
        let (edges, draws) = (&self.edges, &self.draws);
        out.extend(values.iter().enumerate().map(|(i, &v)| {
            let (l, r) = digits(v as f64, edges);
            if random {
                pick(l, r, draws[i])
            } else {
                lowest(l, r)
            }
        }));
    }

    /// [`Binner::append_nonzero_bins`] for values the caller has already checked, say while
    /// copying them: the small-integer path without its pass over the values to check them and
    /// find their largest (two of the histogram's three passes).
    ///
    /// # Safety
    /// Every value is an integer in `1..=max`, and `max` is below [`SMALL_INT_LIMIT`].
    pub unsafe fn append_small_int_bins<R: Rng>(
        &mut self,
        values: &[f32],
        max: u32,
        n_bins: usize,
        ties: TieBreak<'_, R>,
        out: &mut Vec<u8>,
    ) {
        debug_assert!(small_int_max(values).is_some_and(|m| m <= max) && max < SMALL_INT_LIMIT);
        let max = max as usize;
        let random_ties = matches!(ties, TieBreak::Random(_));
        // SAFETY: the caller's contract.
        unsafe { self.prepare_small_ints(values, max, n_bins) };
        self.take_draws(ties, values.len());
        let (pairs, draws) = (&self.lut_pair[..], &self.draws[..]);
        out.reserve(values.len());
        #[cfg(target_arch = "x86_64")]
        if crate::simd::avx512f() {
            let start = out.len();
            // SAFETY: the feature is present; `out` has room for values.len() more bytes;
            // every value is an integer in 1..=max (the caller's contract), and the pairs run
            // to max + 1.
            unsafe {
                small_int_bins_avx512(values, random_ties.then(|| &draws[..values.len()]), pairs, out.as_mut_ptr().add(start));
                out.set_len(start + values.len());
            }
            return;
        }
        let digits = |v: f32| {
            let p = pairs[small_int::value(v) as usize];
            let l = p as u8;
            (l, l - (p >> 8) as u8)
        };
        // Branch-free: whether a value is tied is random per cell, so a branch on it
        // mispredicts about half the time.
        if random_ties {
            out.extend(values.iter().zip(draws).map(|(&v, &x)| {
                let (l, r) = digits(v);
                pick(l, r, x)
            }));
        } else {
            out.extend(values.iter().map(|&v| {
                let (l, r) = digits(v);
                lowest(l, r)
            }));
        }
    }

    /// Edges and the (l, r) lookup table for integer values: a histogram instead of a sort
    /// (order statistics read off the cumulative counts), and one (l, r) lookup per value
    /// instead of two binary searches per gene. Same edges and digits as the general path.
    ///
    /// # Safety
    /// Every value is an integer in `1..=max`, and `max` is below [`SMALL_INT_LIMIT`].
    unsafe fn prepare_small_ints(&mut self, values: &[f32], max: usize, n_bins: usize) {
        // Four interleaved histograms: runs of equal counts (most genes are 1 or 2) would
        // otherwise chain every increment on the previous store to the same slot.
        let m = max + 1;
        self.hist.clear();
        self.hist.resize(4 * m, 0);
        let h = self.hist.as_mut_ptr();
        let mut quads = values.chunks_exact(4);
        for q in &mut quads {
            // SAFETY: each value is at most max (the caller's contract), so slot j * m + v is
            // inside the 4 * m counts.
            unsafe {
                *h.add(small_int::value(q[0]) as usize) += 1;
                *h.add(m + small_int::value(q[1]) as usize) += 1;
                *h.add(2 * m + small_int::value(q[2]) as usize) += 1;
                *h.add(3 * m + small_int::value(q[3]) as usize) += 1;
            }
        }
        for &v in quads.remainder() {
            // SAFETY: as above.
            unsafe { *h.add(small_int::value(v) as usize) += 1 };
        }
        // hist becomes cumulative: hist[v] = number of values <= v.
        let mut total = 0u32;
        for v in 0..m {
            total += self.hist[v] + self.hist[m + v] + self.hist[2 * m + v] + self.hist[3 * m + v];
            self.hist[v] = total;
        }
        self.hist.truncate(m);
        let cum = &self.hist;
        // The k-th smallest value is the first v with cum[v] > k. The edges ask for ascending k
        // (each edge's k and k + 1, so a step back of at most one): a cursor walks the histogram
        // once instead of a binary search per lookup.
        let mut v = 0usize;
        let at = |k: usize| {
            while v > 0 && cum[v - 1] as usize > k {
                v -= 1;
            }
            while cum[v] as usize <= k {
                v += 1;
            }
            v as f32
        };
        quantile_edges_with(values.len(), n_bins - 1, at, &mut self.edges);
        // l(v) = #edges <= v and r(v) = #edges < v for every v up to max + 1 (the vector
        // lookup's padding), in one walk up the edges, which ascend.
        self.lut_pair.clear();
        let edges = &self.edges;
        let (mut below, mut upto) = (0, 0);
        for v in 0..=max + 1 {
            let x = v as f64;
            while below < edges.len() && edges[below] < x {
                below += 1;
            }
            while upto < edges.len() && edges[upto] <= x {
                upto += 1;
            }
            self.lut_pair.push(upto as u16 | ((upto - below) as u16) << 8);
        }
    }

    fn prepare_edges(&mut self, n_bins: usize) {
        self.sorted.sort_unstable_by(f32::total_cmp);
        quantile_edges_into(&self.sorted, n_bins - 1, &mut self.edges);
    }
}

/// The largest of `values` when every one is an integer in `1..SMALL_INT_LIMIT` (the
/// small-integer path's condition), else `None`.
fn small_int_max(values: &[f32]) -> Option<u32> {
    // No early exit, so the check vectorises.
    let ok = values.iter().fold(true, |ok, &v| ok & small_int::is_int_in(v, 1.0, SMALL_INT_LIMIT as f32));
    ok.then(|| small_int::value(values.iter().copied().fold(0.0, f32::max)))
}

/// `np.quantile(x, np.linspace(0, 1, n_edges))` with the default "linear" method, for sorted
/// float32 `x` as the original sees it: numpy takes `b - a` in float32 and the rest in float64.
pub fn quantile_edges_into(sorted: &[f32], n_edges: usize, edges: &mut Vec<f64>) {
    quantile_edges_with(sorted.len(), n_edges, |i| sorted[i], edges)
}

/// [`quantile_edges_into`] over `n` values whose `i`-th smallest is `at(i)`.
fn quantile_edges_with(n: usize, n_edges: usize, mut at: impl FnMut(usize) -> f32, edges: &mut Vec<f64>) {
    edges.clear();
    let step = 1.0 / (n_edges as f64 - 1.0);
    for i in 0..n_edges {
        // np.linspace: i * step, with the endpoint set exactly.
        let q = if i + 1 == n_edges { 1.0 } else { i as f64 * step };
        // numpy >= 2's virtual index for "linear" (numpy 1.x used n*q + (1-q) - 1, which can
        // differ in the last bit; the reference fixtures come from numpy 2).
        let virt = (n - 1) as f64 * q;
        let value = if virt >= (n - 1) as f64 {
            at(n - 1) as f64
        } else if virt < 0.0 {
            at(0) as f64
        } else {
            // virt >= 0 here, so truncation is the floor (a call into libm on the baseline
            // target, which has no rounding instruction).
            let prev = virt as usize as f64;
            let gamma = virt - prev;
            let a = at(prev as usize);
            let b = at(prev as usize + 1);
            lerp(a, b, gamma)
        };
        edges.push(value);
    }
}

/// numpy's `_lerp`: the difference in the array's dtype (f32), the formula switching at t = 0.5.
/// Both sides computed and one picked by a mask: where the edges fall between values is random
/// per cell, so a branch mispredicted about half the time.
fn lerp(a: f32, b: f32, t: f64) -> f64 {
    let diff = (b - a) as f64;
    let (high, low) = (b as f64 - diff * (1.0 - t), a as f64 + diff * t);
    let pick_high = ((t >= 0.5) as u64).wrapping_neg();
    f64::from_bits((high.to_bits() & pick_high) | (low.to_bits() & !pick_high))
}

/// `(l, r)`: the number of edges <= x and < x. `np.digitize(x, edges)` is l and
/// `np.digitize(x, edges, right=True)` is r; they differ when x sits on tied edges.
#[inline]
fn digits(x: f64, edges: &[f64]) -> (u8, u8) {
    (edges.partition_point(|&e| e <= x) as u8, edges.partition_point(|&e| e < x) as u8)
}

/// Bins of small-integer `values` from their (l, l - r) `pairs`, sixteen at a time: [`pick`]
/// with `draws`, else [`lowest`]. A 32-bit gather per sixteen values instead of two byte loads
/// each, the product's high half from two even/odd 32x32 multiplies.
///
/// # Safety
/// AVX-512F is available; `out` has room for `values.len()` bytes; every value is an integer
/// `v` with `v + 1 < pairs.len()`; `draws`, if any, holds `values.len()` draws.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn small_int_bins_avx512(values: &[f32], draws: Option<&[u32]>, pairs: &[u16], out: *mut u8) {
    use std::arch::x86_64::*;
    let n = values.len();
    let base = pairs.as_ptr() as *const i32;
    let (byte, one) = (_mm512_set1_epi32(0xFF), _mm512_set1_epi32(1));
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n for the loads and stores; each gather reads pairs[v] and the entry
        // after it, both inside `pairs`.
        unsafe {
            let v = _mm512_loadu_ps(values.as_ptr().add(i));
            let idx = small_int::lanes::value(small_int::lanes::shifted(v));
            let p = _mm512_i32gather_epi32::<2>(idx, base);
            let l = _mm512_and_si512(p, byte);
            let span = _mm512_and_si512(_mm512_srli_epi32::<8>(p), byte);
            let bins = match draws {
                Some(d) => {
                    let x = _mm512_loadu_si512(d.as_ptr().add(i).cast());
                    // floor(x * span / 2^32) per lane: even lanes from the low halves, odd lanes
                    // from the high halves, where the product's high word already sits.
                    let even = _mm512_srli_epi64::<32>(_mm512_mul_epu32(x, span));
                    let odd = _mm512_mul_epu32(_mm512_srli_epi64::<32>(x), _mm512_srli_epi64::<32>(span));
                    _mm512_sub_epi32(l, _mm512_mask_blend_epi32(0xAAAA, even, odd))
                }
                // r + 1 when tied (span > 0), else l: l - span + min(span, 1).
                None => _mm512_add_epi32(_mm512_sub_epi32(l, span), _mm512_min_epu32(span, one)),
            };
            _mm_storeu_si128(out.add(i).cast(), _mm512_cvtepi32_epi8(bins));
        }
        i += 16;
    }
    for k in i..n {
        let p = pairs[small_int::value(values[k]) as usize];
        let (l, span) = ((p & 0xFF) as u8, (p >> 8) as u8);
        let b = match draws {
            Some(d) => pick(l, l - span, d[k]),
            None => lowest(l, l - span),
        };
        // SAFETY: k < n, within the room the caller gave.
        unsafe { out.add(k).write(b) };
    }
}

/// The lowest bin of a tied range, else the one bin.
#[inline]
fn lowest(l: u8, r: u8) -> u8 {
    if l == r {
        l
    } else {
        r + 1
    }
}

/// The original's `ceil(l - u (l - r))` for a uniform `u` in [0, 1), which is
/// `l - floor(u (l - r))`; with `u` a 32-bit fixed-point draw `x`, `floor(u span)` is
/// `(x * span) >> 32` (bias below span / 2^32, ~1e-8 for 50 bins). Untied values (l = r) get l.
#[inline]
fn pick(l: u8, r: u8, x: u32) -> u8 {
    l - ((x as u64 * (l - r) as u64) >> 32) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn lowest(values: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        Binner::new().bin_row::<ChaCha8Rng>(values, DEFAULT_N_BINS, TieBreak::Lowest, &mut out);
        out
    }

    #[test]
    fn small_int_bins_match_the_scalar_lookup_at_every_length() {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for n in [1usize, 15, 16, 17, 40, 333, 2000] {
            // Heavily tied cells (values 1..5) and spread ones (1..300).
            let top = if n % 2 == 0 { 5 } else { 300 };
            let values: Vec<f32> = (0..n).map(|_| rng.random_range(1..=top) as f32).collect();
            for random in [false, true] {
                let mut b = Binner::new();
                let mut got = vec![7u8]; // appended after what is there
                let mut draw = ChaCha8Rng::seed_from_u64(9);
                if random {
                    b.append_nonzero_bins(&values, DEFAULT_N_BINS, TieBreak::Random(&mut draw), &mut got);
                } else {
                    b.append_nonzero_bins::<ChaCha8Rng>(&values, DEFAULT_N_BINS, TieBreak::Lowest, &mut got);
                }
                let want: Vec<u8> = std::iter::once(7)
                    .chain(values.iter().enumerate().map(|(k, &v)| {
                        // The general path's digits, from the same edges.
                        let (l, r) = digits(v as f64, &b.edges);
                        if random {
                            pick(l, r, b.draws[k])
                        } else {
                            super::lowest(l, r)
                        }
                    }))
                    .collect();
                assert_eq!(got, want, "{n} values up to {top}, random ties {random}");
            }
        }
    }

    #[test]
    fn tie_free_cell_spans_1_to_50() {
        let values: Vec<f32> = (1..=100).map(|v| v as f32 * 1.5).collect();
        let bins = lowest(&values);
        assert_eq!(bins[0], 1);
        assert_eq!(*bins.last().unwrap(), 50);
        assert!(bins.windows(2).all(|w| w[0] <= w[1]), "monotone in value");
    }

    #[test]
    fn zeros_stay_zero_and_empty_rows_are_zero() {
        assert_eq!(lowest(&[0.0, 0.0]), vec![0, 0]);
        let b = lowest(&[0.0, 3.0, 0.0, 7.0]);
        assert_eq!((b[0], b[2]), (0, 0));
        assert!(b[1] >= 1 && b[3] == 50);
    }

    #[test]
    fn single_value_is_uniform_over_all_bins_when_random() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut seen = [0usize; 51];
        let mut out = Vec::new();
        let mut binner = Binner::new();
        for _ in 0..5000 {
            binner.bin_nonzero(&[4.0], DEFAULT_N_BINS, TieBreak::Random(&mut rng), &mut out);
            seen[out[0] as usize] += 1;
        }
        assert_eq!(seen[0], 0);
        assert!(seen[1..].iter().all(|&c| c > 50), "every bin 1..50 drawn: {seen:?}");
        assert_eq!(lowest(&[4.0]), vec![1]);
    }

    #[test]
    fn small_integer_path_equals_the_general_path() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut fast = Binner::new();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        // Reused binner, cells whose smallest value rises and falls: stale table entries from an
        // earlier cell would show.
        let offsets = [0.0f32, 0.0, 40.0, 0.0, 7.0, 0.0, 200.0, 3.0, 0.0];
        for (k, n) in [1usize, 2, 7, 50, 51, 300, 2000, 64, 33].into_iter().enumerate() {
            let values: Vec<f32> = (0..n).map(|_| (rng.random::<f64>().powi(4) * 300.0).floor() as f32 + 1.0 + offsets[k]).collect();
            fast.bin_nonzero::<ChaCha8Rng>(&values, DEFAULT_N_BINS, TieBreak::Lowest, &mut a);
            // Force the general path through bin_row (which never uses the lookup table).
            Binner::new().bin_row::<ChaCha8Rng>(&values, DEFAULT_N_BINS, TieBreak::Lowest, &mut b);
            assert_eq!(a, b, "n = {n}");
            let (mut r1, mut r2) = (ChaCha8Rng::seed_from_u64(n as u64), ChaCha8Rng::seed_from_u64(n as u64));
            fast.bin_nonzero(&values, DEFAULT_N_BINS, TieBreak::Random(&mut r1), &mut a);
            Binner::new().bin_row(&values, DEFAULT_N_BINS, TieBreak::Random(&mut r2), &mut b);
            assert_eq!(a, b, "n = {n}, random ties draw the same stream");
        }
    }

    #[test]
    fn quantiles_match_numpy_linear() {
        // np.quantile([1, 2, 4, 8], np.linspace(0, 1, 5)) = [1, 1.75, 3, 5, 8]
        let mut e = Vec::new();
        quantile_edges_into(&[1.0, 2.0, 4.0, 8.0], 5, &mut e);
        assert_eq!(e, vec![1.0, 1.75, 3.0, 5.0, 8.0]);
    }
}
