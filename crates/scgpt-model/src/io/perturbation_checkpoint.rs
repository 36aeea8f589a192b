//! `TransformerGenerator` on disk: the native checkpoint (the same layout as the
//! `TransformerModel`'s — `model.safetensors`, `config.json`, `vocab.json` — with
//! `"model": "perturbation"` and a [`PerturbationConfig`]) for exact resume, and the
//! original's format (`best_model.pt`, the state_dict the perturbation tutorial saves, with
//! the configuration beside it) for `best_model/`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::Device;
use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::io::checkpoint::{
    check_vocab_for, ckpt_err, load_safetensors_strict, original_args_json, read_text, state_dict, write_dir_atomically, write_err,
    write_file, NATIVE_CONFIG, NATIVE_WEIGHTS, ORIGINAL_ARGS, ORIGINAL_WEIGHTS, VOCAB_FILE,
};
use crate::io::torch_zip;
use crate::perturbation::{PerturbationConfig, TransformerGenerator};

const FORMAT: &str = "scgpt-rs-native";
const VERSION: u64 = 1;
const KIND: &str = "perturbation";
/// The generator's constructor arguments beside `best_model.pt`.
pub const PERTURBATION_ARGS: &str = "perturbation_config.json";

fn check(vocab_json: &str, c: &PerturbationConfig, what: &Path) -> Result<()> {
    check_vocab_for(vocab_json, c.ntoken, c.pad_token_id, &c.pad_token).map_err(|(field, message)| ModelError::Json {
        path: what.to_path_buf(),
        field,
        message,
    })
}

/// Saves a generator (parameters and its configuration) and `vocab_json` as a native
/// checkpoint directory, atomically.
pub fn save_native_perturbation(model: &TransformerGenerator, vocab_json: &str, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    check(vocab_json, &model.config, &dir.join(VOCAB_FILE))?;
    let config_json = serde_json::to_string_pretty(&json!({"format": FORMAT, "version": VERSION, "model": KIND, "config": model.config}))
        .expect("config serialises");
    write_dir_atomically(dir, &[NATIVE_WEIGHTS, NATIVE_CONFIG, VOCAB_FILE], |tmp| {
        let weights = dir.join(NATIVE_WEIGHTS);
        let mut store = SafetensorsStore::from_file(tmp.join(NATIVE_WEIGHTS))
            .overwrite(true)
            .metadata("scgpt_rs_format", format!("{FORMAT}-{VERSION}-{KIND}"));
        match catch_unwind(AssertUnwindSafe(|| model.save_into(&mut store))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(write_err(&weights, e.to_string())),
            Err(_) => return Err(write_err(&weights, "the safetensors writer panicked")),
        }
        write_file(&tmp.join(NATIVE_CONFIG), config_json.as_bytes()).map_err(|e| write_err(&dir.join(NATIVE_CONFIG), e.to_string()))?;
        write_file(&tmp.join(VOCAB_FILE), vocab_json.as_bytes()).map_err(|e| write_err(&dir.join(VOCAB_FILE), e.to_string()))?;
        Ok(())
    })
}

/// Whether a native checkpoint directory holds a generator.
pub fn is_native_perturbation(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(NATIVE_CONFIG))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v["model"] == KIND)
}

/// Reads a directory written by [`save_native_perturbation`]; strict about every tensor.
pub fn load_native_perturbation(dir: impl AsRef<Path>, device: &Device) -> Result<(TransformerGenerator, String)> {
    let dir = dir.as_ref();
    let config_path = dir.join(NATIVE_CONFIG);
    let err = |field: &str, message: String| ModelError::Json { path: config_path.clone(), field: field.into(), message };
    let doc: Value = serde_json::from_str(&read_text(&config_path)?).map_err(|e| err("<document>", e.to_string()))?;
    if doc["format"] != FORMAT || doc["version"] != VERSION {
        return Err(err("format", format!("expected {FORMAT} version {VERSION}, found {} {}", doc["format"], doc["version"])));
    }
    if doc["model"] != KIND {
        return Err(err("model", format!("expected \"{KIND}\" (a perturbation model), found {}", doc["model"])));
    }
    let config: PerturbationConfig = serde_json::from_value(doc["config"].clone()).map_err(|e| err("config", e.to_string()))?;
    let vocab_json = read_text(&dir.join(VOCAB_FILE))?;
    check(&vocab_json, &config, &dir.join(VOCAB_FILE))?;
    // f32 parameters whatever the device default, as `load_native` (exact fp32 masters).
    let mut model = crate::cast::cast_params(config.init(device)?, burn::tensor::FloatDType::F32, crate::cast::CastGraph::Leaf);
    load_safetensors_strict(&mut model, &dir.join(NATIVE_WEIGHTS))?;
    Ok((model, vocab_json))
}

/// Reads a directory written by [`export_perturbation`] (a run's `best_model/`): the
/// configuration, `vocab.json` and every tensor of `best_model.pt`.
pub fn load_exported_perturbation(dir: impl AsRef<Path>, device: &Device) -> Result<(TransformerGenerator, String)> {
    let dir = dir.as_ref();
    let config_path = dir.join(PERTURBATION_ARGS);
    let config: PerturbationConfig = serde_json::from_str(&read_text(&config_path)?).map_err(|e| ModelError::Json {
        path: config_path.clone(),
        field: "<document>".into(),
        message: e.to_string(),
    })?;
    let vocab_json = read_text(&dir.join(VOCAB_FILE))?;
    check(&vocab_json, &config, &dir.join(VOCAB_FILE))?;
    let mut model = config.init(device)?;
    model.load_checkpoint(dir.join(ORIGINAL_WEIGHTS))?;
    Ok((model, vocab_json))
}

/// The original's format: `best_model.pt` (the generator's state_dict under the original's
/// key names, as the tutorial's `torch.save(model.state_dict())`), its constructor arguments
/// (`perturbation_config.json`), `vocab.json`, and an `args.json` of the encoder under the
/// original's names, written into `dir` atomically. The args.json is what makes the folder
/// load as the original's `TransformerModel` too (`pert_encoder.*` then left out), as
/// Tutorial_Attention_GRN loads a perturbation-fine-tuned model for `scgpt grn attention`.
pub fn export_perturbation(model: &TransformerGenerator, vocab_json: &str, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    check(vocab_json, &model.config, &dir.join(VOCAB_FILE))?;
    let tensors = state_dict(model, &dir.join(ORIGINAL_WEIGHTS))?;
    let args = serde_json::to_string_pretty(&model.config).expect("config serialises") + "\n";
    let encoder_args = serde_json::to_string_pretty(&encoder_args_json(&model.config)).expect("args serialise") + "\n";
    write_dir_atomically(dir, &[ORIGINAL_WEIGHTS, PERTURBATION_ARGS, ORIGINAL_ARGS, VOCAB_FILE], |tmp| {
        let weights = dir.join(ORIGINAL_WEIGHTS);
        match catch_unwind(AssertUnwindSafe(|| torch_zip::write_state_dict(&tmp.join(ORIGINAL_WEIGHTS), tensors))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(write_err(&weights, e.to_string())),
            Err(_) => return Err(write_err(&weights, "reading a tensor panicked")),
        }
        write_file(&tmp.join(PERTURBATION_ARGS), args.as_bytes()).map_err(|e| write_err(&dir.join(PERTURBATION_ARGS), e.to_string()))?;
        write_file(&tmp.join(ORIGINAL_ARGS), encoder_args.as_bytes()).map_err(|e| write_err(&dir.join(ORIGINAL_ARGS), e.to_string()))?;
        write_file(&tmp.join(VOCAB_FILE), vocab_json.as_bytes()).map_err(|e| write_err(&dir.join(VOCAB_FILE), e.to_string()))?;
        Ok(())
    })
    .map_err(|e| match e {
        ModelError::Write { .. } => e,
        other => ckpt_err(dir, other.to_string()),
    })
}

/// The generator's shared encoder (gene and value embeddings, transformer, expression decoder)
/// as an original args.json, written by the same [`original_args_json`] as a `TransformerModel`
/// export (no MVC head: the generator's, if any, is not loaded as one).
fn encoder_args_json(c: &PerturbationConfig) -> Value {
    let mut m = ModelConfig::new(c.ntoken, c.d_model, c.nhead, c.d_hid, c.nlayers);
    m.nlayers_cls = c.nlayers_cls;
    m.n_cls = c.n_cls;
    m.dropout = c.dropout;
    m.pad_token = c.pad_token.clone();
    m.pad_value = c.pad_value;
    m.cell_emb_style = c.cell_emb_style;
    m.explicit_zero_prob = c.explicit_zero_prob;
    let mut args = original_args_json(&m);
    args.insert(
        "perturbation_model".into(),
        "TransformerGenerator (perturbation_config.json); pert_encoder.* is not part of the TransformerModel".into(),
    );
    Value::Object(args)
}
