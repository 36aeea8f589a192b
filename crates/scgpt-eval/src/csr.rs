//! A borrowed cells × genes CSR matrix, checked once so the baselines can index it freely.

use anyhow::{bail, Result};

#[derive(Debug, Clone, Copy)]
pub struct CsrMatrix<'a> {
    indptr: &'a [usize],
    indices: &'a [u32],
    data: &'a [f32],
    n_cols: usize,
}

impl<'a> CsrMatrix<'a> {
    /// Checks the structure: `indptr` starts at 0, never decreases and ends at `indices.len()`
    /// (= `data.len()`); every index is below `n_cols`. Values are not checked here (the
    /// baseline rejects negative or non-finite counts where it reads them).
    pub fn new(indptr: &'a [usize], indices: &'a [u32], data: &'a [f32], n_cols: usize) -> Result<Self> {
        if indptr.is_empty() {
            bail!("CSR indptr is empty (it needs n_rows + 1 entries)");
        }
        if indices.len() != data.len() {
            bail!("CSR indices ({}) and data ({}) differ in length", indices.len(), data.len());
        }
        if indptr[0] != 0 || indptr[indptr.len() - 1] != indices.len() {
            bail!("CSR indptr runs {}..{} but there are {} stored values", indptr[0], indptr[indptr.len() - 1], indices.len());
        }
        if let Some(w) = indptr.windows(2).position(|w| w[1] < w[0]) {
            bail!("CSR indptr decreases at row {w}");
        }
        if let Some(&bad) = indices.iter().find(|&&j| j as usize >= n_cols) {
            bail!("CSR column index {bad} is out of range for {n_cols} columns");
        }
        Ok(CsrMatrix { indptr, indices, data, n_cols })
    }

    pub fn n_rows(&self) -> usize {
        self.indptr.len() - 1
    }

    pub fn n_cols(&self) -> usize {
        self.n_cols
    }

    /// All stored values.
    pub fn values(&self) -> &'a [f32] {
        self.data
    }

    /// Column indices and values of row `i`.
    pub fn row(&self, i: usize) -> (&'a [u32], &'a [f32]) {
        let (a, b) = (self.indptr[i], self.indptr[i + 1]);
        (&self.indices[a..b], &self.data[a..b])
    }
}

/// An owned CSR matrix (a column subset of another, say).
#[derive(Debug, Clone, Default)]
pub struct OwnedCsr {
    pub indptr: Vec<usize>,
    pub indices: Vec<u32>,
    pub data: Vec<f32>,
    pub n_cols: usize,
}

impl OwnedCsr {
    pub fn csr(&self) -> Result<CsrMatrix<'_>> {
        CsrMatrix::new(&self.indptr, &self.indices, &self.data, self.n_cols)
    }
}

/// The columns of `x` where `keep` holds (scanpy's `adata[:, keep]`), and the kept columns'
/// indices in `x`.
pub fn keep_columns(x: &CsrMatrix, keep: &[bool]) -> (OwnedCsr, Vec<usize>) {
    let mut new_index = vec![u32::MAX; keep.len()];
    let mut kept = Vec::new();
    for (j, &k) in keep.iter().enumerate() {
        if k {
            new_index[j] = kept.len() as u32;
            kept.push(j);
        }
    }
    let mut out = OwnedCsr { indptr: vec![0], n_cols: kept.len(), ..Default::default() };
    for i in 0..x.n_rows() {
        let (idx, val) = x.row(i);
        for (&j, &v) in idx.iter().zip(val) {
            let c = new_index[j as usize];
            if c != u32::MAX {
                out.indices.push(c);
                out.data.push(v);
            }
        }
        out.indptr.push(out.indices.len());
    }
    (out, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_chosen_columns() {
        let x = CsrMatrix::new(&[0, 2, 3], &[0, 2, 1], &[1.0, 3.0, 2.0], 3).unwrap();
        let (y, kept) = keep_columns(&x, &[true, false, true]);
        assert_eq!(kept, vec![0, 2]);
        assert_eq!((y.indptr, y.indices, y.data, y.n_cols), (vec![0, 2, 2], vec![0, 1], vec![1.0, 3.0], 2));
    }

    #[test]
    fn rejects_bad_structure() {
        assert!(CsrMatrix::new(&[0, 1], &[0], &[1.0], 1).is_ok());
        assert!(CsrMatrix::new(&[], &[], &[], 1).is_err());
        assert!(CsrMatrix::new(&[0, 2], &[0], &[1.0], 1).is_err());
        assert!(CsrMatrix::new(&[0, 1], &[3], &[1.0], 2).is_err());
        assert!(CsrMatrix::new(&[0, 1, 0], &[0], &[1.0], 2).is_err());
        assert!(CsrMatrix::new(&[0, 1], &[0], &[], 2).is_err());
    }
}
