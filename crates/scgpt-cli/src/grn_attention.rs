//! `scgpt grn attention`: the original's `Tutorial_Attention_GRN` on a perturbation screen
//! (finetune-reference §5). Which genes change how strongly they attend to a perturbed gene
//! GENE, between control cells and the cells where GENE is perturbed?
//!
//! **Data**, as the notebook prepares Adamson for BHLHE40:
//! 1. the screen (GEARS format, read by `scgpt_engine::screen::Screen`) restricted to the
//!    control cells and the cells of GENE's single-gene condition (`GENE+ctrl` or `ctrl+GENE`;
//!    doubles that include GENE are not used, as in the notebook), and to its genes in the
//!    model vocabulary;
//! 2. `Preprocessor(filter_gene_by_counts=3)`: genes whose total over those cells is below 3
//!    are dropped (`--filter-gene-counts`; GENE itself is always kept);
//! 3. every cell binned (51 bins, per cell, over its nonzero values among **all** kept genes,
//!    before any gene selection, as the Preprocessor bins before the notebook's HVG step);
//! 4. `--genes hvg:N`: `sc.pp.highly_variable_genes(n_top_genes=N, flavor="cell_ranger",
//!    batch_key="str_batch")` on the log-normalised X (the notebook's batch is the `control`
//!    column, i.e. control vs perturbed; here the same split from the conditions), with GENE
//!    forced in; or `--genes FILE`, one symbol per line (GENE added); tokens stay in the
//!    screen's gene order;
//! 5. `tokenize_and_pad_batch(include_zero_gene=True, append_cls=True)`: `<cls>` (value 0)
//!    then every chosen gene with its bin, zeros included, so every cell has M = genes + 1
//!    tokens and no padding.
//!
//! **Scores** (`scgpt_model::attention_grn`): per batch of `--batch-size` cells, the raw
//! `q · kᵀ` of layer `--layer` (−1 = the last, the notebook's 11 of 12), each head rank
//! normalised over rows then columns (divided by M), averaged over heads, then over the cells
//! of each condition. Only the column of GENE is needed (key = GENE, one row per query gene),
//! and it is computed exactly without ranking the rest (`rank_normalised_column`).
//!
//! **Direction.** As the notebook, a target's score is column GENE: how strongly the target,
//! as query, attends to GENE as key (`dict_sum_condition_mean[c][:, GENE]`). The maintainers
//! call this key→query (scGPT issue #26); the other direction (row GENE) is not computed.
//!
//! **Output** (`--output DIR`): `targets.tsv` (every chosen gene, GENE included: target,
//! score_control, score_perturbed, difference = perturbed − control, rank; sorted by difference,
//! descending, ties in token order), `top_targets.png` (the top `--top` differences) and
//! `summary.json` (cells, genes, layer, heads, the notes below).
//!
//! **Deliberately not reproduced**: the notebook skips the first cell of each condition in its
//! running sum but divides by the full count (finetune-reference §7 pitfall 7); here every cell
//! counts. Its 8 heads are hard-coded; here the model's. It runs under fp16 autocast; here f32.
//! Ties in its unstable `torch.argsort` follow the sort kernel; here index order (stable).
//! Binning ties are broken at random as the original does, from a seeded per-cell stream
//! (`--seed`), or take the lowest tied bin (`--deterministic`).
//!
//! **Model.** An original checkpoint folder (`model_dir.rs`). The notebook's model carries a
//! plain `bn` (before Sept 2023 every non-DSBN model built one, and `args.json` did not say
//! so): it is used when args.json says `domain_spec_batchnorm = "batchnorm"` or when the
//! checkpoint holds `bn.*` tensors. A DSBN model needs a batch label per cell and is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use scgpt_data::binning::{Binner, TieBreak, DEFAULT_N_BINS};
use scgpt_data::seed::{hash_str, rng_for};
use scgpt_engine::screen::{Screen, ScreenOptions};
use scgpt_eval::bar_chart::{write_bar_chart_png, BarChart};
use scgpt_eval::perturbation::Condition;
use scgpt_eval::preprocess::{filter_genes_min_counts, highly_variable_genes, HvgFlavor, HvgOptions};
use scgpt_eval::{keep_columns, OwnedCsr};
use scgpt_model::attention_grn::{rank_normalised_column, resolve_layer};
use scgpt_model::burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use scgpt_model::{load_pretrained, BatchNormStyle, ModelInput};
use serde_json::{json, Value};

use crate::grn::{parse_genes, read_gene_file, GeneChoice};
use crate::model_dir::{self, LoadedModel};

pub const TARGETS_FILE: &str = "targets.tsv";
pub const CHART_FILE: &str = "top_targets.png";
pub const SUMMARY_FILE: &str = "summary.json";

#[derive(Debug, Clone, clap::Args)]
pub struct GrnAttentionArgs {
    /// Model directory: best_model.pt + args.json + vocab.json (an original checkpoint folder,
    /// e.g. the blood model fine-tuned on the screen).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The perturbation screen (GEARS format: log-normalised X, a condition column, symbols in
    /// a var column).
    #[arg(long, value_name = "H5AD")]
    pub input: PathBuf,
    /// The perturbed gene whose targets are ranked (its cells: condition GENE+ctrl).
    #[arg(long, value_name = "GENE")]
    pub perturbed: String,
    /// obs column with the conditions.
    #[arg(long, value_name = "COL", default_value = "condition")]
    pub condition_col: String,
    /// The control condition's label.
    #[arg(long, value_name = "LABEL", default_value = "ctrl")]
    pub control: String,
    /// What joins the two parts of a condition.
    #[arg(long, value_name = "SEP", default_value = "+")]
    pub separator: String,
    /// var column with gene symbols ("" = the var index).
    #[arg(long, value_name = "COL", default_value = "gene_name")]
    pub gene_col: String,
    /// The screen holds counts: normalise to 1e4 per cell and log1p first (as GEARS).
    #[arg(long)]
    pub normalize: bool,
    /// Layer whose attention is read; negative counts from the end (-1 = the last).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub layer: isize,
    /// Token genes: `hvg:N` (cell_ranger HVGs of the control and perturbed cells, GENE forced
    /// in) or a file with one gene symbol per line.
    #[arg(long, value_name = "hvg:N|FILE", default_value = "hvg:1200")]
    pub genes: String,
    /// Drop genes whose total over the cells used is below this (the Preprocessor's
    /// filter_gene_by_counts); 0 keeps every gene.
    #[arg(long, default_value_t = 3.0)]
    pub filter_gene_counts: f64,
    /// Cells per forward pass (scores take batch × heads × M² floats).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Targets drawn in the bar chart.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Seed of the binning tie-breaks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tied values take the lowest tied bin instead of a seeded random one.
    #[arg(long)]
    pub deterministic: bool,
    /// Compute device: cpu (burn's Flex backend); cuda, wgpu or vulkan in GPU builds.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Output directory (created).
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// One gene's scores, averaged over the cells of each condition.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetScore {
    pub target: String,
    pub score_control: f64,
    pub score_perturbed: f64,
    pub difference: f64,
}

/// Loads the model folder, with the plain `bn` when args.json or the checkpoint asks for it.
fn load_model(dir: &Path, device: &Device, notes: &mut Vec<String>) -> anyhow::Result<LoadedModel> {
    let mut loaded = model_dir::load(dir, device)?;
    let ckpt = loaded.report.path.clone();
    let skipped_under = |prefix: &str| loaded.report.skipped.iter().any(|s| s.name.starts_with(prefix));
    if loaded.model.dsbn.is_some() || skipped_under("dsbn.") {
        bail!(
            "{}: a domain-specific batchnorm (DSBN) model; its attention depends on each cell's batch label, which grn attention does not take (the tutorial's model has a plain `bn`)",
            ckpt.display()
        );
    }
    let args_path = dir.join(model_dir::ARGS);
    let args: Value =
        serde_json::from_str(&std::fs::read_to_string(&args_path).with_context(|| format!("{}: cannot read", args_path.display()))?)
            .with_context(|| format!("{}: not valid JSON", args_path.display()))?;
    let args_say_bn = ["domain_spec_batchnorm", "DSBN"].iter().any(|k| args.get(*k).and_then(Value::as_str) == Some("batchnorm"));
    let file_has_bn = skipped_under("bn.") && loaded.report.skipped.iter().any(|s| s.name == "bn.running_mean");
    if loaded.model.bn.is_none() && (args_say_bn || file_has_bn) {
        let config = loaded.model.config.clone();
        let config = scgpt_model::ModelConfig { domain_spec_batchnorm: BatchNormStyle::BatchNorm, ..config };
        let mut model = config.init(device)?;
        let report = load_pretrained(&mut model, &ckpt)?;
        if let Some(m) = report.missing.iter().find(|m| m.starts_with("bn.")) {
            bail!(
                "{}: {} asks for domain_spec_batchnorm = \"batchnorm\" but the checkpoint has no {m}; is this the right checkpoint?",
                ckpt.display(),
                args_path.display()
            );
        }
        notes.push(if args_say_bn {
            format!("the plain batchnorm `bn` of {} is applied after the embeddings (args.json: domain_spec_batchnorm = \"batchnorm\")", ckpt.display())
        } else {
            format!("{} carries `bn.*` tensors (a model from before Sept 2023, whose args.json does not mention it); its plain batchnorm is applied after the embeddings, as the tutorial's `model.bn`", ckpt.display())
        });
        loaded.model = model;
        loaded.report = report;
    }
    Ok(loaded)
}

/// Rows `rows` of `x`, in that order.
fn take_rows(x: &OwnedCsr, rows: &[usize]) -> OwnedCsr {
    let mut out = OwnedCsr { indptr: vec![0], n_cols: x.n_cols, ..Default::default() };
    for &i in rows {
        let (a, b) = (x.indptr[i], x.indptr[i + 1]);
        out.indices.extend_from_slice(&x.indices[a..b]);
        out.data.extend_from_slice(&x.data[a..b]);
        out.indptr.push(out.indices.len());
    }
    out
}

/// Reads a gene list: the first field of each line; blank lines and `#` comments skipped.
pub fn run(a: &GrnAttentionArgs) -> anyhow::Result<()> {
    let choice = parse_genes(&a.genes)?;
    anyhow::ensure!(a.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(a.filter_gene_counts.is_finite() && a.filter_gene_counts >= 0.0, "--filter-gene-counts must be a number >= 0");
    let device = crate::embed::device(&a.device)?;
    let mut notes = Vec::new();
    let loaded = load_model(&a.model, &device, &mut notes)?;
    let gene = a.perturbed.as_str();

    // The screen, GENE's presence, and the two groups of cells.
    let opts = ScreenOptions {
        condition_col: a.condition_col.clone(),
        control: a.control.clone(),
        separator: a.separator.clone(),
        gene_col: a.gene_col.clone(),
        normalize: a.normalize,
    };
    let screen = Screen::read(&a.input, &opts)?;
    notes.extend(screen.notes.iter().cloned());
    let var_what = if a.gene_col.is_empty() { "the var index".to_string() } else { format!("var[{:?}]", a.gene_col) };
    let Some(gene_col) = screen.genes.iter().position(|g| g == gene) else {
        bail!("--perturbed {gene}: not a gene of {} ({var_what}, {} genes); is --gene-col right?", a.input.display(), screen.n_genes());
    };
    if loaded.vocab.get(gene).is_none() {
        bail!("--perturbed {gene}: not in the model vocabulary {}; the model has no token to attend to", loaded.vocab_path.display());
    }
    let format = screen.format();
    let wanted = Condition::Single(gene.to_string());
    let label = format.to_gears_string(&wanted);
    let mut is_perturbed: HashMap<&str, bool> = HashMap::new();
    for c in &screen.conditions {
        is_perturbed.entry(c.as_str()).or_insert_with(|| format.parse(c).is_ok_and(|p| p == wanted));
    }
    let control_rows = screen.control_rows();
    let perturbed_rows: Vec<usize> = (0..screen.n_cells()).filter(|&i| is_perturbed[screen.conditions[i].as_str()]).collect();
    if perturbed_rows.is_empty() {
        let with_gene: Vec<&str> =
            is_perturbed.keys().copied().filter(|c| format.parse(c).is_ok_and(|p| p.genes().contains(&gene))).take(5).collect();
        bail!(
            "{}: no cells of {gene}'s condition {label:?} in obs[{:?}] ({} conditions{}); --perturbed names a gene perturbed alone in the screen",
            a.input.display(),
            a.condition_col,
            is_perturbed.len(),
            if with_gene.is_empty() { String::new() } else { format!("; {gene} appears only in {}", with_gene.join(", ")) }
        );
    }
    // Cells in file order, with their group (true = perturbed).
    let mut rows: Vec<(usize, bool)> = control_rows.iter().map(|&i| (i, false)).chain(perturbed_rows.iter().map(|&i| (i, true))).collect();
    rows.sort_unstable();
    let row_ids: Vec<usize> = rows.iter().map(|r| r.0).collect();
    let group: Vec<bool> = rows.iter().map(|r| r.1).collect();

    // Genes in the vocabulary, then the count filter (GENE kept).
    let x = take_rows(&screen.x, &row_ids);
    let in_vocab: Vec<bool> = screen.genes.iter().map(|g| loaded.vocab.get(g).is_some()).collect();
    let (x, vocab_cols) = keep_columns(&x.csr()?, &in_vocab);
    let mut keep = if a.filter_gene_counts > 0.0 { filter_genes_min_counts(&x.csr()?, a.filter_gene_counts) } else { vec![true; x.n_cols] };
    let gene_k = vocab_cols.iter().position(|&c| c == gene_col).expect("GENE is in the vocabulary");
    if !keep[gene_k] {
        keep[gene_k] = true;
        notes.push(format!("{gene} has a total below --filter-gene-counts {} over these cells; kept anyway", a.filter_gene_counts));
    }
    let (x, kept) = keep_columns(&x.csr()?, &keep);
    let kept: Vec<usize> = kept.iter().map(|&k| vocab_cols[k]).collect(); // screen columns
    let gene_kept = kept.iter().position(|&c| c == gene_col).expect("GENE kept");
    eprintln!(
        "{}: {} control and {} {label} cells; {} of {} genes in the vocabulary, {} after --filter-gene-counts {}",
        a.input.display(),
        control_rows.len(),
        perturbed_rows.len(),
        vocab_cols.len(),
        screen.n_genes(),
        kept.len(),
        a.filter_gene_counts
    );

    // Bins per cell over all kept genes (before the gene selection, as the Preprocessor).
    let n_cells = row_ids.len();
    let mut bins = vec![0u8; n_cells * kept.len()];
    {
        let (mut binner, mut out, mut vals, mut cols) = (Binner::new(), Vec::new(), Vec::new(), Vec::new());
        let stream = hash_str("scgpt grn attention: binning ties");
        for i in 0..n_cells {
            vals.clear();
            cols.clear();
            for (&j, &v) in x.indices[x.indptr[i]..x.indptr[i + 1]].iter().zip(&x.data[x.indptr[i]..x.indptr[i + 1]]) {
                if v != 0.0 {
                    vals.push(v);
                    cols.push(j as usize);
                }
            }
            if a.deterministic {
                binner.bin_nonzero::<rand_chacha::ChaCha8Rng>(&vals, DEFAULT_N_BINS, TieBreak::Lowest, &mut out);
            } else {
                let mut rng = rng_for(a.seed, stream, row_ids[i] as u64);
                binner.bin_nonzero(&vals, DEFAULT_N_BINS, TieBreak::Random(&mut rng), &mut out);
            }
            for (&j, &b) in cols.iter().zip(&out) {
                bins[i * kept.len() + j] = b;
            }
        }
    }

    // Token genes (positions in `kept`, ascending = screen order), GENE forced in.
    let genes_desc;
    let mut chosen: Vec<usize> = match &choice {
        GeneChoice::Hvg(n) if *n >= kept.len() => {
            genes_desc = format!("all {} genes (hvg:{n} asks for at least as many)", kept.len());
            (0..kept.len()).collect()
        }
        GeneChoice::Hvg(n) => {
            // The notebook's batch_key "str_batch" is str(obs["control"]): "0" (perturbed) sorts
            // before "1" (control).
            let batch: Vec<u32> = group.iter().map(|&p| if p { 0 } else { 1 }).collect();
            let hv = highly_variable_genes(&x.csr()?, &HvgOptions { batch: Some(&batch), ..HvgOptions::new(*n, HvgFlavor::CellRanger) })
                .with_context(|| format!("--genes hvg:{n}: cell_ranger highly variable genes over the control and {label} cells"))?;
            genes_desc = format!("hvg:{n} (cell_ranger, batches control / perturbed)");
            hv.selected
        }
        GeneChoice::File(p) => {
            let names = read_gene_file(p)?;
            let index: HashMap<&str, usize> = kept.iter().enumerate().map(|(k, &c)| (screen.genes[c].as_str(), k)).collect();
            let found: Vec<usize> = names.iter().filter_map(|n| index.get(n.as_str()).copied()).collect();
            let missing: Vec<&String> = names.iter().filter(|n| !index.contains_key(n.as_str())).collect();
            if !missing.is_empty() {
                notes.push(format!(
                    "{} of the {} genes in {} are not among the screen's kept vocabulary genes and are left out (e.g. {})",
                    missing.len(),
                    names.len(),
                    p.display(),
                    missing.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                ));
            }
            genes_desc = format!("{} ({} genes found)", p.display(), found.len());
            found
        }
    };
    chosen.push(gene_kept);
    chosen.sort_unstable();
    chosen.dedup();
    if chosen.len() < 2 {
        bail!("--genes {}: no gene besides {gene} to rank", a.genes);
    }
    let m = chosen.len() + 1;
    let col = 1 + chosen.iter().position(|&k| k == gene_kept).expect("GENE chosen");
    let mut ids: Vec<i64> = vec![loaded.cls_id as i64];
    ids.extend(chosen.iter().map(|&k| loaded.vocab.get(&screen.genes[kept[k]]).expect("kept genes are in the vocabulary") as i64));

    // Scores: column GENE of the rank-normalised attention, summed per group.
    let model = &loaded.model;
    let layer = resolve_layer(a.layer, model.transformer_encoder.layers.len())?;
    let heads = model.config.nhead;
    eprintln!(
        "{} tokens (<cls> + {} genes: {genes_desc}); layer {layer} of {}, {heads} heads",
        m,
        chosen.len(),
        model.transformer_encoder.layers.len()
    );
    let bar = if a.quiet { ProgressBar::hidden() } else { ProgressBar::new(n_cells as u64) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {human_pos}/{human_len} cells  {per_sec}  ETA {eta}")
            .expect("valid template"),
    );
    let mut sums = [vec![0f64; m], vec![0f64; m]];
    let mut counts = [0usize; 2];
    for start in (0..n_cells).step_by(a.batch_size) {
        let end = (start + a.batch_size).min(n_cells);
        let b = end - start;
        let mut values = Vec::with_capacity(b * m);
        for i in start..end {
            values.push(0f32); // <cls>
            values.extend(chosen.iter().map(|&k| bins[i * kept.len() + k] as f32));
        }
        let src: Vec<i64> = (0..b).flat_map(|_| ids.iter().copied()).collect();
        let input = ModelInput {
            src: Tensor::<2, Int>::from_data(TensorData::new(src, [b, m]), &device),
            values: Tensor::<2>::from_data(TensorData::new(values, [b, m]), &device),
            src_key_padding_mask: Tensor::<2, Bool>::from_data(TensorData::new(vec![false; b * m], [b, m]), &device),
            batch_labels: None,
        };
        let scores: Vec<f32> = model
            .attention_scores(input, layer as isize)?
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("reading the attention scores: {e:?}"))?;
        let per_cell = heads * m * m;
        for (c, cell) in scores.chunks_exact(per_cell).enumerate() {
            let column = rank_normalised_column(cell, heads, m, col)?;
            let g = group[start + c] as usize;
            counts[g] += 1;
            for (s, v) in sums[g].iter_mut().zip(&column) {
                *s += *v as f64;
            }
        }
        bar.inc(b as u64);
    }
    bar.finish_and_clear();

    let mean = |g: usize| -> Vec<f64> { sums[g].iter().map(|s| s / counts[g] as f64).collect() };
    let (control, perturbed) = (mean(0), mean(1));
    let mut targets: Vec<TargetScore> = chosen
        .iter()
        .enumerate()
        .map(|(t, &k)| TargetScore {
            target: screen.genes[kept[k]].clone(),
            score_control: control[t + 1],
            score_perturbed: perturbed[t + 1],
            difference: perturbed[t + 1] - control[t + 1],
        })
        .collect();
    targets.sort_by(|p, q| q.difference.total_cmp(&p.difference));

    write_outputs(a, &targets, &label, layer, heads, m, n_cells, counts, &genes_desc, &notes)?;
    for n in &notes {
        eprintln!("note: {n}");
    }
    eprintln!(
        "{}: {} targets of {gene}; top: {}",
        a.output.display(),
        targets.len(),
        targets.iter().take(5).map(|t| format!("{} ({:+.4})", t.target, t.difference)).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// targets.tsv: the header, then one line per target with its 1-based rank.
pub fn targets_tsv(targets: &[TargetScore]) -> String {
    let mut s = String::from("target\tscore_control\tscore_perturbed\tdifference\trank\n");
    for (r, t) in targets.iter().enumerate() {
        s.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            t.target,
            t.score_control as f32,
            t.score_perturbed as f32,
            t.difference as f32,
            r + 1
        ));
    }
    s
}

#[allow(clippy::too_many_arguments)] // One call site; the summary's fields.
fn write_outputs(
    a: &GrnAttentionArgs,
    targets: &[TargetScore],
    label: &str,
    layer: usize,
    heads: usize,
    m: usize,
    n_cells: usize,
    counts: [usize; 2],
    genes_desc: &str,
    notes: &[String],
) -> anyhow::Result<()> {
    let dir = &a.output;
    std::fs::create_dir_all(dir).with_context(|| format!("--output {}: cannot create", dir.display()))?;
    let gene = &a.perturbed;
    scgpt_data::atomic::write_bytes(&dir.join(TARGETS_FILE), targets_tsv(targets).as_bytes())
        .with_context(|| format!("writing {}", dir.join(TARGETS_FILE).display()))?;

    let top: Vec<&TargetScore> = targets.iter().take(a.top.max(1)).collect();
    let labels: Vec<String> = top.iter().map(|t| t.target.clone()).collect();
    let values: Vec<f64> = top.iter().map(|t| t.difference).collect();
    let title = format!("Attention to {gene}: {label} − control (layer {layer})");
    write_bar_chart_png(
        dir,
        CHART_FILE,
        &BarChart { title: &title, value_label: "difference of rank-normalised attention", labels: &labels, values: &values },
    )?;

    let summary = json!({
        "command": "scgpt grn attention",
        "model": a.model.display().to_string(),
        "input": a.input.display().to_string(),
        "perturbed": gene,
        "condition": label,
        "control": a.control,
        "cells": {"control": counts[0], "perturbed": counts[1], "total": n_cells},
        "layer": layer,
        "heads": heads,
        "tokens": m,
        "genes": genes_desc,
        "filter_gene_counts": a.filter_gene_counts,
        "seed": a.seed,
        "deterministic": a.deterministic,
        "direction": format!("column {gene} of the rank-normalised q·kᵀ: each target as query attending to {gene} as key (the tutorial's choice)"),
        "notes": notes,
    });
    scgpt_data::atomic::write_bytes(&dir.join(SUMMARY_FILE), (serde_json::to_string_pretty(&summary)? + "\n").as_bytes())
        .with_context(|| format!("writing {}", dir.join(SUMMARY_FILE).display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gene_choices_parse() {
        assert_eq!(parse_genes("hvg:1200").unwrap(), GeneChoice::Hvg(1200));
        assert!(parse_genes("hvg:0").unwrap_err().to_string().contains("positive"));
        assert!(parse_genes("hvg:x").is_err());
        assert!(parse_genes("/no/such/file").unwrap_err().to_string().contains("neither hvg:N"));
    }

    #[test]
    fn rows_are_taken_in_the_order_asked() {
        let x = OwnedCsr { indptr: vec![0, 1, 3, 3], indices: vec![0, 1, 2], data: vec![1.0, 2.0, 3.0], n_cols: 3 };
        let y = take_rows(&x, &[1, 0, 2]);
        assert_eq!(y.indptr, vec![0, 2, 3, 3]);
        assert_eq!(y.indices, vec![1, 2, 0]);
        assert_eq!(y.data, vec![2.0, 3.0, 1.0]);
    }

    #[test]
    fn tsv_has_a_header_and_ranks() {
        let t = vec![
            TargetScore { target: "A".into(), score_control: 0.25, score_perturbed: 0.5, difference: 0.25 },
            TargetScore { target: "B".into(), score_control: 0.5, score_perturbed: 0.25, difference: -0.25 },
        ];
        assert_eq!(
            targets_tsv(&t),
            "target\tscore_control\tscore_perturbed\tdifference\trank\nA\t0.25\t0.5\t0.25\t1\nB\t0.5\t0.25\t-0.25\t2\n"
        );
    }
}
