//! The memory and compute plan of a run, before it starts (`scgpt-train --plan`) and at the
//! start of every run: parameters, gradients, optimiser state, activations per micro-batch by
//! attention mode and precision, tokens and model FLOPs per step, the largest per-GPU batch that
//! fits a memory size, and the `grad_accum` that keeps the config's global batch.
//!
//! The activation model counts what burn's autodiff keeps for the backward, per token and layer
//! (the layer's input, q/k/v, the attention output, out_proj's input, the dropout masks and
//! their inputs, both LayerNorms' intermediates, the FFN's hidden activations), plus per token
//! the embeddings and heads, plus the attention scores: the explicit path keeps about four
//! `[B, H, Lq, Lk]` tensors per layer (scores, softmax, dropout mask, dropped weights), the
//! blockwise path one log-sum-exp per query row and, transiently, one block. The coefficients
//! were set from the tensors each operation keeps and checked against measured peak memory on
//! the CPU (`benches/plan_check.sh`, docs/benchmarks.md).

use crate::config::{AttentionKind, Objective, Precision, TaskKind, TrainConfig};

/// Floats kept per token and layer, in units of d (attention side and norms) ...
const PER_TOKEN_D: f64 = 10.0;
/// ... and of d_hid (the FFN).
const PER_TOKEN_HID: f64 = 4.0;
/// Floats kept per token outside the layers (embeddings, value encoder, decoders), in d.
const PER_TOKEN_HEADS_D: f64 = 6.0;
/// `[B, H, Lq, Lk]` tensors the explicit path keeps per layer and pass (exp, softmax output,
/// dropout mask, dropped weights; 2 without dropout) ...
const SCORE_TENSORS_DROPOUT: f64 = 4.0;
const SCORE_TENSORS_NO_DROPOUT: f64 = 2.0;
/// ... and, at one layer at a time, the transients of the dropout mask's hash (`i64` tensor ops)
/// and of the backward on GPU backends, unmeasured there. Flex fills the mask on the host, and
/// the CPU measurements show no such transient: counting it overstated a 2-layer model's peak by
/// 22% (docs/benchmarks.md, "Memory plan against measured peak").
const SCORE_TENSORS_TRANSIENT: f64 = 4.0;
/// fp32 bytes per parameter outside the activations: the parameter (4), the backward's and the
/// accumulator's gradients (8), Adam's moments (8) and the update's temporaries (about 9).
/// Measured with negligible activations: 29 bytes per parameter (+ 60 MB) at 8M and 52M
/// parameters.
const STATIC_BYTES_PER_PARAM_FP32: f64 = 29.0;
/// `[B, H, rows, Lk]` tensors alive while the blockwise path's tensor-op form (GPU backends)
/// computes one block; the fused CPU kernel keeps only per-thread buffers.
const BLOCK_TENSORS: f64 = 6.0;
/// The process without a model: runtime, loader buffers, allocator slack.
pub const BASELINE_BYTES: f64 = 60e6;
/// What a GPU keeps for its context and allocator, left out of `--gpu-mem`.
pub const GPU_RESERVE_BYTES: f64 = 1.5 * GIB;

pub const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// The sizes a plan needs, from a config and a vocabulary size.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanInput {
    pub params: usize,
    pub d: usize,
    pub d_hid: usize,
    pub layers: usize,
    pub heads: usize,
    /// Tokens per cell (`model.max_seq_len`).
    pub len: usize,
    /// The largest pcpt share of a cell: 1 − the smallest gen ratio (1 without gen tokens).
    pub pcpt_share: f64,
    /// Forward passes whose graphs are alive at once (2 with the cell-prompted pass).
    pub passes: usize,
    pub dropout: bool,
    /// The CPU device (Flex): the attention dropout mask is filled on the host instead of hashed
    /// in tensor ops, and the blockwise attention runs fused per (cell, head) in per-thread
    /// buffers instead of as `[B, H, rows, Lk]` tensors.
    pub cpu_kernels: bool,
    pub attention: AttentionKind,
    pub block_rows: usize,
    pub precision: Precision,
    /// Cells per micro-batch and micro-batches per step (`train.batch_size`, `grad_accum`).
    pub batch: usize,
    pub grad_accum: usize,
}

impl PlanInput {
    /// The run's sizes for a model of `params` parameters.
    pub fn from_config(cfg: &TrainConfig, params: usize) -> Self {
        let generative = cfg.task.kind == TaskKind::Pretrain && cfg.train.objective == Objective::Generative;
        let min_gen = cfg.train.gen_ratios.iter().copied().fold(f64::INFINITY, f64::min);
        PlanInput {
            params,
            d: cfg.model.embsize,
            d_hid: cfg.model.d_hid,
            layers: cfg.model.nlayers,
            heads: cfg.model.nheads,
            len: cfg.model.max_seq_len,
            pcpt_share: if generative && min_gen.is_finite() { 1.0 - min_gen } else { 1.0 },
            passes: if generative && cfg.train.cell_prompt_pass { 2 } else { 1 },
            dropout: cfg.model.dropout > 0.0,
            cpu_kernels: cfg.run.device == "cpu",
            attention: cfg.run.attention,
            block_rows: cfg.run.attention_block_rows,
            precision: cfg.train.precision,
            batch: cfg.train.batch_size,
            grad_accum: cfg.train.grad_accum,
        }
    }
}

/// Bytes and FLOPs of one rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub input: PlanInput,
    pub param_bytes: f64,
    pub grad_bytes: f64,
    pub optimizer_bytes: f64,
    /// Activations of one micro-batch of `input.batch` cells.
    pub activation_bytes: f64,
    /// Tokens and encoder FLOPs (forward + backward, all passes) of one optimiser step of this
    /// rank.
    pub tokens_per_step: f64,
    pub flops_per_step: f64,
}

impl Plan {
    pub fn new(input: PlanInput) -> Self {
        let n = input.params as f64;
        // Parameters (+ the bf16 compute copy under mixed precision), gradients (the backward's
        // and the accumulator's), moments and the update's temporaries, by precision.
        let update = STATIC_BYTES_PER_PARAM_FP32 - 20.0;
        let (param_bytes, grad_bytes, optimizer_bytes) = match input.precision {
            Precision::Fp32 => (4.0 * n, 8.0 * n, (8.0 + update) * n),
            Precision::Bf16 => (6.0 * n, 8.0 * n, (8.0 + update) * n),
            Precision::PureBf16 => (2.0 * n, 4.0 * n, (4.0 + update / 2.0) * n),
        };
        let activation_bytes = activations_per_cell(&input) * input.batch as f64;
        let (p, g) = split(&input);
        let b = input.batch as f64;
        let shape = crate::tasks::ModelShape { d: input.d, d_hid: input.d_hid, layers: input.layers };
        let flops = crate::tasks::encoder_flops(shape, b * (p + g), b * (p * p + g * (p + 1.0)), input.passes as f64);
        Plan {
            param_bytes,
            grad_bytes,
            optimizer_bytes,
            activation_bytes,
            tokens_per_step: b * (p + g) * input.grad_accum as f64,
            flops_per_step: flops * input.grad_accum as f64,
            input,
        }
    }

    /// Parameters, gradients and optimiser state.
    pub fn static_bytes(&self) -> f64 {
        self.param_bytes + self.grad_bytes + self.optimizer_bytes
    }

    /// Peak of one rank: the process, the static state and one micro-batch's activations.
    pub fn peak_bytes(&self) -> f64 {
        BASELINE_BYTES + self.static_bytes() + self.activation_bytes
    }

    /// The largest micro-batch whose peak fits `mem` bytes (0 if the static state does not).
    pub fn largest_batch(&self, mem: f64) -> usize {
        let per_cell = activations_per_cell(&self.input);
        let room = mem - BASELINE_BYTES - self.static_bytes();
        if room <= 0.0 || per_cell <= 0.0 {
            return 0;
        }
        (room / per_cell).floor() as usize
    }

    /// The micro-batch and accumulation that keep `batch × grad_accum` cells per rank and step
    /// within a micro-batch of at most `largest`: `None` when not even one cell fits.
    pub fn fit(&self, largest: usize) -> Option<(usize, usize)> {
        if largest == 0 {
            return None;
        }
        let per_rank = self.input.batch * self.input.grad_accum;
        let accum = per_rank.div_ceil(largest.min(per_rank));
        Some((per_rank.div_ceil(accum), accum))
    }

    /// The plan as lines for the terminal and the run log.
    pub fn report(&self, gpu_mem: Option<f64>) -> Vec<String> {
        let i = &self.input;
        let gib = |b: f64| format!("{:.2} GiB", b / GIB);
        let (p, g) = split(i);
        let mut out = vec![
            format!(
                "plan: {:.1}M parameters; d {}, {} layers, {} heads, d_hid {}; {} tokens per cell ({:.0} pcpt + {:.0} gen at the largest pcpt share), {} pass(es); attention {}, precision {}, {} kernels",
                i.params as f64 / 1e6, i.d, i.layers, i.heads, i.d_hid, i.len, p, g, i.passes, i.attention.as_str(), i.precision.as_str(),
                if i.cpu_kernels { "CPU" } else { "GPU" }
            ),
            format!(
                "plan: parameters {}, gradients {}, optimiser state {}; activations {} per micro-batch of {} cells ({} per cell); peak ≈ {} per rank",
                gib(self.param_bytes), gib(self.grad_bytes), gib(self.optimizer_bytes), gib(self.activation_bytes), i.batch,
                gib(activations_per_cell(i)), gib(self.peak_bytes())
            ),
            format!(
                "plan: per rank and step {} micro-batch(es), {:.0} tokens, {:.2} TFLOP (encoder, forward + backward)",
                i.grad_accum, self.tokens_per_step, self.flops_per_step / 1e12
            ),
        ];
        if let Some(mem) = gpu_mem {
            let usable = mem - GPU_RESERVE_BYTES;
            let largest = self.largest_batch(usable);
            out.push(match self.fit(largest) {
                None => format!("plan: {} GPU: the parameters and optimiser state alone ({}) do not fit", gib(mem), gib(self.static_bytes())),
                Some((batch, accum)) => format!(
                    "plan: {} GPU ({} usable): at most {largest} cells per micro-batch; the config's {} cells per rank and step → train.batch_size = {batch}, train.grad_accum = {accum}",
                    gib(mem), gib(usable), i.batch * i.grad_accum
                ),
            });
        }
        out
    }
}

/// pcpt and gen tokens of a cell at the largest pcpt share.
fn split(i: &PlanInput) -> (f64, f64) {
    let l = i.len as f64;
    let p = (i.pcpt_share * l).ceil().min(l);
    (p, l - p)
}

/// Activation bytes of one cell (all passes alive at once).
fn activations_per_cell(i: &PlanInput) -> f64 {
    let bytes = match i.precision {
        Precision::Fp32 => 4.0,
        Precision::Bf16 | Precision::PureBf16 => 2.0,
    };
    let (p, g) = split(i);
    let (d, hid, layers, heads) = (i.d as f64, i.d_hid as f64, i.layers as f64, i.heads as f64);
    let tokens = p + g;
    let per_token = layers * (PER_TOKEN_D * d + PER_TOKEN_HID * hid) + PER_TOKEN_HEADS_D * d;
    let scores = p * p + g * (p + 1.0);
    let attention = match i.attention {
        AttentionKind::Explicit => {
            let kept = if i.dropout { SCORE_TENSORS_DROPOUT } else { SCORE_TENSORS_NO_DROPOUT };
            let transient = if i.cpu_kernels { 0.0 } else { SCORE_TENSORS_TRANSIENT };
            heads * scores * (layers * kept + transient / i.passes as f64)
        }
        // The log-sum-exp per query row and layer, and one block in flight (not per layer or
        // pass: blocks are computed one at a time).
        AttentionKind::Blockwise => {
            let block =
                if i.cpu_kernels { 0.0 } else { heads * (i.block_rows as f64).min(p) * (p + 1.0) * BLOCK_TENSORS / i.passes as f64 };
            layers * heads * tokens + block
        }
    };
    bytes * i.passes as f64 * (tokens * per_token + attention)
}

/// The vocabulary of the released whole-human model (`scGPT_human/vocab.json`), which a plan
/// assumes when the config names no `model.init_from`.
pub const WHOLE_HUMAN_VOCAB: usize = 60_697;

/// The parameter count of the config's model over `vocab` tokens (a fresh model built on the
/// CPU and counted; no data is read).
pub fn count_params(cfg: &TrainConfig, vocab: usize) -> anyhow::Result<usize> {
    let mut c = scgpt_model::ModelConfig::from_args_map(&cfg.args_json(), vocab, "config section [model]")?;
    c.use_generative_training = cfg.task.kind == TaskKind::Pretrain && cfg.train.objective == Objective::Generative;
    let model = c.with_pad_token_id(0).init(&scgpt_model::burn::tensor::Device::flex())?;
    Ok(crate::optim::list_params(&model)?.iter().map(crate::optim::ParamEntry::numel).sum())
}

/// The vocabulary size of a plan: `model.init_from`'s `vocab.json`, else the whole-human one.
pub fn plan_vocab(cfg: &TrainConfig) -> anyhow::Result<(usize, String)> {
    if cfg.model.init_from.is_empty() {
        return Ok((WHOLE_HUMAN_VOCAB, format!("the whole-human vocabulary ({WHOLE_HUMAN_VOCAB} tokens; no model.init_from)")));
    }
    let path = std::path::Path::new(&cfg.model.init_from).join("vocab.json");
    let mut vocab = scgpt_data::vocab::GeneVocab::from_file(&path).map_err(|e| anyhow::anyhow!("model.init_from: {e}"))?;
    vocab.ensure_specials();
    Ok((vocab.len(), format!("{} ({} tokens)", path.display(), vocab.len())))
}

/// `80GB`, `80G`, `80GiB`, `81920MB`, or a number of GiB.
pub fn parse_mem(text: &str) -> anyhow::Result<f64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.trim().parse().map_err(|_| anyhow::anyhow!("--gpu-mem {text:?}: expected a size such as 80GB, 80GiB or 40960MB"))?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "g" | "gib" => GIB,
        "gb" => 1e9,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "t" | "tib" => 1024.0 * GIB,
        "tb" => 1e12,
        other => anyhow::bail!("--gpu-mem {text:?}: unknown unit {other:?}; use GB, GiB, MB or MiB"),
    };
    Ok(v * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole_human(attention: AttentionKind, precision: Precision, len: usize) -> PlanInput {
        PlanInput {
            params: 51_857_922,
            d: 512,
            d_hid: 512,
            layers: 12,
            heads: 8,
            len,
            pcpt_share: 0.75,
            passes: 2,
            dropout: true,
            cpu_kernels: false,
            attention,
            block_rows: 128,
            precision,
            batch: 32,
            grad_accum: 1,
        }
    }

    #[test]
    fn explicit_grows_with_the_square_and_blockwise_linearly() {
        let act = |a, l| Plan::new(whole_human(a, Precision::Fp32, l)).activation_bytes;
        let e = act(AttentionKind::Explicit, 2400) / act(AttentionKind::Explicit, 1200);
        let b = act(AttentionKind::Blockwise, 2400) / act(AttentionKind::Blockwise, 1200);
        assert!(e > 3.0 && e < 4.0, "explicit ×{e} for twice the tokens");
        assert!(b > 1.9 && b < 2.2, "blockwise ×{b} for twice the tokens");
        let half = Plan::new(whole_human(AttentionKind::Blockwise, Precision::Bf16, 1200)).activation_bytes;
        assert!((half / act(AttentionKind::Blockwise, 1200) - 0.5).abs() < 1e-9);
    }

    #[test]
    fn fit_keeps_the_cells_per_step() {
        let plan = Plan::new(whole_human(AttentionKind::Explicit, Precision::Fp32, 1200));
        assert_eq!(plan.fit(32), Some((32, 1)));
        assert_eq!(plan.fit(10), Some((8, 4)));
        assert_eq!(plan.fit(0), None);
        assert_eq!(plan.fit(100), Some((32, 1)));
    }

    #[test]
    fn memory_sizes_parse_with_units() {
        assert_eq!(parse_mem("80GB").unwrap(), 80e9);
        assert_eq!(parse_mem("80GiB").unwrap(), 80.0 * GIB);
        assert_eq!(parse_mem("40960MiB").unwrap(), 40.0 * GIB);
        assert!(parse_mem("lots").is_err());
        assert!(parse_mem("80XB").is_err());
    }
}
