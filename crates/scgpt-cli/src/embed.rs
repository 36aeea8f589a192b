//! `scgpt embed`: zero-shot cell embeddings, the original's `scgpt.tasks.embed_data`.
//!
//! Per cell (see `scgpt_data::tokenize`): the nonzero genes in the model vocabulary, `<cls>` first with
//! value `pad_value`, values binned per cell into 51 bins, cells longer than `max_seq_len`
//! subsampled; per minibatch: padding with `<pad>` / `pad_value` and a key-padding mask, the
//! encoder in inference mode (no dropout), the output at position 0, L2-normalised.
//!
//! Streaming: a reader thread reads a window of cells (h5ad row block or Parquet record batch)
//! and tokenizes it on the rayon pool while the main thread runs the model on the previous
//! window, so memory is bounded by two windows plus one minibatch's activations, whatever the
//! input size. Inside a window, cells are grouped into minibatches by length (longest first) to
//! waste less compute on padding; results are written back in input order. Without padding a
//! cell's embedding does not depend on its batch mates, so this changes results only at the
//! level of float rounding (attention sums over a different number of masked keys).
//!
//! Threads: the model (burn's Flex CPU backend: gemm + rayon) and the tokenizer share rayon's
//! global pool: all logical cores by default, `RAYON_NUM_THREADS=N` or `--threads N` to limit.

use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use scgpt_data::h5ad::MatrixChoice;
use scgpt_model::burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use scgpt_model::model::l2_normalize;
use scgpt_model::TransformerModel;

use crate::model_dir::{self, LoadedModel};
use crate::sink::{H5adCopySink, H5adNewSink, NpySink, ParquetSink, Sink};
use crate::source::{Block, H5adSource, ShardSource, Source};
use scgpt_data::tokenize::{collate, tokenize, Batch, Scratch, TokenizeOptions, Tokens};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    H5ad,
    Parquet,
    Npy,
}

#[derive(Debug, clap::Args)]
pub struct EmbedArgs {
    /// Model directory with best_model.pt, vocab.json and args.json (the original's checkpoint
    /// folder, e.g. scGPT_human).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// An h5ad file, or an scgpt-prep shard directory (manifest.json + vocab.json + *.parquet).
    #[arg(long, value_name = "PATH")]
    pub input: PathBuf,
    /// Output file. h5ad: a copy of the input with obsm["X_scGPT"] added.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    /// Output format (default: from the output's extension).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Cells per forward pass (the original's default: 64).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Longest input in tokens, <cls> included; cells with more expressed genes are subsampled.
    #[arg(long, default_value_t = 1200)]
    pub max_seq_len: usize,
    /// var column with the gene names (CELLxGENE: feature_name); default: the var index.
    /// Ensembl ids are bridged to symbols with the shipped GENCODE table.
    #[arg(long, value_name = "COL")]
    pub gene_col: Option<String>,
    /// Read raw/X instead of X (h5ad input). Binning is per-cell rank based, so raw counts and
    /// normalised values give the same bins except for tie-breaking.
    #[arg(long)]
    pub use_raw: bool,
    /// No randomness: tied values take the lowest tied bin, and cells longer than
    /// --max-seq-len keep their highest-valued genes (ties: earlier column). Output is
    /// bit-identical across runs (same input, batch size and thread count).
    #[arg(long)]
    pub deterministic: bool,
    /// Seed for the random tie-breaking and subsampling (per-cell streams; unused with
    /// --deterministic).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute device: cpu (burn's Flex backend); cuda, wgpu or vulkan in GPU builds
    /// (`--features cuda|wgpu|vulkan`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Worker threads (default: RAYON_NUM_THREADS, else all logical cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Fail when fewer than this fraction of the input genes are in the model vocabulary.
    #[arg(long, default_value_t = 0.25, value_name = "FRACTION")]
    pub min_gene_match: f64,
    /// A fine-tuned model's batch labels (see `scgpt predict`).
    #[command(flatten)]
    pub batch: crate::inference::BatchArgs,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Minibatches per window handed from the reader thread to the model.
const WINDOW_BATCHES: usize = 8;

fn output_format(args: &EmbedArgs) -> anyhow::Result<Format> {
    if let Some(f) = args.format {
        return Ok(f);
    }
    let ext = args.output.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    Ok(match ext.as_deref() {
        Some("h5ad") => Format::H5ad,
        Some("parquet") | Some("pq") => Format::Parquet,
        Some("npy") => Format::Npy,
        _ => bail!("{}: cannot tell the output format from the extension; use .h5ad, .parquet or .npy, or --format", args.output.display()),
    })
}

/// `cpu` (Flex) in every build; `cuda` / `wgpu` / `vulkan` in builds with that feature (the
/// same devices as `scgpt-train`'s `run.device`; `LOCAL_RANK` picks the GPU).
pub(crate) fn device(name: &str) -> anyhow::Result<Device> {
    let name = match name.to_ascii_lowercase().as_str() {
        "flex" => "cpu".to_string(),
        other => other.to_string(),
    };
    let local_rank = scgpt_dist::RankInfo::from_env().map(|i| i.local_rank).unwrap_or(0);
    scgpt_engine::device::select(&name, local_rank).map_err(|e| anyhow::anyhow!("--device: {e}"))
}

fn validate(args: &EmbedArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2 (<cls> plus one gene)");
    }
    if !(0.0..=1.0).contains(&args.min_gene_match) {
        bail!("--min-gene-match must be a fraction in [0, 1], got {}", args.min_gene_match);
    }
    if args.input.is_dir() && args.use_raw {
        bail!("--use-raw applies to h5ad input only; {} is a shard directory", args.input.display());
    }
    if !args.input.exists() {
        bail!("{}: input not found", args.input.display());
    }
    let parent = match args.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        bail!("{}: output directory {} does not exist", args.output.display(), parent.display());
    }
    if args.output.is_dir() {
        bail!("{}: output is a directory; give a file name", args.output.display());
    }
    Ok(())
}

/// A window of tokenized cells on its way from the reader thread to the model.
struct Window {
    block: Block,
    tokens: Vec<Tokens>,
}

pub fn run(args: &EmbedArgs) -> anyhow::Result<()> {
    validate(args)?;
    let format = output_format(args)?;
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("--threads: cannot configure the thread pool")?;
    }
    let device = device(&args.device)?;
    let t0 = Instant::now();
    // A model this project fine-tuned (or pretrained on a gene selection) embeds new data as
    // its training run tokenised it.
    if let Some(spec) = crate::inference::read_spec(&args.model)? {
        if spec.task != "pretrain" || spec.genes.is_some() {
            return run_with_spec(args, &spec, format, &device, t0);
        }
    }

    let LoadedModel { model, vocab, vocab_path, pad_id, cls_id, pad_value, d_model, report } = model_dir::load(&args.model, &device)?;
    let c = &model.config;
    eprintln!(
        "model: {} ({} layers, d {}, {} heads, d_hid {}, vocabulary {} tokens); {} tensors loaded, {} not used",
        args.model.display(),
        c.nlayers,
        c.d_model,
        c.nhead,
        c.d_hid,
        vocab.len(),
        report.loaded.len(),
        report.skipped.len()
    );

    let window = args.batch_size.saturating_mul(WINDOW_BATCHES).max(1);
    let mut source = if args.input.is_dir() {
        Source::Shards(ShardSource::open(&args.input, &vocab, &vocab_path, args.min_gene_match, window)?)
    } else {
        let matrix = if args.use_raw { MatrixChoice::RawThenX } else { MatrixChoice::X };
        Source::H5ad(H5adSource::open(&args.input, matrix, args.gene_col.as_deref(), &vocab, &vocab_path, args.min_gene_match)?)
    };
    let g = source.genes();
    let via = if g.via_ensembl > 0 { format!(" ({} via Ensembl ids)", g.via_ensembl) } else { String::new() };
    eprintln!(
        "genes: {} of {} {} matched the model vocabulary{via} ({:.1}%)",
        g.matched,
        g.total,
        g.what,
        100.0 * g.matched as f64 / g.total.max(1) as f64
    );
    let n = source.n_cells();
    if n == 0 {
        bail!("{}: the input has no cells", args.input.display());
    }
    if source.is_shards() && args.gene_col.is_some() {
        eprintln!("note: --gene-col is ignored for shard input (genes are vocabulary ids)");
    }

    let mut sink: Box<dyn Sink> = match format {
        Format::H5ad if source.is_shards() => Box::new(H5adNewSink::create(&args.output, n, d_model)?),
        Format::H5ad => Box::new(H5adCopySink::create(&args.input, &args.output, n, d_model)?),
        Format::Parquet => Box::new(ParquetSink::create(&args.output, n, d_model, source.is_shards())?),
        Format::Npy => Box::new(NpySink::create(&args.output, n, d_model)?),
    };

    let opts = TokenizeOptions { max_seq_len: args.max_seq_len, cls_id, pad_value, seed: (!args.deterministic).then_some(args.seed) };
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(n as u64) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {human_pos}/{human_len} cells  {per_sec}  ETA {eta}")
            .expect("valid template"),
    );
    let t_embed = Instant::now();
    let mut stats = Stats::default();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let (tx, rx) = sync_channel::<anyhow::Result<Window>>(1);
        let source = &mut source;
        scope.spawn(move || loop {
            let next = source.next_block(window).map(|b| {
                b.map(|block| {
                    let tokens: Vec<Tokens> = (0..block.len())
                        .into_par_iter()
                        .map_init(Scratch::default, |s, i| {
                            let (genes, values) = block.cell(i);
                            tokenize((block.start + i) as u64, genes, values, &opts, s)
                        })
                        .collect();
                    Window { block, tokens }
                })
            });
            match next {
                Ok(Some(w)) => {
                    if tx.send(Ok(w)).is_err() {
                        return; // the model side failed; its error is reported
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        });
        for w in rx {
            let w = w?;
            let emb = embed_window(&model, &device, &w.tokens, pad_id, pad_value, args.batch_size, d_model)?;
            stats.add(&w.tokens);
            sink.write(w.block.start, &emb, &w.block.cell_ids, w.block.datasets.as_deref())?;
            bar.inc(w.block.len() as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    if stats.cells != n {
        bail!("{}: read {} of {} cells", args.input.display(), stats.cells, n);
    }
    let secs = t_embed.elapsed().as_secs_f64();
    let written = sink.finish()?;
    if stats.empty > 0 {
        eprintln!(
            "note: {} cell(s) express no gene of the vocabulary; their embedding is that of <cls> alone \
             (the original fails on such cells)",
            stats.empty
        );
    }
    if stats.subsampled > 0 {
        let how = if args.deterministic { "kept the highest-valued genes" } else { "random subset, seeded per cell" };
        eprintln!(
            "note: {} cell(s) had more than {} genes and were subsampled ({how}); {} genes dropped in all",
            stats.subsampled,
            args.max_seq_len - 1,
            stats.dropped
        );
    }
    eprintln!(
        "embedded {n} cells ({d_model} dims) in {secs:.1}s ({:.1} cells/s, mean {:.0} tokens/cell); total {:.1}s",
        n as f64 / secs.max(1e-9),
        stats.tokens as f64 / n as f64,
        t0.elapsed().as_secs_f64()
    );
    for p in written {
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `scgpt embed` of a `best_model/` with a `scgpt.json` that changes the input: the `<cls>`
/// value, token genes, batch labels and `max_seq_len` of its training run, the cell embedding
/// its heads read (`cell_emb_style`).
fn run_with_spec(
    args: &EmbedArgs,
    spec: &scgpt_engine::checkpoint::InferenceSpec,
    format: Format,
    device: &Device,
    t0: Instant,
) -> anyhow::Result<()> {
    use crate::inference::{run_model, Encoding, Head, TokenGenes};
    if args.input.is_dir() {
        bail!("{}: a fine-tuned model embeds h5ad input (its tokenisation needs the cells' genes by name); prepare shards only for pretraining", args.input.display());
    }
    let mut loaded = model_dir::load(&args.model, device)?;
    let token_genes = match &spec.genes {
        Some(names) => Some(TokenGenes::new(names, &loaded.vocab, &args.model, spec.include_zero_gene)?),
        None => None,
    };
    let (batch_ids, unseen) = args.batch.ids_for(&args.model, Some(spec), &args.input, &mut loaded.model)?;
    let gene_col = args.gene_col.clone().or(Some(spec.gene_col.clone()).filter(|c| !c.is_empty()));
    eprintln!(
        "model: {} (trained for {}; <cls> value {}, {} tokens per cell{}{})",
        args.model.display(),
        spec.task,
        spec.cls_value,
        spec.max_seq_len,
        if token_genes.is_some() { ", every token gene with zeros" } else { "" },
        if batch_ids.is_some() { ", batch labels" } else { "" }
    );
    let enc = Encoding {
        tokens: TokenizeOptions {
            max_seq_len: spec.max_seq_len,
            cls_id: loaded.cls_id,
            pad_value: loaded.pad_value,
            seed: (!args.deterministic).then_some(args.seed),
        },
        cls_value: spec.cls_value,
        pad_id: loaded.pad_id,
        token_genes,
        batch_ids,
    };
    // What the training run's data preparation read (raw/X when present, else X).
    let matrix = MatrixChoice::RawThenX;
    let out = run_model(
        &loaded.model,
        &args.input,
        matrix,
        gene_col.as_deref(),
        &loaded,
        &enc,
        args.batch_size,
        args.min_gene_match,
        args.quiet,
        Head::Embedding,
        device,
    )?;
    let n = out.rows.len() / out.width.max(1);
    let ids = scgpt_data::h5ad::H5adReader::open(&args.input, MatrixChoice::X)?.obs_names()?;
    let mut notes = vec![format!("model={}", args.model.display()), format!("task={}", spec.task)];
    if let Some(col) = args.batch.batch_col.clone().or(spec.batch_col.clone()).filter(|_| enc.batch_ids.is_some()) {
        notes.push(format!("batch_col={col}"));
    }
    if unseen > 0 {
        notes.push(format!("unseen_batch=mean: {unseen} cells with a batch label the model never saw were normalised with the mean of the trained domains' statistics"));
    }
    let mut sink: Box<dyn Sink> = match format {
        Format::H5ad => {
            let mut s = H5adCopySink::create(&args.input, &args.output, n, out.width)?;
            s.note("scgpt_embedding", &notes)?;
            Box::new(s)
        }
        Format::Parquet => Box::new(ParquetSink::create(&args.output, n, out.width, false)?),
        Format::Npy => Box::new(NpySink::create(&args.output, n, out.width)?),
    };
    sink.write(0, &out.rows, &ids, None)?;
    for p in sink.finish()? {
        eprintln!("wrote {}", p.display());
    }
    eprintln!("embedded {n} cells ({} dims) in {:.1}s", out.width, t0.elapsed().as_secs_f64());
    Ok(())
}

#[derive(Default)]
struct Stats {
    cells: usize,
    empty: usize,
    subsampled: usize,
    dropped: usize,
    tokens: usize,
}

impl Stats {
    fn add(&mut self, tokens: &[Tokens]) {
        for t in tokens {
            self.cells += 1;
            self.empty += (t.ids.len() == 1) as usize;
            self.subsampled += (t.dropped > 0) as usize;
            self.dropped += t.dropped;
            self.tokens += t.ids.len();
        }
    }
}

/// Embeds a window of cells; rows of the result are in the window's order.
fn embed_window(
    model: &TransformerModel,
    device: &Device,
    tokens: &[Tokens],
    pad_id: u32,
    pad_value: f32,
    batch_size: usize,
    d: usize,
) -> anyhow::Result<Vec<f32>> {
    // Longest first, stable: similar lengths share a minibatch.
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by(|&a, &b| tokens[b].ids.len().cmp(&tokens[a].ids.len()));
    let mut out = vec![0f32; tokens.len() * d];
    for chunk in order.chunks(batch_size) {
        let cells: Vec<&Tokens> = chunk.iter().map(|&i| &tokens[i]).collect();
        let batch = collate(&cells, pad_id, pad_value);
        let emb = forward(model, device, batch, d)?;
        for (k, &i) in chunk.iter().enumerate() {
            out[i * d..(i + 1) * d].copy_from_slice(&emb[k * d..(k + 1) * d]);
        }
    }
    Ok(out)
}

/// `_encode`, position 0, L2 normalisation: `[b * d]` row-major.
fn forward(model: &TransformerModel, device: &Device, batch: Batch, d: usize) -> anyhow::Result<Vec<f32>> {
    let Batch { b, l, ids, values, pad } = batch;
    let src = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, l]), device);
    let values = Tensor::<2>::from_data(TensorData::new(values, [b, l]), device);
    // `_encode` = embedding + transformer. As the original's flash path, a batch without any
    // padding runs without a mask: identical results, and the attention kernel then does not
    // have to materialise a [B, heads, L, L] mask in every layer.
    let mask = pad.iter().any(|&p| p).then(|| Tensor::<2, Bool>::from_data(TensorData::new(pad, [b, l]), device));
    let emb = model.embed(src, Some(values), None).context("model forward")?;
    let out = model.transformer_encoder.forward(emb.total_embs, mask);
    let cls = out.slice([0..b, 0..1, 0..d]).reshape([b, d]);
    l2_normalize(cls).into_data().convert::<f32>().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("reading the embeddings back: {e:?}"))
}
