//! One h5ad split into a reference and a query file by an obs column (cells whose value is in
//! `query_values` form the query; `split_col = "@parity"`: the odd-numbered cells), keeping the chosen matrix, the gene names (in the var
//! index) and the named obs columns. Both files are written atomically.

use std::path::Path;

use anyhow::{bail, Context};
use scgpt_data::h5ad::{Column, Frame, H5adReader, H5adWriter, MatrixChoice};

/// The pseudo-column that splits by cell index: even cells the reference, odd the query.
pub const PARITY: &str = "@parity";

#[allow(clippy::too_many_arguments)]
pub fn split(
    src: &Path,
    matrix: &str,
    split_col: &str,
    query_values: &[String],
    keep_cols: &[&str],
    gene_col: &str,
    reference: &Path,
    query: &Path,
) -> anyhow::Result<(usize, usize)> {
    let choice = match matrix {
        "auto" => MatrixChoice::RawThenX,
        "x" => MatrixChoice::X,
        other => bail!("dataset.matrix = {other:?}: expected \"auto\" or \"x\""),
    };
    let mut r = H5adReader::open(src, choice)?;
    let genes = r.var_names((!gene_col.is_empty()).then_some(gene_col))?;
    let is_query: Vec<bool> = if split_col == PARITY {
        (0..r.n_obs()).map(|i| i % 2 == 1).collect()
    } else {
        r.obs_column(split_col).context("dataset.split_col")?.iter().map(|v| query_values.contains(v)).collect()
    };
    let n_query = is_query.iter().filter(|q| **q).count();
    if n_query == 0 || n_query == is_query.len() {
        bail!("dataset.query_values {query_values:?} of `{split_col}` select {n_query} of {} cells; both sides need cells", is_query.len());
    }
    let names = r.obs_names()?;
    let mut cols: Vec<String> = if split_col == PARITY { Vec::new() } else { vec![split_col.to_string()] };
    cols.extend(keep_cols.iter().map(|c| c.to_string()).filter(|c| c != split_col));
    let values: Vec<Vec<String>> =
        cols.iter().map(|c| r.obs_column(c).with_context(|| format!("obs column {c:?}"))).collect::<anyhow::Result<_>>()?;
    let block = r.read_rows(0, r.n_obs())?;
    let mut out = Vec::new();
    for (path, want) in [(reference, false), (query, true)] {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let rows: Vec<usize> = (0..is_query.len()).filter(|&i| is_query[i] == want).collect();
        let mut w = H5adWriter::create(path, genes.len())?;
        let (mut indptr, mut indices, mut data) = (vec![0usize], Vec::new(), Vec::new());
        for &i in &rows {
            let (idx, val) = block.row(i);
            indices.extend_from_slice(idx);
            data.extend_from_slice(val);
            indptr.push(data.len());
        }
        w.append_rows(&indptr, &indices, &data)?;
        let obs = Frame {
            index: rows.iter().map(|&i| names[i].clone()).collect(),
            columns: cols
                .iter()
                .zip(&values)
                .map(|(c, v)| (c.clone(), Column::categorical_from(&rows.iter().map(|&i| v[i].as_str()).collect::<Vec<_>>())))
                .collect(),
        };
        w.finish(&obs, &Frame { index: genes.clone(), columns: Vec::new() })?;
        out.push(rows.len());
    }
    Ok((out[0], out[1]))
}
