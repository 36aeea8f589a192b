//! Per-cell quantile binning exactly as the original's `binning` (spec §3.1).
//!
//! Over a cell's nonzero values, `n_bins - 1` edges are taken at evenly spaced quantiles with
//! numpy's default linear interpolation (duplicate edges kept). A value strictly between edges
//! gets a fixed bin; a value equal to a run of tied edges gets a bin drawn uniformly over the
//! tied range, `ceil(l - U (l - r))`, as the original's `_digitize`. [`TieBreak::Lowest`] picks
//! the lowest bin of that range instead, so the output is the same on every run. Zeros stay 0.

use rand::Rng;

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
}

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
        self.prepare_edges(n_bins);
        let edges = &self.edges;
        let mut ties = ties;
        out.extend(row.iter().map(|&v| if v == 0.0 { 0 } else { digit(v as f64, edges, &mut ties) }));
    }

    /// Bin values that are all nonzero (the shard layout stores only expressed genes).
    pub fn bin_nonzero<R: Rng>(&mut self, values: &[f32], n_bins: usize, ties: TieBreak<'_, R>, out: &mut Vec<u8>) {
        out.clear();
        if values.is_empty() {
            return;
        }
        self.sorted.clear();
        self.sorted.extend_from_slice(values);
        self.prepare_edges(n_bins);
        let edges = &self.edges;
        let mut ties = ties;
        out.extend(values.iter().map(|&v| digit(v as f64, edges, &mut ties)));
    }

    fn prepare_edges(&mut self, n_bins: usize) {
        self.sorted.sort_unstable_by(f32::total_cmp);
        quantile_edges_into(&self.sorted, n_bins - 1, &mut self.edges);
    }
}

/// `np.quantile(x, np.linspace(0, 1, n_edges))` with the default "linear" method, for sorted
/// float32 `x` as the original sees it: numpy takes `b - a` in float32 and the rest in float64.
pub fn quantile_edges_into(sorted: &[f32], n_edges: usize, edges: &mut Vec<f64>) {
    edges.clear();
    let n = sorted.len();
    let step = 1.0 / (n_edges as f64 - 1.0);
    for i in 0..n_edges {
        // np.linspace: i * step, with the endpoint set exactly.
        let q = if i + 1 == n_edges { 1.0 } else { i as f64 * step };
        // numpy >= 2's virtual index for "linear" (numpy 1.x used n*q + (1-q) - 1, which can
        // differ in the last bit; the reference fixtures come from numpy 2).
        let virt = (n - 1) as f64 * q;
        let value = if virt >= (n - 1) as f64 {
            sorted[n - 1] as f64
        } else if virt < 0.0 {
            sorted[0] as f64
        } else {
            let prev = virt.floor();
            let gamma = virt - prev;
            let a = sorted[prev as usize];
            let b = sorted[prev as usize + 1];
            lerp(a, b, gamma)
        };
        edges.push(value);
    }
}

/// numpy's `_lerp`: the difference in the array's dtype (f32), the formula switching at t = 0.5.
fn lerp(a: f32, b: f32, t: f64) -> f64 {
    let diff = (b - a) as f64;
    if t >= 0.5 {
        b as f64 - diff * (1.0 - t)
    } else {
        a as f64 + diff * t
    }
}

#[inline]
fn digit<R: Rng>(x: f64, edges: &[f64], ties: &mut TieBreak<'_, R>) -> u8 {
    // np.digitize(x, edges) = #edges <= x ; np.digitize(x, edges, right=True) = #edges < x.
    let l = edges.partition_point(|&e| e <= x);
    let r = edges.partition_point(|&e| e < x);
    if l == r {
        return l as u8;
    }
    match ties {
        TieBreak::Lowest => (r + 1) as u8,
        TieBreak::Random(rng) => {
            let u: f64 = rng.random();
            (l as f64 - u * (l - r) as f64).ceil() as u8
        }
    }
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
    fn quantiles_match_numpy_linear() {
        // np.quantile([1, 2, 4, 8], np.linspace(0, 1, 5)) = [1, 1.75, 3, 5, 8]
        let mut e = Vec::new();
        quantile_edges_into(&[1.0, 2.0, 4.0, 8.0], 5, &mut e);
        assert_eq!(e, vec![1.0, 1.75, 3.0, 5.0, 8.0]);
    }
}
