//! `scgpt experiment run FILE`: a paper-style annotation experiment from one TOML — the
//! dataset (source URL and checksum, or bundled files), a reference/query split, the recipes
//! (fine-tuning variants, optionally after a pretraining run; kNN reference mapping on a
//! pretrained model) and the baseline, run on the same split with the same seed, and a
//! `report.md` with every method's metrics side by side and the confusion figures. The other
//! recipes (`recipe = "integration"`, `"perturbation"`) are in `experiment_integration.rs` and
//! `experiment_perturbation.rs`; this file holds what they share (the file's schema, `fetch`,
//! the training helpers, `write_report_md`).
//!
//! Layout of the output directory (`--out`, default `experiments/out/<name>`):
//! `data/{reference,query}.h5ad`, `runs/<variant>/` (scgpt-train run directories),
//! `reports/<method>/{metrics.json,confusion.csv,confusion.png}`, `report.md`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use scgpt_engine::data::toml_str;

use crate::{baseline, predict, split_h5ad};

#[derive(Debug, clap::Args)]
pub struct ExperimentArgs {
    #[command(subcommand)]
    pub command: ExperimentCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ExperimentCommand {
    /// Run an experiment file end to end.
    Run {
        /// Experiment TOML (experiments/).
        file: PathBuf,
        /// Output directory (default: experiments/out/<name>).
        #[arg(long)]
        out: Option<PathBuf>,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
        /// A scgpt-train override applied to every training run after the file's own
        /// (e.g. `--train-set train.max_steps=4` for a smoke test); repeatable.
        #[arg(long = "train-set", value_name = "SECTION.KEY=VALUE")]
        train_sets: Vec<String>,
        /// An override of the experiment file itself (e.g. `--set dataset.simulate.genes=100`,
        /// `--set eval.pool_size=50`); repeatable.
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        sets: Vec<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    /// `annotation` (reference/query, labels predicted), `integration` (one file, batches
    /// integrated, scIB metrics) or `perturbation` (one screen, `eval perturbation` beside its
    /// baselines; `experiment_perturbation.rs`).
    #[serde(default = "annotation")]
    pub recipe: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub seed: u64,
    pub dataset: Dataset,
    #[serde(default)]
    pub finetune: Vec<Finetune>,
    #[serde(default)]
    pub knn: Option<Knn>,
    /// Integration: the zero-shot embedding of a pretrained model, scored as the others.
    #[serde(default)]
    pub zero_shot: Option<ZeroShot>,
    #[serde(default = "yes")]
    pub baseline: bool,
    /// Perturbation: the settings of `eval perturbation`.
    #[serde(default)]
    pub eval: Option<crate::experiment_perturbation::EvalSettings>,
}

fn yes() -> bool {
    true
}

fn annotation() -> String {
    "annotation".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZeroShot {
    /// A pretrained model folder, or the name of a fine-tune variant whose pretraining run to use.
    pub model: String,
}

/// A file of the dataset: where it lives locally, where it comes from, its checksum.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFile {
    pub path: PathBuf,
    #[serde(default)]
    pub url: String,
    /// SHA-256 of the file (hex); empty = not recorded yet (the runner prints what it computed).
    #[serde(default)]
    pub sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    /// The obs column with the cell types (annotation, integration; not perturbation).
    #[serde(default)]
    pub label_col: String,
    #[serde(default)]
    pub gene_col: String,
    /// Two files (the paper's reference and query) ...
    pub reference: Option<DataFile>,
    pub query: Option<DataFile>,
    /// ... or one file split by an obs column: cells whose `split_col` value is in
    /// `query_values` form the query.
    pub file: Option<DataFile>,
    #[serde(default)]
    pub split_col: String,
    #[serde(default)]
    pub query_values: Vec<String>,
    /// The matrix read: `auto` (raw/X when present) or `x`.
    #[serde(default = "auto")]
    pub matrix: String,
    /// Integration: the obs column with the batches.
    #[serde(default)]
    pub batch_col: String,
    /// Integration: plant a batch effect into `file`'s cells (`scgpt-prep plant-batch`) and
    /// integrate that (`batch_col` is then `planted_batch`), so the truth is known.
    #[serde(default)]
    pub plant: Option<Plant>,
    /// Perturbation: simulate the screen (`scgpt-prep simulate-perturbation`, planted truth)
    /// instead of reading `file`.
    #[serde(default)]
    pub simulate: Option<crate::experiment_perturbation::Simulate>,
    /// Perturbation: the screen's `data.condition_col`, `data.control`, `data.separator` and
    /// `data.normalize` for training and evaluation; empty / absent = the config's.
    #[serde(default)]
    pub condition_col: String,
    #[serde(default)]
    pub control: String,
    #[serde(default)]
    pub separator: String,
    #[serde(default)]
    pub normalize: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plant {
    #[serde(default = "half")]
    pub fraction: f64,
    #[serde(default = "half")]
    pub gene_scale_sd: f64,
    #[serde(default = "two")]
    pub library_shift: f64,
    #[serde(default)]
    pub seed: u64,
}

fn half() -> f64 {
    0.5
}

fn two() -> f64 {
    2.0
}

fn auto() -> String {
    "auto".into()
}

/// One fine-tuning variant: a scgpt-train config plus overrides, optionally initialised from a
/// pretraining run on the reference made first (`pretrain_config` + `pretrain_set`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finetune {
    pub name: String,
    pub config: PathBuf,
    #[serde(default)]
    pub set: Vec<String>,
    #[serde(default)]
    pub pretrain_config: Option<PathBuf>,
    #[serde(default)]
    pub pretrain_set: Vec<String>,
    /// Initialise from the pretraining run of another (earlier) variant instead.
    #[serde(default)]
    pub pretrained_from: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Knn {
    /// A pretrained model folder, or the name of a fine-tune variant whose pretraining run
    /// (`runs/<name>-pretrain/best_model`) to use.
    pub model: String,
    #[serde(default = "ten")]
    pub k: usize,
}

fn ten() -> usize {
    10
}

fn sha256_hex(path: &Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The file, downloaded from its URL when missing (curl), and checked against its checksum.
pub(crate) fn fetch(f: &DataFile, what: &str) -> anyhow::Result<PathBuf> {
    if !f.path.is_file() {
        if f.url.is_empty() {
            bail!(
                "dataset.{what}: {} not found and no url to download it from (the experiment file's header says how to get it)",
                f.path.display()
            );
        }
        if let Some(dir) = f.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let part = f.path.with_extension("part");
        eprintln!("experiment: downloading {} -> {}", f.url, f.path.display());
        let status = std::process::Command::new("curl").args(["-fL", "--retry", "3", "-o"]).arg(&part).arg(&f.url).status();
        match status {
            Ok(s) if s.success() => std::fs::rename(&part, &f.path)?,
            Ok(s) => bail!("dataset.{what}: downloading {} failed ({s}); offline? fetch it by hand to {}", f.url, f.path.display()),
            Err(e) => bail!("dataset.{what}: cannot run curl ({e}); download {} to {} by hand", f.url, f.path.display()),
        }
    }
    let got = sha256_hex(&f.path)?;
    if f.sha256.is_empty() {
        eprintln!("experiment: dataset.{what}: sha256 {got} (not recorded in the experiment file)");
    } else if !got.eq_ignore_ascii_case(&f.sha256) {
        bail!(
            "dataset.{what}: {} has sha256 {got}, the experiment records {}; a different file (or a partial download): remove it and rerun",
            f.path.display(),
            f.sha256
        );
    }
    Ok(f.path.clone())
}

/// Reference and query h5ad files for the experiment.
fn prepare_data(e: &Experiment, out: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let d = &e.dataset;
    match (&d.reference, &d.query, &d.file) {
        (Some(r), Some(q), None) => Ok((fetch(r, "reference")?, fetch(q, "query")?)),
        (None, None, Some(f)) => {
            anyhow::ensure!(
                d.split_col == split_h5ad::PARITY || (!d.split_col.is_empty() && !d.query_values.is_empty()),
                "dataset.file needs split_col and query_values (which cells form the query), or split_col = \"@parity\""
            );
            let src = fetch(f, "file")?;
            let dir = out.join("data");
            let (r, q) = (dir.join("reference.h5ad"), dir.join("query.h5ad"));
            let (nr, nq) =
                split_h5ad::split(&src, &d.matrix, &d.split_col, &d.query_values, &[d.label_col.as_str()], d.gene_col.as_str(), &r, &q)?;
            eprintln!("experiment: {} split by {} into {nr} reference and {nq} query cells", src.display(), d.split_col);
            Ok((r, q))
        }
        _ => bail!("dataset: give either `reference` and `query`, or `file` with `split_col` and `query_values`"),
    }
}

/// The gene column of the files the recipes read: the split files carry gene names in the var
/// index; two-file datasets keep theirs.
fn gene_col(e: &Experiment) -> Option<String> {
    (e.dataset.file.is_none() && !e.dataset.gene_col.is_empty()).then(|| e.dataset.gene_col.clone())
}

pub(crate) fn train(config: &Path, sets: Vec<String>, quiet: bool) -> anyhow::Result<()> {
    let cfg = scgpt_engine::config::resolve(Some(config), &sets)?;
    let comm = Box::new(scgpt_dist::Single::new());
    // The perturbation task trains its own model (the original's TransformerGenerator), as in
    // scgpt-train.
    if cfg.task.kind == scgpt_engine::config::TaskKind::Perturbation {
        let t = scgpt_engine::Trainer::perturbation(cfg, comm)?;
        (if quiet { t.quiet() } else { t }).run()?;
        return Ok(());
    }
    let t = scgpt_engine::Trainer::new(cfg, comm)?;
    (if quiet { t.quiet() } else { t }).run()?;
    Ok(())
}

/// `scgpt predict` as the experiment runs it: deterministic, labelled query, a report.
#[allow(clippy::too_many_arguments)]
fn predict_args(
    model: PathBuf,
    query: &Path,
    output: PathBuf,
    mode: predict::Mode,
    reference: Option<&Path>,
    e: &Experiment,
    gene_col: Option<String>,
    matrix: predict::Matrix,
    report: &Path,
    quiet: bool,
) -> predict::PredictArgs {
    predict::PredictArgs {
        model,
        input: query.to_path_buf(),
        output,
        mode,
        gene_col,
        label_col: Some(e.dataset.label_col.clone()),
        report: Some(report.to_path_buf()),
        min_confidence: None,
        reference: reference.map(Path::to_path_buf),
        reference_label_col: reference.map(|_| e.dataset.label_col.clone()),
        k: 10,
        matrix,
        batch_size: 64,
        max_seq_len: None,
        seed: e.seed,
        deterministic: true,
        device: "cpu".into(),
        min_gene_match: 0.25,
        batch: crate::inference::BatchArgs { batch_col: None, unseen_batch: crate::inference::UnseenBatch::Error },
        quiet,
    }
}

struct Method {
    name: String,
    report: PathBuf,
}

/// The variant's starting model: another variant's pretraining run (`pretrained_from`), or a
/// pretraining run of its own on `cells` (`pretrain_config`), made first; `None` = its config's.
pub(crate) fn pretrain(
    e: &Experiment,
    f: &Finetune,
    out: &Path,
    cells: &Path,
    gene: Option<&str>,
    train_sets: &[String],
    quiet: bool,
) -> anyhow::Result<Option<PathBuf>> {
    let mut init = None;
    if let Some(other) = &f.pretrained_from {
        let dir = out.join("runs").join(format!("{other}-pretrain")).join("best_model");
        anyhow::ensure!(dir.is_dir(), "finetune {:?}: pretrained_from = {other:?} has no pretraining run at {} (list that variant, with pretrain_config, before this one)", f.name, dir.display());
        init = Some(dir);
    }
    if let Some(pc) = &f.pretrain_config {
        let pre = out.join("runs").join(format!("{}-pretrain", f.name));
        let mut sets = vec![
            format!("run.dir={}", toml_str(&pre.display().to_string())),
            format!("data.input={}", toml_str(&cells.display().to_string())),
            format!("run.seed={}", e.seed),
        ];
        if let Some(g) = gene {
            sets.push(format!("data.gene_col={}", toml_str(g)));
        }
        sets.extend(f.pretrain_set.iter().cloned());
        sets.extend(train_sets.iter().cloned());
        eprintln!("experiment: {}: pretraining", f.name);
        train(pc, sets, quiet)?;
        init = Some(pre.join("best_model"));
    }
    Ok(init)
}

/// The scgpt-train overrides of a fine-tuning variant: its run directory, data, seed, gene
/// column and starting model, the recipe's own `extra` keys, then the variant's and the
/// command line's overrides (which win).
pub(crate) fn finetune_sets(
    e: &Experiment,
    f: &Finetune,
    run_dir: &Path,
    input: &Path,
    extra: &[String],
    gene: Option<&str>,
    init: Option<&Path>,
    train_sets: &[String],
) -> Vec<String> {
    let mut sets = vec![
        format!("run.dir={}", toml_str(&run_dir.display().to_string())),
        format!("data.input={}", toml_str(&input.display().to_string())),
    ];
    sets.extend(extra.iter().cloned());
    sets.push(format!("run.seed={}", e.seed));
    if let Some(g) = gene {
        sets.push(format!("data.gene_col={}", toml_str(g)));
    }
    if let Some(i) = init {
        sets.push(format!("model.init_from={}", toml_str(&i.display().to_string())));
    }
    sets.extend(f.set.iter().cloned());
    sets.extend(train_sets.iter().cloned());
    sets
}

pub fn run(args: &ExperimentArgs) -> anyhow::Result<()> {
    let ExperimentCommand::Run { file, out, quiet, train_sets, sets } = &args.command;
    let e: Experiment = scgpt_config::Layered::new()
        .with_file(file)?
        .with_sets(sets)?
        .build()
        .with_context(|| format!("{}: not a valid experiment file", file.display()))?;
    let out = out.clone().unwrap_or_else(|| PathBuf::from("experiments/out").join(&e.name));
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    if e.recipe != "perturbation" {
        anyhow::ensure!(
            !e.dataset.label_col.is_empty(),
            "{}: recipe = {:?} needs dataset.label_col, the obs column with the cell types",
            file.display(),
            e.recipe
        );
        let d = &e.dataset;
        anyhow::ensure!(
            e.eval.is_none() && d.simulate.is_none() && d.condition_col.is_empty() && d.control.is_empty() && d.separator.is_empty() && d.normalize.is_none(),
            "{}: [eval], [dataset.simulate] and dataset.condition_col/control/separator/normalize are for recipe = \"perturbation\"; remove them",
            file.display()
        );
    }
    match e.recipe.as_str() {
        "annotation" => {}
        "integration" => return crate::experiment_integration::run(&e, file, &out, train_sets, *quiet),
        "perturbation" => return crate::experiment_perturbation::run(&e, file, &out, train_sets, *quiet),
        other => bail!("{}: recipe = {other:?}: expected \"annotation\", \"integration\" or \"perturbation\"", file.display()),
    }
    let (reference, query) = prepare_data(&e, &out)?;
    let label = e.dataset.label_col.clone();
    let gene = gene_col(&e);
    let matrix = if e.dataset.matrix == "x" { predict::Matrix::X } else { predict::Matrix::Auto };
    let mut methods = Vec::new();

    for f in &e.finetune {
        let run_dir = out.join("runs").join(&f.name);
        let init = pretrain(&e, f, &out, &reference, gene.as_deref(), train_sets, *quiet)?;
        let label_key = [format!("task.label_col={}", toml_str(&label))];
        let sets = finetune_sets(&e, f, &run_dir, &reference, &label_key, gene.as_deref(), init.as_deref(), train_sets);
        eprintln!("experiment: {}: fine-tuning", f.name);
        train(&f.config, sets, *quiet)?;
        let report = out.join("reports").join(&f.name);
        predict::run(&predict_args(
            run_dir.join("best_model"),
            &query,
            run_dir.join("query.pred.h5ad"),
            predict::Mode::Classifier,
            None,
            &e,
            gene.clone(),
            matrix,
            &report,
            *quiet,
        ))?;
        methods.push(Method { name: format!("scGPT fine-tuned ({})", f.name), report });
    }

    if let Some(k) = &e.knn {
        let model = if Path::new(&k.model).is_dir() {
            PathBuf::from(&k.model)
        } else {
            out.join("runs").join(format!("{}-pretrain", k.model)).join("best_model")
        };
        let report = out.join("reports").join("knn");
        eprintln!("experiment: kNN reference mapping with {}", model.display());
        let mut args = predict_args(
            model,
            &query,
            out.join("query.knn.h5ad"),
            predict::Mode::Knn,
            Some(&reference),
            &e,
            gene.clone(),
            matrix,
            &report,
            *quiet,
        );
        args.k = k.k;
        predict::run(&args)?;
        methods.push(Method { name: format!("scGPT zero-shot kNN (k = {})", k.k), report });
    }

    if e.baseline {
        let report = out.join("reports").join("baseline");
        eprintln!("experiment: baseline (PCA + logistic regression)");
        baseline::run(&baseline::BaselineArgs {
            task: baseline::BaselineTask::Annotation(baseline::AnnotationArgs {
                train: reference.clone(),
                test: query.clone(),
                label_col: label.clone(),
                test_label_col: None,
                report: report.clone(),
                gene_col: gene.clone(),
                use_raw: matrix == predict::Matrix::Auto,
                n_hvg: 2000,
                n_pcs: 50,
                seed: e.seed,
            }),
        })?;
        methods.push(Method { name: "baseline: HVG + PCA 50 + logistic regression".into(), report });
    }
    write_report(&e, file, &out, &methods)
}

fn write_report(e: &Experiment, file: &Path, out: &Path, methods: &[Method]) -> anyhow::Result<()> {
    let mut md = format!("# {}\n\n{}\n\nExperiment file: `{}`; seed {}.\n\n", e.name, e.description.trim(), file.display(), e.seed);
    md.push_str("| method | cells | accuracy | macro F1 | weighted F1 | macro precision | macro recall | unseen labels |\n|---|---:|---:|---:|---:|---:|---:|---|\n");
    for m in methods {
        let path = m.report.join("metrics.json");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("{}: missing", path.display()))?)?;
        let f = |k: &str| v[k].as_f64().map_or("—".to_string(), |x| format!("{x:.3}"));
        let unseen =
            v["unseen_labels"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", ")).unwrap_or_default();
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            m.name,
            v["n_cells"],
            f("accuracy"),
            f("macro_f1"),
            f("weighted_f1"),
            f("macro_precision"),
            f("macro_recall"),
            unseen
        ));
    }
    md.push_str("\n## Confusion matrices (row-normalised)\n\n");
    for m in methods {
        let rel = m.report.strip_prefix(out).unwrap_or(&m.report).join("confusion.png");
        md.push_str(&format!("### {}\n\n![{}]({})\n\n", m.name, m.name, rel.display()));
    }
    write_report_md(out, &md)
}

/// `out/report.md`, written atomically, and printed.
pub(crate) fn write_report_md(out: &Path, md: &str) -> anyhow::Result<()> {
    let path = out.join("report.md");
    scgpt_data::atomic::write_bytes(&path, md.as_bytes())?;
    eprintln!("experiment: wrote {}", path.display());
    print!("{md}");
    Ok(())
}
