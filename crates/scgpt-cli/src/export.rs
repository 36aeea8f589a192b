//! `scgpt export`: a checkpoint (ours, or the original's) to the original's format —
//! `best_model.pt` + `vocab.json` + `args.json` that torch.load and the original's
//! `load_pretrained` accept. `scgpt convert`: the original's checkpoint folder to our native
//! checkpoint (safetensors + config.json + vocab.json), the format training runs write.

use std::path::{Path, PathBuf};

use anyhow::Context;
use scgpt_model::burn::tensor::Device;
use scgpt_model::{export_original, load_native, save_native};

use crate::model_dir;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// A native checkpoint directory (config.json + model.safetensors + vocab.json), or an
    /// original checkpoint folder (best_model.pt + vocab.json + args.json).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output folder for best_model.pt, vocab.json and args.json (replaced atomically).
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// The original's checkpoint folder (best_model.pt + vocab.json + args.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder for the native checkpoint (replaced atomically).
    #[arg(long)]
    pub output: PathBuf,
}

fn is_native(dir: &Path) -> bool {
    dir.join("config.json").is_file() && dir.join("model.safetensors").is_file()
}

pub fn export(args: &ExportArgs) -> anyhow::Result<()> {
    let device = Device::flex();
    let (model, vocab_json) = if is_native(&args.checkpoint) {
        let ckpt = load_native(&args.checkpoint, &device)?;
        (ckpt.model, ckpt.vocab_json)
    } else {
        let loaded = model_dir::load(&args.checkpoint, &device)?;
        let vocab_json =
            std::fs::read_to_string(&loaded.vocab_path).with_context(|| format!("{}: cannot read", loaded.vocab_path.display()))?;
        (loaded.model, vocab_json)
    };
    let config = model.config.clone();
    let report = export_original(&model, &config, &vocab_json, &args.output)?;
    eprintln!("exported {} tensors ({} bytes) to {}", report.tensors.len(), report.weights_bytes, report.dir.display());
    Ok(())
}

pub fn convert(args: &ConvertArgs) -> anyhow::Result<()> {
    let device = Device::flex();
    let loaded = model_dir::load(&args.model, &device)?;
    let vocab_json =
        std::fs::read_to_string(&loaded.vocab_path).with_context(|| format!("{}: cannot read", loaded.vocab_path.display()))?;
    save_native(&loaded.model, &vocab_json, &args.output)?;
    eprintln!("wrote native checkpoint {}", args.output.display());
    Ok(())
}
