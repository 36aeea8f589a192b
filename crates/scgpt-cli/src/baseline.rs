//! `scgpt baseline annotation`: the PCA + logistic-regression annotation baseline (see
//! `scgpt_eval::baseline`) fit on a labelled reference h5ad and scored on a labelled query h5ad,
//! with the same report files a fine-tuned model's evaluation writes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use scgpt_data::h5ad::{H5adReader, MatrixChoice};
use scgpt_eval::{annotation_baseline, BaselineOptions, ClassificationReport, CsrMatrix};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct BaselineArgs {
    #[command(subcommand)]
    pub task: BaselineTask,
}

#[derive(Debug, Subcommand)]
pub enum BaselineTask {
    /// Cell-type annotation: normalise + log1p, highly variable genes (Seurat rule), PCA,
    /// logistic regression (scanpy + scikit-learn defaults). Writes metrics.json,
    /// confusion.csv, confusion.png, predictions.csv and baseline.json into --report.
    Annotation(AnnotationArgs),
    /// Batch integration: the unintegrated HVG + PCA embedding and Harmony on it, each scored
    /// with the scIB metrics of `scgpt eval integration`. Writes metrics.json (keyed by
    /// method), baseline.json, umap_pca.png and umap_harmony.png into --report.
    Integration(crate::baseline_integration::IntegrationArgs),
}

#[derive(Debug, Args)]
pub struct AnnotationArgs {
    /// Labelled reference (training) h5ad.
    #[arg(long, value_name = "H5AD")]
    pub train: PathBuf,
    /// Labelled query (test) h5ad.
    #[arg(long, value_name = "H5AD")]
    pub test: PathBuf,
    /// obs column with the cell types of the reference (and of the query, unless
    /// --test-label-col).
    #[arg(long, value_name = "COL")]
    pub label_col: String,
    /// obs column with the query's cell types, when named differently.
    #[arg(long, value_name = "COL")]
    pub test_label_col: Option<String>,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub report: PathBuf,
    /// var column with gene names (default: the var index). Query genes are matched to the
    /// reference's by these names.
    #[arg(long, value_name = "COL")]
    pub gene_col: Option<String>,
    /// Read raw/X instead of X. The baseline normalises and log-transforms, so it wants counts.
    #[arg(long)]
    pub use_raw: bool,
    #[arg(long, default_value_t = 2000)]
    pub n_hvg: usize,
    #[arg(long, default_value_t = 50)]
    pub n_pcs: usize,
    /// Recorded in baseline.json; the pipeline has no random step.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: &BaselineArgs) -> Result<()> {
    match &args.task {
        BaselineTask::Annotation(a) => annotation(a),
        BaselineTask::Integration(a) => crate::baseline_integration::run(a),
    }
}

/// One h5ad's matrix (cells with a label only), gene names, labels and cell ids.
struct Labelled {
    indptr: Vec<usize>,
    indices: Vec<u32>,
    data: Vec<f32>,
    genes: Vec<String>,
    labels: Vec<String>,
    cells: Vec<String>,
    n_unlabelled: usize,
}

impl Labelled {
    fn matrix(&self) -> Result<CsrMatrix<'_>> {
        CsrMatrix::new(&self.indptr, &self.indices, &self.data, self.genes.len())
    }
}

fn read_labelled(path: &Path, label_col: &str, flag: &str, args: &AnnotationArgs) -> Result<Labelled> {
    let choice = if args.use_raw { MatrixChoice::RawThenX } else { MatrixChoice::X };
    let mut reader = H5adReader::open(path, choice)?;
    let labels = reader.obs_column(label_col).with_context(|| format!("{flag} {label_col}"))?;
    let genes = reader.var_names(args.gene_col.as_deref())?;
    let cells = reader.obs_names()?;
    let n = reader.n_obs();
    let (mut indptr, mut indices, mut data) = (vec![0usize], Vec::new(), Vec::new());
    let (mut kept_labels, mut kept_cells) = (Vec::new(), Vec::new());
    // Blocks bound the transient copy; the kept rows are the baseline's input anyway.
    const BLOCK: usize = 16_384;
    for start in (0..n).step_by(BLOCK) {
        let block = reader.read_rows(start, (start + BLOCK).min(n))?;
        for r in 0..block.n_rows() {
            let i = start + r;
            // anndata writes a missing categorical value as code -1, read here as "".
            if labels[i].is_empty() {
                continue;
            }
            let (idx, val) = block.row(r);
            indices.extend_from_slice(idx);
            data.extend_from_slice(val);
            indptr.push(indices.len());
            kept_labels.push(labels[i].clone());
            kept_cells.push(cells[i].clone());
        }
    }
    let n_unlabelled = n - kept_labels.len();
    if kept_labels.is_empty() {
        bail!("{}: no cell has a value in obs `{label_col}`", path.display());
    }
    Ok(Labelled { indptr, indices, data, genes, labels: kept_labels, cells: kept_cells, n_unlabelled })
}

#[derive(Serialize)]
struct RunInfo<'a> {
    train: &'a Path,
    test: &'a Path,
    label_col: &'a str,
    test_label_col: &'a str,
    matrix: &'a str,
    n_train: usize,
    n_test: usize,
    n_train_unlabelled: usize,
    n_test_unlabelled: usize,
    classes: &'a [String],
    n_hvg: usize,
    hvg_missing_in_test: usize,
    n_pcs: usize,
    explained_variance: &'a [f64],
    lr_iterations: usize,
    lr_converged: bool,
    seconds: f64,
    options: &'a BaselineOptions,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn annotation(args: &AnnotationArgs) -> Result<()> {
    let t0 = Instant::now();
    let test_col = args.test_label_col.as_deref().unwrap_or(&args.label_col);
    let train = read_labelled(&args.train, &args.label_col, "--label-col", args)?;
    let test = read_labelled(&args.test, test_col, "--test-label-col", args)?;
    for (what, d) in [("reference", &train), ("query", &test)] {
        if d.n_unlabelled > 0 {
            eprintln!("note: {} {what} cells have no label and are left out", d.n_unlabelled);
        }
    }
    let opts = BaselineOptions { n_hvg: args.n_hvg, n_pcs: args.n_pcs, seed: args.seed, ..Default::default() };
    let pred = annotation_baseline(&train.matrix()?, &train.genes, &train.labels, &test.matrix()?, &test.genes, &opts).map_err(|e| {
        // A negative value means the matrix is scaled (scanpy keeps counts in raw/X then).
        let hint =
            if e.to_string().contains("non-negative") && !args.use_raw { "; if X holds scaled values, --use-raw reads raw/X" } else { "" };
        e.context(format!("baseline on {} -> {}{hint}", args.train.display(), args.test.display()))
    })?;
    if pred.hvg_missing_in_test == pred.hvg.len() {
        bail!(
            "{}: none of the reference's {} highly variable genes is among the query's gene names; \
             check --gene-col (both files must name genes the same way)",
            args.test.display(),
            pred.hvg.len()
        );
    }
    let report = ClassificationReport::new(&test.labels, &pred.labels, &pred.classes)?;
    report.write_all(&args.report)?;

    let mut csv = String::from("cell,true,predicted,probability\n");
    for (i, cell) in test.cells.iter().enumerate() {
        let p = pred.probabilities.row(i).fold(0f64, |a, &v| a.max(v));
        csv.push_str(&format!("{},{},{},{p:.6}\n", csv_field(cell), csv_field(&test.labels[i]), csv_field(&pred.labels[i])));
    }
    scgpt_eval::write_atomic(&args.report, "predictions.csv", csv.as_bytes())?;
    let info = RunInfo {
        train: &args.train,
        test: &args.test,
        label_col: &args.label_col,
        test_label_col: test_col,
        matrix: if args.use_raw { "raw/X (else X)" } else { "X" },
        n_train: train.labels.len(),
        n_test: test.labels.len(),
        n_train_unlabelled: train.n_unlabelled,
        n_test_unlabelled: test.n_unlabelled,
        classes: &pred.classes,
        n_hvg: pred.hvg.len(),
        hvg_missing_in_test: pred.hvg_missing_in_test,
        n_pcs: pred.n_pcs,
        explained_variance: &pred.explained_variance,
        lr_iterations: pred.lr_iterations,
        lr_converged: pred.lr_converged,
        seconds: t0.elapsed().as_secs_f64(),
        options: &opts,
    };
    let mut json = serde_json::to_string_pretty(&info)?;
    json.push('\n');
    scgpt_eval::write_atomic(&args.report, "baseline.json", json.as_bytes())?;

    println!(
        "baseline annotation: {} reference cells, {} query cells, {} HVGs ({} missing in the query), {} PCs",
        info.n_train, info.n_test, info.n_hvg, info.hvg_missing_in_test, info.n_pcs
    );
    if !pred.lr_converged {
        eprintln!("note: the logistic regression stopped after {} iterations before converging", pred.lr_iterations);
    }
    print!("{}", report.table());
    println!("report: {}", args.report.display());
    Ok(())
}
