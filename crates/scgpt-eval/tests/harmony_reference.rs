//! Harmony against harmonypy 2.1.0 on `tests/data/eval/harmony_reference.json`, written by
//! `tests/gen/eval/gen_harmony_reference.py` (a planted additive batch effect on 700 real
//! PBMCs, and a real batch effect among 200 T cells of wu2020; see the generator).
//!
//! Our k-means initialisation draws other random numbers than harmonypy's, so the corrected
//! embeddings are compared as two harmonypy seeds compare with each other: the metrics that say
//! whether the batches were mixed and the cell types kept apart, averaged over five seeds on
//! each side, must agree within the width of the range harmonypy's own five seeds span (or a
//! floor where its seeds agree closely), and the corrections themselves (corrected − input)
//! must correlate with harmonypy's.
//!
//! The metrics of harmonypy's own output are recomputed here with this crate's scIB code and
//! checked against the values scib computed in the generator first, so that both sides of each
//! comparison are measured by the same ruler.

use std::path::Path;

use scgpt_eval::harmony::{harmonize, HarmonyOptions};
use scgpt_eval::neighbors::exact_knn;
use scgpt_eval::scib::{codes, integration_metrics, IntegrationInput, IntegrationOptions};
use serde_json::Value;

/// Our scib code against scib on the same embedding: silhouettes (float32 distances) and graph
/// LISI (scib reads path lengths back with 6 significant digits); see scib_reference.rs.
const RULER_TOL: f64 = 1e-4;
/// Floor of the band around harmonypy's seed range, for metrics whose seeds agree closely.
const BAND_FLOOR: f64 = 0.02;
/// How far below harmonypy's lowest seed-to-seed correlation of the corrections ours may fall.
const CORR_MARGIN: f64 = 0.05;

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/eval/harmony_reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}
fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

/// The generator's kNN batch mixing: per cell, the share of its 15 nearest other cells in
/// another batch over the share of all other cells in another batch; mean over cells.
fn knn_batch_mixing(x: &[f32], dim: usize, batches: &[u32], k: usize) -> f64 {
    let knn = exact_knn(x, dim, k + 1).unwrap();
    let n = batches.len();
    let mut size = vec![0usize; n];
    for &b in batches {
        size[b as usize] += 1;
    }
    (0..n)
        .map(|i| {
            let (idx, _) = knn.row(i);
            let other = idx[1..].iter().filter(|&&j| batches[j as usize] != batches[i]).count() as f64 / k as f64;
            other / ((n - size[batches[i] as usize]) as f64 / (n - 1) as f64)
        })
        .sum::<f64>()
        / n as f64
}

/// Mean over labels seen in more than one batch of the largest distance between the label's
/// per-batch centroids.
fn batch_mean_gap(x: &[f32], dim: usize, labels: &[u32], batches: &[u32]) -> f64 {
    let (nl, nb) = (*labels.iter().max().unwrap() as usize + 1, *batches.iter().max().unwrap() as usize + 1);
    let mut sum = vec![0f64; nl * nb * dim];
    let mut cnt = vec![0f64; nl * nb];
    for i in 0..labels.len() {
        let g = labels[i] as usize * nb + batches[i] as usize;
        cnt[g] += 1.0;
        for a in 0..dim {
            sum[g * dim + a] += x[i * dim + a] as f64;
        }
    }
    let mut gaps = Vec::new();
    for l in 0..nl {
        let present: Vec<usize> = (0..nb).filter(|&b| cnt[l * nb + b] > 0.0).collect();
        if present.len() < 2 {
            continue;
        }
        let cent = |b: usize| -> Vec<f64> { (0..dim).map(|a| sum[(l * nb + b) * dim + a] / cnt[l * nb + b]).collect() };
        let mut g = 0f64;
        for (p, &a) in present.iter().enumerate() {
            for &b in &present[p + 1..] {
                let (ca, cb) = (cent(a), cent(b));
                g = g.max(ca.iter().zip(&cb).map(|(u, v)| (u - v) * (u - v)).sum::<f64>().sqrt());
            }
        }
        gaps.push(g);
    }
    gaps.iter().sum::<f64>() / gaps.len() as f64
}

const METRICS: [&str; 6] = ["ASW_label", "ASW_label/batch", "iLISI", "cLISI", "knn_batch_mixing", "batch_mean_gap"];

/// The six metrics of an embedding, in `METRICS` order.
fn measure(x: &[f32], dim: usize, labels: &[String], batches: &[String], k_mix: usize) -> Vec<f64> {
    let input = IntegrationInput { embedding: x, dim, labels, batches, pre: None };
    let rep = integration_metrics(&input, &IntegrationOptions { resolutions: vec![1.0], ..Default::default() }, &mut |_| {}).unwrap();
    let (lab, _) = codes(labels);
    let (bat, _) = codes(batches);
    vec![
        rep.asw_label.unwrap(),
        rep.asw_batch.unwrap(),
        rep.ilisi.unwrap(),
        rep.clisi.unwrap(),
        knn_batch_mixing(x, dim, &bat, k_mix),
        batch_mean_gap(x, dim, &lab, &bat),
    ]
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn harmony_matches_harmonypy_on_what_matters() {
    let f = fixture();
    let k_mix = f["knn_batch_mixing_k"].as_u64().unwrap() as usize;
    for case in f["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let dim = case["dims"].as_u64().unwrap() as usize;
        let x = f32s(&case["inputs"]["embedding"]);
        let labels = strings(&case["inputs"]["labels"]);
        let batches = strings(&case["inputs"]["batches"]);
        let (bat, _) = codes(&batches);
        let runs = case["harmonypy_runs"].as_array().unwrap();

        // The ruler: our metrics of harmonypy's seed-0 output against scib's.
        let theirs = f32s(&case["harmonypy_z_corr_seed0"]);
        let m_theirs = measure(&theirs, dim, &labels, &batches, k_mix);
        for (j, key) in METRICS.iter().enumerate() {
            let want = runs[0]["metrics"][key].as_f64().unwrap();
            let tol = if *key == "batch_mean_gap" { 1e-4 * want } else { RULER_TOL };
            assert!((m_theirs[j] - want).abs() <= tol, "{name} {key} of harmonypy's output: ours {} scib {want}", m_theirs[j]);
        }

        // Five seeds on each side: one seed of either is one draw of the initialisation.
        let delta = |z: &[f32]| -> Vec<f64> { z.iter().zip(&x).map(|(a, b)| (*a - *b) as f64).collect() };
        let theirs_delta = delta(&theirs);
        let (mut ours, mut corr) = (Vec::new(), Vec::new());
        for seed in 0..runs.len() as u64 {
            let h = harmonize(&x, dim, &bat, &HarmonyOptions { seed, ..Default::default() }).unwrap();
            assert_eq!(h.n_clusters as u64, case["harmonypy_params"]["nclust"].as_u64().unwrap());
            if seed == 0 {
                println!("{name}: {} iterations at seed 0 (harmonypy seed 0: {})", h.iterations, runs[0]["n_iterations"]);
            }
            ours.push(measure(&h.corrected, dim, &labels, &batches, k_mix));
            corr.push(pearson(&delta(&h.corrected), &theirs_delta));
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        for (j, key) in METRICS.iter().enumerate() {
            let seeds: Vec<f64> = runs.iter().map(|r| r["metrics"][key].as_f64().unwrap()).collect();
            let mine: Vec<f64> = ours.iter().map(|m| m[j]).collect();
            let (lo, hi) = (seeds.iter().copied().fold(f64::INFINITY, f64::min), seeds.iter().copied().fold(f64::NEG_INFINITY, f64::max));
            let floor = if *key == "batch_mean_gap" { BAND_FLOOR * hi } else { BAND_FLOOR };
            let tol = (hi - lo).max(floor);
            let before = case["uncorrected"][key].as_f64().unwrap();
            let (m_hp, m_ours) = (mean(&seeds), mean(&mine));
            println!(
                "  {key:17} uncorrected {before:.4}  harmonypy mean {m_hp:.4} [{lo:.4}, {hi:.4}]  ours mean {m_ours:.4} {:?}  |diff| {:.4} (tol {tol:.4})",
                mine.iter().map(|v| (v * 1e4).round() / 1e4).collect::<Vec<_>>(),
                (m_ours - m_hp).abs()
            );
            assert!((m_ours - m_hp).abs() <= tol, "{name} {key}: our mean {m_ours} vs harmonypy's {m_hp} (seeds [{lo}, {hi}], tol {tol})");
        }

        // The corrections (corrected − input) agree with harmonypy seed 0's as closely as
        // harmonypy's other seeds' do.
        let hp_corr: Vec<f64> =
            case["correction_correlation_seed0_vs_seeds_1_4"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let hp_min = hp_corr.iter().copied().fold(f64::INFINITY, f64::min);
        println!("  correlation of the corrections with harmonypy seed 0: ours {corr:.4?}, harmonypy seeds 1-4 {hp_corr:.4?}");
        for (seed, r) in corr.iter().enumerate() {
            assert!(
                *r >= hp_min - CORR_MARGIN,
                "{name} seed {seed}: corrections correlate {r} with harmonypy seed 0's (its own seeds: >= {hp_min})"
            );
        }
    }
}
