//! Over-representation of a gene list in gene sets: the hypergeometric upper tail of the
//! overlap (scipy's `hypergeom.sf(k − 1, M, n, N)`) and Benjamini–Hochberg adjusted p-values
//! (statsmodels' `multipletests(method="fdr_bh")`).
//!
//! Universe rule: the universe is the genes given as `universe` (each once; for a screen, its
//! genes matched to the model vocabulary). The list and every set are cut to the universe
//! first: M = |universe|, n = |set ∩ universe|, N = |list ∩ universe|, k = |list ∩ set ∩
//! universe|. Sets with no gene in the universe cannot be tested and are skipped (counted);
//! every other set is one test in the BH correction, overlap 0 included (p = 1).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::atomic;

use super::gmt::GeneSet;

/// ln(n!) from the Stirling series (exact factorials below 21), good to a few ulp of the result.
fn ln_factorial(n: u64) -> f64 {
    if n < 21 {
        return (1..=n).map(|i| i as f64).product::<f64>().ln();
    }
    let x = n as f64 + 1.0;
    let (x2, lx) = (x * x, x.ln());
    (x - 0.5) * lx - x
        + 0.5 * (2.0 * std::f64::consts::PI).ln()
        + (1.0 / 12.0 - (1.0 / 360.0 - (1.0 / 1260.0 - 1.0 / (1680.0 * x2)) / x2) / x2) / x
}

fn ln_choose(n: u64, k: u64) -> f64 {
    ln_factorial(n) - ln_factorial(k) - ln_factorial(n - k)
}

/// P(X ≥ k) for X ~ Hypergeometric(population `m`, `n` successes in it, `draws` drawn); 1 for
/// k ≤ max(0, draws + n − m), 0 above min(n, draws); NaN unless n, draws ≤ m.
/// Relative accuracy about 1e-10 for populations of tens of thousands of genes (the rounding of
/// ln(m!) bounds it).
pub fn hypergeom_sf(k: u64, m: u64, n: u64, draws: u64) -> f64 {
    if n > m || draws > m {
        return f64::NAN; // no such distribution
    }
    let lo = (draws + n).saturating_sub(m);
    let hi = n.min(draws);
    if k <= lo {
        return 1.0;
    }
    if k > hi {
        return 0.0;
    }
    // Each term's log from log-factorials (no drift along the sum), summed relative to the
    // largest term (no overflow when k lies far below the mode), smallest first. The terms fall
    // past the mode; once below exp's range relative to the largest, the rest cannot count.
    let ln_total = ln_choose(m, draws);
    let mut logs = Vec::new();
    let mut top = f64::NEG_INFINITY;
    for i in k..=hi {
        let lt = ln_choose(n, i) + ln_choose(m - n, draws - i) - ln_total;
        top = top.max(lt);
        logs.push(lt);
        if lt < top - 750.0 {
            break;
        }
    }
    let sum: f64 = logs.iter().rev().map(|&l| (l - top).exp()).sum();
    (top + sum.ln()).exp().min(1.0)
}

/// statsmodels' `multipletests(p, method="fdr_bh")[1]`: p sorted up, p_(i) / (i/n), the running
/// minimum from the largest down, capped at 1, in the input order.
pub fn benjamini_hochberg(p: &[f64]) -> Vec<f64> {
    let n = p.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let mut adj = vec![0f64; n];
    let mut running = f64::INFINITY;
    for r in (0..n).rev() {
        let v = p[order[r]] / ((r + 1) as f64 / n as f64);
        running = running.min(v);
        adj[order[r]] = running.min(1.0);
    }
    adj
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnrichmentRow {
    pub set: String,
    pub description: String,
    /// Genes of the set in the universe.
    pub set_size: usize,
    /// The list's genes in the set (list order).
    pub overlap_genes: Vec<String>,
    pub p_value: f64,
    pub adjusted_p: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Enrichment {
    pub universe_size: usize,
    /// The list's genes in the universe.
    pub list_size: usize,
    /// The list's genes outside the universe (ignored).
    pub list_outside_universe: usize,
    /// Sets with no gene in the universe (not tested).
    pub sets_skipped: usize,
    /// One row per tested set, by increasing p (ties: file order).
    pub rows: Vec<EnrichmentRow>,
}

/// Tests `gene_list` against every set of `sets` within `universe` (see the module docs).
pub fn enrichment(gene_list: &[String], sets: &[GeneSet], universe: &[String]) -> Result<Enrichment> {
    let universe: HashSet<&str> = universe.iter().map(String::as_str).collect();
    if universe.is_empty() {
        bail!("enrichment: the universe (the genes that could have been listed) is empty");
    }
    let mut seen = HashSet::new();
    let list: Vec<&str> = gene_list.iter().map(String::as_str).filter(|g| seen.insert(*g)).collect();
    let in_list: Vec<&str> = list.iter().copied().filter(|g| universe.contains(g)).collect();
    if in_list.is_empty() {
        bail!("enrichment: none of the {} listed genes is in the universe of {} genes", list.len(), universe.len());
    }
    let list_set: HashSet<&str> = in_list.iter().copied().collect();
    let m = universe.len() as u64;
    let mut rows = Vec::new();
    let mut skipped = 0;
    for s in sets {
        let set_size = s.genes.iter().filter(|g| universe.contains(g.as_str())).count();
        if set_size == 0 {
            skipped += 1;
            continue;
        }
        let members: HashSet<&str> = s.genes.iter().map(String::as_str).collect();
        let overlap_genes: Vec<String> = in_list.iter().filter(|g| members.contains(*g)).map(|g| g.to_string()).collect();
        let p = hypergeom_sf(overlap_genes.len() as u64, m, set_size as u64, list_set.len() as u64);
        rows.push(EnrichmentRow {
            set: s.name.clone(),
            description: s.description.clone(),
            set_size,
            overlap_genes,
            p_value: p,
            adjusted_p: 0.0,
        });
    }
    let adj = benjamini_hochberg(&rows.iter().map(|r| r.p_value).collect::<Vec<_>>());
    for (r, a) in rows.iter_mut().zip(adj) {
        r.adjusted_p = a;
    }
    rows.sort_by(|a, b| a.p_value.total_cmp(&b.p_value));
    Ok(Enrichment {
        universe_size: universe.len(),
        list_size: in_list.len(),
        list_outside_universe: list.len() - in_list.len(),
        sets_skipped: skipped,
        rows,
    })
}

impl Enrichment {
    /// TSV with the columns `set`, `description`, `set_size`, `overlap`, `p_value`, `adjusted_p`,
    /// `genes` (the overlap genes, `;`-joined).
    pub fn to_tsv(&self) -> String {
        let clean = |s: &str| s.replace(['\t', '\n', '\r'], " ");
        let mut s = String::from("set\tdescription\tset_size\toverlap\tp_value\tadjusted_p\tgenes\n");
        for r in &self.rows {
            s.push_str(&format!(
                "{}\t{}\t{}\t{}\t{:e}\t{:e}\t{}\n",
                clean(&r.set),
                clean(&r.description),
                r.set_size,
                r.overlap_genes.len(),
                r.p_value,
                r.adjusted_p,
                r.overlap_genes.join(";")
            ));
        }
        s
    }

    /// Writes [`Enrichment::to_tsv`] to `dir/name` atomically.
    pub fn write_tsv(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        atomic::write(dir, name, self.to_tsv().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypergeometric_tail_by_hand() {
        // M=10, n=4, N=3: P(X>=2) = [C(4,2)C(6,1) + C(4,3)] / C(10,3) = (36 + 4) / 120.
        assert!((hypergeom_sf(2, 10, 4, 3) - 40.0 / 120.0).abs() < 1e-15);
        assert_eq!(hypergeom_sf(0, 10, 4, 3), 1.0);
        assert_eq!(hypergeom_sf(4, 10, 4, 3), 0.0);
        assert!(hypergeom_sf(1, 10, 11, 3).is_nan());
        // Far below the mode (pmf(1) underflows on its own): the tail is 1.
        let far = hypergeom_sf(1, 20_000, 5_000, 5_000);
        assert!((far - 1.0).abs() < 1e-10, "{far}");
        assert!((ln_factorial(25) - (1..=25).map(|i| (i as f64).ln()).sum::<f64>()).abs() < 1e-12);
    }

    #[test]
    fn bh_by_hand() {
        // Sorted 0.01, 0.03, 0.04, 0.5 → 0.04, 0.06, 0.0533, 0.5 → running minimum from the top.
        let a = benjamini_hochberg(&[0.01, 0.04, 0.03, 0.5]);
        let want = [0.04, 0.04 / 0.75, 0.04 / 0.75, 0.5];
        assert!(a.iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-15), "{a:?}");
        assert!(benjamini_hochberg(&[]).is_empty());
    }
}
