//! `scgpt predict`: cell-type labels for a query h5ad.
//!
//! - `--mode classifier` (default): a fine-tuned annotation model (`best_model/` of a
//!   `task.kind = "annotation"` run, or the original's fine-tuned `best_model.pt` with its
//!   class list beside it). Cells are tokenised as training did (`scgpt.json` in the model
//!   directory: `<cls>` value, `max_seq_len`): nonzero genes in the vocabulary, binned per cell;
//!   the CLS head's softmax gives the probabilities.
//! - `--mode knn`: reference mapping without fine-tuning (the original's
//!   Tutorial_Reference_Mapping): zero-shot `<cls>` embeddings of reference and query (as
//!   `scgpt embed`), and a vote of the k nearest reference cells by cosine similarity.
//!
//! Output: a copy of the query with `obs["scgpt_label"]`, `obs["scgpt_confidence"]`,
//! `obsm["scgpt_probs"]` and `uns["scgpt_classes"]`. With `--label-col`, a report directory
//! gets `metrics.json`, `confusion.csv` and `confusion.png`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use scgpt_data::h5ad::{H5adReader, MatrixChoice};
use scgpt_data::tokenize::TokenizeOptions;

use crate::inference::{read_spec, run_model, Encoding, Head, TokenGenes};
use crate::labelled_h5ad::{self, Predictions};
use crate::model_dir;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The fine-tuned CLS head.
    Classifier,
    /// k-nearest-neighbour vote on zero-shot embeddings of a labelled reference.
    Knn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Matrix {
    Auto,
    X,
}

#[derive(Debug, clap::Args)]
pub struct PredictArgs {
    /// Model directory: best_model/ of an annotation run (classifier), or a pretrained
    /// checkpoint folder (knn).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Query h5ad.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Output h5ad: a copy of the query with the predictions added.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = Mode::Classifier)]
    pub mode: Mode,
    /// var column with gene names (default: the model's training setting, else the var index).
    #[arg(long, value_name = "COL")]
    pub gene_col: Option<String>,
    /// obs column with true labels: writes a report (needs --report).
    #[arg(long, value_name = "COL")]
    pub label_col: Option<String>,
    /// Report directory: metrics.json, confusion.csv, confusion.png.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Cells whose top probability is below this are labelled `Unknown`.
    #[arg(long, value_name = "P")]
    pub min_confidence: Option<f32>,
    /// knn: the labelled reference h5ad.
    #[arg(long, value_name = "FILE")]
    pub reference: Option<PathBuf>,
    /// knn: obs column of the reference with its labels.
    #[arg(long, value_name = "COL")]
    pub reference_label_col: Option<String>,
    /// knn: neighbours that vote.
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Which matrix to read: `auto` (raw/X when present, else X: what training's data prep
    /// reads) or `x` (X only).
    #[arg(long, value_enum, default_value_t = Matrix::Auto)]
    pub matrix: Matrix,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Longest input in tokens (default: the model's training setting; 3001 for a classifier
    /// without one, 1200 for knn, as the tutorials).
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// Seed of the binning ties and of subsampling long cells.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No randomness: lowest tied bin, the most expressed genes of long cells.
    #[arg(long)]
    pub deterministic: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Fail when fewer than this fraction of the input genes are in the model vocabulary.
    #[arg(long, default_value_t = 0.25, value_name = "FRACTION")]
    pub min_gene_match: f64,
    #[command(flatten)]
    pub batch: crate::inference::BatchArgs,
    #[arg(long)]
    pub quiet: bool,
}

pub const UNKNOWN: &str = "Unknown";

/// The class names saved beside a fine-tuned model: `classes.json` (a list, this project) or
/// `id2type.json` (the original tutorial's id → name mapping).
pub fn read_classes(dir: &Path) -> anyhow::Result<Vec<String>> {
    let list = dir.join("classes.json");
    if list.is_file() {
        let text = std::fs::read_to_string(&list)?;
        return serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON list of class names", list.display()));
    }
    let map = dir.join("id2type.json");
    if map.is_file() {
        let text = std::fs::read_to_string(&map)?;
        let m: std::collections::BTreeMap<String, String> =
            serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON object id -> name", map.display()))?;
        let mut pairs: Vec<(usize, String)> = Vec::new();
        for (k, v) in m {
            let id: usize = k.parse().with_context(|| format!("{}: key {k:?} is not a class id", map.display()))?;
            pairs.push((id, v));
        }
        pairs.sort();
        if pairs.iter().enumerate().any(|(i, (id, _))| i != *id) {
            bail!("{}: class ids must be 0..n without gaps", map.display());
        }
        return Ok(pairs.into_iter().map(|(_, v)| v).collect());
    }
    bail!(
        "{}: no classes.json (or id2type.json); predict needs the class names of the model's CLS head — is this the best_model/ of an annotation run?",
        dir.display()
    )
}

fn matrix(args: &PredictArgs) -> MatrixChoice {
    match args.matrix {
        Matrix::Auto => MatrixChoice::RawThenX,
        Matrix::X => MatrixChoice::X,
    }
}

fn labels_of(path: &Path, col: &str, what: &str) -> anyhow::Result<Vec<String>> {
    let r = H5adReader::open(path, MatrixChoice::X)?;
    r.obs_column(col).with_context(|| format!("{what} = {col:?}"))
}

/// The argmax class (or `Unknown` below `min_confidence`) and the top probability per row.
fn decide(probs: &[f32], classes: &[String], min_confidence: Option<f32>) -> (Vec<String>, Vec<f32>) {
    let k = classes.len();
    probs
        .chunks(k)
        .map(|row| {
            let (best, p) = row.iter().enumerate().fold((0, f32::NEG_INFINITY), |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc });
            let label = match min_confidence {
                Some(m) if p < m => UNKNOWN.to_string(),
                _ => classes[best].clone(),
            };
            (label, p)
        })
        .unzip()
}

fn validate(args: &PredictArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(args.input.is_file(), "{}: input not found", args.input.display());
    anyhow::ensure!(args.label_col.is_none() || args.report.is_some(), "--label-col writes a report: give --report DIR");
    if let Some(p) = args.min_confidence {
        anyhow::ensure!((0.0..=1.0).contains(&p), "--min-confidence must be a probability in [0, 1], got {p}");
    }
    if args.mode == Mode::Knn {
        anyhow::ensure!(
            args.reference.is_some() && args.reference_label_col.is_some(),
            "--mode knn needs --reference FILE and --reference-label-col COL"
        );
        anyhow::ensure!(args.k > 0, "--k must be at least 1");
    }
    if args.output.is_dir() {
        bail!("{}: output is a directory; give a file name", args.output.display());
    }
    Ok(())
}

pub fn run(args: &PredictArgs) -> anyhow::Result<()> {
    validate(args)?;
    let dev = crate::embed::device(&args.device)?;
    let spec = read_spec(&args.model)?;
    // The truth column is checked before any compute.
    let truth = match &args.label_col {
        Some(col) => Some(labels_of(&args.input, col, "--label-col")?),
        None => None,
    };
    let mut knn_labels: Option<Vec<String>> = None;
    let (classes, probs, train_classes) = match args.mode {
        Mode::Classifier => {
            let classes = read_classes(&args.model)?;
            let mut loaded = model_dir::load_classifier(&args.model, &dev, classes.len())?;
            let max_seq_len = args.max_seq_len.or(spec.as_ref().map(|s| s.max_seq_len)).unwrap_or(3001);
            // Fine-tuning gives <cls> the value 0 (the tutorials' tokenize_and_pad_batch).
            let cls_value = spec.as_ref().map_or(0.0, |s| s.cls_value);
            let gene_col = args.gene_col.clone().or(spec.as_ref().map(|s| s.gene_col.clone()).filter(|c| !c.is_empty()));
            let token_genes = match spec.as_ref().and_then(|s| s.genes.as_ref()) {
                Some(names) => {
                    Some(TokenGenes::new(names, &loaded.vocab, &args.model, spec.as_ref().is_some_and(|s| s.include_zero_gene))?)
                }
                None => None,
            };
            let (batch_ids, _) = args.batch.ids_for(&args.model, spec.as_ref(), &args.input, &mut loaded.model)?;
            let enc = Encoding {
                tokens: TokenizeOptions {
                    max_seq_len,
                    cls_id: loaded.cls_id,
                    pad_value: loaded.pad_value,
                    seed: (!args.deterministic).then_some(args.seed),
                },
                cls_value,
                pad_id: loaded.pad_id,
                token_genes,
                batch_ids,
            };
            let out = run_model(
                &loaded.model,
                &args.input,
                matrix(args),
                gene_col.as_deref(),
                &loaded,
                &enc,
                args.batch_size,
                args.min_gene_match,
                args.quiet,
                Head::Probabilities,
                &dev,
            )?;
            anyhow::ensure!(
                out.width == classes.len(),
                "the model's head has {} outputs but its classes file lists {}",
                out.width,
                classes.len()
            );
            (classes.clone(), out.rows, classes)
        }
        Mode::Knn => {
            let loaded = model_dir::load(&args.model, &dev)?;
            let enc = Encoding {
                tokens: TokenizeOptions {
                    max_seq_len: args.max_seq_len.unwrap_or(1200),
                    cls_id: loaded.cls_id,
                    pad_value: loaded.pad_value,
                    seed: (!args.deterministic).then_some(args.seed),
                },
                // As `embed_data`: <cls> carries pad_value.
                cls_value: loaded.pad_value,
                pad_id: loaded.pad_id,
                token_genes: None,
                batch_ids: None,
            };
            let reference = args.reference.as_ref().expect("validated");
            let ref_col = args.reference_label_col.as_deref().expect("validated");
            let ref_labels = labels_of(reference, ref_col, "--reference-label-col")?;
            // Reference and query are embedded alike.
            let embed = |input| {
                run_model(
                    &loaded.model,
                    input,
                    matrix(args),
                    args.gene_col.as_deref(),
                    &loaded,
                    &enc,
                    args.batch_size,
                    args.min_gene_match,
                    args.quiet,
                    Head::Embedding,
                    &dev,
                )
            };
            let reference = embed(reference)?;
            let query = embed(&args.input)?;
            let vote = scgpt_eval::knn::knn_vote(&reference.rows, &ref_labels, &query.rows, reference.width, args.k)?;
            // Ties in the vote go to the label of the closest neighbour, which a plain argmax
            // over the fractions would not know: the probabilities are the vote shares, the
            // labels the vote's.
            knn_labels = Some(vote.labels);
            let classes = vote.classes.clone();
            (classes.clone(), vote.fractions, classes)
        }
    };
    let (mut labels, confidence) = decide(&probs, &classes, args.min_confidence);
    if let Some(voted) = knn_labels {
        for (l, v) in labels.iter_mut().zip(voted) {
            if l != UNKNOWN {
                *l = v;
            }
        }
    }
    labelled_h5ad::write(
        &args.input,
        &args.output,
        &Predictions { labels: &labels, confidence: &confidence, probs: &probs, classes: &classes },
    )?;
    eprintln!("wrote {} ({} cells, {} classes)", args.output.display(), labels.len(), classes.len());
    if let (Some(truth), Some(dir)) = (&truth, &args.report) {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the report directory", dir.display()))?;
        let report = scgpt_eval::classification::ClassificationReport::new(truth, &labels, &train_classes)?;
        report.write_all(dir)?;
        eprintln!("{}", report.table());
        if !report.unseen_labels.is_empty() {
            eprintln!("note: query labels never seen in training: {}", report.unseen_labels.join(", "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decide_takes_the_argmax_and_marks_low_confidence_unknown() {
        let classes = vec!["a".to_string(), "b".to_string()];
        let (l, c) = decide(&[0.2, 0.8, 0.55, 0.45], &classes, Some(0.6));
        assert_eq!(l, vec!["b", UNKNOWN]);
        assert_eq!(c, vec![0.8, 0.55]);
    }
}
