//! `scgpt-prep plant-batch`: real cells keep their counts in batch A; batch B's are scaled per
//! gene and per library and redrawn as integers, so the truth of an integration benchmark is
//! known. Read back with the workspace's h5ad reader.

use std::path::Path;
use std::process::Command;

use scgpt_data::h5ad::{H5adReader, MatrixChoice};

#[test]
fn a_planted_batch_keeps_a_and_shifts_b() {
    let tmp = tempfile::tempdir().unwrap();
    let input = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/wu2020_200.h5ad");
    let out = tmp.path().join("planted.h5ad");
    let o = Command::new(env!("CARGO_BIN_EXE_scgpt-prep"))
        .args([
            "plant-batch",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--keep-col",
            "cluster_orig",
            "--keep-col",
            "patient",
            "--seed",
            "4",
        ])
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut a = H5adReader::open(&input, MatrixChoice::RawThenX).unwrap();
    let mut p = H5adReader::open(&out, MatrixChoice::X).unwrap();
    assert_eq!((p.n_obs(), p.n_vars()), (a.n_obs(), a.n_vars()));
    assert_eq!(p.obs_column("cluster_orig").unwrap(), a.obs_column("cluster_orig").unwrap());
    let batch = p.obs_column("planted_batch").unwrap();
    let n_b = batch.iter().filter(|b| *b == "B").count();
    assert!((70..130).contains(&n_b), "about half the cells in B: {n_b}");
    let (orig, planted) = (a.read_rows(0, a.n_obs()).unwrap(), p.read_rows(0, p.n_obs()).unwrap());
    let mut ratio = Vec::new();
    for (i, b) in batch.iter().enumerate() {
        let (oi, ov) = orig.row(i);
        let (pi, pv) = planted.row(i);
        if b == "A" {
            assert_eq!((oi, ov), (pi, pv), "cell {i} of batch A is unchanged");
        } else {
            assert!(pv.iter().all(|v| v.fract() == 0.0 && *v > 0.0), "integer counts");
            ratio.push(pv.iter().sum::<f32>() as f64 / ov.iter().sum::<f32>() as f64);
        }
    }
    // Library x2 and per-gene exp(N(0, 0.25)) (mean e^0.125 = 1.13): about 2.3x the counts.
    let mean = ratio.iter().sum::<f64>() / ratio.len() as f64;
    assert!((1.7..3.2).contains(&mean), "B's library is shifted: {mean}");
    // Not a uniform rescaling: the per-gene factors change the cells' gene ranks.
    assert!(ratio.iter().any(|r| (r - mean).abs() > 0.05));
}
