//! Loading the original's checkpoints (`best_model.pt`) into a [`TransformerModel`].
//!
//! Mirrors the original `scgpt.utils.load_pretrained(model, torch.load(path), strict=False)`:
//! keys are renamed to the model's names, and a tensor is loaded only when the model has a
//! parameter of that name *and the same shape*; everything else is reported, not fatal. Unlike
//! the original, the model's encoder (`encoder.*`) and transformer (`transformer_encoder.*`)
//! must be fully covered: a checkpoint that silently leaves the attention weights random (the
//! original's issue #235) is an error here.
//!
//! Renaming, applied to every key in this order:
//! 1. A wrapping dict is unwrapped: `state_dict.`, `model_state_dict.`, `model.` prefixes (the
//!    reader flattens nested dicts into dotted keys) and DDP's `module.` prefix.
//! 2. scgpt 0.2.5's flash-attn compat wrapper: `self_attn._impl.` → `self_attn.`.
//! 3. PyTorch `nn.MultiheadAttention` names: `self_attn.in_proj_{weight,bias}` →
//!    `self_attn.Wqkv.{weight,bias}`. The two layouts are identical ([Q;K;V] row blocks, heads
//!    contiguous inside each), so this is a pure rename.
//! 4. Sequential indices: the model stores only the parameter-holding children of
//!    `decoder.fc`/`decoder.zero_logit` (PyTorch 0,2,4 → 0,1,2) and of the heads' `_decoder`
//!    lists (PyTorch 3i → 2i for the Linear, 3i+2 → 2i+1 for the LayerNorm).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore};
use burn::tensor::DType;

use crate::error::{ModelError, Result};
use crate::model::TransformerModel;

/// A checkpoint key that was not loaded, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedKey {
    /// The key as stored in the file.
    pub key: String,
    /// The model name it was renamed to (same as `key` when no rule applied).
    pub name: String,
    pub reason: String,
}

/// What `load_pretrained` did, by name. Names are the model's PyTorch-style names
/// (`transformer_encoder.layers.0.self_attn.Wqkv.weight`, `decoder.fc.1.bias`).
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub path: PathBuf,
    /// Model parameters that received a tensor from the file.
    pub loaded: Vec<String>,
    /// (file key, model name) for every loaded key that needed renaming.
    pub renamed: Vec<(String, String)>,
    /// File tensors not loaded: not in the model, or a different shape.
    pub skipped: Vec<SkippedKey>,
    /// Model parameters the file had nothing for; they keep their initial values.
    pub missing: Vec<String>,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: loaded {} tensors ({} renamed), skipped {}, missing {}",
            self.path.display(),
            self.loaded.len(),
            self.renamed.len(),
            self.skipped.len(),
            self.missing.len()
        )?;
        for s in &self.skipped {
            writeln!(f, "  skipped {} ({})", s.key, s.reason)?;
        }
        for m in &self.missing {
            writeln!(f, "  missing {m} (keeps its initial value)")?;
        }
        Ok(())
    }
}

/// Prefixes that wrap a state_dict inside a training checkpoint or a DDP model.
const CONTAINER_PREFIXES: &[&str] = &["module.", "state_dict.", "model_state_dict.", "model."];

/// Maps a checkpoint key to the model's parameter name (rules 1-4 in the module docs).
pub fn normalize_key(key: &str) -> String {
    let mut k = key;
    'strip: loop {
        for p in CONTAINER_PREFIXES {
            if let Some(rest) = k.strip_prefix(p) {
                if !rest.is_empty() {
                    k = rest;
                    continue 'strip;
                }
            }
        }
        break;
    }
    let mut k = k.replace("self_attn._impl.", "self_attn.");
    for (from, to) in [("self_attn.in_proj_weight", "self_attn.Wqkv.weight"), ("self_attn.in_proj_bias", "self_attn.Wqkv.bias")] {
        if let Some(stem) = k.strip_suffix(from) {
            k = format!("{stem}{to}");
        }
    }
    map_sequential_index(&k)
}

/// Sequential/ModuleList containers whose PyTorch indices count parameter-free children:
/// (list prefix, period of the repeating block, positions with parameters inside a block).
const SEQUENTIAL_LISTS: &[(&str, usize, &[usize])] = &[
    ("decoder.fc.", 2, &[0]),
    ("decoder.zero_logit.", 2, &[0]),
    ("cls_decoder._decoder.", 3, &[0, 2]),
    ("grad_reverse_discriminator._decoder.", 3, &[0, 2]),
    // The perturbation model's AffineExprDecoder holds two ExprDecoders.
    ("decoder.coeff_decoder.fc.", 2, &[0]),
    ("decoder.coeff_decoder.zero_logit.", 2, &[0]),
    ("decoder.bias_decoder.fc.", 2, &[0]),
    ("decoder.bias_decoder.zero_logit.", 2, &[0]),
];

/// The inverse of [`normalize_key`]'s index rule: a model name (`decoder.fc.1.weight`,
/// `cls_decoder._decoder.3.bias`) → the original's state_dict key (`decoder.fc.2.weight`,
/// `cls_decoder._decoder.5.bias`). Every other name is already the original's (flash naming,
/// `self_attn.Wqkv.*`).
pub fn original_key(name: &str) -> String {
    for &(prefix, period, positions) in SEQUENTIAL_LISTS {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some((idx, tail)) = rest.split_once('.') else {
            continue;
        };
        let Ok(j) = idx.parse::<usize>() else {
            continue;
        };
        let i = (j / positions.len()) * period + positions[j % positions.len()];
        return format!("{prefix}{i}.{tail}");
    }
    name.to_string()
}

/// Rule 4: PyTorch Sequential/ModuleList index → index among the parameter-holding children.
fn map_sequential_index(k: &str) -> String {
    for &(prefix, period, positions) in SEQUENTIAL_LISTS {
        let Some(rest) = k.strip_prefix(prefix) else {
            continue;
        };
        let Some((idx, tail)) = rest.split_once('.') else {
            continue;
        };
        let Ok(i) = idx.parse::<usize>() else {
            continue;
        };
        let Some(slot) = positions.iter().position(|&p| p == i % period) else {
            // A parameter-free position (an activation): leave it so it shows up as skipped.
            return k.to_string();
        };
        let j = (i / period) * positions.len() + slot;
        return format!("{prefix}{j}.{tail}");
    }
    k.to_string()
}

/// Every tensor the model holds, under its PyTorch-style name (the name `normalize_key` maps a
/// checkpoint key to) with its PyTorch-layout shape (`[out, in]` for Linear weights).
pub fn model_param_shapes(model: &TransformerModel) -> BTreeMap<String, Vec<usize>> {
    module_param_shapes(model)
}

/// [`model_param_shapes`] for any module (the perturbation model, a single layer).
pub fn module_param_shapes<M: ModuleSnapshot>(model: &M) -> BTreeMap<String, Vec<usize>> {
    model.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true).into_iter().map(|t| (t.name.clone(), t.shape.to_vec())).collect()
}

/// The parameters a usable model cannot do without.
fn is_required(name: &str) -> bool {
    name.starts_with("encoder.") || name.starts_with("transformer_encoder.")
}

fn checkpoint_err(path: &Path, message: impl Into<String>) -> ModelError {
    ModelError::Checkpoint { path: path.to_path_buf(), message: message.into() }
}

/// Reads every tensor of a PyTorch `.pt` (zip or legacy format) lazily. Any failure, including
/// a panic inside the reader on malformed input, becomes an error naming the file.
fn read_checkpoint(path: &Path) -> Result<Vec<PackTensor>> {
    let meta = std::fs::metadata(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    if !meta.is_file() {
        return Err(checkpoint_err(path, "not a regular file"));
    }
    let read = catch_unwind(AssertUnwindSafe(|| {
        // Index renumbering is ours (rule 4): burn's blanket renumbering would also close gaps
        // in e.g. `transformer_encoder.layers`, hiding a checkpoint that lacks a layer.
        let mut store = PytorchStore::from_file(path).map_indices_contiguous(false);
        store.get_all_tensors().map(|m| m.values().cloned().collect::<Vec<_>>()).map_err(|e| e.to_string())
    }));
    let tensors = match read {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(checkpoint_err(path, format!("not a readable PyTorch checkpoint (truncated or corrupt?): {e}"))),
        Err(_) => return Err(checkpoint_err(path, "the PyTorch reader failed on malformed data (truncated or corrupt file?)")),
    };
    if tensors.is_empty() {
        return Err(checkpoint_err(path, "contains no tensors"));
    }
    Ok(tensors)
}

/// Loads an original checkpoint into `model` by name and shape. See the module docs for the
/// renaming rules. On error the model is left unchanged.
pub fn load_pretrained(model: &mut TransformerModel, path: impl AsRef<Path>) -> Result<LoadReport> {
    // Asked of the device, not of a parameter: reading a lazily initialised parameter would
    // materialise a random 60697×512 table only to overwrite it.
    let dtype = float_dtype_of(&model.encoder.embedding.weight.lazy_device());
    load_module(model, path.as_ref(), dtype, &|_| None, &is_required)
}

/// [`load_pretrained`] restricted to checkpoint tensors whose (renamed) name starts with one of
/// `prefixes` (the original's `load_param_prefixs`); empty `prefixes` loads everything that
/// matches by name and shape.
pub fn load_pretrained_prefixes(model: &mut TransformerModel, path: impl AsRef<Path>, prefixes: &[String]) -> Result<LoadReport> {
    let dtype = float_dtype_of(&model.encoder.embedding.weight.lazy_device());
    let exclude = |name: &str| {
        (!prefixes.is_empty() && !prefixes.iter().any(|p| name == p || name.starts_with(&format!("{p}."))))
            .then(|| format!("not under the init prefixes {prefixes:?}"))
    };
    load_module(model, path.as_ref(), dtype, &exclude, &is_required)
}

/// The float dtype parameters get on `device`.
pub(crate) fn float_dtype_of(device: &burn::tensor::Device) -> DType {
    device.settings().float_dtype.into()
}

/// The loader behind [`load_pretrained`], for any module with PyTorch-style field names.
///
/// `exclude(name)` returns a reason to leave a (renamed) checkpoint key out, e.g. a prefix
/// filter; `required(name)` marks model parameters that must be loaded. Everything is checked
/// before the model is touched, and the file's tensors are cast to `dtype`.
pub(crate) fn load_module<M: ModuleSnapshot>(
    model: &mut M,
    path: &Path,
    dtype: DType,
    exclude: &dyn Fn(&str) -> Option<String>,
    required: &dyn Fn(&str) -> bool,
) -> Result<LoadReport> {
    let tensors = read_checkpoint(path)?;
    let shapes = module_param_shapes(model);

    let mut report = LoadReport { path: path.to_path_buf(), ..Default::default() };
    let mut chosen: HashMap<String, (String, PackTensor)> = HashMap::new();
    let mut keys: Vec<PackTensor> = tensors;
    keys.sort_by(|a, b| a.name.cmp(&b.name));
    for mut t in keys {
        let key = t.name.clone();
        let name = normalize_key(&key);
        let skip = |reason: String| SkippedKey { key: key.clone(), name: name.clone(), reason };
        if let Some(reason) = exclude(&name) {
            report.skipped.push(skip(reason));
            continue;
        }
        match shapes.get(&name) {
            None => report.skipped.push(skip("not a parameter of this model".into())),
            Some(want) if *want != t.shape.to_vec() => {
                report.skipped.push(skip(format!("shape {:?} in the file, the model has {:?}", t.shape.to_vec(), want)))
            }
            Some(_) if !t.dtype.is_float() => report.skipped.push(skip(format!("{:?} data where the model holds floats", t.dtype))),
            Some(_) => {
                if let Some((other, _)) = chosen.get(&name) {
                    return Err(checkpoint_err(path, format!("keys `{other}` and `{key}` both map to `{name}`")));
                }
                t.name = name.clone();
                chosen.insert(name, (key, t));
            }
        }
    }

    let required_gaps: Vec<String> = shapes
        .keys()
        .filter(|n| required(n) && !chosen.contains_key(*n))
        .map(|n| match report.skipped.iter().find(|s| &s.name == n) {
            Some(s) => format!("{n} ({})", s.reason),
            None => format!("{n} (absent)"),
        })
        .collect();
    if !required_gaps.is_empty() {
        return Err(ModelError::RequiredKeys { path: path.to_path_buf(), keys: required_gaps });
    }

    // Load into the model's own float dtype whatever the file stores (fp16/fp64 checkpoints).
    let adapter: Box<dyn ModuleAdapter> = Box::new(PyTorchToBurnAdapter.chain(FloatCastAdapter::to(dtype)));
    let mut names: BTreeSet<String> = BTreeSet::new();
    let mut to_apply = Vec::with_capacity(chosen.len());
    for (name, (key, t)) in chosen {
        // Read the data now so that a damaged file fails here, before the model is touched.
        let read = catch_unwind(AssertUnwindSafe(|| t.into_parts()));
        let (n, dt, shape, id, bytes) = match read {
            Ok(Ok(parts)) => parts,
            Ok(Err(e)) => return Err(checkpoint_err(path, format!("cannot read the data of `{key}`: {e}"))),
            Err(_) => return Err(checkpoint_err(path, format!("reading the data of `{key}` failed (truncated or corrupt file?)"))),
        };
        to_apply.push(PackTensor::new(n, dt, shape, id, bytes));
        if key != name {
            report.renamed.push((key, name.clone()));
        }
        names.insert(name);
    }
    report.renamed.sort();

    let result = model.apply(to_apply, None, Some(adapter), true);
    if !result.errors.is_empty() {
        // Unreachable in practice: names, shapes and dtype kinds were all checked above.
        let msgs: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
        return Err(checkpoint_err(path, format!("could not load: {}", msgs.join("; "))));
    }

    report.loaded = names.iter().cloned().collect();
    report.missing = shapes.keys().filter(|n| !names.contains(*n)).cloned().collect();
    report.skipped.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_normalisation() {
        let cases = [
            ("encoder.embedding.weight", "encoder.embedding.weight"),
            ("module.encoder.embedding.weight", "encoder.embedding.weight"),
            ("state_dict.module.decoder.fc.4.bias", "decoder.fc.2.bias"),
            ("model.transformer_encoder.layers.3.self_attn.in_proj_weight", "transformer_encoder.layers.3.self_attn.Wqkv.weight"),
            ("transformer_encoder.layers.0.self_attn._impl.Wqkv.bias", "transformer_encoder.layers.0.self_attn.Wqkv.bias"),
            ("transformer_encoder.layers.0.self_attn._impl.out_proj.weight", "transformer_encoder.layers.0.self_attn.out_proj.weight"),
            ("transformer_encoder.layers.11.self_attn.in_proj_bias", "transformer_encoder.layers.11.self_attn.Wqkv.bias"),
            ("decoder.zero_logit.2.weight", "decoder.zero_logit.1.weight"),
            ("cls_decoder._decoder.0.weight", "cls_decoder._decoder.0.weight"),
            ("cls_decoder._decoder.2.bias", "cls_decoder._decoder.1.bias"),
            ("cls_decoder._decoder.3.weight", "cls_decoder._decoder.2.weight"),
            ("cls_decoder._decoder.5.weight", "cls_decoder._decoder.3.weight"),
            ("grad_reverse_discriminator._decoder.5.bias", "grad_reverse_discriminator._decoder.3.bias"),
            ("cls_decoder.out_layer.weight", "cls_decoder.out_layer.weight"),
            ("dsbn.bns.3.running_mean", "dsbn.bns.3.running_mean"),
            ("flag_encoder.weight", "flag_encoder.weight"),
        ];
        for (from, to) in cases {
            assert_eq!(normalize_key(from), to, "{from}");
        }
    }
}
