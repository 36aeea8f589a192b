//! AnnData h5ad files over HDF5: a bounded-memory reader and a writer.
//!
//! The reader takes counts from `raw/X` when present, else `X`; CSR, CSC or dense; any integer
//! width for `indptr`/`indices` and any float or integer width for values (HDF5 converts on
//! read). Rows are read in blocks through hyperslabs so memory is bounded by the block, not the
//! file. CSC has no row-contiguous layout, so a CSC matrix is transposed in column chunks into
//! CSR row blocks kept in memory (reported up front; CELLxGENE files are CSR).
//!
//! Encodings understood: anndata >= 0.8 (`encoding-type` attributes, categorical groups with
//! `codes` + `categories`) and the 0.7 layouts (`h5sparse_format`, categorical codes datasets
//! with a `categories` attribute and an `__categories/<col>` dataset, `raw.X` at top level).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::h5_direct::{DirectDataset, Elem, OffsetVec};

use hdf5::types::{TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::{Dataset, Group, Location};

#[derive(Debug, thiserror::Error)]
pub enum H5adError {
    #[error("{path}: file not found")]
    NotFound { path: PathBuf },
    #[error("{path}: not an HDF5 file (h5ad files are HDF5); check the path or re-export it with anndata's write_h5ad")]
    NotHdf5 { path: PathBuf },
    #[error("{path}: missing `{field}`: {hint}")]
    Missing { path: PathBuf, field: String, hint: String },
    #[error("{path}: field `{field}`: {message}")]
    Invalid { path: PathBuf, field: String, message: String },
    #[error("{path}: field `{field}`: HDF5 error: {source}")]
    Hdf5 { path: PathBuf, field: String, source: hdf5::Error },
}

pub type Result<T> = std::result::Result<T, H5adError>;

/// Which matrix the reader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixChoice {
    /// `raw/X` when present, else `X` (the data-prep default: counts live in raw for CELLxGENE).
    RawThenX,
    /// `X` only.
    X,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Csr,
    Csc,
    Dense,
}

/// A block of consecutive rows in CSR form; `indptr` is relative to the block (starts at 0).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowBlock {
    pub start: usize,
    pub indptr: Vec<usize>,
    pub indices: OffsetVec<u32>,
    pub data: OffsetVec<f32>,
}

impl RowBlock {
    pub fn n_rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }
    /// Column indices and values of row `i` of the block.
    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.indptr[i], self.indptr[i + 1]);
        (&self.indices[a..b], &self.data[a..b])
    }
}

pub struct H5adReader {
    path: PathBuf,
    file: hdf5::File,
    matrix_path: String,
    var_path: String,
    layout: Layout,
    n_obs: usize,
    n_vars: usize,
    /// CSC matrices are transposed once into CSR on first use.
    csc_as_csr: Option<RowBlock>,
    /// CSR `data` and `indices` when both can be read with plain preads (no filters).
    direct: Option<(DirectDataset, DirectDataset)>,
}

/// Reader threads of [`H5adReader::stream_rows`], at most.
const MAX_READ_AHEAD: usize = 16;

const HDF5_MAGIC: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

fn is_hdf5(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    // The superblock sits at 0, 512, 1024, 2048, ... (a user block may precede it).
    let mut offset = 0u64;
    let mut buf = [0u8; 8];
    while offset + 8 <= len {
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut buf)?;
        if &buf == HDF5_MAGIC {
            return Ok(true);
        }
        offset = if offset == 0 { 512 } else { offset * 2 };
    }
    Ok(false)
}

impl H5adReader {
    pub fn open(path: &Path, choice: MatrixChoice) -> Result<Self> {
        let mut me = Self::open_matrix(path, choice)?;
        if me.layout == Layout::Csr {
            let (data, indices, _) = me.sparse_parts()?;
            me.direct = match (DirectDataset::open(path, &data), DirectDataset::open(path, &indices)) {
                (Some(d), Some(i)) if d.elem == Elem::F32 && i.elem != Elem::F32 && d.len() == i.len() => Some((d, i)),
                _ => None,
            };
        }
        Ok(me)
    }

    /// Cells in the file's matrix, without preparing to read it: locating every chunk of a
    /// large file (HDF5 1.10 walks its chunk index once per chunk) took ~1 s at 1M cells.
    pub fn count_cells(path: &Path, choice: MatrixChoice) -> Result<usize> {
        Ok(Self::open_matrix(path, choice)?.n_obs)
    }

    /// The file opened and its matrix located and checked; no direct reads set up.
    fn open_matrix(path: &Path, choice: MatrixChoice) -> Result<Self> {
        if !path.exists() {
            return Err(H5adError::NotFound { path: path.to_path_buf() });
        }
        match is_hdf5(path) {
            Ok(true) => {}
            Ok(false) => return Err(H5adError::NotHdf5 { path: path.to_path_buf() }),
            Err(e) => {
                return Err(H5adError::Invalid { path: path.to_path_buf(), field: "/".into(), message: e.to_string() })
            }
        }
        let file = hdf5::File::open(path).map_err(|source| H5adError::Hdf5 {
            path: path.to_path_buf(),
            field: "/".into(),
            source,
        })?;
        let candidates: &[(&str, &str)] = match choice {
            MatrixChoice::RawThenX => &[("raw/X", "raw/var"), ("raw.X", "raw.var"), ("X", "var")],
            MatrixChoice::X => &[("X", "var")],
        };
        let Some(&(matrix_path, var_path)) = candidates.iter().find(|(m, _)| exists(&file, m)) else {
            return Err(H5adError::Missing {
                path: path.to_path_buf(),
                field: "X".into(),
                hint: "the file has no expression matrix (neither raw/X nor X); write one with anndata".into(),
            });
        };
        let mut me = H5adReader {
            path: path.to_path_buf(),
            file,
            matrix_path: matrix_path.to_string(),
            var_path: var_path.to_string(),
            layout: Layout::Dense,
            n_obs: 0,
            n_vars: 0,
            csc_as_csr: None,
            direct: None,
        };
        me.inspect_matrix()?;
        Ok(me)
    }

    fn err(&self, field: &str) -> impl Fn(hdf5::Error) -> H5adError + '_ {
        let field = field.to_string();
        move |source| H5adError::Hdf5 { path: self.path.clone(), field: field.clone(), source }
    }

    fn invalid(&self, field: &str, message: impl Into<String>) -> H5adError {
        H5adError::Invalid { path: self.path.clone(), field: field.into(), message: message.into() }
    }

    fn inspect_matrix(&mut self) -> Result<()> {
        let mp = self.matrix_path.clone();
        let is_group = matches!(self.file.loc_type_by_name(&mp), Ok(hdf5::LocationType::Group));
        if is_group {
            let g = self.file.group(&mp).map_err(self.err(&mp))?;
            let enc = string_attr(&g, "encoding-type").or_else(|| string_attr(&g, "h5sparse_format"));
            self.layout = match enc.as_deref() {
                Some("csr_matrix") | Some("csr") => Layout::Csr,
                Some("csc_matrix") | Some("csc") => Layout::Csc,
                other => {
                    return Err(self.invalid(
                        &mp,
                        format!("unsupported matrix encoding {other:?}; expected csr_matrix, csc_matrix or a dense array"),
                    ))
                }
            };
            let shape = int_array_attr(&g, "shape")
                .or_else(|| int_array_attr(&g, "h5sparse_shape"))
                .ok_or_else(|| self.invalid(&mp, "sparse matrix has no `shape` attribute"))?;
            if shape.len() != 2 {
                return Err(self.invalid(&mp, format!("shape {shape:?} is not 2-D")));
            }
            self.n_obs = shape[0] as usize;
            self.n_vars = shape[1] as usize;
            for name in ["data", "indices", "indptr"] {
                if !g.link_exists(name) {
                    return Err(H5adError::Missing {
                        path: self.path.clone(),
                        field: format!("{mp}/{name}"),
                        hint: "a sparse matrix needs data, indices and indptr".into(),
                    });
                }
            }
            let indptr_len = g.dataset("indptr").map_err(self.err(&mp))?.shape().first().copied().unwrap_or(0);
            let major = if self.layout == Layout::Csr { self.n_obs } else { self.n_vars };
            if indptr_len != major + 1 {
                return Err(self.invalid(
                    &format!("{mp}/indptr"),
                    format!("has {indptr_len} entries but the shape {:?} needs {}", [self.n_obs, self.n_vars], major + 1),
                ));
            }
        } else {
            let ds = self.file.dataset(&mp).map_err(self.err(&mp))?;
            let shape = ds.shape();
            if shape.len() != 2 {
                return Err(self.invalid(&mp, format!("dense matrix has shape {shape:?}, expected 2-D")));
            }
            self.layout = Layout::Dense;
            self.n_obs = shape[0];
            self.n_vars = shape[1];
        }
        Ok(())
    }

    /// Reads the CSR arrays with `O_DIRECT`, bypassing the page cache, where the file's layout
    /// and file system allow it; returns whether both arrays will be. Faster for files read
    /// cold (the usual corpus build); pages already cached are still read from the cache.
    pub fn use_direct_io(&mut self) -> bool {
        let path = self.path.clone();
        match &mut self.direct {
            Some((d, i)) => d.use_direct_io(&path) & i.use_direct_io(&path),
            None => false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn matrix_path(&self) -> &str {
        &self.matrix_path
    }
    pub fn layout(&self) -> Layout {
        self.layout
    }
    pub fn n_obs(&self) -> usize {
        self.n_obs
    }
    pub fn n_vars(&self) -> usize {
        self.n_vars
    }

    /// Gene names for the matrix columns: the var index, or the var column `gene_col`.
    /// If the matrix is `raw/X` and `raw/var` lacks `gene_col`, the column is taken from `var`
    /// through the shared gene index (CELLxGENE keeps `feature_name` only in `var`).
    pub fn var_names(&self, gene_col: Option<&str>) -> Result<Vec<String>> {
        let var = self.group_at(&self.var_path)?;
        let index = read_index(&var, &self.var_path, &self.path)?;
        if index.len() != self.n_vars {
            return Err(self.invalid(
                &self.var_path,
                format!("has {} genes but the matrix has {} columns", index.len(), self.n_vars),
            ));
        }
        let Some(col) = gene_col else { return Ok(index) };
        if has_column(&var, col) {
            return self.read_column_of(&var, &self.var_path, col);
        }
        if self.var_path != "var" && exists(&self.file, "var") {
            let main = self.group_at("var")?;
            if has_column(&main, col) {
                let main_index = read_index(&main, "var", &self.path)?;
                let values = self.read_column_of(&main, "var", col)?;
                let lookup: HashMap<&str, &str> =
                    main_index.iter().map(String::as_str).zip(values.iter().map(String::as_str)).collect();
                return Ok(index.iter().map(|g| lookup.get(g.as_str()).map(|s| s.to_string()).unwrap_or_default()).collect());
            }
        }
        let available = self.columns_of(&self.var_path)?;
        Err(H5adError::Missing {
            path: self.path.clone(),
            field: format!("{}/{col}", self.var_path),
            hint: format!(
                "gene column `{col}` not found; available columns: [{}]; pass --gene-col with one of them, or omit it to use the var index",
                available.join(", ")
            ),
        })
    }

    /// The obs index (cell ids).
    pub fn obs_names(&self) -> Result<Vec<String>> {
        self.obs_index()?.read(0..self.n_obs)
    }

    /// The cell ids, to be read a range at a time.
    pub fn obs_index(&self) -> Result<ObsNames> {
        let obs = self.group_at("obs")?;
        let (ds, field) = index_dataset(&obs, "obs", &self.path)?;
        let len = if ds.ndim() == 1 { ds.shape()[0] } else { usize::MAX };
        if len != self.n_obs {
            return Err(self.invalid("obs", format!("has an index of shape {:?} but the matrix has {} rows", ds.shape(), self.n_obs)));
        }
        Ok(ObsNames { ds, field, path: self.path.clone(), len })
    }

    pub fn obs_columns(&self) -> Result<Vec<String>> {
        self.columns_of("obs")
    }

    /// An obs column as strings: categories decoded, numbers and booleans formatted.
    pub fn obs_column(&self, name: &str) -> Result<Vec<String>> {
        let obs = self.group_at("obs")?;
        if !has_column(&obs, name) {
            return Err(H5adError::Missing {
                path: self.path.clone(),
                field: format!("obs/{name}"),
                hint: format!("available obs columns: [{}]", self.columns_of("obs")?.join(", ")),
            });
        }
        let v = self.read_column_of(&obs, "obs", name)?;
        if v.len() != self.n_obs {
            return Err(self.invalid(&format!("obs/{name}"), format!("has {} values for {} cells", v.len(), self.n_obs)));
        }
        Ok(v)
    }

    /// `uns[name]` when it is a dict of string (or number) arrays, as GEARS keeps its DE gene
    /// lists (`rank_genes_groups_cov_all`, `top_non_dropout_de_20`); `None` when absent.
    pub fn uns_string_lists(&self, name: &str) -> Result<Option<std::collections::BTreeMap<String, Vec<String>>>> {
        let p = format!("uns/{name}");
        if !exists(&self.file, &p) {
            return Ok(None);
        }
        let g = match self.file.group(&p) {
            Ok(g) => g,
            Err(_) => return Err(self.invalid(&p, "expected a dict of arrays (an HDF5 group)")),
        };
        let mut out = std::collections::BTreeMap::new();
        for key in g.member_names().map_err(self.err(&p))? {
            let field = format!("{p}/{key}");
            let ds = g.dataset(&key).map_err(|_| self.invalid(&field, "expected an array"))?;
            out.insert(key, read_any_as_strings(&ds, &field, &self.path, None)?);
        }
        Ok(Some(out))
    }

    fn group_at(&self, p: &str) -> Result<Group> {
        if !exists(&self.file, p) {
            return Err(H5adError::Missing {
                path: self.path.clone(),
                field: p.into(),
                hint: "every h5ad file has obs and var dataframes; re-export it with anndata".into(),
            });
        }
        self.file.group(p).map_err(self.err(p))
    }

    fn columns_of(&self, p: &str) -> Result<Vec<String>> {
        let g = self.group_at(p)?;
        let index_name = string_attr(&g, "_index").unwrap_or_else(|| "_index".into());
        let mut names: Vec<String> = g
            .member_names()
            .map_err(self.err(p))?
            .into_iter()
            .filter(|n| n != &index_name && n != "__categories")
            .collect();
        names.sort();
        Ok(names)
    }

    fn read_column_of(&self, g: &Group, gpath: &str, col: &str) -> Result<Vec<String>> {
        let field = format!("{gpath}/{col}");
        let is_group = matches!(g.loc_type_by_name(col), Ok(hdf5::LocationType::Group));
        if is_group {
            let cg = g.group(col).map_err(self.err(&field))?;
            if cg.link_exists("codes") && cg.link_exists("categories") {
                let cats = read_strings(&cg.dataset("categories").map_err(self.err(&field))?, &field, &self.path, None)?;
                let codes: Vec<i64> = cg.dataset("codes").and_then(|d| d.read_raw()).map_err(self.err(&field))?;
                return decode_categorical(&codes, &cats, &field, &self.path);
            }
            return Err(self.invalid(&field, "unsupported column encoding (a group that is not a categorical)"));
        }
        let ds = g.dataset(col).map_err(self.err(&field))?;
        // anndata 0.7: integer codes with a `categories` attribute pointing at __categories/<col>.
        if ds.attr_names().map(|a| a.iter().any(|n| n == "categories")).unwrap_or(false) {
            let cat_path = format!("__categories/{col}");
            if g.link_exists(&cat_path) {
                let cats = read_strings(&g.dataset(&cat_path).map_err(self.err(&field))?, &field, &self.path, None)?;
                let codes: Vec<i64> = ds.read_raw().map_err(self.err(&field))?;
                return decode_categorical(&codes, &cats, &field, &self.path);
            }
        }
        read_any_as_strings(&ds, &field, &self.path, None)
    }

    /// Rows `start..end` as a CSR block, values as f32.
    pub fn read_rows(&mut self, start: usize, end: usize) -> Result<RowBlock> {
        let end = end.min(self.n_obs);
        let start = start.min(end);
        match self.layout {
            Layout::Csr => self.read_csr_rows(start, end, false),
            Layout::Dense => self.read_dense_rows(start, end),
            Layout::Csc => {
                if self.csc_as_csr.is_none() {
                    self.csc_as_csr = Some(self.transpose_csc()?);
                }
                let all = self.csc_as_csr.as_ref().expect("just built");
                let (a, b) = (all.indptr[start], all.indptr[end]);
                Ok(RowBlock {
                    start,
                    indptr: all.indptr[start..=end].iter().map(|p| p - a).collect(),
                    indices: all.indices[a..b].to_vec().into(),
                    data: all.data[a..b].to_vec().into(),
                })
            }
        }
    }

    /// Rows `start..end` in blocks of `block_rows`, handed to `sink` in order until it returns
    /// false or a read fails (the error is handed over, then reading stops). Directly read CSR
    /// files have several blocks in flight, about `in_flight_bytes` in all: this project's
    /// disk, like most network storage, delivers in proportion to the bytes requested at once
    /// (`dd iflag=direct`: 0.9 GB/s with 64 MB in flight, 1.6–2.4 GB/s with 256 MB).
    pub fn stream_rows(&mut self, start: usize, end: usize, block_rows: usize, in_flight_bytes: usize, sink: impl FnMut(Result<RowBlock>) -> bool) {
        self.stream(start, end, block_rows, in_flight_bytes, false, sink)
    }

    /// Whether [`Self::stream_row_indices`] can read the column indices without the values:
    /// uncompressed CSR read directly.
    pub fn can_read_indices_alone(&self) -> bool {
        self.direct.is_some() && self.layout == Layout::Csr
    }

    /// [`Self::stream_rows`] with the column indices only (`data` left empty): half the bytes,
    /// for a pass that needs which genes each cell expresses but not how much. Falls back to
    /// both arrays where [`Self::can_read_indices_alone`] is false.
    pub fn stream_row_indices(&mut self, start: usize, end: usize, block_rows: usize, in_flight_bytes: usize, sink: impl FnMut(Result<RowBlock>) -> bool) {
        let alone = self.can_read_indices_alone();
        self.stream(start, end, block_rows, in_flight_bytes, alone, sink)
    }

    /// Stored values at `positions` (ascending offsets into the CSR `data` array): positions
    /// close together are read as one stretch (a gap of up to [`VALUE_GAP`] elements costs less
    /// to read through than a request of its own), stretches of at most [`VALUE_SPAN`] elements,
    /// [`VALUE_READERS`] at once, so that values spread over the whole file read at about the
    /// speed of a sequential pass. `None` where the values cannot be read apart from their rows
    /// (no direct CSR access).
    pub fn values_at(&self, positions: &[usize]) -> Option<Result<Vec<f32>>> {
        let (d, _) = self.direct.as_ref().filter(|_| self.layout == Layout::Csr)?;
        let stretches = value_stretches(positions);
        let mut out = vec![0f32; positions.len()];
        // Each stretch fills its own part of `out`; reader k takes stretches k, k + READERS, ...
        let readers = VALUE_READERS.min(stretches.len()).max(1);
        let mut work: Vec<Vec<(std::ops::Range<usize>, &mut [f32])>> = (0..readers).map(|_| Vec::new()).collect();
        let mut rest = &mut out[..];
        for (k, r) in stretches.into_iter().enumerate() {
            let (head, tail) = rest.split_at_mut(r.len());
            work[k % readers].push((r, head));
            rest = tail;
        }
        let failed = std::thread::scope(|s| {
            let handles: Vec<_> = work
                .into_iter()
                .map(|parts| {
                    s.spawn(move || -> std::io::Result<()> {
                        for (r, dst) in parts {
                            let (a, b) = (positions[r.start], positions[r.end - 1] + 1);
                            let words = d.read_words(a, b)?;
                            dst.iter_mut().zip(&positions[r]).for_each(|(v, &p)| *v = f32::from_bits(words[p - a]));
                        }
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().expect("value reader panicked").err()).next()
        });
        if let Some(e) = failed {
            let field = format!("{}/data", self.matrix_path);
            return Some(Err(H5adError::Invalid { path: self.path.clone(), field, message: e.to_string() }));
        }
        Some(Ok(out))
    }

    fn stream(&mut self, start: usize, end: usize, block_rows: usize, in_flight_bytes: usize, indices_only: bool, mut sink: impl FnMut(Result<RowBlock>) -> bool) {
        let (end, block_rows) = (end.min(self.n_obs), block_rows.max(1));
        let n_blocks = end.saturating_sub(start).div_ceil(block_rows);
        let block = |k: usize| (start + k * block_rows, (start + (k + 1) * block_rows).min(end));
        // Half the bytes per block when the values stay on disk: twice the blocks in flight.
        let depth = self.read_ahead_depth(block_rows, in_flight_bytes * if indices_only { 2 } else { 1 });
        if depth <= 1 {
            for (a, b) in (0..n_blocks).map(block) {
                let r = if indices_only { self.read_csr_rows(a, b, true) } else { self.read_rows(a, b) };
                let failed = r.is_err();
                if !sink(r) || failed {
                    return;
                }
            }
            return;
        }
        let this = &*self;
        std::thread::scope(|s| {
            // Worker w reads blocks w, w + depth, ...; each hands its block over before reading
            // the next (rendezvous channels), so at most `depth` blocks are held besides the
            // sink's, and the blocks come out in order.
            let receivers: Vec<_> = (0..depth)
                .map(|w| {
                    let (tx, rx) = crossbeam_channel::bounded::<Result<RowBlock>>(0);
                    let read = move || {
                        for (a, b) in (w..n_blocks).step_by(depth).map(block) {
                            let r = this.read_csr_rows(a, b, indices_only);
                            let failed = r.is_err();
                            if tx.send(r).is_err() || failed {
                                return;
                            }
                        }
                    };
                    std::thread::Builder::new().name(format!("h5-read-{w}")).spawn_scoped(s, read).expect("spawning a reader thread");
                    rx
                })
                .collect();
            for k in 0..n_blocks {
                let r = receivers[k % depth].recv().expect("a reader stops only after an error or its last block");
                let failed = r.is_err();
                // On a stop the receivers drop with this closure, ending the workers at their
                // next send, before the scope joins them.
                if !sink(r) || failed {
                    break;
                }
            }
        });
    }

    /// Blocks read at once by [`Self::stream_rows`]: 1 unless CSR is read directly (HDF5
    /// serialises its own reads, and dense or CSC input is not read this way).
    fn read_ahead_depth(&self, block_rows: usize, in_flight_bytes: usize) -> usize {
        let Some((data, _)) = self.direct.as_ref().filter(|_| self.layout == Layout::Csr && self.n_obs > 0) else {
            return 1;
        };
        let block_bytes = (data.len() as f64 / self.n_obs as f64 * block_rows as f64 * 8.0).max(1.0);
        ((in_flight_bytes as f64 / block_bytes) as usize).clamp(1, MAX_READ_AHEAD)
    }

    fn sparse_parts(&self) -> Result<(Dataset, Dataset, Dataset)> {
        let g = self.file.group(&self.matrix_path).map_err(self.err(&self.matrix_path))?;
        let f = |n: &str| g.dataset(n).map_err(self.err(&format!("{}/{n}", self.matrix_path)));
        Ok((f("data")?, f("indices")?, f("indptr")?))
    }

    /// `indices_only`: leave `data` empty (direct reads only).
    fn read_csr_rows(&self, start: usize, end: usize, indices_only: bool) -> Result<RowBlock> {
        let (data, indices, indptr) = self.sparse_parts()?;
        let field = format!("{}/indptr", self.matrix_path);
        let ptr: Vec<i64> = read_range(&indptr, start, end + 1).map_err(self.err(&field))?;
        let (a, b) = (ptr[0], *ptr.last().expect("non-empty"));
        let nnz_total = data.shape().first().copied().unwrap_or(0) as i64;
        if a < 0 || b < a || b > nnz_total || ptr.windows(2).any(|w| w[1] < w[0]) {
            return Err(self.invalid(&field, format!("is not monotone within [0, {nnz_total}] around rows {start}..{end}")));
        }
        let (a, b) = (a as usize, b as usize);
        let field = format!("{}/indices", self.matrix_path);
        let bad_index = |c: i64| self.invalid(&field, format!("column index {c} outside 0..{}", self.n_vars));
        let (vals, cols) = if let Some((d, i)) = &self.direct {
            let io = |field: String| move |e: std::io::Error| H5adError::Invalid { path: self.path.clone(), field: field.clone(), message: e.to_string() };
            // Both arrays at once: two requests in flight read faster than one (1.6 vs 1.3 GB/s).
            let (words, vals) = if indices_only {
                (i.read_words(a, b), Ok(OffsetVec::default()))
            } else {
                std::thread::scope(|s| {
                    let vals = s.spawn(|| d.read_words(a, b));
                    (i.read_words(a, b), vals.join().expect("read thread panicked"))
                })
            };
            let vals = vals.map_err(io(format!("{}/data", self.matrix_path)))?.cast();
            let words = words.map_err(io(field.clone()))?;
            (vals, self.checked_indices(words, i.elem == Elem::I32).map_err(bad_index)?)
        } else {
            let vals: Vec<f32> = read_range(&data, a, b).map_err(self.err(&format!("{}/data", self.matrix_path)))?;
            let cols = self.read_column_indices(&indices, a, b).map_err(self.err(&field))?.map_err(bad_index)?;
            (vals.into(), cols)
        };
        Ok(RowBlock { start, indptr: ptr.iter().map(|&p| p as usize - a).collect(), indices: cols, data: vals })
    }

    /// Column indices `a..b` as u32, read in the file's own integer type when it is 32-bit
    /// (scanpy and CELLxGENE write int32: no conversion by HDF5, half the bytes); `Err(c)`
    /// names the first index outside `0..n_vars`.
    fn read_column_indices(&self, ds: &Dataset, a: usize, b: usize) -> hdf5::Result<std::result::Result<OffsetVec<u32>, i64>> {
        use hdf5::types::{IntSize, TypeDescriptor};
        match ds.dtype()?.to_descriptor()? {
            TypeDescriptor::Integer(IntSize::U4) => {
                let idx: Vec<i32> = read_range(ds, a, b)?;
                Ok(self.checked_indices(idx.into_iter().map(|c| c as u32).collect::<Vec<_>>().into(), true)) // in place
            }
            TypeDescriptor::Unsigned(IntSize::U4) => Ok(self.checked_indices(read_range::<u32>(ds, a, b)?.into(), false)),
            _ => {
                let idx: Vec<i64> = read_range(ds, a, b)?;
                let n = self.n_vars as u64;
                if let Some(&c) = idx.iter().find(|&&c| c < 0 || c as u64 >= n) {
                    return Ok(Err(c));
                }
                Ok(Ok(idx.iter().map(|&c| c as u32).collect::<Vec<_>>().into()))
            }
        }
    }

    /// 32-bit column indices checked against `n_vars` by their maximum (a reduction the
    /// compiler vectorises; a fold of comparisons it did not); `signed` when they came from
    /// int32, whose negatives read as words >= 2^31 and fail the same check. `Err(c)` names
    /// the first bad index as the file holds it.
    fn checked_indices(&self, words: OffsetVec<u32>, signed: bool) -> std::result::Result<OffsetVec<u32>, i64> {
        let n = self.n_vars as u64;
        if max_word(&words).is_none_or(|m| (m as u64) < n) {
            return Ok(words);
        }
        let c = words.iter().find(|&&c| c as u64 >= n).copied().unwrap_or(0);
        Err(if signed { c as i32 as i64 } else { c as i64 })
    }

    fn read_dense_rows(&self, start: usize, end: usize) -> Result<RowBlock> {
        let ds = self.file.dataset(&self.matrix_path).map_err(self.err(&self.matrix_path))?;
        let (mut indptr, mut indices, mut data) = (vec![0], Vec::new(), Vec::new());
        if end > start {
            let arr = ds
                .read_slice_2d::<f32, _>(ndarray::s![start..end, ..])
                .map_err(self.err(&self.matrix_path))?;
            for row in arr.rows() {
                for (j, &v) in row.iter().enumerate() {
                    if v != 0.0 {
                        indices.push(j as u32);
                        data.push(v);
                    }
                }
                indptr.push(data.len());
            }
        }
        Ok(RowBlock { start, indptr, indices: indices.into(), data: data.into() })
    }

    /// CSC to CSR in column chunks (two passes: count per row, then fill).
    fn transpose_csc(&self) -> Result<RowBlock> {
        let (data, indices, indptr) = self.sparse_parts()?;
        let field = format!("{}/indptr", self.matrix_path);
        let colptr: Vec<i64> = indptr.read_raw().map_err(self.err(&field))?;
        let nnz = *colptr.last().unwrap_or(&0) as usize;
        let chunk = 1 << 22;
        let idx_field = format!("{}/indices", self.matrix_path);
        let mut counts = vec![0usize; self.n_obs + 1];
        let mut pos = 0;
        while pos < nnz {
            let end = (pos + chunk).min(nnz);
            let rows: Vec<i64> = read_range(&indices, pos, end).map_err(self.err(&idx_field))?;
            for r in rows {
                if r < 0 || r as usize >= self.n_obs {
                    return Err(self.invalid(&idx_field, format!("row index {r} outside 0..{}", self.n_obs)));
                }
                counts[r as usize + 1] += 1;
            }
            pos = end;
        }
        for i in 0..self.n_obs {
            counts[i + 1] += counts[i];
        }
        let mut fill = counts.clone();
        let mut out_idx = vec![0u32; nnz];
        let mut out_val = vec![0f32; nnz];
        let mut col = 0usize;
        pos = 0;
        while pos < nnz {
            let end = (pos + chunk).min(nnz);
            let rows: Vec<i64> = read_range(&indices, pos, end).map_err(self.err(&idx_field))?;
            let vals: Vec<f32> = read_range(&data, pos, end).map_err(self.err(&format!("{}/data", self.matrix_path)))?;
            for (k, (r, v)) in rows.into_iter().zip(vals).enumerate() {
                let global = pos + k;
                while colptr[col + 1] as usize <= global {
                    col += 1;
                }
                let slot = &mut fill[r as usize];
                out_idx[*slot] = col as u32;
                out_val[*slot] = v;
                *slot += 1;
            }
            pos = end;
        }
        Ok(RowBlock { start: 0, indptr: counts, indices: out_idx.into(), data: out_val.into() })
    }
}

fn read_range<T: hdf5::H5Type + Clone>(ds: &Dataset, a: usize, b: usize) -> hdf5::Result<Vec<T>> {
    if b <= a {
        return Ok(Vec::new());
    }
    let arr = ds.read_slice_1d::<T, _>(a..b)?;
    Ok(arr.into_raw_vec_and_offset().0)
}

fn exists(file: &hdf5::File, p: &str) -> bool {
    let mut cur = String::new();
    for part in p.split('/') {
        if !cur.is_empty() {
            cur.push('/');
        }
        cur.push_str(part);
        if !file.link_exists(&cur) {
            return false;
        }
    }
    true
}

fn has_column(g: &Group, col: &str) -> bool {
    !col.is_empty() && !col.contains('/') && g.link_exists(col)
}

fn string_attr(loc: &Location, name: &str) -> Option<String> {
    let a = loc.attr(name).ok()?;
    if let Ok(s) = a.read_scalar::<VarLenUnicode>() {
        return Some(s.as_str().to_string());
    }
    if let Ok(s) = a.read_scalar::<VarLenAscii>() {
        return Some(s.as_str().to_string());
    }
    None
}

fn int_array_attr(loc: &Location, name: &str) -> Option<Vec<i64>> {
    loc.attr(name).ok()?.read_raw::<i64>().ok()
}

/// The index dataset of a dataframe group and its field name.
fn index_dataset(g: &Group, gpath: &str, path: &Path) -> Result<(Dataset, String)> {
    let name = string_attr(g, "_index").unwrap_or_else(|| "_index".into());
    let field = format!("{gpath}/{name}");
    if !g.link_exists(&name) {
        return Err(H5adError::Missing {
            path: path.to_path_buf(),
            field,
            hint: "the dataframe has no index dataset".into(),
        });
    }
    let ds = g.dataset(&name).map_err(|source| H5adError::Hdf5 { path: path.into(), field: field.clone(), source })?;
    Ok((ds, field))
}

fn read_index(g: &Group, gpath: &str, path: &Path) -> Result<Vec<String>> {
    let (ds, field) = index_dataset(g, gpath, path)?;
    read_any_as_strings(&ds, &field, path, None)
}

/// The largest word: an unsigned 32-bit maximum, which the baseline x86-64 target (SSE2) has no
/// vector instruction for, so it is compiled for AVX2 too and picked at run time (2% of a prep
/// run as a scalar loop).
fn max_word(words: &[u32]) -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        fn max_avx2(words: &[u32]) -> Option<u32> {
            words.iter().copied().max()
        }
        // SAFETY: the feature is present.
        return unsafe { max_avx2(words) };
    }
    words.iter().copied().max()
}

/// [`H5adReader::values_at`] reads through gaps of up to this many elements (256 KiB): at
/// this disk's ~2 GB/s that costs about what a separate request's wait does.
const VALUE_GAP: usize = 1 << 16;
/// ... in stretches of at most this many elements (32 MiB each in memory) ...
const VALUE_SPAN: usize = 1 << 23;
/// ... with this many reads at once (the disk delivers in proportion to the bytes in flight).
const VALUE_READERS: usize = 8;

/// Index ranges of `positions` (ascending) that [`H5adReader::values_at`] reads as one stretch.
fn value_stretches(positions: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < positions.len() {
        let a = positions[i];
        let mut j = i + 1;
        while j < positions.len() && positions[j] - positions[j - 1] <= VALUE_GAP && positions[j] - a < VALUE_SPAN {
            j += 1;
        }
        out.push(i..j);
        i = j;
    }
    out
}

/// All of a 1-D dataset, or rows `rows` of it.
fn read_rows<T: hdf5::H5Type + Clone>(ds: &Dataset, rows: Option<std::ops::Range<usize>>) -> hdf5::Result<Vec<T>> {
    match rows {
        None => ds.read_raw::<T>(),
        Some(r) => Ok(ds.read_slice_1d::<T, _>(r)?.into_raw_vec_and_offset().0),
    }
}

fn read_strings(ds: &Dataset, field: &str, path: &Path, rows: Option<std::ops::Range<usize>>) -> Result<Vec<String>> {
    let hdf = |source| H5adError::Hdf5 { path: path.into(), field: field.into(), source };
    let desc = ds.dtype().and_then(|t| t.to_descriptor()).map_err(hdf)?;
    match desc {
        TypeDescriptor::VarLenUnicode => {
            Ok(read_rows::<VarLenUnicode>(ds, rows).map_err(hdf)?.iter().map(|s| s.as_str().to_string()).collect())
        }
        TypeDescriptor::VarLenAscii => {
            Ok(read_rows::<VarLenAscii>(ds, rows).map_err(hdf)?.iter().map(|s| s.as_str().to_string()).collect())
        }
        other => Err(H5adError::Invalid {
            path: path.into(),
            field: field.into(),
            message: format!("expected variable-length strings, found {other:?}; re-export the file with a current anndata"),
        }),
    }
}

fn read_any_as_strings(ds: &Dataset, field: &str, path: &Path, rows: Option<std::ops::Range<usize>>) -> Result<Vec<String>> {
    let hdf = |source| H5adError::Hdf5 { path: path.into(), field: field.into(), source };
    let desc = ds.dtype().and_then(|t| t.to_descriptor()).map_err(hdf)?;
    match desc {
        TypeDescriptor::VarLenUnicode | TypeDescriptor::VarLenAscii => read_strings(ds, field, path, rows),
        TypeDescriptor::Integer(_) | TypeDescriptor::Unsigned(_) => {
            Ok(read_rows::<i64>(ds, rows).map_err(hdf)?.iter().map(|v| v.to_string()).collect())
        }
        TypeDescriptor::Float(_) => Ok(read_rows::<f64>(ds, rows).map_err(hdf)?.iter().map(|v| v.to_string()).collect()),
        TypeDescriptor::Boolean | TypeDescriptor::Enum(_) => {
            Ok(read_rows::<bool>(ds, rows).map_err(hdf)?.iter().map(|v| v.to_string()).collect())
        }
        other => Err(H5adError::Invalid {
            path: path.into(),
            field: field.into(),
            message: format!("unsupported column type {other:?}"),
        }),
    }
}

/// The cell ids (obs index) of a file, read a range at a time: held whole, a 1M-cell file's
/// ids were ~150 MB of the prep run's peak memory, growing with the file.
pub struct ObsNames {
    ds: Dataset,
    field: String,
    path: PathBuf,
    len: usize,
}

impl ObsNames {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The ids of cells `rows` (clamped to the file).
    pub fn read(&self, rows: std::ops::Range<usize>) -> Result<Vec<String>> {
        let rows = rows.start.min(self.len)..rows.end.min(self.len);
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        read_any_as_strings(&self.ds, &self.field, &self.path, Some(rows))
    }
}

fn decode_categorical(codes: &[i64], cats: &[String], field: &str, path: &Path) -> Result<Vec<String>> {
    codes
        .iter()
        .map(|&c| {
            if c < 0 {
                Ok(String::new()) // anndata's missing value
            } else {
                cats.get(c as usize).cloned().ok_or_else(|| H5adError::Invalid {
                    path: path.into(),
                    field: field.into(),
                    message: format!("category code {c} outside the {} categories", cats.len()),
                })
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Writer

/// A dataframe column for [`H5adWriter`].
#[derive(Debug, Clone)]
pub enum Column {
    Categorical { codes: Vec<i32>, categories: Vec<String> },
    Strings(Vec<String>),
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl Column {
    /// Categorical from string values, categories sorted like pandas does.
    pub fn categorical_from<S: AsRef<str>>(values: &[S]) -> Column {
        let mut cats: Vec<String> = values.iter().map(|v| v.as_ref().to_string()).collect();
        cats.sort();
        cats.dedup();
        let lookup: HashMap<&str, i32> = cats.iter().enumerate().map(|(i, c)| (c.as_str(), i as i32)).collect();
        let codes = values.iter().map(|v| lookup[v.as_ref()]).collect();
        Column::Categorical { codes, categories: cats }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Frame {
    pub index: Vec<String>,
    pub columns: Vec<(String, Column)>,
}

/// Writes an h5ad with a CSR `X` streamed in row blocks; the file appears atomically on `finish`.
pub struct H5adWriter {
    final_path: PathBuf,
    tmp_path: PathBuf,
    file: hdf5::File,
    n_vars: usize,
    data: Dataset,
    indices: Dataset,
    indptr: Vec<i64>,
}

fn werr(path: &Path, field: &str) -> impl Fn(hdf5::Error) -> H5adError {
    let (path, field) = (path.to_path_buf(), field.to_string());
    move |source| H5adError::Hdf5 { path: path.clone(), field: field.clone(), source }
}

fn vlen(s: &str) -> VarLenUnicode {
    s.replace('\0', "").parse().expect("NUL removed, valid unicode")
}

fn write_str_attr(loc: &Location, name: &str, value: &str) -> hdf5::Result<()> {
    loc.new_attr::<VarLenUnicode>().shape(()).create(name)?.write_scalar(&vlen(value))
}

fn write_encoding(loc: &Location, kind: &str, version: &str) -> hdf5::Result<()> {
    write_str_attr(loc, "encoding-type", kind)?;
    write_str_attr(loc, "encoding-version", version)
}

fn write_string_array(g: &Group, name: &str, values: &[String]) -> hdf5::Result<()> {
    let v: Vec<VarLenUnicode> = values.iter().map(|s| vlen(s)).collect();
    let ds = g.new_dataset_builder().with_data(&v).create(name)?;
    write_encoding(&ds, "string-array", "0.2.0")
}

impl H5adWriter {
    pub fn create(path: &Path, n_vars: usize) -> Result<Self> {
        let tmp_path = crate::atomic::temp_path_for(path);
        let e = werr(path, "X");
        let file = hdf5::File::create(&tmp_path).map_err(werr(path, "/"))?;
        let x = file.create_group("X").map_err(&e)?;
        let chunk = 1 << 18;
        let data = x.new_dataset::<f32>().chunk(chunk).shape(0..).create("data").map_err(&e)?;
        let indices = x.new_dataset::<i32>().chunk(chunk).shape(0..).create("indices").map_err(&e)?;
        Ok(H5adWriter { final_path: path.to_path_buf(), tmp_path, file, n_vars, data, indices, indptr: vec![0] })
    }

    /// Append rows given in CSR form (relative `indptr`).
    pub fn append_rows(&mut self, indptr: &[usize], indices: &[u32], data: &[f32]) -> Result<()> {
        let e = werr(&self.final_path, "X");
        let nnz0 = *self.indptr.last().expect("starts with 0") as usize;
        let n = data.len();
        if n > 0 {
            self.data.resize(nnz0 + n).map_err(&e)?;
            self.indices.resize(nnz0 + n).map_err(&e)?;
            self.data.write_slice(data, nnz0..nnz0 + n).map_err(&e)?;
            let idx: Vec<i32> = indices.iter().map(|&i| i as i32).collect();
            self.indices.write_slice(&idx, nnz0..nnz0 + n).map_err(&e)?;
        }
        self.indptr.extend(indptr[1..].iter().map(|&p| (nnz0 + p) as i64));
        Ok(())
    }

    pub fn rows_written(&self) -> usize {
        self.indptr.len() - 1
    }

    /// Write obs/var and the AnnData metadata, close, and move the file into place.
    pub fn finish(self, obs: &Frame, var: &Frame) -> Result<()> {
        let p = self.final_path.clone();
        let e = werr(&p, "/");
        let n_obs = self.rows_written();
        if obs.index.len() != n_obs || var.index.len() != self.n_vars {
            return Err(H5adError::Invalid {
                path: p,
                field: "obs/var".into(),
                message: format!("index lengths {}/{} do not match matrix {n_obs}x{}", obs.index.len(), var.index.len(), self.n_vars),
            });
        }
        let x = self.file.group("X").map_err(&e)?;
        x.new_dataset_builder().with_data(&self.indptr).create("indptr").map_err(&e)?;
        write_encoding(&x, "csr_matrix", "0.1.0").map_err(&e)?;
        x.new_attr::<i64>()
            .shape(2)
            .create("shape")
            .and_then(|a| a.write_raw(&[n_obs as i64, self.n_vars as i64]))
            .map_err(&e)?;
        write_frame(&self.file, "obs", obs).map_err(werr(&p, "obs"))?;
        write_frame(&self.file, "var", var).map_err(werr(&p, "var"))?;
        for name in ["obsm", "varm", "obsp", "varp", "layers", "uns"] {
            let g = self.file.create_group(name).map_err(&e)?;
            write_encoding(&g, "dict", "0.1.0").map_err(&e)?;
        }
        write_encoding(&self.file, "anndata", "0.1.0").map_err(&e)?;
        drop(x);
        let H5adWriter { file, tmp_path, data, indices, .. } = self;
        drop((data, indices));
        file.close().map_err(&e)?;
        std::fs::rename(&tmp_path, &p).map_err(|err| H5adError::Invalid {
            path: p.clone(),
            field: "/".into(),
            message: format!("cannot move the finished file into place: {err}"),
        })?;
        Ok(())
    }
}

fn write_frame(file: &hdf5::File, name: &str, frame: &Frame) -> hdf5::Result<()> {
    let g = file.create_group(name)?;
    write_encoding(&g, "dataframe", "0.2.0")?;
    write_str_attr(&g, "_index", "_index")?;
    let order: Vec<VarLenUnicode> = frame.columns.iter().map(|(n, _)| vlen(n)).collect();
    g.new_attr::<VarLenUnicode>().shape(order.len()).create("column-order")?.write_raw(&order)?;
    write_string_array(&g, "_index", &frame.index)?;
    for (col, values) in &frame.columns {
        match values {
            Column::Strings(v) => write_string_array(&g, col, v)?,
            Column::F32(v) => {
                let ds = g.new_dataset_builder().with_data(v.as_slice()).create(col.as_str())?;
                write_encoding(&ds, "array", "0.2.0")?;
            }
            Column::I64(v) => {
                let ds = g.new_dataset_builder().with_data(v.as_slice()).create(col.as_str())?;
                write_encoding(&ds, "array", "0.2.0")?;
            }
            Column::Categorical { codes, categories } => {
                let cg = g.create_group(col)?;
                write_encoding(&cg, "categorical", "0.2.0")?;
                cg.new_attr::<bool>().shape(()).create("ordered")?.write_scalar(&false)?;
                write_string_array(&cg, "categories", categories)?;
                // anndata uses the smallest signed integer that fits the codes.
                if categories.len() < 127 {
                    let c: Vec<i8> = codes.iter().map(|&c| c as i8).collect();
                    cg.new_dataset_builder().with_data(&c).create("codes")?;
                } else {
                    cg.new_dataset_builder().with_data(codes.as_slice()).create("codes")?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(dir: &Path) -> PathBuf {
        let p = dir.join("tiny.h5ad");
        let mut w = H5adWriter::create(&p, 4).unwrap();
        w.append_rows(&[0, 2, 2], &[0, 3], &[1.0, 5.0]).unwrap();
        w.append_rows(&[0, 1], &[2], &[7.0]).unwrap();
        let obs = Frame {
            index: vec!["c0".into(), "c1".into(), "c2".into()],
            columns: vec![("cell_type".into(), Column::categorical_from(&["T", "B", "T"]))],
        };
        let var = Frame {
            index: vec!["G0".into(), "G1".into(), "G2".into(), "G3".into()],
            columns: vec![("feature_name".into(), Column::Strings(vec!["A".into(), "B".into(), "C".into(), "D".into()]))],
        };
        w.finish(&obs, &var).unwrap();
        p
    }

    #[test]
    fn writer_output_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = tiny(dir.path());
        let mut r = H5adReader::open(&p, MatrixChoice::RawThenX).unwrap();
        assert_eq!((r.n_obs(), r.n_vars(), r.layout()), (3, 4, Layout::Csr));
        assert_eq!(r.var_names(Some("feature_name")).unwrap(), vec!["A", "B", "C", "D"]);
        assert_eq!(r.obs_column("cell_type").unwrap(), vec!["T", "B", "T"]);
        let b = r.read_rows(1, 3).unwrap();
        assert_eq!(b.indptr, vec![0, 0, 1]);
        assert_eq!(b.row(1), (&[2u32][..], &[7.0f32][..]));
        let err = r.var_names(Some("gene_symbols")).unwrap_err().to_string();
        assert!(err.contains("gene_symbols") && err.contains("feature_name"), "{err}");
    }

    /// A CSR file of `n` rows over 50 genes, row i holding i % 9 genes; `bad_row` gets a column
    /// index past the genes.
    fn rows_file(dir: &Path, n: usize, bad_row: Option<usize>) -> PathBuf {
        let p = dir.join(format!("rows{n}-{bad_row:?}.h5ad"));
        let mut w = H5adWriter::create(&p, 50).unwrap();
        let (mut indptr, mut indices, mut data) = (vec![0usize], vec![], vec![]);
        for i in 0..n {
            for k in 0..i % 9 {
                indices.push(if Some(i) == bad_row { 99 } else { ((i * 7 + k * 5) % 50) as u32 });
                data.push((i * 10 + k) as f32);
            }
            indptr.push(indices.len());
        }
        w.append_rows(&indptr, &indices, &data).unwrap();
        let obs = Frame { index: (0..n).map(|i| format!("c{i}")).collect(), columns: vec![] };
        let var = Frame { index: (0..50).map(|g| format!("G{g}")).collect(), columns: vec![] };
        w.finish(&obs, &var).unwrap();
        p
    }

    #[test]
    fn streamed_blocks_arrive_in_order_with_many_in_flight_and_errors_end_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = H5adReader::open(&rows_file(dir.path(), 1000, None), MatrixChoice::X).unwrap();
        let whole = r.read_rows(0, 1000).unwrap();
        assert!(r.read_ahead_depth(37, 1 << 30) > 1 && r.read_ahead_depth(37, 1) == 1, "the test covers both paths");
        for in_flight in [1, 1 << 30] {
            let mut starts = vec![];
            let (mut cols, mut vals) = (vec![], vec![]);
            r.stream_rows(5, 1000, 37, in_flight, |b| {
                let b = b.unwrap();
                starts.push(b.start);
                for i in 0..b.n_rows() {
                    let (c, v) = b.row(i);
                    cols.extend_from_slice(c);
                    vals.extend_from_slice(v);
                }
                true
            });
            assert_eq!(starts, (5..1000).step_by(37).collect::<Vec<_>>(), "in order, in_flight {in_flight}");
            let a = whole.indptr[5];
            assert_eq!((&cols[..], &vals[..]), (&whole.indices[a..], &whole.data[a..]));
            let mut seen = 0;
            r.stream_rows(0, 1000, 10, in_flight, |_| {
                seen += 1;
                seen < 3
            });
            assert_eq!(seen, 3, "a sink that stops ends the stream");
        }
        let mut r = H5adReader::open(&rows_file(dir.path(), 1000, Some(601)), MatrixChoice::X).unwrap();
        let mut got = vec![];
        r.stream_rows(0, 1000, 50, 1 << 30, |b| {
            got.push(b.map(|b| b.start).map_err(|e| e.to_string()));
            true
        });
        let last = got.pop().unwrap().unwrap_err();
        assert!(last.contains("indices") && last.contains("99"), "{last}");
        assert_eq!(got, (0..600).step_by(50).map(Ok).collect::<Vec<_>>(), "the blocks before the bad one, then its error");
    }

    #[test]
    fn values_at_positions_and_indices_alone_match_whole_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = H5adReader::open(&rows_file(dir.path(), 40_000, None), MatrixChoice::X).unwrap();
        let whole = r.read_rows(0, 40_000).unwrap();
        let n = whole.data.len();
        assert!(n > 2 * VALUE_GAP + 200, "{n} values");
        let positions = [0, 1, 17, VALUE_GAP + 40, 2 * VALUE_GAP + 100, 2 * VALUE_GAP + 101, n - 1];
        assert_eq!(value_stretches(&positions), vec![0..3, 3..4, 4..7], "gaps past VALUE_GAP split the reads");
        let got = r.values_at(&positions).expect("direct CSR access").unwrap();
        assert_eq!(got, positions.iter().map(|&p| whole.data[p]).collect::<Vec<_>>());
        assert!(r.can_read_indices_alone());
        for in_flight in [1, 1 << 20] {
            let mut cols = vec![];
            r.stream_row_indices(0, 40_000, 999, in_flight, |b| {
                let b = b.unwrap();
                assert!(b.data.is_empty(), "values stay on disk");
                cols.extend_from_slice(&b.indices);
                true
            });
            assert_eq!(&cols[..], &whole.indices[..], "in_flight {in_flight}");
        }
    }

    #[test]
    fn non_hdf5_and_missing_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.h5ad");
        std::fs::write(&p, b"not an hdf5 file at all").unwrap();
        let err = H5adReader::open(&p, MatrixChoice::RawThenX).err().unwrap().to_string();
        assert!(err.contains("bad.h5ad") && err.contains("not an HDF5"), "{err}");
        let err = H5adReader::open(&dir.path().join("none.h5ad"), MatrixChoice::X).err().unwrap().to_string();
        assert!(err.contains("none.h5ad") && err.contains("not found"), "{err}");
    }
}
