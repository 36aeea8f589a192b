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

use std::path::PathBuf;

use crate::words::OffsetVec;

mod reader;
mod writer;

pub use reader::{max_word, H5adReader, ObsNames};
pub use writer::{vlen, write_encoding, write_str_attr, write_string_array, Column, Frame, H5adWriter};

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
