//! What the training loop needs of the model behind a task, so the loop is written once for
//! the `TransformerModel` (pretraining, annotation, integration) and the perturbation
//! `TransformerGenerator`: the FLOP shape, the classifier width a resumed run checks, its
//! `args.json`, the native checkpoint (exact resume), the original's format for
//! `best_model/`, and how a run builds it (fresh from `[model]`, or `init_from`).

use std::path::Path;

use anyhow::Context;
use scgpt_data::vocab::GeneVocab;
use scgpt_model::burn::module::Module;
use scgpt_model::burn::tensor::Device;
use scgpt_model::io::perturbation_checkpoint::{export_perturbation, load_native_perturbation, save_native_perturbation};
use scgpt_model::{PerturbationConfig, TransformerGenerator, TransformerModel};
use serde_json::{Map, Value};

use crate::config::TrainConfig;
use crate::init::{InitModel, Shape};
use crate::tasks::ModelShape;

pub trait EngineModel: Module + Clone + Send + Sized + 'static {
    /// Encoder sizes for the FLOP count.
    fn shape(&self) -> ModelShape;
    /// Classifier width (1 without a classifier).
    fn n_cls(&self) -> usize;
    /// The run directory's `args.json`.
    fn args_json(&self) -> Map<String, Value>;
    fn save_native(&self, vocab_json: &str, dir: &Path) -> anyhow::Result<()>;
    /// The model and its `vocab.json` from a native checkpoint directory.
    fn load_native(dir: &Path, device: &Device) -> anyhow::Result<(Self, String)>;
    /// `best_model/`'s weights and arguments in the original's format.
    fn export_original(&self, vocab_json: &str, dir: &Path) -> anyhow::Result<()>;
    /// The transformer whose `<cls>` embeddings pretraining's embedding metrics read.
    fn as_transformer(&self) -> Option<&TransformerModel> {
        None
    }
    /// The model computing training steps with `mode` (`run.attention`; not part of a checkpoint).
    fn with_attention(self, mode: scgpt_model::layers::AttentionMode) -> Self;
    /// The run's model: fresh from `[model]` over the data's genes, or `model.init_from`.
    fn init(cfg: &TrainConfig, data_vocabs: &[&GeneVocab], shape: Shape, device: &Device) -> anyhow::Result<InitModel<Self>>;
}

impl EngineModel for TransformerModel {
    fn with_attention(self, mode: scgpt_model::layers::AttentionMode) -> Self {
        TransformerModel::with_attention(self, mode)
    }
    fn shape(&self) -> ModelShape {
        ModelShape { d: self.config.d_model, d_hid: self.config.d_hid, layers: self.config.nlayers }
    }
    fn n_cls(&self) -> usize {
        self.config.n_cls
    }
    fn args_json(&self) -> Map<String, Value> {
        scgpt_model::io::checkpoint::original_args_json(&self.config)
    }
    fn save_native(&self, vocab_json: &str, dir: &Path) -> anyhow::Result<()> {
        Ok(scgpt_model::save_native(self, vocab_json, dir)?)
    }
    fn load_native(dir: &Path, device: &Device) -> anyhow::Result<(Self, String)> {
        let ck = scgpt_model::load_native(dir, device)?;
        Ok((ck.model, ck.vocab_json))
    }
    fn export_original(&self, vocab_json: &str, dir: &Path) -> anyhow::Result<()> {
        scgpt_model::export_original(self, &self.config, vocab_json, dir)?;
        Ok(())
    }
    fn as_transformer(&self) -> Option<&TransformerModel> {
        Some(self)
    }
    fn init(cfg: &TrainConfig, data_vocabs: &[&GeneVocab], shape: Shape, device: &Device) -> anyhow::Result<InitModel<Self>> {
        if cfg.model.init_from.is_empty() {
            crate::init::fresh(cfg, crate::init::union_vocab(data_vocabs), shape, device)
        } else {
            crate::init::from_checkpoint(cfg, Path::new(&cfg.model.init_from), data_vocabs, shape, device)
        }
    }
}

impl EngineModel for TransformerGenerator {
    fn with_attention(self, mode: scgpt_model::layers::AttentionMode) -> Self {
        TransformerGenerator::with_attention(self, mode)
    }
    fn shape(&self) -> ModelShape {
        ModelShape { d: self.config.d_model, d_hid: self.config.d_hid, layers: self.config.nlayers }
    }
    fn n_cls(&self) -> usize {
        self.config.n_cls
    }
    fn args_json(&self) -> Map<String, Value> {
        match serde_json::to_value(&self.config).expect("config serialises") {
            Value::Object(m) => m,
            _ => unreachable!("a struct serialises to an object"),
        }
    }
    fn save_native(&self, vocab_json: &str, dir: &Path) -> anyhow::Result<()> {
        Ok(save_native_perturbation(self, vocab_json, dir)?)
    }
    fn load_native(dir: &Path, device: &Device) -> anyhow::Result<(Self, String)> {
        Ok(load_native_perturbation(dir, device)?)
    }
    fn export_original(&self, vocab_json: &str, dir: &Path) -> anyhow::Result<()> {
        Ok(export_perturbation(self, vocab_json, dir)?)
    }
    /// Fresh: the `[model]` sizes over the data's genes. `init_from` an original (or this
    /// project's) `TransformerModel` checkpoint folder: its sizes, vocabulary, and the
    /// tutorial's `load_param_prefixs` (`model.init_prefixes`, default encoder, value encoder,
    /// transformer), as Tutorial_Perturbation builds its generator from the whole-human model.
    fn init(cfg: &TrainConfig, data_vocabs: &[&GeneVocab], _shape: Shape, device: &Device) -> anyhow::Result<InitModel<Self>> {
        let m = &cfg.model;
        let (config, vocab, source) = if m.init_from.is_empty() {
            let vocab = crate::init::union_vocab(data_vocabs);
            (PerturbationConfig::new(vocab.len(), m.embsize, m.nheads, m.d_hid, m.nlayers), vocab, None)
        } else {
            let dir = Path::new(&m.init_from);
            let mut vocab =
                GeneVocab::from_file(&dir.join("vocab.json")).with_context(|| format!("model.init_from = {}", dir.display()))?;
            vocab.ensure_specials();
            let pretrained = scgpt_model::ModelConfig::from_args_json(dir.join("args.json"), vocab.len())?;
            (PerturbationConfig::tutorial(&pretrained), vocab, Some(dir.join("best_model.pt")))
        };
        let pad = vocab.pad_id().context("the model vocabulary has no <pad>")? as usize;
        let mut config = config.with_pad_token_id(pad);
        config.dropout = m.dropout;
        config.nlayers_cls = m.n_layers_cls;
        config.identical_layer_init = m.identical_layer_init;
        let mut model = config.init(device)?;
        let mut notes = vec![format!(
            "model: perturbation generator, vocabulary {} tokens, d {}, {} layers",
            vocab.len(),
            config.d_model,
            config.nlayers
        )];
        if let Some(path) = source {
            let prefixes: Vec<String> = if m.init_prefixes.is_empty() {
                scgpt_model::TUTORIAL_LOAD_PREFIXES.iter().map(|s| s.to_string()).collect()
            } else {
                m.init_prefixes.clone()
            };
            let refs: Vec<&str> = prefixes.iter().map(String::as_str).collect();
            let report = model.load_pretrained_prefixes(&path, &refs)?;
            notes.push(format!(
                "model: {} tensors loaded under {} from {} ({} missing)",
                report.loaded.len(),
                prefixes.join(", "),
                path.display(),
                report.missing.len()
            ));
        }
        Ok(InitModel { model, vocab, notes })
    }
}
