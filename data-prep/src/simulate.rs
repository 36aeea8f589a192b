//! Synthetic CELLxGENE-shaped h5ad with planted ground truth, for scale benchmarks and tests.
//!
//! Genes are real vocabulary symbols with their Ensembl ids (var index = Ensembl id, symbol in
//! `var/feature_name`, as CELLxGENE). Each cell has a planted type, batch and donor. Expressed
//! genes are drawn from weights that combine a shared gene profile, type markers (x8), active
//! co-regulated gene programs (x6, all members together) and a per-batch, per-gene batch effect;
//! counts are 1 + a negative binomial (r = 1, i.e. geometric) draw whose mean follows the same
//! factors times the cell's library size. Every cell draws from its own RNG stream keyed by
//! (seed, cell index), so the file is identical whatever the thread count.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use rand_distr::{Distribution, LogNormal, Normal};
use rayon::prelude::*;

use scgpt_data::h5ad::{Column, Frame, H5adWriter};
use scgpt_data::seed::rng_for;
use scgpt_data::vocab::{EnsemblTable, GeneVocab};

#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Number of cells.
    #[arg(long, default_value_t = 10_000)]
    pub cells: usize,
    /// Number of genes (real symbols from the vocabulary, with Ensembl ids).
    #[arg(long, default_value_t = 20_000)]
    pub genes: usize,
    /// Output h5ad path.
    #[arg(long)]
    pub out: PathBuf,
    /// Mean number of expressed genes per cell.
    #[arg(long, default_value_t = 2_000)]
    pub genes_per_cell: usize,
    #[arg(long, default_value_t = 8)]
    pub cell_types: usize,
    #[arg(long, default_value_t = 4)]
    pub batches: usize,
    /// Co-regulated gene programs (30 genes each).
    #[arg(long, default_value_t = 10)]
    pub programs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Marker genes per cell type.
    #[arg(long, default_value_t = 50)]
    pub markers: usize,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

const PROGRAM_SIZE: usize = 30;
const MARKER_BOOST: f64 = 8.0;
const PROGRAM_BOOST: f64 = 6.0;

/// Walker's alias table: O(1) draws from a fixed discrete distribution.
struct Alias {
    prob: Vec<f64>,
    alias: Vec<u32>,
}

impl Alias {
    fn new(weights: &[f64]) -> Self {
        let n = weights.len();
        let sum: f64 = weights.iter().sum();
        let mut prob: Vec<f64> = weights.iter().map(|w| w * n as f64 / sum).collect();
        let mut alias = vec![0u32; n];
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| prob[i] < 1.0);
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            alias[s] = l as u32;
            prob[l] -= 1.0 - prob[s];
            if prob[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        for i in large.into_iter().chain(small) {
            prob[i] = 1.0;
        }
        Alias { prob, alias }
    }

    fn sample<R: Rng>(&self, rng: &mut R) -> usize {
        let i = rng.random_range(0..self.prob.len());
        if rng.random::<f64>() < self.prob[i] {
            i
        } else {
            self.alias[i] as usize
        }
    }
}

/// The planted structure, also written into obs/var so tests can check against it.
struct Truth {
    gene_symbols: Vec<String>,
    gene_ensembl: Vec<String>,
    /// Per (type, batch): alias table over genes and per-gene mean multiplier.
    tables: Vec<Alias>,
    means: Vec<Vec<f64>>,
    /// Program id per gene (`None` outside programs) and members per program.
    gene_program: Vec<Option<usize>>,
    program_members: Vec<Vec<usize>>,
    marker_of: Vec<Option<usize>>,
}

pub(crate) fn pick_genes(n: usize) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let vocab = GeneVocab::human();
    let table = EnsemblTable::human();
    let mut pairs: Vec<(String, String)> =
        table.iter().filter(|(id, sym)| id != sym && vocab.is_gene(sym)).map(|(id, sym)| (id.to_string(), sym.to_string())).collect();
    pairs.sort_by(|a, b| vocab.get(&a.1).cmp(&vocab.get(&b.1)).then(a.0.cmp(&b.0)));
    pairs.dedup_by(|a, b| a.1 == b.1);
    anyhow::ensure!(n <= pairs.len(), "--genes {n}: at most {} vocabulary genes have Ensembl ids", pairs.len());
    pairs.truncate(n);
    Ok(pairs.into_iter().unzip())
}

fn build_truth(a: &SimulateArgs) -> anyhow::Result<Truth> {
    let (gene_ensembl, gene_symbols) = pick_genes(a.genes)?;
    let g = a.genes;
    let mut rng = rng_for(a.seed, 0x5EED_7A87, 0);
    // Shared profile: log-normal gene abundances, as real data's heavy-tailed gene means.
    let base: Vec<f64> = (0..g).map(|_| LogNormal::new(0.0, 1.2).unwrap().sample(&mut rng)).collect();
    let mut order: Vec<usize> = (0..g).collect();
    for i in (1..g).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    let mut cursor = 0;
    let mut take = |k: usize| {
        let s: Vec<usize> = order[cursor..(cursor + k).min(g)].to_vec();
        cursor = (cursor + k).min(g);
        s
    };
    let mut marker_of = vec![None; g];
    let markers: Vec<Vec<usize>> = (0..a.cell_types).map(|_| take(a.markers)).collect();
    for (t, m) in markers.iter().enumerate() {
        for &i in m {
            marker_of[i] = Some(t);
        }
    }
    let program_members: Vec<Vec<usize>> = (0..a.programs).map(|_| take(PROGRAM_SIZE)).collect();
    let mut gene_program = vec![None; g];
    for (p, m) in program_members.iter().enumerate() {
        for &i in m {
            gene_program[i] = Some(p);
        }
    }
    let batch_effect = Normal::<f64>::new(0.0, 0.5).unwrap();
    let batch_factors: Vec<Vec<f64>> = (0..a.batches).map(|_| (0..g).map(|_| batch_effect.sample(&mut rng).exp()).collect()).collect();
    let mut tables = Vec::new();
    let mut means = Vec::new();
    for t in 0..a.cell_types {
        for bf in &batch_factors {
            let w: Vec<f64> = (0..g).map(|i| base[i] * bf[i] * if marker_of[i] == Some(t) { MARKER_BOOST } else { 1.0 }).collect();
            let mean_scale: Vec<f64> = w.iter().map(|x| x.sqrt()).collect();
            tables.push(Alias::new(&w));
            means.push(mean_scale);
        }
    }
    Ok(Truth { gene_symbols, gene_ensembl, tables, means, gene_program, program_members, marker_of })
}

struct SimCell {
    cols: Vec<u32>,
    vals: Vec<f32>,
}

fn simulate_cell(a: &SimulateArgs, t: &Truth, cell: usize, ctype: usize, batch: usize) -> SimCell {
    let mut rng = rng_for(a.seed, 0xCE11, cell as u64);
    let table = &t.tables[ctype * a.batches + batch];
    let means = &t.means[ctype * a.batches + batch];
    let target = ((a.genes_per_cell as f64) * LogNormal::new(0.0, 0.25).unwrap().sample(&mut rng)).round() as usize;
    let target = target.clamp(1, a.genes);
    let library = LogNormal::new(0.0, 0.4).unwrap().sample(&mut rng);
    let mut picked = vec![false; a.genes];
    let mut cols: Vec<u32> = Vec::with_capacity(target + 64);
    // Each program is active in a cell with probability 0.3; all its genes are then expressed.
    for members in &t.program_members {
        if rng.random::<f64>() < 0.3 {
            for &gi in members {
                if !picked[gi] {
                    picked[gi] = true;
                    cols.push(gi as u32);
                }
            }
        }
    }
    let program_genes = cols.len();
    let max_draws = target * 20 + 1000;
    let mut draws = 0;
    while cols.len() < target && draws < max_draws {
        let gi = table.sample(&mut rng);
        draws += 1;
        if !picked[gi] {
            picked[gi] = true;
            cols.push(gi as u32);
        }
    }
    let mut pairs: Vec<(u32, f32)> = cols
        .iter()
        .enumerate()
        .map(|(k, &gi)| {
            let b = if k < program_genes { PROGRAM_BOOST } else { 1.0 };
            let mean = 1.5 * library * means[gi as usize] * b;
            // Geometric with mean `mean` via inversion: one uniform per count.
            let p = 1.0 / (1.0 + mean);
            let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let extra = (u.ln() / (1.0 - p).ln()).floor();
            (gi, (1.0 + extra.min(1e6)) as f32)
        })
        .collect();
    pairs.sort_unstable_by_key(|p| p.0);
    SimCell { cols: pairs.iter().map(|p| p.0).collect(), vals: pairs.iter().map(|p| p.1).collect() }
}

pub fn run(a: &SimulateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.cells > 0 && a.genes > 0, "--cells and --genes must be positive");
    anyhow::ensure!(a.cell_types > 0 && a.batches > 0, "--cell-types and --batches must be positive");
    anyhow::ensure!(
        a.cell_types * a.markers + a.programs * PROGRAM_SIZE <= a.genes,
        "--genes {} too small for {} types x {} markers + {} programs x {PROGRAM_SIZE} genes",
        a.genes,
        a.cell_types,
        a.markers,
        a.programs
    );
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    }
    let truth = build_truth(a)?;
    let n_donors = (a.batches * 3).max(1);
    let assign = |i: usize| {
        let mut r = rng_for(a.seed, 0xA551, i as u64);
        let ctype = r.random_range(0..a.cell_types);
        let batch = r.random_range(0..a.batches);
        let donor = batch * 3 + r.random_range(0..3);
        let disease = if r.random::<f64>() < 0.9 { "normal" } else { "COVID-19" };
        let suspension = match r.random_range(0..20) {
            0 => "na",
            1..=5 => "nucleus",
            _ => "cell",
        };
        (ctype, batch, donor.min(n_donors - 1), disease, suspension)
    };
    let mut writer = H5adWriter::create(&a.out, a.genes)?;
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(a.cells as u64) };
    bar.set_style(
        ProgressStyle::with_template("simulate [{elapsed_precise}] {bar:40} {human_pos}/{human_len} cells  {per_sec}  ETA {eta}")
            .expect("valid"),
    );
    let block = 8192;
    let mut obs_type = Vec::with_capacity(a.cells);
    let mut obs_batch = Vec::with_capacity(a.cells);
    let mut obs_donor = Vec::with_capacity(a.cells);
    let mut obs_disease = Vec::with_capacity(a.cells);
    let mut obs_susp = Vec::with_capacity(a.cells);
    for start in (0..a.cells).step_by(block) {
        let end = (start + block).min(a.cells);
        let cells: Vec<(SimCell, (usize, usize, usize, &str, &str))> = (start..end)
            .into_par_iter()
            .map(|i| {
                let meta = assign(i);
                (simulate_cell(a, &truth, i, meta.0, meta.1), meta)
            })
            .collect();
        let mut indptr = vec![0usize];
        let mut cols = Vec::new();
        let mut vals = Vec::new();
        for (c, (ct, b, d, dis, su)) in cells {
            cols.extend_from_slice(&c.cols);
            vals.extend_from_slice(&c.vals);
            indptr.push(cols.len());
            obs_type.push(format!("type_{ct:02}"));
            obs_batch.push(format!("batch_{b}"));
            obs_donor.push(format!("donor_{d:02}"));
            obs_disease.push(dis.to_string());
            obs_susp.push(su.to_string());
        }
        writer.append_rows(&indptr, &cols, &vals)?;
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();
    let tissue: Vec<String> = obs_batch.iter().map(|b| if b.ends_with('0') { "blood".to_string() } else { "lung".to_string() }).collect();
    let obs = Frame {
        index: (0..a.cells).map(|i| format!("cell_{i:07}")).collect(),
        columns: vec![
            ("cell_type".into(), Column::categorical_from(&obs_type)),
            ("batch".into(), Column::categorical_from(&obs_batch)),
            ("donor_id".into(), Column::categorical_from(&obs_donor)),
            ("disease".into(), Column::categorical_from(&obs_disease)),
            ("tissue_general".into(), Column::categorical_from(&tissue)),
            ("suspension_type".into(), Column::categorical_from(&obs_susp)),
        ],
    };
    let program: Vec<String> =
        truth.gene_program.iter().map(|p| p.map(|p| format!("program_{p:02}")).unwrap_or_else(|| "none".into())).collect();
    let marker: Vec<String> = truth.marker_of.iter().map(|m| m.map(|t| format!("type_{t:02}")).unwrap_or_else(|| "none".into())).collect();
    let var = Frame {
        index: truth.gene_ensembl.clone(),
        columns: vec![
            ("feature_name".into(), Column::Strings(truth.gene_symbols.clone())),
            ("program".into(), Column::categorical_from(&program)),
            ("marker_of".into(), Column::categorical_from(&marker)),
        ],
    };
    writer.finish(&obs, &var)?;
    eprintln!("wrote {} ({} cells x {} genes)", a.out.display(), a.cells, a.genes);
    Ok(())
}
