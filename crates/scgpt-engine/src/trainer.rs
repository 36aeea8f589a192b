//! The pretraining loop: data → collator → forward (generative two-pass or MLM) → backward →
//! gradient sync → global-norm clip → Adam → schedule, with checkpoints, resume, validation
//! and logging. One process per rank; rank 0 alone prints, logs and writes.
//!
//! Losses are sums over the tokens that count divided by the number of such tokens in the
//! whole optimiser step (all micro-batches, all ranks), so a step's gradient is the same
//! whether its cells run in one batch, in micro-batches or on several ranks (the original
//! averages per-rank means, which weights ranks with few targets more).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use scgpt_data::loader::{BatchIter, CellBatch, DataPosition, Loader, LoaderConfig, ShardSet};
use scgpt_data::seed::{hash_str, mix64};
use scgpt_data::vocab::GeneVocab;
use scgpt_dist::Collective;
use scgpt_model::burn::module::Module;
use scgpt_model::burn::optim::{GradientsAccumulator, GradientsParams};
use scgpt_model::burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use scgpt_model::{ForwardFlags, GenerativeInput, ModelInput, TransformerModel};
use serde::{Deserialize, Serialize};

use crate::collate::{collate_generative, collate_mlm, gen_ratio_for, Cell, CollateOptions, GenerativeBatch, MlmBatch};
use crate::config::TrainConfig;
use crate::metrics::{asw_label, knn_accuracy};
use crate::optim::{clip_coefficient, flatten_grads, grad_sq_norm, list_params, lr_at, unflatten_grads, Adam, AdamConfig, ParamEntry};
use crate::tensorboard::EventWriter;

/// Saved with every checkpoint: where the run is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps done (skipped non-finite steps included).
    pub step: u64,
    /// The data position after the last consumed batch.
    pub position: DataPosition,
    pub best_valid_mse: Option<f64>,
    pub best_step: Option<u64>,
    pub skipped_steps: u64,
    pub cells_seen: u64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    Finished { steps: u64 },
    /// SIGTERM / SIGINT: a checkpoint was written first.
    Interrupted { steps: u64, signal: i32 },
}

/// Loss terms of one step, as sums and token counts (for exact averaging across ranks).
#[derive(Debug, Clone, Copy, Default)]
struct StepLosses {
    /// gep (mse on gen / masked tokens), gepc (mvc), cell-prompt pass, ecs, cce, cls.
    sums: [f64; 6],
    tokens: f64,
    /// Micro-batches contributing to ecs / cce / cls (their per-batch means are averaged).
    batches: f64,
}

const TERMS: [&str; 6] = ["gep", "gepc", "cell_prompt", "ecs", "cce", "cls"];

/// A micro-batch's loss terms in `TERMS` order, detached; absent terms are `None`.
type Terms = [Option<Tensor<1>>; 6];

pub struct Trainer {
    cfg: TrainConfig,
    device: Device,
    model: Option<TransformerModel>,
    vocab_json: String,
    set_maps: Vec<Vec<Option<u32>>>,
    loader: Loader,
    adam: Adam,
    params: Vec<ParamEntry>,
    comm: Box<dyn Collective>,
    pub state: TrainState,
    tb: Option<EventWriter>,
    labelled: Option<LabelledSet>,
    total_steps: u64,
    collate: CollateOptions,
    /// The signal (SIGTERM / SIGINT) that asked the run to stop, 0 if none.
    stop_signal: Arc<AtomicI32>,
    quiet: bool,
    /// The CLS objective's classes (sorted labels of `train.cls_col`), when it is on.
    classes: Option<Classes>,
}

/// Labels of a CLS objective: class `i` is `names[i]`.
struct Classes {
    names: Vec<String>,
    index: std::collections::HashMap<String, i64>,
}

impl Classes {
    /// The sorted union of the column's values over every shard of every set.
    fn scan(sets: &[ShardSet], col: &str) -> anyhow::Result<Self> {
        let mut all = std::collections::BTreeSet::new();
        for set in sets {
            for (path, _) in &set.shards {
                all.extend(scgpt_data::shard::read_obs_values(path, col).with_context(|| format!("train.cls_col = {col:?}"))?);
            }
        }
        anyhow::ensure!(all.len() >= 2, "train.cls_col = {col:?}: {} distinct label(s) in the data; a classifier needs at least 2", all.len());
        Ok(Self::from_names(all.into_iter().collect()))
    }

    fn from_names(names: Vec<String>) -> Self {
        let index = names.iter().enumerate().map(|(i, n)| (n.clone(), i as i64)).collect();
        Classes { names, index }
    }

    /// Class ids of a batch's labels; a label outside the run's classes is an error.
    fn ids(&self, labels: &[String], col: &str) -> anyhow::Result<Vec<i64>> {
        labels
            .iter()
            .map(|l| {
                self.index.get(l).copied().with_context(|| {
                    format!("train.cls_col = {col:?}: label {l:?} is not one of the run's {} classes (classes.json); a resumed run must see the same label set", self.names.len())
                })
            })
            .collect()
    }
}

struct LabelledSet {
    cells: Vec<Cell>,
    labels: Vec<usize>,
    names: Vec<String>,
}

fn ckpt_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn step_name(step: u64) -> String {
    format!("step-{step:09}")
}

/// The newest complete checkpoint of a run directory (`checkpoints/step-N` with a state).
pub fn latest_checkpoint(run: &Path) -> Option<(u64, PathBuf)> {
    let rd = std::fs::read_dir(ckpt_dir(run)).ok()?;
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: u64 = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join("state.json").is_file().then(|| (step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

fn rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A stored cell in the model's vocabulary: genes the model lacks and zero values dropped.
fn map_cell(genes: &[i32], values: &[f32], map: &[Option<u32>], key: u64) -> Cell {
    let mut c = Cell { key, ..Default::default() };
    for (&g, &v) in genes.iter().zip(values) {
        if let Some(Some(id)) = map.get(g as usize) {
            if v > 0.0 {
                c.genes.push(*id);
                c.values.push(v);
            }
        }
    }
    c
}

fn to_cells(batch: &CellBatch, maps: &[Vec<Option<u32>>]) -> Vec<Cell> {
    let n = batch.cells.len();
    let first = batch.position.cells_done - n as u64;
    (0..n)
        .map(|i| {
            let (genes, values, _) = batch.cells.cell(i);
            map_cell(genes, values, &maps[batch.sets[i]], first + i as u64)
        })
        .collect()
}

enum Collated {
    Generative(GenerativeBatch),
    Mlm(MlmBatch),
}

impl Collated {
    fn tokens(&self) -> usize {
        match self {
            Collated::Generative(b) => b.gen_tokens(),
            Collated::Mlm(b) => b.masked_tokens(),
        }
    }
    /// Floating-point operations of the encoder for one training step on this batch (forward
    /// and backward = 3 × forward), on the padded shapes the device computes: per layer and
    /// token 2·(4d² + 2d·d_hid) for the projections and feed-forward, plus 4d per attention
    /// score (QKᵀ and the weighted sum of V). Generative: pcpt tokens attend to P keys, gen
    /// tokens to P + 1, twice with the cell-prompted pass. Heads and embeddings are left out,
    /// as model-FLOP counts usually do.
    fn encoder_flops(&self, d: usize, d_hid: usize, layers: usize, cell_prompt_pass: bool) -> f64 {
        let (d, d_hid, layers) = (d as f64, d_hid as f64, layers as f64);
        let per_token = 2.0 * (4.0 * d * d + 2.0 * d * d_hid);
        let (tokens, scores, passes) = match self {
            Collated::Generative(b) => {
                let (n, p, g) = (b.batch as f64, b.pcpt_len as f64, b.gen_len as f64);
                (n * (p + g), n * (p * p + g * (p + 1.0)), if cell_prompt_pass { 2.0 } else { 1.0 })
            }
            Collated::Mlm(b) => {
                let (n, l) = (b.batch as f64, b.len as f64);
                (n * l, n * l * l, 1.0)
            }
        };
        3.0 * passes * layers * (tokens * per_token + scores * 4.0 * d)
    }

    fn input_tokens(&self) -> usize {
        match self {
            Collated::Generative(b) => b.pcpt_pad.iter().chain(&b.gen_pad).filter(|p| !**p).count(),
            Collated::Mlm(b) => b.pad.iter().filter(|p| !**p).count(),
        }
    }
}

fn ints(v: &[i64], b: usize, l: usize, d: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(v.to_vec(), [b, l]), d)
}
fn floats(v: &[f32], b: usize, l: usize, d: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(v.to_vec(), [b, l]), d)
}
fn bools(v: &[bool], b: usize, l: usize, d: &Device) -> Tensor<2, Bool> {
    Tensor::from_data(TensorData::new(v.to_vec(), [b, l]), d)
}

/// A collated generative batch as model input (no gen mask when nothing is padded).
fn generative_input(b: &GenerativeBatch, d: &Device) -> GenerativeInput {
    let (n, p, g) = (b.batch, b.pcpt_len, b.gen_len);
    GenerativeInput {
        pcpt_genes: ints(&b.pcpt_genes, n, p, d),
        pcpt_values: floats(&b.pcpt_values, n, p, d),
        pcpt_key_padding_mask: bools(&b.pcpt_pad, n, p, d),
        gen_genes: Some(ints(&b.gen_genes, n, g, d)),
        gen_key_padding_mask: b.gen_pad.contains(&true).then(|| bools(&b.gen_pad, n, g, d)),
        batch_labels: None,
        input_cell_emb: None,
    }
}

/// Mean cross entropy of `[B, C]` logits against class ids (PyTorch's `CrossEntropyLoss`).
fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let n = targets.dims()[0];
    let logp = scgpt_model::burn::tensor::activation::log_softmax(logits, 1);
    logp.gather(1, targets.reshape([n, 1])).mean().neg()
}

/// Σ ((pred − target)·m)² over the positions where `keep` holds.
fn masked_sq_sum(pred: Tensor<2>, target: Tensor<2>, keep: Tensor<2>) -> Tensor<1> {
    ((pred - target) * keep).square().sum()
}

fn scalar(t: &Tensor<1>) -> f64 {
    t.clone().into_scalar::<f32>() as f64
}

impl Trainer {
    /// Sets up a run: model (fresh, `init_from`, or resumed from the run directory), data,
    /// optimiser state, logs. `comm` is the rank's collective (Single for one process).
    pub fn new(cfg: TrainConfig, comm: Box<dyn Collective>) -> anyhow::Result<Self> {
        cfg.validate()?;
        let rank = comm.rank();
        let world = comm.world();
        let lead = rank == 0;
        let local_rank = scgpt_dist::RankInfo::from_env().map(|i| i.local_rank).unwrap_or(0);
        let mut plain = crate::device::select(&cfg.run.device, local_rank).context("run.device")?;
        crate::device::configure_precision(&mut plain, &cfg.train.precision)?;
        let device = plain.autodiff();
        device.seed(mix64(cfg.run.seed ^ 0x1417));

        let weights = if cfg.data.weights.is_empty() { vec![1.0; cfg.data.shards.len()] } else { cfg.data.weights.clone() };
        let mut sets = Vec::new();
        for (dir, w) in cfg.data.shards.iter().zip(&weights) {
            sets.push(ShardSet::open(dir, *w).with_context(|| format!("data.shards: {}", dir.display()))?);
        }
        let total_cells: usize = sets.iter().map(|s| (s.cells() as f64 * s.weight).round() as usize).sum();
        if total_cells == 0 {
            bail!("data.shards hold no cells");
        }
        let data_vocabs: Vec<&GeneVocab> = sets.iter().map(|s| &s.vocab).collect();

        let resume = if cfg.run.no_resume { None } else { latest_checkpoint(&cfg.run.dir) };
        let mut notes = Vec::new();
        let classes = if cfg.train.cls {
            let saved = cfg.run.dir.join("classes.json");
            let c = match (&resume, std::fs::read_to_string(&saved)) {
                (Some(_), Ok(text)) => Classes::from_names(serde_json::from_str(&text).with_context(|| format!("{}: not a JSON list of labels", saved.display()))?),
                _ => Classes::scan(&sets, &cfg.train.cls_col)?,
            };
            notes.push(format!("cls: {} classes of `{}` ({})", c.names.len(), cfg.train.cls_col, c.names.iter().take(8).cloned().collect::<Vec<_>>().join(", ")));
            Some(c)
        } else {
            None
        };
        let n_cls = classes.as_ref().map_or(1, |c| c.names.len());
        let (model, vocab, adam, state) = match &resume {
            Some((step, dir)) => {
                let ck = scgpt_model::load_native(dir.join("model"), &device).with_context(|| format!("resuming from {}", dir.display()))?;
                let vocab = GeneVocab::from_json_str(&ck.vocab_json, "checkpoint vocab.json")?;
                let text = std::fs::read_to_string(dir.join("state.json"))?;
                let state: TrainState = serde_json::from_str(&text).with_context(|| format!("{}: state.json", dir.display()))?;
                if ck.model.config.n_cls != n_cls {
                    bail!("{}: the checkpoint's classifier has {} classes, the run's labels {n_cls}; start a new run.dir for another label set", dir.display(), ck.model.config.n_cls);
                }
                let params = list_params(&ck.model)?;
                let adam = Adam::load(&dir.join("optimizer.bin"), &params, &device.clone().inner())?;
                notes.push(format!("resuming from {} (step {step}, epoch {}, {} cells into it)", dir.display(), state.position.epoch, state.position.cells_done));
                (ck.model, vocab, adam, state)
            }
            None => {
                let init = if cfg.model.init_from.is_empty() {
                    crate::init::fresh(&cfg, crate::init::union_vocab(&data_vocabs), n_cls, &device)?
                } else {
                    crate::init::from_checkpoint(&cfg, Path::new(&cfg.model.init_from), &data_vocabs, n_cls, &device)?
                };
                notes.extend(init.notes);
                let t = &cfg.train;
                let adam = Adam::new(AdamConfig {
                    lr: t.lr,
                    beta1: t.betas[0],
                    beta2: t.betas[1],
                    eps: t.eps,
                    weight_decay: t.weight_decay,
                    decoupled: t.optimizer == "adamw",
                });
                (init.model, init.vocab, adam, TrainState::default())
            }
        };
        let set_maps: Vec<Vec<Option<u32>>> = sets.iter().map(|s| s.vocab.id_map(&vocab)).collect();
        for (s, m) in sets.iter().zip(&set_maps) {
            let genes = s.vocab.tokens().iter().filter(|t| s.vocab.is_gene(t)).count();
            let matched = m.iter().filter(|x| x.is_some()).count();
            if matched == 0 {
                bail!("{}: none of its {genes} genes is in the model vocabulary; is init_from the right checkpoint for this data?", s.dir.display());
            }
            notes.push(format!("data: {} ({} cells, weight {}), {matched} of {genes} genes in the model vocabulary", s.dir.display(), s.cells(), s.weight));
        }
        let vocab_json = vocab.to_json();
        let params = list_params(&model)?;
        // burn initialises parameters lazily, in order of first use; touching them all now in
        // module order makes the initial values a function of the seed alone (the same with
        // or without data parallelism, whatever runs first).
        let _ = crate::optim::flatten_params(&model, &params);
        let n_params: usize = params.iter().map(ParamEntry::numel).sum();
        notes.push(format!("parameters: {n_params} in {} tensors; rank {rank} of {world}", params.len()));

        let t = &cfg.train;
        let global_batch = (t.batch_size * world * t.grad_accum) as u64;
        let train_cells = (total_cells as f64 * (1.0 - cfg.data.valid_fraction)).ceil() as u64;
        let steps_per_epoch = train_cells.div_ceil(global_batch).max(1);
        let mut total_steps = if t.epochs > 0 { steps_per_epoch * t.epochs } else { t.max_steps };
        if t.max_steps > 0 {
            total_steps = total_steps.min(t.max_steps);
        }
        notes.push(format!("schedule: {total_steps} steps ({steps_per_epoch} per epoch at a global batch of {global_batch} cells), warmup {}", t.warmup_steps));

        let loader = Loader::new(
            sets,
            LoaderConfig {
                seed: cfg.run.seed,
                batch_size: t.batch_size,
                valid_fraction: cfg.data.valid_fraction,
                shuffle_window: cfg.data.shuffle_window,
                rank,
                world,
                prefetch: cfg.data.prefetch,
                obs_cols: if cfg.train.cls { vec![cfg.train.cls_col.clone()] } else { Vec::new() },
            },
        )?;
        let collate = CollateOptions {
            max_seq_len: cfg.model.max_seq_len,
            cls_id: vocab.cls_id().context("model vocabulary without <cls>")?,
            pad_id: vocab.pad_id().context("model vocabulary without <pad>")?,
            pad_value: cfg.model.pad_value as f32,
            mask_value: cfg.model.mask_value as f32,
            seed: (!cfg.run.deterministic).then_some(cfg.run.seed),
            draw_seed: cfg.run.seed,
            epoch: 0,
        };

        let mut tb = None;
        let mut labelled = None;
        if lead {
            std::fs::create_dir_all(&cfg.run.dir).with_context(|| format!("run.dir {}: cannot create", cfg.run.dir.display()))?;
            let resolved = toml::to_string_pretty(&cfg)?;
            scgpt_data::atomic::write_bytes(&cfg.run.dir.join("config.resolved.toml"), resolved.as_bytes())?;
            scgpt_data::atomic::write_bytes(&cfg.run.dir.join("vocab.json"), vocab_json.as_bytes())?;
            let args = serde_json::to_string_pretty(&scgpt_model::checkpoint::original_args_json(&model.config))?;
            scgpt_data::atomic::write_bytes(&cfg.run.dir.join("args.json"), args.as_bytes())?;
            if let Some(c) = &classes {
                scgpt_data::atomic::write_bytes(&cfg.run.dir.join("classes.json"), serde_json::to_string_pretty(&c.names)?.as_bytes())?;
            }
            let mut w = EventWriter::create(&cfg.run.dir.join("tensorboard"))?;
            // After a crash, points past the resumed step from the old files are superseded.
            w.session_start(state.step)?;
            w.text("config", state.step, &format!("```\n{resolved}\n```"))?;
            tb = Some(w);
            if !cfg.valid.label_set.is_empty() {
                let set = load_labelled(&cfg, &vocab)?;
                notes.push(format!(
                    "validation embeddings: {} cells of {}, {} labels of `{}` ({})",
                    set.cells.len(),
                    cfg.valid.label_set,
                    set.names.len(),
                    cfg.valid.label_col,
                    set.names.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
                ));
                labelled = Some(set);
            }
            for n in &notes {
                eprintln!("scgpt-train: {n}");
            }
        }
        let stop_signal = Arc::new(AtomicI32::new(0));
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            let s = stop_signal.clone();
            // Only an atomic store in the handler; the loop checkpoints and exits at the next step.
            unsafe {
                signal_hook::low_level::register(sig, move || s.store(sig, Ordering::SeqCst))?;
            }
        }
        let mut trainer = Trainer {
            cfg,
            device,
            model: Some(model),
            vocab_json,
            set_maps,
            loader,
            adam,
            params,
            comm,
            state,
            tb,
            labelled,
            total_steps,
            collate,
            stop_signal,
            quiet: false,
            classes,
        };
        if resume.is_none() && world > 1 {
            trainer.broadcast_parameters()?;
        }
        Ok(trainer)
    }

    /// No progress bar: log lines instead (tests, batch jobs).
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    pub fn model(&self) -> &TransformerModel {
        self.model.as_ref().expect("model present between steps")
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// Rank 0's initial parameters on every rank (different ranks draw different inits).
    fn broadcast_parameters(&mut self) -> anyhow::Result<()> {
        let model = self.model.take().expect("model");
        let mut flat = crate::optim::flatten_params(&model, &self.params);
        self.comm.broadcast(&mut flat)?;
        self.model = Some(crate::optim::load_flat_params(model, &self.params, &flat, &self.device));
        Ok(())
    }

    /// The furthest data position of any rank (the last rank's last batch): where every rank
    /// resumes, so a resumed loader deals the next batches to the same ranks as before.
    fn global_position(&mut self, mine: DataPosition) -> anyhow::Result<DataPosition> {
        if self.comm.world() == 1 {
            return Ok(mine);
        }
        let mut slots = vec![0f64; self.comm.world()];
        slots[self.comm.rank()] = mine.cells_done as f64;
        self.comm.all_reduce_sum_f64(&mut slots)?;
        let cells_done = slots.iter().fold(0f64, |a, &b| a.max(b)) as u64;
        Ok(DataPosition { epoch: mine.epoch, cells_done })
    }

    fn lead(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Runs to the end of the schedule (or a signal). Each call resumes where the state is.
    pub fn run(&mut self) -> anyhow::Result<RunEnd> {
        let stop = self.cfg.run.stop_at_step;
        self.run_until((stop > 0).then_some(stop))
    }

    /// As [`run`](Self::run), but stops after step `stop_at` with a checkpoint, as a signal
    /// would (tests of resuming).
    pub fn run_until(&mut self, stop_at: Option<u64>) -> anyhow::Result<RunEnd> {
        let t = self.cfg.train.clone();
        let lead = self.lead();
        let bar = if lead && !self.quiet {
            let b = ProgressBar::new(self.total_steps);
            b.set_style(
                ProgressStyle::with_template("{spinner} step {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_position(self.state.step);
            b
        } else {
            ProgressBar::hidden()
        };
        let mut iter: Option<BatchIter> = None;
        let mut interval = StepLosses::default();
        let mut interval_steps = 0u64;
        let mut interval_cells = 0u64;
        let mut interval_tokens = 0u64;
        let mut interval_flops = 0.0f64;
        let mut interval_norm = 0.0;
        let mut interval_comm = 0.0f64;
        let mut clock = Instant::now();
        let mut consecutive_skips = 0u32;
        let mut epoch_done = false;
        while self.state.step < self.total_steps {
            let signal = self.stop_signal.load(Ordering::SeqCst);
            if signal != 0 || stop_at == Some(self.state.step) {
                self.save_checkpoint()?;
                bar.abandon_with_message(format!("signal {signal}: checkpoint written at step {}", self.state.step));
                return Ok(RunEnd::Interrupted { steps: self.state.step, signal });
            }
            // Gather the step's micro-batches; an epoch ends for all ranks when any runs dry.
            let mut micro: Vec<(Collated, DataPosition, usize)> = Vec::new();
            let step = self.state.step;
            let ratio = gen_ratio_for(self.cfg.run.seed, step, &t.gen_ratios);
            while micro.len() < t.grad_accum && !epoch_done {
                if iter.is_none() {
                    iter = Some(self.loader.train_epoch(self.state.position));
                }
                match iter.as_mut().and_then(|i| i.next()) {
                    Some(batch) => {
                        let batch = batch?;
                        let cells = to_cells(&batch, &self.set_maps);
                        let mut opt = self.collate;
                        opt.epoch = batch.position.epoch;
                        let c = if t.objective == "generative" {
                            Collated::Generative(collate_generative(&cells, ratio, &opt))
                        } else {
                            let mut b = collate_mlm(&cells, t.mask_ratio, &opt);
                            b.labels = self.batch_labels(&batch)?;
                            Collated::Mlm(b)
                        };
                        micro.push((c, batch.position, cells.len()));
                    }
                    None => epoch_done = true,
                }
            }
            let mut have = [if micro.len() == t.grad_accum { 1.0 } else { 0.0 }];
            self.comm.all_reduce_sum_f64(&mut have)?;
            if have[0] < self.comm.world() as f64 {
                // End of epoch: the remainder that does not fill a step on every rank is dropped.
                iter = None;
                epoch_done = false;
                let next = self.state.position.epoch + 1;
                if self.cfg.train.epochs > 0 && next >= self.cfg.train.epochs {
                    break;
                }
                self.state.position = DataPosition { epoch: next, cells_done: 0 };
                continue;
            }
            let local_tokens: usize = micro.iter().map(|(c, _, _)| c.tokens()).sum();
            let mut tokens = [local_tokens as f64];
            self.comm.all_reduce_sum_f64(&mut tokens)?;
            if tokens[0] == 0.0 {
                bail!("step {step}: no target tokens in the whole batch (cells with a single gene?)");
            }
            let lr = lr_at(t.lr, step, t.warmup_steps, self.total_steps, t.schedule == "cosine");
            let (losses, norm, comm_s, skipped) = self.optimizer_step(&micro, tokens[0], lr, step)?;
            self.state.step += 1;
            self.state.position = self.global_position(micro.last().expect("micro-batches").1)?;
            let cells: usize = micro.iter().map(|(_, _, n)| n).sum();
            self.state.cells_seen += (cells * self.comm.world()) as u64;
            interval_cells += (cells * self.comm.world()) as u64;
            interval_tokens += (micro.iter().map(|(c, _, _)| c.input_tokens()).sum::<usize>() * self.comm.world()) as u64;
            let mc = &self.model().config;
            let (d, d_hid, layers) = (mc.d_model, mc.d_hid, mc.nlayers);
            let prompt = t.objective == "generative" && t.cell_prompt_pass;
            interval_flops += micro.iter().map(|(c, _, _)| c.encoder_flops(d, d_hid, layers, prompt)).sum::<f64>() * self.comm.world() as f64;
            interval_comm += comm_s;
            bar.set_position(self.state.step);
            if skipped {
                self.state.skipped_steps += 1;
                consecutive_skips += 1;
                if lead {
                    bar.println(format!("step {}: non-finite gradient norm ({norm}); update skipped", self.state.step));
                }
                if consecutive_skips >= 50 {
                    bail!("50 consecutive steps had non-finite gradients (last norm {norm}); lower train.lr or check the data");
                }
            } else {
                consecutive_skips = 0;
                interval_norm += norm;
                for (acc, v) in interval.sums.iter_mut().zip(losses.sums) {
                    *acc += v;
                }
                interval.tokens += losses.tokens;
                interval.batches += losses.batches;
                interval_steps += 1;
            }
            let s = self.state.step;
            if s % t.log_every == 0 || s == self.total_steps {
                let secs = clock.elapsed().as_secs_f64().max(1e-9);
                let mut scalars: Vec<(String, f64)> = Vec::new();
                let mut loss_total = 0.0;
                for (k, name) in TERMS.iter().enumerate() {
                    let denom = if k < 3 { interval.tokens } else { interval.batches };
                    let active = match k {
                        1 => self.model().config.do_mvc,
                        2 => t.objective == "generative" && t.cell_prompt_pass,
                        3 => t.objective == "mlm" && t.ecs,
                        4 => t.objective == "mlm" && t.cce,
                        5 => t.objective == "mlm" && t.cls,
                        _ => true,
                    };
                    if active && denom > 0.0 {
                        let v = interval.sums[k] / denom;
                        loss_total += v * match k {
                            3 => t.ecs_weight,
                            4 => t.cce_weight,
                            5 => t.cls_weight,
                            _ => 1.0,
                        };
                        scalars.push((format!("train/loss_{name}"), v));
                    }
                }
                scalars.push(("train/loss".into(), loss_total));
                scalars.push(("train/lr".into(), lr));
                scalars.push(("train/grad_norm".into(), interval_norm / interval_steps.max(1) as f64));
                scalars.push(("train/cells_per_s".into(), interval_cells as f64 / secs));
                scalars.push(("train/tokens_per_s".into(), interval_tokens as f64 / secs));
                scalars.push(("train/model_tflops".into(), interval_flops / secs / 1e12));
                scalars.push(("train/comm_share".into(), interval_comm / secs));
                scalars.push(("train/epoch".into(), self.state.position.epoch as f64));
                if let Some(rss) = rss_bytes() {
                    scalars.push(("system/rss_mb".into(), rss as f64 / 1e6));
                }
                if lead {
                    let msg = format!(
                        "loss {loss_total:.4} (gep {:.4}) lr {lr:.2e} | {:.1} cells/s, {:.3} TFLOP/s",
                        interval.sums[0] / interval.tokens.max(1.0),
                        interval_cells as f64 / secs,
                        interval_flops / secs / 1e12
                    );
                    bar.set_message(msg.clone());
                    if bar.is_hidden() {
                        eprintln!("step {s}/{}: {msg}", self.total_steps);
                    }
                    self.log(s, &scalars)?;
                }
                interval = StepLosses::default();
                interval_steps = 0;
                interval_cells = 0;
                interval_tokens = 0;
                interval_flops = 0.0;
                interval_norm = 0.0;
                interval_comm = 0.0;
                clock = Instant::now();
            }
            let last = s == self.total_steps;
            if s % t.eval_every == 0 || last {
                let pause = Instant::now();
                self.evaluate(&bar)?;
                // Validation time is not training throughput.
                clock += pause.elapsed();
            }
            if s % t.save_every == 0 || last {
                self.save_checkpoint()?;
            }
        }
        if latest_checkpoint(&self.cfg.run.dir).map(|(s, _)| s) != Some(self.state.step) {
            self.save_checkpoint()?;
        }
        bar.finish_with_message(format!("done: {} steps", self.state.step));
        Ok(RunEnd::Finished { steps: self.state.step })
    }

    fn log(&mut self, step: u64, scalars: &[(String, f64)]) -> anyhow::Result<()> {
        if let Some(tb) = self.tb.as_mut() {
            let pairs: Vec<(&str, f64)> = scalars.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            tb.scalars(step, &pairs)?;
        }
        let mut line = serde_json::Map::new();
        line.insert("step".into(), step.into());
        for (k, v) in scalars {
            line.insert(k.clone(), serde_json::Value::from(*v));
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.cfg.run.dir.join("metrics.jsonl"))?;
        writeln!(f, "{}", serde_json::Value::Object(line))?;
        Ok(())
    }

    /// Forward + backward over the micro-batches, sync, clip, update. Returns the loss sums,
    /// the global gradient norm, the seconds spent communicating and whether the update was
    /// skipped (non-finite norm).
    fn optimizer_step(&mut self, micro: &[(Collated, DataPosition, usize)], tokens: f64, lr: f64, step: u64) -> anyhow::Result<(StepLosses, f64, f64, bool)> {
        let t = self.cfg.train.clone();
        let world = self.comm.world() as f64;
        let accum = micro.len() as f64;
        let mut model = self.model.take().expect("model");
        let mut acc = GradientsAccumulator::<TransformerModel>::new();
        let mut losses = StepLosses { tokens: 0.0, ..Default::default() };
        let mut terms: Terms = Default::default();
        for (mi, (batch, _, _)) in micro.iter().enumerate() {
            // Dropout draws: fixed by (seed, step, micro-batch, rank), so a resume replays them.
            self.device.seed(mix64(self.cfg.run.seed ^ mix64(step) ^ mix64((mi as u64) << 20 | self.comm.rank() as u64) ^ hash_str("dropout")));
            let (loss, sums) = match batch {
                Collated::Generative(b) => self.generative_loss(&model, b, world / tokens)?,
                Collated::Mlm(b) => self.mlm_loss(&model, b, world / tokens, world / (accum * world))?,
            };
            for (acc, term) in terms.iter_mut().zip(sums) {
                *acc = match (acc.take(), term) {
                    (Some(a), Some(t)) => Some(a + t),
                    (a, t) => a.or(t),
                };
            }
            losses.tokens += batch.tokens() as f64;
            losses.batches += 1.0;
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            acc.accumulate(&model, grads);
        }
        // The loss terms reach the host once per step (each read is a device sync).
        let zero = || Tensor::<1>::zeros([1], &self.device);
        let read = Tensor::cat(terms.into_iter().map(|t| t.unwrap_or_else(zero)).collect(), 0);
        let read: Vec<f32> = read.into_data().convert::<f32>().try_to_vec::<f32>().expect("floats");
        for (sum, v) in losses.sums.iter_mut().zip(read) {
            *sum = v as f64;
        }
        let mut grads = acc.grads();
        let mut comm_s = 0.0;
        if self.comm.world() > 1 {
            let c = Instant::now();
            let mut flat = flatten_grads(&grads, &self.params);
            self.comm.all_reduce_mean(&mut flat)?;
            unflatten_grads(&mut grads, &self.params, &flat, &self.device.clone().inner());
            let mut l: Vec<f64> = losses.sums.iter().copied().chain([losses.tokens, losses.batches]).collect();
            self.comm.all_reduce_sum_f64(&mut l)?;
            losses.sums.copy_from_slice(&l[..6]);
            (losses.tokens, losses.batches) = (l[6], l[7]);
            comm_s = c.elapsed().as_secs_f64();
        }
        let norm = grad_sq_norm(&grads, &self.params).sqrt();
        if !norm.is_finite() {
            self.model = Some(model);
            return Ok((losses, norm, comm_s, true));
        }
        let coef = clip_coefficient(norm, t.clip_norm);
        model = self.adam.step(model, grads, lr, coef);
        self.model = Some(model);
        Ok((losses, norm, comm_s, false))
    }

    /// Pass 1 (gene-prompted: GEP + GEPC on gen tokens) and pass 2 (cell-prompted, `<cls>`
    /// input replaced by pass 1's detached cell embedding: GEP on gen tokens).
    fn generative_loss(&self, model: &TransformerModel, b: &GenerativeBatch, scale: f64) -> anyhow::Result<(Tensor<1>, Terms)> {
        let d = &self.device;
        let (n, p, g) = (b.batch, b.pcpt_len, b.gen_len);
        let input = generative_input(b, d);
        let target = floats(&b.gen_target, n, g, d);
        let keep = bools(&b.gen_pad, n, g, d).bool_not().float();
        let mvc = model.config.do_mvc;
        let out = model.generative_forward(input.clone(), ForwardFlags { mvc, ..Default::default() })?;
        let gep = masked_sq_sum(out.gen_preds.clone().expect("gen preds"), target.clone(), keep.clone());
        let mut total = gep.clone();
        let mut sums: Terms = [Some(gep.clone().detach()), None, None, None, None, None];
        if let Some(m) = out.mvc_output.clone() {
            let gepc = masked_sq_sum(m.slice([0..n, p..p + g]), target.clone(), keep.clone());
            sums[1] = Some(gepc.clone().detach());
            total = total + gepc;
        }
        if self.cfg.train.cell_prompt_pass {
            let second = GenerativeInput { input_cell_emb: Some(out.cell_emb.detach()), ..input };
            let out2 = model.generative_forward(second, ForwardFlags::default())?;
            let gen = masked_sq_sum(out2.gen_preds.expect("gen preds"), target, keep);
            sums[2] = Some(gen.clone().detach());
            total = total + gen;
        }
        Ok((total.mul_scalar(scale), sums))
    }

    /// GEP (+ GEPC) on masked positions, optional ECS and CCE (per-batch means).
    fn mlm_loss(&mut self, model: &TransformerModel, b: &MlmBatch, scale: f64, batch_scale: f64) -> anyhow::Result<(Tensor<1>, Terms)> {
        let d = &self.device;
        let t = self.cfg.train.clone();
        let (n, l) = (b.batch, b.len);
        let input = ModelInput {
            src: ints(&b.genes, n, l, d),
            values: floats(&b.values, n, l, d),
            src_key_padding_mask: bools(&b.pad, n, l, d),
            batch_labels: None,
        };
        let target = floats(&b.target, n, l, d);
        let keep = bools(&b.masked, n, l, d).float();
        let cls = t.cls && !b.labels.is_empty();
        let out = model.forward(input, ForwardFlags { mvc: model.config.do_mvc, ecs: t.ecs, cce: t.cce, cls, ..Default::default() })?;
        let gep = masked_sq_sum(out.mlm_output, target.clone(), keep.clone());
        let mut sums: Terms = [Some(gep.clone().detach()), None, None, None, None, None];
        let mut total = gep;
        if let Some(m) = out.mvc_output {
            let gepc = masked_sq_sum(m, target, keep);
            sums[1] = Some(gepc.clone().detach());
            total = total + gepc;
        }
        let mut total = total.mul_scalar(scale);
        if let Some(ecs) = out.loss_ecs {
            sums[3] = Some(ecs.clone().detach());
            total = total + ecs.mul_scalar(t.ecs_weight * batch_scale);
        }
        if let Some(local) = out.loss_cce {
            // Across ranks the contrast runs over the global batch, as the original's
            // all-gather does; × world so the averaged gradient is the one-process gradient.
            let (cce, factor) = match out.cce_views {
                Some((c1, c2)) if self.comm.world() > 1 => (self.gathered_cce(c1, c2)?, self.comm.world() as f64),
                _ => (local, 1.0),
            };
            sums[4] = Some(cce.clone().detach());
            total = total + cce.mul_scalar(t.cce_weight * batch_scale * factor);
        }
        if let Some(logits) = out.cls_output {
            let ce = cross_entropy(logits, Tensor::from_data(TensorData::new(b.labels.clone(), [n]), &self.device));
            sums[5] = Some(ce.clone().detach());
            total = total + ce.mul_scalar(t.cls_weight * batch_scale);
        }
        Ok((total, sums))
    }

    /// Class ids of a batch's cells for the CLS objective (empty when it is off).
    fn batch_labels(&self, batch: &CellBatch) -> anyhow::Result<Vec<i64>> {
        match (&self.classes, batch.cells.obs.first()) {
            (Some(c), Some(labels)) => c.ids(labels, &self.cfg.train.cls_col),
            _ => Ok(Vec::new()),
        }
    }

    /// CCE over every rank's cells: the other ranks' two views arrive as constants, this
    /// rank's keep their gradients (the original's all-gather with local tensors put back).
    fn gathered_cce(&mut self, c1: Tensor<2>, c2: Tensor<2>) -> anyhow::Result<Tensor<1>> {
        let [b, d] = c1.dims();
        let (world, rank) = (self.comm.world(), self.comm.rank());
        let mut sizes = vec![0f64; world];
        sizes[rank] = b as f64;
        self.comm.all_reduce_sum_f64(&mut sizes)?;
        let most = sizes.iter().fold(0f64, |a, &x| a.max(x)) as usize;
        let padded = |t: &Tensor<2>| {
            let mut v: Vec<f32> = t.clone().detach().into_data().convert::<f32>().try_to_vec::<f32>().expect("floats");
            v.resize(most * d, 0.0);
            v
        };
        let g1 = self.comm.all_gather(&padded(&c1))?;
        let g2 = self.comm.all_gather(&padded(&c2))?;
        let dev = c1.device();
        let assemble = |g: &[f32], local: Tensor<2>| {
            let mut parts = Vec::with_capacity(world);
            for (r, &n) in sizes.iter().enumerate() {
                let n = n as usize;
                if r == rank {
                    parts.push(local.clone());
                } else if n > 0 {
                    let at = r * most * d;
                    parts.push(Tensor::<2>::from_data(TensorData::new(g[at..at + n * d].to_vec(), [n, d]), &dev));
                }
            }
            Tensor::cat(parts, 0)
        };
        let (all1, all2) = (assemble(&g1, c1), assemble(&g2, c2));
        Ok(scgpt_model::model::contrastive_loss(all1, all2, 0.5))
    }

    /// Validation: masked MSE on gen tokens (the original's criterion) over the held-out cells
    /// with fixed draws, plus kNN accuracy and ASW of the cell embeddings on the labelled set.
    fn evaluate(&mut self, bar: &ProgressBar) -> anyhow::Result<()> {
        let model = self.model().valid();
        let dev = self.device.clone().inner();
        let v = self.cfg.valid.clone();
        let t = self.cfg.train.clone();
        let mut sum = 0.0;
        let mut count = 0.0;
        let (mut correct, mut classified) = (0.0, 0.0);
        let mut seen = 0usize;
        let loader = Loader::new(
            self.loader_sets(),
            LoaderConfig {
                seed: self.cfg.run.seed,
                batch_size: v.batch_size,
                valid_fraction: self.cfg.data.valid_fraction,
                shuffle_window: 1,
                rank: self.comm.rank(),
                world: self.comm.world(),
                prefetch: 2,
                obs_cols: if t.cls { vec![t.cls_col.clone()] } else { Vec::new() },
            },
        )?;
        let mut opt = self.collate;
        // Fixed draws: every evaluation scores the same masks and splits.
        opt.epoch = u64::MAX;
        opt.draw_seed = self.cfg.run.seed ^ 0x5A11D;
        for (bi, batch) in loader.valid().enumerate() {
            let batch = batch?;
            if v.max_cells > 0 && seen >= v.max_cells {
                break;
            }
            seen += batch.cells.len();
            let cells = to_cells(&batch, &self.set_maps);
            let ratio = gen_ratio_for(opt.draw_seed, bi as u64, &t.gen_ratios);
            if t.objective == "generative" {
                let b = collate_generative(&cells, ratio, &opt);
                let (n, g) = (b.batch, b.gen_len);
                if b.gen_tokens() == 0 {
                    continue;
                }
                let out = model.generative_forward(generative_input(&b, &dev), ForwardFlags::default())?;
                let keep = bools(&b.gen_pad, n, g, &dev).bool_not().float();
                sum += scalar(&masked_sq_sum(out.gen_preds.expect("gen"), floats(&b.gen_target, n, g, &dev), keep));
                count += b.gen_tokens() as f64;
            } else {
                let b = collate_mlm(&cells, t.mask_ratio, &opt);
                let (n, l) = (b.batch, b.len);
                let labels = self.batch_labels(&batch)?;
                let out = model.forward(
                    ModelInput { src: ints(&b.genes, n, l, &dev), values: floats(&b.values, n, l, &dev), src_key_padding_mask: bools(&b.pad, n, l, &dev), batch_labels: None },
                    ForwardFlags { cls: !labels.is_empty(), ..Default::default() },
                )?;
                if let Some(logits) = out.cls_output.clone() {
                    let predicted: Vec<i64> = logits.argmax(1).into_data().convert::<i64>().try_to_vec::<i64>().expect("ints");
                    correct += predicted.iter().zip(&labels).filter(|(p, l)| p == l).count() as f64;
                    classified += labels.len() as f64;
                }
                sum += scalar(&masked_sq_sum(out.mlm_output, floats(&b.target, n, l, &dev), bools(&b.masked, n, l, &dev).float()));
                count += b.masked_tokens() as f64;
            }
        }
        let mut agg = [sum, count, correct, classified];
        self.comm.all_reduce_sum_f64(&mut agg)?;
        let step = self.state.step;
        let mut scalars: Vec<(String, f64)> = Vec::new();
        let mse = (agg[1] > 0.0).then(|| agg[0] / agg[1]);
        if let Some(m) = mse {
            scalars.push(("valid/mse".into(), m));
        }
        if agg[3] > 0.0 {
            scalars.push(("valid/cls_accuracy".into(), agg[2] / agg[3]));
        }
        if self.lead() {
            if let Some(set) = &self.labelled {
                let emb = embed_cells(&model, &set.cells, &self.collate, v.batch_size, &dev)?;
                let knn = knn_accuracy(&emb, &set.labels, v.knn_k);
                let asw = asw_label(&emb, &set.labels);
                scalars.push(("valid/knn_accuracy".into(), knn));
                scalars.push(("valid/asw_label".into(), asw));
            }
            let line = scalars.iter().map(|(k, v)| format!("{k} {v:.4}")).collect::<Vec<_>>().join(", ");
            if bar.is_hidden() {
                eprintln!("step {step}: {line}");
            } else {
                bar.println(format!("step {step}: {line}"));
            }
            self.log(step, &scalars)?;
        }
        if let Some(m) = mse {
            if self.state.best_valid_mse.is_none_or(|b| m < b) {
                self.state.best_valid_mse = Some(m);
                self.state.best_step = Some(step);
                if self.lead() {
                    self.save_best()?;
                }
            }
        }
        Ok(())
    }

    fn loader_sets(&self) -> Vec<ShardSet> {
        self.loader.sets().to_vec()
    }

    fn save_best(&self) -> anyhow::Result<()> {
        let dir = &self.cfg.run.dir;
        let model = self.model();
        scgpt_model::save_native(model, &self.vocab_json, dir.join("best"))?;
        scgpt_model::export_original(model, &model.config, &self.vocab_json, &dir.join("best_model"))?;
        Ok(())
    }

    /// `checkpoints/step-N/{model/, optimizer.bin, state.json}`, written under a temp name and
    /// renamed, then the oldest beyond `keep_last` removed. Rank 0 only; others wait at a
    /// barrier so nobody runs ahead of a checkpoint it might have to resume from.
    pub fn save_checkpoint(&mut self) -> anyhow::Result<()> {
        if self.lead() {
            let root = ckpt_dir(&self.cfg.run.dir);
            std::fs::create_dir_all(&root).with_context(|| format!("{}: cannot create", root.display()))?;
            let name = step_name(self.state.step);
            let final_dir = root.join(&name);
            let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
            if tmp.exists() {
                std::fs::remove_dir_all(&tmp)?;
            }
            std::fs::create_dir_all(&tmp)?;
            scgpt_model::save_native(self.model(), &self.vocab_json, tmp.join("model"))?;
            self.adam.save(&tmp.join("optimizer.bin"))?;
            let state = serde_json::to_string_pretty(&self.state)?;
            scgpt_data::atomic::write_bytes(&tmp.join("state.json"), state.as_bytes())?;
            if final_dir.exists() {
                std::fs::remove_dir_all(&final_dir)?;
            }
            std::fs::rename(&tmp, &final_dir).with_context(|| format!("{}: cannot rename the checkpoint into place", final_dir.display()))?;
            if let Ok(f) = std::fs::File::open(&root) {
                let _ = f.sync_all();
            }
            let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(&root)?
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.strip_prefix("step-").and_then(|s| s.parse().ok()).map(|s| (s, e.path()))
                })
                .collect();
            steps.sort();
            let keep = self.cfg.train.keep_last;
            if steps.len() > keep {
                for (_, p) in &steps[..steps.len() - keep] {
                    std::fs::remove_dir_all(p).with_context(|| format!("{}: cannot remove an old checkpoint", p.display()))?;
                }
            }
            if let Some(tb) = self.tb.as_mut() {
                tb.flush()?;
            }
        }
        self.comm.barrier()?;
        Ok(())
    }
}

/// Unit-norm `<cls>` embeddings of cells, tokenised as `scgpt embed --deterministic` (lowest
/// tied bin, the most expressed genes of long cells).
pub fn embed_cells(model: &TransformerModel, cells: &[Cell], opt: &CollateOptions, batch: usize, dev: &Device) -> anyhow::Result<Vec<Vec<f32>>> {
    use scgpt_data::tokenize::{collate, tokenize, Scratch, TokenizeOptions};
    let topt = TokenizeOptions { max_seq_len: opt.max_seq_len, cls_id: opt.cls_id, pad_value: opt.pad_value, seed: None };
    let mut scratch = Scratch::default();
    let mut out = Vec::with_capacity(cells.len());
    for chunk in cells.chunks(batch.max(1)) {
        let tokens: Vec<_> = chunk.iter().map(|c| tokenize(c.key, &c.genes, &c.values, &topt, &mut scratch)).collect();
        let b = collate(&tokens.iter().collect::<Vec<_>>(), opt.pad_id, opt.pad_value);
        let o = model.forward(
            ModelInput { src: ints(&b.ids, b.b, b.l, dev), values: floats(&b.values, b.b, b.l, dev), src_key_padding_mask: bools(&b.pad, b.b, b.l, dev), batch_labels: None },
            ForwardFlags::default(),
        )?;
        let emb: Vec<f32> = o.cell_emb.into_data().convert::<f32>().try_to_vec::<f32>().expect("floats");
        let d = emb.len() / b.b;
        for row in emb.chunks(d) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            out.push(row.iter().map(|x| x / norm).collect());
        }
    }
    Ok(out)
}

fn load_labelled(cfg: &TrainConfig, vocab: &GeneVocab) -> anyhow::Result<LabelledSet> {
    let dir = Path::new(&cfg.valid.label_set);
    let set = ShardSet::open(dir, 1.0).with_context(|| format!("valid.label_set = {}", dir.display()))?;
    let map = set.vocab.id_map(vocab);
    let mut cells = Vec::new();
    let mut raw_labels = Vec::new();
    'outer: for (path, _) in &set.shards {
        let (names, cols) = scgpt_data::shard::read_shard(path)?;
        let Some(k) = names.iter().position(|n| *n == cfg.valid.label_col) else {
            bail!("valid.label_col = {:?}: not an obs column of {} (it has: {})", cfg.valid.label_col, path.display(), names.join(", "));
        };
        for i in 0..cols.len() {
            if cells.len() >= cfg.valid.label_max_cells {
                break 'outer;
            }
            let (genes, values, _) = cols.cell(i);
            cells.push(map_cell(genes, values, &map, i as u64));
            raw_labels.push(cols.obs[k][i].clone());
        }
    }
    let mut names: Vec<String> = raw_labels.clone();
    names.sort();
    names.dedup();
    let labels = raw_labels.iter().map(|l| names.binary_search(l).expect("present")).collect();
    if names.len() < 2 {
        bail!("valid.label_col = {:?} of {} has {} distinct label(s); kNN/ASW need at least 2", cfg.valid.label_col, dir.display(), names.len());
    }
    Ok(LabelledSet { cells, labels, names })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoder_flops_count_projections_feed_forward_and_scores() {
        let mlm = Collated::Mlm(MlmBatch { batch: 2, len: 10, genes: vec![], values: vec![], target: vec![], pad: vec![], masked: vec![], labels: vec![] });
        // d 4, d_hid 8, 1 layer: 2·(4·16 + 2·32) = 256 per token × 20 tokens, 4·4 per score ×
        // 2·10² scores, × 3 for forward + backward.
        assert_eq!(mlm.encoder_flops(4, 8, 1, true), 3.0 * (20.0 * 256.0 + 200.0 * 16.0));
        let gen = Collated::Generative(GenerativeBatch {
            batch: 1,
            pcpt_len: 3,
            gen_len: 2,
            gen_ratio: 0.5,
            pcpt_genes: vec![],
            pcpt_values: vec![],
            pcpt_pad: vec![],
            gen_genes: vec![],
            gen_target: vec![],
            gen_pad: vec![],
        });
        // 5 tokens; 3² pcpt scores + 2 gen queries × (3 + 1) keys = 17; two passes, 2 layers.
        let one_pass = 5.0 * 256.0 + 17.0 * 16.0;
        assert_eq!(gen.encoder_flops(4, 8, 2, true), 3.0 * 2.0 * 2.0 * one_pass);
        assert_eq!(gen.encoder_flops(4, 8, 2, false), 3.0 * 2.0 * one_pass);
    }
}
