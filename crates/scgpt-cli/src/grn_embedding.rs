//! `scgpt grn embedding`: the original's gene-embedding network (`Tutorial_GRN`, scGPT's
//! `tasks/grn.py` `GeneEmbedding`, finetune-reference §4). The model's embedding of each chosen
//! gene token (the encoder: LayerNorm(Embedding), as the original's `model.encoder(ids)`),
//! cosine similarity, the top-k edges per gene, Leiden gene programs on a 15-neighbour graph at
//! resolution 40 (programs of at least 5 genes), program activity per cell (`score_genes`, then
//! min–max scaled per program) and its mean per cell type (`scgpt_eval::grn`).
//!
//! Genes: `--genes hvg:N` selects N highly variable genes with the original's flavour rule
//! (`cell_ranger` on normalised input, `seurat_v3` on integer counts), or `--genes FILE` (one
//! symbol per line); genes outside the vocabulary are listed and dropped, fewer than 10 left
//! is an error. Optional scoring: `--gmt` (enrichment of each program), `--reference` (AUROC and
//! AUPRC of the cosine edges against a regulator→target list, beside Pearson co-expression and
//! random edges).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use scgpt_data::h5ad::{H5adReader, MatrixChoice};
use scgpt_eval::grn::{
    activity_by_cell_type, enrichment, evaluate_against_reference, gene_programs, program_activity, read_gmt, top_k_edges,
    write_activity_heatmap_png, write_edges_tsv, write_program_network_png, GeneEmbeddings, GeneScorer, ProgramOptions, ReferenceNetwork,
    ScoreGenesOptions,
};
use scgpt_eval::preprocess::{filter_genes_min_counts, highly_variable_genes, HvgFlavor, HvgOptions};
use scgpt_eval::{keep_columns, OwnedCsr};
use scgpt_model::burn::tensor::{Int, Tensor, TensorData};
use serde_json::json;

use crate::grn::{parse_genes, read_gene_file, GeneChoice};
use crate::model_dir;

#[derive(Debug, clap::Args)]
pub struct GrnEmbeddingArgs {
    /// Model folder (best_model.pt + vocab.json + args.json), pretrained or fine-tuned.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// h5ad whose genes are networked and whose cells score the programs.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Output folder.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// `hvg:N` (highly variable genes: cell_ranger on normalised data, seurat_v3 on counts) or a
    /// file of gene symbols, one per line.
    #[arg(long, value_name = "hvg:N|FILE", default_value = "hvg:1200")]
    pub genes: String,
    /// var column with gene symbols (default: the var index).
    #[arg(long, value_name = "COL")]
    pub gene_col: Option<String>,
    /// Read raw/X instead of X when the file has it.
    #[arg(long)]
    pub use_raw: bool,
    /// With `--genes hvg:N`: genes whose total over the cells is below this are left out before
    /// the HVG step (the original's `Preprocessor(filter_gene_by_counts=3)`; 0 keeps all).
    #[arg(long, default_value_t = 3.0)]
    pub filter_gene_counts: f64,
    /// Leiden resolution of the gene programs (the original's 40).
    #[arg(long, default_value_t = 40.0)]
    pub resolution: f64,
    /// Smallest program kept (the original's 5).
    #[arg(long, default_value_t = 5)]
    pub min_program_size: usize,
    /// Edges kept per gene in edges.parquet.
    #[arg(long, default_value_t = 20)]
    pub top_k: usize,
    /// Cosine above which the program picture draws an edge (the original highlights > 0.4).
    #[arg(long, default_value_t = 0.4)]
    pub edge_threshold: f64,
    /// obs column with cell types: mean program activity per type, and its heatmap.
    #[arg(long, value_name = "COL")]
    pub label_col: Option<String>,
    /// Gene sets (GMT) to test each program against: enrichment.tsv.
    #[arg(long, value_name = "FILE")]
    pub gmt: Option<PathBuf>,
    /// Regulator→target list (TSV, optional third column) to score the edges against.
    #[arg(long, value_name = "FILE")]
    pub reference: Option<PathBuf>,
    /// Every table also as TSV (R, spreadsheets).
    #[arg(long)]
    pub tsv: bool,
    /// Seed of Leiden, score_genes' control genes and the random baseline.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, or cuda / wgpu / vulkan in GPU builds.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The file's genes and matrix.
pub(crate) struct Expression {
    pub genes: Vec<String>,
    pub x: OwnedCsr,
    pub labels: Option<Vec<String>>,
}

pub(crate) fn read_expression(path: &Path, gene_col: Option<&str>, use_raw: bool, label_col: Option<&str>) -> anyhow::Result<Expression> {
    let mut r = H5adReader::open(path, if use_raw { MatrixChoice::RawThenX } else { MatrixChoice::X })?;
    let genes = r.var_names(gene_col)?;
    let labels = match label_col {
        Some(c) => Some(r.obs_column(c).with_context(|| format!("--label-col {c}"))?),
        None => None,
    };
    let n = r.n_obs();
    let mut x = OwnedCsr { indptr: vec![0], n_cols: r.n_vars(), ..Default::default() };
    for start in (0..n).step_by(16_384) {
        let b = r.read_rows(start, (start + 16_384).min(n))?;
        for i in 0..b.n_rows() {
            let (idx, val) = b.row(i);
            x.indices.extend_from_slice(idx);
            x.data.extend_from_slice(val);
            x.indptr.push(x.indices.len());
        }
    }
    // Scaled data (z-scores, e.g. scanpy's pbmc68k_reduced X) has no meaning for the HVG
    // flavours or for score_genes' expression bins; counts or log-normalised values are needed.
    if let Some(v) = x.data.iter().find(|v| **v < 0.0) {
        bail!(
            "{}: {} holds negative values (e.g. {v}): scaled data, not counts or log-normalised expression; use --use-raw if .raw holds them, or pass an h5ad whose X does",
            path.display(),
            if use_raw { "the matrix read (.raw/X, else X)" } else { "X" }
        );
    }
    Ok(Expression { genes, x, labels })
}

/// The chosen genes (columns of the file), in the file's order. `hvg:N` first drops the genes
/// whose total is below `min_counts` (the original's Preprocessor filters before its HVG step;
/// seurat_v3's LOESS also fails, in scanpy too, on genes seen in one or two cells).
pub(crate) fn choose_genes(spec: &str, expr: &Expression, min_counts: f64) -> anyhow::Result<(Vec<usize>, String)> {
    match parse_genes(spec)? {
        GeneChoice::Hvg(n) => {
            let integer = expr.x.data.iter().all(|v| v.fract() == 0.0);
            let flavor = if integer { HvgFlavor::SeuratV3 } else { HvgFlavor::CellRanger };
            let csr = expr.x.csr()?;
            let keep = if min_counts > 0.0 { filter_genes_min_counts(&csr, min_counts) } else { vec![true; expr.x.n_cols] };
            let (x, kept) = keep_columns(&csr, &keep);
            if kept.is_empty() {
                bail!("--genes {spec}: no gene has a total of at least --filter-gene-counts {min_counts} over the cells");
            }
            let mut opts = HvgOptions::new(n.min(kept.len()), flavor);
            opts.batch = None;
            let hvg = highly_variable_genes(&x.csr()?, &opts).context("--genes hvg")?;
            let how = format!(
                "{} highly variable genes ({}) of the {} with totals >= {min_counts}",
                hvg.selected.len(),
                flavor.as_str(),
                kept.len()
            );
            Ok((hvg.selected.iter().map(|&j| kept[j]).collect(), how))
        }
        GeneChoice::File(path) => {
            let names = read_gene_file(&path)?;
            let wanted: HashSet<&str> = names.iter().map(String::as_str).collect();
            let cols: Vec<usize> = expr.genes.iter().enumerate().filter(|(_, g)| wanted.contains(g.as_str())).map(|(i, _)| i).collect();
            let missing = wanted.len() - cols.len();
            Ok((cols, format!("{} genes of {} ({missing} not in the input)", wanted.len() - missing, path.display())))
        }
    }
}

pub fn run(a: &GrnEmbeddingArgs) -> anyhow::Result<()> {
    let device = crate::embed::device(&a.device)?;
    let loaded = model_dir::load(&a.model, &device)?;
    let expr = read_expression(&a.input, a.gene_col.as_deref(), a.use_raw, a.label_col.as_deref())?;
    let (cols, how) = choose_genes(&a.genes, &expr, a.filter_gene_counts)?;
    let (kept, dropped): (Vec<usize>, Vec<usize>) = cols.into_iter().partition(|&c| loaded.vocab.get(&expr.genes[c]).is_some());
    if !dropped.is_empty() {
        let names: Vec<&str> = dropped.iter().take(20).map(|&c| expr.genes[c].as_str()).collect();
        eprintln!(
            "warning: {} chosen genes are not in the model vocabulary and are dropped: {}{}",
            dropped.len(),
            names.join(", "),
            if dropped.len() > 20 { ", ..." } else { "" }
        );
    }
    if kept.len() < 10 {
        bail!(
            "{} of the chosen genes are in the model vocabulary ({how}); at least 10 are needed: check --gene-col (symbols) and --genes",
            kept.len()
        );
    }
    let names: Vec<String> = kept.iter().map(|&c| expr.genes[c].clone()).collect();
    let ids: Vec<i64> = names.iter().map(|g| loaded.vocab.get(g).expect("kept") as i64).collect();
    let emb = loaded.model.encoder.forward(Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &device));
    let d = emb.dims()[2];
    let vectors: Vec<f32> = emb.into_data().convert::<f32>().try_to_vec::<f32>().expect("floats");
    let emb = GeneEmbeddings::new(names.clone(), vectors, d)?;

    std::fs::create_dir_all(&a.output).with_context(|| format!("{}: cannot create", a.output.display()))?;
    write_embeddings_parquet(&a.output.join("gene_embeddings.parquet"), &emb)?;
    let edges = top_k_edges(&emb, a.top_k)?;
    write_edges_parquet(&a.output.join("edges.parquet"), &edges)?;
    let programs = gene_programs(
        &emb,
        &ProgramOptions { resolution: a.resolution, min_program_size: a.min_program_size, seed: a.seed, ..Default::default() },
    )?;
    programs.write_tsv(&emb, &a.output, "programs.tsv")?;
    let sets = programs.gene_sets(&emb);

    // Program activity on the input's cells, over all its genes (score_genes' gene pool).
    let scorer = GeneScorer::new(expr.x.csr()?, &expr.genes)?;
    let random_state = u32::try_from(a.seed).context("--seed: score_genes' random_state is below 2^32")?;
    let opts = ScoreGenesOptions { random_state, ..Default::default() };
    let mut summary = json!({
        "model": a.model.display().to_string(), "input": a.input.display().to_string(), "genes": how,
        "genes_in_vocabulary": names.len(), "genes_dropped": dropped.len(), "programs": sets.len(),
        "resolution": a.resolution, "min_program_size": a.min_program_size, "top_k": a.top_k,
    });
    if !sets.is_empty() {
        let activity = program_activity(&scorer, &sets, &opts)?;
        write_activity_csv(&a.output.join("program_activity.csv"), &activity.programs, &activity.activity, expr.x.indptr.len() - 1)?;
        if let Some(labels) = &expr.labels {
            let table = activity_by_cell_type(&activity, labels)?;
            table.write_csv(&a.output, "program_activity_by_cell_type.csv")?;
            write_activity_heatmap_png(&a.output, "program_activity_by_cell_type.png", &table, "Program activity by cell type", true)?;
        }
        let largest = programs.programs.iter().max_by_key(|p| p.genes.len()).expect("programs");
        write_program_network_png(
            &a.output,
            "program_network.png",
            &emb,
            &largest.genes,
            a.edge_threshold,
            &format!("program {} ({} genes)", largest.id, largest.genes.len()),
        )?;
    }
    if let Some(gmt) = &a.gmt {
        let gene_sets = read_gmt(gmt)?;
        let mut all = String::new();
        for s in &sets {
            let e = enrichment(&s.genes, &gene_sets, &names)?;
            let tsv = e.to_tsv();
            for (i, line) in tsv.lines().enumerate() {
                if i == 0 && all.is_empty() {
                    all.push_str(&format!("program\t{line}\n"));
                } else if i > 0 {
                    all.push_str(&format!("{}\t{line}\n", s.name));
                }
            }
        }
        scgpt_data::atomic::write_bytes(&a.output.join("enrichment.tsv"), all.as_bytes())?;
    }
    if let Some(reference) = &a.reference {
        let net = ReferenceNetwork::read(reference)?;
        let eval = evaluate_against_reference(&names, &emb, &net, Some((expr.x.csr()?, &expr.genes)), a.seed)?;
        let v = reference_report(serde_json::to_value(&eval)?);
        let text = serde_json::to_string_pretty(&v)? + "\n";
        scgpt_data::atomic::write_bytes(&a.output.join("reference_scores.json"), text.as_bytes())?;
        println!("{text}");
        summary["reference_scores"] = v;
    }
    if a.tsv {
        write_edges_tsv(&a.output, "edges.tsv", &edges)?;
        let mut t = String::from("gene\tvector\n");
        for (i, g) in emb.genes().iter().enumerate() {
            t.push_str(&format!("{g}\t{}\n", emb.vector(i).iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")));
        }
        scgpt_data::atomic::write_bytes(&a.output.join("gene_embeddings.tsv"), t.as_bytes())?;
    }
    scgpt_data::atomic::write_bytes(&a.output.join("summary.json"), (serde_json::to_string_pretty(&summary)? + "\n").as_bytes())?;
    eprintln!(
        "scgpt grn embedding: {} genes ({how}), {} programs of >= {} genes; {}",
        names.len(),
        sets.len(),
        a.min_program_size,
        a.output.display()
    );
    Ok(())
}

/// The library's evaluation with the baselines under `baselines` and a sentence saying
/// plainly whether the model beats co-expression.
pub(crate) fn reference_report(mut v: serde_json::Value) -> serde_json::Value {
    let obj = v.as_object_mut().expect("an object");
    let coexpression = obj.remove("coexpression").unwrap_or(serde_json::Value::Null);
    let random = obj.remove("random").unwrap_or(serde_json::Value::Null);
    let auroc = |x: &serde_json::Value| x["auroc"].as_f64();
    let verdict = match (auroc(&obj["model"]), auroc(&coexpression)) {
        (Some(m), Some(c)) if m > c => format!("the model's edges rank the reference better than co-expression (AUROC {m:.3} vs {c:.3})"),
        (Some(m), Some(c)) => format!("the model's edges do NOT beat co-expression (AUROC {m:.3} vs {c:.3})"),
        _ => "AUROC undefined (no positives or no negatives among the candidates)".to_string(),
    };
    obj.insert("baselines".into(), json!({"coexpression": coexpression, "random": random}));
    obj.insert("verdict".into(), json!(verdict));
    v
}

/// One row per cell, one column per program (min–max scaled activity).
fn write_activity_csv(path: &Path, programs: &[String], activity: &[Vec<f64>], n_cells: usize) -> anyhow::Result<()> {
    let mut t = format!("cell,{}\n", programs.join(","));
    for i in 0..n_cells {
        t.push_str(&i.to_string());
        for p in activity {
            t.push_str(&format!(",{}", p[i]));
        }
        t.push('\n');
    }
    scgpt_data::atomic::write_bytes(path, t.as_bytes())?;
    Ok(())
}

fn write_embeddings_parquet(path: &Path, emb: &GeneEmbeddings) -> anyhow::Result<()> {
    use arrow_array::{builder::FixedSizeListBuilder, builder::Float32Builder, ArrayRef, RecordBatch, StringArray};
    let mut list = FixedSizeListBuilder::new(Float32Builder::new(), emb.dim() as i32);
    for i in 0..emb.len() {
        list.values().append_slice(emb.vector(i));
        list.append(true);
    }
    let genes: ArrayRef = std::sync::Arc::new(StringArray::from(emb.genes().to_vec()));
    let vectors: ArrayRef = std::sync::Arc::new(list.finish());
    let batch = RecordBatch::try_from_iter(vec![("gene", genes), ("vector", vectors)])?;
    write_parquet(path, &batch)
}

fn write_edges_parquet(path: &Path, edges: &[scgpt_eval::grn::Edge]) -> anyhow::Result<()> {
    use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray};
    let col = |f: &dyn Fn(&scgpt_eval::grn::Edge) -> String| -> ArrayRef {
        std::sync::Arc::new(StringArray::from(edges.iter().map(f).collect::<Vec<_>>()))
    };
    let batch = RecordBatch::try_from_iter(vec![
        ("source", col(&|e| e.source.clone())),
        ("target", col(&|e| e.target.clone())),
        ("cosine", std::sync::Arc::new(Float64Array::from(edges.iter().map(|e| e.cosine).collect::<Vec<_>>())) as ArrayRef),
    ])?;
    write_parquet(path, &batch)
}

/// One record batch as a Parquet file, atomically.
fn write_parquet(path: &Path, batch: &arrow_array::RecordBatch) -> anyhow::Result<()> {
    let mut temp = crate::sink::Temp::new(path);
    let f = std::fs::File::create(&temp.tmp).with_context(|| format!("{}: cannot create", temp.tmp.display()))?;
    let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None)?;
    w.write(batch)?;
    w.close()?;
    temp.commit()
}
