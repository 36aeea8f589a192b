//! The training loop, written once for every task: data → the task's collation → forward and
//! the task's loss → backward → gradient sync → global-norm clip → Adam → schedule, with
//! checkpoints and exact resume (`checkpoint.rs`), validation (`validation.rs`) and metric
//! logging (`logging.rs`). One process per rank; rank 0 alone prints, logs and writes.
//!
//! Losses are normalised by the units of the whole optimiser step (all micro-batches, all
//! ranks; see `tasks`), so a step's gradient is the same whether its cells run in one batch,
//! in micro-batches or on several ranks (the original averages per-rank means, which weights
//! ranks with few targets more).

use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use scgpt_data::loader::{BatchIter, CellBatch, DataPosition, Loader, LoaderConfig, ShardSet, ValidRows};
use scgpt_data::seed::{hash_str, mix64};
use scgpt_data::vocab::GeneVocab;
use scgpt_dist::Collective;
use scgpt_model::burn::optim::{GradientsAccumulator, GradientsParams};
use scgpt_model::burn::tensor::{Device, Tensor};
use scgpt_model::TransformerModel;

use crate::model::EngineModel;

pub use crate::checkpoint::{latest_checkpoint, TrainState};
use crate::collate::{Cell, CollateOptions};
use crate::config::{OptimizerKind, Schedule, TrainConfig};
use crate::logging::{rss_bytes, Interval, MetricLog, StepLosses};
use crate::optim::{clip_coefficient, grad_sq_norm, list_params, lr_at, Adam, AdamConfig, ParamEntry};
use crate::tasks::labels::{Classes, BATCH_LABELS_FILE};
use crate::tasks::{Batch, LossContext, MicroBatch, Task};
use crate::validation::{load_labelled, LabelledSet};

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    Finished {
        steps: u64,
    },
    /// SIGTERM / SIGINT: a checkpoint was written first.
    Interrupted {
        steps: u64,
        signal: i32,
    },
}

/// The training loop over the model `M` of its task: `Trainer` (the `TransformerModel`) for
/// pretraining, annotation and integration; `Trainer::<TransformerGenerator>::with_tasks` for
/// a task on the perturbation model.
pub struct Trainer<M: EngineModel = TransformerModel> {
    pub(crate) cfg: TrainConfig,
    pub(crate) device: Device,
    model: Option<M>,
    pub(crate) vocab_json: String,
    pub(crate) task: Box<dyn Task<M>>,
    /// Batch labels to ids (`data.batch_col`), when the model reads them.
    pub(crate) batch_map: Option<Classes>,
    /// How many of a loader batch's obs columns are the task's (the batch column follows).
    task_obs: usize,
    set_maps: Vec<Vec<Option<u32>>>,
    /// The data's genes in model ids (the tokens of every cell with `include_zero_gene`).
    pub(crate) genes: Vec<u32>,
    /// The genes inference restricts new data to (`scgpt.json`): the token genes of an
    /// `include_zero_gene` run, else the `[preprocess]` selection; `None` = every gene.
    pub(crate) spec_genes: Option<Vec<String>>,
    pub(crate) selection: Option<crate::preprocess::GeneSelection>,
    loader: Loader,
    /// The sets validation reads: a separate set, or the training sets (their held-out cells).
    pub(crate) valid_sets: Vec<ShardSet>,
    pub(crate) valid_maps: Vec<Vec<Option<u32>>>,
    separate_valid: bool,
    valid_rows: Option<Arc<ValidRows>>,
    pub(crate) adam: Adam,
    params: Vec<ParamEntry>,
    /// Parameters `train.freeze` keeps fixed.
    frozen: Vec<ParamEntry>,
    pub(crate) comm: Box<dyn Collective>,
    pub state: TrainState,
    pub(crate) log: MetricLog,
    pub(crate) labelled: Option<LabelledSet>,
    total_steps: u64,
    pub(crate) collate: CollateOptions,
    /// The signal (SIGTERM / SIGINT) that asked the run to stop, 0 if none.
    stop_signal: Arc<AtomicI32>,
    quiet: bool,
}

/// A stored cell in the model's vocabulary: genes the model lacks and zero values dropped.
pub(crate) fn map_cell(genes: &[i32], values: &[f32], map: &[Option<u32>], key: u64) -> Cell {
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

pub(crate) fn to_cells(batch: &CellBatch, maps: &[Vec<Option<u32>>]) -> Vec<Cell> {
    let n = batch.cells.len();
    let first = batch.position.cells_done - n as u64;
    (0..n)
        .map(|i| {
            let (genes, values, _) = batch.cells.cell(i);
            map_cell(genes, values, &maps[batch.sets[i]], first + i as u64)
        })
        .collect()
}

/// The files a run keeps beside its model (run directory and `best_model/`).
pub(crate) fn run_files<M>(task: &dyn Task<M>, batch_map: Option<&Classes>) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut files = task.run_files()?;
    if let Some(m) = batch_map {
        files.push((BATCH_LABELS_FILE.to_string(), m.to_json()?));
    }
    Ok(files)
}

/// Data set vocabularies to model ids, with a note per set; a set sharing no gene is an error.
fn vocab_maps(sets: &[ShardSet], vocab: &GeneVocab, notes: &mut Vec<String>) -> anyhow::Result<Vec<Vec<Option<u32>>>> {
    let maps: Vec<Vec<Option<u32>>> = sets.iter().map(|s| s.vocab.id_map(vocab)).collect();
    for (s, m) in sets.iter().zip(&maps) {
        let genes = s.vocab.tokens().iter().filter(|t| s.vocab.is_gene(t)).count();
        let matched = m.iter().filter(|x| x.is_some()).count();
        if matched == 0 {
            bail!(
                "{}: none of its {genes} genes is in the model vocabulary; is init_from the right checkpoint for this data?",
                s.dir.display()
            );
        }
        notes.push(format!(
            "data: {} ({} cells, weight {}), {matched} of {genes} genes in the model vocabulary",
            s.dir.display(),
            s.cells(),
            s.weight
        ));
    }
    Ok(maps)
}

/// Parameters whose module path starts with one of `prefixes` (a prefix matches whole path
/// components: "encoder" is not "encoder2").
fn matching(params: &[ParamEntry], prefixes: &[String]) -> Vec<ParamEntry> {
    params.iter().filter(|p| prefixes.iter().any(|f| p.path == *f || p.path.starts_with(&format!("{f}.")))).cloned().collect()
}

/// Builds a run's task from its config, the data sets it scans (training first), the run
/// directory and whether the run resumes.
pub type TaskBuilder<M> = fn(&TrainConfig, &[ShardSet], &Path, bool) -> anyhow::Result<Box<dyn Task<M>>>;

impl Trainer<TransformerModel> {
    /// Sets up a run of the `TransformerModel`'s tasks (`task.kind`): see [`Self::with_tasks`].
    pub fn new(cfg: TrainConfig, comm: Box<dyn Collective>) -> anyhow::Result<Self> {
        Self::with_tasks(cfg, comm, crate::tasks::build)
    }
}

impl Trainer<scgpt_model::TransformerGenerator> {
    /// Sets up a perturbation run (`task.kind = "perturbation"`) on the perturbation model.
    pub fn perturbation(cfg: TrainConfig, comm: Box<dyn Collective>) -> anyhow::Result<Self> {
        Self::with_tasks(cfg, comm, crate::tasks::perturbation::build)
    }
}

impl<M: EngineModel> Trainer<M> {
    /// Sets up a run: data (shard sets, or h5ad prepared into the run directory), the task
    /// (`build`), the model (fresh, `init_from`, or resumed from the run directory),
    /// optimiser state, logs. `comm` is the rank's collective (Single for one process).
    pub fn with_tasks(cfg: TrainConfig, mut comm: Box<dyn Collective>, build: TaskBuilder<M>) -> anyhow::Result<Self> {
        cfg.validate()?;
        let rank = comm.rank();
        let world = comm.world();
        let lead = rank == 0;
        let local_rank = scgpt_dist::RankInfo::from_env().map(|i| i.local_rank).unwrap_or(0);
        let mut plain = crate::device::select(&cfg.run.device, local_rank).context("run.device")?;
        crate::device::configure_precision(&mut plain, cfg.train.precision.as_str())?;
        let device = plain.autodiff();
        device.seed(mix64(cfg.run.seed ^ 0x1417));

        let data = crate::data::open(&cfg, comm.as_mut(), lead)?;
        let mut notes = data.notes;
        let sets = data.train;
        let total_cells: usize = sets.iter().map(|s| (s.cells() as f64 * s.weight).round() as usize).sum();
        if total_cells == 0 {
            bail!("the training data hold no cells");
        }
        let resume = if cfg.run.no_resume { None } else { latest_checkpoint(&cfg.run.dir) };
        let mut scan_sets = sets.clone();
        scan_sets.extend(data.valid.iter().flatten().cloned());
        let mut task = build(&cfg, &scan_sets, &cfg.run.dir, resume.is_some())?;
        if let Some(c) = task.classes() {
            notes.push(format!(
                "classes: {} of `{}` ({})",
                c.len(),
                cfg.task.label_col,
                c.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let n_cls = task.classes().map_or(1, <[String]>::len);
        let batch_map = if cfg.needs_batch_labels() {
            let saved = if resume.is_some() { Classes::load_file(&cfg.run.dir.join(BATCH_LABELS_FILE))? } else { None };
            let map = match saved {
                Some(m) => m,
                None => Classes::scan(&scan_sets, &cfg.data.batch_col, "data.batch_col")?.0,
            };
            if map.len() < task.min_batch_labels() {
                bail!(
                    "data.batch_col = {:?} has {} value(s) ({}) in the data; the {} task needs at least {} batches (nothing to integrate otherwise)",
                    cfg.data.batch_col,
                    map.len(),
                    map.names.join(", "),
                    task.kind(),
                    task.min_batch_labels()
                );
            }
            notes.push(format!(
                "batch labels: {} of `{}` ({})",
                map.len(),
                cfg.data.batch_col,
                map.names.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
            ));
            Some(map)
        } else {
            None
        };
        let data_vocabs: Vec<&GeneVocab> = sets.iter().map(|s| &s.vocab).collect();
        let shape = crate::init::Shape {
            n_cls,
            generative: task.generative_model(),
            heads: task.heads(),
            n_batches: batch_map.as_ref().map(Classes::len),
        };
        let (model, vocab, adam, state) = match &resume {
            Some((step, dir)) => {
                let (model, vocab_json) =
                    M::load_native(&dir.join("model"), &device).with_context(|| format!("resuming from {}", dir.display()))?;
                let vocab = GeneVocab::from_json_str(&vocab_json, "checkpoint vocab.json")?;
                let text = std::fs::read_to_string(dir.join("state.json"))?;
                let state: TrainState = serde_json::from_str(&text).with_context(|| format!("{}: state.json", dir.display()))?;
                if model.n_cls() != n_cls {
                    bail!("{}: the checkpoint's classifier has {} classes, the run's labels {n_cls}; start a new run.dir for another label set", dir.display(), model.n_cls());
                }
                let params = list_params(&model)?;
                let adam = Adam::load(&dir.join("optimizer.bin"), &params, &device.clone().inner())?;
                notes.push(format!(
                    "resuming from {} (step {step}, epoch {}, {} cells into it)",
                    dir.display(),
                    state.position.epoch,
                    state.position.cells_done
                ));
                (model, vocab, adam, state)
            }
            None => {
                let init = M::init(&cfg, &data_vocabs, shape, &device)?;
                notes.extend(init.notes);
                let t = &cfg.train;
                let adam = Adam::new(AdamConfig {
                    lr: t.lr,
                    beta1: t.betas[0],
                    beta2: t.betas[1],
                    eps: t.eps,
                    weight_decay: t.weight_decay,
                    decoupled: t.optimizer == OptimizerKind::AdamW,
                });
                (init.model, init.vocab, adam, TrainState::default())
            }
        };
        let model = crate::precision::masters(model.with_attention(cfg.run.attention_mode()), cfg.train.precision);
        if cfg.run.attention == crate::config::AttentionKind::Blockwise {
            notes.push(format!("attention: blockwise, {} query rows per block", cfg.run.attention_block_rows));
        }
        notes.extend(task.bind_vocab(&vocab)?);
        let set_maps = vocab_maps(&sets, &vocab, &mut notes)?;
        let selection = if cfg.data.input.is_empty() { None } else { crate::preprocess::load(&cfg.run.dir.join("data"))? };
        let genes = if task.include_zero_gene() {
            let g = crate::data::expressed_genes(&sets, &set_maps)?;
            notes.push(format!("tokens: <cls> + all {} genes of the data per cell (include_zero_gene)", g.len()));
            g
        } else {
            Vec::new()
        };
        let (valid_sets, valid_maps, separate_valid) = match data.valid {
            Some(v) => {
                let maps = vocab_maps(&v, &vocab, &mut notes)?;
                (v, maps, true)
            }
            None => (sets.clone(), set_maps.clone(), false),
        };
        let (set_maps, valid_maps) = if task.cells_in_data_ids() {
            // The task reads genes in the data's own ids and maps them itself.
            let identity = |s: &ShardSet| (0..s.vocab.len() as u32).map(Some).collect::<Vec<_>>();
            (sets.iter().map(identity).collect(), valid_sets.iter().map(identity).collect())
        } else {
            (set_maps, valid_maps)
        };
        // A task with labels holds out a validation split stratified by them.
        let labels = task.cell_labels().filter(|_| !separate_valid && cfg.data.valid_fraction > 0.0);
        let valid_rows = if let Some(labels) = labels {
            // The task read the training sets first; the split is over those.
            let (mask, split_notes) = crate::tasks::labels::stratified_split(&labels[..sets.len()], cfg.data.valid_fraction, cfg.run.seed);
            notes.extend(split_notes);
            Some(Arc::new(mask))
        } else {
            None
        };
        let vocab_json = vocab.to_json();
        let params = list_params(&model)?;
        // burn initialises parameters lazily, in order of first use; touching them all now in
        // module order makes the initial values a function of the seed alone (the same with
        // or without data parallelism, whatever runs first).
        let _ = crate::optim::flatten_params(&model, &params);
        let n_params: usize = params.iter().map(ParamEntry::numel).sum();
        notes.push(format!("parameters: {n_params} in {} tensors; rank {rank} of {world}", params.len()));
        notes.extend(crate::plan::Plan::new(crate::plan::PlanInput::from_config(&cfg, n_params)).report(None));
        let frozen = if cfg.model.init_from.is_empty() { Vec::new() } else { matching(&params, &cfg.train.freeze) };
        if !frozen.is_empty() {
            notes.push(format!(
                "frozen: {} parameters in {} tensors ({})",
                frozen.iter().map(ParamEntry::numel).sum::<usize>(),
                frozen.len(),
                cfg.train.freeze.join(", ")
            ));
        }

        let t = &cfg.train;
        let global_batch = (t.batch_size * world * t.grad_accum) as u64;
        let train_cells = match (&valid_rows, separate_valid) {
            (Some(rows), _) => rows.iter().flatten().flatten().filter(|v| !**v).count() as u64,
            (None, true) => total_cells as u64,
            (None, false) => (total_cells as f64 * (1.0 - cfg.data.valid_fraction)).ceil() as u64,
        };
        let steps_per_epoch = train_cells.div_ceil(global_batch).max(1);
        let mut total_steps = if t.epochs > 0 { steps_per_epoch * t.epochs } else { t.max_steps };
        if t.max_steps > 0 {
            total_steps = total_steps.min(t.max_steps);
        }
        notes.push(format!(
            "schedule: {total_steps} steps ({steps_per_epoch} per epoch at a global batch of {global_batch} cells), warmup {}, {}",
            t.warmup_steps, t.schedule
        ));

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

        let mut log = MetricLog::silent();
        let mut labelled = None;
        if lead {
            std::fs::create_dir_all(&cfg.run.dir).with_context(|| format!("run.dir {}: cannot create", cfg.run.dir.display()))?;
            let resolved = toml::to_string_pretty(&cfg)?;
            scgpt_data::atomic::write_bytes(&cfg.run.dir.join("config.resolved.toml"), resolved.as_bytes())?;
            scgpt_data::atomic::write_bytes(&cfg.run.dir.join("vocab.json"), vocab_json.as_bytes())?;
            let args = serde_json::to_string_pretty(&model.args_json())?;
            scgpt_data::atomic::write_bytes(&cfg.run.dir.join("args.json"), args.as_bytes())?;
            for (name, bytes) in run_files(task.as_ref(), batch_map.as_ref())? {
                scgpt_data::atomic::write_bytes(&cfg.run.dir.join(name), &bytes)?;
            }
            log = MetricLog::create(&cfg.run.dir, state.step, &resolved)?;
            // The embedding metrics score pretraining; a fine-tuning task validates itself.
            if task.embedding_metrics() && !cfg.valid.label_set.is_empty() {
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
            // SAFETY: the handler is async-signal-safe (one atomic store, no allocation, no
            // lock), which is what `register` requires.
            unsafe {
                signal_hook::low_level::register(sig, move || s.store(sig, Ordering::SeqCst))?;
            }
        }
        let loader_cfg = Self::loader_config_for(
            &cfg,
            task.as_ref(),
            batch_map.is_some(),
            rank,
            world,
            t.batch_size,
            valid_rows.clone(),
            false,
            separate_valid,
        );
        let loader = Loader::new(sets, loader_cfg)?;
        let spec_genes = if task.include_zero_gene() {
            Some(genes.iter().map(|&g| vocab.tokens()[g as usize].clone()).collect())
        } else {
            selection.as_ref().map(|s| s.genes.clone())
        };
        let mut trainer = Trainer {
            cfg,
            device,
            model: Some(model),
            vocab_json,
            task_obs: task.obs_cols().len(),
            task,
            batch_map,
            set_maps,
            spec_genes,
            selection,
            genes,
            loader,
            valid_sets,
            valid_maps,
            separate_valid,
            valid_rows,
            adam,
            params,
            frozen,
            comm,
            state,
            log,
            labelled,
            total_steps,
            collate,
            stop_signal,
            quiet: false,
        };
        if resume.is_none() && world > 1 {
            trainer.broadcast_parameters()?;
        }
        Ok(trainer)
    }

    #[allow(clippy::too_many_arguments)]
    fn loader_config_for(
        cfg: &TrainConfig,
        task: &dyn Task<M>,
        with_batches: bool,
        rank: usize,
        world: usize,
        batch_size: usize,
        valid_rows: Option<Arc<ValidRows>>,
        for_valid: bool,
        separate_valid: bool,
    ) -> LoaderConfig {
        let (valid_fraction, valid_rows) = match (for_valid, separate_valid) {
            // A separate validation set is all validation; the training sets hold none of it.
            (true, true) => (1.0, None),
            (false, true) => (0.0, None),
            _ => (cfg.data.valid_fraction, valid_rows),
        };
        LoaderConfig {
            seed: cfg.run.seed,
            batch_size,
            valid_fraction,
            shuffle_window: if for_valid { 1 } else { cfg.data.shuffle_window },
            rank,
            world,
            prefetch: if for_valid { 2 } else { cfg.data.prefetch },
            obs_cols: task.obs_cols().into_iter().chain(with_batches.then(|| cfg.data.batch_col.clone())).collect(),
            valid_rows,
            // The batch column follows the task's columns.
            group_by_obs: (with_batches && cfg.data.single_batch_minibatches && !for_valid).then(|| task.obs_cols().len()),
        }
    }

    /// The task's obs columns and the cells' batch-label ids of a loader batch.
    pub(crate) fn split_obs<'a>(&self, obs: &'a [Vec<String>]) -> anyhow::Result<(&'a [Vec<String>], Option<Vec<i64>>)> {
        let n = self.task_obs;
        let ids = match &self.batch_map {
            Some(map) => Some(map.ids(&obs[n], &format!("data.batch_col = {:?}", self.cfg.data.batch_col))?),
            None => None,
        };
        Ok((&obs[..n], ids))
    }

    /// The loader settings of this run, for training batches or validation.
    pub(crate) fn loader_config(&self, batch_size: usize, for_valid: bool) -> LoaderConfig {
        Self::loader_config_for(
            &self.cfg,
            self.task.as_ref(),
            self.batch_map.is_some(),
            self.comm.rank(),
            self.comm.world(),
            batch_size,
            self.valid_rows.clone(),
            for_valid,
            self.separate_valid,
        )
    }

    /// No progress bar: log lines instead (tests, batch jobs).
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    pub fn model(&self) -> &M {
        self.model.as_ref().expect("model present between steps")
    }

    pub fn total_steps(&self) -> u64 {
        self.total_steps
    }

    /// The value `<cls>` carries in this run's input.
    pub(crate) fn cls_value(&self) -> f32 {
        self.task.cls_value().unwrap_or(self.collate.pad_value)
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

    pub(crate) fn lead(&self) -> bool {
        self.comm.rank() == 0
    }

    /// The learning rate of `step`: warmup, then cosine, constant, or the per-epoch step decay.
    fn lr(&self, step: u64) -> f64 {
        let t = &self.cfg.train;
        let base = lr_at(t.lr, step, t.warmup_steps, self.total_steps, t.schedule == Schedule::Cosine);
        match t.schedule {
            Schedule::Step => base * t.gamma.powi(self.state.position.epoch.min(i32::MAX as u64) as i32),
            _ => base,
        }
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
        let mut interval = Interval::default();
        let mut clock = Instant::now();
        let mut consecutive_skips = 0u32;
        let mut epoch_done = false;
        while self.state.step < self.total_steps {
            // Gather the step's micro-batches; an epoch ends for all ranks when any runs dry.
            let mut micro: Vec<(Box<dyn MicroBatch>, DataPosition, usize)> = Vec::new();
            let step = self.state.step;
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
                        let (obs, ids) = self.split_obs(&batch.cells.obs)?;
                        let prepared =
                            self.task.prepare(&Batch { cells: &cells, obs, batch_ids: ids.as_deref(), genes: &self.genes }, step, &opt)?;
                        micro.push((prepared, batch.position, cells.len()));
                    }
                    None => epoch_done = true,
                }
            }
            // One all-reduce per step carries "this rank has a full step" and "this rank was
            // asked to stop": a signal that reaches one rank stops every rank at the same step
            // with one checkpoint, instead of leaving the others waiting in another collective.
            let signal = self.stop_signal.load(Ordering::SeqCst);
            let mut have = [if micro.len() == t.grad_accum { 1.0 } else { 0.0 }, f64::from(u8::from(signal != 0)), f64::from(signal)];
            self.comm.all_reduce_sum_f64(&mut have)?;
            if have[1] > 0.0 || stop_at == Some(self.state.step) {
                // A rank that saw no signal itself reports its peers' (the same one, normally).
                let signal = if signal != 0 || have[1] == 0.0 { signal } else { (have[2] / have[1]).round() as i32 };
                self.save_checkpoint()?;
                bar.abandon_with_message(format!("signal {signal}: checkpoint written at step {}", self.state.step));
                return Ok(RunEnd::Interrupted { steps: self.state.step, signal });
            }
            if have[0] < self.comm.world() as f64 {
                // End of epoch: the remainder that does not fill a step on every rank is dropped.
                iter = None;
                epoch_done = false;
                if t.eval_each_epoch && self.state.last_epoch_validated != Some(self.state.position.epoch) {
                    let pause = Instant::now();
                    let stop = self.evaluate(&bar, true)?;
                    clock += pause.elapsed();
                    if stop {
                        if lead {
                            bar.println(format!(
                                "early stop: {} epoch-end validations without improvement",
                                self.state.epochs_without_improvement
                            ));
                        }
                        break;
                    }
                }
                let next = self.state.position.epoch + 1;
                if self.cfg.train.epochs > 0 && next >= self.cfg.train.epochs {
                    break;
                }
                self.state.position = DataPosition { epoch: next, cells_done: 0 };
                continue;
            }
            let local_units: usize = micro.iter().map(|(c, _, _)| c.units()).sum();
            let mut units = [local_units as f64];
            self.comm.all_reduce_sum_f64(&mut units)?;
            if units[0] == 0.0 {
                bail!("step {step}: no target tokens in the whole batch (cells with a single gene?)");
            }
            let lr = self.lr(step);
            let (losses, norm, comm_s, skipped) = self.optimizer_step(&micro, units[0], lr, step)?;
            self.state.step += 1;
            self.state.position = self.global_position(micro.last().expect("micro-batches").1)?;
            let world = self.comm.world();
            let cells: usize = micro.iter().map(|(_, _, n)| n).sum();
            self.state.cells_seen += (cells * world) as u64;
            interval.cells += (cells * world) as u64;
            interval.tokens += (micro.iter().map(|(c, _, _)| c.input_tokens()).sum::<usize>() * world) as u64;
            let shape = self.model().shape();
            interval.flops += micro.iter().map(|(c, _, _)| c.encoder_flops(shape)).sum::<f64>() * world as f64;
            interval.comm_s += comm_s;
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
                interval.grad_norm += norm;
                interval.add_losses(&losses);
                interval.steps += 1;
            }
            let s = self.state.step;
            if s.is_multiple_of(t.log_every) || s == self.total_steps {
                self.log_interval(&interval, clock.elapsed().as_secs_f64().max(1e-9), lr, &bar)?;
                interval = Interval::default();
                clock = Instant::now();
            }
            let last = s == self.total_steps;
            if s.is_multiple_of(t.eval_every) || last {
                let pause = Instant::now();
                // The last step of the last epoch is that epoch's end.
                let epoch_end = last && t.eval_each_epoch;
                let stop = self.evaluate(&bar, epoch_end)?;
                // Validation time is not training throughput.
                clock += pause.elapsed();
                if stop {
                    break;
                }
            }
            if s.is_multiple_of(t.save_every) || last {
                self.save_checkpoint()?;
            }
        }
        if latest_checkpoint(&self.cfg.run.dir).map(|(s, _)| s) != Some(self.state.step) {
            self.save_checkpoint()?;
        }
        bar.finish_with_message(format!("done: {} steps", self.state.step));
        Ok(RunEnd::Finished { steps: self.state.step })
    }

    fn log_interval(&mut self, interval: &Interval, secs: f64, lr: f64, bar: &ProgressBar) -> anyhow::Result<()> {
        let (mut scalars, loss_total) = interval.loss_scalars(self.task.terms());
        scalars.push(("train/lr".into(), lr));
        scalars.push(("train/grad_norm".into(), interval.grad_norm / interval.steps.max(1) as f64));
        scalars.push(("train/cells_per_s".into(), interval.cells as f64 / secs));
        scalars.push(("train/tokens_per_s".into(), interval.tokens as f64 / secs));
        scalars.push(("train/model_tflops".into(), interval.flops / secs / 1e12));
        scalars.push(("train/comm_share".into(), interval.comm_s / secs));
        scalars.push(("train/epoch".into(), self.state.position.epoch as f64));
        if let Some(rss) = rss_bytes() {
            scalars.push(("system/rss_mb".into(), rss as f64 / 1e6));
        }
        if self.lead() {
            let first = self.task.terms()[0].name;
            let first_value = scalars.iter().find(|(k, _)| *k == format!("train/loss_{first}")).map_or(0.0, |(_, v)| *v);
            let msg = format!(
                "loss {loss_total:.4} ({first} {first_value:.4}) lr {lr:.2e} | {:.1} cells/s, {:.3} TFLOP/s",
                interval.cells as f64 / secs,
                interval.flops / secs / 1e12
            );
            bar.set_message(msg.clone());
            if bar.is_hidden() {
                eprintln!("step {}/{}: {msg}", self.state.step, self.total_steps);
            }
            self.log.write(self.state.step, &scalars)?;
        }
        Ok(())
    }

    /// Forward + backward over the micro-batches, sync, clip, update. Returns the loss sums,
    /// the global gradient norm, the seconds spent communicating and whether the update was
    /// skipped (non-finite norm).
    fn optimizer_step(
        &mut self,
        micro: &[(Box<dyn MicroBatch>, DataPosition, usize)],
        units: f64,
        lr: f64,
        step: u64,
    ) -> anyhow::Result<(StepLosses, f64, f64, bool)> {
        let world = self.comm.world() as f64;
        let accum = micro.len() as f64;
        let n_terms = self.task.terms().len();
        let mut model = self.model.take().expect("model");
        let compute = crate::precision::compute(&model, self.cfg.train.precision);
        let mut acc = GradientsAccumulator::<M>::new();
        let mut losses = StepLosses { sums: vec![0.0; n_terms], present: vec![false; n_terms], ..Default::default() };
        let mut terms: Vec<Option<Tensor<1>>> = vec![None; n_terms];
        for (mi, (batch, _, _)) in micro.iter().enumerate() {
            // Dropout draws: fixed by (seed, step, micro-batch, rank), so a resume replays them.
            self.device
                .seed(mix64(self.cfg.run.seed ^ mix64(step) ^ mix64((mi as u64) << 20 | self.comm.rank() as u64) ^ hash_str("dropout")));
            let mut ctx = LossContext { device: &self.device, comm: self.comm.as_mut(), per_unit: world / units, per_batch: 1.0 / accum };
            let loss = self.task.loss(&compute, batch.as_ref(), &mut ctx)?;
            for (k, (acc, term)) in terms.iter_mut().zip(loss.terms).enumerate() {
                losses.present[k] |= term.is_some();
                *acc = match (acc.take(), term) {
                    (Some(a), Some(t)) => Some(a + t),
                    (a, t) => a.or(t),
                };
            }
            losses.units += batch.units() as f64;
            losses.batches += 1.0;
            let grads = GradientsParams::from_grads(loss.total.backward(), &model);
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
        crate::optim::drop_grads(&mut grads, &self.frozen);
        let mut comm_s = 0.0;
        if self.comm.world() > 1 {
            let c = Instant::now();
            crate::grad_sync::all_reduce_mean(&mut grads, &self.params, self.comm.as_mut(), &self.device.clone().inner())?;
            crate::optim::drop_grads(&mut grads, &self.frozen);
            let present: Vec<f64> = losses.present.iter().map(|p| if *p { 1.0 } else { 0.0 }).collect();
            let mut l: Vec<f64> = losses.sums.iter().copied().chain(present).chain([losses.units, losses.batches]).collect();
            self.comm.all_reduce_sum_f64(&mut l)?;
            losses.sums.copy_from_slice(&l[..n_terms]);
            for (p, v) in losses.present.iter_mut().zip(&l[n_terms..2 * n_terms]) {
                *p = *v > 0.0;
            }
            (losses.units, losses.batches) = (l[2 * n_terms], l[2 * n_terms + 1]);
            comm_s = c.elapsed().as_secs_f64();
        }
        let norm = grad_sq_norm(&grads, &self.params).sqrt();
        if !norm.is_finite() {
            self.model = Some(model);
            return Ok((losses, norm, comm_s, true));
        }
        let coef = clip_coefficient(norm, self.cfg.train.clip_norm);
        model = self.adam.step(model, grads, lr, coef);
        self.model = Some(model);
        Ok((losses, norm, comm_s, false))
    }
}
