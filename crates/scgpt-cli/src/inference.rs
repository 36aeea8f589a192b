//! Cells of an h5ad through a model the way its training run fed them: the `scgpt.json` of a
//! fine-tuned `best_model/` (the `<cls>` value, `max_seq_len`, the token genes of an
//! `include_zero_gene` run, the batch-label column) or the zero-shot defaults of `embed_data`.
//! Batch labels go in per cell; DSBN normalises a minibatch with its first cell's domain, so
//! minibatches hold cells of one batch label. The head is the CLS softmax (`predict`) or the
//! L2-normalised cell embedding (`predict --mode knn`, `embed` of a fine-tuned model).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use scgpt_data::h5ad::{H5adReader, MatrixChoice};
use scgpt_data::tokenize::{collate, tokenize, Scratch, TokenizeOptions, Tokens};
use scgpt_engine::checkpoint::{InferenceSpec, INFERENCE_FILE};
use scgpt_model::burn::module::RunningState;
use scgpt_model::burn::tensor::activation::softmax;
use scgpt_model::burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use scgpt_model::model::l2_normalize;
use scgpt_model::{ForwardFlags, ModelInput, TransformerModel};

use crate::model_dir::LoadedModel;
use crate::source::{H5adSource, Source};

/// `scgpt.json` of a model directory, if it has one.
pub fn read_spec(dir: &Path) -> anyhow::Result<Option<InferenceSpec>> {
    let p = dir.join(INFERENCE_FILE);
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p)?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not a valid {INFERENCE_FILE}", p.display()))?))
}

/// What a forward pass returns per cell.
#[derive(Clone, Copy)]
pub enum Head {
    /// Softmax of the CLS head.
    Probabilities,
    /// The L2-normalised cell embedding.
    Embedding,
}

/// The genes a fine-tuned model saw (`scgpt.json` `genes`): with `include_zero_gene` every
/// cell's tokens, zeros included; otherwise the `[preprocess]` selection, of which a cell's
/// nonzero genes are its tokens.
pub struct TokenGenes {
    genes: Vec<u32>,
    /// Vocabulary id → position in `genes` (`u32::MAX`: not a token gene).
    slot: Vec<u32>,
    with_zeros: bool,
}

impl TokenGenes {
    /// The spec's gene names in the model vocabulary; a name the vocabulary lacks is an error
    /// (the model directory is inconsistent).
    pub fn new(names: &[String], vocab: &scgpt_data::vocab::GeneVocab, dir: &Path, with_zeros: bool) -> anyhow::Result<Self> {
        let mut slot = vec![u32::MAX; vocab.len()];
        let mut genes = Vec::with_capacity(names.len());
        for (k, n) in names.iter().enumerate() {
            let id =
                vocab.get(n).with_context(|| format!("{}: token gene {n:?} is not in vocab.json", dir.join(INFERENCE_FILE).display()))?;
            slot[id as usize] = k as u32;
            genes.push(id);
        }
        Ok(TokenGenes { genes, slot, with_zeros })
    }

    /// How many of the token genes `names` (the input's genes) holds, and a few it lacks.
    fn coverage(&self, names: &[String], vocab: &scgpt_data::vocab::GeneVocab) -> (usize, Vec<String>) {
        let mut present = vec![false; self.genes.len()];
        for n in names {
            if let Some(id) = vocab.get(n) {
                if let Some(&k) = self.slot.get(id as usize) {
                    if k != u32::MAX {
                        present[k as usize] = true;
                    }
                }
            }
        }
        let missing =
            present.iter().enumerate().filter(|(_, p)| !**p).take(5).map(|(k, _)| vocab.tokens()[self.genes[k] as usize].clone()).collect();
        (present.iter().filter(|p| **p).count(), missing)
    }

    /// `<cls>` and every token gene: the cell's bins (binned over its token genes alone, as the
    /// original bins its HVG-subset rows), 0 where it has none.
    fn tokenize(&self, cell: u64, genes: &[u32], values: &[f32], opt: &TokenizeOptions, s: &mut Scratch) -> Tokens {
        let (mut g, mut v) = (Vec::with_capacity(genes.len()), Vec::with_capacity(genes.len()));
        for (&id, &x) in genes.iter().zip(values) {
            if self.slot.get(id as usize).is_some_and(|&k| k != u32::MAX) {
                g.push(id);
                v.push(x);
            }
        }
        if !self.with_zeros {
            return tokenize(cell, &g, &v, opt, s);
        }
        let all = TokenizeOptions { max_seq_len: g.len() + 1, ..*opt };
        let nonzero = tokenize(cell, &g, &v, &all, s);
        let mut bins = vec![0f32; self.genes.len()];
        for (&id, &b) in nonzero.ids[1..].iter().zip(&nonzero.values[1..]) {
            bins[self.slot[id as usize] as usize] = b;
        }
        let keep = (opt.max_seq_len - 1).min(self.genes.len());
        let mut t = Tokens { ids: Vec::with_capacity(keep + 1), values: Vec::with_capacity(keep + 1), dropped: self.genes.len() - keep };
        t.ids.push(opt.cls_id);
        t.values.push(opt.pad_value);
        // More token genes than max_seq_len allows: the first ones (training's subsample is
        // random per step; inference has to pick one, and picks the same for every cell).
        for k in 0..keep {
            t.ids.push(self.genes[k]);
            t.values.push(bins[k]);
        }
        t
    }
}

/// How cells become model input.
pub struct Encoding {
    pub tokens: TokenizeOptions,
    /// The value of `<cls>` (0 after fine-tuning, `pad_value` zero-shot).
    pub cls_value: f32,
    pub pad_id: u32,
    pub token_genes: Option<TokenGenes>,
    /// Batch-label id per cell of the input, when the model reads them.
    pub batch_ids: Option<Vec<i64>>,
}

pub struct Encoded {
    /// `[n, width]` rows in input order.
    pub rows: Vec<f32>,
    pub width: usize,
}

/// Batch labels of `path`'s cells for a model trained with `batch_labels.json` (`names`):
/// a label the model never saw is an error listing the known ones, or with `mean` gets the
/// extra domain [`add_mean_domain`] appends (id `names.len()`); returns the ids and how many
/// cells were unseen.
pub fn batch_ids(path: &Path, col: &str, names: &[String], unseen_mean: bool) -> anyhow::Result<(Vec<i64>, usize)> {
    let r = H5adReader::open(path, MatrixChoice::X)?;
    let values = r.obs_column(col).with_context(|| format!("--batch-col = {col:?}"))?;
    let index: HashMap<&str, i64> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i as i64)).collect();
    let mut unseen = std::collections::BTreeSet::new();
    let ids: Vec<i64> = values
        .iter()
        .map(|v| match index.get(v.as_str()) {
            Some(&i) => i,
            None => {
                unseen.insert(v.clone());
                names.len() as i64
            }
        })
        .collect();
    if !unseen.is_empty() && !unseen_mean {
        bail!(
            "{}: batch label(s) {} of obs[{col:?}] were not seen in training (the model knows {}); pass --unseen-batch mean to normalise them with the mean of the trained domains' statistics",
            path.display(),
            unseen.iter().take(8).map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", "),
            names.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
        );
    }
    let n_unseen = ids.iter().filter(|&&i| i == names.len() as i64).count();
    Ok((ids, n_unseen))
}

/// Appends a DSBN domain whose running mean and variance are the means over the trained
/// domains (for batch labels the model never saw); also a batch-embedding row, the mean of
/// the trained rows, when the model has batch embeddings.
pub fn add_mean_domain(model: &mut TransformerModel) {
    model.config.num_batch_labels = model.config.num_batch_labels.map(|n| n + 1);
    if let Some(dsbn) = &mut model.dsbn {
        let mean = |f: &dyn Fn(&scgpt_model::layers::BatchNorm1d) -> Tensor<1>| {
            let stacked = Tensor::stack::<2>(dsbn.bns.iter().map(f).collect(), 0);
            let c = stacked.dims()[1];
            stacked.mean_dim(0).reshape([c])
        };
        let rm = mean(&|b| b.running_mean.value_sync());
        let rv = mean(&|b| b.running_var.value_sync());
        let mut extra = dsbn.bns[0].clone();
        extra.running_mean = RunningState::new(rm);
        extra.running_var = RunningState::new(rv);
        dsbn.bns.push(extra);
    }
    if let Some(be) = &mut model.batch_encoder {
        let w = be.embedding.weight.val();
        let [n, d] = w.dims();
        let row = w.clone().mean_dim(0);
        let table = Tensor::cat(vec![w, row], 0);
        debug_assert_eq!(table.dims(), [n + 1, d]);
        be.embedding.weight = scgpt_model::burn::module::Param::from_tensor(table);
    }
}

/// Batch labels of the query, for a model trained with them.
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// obs column with each cell's batch (default: the training run's `data.batch_col`), for a
    /// model trained with batch labels (DSBN, batch embeddings).
    #[arg(long, value_name = "COL")]
    pub batch_col: Option<String>,
    /// A batch label the model never saw: `error` (default) or `mean` (DSBN normalises those
    /// cells with the mean of the trained domains' statistics; recorded in the output).
    #[arg(long, value_enum, default_value_t = UnseenBatch::Error)]
    pub unseen_batch: UnseenBatch,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnseenBatch {
    Error,
    Mean,
}

impl BatchArgs {
    /// The query's batch-label ids when the model reads batch labels (`None` otherwise), and
    /// how many cells carry a label the model never saw; with `--unseen-batch mean` those get
    /// the mean domain, which is added to the model first.
    pub fn ids_for(
        &self,
        dir: &Path,
        spec: Option<&InferenceSpec>,
        input: &Path,
        model: &mut TransformerModel,
    ) -> anyhow::Result<(Option<Vec<i64>>, usize)> {
        let c = &model.config;
        let reads = c.use_batch_labels || c.domain_spec_batchnorm != scgpt_model::BatchNormStyle::None;
        if !reads {
            if let Some(col) = &self.batch_col {
                eprintln!("note: --batch-col {col:?} is ignored: the model does not read batch labels");
            }
            return Ok((None, 0));
        }
        let map_path = dir.join(scgpt_engine::tasks::labels::BATCH_LABELS_FILE);
        let names: Vec<String> = match std::fs::read_to_string(&map_path) {
            Ok(text) => {
                serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON list of batch labels", map_path.display()))?
            }
            Err(_) => bail!(
                "{}: the model reads batch labels but its directory has no {}; it needs the batch-label map of its training run",
                dir.display(),
                scgpt_engine::tasks::labels::BATCH_LABELS_FILE
            ),
        };
        let col = match (&self.batch_col, spec.and_then(|s| s.batch_col.as_ref())) {
            (Some(c), _) | (None, Some(c)) => c.clone(),
            (None, None) => {
                bail!("{}: the model reads batch labels: pass --batch-col, the obs column with each cell's batch", dir.display())
            }
        };
        let (ids, unseen) = batch_ids(input, &col, &names, self.unseen_batch == UnseenBatch::Mean)?;
        if unseen > 0 {
            add_mean_domain(model);
            eprintln!("note: {unseen} cell(s) have a batch label the model never saw; normalised with the mean of the {} trained domains (--unseen-batch mean)", names.len());
        }
        Ok((Some(ids), unseen))
    }
}

/// Every cell of an h5ad through the model.
#[allow(clippy::too_many_arguments)]
pub fn run_model(
    model: &TransformerModel,
    path: &Path,
    matrix: MatrixChoice,
    gene_col: Option<&str>,
    loaded: &LoadedModel,
    enc: &Encoding,
    batch_size: usize,
    min_gene_match: f64,
    quiet: bool,
    head: Head,
    dev: &Device,
) -> anyhow::Result<Encoded> {
    // A model trained on a gene selection needs those genes, not most of the input's: the
    // match is checked against the selection.
    let source_min = if enc.token_genes.is_some() { 0.0 } else { min_gene_match };
    let mut source = Source::H5ad(H5adSource::open(path, matrix, gene_col, &loaded.vocab, &loaded.vocab_path, source_min)?);
    if let Some(tg) = &enc.token_genes {
        let names = H5adReader::open(path, matrix)?.var_names(gene_col)?;
        let (found, missing) = tg.coverage(&names, &loaded.vocab);
        let share = found as f64 / tg.genes.len().max(1) as f64;
        eprintln!("{}: {found} of the model's {} genes are in the input ({:.1}%)", path.display(), tg.genes.len(), 100.0 * share);
        if share < min_gene_match {
            bail!(
                "{}: only {found} of the {} genes the model was trained on are in the input (minimum {:.0}%; missing e.g. {missing:?}); is --gene-col right? or lower --min-gene-match",
                path.display(),
                tg.genes.len(),
                100.0 * min_gene_match
            );
        }
    }
    let g = source.genes();
    eprintln!(
        "{}: {} of {} {} matched the model vocabulary ({:.1}%)",
        path.display(),
        g.matched,
        g.total,
        g.what,
        100.0 * g.matched as f64 / g.total.max(1) as f64
    );
    if enc.token_genes.is_none() && (g.matched as f64) < 0.5 * g.total as f64 {
        eprintln!("warning: fewer than half of the input genes are in the model vocabulary; is --gene-col right (e.g. feature_name for CELLxGENE files)?");
    }
    let n = source.n_cells();
    if n == 0 {
        bail!("{}: the input has no cells", path.display());
    }
    if let Some(ids) = &enc.batch_ids {
        anyhow::ensure!(ids.len() == n, "{}: {} batch labels for {n} cells", path.display(), ids.len());
    }
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(n as u64) };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {human_pos}/{human_len} cells  {per_sec}  ETA {eta}")
            .expect("valid template"),
    );
    let mut rows: Vec<f32> = Vec::new();
    let mut width = 0;
    let batch_size = batch_size.max(1);
    while let Some(block) = source.next_block(batch_size * 8)? {
        let tokens: Vec<Tokens> = (0..block.len())
            .into_par_iter()
            .map_init(Scratch::default, |s, i| {
                let (genes, values) = block.cell(i);
                let key = (block.start + i) as u64;
                let mut t = match &enc.token_genes {
                    Some(tg) => tg.tokenize(key, genes, values, &enc.tokens, s),
                    None => tokenize(key, genes, values, &enc.tokens, s),
                };
                t.values[0] = enc.cls_value;
                t
            })
            .collect();
        // Minibatches of one batch label each (one group without labels), in input order.
        let mut groups: Vec<(i64, Vec<usize>)> = Vec::new();
        for i in 0..tokens.len() {
            let label = enc.batch_ids.as_ref().map_or(0, |ids| ids[block.start + i]);
            match groups.iter_mut().find(|(l, _)| *l == label) {
                Some((_, v)) => v.push(i),
                None => groups.push((label, vec![i])),
            }
        }
        let mut block_rows: Vec<Option<Vec<f32>>> = vec![None; tokens.len()];
        for (label, members) in &groups {
            for chunk in members.chunks(batch_size) {
                let b = collate(&chunk.iter().map(|&i| &tokens[i]).collect::<Vec<_>>(), enc.pad_id, loaded.pad_value);
                let input = ModelInput {
                    src: Tensor::<2, Int>::from_data(TensorData::new(b.ids.clone(), [b.b, b.l]), dev),
                    values: Tensor::<2>::from_data(TensorData::new(b.values.clone(), [b.b, b.l]), dev),
                    src_key_padding_mask: Tensor::<2, Bool>::from_data(TensorData::new(b.pad.clone(), [b.b, b.l]), dev),
                    batch_labels: enc
                        .batch_ids
                        .as_ref()
                        .map(|_| Tensor::<1, Int>::from_data(TensorData::new(vec![*label; b.b], [b.b]), dev)),
                };
                let o = model.forward(input, ForwardFlags { cls: matches!(head, Head::Probabilities), ..Default::default() })?;
                let out = match head {
                    Head::Probabilities => softmax(o.cls_output.expect("cls flag"), 1),
                    Head::Embedding => l2_normalize(o.cell_emb),
                };
                width = out.dims()[1];
                let flat: Vec<f32> = out.into_data().convert::<f32>().try_to_vec::<f32>().expect("floats");
                for (k, &i) in chunk.iter().enumerate() {
                    block_rows[i] = Some(flat[k * width..(k + 1) * width].to_vec());
                }
                bar.inc(b.b as u64);
            }
        }
        rows.extend(block_rows.into_iter().flat_map(|r| r.expect("every cell ran")));
    }
    bar.finish_and_clear();
    Ok(Encoded { rows, width })
}
