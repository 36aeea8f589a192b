//! Cells in: an h5ad file (read in row blocks) or an scgpt-prep shard directory (Parquet files
//! streamed in record batches). Both hand out blocks of cells already reduced to the model's
//! vocabulary: per cell the nonzero genes that are in it, as model vocab ids, in input column
//! order, with their values checked (finite, not negative).

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use arrow_array::{Array, Float32Array, Int32Array, ListArray, RecordBatch, StringArray};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;
use scgpt_data::h5ad::{H5adReader, MatrixChoice};
use scgpt_data::vocab::{looks_like_ensembl, match_genes, EnsemblTable, GeneVocab, SPECIAL_TOKENS};

/// Consecutive cells in CSR form (model vocab ids).
#[derive(Debug, Default)]
pub struct Block {
    /// Global index of the first cell.
    pub start: usize,
    pub offsets: Vec<usize>,
    pub genes: Vec<u32>,
    pub values: Vec<f32>,
    pub cell_ids: Vec<String>,
    /// Source dataset per cell (shard input only).
    pub datasets: Option<Vec<String>>,
}

impl Block {
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }
    pub fn cell(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        (&self.genes[a..b], &self.values[a..b])
    }
}

/// How the input's genes met the model vocabulary.
#[derive(Debug, Clone)]
pub struct GeneReport {
    pub what: String,
    pub total: usize,
    pub matched: usize,
    pub via_ensembl: usize,
}

pub enum Source {
    H5ad(H5adSource),
    Shards(ShardSource),
}

impl Source {
    pub fn n_cells(&self) -> usize {
        match self {
            Source::H5ad(s) => s.reader.n_obs(),
            Source::Shards(s) => s.n_cells,
        }
    }
    pub fn genes(&self) -> &GeneReport {
        match self {
            Source::H5ad(s) => &s.report,
            Source::Shards(s) => &s.report,
        }
    }
    pub fn next_block(&mut self, max_cells: usize) -> anyhow::Result<Option<Block>> {
        match self {
            Source::H5ad(s) => s.next_block(max_cells),
            Source::Shards(s) => s.next_block(max_cells),
        }
    }
    pub fn is_shards(&self) -> bool {
        matches!(self, Source::Shards(_))
    }
}

fn check_value(v: f32) -> Result<(), &'static str> {
    if !v.is_finite() {
        Err("is not finite")
    } else if v < 0.0 {
        Err("is negative")
    } else {
        Ok(())
    }
}

const VALUE_HINT: &str = "expression values must be finite and non-negative (raw counts or \
                          log-normalised data; scaled or centred matrices cannot be binned)";

// ---------------------------------------------------------------------------------------------
// h5ad

pub struct H5adSource {
    path: PathBuf,
    reader: H5adReader,
    gene_names: Vec<String>,
    ids: Vec<Option<u32>>,
    cell_ids: Vec<String>,
    pos: usize,
    report: GeneReport,
    /// X is read and the file also has raw/X (for the hint on bad values).
    has_raw: bool,
}

/// The var columns of an h5ad (for the hint when genes do not match).
fn var_columns(path: &Path) -> Vec<String> {
    let Ok(file) = hdf5::File::open(path) else {
        return Vec::new();
    };
    let Ok(var) = file.group("var") else {
        return Vec::new();
    };
    let index = var
        .attr("_index")
        .ok()
        .and_then(|a| a.read_scalar::<hdf5::types::VarLenUnicode>().ok())
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|| "_index".into());
    let mut cols: Vec<String> = var.member_names().unwrap_or_default().into_iter().filter(|n| *n != index && n != "__categories").collect();
    cols.sort();
    cols
}

impl H5adSource {
    pub fn open(
        path: &Path,
        matrix: MatrixChoice,
        gene_col: Option<&str>,
        vocab: &GeneVocab,
        vocab_path: &Path,
        min_match: f64,
    ) -> anyhow::Result<Self> {
        let reader = H5adReader::open(path, matrix)?;
        let gene_names = reader.var_names(gene_col)?;
        let cell_ids = reader.obs_names()?;
        let ensembl = gene_names.iter().any(|g| looks_like_ensembl(g)).then(EnsemblTable::human);
        let m = match_genes(&gene_names, vocab, ensembl.as_ref());
        let source = match gene_col {
            Some(c) => format!("var column `{c}`"),
            None => "the var index".to_string(),
        };
        let report = GeneReport {
            what: format!("genes in {source} ({})", reader.matrix_path()),
            total: gene_names.len(),
            matched: m.matched(),
            via_ensembl: m.by_ensembl,
        };
        if report.total == 0 || (report.matched as f64) < min_match * report.total as f64 || report.matched == 0 {
            let unmatched: Vec<&str> =
                gene_names.iter().zip(&m.ids).filter(|(_, id)| id.is_none()).take(5).map(|(g, _)| g.as_str()).collect();
            let cols = var_columns(path);
            let mut hint = String::new();
            if m.ensembl_like * 2 > gene_names.len() {
                hint.push_str(
                    "the names look like Ensembl ids, and the shipped Ensembl-to-symbol table does not \
                     bridge them to this vocabulary (another species, or ids the table lacks); ",
                );
            }
            let symbol_col = ["feature_name", "gene_symbols", "gene_symbol", "gene_name", "symbol"]
                .into_iter()
                .find(|c| cols.iter().any(|x| x == c) && Some(*c) != gene_col);
            match symbol_col {
                Some(c) => hint.push_str(&format!("fix: --gene-col {c} (the var column with gene symbols)")),
                None => hint.push_str(&format!(
                    "fix: pass --gene-col with the var column that holds gene symbols (var columns: [{}])",
                    cols.join(", ")
                )),
            }
            if report.matched > 0 {
                hint.push_str("; or lower --min-gene-match to embed anyway");
            }
            bail!(
                "{}: only {} of {} genes in {source} match the model vocabulary {} (minimum {:.0}%; \
                 unmatched, e.g.: {:?}); {hint}",
                path.display(),
                report.matched,
                report.total,
                vocab_path.display(),
                min_match * 100.0,
                unmatched,
            );
        }
        let has_raw = reader.matrix_path() == "X"
            && hdf5::File::open(path).map(|f| f.link_exists("raw") && (f.link_exists("raw/X") || f.link_exists("raw.X"))).unwrap_or(false);
        Ok(H5adSource { has_raw, path: path.to_path_buf(), reader, gene_names, ids: m.ids, cell_ids, pos: 0, report })
    }

    fn next_block(&mut self, max_cells: usize) -> anyhow::Result<Option<Block>> {
        let n = self.reader.n_obs();
        if self.pos >= n {
            return Ok(None);
        }
        let end = (self.pos + max_cells).min(n);
        let rows = self.reader.read_rows(self.pos, end)?;
        let mut b = Block { start: self.pos, offsets: vec![0], ..Default::default() };
        let mut pairs: Vec<(u32, u32, f32)> = Vec::new();
        for i in 0..rows.n_rows() {
            let (cols, vals) = rows.row(i);
            pairs.clear();
            for (&c, &v) in cols.iter().zip(vals) {
                let Some(&Some(id)) = self.ids.get(c as usize) else {
                    continue;
                };
                if let Err(why) = check_value(v) {
                    let r = self.pos + i;
                    bail!(
                        "{}: {}: cell `{}` (row {r}), gene `{}`: value {v} {why}; {VALUE_HINT}{}",
                        self.path.display(),
                        self.reader.matrix_path(),
                        self.cell_ids[r],
                        self.gene_names[c as usize],
                        if self.has_raw { "; this file has raw counts in raw/X: use --use-raw" } else { "" },
                    );
                }
                if v != 0.0 {
                    pairs.push((c, id, v));
                }
            }
            // np.nonzero on the dense row: ascending column order.
            if !pairs.windows(2).all(|w| w[0].0 < w[1].0) {
                pairs.sort_by_key(|p| p.0);
            }
            for &(_, id, v) in &pairs {
                b.genes.push(id);
                b.values.push(v);
            }
            b.offsets.push(b.genes.len());
        }
        b.cell_ids = self.cell_ids[self.pos..end].to_vec();
        self.pos = end;
        Ok(Some(b))
    }
}

// ---------------------------------------------------------------------------------------------
// scgpt-prep shard directory

pub struct ShardSource {
    dir: PathBuf,
    files: Vec<(PathBuf, usize)>,
    next_file: usize,
    reader: Option<(PathBuf, ParquetRecordBatchReader)>,
    /// Shard vocab id → model vocab id.
    remap: Vec<Option<u32>>,
    n_cells: usize,
    pos: usize,
    report: GeneReport,
    batch_rows: usize,
}

impl ShardSource {
    pub fn open(dir: &Path, vocab: &GeneVocab, vocab_path: &Path, min_match: f64, batch_rows: usize) -> anyhow::Result<Self> {
        let manifest_path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&manifest_path).with_context(|| {
            format!(
                "{}: cannot read; a directory input must be an scgpt-prep shard set (manifest.json, \
                 vocab.json, *.parquet)",
                manifest_path.display()
            )
        })?;
        let manifest: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", manifest_path.display()))?;
        let shards = manifest
            .get("shards")
            .and_then(|s| s.as_array())
            .with_context(|| format!("{}: field `shards` missing or not a list", manifest_path.display()))?;
        let mut files = Vec::with_capacity(shards.len());
        let mut n_cells = 0usize;
        for (k, s) in shards.iter().enumerate() {
            let file = s
                .get("file")
                .and_then(|f| f.as_str())
                .with_context(|| format!("{}: field `shards[{k}].file` missing or not a string", manifest_path.display()))?;
            let path = dir.join(file);
            let f = File::open(&path)
                .with_context(|| format!("{}: cannot open shard listed in {}", path.display(), manifest_path.display()))?;
            let meta =
                ParquetRecordBatchReaderBuilder::try_new(f).with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
            let rows = meta.metadata().file_metadata().num_rows() as usize;
            if let Some(listed) = s.get("rows").and_then(|r| r.as_u64()) {
                if listed as usize != rows {
                    bail!(
                        "{}: has {rows} rows but {} field `shards[{k}].rows` says {listed}; the shard set \
                         is inconsistent (re-run scgpt-prep)",
                        path.display(),
                        manifest_path.display()
                    );
                }
            }
            n_cells += rows;
            files.push((path, rows));
        }

        let shard_vocab_path = dir.join("vocab.json");
        let shard_vocab = GeneVocab::from_file(&shard_vocab_path)?;
        let remap = shard_vocab.id_map(vocab);
        let total = shard_vocab.tokens().iter().filter(|t| !SPECIAL_TOKENS.contains(&t.as_str())).count();
        let matched = remap.iter().filter(|m| m.is_some()).count();
        let report =
            GeneReport { what: format!("genes of the shard vocabulary {}", shard_vocab_path.display()), total, matched, via_ensembl: 0 };
        if matched == 0 || (matched as f64) < min_match * total as f64 {
            let unmatched: Vec<&str> = shard_vocab
                .tokens()
                .iter()
                .zip(&remap)
                .filter(|(t, id)| id.is_none() && !SPECIAL_TOKENS.contains(&t.as_str()))
                .take(5)
                .map(|(t, _)| t.as_str())
                .collect();
            bail!(
                "{}: only {matched} of {total} genes of the shard vocabulary {} are in the model \
                 vocabulary {} (minimum {:.0}%; unmatched, e.g.: {unmatched:?}); the shards were built \
                 for another gene naming: re-run scgpt-prep with --vocab {} (and --gene-col if needed){}",
                dir.display(),
                shard_vocab_path.display(),
                vocab_path.display(),
                min_match * 100.0,
                vocab_path.display(),
                if matched > 0 { ", or lower --min-gene-match to embed anyway" } else { "" },
            );
        }
        Ok(ShardSource {
            dir: dir.to_path_buf(),
            files,
            next_file: 0,
            reader: None,
            remap,
            n_cells,
            pos: 0,
            report,
            batch_rows: batch_rows.max(1),
        })
    }

    fn open_next(&mut self) -> anyhow::Result<bool> {
        let Some((path, _)) = self.files.get(self.next_file) else {
            return Ok(false);
        };
        self.next_file += 1;
        let f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(f).with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
        let schema = builder.parquet_schema();
        let wanted = ["genes", "expressions", "cell_id", "dataset"];
        let roots: Vec<usize> = wanted
            .iter()
            .map(|name| {
                builder
                    .schema()
                    .index_of(name)
                    .with_context(|| format!("{}: column `{name}` missing; is this an scgpt-prep shard?", path.display()))
            })
            .collect::<anyhow::Result<_>>()?;
        let mask = ProjectionMask::roots(schema, roots);
        let reader = builder
            .with_projection(mask)
            .with_batch_size(self.batch_rows)
            .build()
            .with_context(|| format!("{}: cannot read", path.display()))?;
        self.reader = Some((path.clone(), reader));
        Ok(true)
    }

    fn next_block(&mut self, _max_cells: usize) -> anyhow::Result<Option<Block>> {
        loop {
            if self.reader.is_none() && !self.open_next()? {
                if self.pos != self.n_cells {
                    bail!("{}: read {} cells but the shards' metadata says {}", self.dir.display(), self.pos, self.n_cells);
                }
                return Ok(None);
            }
            let (path, reader) = self.reader.as_mut().expect("opened above");
            match reader.next() {
                None => {
                    self.reader = None;
                    continue;
                }
                Some(batch) => {
                    let path = path.clone();
                    let batch = batch.with_context(|| format!("{}: cannot decode a record batch", path.display()))?;
                    let block = self.convert(&path, &batch)?;
                    self.pos += block.len();
                    return Ok(Some(block));
                }
            }
        }
    }

    fn convert(&self, path: &Path, batch: &RecordBatch) -> anyhow::Result<Block> {
        fn col<'a, T: 'static>(batch: &'a RecordBatch, name: &str, path: &Path) -> anyhow::Result<&'a T> {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<T>())
                .with_context(|| format!("{}: column `{name}` has the wrong type; is this an scgpt-prep shard?", path.display()))
        }
        let genes: &ListArray = col(batch, "genes", path)?;
        let exprs: &ListArray = col(batch, "expressions", path)?;
        let ids: &StringArray = col(batch, "cell_id", path)?;
        let datasets: &StringArray = col(batch, "dataset", path)?;
        let gv = genes
            .values()
            .as_any()
            .downcast_ref::<Int32Array>()
            .with_context(|| format!("{}: column `genes` is not a list of int32", path.display()))?;
        let ev = exprs
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .with_context(|| format!("{}: column `expressions` is not a list of float32", path.display()))?;
        let n = batch.num_rows();
        let mut b = Block { start: self.pos, offsets: Vec::with_capacity(n + 1), ..Default::default() };
        b.offsets.push(0);
        let (go, eo) = (genes.value_offsets(), exprs.value_offsets());
        for i in 0..n {
            let cell_id = if ids.is_null(i) { String::new() } else { ids.value(i).to_string() };
            let (ga, gb) = (go[i] as usize, go[i + 1] as usize);
            let (ea, eb) = (eo[i] as usize, eo[i + 1] as usize);
            if gb - ga != eb - ea {
                bail!(
                    "{}: cell `{cell_id}` (row {} of the set): {} genes but {} expressions",
                    path.display(),
                    self.pos + i,
                    gb - ga,
                    eb - ea
                );
            }
            for (&g, &v) in gv.values()[ga..gb].iter().zip(&ev.values()[ea..eb]) {
                let Some(mapped) = usize::try_from(g).ok().and_then(|g| self.remap.get(g)) else {
                    bail!(
                        "{}: cell `{cell_id}` (row {} of the set): gene id {g} is outside the shard \
                         vocabulary of {} tokens",
                        path.display(),
                        self.pos + i,
                        self.remap.len()
                    );
                };
                if let Err(why) = check_value(v) {
                    bail!(
                        "{}: column `expressions`: cell `{cell_id}` (row {} of the set), gene id {g}: value {v} {why}; {VALUE_HINT}",
                        path.display(),
                        self.pos + i,
                    );
                }
                if let (Some(id), true) = (mapped, v != 0.0) {
                    b.genes.push(*id);
                    b.values.push(v);
                }
            }
            b.offsets.push(b.genes.len());
            b.cell_ids.push(cell_id);
        }
        b.datasets = Some((0..n).map(|i| if datasets.is_null(i) { String::new() } else { datasets.value(i).to_string() }).collect());
        Ok(b)
    }
}
