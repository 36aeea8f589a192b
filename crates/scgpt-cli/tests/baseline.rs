//! The annotation baseline against scanpy + scikit-learn on the bundled real data. The truth is
//! `tests/data/eval/baseline_reference.json`, written by `tests/gen/eval/gen_baseline_reference.py`
//! (splits and input matrices are described there). Here: the library on both datasets, and
//! `scgpt baseline annotation` end to end on the wu2020 split written out as two h5ad files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use scgpt_data::h5ad::{Column, Frame, H5adReader, H5adWriter, MatrixChoice};
use scgpt_eval::{annotation_baseline, BaselineOptions, ClassificationReport, CsrMatrix};
use serde_json::Value;

/// Accuracy may differ from scikit-learn's by at most this (the task's contract: 2 points).
const TOL: f64 = 0.02;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn reference() -> Value {
    let p = repo().join("tests/data/eval/baseline_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

/// A whole h5ad: CSR parts, genes, one obs column, cell ids.
struct Data {
    indptr: Vec<usize>,
    indices: Vec<u32>,
    data: Vec<f32>,
    genes: Vec<String>,
    obs: Vec<String>,
    cells: Vec<String>,
}

fn read(name: &str, choice: MatrixChoice, col: &str) -> Data {
    let mut r = H5adReader::open(&repo().join("tests/data").join(name), choice).unwrap();
    let b = r.read_rows(0, r.n_obs()).unwrap();
    Data {
        indptr: b.indptr.clone(),
        indices: b.indices.to_vec(),
        data: b.data.to_vec(),
        genes: r.var_names(None).unwrap(),
        obs: r.obs_column(col).unwrap(),
        cells: r.obs_names().unwrap(),
    }
}

/// The rows where `keep` holds, as CSR parts.
fn subset(d: &Data, keep: &[bool]) -> (Vec<usize>, Vec<u32>, Vec<f32>) {
    let (mut ip, mut ix, mut v) = (vec![0], vec![], vec![]);
    for i in 0..keep.len() {
        if keep[i] {
            let (a, b) = (d.indptr[i], d.indptr[i + 1]);
            ix.extend_from_slice(&d.indices[a..b]);
            v.extend_from_slice(&d.data[a..b]);
            ip.push(ix.len());
        }
    }
    (ip, ix, v)
}

fn pick(xs: &[String], keep: &[bool]) -> Vec<String> {
    xs.iter().zip(keep).filter(|(_, &k)| k).map(|(x, _)| x.clone()).collect()
}

fn check_library(d: &Data, labels: &[String], is_test: &[bool], expect: &Value) {
    let is_train: Vec<bool> = is_test.iter().map(|t| !t).collect();
    let (ip, ix, v) = subset(d, &is_train);
    let (tip, tix, tv) = subset(d, is_test);
    let train = CsrMatrix::new(&ip, &ix, &v, d.genes.len()).unwrap();
    let test = CsrMatrix::new(&tip, &tix, &tv, d.genes.len()).unwrap();
    let (y_train, y_test) = (pick(labels, &is_train), pick(labels, is_test));
    assert_eq!(y_test, strings(&expect["test_labels"]), "the split differs from the reference's");
    let p = annotation_baseline(&train, &d.genes, &y_train, &test, &d.genes, &BaselineOptions::default()).unwrap();
    assert!(p.lr_converged);
    assert_eq!(p.n_pcs as u64, expect["n_pcs"].as_u64().unwrap());

    let sk_hvg: BTreeSet<String> = strings(&expect["hvg"]).into_iter().collect();
    let hvg: BTreeSet<String> = p.hvg.iter().cloned().collect();
    let common = sk_hvg.intersection(&hvg).count();
    assert!(common as f64 >= 0.99 * sk_hvg.len() as f64, "HVGs: {common} of {} shared", sk_hvg.len());

    let report = ClassificationReport::new(&y_test, &p.labels, &p.classes).unwrap();
    let sk_acc = expect["accuracy"].as_f64().unwrap();
    assert!((report.accuracy - sk_acc).abs() <= TOL, "accuracy {} vs scikit-learn {sk_acc}", report.accuracy);
    let sk_pred = strings(&expect["predictions"]);
    let agree = sk_pred.iter().zip(&p.labels).filter(|(a, b)| a == b).count();
    eprintln!(
        "accuracy {:.4} (sklearn {sk_acc:.4}), macro F1 {:.4}, same prediction for {agree}/{} cells",
        report.accuracy,
        report.macro_f1,
        sk_pred.len()
    );
    // The metrics themselves, on scikit-learn's own predictions: the same numbers as sklearn's.
    let sk_report = ClassificationReport::new(&y_test, &sk_pred, &p.classes).unwrap();
    for key in ["accuracy", "macro_f1", "weighted_f1"] {
        let mine = match key {
            "accuracy" => sk_report.accuracy,
            "macro_f1" => sk_report.macro_f1,
            _ => sk_report.weighted_f1,
        };
        assert!((mine - expect[key].as_f64().unwrap()).abs() < 1e-12, "{key}: {mine} vs {}", expect[key]);
    }
}

#[test]
fn wu2020_split_by_patient_matches_sklearn() {
    let r = reference();
    let e = &r["datasets"]["wu2020_200"];
    let d = read("wu2020_200.h5ad", MatrixChoice::X, "cluster_orig");
    let patients = read("wu2020_200.h5ad", MatrixChoice::X, "patient").obs;
    let test_patients = strings(&e["split"]["test_patients"]);
    let is_test: Vec<bool> = patients.iter().map(|p| test_patients.contains(p)).collect();
    check_library(&d, &d.obs, &is_test, e);
}

#[test]
fn pbmc68k_split_by_parity_matches_sklearn() {
    let r = reference();
    let e = &r["datasets"]["pbmc68k_reduced"];
    assert_eq!(e["matrix"], "expm1(raw/X)");
    let mut d = read("pbmc68k_reduced.h5ad", MatrixChoice::RawThenX, "bulk_labels");
    // raw/X holds log1p of normalised counts; the baseline wants counts-like values.
    d.data.iter_mut().for_each(|v| *v = v.exp_m1());
    let is_test: Vec<bool> = (0..d.cells.len()).map(|i| i % 2 == 1).collect();
    check_library(&d, &d.obs.clone(), &is_test, e);
}

// ---------------------------------------------------------------------------------------------
// The command

/// See tests/embed.rs: children must not inherit HDF5's flock()s held by other test threads.
const NO_HDF5_LOCKS: (&str, &str) = ("HDF5_USE_FILE_LOCKING", "FALSE");

fn scgpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .args(args)
        .env(NO_HDF5_LOCKS.0, NO_HDF5_LOCKS.1)
        .current_dir(repo())
        .output()
        .expect("run scgpt")
}

fn write_part(path: &Path, d: &Data, keep: &[bool], label_col: &str) {
    let (ip, ix, v) = subset(d, keep);
    let mut w = H5adWriter::create(path, d.genes.len()).unwrap();
    w.append_rows(&ip, &ix, &v).unwrap();
    let obs = Frame { index: pick(&d.cells, keep), columns: vec![(label_col.to_string(), Column::categorical_from(&pick(&d.obs, keep)))] };
    w.finish(&obs, &Frame { index: d.genes.clone(), columns: vec![] }).unwrap();
}

#[test]
fn cli_on_the_wu2020_split() {
    let r = reference();
    let e = &r["datasets"]["wu2020_200"];
    let d = read("wu2020_200.h5ad", MatrixChoice::X, "cluster_orig");
    let patients = read("wu2020_200.h5ad", MatrixChoice::X, "patient").obs;
    let test_patients = strings(&e["split"]["test_patients"]);
    let is_test: Vec<bool> = patients.iter().map(|p| test_patients.contains(p)).collect();
    let is_train: Vec<bool> = is_test.iter().map(|t| !t).collect();
    let tmp = tempfile::tempdir().unwrap();
    let (train, test, report) = (tmp.path().join("ref.h5ad"), tmp.path().join("query.h5ad"), tmp.path().join("report"));
    write_part(&train, &d, &is_train, "cell_type");
    write_part(&test, &d, &is_test, "cluster_orig");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (train_s, test_s, report_s) = (s(&train), s(&test), s(&report));

    let base = ["baseline", "annotation", "--train", &train_s, "--test", &test_s, "--report", &report_s];
    let mut args = base.to_vec();
    args.extend(["--label-col", "cell_type", "--test-label-col", "cluster_orig"]);
    let out = scgpt(&args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scgpt failed:\n{text}");
    assert!(text.contains("accuracy"), "{text}");

    let m: Value = serde_json::from_str(&std::fs::read_to_string(report.join("metrics.json")).unwrap()).unwrap();
    let (acc, sk) = (m["accuracy"].as_f64().unwrap(), e["accuracy"].as_f64().unwrap());
    assert!((acc - sk).abs() <= TOL, "accuracy {acc} vs scikit-learn {sk}");
    assert_eq!(m["n_cells"].as_u64(), e["n_test"].as_u64());
    let csv = std::fs::read_to_string(report.join("confusion.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    let n = rows[0].split(',').count() - 1;
    assert!(rows[0].starts_with("true\\predicted,"));
    assert_eq!(rows.len() - 1, n, "confusion.csv is not square");
    assert!(rows[1..].iter().all(|r| r.split(',').count() == n + 1));
    assert_eq!(n, m["labels"].as_array().unwrap().len());
    let png = std::fs::read(report.join("confusion.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let preds = std::fs::read_to_string(report.join("predictions.csv")).unwrap();
    assert_eq!(preds.lines().count() as u64, 1 + e["n_test"].as_u64().unwrap());

    // A missing label column: an error naming the file and field, listing the columns.
    let mut bad = base.to_vec();
    bad.extend(["--label-col", "celltype"]);
    let out = scgpt(&bad);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("ref.h5ad") && err.contains("obs/celltype") && err.contains("cell_type"), "{err}");
}
