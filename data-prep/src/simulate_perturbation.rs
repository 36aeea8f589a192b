//! Simulated Perturb-seq screens with planted truth, in the GEARS format
//! (`scgpt-prep simulate-perturbation`), so the perturbation recipe's tests and docs can check
//! what a model learned against effects that are known.
//!
//! **Genes.** The first `--genes` vocabulary symbols that have an Ensembl id (as
//! `scgpt-prep simulate` picks them), so all are in the scGPT vocabulary. Each gene has a base
//! abundance from a log-normal profile (σ = 1.2), scaled to `--counts-per-gene` (default 4)
//! counts per gene in an average cell; at the default about 70% of X's entries are non-zero. The perturbed genes, their targets and the synergy targets are
//! drawn from the more expressed half of the genes, where an effect is visible in 40 cells.
//!
//! **Planted network** (all fold changes are log2, on the mean count of a gene):
//! - each perturbed gene g is knocked down to a fraction U(0.1, 0.2) of its mean
//!   (`knockdown_lfc` = log2 of that fraction), and has `--targets-per-gene` targets (never g
//!   itself), each with an lfc of random sign and size U(`--min-lfc`, `--max-lfc`);
//! - a single `g+ctrl` shifts g and its targets by those lfcs;
//! - a double `A+B` (A < B by symbol) has the **sum** of both singles' lfc vectors (knockdowns
//!   included). A share `--synergy-fraction` of the doubles is `synergy`: it adds its own
//!   `--synergy-targets` targets (disjoint from A, B and both singles' targets), each with an lfc
//!   drawn like a single's, that no single explains. The rest are `additive`.
//!
//! **Modules** (`--modules M`, off by default). A synergy double as above has targets of its
//! own, so nothing else in the screen predicts them: no model can beat the additive baseline on
//! a held-out one. With `--modules M` (M ≥ 2) the synergy is learnable instead:
//! - the perturbed genes are cut into M modules (a seeded order, balanced sizes: the first
//!   `perturbed_genes % M` modules have one gene more);
//! - each unordered pair of modules {i, j} has a **program**: `--synergy-targets` targets with
//!   lfcs drawn like a single's, free of every gene of modules i and j and of all their
//!   singles' targets (the plan is refused when too few genes are free);
//! - every double whose genes lie in two different modules i ≠ j is `synergy` and adds the
//!   program of {i, j} (the same targets and lfcs for all such doubles) to the sum of its
//!   singles; every double within one module is `additive`. Every pair of modules has a program;
//!   `--synergy-fraction` is then the share of the doubles drawn from the pairs across modules
//!   (the rest are drawn from the pairs within one).
//!
//! So the synergy of a double follows from the modules of its two genes, which a model can
//! learn from the training doubles that involve each gene.
//!
//! **Cells.** A cell of condition c has expected count `library · μ_g · 2^lfc_c(g)` for gene g,
//! with `library` ~ LogNormal(0, 0.3); counts are negative binomial (Gamma–Poisson, dispersion
//! r = [`NB_DISPERSION`]). Each row is then normalised to a total of 1e4 and log1p'd (natural
//! log), as GEARS's data are, and stored as a float32 CSR `X`. Because of that normalisation a
//! condition also moves every non-target gene slightly (a compositional effect): its expected
//! log2 shift is `-composition_log2` of the condition, written in the truth. The cells of all
//! conditions are shuffled together (seeded), so a reader cannot rely on their order.
//!
//! **h5ad** (what GEARS's `perturb_processed.h5ad` holds, less `uns`):
//! - `obs` index `cell_0000000`…; `condition` (categorical: `ctrl`, `G+ctrl`, `A+B`),
//!   `cell_type` (categorical, `--cell-type`, default `K562`), `dose_val` (categorical: `1` for
//!   ctrl, `1+1` for two-part conditions), `control` (int64: 1 for ctrl cells, else 0),
//!   `condition_name` (categorical, `{cell_type}_{condition}_{dose_val}`);
//! - `var` index = Ensembl ids, `var["gene_name"]` = symbols;
//! - `uns` is empty: the DE gene lists (`rank_genes_groups_cov_all`, `top_non_dropout_de_20`…)
//!   are left to the reader to compute.
//!
//! **Truth JSON** (`--truth`, default `<out stem>.truth.json` beside the h5ad):
//! ```text
//! { "format": "scgpt-prep simulate-perturbation truth 1", "h5ad": "screen.h5ad",
//!   "args": { "seed": 0, "genes": 300, "perturbed_genes": 24, "doubles": 30,
//!             "synergy_fraction": 0.5, "cells_per_condition": 40, "control_cells": 400,
//!             "targets_per_gene": 15, "synergy_targets": 15, "min_lfc": 0.5, "max_lfc": 2.0,
//!             "counts_per_gene": 4.0, "cell_type": "K562" },
//!   "n_cells": 2560, "lfc_base": 2, "nb_dispersion": 2.0,
//!   "control": { "condition": "ctrl", "n_cells": 400 },
//!   "singles": [ { "condition": "G+ctrl", "gene": "G", "gene_id": "ENSG…", "index": 17,
//!                  "knockdown_lfc": -2.9, "module": 1, "n_cells": 40, "composition_log2": 0.03,
//!                  "targets": [ { "gene": "T", "gene_id": "ENSG…", "index": 5, "lfc": 1.3 }, … ] }, … ],
//!   "doubles": [ { "condition": "A+B", "genes": ["A", "B"], "kind": "additive" | "synergy",
//!                  "program": [0, 2], "n_cells": 40, "composition_log2": -0.1,
//!                  "synergy_targets": [ { "gene", "gene_id", "index", "lfc" }, … ] }, … ],
//!   "modules": [ { "module": 0, "genes": ["A", …] }, … ],
//!   "programs": [ { "modules": [0, 1], "targets": [ { "gene", "gene_id", "index", "lfc" }, … ] }, … ] }
//! ```
//! `index` is the gene's position in `var`. `synergy_targets` is empty for additive doubles.
//! Only with `--modules`: `args.modules`, each single's `module`, a synergy double's `program`
//! (its two modules, ascending; its `synergy_targets` are that program's targets), and the
//! top-level `modules` (the genes of each) and `programs` (one per pair of modules, in order
//! (0, 1), (0, 2), …); without it these keys are absent and the file is as before.
//! The true lfc of any condition follows from the rules above; `composition_log2` =
//! log2(Σ_g μ_g 2^lfc(g) / Σ_g μ_g) is how much its expected library grows.
//!
//! Every random decision is keyed by (seed, stream, index) through `scgpt_data::seed`; each
//! cell draws from its own stream keyed by its row, so the file is the same whatever the thread
//! count. The h5ad and the truth are each written atomically (temp file, then rename).

use std::path::{Path, PathBuf};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma, LogNormal, Poisson};
use rayon::prelude::*;
use serde::Serialize;

use scgpt_data::h5ad::{Column, Frame, H5adWriter};
use scgpt_data::seed::rng_for;

#[derive(Debug, Clone, clap::Args)]
pub struct SimulatePerturbationArgs {
    /// Output h5ad path (GEARS format).
    #[arg(long)]
    pub out: PathBuf,
    /// Truth JSON path (default: `<out stem>.truth.json` beside the output).
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// Number of genes (real vocabulary symbols with Ensembl ids).
    #[arg(long, default_value_t = 300)]
    pub genes: usize,
    /// Number of perturbed genes, each with a single condition `G+ctrl`.
    #[arg(long, default_value_t = 24)]
    pub perturbed_genes: usize,
    /// Number of double perturbations `A+B` among the perturbed genes.
    #[arg(long, default_value_t = 30)]
    pub doubles: usize,
    /// Share of the doubles with a planted non-additive (synergy) effect. With --modules, the
    /// share of the doubles drawn from pairs of genes in different modules.
    #[arg(long, default_value_t = 0.5)]
    pub synergy_fraction: f64,
    /// Split the perturbed genes into this many modules (at least 2) and plant one synergy
    /// program per pair of modules, shared by every double across that pair (a structure a
    /// model can learn); doubles within a module are additive. Off by default: each synergy
    /// double then has its own targets, which nothing else in the screen predicts.
    #[arg(long)]
    pub modules: Option<usize>,
    /// Cells per perturbed condition.
    #[arg(long, default_value_t = 40)]
    pub cells_per_condition: usize,
    /// Control (`ctrl`) cells.
    #[arg(long, default_value_t = 400)]
    pub control_cells: usize,
    /// Targets of each perturbed gene.
    #[arg(long, default_value_t = 15)]
    pub targets_per_gene: usize,
    /// Targets of each synergy double's own effect (default: --targets-per-gene).
    #[arg(long)]
    pub synergy_targets: Option<usize>,
    /// Smallest |log2 fold change| of a planted target.
    #[arg(long, default_value_t = 0.5)]
    pub min_lfc: f64,
    /// Largest |log2 fold change| of a planted target.
    #[arg(long, default_value_t = 2.0)]
    pub max_lfc: f64,
    /// Mean count of a gene in an average control cell; lower makes a sparser screen whose
    /// effects are harder to see.
    #[arg(long, default_value_t = 4.0)]
    pub counts_per_gene: f64,
    /// The `cell_type` label of every cell.
    #[arg(long, default_value = "K562")]
    pub cell_type: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Negative binomial dispersion r: variance = m + m²/r.
pub const NB_DISPERSION: f64 = 2.0;
const PROFILE_SIGMA: f64 = 1.2;
const LIBRARY_SIGMA: f64 = 0.3;
const KNOCKDOWN_REMAINING: (f64, f64) = (0.1, 0.2);
const TARGET_SUM: f64 = 1e4;

const STREAM_PROFILE: u64 = 0x9E27_0001;
const STREAM_NETWORK: u64 = 0x9E27_0002;
const STREAM_DOUBLES: u64 = 0x9E27_0003;
const STREAM_ORDER: u64 = 0x9E27_0004;
const STREAM_MODULES: u64 = 0x9E27_0005;
const STREAM_CELL: u64 = 0x9E27_00CE;

#[derive(Debug, Clone, Serialize)]
pub struct TargetTruth {
    pub gene: String,
    pub gene_id: String,
    pub index: usize,
    pub lfc: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ControlTruth {
    pub condition: String,
    pub n_cells: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SingleTruth {
    pub condition: String,
    pub gene: String,
    pub gene_id: String,
    pub index: usize,
    pub knockdown_lfc: f64,
    /// The gene's module (with `--modules` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<usize>,
    pub n_cells: usize,
    pub composition_log2: f64,
    pub targets: Vec<TargetTruth>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DoubleTruth {
    pub condition: String,
    pub genes: [String; 2],
    pub kind: &'static str,
    /// The module pair whose program a synergy double carries (with `--modules` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub program: Option<[usize; 2]>,
    pub n_cells: usize,
    pub composition_log2: f64,
    pub synergy_targets: Vec<TargetTruth>,
}

/// A module of perturbed genes (`--modules`).
#[derive(Debug, Clone, Serialize)]
pub struct ModuleTruth {
    pub module: usize,
    pub genes: Vec<String>,
}

/// The synergy program of a pair of modules (`--modules`): the targets every double across the
/// pair adds to the sum of its singles.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramTruth {
    pub modules: [usize; 2],
    pub targets: Vec<TargetTruth>,
}

/// The generator's settings, as given (with `synergy_targets` resolved).
#[derive(Debug, Clone, Serialize)]
pub struct ArgsTruth {
    pub seed: u64,
    pub genes: usize,
    pub perturbed_genes: usize,
    pub doubles: usize,
    pub synergy_fraction: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modules: Option<usize>,
    pub cells_per_condition: usize,
    pub control_cells: usize,
    pub targets_per_gene: usize,
    pub synergy_targets: usize,
    pub min_lfc: f64,
    pub max_lfc: f64,
    pub counts_per_gene: f64,
    pub cell_type: String,
}

/// The truth file; see the module header for its schema.
#[derive(Debug, Clone, Serialize)]
pub struct ScreenTruth {
    pub format: &'static str,
    pub h5ad: String,
    pub args: ArgsTruth,
    pub n_cells: usize,
    pub lfc_base: u32,
    pub nb_dispersion: f64,
    pub control: ControlTruth,
    pub singles: Vec<SingleTruth>,
    pub doubles: Vec<DoubleTruth>,
    /// With `--modules`: the modules' genes, and the program of every pair of modules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modules: Option<Vec<ModuleTruth>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub programs: Option<Vec<ProgramTruth>>,
}

/// One condition to simulate: its name, dose, cell count and per-gene log2 fold changes.
struct Condition {
    name: String,
    dose: &'static str,
    n_cells: usize,
    lfc: Vec<f64>,
}

/// What [`plan`] decides before any cell is drawn.
struct Plan {
    ids: Vec<String>,
    symbols: Vec<String>,
    /// Base mean count per gene.
    mu: Vec<f64>,
    conditions: Vec<Condition>,
    truth: ScreenTruth,
}

/// `<out stem>.truth.json` beside `out`.
pub fn default_truth_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "screen".into());
    out.with_file_name(format!("{stem}.truth.json"))
}

fn shuffle<T, R: Rng>(v: &mut [T], rng: &mut R) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.random_range(0..=i));
    }
}

/// `k` distinct items of `pool` (in a seeded random order).
fn draw<R: Rng>(pool: &[usize], k: usize, rng: &mut R) -> Vec<usize> {
    let mut p = pool.to_vec();
    for i in 0..k.min(p.len()) {
        let j = rng.random_range(i..p.len());
        p.swap(i, j);
    }
    p.truncate(k);
    p
}

fn signed_lfc<R: Rng>(a: &SimulatePerturbationArgs, rng: &mut R) -> f64 {
    let size = if a.max_lfc > a.min_lfc { rng.random_range(a.min_lfc..=a.max_lfc) } else { a.min_lfc };
    if rng.random_bool(0.5) {
        size
    } else {
        -size
    }
}

fn validate(a: &SimulatePerturbationArgs) -> anyhow::Result<usize> {
    let syn_targets = a.synergy_targets.unwrap_or(a.targets_per_gene);
    let pool = a.genes / 2;
    anyhow::ensure!(a.genes >= 4, "--genes {} is too small for a screen: use at least 4", a.genes);
    anyhow::ensure!(
        a.perturbed_genes >= 1 && a.perturbed_genes <= pool,
        "--perturbed-genes {} must be in 1..={pool}: perturbed genes come from the more expressed half of the --genes {}",
        a.perturbed_genes,
        a.genes
    );
    anyhow::ensure!(
        a.targets_per_gene < pool,
        "--targets-per-gene {} must be below {pool}, the more expressed half of the --genes {}",
        a.targets_per_gene,
        a.genes
    );
    let pairs = a.perturbed_genes * (a.perturbed_genes - 1) / 2;
    anyhow::ensure!(
        a.doubles <= pairs,
        "--doubles {} is more than the {pairs} pairs of --perturbed-genes {}; lower --doubles or raise --perturbed-genes",
        a.doubles,
        a.perturbed_genes
    );
    anyhow::ensure!((0.0..=1.0).contains(&a.synergy_fraction), "--synergy-fraction = {} must be in [0, 1]", a.synergy_fraction);
    if let Some(m) = a.modules {
        anyhow::ensure!(
            m >= 2 && m <= a.perturbed_genes,
            "--modules {m} must be in 2..={}: at least two modules, each with a gene of --perturbed-genes {}",
            a.perturbed_genes,
            a.perturbed_genes
        );
        let within: usize = module_sizes(a.perturbed_genes, m).iter().map(|s| s * (s - 1) / 2).sum();
        let cross = pairs - within;
        let n_syn = n_synergy(a);
        anyhow::ensure!(
            n_syn <= cross && a.doubles - n_syn <= within,
            "--modules {m}: {} genes make {cross} pairs across modules and {within} within one; --doubles {} at --synergy-fraction {} asks for {n_syn} across and {} within; change --doubles, --synergy-fraction or --modules",
            a.perturbed_genes,
            a.doubles,
            a.synergy_fraction,
            a.doubles - n_syn
        );
    }
    anyhow::ensure!(
        a.min_lfc.is_finite() && a.max_lfc.is_finite() && a.min_lfc > 0.0 && a.min_lfc <= a.max_lfc && a.max_lfc <= 10.0,
        "--min-lfc {} and --max-lfc {} must satisfy 0 < min <= max <= 10 (log2 fold changes)",
        a.min_lfc,
        a.max_lfc
    );
    anyhow::ensure!(a.counts_per_gene.is_finite() && a.counts_per_gene > 0.0, "--counts-per-gene = {} must be positive", a.counts_per_gene);
    anyhow::ensure!(a.cells_per_condition >= 1, "--cells-per-condition must be at least 1");
    anyhow::ensure!(a.control_cells >= 1, "--control-cells must be at least 1: GEARS pairs every perturbed cell with a control");
    anyhow::ensure!(
        !a.cell_type.is_empty() && !a.cell_type.contains('_'),
        "--cell-type {:?} must be non-empty and without '_' (condition_name joins with '_')",
        a.cell_type
    );
    Ok(syn_targets)
}

/// How many doubles are `synergy`.
fn n_synergy(a: &SimulatePerturbationArgs) -> usize {
    (a.doubles as f64 * a.synergy_fraction).round() as usize
}

/// The sizes of `m` modules of `p` genes (balanced: the first `p % m` have one more).
fn module_sizes(p: usize, m: usize) -> Vec<usize> {
    (0..m).map(|k| p / m + usize::from(k < p % m)).collect()
}

/// The gene set and base means, the conditions with their lfc vectors, and the truth.
fn plan(a: &SimulatePerturbationArgs, syn_targets: usize) -> anyhow::Result<Plan> {
    let (ids, symbols) = crate::simulate::pick_genes(a.genes)?;
    let g = a.genes;
    let mut rng = rng_for(a.seed, STREAM_PROFILE, 0);
    let profile = LogNormal::new(0.0, PROFILE_SIGMA).expect("valid sigma");
    let raw: Vec<f64> = (0..g).map(|_| profile.sample(&mut rng)).collect();
    let scale = a.counts_per_gene * g as f64 / raw.iter().sum::<f64>();
    let mu: Vec<f64> = raw.iter().map(|w| w * scale).collect();
    // The more expressed half (ties broken by index): where perturbed genes and targets live.
    let mut by_mean: Vec<usize> = (0..g).collect();
    by_mean.sort_by(|&x, &y| mu[y].total_cmp(&mu[x]).then(x.cmp(&y)));
    // A '+' in a symbol would break GEARS's `A+B` condition names, so such genes are never perturbed.
    let mut pool: Vec<usize> = by_mean[..g / 2].iter().copied().filter(|&i| !symbols[i].contains('+')).collect();
    pool.sort_unstable();
    anyhow::ensure!(
        pool.len() >= a.perturbed_genes && pool.len() > a.targets_per_gene,
        "--genes {}: only {} expressed genes can be perturbed or targeted; raise --genes",
        a.genes,
        pool.len()
    );

    let mut net = rng_for(a.seed, STREAM_NETWORK, 0);
    let mut perturbed = draw(&pool, a.perturbed_genes, &mut net);
    perturbed.sort_by(|&x, &y| symbols[x].cmp(&symbols[y]));
    let target = |i: usize, lfc: f64| TargetTruth { gene: symbols[i].clone(), gene_id: ids[i].clone(), index: i, lfc };
    let mut singles = Vec::new();
    let mut single_lfc: Vec<Vec<f64>> = Vec::new();
    for (k, &pg) in perturbed.iter().enumerate() {
        let mut r = rng_for(a.seed, STREAM_NETWORK, 1 + k as u64);
        let remaining = r.random_range(KNOCKDOWN_REMAINING.0..=KNOCKDOWN_REMAINING.1);
        let kd = remaining.log2();
        let others: Vec<usize> = pool.iter().copied().filter(|&i| i != pg).collect();
        let mut ts = draw(&others, a.targets_per_gene, &mut r);
        ts.sort_unstable();
        let targets: Vec<TargetTruth> = ts.iter().map(|&i| target(i, signed_lfc(a, &mut r))).collect();
        let mut lfc = vec![0.0; g];
        lfc[pg] = kd;
        for t in &targets {
            lfc[t.index] += t.lfc;
        }
        single_lfc.push(lfc);
        singles.push(SingleTruth {
            condition: format!("{}+ctrl", symbols[pg]),
            gene: symbols[pg].clone(),
            gene_id: ids[pg].clone(),
            index: pg,
            knockdown_lfc: kd,
            module: None,
            n_cells: a.cells_per_condition,
            composition_log2: 0.0,
            targets,
        });
    }

    // Doubles: a seeded choice of pairs (positions in `perturbed`, which is sorted by symbol).
    let p = perturbed.len();
    let all_pairs: Vec<(usize, usize)> = (0..p).flat_map(|x| (x + 1..p).map(move |y| (x, y))).collect();
    let mut dr = rng_for(a.seed, STREAM_DOUBLES, 0);
    let n_syn = n_synergy(a);
    let (pairs, is_syn, module_of) = match a.modules {
        None => {
            let chosen: Vec<usize> = draw(&(0..all_pairs.len()).collect::<Vec<_>>(), a.doubles, &mut dr);
            let mut pairs: Vec<(usize, usize)> = chosen.iter().map(|&c| all_pairs[c]).collect();
            pairs.sort_unstable();
            let mut is_syn = vec![false; pairs.len()];
            for d in draw(&(0..pairs.len()).collect::<Vec<_>>(), n_syn, &mut dr) {
                is_syn[d] = true;
            }
            (pairs, is_syn, None)
        }
        Some(m) => {
            // Modules: a seeded order of the perturbed genes cut into balanced runs; the
            // synergy doubles are drawn from the pairs across modules, the rest within one.
            let mut order: Vec<usize> = (0..p).collect();
            shuffle(&mut order, &mut rng_for(a.seed, STREAM_MODULES, 0));
            let mut module_of = vec![0usize; p];
            let mut next = 0;
            for (k, size) in module_sizes(p, m).into_iter().enumerate() {
                for &x in &order[next..next + size] {
                    module_of[x] = k;
                }
                next += size;
            }
            let (cross, within): (Vec<(usize, usize)>, Vec<(usize, usize)>) =
                all_pairs.iter().partition(|&&(x, y)| module_of[x] != module_of[y]);
            let mut tagged: Vec<((usize, usize), bool)> =
                draw(&(0..cross.len()).collect::<Vec<_>>(), n_syn, &mut dr).into_iter().map(|c| (cross[c], true)).collect();
            tagged.extend(draw(&(0..within.len()).collect::<Vec<_>>(), a.doubles - n_syn, &mut dr).into_iter().map(|c| (within[c], false)));
            tagged.sort_unstable();
            let (pairs, is_syn) = tagged.into_iter().unzip();
            (pairs, is_syn, Some(module_of))
        }
    };
    // `syn_targets` synergy targets (sorted, with drawn lfcs) among the expressed genes that
    // none of `touched` is or targets; Err(how many were free) when too few are.
    let untouched_targets = |touched: &[&SingleTruth], mut r: ChaCha8Rng| -> Result<Vec<TargetTruth>, usize> {
        let mut excluded = vec![false; g];
        for s in touched {
            excluded[s.index] = true;
            for t in &s.targets {
                excluded[t.index] = true;
            }
        }
        let free: Vec<usize> = pool.iter().copied().filter(|&t| !excluded[t]).collect();
        if free.len() < syn_targets {
            return Err(free.len());
        }
        let mut ts = draw(&free, syn_targets, &mut r);
        ts.sort_unstable();
        Ok(ts.iter().map(|&t| target(t, signed_lfc(a, &mut r))).collect())
    };
    // The modules' programs: for each pair of modules (in order), targets free of both modules'
    // genes and of all their singles' targets, so no single of a double across the pair
    // explains its program.
    let mut programs: Vec<ProgramTruth> = Vec::new();
    if let (Some(m), Some(module_of)) = (a.modules, &module_of) {
        for (k, (i, j)) in (0..m).flat_map(|i| (i + 1..m).map(move |j| (i, j))).enumerate() {
            let touched: Vec<&SingleTruth> = singles.iter().zip(module_of).filter(|(_, &k)| k == i || k == j).map(|(s, _)| s).collect();
            let targets = untouched_targets(&touched, rng_for(a.seed, STREAM_MODULES, 1 + k as u64)).map_err(|free| {
                anyhow::anyhow!(
                    "modules {i} and {j}: only {free} of the expressed genes are free of their genes and their singles' targets, fewer than --synergy-targets {syn_targets}; raise --genes or --modules, or lower --targets-per-gene"
                )
            })?;
            programs.push(ProgramTruth { modules: [i, j], targets });
        }
    }
    let program_of = |mi: usize, mj: usize| -> usize {
        let (i, j) = (mi.min(mj), mi.max(mj));
        programs.iter().position(|pr| pr.modules == [i, j]).expect("a program for every pair of modules")
    };
    let mut doubles = Vec::new();
    let mut double_lfc = Vec::new();
    for (d, &(x, y)) in pairs.iter().enumerate() {
        let mut lfc: Vec<f64> = single_lfc[x].iter().zip(&single_lfc[y]).map(|(u, v)| u + v).collect();
        let mut synergy = Vec::new();
        let mut program = None;
        if let (true, Some(module_of)) = (is_syn[d], &module_of) {
            let pr = &programs[program_of(module_of[x], module_of[y])];
            program = Some(pr.modules);
            synergy = pr.targets.clone();
        } else if is_syn[d] {
            // Free of A, B and both singles' targets, so no single explains the synergy.
            synergy = untouched_targets(&[&singles[x], &singles[y]], rng_for(a.seed, STREAM_DOUBLES, 1 + d as u64)).map_err(|free| {
                anyhow::anyhow!(
                    "double {}+{}: only {free} of the expressed genes are free of both singles' targets, fewer than --synergy-targets {syn_targets}; raise --genes or lower --targets-per-gene",
                    singles[x].gene,
                    singles[y].gene
                )
            })?;
        }
        for t in &synergy {
            lfc[t.index] += t.lfc;
        }
        double_lfc.push(lfc);
        doubles.push(DoubleTruth {
            condition: format!("{}+{}", singles[x].gene, singles[y].gene),
            genes: [singles[x].gene.clone(), singles[y].gene.clone()],
            kind: if is_syn[d] { "synergy" } else { "additive" },
            program,
            n_cells: a.cells_per_condition,
            composition_log2: 0.0,
            synergy_targets: synergy,
        });
    }
    let modules = module_of.as_ref().map(|module_of| {
        for (s, &k) in singles.iter_mut().zip(module_of) {
            s.module = Some(k);
        }
        (0..a.modules.unwrap_or(0))
            .map(|k| ModuleTruth { module: k, genes: singles.iter().filter(|s| s.module == Some(k)).map(|s| s.gene.clone()).collect() })
            .collect::<Vec<_>>()
    });

    let composition = |lfc: &[f64]| (mu.iter().zip(lfc).map(|(m, l)| m * l.exp2()).sum::<f64>() / mu.iter().sum::<f64>()).log2();
    for (s, l) in singles.iter_mut().zip(&single_lfc) {
        s.composition_log2 = composition(l);
    }
    for (d, l) in doubles.iter_mut().zip(&double_lfc) {
        d.composition_log2 = composition(l);
    }
    let mut conditions = vec![Condition { name: "ctrl".into(), dose: "1", n_cells: a.control_cells, lfc: vec![0.0; g] }];
    for (s, l) in singles.iter().zip(single_lfc) {
        conditions.push(Condition { name: s.condition.clone(), dose: "1+1", n_cells: a.cells_per_condition, lfc: l });
    }
    for (d, l) in doubles.iter().zip(double_lfc) {
        conditions.push(Condition { name: d.condition.clone(), dose: "1+1", n_cells: a.cells_per_condition, lfc: l });
    }
    let n_cells = conditions.iter().map(|c| c.n_cells).sum();
    let truth = ScreenTruth {
        format: "scgpt-prep simulate-perturbation truth 1",
        h5ad: a.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        args: ArgsTruth {
            seed: a.seed,
            genes: a.genes,
            perturbed_genes: a.perturbed_genes,
            doubles: a.doubles,
            synergy_fraction: a.synergy_fraction,
            modules: a.modules,
            cells_per_condition: a.cells_per_condition,
            control_cells: a.control_cells,
            targets_per_gene: a.targets_per_gene,
            synergy_targets: syn_targets,
            min_lfc: a.min_lfc,
            max_lfc: a.max_lfc,
            counts_per_gene: a.counts_per_gene,
            cell_type: a.cell_type.clone(),
        },
        n_cells,
        lfc_base: 2,
        nb_dispersion: NB_DISPERSION,
        control: ControlTruth { condition: "ctrl".into(), n_cells: a.control_cells },
        singles,
        doubles,
        programs: module_of.is_some().then_some(programs),
        modules,
    };
    Ok(Plan { ids, symbols, mu, conditions, truth })
}

/// One cell's log-normalised row: NB counts around `library · μ · 2^lfc`, total 1e4, log1p.
fn simulate_cell(seed: u64, cell: usize, mean: &[f64]) -> (Vec<u32>, Vec<f32>) {
    let mut rng = rng_for(seed, STREAM_CELL, cell as u64);
    let library = LogNormal::new(0.0, LIBRARY_SIGMA).expect("valid sigma").sample(&mut rng);
    let gamma = Gamma::new(NB_DISPERSION, 1.0 / NB_DISPERSION).expect("valid shape");
    let mut counts: Vec<(u32, f64)> = Vec::new();
    for (j, &m) in mean.iter().enumerate() {
        let lambda = library * m * gamma.sample(&mut rng);
        let c = match Poisson::new(lambda) {
            Ok(p) => p.sample(&mut rng),
            Err(_) => 0.0, // λ = 0 (a Gamma draw that underflowed)
        };
        if c > 0.0 {
            counts.push((j as u32, c));
        }
    }
    let total: f64 = counts.iter().map(|c| c.1).sum();
    let cols = counts.iter().map(|c| c.0).collect();
    let vals = counts.iter().map(|c| ((c.1 / total * TARGET_SUM).ln_1p()) as f32).collect();
    (cols, vals)
}

pub fn run(a: &SimulatePerturbationArgs) -> anyhow::Result<()> {
    let syn_targets = validate(a)?;
    let truth_path = a.truth.clone().unwrap_or_else(|| default_truth_path(&a.out));
    anyhow::ensure!(truth_path != a.out, "--truth {} is the same file as --out", truth_path.display());
    for dir in [a.out.parent(), truth_path.parent()].into_iter().flatten().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    }
    let Plan { ids, symbols, mu, conditions, truth } = plan(a, syn_targets)?;
    let means: Vec<Vec<f64>> = conditions.iter().map(|c| mu.iter().zip(&c.lfc).map(|(m, l)| m * l.exp2()).collect()).collect();
    // Cell rows: every condition's cells, shuffled together.
    let mut cond_of: Vec<u32> = conditions.iter().enumerate().flat_map(|(k, c)| std::iter::repeat_n(k as u32, c.n_cells)).collect();
    shuffle(&mut cond_of, &mut rng_for(a.seed, STREAM_ORDER, 0));
    let n = cond_of.len();

    let mut writer = H5adWriter::create(&a.out, a.genes)?;
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(n as u64) };
    bar.set_style(
        ProgressStyle::with_template(
            "simulate-perturbation [{elapsed_precise}] {bar:40} {human_pos}/{human_len} cells  {per_sec}  ETA {eta}",
        )
        .expect("valid"),
    );
    let block = 8192;
    for start in (0..n).step_by(block) {
        let end = (start + block).min(n);
        let rows: Vec<(Vec<u32>, Vec<f32>)> =
            (start..end).into_par_iter().map(|i| simulate_cell(a.seed, i, &means[cond_of[i] as usize])).collect();
        let mut indptr = vec![0usize];
        let (mut cols, mut vals) = (Vec::new(), Vec::new());
        for (c, v) in rows {
            cols.extend_from_slice(&c);
            vals.extend_from_slice(&v);
            indptr.push(cols.len());
        }
        writer.append_rows(&indptr, &cols, &vals)?;
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();

    let cond: Vec<&str> = cond_of.iter().map(|&k| conditions[k as usize].name.as_str()).collect();
    let dose: Vec<&str> = cond_of.iter().map(|&k| conditions[k as usize].dose).collect();
    let cname: Vec<String> = cond.iter().zip(&dose).map(|(c, d)| format!("{}_{c}_{d}", a.cell_type)).collect();
    let obs = Frame {
        index: (0..n).map(|i| format!("cell_{i:07}")).collect(),
        columns: vec![
            ("condition".into(), Column::categorical_from(&cond)),
            ("cell_type".into(), Column::categorical_from(&vec![a.cell_type.as_str(); n])),
            ("dose_val".into(), Column::categorical_from(&dose)),
            ("control".into(), Column::I64(cond_of.iter().map(|&k| i64::from(k == 0)).collect())),
            ("condition_name".into(), Column::categorical_from(&cname)),
        ],
    };
    let var = Frame { index: ids, columns: vec![("gene_name".into(), Column::Strings(symbols))] };
    writer.finish(&obs, &var)?;
    let json = serde_json::to_string_pretty(&truth)?;
    scgpt_data::atomic::write_bytes(&truth_path, json.as_bytes())
        .with_context(|| format!("{}: cannot write the truth", truth_path.display()))?;
    eprintln!(
        "wrote {} ({n} cells x {} genes; {} conditions: ctrl, {} singles, {} doubles of which {} synergy) and its truth {}",
        a.out.display(),
        a.genes,
        conditions.len(),
        truth.singles.len(),
        truth.doubles.len(),
        truth.doubles.iter().filter(|d| d.kind == "synergy").count(),
        truth_path.display()
    );
    Ok(())
}
