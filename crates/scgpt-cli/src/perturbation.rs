//! What `predict-perturbation` and `eval perturbation` share: a perturbation run's
//! `best_model/` (the generator, its vocabulary and `screen.json`), a screen read with the
//! model's options unless flags override them, and the prediction for a condition: the mean
//! over a pool of control cells of the model's output with the condition's genes flagged,
//! every screen gene a token (the original's `pred_perturb`, `include_zero_gene = "all"`).
//!
//! The pool is `--pool-size` control cells drawn uniformly with replacement, as GEARS's
//! `create_cell_graph_dataset_for_prediction` draws them, from a stream seeded by `--seed` and
//! the condition, so one condition's prediction does not depend on which others are asked
//! for, and `eval perturbation` scores exactly what `predict-perturbation` writes.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rand::Rng;
use scgpt_data::seed::{hash_str, rng_for};
use scgpt_data::vocab::GeneVocab;
use scgpt_engine::perturbation_data::{ScreenSpec, SCREEN_FILE};
use scgpt_engine::screen::{Screen, ScreenOptions};
use scgpt_model::burn::tensor::{Device, Int, Tensor, TensorData};
use scgpt_model::perturbation::IncludeZeroGene;
use scgpt_model::TransformerGenerator;

/// Flags that override how the screen is read (default: as the model's training run read its
/// screen).
#[derive(Debug, Clone, clap::Args)]
pub struct ScreenArgs {
    /// obs column with the conditions.
    #[arg(long, value_name = "COL")]
    pub condition_col: Option<String>,
    /// The control condition's label.
    #[arg(long, value_name = "LABEL")]
    pub control: Option<String>,
    /// What joins the genes of a condition.
    #[arg(long, value_name = "SEP")]
    pub separator: Option<String>,
    /// var column with gene symbols ("" = the var index).
    #[arg(long, value_name = "COL")]
    pub gene_col: Option<String>,
    /// The screen holds counts: normalise to 1e4 per cell and log1p (as GEARS).
    #[arg(long)]
    pub normalize: bool,
}

/// Prediction settings shared by both commands.
#[derive(Debug, Clone, clap::Args)]
pub struct PoolArgs {
    /// Control cells averaged per condition.
    #[arg(long, default_value_t = 300)]
    pub pool_size: usize,
    /// Seed of the control-cell pools.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Cells per forward pass. Every screen gene is a token, so memory grows with
    /// batch × genes² (8 heads × 5,060² scores × 4 bytes ≈ 0.8 GB per cell for Adamson).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Compute device: cpu (burn's Flex backend); cuda, wgpu or vulkan in GPU builds.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub struct PerturbationModel {
    pub model: TransformerGenerator,
    pub vocab: GeneVocab,
    pub spec: Option<ScreenSpec>,
    pub device: Device,
    pub dir: PathBuf,
}

impl PerturbationModel {
    pub fn load(dir: &Path, device: &str) -> anyhow::Result<Self> {
        let device = crate::embed::device(device)?;
        anyhow::ensure!(
            dir.join(scgpt_model::io::perturbation_checkpoint::PERTURBATION_ARGS).is_file(),
            "{}: not a perturbation model (no {}); pass the best_model/ of a task.kind = \"perturbation\" run",
            dir.display(),
            scgpt_model::io::perturbation_checkpoint::PERTURBATION_ARGS
        );
        let (model, vocab_json) = scgpt_model::io::perturbation_checkpoint::load_exported_perturbation(dir, &device)
            .with_context(|| format!("--model {}", dir.display()))?;
        let vocab = GeneVocab::from_json_str(&vocab_json, &dir.join("vocab.json").display().to_string())?;
        let spec_path = dir.join(SCREEN_FILE);
        let spec = if spec_path.is_file() { Some(ScreenSpec::load(&spec_path)?) } else { None };
        Ok(PerturbationModel { model, vocab, spec, device, dir: dir.to_path_buf() })
    }

    /// The reading options: flags, else the training run's, else GEARS's.
    pub fn screen_options(&self, a: &ScreenArgs) -> ScreenOptions {
        let base = self.spec.as_ref().map(|s| s.options.clone()).unwrap_or(ScreenOptions {
            condition_col: "condition".into(),
            control: "ctrl".into(),
            separator: "+".into(),
            gene_col: "gene_name".into(),
            normalize: false,
        });
        ScreenOptions {
            condition_col: a.condition_col.clone().unwrap_or(base.condition_col),
            control: a.control.clone().unwrap_or(base.control),
            separator: a.separator.clone().unwrap_or(base.separator),
            gene_col: a.gene_col.clone().unwrap_or(base.gene_col),
            normalize: a.normalize || base.normalize,
        }
    }

    /// Token ids of the screen's genes (`<pad>` outside the vocabulary, as in training).
    pub fn tokens(&self, screen: &Screen) -> anyhow::Result<Vec<i64>> {
        let pad = self.vocab.pad_id().context("the model vocabulary has no <pad>")? as i64;
        Ok(screen.genes.iter().map(|g| self.vocab.get(g).map_or(pad, |id| id as i64)).collect())
    }

    /// The columns a condition perturbs; a gene missing from the screen or the vocabulary is
    /// an error naming it.
    pub fn perturbed_columns(&self, screen: &Screen, condition: &str) -> anyhow::Result<Vec<usize>> {
        let cond = screen.format().parse(condition)?;
        let index = screen.gene_index();
        let mut cols = Vec::new();
        for g in cond.genes() {
            let Some(&c) = index.get(g) else {
                bail!(
                    "condition {condition}: gene {g} is not among the genes of {} (var {})",
                    screen.path.display(),
                    if screen.opts.gene_col.is_empty() { "index".to_string() } else { format!("[{:?}]", screen.opts.gene_col) }
                );
            };
            if self.vocab.get(g).is_none() {
                bail!(
                    "condition {condition}: gene {g} is not in the model's vocabulary ({}); the model has no embedding to perturb",
                    self.dir.join("vocab.json").display()
                );
            }
            cols.push(c);
        }
        Ok(cols)
    }

    /// The mean prediction of `condition` over its pool of control cells (screen columns).
    pub fn predict(
        &self,
        screen: &Screen,
        control: &[usize],
        tokens: &[i64],
        condition: &str,
        pool: &PoolArgs,
    ) -> anyhow::Result<Vec<f64>> {
        let cols = self.perturbed_columns(screen, condition)?;
        anyhow::ensure!(pool.pool_size > 0 && pool.batch_size > 0, "--pool-size and --batch-size must be at least 1");
        let g = screen.n_genes();
        let mut rng = rng_for(pool.seed, hash_str("perturbation pool"), hash_str(condition));
        let draws: Vec<usize> = (0..pool.pool_size).map(|_| control[rng.random_range(0..control.len())]).collect();
        let mut sum = vec![0f64; g];
        let mut row = vec![0f32; g];
        for chunk in draws.chunks(pool.batch_size) {
            let b = chunk.len();
            let mut values = Vec::with_capacity(b * g);
            for &i in chunk {
                screen.dense_row(i, &mut row);
                values.extend_from_slice(&row);
            }
            let mut flags = vec![0i64; b * g];
            for r in 0..b {
                for &c in &cols {
                    flags[r * g + c] = scgpt_engine::tasks::perturbation::PERTURBED_FLAG;
                }
            }
            let values = Tensor::<2>::from_data(TensorData::new(values, [b, g]), &self.device);
            let flags = Tensor::<2, Int>::from_data(TensorData::new(flags, [b, g]), &self.device);
            let pred = self.model.pred_perturb(values, flags, tokens, IncludeZeroGene::All)?;
            let pred: Vec<f32> = pred.into_data().convert::<f32>().try_to_vec::<f32>().expect("floats");
            for r in 0..b {
                for (s, &p) in sum.iter_mut().zip(&pred[r * g..(r + 1) * g]) {
                    *s += p as f64;
                }
            }
        }
        sum.iter_mut().for_each(|s| *s /= draws.len() as f64);
        Ok(sum)
    }
}

/// A progress bar over `n` items (hidden when stderr is not a terminal).
pub fn progress_bar(n: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(n);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what} [{{elapsed_precise}} < {{eta_precise}}, {{per_sec}}]"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

#[derive(Debug, clap::Args)]
pub struct PredictPerturbationArgs {
    /// best_model/ of a task.kind = "perturbation" run.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The screen whose control cells are perturbed (GEARS-format h5ad).
    #[arg(long, value_name = "FILE")]
    pub input: PathBuf,
    /// Conditions to predict, comma-separated: "FOSB+ctrl,KLF1+SET".
    #[arg(long, value_name = "LIST")]
    pub conditions: String,
    /// Output h5ad: one row per condition (obs["condition"]), the screen's genes as var.
    #[arg(long, value_name = "FILE")]
    pub output: PathBuf,
    #[command(flatten)]
    pub pool: PoolArgs,
    #[command(flatten)]
    pub screen: ScreenArgs,
}

pub fn predict_run(a: &PredictPerturbationArgs) -> anyhow::Result<()> {
    let m = PerturbationModel::load(&a.model, &a.pool.device)?;
    let screen = Screen::read(&a.input, &m.screen_options(&a.screen)).context("--input")?;
    let conditions: Vec<String> = a.conditions.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    anyhow::ensure!(!conditions.is_empty(), "--conditions is empty; give e.g. \"FOSB+ctrl,KLF1+SET\"");
    // Check every condition before the (long) predictions.
    for c in &conditions {
        m.perturbed_columns(&screen, c)?;
    }
    let tokens = m.tokens(&screen)?;
    let control = screen.control_rows();
    let bar = progress_bar(conditions.len() as u64, "conditions");
    let mut rows = Vec::with_capacity(conditions.len());
    for c in &conditions {
        rows.push(m.predict(&screen, &control, &tokens, c, &a.pool)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    write_predictions(&a.output, &screen, &conditions, &rows)?;
    eprintln!(
        "scgpt predict-perturbation: {} conditions × {} genes (pool {} control cells each, seed {}) into {}",
        conditions.len(),
        screen.n_genes(),
        a.pool.pool_size,
        a.pool.seed,
        a.output.display()
    );
    Ok(())
}

/// Rows = conditions, var = the screen's genes (index: the screen's var index; `gene_name`).
pub fn write_predictions(path: &Path, screen: &Screen, conditions: &[String], rows: &[Vec<f64>]) -> anyhow::Result<()> {
    use scgpt_data::h5ad::{Column, Frame, H5adWriter};
    let g = screen.n_genes();
    let mut w = H5adWriter::create(path, g)?;
    for r in rows {
        let indptr = [0, g];
        let idx: Vec<u32> = (0..g as u32).collect();
        let vals: Vec<f32> = r.iter().map(|&v| v as f32).collect();
        w.append_rows(&indptr, &idx, &vals)?;
    }
    let obs = Frame { index: conditions.to_vec(), columns: vec![("condition".to_string(), Column::Strings(conditions.to_vec()))] };
    let var = Frame { index: screen.var_index.clone(), columns: vec![("gene_name".to_string(), Column::Strings(screen.genes.clone()))] };
    w.finish(&obs, &var)?;
    Ok(())
}
