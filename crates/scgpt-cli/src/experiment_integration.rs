//! The integration recipe of `scgpt experiment run` (`recipe = "integration"`): on one file
//! with a batch and a label column, every fine-tuning variant (integration task, optionally
//! after a pretraining run on the same cells) is embedded with its `best_model/` and scored
//! with `scgpt eval integration`; a zero-shot embedding of a pretrained model is scored the
//! same way; `scgpt baseline integration` adds the unintegrated PCA and Harmony. `report.md`
//! puts the scIB metrics side by side. Metrics are computed on all cells, as the tutorial does.

use std::path::{Path, PathBuf};

use scgpt_engine::data::toml_str;

use crate::embed::{EmbedArgs, Format};
use crate::eval_integration::{EvalArgs, EvalTask, IntegrationArgs};
use crate::experiment::{fetch, pretrain, Experiment};
use crate::inference::{BatchArgs, UnseenBatch};
use crate::{baseline, baseline_integration, embed, eval_integration};

const KEYS: [(&str, &str); 10] = [
    ("NMI_cluster/label", "NMI"),
    ("ARI_cluster/label", "ARI"),
    ("ASW_label", "ASW label"),
    ("ASW_label/batch", "ASW label/batch"),
    ("graph_conn", "graph conn."),
    ("PCR_batch", "PCR batch"),
    ("iLISI", "iLISI"),
    ("cLISI", "cLISI"),
    ("avg_bio", "avg bio"),
    ("avg_batch", "avg batch"),
];

fn embed_args(model: PathBuf, input: &Path, output: PathBuf, seed: u64, quiet: bool) -> EmbedArgs {
    EmbedArgs {
        model,
        input: input.to_path_buf(),
        output,
        format: Some(Format::H5ad),
        batch_size: 64,
        max_seq_len: 1200,
        gene_col: None,
        use_raw: true,
        deterministic: true,
        seed,
        device: "cpu".into(),
        threads: None,
        min_gene_match: 0.25,
        batch: BatchArgs { batch_col: None, unseen_batch: UnseenBatch::Error },
        quiet,
    }
}

fn score(emb: &Path, e: &Experiment, batch_col: &str, report: &Path) -> anyhow::Result<()> {
    eval_integration::run(&EvalArgs {
        task: EvalTask::Integration(IntegrationArgs {
            input: emb.to_path_buf(),
            embedding: "X_scGPT".into(),
            label_col: e.dataset.label_col.clone(),
            batch_col: batch_col.to_string(),
            report: report.to_path_buf(),
            pre_embedding: None,
            seed: e.seed,
            no_lisi: false,
            no_umap: false,
        }),
    })
}

pub fn run(e: &Experiment, file: &Path, out: &Path, train_sets: &[String], quiet: bool) -> anyhow::Result<()> {
    let d = &e.dataset;
    let mut src = match &d.file {
        Some(f) => fetch(f, "file")?,
        None => anyhow::bail!("recipe = \"integration\": give dataset.file (one h5ad with the batch and label columns)"),
    };
    let mut gene = (!d.gene_col.is_empty()).then(|| d.gene_col.clone());
    let batch_col = match &d.plant {
        Some(p) => {
            let planted = out.join("data").join("planted.h5ad");
            std::fs::create_dir_all(out.join("data"))?;
            let mut keep = vec![d.label_col.clone()];
            if !d.batch_col.is_empty() {
                keep.push(d.batch_col.clone());
            }
            scgpt_prep::plant_batch::run(&scgpt_prep::plant_batch::PlantBatchArgs {
                input: src.clone(),
                out: planted.clone(),
                keep_cols: keep,
                gene_col: gene.clone(),
                fraction: p.fraction,
                gene_scale_sd: p.gene_scale_sd,
                library_shift: p.library_shift,
                seed: p.seed,
            })?;
            src = planted;
            // The planted file has the gene names in its var index.
            gene = None;
            "planted_batch".to_string()
        }
        None => d.batch_col.clone(),
    };
    anyhow::ensure!(
        !batch_col.is_empty(),
        "recipe = \"integration\": set dataset.batch_col (the obs column with the batches) or dataset.plant"
    );
    let mut rows: Vec<(String, PathBuf, Option<&str>)> = Vec::new();
    for f in &e.finetune {
        let run_dir = out.join("runs").join(&f.name);
        let init = pretrain(e, f, out, &src, gene.as_deref(), train_sets, quiet)?;
        let batch_key = [format!("data.batch_col={}", toml_str(&batch_col))];
        let sets = crate::experiment::finetune_sets(e, f, &run_dir, &src, &batch_key, gene.as_deref(), init.as_deref(), train_sets);
        eprintln!("experiment: {}: integration fine-tuning", f.name);
        crate::experiment::train(&f.config, sets, quiet)?;
        let emb = run_dir.join("embedding.h5ad");
        let mut a = embed_args(run_dir.join("best_model"), &src, emb.clone(), e.seed, quiet);
        a.gene_col = gene.clone();
        embed::run(&a)?;
        let report = out.join("reports").join(&f.name);
        score(&emb, e, &batch_col, &report)?;
        rows.push((format!("scGPT fine-tuned ({})", f.name), report.join("metrics.json"), None));
    }
    if let Some(z) = &e.zero_shot {
        let model = if Path::new(&z.model).is_dir() {
            PathBuf::from(&z.model)
        } else {
            out.join("runs").join(format!("{}-pretrain", z.model)).join("best_model")
        };
        eprintln!("experiment: zero-shot embedding with {}", model.display());
        let emb = out.join("zero_shot.h5ad");
        let mut a = embed_args(model, &src, emb.clone(), e.seed, quiet);
        a.gene_col = gene.clone();
        embed::run(&a)?;
        let report = out.join("reports").join("zero_shot");
        score(&emb, e, &batch_col, &report)?;
        rows.push(("scGPT zero-shot".into(), report.join("metrics.json"), None));
    }
    if e.baseline {
        let report = out.join("reports").join("baseline");
        eprintln!("experiment: baselines (HVG + PCA, Harmony)");
        baseline::run(&baseline::BaselineArgs {
            task: baseline::BaselineTask::Integration(baseline_integration::IntegrationArgs {
                input: src.clone(),
                batch_col: batch_col.clone(),
                label_col: d.label_col.clone(),
                report: report.clone(),
                use_raw: d.matrix != "x",
                n_hvg: 2000,
                n_pcs: 50,
                seed: e.seed,
                no_umap: false,
                no_lisi: false,
            }),
        })?;
        rows.push(("baseline: HVG + PCA (unintegrated)".into(), report.join("metrics.json"), Some("pca")));
        rows.push(("baseline: Harmony on the PCA".into(), report.join("metrics.json"), Some("harmony")));
    }
    write_report(e, &batch_col, file, out, &rows)
}

fn write_report(e: &Experiment, batch_col: &str, file: &Path, out: &Path, rows: &[(String, PathBuf, Option<&str>)]) -> anyhow::Result<()> {
    let mut md = format!(
        "# {}\n\n{}\n\nExperiment file: `{}`; seed {}; batch `{batch_col}`, labels `{}`.\n\n",
        e.name,
        e.description.trim(),
        file.display(),
        e.seed,
        e.dataset.label_col
    );
    md.push_str("| method |");
    for (_, h) in KEYS {
        md.push_str(&format!(" {h} |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---:|".repeat(KEYS.len()));
    md.push('\n');
    let mut notes = Vec::new();
    for (name, path, key) in rows {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?)?;
        let m = match key {
            Some(k) => v[*k].clone(),
            None => v,
        };
        md.push_str(&format!("| {name} |"));
        for (k, _) in KEYS {
            md.push_str(&m[k].as_f64().map_or(" — |".to_string(), |x| format!(" {x:.3} |")));
        }
        md.push('\n');
        if let Some(n) = m["notes"].as_array() {
            notes.extend(n.iter().filter_map(|x| x.as_str()).map(|x| format!("- {name}: {x}")));
        }
    }
    if !notes.is_empty() {
        md.push_str("\nNotes:\n");
        md.push_str(&notes.join("\n"));
        md.push('\n');
    }
    crate::experiment::write_report_md(out, &md)
}
