//! Embeddings out, streamed row block by row block, each output appearing under its name only
//! when complete (temp file in the output's directory, then rename):
//!
//! - h5ad from an h5ad input: a copy of the input with `obsm["X_scGPT"]` (float32 `[n, d]`,
//!   anndata's `array` encoding) added or replaced; everything else is untouched.
//! - h5ad from a shard set: a new AnnData with `obs` = cell ids (+ `dataset`), an empty
//!   `[n, 0]` `X` and `obsm["X_scGPT"]`.
//! - parquet: columns `cell_id`, (`dataset` for shard input), `X_scGPT` (fixed-size list of
//!   float32, length d), zstd.
//! - npy: the `[n, d]` float32 matrix (`.npy` v1.0, little endian) plus `<stem>.cell_ids.txt`,
//!   one cell id per line, in row order.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use hdf5::types::VarLenUnicode;
use hdf5::Dataset;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use scgpt_data::atomic::temp_path_for;

pub const OBSM_KEY: &str = "X_scGPT";

pub trait Sink {
    /// Rows `start..start + ids.len()` of the embedding matrix (`emb` is row-major, `d` wide).
    fn write(&mut self, start: usize, emb: &[f32], ids: &[String], datasets: Option<&[String]>) -> anyhow::Result<()>;
    /// Completes the output(s) and moves them into place; returns their paths.
    fn finish(self: Box<Self>) -> anyhow::Result<Vec<PathBuf>>;
}

/// A temp file removed on drop unless it was moved into place.
pub(crate) struct Temp {
    pub(crate) tmp: PathBuf,
    dest: PathBuf,
    done: bool,
}

impl Temp {
    pub(crate) fn new(dest: &Path) -> Self {
        Temp { tmp: temp_path_for(dest), dest: dest.to_path_buf(), done: false }
    }
    pub(crate) fn commit(&mut self) -> anyhow::Result<()> {
        File::open(&self.tmp).and_then(|f| f.sync_all()).with_context(|| format!("{}: cannot sync", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.dest).with_context(|| format!("cannot move {} to {}", self.tmp.display(), self.dest.display()))?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A sink's `finish` check: every row of the input was written.
fn all_rows_written(written: usize, n: usize) -> anyhow::Result<()> {
    if written != n {
        bail!("internal error: {written} of {n} rows written");
    }
    Ok(())
}

/// Closes an output (`what` names the step in an error) and moves it into place: how each
/// single-file sink finishes.
fn close_and_commit(path: &Path, temp: &mut Temp, what: &str, close: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<Vec<PathBuf>> {
    close().with_context(|| format!("{}: {what}", path.display()))?;
    temp.commit()?;
    Ok(vec![path.to_path_buf()])
}

fn check_order(expected: usize, start: usize, d: usize, emb: &[f32], ids: &[String]) -> anyhow::Result<()> {
    if start != expected || emb.len() != ids.len() * d {
        bail!("internal error: rows {start}.. written out of order (expected {expected}) or with the wrong width");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// HDF5 helpers (anndata's on-disk encodings): the h5ad writer's, under the names used here.

pub(crate) use scgpt_data::h5ad::{vlen, write_encoding as encoding, write_str_attr as str_attr, write_string_array as string_array};

fn create_obsm(file: &hdf5::File, n: usize, d: usize) -> hdf5::Result<Dataset> {
    let obsm = if file.link_exists("obsm") {
        file.group("obsm")?
    } else {
        let g = file.create_group("obsm")?;
        encoding(&g, "dict", "0.1.0")?;
        g
    };
    if obsm.link_exists(OBSM_KEY) {
        obsm.unlink(OBSM_KEY)?;
    }
    let chunk_rows = n.clamp(1, (1 << 20) / d.max(1)).max(1);
    let ds = obsm.new_dataset::<f32>().shape([n, d]).chunk([chunk_rows, d]).create(OBSM_KEY)?;
    encoding(&ds, "array", "0.2.0")?;
    Ok(ds)
}

fn write_rows(ds: &Dataset, start: usize, d: usize, emb: &[f32]) -> hdf5::Result<()> {
    let b = emb.len() / d;
    if b == 0 {
        return Ok(());
    }
    let view = ndarray::ArrayView2::from_shape((b, d), emb).expect("b * d values");
    ds.write_slice(view, ndarray::s![start..start + b, ..])
}

// ---------------------------------------------------------------------------------------------
// h5ad: a copy of the input h5ad with obsm/X_scGPT

/// A copy of `input` at `tmp` that can be opened read-write (a read-only input would give a
/// read-only copy: `fs::copy` keeps the permission bits).
pub(crate) fn copy_writable(input: &Path, tmp: &Path) -> anyhow::Result<()> {
    std::fs::copy(input, tmp).with_context(|| format!("cannot copy {} to {}", input.display(), tmp.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mut perm = std::fs::metadata(tmp)?.permissions();
        perm.set_mode(perm.mode() | 0o200);
        std::fs::set_permissions(tmp, perm).with_context(|| format!("{}: cannot make the copy writable", tmp.display()))?;
    }
    Ok(())
}

pub struct H5adCopySink {
    path: PathBuf,
    temp: Temp,
    file: Option<hdf5::File>,
    ds: Option<Dataset>,
    d: usize,
    written: usize,
    n: usize,
}

impl H5adCopySink {
    pub fn create(input: &Path, output: &Path, n: usize, d: usize) -> anyhow::Result<Self> {
        let temp = Temp::new(output);
        copy_writable(input, &temp.tmp)?;
        let e = |what: &str| format!("{}: {what}", output.display());
        let file = hdf5::File::open_rw(&temp.tmp).with_context(|| e("cannot open the copy read-write"))?;
        let ds = create_obsm(&file, n, d).with_context(|| e("cannot create obsm/X_scGPT"))?;
        Ok(H5adCopySink { path: output.to_path_buf(), temp, file: Some(file), ds: Some(ds), d, written: 0, n })
    }
}

impl H5adCopySink {
    /// `uns[key]`: a list of strings saying how the embedding was made (replaced if present).
    pub fn note(&mut self, key: &str, values: &[String]) -> anyhow::Result<()> {
        let file = self.file.as_ref().expect("open");
        let uns = match file.group("uns") {
            Ok(g) => g,
            Err(_) => file.create_group("uns")?,
        };
        if uns.link_exists(key) {
            uns.unlink(key)?;
        }
        string_array(&uns, key, values).with_context(|| format!("{}: writing uns/{key}", self.path.display()))
    }
}

impl Sink for H5adCopySink {
    fn write(&mut self, start: usize, emb: &[f32], ids: &[String], _: Option<&[String]>) -> anyhow::Result<()> {
        check_order(self.written, start, self.d, emb, ids)?;
        write_rows(self.ds.as_ref().expect("open"), start, self.d, emb)
            .with_context(|| format!("{}: writing obsm/{OBSM_KEY}", self.path.display()))?;
        self.written += ids.len();
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> anyhow::Result<Vec<PathBuf>> {
        all_rows_written(self.written, self.n)?;
        drop(self.ds.take());
        let file = self.file.take().expect("open");
        close_and_commit(&self.path, &mut self.temp, "closing", || Ok(file.close()?))
    }
}

// ---------------------------------------------------------------------------------------------
// h5ad: a new AnnData for shard-set input

pub struct H5adNewSink {
    path: PathBuf,
    temp: Temp,
    file: Option<hdf5::File>,
    ds: Option<Dataset>,
    d: usize,
    n: usize,
    ids: Vec<String>,
    datasets: Vec<String>,
}

impl H5adNewSink {
    pub fn create(output: &Path, n: usize, d: usize) -> anyhow::Result<Self> {
        let temp = Temp::new(output);
        let file = hdf5::File::create(&temp.tmp).with_context(|| format!("{}: cannot create", temp.tmp.display()))?;
        let ds = create_obsm(&file, n, d).with_context(|| format!("{}: cannot create obsm/X_scGPT", output.display()))?;
        Ok(H5adNewSink {
            path: output.to_path_buf(),
            temp,
            file: Some(file),
            ds: Some(ds),
            d,
            n,
            ids: Vec::with_capacity(n),
            datasets: Vec::with_capacity(n),
        })
    }

    fn write_frames(&self, file: &hdf5::File) -> hdf5::Result<()> {
        let n = self.ids.len();
        // X: an empty [n, 0] CSR matrix (the embeddings are the content).
        let x = file.create_group("X")?;
        encoding(&x, "csr_matrix", "0.1.0")?;
        x.new_attr::<i64>().shape(2).create("shape")?.write_raw(&[n as i64, 0])?;
        x.new_dataset::<f32>().shape(0).create("data")?;
        x.new_dataset::<i32>().shape(0).create("indices")?;
        x.new_dataset_builder().with_data(&vec![0i64; n + 1]).create("indptr")?;

        let obs = file.create_group("obs")?;
        encoding(&obs, "dataframe", "0.2.0")?;
        str_attr(&obs, "_index", "_index")?;
        obs.new_attr::<VarLenUnicode>().shape(1).create("column-order")?.write_raw(&[vlen("dataset")])?;
        string_array(&obs, "_index", &self.ids)?;
        let mut cats: Vec<String> = self.datasets.clone();
        cats.sort();
        cats.dedup();
        let codes: Vec<i32> = self.datasets.iter().map(|s| cats.binary_search(s).expect("a category") as i32).collect();
        let col = obs.create_group("dataset")?;
        encoding(&col, "categorical", "0.2.0")?;
        col.new_attr::<bool>().shape(()).create("ordered")?.write_scalar(&false)?;
        string_array(&col, "categories", &cats)?;
        col.new_dataset_builder().with_data(&codes).create("codes")?;

        let var = file.create_group("var")?;
        encoding(&var, "dataframe", "0.2.0")?;
        str_attr(&var, "_index", "_index")?;
        var.new_attr::<VarLenUnicode>().shape(0).create("column-order")?;
        string_array(&var, "_index", &[])?;
        for g in ["varm", "obsp", "varp", "layers", "uns"] {
            let g = file.create_group(g)?;
            encoding(&g, "dict", "0.1.0")?;
        }
        encoding(file, "anndata", "0.1.0")
    }
}

impl Sink for H5adNewSink {
    fn write(&mut self, start: usize, emb: &[f32], ids: &[String], datasets: Option<&[String]>) -> anyhow::Result<()> {
        check_order(self.ids.len(), start, self.d, emb, ids)?;
        write_rows(self.ds.as_ref().expect("open"), start, self.d, emb)
            .with_context(|| format!("{}: writing obsm/{OBSM_KEY}", self.path.display()))?;
        self.ids.extend_from_slice(ids);
        match datasets {
            Some(ds) => self.datasets.extend_from_slice(ds),
            None => self.datasets.extend(ids.iter().map(|_| String::new())),
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> anyhow::Result<Vec<PathBuf>> {
        all_rows_written(self.ids.len(), self.n)?;
        drop(self.ds.take());
        let file = self.file.take().expect("open");
        self.write_frames(&file).with_context(|| format!("{}: writing obs/var", self.path.display()))?;
        close_and_commit(&self.path, &mut self.temp, "closing", || Ok(file.close()?))
    }
}

// ---------------------------------------------------------------------------------------------
// Parquet

pub struct ParquetSink {
    path: PathBuf,
    temp: Temp,
    writer: Option<ArrowWriter<File>>,
    schema: Arc<Schema>,
    d: usize,
    with_dataset: bool,
    written: usize,
    n: usize,
}

impl ParquetSink {
    pub fn create(output: &Path, n: usize, d: usize, with_dataset: bool) -> anyhow::Result<Self> {
        let temp = Temp::new(output);
        let mut fields = vec![Field::new("cell_id", DataType::Utf8, false)];
        if with_dataset {
            fields.push(Field::new("dataset", DataType::Utf8, false));
        }
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        fields.push(Field::new(OBSM_KEY, DataType::FixedSizeList(item, d as i32), false));
        let schema = Arc::new(Schema::new(fields));
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
            .set_created_by(format!("scgpt-rs scgpt {}", env!("CARGO_PKG_VERSION")))
            .build();
        let f = File::create(&temp.tmp).with_context(|| format!("{}: cannot create", temp.tmp.display()))?;
        let writer = ArrowWriter::try_new(f, schema.clone(), Some(props))?;
        Ok(ParquetSink { path: output.to_path_buf(), temp, writer: Some(writer), schema, d, with_dataset, written: 0, n })
    }
}

impl Sink for ParquetSink {
    fn write(&mut self, start: usize, emb: &[f32], ids: &[String], datasets: Option<&[String]>) -> anyhow::Result<()> {
        check_order(self.written, start, self.d, emb, ids)?;
        let mut cols: Vec<ArrayRef> = vec![Arc::new(StringArray::from_iter_values(ids))];
        if self.with_dataset {
            let ds = datasets.context("internal error: dataset column expected")?;
            cols.push(Arc::new(StringArray::from_iter_values(ds)));
        }
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let values = Arc::new(Float32Array::from(emb.to_vec()));
        cols.push(Arc::new(FixedSizeListArray::try_new(item, self.d as i32, values, None)?));
        let batch = RecordBatch::try_new(self.schema.clone(), cols)?;
        self.writer.as_mut().expect("open").write(&batch).with_context(|| format!("{}: writing", self.path.display()))?;
        self.written += ids.len();
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> anyhow::Result<Vec<PathBuf>> {
        all_rows_written(self.written, self.n)?;
        let writer = self.writer.take().expect("open");
        close_and_commit(&self.path, &mut self.temp, "finishing", || writer.close().map(drop).map_err(Into::into))
    }
}

// ---------------------------------------------------------------------------------------------
// .npy + cell ids

pub fn npy_ids_path(output: &Path) -> PathBuf {
    output.with_extension("cell_ids.txt")
}

/// The `.npy` v1.0 header for a C-order little-endian float32 `[n, d]` array.
pub fn npy_header(n: usize, d: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n}, {d}), }}");
    // magic (6) + version (2) + header length (2) + dict + padding + '\n', a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let header_len = dict.len() + pad + 1;
    let mut out = Vec::with_capacity(10 + header_len);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header_len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    out
}

pub struct NpySink {
    path: PathBuf,
    ids_path: PathBuf,
    temp: Temp,
    ids_temp: Temp,
    out: Option<BufWriter<File>>,
    ids_out: Option<BufWriter<File>>,
    d: usize,
    written: usize,
    n: usize,
}

impl NpySink {
    pub fn create(output: &Path, n: usize, d: usize) -> anyhow::Result<Self> {
        let ids_path = npy_ids_path(output);
        let temp = Temp::new(output);
        let ids_temp = Temp::new(&ids_path);
        let f = File::create(&temp.tmp).with_context(|| format!("{}: cannot create", temp.tmp.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(&npy_header(n, d))?;
        let g = File::create(&ids_temp.tmp).with_context(|| format!("{}: cannot create", ids_temp.tmp.display()))?;
        Ok(NpySink {
            path: output.to_path_buf(),
            ids_path,
            temp,
            ids_temp,
            out: Some(out),
            ids_out: Some(BufWriter::new(g)),
            d,
            written: 0,
            n,
        })
    }
}

impl Sink for NpySink {
    fn write(&mut self, start: usize, emb: &[f32], ids: &[String], _: Option<&[String]>) -> anyhow::Result<()> {
        check_order(self.written, start, self.d, emb, ids)?;
        let out = self.out.as_mut().expect("open");
        let mut bytes = Vec::with_capacity(emb.len() * 4);
        for v in emb {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        out.write_all(&bytes).with_context(|| format!("{}: writing", self.path.display()))?;
        let ids_out = self.ids_out.as_mut().expect("open");
        for id in ids {
            // One id per line: line breaks inside an id would shift every later row.
            writeln!(ids_out, "{}", id.replace(['\n', '\r'], " ")).with_context(|| format!("{}: writing", self.ids_path.display()))?;
        }
        self.written += ids.len();
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> anyhow::Result<Vec<PathBuf>> {
        all_rows_written(self.written, self.n)?;
        for (w, p) in [(self.out.take(), &self.path), (self.ids_out.take(), &self.ids_path)] {
            let w = w.expect("open");
            w.into_inner()
                .map_err(|e| anyhow::anyhow!("{}: {}", p.display(), e.error()))?
                .sync_all()
                .with_context(|| format!("{}: cannot sync", p.display()))?;
        }
        self.temp.commit()?;
        self.ids_temp.commit()?;
        Ok(vec![self.path.clone(), self.ids_path.clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_header_is_aligned_and_parsable() {
        for (n, d) in [(0, 1), (30, 32), (123_456_789, 512)] {
            let h = npy_header(n, d);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            let len = u16::from_le_bytes([h[8], h[9]]) as usize;
            assert_eq!(len + 10, h.len());
            let text = std::str::from_utf8(&h[10..]).unwrap();
            assert!(text.ends_with('\n'));
            assert!(text.contains(&format!("'shape': ({n}, {d})")));
        }
    }

    #[test]
    fn ids_path_replaces_the_extension() {
        assert_eq!(npy_ids_path(Path::new("/a/emb.npy")), PathBuf::from("/a/emb.cell_ids.txt"));
    }
}
