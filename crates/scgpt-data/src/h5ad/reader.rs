//! The h5ad reader: bounded memory, plain HDF5 reads (scgpt-prep adds direct reads on top).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hdf5::types::{TypeDescriptor, VarLenAscii, VarLenUnicode};
use hdf5::{Dataset, Group, Location};

use super::{H5adError, Layout, MatrixChoice, Result, RowBlock};
use crate::words::OffsetVec;

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
}

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
        Self::open_matrix(path, choice)
    }

    /// Cells in the file's matrix, without anything else (scgpt-prep's direct reader locates
    /// every chunk on open: ~1 s at 1M cells under HDF5 1.10).
    pub fn count_cells(path: &Path, choice: MatrixChoice) -> Result<usize> {
        Ok(Self::open_matrix(path, choice)?.n_obs)
    }

    /// The file opened and its matrix located and checked.
    fn open_matrix(path: &Path, choice: MatrixChoice) -> Result<Self> {
        if !path.exists() {
            return Err(H5adError::NotFound { path: path.to_path_buf() });
        }
        match is_hdf5(path) {
            Ok(true) => {}
            Ok(false) => return Err(H5adError::NotHdf5 { path: path.to_path_buf() }),
            Err(e) => return Err(H5adError::Invalid { path: path.to_path_buf(), field: "/".into(), message: e.to_string() }),
        }
        let file = hdf5::File::open(path).map_err(|source| H5adError::Hdf5 { path: path.to_path_buf(), field: "/".into(), source })?;
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
        };
        me.inspect_matrix()?;
        Ok(me)
    }

    pub(crate) fn err(&self, field: &str) -> impl Fn(hdf5::Error) -> H5adError + '_ {
        let field = field.to_string();
        move |source| H5adError::Hdf5 { path: self.path.clone(), field: field.clone(), source }
    }

    /// An error about `field` of this file.
    pub fn invalid(&self, field: &str, message: impl Into<String>) -> H5adError {
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
                    return Err(self
                        .invalid(&mp, format!("unsupported matrix encoding {other:?}; expected csr_matrix, csc_matrix or a dense array")))
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
            return Err(self.invalid(&self.var_path, format!("has {} genes but the matrix has {} columns", index.len(), self.n_vars)));
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
                let lookup: HashMap<&str, &str> = main_index.iter().map(String::as_str).zip(values.iter().map(String::as_str)).collect();
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
        let mut names: Vec<String> =
            g.member_names().map_err(self.err(p))?.into_iter().filter(|n| n != &index_name && n != "__categories").collect();
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
            Layout::Csr => self.read_csr_rows(start, end),
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

    /// The `data`, `indices` and `indptr` datasets of a sparse matrix.
    pub fn sparse_parts(&self) -> Result<(Dataset, Dataset, Dataset)> {
        let g = self.file.group(&self.matrix_path).map_err(self.err(&self.matrix_path))?;
        let f = |n: &str| g.dataset(n).map_err(self.err(&format!("{}/{n}", self.matrix_path)));
        Ok((f("data")?, f("indices")?, f("indptr")?))
    }

    /// The block-relative `indptr` of CSR rows `start..end` and the range `a..b` of their
    /// entries in `data`/`indices`, checked: monotone and within the arrays.
    pub fn csr_extent(&self, start: usize, end: usize) -> Result<(Vec<usize>, usize, usize)> {
        let (data, _, indptr) = self.sparse_parts()?;
        let field = format!("{}/indptr", self.matrix_path);
        let ptr: Vec<i64> = read_range(&indptr, start, end + 1).map_err(self.err(&field))?;
        let (a, b) = (ptr[0], *ptr.last().expect("non-empty"));
        let nnz_total = data.shape().first().copied().unwrap_or(0) as i64;
        if a < 0 || b < a || b > nnz_total || ptr.windows(2).any(|w| w[1] < w[0]) {
            return Err(self.invalid(&field, format!("is not monotone within [0, {nnz_total}] around rows {start}..{end}")));
        }
        let (a, b) = (a as usize, b as usize);
        Ok((ptr.iter().map(|&p| p as usize - a).collect(), a, b))
    }

    /// Rows `start..end` of a CSR matrix (the layout is [`Layout::Csr`]).
    pub fn read_csr_rows(&self, start: usize, end: usize) -> Result<RowBlock> {
        let (indptr, a, b) = self.csr_extent(start, end)?;
        let (data, indices, _) = self.sparse_parts()?;
        let field = format!("{}/indices", self.matrix_path);
        let vals: Vec<f32> = read_range(&data, a, b).map_err(self.err(&format!("{}/data", self.matrix_path)))?;
        let cols = self.read_column_indices(&indices, a, b).map_err(self.err(&field))?.map_err(|c| self.bad_index(c))?;
        Ok(RowBlock { start, indptr, indices: cols, data: vals.into() })
    }

    /// The error for column index `c` outside the genes.
    pub fn bad_index(&self, c: i64) -> H5adError {
        self.invalid(&format!("{}/indices", self.matrix_path), format!("column index {c} outside 0..{}", self.n_vars))
    }

    /// Column indices `a..b` as u32, read in the file's own integer type when it is 32-bit
    /// (scanpy and CELLxGENE write int32: no conversion by HDF5, half the bytes); `Err(c)`
    /// names the first index outside `0..n_vars`.
    fn read_column_indices(&self, ds: &Dataset, a: usize, b: usize) -> hdf5::Result<std::result::Result<OffsetVec<u32>, i64>> {
        use hdf5::types::{IntSize, TypeDescriptor};
        match ds.dtype()?.to_descriptor()? {
            TypeDescriptor::Integer(IntSize::U4) => {
                let idx: Vec<i32> = read_range(ds, a, b)?;
                Ok(self.checked_indices(idx.into_iter().map(|c| c as u32).collect::<Vec<_>>().into(), true))
                // in place
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
    pub fn checked_indices(&self, words: OffsetVec<u32>, signed: bool) -> std::result::Result<OffsetVec<u32>, i64> {
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
            let arr = ds.read_slice_2d::<f32, _>(ndarray::s![start..end, ..]).map_err(self.err(&self.matrix_path))?;
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
        return Err(H5adError::Missing { path: path.to_path_buf(), field, hint: "the dataframe has no index dataset".into() });
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
pub fn max_word(words: &[u32]) -> Option<u32> {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        #[target_feature(enable = "avx2")]
        fn max_avx2(words: &[u32]) -> Option<u32> {
            words.iter().copied().max()
        }
        // SAFETY: the feature is present.
        return unsafe { max_avx2(words) };
    }
    words.iter().copied().max()
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
        other => Err(H5adError::Invalid { path: path.into(), field: field.into(), message: format!("unsupported column type {other:?}") }),
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
