//! `ModelConfig`: the constructor arguments of the original `TransformerModel`, readable from an
//! original `args.json`.
//!
//! args.json is a dump of the training script's argparse namespace, so it carries dozens of keys
//! that are not model arguments (paths, schedule, world size) and spells some model arguments the
//! script's way (`embsize`, `nheads`, `MVC`, `DSBN`). The file is read as a JSON object and
//! each model field is looked up under every name the original scripts use; everything else is
//! ignored. Each field is checked on its own so an error names the file and the key.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// How expression values enter the embedding (`input_emb_style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputEmbStyle {
    /// `ContinuousValueEncoder`: clamp(max 512) → Linear(1,d) → ReLU → Linear(d,d) → LN → dropout,
    /// added to the gene embedding. Every shipped checkpoint uses this.
    #[serde(rename = "continuous")]
    Continuous,
    /// `CategoryValueEncoder`: the (integer) bin indexes an `Embedding(n_input_bins, d)` + LN.
    #[serde(rename = "category")]
    Category,
    /// No value encoder: the gene embedding is multiplied by the value.
    #[serde(rename = "scaling")]
    Scaling,
}

/// How the cell embedding is read off the transformer output (`cell_emb_style`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CellEmbStyle {
    /// Position 0 (the `<cls>` token).
    #[serde(rename = "cls")]
    Cls,
    /// Mean over all L positions, padding included (as the original does).
    #[serde(rename = "avg-pool")]
    AvgPool,
    /// Σ_l out_l · value_l, then L2-normalised; weights are the raw input values.
    #[serde(rename = "w-pool")]
    WPool,
}

/// Architecture of the MVC (GEPC) decoder (`mvc_decoder_style`).
///
/// Only the two inner-product styles exist here: the original's "concat query" and "sum query"
/// return a bare tensor where `forward` indexes a dict, so they cannot run through the
/// original's `forward` at all and no checkpoint uses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MvcDecoderStyle {
    #[serde(rename = "inner product")]
    InnerProduct,
    /// Same, but the gene embeddings are detached before the query projection.
    #[serde(rename = "inner product, detach")]
    InnerProductDetach,
}

/// Optional normalisation of the summed input embedding (`domain_spec_batchnorm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchNormStyle {
    #[serde(rename = "none")]
    None,
    /// `DomainSpecificBatchNorm1d(d, num_batch_labels, eps=6.1e-5, affine=False)` (`dsbn.bns.k`).
    #[serde(rename = "dsbn")]
    Dsbn,
    /// `nn.BatchNorm1d(d, eps=6.1e-5)` with affine parameters (`bn`).
    #[serde(rename = "batchnorm")]
    BatchNorm,
}

/// The arguments of the original `TransformerModel.__init__`, plus the vocabulary facts it takes
/// from the `vocab` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary size (`ntoken`); not in args.json, it comes from vocab.json.
    pub ntoken: usize,
    /// Id of `<pad>`: the gene embedding's `padding_idx`, whose row gets no gradient.
    pub pad_token_id: Option<usize>,
    /// `embsize` / `d_model`.
    pub d_model: usize,
    /// `nheads` / `nhead`.
    pub nhead: usize,
    /// Feed-forward width (`d_hid`); 512 for whole-human, not 4·d.
    pub d_hid: usize,
    /// Number of post-norm encoder layers.
    pub nlayers: usize,
    /// Layers in `ClsDecoder` (`n_layers_cls`); it has `nlayers_cls - 1` hidden blocks.
    pub nlayers_cls: usize,
    /// Classes of `cls_decoder.out_layer`.
    pub n_cls: usize,
    pub dropout: f64,
    pub pad_token: String,
    /// Value used at padded positions (−2 for continuous, `n_bins` for category).
    pub pad_value: f64,
    /// Value of masked positions (−1 continuous, `n_bins + 1` category). Not used by the model
    /// itself; kept so data code and model agree.
    pub mask_value: f64,
    pub n_bins: usize,
    /// Rows of the category value embedding; `n_bins + 2` when not given.
    pub n_input_bins: Option<usize>,
    pub input_emb_style: InputEmbStyle,
    pub cell_emb_style: CellEmbStyle,
    pub explicit_zero_prob: bool,
    pub do_mvc: bool,
    pub mvc_decoder_style: MvcDecoderStyle,
    /// Builds `grad_reverse_discriminator` (DAR objective).
    pub do_dab: bool,
    pub use_batch_labels: bool,
    pub num_batch_labels: Option<usize>,
    pub domain_spec_batchnorm: BatchNormStyle,
    pub ecs_threshold: f64,
    /// The `dev-temp` pretraining model: adds `flag_encoder` (Embedding(2, d)) and the
    /// pcpt/gen generative forward.
    pub use_generative_training: bool,
    /// Initialise every encoder layer with the same values, as the original does
    /// (`nn.TransformerEncoder` deep-copies one layer `nlayers` times; reference §1.3). Only
    /// matters when training from scratch; each layer still has its own parameters. `false`
    /// draws each layer independently. Not an args.json field.
    #[serde(default = "default_true")]
    pub identical_layer_init: bool,
}

fn default_true() -> bool {
    true
}

/// The keys each logical field may appear under in an args.json, in priority order. The first
/// is the constructor argument's name where the scripts use it, the rest are the scripts' names.
const KEYS_D_MODEL: &[&str] = &["embsize", "d_model"];
const KEYS_NHEAD: &[&str] = &["nheads", "nhead"];
const KEYS_D_HID: &[&str] = &["d_hid"];
const KEYS_NLAYERS: &[&str] = &["nlayers"];
const KEYS_NLAYERS_CLS: &[&str] = &["n_layers_cls", "nlayers_cls"];
const KEYS_N_CLS: &[&str] = &["n_cls"];
const KEYS_DROPOUT: &[&str] = &["dropout"];
const KEYS_PAD_TOKEN: &[&str] = &["pad_token"];
const KEYS_PAD_VALUE: &[&str] = &["pad_value"];
const KEYS_MASK_VALUE: &[&str] = &["mask_value"];
const KEYS_N_BINS: &[&str] = &["n_bins"];
const KEYS_N_INPUT_BINS: &[&str] = &["n_input_bins"];
const KEYS_INPUT_EMB_STYLE: &[&str] = &["input_emb_style"];
const KEYS_CELL_EMB_STYLE: &[&str] = &["cell_emb_style"];
const KEYS_EXPLICIT_ZERO_PROB: &[&str] = &["explicit_zero_prob"];
const KEYS_DO_MVC: &[&str] = &["do_mvc", "MVC", "GEPC"];
const KEYS_MVC_STYLE: &[&str] = &["mvc_decoder_style"];
const KEYS_DO_DAB: &[&str] = &["do_dab", "DAB", "DAR"];
const KEYS_USE_BATCH_LABELS: &[&str] = &["use_batch_labels"];
const KEYS_NUM_BATCH_LABELS: &[&str] = &["num_batch_labels"];
const KEYS_DSBN: &[&str] = &["domain_spec_batchnorm", "DSBN"];
const KEYS_ECS: &[&str] = &["ecs_threshold", "ecs_thres"];
const KEYS_GENERATIVE: &[&str] = &["use_generative_training", "USE_GENERATIVE_TRAINING"];
const KEYS_PRE_NORM: &[&str] = &["pre_norm"];
const KEYS_FAST_BACKEND: &[&str] = &["fast_transformer_backend"];
const KEYS_FAST: &[&str] = &["fast_transformer", "use_fast_transformer"];

impl ModelConfig {
    /// A config with the original constructor's defaults for everything but the dimensions.
    pub fn new(ntoken: usize, d_model: usize, nhead: usize, d_hid: usize, nlayers: usize) -> Self {
        Self {
            ntoken,
            pad_token_id: None,
            d_model,
            nhead,
            d_hid,
            nlayers,
            nlayers_cls: 3,
            n_cls: 1,
            dropout: 0.5,
            pad_token: "<pad>".to_string(),
            pad_value: 0.0,
            mask_value: -1.0,
            n_bins: 51,
            n_input_bins: None,
            input_emb_style: InputEmbStyle::Continuous,
            cell_emb_style: CellEmbStyle::Cls,
            explicit_zero_prob: false,
            do_mvc: false,
            mvc_decoder_style: MvcDecoderStyle::InnerProduct,
            do_dab: false,
            use_batch_labels: false,
            num_batch_labels: None,
            domain_spec_batchnorm: BatchNormStyle::None,
            ecs_threshold: 0.3,
            use_generative_training: false,
            identical_layer_init: true,
        }
    }

    /// Reads an original args.json. `ntoken` is the vocabulary size (vocab.json plus any special
    /// tokens the caller appended). The result is validated.
    pub fn from_args_json(path: impl AsRef<Path>, ntoken: usize) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        let value: Value = serde_json::from_str(&text).map_err(|e| ModelError::Json {
            path: path.to_path_buf(),
            field: "<document>".into(),
            message: e.to_string(),
        })?;
        let Value::Object(map) = value else {
            return Err(ModelError::Json {
                path: path.to_path_buf(),
                field: "<document>".into(),
                message: "expected a JSON object at the top level".into(),
            });
        };
        Self::from_args_map(&map, ntoken, &path.display().to_string())
    }

    /// Same as [`from_args_json`](Self::from_args_json) for an already-parsed object; `origin`
    /// names the source in errors.
    pub fn from_args_map(map: &Map<String, Value>, ntoken: usize, origin: &str) -> Result<Self> {
        let a = Args { map, origin };
        let mut c =
            Self::new(ntoken, a.usize_req(KEYS_D_MODEL)?, a.usize_req(KEYS_NHEAD)?, a.usize_req(KEYS_D_HID)?, a.usize_req(KEYS_NLAYERS)?);
        if let Some(v) = a.usize_opt(KEYS_NLAYERS_CLS)? {
            c.nlayers_cls = v;
        }
        if let Some(v) = a.usize_opt(KEYS_N_CLS)? {
            c.n_cls = v;
        }
        if let Some(v) = a.f64_opt(KEYS_DROPOUT)? {
            c.dropout = v;
        }
        if let Some(v) = a.str_opt(KEYS_PAD_TOKEN)? {
            c.pad_token = v.to_string();
        }
        if let Some(v) = a.f64_opt(KEYS_PAD_VALUE)? {
            c.pad_value = v;
        }
        if let Some(v) = a.f64_opt(KEYS_MASK_VALUE)? {
            c.mask_value = v;
        }
        if let Some(v) = a.usize_opt(KEYS_N_BINS)? {
            c.n_bins = v;
        }
        c.n_input_bins = a.usize_opt(KEYS_N_INPUT_BINS)?;
        if let Some((key, v)) = a.str_opt_keyed(KEYS_INPUT_EMB_STYLE)? {
            c.input_emb_style = match v {
                "continuous" => InputEmbStyle::Continuous,
                "category" => InputEmbStyle::Category,
                "scaling" => InputEmbStyle::Scaling,
                other => return Err(a.err(key, format!("unknown input_emb_style {other:?} (continuous, category, scaling)"))),
            };
        }
        if let Some((key, v)) = a.str_opt_keyed(KEYS_CELL_EMB_STYLE)? {
            c.cell_emb_style = match v {
                "cls" => CellEmbStyle::Cls,
                "avg-pool" => CellEmbStyle::AvgPool,
                "w-pool" => CellEmbStyle::WPool,
                other => return Err(a.err(key, format!("unknown cell_emb_style {other:?} (cls, avg-pool, w-pool)"))),
            };
        }
        if let Some(v) = a.bool_opt(KEYS_EXPLICIT_ZERO_PROB)? {
            c.explicit_zero_prob = v;
        }
        if let Some(v) = a.bool_opt(KEYS_DO_MVC)? {
            c.do_mvc = v;
        }
        if let Some((key, v)) = a.str_opt_keyed(KEYS_MVC_STYLE)? {
            c.mvc_decoder_style = match v {
                "inner product" => MvcDecoderStyle::InnerProduct,
                "inner product, detach" => MvcDecoderStyle::InnerProductDetach,
                "concat query" | "sum query" => {
                    return Err(a.err(
                        key,
                        format!(
                            "{v:?} is not supported: the original returns a bare tensor for it \
                             and its forward() cannot use it"
                        ),
                    ))
                }
                other => return Err(a.err(key, format!("unknown mvc_decoder_style {other:?}"))),
            };
        }
        if let Some(v) = a.bool_opt(KEYS_DO_DAB)? {
            c.do_dab = v;
        }
        if let Some(v) = a.bool_opt(KEYS_USE_BATCH_LABELS)? {
            c.use_batch_labels = v;
        }
        c.num_batch_labels = a.usize_opt(KEYS_NUM_BATCH_LABELS)?;
        if let Some((key, v)) = a.get(KEYS_DSBN)? {
            c.domain_spec_batchnorm = match v {
                Value::Bool(true) => BatchNormStyle::Dsbn,
                Value::Bool(false) => BatchNormStyle::None,
                Value::String(s) if s == "dsbn" => BatchNormStyle::Dsbn,
                Value::String(s) if s == "batchnorm" => BatchNormStyle::BatchNorm,
                // The original tests `is True or == "dsbn"` first, so "do_affine" builds no
                // normalisation at all while still demanding batch labels: refuse rather than
                // guess which of the two the user meant.
                Value::String(s) if s == "do_affine" => {
                    return Err(a.err(
                        key,
                        "\"do_affine\" builds no batch norm in the original (a bug); use true, \
                         \"dsbn\" or \"batchnorm\"",
                    ))
                }
                other => return Err(a.err(key, format!("expected true/false, \"dsbn\" or \"batchnorm\", got {other}"))),
            };
        }
        if let Some(v) = a.f64_opt(KEYS_ECS)? {
            c.ecs_threshold = v;
        }
        if let Some(v) = a.bool_opt(KEYS_GENERATIVE)? {
            c.use_generative_training = v;
        }
        if let Some((key, true)) = a.bool_opt_keyed(KEYS_PRE_NORM)? {
            return Err(a.err(key, "pre-norm layers are not supported (no checkpoint uses them)"));
        }
        let fast = a.bool_opt(KEYS_FAST)?.unwrap_or(false);
        if let Some((key, backend)) = a.str_opt_keyed(KEYS_FAST_BACKEND)? {
            if fast && backend == "linear" {
                return Err(a.err(key, "the linear-attention backend (fast_transformers) is not supported"));
            }
        }
        c.validate_as(origin)?;
        Ok(c)
    }

    /// Builder-style setter for the `<pad>` id.
    pub fn with_pad_token_id(mut self, id: usize) -> Self {
        self.pad_token_id = Some(id);
        self
    }

    /// Rows of the category value embedding.
    pub fn category_rows(&self) -> usize {
        self.n_input_bins.unwrap_or(self.n_bins + 2)
    }

    /// Checks the combination of fields; `Err` names the offending field.
    pub fn validate(&self) -> Result<()> {
        self.validate_as("<code>")
    }

    pub(crate) fn validate_as(&self, origin: &str) -> Result<()> {
        let err = |field: &str, msg: String| Err(ModelError::config(origin, field, msg));
        check_transformer(origin, self.ntoken, self.pad_token_id, [self.d_model, self.nhead, self.d_hid, self.nlayers], self.dropout)?;
        if self.nlayers_cls == 0 {
            return err("n_layers_cls", "must be >= 1".into());
        }
        if self.n_cls == 0 {
            return err("n_cls", "must be >= 1".into());
        }
        if self.input_emb_style == InputEmbStyle::Category {
            let rows = self.category_rows();
            if self.pad_value < 0.0 || self.pad_value.fract() != 0.0 || self.pad_value >= rows as f64 {
                return err(
                    "pad_value",
                    format!(
                        "category input needs an integer pad_value in [0, {rows}) (the original \
                         scripts use n_bins = {}), got {}",
                        self.n_bins, self.pad_value
                    ),
                );
            }
        }
        // Plain batchnorm demands labels at forward time but never reads them, so it does
        // not need a label count.
        let needs_batches = self.use_batch_labels || self.do_dab || self.domain_spec_batchnorm == BatchNormStyle::Dsbn;
        if needs_batches && self.num_batch_labels.unwrap_or(0) == 0 {
            return err("num_batch_labels", "must be >= 1 when use_batch_labels, DSBN or DAB is on".into());
        }
        Ok(())
    }
}

/// Typed lookups over the args.json object.
struct Args<'a> {
    map: &'a Map<String, Value>,
    origin: &'a str,
}

impl<'a> Args<'a> {
    fn err(&self, field: &str, message: impl Into<String>) -> ModelError {
        ModelError::config(self.origin, field, message)
    }

    /// The first non-null value among `keys`; two aliases with different values are an error
    /// because there is no way to tell which one the run used.
    fn get(&self, keys: &[&'static str]) -> Result<Option<(&'static str, &'a Value)>> {
        let mut found: Option<(&'static str, &'a Value)> = None;
        for &k in keys {
            match (self.map.get(k), found) {
                (None | Some(Value::Null), _) => {}
                (Some(v), None) => found = Some((k, v)),
                (Some(v), Some((k0, v0))) if v != v0 => {
                    return Err(self.err(k, format!("conflicts with `{k0}` ({v} vs {v0}); both name the same argument")))
                }
                _ => {}
            }
        }
        Ok(found)
    }

    fn usize_opt(&self, keys: &[&'static str]) -> Result<Option<usize>> {
        match self.get(keys)? {
            None => Ok(None),
            Some((k, v)) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                // Python writes 512.0 for a float-typed argparse default; accept whole floats.
                None => match v.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 => Ok(Some(f as usize)),
                    _ => Err(self.err(k, format!("expected a non-negative integer, got {v}"))),
                },
            },
        }
    }

    fn usize_req(&self, keys: &[&'static str]) -> Result<usize> {
        self.usize_opt(keys)?.ok_or_else(|| self.err(keys[0], format!("required, not found (also looked for {keys:?})")))
    }

    fn f64_opt(&self, keys: &[&'static str]) -> Result<Option<f64>> {
        match self.get(keys)? {
            None => Ok(None),
            Some((k, v)) => v.as_f64().map(Some).ok_or_else(|| self.err(k, format!("expected a number, got {v}"))),
        }
    }

    fn bool_opt_keyed(&self, keys: &[&'static str]) -> Result<Option<(&'static str, bool)>> {
        match self.get(keys)? {
            None => Ok(None),
            Some((k, Value::Bool(b))) => Ok(Some((k, *b))),
            Some((k, v)) => Err(self.err(k, format!("expected true or false, got {v}"))),
        }
    }

    fn bool_opt(&self, keys: &[&'static str]) -> Result<Option<bool>> {
        Ok(self.bool_opt_keyed(keys)?.map(|(_, b)| b))
    }

    fn str_opt_keyed(&self, keys: &[&'static str]) -> Result<Option<(&'static str, &'a str)>> {
        match self.get(keys)? {
            None => Ok(None),
            Some((k, Value::String(s))) => Ok(Some((k, s.as_str()))),
            Some((k, v)) => Err(self.err(k, format!("expected a string, got {v}"))),
        }
    }

    fn str_opt(&self, keys: &[&'static str]) -> Result<Option<&'a str>> {
        Ok(self.str_opt_keyed(keys)?.map(|(_, s)| s))
    }
}

/// The checks every transformer here shares: vocabulary, pad token, dimensions
/// (`[d_model, nhead, d_hid, nlayers]`), heads dividing the width, dropout. `Err` names the
/// field as the original's `args.json` spells it.
pub(crate) fn check_transformer(origin: &str, ntoken: usize, pad_token_id: Option<usize>, dims: [usize; 4], dropout: f64) -> Result<()> {
    let err = |field: &str, msg: String| Err(ModelError::config(origin, field, msg));
    let [d_model, nhead, d_hid, nlayers] = dims;
    if ntoken == 0 {
        return err("ntoken", "vocabulary size must be > 0".into());
    }
    if let Some(p) = pad_token_id {
        if p >= ntoken {
            return err("pad_token_id", format!("{p} is outside the vocabulary of {ntoken}"));
        }
    }
    if d_model == 0 || nhead == 0 || d_hid == 0 || nlayers == 0 {
        return err("embsize/nheads/d_hid/nlayers", "dimensions must be > 0".into());
    }
    if !d_model.is_multiple_of(nhead) {
        return err("nheads", format!("embsize {d_model} is not divisible by nheads {nhead}"));
    }
    if !(0.0..1.0).contains(&dropout) {
        return err("dropout", format!("{dropout} is not in [0, 1)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole_human_args() -> Map<String, Value> {
        // The whole-human args.json (reference §1.11), abridged to a representative subset of
        // its non-model keys.
        let v: Value = serde_json::from_str(
            r#"{
            "data_source": "/scratch/ssd004/datasets/cellxgene/scb_strict/human",
            "save_dir": "/scratch/hdd001/home/haotian/cellxgene_census_human-May23-08-36-2023",
            "load_model": null, "n_hvg": null, "valid_size_or_ratio": 0.003,
            "dist_backend": "nccl", "grad_accu_steps": 1, "pad_token": "<pad>",
            "input_style": "binned", "input_emb_style": "continuous", "n_bins": 51,
            "max_seq_len": 1200, "training_tasks": "both", "mask_ratio": [0.25, 0.5, 0.75],
            "trunc_by_sample": true, "batch_size": 32, "eval_batch_size": 64, "epochs": 6,
            "lr": 0.0001, "scheduler_interval": 100, "scheduler_factor": 0.99,
            "warmup_ratio_or_step": 10000.0, "no_cls": true, "no_cce": true, "fp16": true,
            "fast_transformer": true, "nlayers": 12, "nheads": 8, "embsize": 512, "d_hid": 512,
            "dropout": 0.2, "n_layers_cls": 3, "log_interval": 9000, "save_interval": 27000,
            "mask_value": -1, "pad_value": -2, "USE_CLS": false, "USE_CCE": false, "MVC": true,
            "USE_GENERATIVE_TRAINING": true, "world_size": 16, "distributed": true, "rank": 0,
            "local_rank": 0, "gpu": 0, "dist_url": "tcp://gpu183.cluster.local:53833",
            "n_cls": 1, "DAB": false
        }"#,
        )
        .unwrap();
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn reads_whole_human_args() {
        let c = ModelConfig::from_args_map(&whole_human_args(), 60697, "args.json").unwrap();
        assert_eq!((c.d_model, c.nhead, c.d_hid, c.nlayers), (512, 8, 512, 12));
        assert_eq!(c.nlayers_cls, 3);
        assert_eq!(c.n_cls, 1);
        assert_eq!(c.pad_value, -2.0);
        assert_eq!(c.mask_value, -1.0);
        assert!(c.do_mvc && c.use_generative_training && !c.do_dab);
        assert_eq!(c.input_emb_style, InputEmbStyle::Continuous);
        assert_eq!(c.domain_spec_batchnorm, BatchNormStyle::None);
        assert_eq!(c.dropout, 0.2);
    }

    #[test]
    fn errors_name_file_and_field() {
        let mut m = whole_human_args();
        m.insert("nheads".into(), Value::String("8".into()));
        let e = ModelConfig::from_args_map(&m, 10, "/x/args.json").unwrap_err().to_string();
        assert!(e.contains("/x/args.json") && e.contains("`nheads`"), "{e}");

        let mut m = whole_human_args();
        m.remove("embsize");
        let e = ModelConfig::from_args_map(&m, 10, "a.json").unwrap_err().to_string();
        assert!(e.contains("`embsize`") && e.contains("required"), "{e}");

        let mut m = whole_human_args();
        m.insert("nheads".into(), Value::from(7));
        let e = ModelConfig::from_args_map(&m, 10, "a.json").unwrap_err().to_string();
        assert!(e.contains("divisible"), "{e}");
    }

    #[test]
    fn dsbn_and_aliases() {
        let mut m = whole_human_args();
        m.insert("DSBN".into(), Value::Bool(true));
        let e = ModelConfig::from_args_map(&m, 10, "a.json").unwrap_err().to_string();
        assert!(e.contains("num_batch_labels"), "{e}");
        m.insert("num_batch_labels".into(), Value::from(2));
        let c = ModelConfig::from_args_map(&m, 10, "a.json").unwrap();
        assert_eq!(c.domain_spec_batchnorm, BatchNormStyle::Dsbn);
        m.insert("domain_spec_batchnorm".into(), Value::String("batchnorm".into()));
        let e = ModelConfig::from_args_map(&m, 10, "a.json").unwrap_err().to_string();
        assert!(e.contains("conflicts"), "{e}");
    }

    #[test]
    fn category_pad_value_checked() {
        let mut m = whole_human_args();
        m.insert("input_emb_style".into(), Value::String("category".into()));
        let e = ModelConfig::from_args_map(&m, 10, "a.json").unwrap_err().to_string();
        assert!(e.contains("pad_value"), "{e}");
        m.insert("pad_value".into(), Value::from(51));
        let c = ModelConfig::from_args_map(&m, 10, "a.json").unwrap();
        assert_eq!(c.category_rows(), 53);
    }

    #[test]
    fn config_round_trips_through_serde() {
        let c = ModelConfig::from_args_map(&whole_human_args(), 60697, "a.json").unwrap();
        let s = serde_json::to_string(&c).unwrap();
        let back: ModelConfig = serde_json::from_str(&s).unwrap();
        assert_eq!(c, back);
    }
}
