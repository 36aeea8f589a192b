//! `scgpt baseline integration`: the integration baselines an scGPT embedding is compared with,
//! scored with the same scIB metrics as `scgpt eval integration` (`scgpt_eval::scib`):
//!
//! - `pca`: no integration. normalize_total(1e4) + log1p, `--n-hvg` highly variable genes
//!   (scanpy's `seurat` flavor, all genes when there are fewer), PCA to `--n-pcs` (centred, not
//!   scaled), as scanpy's standard workflow and `scgpt baseline annotation` prepare cells.
//! - `harmony`: Harmony (harmonypy 2.1.0's algorithm and defaults, `scgpt_eval::harmony`) on
//!   that PCA with `--batch-col` as the batch.
//!
//! Both are scored against the same unintegrated PCA for PCR_batch (so `pca` scores 0 there by
//! definition). Writes `--report`/metrics.json keyed by method (`{"pca": {...}, "harmony":
//! {...}}`, scib's key names inside), baseline.json (what was run), and a UMAP picture per
//! method (umap_pca.png, umap_harmony.png; cells coloured by label and by batch).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use scgpt_data::h5ad::{H5adReader, MatrixChoice};
use scgpt_eval::harmony::{harmonize, HarmonyOptions, HarmonyResult};
use scgpt_eval::pca::Pca;
use scgpt_eval::preprocess::{highly_variable_seurat, normalize_log1p};
use scgpt_eval::scib::{codes, integration_metrics, IntegrationInput, IntegrationOptions, IntegrationReport, PreIntegration};
use scgpt_eval::umap::{umap, write_umap_png, Colouring, UmapOptions};
use scgpt_eval::CsrMatrix;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct IntegrationArgs {
    /// h5ad with counts in X (or raw/X with --use-raw) and the label and batch columns in obs.
    #[arg(long, value_name = "H5AD")]
    pub input: PathBuf,
    /// obs column with the batches (Harmony's batch, scib's batch_key).
    #[arg(long, value_name = "COL")]
    pub batch_col: String,
    /// obs column with the cell types (scib's label_key).
    #[arg(long, value_name = "COL")]
    pub label_col: String,
    /// Output folder: metrics.json, baseline.json, umap_pca.png, umap_harmony.png.
    #[arg(long, value_name = "DIR")]
    pub report: PathBuf,
    /// Read raw/X instead of X. The baseline normalises and log-transforms, so it wants counts.
    #[arg(long)]
    pub use_raw: bool,
    #[arg(long, default_value_t = 2000)]
    pub n_hvg: usize,
    #[arg(long, default_value_t = 50)]
    pub n_pcs: usize,
    /// Seed of Harmony's k-means initialisation, the Leiden runs and the UMAP layouts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip the UMAP pictures (their layout takes seconds per 10,000 cells).
    #[arg(long)]
    pub no_umap: bool,
    /// Skip graph iLISI/cLISI.
    #[arg(long)]
    pub no_lisi: bool,
}

/// The kept cells' matrix, labels and batches.
struct Cells {
    indptr: Vec<usize>,
    indices: Vec<u32>,
    data: Vec<f32>,
    n_genes: usize,
    labels: Vec<String>,
    batches: Vec<String>,
    n_file: usize,
}

fn read_cells(args: &IntegrationArgs) -> Result<Cells> {
    let path = &args.input;
    let choice = if args.use_raw { MatrixChoice::RawThenX } else { MatrixChoice::X };
    let mut reader = H5adReader::open(path, choice)?;
    let labels_all = reader.obs_column(&args.label_col).with_context(|| format!("--label-col {}", args.label_col))?;
    let batches_all = reader.obs_column(&args.batch_col).with_context(|| format!("--batch-col {}", args.batch_col))?;
    let (n, n_genes) = (reader.n_obs(), reader.n_vars());
    if n_genes == 0 {
        bail!("{}: the matrix has no genes (an embedding-only file?); the baseline needs expression counts", path.display());
    }
    let (mut indptr, mut indices, mut data) = (vec![0usize], Vec::new(), Vec::new());
    let (mut labels, mut batches) = (Vec::new(), Vec::new());
    // Blocks bound the transient copy; the kept rows are the baseline's input anyway.
    const BLOCK: usize = 16_384;
    for start in (0..n).step_by(BLOCK) {
        let b = reader.read_rows(start, (start + BLOCK).min(n))?;
        for r in 0..b.n_rows() {
            let i = start + r;
            // anndata writes a missing categorical value as code -1, read as "": no label or
            // batch to score such a cell with.
            if labels_all[i].is_empty() || batches_all[i].is_empty() {
                continue;
            }
            let (idx, val) = b.row(r);
            indices.extend_from_slice(idx);
            data.extend_from_slice(val);
            indptr.push(indices.len());
            labels.push(labels_all[i].clone());
            batches.push(batches_all[i].clone());
        }
    }
    Ok(Cells { indptr, indices, data, n_genes, labels, batches, n_file: n })
}

#[derive(Serialize)]
struct Methods<'a> {
    pca: &'a IntegrationReport,
    harmony: &'a IntegrationReport,
}

#[derive(Serialize)]
struct RunInfo<'a> {
    input: &'a Path,
    matrix: &'a str,
    label_col: &'a str,
    batch_col: &'a str,
    cells_in_file: usize,
    cells_dropped_missing_label_or_batch: usize,
    n_cells: usize,
    n_genes: usize,
    n_hvg: usize,
    n_pcs: usize,
    explained_variance: &'a [f64],
    seed: u64,
    harmony_options: &'a HarmonyOptions,
    harmony: &'a HarmonyResult,
    umap_options: Option<&'a UmapOptions>,
    pictures: Vec<String>,
    pipeline: &'static str,
    seconds: std::collections::BTreeMap<String, f64>,
}

pub fn run(args: &IntegrationArgs) -> Result<()> {
    let t0 = Instant::now();
    let say = |msg: &str| eprintln!("[{:7.1}s] {msg}", t0.elapsed().as_secs_f64());
    let mut seconds = std::collections::BTreeMap::new();
    if args.n_hvg == 0 || args.n_pcs == 0 {
        bail!("--n-hvg and --n-pcs must be at least 1");
    }
    let path = &args.input;
    let t = Instant::now();
    let cells = read_cells(args)?;
    let n = cells.labels.len();
    let dropped = cells.n_file - n;
    if dropped > 0 {
        eprintln!("warning: {dropped} cells have no `{}` or `{}` value and are left out", args.label_col, args.batch_col);
    }
    if n < 3 {
        bail!(
            "{}: only {n} cells have both a `{}` and a `{}` value; the baseline needs at least 3",
            path.display(),
            args.label_col,
            args.batch_col
        );
    }
    let (bat, bat_names) = codes(&cells.batches);
    if bat_names.len() < 2 {
        eprintln!(
            "warning: obs `{}` has one value ({}): Harmony has nothing to correct, and the batch metrics are null",
            args.batch_col, bat_names[0]
        );
    }
    say(&format!("{}: {n} cells ({dropped} left out), {} genes, {} batches", path.display(), cells.n_genes, bat_names.len()));
    seconds.insert("read".to_string(), t.elapsed().as_secs_f64());

    // Unintegrated: log-normalised HVGs, PCA.
    let t = Instant::now();
    let x = CsrMatrix::new(&cells.indptr, &cells.indices, &cells.data, cells.n_genes).with_context(|| format!("{}: X", path.display()))?;
    let log = normalize_log1p(&x, 1e4, &path.display().to_string()).map_err(|e| {
        // A negative value means the matrix is scaled (scanpy keeps counts in raw/X then).
        let hint =
            if e.to_string().contains("non-negative") && !args.use_raw { "; if X holds scaled values, --use-raw reads raw/X" } else { "" };
        e.context(format!("normalising {}{hint}", path.display()))
    })?;
    let hvg = highly_variable_seurat(&log, args.n_hvg, 20).with_context(|| format!("{}: highly variable genes", path.display()))?;
    let mut map = vec![None; cells.n_genes];
    for (f, &j) in hvg.iter().enumerate() {
        map[j] = Some(f);
    }
    let pca = Pca::fit(&log, &map, hvg.len(), args.n_pcs).with_context(|| format!("{}: PCA", path.display()))?;
    let z = pca.transform(&log, &map);
    let dim = pca.n_components();
    let pcs: Vec<f32> = z.iter().map(|&v| v as f32).collect();
    drop(log);
    say(&format!("PCA: {} HVGs, {dim} components", hvg.len()));
    seconds.insert("pca".to_string(), t.elapsed().as_secs_f64());

    // Harmony on that PCA.
    let t = Instant::now();
    let h_opts = HarmonyOptions { seed: args.seed, ..Default::default() };
    let h = harmonize(&pcs, dim, &bat, &h_opts).context("Harmony")?;
    say(&format!(
        "Harmony: {} clusters, {} iterations ({})",
        h.n_clusters,
        h.iterations,
        if h.converged { "converged" } else { "stopped at max_iter_harmony" }
    ));
    seconds.insert("harmony".to_string(), t.elapsed().as_secs_f64());

    // Both scored the same way, against the same unintegrated PCA for PCR_batch.
    let opts = IntegrationOptions { seed: args.seed, lisi: !args.no_lisi, ..Default::default() };
    let score = |name: &str, emb: &[f32]| -> Result<IntegrationReport> {
        let input = IntegrationInput {
            embedding: emb,
            dim,
            labels: &cells.labels,
            batches: &cells.batches,
            pre: Some(PreIntegration::Pca { pcs: &pcs, dim, variance: &pca.explained_variance }),
        };
        integration_metrics(&input, &opts, &mut |m| say(&format!("{name}: {m}"))).with_context(|| format!("scIB metrics of `{name}`"))
    };
    let t = Instant::now();
    let m_pca = score("pca", &pcs)?;
    let m_harmony = score("harmony", &h.corrected)?;
    seconds.insert("metrics".to_string(), t.elapsed().as_secs_f64());

    let mut pictures = Vec::new();
    let u_opts = UmapOptions { seed: args.seed, ..Default::default() };
    if !args.no_umap {
        let t = Instant::now();
        for (name, emb) in [("pca", &pcs), ("harmony", &h.corrected)] {
            let y = umap(emb, dim, &u_opts).with_context(|| format!("UMAP of `{name}`"))?;
            let title = format!(
                "{name}: {} ({n} cells)",
                path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned())
            );
            let panels = [
                Colouring { title: &format!("label ({})", args.label_col), values: &cells.labels },
                Colouring { title: &format!("batch ({})", args.batch_col), values: &cells.batches },
            ];
            let file = format!("umap_{name}.png");
            let out = write_umap_png(&args.report, &file, &y, &title, &panels)?;
            say(&format!("wrote {}", out.display()));
            pictures.push(file);
        }
        seconds.insert("umap".to_string(), t.elapsed().as_secs_f64());
    }

    let mut json = serde_json::to_string_pretty(&Methods { pca: &m_pca, harmony: &m_harmony })?;
    json.push('\n');
    let out = scgpt_eval::write_atomic(&args.report, "metrics.json", json.as_bytes())?;
    seconds.insert("total".to_string(), t0.elapsed().as_secs_f64());
    let info = RunInfo {
        input: path,
        matrix: if args.use_raw { "raw/X (else X)" } else { "X" },
        label_col: &args.label_col,
        batch_col: &args.batch_col,
        cells_in_file: cells.n_file,
        cells_dropped_missing_label_or_batch: dropped,
        n_cells: n,
        n_genes: cells.n_genes,
        n_hvg: hvg.len(),
        n_pcs: dim,
        explained_variance: &pca.explained_variance,
        seed: args.seed,
        harmony_options: &h_opts,
        harmony: &h,
        umap_options: (!args.no_umap).then_some(&u_opts),
        pictures,
        pipeline: "normalize_total(1e4) + log1p, highly_variable_genes(flavor=seurat), PCA (centred); harmony = harmonypy 2.1.0 defaults on that PCA; metrics = scgpt_eval::scib (scib 1.1.7 definitions), PCR_batch against the same PCA",
        seconds,
    };
    let mut info_json = serde_json::to_string_pretty(&info)?;
    info_json.push('\n');
    scgpt_eval::write_atomic(&args.report, "baseline.json", info_json.as_bytes())?;

    let f = |v: Option<f64>| v.map_or("  null".to_string(), |x| format!("{x:.4}"));
    println!("method    NMI     ARI     ASW_label  ASW_label/batch  graph_conn  PCR_batch  iLISI   cLISI   avg_bio  avg_batch");
    for (name, m) in [("pca", &m_pca), ("harmony", &m_harmony)] {
        println!(
            "{name:8}  {}  {}  {}     {}           {}      {}     {}  {}  {}   {}",
            f(m.nmi),
            f(m.ari),
            f(m.asw_label),
            f(m.asw_batch),
            f(m.graph_conn),
            f(m.pcr_batch),
            f(m.ilisi),
            f(m.clisi),
            f(m.avg_bio),
            f(m.avg_batch)
        );
    }
    for note in m_harmony.notes.iter().chain(m_pca.notes.iter().filter(|n| !m_harmony.notes.contains(n))) {
        println!("note: {note}");
    }
    say(&format!("wrote {}", out.display()));
    Ok(())
}
