//! The original's checkpoint directory: `best_model.pt` + `vocab.json` + `args.json`.
//!
//! The model is built the way the original's `embed_data` builds it: only the architecture
//! fields it reads from args.json are used (`embsize`, `nheads`, `d_hid`, `nlayers`,
//! `n_layers_cls`, `dropout`, `pad_token`, `pad_value`), everything else is its hard-coded
//! choice: no batch labels, no DSBN, no DAB, no explicit zero probabilities, no generative
//! `flag_encoder`, cls cell embedding. One deviation: `input_emb_style` (and `n_bins` /
//! `n_input_bins`, which size a category value encoder) are honoured, because the original
//! would build a continuous value encoder for a category checkpoint and silently keep it random;
//! here a value encoder that does not load is an error.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use scgpt_data::vocab::GeneVocab;
use scgpt_model::burn::tensor::Device;
use scgpt_model::{load_pretrained, LoadReport, ModelConfig, TransformerModel};
use serde_json::{Map, Value};

pub const CHECKPOINT: &str = "best_model.pt";
/// The name Tutorial_Annotation gives its fine-tuned weights.
pub const TUTORIAL_CHECKPOINT: &str = "model.pt";
pub const VOCAB: &str = "vocab.json";
pub const ARGS: &str = "args.json";

/// args.json keys that reach the model; the rest of the file is ignored, as `embed_data` does.
const USED_KEYS: &[&str] = &[
    "embsize",
    "d_model",
    "nheads",
    "nhead",
    "d_hid",
    "nlayers",
    "n_layers_cls",
    "nlayers_cls",
    "dropout",
    "pad_token",
    "pad_value",
    "mask_value",
    "n_bins",
    "n_input_bins",
    "input_emb_style",
];

pub struct LoadedModel {
    pub model: TransformerModel,
    pub vocab: GeneVocab,
    pub vocab_path: PathBuf,
    pub pad_id: u32,
    pub cls_id: u32,
    pub pad_value: f32,
    pub d_model: usize,
    pub report: LoadReport,
}

fn required(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{}: not found; a model directory holds {CHECKPOINT}, {VOCAB} and {ARGS} (the original's \
             checkpoint folder, e.g. scGPT_human)",
            p.display()
        );
    }
    Ok(p)
}

/// Reads args.json and keeps the fields the embedding model is built from (`all`: every
/// field, for a model this project fine-tuned, whose args.json says what it was built with:
/// DSBN, batch labels, heads).
fn read_args(path: &Path, all: bool) -> anyhow::Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let Value::Object(map) = value else {
        bail!("{}: expected a JSON object at the top level", path.display());
    };
    // The original's embed_data reads these with model_configs[...]: they must be there.
    for key in ["pad_value", "pad_token"] {
        if !map.contains_key(key) {
            bail!("{}: field `{key}` missing (the original's embed_data needs it too)", path.display());
        }
    }
    Ok(map.into_iter().filter(|(k, _)| all || USED_KEYS.contains(&k.as_str())).collect())
}

/// One key of args.json as written (the embedding loader keeps only `USED_KEYS`).
fn read_raw_key(path: &Path, key: &str) -> anyhow::Result<Option<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    Ok(value.get(key).cloned())
}

pub fn load(dir: &Path, device: &Device) -> anyhow::Result<LoadedModel> {
    load_with(dir, device, None)
}

/// As [`load`], with the CLS head of a fine-tuned annotation model: `n_cls` outputs (the
/// classes saved beside it), `n_layers_cls` from args.json. A checkpoint whose head does not
/// load (none, or another width) is an error.
pub fn load_classifier(dir: &Path, device: &Device, n_cls: usize) -> anyhow::Result<LoadedModel> {
    let loaded = load_with(dir, device, Some(n_cls))?;
    if let Some(m) = loaded.report.missing.iter().find(|m| m.starts_with("cls_decoder.")) {
        let why =
            loaded.report.skipped.iter().find(|s| s.name == *m).map(|s| s.reason.clone()).unwrap_or_else(|| "absent from the file".into());
        bail!(
            "{}: the classifier head did not load ({m}: {why}); a model for prediction is a fine-tuned annotation model (best_model/ of a `task.kind = \"annotation\"` run) whose classes file lists {n_cls} classes",
            dir.join(CHECKPOINT).display()
        );
    }
    Ok(loaded)
}

fn load_with(dir: &Path, device: &Device, n_cls: Option<usize>) -> anyhow::Result<LoadedModel> {
    if !dir.is_dir() {
        bail!("{}: model directory not found (expected a folder with {CHECKPOINT}, {VOCAB} and {ARGS})", dir.display());
    }
    let vocab_path = required(dir, VOCAB)?;
    let args_path = required(dir, ARGS)?;
    // The annotation tutorial saves its fine-tuned weights as model.pt.
    let ckpt_path = if !dir.join(CHECKPOINT).is_file() && dir.join(TUTORIAL_CHECKPOINT).is_file() {
        dir.join(TUTORIAL_CHECKPOINT)
    } else {
        required(dir, CHECKPOINT)?
    };

    let mut vocab = GeneVocab::from_file(&vocab_path)?;
    // As embed_data: special tokens missing from the file are appended.
    vocab.ensure_specials();
    let fine_tuned_here = dir.join(scgpt_engine::checkpoint::INFERENCE_FILE).is_file();
    let mut args = read_args(&args_path, fine_tuned_here)?;
    if let Some(n) = n_cls {
        args.insert("n_cls".into(), n.into());
        // A classifier reads the cell embedding it was trained on.
        if let Some(style) = read_raw_key(&args_path, "cell_emb_style")? {
            args.insert("cell_emb_style".into(), style);
        }
    }
    let origin = args_path.display().to_string();
    let config = ModelConfig::from_args_map(&args, vocab.len(), &origin)?;
    let pad_id = vocab
        .get(&config.pad_token)
        .with_context(|| format!("{origin}: field `pad_token`: {:?} is not a token of {}", config.pad_token, vocab_path.display()))?;
    let cls_id = vocab.cls_id().expect("ensure_specials added <cls>");
    let pad_value = config.pad_value as f32;
    let d_model = config.d_model;
    let config = config.with_pad_token_id(pad_id as usize);
    config.validate().with_context(|| format!("{origin}: unusable model configuration"))?;

    let mut model = config.init(device)?;
    let report = load_pretrained(&mut model, &ckpt_path)?;
    if let Some(m) = report.missing.iter().find(|m| m.starts_with("value_encoder.")) {
        let why = report.skipped.iter().find(|s| s.name == *m).map(|s| s.reason.clone()).unwrap_or_else(|| "absent from the file".into());
        bail!(
            "checkpoint {}: the value encoder did not load ({m}: {why}); is `input_emb_style` in {} \
             right for this checkpoint?",
            ckpt_path.display(),
            args_path.display()
        );
    }
    Ok(LoadedModel { model, vocab, vocab_path, pad_id, cls_id, pad_value, d_model, report })
}
