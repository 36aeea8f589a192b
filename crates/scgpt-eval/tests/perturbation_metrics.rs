//! The six perturbation metrics against scGPT 0.2.4 `compute_perturbation_metrics` and GEARS
//! 0.0.2 `non_dropout_analysis`, on `tests/data/perturbation_metrics.json` written by
//! `tests/gen/eval/gen_perturbation_metrics.py` (40 genes, 9 conditions incl. one all-zero
//! truth and one zero on its DE genes).
//!
//! Both sides average float64 cells and compute Pearson in float64 by different formulas
//! (scipy normalises before the dot product); measured difference 6.7e-16, allowed 1e-12.
//! Where we say "undefined" scGPT skips the condition too; GEARS instead scores the all-zero
//! condition (0 for the DE Pearson, a real value for its delta), which we do not follow.

use std::collections::BTreeMap;
use std::path::PathBuf;

use scgpt_eval::perturbation::{evaluate, write_per_condition_csv, ConditionInput, MetricOptions, METRICS};
use serde_json::Value;

const TOL: f64 = 1e-12;

fn rows(v: &Value) -> Vec<Vec<f64>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()).collect()
}

fn mean(rows: &[&Vec<f64>]) -> Vec<f64> {
    let mut m = vec![0.0; rows[0].len()];
    for r in rows {
        for (a, b) in m.iter_mut().zip(r.iter()) {
            *a += b;
        }
    }
    m.iter().map(|v| v / rows.len() as f64).collect()
}

#[test]
fn metrics_match_scgpt_and_gears() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/perturbation_metrics.json");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let control = rows(&f["control"]);
    let control_mean = mean(&control.iter().collect::<Vec<_>>());
    let (truth, pred) = (rows(&f["truth"]), rows(&f["pred"]));
    let cells: Vec<&str> = f["cells"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let names: Vec<String> = f["conditions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
    let list = |v: &Value| -> Vec<usize> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect() };

    let mut data = Vec::new();
    for c in &names {
        let of = |m: &[Vec<f64>]| mean(&cells.iter().zip(m).filter(|(k, _)| *k == c).map(|(_, r)| r).collect::<Vec<_>>());
        data.push((c.clone(), of(&truth), of(&pred), list(&f["de"][c]), list(&f["de_non_dropout"][c])));
    }
    let inputs: Vec<ConditionInput> =
        data.iter().map(|(c, t, p, de, nd)| ConditionInput { condition: c, truth: t, pred: Some(p), de, de_non_dropout: nd }).collect();
    let subgroup: BTreeMap<String, String> =
        names.iter().map(|c| (c.clone(), if c.contains("+ctrl") { "unseen_single" } else { "combo_seen0" }.to_string())).collect();
    let r = evaluate(&control_mean, &inputs, &subgroup, &MetricOptions::default()).unwrap();

    let worst = std::cell::Cell::new(0f64);
    let close = |ours: Option<f64>, theirs: &Value, what: &str| match (ours, theirs.as_f64()) {
        (None, None) => {}
        (Some(a), Some(b)) => {
            worst.set(worst.get().max((a - b).abs()));
            assert!((a - b).abs() < TOL, "{what}: {a} vs {b}")
        }
        (a, b) => panic!("{what}: ours {a:?}, theirs {b:?}"),
    };
    for row in &r.per_condition {
        let want = &f["expected"][&row.condition];
        for (k, name) in METRICS.iter().enumerate().take(4) {
            close(row.values[k], &want["scgpt"][name], &format!("{} {name} vs scGPT", row.condition));
        }
        close(row.values[4], &want["scgpt_non_zero_genes"]["pearson_de"], &format!("{} nodropout vs scGPT", row.condition));
        close(row.values[5], &want["scgpt_non_zero_genes"]["pearson_de_delta"], &format!("{} delta nodropout vs scGPT", row.condition));
        if row.values[4].is_some() {
            close(row.values[4], &want["gears"]["pearson_top20_de_non_dropout"], &format!("{} vs GEARS", row.condition));
            close(row.values[5], &want["gears"]["pearson_delta_top20_de_non_dropout"], &format!("{} delta vs GEARS", row.condition));
        }
    }
    for name in &METRICS[..4] {
        close(r.overall.get(name), &f["scgpt_means"][name], &format!("mean {name}"));
    }
    println!("worst difference from the originals: {:.1e}", worst.get());
    assert_eq!(r.overall.n_conditions, 9);
    assert_eq!(r.overall.n_undefined, [1, 2, 1, 2, 1, 1]);
    assert_eq!(r.subgroups["combo_seen0"].n_conditions, 2);

    let json = serde_json::to_value(&r).unwrap();
    assert!(json["subgroups"]["unseen_single"]["pearson_de"].is_f64());
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("per_condition.csv");
    write_per_condition_csv(&r.per_condition, &csv).unwrap();
    let text = std::fs::read_to_string(&csv).unwrap();
    assert!(text.starts_with("condition,subgroup,pearson,pearson_de,pearson_delta,"));
    assert!(text.contains("\nZERO+ctrl,unseen_single,,,,,,\n"), "{text}");
}
