//! Program activity against scanpy 1.11.5's `sc.tl.score_genes` and scGPT 0.2.4's
//! `GeneEmbedding.score_metagenes` (min–max scaling) on `tests/data/grn_score.json`, written by
//! `tests/gen/eval/gen_grn_score.py`: a 60 × 1,400 log-normalised float32 CSR matrix (4 cell
//! types, 150+ all-zero genes), 6 programs (one with two names missing from the data, one of
//! all-but-one-cell zero genes) and three settings: the defaults (ctrl_size 50, n_bins 25: bins
//! of 58 genes, so control genes are drawn from numpy's generator), ctrl_size 10 / n_bins 10,
//! and ctrl_size 500 (no draw).
//!
//! The control gene sets must be identical (they are drawn by the port of numpy's legacy
//! RandomState). The raw scores must be identical up to reading the JSON (serde_json's default
//! float parser can be 1 ulp off; 2 ulp allowed): the port sums as scipy does (float32 column
//! sums, float32 `reduceat` row sums in numpy's pairwise order). Scaled scores
//! and per-cell-type means must agree to 1e-12 absolute (np.mean's pairwise f64 sum against our
//! sequential one; the worst difference measured is printed: 2.2e-16).

use std::path::PathBuf;

use scgpt_eval::grn::{activity_by_cell_type, program_activity, GeneScorer, GeneSet, ScoreGenesOptions};
use scgpt_eval::CsrMatrix;
use serde_json::Value;

const TOL: f64 = 1e-12;

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}
fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn scores_match_scanpy_and_scgpt() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/grn_score.json");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let usizes = |v: &Value| -> Vec<usize> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect() };
    let indptr = usizes(&f["indptr"]);
    let indices: Vec<u32> = usizes(&f["indices"]).into_iter().map(|j| j as u32).collect();
    let data: Vec<f32> = f["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let genes = strings(&f["genes"]);
    let x = CsrMatrix::new(&indptr, &indices, &data, genes.len()).unwrap();
    let labels = strings(&f["cell_type"]);
    let scorer = GeneScorer::new(x, &genes).unwrap();
    let programs: Vec<GeneSet> =
        f["programs"].as_object().unwrap().iter().map(|(name, g)| GeneSet::new(name.clone(), "", strings(g))).collect();
    assert_eq!(programs.len(), 6);

    let mut worst = 0f64;
    let mut close = |ours: f64, theirs: f64, what: &str| {
        let d = (ours - theirs).abs();
        worst = worst.max(d);
        assert!(d <= TOL, "{what}: {ours} vs {theirs}");
    };
    let mut sampled_cases = 0;
    let mut worst_ulps = 0i64;
    for case in f["cases"].as_array().unwrap() {
        let opts = ScoreGenesOptions {
            ctrl_size: case["ctrl_size"].as_u64().unwrap() as usize,
            n_bins: case["n_bins"].as_u64().unwrap() as usize,
            random_state: 0,
        };
        let act = program_activity(&scorer, &programs, &opts).unwrap();
        for (k, p) in programs.iter().enumerate() {
            let tag = format!("ctrl_size {} n_bins {} program {}", opts.ctrl_size, opts.n_bins, p.name);
            let d = &act.details[k];
            assert_eq!(d.control_genes, usizes(&case["control_genes"][&p.name]), "{tag}: control genes");
            for (i, (&o, t)) in d.scores.iter().zip(floats(&case["raw"][&p.name])).enumerate() {
                let ulps = (o.to_bits() as i64 - t.to_bits() as i64).abs();
                assert!(ulps <= 2 || o == t, "{tag}: raw score of cell {i}: {o} vs {t}");
                worst_ulps = worst_ulps.max(ulps);
            }
            for (i, (&o, t)) in act.activity[k].iter().zip(floats(&case["scaled"][&p.name])).enumerate() {
                close(o, t, &format!("{tag}: scaled score of cell {i}"));
            }
            if p.name == "3" {
                assert_eq!(d.ignored, vec!["NOT_A_GENE".to_string(), "ALSO_MISSING".to_string()]);
            }
        }
        if opts.ctrl_size == 50 {
            sampled_cases += 1;
        }
        let table = activity_by_cell_type(&act, &labels).unwrap();
        assert_eq!(table.cell_types, vec!["B cell", "CD4 T", "Monocyte", "NK"]);
        for (k, p) in table.programs.iter().enumerate() {
            for (t, ct) in table.cell_types.iter().enumerate() {
                close(table.mean[k][t], case["by_type"][p][ct].as_f64().unwrap(), &format!("mean of program {p} in {ct}"));
            }
        }
    }
    assert_eq!(sampled_cases, 1);
    println!("raw scores: worst {worst_ulps} ulp from scanpy's; scaled and per-type means: worst absolute difference {worst:.2e}");
}
