//! `[preprocess]`: the gene selection a fine-tuning run makes on its h5ad input equals scanpy's
//! on the same file (`tests/data/eval/hvg_reference.json`, from scanpy 1.11.5), the flavour
//! rule picks seurat_v3 for counts and cell_ranger otherwise, and the run prepares, trains on
//! and records exactly those genes.

use std::collections::BTreeSet;
use std::path::Path;

use scgpt_engine::config::{resolve, TrainConfig};
use scgpt_engine::preprocess::select_genes;
use scgpt_engine::Trainer;

mod common;
use common::root;

fn reference(case: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(root().join("tests/data/eval/hvg_reference.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["cases"][case]["selected"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_string()).collect()
}

fn config(run: &Path, file: &str, extra: &[&str]) -> TrainConfig {
    let mut sets: Vec<String> = vec![
        format!("run.dir=\"{}\"", run.display()),
        format!("data.input=\"{}\"", root().join("tests/data").join(file).display()),
        "data.allow_non_integer=true".into(),
        "task.kind=\"annotation\"".into(),
        "model.MVC=false".into(),
        "model.embsize=32".into(),
        "model.nheads=2".into(),
        "model.d_hid=32".into(),
        "model.nlayers=2".into(),
        "model.max_seq_len=64".into(),
        "train.batch_size=32".into(),
        "train.epochs=1".into(),
        "train.max_steps=0".into(),
        "train.eval_each_epoch=true".into(),
        "valid.label_set=\"\"".into(),
        "run.threads=2".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    resolve(None, &sets).unwrap()
}

#[test]
fn counts_get_seurat_v3_after_the_count_filter_as_scanpy() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(
        &tmp.path().join("r"),
        "wu2020_200.h5ad",
        &["task.label_col=\"cluster_orig\"", "preprocess.filter_gene_by_counts=3", "preprocess.hvg=500"],
    );
    let s = select_genes(&cfg, None).unwrap();
    assert_eq!(s.hvg_flavor.as_deref(), Some("seurat_v3"), "integer counts take seurat_v3");
    let got: BTreeSet<String> = s.genes.iter().cloned().collect();
    assert_eq!(got.len(), 500);
    assert_eq!(got, reference("seurat_v3_500"), "scanpy's genes (ties at the cut in gene order)");
}

#[test]
fn normalised_data_get_cell_ranger_per_batch_and_the_run_keeps_those_genes() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("r");
    // pbmc68k_reduced's raw/X is log-normalised: cell_ranger, per cell-cycle phase.
    let cfg = config(&run, "pbmc68k_reduced.h5ad", &["task.label_col=\"bulk_labels\"", "data.batch_col=\"phase\"", "preprocess.hvg=200"]);
    let s = select_genes(&cfg, None).unwrap();
    assert_eq!((s.hvg_flavor.as_deref(), s.hvg_batch_col.as_deref()), (Some("cell_ranger"), Some("phase")));
    let want = reference("cell_ranger_200_pbmc_phase");
    assert_eq!(s.genes.iter().cloned().collect::<BTreeSet<_>>(), want);

    let mut t = Trainer::new(cfg, Box::new(scgpt_dist::Single::new())).unwrap().quiet();
    t.run().unwrap();
    // The prepared data hold the selected genes only (a from-scratch vocabulary of the data).
    let vocab = scgpt_data::vocab::GeneVocab::from_file(&run.join("data/train/vocab.json")).unwrap();
    let genes: BTreeSet<String> = vocab.tokens().iter().filter(|t| vocab.is_gene(t)).cloned().collect();
    assert_eq!(genes, want);
    let spec: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("best_model/scgpt.json")).unwrap()).unwrap();
    assert_eq!(spec["preprocess"]["hvg"], 200);
    assert_eq!(spec["preprocess"]["hvg_flavor"], "cell_ranger");
    let recorded: BTreeSet<String> = spec["genes"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_string()).collect();
    assert_eq!(recorded, want, "inference restricts new data to the same genes");
}

#[test]
fn preprocess_settings_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = format!("run.dir=\"{}\"", tmp.path().display());
    let e = format!("{:#}", resolve(None, &[dir.clone(), "preprocess.hvg=100".into()]).unwrap_err());
    assert!(e.contains("data.input"), "{e}");
    let e = format!("{:#}", resolve(None, &[dir, "preprocess.hvg_flavor=\"seurat3\"".into()]).unwrap_err());
    assert!(e.contains("hvg_flavor") && e.contains("seurat_v3"), "{e}");
}
