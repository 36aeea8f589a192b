//! Training data over scgpt-prep shard sets: epoch-seeded block shuffling, a cell-level
//! validation split, background prefetching and an exact data position for resuming.
//!
//! The unit of I/O is a Parquet row group (`shard::ROW_GROUP_CELLS` cells): an epoch's order is
//! a seeded permutation of all row groups of all sets (weighted sets repeat or subsample their
//! row groups), and cells are shuffled within a window of consecutive row groups, as block-
//! shuffled samplers (annbatch, scDataset) do, so every read is sequential inside one row group.
//! The order depends only on (seed, epoch), so a run resumed at `DataPosition` sees exactly the
//! cells an uninterrupted run would have seen next.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use parquet::file::reader::{FileReader, SerializedFileReader};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::seed::{mix64, rng_for};
use crate::shard::{read_row_group, CellColumns};
use crate::vocab::GeneVocab;

/// One scgpt-prep output directory.
#[derive(Debug, Clone)]
pub struct ShardSet {
    pub dir: PathBuf,
    pub vocab: GeneVocab,
    /// (shard file, rows per row group).
    pub shards: Vec<(PathBuf, Vec<usize>)>,
    pub weight: f64,
}

impl ShardSet {
    pub fn open(dir: &Path, weight: f64) -> anyhow::Result<Self> {
        let manifest_path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("{}: no manifest; is this an scgpt-prep output directory?", manifest_path.display()))?;
        let manifest: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", manifest_path.display()))?;
        let vocab = GeneVocab::from_file(&dir.join("vocab.json"))?;
        let files = manifest["shards"].as_array().with_context(|| format!("{}: field `shards` missing", manifest_path.display()))?;
        let mut shards = Vec::new();
        for s in files {
            let name = s["file"].as_str().with_context(|| format!("{}: a shard without `file`", manifest_path.display()))?;
            let path = dir.join(name);
            let f = File::open(&path).with_context(|| format!("{}: listed in the manifest but missing", path.display()))?;
            let reader = SerializedFileReader::new(f).with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
            let groups = reader.metadata().row_groups().iter().map(|g| g.num_rows() as usize).collect();
            shards.push((path, groups));
        }
        anyhow::ensure!(weight > 0.0, "{}: weight must be positive", dir.display());
        Ok(ShardSet { dir: dir.to_path_buf(), vocab, shards, weight })
    }

    pub fn cells(&self) -> usize {
        self.shards.iter().flat_map(|(_, g)| g).sum()
    }
}

/// Where a run is in its data: resume from here to continue with the next unseen batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    pub epoch: u64,
    /// Training cells of this epoch already handed out (before rank slicing).
    pub cells_done: u64,
}

/// A row group of one set: the unit of shuffling and reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    set: usize,
    shard: usize,
    group: usize,
    rows: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub seed: u64,
    pub batch_size: usize,
    /// Fraction of cells held out for validation, chosen per cell by a seeded hash.
    pub valid_fraction: f64,
    /// Row groups whose cells are shuffled together.
    pub shuffle_window: usize,
    /// Data-parallel rank and world size: each rank takes every `world`-th batch.
    pub rank: usize,
    pub world: usize,
    /// Batches decoded ahead on the background thread.
    pub prefetch: usize,
    /// Obs columns to carry with each cell (labels for a CLS objective); empty = none.
    pub obs_cols: Vec<String>,
    /// An explicit validation split (a stratified one, say) instead of the hashed
    /// `valid_fraction`: `[set][shard][row]` is true for validation cells.
    pub valid_rows: Option<Arc<ValidRows>>,
    /// Training batches each hold cells of one value of this obs column (an index into
    /// `obs_cols`), as the original's `SubsetsBatchSampler`: within a shuffle window the cells
    /// of each value are shuffled and cut into batches (the last one of a value may be short)
    /// and the batches of all values are shuffled together. `None` = batches mix values.
    pub group_by_obs: Option<usize>,
}

/// Validation membership of every cell, `[set][shard][row in shard]`.
pub type ValidRows = Vec<Vec<Vec<bool>>>;

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            seed: 0,
            batch_size: 32,
            valid_fraction: 0.003,
            shuffle_window: 8,
            rank: 0,
            world: 1,
            prefetch: 4,
            obs_cols: Vec::new(),
            valid_rows: None,
            group_by_obs: None,
        }
    }
}

/// True if the cell at (set, shard, row-in-shard) belongs to the validation split.
fn is_valid_cell(seed: u64, set: usize, shard: usize, row: usize, fraction: f64) -> bool {
    let h = mix64(mix64(seed ^ 0x7A11D) ^ mix64(((set as u64) << 40) ^ ((shard as u64) << 24) ^ row as u64));
    ((h >> 11) as f64 / (1u64 << 53) as f64) < fraction
}

/// A batch of cells with their origin, in the shard layout (vocab ids of each cell's set).
#[derive(Debug, Clone)]
pub struct CellBatch {
    pub cells: CellColumns,
    /// Index of the shard set each cell came from (for vocabulary remapping).
    pub sets: Vec<usize>,
    /// Position after this batch (for checkpoints).
    pub position: DataPosition,
}

pub struct Loader {
    sets: Arc<Vec<ShardSet>>,
    cfg: LoaderConfig,
}

impl Loader {
    pub fn new(sets: Vec<ShardSet>, cfg: LoaderConfig) -> anyhow::Result<Self> {
        if sets.is_empty() {
            bail!("no shard sets given");
        }
        anyhow::ensure!(cfg.batch_size > 0 && cfg.world > 0 && cfg.rank < cfg.world, "bad loader config: {cfg:?}");
        Ok(Loader { sets: Arc::new(sets), cfg })
    }

    /// The shard sets read by this loader.
    pub fn sets(&self) -> &[ShardSet] {
        &self.sets
    }

    /// The epoch's row groups in order: a seeded permutation; a set with weight w contributes
    /// floor(w) copies of each of its row groups plus a seeded fraction (w mod 1) of them.
    fn epoch_blocks(&self, epoch: u64) -> Vec<Block> {
        let mut rng = rng_for(self.cfg.seed, 0xB10C, epoch);
        let mut blocks = Vec::new();
        for (si, set) in self.sets.iter().enumerate() {
            let mut own = Vec::new();
            for (shi, (_, groups)) in set.shards.iter().enumerate() {
                for (gi, &rows) in groups.iter().enumerate() {
                    own.push(Block { set: si, shard: shi, group: gi, rows });
                }
            }
            let whole = set.weight.floor() as usize;
            for _ in 0..whole {
                blocks.extend_from_slice(&own);
            }
            let extra = ((set.weight - whole as f64) * own.len() as f64).round() as usize;
            own.shuffle(&mut rng);
            blocks.extend_from_slice(&own[..extra.min(own.len())]);
        }
        blocks.shuffle(&mut rng);
        blocks
    }

    /// Iterate this rank's training batches from `start` to the end of its epoch.
    pub fn train_epoch(&self, start: DataPosition) -> BatchIter {
        let blocks = self.epoch_blocks(start.epoch);
        self.spawn(blocks, Split::Train, start)
    }

    /// Iterate the validation cells once, in storage order (every rank sees its slice).
    pub fn valid(&self) -> BatchIter {
        let mut blocks = Vec::new();
        for (si, set) in self.sets.iter().enumerate() {
            for (shi, (_, groups)) in set.shards.iter().enumerate() {
                for (gi, &rows) in groups.iter().enumerate() {
                    blocks.push(Block { set: si, shard: shi, group: gi, rows });
                }
            }
        }
        self.spawn(blocks, Split::Valid, DataPosition::default())
    }

    fn spawn(&self, blocks: Vec<Block>, split: Split, start: DataPosition) -> BatchIter {
        let (tx, rx) = crossbeam_channel::bounded(self.cfg.prefetch.max(1));
        let sets = self.sets.clone();
        let cfg = self.cfg.clone();
        let handle = std::thread::spawn(move || produce(&sets, &cfg, &blocks, split, start, &tx));
        BatchIter { rx, handle: Some(handle) }
    }
}

/// A window of row groups, as the decoding stage hands it to the batching stage.
enum Window {
    /// Entirely before the resume position: its cells of the split are only counted.
    Skipped(u64),
    /// The window's decoded row groups, and for each cell of the split its (row group, row)
    /// and set: batches copy straight out of the decoded groups.
    Cells { groups: Vec<CellColumns>, cells: Vec<(usize, usize)>, sets: Vec<usize> },
}

/// The rows of `b` that belong to `split` (the split is a hash of the cell's place, so this
/// needs no decoding).
fn split_rows(sets: &[ShardSet], cfg: &LoaderConfig, b: &Block, split: Split) -> impl Iterator<Item = usize> {
    let groups = &sets[b.set].shards[b.shard].1;
    let first_row: usize = groups[..b.group].iter().sum();
    let (seed, fraction, set, shard) = (cfg.seed, cfg.valid_fraction, b.set, b.shard);
    let explicit = cfg.valid_rows.clone();
    (0..b.rows).filter(move |i| {
        let row = first_row + i;
        let valid = match &explicit {
            Some(rows) => rows[set][shard][row],
            None => is_valid_cell(seed, set, shard, row, fraction),
        };
        valid == (split == Split::Valid)
    })
}

/// Decodes a window's row groups in parallel and keeps the cells of `split`.
fn decode_window(sets: &[ShardSet], cfg: &LoaderConfig, chunk: &[Block], split: Split) -> anyhow::Result<Window> {
    let decoded: Vec<anyhow::Result<CellColumns>> =
        chunk.par_iter().map(|b| read_row_group(&sets[b.set].shards[b.shard].0, b.group, &cfg.obs_cols)).collect();
    let mut groups = Vec::with_capacity(chunk.len());
    let mut cells = Vec::new();
    let mut origin = Vec::new();
    for (gi, (b, group)) in chunk.iter().zip(decoded).enumerate() {
        groups.push(group?);
        for i in split_rows(sets, cfg, b, split) {
            cells.push((gi, i));
            origin.push(b.set);
        }
    }
    Ok(Window::Cells { groups, cells, sets: origin })
}

fn produce(
    sets: &[ShardSet],
    cfg: &LoaderConfig,
    blocks: &[Block],
    split: Split,
    start: DataPosition,
    tx: &crossbeam_channel::Sender<anyhow::Result<CellBatch>>,
) {
    let window = if split == Split::Train { cfg.shuffle_window.max(1) } else { 1 };
    // Two stages: one thread decodes window k + 1 (its row groups in parallel) while this one
    // shuffles window k and cuts it into batches. Windows wholly before the resume position
    // are counted from the split hash and never read.
    let (wtx, wrx) = crossbeam_channel::bounded::<anyhow::Result<Window>>(1);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut counted = 0u64;
            for chunk in blocks.chunks(window) {
                let n: u64 = chunk.iter().map(|b| split_rows(sets, cfg, b, split).count() as u64).sum();
                let w = if counted + n <= start.cells_done { Ok(Window::Skipped(n)) } else { decode_window(sets, cfg, chunk, split) };
                counted += n;
                let failed = w.is_err();
                if wtx.send(w).is_err() || failed {
                    return;
                }
            }
        });
        batch_windows(cfg, split, start, wrx, tx);
    });
}

/// The batching stage: shuffles each window's cells and hands out this rank's batches.
fn batch_windows(
    cfg: &LoaderConfig,
    split: Split,
    start: DataPosition,
    windows: crossbeam_channel::Receiver<anyhow::Result<Window>>,
    tx: &crossbeam_channel::Sender<anyhow::Result<CellBatch>>,
) {
    let mut done = 0u64; // cells of the split handed out so far (all ranks)
    let mut batch_index = 0u64;
    let n_obs = cfg.obs_cols.len();
    let mut pending = CellColumns::new(n_obs);
    let mut pending_sets = Vec::new();
    // Hands the pending batch to the rank whose turn it is; false when the receiver is gone.
    let emit = |pending: &mut CellColumns, pending_sets: &mut Vec<usize>, batch_index: &mut u64, done: u64, fresh: CellColumns| {
        let mine = *batch_index % cfg.world as u64 == cfg.rank as u64;
        *batch_index += 1;
        let full = std::mem::replace(pending, fresh);
        let sets_of = std::mem::take(pending_sets);
        !mine
            || tx
                .send(Ok(CellBatch { cells: full, sets: sets_of, position: DataPosition { epoch: start.epoch, cells_done: done } }))
                .is_ok()
    };
    for (wi, w) in windows.into_iter().enumerate() {
        let (groups, cells, origin) = match w {
            Ok(Window::Skipped(n)) => {
                done += n;
                continue;
            }
            Ok(Window::Cells { groups, cells, sets }) => (groups, cells, sets),
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        // Batches are sized from the window's mean cell length, so assembling one never regrows.
        let per_cell = groups.iter().map(|g| g.genes.len()).sum::<usize>() / groups.iter().map(CellColumns::len).sum::<usize>().max(1);
        let fresh = || CellColumns::with_capacity(n_obs, cfg.batch_size, cfg.batch_size * (per_cell + per_cell / 4));
        if pending.is_empty() {
            pending = fresh();
        }
        let mut order: Vec<usize> = (0..cells.len()).collect();
        if split == Split::Train {
            order.shuffle(&mut rng_for(cfg.seed, 0x5EF1 ^ start.epoch, wi as u64));
        }
        // Runs of cells that end a batch where they end (one run, that never does, unless
        // batches are grouped by an obs value).
        let runs: Vec<Vec<usize>> = match (split, cfg.group_by_obs) {
            (Split::Train, Some(col)) => {
                let value = |i: usize| {
                    let (g, row) = cells[i];
                    groups[g].obs[col][row].as_str()
                };
                grouped_batches(&order, value, cfg.batch_size, &mut rng_for(cfg.seed, 0x6B0B ^ start.epoch, wi as u64))
            }
            _ => vec![order],
        };
        let grouped = cfg.group_by_obs.is_some() && split == Split::Train;
        for run in runs {
            for i in run {
                let skip = done < start.cells_done;
                done += 1;
                if skip {
                    continue;
                }
                let (g, row) = cells[i];
                pending.push_from(&groups[g], row);
                pending_sets.push(origin[i]);
                if pending.len() == cfg.batch_size && !emit(&mut pending, &mut pending_sets, &mut batch_index, done, fresh()) {
                    return;
                }
            }
            if grouped && !pending.is_empty() && !emit(&mut pending, &mut pending_sets, &mut batch_index, done, fresh()) {
                return;
            }
        }
    }
    // The last partial batch goes to the rank whose turn it is (DistributedSampler would pad).
    if !pending.is_empty() && batch_index % cfg.world as u64 == cfg.rank as u64 {
        let position = DataPosition { epoch: start.epoch, cells_done: done };
        let _ = tx.send(Ok(CellBatch { cells: pending, sets: pending_sets, position }));
    }
}

/// `order` cut into batches of one value each: the cells of each value in `order`'s order, cut
/// into `batch` cells (the last of a value may be short), the batches of all values shuffled.
fn grouped_batches<'a>(order: &[usize], value: impl Fn(usize) -> &'a str, batch: usize, rng: &mut impl rand::Rng) -> Vec<Vec<usize>> {
    let mut by_value: Vec<(&str, Vec<usize>)> = Vec::new();
    for &i in order {
        let v = value(i);
        match by_value.iter_mut().find(|(k, _)| *k == v) {
            Some((_, cells)) => cells.push(i),
            None => by_value.push((v, vec![i])),
        }
    }
    let mut batches: Vec<Vec<usize>> =
        by_value.into_iter().flat_map(|(_, cells)| cells.chunks(batch).map(<[usize]>::to_vec).collect::<Vec<_>>()).collect();
    batches.shuffle(rng);
    batches
}

pub struct BatchIter {
    rx: crossbeam_channel::Receiver<anyhow::Result<CellBatch>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Iterator for BatchIter {
    type Item = anyhow::Result<CellBatch>;
    fn next(&mut self) -> Option<Self::Item> {
        match self.rx.recv() {
            Ok(b) => Some(b),
            Err(_) => {
                if let Some(h) = self.handle.take() {
                    if h.join().is_err() {
                        return Some(Err(anyhow::anyhow!("data loader thread panicked")));
                    }
                }
                None
            }
        }
    }
}
