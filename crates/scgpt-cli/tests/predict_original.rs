//! `scgpt predict` on an ORIGINAL scGPT fine-tuned annotation model, as the original's
//! Tutorial_Annotation leaves it: `best_model.pt` with the flash-attn `Wqkv` names and a
//! 4-class `cls_decoder`, the pretrained model's `args.json` (no `n_cls`), `vocab.json` and the
//! tutorial's `id2type.json`. The fixtures of `tests/data/predict/` come from
//! `tests/gen/engine/gen_original_annotation_model.py`, which runs the original scGPT 0.2.4
//! model, binning and `tokenize_and_pad_batch` (see its docstring); no torch is needed here.
//!
//! The probabilities `predict` writes (`obsm/scgpt_probs`, read back with the hdf5 crate) must
//! equal the original's `softmax(cls_output)` within 1e-5, in the class order of id2type.json
//! (`uns/scgpt_classes`), with the argmax labels in `obs/scgpt_label`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hdf5::types::VarLenUnicode;
use serde_json::Value;

const TOL: f32 = 1e-5;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn data(name: &str) -> PathBuf {
    repo().join("tests/data/predict").join(name)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The children do not lock HDF5 files (see tests/embed.rs: a forked child inherits the locks
/// of files another test thread has open).
fn scgpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .args(args)
        .env("HDF5_USE_FILE_LOCKING", "FALSE")
        .current_dir(repo())
        .output()
        .expect("run scgpt")
}

fn predict(out: &Path, extra: &[&str]) {
    let (model, input) = (data("original_model"), data("query.h5ad"));
    let mut args = vec!["predict", "--model", s(&model), "--input", s(&input), "--output", s(out), "--quiet"];
    args.extend_from_slice(extra);
    let o = scgpt(&args);
    assert!(
        o.status.success(),
        "scgpt predict {extra:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data("expected.json")).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

fn read_strings(ds: &hdf5::Dataset) -> Vec<String> {
    ds.read_raw::<VarLenUnicode>().unwrap().iter().map(|s| s.as_str().to_string()).collect()
}

struct Written {
    probs: Vec<Vec<f32>>,
    classes: Vec<String>,
    labels: Vec<String>,
}

fn read_output(path: &Path) -> Written {
    let f = hdf5::File::open(path).unwrap();
    let ds = f.dataset("obsm/scgpt_probs").unwrap();
    let shape = ds.shape();
    assert_eq!(shape.len(), 2, "obsm/scgpt_probs is cells x classes");
    let flat: Vec<f32> = ds.read_raw().unwrap();
    let probs = flat.chunks(shape[1]).map(|c| c.to_vec()).collect();
    let classes = read_strings(&f.dataset("uns/scgpt_classes").unwrap());
    let cats = read_strings(&f.dataset("obs/scgpt_label/categories").unwrap());
    let codes: Vec<i32> = f.dataset("obs/scgpt_label/codes").unwrap().read_raw().unwrap();
    let labels = codes.iter().map(|&c| cats[c as usize].clone()).collect();
    Written { probs, classes, labels }
}

/// id2type.json as the tutorial writes it (`json.dump` of `dict(enumerate(categories))`).
fn id2type_order() -> Vec<String> {
    let m: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(data("original_model/id2type.json")).unwrap()).unwrap();
    (0..m.len()).map(|i| m[&i.to_string()].as_str().unwrap().to_string()).collect()
}

fn check(what: &str, got: &Written, want: &Value) {
    let classes = strings(&want["classes"]);
    assert_eq!(classes, id2type_order(), "expected.json and id2type.json disagree");
    assert_eq!(got.classes, classes, "{what}: uns/scgpt_classes is not id2type's order");
    let probs = rows(&want["probabilities"]);
    assert_eq!(got.probs.len(), probs.len(), "{what}: cell count");
    let mut worst = (0.0f32, 0, 0);
    for (i, (g, w)) in got.probs.iter().zip(&probs).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: class count of cell {i}");
        for (k, (a, b)) in g.iter().zip(w).enumerate() {
            let d = (a - b).abs();
            if d > worst.0 || d.is_nan() {
                worst = (d, i, k);
            }
        }
    }
    let (d, i, k) = worst;
    assert!(
        d <= TOL,
        "{what}: probability of cell {i} class {k} ({}) is {} in scgpt predict but {} in the original (|diff| {d:e} > {TOL:e})",
        classes[k],
        got.probs[i][k],
        probs[i][k]
    );
    eprintln!("{what}: worst |diff| {d:e} (cell {i}, class {k})");
    assert_eq!(got.labels, strings(&want["labels"]), "{what}: obs/scgpt_label is not the original's argmax");
}

#[test]
fn original_finetuned_annotation_model_gives_the_original_probabilities() {
    let want = expected();
    let tmp = tempfile::tempdir().unwrap();
    // Batches of 5, 5 and 2 cells: each padded to its own longest cell (32, 45 and 28 tokens),
    // where the original padded all 12 to 45.
    let out = tmp.path().join("out.h5ad");
    predict(&out, &["--deterministic", "--batch-size", "5"]);
    check("--batch-size 5", &read_output(&out), &want);
    // One batch: the original's padding exactly.
    let out = tmp.path().join("one_batch.h5ad");
    predict(&out, &["--deterministic", "--batch-size", "64"]);
    check("--batch-size 64", &read_output(&out), &want);
    // The default (seeded random tie-break): the query has no ties within a cell, so the same.
    let out = tmp.path().join("seeded.h5ad");
    predict(&out, &["--batch-size", "3", "--seed", "11"]);
    check("--seed 11", &read_output(&out), &want);
}

#[test]
fn fixture_is_what_the_test_claims() {
    // A pretrained args.json: the class count comes from id2type.json alone.
    let args: Value = serde_json::from_str(&std::fs::read_to_string(data("original_model/args.json")).unwrap()).unwrap();
    assert!(args.get("n_cls").is_none() && args.get("cell_emb_style").is_none());
    assert_eq!(id2type_order().len(), 4);
    // Every cell is shorter than max_seq_len (3001): nothing is subsampled; <cls> first with 0.
    let want = expected();
    let vocab: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(data("original_model/vocab.json")).unwrap()).unwrap();
    let cls = vocab["<cls>"].as_u64().unwrap();
    let mut lengths = Vec::new();
    for t in want["tokens"].as_array().unwrap() {
        let ids = t["ids"].as_array().unwrap();
        let values = t["values"].as_array().unwrap();
        assert_eq!(ids[0].as_u64(), Some(cls));
        assert_eq!(values[0].as_f64(), Some(0.0));
        assert!(ids.len() < 3001);
        lengths.push(ids.len());
    }
    // Batches of 5 differ in length, so padding differs between batches.
    let longest: Vec<usize> = lengths.chunks(5).map(|c| *c.iter().max().unwrap()).collect();
    assert!(longest.windows(2).all(|w| w[0] != w[1]), "{longest:?}");
}
