//! Scoring predicted edges against a reference network, against scikit-learn, on
//! `tests/data/grn_ranking.json`, `grn_reference.tsv` and `grn_reference.json`, written by
//! `tests/gen/eval/gen_grn_stats.py`.
//!
//! - Ranking metrics: on fixed scores with ties (4 cases), `roc_auc` and `average_precision`
//!   must agree with scikit-learn's `roc_auc_score` and `average_precision_score` to 1e-12.
//! - Reference scoring: the TSV (comments, header, signs, a repeated edge, a self edge, genes
//!   outside the prediction) must give the generator's candidate pairs and labels exactly; the
//!   model's dense scores and the coexpression baseline (|Pearson| over a CSR matrix, 0 for absent
//!   or constant genes) must give scikit-learn's AUROC / AUPRC to 1e-12, and the coexpression
//!   scores numpy's to 1e-12.
//! - Analytic cases: perfect scores give AUROC = AUPRC = 1; the random baseline is reproducible
//!   and depends on the seed; no overlap is an error naming the counts.

use std::path::PathBuf;

use scgpt_eval::grn::{
    average_precision, evaluate_against_reference, roc_auc, Candidates, Coexpression, DenseScores, GeneEmbeddings, RandomScores,
    ReferenceNetwork,
};
use scgpt_eval::CsrMatrix;
use serde_json::Value;

const TOL: f64 = 1e-12;

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}
fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data(name)).unwrap()).unwrap()
}
fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}
fn usizes(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}
fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

#[test]
fn ranking_metrics_match_sklearn() {
    let f = json("grn_ranking.json");
    for (k, case) in f["cases"].as_array().unwrap().iter().enumerate() {
        let s = floats(&case["scores"]);
        let l: Vec<bool> = usizes(&case["labels"]).into_iter().map(|v| v == 1).collect();
        let (auroc, ap) = (roc_auc(&s, &l).unwrap().unwrap(), average_precision(&s, &l).unwrap().unwrap());
        println!("case {k}: AUROC {auroc:.6} (sklearn {}), AP {ap:.6} (sklearn {})", case["auroc"], case["auprc"]);
        assert!((auroc - case["auroc"].as_f64().unwrap()).abs() < TOL, "case {k} AUROC");
        assert!((ap - case["auprc"].as_f64().unwrap()).abs() < TOL, "case {k} AP");
    }
}

#[test]
fn reference_scoring_matches_sklearn() {
    let f = json("grn_reference.json");
    let reference = ReferenceNetwork::read(&data("grn_reference.tsv")).unwrap();
    assert!(reference.had_header);
    assert_eq!(reference.duplicates, f["n_repeated_lines"].as_u64().unwrap() as usize);
    assert_eq!(reference.edges.len(), f["n_reference_edges"].as_u64().unwrap() as usize);
    let predicted = strings(&f["predicted"]);

    let c = Candidates::new(&predicted, &reference).unwrap();
    assert_eq!(c.genes, usizes(&f["genes_evaluated"]));
    assert_eq!(c.regulators, usizes(&f["regulators_evaluated"]));
    let labels: Vec<bool> = usizes(&f["labels"]).into_iter().map(|v| v == 1).collect();
    assert_eq!(c.labels, labels);
    assert_eq!(c.labels.len(), f["candidates"].as_array().unwrap().len());

    let scores = DenseScores::new(predicted.len(), floats(&f["scores"])).unwrap();
    let indptr = usizes(&f["indptr"]);
    let indices: Vec<u32> = usizes(&f["indices"]).into_iter().map(|j| j as u32).collect();
    let values: Vec<f32> = f["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let var = strings(&f["var_names"]);
    let x = CsrMatrix::new(&indptr, &indices, &values, var.len()).unwrap();

    let co = Coexpression::new(x, &var, &predicted).unwrap();
    let ours = c.scores(&co, "coexpression").unwrap();
    let worst = ours.iter().zip(floats(&f["coexpression_scores"])).map(|(a, b)| (a - b).abs()).fold(0f64, f64::max);
    assert!(worst < TOL, "coexpression scores differ from numpy's by {worst}");

    let ev = evaluate_against_reference(&predicted, &scores, &reference, Some((x, &var)), 42).unwrap();
    println!("{}", serde_json::to_string_pretty(&ev).unwrap());
    println!("coexpression scores: worst difference from numpy {worst:.2e}");
    assert_eq!((ev.n_genes_evaluated, ev.n_regulators_evaluated, ev.n_candidates), (c.genes.len(), c.regulators.len(), labels.len()));
    assert_eq!(ev.n_edges_evaluated, labels.iter().filter(|&&l| l).count());
    for (got, want) in [(ev.model, &f["model"]), (ev.coexpression.unwrap(), &f["coexpression"])] {
        assert!((got.auroc.unwrap() - want["auroc"].as_f64().unwrap()).abs() < TOL);
        assert!((got.auprc.unwrap() - want["auprc"].as_f64().unwrap()).abs() < TOL);
    }
    assert_eq!(
        ev.coexpression_genes_missing,
        c.genes.iter().filter(|&&g| ["P50", "P51", "P52", "P53", "P54"].contains(&predicted[g].as_str())).count()
    );
    assert!(ev.model.auroc.unwrap() > 0.7, "the planted signal ranks above chance");
    let again = evaluate_against_reference(&predicted, &scores, &reference, None, 42).unwrap();
    assert_eq!(again.random, ev.random, "the same seed gives the same random baseline");
    assert!(again.coexpression.is_none());
    let other = evaluate_against_reference(&predicted, &scores, &reference, None, 43).unwrap();
    assert_ne!(other.random, ev.random);
}

#[test]
fn perfect_scores_score_one_and_no_overlap_is_an_error() {
    let reference = ReferenceNetwork::parse("A\tB\nA\tC\nD\tA\nD\tE\n", "ref.tsv").unwrap();
    let genes: Vec<String> = ["A", "B", "C", "D", "E", "F"].map(String::from).to_vec();
    // Perfect: reference edges score 1, everything else 0.
    let mut s = vec![0.0; 36];
    for (r, t) in [(0, 1), (0, 2), (3, 0), (3, 4)] {
        s[r * 6 + t] = 1.0;
    }
    let ev = evaluate_against_reference(&genes, &DenseScores::new(6, s).unwrap(), &reference, None, 0).unwrap();
    assert_eq!((ev.model.auroc, ev.model.auprc), (Some(1.0), Some(1.0)));
    // F is not in the reference: E = A..E, regulators A and D, 2 × 4 candidates, 4 edges.
    assert_eq!((ev.n_genes_evaluated, ev.n_regulators_evaluated, ev.n_candidates, ev.n_edges_evaluated), (5, 2, 8, 4));
    assert_eq!(ev.prevalence, 0.5);
    // Cosine scores from embeddings work as a scorer too.
    let emb = GeneEmbeddings::new(genes.clone(), (0..12).map(|i| (i as f32 * 0.7).sin()).collect(), 2).unwrap();
    let cos = evaluate_against_reference(&genes, &emb, &reference, None, 0).unwrap();
    assert!(cos.model.auroc.is_some());

    let none = ReferenceNetwork::parse("TF1\tX1\nTF2\tX2\nTF2\tX3\n", "chip.tsv").unwrap();
    let err = evaluate_against_reference(&genes, &emb, &none, None, 0).unwrap_err().to_string();
    assert!(err.contains("chip.tsv") && err.contains("2 regulators and 3 targets") && err.contains("6 predicted genes"), "{err}");
    let targets_only = ReferenceNetwork::parse("TF1\tA\n", "t.tsv").unwrap();
    let err = evaluate_against_reference(&genes, &emb, &targets_only, None, 0).unwrap_err().to_string();
    assert!(err.contains("none of its 1 regulators"), "{err}");
    let dup: Vec<String> = ["A", "A"].map(String::from).to_vec();
    assert!(Candidates::new(&dup, &reference).is_err());
    assert!(DenseScores::new(3, vec![0.0; 8]).is_err());
    let nan = DenseScores::new(6, vec![f64::NAN; 36]).unwrap();
    assert!(evaluate_against_reference(&genes, &nan, &reference, None, 0).is_err());
    let r = RandomScores { genes: &genes, seed: 1 };
    assert!(Candidates::new(&genes, &reference).unwrap().scores(&r, "random").unwrap().iter().all(|v| (0.0..1.0).contains(v)));
}
