//! The perturbation recipe of `scgpt experiment run` (`recipe = "perturbation"`): on one screen
//! in the GEARS format (`[dataset.file]`, or a screen simulated with planted effects,
//! `[dataset.simulate]`), every fine-tuning variant (a `task.kind = "perturbation"` config) is
//! trained, and `scgpt eval perturbation` scores its `best_model/` on the test conditions of
//! that run's `split.json`, beside the four baselines it computes on the same conditions (no
//! change, training mean, additive, linear). `report.md` puts the six metrics side by side over
//! all test conditions and per subgroup, says in a sentence which baseline beats which variant
//! on which metric, and, when the screen has a truth file (a simulated screen), compares the
//! Pearson-delta of each variant and of the additive baseline on the test doubles of each
//! planted kind (additive, synergy).
//!
//! Layout of the output directory: `data/screen.h5ad` and `data/screen.truth.json` (simulated),
//! `runs/<variant>/` (scgpt-train run directories, with `split.json`), `reports/<variant>/`
//! (`metrics.json`, `per_condition.csv`, `per_condition_baselines.csv`, `plots/`), `report.md`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use serde::Deserialize;
use serde_json::Value;

use scgpt_engine::config::TaskKind;
use scgpt_engine::data::toml_str;
use scgpt_engine::perturbation_data::SPLIT_FILE;
use scgpt_eval::perturbation::METRICS;

use crate::eval_perturbation::{self, EvalPerturbationArgs};
use crate::experiment::{fetch, finetune_sets, pretrain, train, write_report_md, Experiment};

/// `[dataset.simulate]`: `scgpt-prep simulate-perturbation`'s settings; a key left out takes the
/// simulator's default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Simulate {
    pub genes: Option<usize>,
    pub perturbed_genes: Option<usize>,
    pub doubles: Option<usize>,
    pub synergy_fraction: Option<f64>,
    pub modules: Option<usize>,
    pub cells_per_condition: Option<usize>,
    pub control_cells: Option<usize>,
    pub targets_per_gene: Option<usize>,
    pub synergy_targets: Option<usize>,
    pub min_lfc: Option<f64>,
    pub max_lfc: Option<f64>,
    pub counts_per_gene: Option<f64>,
    pub cell_type: Option<String>,
    pub seed: Option<u64>,
}

/// `[eval]`: settings of `scgpt eval perturbation`; a key left out takes its default.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSettings {
    /// Control cells averaged per predicted condition (`--pool-size`).
    pub pool_size: Option<usize>,
    /// DE genes per condition for the `_de` metrics (`--n-de`).
    pub n_de: Option<usize>,
}

/// Parses `eval perturbation`'s own flags, so its defaults live in one place.
#[derive(clap::Parser)]
struct EvalCommand {
    #[command(flatten)]
    args: EvalPerturbationArgs,
}

/// `eval perturbation` of a variant as the command line would run it: the run's model and
/// split, the experiment's seed for the control pools, the dataset's screen columns.
fn eval_args(e: &Experiment, run_dir: &Path, src: &Path, report: &Path) -> anyhow::Result<EvalPerturbationArgs> {
    use clap::Parser;
    let d = &e.dataset;
    let ev = e.eval.clone().unwrap_or_default();
    let mut argv: Vec<String> = vec!["eval-perturbation".into()];
    let mut put = |flag: &str, v: String| {
        argv.push(format!("--{flag}"));
        argv.push(v);
    };
    put("model", run_dir.join("best_model").display().to_string());
    put("input", src.display().to_string());
    put("split", run_dir.join(SPLIT_FILE).display().to_string());
    put("report", report.display().to_string());
    put("seed", e.seed.to_string());
    for (flag, v) in [("condition-col", &d.condition_col), ("control", &d.control), ("separator", &d.separator), ("gene-col", &d.gene_col)]
    {
        if !v.is_empty() {
            put(flag, v.clone());
        }
    }
    if let Some(n) = ev.pool_size {
        put("pool-size", n.to_string());
    }
    if let Some(n) = ev.n_de {
        put("n-de", n.to_string());
    }
    if d.normalize == Some(true) {
        argv.push("--normalize".into());
    }
    Ok(EvalCommand::try_parse_from(&argv).map_err(|err| anyhow::anyhow!("eval: {}", err.to_string().trim()))?.args)
}

/// Parses the simulator's own flags, so its defaults live in one place.
#[derive(clap::Parser)]
struct SimulateCommand {
    #[command(flatten)]
    args: scgpt_prep::simulate_perturbation::SimulatePerturbationArgs,
}

impl Simulate {
    fn args(&self, out: &Path, quiet: bool) -> anyhow::Result<scgpt_prep::simulate_perturbation::SimulatePerturbationArgs> {
        use clap::Parser;
        let mut argv = vec!["simulate-perturbation".to_string(), "--out".into(), out.display().to_string()];
        let mut put = |flag: &str, v: Option<String>| {
            if let Some(v) = v {
                argv.push(format!("--{flag}"));
                argv.push(v);
            }
        };
        put("genes", self.genes.map(|v| v.to_string()));
        put("perturbed-genes", self.perturbed_genes.map(|v| v.to_string()));
        put("doubles", self.doubles.map(|v| v.to_string()));
        put("synergy-fraction", self.synergy_fraction.map(|v| v.to_string()));
        put("modules", self.modules.map(|v| v.to_string()));
        put("cells-per-condition", self.cells_per_condition.map(|v| v.to_string()));
        put("control-cells", self.control_cells.map(|v| v.to_string()));
        put("targets-per-gene", self.targets_per_gene.map(|v| v.to_string()));
        put("synergy-targets", self.synergy_targets.map(|v| v.to_string()));
        put("min-lfc", self.min_lfc.map(|v| v.to_string()));
        put("max-lfc", self.max_lfc.map(|v| v.to_string()));
        put("counts-per-gene", self.counts_per_gene.map(|v| v.to_string()));
        put("cell-type", self.cell_type.clone());
        put("seed", self.seed.map(|v| v.to_string()));
        if quiet {
            argv.push("--quiet".into());
        }
        Ok(SimulateCommand::try_parse_from(&argv).map_err(|err| anyhow::anyhow!("dataset.simulate: {}", err.to_string().trim()))?.args)
    }
}

/// The screen, and its truth file when there is one (beside it, `<stem>.truth.json`).
fn screen(e: &Experiment, out: &Path, quiet: bool) -> anyhow::Result<(PathBuf, Option<PathBuf>)> {
    use scgpt_prep::simulate_perturbation as sim;
    let path = match (&e.dataset.file, &e.dataset.simulate) {
        (Some(f), None) => fetch(f, "file")?,
        (None, Some(s)) => {
            let path = out.join("data").join("screen.h5ad");
            eprintln!("experiment: simulating a perturbation screen into {}", path.display());
            sim::run(&s.args(&path, quiet)?)?;
            path
        }
        _ => bail!("recipe = \"perturbation\": give either dataset.file (a GEARS-format screen h5ad) or dataset.simulate (the simulator's settings)"),
    };
    let truth = sim::default_truth_path(&path);
    Ok((path.clone(), truth.is_file().then_some(truth)))
}

/// One row of a per-condition CSV: header → field.
type Row = HashMap<String, String>;

/// One fine-tuned variant and its `eval perturbation` report: `metrics.json`, and the rows of
/// `per_condition.csv` (ours) and `per_condition_baselines.csv`.
struct Variant {
    name: String,
    metrics: Value,
    ours: Vec<Row>,
    baselines: Vec<Row>,
}

impl Variant {
    fn read(name: &str, report: &Path) -> anyhow::Result<Self> {
        let path = report.join("metrics.json");
        let metrics = serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("{}: missing", path.display()))?)
            .with_context(|| format!("{}: not JSON", path.display()))?;
        Ok(Variant {
            name: name.to_string(),
            metrics,
            ours: read_csv(&report.join("per_condition.csv"))?,
            baselines: read_csv(&report.join("per_condition_baselines.csv"))?,
        })
    }
}

pub fn run(e: &Experiment, file: &Path, out: &Path, train_sets: &[String], quiet: bool) -> anyhow::Result<()> {
    let d = &e.dataset;
    ensure!(
        e.knn.is_none() && e.zero_shot.is_none(),
        "{}: [knn] and [zero_shot] have no meaning for recipe = \"perturbation\"; remove them",
        file.display()
    );
    ensure!(!e.finetune.is_empty(), "{}: recipe = \"perturbation\" needs at least one [[finetune]] variant", file.display());
    let (src, truth) = screen(e, out, quiet)?;
    let gene = (!d.gene_col.is_empty()).then(|| d.gene_col.clone());
    let mut extra = Vec::new();
    for (key, v) in [("condition_col", &d.condition_col), ("control", &d.control), ("separator", &d.separator)] {
        if !v.is_empty() {
            extra.push(format!("data.{key}={}", toml_str(v)));
        }
    }
    if let Some(n) = d.normalize {
        extra.push(format!("data.normalize={n}"));
    }
    let mut variants = Vec::new();
    for f in &e.finetune {
        let run_dir = out.join("runs").join(&f.name);
        let init = pretrain(e, f, out, &src, gene.as_deref(), train_sets, quiet)?;
        let sets = finetune_sets(e, f, &run_dir, &src, &extra, gene.as_deref(), init.as_deref(), train_sets);
        let kind = scgpt_engine::config::resolve(Some(&f.config), &sets)?.task.kind;
        ensure!(kind == TaskKind::Perturbation, "finetune {:?}: {} (with its set) has task.kind = \"{kind}\"; recipe = \"perturbation\" needs a task.kind = \"perturbation\" config such as configs/finetune_perturbation.toml", f.name, f.config.display());
        eprintln!("experiment: {}: perturbation fine-tuning", f.name);
        train(&f.config, sets, quiet)?;
        let report = out.join("reports").join(&f.name);
        eprintln!("experiment: {}: eval perturbation", f.name);
        eval_perturbation::run(&eval_args(e, &run_dir, &src, &report)?)?;
        variants.push(Variant::read(&f.name, &report)?);
    }
    let md = report(e, file, &src, truth.as_deref(), &variants)?;
    write_report_md(out, &md)
}

const BASELINES: [(&str, &str); 4] = [
    ("no_change", "no change (control mean)"),
    ("train_mean", "training mean"),
    ("additive", "additive (sum of single deltas)"),
    ("linear", "linear (ridge on the model's gene embeddings)"),
];
const SUBGROUPS: [&str; 4] = ["unseen_single", "combo_seen0", "combo_seen1", "combo_seen2"];

fn ours(v: &Variant) -> String {
    format!("scGPT fine-tuned ({})", v.name)
}

fn fmt(x: Option<f64>) -> String {
    x.map_or("—".to_string(), |x| format!("{x:.3}"))
}

/// Rows of a table: ours per variant, then each baseline, once when every variant's eval gave
/// it the same numbers (same split; `linear` also needs the same gene embeddings), else once
/// per variant. `pick` takes the metrics object a row shows out of a report's `metrics.json`.
fn rows<'a>(variants: &'a [Variant], with_baselines: bool, pick: impl Fn(&'a Value) -> &'a Value) -> Vec<(String, &'a Value)> {
    let mut rows: Vec<(String, &Value)> = variants.iter().map(|v| (ours(v), pick(&v.metrics))).collect();
    if with_baselines {
        for (key, label) in BASELINES {
            let each: Vec<&Value> = variants.iter().map(|v| pick(&v.metrics["baselines"][key])).collect();
            if each.windows(2).all(|w| w[0] == w[1]) {
                rows.push((format!("baseline: {label}"), each[0]));
            } else {
                rows.extend(variants.iter().zip(each).map(|(v, m)| (format!("baseline: {label} [{}]", v.name), m)));
            }
        }
    }
    rows
}

fn table(md: &mut String, rows: &[(String, &Value)]) {
    md.push_str("| method | conditions |");
    for m in METRICS {
        md.push_str(&format!(" {m} |"));
    }
    md.push_str("\n|---|---:|");
    md.push_str(&"---:|".repeat(METRICS.len()));
    md.push('\n');
    for (name, m) in rows {
        md.push_str(&format!("| {name} | {} |", m["n_conditions"].as_u64().map_or("—".into(), |n| n.to_string())));
        for k in METRICS {
            let undefined = m["n_undefined"][k].as_u64().unwrap_or(0);
            let n = m["n_conditions"].as_u64().unwrap_or(0);
            match m[k].as_f64() {
                Some(x) if undefined > 0 => md.push_str(&format!(" {x:.3} (n = {}) |", n.saturating_sub(undefined))),
                x => md.push_str(&format!(" {} |", fmt(x))),
            }
        }
        md.push('\n');
    }
}

fn value(r: &Row, metric: &str) -> Option<f64> {
    r.get(metric).and_then(|v| v.parse().ok())
}

/// The rows of one baseline in `per_condition_baselines.csv`.
fn baseline_rows<'a>(v: &'a Variant, baseline: &'a str) -> impl Iterator<Item = &'a Row> + 'a {
    v.baselines.iter().filter(move |r| r.get("baseline").is_some_and(|b| b == baseline))
}

/// The means of `metric` for ours and for `baseline` over the conditions that `keep` accepts
/// and where both are defined, and how many those are.
fn paired(v: &Variant, baseline: &str, metric: &str, keep: impl Fn(&str) -> bool) -> Option<(f64, f64, usize)> {
    let theirs: HashMap<&str, f64> =
        baseline_rows(v, baseline).filter_map(|r| Some((r.get("condition")?.as_str(), value(r, metric)?))).collect();
    let (mut so, mut sb, mut n) = (0.0, 0.0, 0usize);
    for r in &v.ours {
        let Some(c) = r.get("condition").filter(|c| keep(c)) else { continue };
        if let (Some(o), Some(&b)) = (value(r, metric), theirs.get(c.as_str())) {
            so += o;
            sb += b;
            n += 1;
        }
    }
    (n > 0).then(|| (so / n as f64, sb / n as f64, n))
}

/// "…: the additive baseline beats it on pearson_delta (0.712 vs 0.640 on the 5 conditions it
/// predicts), …": every baseline whose mean is higher than the variant's on a metric, both
/// taken over the test conditions where both are defined.
fn who_beats_ours(v: &Variant) -> String {
    let mut parts = Vec::new();
    for (key, label) in BASELINES {
        let wins: Vec<String> = METRICS
            .iter()
            .filter_map(|m| {
                let (o, b, n) = paired(v, key, m, |_| true)?;
                let ours_n = v.ours.iter().filter(|r| value(r, m).is_some()).count();
                let on = if n < ours_n { format!(" on the {} where it is defined", plural(n, "condition")) } else { String::new() };
                (b > o).then(|| format!("{m} ({b:.3} vs {o:.3}{on})"))
            })
            .collect();
        if !wins.is_empty() {
            parts.push(format!("the {label} baseline beats it on {}", wins.join(", ")));
        }
    }
    if parts.is_empty() {
        format!("No baseline beats {} on any of the six metrics over the test conditions.", ours(v))
    } else {
        format!("Over the test conditions, {}: {}.", ours(v), parts.join("; "))
    }
}

/// The rows of a per-condition CSV (`per_condition.csv`: `condition,subgroup,<metrics>`;
/// `per_condition_baselines.csv`: `baseline,` first).
fn read_csv(path: &Path) -> anyhow::Result<Vec<Row>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: missing", path.display()))?;
    let mut lines = text.lines();
    let header = split_csv_line(lines.next().with_context(|| format!("{}: empty", path.display()))?);
    Ok(lines.filter(|l| !l.is_empty()).map(|l| header.iter().cloned().zip(split_csv_line(l)).collect()).collect())
}

fn split_csv_line(line: &str) -> Vec<String> {
    let (mut fields, mut cur, mut quoted, mut chars) = (Vec::new(), String::new(), false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

/// A condition's genes in a fixed order, so `B+A` and `A+B` meet.
fn condition_key(c: &str, sep: &str) -> String {
    let mut g: Vec<&str> = c.split(sep).collect();
    g.sort_unstable();
    g.join(sep)
}

/// The mean Pearson-delta of the rows whose condition `keep` accepts, over those where it is
/// defined, and how many rows it is defined on.
fn mean_delta<'a>(rows: impl Iterator<Item = &'a Row>, keep: impl Fn(&str) -> bool) -> (Option<f64>, usize) {
    let values: Vec<f64> = rows.filter(|r| r.get("condition").is_some_and(|c| keep(c))).filter_map(|r| value(r, "pearson_delta")).collect();
    ((!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64), values.len())
}

/// Whether a condition is a double of `kind` (by the truth's `kinds`, condition key → kind).
fn of_kind<'a>(kinds: &'a HashMap<String, String>, kind: String, sep: &'a str) -> impl Fn(&str) -> bool + 'a {
    move |c: &str| kinds.get(&condition_key(c, sep)).is_some_and(|k| *k == kind)
}

fn plural(n: usize, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

/// Per planted kind of double: the mean Pearson-delta of each variant and of the additive
/// baseline on the test doubles of that kind, then ours against the additive baseline on the
/// doubles it predicts (both singles seen in training).
fn doubles_by_kind(md: &mut String, truth: &Path, variants: &[Variant], sep: &str) -> anyhow::Result<()> {
    let t: Value = serde_json::from_str(&std::fs::read_to_string(truth).with_context(|| format!("{}: cannot read", truth.display()))?)
        .with_context(|| format!("{}: not JSON", truth.display()))?;
    let doubles = t["doubles"]
        .as_array()
        .with_context(|| format!("{}: no `doubles` list; not a simulate-perturbation truth file", truth.display()))?;
    let mut kinds: HashMap<String, String> = HashMap::new();
    for d in doubles {
        if let (Some(c), Some(k)) = (d["condition"].as_str(), d["kind"].as_str()) {
            kinds.insert(condition_key(c, sep), k.to_string());
        }
    }
    let mut names: Vec<String> = kinds.values().cloned().collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    // "additive" before "synergy", then any other kind.
    names.sort_by_key(|k| (k != "additive", k != "synergy", k.clone()));
    let is = |kind: &str| of_kind(&kinds, kind.to_string(), sep);
    // Columns: ours per variant, the additive baseline once if every variant's is the same;
    // in each, (mean, conditions defined) per kind.
    type Means = Vec<(Option<f64>, usize)>;
    let mut cols: Vec<(String, Means)> =
        variants.iter().map(|v| (ours(v), names.iter().map(|k| mean_delta(v.ours.iter(), is(k))).collect())).collect();
    let additive: Vec<Means> =
        variants.iter().map(|v| names.iter().map(|k| mean_delta(baseline_rows(v, "additive"), is(k))).collect()).collect();
    if additive.windows(2).all(|w| w[0] == w[1]) {
        cols.push(("baseline: additive".into(), additive[0].clone()));
    } else {
        cols.extend(variants.iter().zip(additive).map(|(v, a)| (format!("baseline: additive [{}]", v.name), a)));
    }
    // With --modules a synergy double carries its module pair's shared program (learnable from
    // the training doubles across the same pair); without, effects of its own.
    let synergy = if t.get("programs").is_some_and(|p| p.is_array()) {
        "`synergy` doubles (genes in two different modules) add the planted program of their module pair, shared by every double across that pair, to the sum of their singles"
    } else {
        "`synergy` doubles add effects of their own that no single explains"
    };
    md.push_str(&format!(
        "\n## Test doubles by planted kind (truth: `{}`)\n\nMean pearson_delta over the test doubles of each kind (`n =` where a method predicts fewer): `additive` doubles are the sum of their singles' effects, {synergy}. The additive baseline predicts only doubles whose two singles were both in training.\n\n| kind | test doubles |",
        truth.display()
    ));
    for (name, _) in &cols {
        md.push_str(&format!(" {name} |"));
    }
    md.push_str("\n|---|---:|");
    md.push_str(&"---:|".repeat(cols.len()));
    md.push('\n');
    for (i, k) in names.iter().enumerate() {
        let keep = is(k);
        let n = variants[0].ours.iter().filter(|r| r.get("condition").is_some_and(|c| keep(c))).count();
        md.push_str(&format!("| {k} | {n} |"));
        for (_, c) in &cols {
            let (x, m) = c[i];
            md.push_str(&format!(" {}{} |", fmt(x), if m == n || x.is_none() { String::new() } else { format!(" (n = {m})") }));
        }
        md.push('\n');
    }
    md.push('\n');
    for v in variants {
        for k in &names {
            match paired(v, "additive", "pearson_delta", is(k)) {
                Some((o, b, n)) => {
                    let verdict = if o > b { "above" } else if o < b { "below" } else { "equal to" };
                    md.push_str(&format!("On the {} the additive baseline predicts, {} is {verdict} it in pearson_delta ({o:.3} vs {b:.3}).\n", plural(n, &format!("{k} test double")), ours(v)));
                }
                None => md.push_str(&format!("The additive baseline predicts none of the {k} test doubles of the split of {} (it needs both singles among the training conditions).\n", ours(v))),
            }
        }
    }
    Ok(())
}

fn report(e: &Experiment, file: &Path, src: &Path, truth: Option<&Path>, variants: &[Variant]) -> anyhow::Result<String> {
    let first = &variants[0].metrics;
    let mut md = format!(
        "# {}\n\n{}\n\nExperiment file: `{}`; seed {}; screen `{}`",
        e.name,
        e.description.trim(),
        file.display(),
        e.seed,
        src.display()
    );
    if let Some(n) = first["n_test_conditions"].as_u64() {
        md.push_str(&format!("; {n} test conditions"));
    }
    if let Some(n) = first["pool_size"].as_u64() {
        md.push_str(&format!("; each prediction the mean over {n} control cells"));
    }
    if let Some(s) = first["de_genes"].as_str() {
        md.push_str(&format!("; DE genes: {s}"));
    }
    md.push_str(".\n\n## All test conditions\n\n");
    table(&mut md, &rows(variants, e.baseline, |m| m));
    if e.baseline {
        md.push('\n');
        for v in variants {
            md.push_str(&who_beats_ours(v));
            md.push('\n');
        }
    }
    // Subgroups: GEARS's four in their order, then any other the split names.
    let mut groups: Vec<String> = SUBGROUPS.iter().map(|s| s.to_string()).collect();
    for v in variants {
        if let Some(s) = v.metrics["subgroups"].as_object() {
            groups.extend(s.keys().filter(|k| !groups.contains(k)).cloned().collect::<Vec<_>>());
        }
    }
    md.push_str("\n## Per subgroup\n");
    for g in &groups {
        if !variants.iter().any(|v| v.metrics["subgroups"][g].is_object()) {
            continue;
        }
        md.push_str(&format!("\n### {g}\n\n"));
        table(&mut md, &rows(variants, e.baseline, |m| &m["subgroups"][g]));
    }
    if let Some(t) = truth {
        let sep = if e.dataset.separator.is_empty() { "+" } else { e.dataset.separator.as_str() };
        doubles_by_kind(&mut md, t, variants, sep)?;
    }
    let skipped: Vec<String> = variants
        .iter()
        .flat_map(|v| {
            v.metrics["skipped"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |s| format!("- {}: {} skipped: {}", v.name, s["condition"], s["why"]))
        })
        .collect();
    if !skipped.is_empty() {
        md.push_str("\nSkipped test conditions:\n");
        md.push_str(&skipped.join("\n"));
        md.push('\n');
    }
    md.push_str("\nPer-condition values: `reports/<variant>/per_condition.csv` (ours) and `per_condition_baselines.csv`; DE-gene plots in `reports/<variant>/plots/`.\n");
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(fields: &[(&str, &str)]) -> Row {
        fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn csv_fields_and_condition_keys() {
        assert_eq!(split_csv_line("a,\"b,c\",,\"d\"\"e\""), ["a", "b,c", "", "d\"e"]);
        assert_eq!(condition_key("B+A", "+"), condition_key("A+B", "+"));
        let rows = [
            row(&[("condition", "B+A"), ("pearson_delta", "0.5")]),
            row(&[("condition", "C+D"), ("pearson_delta", "0.1")]),
            row(&[("condition", "D+C"), ("pearson_delta", "")]),
        ];
        // An undefined value is left out of the mean and the count.
        assert_eq!(mean_delta(rows.iter(), |c| c.contains('C')), (Some(0.1), 1));
        assert_eq!(mean_delta(rows.iter(), |c| c == "X"), (None, 0));
    }

    /// Ours 0.5/0.3 on A/B; the additive baseline predicts only A (0.7), the linear one both
    /// (0.2, 0.2), the training mean both (0.6, 0.4) for pearson_delta only.
    fn variant() -> Variant {
        let ours = vec![
            row(&[("condition", "A"), ("pearson_delta", "0.5"), ("pearson", "0.9")]),
            row(&[("condition", "B"), ("pearson_delta", "0.3"), ("pearson", "0.9")]),
        ];
        let b = |name: &str, c: &str, d: &str| row(&[("baseline", name), ("condition", c), ("pearson_delta", d), ("pearson", "0.8")]);
        let baselines = vec![
            b("additive", "A", "0.7"),
            b("additive", "B", ""),
            b("linear", "A", "0.2"),
            b("linear", "B", "0.2"),
            b("train_mean", "A", "0.6"),
            b("train_mean", "B", "0.4"),
        ];
        Variant { name: "x".into(), metrics: Value::Null, ours, baselines }
    }

    #[test]
    fn baselines_are_compared_with_ours_on_the_conditions_both_predict() {
        let v = variant();
        assert_eq!(paired(&v, "additive", "pearson_delta", |_| true), Some((0.5, 0.7, 1)));
        let (o, b, n) = paired(&v, "train_mean", "pearson_delta", |_| true).unwrap();
        assert!((o - 0.4).abs() < 1e-12 && (b - 0.5).abs() < 1e-12 && n == 2);
        assert_eq!(paired(&v, "linear", "pearson_delta", |c| c == "B"), Some((0.3, 0.2, 1)));
        assert_eq!(paired(&v, "no_change", "pearson_delta", |_| true), None);
        let s = who_beats_ours(&v);
        assert!(s.contains("the additive (sum of single deltas) baseline beats it on pearson_delta (0.700 vs 0.500 on the 1 condition where it is defined)"), "{s}");
        assert!(s.contains("the training mean baseline beats it on pearson_delta (0.500 vs 0.400)"), "{s}");
        assert!(!s.contains("linear") && !s.contains("no change") && !s.contains("on pearson ("), "{s}");
        let mut v = v;
        v.baselines.clear();
        assert!(who_beats_ours(&v).starts_with("No baseline beats"));
    }
}
