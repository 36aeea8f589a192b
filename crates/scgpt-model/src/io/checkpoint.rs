//! Saving models: this project's native checkpoints, and export to the original's format.
//!
//! **Native** (`save_native` / `load_native`): a directory
//! ```text
//! <dir>/model.safetensors   every parameter and buffer (BatchNorm running statistics
//!                           included) under burn's own names, in the model's float dtype
//! <dir>/config.json         {"format": "scgpt-rs-native", "version": 1, "config": ModelConfig}
//! <dir>/vocab.json          the vocabulary, verbatim
//! ```
//! Loading is strict (every tensor present, nothing extra, shapes equal) and bit-exact.
//!
//! **Original** (`export_original`): a directory the original scGPT loads like a released
//! model:
//! ```text
//! <dir>/best_model.pt   torch.save(state_dict) zip written in pure Rust (see `torch_zip`),
//!                       flash naming (`self_attn.Wqkv.*`), PyTorch layouts ([out, in]
//!                       Linear weights), Sequential indices as in PyTorch, BatchNorm
//!                       buffers incl. `num_batches_tracked`
//! <dir>/args.json       the model arguments under the original scripts' names
//! <dir>/vocab.json      the vocabulary, verbatim
//! ```
//!
//! Both write the whole directory atomically: into a hidden sibling temp directory, then one
//! rename. An existing target is replaced only if it holds nothing but the files of the same
//! format (so a typo cannot wipe an unrelated directory).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use burn::module::Module;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, ModuleStore, SafetensorsStore};
use burn::tensor::{DType, Device};
use serde_json::{json, Map, Value};

use crate::config::{BatchNormStyle, CellEmbStyle, InputEmbStyle, ModelConfig, MvcDecoderStyle};
use crate::error::{ModelError, Result};
use crate::io::load::original_key;
use crate::io::torch_zip::{self, PtData, PtTensor};
use crate::layers::BatchNorm1d;
use crate::model::TransformerModel;

pub const NATIVE_WEIGHTS: &str = "model.safetensors";
pub const NATIVE_CONFIG: &str = "config.json";
pub const VOCAB_FILE: &str = "vocab.json";
pub const ORIGINAL_WEIGHTS: &str = "best_model.pt";
pub const ORIGINAL_ARGS: &str = "args.json";

const NATIVE_FORMAT: &str = "scgpt-rs-native";
const NATIVE_VERSION: u64 = 1;

/// A model read back with [`load_native`].
#[derive(Debug)]
pub struct NativeCheckpoint {
    /// The model (its configuration is `model.config`).
    pub model: TransformerModel,
    /// `vocab.json`, verbatim.
    pub vocab_json: String,
}

/// What [`export_original`] wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub dir: PathBuf,
    /// (state_dict key, shape) in file order.
    pub tensors: Vec<(String, Vec<usize>)>,
    /// Size of `best_model.pt` in bytes.
    pub weights_bytes: u64,
}

pub(crate) fn write_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Write { path: path.to_path_buf(), message: message.into() }
}

pub(crate) fn ckpt_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.to_path_buf(), message: message.into() }
}

/// The model's BatchNorm layers (DSBN domains and plain BN).
fn batch_norms(model: &TransformerModel) -> Vec<&BatchNorm1d> {
    let mut v: Vec<&BatchNorm1d> = Vec::new();
    if let Some(d) = &model.dsbn {
        v.extend(d.bns.iter());
    }
    if let Some(bn) = &model.bn {
        v.push(bn);
    }
    v
}

/// Folds pending per-thread running-statistics updates into the stored value. burn's
/// `RunningState` keeps the latest training-step update aside until it is synced, and the
/// module visitor that collects tensors for saving reads the stored value, so without this a
/// save right after a training step would write the previous statistics.
pub fn sync_running_stats(bns: &[&BatchNorm1d]) {
    for bn in bns {
        // `Module::valid` on a RunningState syncs the shared value (the copy is discarded).
        let _ = bn.running_mean.valid();
        let _ = bn.running_var.valid();
    }
}

/// Parses a vocab.json (`{token: id}`) and checks it against the model: integer ids, unique,
/// below `ntoken`; `<pad>` at the model's `pad_token_id` when both are known.
pub(crate) fn check_vocab(vocab_json: &str, config: &ModelConfig) -> std::result::Result<(), (String, String)> {
    check_vocab_for(vocab_json, config.ntoken, config.pad_token_id, &config.pad_token)
}

/// [`check_vocab`] against a vocabulary size, `<pad>` id and pad token.
pub(crate) fn check_vocab_for(
    vocab_json: &str,
    ntoken: usize,
    pad_token_id: Option<usize>,
    pad_token: &str,
) -> std::result::Result<(), (String, String)> {
    let v: Value = serde_json::from_str(vocab_json).map_err(|e| ("<document>".to_string(), e.to_string()))?;
    let Value::Object(map) = v else {
        return Err(("<document>".into(), "expected a JSON object {token: id}".into()));
    };
    let mut seen: HashSet<u64> = HashSet::with_capacity(map.len());
    for (tok, id) in &map {
        let Some(id) = id.as_u64() else {
            return Err((tok.clone(), format!("id {id} is not a non-negative integer")));
        };
        if id as usize >= ntoken {
            return Err((tok.clone(), format!("id {id} is outside the model's vocabulary of {}", ntoken)));
        }
        if !seen.insert(id) {
            return Err((tok.clone(), format!("id {id} is used twice")));
        }
    }
    if let (Some(p), Some(id)) = (pad_token_id, map.get(pad_token).and_then(Value::as_u64)) {
        if id as usize != p {
            return Err((pad_token.to_string(), format!("id {id}, but the model's pad_token_id is {p}")));
        }
    }
    Ok(())
}

pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn unique_suffix() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

/// Creates `dir` atomically: `fill` writes the files into a fresh sibling temp directory, which
/// is then renamed onto `dir`. An existing `dir` is replaced only if it contains nothing but
/// `allowed` files.
pub(crate) fn write_dir_atomically(dir: &Path, allowed: &[&str], fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = dir.file_name().and_then(|n| n.to_str()).ok_or_else(|| write_err(dir, "not a directory name"))?.to_string();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let exists = match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => {
            let entries = std::fs::read_dir(dir).map_err(|e| write_err(dir, e.to_string()))?;
            for e in entries {
                let e = e.map_err(|e| write_err(dir, e.to_string()))?;
                let n = e.file_name();
                if !allowed.iter().any(|a| n.to_str() == Some(a)) {
                    return Err(write_err(
                        dir,
                        format!(
                            "exists and holds {:?}, which is not part of this checkpoint \
                             format ({}); refusing to replace it",
                            n,
                            allowed.join(", ")
                        ),
                    ));
                }
            }
            true
        }
        Ok(_) => return Err(write_err(dir, "exists and is not a directory")),
        Err(_) => false,
    };
    std::fs::create_dir_all(&parent).map_err(|e| write_err(&parent, e.to_string()))?;
    let suffix = unique_suffix();
    let tmp = parent.join(format!(".{name}.tmp-{suffix}"));
    std::fs::create_dir(&tmp).map_err(|e| write_err(&tmp, e.to_string()))?;
    let filled = fill(&tmp).and_then(|()| std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| write_err(&tmp, e.to_string())));
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if exists {
        let old = parent.join(format!(".{name}.old-{suffix}"));
        if let Err(e) = std::fs::rename(dir, &old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(write_err(dir, format!("cannot move the old directory: {e}")));
        }
        if let Err(e) = std::fs::rename(&tmp, dir) {
            let _ = std::fs::rename(&old, dir);
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(write_err(dir, e.to_string()));
        }
        let _ = std::fs::remove_dir_all(&old);
    } else if let Err(e) = std::fs::rename(&tmp, dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(write_err(dir, e.to_string()));
    }
    if let Ok(f) = std::fs::File::open(&parent) {
        let _ = f.sync_all();
    }
    Ok(())
}

/// Saves `model` (parameters, BatchNorm buffers, its `ModelConfig`) and `vocab_json` as a
/// native checkpoint directory. See the module docs for the layout.
pub fn save_native(model: &TransformerModel, vocab_json: &str, dir: impl AsRef<Path>) -> Result<()> {
    let dir = dir.as_ref();
    check_vocab(vocab_json, &model.config).map_err(|(field, message)| ModelError::input("vocab_json", format!("`{field}`: {message}")))?;
    sync_running_stats(&batch_norms(model));
    let config_json = serde_json::to_string_pretty(&json!({
        "format": NATIVE_FORMAT,
        "version": NATIVE_VERSION,
        "config": model.config,
    }))
    .expect("ModelConfig serialises");
    write_dir_atomically(dir, &[NATIVE_WEIGHTS, NATIVE_CONFIG, VOCAB_FILE], |tmp| {
        let final_weights = dir.join(NATIVE_WEIGHTS);
        let mut store = SafetensorsStore::from_file(tmp.join(NATIVE_WEIGHTS))
            .overwrite(true)
            .metadata("scgpt_rs_format", format!("{NATIVE_FORMAT}-{NATIVE_VERSION}"));
        match catch_unwind(AssertUnwindSafe(|| model.save_into(&mut store))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(write_err(&final_weights, e.to_string())),
            Err(_) => return Err(write_err(&final_weights, "the safetensors writer panicked")),
        }
        write_file(&tmp.join(NATIVE_CONFIG), config_json.as_bytes()).map_err(|e| write_err(&dir.join(NATIVE_CONFIG), e.to_string()))?;
        write_file(&tmp.join(VOCAB_FILE), vocab_json.as_bytes()).map_err(|e| write_err(&dir.join(VOCAB_FILE), e.to_string()))?;
        Ok(())
    })
}

pub(crate) fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })
}

/// Reads a native checkpoint directory written by [`save_native`] onto `device`. Strict: the
/// weights file must hold exactly the model's tensors with the model's shapes.
pub fn load_native(dir: impl AsRef<Path>, device: &Device) -> Result<NativeCheckpoint> {
    let dir = dir.as_ref();
    let config_path = dir.join(NATIVE_CONFIG);
    let json_err =
        |path: &Path, field: &str, message: String| ModelError::Json { path: path.to_path_buf(), field: field.to_string(), message };
    let doc: Value = serde_json::from_str(&read_text(&config_path)?).map_err(|e| json_err(&config_path, "<document>", e.to_string()))?;
    match doc.get("format").and_then(Value::as_str) {
        Some(NATIVE_FORMAT) => {}
        other => return Err(json_err(&config_path, "format", format!("expected \"{NATIVE_FORMAT}\", found {other:?}"))),
    }
    match doc.get("version").and_then(Value::as_u64) {
        Some(NATIVE_VERSION) => {}
        other => {
            return Err(json_err(
                &config_path,
                "version",
                format!("expected {NATIVE_VERSION}, found {other:?} (written by a newer version?)"),
            ))
        }
    }
    let config: ModelConfig = serde_json::from_value(doc["config"].clone()).map_err(|e| json_err(&config_path, "config", e.to_string()))?;
    config.validate_as(&config_path.display().to_string())?;

    let vocab_path = dir.join(VOCAB_FILE);
    let vocab_json = read_text(&vocab_path)?;
    check_vocab(&vocab_json, &config).map_err(|(field, message)| json_err(&vocab_path, &field, message))?;

    // Loaded into f32 parameters whatever the device's default float type: the file holds f32,
    // and a bf16 default (mixed precision) would round a resumed run's fp32 masters.
    let mut model = crate::cast::cast_params(config.init(device)?, burn::tensor::FloatDType::F32, crate::cast::CastGraph::Leaf);
    let weights = dir.join(NATIVE_WEIGHTS);
    load_safetensors_strict(&mut model, &weights)?;
    Ok(NativeCheckpoint { model, vocab_json })
}

/// Loads every tensor of `path` into `model` by burn name; anything missing, extra, misshapen
/// or unreadable is an error naming the file.
pub(crate) fn load_safetensors_strict<M: ModuleSnapshot>(model: &mut M, path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    if !meta.is_file() {
        return Err(ckpt_err(path, "not a regular file"));
    }
    let read = catch_unwind(AssertUnwindSafe(|| {
        let mut store = SafetensorsStore::from_file(path);
        store.get_all_tensors().map(|m| m.values().cloned().collect::<Vec<_>>()).map_err(|e| e.to_string())
    }));
    let tensors = match read {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(ckpt_err(path, format!("not a readable safetensors file (truncated or corrupt?): {e}"))),
        Err(_) => return Err(ckpt_err(path, "the safetensors reader failed on malformed data (truncated or corrupt file?)")),
    };

    let want: BTreeMap<String, Vec<usize>> =
        model.collect(None, None, false).into_iter().map(|t| (t.name.clone(), t.shape.to_vec())).collect();
    let have: BTreeSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    let missing: Vec<&str> = want.keys().map(String::as_str).filter(|n| !have.contains(n)).collect();
    let extra: Vec<&str> = have.iter().copied().filter(|n| !want.contains_key(*n)).collect();
    if !missing.is_empty() || !extra.is_empty() {
        return Err(ckpt_err(
            path,
            format!("does not match the model in config.json: missing [{}], unexpected [{}]", missing.join(", "), extra.join(", ")),
        ));
    }
    let mut to_apply = Vec::with_capacity(tensors.len());
    for t in tensors {
        let shape = t.shape.to_vec();
        if want[&t.name] != shape {
            return Err(ckpt_err(path, format!("`{}` has shape {:?}, the model {:?}", t.name, shape, want[&t.name])));
        }
        if !t.dtype.is_float() {
            return Err(ckpt_err(path, format!("`{}` holds {:?} data", t.name, t.dtype)));
        }
        let name = t.name.clone();
        let parts = match catch_unwind(AssertUnwindSafe(|| t.into_parts())) {
            Ok(Ok(p)) => p,
            _ => return Err(ckpt_err(path, format!("cannot read the data of `{name}` (truncated or corrupt file?)"))),
        };
        let (n, dt, shape, id, bytes) = parts;
        if bytes.len() != shape.num_elements() * dt.size() {
            return Err(ckpt_err(path, format!("`{name}`: data has the wrong length")));
        }
        to_apply.push(PackTensor::new(n, dt, shape, id, bytes));
    }
    let dtype: DType = model_float_dtype(model);
    let adapter: Box<dyn ModuleAdapter> = Box::new(FloatCastAdapter::to(dtype));
    let result = model.apply(to_apply, None, Some(adapter), false);
    if !result.errors.is_empty() || !result.missing.is_empty() || !result.unused.is_empty() {
        return Err(ckpt_err(
            path,
            format!(
                "could not load: errors [{}], missing [{}], unused [{}]",
                result.errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "),
                result.missing.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>().join(", "),
                result.unused.join(", ")
            ),
        ));
    }
    Ok(())
}

/// The float dtype of the device the module lives on (without materialising parameters).
/// The float type the module's parameters hold (the first one's), else the device default: a
/// loaded tensor takes it, so fp32 masters under a bf16 device default load exactly.
fn model_float_dtype<M: Module>(model: &M) -> DType {
    struct First(Option<DType>);
    impl burn::module::ModuleVisitor for First {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<burn::tensor::Tensor<D>>) {
            if self.0.is_none() {
                self.0 = Some(param.val().dtype());
            }
        }
    }
    let mut first = First(None);
    model.visit(&mut first);
    first.0.unwrap_or_else(|| match model.devices().first() {
        Some(d) => d.settings().float_dtype.into(),
        None => DType::F32,
    })
}

/// A JSON number that is an integer when the value is whole (the original scripts' argparse
/// values are ints: `pad_value: -2`, and the category encoder uses it as an index).
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        Value::from(v as i64)
    } else {
        Value::from(v)
    }
}

/// The model arguments of `config` under the names the original's scripts write into
/// args.json (and read back: `embsize`, `nheads`, `d_hid`, `nlayers`, `n_layers_cls`,
/// `dropout`, `pad_token`, `pad_value`, …). [`ModelConfig::from_args_json`] reads it back to
/// the same config (`pad_token_id` comes from the vocabulary).
pub fn original_args_json(config: &ModelConfig) -> Map<String, Value> {
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    put("embsize", config.d_model.into());
    put("nheads", config.nhead.into());
    put("d_hid", config.d_hid.into());
    put("nlayers", config.nlayers.into());
    put("n_layers_cls", config.nlayers_cls.into());
    put("n_cls", config.n_cls.into());
    put("dropout", config.dropout.into());
    put("pad_token", config.pad_token.clone().into());
    put("pad_value", number(config.pad_value));
    put("mask_value", number(config.mask_value));
    put("n_bins", config.n_bins.into());
    if let Some(n) = config.n_input_bins {
        put("n_input_bins", n.into());
    }
    put(
        "input_emb_style",
        match config.input_emb_style {
            InputEmbStyle::Continuous => "continuous",
            InputEmbStyle::Category => "category",
            InputEmbStyle::Scaling => "scaling",
        }
        .into(),
    );
    put(
        "cell_emb_style",
        match config.cell_emb_style {
            CellEmbStyle::Cls => "cls",
            CellEmbStyle::AvgPool => "avg-pool",
            CellEmbStyle::WPool => "w-pool",
        }
        .into(),
    );
    put("explicit_zero_prob", config.explicit_zero_prob.into());
    put("MVC", config.do_mvc.into());
    put(
        "mvc_decoder_style",
        match config.mvc_decoder_style {
            MvcDecoderStyle::InnerProduct => "inner product",
            MvcDecoderStyle::InnerProductDetach => "inner product, detach",
        }
        .into(),
    );
    put("DAB", config.do_dab.into());
    put("use_batch_labels", config.use_batch_labels.into());
    if let Some(n) = config.num_batch_labels {
        put("num_batch_labels", n.into());
    }
    match config.domain_spec_batchnorm {
        BatchNormStyle::None => put("DSBN", false.into()),
        BatchNormStyle::Dsbn => put("DSBN", true.into()),
        BatchNormStyle::BatchNorm => put("domain_spec_batchnorm", "batchnorm".into()),
    }
    put("ecs_thres", config.ecs_threshold.into());
    put("USE_GENERATIVE_TRAINING", config.use_generative_training.into());
    // The weights use flash-attn naming (`self_attn.Wqkv.*`), as the released models do.
    put("fast_transformer", true.into());
    put("fast_transformer_backend", "flash".into());
    put("pre_norm", false.into());
    m
}

/// Fields that decide the parameter set and shapes; `export_original` refuses a config that
/// disagrees with the model on any of them.
fn architecture_mismatch(model: &ModelConfig, config: &ModelConfig) -> Option<(&'static str, String)> {
    macro_rules! same {
        ($($f:ident),*) => {$(
            if model.$f != config.$f {
                return Some((stringify!($f), format!("{:?} in the model, {:?} in the config", model.$f, config.$f)));
            }
        )*};
    }
    same!(
        ntoken,
        d_model,
        nhead,
        d_hid,
        nlayers,
        nlayers_cls,
        n_cls,
        input_emb_style,
        explicit_zero_prob,
        do_mvc,
        do_dab,
        use_batch_labels,
        num_batch_labels,
        domain_spec_batchnorm,
        use_generative_training
    );
    if model.input_emb_style == InputEmbStyle::Category
        && (model.category_rows() != config.category_rows() || model.pad_value != config.pad_value)
    {
        return Some(("n_input_bins/pad_value", "the category value encoder differs".into()));
    }
    None
}

/// A module's tensors as a PyTorch state_dict under the original's key names (BatchNorm's
/// `num_batches_tracked` added); two tensors mapping to one key is an error naming `file`.
pub(crate) fn state_dict<M: ModuleSnapshot>(model: &M, file: &Path) -> Result<Vec<PtTensor>> {
    let collected = model.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true);
    let mut tensors: Vec<PtTensor> = Vec::with_capacity(collected.len() + 4);
    for t in collected {
        let name = original_key(&t.name);
        let is_running_var = name.ends_with(".running_var");
        let stem = name.trim_end_matches("running_var").to_string();
        tensors.push(PtTensor { name, dtype: t.dtype, shape: t.shape.to_vec(), data: PtData::Pack(t) });
        if is_running_var {
            // PyTorch's BatchNorm buffer; only consulted when momentum is None (never here).
            tensors.push(PtTensor {
                name: format!("{stem}num_batches_tracked"),
                dtype: DType::I64,
                shape: vec![],
                data: PtData::Bytes(0i64.to_le_bytes().to_vec()),
            });
        }
    }
    let mut seen = HashSet::new();
    if let Some(dup) = tensors.iter().map(|t| t.name.clone()).find(|n| !seen.insert(n.clone())) {
        return Err(write_err(file, format!("two tensors map to the key `{dup}`")));
    }
    Ok(tensors)
}

/// Exports `model` in the original's format: `best_model.pt` (a `torch.save`d state_dict,
/// written in pure Rust), `args.json` (from `config`) and `vocab.json` (verbatim) into `dir`,
/// atomically. The original's `load_pretrained` loads every key of the file (with
/// `use_fast_transformer=False` it renames `Wqkv.` → `in_proj_` itself); a model built with
/// `use_generative_training` also writes `flag_encoder.weight`, which the original's 0.2.4
/// model has no slot for (the released whole-human checkpoint has the same extra key).
pub fn export_original(model: &TransformerModel, config: &ModelConfig, vocab_json: &str, dir: &Path) -> Result<ExportReport> {
    config.validate_as("export_original config")?;
    if let Some((field, message)) = architecture_mismatch(&model.config, config) {
        return Err(ModelError::config("export_original config", field, message));
    }
    check_vocab(vocab_json, config).map_err(|(field, message)| ModelError::input("vocab_json", format!("`{field}`: {message}")))?;
    sync_running_stats(&batch_norms(model));

    let tensors = state_dict(model, &dir.join(ORIGINAL_WEIGHTS))?;
    let listing: Vec<(String, Vec<usize>)> = tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
    let args = serde_json::to_string_pretty(&Value::Object(original_args_json(config))).expect("args serialise") + "\n";

    write_dir_atomically(dir, &[ORIGINAL_WEIGHTS, ORIGINAL_ARGS, VOCAB_FILE], |tmp| {
        let final_weights = dir.join(ORIGINAL_WEIGHTS);
        let written = catch_unwind(AssertUnwindSafe(|| torch_zip::write_state_dict(&tmp.join(ORIGINAL_WEIGHTS), tensors)));
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(write_err(&final_weights, e.to_string())),
            Err(_) => return Err(write_err(&final_weights, "reading a tensor panicked")),
        }
        write_file(&tmp.join(ORIGINAL_ARGS), args.as_bytes()).map_err(|e| write_err(&dir.join(ORIGINAL_ARGS), e.to_string()))?;
        write_file(&tmp.join(VOCAB_FILE), vocab_json.as_bytes()).map_err(|e| write_err(&dir.join(VOCAB_FILE), e.to_string()))?;
        Ok(())
    })?;
    let weights_bytes = std::fs::metadata(dir.join(ORIGINAL_WEIGHTS)).map(|m| m.len()).unwrap_or(0);
    Ok(ExportReport { dir: dir.to_path_buf(), tensors: listing, weights_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_json_reads_back_to_the_same_config() {
        let mut c = ModelConfig::new(100, 32, 4, 48, 2).with_pad_token_id(97);
        for (style, bn, pad) in [
            (InputEmbStyle::Continuous, BatchNormStyle::Dsbn, -2.0),
            (InputEmbStyle::Category, BatchNormStyle::None, 51.0),
            (InputEmbStyle::Scaling, BatchNormStyle::BatchNorm, 0.0),
        ] {
            c.input_emb_style = style;
            c.domain_spec_batchnorm = bn;
            c.pad_value = pad;
            c.num_batch_labels = Some(3);
            c.use_batch_labels = bn == BatchNormStyle::Dsbn;
            c.cell_emb_style = CellEmbStyle::WPool;
            c.mvc_decoder_style = MvcDecoderStyle::InnerProductDetach;
            c.n_input_bins = (style == InputEmbStyle::Category).then_some(53);
            c.dropout = 0.2;
            let m = original_args_json(&c);
            let back = ModelConfig::from_args_map(&m, 100, "args.json").unwrap().with_pad_token_id(97);
            assert_eq!(back, c);
        }
        let m = original_args_json(&ModelConfig::new(10, 8, 2, 8, 1));
        assert_eq!(m["pad_value"], json!(0));
        assert_eq!(m["embsize"], json!(8));
    }

    #[test]
    fn vocab_checks() {
        let c = ModelConfig::new(4, 8, 2, 8, 1).with_pad_token_id(2);
        assert!(check_vocab(r#"{"a": 0, "b": 1, "<pad>": 2}"#, &c).is_ok());
        assert!(check_vocab(r#"{"a": 0, "b": 0}"#, &c).unwrap_err().1.contains("twice"));
        assert!(check_vocab(r#"{"a": 4}"#, &c).unwrap_err().1.contains("outside"));
        assert!(check_vocab(r#"{"<pad>": 1}"#, &c).unwrap_err().1.contains("pad_token_id"));
        assert!(check_vocab(r#"["a"]"#, &c).is_err());
        assert!(check_vocab(r#"{"a": 0"#, &c).is_err());
    }
}
