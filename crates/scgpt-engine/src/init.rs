//! Where a run's model and vocabulary come from: a fresh model from the `[model]` section, or
//! `init_from` an original checkpoint folder or a native checkpoint (continual pretraining),
//! with the vocabulary extended by the data's new genes (old ids and rows kept, new rows drawn
//! as the original's `init_weights`: U(−0.1, 0.1)).

use std::path::Path;

use anyhow::{bail, Context};
use scgpt_data::vocab::GeneVocab;
use scgpt_model::burn::module::Param;
use scgpt_model::burn::tensor::{Device, Distribution, Tensor};
use scgpt_model::{load_native, load_pretrained_prefixes, ModelConfig, TransformerModel};

use crate::config::TrainConfig;
use crate::tasks::Heads;

pub struct InitModel<M = TransformerModel> {
    pub model: M,
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

/// What the run's task decides about the architecture.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Classifier width (the task's classes; 1 without a classifier).
    pub n_cls: usize,
    /// The generative flag encoder.
    pub generative: bool,
    /// The heads the task trains.
    pub heads: Heads,
    /// Distinct batch labels of the data when the model reads them.
    pub n_batches: Option<usize>,
}

/// Applies the task's shape and the config's dropout to an architecture.
fn apply_objective(cfg: &TrainConfig, mut c: ModelConfig, shape: Shape) -> ModelConfig {
    c.use_generative_training = shape.generative;
    c.dropout = cfg.model.dropout;
    // Batch labels are the run's: its data and its config say whether and how many.
    c.use_batch_labels = cfg.model.use_batch_labels;
    c.domain_spec_batchnorm = match cfg.model.domain_spec_batchnorm.as_str() {
        "dsbn" => scgpt_model::BatchNormStyle::Dsbn,
        "batchnorm" => scgpt_model::BatchNormStyle::BatchNorm,
        _ => scgpt_model::BatchNormStyle::None,
    };
    c.num_batch_labels = shape.n_batches;
    if shape.n_cls > 1 {
        c.n_cls = shape.n_cls;
    }
    // The DAR head's width is the run's batch count, so the run decides whether it exists.
    c.do_dab = cfg.model.DAR;
    let m = &cfg.model;
    match shape.heads {
        Heads::Pretrain => c.explicit_zero_prob = c.explicit_zero_prob || m.explicit_zero_prob,
        Heads::Classifier => {
            c.do_mvc = false;
            c.explicit_zero_prob = false;
            c.nlayers_cls = m.n_layers_cls;
        }
        // The fine-tuning run's heads over whatever the checkpoint had (the tutorial builds
        // its model from its own flags and loads the matching tensors).
        Heads::Expression => {
            c.do_mvc = m.MVC;
            c.explicit_zero_prob = m.explicit_zero_prob;
            c.ecs_threshold = m.ecs_thres;
        }
    }
    if shape.heads != Heads::Pretrain {
        // How the cell embedding is read is the fine-tuning run's choice, also over a checkpoint.
        c.cell_emb_style = match m.cell_emb_style.as_str() {
            "avg-pool" => scgpt_model::CellEmbStyle::AvgPool,
            "w-pool" => scgpt_model::CellEmbStyle::WPool,
            _ => scgpt_model::CellEmbStyle::Cls,
        };
    }
    c
}

/// Builds the `[model]` section into a fresh model over `vocab` (`n_cls` classes when the
/// run has a CLS objective).
pub fn fresh(cfg: &TrainConfig, vocab: GeneVocab, shape: Shape, device: &Device) -> anyhow::Result<InitModel> {
    let mut args = cfg.args_json();
    if let Some(n) = shape.n_batches {
        args.insert("num_batch_labels".into(), n.into());
    }
    let config = ModelConfig::from_args_map(&args, vocab.len(), "config section [model]")?;
    let pad = vocab.pad_id().context("the model vocabulary has no <pad>")?;
    let mut config = apply_objective(cfg, config, shape).with_pad_token_id(pad as usize);
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
pub fn from_checkpoint(
    cfg: &TrainConfig,
    dir: &Path,
    data_vocabs: &[&GeneVocab],
    shape: Shape,
    device: &Device,
) -> anyhow::Result<InitModel> {
    let mut notes = Vec::new();
    let (mut model, mut vocab) = if dir.join("model.safetensors").is_file() {
        let ck = load_native(dir, device)?;
        let vocab = GeneVocab::from_json_str(&ck.vocab_json, &dir.join("vocab.json").display().to_string())?;
        let mut model = ck.model;
        let want = apply_objective(cfg, model.config.clone(), shape);
        if want.use_generative_training != model.config.use_generative_training
            || want.n_cls != model.config.n_cls
            || want.cell_emb_style != model.config.cell_emb_style
            || want.use_batch_labels != model.config.use_batch_labels
            || want.domain_spec_batchnorm != model.config.domain_spec_batchnorm
            || want.num_batch_labels != model.config.num_batch_labels
            || want.do_mvc != model.config.do_mvc
            || want.do_dab != model.config.do_dab
            || want.explicit_zero_prob != model.config.explicit_zero_prob
            || want.nlayers_cls != model.config.nlayers_cls
            || !cfg.model.init_prefixes.is_empty()
        {
            // Rebuild with or without flag_encoder (or another classifier width) and copy
            // every tensor that matches by name and shape.
            let tmp = tempfile_dir()?;
            scgpt_model::export_original(&model, &model.config, &ck.vocab_json, &tmp)?;
            let mut rebuilt = want.init(device)?;
            let report = load_filtered(&mut rebuilt, &tmp.join("best_model.pt"), &cfg.model.init_prefixes)?;
            let _ = std::fs::remove_dir_all(&tmp);
            notes.push(report);
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
        let pad = vocab
            .get(&config.pad_token)
            .with_context(|| format!("{}: pad_token {:?} is not in vocab.json", dir.join("args.json").display(), config.pad_token))?;
        let mut config = apply_objective(cfg, config, shape).with_pad_token_id(pad as usize);
        if shape.heads == Heads::Pretrain {
            config.do_mvc = config.do_mvc || cfg.model.MVC;
        }
        let mut model = config.init(device)?;
        let report = load_filtered(&mut model, &dir.join("best_model.pt"), &cfg.model.init_prefixes)?;
        notes.push(format!("{report} from the original checkpoint {}", dir.display()));
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

/// Loads `path` into `model` (only `prefixes` when given) and says what happened in one line.
fn load_filtered(model: &mut TransformerModel, path: &Path, prefixes: &[String]) -> anyhow::Result<String> {
    let report = load_pretrained_prefixes(model, path, prefixes)?;
    Ok(format!(
        "model: {} tensors loaded{} ({} skipped, {} missing: {})",
        report.loaded.len(),
        if prefixes.is_empty() { String::new() } else { format!(" under {}", prefixes.join(", ")) },
        report.skipped.len(),
        report.missing.len(),
        report.missing.iter().take(6).cloned().collect::<Vec<_>>().join(", ")
    ))
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
