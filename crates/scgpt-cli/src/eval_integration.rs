//! `scgpt eval integration`: scIB batch-integration metrics of an embedding in an h5ad
//! (`obsm[--embedding]`), as scib 1.1.7's `scib.metrics.metrics` computes them in the scGPT
//! integration tutorial, plus graph iLISI/cLISI (see `scgpt_eval::scib` for the definitions
//! and the differences). Writes `--report`/metrics.json with scib's key names.
//!
//! PCR's unintegrated side (P_pre) is, as scib: `obsm["X_pca"]` with `uns["pca"]["variance"]`
//! when both exist, else a PCA of `X`; `--pre-embedding KEY` picks `obsm[KEY]` instead.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use scgpt_data::h5ad::{H5adReader, MatrixChoice};
use scgpt_eval::neighbors::check_points;
use scgpt_eval::pcr::Features;
use scgpt_eval::scib::{integration_metrics, IntegrationInput, IntegrationOptions, IntegrationReport, PreIntegration};
use scgpt_eval::CsrMatrix;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub task: EvalTask,
}

#[derive(Debug, Subcommand)]
pub enum EvalTask {
    /// scIB integration metrics of an embedding: NMI/ARI of the NMI-optimal Leiden clustering,
    /// ASW_label, ASW_label/batch, graph_conn, PCR_batch, iLISI, cLISI, avg_bio, avg_batch.
    /// Writes metrics.json into --report.
    Integration(IntegrationArgs),
    /// Perturbation predictions of a fine-tuned perturbation model on a split's test
    /// conditions: Pearson, Pearson-delta and their DE-gene and non-dropout variants, overall
    /// and per subgroup, beside the no-change, training-mean, additive and linear baselines.
    Perturbation(crate::eval_perturbation::EvalPerturbationArgs),
}

#[derive(Debug, Args)]
pub struct IntegrationArgs {
    /// h5ad with the embedding in obsm and the label and batch columns in obs.
    #[arg(long, value_name = "H5AD")]
    pub input: PathBuf,
    /// obsm key of the integrated embedding.
    #[arg(long, value_name = "KEY", default_value = "X_scGPT")]
    pub embedding: String,
    /// obs column with the cell types (scib's label_key).
    #[arg(long, value_name = "COL")]
    pub label_col: String,
    /// obs column with the batches (scib's batch_key).
    #[arg(long, value_name = "COL")]
    pub batch_col: String,
    /// Output folder for metrics.json.
    #[arg(long, value_name = "DIR")]
    pub report: PathBuf,
    /// obsm key of the unintegrated representation for PCR_batch (PCA is run on it). Default:
    /// obsm["X_pca"] + uns["pca"]["variance"] when both exist, else X (as scib).
    #[arg(long, value_name = "KEY")]
    pub pre_embedding: Option<String>,
    /// Seed of the Leiden runs (scanpy's random_state).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip graph iLISI/cLISI (scib's `metrics` call in the scGPT tutorial leaves them off).
    #[arg(long)]
    pub no_lisi: bool,
    /// Skip the UMAP picture (umap.png: the embedding coloured by label and by batch; for the
    /// eyes only, the metrics never depend on it).
    #[arg(long)]
    pub no_umap: bool,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    match &args.task {
        EvalTask::Integration(a) => integration(a),
        EvalTask::Perturbation(a) => crate::eval_perturbation::run(a),
    }
}

/// A dense obsm matrix as f32, with its shape.
struct Obsm {
    data: Vec<f32>,
    dim: usize,
}

fn obsm_keys(file: &hdf5::File) -> Vec<String> {
    file.group("obsm").and_then(|g| g.member_names()).unwrap_or_default()
}

/// `obsm/<key>` of `path` as a dense f32 cells × d matrix; errors name the file, the key and
/// the keys that exist.
fn read_obsm(path: &Path, file: &hdf5::File, key: &str, n_obs: usize, flag: &str) -> Result<Obsm> {
    let field = format!("obsm/{key}");
    if !file.link_exists("obsm") || !file.group("obsm").map(|g| g.link_exists(key)).unwrap_or(false) {
        let keys = obsm_keys(file);
        bail!(
            "{}: no `{field}` ({flag} {key}); available obsm keys: [{}]. Embed the cells first (scgpt embed writes obsm/X_scGPT) or pick one of these",
            path.display(),
            keys.join(", ")
        );
    }
    let ds = match file.dataset(&field) {
        Ok(ds) => ds,
        Err(_) => bail!(
            "{}: `{field}` is not a dense array (a sparse matrix or a dataframe?); {flag} needs a dense cells × dims embedding",
            path.display()
        ),
    };
    let shape = ds.shape();
    if shape.len() != 2 || shape[0] != n_obs || shape[1] == 0 {
        bail!("{}: `{field}` has shape {shape:?}; expected [{n_obs}, d] with d >= 1 (one row per cell)", path.display());
    }
    let data: Vec<f32> = ds
        .read_raw::<f32>()
        .with_context(|| format!("{}: reading `{field}` as float (HDF5 converts integer and float64 arrays)", path.display()))?;
    // Refused here, with the file's row numbers, before any clustering or PCA.
    check_points(&data, shape[1], &format!("{}: `{field}`", path.display()))?;
    Ok(Obsm { data, dim: shape[1] })
}

/// uns/pca/variance when obsm/X_pca exists beside it: scib then uses that PCA for P_pre.
fn existing_pca(file: &hdf5::File) -> Option<Vec<f64>> {
    if !file.link_exists("obsm") || !file.group("obsm").ok()?.link_exists("X_pca") {
        return None;
    }
    if !file.link_exists("uns") || !file.group("uns").ok()?.link_exists("pca") {
        return None;
    }
    let ds = file.dataset("uns/pca/variance").ok()?;
    ds.read_raw::<f64>().ok()
}

/// The whole X as CSR (X dense or sparse; the reader converts).
struct CsrParts {
    indptr: Vec<usize>,
    indices: Vec<u32>,
    data: Vec<f32>,
    n_cols: usize,
}

fn read_x(reader: &mut H5adReader) -> Result<CsrParts> {
    let (n, g) = (reader.n_obs(), reader.n_vars());
    let (mut indptr, mut indices, mut data) = (vec![0usize], Vec::new(), Vec::new());
    // Blocks bound the transient copy; the matrix itself is kept for PCA.
    const BLOCK: usize = 16_384;
    for start in (0..n).step_by(BLOCK) {
        let b = reader.read_rows(start, (start + BLOCK).min(n))?;
        for r in 0..b.n_rows() {
            let (idx, val) = b.row(r);
            indices.extend_from_slice(idx);
            data.extend_from_slice(val);
            indptr.push(indices.len());
        }
    }
    Ok(CsrParts { indptr, indices, data, n_cols: g })
}

/// Rows `keep` of a row-major matrix.
fn rows_of(data: &[f32], dim: usize, keep: &[usize]) -> Vec<f32> {
    keep.iter().flat_map(|&i| data[i * dim..(i + 1) * dim].iter().copied()).collect()
}

fn csr_rows(m: &CsrParts, keep: &[usize]) -> CsrParts {
    let (mut indptr, mut indices, mut data) = (vec![0usize], Vec::new(), Vec::new());
    for &i in keep {
        let (a, b) = (m.indptr[i], m.indptr[i + 1]);
        indices.extend_from_slice(&m.indices[a..b]);
        data.extend_from_slice(&m.data[a..b]);
        indptr.push(indices.len());
    }
    CsrParts { indptr, indices, data, n_cols: m.n_cols }
}

/// metrics.json: the report (scib's keys first), then what it was computed on.
#[derive(Serialize)]
struct Report<'a> {
    #[serde(flatten)]
    metrics: &'a IntegrationReport,
    input: &'a Path,
    embedding: &'a str,
    embedding_dims: usize,
    label_col: &'a str,
    batch_col: &'a str,
    /// What P_pre was computed on.
    pre_integration: String,
    seed: u64,
    cells_in_file: usize,
    cells_dropped_missing_label_or_batch: usize,
    definitions: &'static str,
    total_seconds: f64,
}

enum Pre {
    Obsm(Obsm, String),
    Pca(Obsm, Vec<f64>),
    X(CsrParts),
    None,
}

fn integration(args: &IntegrationArgs) -> Result<()> {
    let t0 = Instant::now();
    let say = |msg: &str| eprintln!("[{:7.1}s] {msg}", t0.elapsed().as_secs_f64());
    let path = &args.input;
    let mut reader = H5adReader::open(path, MatrixChoice::X)?;
    let n_file = reader.n_obs();
    let labels_all = reader.obs_column(&args.label_col).with_context(|| format!("--label-col {}", args.label_col))?;
    let batches_all = reader.obs_column(&args.batch_col).with_context(|| format!("--batch-col {}", args.batch_col))?;
    let file = hdf5::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let emb = read_obsm(path, &file, &args.embedding, n_file, "--embedding")?;
    say(&format!("{}: {n_file} cells, obsm/{} with {} dims", path.display(), args.embedding, emb.dim));

    let pre = match &args.pre_embedding {
        Some(k) => Pre::Obsm(read_obsm(path, &file, k, n_file, "--pre-embedding")?, k.clone()),
        None => match existing_pca(&file) {
            Some(var) => {
                let pcs = read_obsm(path, &file, "X_pca", n_file, "obsm/X_pca")?;
                if pcs.dim != var.len() {
                    bail!(
                        "{}: obsm/X_pca has {} columns but uns/pca/variance {} values; fix the file or pass --pre-embedding",
                        path.display(),
                        pcs.dim,
                        var.len()
                    );
                }
                Pre::Pca(pcs, var)
            }
            // An embedding-only file (scgpt embed from Parquet writes X with 0 genes): no
            // unintegrated data, so PCR_batch is null with a note rather than an error.
            None if reader.n_vars() == 0 => Pre::None,
            None => {
                let t = Instant::now();
                let x = read_x(&mut reader)?;
                say(&format!("read X ({} genes, {} stored values) in {:.1} s", x.n_cols, x.data.len(), t.elapsed().as_secs_f64()));
                Pre::X(x)
            }
        },
    };
    drop(file);

    // anndata writes a missing categorical value as code -1, read as "": those cells have no
    // label or batch to score, so they are left out (and counted).
    let keep: Vec<usize> = (0..n_file).filter(|&i| !labels_all[i].is_empty() && !batches_all[i].is_empty()).collect();
    let dropped = n_file - keep.len();
    if keep.len() < 3 {
        bail!(
            "{}: only {} cells have both a `{}` and a `{}` value; the metrics need at least 3",
            path.display(),
            keep.len(),
            args.label_col,
            args.batch_col
        );
    }
    if dropped > 0 {
        eprintln!("warning: {dropped} cells have no `{}` or `{}` value and are left out", args.label_col, args.batch_col);
    }
    let labels: Vec<String> = keep.iter().map(|&i| labels_all[i].clone()).collect();
    let batches: Vec<String> = keep.iter().map(|&i| batches_all[i].clone()).collect();
    let subset = dropped > 0;
    let emb_data = if subset { rows_of(&emb.data, emb.dim, &keep) } else { emb.data };
    let mut distinct: Vec<&String> = batches.iter().collect();
    distinct.sort();
    distinct.dedup();
    if distinct.len() < 2 {
        eprintln!(
            "warning: obs `{}` has one value ({}): ASW_label/batch, PCR_batch, iLISI and avg_batch are null",
            args.batch_col,
            distinct.first().map_or("", |s| s.as_str())
        );
    }

    // The unintegrated side, restricted to the kept cells.
    type Dense = Option<(Vec<f32>, usize)>;
    let rows = |m: Obsm| -> (Vec<f32>, usize) { (if subset { rows_of(&m.data, m.dim, &keep) } else { m.data }, m.dim) };
    let (pre_desc, pre_dense, pre_var, pre_csr): (String, Dense, Option<Vec<f64>>, Option<CsrParts>) = match pre {
        Pre::Obsm(m, k) => (format!("obsm/{k} ({} dims), PCA of it", m.dim), Some(rows(m)), None, None),
        Pre::Pca(m, v) => {
            (format!("obsm/X_pca ({} components) with uns/pca/variance, as scib uses an existing PCA", m.dim), Some(rows(m)), Some(v), None)
        }
        Pre::X(x) => (format!("X ({} genes), PCA of it", x.n_cols), None, None, Some(if subset { csr_rows(&x, &keep) } else { x })),
        Pre::None => ("none: X has no genes; pass --pre-embedding for PCR_batch".to_string(), None, None, None),
    };
    let pre_input = match (&pre_dense, &pre_var, &pre_csr) {
        (Some((d, dim)), Some(v), _) => Some(PreIntegration::Pca { pcs: d, dim: *dim, variance: v }),
        (Some((d, dim)), None, _) => Some(PreIntegration::Matrix(Features::Dense { data: d, dim: *dim })),
        (None, _, Some(x)) => Some(PreIntegration::Matrix(Features::Sparse(
            CsrMatrix::new(&x.indptr, &x.indices, &x.data, x.n_cols).with_context(|| format!("{}: X", path.display()))?,
        ))),
        (None, _, None) => None,
    };

    let input = IntegrationInput { embedding: &emb_data, dim: emb.dim, labels: &labels, batches: &batches, pre: pre_input };
    let opts = IntegrationOptions { seed: args.seed, lisi: !args.no_lisi, ..Default::default() };
    let rep =
        integration_metrics(&input, &opts, &mut |m| say(m)).with_context(|| format!("{}: obsm/{}", path.display(), args.embedding))?;

    let report = Report {
        metrics: &rep,
        input: path,
        embedding: &args.embedding,
        embedding_dims: emb.dim,
        label_col: &args.label_col,
        batch_col: &args.batch_col,
        pre_integration: pre_desc,
        seed: args.seed,
        cells_in_file: n_file,
        cells_dropped_missing_label_or_batch: dropped,
        definitions: "scib 1.1.7 (scib.metrics.metrics): Leiden (leidenalg flavour, RB-configuration) at resolutions 0.2..2.0 step 0.2 keeping the NMI-best; graph LISI on all cells; see scgpt_eval::scib",
        total_seconds: t0.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&report)?;
    let out = scgpt_eval::write_atomic(&args.report, "metrics.json", json.as_bytes())?;
    if !args.no_umap {
        let opts = scgpt_eval::umap::UmapOptions { seed: args.seed, ..Default::default() };
        let y = scgpt_eval::umap::umap(&emb_data, emb.dim, &opts)
            .with_context(|| format!("{}: UMAP of obsm/{}", path.display(), args.embedding))?;
        let title = format!(
            "obsm/{} of {} ({} cells)",
            args.embedding,
            path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned()),
            labels.len()
        );
        let panels = [
            scgpt_eval::umap::Colouring { title: &format!("label ({})", args.label_col), values: &labels },
            scgpt_eval::umap::Colouring { title: &format!("batch ({})", args.batch_col), values: &batches },
        ];
        let png = scgpt_eval::umap::write_umap_png(&args.report, "umap.png", &y, &title, &panels)?;
        say(&format!("wrote {}", png.display()));
    }

    let f = |v: Option<f64>| v.map_or("null".to_string(), |x| format!("{x:.4}"));
    println!(
        "NMI {}  ARI {}  ASW_label {}  ASW_label/batch {}  graph_conn {}  PCR_batch {}  iLISI {}  cLISI {}",
        f(rep.nmi),
        f(rep.ari),
        f(rep.asw_label),
        f(rep.asw_batch),
        f(rep.graph_conn),
        f(rep.pcr_batch),
        f(rep.ilisi),
        f(rep.clisi)
    );
    println!(
        "avg_bio {}  avg_batch {}  (Leiden resolution {})",
        f(rep.avg_bio),
        f(rep.avg_batch),
        rep.leiden_resolution.map_or("null".to_string(), |r| format!("{r:.1}"))
    );
    for n in &rep.notes {
        println!("note: {n}");
    }
    say(&format!("wrote {}", out.display()));
    Ok(())
}
