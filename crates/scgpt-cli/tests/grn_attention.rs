//! `scgpt grn attention` end to end: a tiny simulated GEARS screen (`scgpt-prep
//! simulate-perturbation`), a tiny `TransformerModel` with a plain `bn` exported in the
//! original's format (`export_original`), the built binary, and its outputs read back:
//! targets.tsv (every token gene, sorted, ranks, difference = perturbed − control),
//! top_targets.png (decoded), summary.json; the errors a user meets; a checkpoint carrying
//! `bn.*` with an args.json that does not say so (the original's pre-2023 models).
//! The scores themselves are checked against PyTorch in `crates/scgpt-model/tests/attention_scores.rs`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use scgpt_data::h5ad::{H5adReader, MatrixChoice};
use scgpt_model::burn::module::RunningState;
use scgpt_model::burn::tensor::{Device, Tensor, TensorData};
use scgpt_model::{export_original, BatchNormStyle, ModelConfig};
use serde_json::Value;

mod common;
use common::{prep_bin, scgpt};

struct Setup {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    screen: PathBuf,
    /// Perturbed alone in the screen and in the vocabulary.
    gene: String,
    /// Perturbed alone in the screen, left out of the vocabulary.
    outside_vocab: String,
    /// In the screen and the vocabulary, never perturbed.
    never_perturbed: String,
    genes: Vec<String>,
}

fn setup() -> Setup {
    assert!(prep_bin().is_file(), "{} not built: run `cargo test --workspace` (or `cargo build -p scgpt-prep`)", prep_bin().display());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let screen = dir.join("screen.h5ad");
    let status = Command::new(prep_bin())
        .args([
            "simulate-perturbation",
            "--genes",
            "60",
            "--perturbed-genes",
            "8",
            "--doubles",
            "4",
            "--cells-per-condition",
            "12",
            "--control-cells",
            "60",
            "--targets-per-gene",
            "5",
            "--quiet",
            "--out",
        ])
        .arg(&screen)
        .status()
        .expect("run scgpt-prep");
    assert!(status.success());
    let truth: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("screen.truth.json")).unwrap()).unwrap();
    let singles: Vec<String> = truth["singles"].as_array().unwrap().iter().map(|s| s["gene"].as_str().unwrap().to_string()).collect();
    let genes = H5adReader::open(&screen, MatrixChoice::X).unwrap().var_names(Some("gene_name")).unwrap();
    let never_perturbed = genes.iter().find(|g| !singles.contains(g)).unwrap().clone();
    Setup { _tmp: tmp, dir, screen, gene: singles[0].clone(), outside_vocab: singles[1].clone(), never_perturbed, genes }
}

/// A tiny model whose vocabulary is the screen's genes (less `leave_out`) and the specials,
/// exported as best_model.pt + args.json + vocab.json. `bn` gets non-trivial running stats so
/// that applying it or not changes the scores.
fn tiny_model(s: &Setup, name: &str, style: BatchNormStyle) -> PathBuf {
    let mut vocab = serde_json::Map::new();
    for g in s.genes.iter().filter(|g| **g != s.outside_vocab) {
        vocab.insert(g.clone(), Value::from(vocab.len()));
    }
    for t in ["<pad>", "<cls>", "<eoc>"] {
        vocab.insert(t.into(), Value::from(vocab.len()));
    }
    let n = vocab.len();
    let mut config = ModelConfig::new(n, 16, 2, 24, 2).with_pad_token_id(n - 3);
    config.pad_value = -2.0;
    config.domain_spec_batchnorm = style;
    if style == BatchNormStyle::Dsbn {
        config.num_batch_labels = Some(2);
    }
    let device = Device::flex();
    let mut model = config.init(&device).unwrap();
    if let Some(bn) = model.bn.as_mut() {
        let mean: Vec<f32> = (0..16).map(|i| 0.3 * ((i as f32) * 0.7).sin()).collect();
        let var: Vec<f32> = (0..16).map(|i| 0.5 + 0.05 * i as f32).collect();
        bn.running_mean = RunningState::new(Tensor::<1>::from_data(TensorData::new(mean, [16]), &device));
        bn.running_var = RunningState::new(Tensor::<1>::from_data(TensorData::new(var, [16]), &device));
    }
    let out = s.dir.join(name);
    export_original(&model, &config, &serde_json::to_string(&Value::Object(vocab)).unwrap(), &out).unwrap();
    out
}

fn run(model: &Path, s: &Setup, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "grn",
        "attention",
        "--model",
        model.to_str().unwrap(),
        "--input",
        s.screen.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--quiet",
    ];
    args.extend_from_slice(extra);
    scgpt(&args)
}

fn ok(o: Output) -> String {
    let text = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "scgpt failed:\n{text}");
    text
}

fn err(o: Output) -> String {
    let text = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "scgpt should have failed:\n{text}");
    assert!(!text.contains("panicked"), "a panic instead of an error:\n{text}");
    text
}

struct Row {
    target: String,
    control: f64,
    perturbed: f64,
    difference: f64,
    rank: usize,
}

fn read_targets(dir: &Path) -> Vec<Row> {
    let text = std::fs::read_to_string(dir.join("targets.tsv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("target\tscore_control\tscore_perturbed\tdifference\trank"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 5, "{l}");
            Row {
                target: f[0].into(),
                control: f[1].parse().unwrap(),
                perturbed: f[2].parse().unwrap(),
                difference: f[3].parse().unwrap(),
                rank: f[4].parse().unwrap(),
            }
        })
        .collect()
}

fn check_targets(rows: &[Row], gene: &str) {
    assert!(rows.iter().any(|r| r.target == gene), "{gene} is a token and a row");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.rank, i + 1);
        // Column ranks / M averaged over heads and cells: in [0, 1).
        assert!((0.0..1.0).contains(&r.control) && (0.0..1.0).contains(&r.perturbed), "{}: {} {}", r.target, r.control, r.perturbed);
        assert!((r.difference - (r.perturbed - r.control)).abs() < 1e-6, "{}", r.target);
    }
    assert!(rows.windows(2).all(|w| w[0].difference >= w[1].difference), "sorted by difference, descending");
    let mut names: Vec<&str> = rows.iter().map(|r| r.target.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), rows.len(), "each gene once");
}

#[test]
fn targets_chart_and_summary() {
    let s = setup();
    let model = tiny_model(&s, "model", BatchNormStyle::BatchNorm);

    // HVG selection: 30 cell_ranger genes (+ GENE if it was not among them), batch of 7 cells
    // (does not divide the 72 cells).
    let out = s.dir.join("hvg");
    let log = ok(run(&model, &s, &out, &["--perturbed", &s.gene, "--genes", "hvg:30", "--batch-size", "7"]));
    assert!(log.contains("60 control and 12"), "{log}");
    assert!(log.contains("plain batchnorm"), "bn applied and said so:\n{log}");
    let rows = read_targets(&out);
    assert!(rows.len() == 30 || rows.len() == 31, "{} rows", rows.len());
    check_targets(&rows, &s.gene);
    assert!(!rows.iter().any(|r| r.target == s.outside_vocab), "genes outside the vocabulary are no tokens");

    let png = png::Decoder::new(std::fs::File::open(out.join("top_targets.png")).unwrap());
    let reader = png.read_info().unwrap();
    assert!(reader.info().width > 300 && reader.info().height > 20 * 24, "{}x{}", reader.info().width, reader.info().height);

    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["cells"]["control"], 60);
    assert_eq!(summary["cells"]["perturbed"], 12);
    assert_eq!(summary["layer"], 1);
    assert_eq!(summary["heads"], 2);
    assert_eq!(summary["tokens"].as_u64().unwrap() as usize, rows.len() + 1, "<cls> + every gene");
    assert_eq!(summary["condition"], format!("{}+ctrl", s.gene));

    // Seeded: the same run gives the same bytes; --layer -1 is the last layer (1 of 2).
    let again = s.dir.join("hvg-again");
    ok(run(&model, &s, &again, &["--perturbed", &s.gene, "--genes", "hvg:30", "--layer", "1"]));
    assert_eq!(std::fs::read(out.join("targets.tsv")).unwrap(), std::fs::read(again.join("targets.tsv")).unwrap());
    let first = s.dir.join("layer0");
    ok(run(&model, &s, &first, &["--perturbed", &s.gene, "--genes", "hvg:30", "--layer", "-2"]));
    let first_rows = read_targets(&first);
    check_targets(&first_rows, &s.gene);
    assert_ne!(
        std::fs::read(out.join("targets.tsv")).unwrap(),
        std::fs::read(first.join("targets.tsv")).unwrap(),
        "layer 0 differs from layer 1"
    );

    // A gene file: 10 genes and an unknown name; GENE is added.
    let list = s.dir.join("genes.txt");
    let ten: Vec<&String> = s.genes.iter().filter(|g| **g != s.gene && **g != s.outside_vocab).take(10).collect();
    let text = ten.iter().map(|g| g.as_str()).chain(["NOT_A_GENE", "# a comment", ""]).collect::<Vec<_>>().join("\n");
    std::fs::write(&list, text).unwrap();
    let listed = s.dir.join("listed");
    let log = ok(run(&model, &s, &listed, &["--perturbed", &s.gene, "--genes", list.to_str().unwrap(), "--deterministic"]));
    assert!(log.contains("NOT_A_GENE"), "the unknown gene is reported:\n{log}");
    let rows = read_targets(&listed);
    assert_eq!(rows.len(), 11);
    check_targets(&rows, &s.gene);
    for g in &ten {
        assert!(rows.iter().any(|r| &r.target == *g), "{g}");
    }
}

#[test]
fn a_bn_checkpoint_whose_args_do_not_say_so_loads_as_it_is() {
    let s = setup();
    let declared = tiny_model(&s, "declared", BatchNormStyle::BatchNorm);
    // The same files, with args.json as the original's pre-2023 scripts wrote it: no
    // domain_spec_batchnorm key, though the checkpoint has bn.*.
    let silent = s.dir.join("silent");
    std::fs::create_dir_all(&silent).unwrap();
    for f in ["best_model.pt", "vocab.json"] {
        std::fs::copy(declared.join(f), silent.join(f)).unwrap();
    }
    let mut args: Value = serde_json::from_str(&std::fs::read_to_string(declared.join("args.json")).unwrap()).unwrap();
    args.as_object_mut().unwrap().remove("domain_spec_batchnorm");
    args["DSBN"] = Value::Bool(false);
    std::fs::write(silent.join("args.json"), serde_json::to_string_pretty(&args).unwrap()).unwrap();

    let common = ["--perturbed", s.gene.as_str(), "--genes", "hvg:20"];
    let a = s.dir.join("a");
    ok(run(&declared, &s, &a, &common));
    let b = s.dir.join("b");
    let log = ok(run(&silent, &s, &b, &common));
    assert!(log.contains("carries `bn.*`"), "{log}");
    assert_eq!(std::fs::read(a.join("targets.tsv")).unwrap(), std::fs::read(b.join("targets.tsv")).unwrap());

    // A model without bn gives other scores (bn was really applied above).
    let plain = tiny_model(&s, "plain", BatchNormStyle::None);
    let c = s.dir.join("c");
    let log = ok(run(&plain, &s, &c, &common));
    assert!(!log.contains("batchnorm"), "{log}");
    assert_ne!(std::fs::read(a.join("targets.tsv")).unwrap(), std::fs::read(c.join("targets.tsv")).unwrap());
}

#[test]
fn errors_name_what_is_wrong() {
    let s = setup();
    let model = tiny_model(&s, "model", BatchNormStyle::BatchNorm);
    let out = s.dir.join("out");

    let e = err(run(&model, &s, &out, &["--perturbed", "NOT_A_GENE"]));
    assert!(e.contains("NOT_A_GENE") && e.contains("not a gene of") && e.contains("gene_name"), "{e}");

    let e = err(run(&model, &s, &out, &["--perturbed", &s.outside_vocab]));
    assert!(e.contains(&s.outside_vocab) && e.contains("not in the model vocabulary") && e.contains("vocab.json"), "{e}");

    let e = err(run(&model, &s, &out, &["--perturbed", &s.never_perturbed]));
    assert!(e.contains(&format!("no cells of {}'s condition \"{}+ctrl\"", s.never_perturbed, s.never_perturbed)), "{e}");

    let e = err(run(&model, &s, &out, &["--perturbed", &s.gene, "--condition-col", "perturbation"]));
    assert!(e.contains("perturbation") && e.contains("available obs columns") && e.contains("condition_name"), "{e}");

    let e = err(run(&model, &s, &out, &["--perturbed", &s.gene, "--layer", "2"]));
    assert!(e.contains("it has 2"), "{e}");

    let e = err(run(&model, &s, &out, &["--perturbed", &s.gene, "--genes", "hvg:0"]));
    assert!(e.contains("hvg:N"), "{e}");

    let dsbn = tiny_model(&s, "dsbn", BatchNormStyle::Dsbn);
    let e = err(run(&dsbn, &s, &out, &["--perturbed", &s.gene]));
    assert!(e.contains("DSBN"), "{e}");
    assert!(!out.join("targets.tsv").exists(), "no output after an error");
}
