//! `scgpt eval perturbation`: a perturbation model's predictions for the test conditions of a
//! split, scored as scGPT's `compute_perturbation_metrics` and GEARS's non-dropout analysis
//! (`scgpt_eval::perturbation::metrics`), beside four baselines on the same conditions and
//! genes: no change (the control mean), the training mean, additive single-gene deltas, and a
//! ridge regression from the model's gene embeddings to single-gene deltas.
//!
//! Predictions are `predict-perturbation`'s (same pools, seed and defaults), so every number
//! can be recomputed from its output. DE genes are GEARS's own lists (`uns`) when the screen
//! has them, else computed the same way (t-test against control, `scgpt_eval::perturbation::de`).
//!
//! Report: `metrics.json` (ours at the top level, per subgroup, `baselines`), `per_condition.csv`
//! (ours) and `per_condition_baselines.csv`, and `plots/` with the top-20 DE genes of the five
//! best and five worst test conditions (by Pearson-delta on DE genes).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use scgpt_engine::perturbation_data::conditions_in_order;
use scgpt_engine::screen::Screen;
use scgpt_eval::perturbation::baselines::{self, BaselineInputs, BaselineKind, GeneEmbeddings, LinearOptions, TrainingCondition};
use scgpt_eval::perturbation::{
    evaluate, rank_genes_groups, write_per_condition_csv, Condition, ConditionInput, DeOptions, MetricOptions, PerturbationMetrics,
    PerturbationSplit,
};
use scgpt_eval::perturbation_plot::{write_de_plot, DePlot};
use scgpt_model::burn::tensor::{Int, Tensor, TensorData};
use serde_json::{json, Value};

use crate::perturbation::{progress_bar, PerturbationModel, PoolArgs, ScreenArgs};

#[derive(Debug, clap::Args)]
pub struct EvalPerturbationArgs {
    /// best_model/ of a task.kind = "perturbation" run.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The screen (GEARS-format h5ad) the split is of.
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// split.json (the run's, RUN/split.json).
    #[arg(long, value_name = "FILE")]
    pub split: PathBuf,
    /// Report folder: metrics.json, per_condition.csv, plots/.
    #[arg(long, value_name = "DIR")]
    pub report: PathBuf,
    /// DE genes per condition for the `_de` metrics and the plots.
    #[arg(long, default_value_t = 20)]
    pub n_de: usize,
    /// Ridge penalty of the linear baseline (on standardised embeddings).
    #[arg(long, default_value_t = 1.0)]
    pub ridge_lambda: f64,
    /// No pictures.
    #[arg(long)]
    pub no_plots: bool,
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub screen: ScreenArgs,
}

/// The DE lists of every condition: GEARS's from `uns` (ids of the var index, keyed by
/// `condition_name`), or computed.
fn de_lists(
    screen: &Screen,
    names: &[String],
    group_of: &[usize],
    control: usize,
    n_de: usize,
) -> anyhow::Result<(BTreeMap<String, (Vec<usize>, Vec<usize>)>, &'static str)> {
    let reader = scgpt_data::h5ad::H5adReader::open(&screen.path, scgpt_data::h5ad::MatrixChoice::X)?;
    let ranked = reader.uns_string_lists("rank_genes_groups_cov_all")?;
    let non_dropout = reader.uns_string_lists("top_non_dropout_de_20")?;
    if let (Some(ranked), Some(non_dropout), Some(cond_names)) = (ranked, non_dropout, &screen.condition_names) {
        let index: std::collections::HashMap<&str, usize> = screen.var_index.iter().enumerate().map(|(i, g)| (g.as_str(), i)).collect();
        let mut out = BTreeMap::new();
        for (i, c) in screen.conditions.iter().enumerate() {
            if out.contains_key(c) {
                continue;
            }
            let key = &cond_names[i];
            let to_cols = |list: Option<&Vec<String>>| -> anyhow::Result<Vec<usize>> {
                list.map(|l| {
                    l.iter()
                        .take(n_de)
                        .map(|g| {
                            index
                                .get(g.as_str())
                                .copied()
                                .with_context(|| format!("{}: uns DE list of {key} names {g}, not in the var index", screen.path.display()))
                        })
                        .collect()
                })
                .unwrap_or(Ok(Vec::new()))
            };
            out.insert(c.clone(), (to_cols(ranked.get(key))?, to_cols(non_dropout.get(key))?));
        }
        return Ok((out, "uns (GEARS's rank_genes_groups_cov_all, top_non_dropout_de_20)"));
    }
    let x = screen.x.csr()?;
    let de = rank_genes_groups(&x, group_of, names, control, &DeOptions { n_top: n_de, n_non_dropout: n_de })?;
    Ok((de.into_iter().map(|d| (d.condition, (d.top, d.top_non_dropout))).collect(), "computed (t-test against control, as GEARS)"))
}

/// Gene embeddings of the model (its encoder: LayerNorm(Embedding)) for the screen's genes in
/// the vocabulary.
fn gene_embeddings(m: &PerturbationModel, screen: &Screen) -> anyhow::Result<GeneEmbeddings> {
    let genes: Vec<String> = screen.genes.iter().filter(|g| m.vocab.get(g).is_some()).cloned().collect();
    anyhow::ensure!(!genes.is_empty(), "no screen gene is in the model vocabulary");
    let ids: Vec<i64> = genes.iter().map(|g| m.vocab.get(g).expect("filtered") as i64).collect();
    let t = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &m.device);
    let emb = m.model.encoder.forward(t);
    let d = emb.dims()[2];
    let values: Vec<f32> = emb.into_data().convert::<f32>().try_to_vec::<f32>().expect("floats");
    GeneEmbeddings::from_row_major(genes, d, values)
}

fn file_name(condition: &str) -> String {
    condition.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '+' { c } else { '_' }).collect()
}

pub fn run(a: &EvalPerturbationArgs) -> anyhow::Result<()> {
    let m = PerturbationModel::load(&a.model, &a.pool.device)?;
    let screen = Screen::read(&a.input, &m.screen_options(&a.screen)).context("--input")?;
    let format = screen.format();
    let split = PerturbationSplit::load_for_screen(&a.split, &conditions_in_order(&screen), &format).context("--split")?;
    if split.test.is_empty() {
        bail!("{}: the split has an empty test list; nothing to evaluate (use a simulation split)", a.split.display());
    }
    // Conditions and the cells of each.
    let rows = screen.rows_by_condition();
    let names: Vec<String> = rows.keys().cloned().collect();
    let mut group_of = vec![0usize; screen.n_cells()];
    for (k, (_, r)) in rows.iter().enumerate() {
        r.iter().for_each(|&i| group_of[i] = k);
    }
    let control = names.iter().position(|n| *n == screen.opts.control).expect("Screen::read checks for control cells");
    let means: BTreeMap<&String, Vec<f64>> = rows.iter().map(|(c, r)| (c, screen.mean_of(r))).collect();
    let control_mean = &means[&names[control]];

    let mut skipped = Vec::new();
    let mut test = Vec::new();
    for c in &split.test {
        match m.perturbed_columns(&screen, c) {
            Ok(_) if rows.contains_key(c) => test.push(c.clone()),
            Ok(_) => skipped.push(json!({"condition": c, "why": "no cells in the screen"})),
            Err(e) => skipped.push(json!({"condition": c, "why": format!("{e:#}")})),
        }
    }
    for s in &skipped {
        eprintln!("warning: test condition {} skipped: {}", s["condition"], s["why"]);
    }
    anyhow::ensure!(!test.is_empty(), "none of the split's {} test conditions can be predicted (see the warnings)", split.test.len());
    let (de, de_source) = de_lists(&screen, &names, &group_of, control, a.n_de)?;

    // Ours: predict-perturbation's means.
    let tokens = m.tokens(&screen)?;
    let control_rows = &rows[&names[control]];
    let bar = progress_bar(test.len() as u64, "test conditions");
    let mut ours = Vec::with_capacity(test.len());
    for c in &test {
        ours.push(m.predict(&screen, control_rows, &tokens, c, &a.pool)?);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let score = |preds: &[Option<Vec<f64>>]| -> anyhow::Result<PerturbationMetrics> {
        let empty = (Vec::new(), Vec::new());
        let inputs: Vec<ConditionInput> = test
            .iter()
            .zip(preds)
            .map(|(c, p)| {
                let (de, nd) = de.get(c).unwrap_or(&empty);
                ConditionInput { condition: c, truth: &means[c], pred: p.as_deref(), de, de_non_dropout: nd }
            })
            .collect();
        evaluate(control_mean, &inputs, &split.subgroup, &MetricOptions { n_de: a.n_de })
    };
    let ours_opt: Vec<Option<Vec<f64>>> = ours.iter().cloned().map(Some).collect();
    let metrics = score(&ours_opt)?;

    // Baselines on the same conditions.
    let train_conditions: Vec<TrainingCondition> = split
        .train
        .iter()
        .filter(|c| means.contains_key(c))
        .filter_map(|c| {
            format.parse(c).ok().filter(|p| !p.is_control()).map(|p| TrainingCondition {
                condition: p,
                mean: &means[c],
                n_cells: rows[c].len(),
            })
        })
        .collect();
    let parsed: Vec<Condition> = test.iter().map(|c| format.parse(c)).collect::<anyhow::Result<_>>()?;
    let embeddings = gene_embeddings(&m, &screen)?;
    let inputs = BaselineInputs {
        control_mean,
        train: &train_conditions,
        embeddings: Some(&embeddings),
        linear: LinearOptions { lambda: a.ridge_lambda },
    };
    let mut baseline_json = serde_json::Map::new();
    let mut baseline_rows = Vec::new();
    let mut additive = None;
    for kind in BaselineKind::ALL {
        let preds = baselines::predict(kind, &inputs, &parsed).with_context(|| format!("the {} baseline", kind.name()))?;
        let r = score(&preds)?;
        baseline_json.insert(kind.name().to_string(), serde_json::to_value(&r)?);
        baseline_rows.extend(r.per_condition.iter().map(|row| (kind.name(), row.clone())));
        if kind == BaselineKind::Additive {
            additive = Some(preds);
        }
    }

    std::fs::create_dir_all(&a.report).with_context(|| format!("{}: cannot create", a.report.display()))?;
    let mut doc = match serde_json::to_value(&metrics)? {
        Value::Object(m) => m,
        _ => unreachable!("metrics serialise to an object"),
    };
    doc.insert("baselines".into(), Value::Object(baseline_json));
    doc.insert("n_test_conditions".into(), json!(test.len()));
    doc.insert("skipped".into(), json!(skipped));
    doc.insert("de_genes".into(), json!(de_source));
    doc.insert("pool_size".into(), json!(a.pool.pool_size));
    doc.insert("seed".into(), json!(a.pool.seed));
    doc.insert("model".into(), json!(a.model.display().to_string()));
    doc.insert("split".into(), json!(a.split.display().to_string()));
    let text = serde_json::to_string_pretty(&Value::Object(doc))? + "\n";
    scgpt_data::atomic::write_bytes(&a.report.join("metrics.json"), text.as_bytes())?;
    write_per_condition_csv(&metrics.per_condition, &a.report.join("per_condition.csv"))?;
    scgpt_data::atomic::write_bytes(&a.report.join("per_condition_baselines.csv"), baseline_csv(&baseline_rows).as_bytes())?;

    if !a.no_plots {
        write_plots(a, &screen, &rows, &test, &ours, additive.as_deref(), control_mean, &de, &metrics)?;
    }
    print_summary(&metrics, &text, a)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_plots(
    a: &EvalPerturbationArgs,
    screen: &Screen,
    rows: &BTreeMap<String, Vec<usize>>,
    test: &[String],
    ours: &[Vec<f64>],
    additive: Option<&[Option<Vec<f64>>]>,
    control_mean: &[f64],
    de: &BTreeMap<String, (Vec<usize>, Vec<usize>)>,
    metrics: &PerturbationMetrics,
) -> anyhow::Result<()> {
    let key = scgpt_eval::perturbation::METRICS.iter().position(|m| *m == "pearson_de_delta").expect("a metric");
    let mut ranked: Vec<(usize, f64)> =
        metrics.per_condition.iter().enumerate().filter_map(|(i, r)| r.values[key].map(|v| (i, v))).collect();
    ranked.sort_by(|x, y| y.1.total_cmp(&x.1));
    let mut chosen: Vec<(usize, &str)> = ranked.iter().take(5).map(|&(i, _)| (i, "best")).collect();
    for &(i, _) in ranked.iter().rev().take(5) {
        if !chosen.iter().any(|(j, _)| *j == i) {
            chosen.push((i, "worst"));
        }
    }
    let dir = a.report.join("plots");
    std::fs::create_dir_all(&dir)?;
    let mut row = vec![0f32; screen.n_genes()];
    for (i, tag) in chosen {
        let c = &test[i];
        let Some((genes, _)) = de.get(c).filter(|(g, _)| !g.is_empty()) else { continue };
        let names: Vec<String> = genes.iter().map(|&g| screen.genes[g].clone()).collect();
        let mut truth: Vec<Vec<f32>> = vec![Vec::new(); genes.len()];
        for &r in &rows[c] {
            screen.dense_row(r, &mut row);
            for (k, &g) in genes.iter().enumerate() {
                truth[k].push(row[g] - control_mean[g] as f32);
            }
        }
        let predicted: Vec<f64> = genes.iter().map(|&g| ours[i][g] - control_mean[g]).collect();
        let extra: Option<Vec<f64>> = additive.and_then(|p| p[i].as_ref()).map(|p| genes.iter().map(|&g| p[g] - control_mean[g]).collect());
        let plot =
            DePlot { condition: c, genes: &names, truth: &truth, predicted: &predicted, extra: extra.as_deref().map(|e| ("additive", e)) };
        write_de_plot(&plot, &dir.join(format!("{tag}_{}.png", file_name(c))))?;
    }
    Ok(())
}

/// `baseline,condition,subgroup,<metrics>`, an empty cell where a value is undefined.
fn baseline_csv(rows: &[(&str, scgpt_eval::perturbation::ConditionMetrics)]) -> String {
    let quote = |s: &str| if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() };
    let mut text = format!("baseline,condition,subgroup,{}\n", scgpt_eval::perturbation::METRICS.join(","));
    for (name, r) in rows {
        text.push_str(&format!("{name},{},{}", quote(&r.condition), quote(r.subgroup.as_deref().unwrap_or(""))));
        for v in r.values {
            text.push(',');
            if let Some(v) = v {
                text.push_str(&v.to_string());
            }
        }
        text.push('\n');
    }
    text
}

fn print_summary(metrics: &PerturbationMetrics, json_text: &str, a: &EvalPerturbationArgs) -> anyhow::Result<()> {
    let doc: Value = serde_json::from_str(json_text)?;
    let cols = ["pearson", "pearson_de", "pearson_delta", "pearson_de_delta"];
    let fmt = |v: &Value| v.as_f64().map_or("   -  ".to_string(), |x| format!("{x:6.3}"));
    println!("{:<12} {}", "", cols.iter().map(|c| format!("{c:>16}")).collect::<String>());
    println!("{:<12} {}", "scgpt", cols.iter().map(|c| format!("{:>16}", fmt(&doc[c]))).collect::<String>());
    for b in BaselineKind::ALL {
        let d = &doc["baselines"][b.name()];
        println!("{:<12} {}", b.name(), cols.iter().map(|c| format!("{:>16}", fmt(&d[c]))).collect::<String>());
    }
    eprintln!("scgpt eval perturbation: {} test conditions; report in {}", metrics.per_condition.len(), a.report.display());
    Ok(())
}
