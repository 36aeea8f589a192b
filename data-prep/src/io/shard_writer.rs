//! Writes binned Parquet shards (the format of `scgpt_data::shard`): the three lists
//! bit-packed by hand ([`super::list_pages`]: delta gene ids, dictionary bins and
//! expressions), the per-cell columns zstd-compressed by the parquet crate's Arrow writer; row
//! groups of [`ROW_GROUP_CELLS`]; written through a temp file and renamed, with a BLAKE3 of
//! the bytes taken on the way out ([`super::direct_io::HashedFileWriter`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::StringDictionaryBuilder;
use arrow_array::types::Int32Type;
use arrow_array::{ArrayRef, Float32Array, RecordBatch, StringArray};
use arrow_schema::Schema;
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnChunk, ArrowRowGroupWriterFactory};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::ColumnPath;
use rayon::prelude::*;

use scgpt_data::shard::{schema, CellColumns, ShardInfo, COL_DATASET, ROW_GROUP_CELLS};
use scgpt_data::vocab::hex;

use super::direct_io::HashedFileWriter;
use super::list_pages::{self, ListChunk, Segments};

/// genes, expressions, bins: the first three columns of every shard.
const LIST_COLUMNS: usize = 3;

/// Binned cells with their lists flat, as the binning stage produces them. The shard writer
/// keeps a shared reference until the row group holding them is encoded, instead of copying
/// the lists into a row-group buffer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CellLists {
    /// Offsets into the three lists, one more than there are cells, from 0.
    pub offsets: Vec<usize>,
    pub genes: Vec<i32>,
    pub expressions: Vec<f32>,
    pub bins: Vec<u8>,
}

impl CellLists {
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The per-cell columns (everything after the three lists) as one record batch.
fn scalar_batch(schema: &Arc<Schema>, cells: &CellColumns) -> parquet::errors::Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(Float32Array::from(cells.n_counts.clone())),
        Arc::new(StringArray::from_iter_values(&cells.cell_ids)),
        Arc::new(StringArray::from_iter_values(&cells.datasets)),
    ];
    for col in &cells.obs {
        let mut b = StringDictionaryBuilder::<Int32Type>::new();
        for v in col {
            b.append_value(v);
        }
        columns.push(Arc::new(b.finish()));
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

fn writer_properties(obs_names: &[String]) -> anyhow::Result<WriterProperties> {
    // These settings cover the per-cell columns; the three lists are encoded by list_pages.
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_CELLS))
        .set_dictionary_enabled(false)
        .set_created_by(format!("scgpt-rs {}", env!("CARGO_PKG_VERSION")));
    for name in obs_names.iter().map(String::as_str).chain([COL_DATASET]) {
        b = b.set_column_dictionary_enabled(ColumnPath::from(name), true);
    }
    Ok(b.build())
}

/// Streams cells into one shard file: each row group is encoded as it fills, its columns in
/// parallel on the rayon pool, so memory stays at one
/// row group whatever the shard size. The file appears under its name only on `finish`;
/// dropping an unfinished writer removes the temp file.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    /// The fields after the three lists, which the Arrow writer encodes.
    scalar_schema: Arc<Schema>,
    file: Option<SerializedFileWriter<HashedFileWriter>>,
    factory: ArrowRowGroupWriterFactory,
    row_groups: usize,
    /// The buffered cells' lists: runs of consecutive cells `a..b` of shared chunks.
    runs: Vec<(Arc<CellLists>, usize, usize)>,
    /// The buffered cells' per-cell columns (its own lists stay empty).
    scalars: CellColumns,
    buffered: usize,
    rows: usize,
}

impl ShardWriter {
    pub fn create(path: &Path, obs_names: &[String]) -> anyhow::Result<Self> {
        let schema = schema(obs_names);
        let tmp = scgpt_data::atomic::temp_path_for(path);
        let out = HashedFileWriter::create(&tmp).map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", tmp.display()))?;
        let writer = ArrowWriter::try_new(out, schema.clone(), Some(writer_properties(obs_names)?))?;
        let (file, factory) = writer.into_serialized_writer()?;
        let scalar_schema = Arc::new(Schema::new(schema.fields()[LIST_COLUMNS..].to_vec()));
        Ok(ShardWriter {
            path: path.to_path_buf(),
            tmp,
            scalar_schema,
            file: Some(file),
            factory,
            row_groups: 0,
            runs: Vec::new(),
            scalars: CellColumns::new(obs_names.len()),
            buffered: 0,
            rows: 0,
        })
    }

    /// Where the finished shard will be.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cells written so far, including those still buffered.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Appends cell `cell` of `lists` with its per-cell columns. Consecutive cells of the same
    /// lists are referenced as one run, not copied.
    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        lists: &Arc<CellLists>,
        cell: usize,
        n_counts: f32,
        cell_id: &str,
        dataset: &str,
        obs: &[String],
    ) -> anyhow::Result<()> {
        anyhow::ensure!(cell < lists.len(), "cell {cell} of a chunk of {} cells", lists.len());
        match self.runs.last_mut() {
            Some((l, _, end)) if Arc::ptr_eq(l, lists) && *end == cell => *end += 1,
            _ => self.runs.push((lists.clone(), cell, cell + 1)),
        }
        self.scalars.push_scalars(n_counts, cell_id, dataset, obs);
        self.buffered += 1;
        self.rows += 1;
        if self.buffered >= ROW_GROUP_CELLS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if self.buffered == 0 {
            return Ok(());
        }
        let mut offsets: Vec<i32> = Vec::with_capacity(self.buffered + 1);
        offsets.push(0);
        for (l, a, b) in &self.runs {
            let (base, at) = (l.offsets[*a], *offsets.last().expect("starts at 0"));
            offsets.extend(l.offsets[a + 1..=*b].iter().map(|&o| at + (o - base) as i32));
        }
        let part = |(l, a, b): &(Arc<CellLists>, usize, usize)| l.offsets[*a]..l.offsets[*b];
        let genes_in = Segments::new(self.runs.iter().map(|r| &r.0.genes[part(r)]));
        let expressions_in = Segments::new(self.runs.iter().map(|r| &r.0.expressions[part(r)]));
        let bins_in = Segments::new(self.runs.iter().map(|r| &r.0.bins[part(r)]));
        let cells = &self.scalars;
        let file = self.file.as_mut().expect("open until finish");
        // Leaves 0..3 are the list items (genes, expressions, bins): encoded by hand
        // (list_pages); the per-cell columns go through the parquet crate's Arrow writer.
        let leaf = |i: usize| file.schema_descr().column(i);
        let (genes, expressions, bins) = (leaf(0), leaf(1), leaf(2));
        let scalars = scalar_batch(&self.scalar_schema, cells)?;
        let writers: Vec<_> = self.factory.create_column_writers(self.row_groups)?.into_iter().skip(LIST_COLUMNS).collect();
        let (lists, scalar_chunks) = rayon::join(
            || -> parquet::errors::Result<Vec<ListChunk>> {
                let tasks: [&(dyn Fn() -> parquet::errors::Result<ListChunk> + Sync); LIST_COLUMNS] = [
                    &|| list_pages::encode_delta_i32(genes.clone(), &offsets, &genes_in),
                    &|| list_pages::encode_f32(expressions.clone(), &offsets, &expressions_in),
                    &|| list_pages::encode_identity_dictionary_u8(bins.clone(), &offsets, &bins_in),
                ];
                tasks.par_iter().map(|t| t()).collect()
            },
            || -> parquet::errors::Result<Vec<ArrowColumnChunk>> {
                writers
                    .into_par_iter()
                    .zip(self.scalar_schema.fields().par_iter().zip(scalars.columns().par_iter()))
                    .map(|(mut w, (field, column))| {
                        for leaf in compute_leaves(field, column)? {
                            w.write(&leaf)?;
                        }
                        w.close()
                    })
                    .collect()
            },
        );
        let mut rg = file.next_row_group()?;
        for chunk in lists? {
            rg.append_column(&chunk.bytes, chunk.close)?;
        }
        for chunk in scalar_chunks? {
            chunk.append_to_row_group(&mut rg)?;
        }
        rg.close()?;
        self.row_groups += 1;
        // Kept with its capacity: the next row group fills the same buffers without regrowing.
        self.scalars.clear();
        self.runs.clear();
        self.buffered = 0;
        Ok(())
    }

    /// Encode the rest, write the footer, fsync, and move the file into place.
    pub fn finish(self) -> anyhow::Result<ShardInfo> {
        self.finish_with(true).map(|(info, _)| info)
    }

    /// [`ShardWriter::finish`] without the fsync: the shard is in place but durable only once
    /// the caller syncs the returned file and then the directory (for the rename).
    pub fn finish_unsynced(self) -> anyhow::Result<(ShardInfo, File)> {
        self.finish_with(false)
    }

    fn finish_with(mut self, sync: bool) -> anyhow::Result<(ShardInfo, File)> {
        self.flush()?;
        let file = self.file.take().expect("open until finish");
        let ctx = |e: &dyn std::fmt::Display| anyhow::anyhow!("writing shard {}: {e}", self.path.display());
        let out = file.into_inner().map_err(|e| ctx(&e))?;
        let (f, bytes, blake3) = out.finish(sync).map_err(|e| ctx(&e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| ctx(&e))?;
        let info = ShardInfo {
            file: self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            rows: self.rows,
            bytes,
            blake3: hex(&blake3),
        };
        Ok((info, f))
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Write `cells` as one shard at `path`, atomically.
pub fn write_shard(path: &Path, obs_names: &[String], cells: &CellColumns) -> anyhow::Result<ShardInfo> {
    let mut w = ShardWriter::create(path, obs_names)?;
    let lists = Arc::new(CellLists {
        offsets: cells.offsets.iter().map(|&o| o as usize).collect(),
        genes: cells.genes.clone(),
        expressions: cells.expressions.clone(),
        bins: cells.bins.clone(),
    });
    let mut obs = Vec::with_capacity(cells.obs.len());
    for i in 0..cells.len() {
        obs.clear();
        obs.extend(cells.obs.iter().map(|c| c[i].clone()));
        w.push(&lists, i, cells.n_counts[i], &cells.cell_ids[i], &cells.datasets[i], &obs)?;
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::basic::Encoding;
    use scgpt_data::shard::read_shard;

    #[test]
    fn shard_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.parquet");
        let mut c = CellColumns::new(1);
        c.push(&[3, 9], &[1.0, 4.0], &[1, 50], 5.0, "cell-a", "ds", &["T".into()]);
        c.push(&[], &[], &[], 0.0, "cell-b", "ds", &["B".into()]);
        c.push(&[7], &[2.0], &[17], 2.0, "cell-c", "ds", &["T".into()]);
        let info = write_shard(&p, &["cell_type".into()], &c).unwrap();
        assert_eq!(info.rows, 3);
        assert_eq!(info.bytes, std::fs::metadata(&p).unwrap().len());
        let (names, back) = read_shard(&p).unwrap();
        assert_eq!(names, vec!["cell_type"]);
        assert_eq!(back, c);
    }

    /// Cells of random lengths (empty ones included) over several row groups and pages, with
    /// gene ids that make the 32-bit deltas wrap and expressions of the given kind.
    fn random_cells(seed: u64, cells: usize, float_values: bool) -> CellColumns {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut c = CellColumns::new(0);
        for i in 0..cells {
            let n = match i % 7 {
                0 => 0,
                1 => 1,
                _ => rng.random_range(2..600),
            };
            let genes: Vec<i32> = (0..n)
                .map(|k| match (i + k) % 97 {
                    0 => i32::MIN,
                    1 => i32::MAX,
                    _ => rng.random_range(0..60_697),
                })
                .collect();
            let expressions: Vec<f32> = (0..n)
                .map(|_| if float_values { rng.random::<f32>() * 10.0 } else { (rng.random::<f64>().powi(3) * 300.0).floor() as f32 + 1.0 })
                .collect();
            let bins: Vec<u8> = (0..n).map(|_| rng.random_range(0..=50)).collect();
            c.push(&genes, &expressions, &bins, expressions.iter().sum(), &format!("c{i}"), "ds", &[]);
        }
        c
    }

    #[test]
    fn hand_encoded_lists_read_back_exactly() {
        let dir = tempfile::tempdir().unwrap();
        // 3 row groups, ~600k values in each full one: more than one page per column chunk.
        for (seed, float_values) in [(1, false), (2, true)] {
            let c = random_cells(seed, 2 * ROW_GROUP_CELLS + 300, float_values);
            let p = dir.path().join(format!("s{seed}.parquet"));
            write_shard(&p, &[], &c).unwrap();
            let (_, back) = read_shard(&p).unwrap();
            assert_eq!(back, c, "float values: {float_values}");
            let meta = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap()).unwrap().metadata().clone();
            let encodings = |leaf: usize| meta.row_group(0).column(leaf).encodings().collect::<Vec<_>>();
            assert!(encodings(0).contains(&Encoding::DELTA_BINARY_PACKED));
            assert!(encodings(2).contains(&Encoding::RLE_DICTIONARY));
            // Over 65,536 distinct floats in a chunk fall back to byte-split floats.
            let expr = if float_values { Encoding::BYTE_STREAM_SPLIT } else { Encoding::RLE_DICTIONARY };
            assert!(encodings(1).contains(&expr), "{:?}", encodings(1));
        }
    }

    #[test]
    fn cells_pushed_from_many_chunks_give_the_same_bytes_as_from_one() {
        let dir = tempfile::tempdir().unwrap();
        for (seed, float_values) in [(3, false), (4, true)] {
            let c = random_cells(seed, 2 * ROW_GROUP_CELLS + 300, float_values);
            let whole = dir.path().join(format!("whole{seed}.parquet"));
            write_shard(&whole, &[], &c).unwrap();
            // The same cells in chunks of 1..=300 cells, as the binning stage hands them over.
            let pieced = dir.path().join(format!("pieced{seed}.parquet"));
            let mut w = ShardWriter::create(&pieced, &[]).unwrap();
            let (mut i, mut size) = (0, 1);
            while i < c.len() {
                let n = size.min(c.len() - i);
                let base = c.offsets[i] as usize;
                let (a, b) = (base, c.offsets[i + n] as usize);
                let lists = Arc::new(CellLists {
                    offsets: c.offsets[i..=i + n].iter().map(|&o| o as usize - base).collect(),
                    genes: c.genes[a..b].to_vec(),
                    expressions: c.expressions[a..b].to_vec(),
                    bins: c.bins[a..b].to_vec(),
                });
                for k in 0..n {
                    w.push(&lists, k, c.n_counts[i + k], &c.cell_ids[i + k], "ds", &[]).unwrap();
                }
                i += n;
                size = size * 7 % 301 + 1;
            }
            assert!(w.push(&Arc::new(CellLists::default()), 0, 0.0, "x", "ds", &[]).is_err(), "a cell past the chunk is refused");
            w.finish().unwrap();
            assert_eq!(std::fs::read(&pieced).unwrap(), std::fs::read(&whole).unwrap(), "float values: {float_values}");
        }
    }

    #[test]
    fn float_dictionary_keeps_bit_patterns_apart() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z.parquet");
        let mut c = CellColumns::new(0);
        let odd = [0.0f32, -0.0, 1.0, 1.5, 4096.0, 5000.0, f32::MAX, f32::MIN_POSITIVE, 1e-30];
        c.push(&[1; 9], &odd, &[1; 9], 0.0, "a", "ds", &[]);
        write_shard(&p, &[], &c).unwrap();
        let (_, back) = read_shard(&p).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.expressions), bits(&odd));
    }
}
