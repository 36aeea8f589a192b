//! Binned Parquet shards: one row per cell. This module is the format (schema, column
//! names, row groups) and its readers; scgpt-prep's `io::shard_writer` writes it.
//!
//! Columns: `genes: list<int32>` (vocab ids of the nonzero genes), `expressions: list<float32>`
//! (raw values), `bins: list<uint8>` (1..50), `n_counts: float32`, `cell_id: string`,
//! `dataset: string`, then one dictionary-encoded string column per requested obs column.
//! The writer bit-packs the lists (delta gene ids, dictionary bins and expressions) and
//! zstd-compresses the per-cell columns; row groups of [`ROW_GROUP_CELLS`] cells.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use arrow_array::types::Int32Type;
use arrow_array::{Array, Float32Array, Int32Array, ListArray, RecordBatch, StringArray, UInt8Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

pub const COL_GENES: &str = "genes";
pub const COL_EXPRESSIONS: &str = "expressions";
pub const COL_BINS: &str = "bins";
pub const COL_N_COUNTS: &str = "n_counts";
pub const COL_CELL_ID: &str = "cell_id";
pub const COL_DATASET: &str = "dataset";

/// Cells in columnar form, ready to become one record batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CellColumns {
    /// Offsets into `genes`/`expressions`/`bins`, length `n_cells + 1`.
    pub offsets: Vec<i32>,
    pub genes: Vec<i32>,
    pub expressions: Vec<f32>,
    pub bins: Vec<u8>,
    pub n_counts: Vec<f32>,
    pub cell_ids: Vec<String>,
    pub datasets: Vec<String>,
    /// One vector per obs column, aligned with `obs_names`.
    pub obs: Vec<Vec<String>>,
}

impl CellColumns {
    pub fn new(n_obs_cols: usize) -> Self {
        CellColumns { offsets: vec![0], obs: vec![Vec::new(); n_obs_cols], ..Default::default() }
    }

    /// Empty, with room for `cells` cells holding `values` gene values in all.
    pub fn with_capacity(n_obs_cols: usize, cells: usize, values: usize) -> Self {
        let mut c = CellColumns::new(n_obs_cols);
        c.offsets.reserve(cells);
        c.genes.reserve(values);
        c.expressions.reserve(values);
        c.n_counts.reserve(cells);
        c.cell_ids.reserve(cells);
        c
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// No cells, capacity kept.
    pub fn clear(&mut self) {
        self.offsets.truncate(1);
        self.genes.clear();
        self.expressions.clear();
        self.bins.clear();
        self.n_counts.clear();
        self.cell_ids.clear();
        self.datasets.clear();
        self.obs.iter_mut().for_each(Vec::clear);
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Gene ids, raw values and bins of cell `i` (bins empty when they were not read).
    pub fn cell(&self, i: usize) -> (&[i32], &[f32], &[u8]) {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        (&self.genes[a..b], &self.expressions[a..b], self.bins.get(a..b).unwrap_or(&[]))
    }

    /// Appends cell `i` of `other`, with the columns `other` holds (a training read leaves
    /// bins, cell ids and datasets out).
    pub fn push_from(&mut self, other: &CellColumns, i: usize) {
        let (g, e, b) = other.cell(i);
        self.genes.extend_from_slice(g);
        self.expressions.extend_from_slice(e);
        self.bins.extend_from_slice(b);
        self.offsets.push(self.genes.len() as i32);
        self.n_counts.push(other.n_counts[i]);
        if let Some(id) = other.cell_ids.get(i) {
            self.cell_ids.push(id.clone());
        }
        if let Some(d) = other.datasets.get(i) {
            self.datasets.push(d.clone());
        }
        if self.obs.len() < other.obs.len() {
            self.obs.resize(other.obs.len(), Vec::new());
        }
        for (col, src) in self.obs.iter_mut().zip(&other.obs) {
            col.push(src[i].clone());
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn push(&mut self, genes: &[i32], expressions: &[f32], bins: &[u8], n_counts: f32, cell_id: &str, dataset: &str, obs: &[String]) {
        self.genes.extend_from_slice(genes);
        self.expressions.extend_from_slice(expressions);
        self.bins.extend_from_slice(bins);
        self.offsets.push(self.genes.len() as i32);
        self.push_scalars(n_counts, cell_id, dataset, obs);
    }

    /// The per-cell columns of one cell (the lists are kept elsewhere, as by scgpt-prep's
    /// shard writer).
    pub fn push_scalars(&mut self, n_counts: f32, cell_id: &str, dataset: &str, obs: &[String]) {
        self.n_counts.push(n_counts);
        self.cell_ids.push(cell_id.to_string());
        self.datasets.push(dataset.to_string());
        for (col, v) in self.obs.iter_mut().zip(obs) {
            col.push(v.clone());
        }
    }
}

pub fn schema(obs_names: &[String]) -> Arc<Schema> {
    let list = |name: &str, dt: DataType| Field::new(name, DataType::List(Arc::new(Field::new("item", dt, false))), false);
    let mut fields = vec![
        list(COL_GENES, DataType::Int32),
        list(COL_EXPRESSIONS, DataType::Float32),
        list(COL_BINS, DataType::UInt8),
        Field::new(COL_N_COUNTS, DataType::Float32, false),
        Field::new(COL_CELL_ID, DataType::Utf8, false),
        Field::new(COL_DATASET, DataType::Utf8, false),
    ];
    for name in obs_names {
        fields.push(Field::new(name, DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)), false));
    }
    Arc::new(Schema::new(fields))
}

/// What a finished shard file holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    /// File name relative to the output directory.
    pub file: String,
    pub rows: usize,
    pub bytes: u64,
    /// BLAKE3 of the file's bytes, hex (`b3sum` prints the same).
    pub blake3: String,
}

/// Rows per Parquet row group: small enough for cheap random block access when training.
pub const ROW_GROUP_CELLS: usize = 2048;

/// Read one row group of a shard for training (the loader's unit of I/O): gene ids, raw
/// values, `n_counts`, cell ids and the named obs columns. The trainer bins in its own
/// vocabulary each epoch, so the stored bins and dataset names are not decoded.
pub fn read_row_group(path: &Path, group: usize, obs_cols: &[String]) -> anyhow::Result<CellColumns> {
    let (builder, names) = open_shard(path)?;
    let index = |name: &str| root_index(&names, name, path);
    let mut roots = vec![index(COL_GENES)?, index(COL_EXPRESSIONS)?, index(COL_N_COUNTS)?, index(COL_CELL_ID)?];
    for c in obs_cols {
        roots.push(index(c)?);
    }
    // Sized once from the row group's value count: no regrowth copies of ~17 MB columns.
    let rg = builder.metadata().row_group(group);
    let values = rg
        .columns()
        .iter()
        .find(|c| c.column_path().parts().first().map(String::as_str) == Some(COL_GENES))
        .map_or(0, |c| c.num_values().max(0) as usize);
    let rows = rg.num_rows().max(0) as usize;
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    // Small record batches keep the reader's level and value buffers small and reused; one
    // batch per row group (2,048 cells × 2,000 values) spent a third of the time regrowing them.
    let reader = builder.with_projection(mask).with_row_groups(vec![group]).with_batch_size(64).build()?;
    let mut out = CellColumns::with_capacity(obs_cols.len(), rows, values);
    for batch in reader {
        let batch = batch?;
        append_values(&mut out, &batch, path)?;
        let cell_id: &StringArray = column(&batch, COL_CELL_ID, path)?;
        out.cell_ids.extend(cell_id.iter().map(|s| s.unwrap_or_default().to_string()));
        for (col, name) in out.obs.iter_mut().zip(obs_cols) {
            col.extend(obs_strings(batch.column_by_name(name).expect("projected").as_ref(), name, path)?);
        }
    }
    Ok(out)
}

/// The distinct values of one obs column over a shard, in first-seen order.
pub fn read_obs_values(path: &Path, name: &str) -> anyhow::Result<Vec<String>> {
    let mut seen = std::collections::HashSet::new();
    Ok(read_obs_column(path, name)?.into_iter().filter(|v| seen.insert(v.clone())).collect())
}

/// One obs column over a shard, a value per row in storage order.
pub fn read_obs_column(path: &Path, name: &str) -> anyhow::Result<Vec<String>> {
    let (builder, names) = open_shard(path)?;
    let i = root_index(&names, name, path)?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [i]);
    let mut out = Vec::new();
    for batch in builder.with_projection(mask).build()? {
        out.extend(obs_strings(batch?.column(0).as_ref(), name, path)?);
    }
    Ok(out)
}

/// Read a whole shard back (inspection, tests, small datasets).
pub fn read_shard(path: &Path) -> anyhow::Result<(Vec<String>, CellColumns)> {
    let file = File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| anyhow::anyhow!("{}: not a readable Parquet shard: {e}", path.display()))?;
    let schema = builder.schema().clone();
    let obs_names: Vec<String> = schema.fields().iter().skip(6).map(|f| f.name().clone()).collect();
    let reader = builder.with_batch_size(8192).build()?;
    let mut out = CellColumns::new(obs_names.len());
    for batch in reader {
        let batch = batch?;
        append_batch(&mut out, &batch, path)?;
    }
    Ok((obs_names, out))
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str, path: &Path) -> anyhow::Result<&'a T> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| anyhow::anyhow!("{}: column `{name}` missing or of the wrong type; is this an scgpt-prep shard?", path.display()))
}

fn list_values<'a, T: 'static>(batch: &'a RecordBatch, name: &str, path: &Path) -> anyhow::Result<(&'a ListArray, &'a T)> {
    let l: &ListArray = column(batch, name, path)?;
    let v = l
        .values()
        .as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| anyhow::anyhow!("{}: list column `{name}` has the wrong item type", path.display()))?;
    Ok((l, v))
}

/// Gene ids, raw values and `n_counts` of a record batch (the columns every read needs).
/// Returns the value range `base..end` of the batch's list columns.
fn append_values(out: &mut CellColumns, batch: &RecordBatch, path: &Path) -> anyhow::Result<(usize, usize)> {
    let (gl, genes) = list_values::<Int32Array>(batch, COL_GENES, path)?;
    let (_, expr) = list_values::<Float32Array>(batch, COL_EXPRESSIONS, path)?;
    let n_counts: &Float32Array = column(batch, COL_N_COUNTS, path)?;
    let offs = gl.value_offsets();
    let base = offs[0] as usize;
    let end = offs[gl.len()] as usize;
    let shift = out.genes.len() as i32 - base as i32;
    out.genes.extend_from_slice(&genes.values()[base..end]);
    out.expressions.extend_from_slice(&expr.values()[base..end]);
    out.offsets.extend(offs[1..].iter().map(|&o| o + shift));
    out.n_counts.extend_from_slice(n_counts.values());
    Ok((base, end))
}

fn append_batch(out: &mut CellColumns, batch: &RecordBatch, path: &Path) -> anyhow::Result<()> {
    let (base, end) = append_values(out, batch, path)?;
    let (_, bins) = list_values::<UInt8Array>(batch, COL_BINS, path)?;
    let cell_id: &StringArray = column(batch, COL_CELL_ID, path)?;
    let dataset: &StringArray = column(batch, COL_DATASET, path)?;
    out.bins.extend_from_slice(&bins.values()[base..end]);
    out.cell_ids.extend(cell_id.iter().map(|s| s.unwrap_or_default().to_string()));
    out.datasets.extend(dataset.iter().map(|s| s.unwrap_or_default().to_string()));
    let schema = batch.schema();
    for (k, col) in out.obs.iter_mut().enumerate() {
        col.extend(obs_strings(batch.column(6 + k).as_ref(), schema.field(6 + k).name(), path)?);
    }
    Ok(())
}

/// A shard's reader and its top-level column names.
fn open_shard(path: &Path) -> anyhow::Result<(ParquetRecordBatchReaderBuilder<File>, Vec<String>)> {
    let f = File::open(path).with_context(|| format!("{}: cannot open shard", path.display()))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(f).with_context(|| format!("{}: not a readable Parquet shard", path.display()))?;
    let names = builder.schema().fields().iter().map(|f| f.name().clone()).collect();
    Ok((builder, names))
}

/// The position of top-level column `name`; missing, an error naming it and the fix.
fn root_index(names: &[String], name: &str, path: &Path) -> anyhow::Result<usize> {
    names.iter().position(|n| n == name).with_context(|| {
        format!("{}: no column `{name}` (it has {}); prepare the data with scgpt-prep --obs-cols {name}", path.display(), names.join(", "))
    })
}

/// An obs column's values as strings (they are dictionary-encoded in every shard).
fn obs_strings(arr: &dyn Array, name: &str, path: &Path) -> anyhow::Result<Vec<String>> {
    arrow_cast_dict(arr).ok_or_else(|| anyhow::anyhow!("{}: obs column {name} is not a dictionary of strings", path.display()))
}

fn arrow_cast_dict(arr: &dyn Array) -> Option<Vec<String>> {
    let dict = arr.as_any().downcast_ref::<arrow_array::DictionaryArray<Int32Type>>()?;
    let values = dict.values().as_any().downcast_ref::<StringArray>()?;
    Some(dict.keys().iter().map(|k| k.map(|k| values.value(k as usize).to_string()).unwrap_or_default()).collect())
}
