//! The h5ad writer: a CSR `X` streamed in row blocks, obs/var dataframes, AnnData's
//! encoding attributes; and the attribute helpers other writers of h5ad parts share.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hdf5::types::VarLenUnicode;
use hdf5::{Dataset, Group, Location};

use super::{H5adError, Result};

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

/// An HDF5 variable-length UTF-8 string (NULs, which HDF5 cannot store, dropped).
pub fn vlen(s: &str) -> VarLenUnicode {
    s.replace('\0', "").parse().expect("NUL removed, valid unicode")
}

/// Sets string attribute `name`, replacing one already there (outputs that edit a copy of an
/// input file meet existing attributes).
pub fn write_str_attr(loc: &Location, name: &str, value: &str) -> hdf5::Result<()> {
    if loc.attr(name).is_ok() {
        loc.delete_attr(name)?;
    }
    loc.new_attr::<VarLenUnicode>().shape(()).create(name)?.write_scalar(&vlen(value))
}

/// AnnData's `encoding-type` and `encoding-version` attributes.
pub fn write_encoding(loc: &Location, kind: &str, version: &str) -> hdf5::Result<()> {
    write_str_attr(loc, "encoding-type", kind)?;
    write_str_attr(loc, "encoding-version", version)
}

/// A string array dataset (empty ones included) with its AnnData encoding.
pub fn write_string_array(g: &Group, name: &str, values: &[String]) -> hdf5::Result<()> {
    let v: Vec<VarLenUnicode> = values.iter().map(|s| vlen(s)).collect();
    let ds = g.new_dataset::<VarLenUnicode>().shape(v.len()).create(name)?;
    if !v.is_empty() {
        ds.write_raw(&v)?;
    }
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
        x.new_attr::<i64>().shape(2).create("shape").and_then(|a| a.write_raw(&[n_obs as i64, self.n_vars as i64])).map_err(&e)?;
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
