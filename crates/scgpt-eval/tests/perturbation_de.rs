//! DE genes against GEARS (cell-gears 0.0.2 `get_DE_genes` → scanpy 1.11.5 `rank_genes_groups`
//! t-test, and `get_dropout_non_zero_genes`) on `tests/data/perturbation_de.json`, written by
//! `tests/gen/eval/gen_perturbation_de.py`: 230 cells × 64 genes, 12 conditions with planted
//! shifts and dropouts. The top-20 and non-dropout top-20 index lists must be identical (the
//! generator checks that no |t| ties where they are cut); the t statistics must agree with the
//! float32 values scanpy stores to float32 precision.

use std::path::PathBuf;

use scgpt_eval::perturbation::{rank_genes_groups, DeOptions};
use scgpt_eval::CsrMatrix;
use serde_json::Value;

/// scanpy stores scores as float32 (measured: ours within 1 float32 rounding).
const SCORE_REL_TOL: f64 = 1e-6;

#[test]
fn de_genes_match_gears_and_scanpy() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/perturbation_de.json");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let usizes = |v: &Value| -> Vec<usize> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect() };
    let indptr = usizes(&f["indptr"]);
    let indices: Vec<u32> = usizes(&f["indices"]).into_iter().map(|j| j as u32).collect();
    let data: Vec<f32> = f["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let x = CsrMatrix::new(&indptr, &indices, &data, f["n_genes"].as_u64().unwrap() as usize).unwrap();
    let groups: Vec<String> = f["groups"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
    let cell_group = usizes(&f["cell_group"]);

    let de = rank_genes_groups(&x, &cell_group, &groups, 0, &DeOptions::default()).unwrap();
    assert_eq!(de.len(), groups.len() - 1);
    let mut worst = 0f64;
    let mut n_dropouts_seen = 0;
    for d in &de {
        let want = &f["expected"][&d.condition];
        assert_eq!(d.top, usizes(&want["top20"]), "{}: top 20", d.condition);
        assert_eq!(d.top_non_dropout, usizes(&want["top_non_dropout_de_20"]), "{}: non-dropout top 20", d.condition);
        for (ours, theirs) in d.scores.iter().zip(want["scores_f32"].as_array().unwrap()) {
            let theirs = theirs.as_f64().unwrap();
            let rel = (ours - theirs).abs() / theirs.abs().max(1e-12);
            worst = worst.max(rel);
            assert!(rel < SCORE_REL_TOL, "{}: t {ours} vs scanpy {theirs}", d.condition);
        }
        n_dropouts_seen += want["dropouts_in_top20"].as_u64().unwrap();
    }
    assert!(n_dropouts_seen >= 12, "the fixture should exercise the dropout rule");
    println!("worst relative t difference against scanpy's float32 scores: {worst:.2e}");
}
