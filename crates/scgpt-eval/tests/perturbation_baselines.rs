//! The perturbation baselines on planted toys where the right answer is known.

use std::collections::BTreeMap;

use scgpt_eval::perturbation::baselines::{additive, linear, no_change, predict, train_mean};
use scgpt_eval::perturbation::{
    evaluate, BaselineInputs, BaselineKind, Condition, ConditionInput, GeneEmbeddings, LinearDeltaModel, LinearOptions, MetricOptions,
    TrainingCondition,
};

const G: usize = 12;

fn control() -> Vec<f64> {
    (0..G).map(|j| 1.0 + 0.25 * j as f64).collect()
}

/// A planted single-gene delta.
fn delta(seed: usize) -> Vec<f64> {
    (0..G).map(|j| (((seed * 7 + j * 5) % 11) as f64 - 5.0) / 4.0).collect()
}

fn single(g: &str) -> Condition {
    Condition::Single(g.into())
}

#[test]
fn additive_is_exact_on_an_additive_screen() {
    let m = control();
    let singles: Vec<Vec<f64>> = (0..3).map(|s| m.iter().zip(delta(s)).map(|(a, b)| a + b).collect()).collect();
    let train: Vec<TrainingCondition> =
        ["A", "B", "C"].iter().zip(&singles).map(|(g, mean)| TrainingCondition { condition: single(g), mean, n_cells: 10 }).collect();
    let test = vec![
        Condition::Double("A".into(), "B".into()),
        Condition::Double("C".into(), "A".into()),
        Condition::Double("A".into(), "Z".into()),
        single("Z"),
    ];
    let pred = additive(&m, &train, &test).unwrap();
    for (k, (a, b)) in [(0, 1), (2, 0)].into_iter().enumerate() {
        let want: Vec<f64> = (0..G).map(|j| m[j] + delta(a)[j] + delta(b)[j]).collect();
        let got = pred[k].as_ref().unwrap();
        for j in 0..G {
            assert!((got[j] - want[j]).abs() < 1e-12, "double {k}, gene {j}");
        }
    }
    assert!(pred[2].is_none(), "a double with an unseen single has no additive prediction");
    assert!(pred[3].is_none(), "singles have no additive prediction");
}

#[test]
fn ridge_recovers_a_planted_linear_map() {
    // delta(gene) = A·e(gene) + b with 3-d embeddings, 20 training genes.
    let a: Vec<[f64; 3]> = (0..G).map(|j| [0.5 - 0.1 * j as f64, 0.03 * j as f64, (j % 3) as f64 - 1.0]).collect();
    let b: Vec<f64> = (0..G).map(|j| 0.2 * (j % 4) as f64).collect();
    let emb = |i: usize| -> Vec<f32> { vec![(i as f32 * 0.37).sin() * 2.0, (i as f32 * 0.71).cos(), (i % 5) as f32 - 2.0] };
    let planted = |e: &[f32]| -> Vec<f64> { (0..G).map(|j| b[j] + (0..3).map(|k| a[j][k] * e[k] as f64).sum::<f64>()).collect() };
    let genes: Vec<String> = (0..25).map(|i| format!("G{i}")).collect();
    let e = GeneEmbeddings::from_rows(genes.clone(), (0..25).map(emb).collect()).unwrap();

    let m = control();
    let means: Vec<Vec<f64>> = (0..20).map(|i| m.iter().zip(planted(&emb(i))).map(|(x, d)| x + d).collect()).collect();
    let train: Vec<TrainingCondition> =
        (0..20).map(|i| TrainingCondition { condition: single(&genes[i]), mean: &means[i], n_cells: 5 }).collect();
    let test = vec![single("G21"), Condition::Double("G22".into(), "G23".into()), single("NOEMB")];
    let pred = linear(&m, &train, &test, &e, &LinearOptions { lambda: 1e-9 }).unwrap();
    let want21: Vec<f64> = m.iter().zip(planted(&emb(21))).map(|(x, d)| x + d).collect();
    let want_double: Vec<f64> = (0..G).map(|j| m[j] + planted(&emb(22))[j] + planted(&emb(23))[j]).collect();
    for j in 0..G {
        assert!((pred[0].as_ref().unwrap()[j] - want21[j]).abs() < 1e-6, "single, gene {j}");
        assert!((pred[1].as_ref().unwrap()[j] - want_double[j]).abs() < 1e-6, "double, gene {j}");
    }
    assert!(pred[2].is_none(), "a gene without an embedding has no linear prediction");

    // A strong ridge shrinks every prediction to the mean training delta.
    let x: Vec<&[f32]> = (0..20).map(|i| e.get(&genes[i]).unwrap()).collect();
    let y: Vec<Vec<f64>> = (0..20).map(|i| planted(&emb(i))).collect();
    let mean_delta: Vec<f64> = (0..G).map(|j| y.iter().map(|r| r[j]).sum::<f64>() / 20.0).collect();
    let shrunk = LinearDeltaModel::fit(&x, &y, 1e12).unwrap().predict_delta(&emb(21)).unwrap();
    for j in 0..G {
        assert!((shrunk[j] - mean_delta[j]).abs() < 1e-9);
    }
    assert!(LinearDeltaModel::fit(&x, &y, 0.0).is_err());
}

#[test]
fn no_change_leaves_the_delta_metrics_undefined() {
    let m = control();
    let truth: Vec<f64> = m.iter().zip(delta(1)).map(|(a, b)| a + b).collect();
    let other: Vec<f64> = m.iter().zip(delta(2)).map(|(a, b)| a + b).collect();
    let train = [
        TrainingCondition { condition: single("A"), mean: &other, n_cells: 3 },
        TrainingCondition { condition: Condition::Control, mean: &m, n_cells: 100 },
    ];
    let test = [single("B")];
    let inputs = BaselineInputs { control_mean: &m, train: &train, embeddings: None, linear: LinearOptions::default() };
    let de: Vec<usize> = (0..G).collect();
    let sub = BTreeMap::new();
    let pred = predict(BaselineKind::NoChange, &inputs, &test).unwrap();
    assert_eq!(pred, no_change(&m, &test));
    let p = pred[0].as_deref();
    let input = [ConditionInput { condition: "B+ctrl", truth: &truth, pred: p, de: &de, de_non_dropout: &de }];
    let r = evaluate(&m, &input, &sub, &MetricOptions::default()).unwrap();
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["pearson"].is_f64());
    for k in ["pearson_delta", "pearson_de_delta", "pearson_de_delta_nodropout"] {
        assert!(json[k].is_null(), "{k} = {}", json[k]);
        assert_eq!(json["n_undefined"][k], 1);
    }

    // train_mean ignores the control and weights conditions by cells.
    assert_eq!(train_mean(&train, &test).unwrap()[0].as_ref().unwrap(), &other);
    assert!(predict(BaselineKind::Linear, &inputs, &test).unwrap_err().to_string().contains("needs gene embeddings"));
}

/// The pieces together on the DE fixture's screen: groups, means, DE genes, a simulation split,
/// every baseline, metrics.json.
#[test]
fn end_to_end_on_a_small_screen() {
    use scgpt_eval::perturbation::{
        group_means, rank_genes_groups, simulation_split, CellGroups, ConditionFormat, DeOptions, SimulationOptions,
    };
    use scgpt_eval::CsrMatrix;
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/perturbation_de.json");
    let f: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let ints = |v: &serde_json::Value| -> Vec<usize> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect() };
    let (indptr, indices) = (ints(&f["indptr"]), ints(&f["indices"]).into_iter().map(|j| j as u32).collect::<Vec<_>>());
    let data: Vec<f32> = f["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let x = CsrMatrix::new(&indptr, &indices, &data, 64).unwrap();
    let names: Vec<&str> = f["groups"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    let cells: Vec<&str> = ints(&f["cell_group"]).into_iter().map(|k| names[k]).collect();

    let fmt = ConditionFormat::default();
    let groups = CellGroups::new(&cells, &fmt).unwrap();
    let means = group_means(&x, &groups.cell_group, groups.names.len()).unwrap();
    let m = means[groups.control].clone().unwrap();
    let de = rank_genes_groups(&x, &groups.cell_group, &groups.names, groups.control, &DeOptions::default()).unwrap();
    let split = simulation_split(&cells, &SimulationOptions::default()).unwrap();
    assert!(!split.test.is_empty());
    let idx = |c: &str| groups.names.iter().position(|n| n == c).unwrap();
    let train: Vec<TrainingCondition> = split
        .train
        .iter()
        .map(|c| TrainingCondition { condition: fmt.parse(c).unwrap(), mean: means[idx(c)].as_deref().unwrap(), n_cells: 10 })
        .collect();
    let test: Vec<Condition> = split.test.iter().map(|c| fmt.parse(c).unwrap()).collect();
    let emb = GeneEmbeddings::from_rows(
        ["KLF1", "CEBPA", "MAP2K6", "BAK1", "ETS2", "CBL", "DUSP9", "SGK1"].map(String::from).to_vec(),
        (0..8).map(|i| vec![i as f32, (i * i) as f32 % 5.0]).collect(),
    )
    .unwrap();
    let inputs = BaselineInputs { control_mean: &m, train: &train, embeddings: Some(&emb), linear: LinearOptions::default() };
    for kind in BaselineKind::ALL {
        let pred = predict(kind, &inputs, &test).unwrap();
        let rows: Vec<ConditionInput> = split
            .test
            .iter()
            .zip(&pred)
            .map(|(c, p)| {
                let d = de.iter().find(|d| &d.condition == c).unwrap();
                ConditionInput {
                    condition: c,
                    truth: means[idx(c)].as_deref().unwrap(),
                    pred: p.as_deref(),
                    de: &d.top,
                    de_non_dropout: &d.top_non_dropout,
                }
            })
            .collect();
        let r = evaluate(&m, &rows, &split.subgroup, &MetricOptions::default()).unwrap();
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("NaN"), "{}: {text}", kind.name());
        assert_eq!(r.overall.n_conditions, split.test.len());
        assert_eq!(r.subgroups.values().map(|s| s.n_conditions).sum::<usize>(), split.test.len());
        if kind == BaselineKind::NoChange {
            assert!(r.overall.get("pearson_delta").is_none() && r.overall.get("pearson").is_some());
        }
    }
}
