//! Where a run's model and vocabulary come from: a fresh model from the `[model]` section, or
//! `init_from` an original checkpoint folder or a native checkpoint (continual pretraining),
//! with the vocabulary extended by the data's new genes (old ids and rows kept, new rows drawn
//! as the original's `init_weights`: U(−0.1, 0.1)).

use std::path::Path;

use anyhow::{bail, Context};
use scgpt_data::vocab::GeneVocab;
use scgpt_model::burn::module::Param;
use scgpt_model::burn::tensor::{Device, Distribution, Tensor};
use scgpt_model::{load_native, load_pretrained, ModelConfig, TransformerModel};

use crate::config::TrainConfig;

pub struct InitModel {
    pub model: TransformerModel,
    pub vocab: GeneVocab,
    /// Human-readable lines about what was loaded (printed by rank 0).
    pub notes: Vec<String>,
}

/// The model vocabulary for fresh runs: the first set's, extended with the genes of the others.
pub fn union_vocab(sets: &[&GeneVocab]) -> GeneVocab {
    let mut v = sets[0].clone();
    for s in &sets[1..] {
        v.extend(s.tokens().iter().map(String::as_str).filter(|t| s.is_gene(t)));
    }
    v.ensure_specials();
    v
}

/// What the run's objective decides about the architecture: the generative flag encoder, the
/// dropout and, with a CLS objective, the classifier's width (`n_cls` = the run's classes).
fn apply_objective(cfg: &TrainConfig, mut c: ModelConfig, n_cls: usize) -> ModelConfig {
    c.use_generative_training = cfg.train.objective == "generative";
    c.dropout = cfg.model.dropout;
    if cfg.train.cls {
        c.n_cls = n_cls;
    }
    c
}

/// Builds the `[model]` section into a fresh model over `vocab` (`n_cls` classes when the
/// run has a CLS objective).
pub fn fresh(cfg: &TrainConfig, vocab: GeneVocab, n_cls: usize, device: &Device) -> anyhow::Result<InitModel> {
    let args = cfg.args_json();
    let config = ModelConfig::from_args_map(&args, vocab.len(), "config section [model]")?;
    let pad = vocab.pad_id().context("the model vocabulary has no <pad>")?;
    let mut config = apply_objective(cfg, config, n_cls).with_pad_token_id(pad as usize);
    config.identical_layer_init = cfg.model.identical_layer_init;
    config.validate().context("config section [model]")?;
    let model = config.init(device)?;
    let notes = vec![format!(
        "model: fresh, vocabulary {} tokens, d {}, {} layers, {} heads, d_hid {}",
        vocab.len(),
        config.d_model,
        config.nlayers,
        config.nhead,
        config.d_hid
    )];
    Ok(InitModel { model, vocab, notes })
}

/// Loads `init_from` (original folder or native checkpoint) and extends its vocabulary with
/// the genes of `data_vocabs` it lacks. A classifier of another width than `n_cls` starts
/// fresh (its tensors do not match by shape and are skipped).
pub fn from_checkpoint(cfg: &TrainConfig, dir: &Path, data_vocabs: &[&GeneVocab], n_cls: usize, device: &Device) -> anyhow::Result<InitModel> {
    let mut notes = Vec::new();
    let (mut model, mut vocab) = if dir.join("model.safetensors").is_file() {
        let ck = load_native(dir, device)?;
        let vocab = GeneVocab::from_json_str(&ck.vocab_json, &dir.join("vocab.json").display().to_string())?;
        let mut model = ck.model;
        let want = apply_objective(cfg, model.config.clone(), n_cls);
        if want.use_generative_training != model.config.use_generative_training || want.n_cls != model.config.n_cls {
            // Rebuild with or without flag_encoder (or another classifier width) and copy
            // every tensor that matches by name and shape.
            let tmp = tempfile_dir()?;
            scgpt_model::export_original(&model, &model.config, &ck.vocab_json, &tmp)?;
            let mut rebuilt = want.init(device)?;
            load_pretrained(&mut rebuilt, tmp.join("best_model.pt"))?;
            let _ = std::fs::remove_dir_all(&tmp);
            model = rebuilt;
        } else {
            model.config.dropout = want.dropout;
        }
        notes.push(format!("model: native checkpoint {} loaded", dir.display()));
        (model, vocab)
    } else if dir.join("best_model.pt").is_file() {
        for f in ["args.json", "vocab.json"] {
            if !dir.join(f).is_file() {
                bail!("{}: missing {f}; an original checkpoint folder holds best_model.pt, args.json and vocab.json", dir.display());
            }
        }
        let mut vocab = GeneVocab::from_file(&dir.join("vocab.json"))?;
        vocab.ensure_specials();
        let config = ModelConfig::from_args_json(dir.join("args.json"), vocab.len())?;
        let pad = vocab.get(&config.pad_token).with_context(|| format!("{}: pad_token {:?} is not in vocab.json", dir.join("args.json").display(), config.pad_token))?;
        let mut config = apply_objective(cfg, config, n_cls).with_pad_token_id(pad as usize);
        config.do_mvc = config.do_mvc || cfg.model.MVC;
        let mut model = config.init(device)?;
        let report = load_pretrained(&mut model, dir.join("best_model.pt"))?;
        notes.push(format!(
            "model: {} loaded from the original checkpoint {} ({} skipped, {} missing: {})",
            report.loaded.len(),
            dir.display(),
            report.skipped.len(),
            report.missing.len(),
            report.missing.iter().take(6).cloned().collect::<Vec<_>>().join(", ")
        ));
        (model, vocab)
    } else {
        bail!(
            "model.init_from = {}: neither an original checkpoint folder (best_model.pt + args.json + vocab.json) nor a native checkpoint (model.safetensors + config.json + vocab.json)",
            dir.display()
        );
    };
    let before = vocab.len();
    for v in data_vocabs {
        vocab.extend(v.tokens().iter().map(String::as_str).filter(|t| v.is_gene(t)));
    }
    let added = vocab.len() - before;
    if added > 0 {
        model = extend_gene_embedding(model, vocab.len(), device);
        notes.push(format!("vocabulary: {added} new genes of the data appended (ids {before}..{}); old ids and rows kept", vocab.len()));
    }
    Ok(InitModel { model, vocab, notes })
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("scgpt-train-convert-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Appends rows to the gene embedding: old rows unchanged, new rows U(−0.1, 0.1).
pub fn extend_gene_embedding(mut model: TransformerModel, ntoken: usize, device: &Device) -> TransformerModel {
    let old = model.encoder.embedding.weight.val();
    let [n, d] = old.dims();
    if ntoken <= n {
        return model;
    }
    let new_rows = Tensor::<2>::random([ntoken - n, d], Distribution::Uniform(-0.1, 0.1), device);
    let table = Tensor::cat(vec![old.detach(), new_rows.detach()], 0).into_data();
    model.encoder.embedding.weight = Param::from_data(table, device);
    model.config.ntoken = ntoken;
    model
}
