//! The perturbation-prediction model: scgpt 0.2.4 `scgpt/model/generation_model.py`
//! `TransformerGenerator` (reference §4.3), as `Tutorial_Perturbation` uses it.
//!
//! - Input embedding = `encoder` (gene, LayerNorm'd) + `value_encoder` (continuous) +
//!   `pert_encoder` (`Embedding(3, d, padding_idx=pert_pad_id)`, no norm). No `<cls>` token
//!   is added by the pipeline; attention is over all tokens with the key padding mask given
//!   (the tutorial passes an all-False mask, so genes missing from the vocabulary, mapped to
//!   `<pad>`, still take part).
//! - `decoder` = `AffineExprDecoder`: two `ExprDecoder`s, `coeff_decoder` and `bias_decoder`;
//!   optional activation (`decoder_activation`, any of the `nn.<Name>` below) on both preds;
//!   optional adaptive bias (`bias *= Σ values / #(values ≠ 0)` per cell, a 0/0 → NaN for an
//!   all-zero cell exactly as in the original); `pred = coeff · values + bias` with the
//!   **raw** input values; `zero_probs` from the coeff decoder only. 0.2.4 has a
//!   `tanh_coeff` argument whose code is commented out, so it is not a field here.
//! - `cls_decoder` (always built) and `mvc_decoder` (with `do_mvc`, `d_in = d`); no batch
//!   labels, DSBN or DAB (the constructor accepts `domain_spec_batchnorm` but ignores it).
//! - The original's `forward` switches `do_sample` on by itself in eval mode when
//!   `explicit_zero_prob` is set, so `mlm_output` is then a Bernoulli-masked sample. So does
//!   this; the deterministic prediction is always available as `mlm_pred`.
//! - The original bins values per row inside `forward` when `n_input_bins > 0` (with numpy's
//!   global RNG for ties); the tutorial uses 0, and so does this (bin beforehand otherwise).
//! - `encode_batch` of the original calls `_encode` without perturbation flags and cannot run;
//!   it is not reproduced. `pred_perturb` is (`include_zero_gene` "all" and "batch-wise").
//!
//! Loading: [`TransformerGenerator::load_pretrained_prefixes`] is the tutorial's
//! `load_param_prefixs = ["encoder", "value_encoder", "transformer_encoder"]` load from a
//! pretrained `TransformerModel` checkpoint; [`TransformerGenerator::load_checkpoint`] loads a
//! saved `TransformerGenerator` state_dict (a fine-tuned perturbation model).
#![allow(non_snake_case)]

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::activation::{elu, gelu, leaky_relu, relu, sigmoid, softplus, tanh};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::config::{CellEmbStyle, ModelConfig, MvcDecoderStyle};
use crate::error::{ModelError, Result};
use crate::io::load::{float_dtype_of, load_module, LoadReport};
use crate::layers::{
    block_padding_grad, ClsDecoder, ContinuousValueEncoder, ExprDecoder, GeneEncoder, MvcDecoder, TransformerEncoder, LEAKY_SLOPE,
};
use crate::model::{bernoulli, cell_emb_from_layer, elastic_cell_similarity, host_ints, ForwardFlags};

/// `AffineExprDecoder(activation=...)`: an `nn.<Name>()` applied to both coefficient and bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DecoderActivation {
    ReLU,
    LeakyReLU,
    Sigmoid,
    Tanh,
    GELU,
    Softplus,
    ELU,
    Identity,
}

impl DecoderActivation {
    /// The `torch.nn` class name as the original's `decoder_activation` argument spells it.
    pub fn from_torch_name(name: &str) -> Option<Self> {
        Some(match name {
            "ReLU" => Self::ReLU,
            "LeakyReLU" => Self::LeakyReLU,
            "Sigmoid" => Self::Sigmoid,
            "Tanh" => Self::Tanh,
            "GELU" => Self::GELU,
            "Softplus" => Self::Softplus,
            "ELU" => Self::ELU,
            "Identity" => Self::Identity,
            _ => return None,
        })
    }

    /// The module's default-argument behaviour (`nn.LeakyReLU()` slope 0.01, `nn.GELU()`
    /// exact erf, `nn.Softplus()` β 1 threshold 20, `nn.ELU()` α 1).
    pub fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::ReLU => relu(x),
            Self::LeakyReLU => leaky_relu(x, LEAKY_SLOPE),
            Self::Sigmoid => sigmoid(x),
            Self::Tanh => tanh(x),
            Self::GELU => gelu(x),
            Self::Softplus => softplus(x, 1.0),
            Self::ELU => elu(x, 1.0),
            Self::Identity => x,
        }
    }
}

/// The arguments of the original `TransformerGenerator.__init__` (plus the vocabulary facts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerturbationConfig {
    pub ntoken: usize,
    /// `vocab[pad_token]`: the gene embedding's `padding_idx`.
    pub pad_token_id: Option<usize>,
    pub d_model: usize,
    pub nhead: usize,
    pub d_hid: usize,
    pub nlayers: usize,
    pub nlayers_cls: usize,
    pub n_cls: usize,
    pub dropout: f64,
    pub pad_token: String,
    /// Stored by the original, not used by the model (the data pipeline pads with it).
    pub pad_value: f64,
    /// `padding_idx` of `pert_encoder` (constructor default 2; the tutorial uses 0, so the
    /// "not perturbed" flag gets the zero embedding).
    pub pert_pad_id: usize,
    pub do_mvc: bool,
    pub mvc_decoder_style: MvcDecoderStyle,
    pub cell_emb_style: CellEmbStyle,
    pub decoder_activation: Option<DecoderActivation>,
    pub decoder_adaptive_bias: bool,
    pub ecs_threshold: f64,
    pub explicit_zero_prob: bool,
    /// As [`ModelConfig::identical_layer_init`]: all layers start identical, as in the
    /// original (`nn.TransformerEncoder` deep copy).
    #[serde(default = "default_true")]
    pub identical_layer_init: bool,
}

fn default_true() -> bool {
    true
}

impl PerturbationConfig {
    /// The constructor's defaults for everything but the dimensions.
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
            pad_token: "<pad>".into(),
            pad_value: 0.0,
            pert_pad_id: 2,
            do_mvc: false,
            mvc_decoder_style: MvcDecoderStyle::InnerProduct,
            cell_emb_style: CellEmbStyle::Cls,
            decoder_activation: None,
            decoder_adaptive_bias: false,
            ecs_threshold: 0.3,
            explicit_zero_prob: false,
            identical_layer_init: true,
        }
    }

    /// What `Tutorial_Perturbation` builds on a pretrained model: the dimensions
    /// (`embsize`, `nheads`, `d_hid`, `nlayers`, `n_layers_cls`), `pad_token` and its id from
    /// the pretrained model's args.json/vocab, and the tutorial's own settings: dropout 0,
    /// `pad_value` 0, `pert_pad_id` 0, `n_cls` 1, no MVC, no explicit zero probabilities.
    pub fn tutorial(pretrained: &ModelConfig) -> Self {
        let mut c = Self::new(pretrained.ntoken, pretrained.d_model, pretrained.nhead, pretrained.d_hid, pretrained.nlayers);
        c.pad_token_id = pretrained.pad_token_id;
        c.pad_token = pretrained.pad_token.clone();
        c.nlayers_cls = pretrained.nlayers_cls;
        c.dropout = 0.0;
        c.pad_value = 0.0;
        c.pert_pad_id = 0;
        c
    }

    pub fn with_pad_token_id(mut self, id: usize) -> Self {
        self.pad_token_id = Some(id);
        self
    }

    /// Checks the combination of fields; `Err` names the offending field.
    pub fn validate(&self) -> Result<()> {
        const ORIGIN: &str = "<perturbation config>";
        let err = |field: &str, msg: String| Err(ModelError::config(ORIGIN, field, msg));
        crate::config::check_transformer(
            ORIGIN,
            self.ntoken,
            self.pad_token_id,
            [self.d_model, self.nhead, self.d_hid, self.nlayers],
            self.dropout,
        )?;
        if self.nlayers_cls == 0 || self.n_cls == 0 {
            return err("n_layers_cls/n_cls", "must be >= 1".into());
        }
        if self.pert_pad_id >= 3 {
            return err("pert_pad_id", format!("{} is not a row of the 3-row perturbation embedding", self.pert_pad_id));
        }
        Ok(())
    }

    /// A freshly initialised model (the original's initialisation, see `layers/`; the
    /// perturbation embedding is N(0, 1) with the `pert_pad_id` row zeroed, as `nn.Embedding`).
    pub fn init(&self, device: &Device) -> Result<TransformerGenerator> {
        self.validate()?;
        let d = self.d_model;
        let p = self.dropout;
        let mut pert_encoder = EmbeddingConfig::new(3, d).init(device);
        let pp = self.pert_pad_id;
        let w = pert_encoder.weight.val().slice_assign([pp..pp + 1, 0..d], Tensor::zeros([1, d], device));
        // Detached: on an autodiff device `slice_assign` yields a non-leaf tensor, which cannot
        // become a parameter.
        pert_encoder.weight = Param::from_tensor(w.detach());
        Ok(TransformerGenerator {
            encoder: GeneEncoder::new(self.ntoken, d, self.pad_token_id, device),
            value_encoder: ContinuousValueEncoder::new(d, p, device),
            pert_encoder,
            transformer_encoder: TransformerEncoder::new(d, self.nhead, self.d_hid, p, self.nlayers, self.identical_layer_init, device),
            decoder: AffineExprDecoder {
                coeff_decoder: ExprDecoder::new(d, d, self.explicit_zero_prob, device),
                bias_decoder: ExprDecoder::new(d, d, self.explicit_zero_prob, device),
                activation: self.decoder_activation,
                adaptive_bias: self.decoder_adaptive_bias,
            },
            cls_decoder: ClsDecoder::new(d, self.n_cls, self.nlayers_cls, device),
            mvc_decoder: self.do_mvc.then(|| {
                MvcDecoder::new(d, d, self.explicit_zero_prob, self.mvc_decoder_style == MvcDecoderStyle::InnerProductDetach, device)
            }),
            config: self.clone(),
        })
    }
}

/// `AffineExprDecoder`: `pred = coeff · values + bias` from two `ExprDecoder`s.
#[derive(Module, Debug)]
pub struct AffineExprDecoder {
    pub coeff_decoder: ExprDecoder,
    pub bias_decoder: ExprDecoder,
    #[module(skip)]
    pub activation: Option<DecoderActivation>,
    pub adaptive_bias: bool,
}

impl AffineExprDecoder {
    /// `x`: `[B, L, d]`, `values`: the raw input values `[B, L]` →
    /// (`pred` `[B, L]`, `zero_probs` of the coefficient decoder).
    pub fn forward(&self, x: Tensor<3>, values: Tensor<2>) -> (Tensor<2>, Option<Tensor<2>>) {
        let (mut coeff, zero_probs) = self.coeff_decoder.forward(x.clone());
        let (mut bias, _) = self.bias_decoder.forward(x);
        if let Some(act) = self.activation {
            coeff = act.apply(coeff);
            bias = act.apply(bias);
        }
        if self.adaptive_bias {
            // values.sum(1) / (values != 0).sum(1): 0/0 is NaN, as in the original.
            let nonzero = values.clone().not_equal_elem(0.0).float().sum_dim(1);
            let mean = values.clone().sum_dim(1) / nonzero;
            bias = bias * mean;
        }
        (coeff * values + bias, zero_probs)
    }
}

/// One perturbation minibatch.
#[derive(Debug, Clone)]
pub struct PerturbationInput {
    /// Gene token ids `[B, L]` (no `<cls>`).
    pub src: Tensor<2, Int>,
    /// Control expression `[B, L]` (GEARS log-normalised values in the tutorial).
    pub values: Tensor<2>,
    /// Perturbation flags `[B, L]` in 0..3 (0/1 in the tutorial data).
    pub input_pert_flags: Tensor<2, Int>,
    /// `[B, L]`, true = padding (all false in the tutorial).
    pub src_key_padding_mask: Tensor<2, Bool>,
}

/// The original `forward`'s dict, plus the unsampled predictions.
#[derive(Debug, Clone)]
pub struct PerturbationOutput {
    pub transformer_output: Tensor<3>,
    /// What the original returns: `mlm_pred`, or a Bernoulli(zero_probs)-masked sample of it
    /// when `explicit_zero_prob` and `do_sample` (forced on in eval mode, as in the original).
    pub mlm_output: Tensor<2>,
    /// `coeff · values + bias`, never sampled.
    pub mlm_pred: Tensor<2>,
    pub mlm_zero_probs: Option<Tensor<2>>,
    pub cell_emb: Tensor<2>,
    pub cls_output: Option<Tensor<2>>,
    pub mvc_output: Option<Tensor<2>>,
    pub mvc_pred: Option<Tensor<2>>,
    pub mvc_zero_probs: Option<Tensor<2>>,
    pub loss_ecs: Option<Tensor<1>>,
}

/// Which genes `pred_perturb` feeds the model (`include_zero_gene`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeZeroGene {
    /// Every gene of the dataset (the tutorial's evaluation).
    All,
    /// Genes expressed in at least one cell of the batch.
    BatchWise,
}

/// The tutorial's `load_param_prefixs`.
pub const TUTORIAL_LOAD_PREFIXES: [&str; 3] = ["encoder", "value_encoder", "transformer_encoder"];

#[derive(Module, Debug)]
pub struct TransformerGenerator {
    pub encoder: GeneEncoder,
    pub value_encoder: ContinuousValueEncoder,
    pub pert_encoder: Embedding,
    pub transformer_encoder: TransformerEncoder,
    pub decoder: AffineExprDecoder,
    pub cls_decoder: ClsDecoder,
    pub mvc_decoder: Option<MvcDecoder>,
    #[module(skip)]
    pub config: PerturbationConfig,
}

impl TransformerGenerator {
    /// The model computing training steps with attention `mode` (`run.attention`).
    pub fn with_attention(mut self, mode: crate::layers::AttentionMode) -> Self {
        self.transformer_encoder = self.transformer_encoder.with_attention(mode);
        self
    }

    pub fn device(&self) -> Device {
        self.encoder.embedding.weight.lazy_device()
    }

    /// PyTorch's `self.training`: an autodiff device with the modules' training flag on
    /// (`Module::valid()` is `eval()`).
    pub fn is_training(&self) -> bool {
        self.device().is_autodiff() && self.value_encoder.dropout.training.is_enabled()
    }

    fn check_input(&self, input: &PerturbationInput) -> Result<()> {
        let dims = input.src.dims();
        for (field, d) in [
            ("values", input.values.dims()),
            ("input_pert_flags", input.input_pert_flags.dims()),
            ("src_key_padding_mask", input.src_key_padding_mask.dims()),
        ] {
            if d != dims {
                return Err(ModelError::input(field, format!("shape {d:?} differs from src {dims:?}")));
            }
        }
        if dims[0] == 0 || dims[1] == 0 {
            return Err(ModelError::input("src", format!("empty batch {dims:?}")));
        }
        let flags = host_ints(&input.input_pert_flags);
        if let Some(bad) = flags.iter().find(|&&f| !(0..3).contains(&f)) {
            return Err(ModelError::input("input_pert_flags", format!("flag {bad} outside 0..3")));
        }
        let ids = host_ints(&input.src);
        let n = self.config.ntoken as i64;
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t >= n) {
            return Err(ModelError::input("src", format!("token {bad} outside 0..{n}")));
        }
        Ok(())
    }

    /// The original's `_encode`: gene + value + perturbation embeddings, then the
    /// transformer. Returns (output `[B, L, d]`, gene embeddings for MVC).
    pub fn encode(&self, input: &PerturbationInput) -> Result<(Tensor<3>, Tensor<3>)> {
        self.check_input(input)?;
        let genes = self.encoder.forward(input.src.clone());
        let vals = self.value_encoder.forward(input.values.clone());
        let flags = input.input_pert_flags.clone();
        let perts = block_padding_grad(self.pert_encoder.forward(flags.clone()), &flags, Some(self.config.pert_pad_id));
        let total = genes.clone() + vals + perts;
        let out = self.transformer_encoder.forward(total, Some(input.src_key_padding_mask.clone()));
        Ok((out, genes))
    }

    /// The original's `forward`. `flags.cce` is ignored (the original computes no CCE here).
    pub fn forward(&self, input: PerturbationInput, flags: ForwardFlags) -> Result<PerturbationOutput> {
        let explicit = self.config.explicit_zero_prob;
        // "Auto set do_sample to True when model is in eval mode."
        let do_sample = flags.do_sample || (explicit && !self.is_training());
        let (out, gene_embs) = self.encode(&input)?;
        let values = input.values;
        let (pred, zero_probs) = self.decoder.forward(out.clone(), values.clone());
        let mlm_output = match (&zero_probs, explicit && do_sample) {
            (Some(z), true) => bernoulli(z.clone()) * pred.clone(),
            _ => pred.clone(),
        };
        let cell_emb = cell_emb_from_layer(self.config.cell_emb_style, out.clone(), Some(values))?;
        let cls_output = flags.cls.then(|| self.cls_decoder.forward(cell_emb.clone()));
        let (mvc_output, mvc_pred, mvc_zero_probs) = if flags.mvc {
            let dec = self.mvc_decoder.as_ref().ok_or_else(|| ModelError::input("flags.mvc", "the model was built without do_mvc"))?;
            let (p, z) = dec.forward(cell_emb.clone(), gene_embs);
            let sampled = match (&z, explicit && do_sample) {
                (Some(z), true) => bernoulli(z.clone()) * p.clone(),
                _ => p.clone(),
            };
            (Some(sampled), Some(p), z)
        } else {
            (None, None, None)
        };
        let loss_ecs = flags.ecs.then(|| elastic_cell_similarity(cell_emb.clone(), self.config.ecs_threshold));
        Ok(PerturbationOutput {
            transformer_output: out,
            mlm_output,
            mlm_pred: pred,
            mlm_zero_probs: if explicit { zero_probs } else { None },
            cell_emb,
            cls_output,
            mvc_output,
            mvc_pred,
            mvc_zero_probs,
            loss_ecs,
        })
    }

    /// The original's `pred_perturb`: `ori_gene_values` / `pert_flags` are `[B, G]` over the
    /// dataset's genes, `gene_ids[g]` the vocabulary id of gene `g` (the `<pad>` id for genes
    /// missing from the vocabulary, unmasked as in the tutorial). Runs the forward with
    /// `do_sample` on and returns `[B, G]` predictions (0 for genes not fed in batch-wise mode).
    /// Call it on an eval-mode model (the original calls `self.eval()` first).
    pub fn pred_perturb(
        &self,
        ori_gene_values: Tensor<2>,
        pert_flags: Tensor<2, Int>,
        gene_ids: &[i64],
        include_zero_gene: IncludeZeroGene,
    ) -> Result<Tensor<2>> {
        let [b, g] = ori_gene_values.dims();
        if pert_flags.dims() != [b, g] {
            return Err(ModelError::input("pert_flags", format!("shape {:?}, expected [{b}, {g}]", pert_flags.dims())));
        }
        if gene_ids.len() != g {
            return Err(ModelError::input("gene_ids", format!("{} ids for {g} genes", gene_ids.len())));
        }
        let device = ori_gene_values.device();
        let cols: Vec<usize> = match include_zero_gene {
            IncludeZeroGene::All => (0..g).collect(),
            IncludeZeroGene::BatchWise => {
                let any = ori_gene_values.clone().not_equal_elem(0.0).int().sum_dim(0).reshape([g]);
                host_ints(&any).iter().enumerate().filter(|(_, &n)| n > 0).map(|(i, _)| i).collect()
            }
        };
        if cols.is_empty() {
            return Err(ModelError::input("ori_gene_values", "batch-wise mode needs at least one nonzero gene in the batch"));
        }
        let l = cols.len();
        let idx = Tensor::<1, Int>::from_data(TensorData::new(cols.iter().map(|&c| c as i64).collect::<Vec<_>>(), [l]), &device);
        let ids: Vec<i64> = (0..b).flat_map(|_| cols.iter().map(|&c| gene_ids[c])).collect();
        let input = PerturbationInput {
            src: Tensor::from_data(TensorData::new(ids, [b, l]), &device),
            values: ori_gene_values.clone().select(1, idx.clone()),
            input_pert_flags: pert_flags.select(1, idx),
            src_key_padding_mask: Tensor::<2, Int>::zeros([b, l], &device).bool(),
        };
        let flags = ForwardFlags { do_sample: true, ..Default::default() };
        let out = self.forward(input, flags)?.mlm_output;
        if l == g {
            return Ok(out);
        }
        let vals: Vec<f32> = out.into_data().convert::<f32>().try_into_vec().expect("f32");
        let mut full = vec![0f32; b * g];
        for r in 0..b {
            for (j, &c) in cols.iter().enumerate() {
                full[r * g + c] = vals[r * l + j];
            }
        }
        Ok(Tensor::from_data(TensorData::new(full, [b, g]), &device))
    }

    /// The tutorial's pretrained load: only checkpoint keys (after the usual renaming, see
    /// `load.rs`) that start with one of `prefixes` are considered (the tutorial uses
    /// [`TUTORIAL_LOAD_PREFIXES`]); every model parameter under those prefixes must load, the
    /// rest keep their values. Unlike the tutorial's plain `load_state_dict`, flash
    /// (`Wqkv`), 0.2.5 (`_impl.`) and PyTorch (`in_proj_`) attention names all work.
    pub fn load_pretrained_prefixes(&mut self, path: impl AsRef<Path>, prefixes: &[&str]) -> Result<LoadReport> {
        let dtype = float_dtype_of(&self.device());
        let list = format!("{prefixes:?}");
        let selected = |name: &str| prefixes.iter().any(|p| name.starts_with(p));
        load_module(self, path.as_ref(), dtype, &|name| (!selected(name)).then(|| format!("not under the load prefixes {list}")), &selected)
    }

    /// Loads a saved `TransformerGenerator` state_dict (all keys, by name and shape). The
    /// embedding, perturbation embedding, transformer and decoder must all be present.
    pub fn load_checkpoint(&mut self, path: impl AsRef<Path>) -> Result<LoadReport> {
        let dtype = float_dtype_of(&self.device());
        load_module(self, path.as_ref(), dtype, &|_| None, &|name| {
            ["encoder.", "value_encoder.", "pert_encoder.", "transformer_encoder.", "decoder."].iter().any(|p| name.starts_with(p))
        })
    }
}
