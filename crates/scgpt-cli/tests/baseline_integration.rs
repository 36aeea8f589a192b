//! `scgpt baseline integration` end to end on real cells with a planted batch effect: the 700
//! PBMCs of `tests/data/pbmc68k_reduced.h5ad` (`expm1(raw/X)`, per-cell normalised expression,
//! labels `bulk_labels`), a random half of them moved to batch `b1` with a gene-wise scaling
//! (log-normal, sd 1) and a 3× library size, the kind of effect a second lab or protocol
//! leaves. The library-size shift is removed by normalisation; the gene-wise one is what the
//! PCA shows and Harmony must remove. (Harmony itself is held to harmonypy in
//! crates/scgpt-eval/tests/harmony_reference.rs, and the metrics to scib in scib_reference.rs.)
//!
//! Measured on this very file with scanpy (normalize_total, log1p, PCA 30) + harmonypy 2.1.0 +
//! scib: PCA iLISI 0.1786 and ASW_label/batch 0.8685 (this command: the same to 4 digits);
//! harmonypy seeds 0-2 iLISI 0.927-0.928, ASW_label/batch 0.955 (this command: 0.928, 0.955).
//! With a stronger effect (sd 1.5) neither mixes the batches (harmonypy iLISI 0.03-0.10 after
//! one round), so sd 1 is where the test can tell a working Harmony from a broken one.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{Rng, SeedableRng};
use scgpt_data::h5ad::{Column, Frame, H5adReader, H5adWriter, MatrixChoice};
use serde_json::Value;

/// See tests/embed.rs: children must not inherit HDF5's flock()s held by other test threads.
const NO_HDF5_LOCKS: (&str, &str) = ("HDF5_USE_FILE_LOCKING", "FALSE");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Writes the planted file into `dir` and returns its path.
fn planted(dir: &Path) -> PathBuf {
    let mut r = H5adReader::open(&repo().join("tests/data/pbmc68k_reduced.h5ad"), MatrixChoice::RawThenX).unwrap();
    let n = r.n_obs();
    let b = r.read_rows(0, n).unwrap();
    let genes = r.var_names(None).unwrap();
    let labels = r.obs_column("bulk_labels").unwrap();
    let cells = r.obs_names().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(19);
    let gene_scale: Vec<f32> = (0..genes.len())
        .map(|_| {
            // Box–Muller: a standard normal from two uniforms.
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * 1.0).exp() as f32
        })
        .collect();
    let batch: Vec<String> = (0..n).map(|_| if rng.random::<bool>() { "b1" } else { "b0" }.to_string()).collect();
    let (mut ip, mut ix, mut v) = (vec![0usize], Vec::new(), Vec::new());
    for i in 0..n {
        let (idx, val) = b.row(i);
        for (&j, &x) in idx.iter().zip(val) {
            // raw/X holds log1p of normalised values: expm1 gives the counts-like input.
            let mut y = x.exp_m1();
            if batch[i] == "b1" {
                y *= 3.0 * gene_scale[j as usize];
            }
            ix.push(j);
            v.push(y);
        }
        ip.push(ix.len());
    }
    let path = dir.join("planted.h5ad");
    let mut w = H5adWriter::create(&path, genes.len()).unwrap();
    w.append_rows(&ip, &ix, &v).unwrap();
    // A label column with two missing values (anndata's code -1), for the drop check.
    let mut gappy = labels.clone();
    gappy[0].clear();
    gappy[1].clear();
    let cats = |vals: &[String]| {
        let mut c: Vec<String> = vals.iter().filter(|s| !s.is_empty()).cloned().collect();
        c.sort();
        c.dedup();
        let codes = vals.iter().map(|s| c.iter().position(|x| x == s).map_or(-1, |p| p as i32)).collect();
        Column::Categorical { codes, categories: c }
    };
    let obs = Frame {
        index: cells,
        columns: vec![
            ("label".into(), Column::categorical_from(&labels)),
            ("batch".into(), Column::categorical_from(&batch)),
            ("label_with_missing".into(), cats(&gappy)),
        ],
    };
    w.finish(&obs, &Frame { index: genes, columns: vec![] }).unwrap();
    path
}

fn scgpt(input: &Path, report: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .env(NO_HDF5_LOCKS.0, NO_HDF5_LOCKS.1)
        .args(["baseline", "integration", "--input"])
        .arg(input)
        .arg("--report")
        .arg(report)
        .args(extra)
        .output()
        .expect("run scgpt")
}

/// Width and height from a PNG's IHDR chunk, after checking the signature.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{}", path.display());
    assert_eq!(&b[12..16], b"IHDR");
    let be = |s: &[u8]| u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
    (be(&b[16..20]), be(&b[20..24]))
}

const KEYS: [&str; 10] = [
    "NMI_cluster/label",
    "ARI_cluster/label",
    "ASW_label",
    "ASW_label/batch",
    "graph_conn",
    "PCR_batch",
    "iLISI",
    "cLISI",
    "avg_bio",
    "avg_batch",
];

#[test]
fn harmony_mixes_a_planted_batch_effect_better_than_pca() {
    let dir = tempfile::tempdir().unwrap();
    let input = planted(dir.path());
    let report = dir.path().join("report");
    let out = scgpt(&input, &report, &["--batch-col", "batch", "--label-col", "label", "--n-pcs", "30"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    println!("{stdout}");
    assert!(stdout.contains("pca") && stdout.contains("harmony"), "{stdout}");

    let m: Value = serde_json::from_str(&std::fs::read_to_string(report.join("metrics.json")).unwrap()).unwrap();
    let methods: Vec<&String> = m.as_object().unwrap().keys().collect();
    assert_eq!(methods, ["harmony", "pca"], "metrics.json is keyed by method");
    for method in ["pca", "harmony"] {
        let r = &m[method];
        for k in KEYS {
            let v = r[k].as_f64().unwrap_or_else(|| panic!("{method} {k}: {}", r[k]));
            let lo = if k == "ARI_cluster/label" { -1.0 } else { 0.0 };
            assert!((lo..=1.0).contains(&v), "{method} {k} = {v}");
        }
        assert_eq!(r["n_cells"], 700);
        assert_eq!(r["n_batches"], 2);
    }
    let g = |method: &str, k: &str| m[method][k].as_f64().unwrap();
    // Unintegrated PCA against itself: nothing of the batch's variance is removed.
    assert_eq!(g("pca", "PCR_batch"), 0.0);
    // The planted effect is visible before and mostly gone after.
    assert!(g("pca", "iLISI") < 0.3, "pca iLISI {}", g("pca", "iLISI"));
    assert!(g("harmony", "iLISI") > g("pca", "iLISI") + 0.2, "iLISI {} -> {}", g("pca", "iLISI"), g("harmony", "iLISI"));
    assert!(g("harmony", "ASW_label/batch") > g("pca", "ASW_label/batch") + 0.05);
    assert!(g("harmony", "PCR_batch") > 0.5, "PCR_batch {}", g("harmony", "PCR_batch"));
    assert!(g("harmony", "avg_batch") > g("pca", "avg_batch"));
    // ...without losing the cell types.
    assert!(g("harmony", "ASW_label") > g("pca", "ASW_label") - 0.05);
    assert!(g("harmony", "NMI_cluster/label") > 0.5, "NMI {}", g("harmony", "NMI_cluster/label"));

    let info: Value = serde_json::from_str(&std::fs::read_to_string(report.join("baseline.json")).unwrap()).unwrap();
    assert_eq!(info["n_pcs"], 30);
    assert_eq!(info["n_hvg"], 765, "fewer genes than --n-hvg: all of them");
    assert!(info["harmony"]["iterations"].as_u64().unwrap() >= 1);
    assert_eq!(info["harmony"]["n_clusters"], 23);
    for name in ["umap_pca.png", "umap_harmony.png"] {
        let (w, h) = png_size(&report.join(name));
        assert!(w > 1000 && h > 500, "{name}: {w}x{h}");
    }
    let mut names: Vec<String> = std::fs::read_dir(&report).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["baseline.json", "metrics.json", "umap_harmony.png", "umap_pca.png"], "no temporary files left");

    // Deterministic on the seed (the metrics, timings aside).
    let again = dir.path().join("again");
    let out = scgpt(&input, &again, &["--batch-col", "batch", "--label-col", "label", "--n-pcs", "30", "--no-umap", "--no-lisi"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m2: Value = serde_json::from_str(&std::fs::read_to_string(again.join("metrics.json")).unwrap()).unwrap();
    for k in ["ASW_label", "ASW_label/batch", "PCR_batch", "NMI_cluster/label"] {
        assert_eq!(m2["harmony"][k], m["harmony"][k], "{k}");
    }
    assert!(m2["harmony"]["iLISI"].is_null());
    assert!(!again.join("umap_pca.png").exists());
}

#[test]
fn bad_input_is_a_clear_error_and_missing_labels_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let input = planted(dir.path());
    let report = dir.path().join("r");
    let out = scgpt(&input, &report, &["--batch-col", "sample", "--label-col", "label", "--no-umap"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("obs/sample") && err.contains("available obs columns") && err.contains("batch"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!report.join("metrics.json").exists());

    // pbmc68k_reduced's X holds scaled z-scores: negative, so not counts; the error says so
    // and points at --use-raw.
    let out = scgpt(
        &repo().join("tests/data/pbmc68k_reduced.h5ad"),
        &report,
        &["--batch-col", "phase", "--label-col", "bulk_labels", "--no-umap"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("non-negative") && err.contains("--use-raw"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out =
        scgpt(&input, &report, &["--batch-col", "batch", "--label-col", "label_with_missing", "--no-umap", "--no-lisi", "--n-pcs", "10"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 cells have no"), "{err}");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(report.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["pca"]["n_cells"], 698);
    assert_eq!(m["harmony"]["n_cells"], 698);
}
