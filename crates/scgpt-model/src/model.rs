//! `TransformerModel`: the original's model (scgpt 0.2.4 `scgpt/model/model.py`), plus the
//! `dev-temp` `flag_encoder` when built for generative pretraining.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Device, Distribution, Int, Tensor, TensorData};

use crate::config::{BatchNormStyle, CellEmbStyle, InputEmbStyle, ModelConfig, MvcDecoderStyle};
use crate::error::{ModelError, Result};
use crate::layers::{
    AdversarialDiscriminator, BatchNorm1d, ClsDecoder, ContinuousValueEncoder,
    DomainSpecificBatchNorm, EmbeddingNorm, EncoderLayer, ExprDecoder, GeneEncoder, MvcDecoder,
    TransformerEncoder, ValueEncoder,
};

/// One minibatch, in the original's conventions.
#[derive(Debug, Clone)]
pub struct ModelInput {
    /// Gene token ids `[B, L]`.
    pub src: Tensor<2, Int>,
    /// Expression values `[B, L]` (bins as floats; −2 pad and −1 mask for continuous style).
    pub values: Tensor<2>,
    /// `[B, L]`, true at padding (`src == <pad>`): those keys are masked in attention.
    pub src_key_padding_mask: Tensor<2, Bool>,
    /// `[B]`; required when `use_batch_labels` or DSBN/batchnorm is on, refused otherwise.
    pub batch_labels: Option<Tensor<1, Int>>,
}

/// Which objectives `forward` computes (the original's keyword flags).
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardFlags {
    pub cls: bool,
    pub cce: bool,
    pub mvc: bool,
    pub ecs: bool,
    /// With explicit_zero_prob: multiply the predictions by a Bernoulli(zero_probs) sample.
    pub do_sample: bool,
}

/// What the original's `forward` returns in its dict; absent entries are `None`.
#[derive(Debug, Clone)]
pub struct ModelOutput {
    /// Transformer output `[B, L, d]` (not in the original's dict; kept for callers/tests).
    pub transformer_output: Tensor<3>,
    /// Expression prediction `[B, L]`.
    pub mlm_output: Tensor<2>,
    pub mlm_zero_probs: Option<Tensor<2>>,
    /// `[B, d]`.
    pub cell_emb: Tensor<2>,
    pub cls_output: Option<Tensor<2>>,
    pub loss_cce: Option<Tensor<1>>,
    pub mvc_output: Option<Tensor<2>>,
    pub mvc_zero_probs: Option<Tensor<2>>,
    pub loss_ecs: Option<Tensor<1>>,
    pub dab_output: Option<Tensor<2>>,
}

/// The embedding stage's result: what `_encode` feeds the transformer, plus the normalised
/// gene embeddings the MVC decoder queries (`cur_gene_token_embs`).
#[derive(Debug, Clone)]
pub struct Embedded {
    pub total_embs: Tensor<3>,
    pub gene_embs: Tensor<3>,
}

#[derive(Module, Debug)]
pub struct TransformerModel {
    pub encoder: GeneEncoder,
    /// `dev-temp` only: row 1 is added to generated-token embeddings; row 0 is never used.
    pub flag_encoder: Option<Embedding>,
    /// `None` for `input_emb_style = "scaling"`.
    pub value_encoder: Option<ValueEncoder>,
    pub batch_encoder: Option<EmbeddingNorm>,
    pub dsbn: Option<DomainSpecificBatchNorm>,
    pub bn: Option<BatchNorm1d>,
    pub transformer_encoder: TransformerEncoder,
    pub decoder: ExprDecoder,
    /// Always built, as in 0.2.4 (the whole-human checkpoint has none: it reports missing).
    pub cls_decoder: ClsDecoder,
    pub mvc_decoder: Option<MvcDecoder>,
    pub grad_reverse_discriminator: Option<AdversarialDiscriminator>,
    #[module(skip)]
    pub config: ModelConfig,
}

impl ModelConfig {
    /// Builds a freshly initialised model (original initialisation, see `layers.rs`).
    pub fn init(&self, device: &Device) -> Result<TransformerModel> {
        self.validate()?;
        let d = self.d_model;
        let p = self.dropout;
        let value_encoder = match self.input_emb_style {
            InputEmbStyle::Continuous => {
                Some(ValueEncoder::Continuous(ContinuousValueEncoder::new(d, p, device)))
            }
            InputEmbStyle::Category => {
                Some(ValueEncoder::Category(EmbeddingNorm::new(self.category_rows(), d, device)))
            }
            InputEmbStyle::Scaling => None,
        };
        let n_batch = self.num_batch_labels.unwrap_or(0);
        let d_in = if self.use_batch_labels { 2 * d } else { d };
        Ok(TransformerModel {
            encoder: GeneEncoder::new(self.ntoken, d, self.pad_token_id, device),
            flag_encoder: self
                .use_generative_training
                .then(|| EmbeddingConfig::new(2, d).init(device)),
            value_encoder,
            batch_encoder: self
                .use_batch_labels
                .then(|| EmbeddingNorm::new(n_batch, d, device)),
            dsbn: (self.domain_spec_batchnorm == BatchNormStyle::Dsbn)
                .then(|| DomainSpecificBatchNorm::new(d, n_batch, device)),
            bn: (self.domain_spec_batchnorm == BatchNormStyle::BatchNorm)
                .then(|| BatchNorm1d::new(d, true, device)),
            transformer_encoder: TransformerEncoder {
                layers: (0..self.nlayers)
                    .map(|_| EncoderLayer::new(d, self.nhead, self.d_hid, p, device))
                    .collect(),
            },
            decoder: ExprDecoder::new(d, d_in, self.explicit_zero_prob, device),
            cls_decoder: ClsDecoder::new(d, self.n_cls, self.nlayers_cls, device),
            mvc_decoder: self.do_mvc.then(|| {
                MvcDecoder::new(
                    d,
                    d_in,
                    self.explicit_zero_prob,
                    self.mvc_decoder_style == MvcDecoderStyle::InnerProductDetach,
                    device,
                )
            }),
            grad_reverse_discriminator: self
                .do_dab
                .then(|| AdversarialDiscriminator::new(d, n_batch, 3, true, device)),
            config: self.clone(),
        })
    }
}

/// Reads a small integer tensor to the host (batch labels, value ranges).
fn host_ints<const D: usize>(t: &Tensor<D, Int>) -> Vec<i64> {
    t.clone()
        .into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("converted to i64 above")
}

impl TransformerModel {
    pub fn device(&self) -> Device {
        self.encoder.embedding.weight.device()
    }

    fn check_shapes(&self, src: &Tensor<2, Int>, values: Option<&Tensor<2>>, mask: Option<&Tensor<2, Bool>>) -> Result<()> {
        let dims = src.dims();
        if let Some(v) = values {
            if v.dims() != dims {
                return Err(ModelError::input("values", format!("shape {:?} differs from src {:?}", v.dims(), dims)));
            }
        }
        if let Some(m) = mask {
            if m.dims() != dims {
                return Err(ModelError::input(
                    "src_key_padding_mask",
                    format!("shape {:?} differs from src {:?}", m.dims(), dims),
                ));
            }
        }
        if dims[0] == 0 || dims[1] == 0 {
            return Err(ModelError::input("src", format!("empty batch {dims:?}")));
        }
        Ok(())
    }

    /// The original's `_check_batch_labels`, plus range checks PyTorch would only report as
    /// an opaque index error.
    fn check_batch_labels(&self, batch_labels: Option<&Tensor<1, Int>>, batch: usize) -> Result<()> {
        let c = &self.config;
        let needed = c.use_batch_labels || c.domain_spec_batchnorm != BatchNormStyle::None;
        match (needed, batch_labels) {
            (true, None) => Err(ModelError::input(
                "batch_labels",
                "required when use_batch_labels or domain_spec_batchnorm is on",
            )),
            (false, Some(_)) => Err(ModelError::input(
                "batch_labels",
                "should only be provided when use_batch_labels or domain_spec_batchnorm is on",
            )),
            (_, Some(b)) => {
                if b.dims() != [batch] {
                    return Err(ModelError::input("batch_labels", format!("shape {:?}, expected [{batch}]", b.dims())));
                }
                let n = c.num_batch_labels.map(|n| n as i64).unwrap_or(i64::MAX);
                if let Some(bad) = host_ints(b).into_iter().find(|&x| x < 0 || x >= n) {
                    return Err(ModelError::input("batch_labels", format!("label {bad} outside 0..{n}")));
                }
                Ok(())
            }
            (false, None) => Ok(()),
        }
    }

    /// Gene + value embedding, then the optional batch norm (`_encode` up to the transformer).
    /// `values = None` embeds genes only (the original's `generate` without values).
    pub fn embed(
        &self,
        src: Tensor<2, Int>,
        values: Option<Tensor<2>>,
        batch_labels: Option<&Tensor<1, Int>>,
    ) -> Result<Embedded> {
        let gene_embs = self.encoder.forward(src);
        let total = match values {
            None => gene_embs.clone(),
            Some(values) => match (&self.value_encoder, self.config.input_emb_style) {
                (Some(ValueEncoder::Continuous(enc)), _) => gene_embs.clone() + enc.forward(values),
                (Some(ValueEncoder::Category(enc)), _) => {
                    // `values.long()`: truncation toward zero, then a table lookup that must be
                    // in range (PyTorch raises an index error otherwise).
                    let ids = values.int();
                    let rows = enc.num_embeddings() as i64;
                    let lo = host_ints(&ids.clone().min());
                    let hi = host_ints(&ids.clone().max());
                    if lo[0] < 0 || hi[0] >= rows {
                        return Err(ModelError::input(
                            "values",
                            format!(
                                "category input needs integer values in 0..{rows}, got {}..={}",
                                lo[0], hi[0]
                            ),
                        ));
                    }
                    gene_embs.clone() + enc.forward(ids)
                }
                (None, _) => gene_embs.clone() * values.unsqueeze_dim::<3>(2),
            },
        };
        let total = if let Some(dsbn) = &self.dsbn {
            // The domain of the whole minibatch is its first label, as in the original (the
            // sampler guarantees one domain per batch).
            let labels = batch_labels.ok_or_else(|| ModelError::input("batch_labels", "required by DSBN"))?;
            let domain = host_ints(&labels.clone().slice([0..1]))[0] as usize;
            let bn = dsbn.bns.get(domain).ok_or_else(|| {
                ModelError::input("batch_labels", format!("domain {domain} >= number of domains {}", dsbn.bns.len()))
            })?;
            bn.forward(total.swap_dims(1, 2)).swap_dims(1, 2)
        } else if let Some(bn) = &self.bn {
            bn.forward(total.swap_dims(1, 2)).swap_dims(1, 2)
        } else {
            total
        };
        Ok(Embedded { total_embs: total, gene_embs })
    }

    /// The original's `_encode`: embedding, optional batch norm, transformer. `[B, L, d]`.
    pub fn encode(
        &self,
        src: Tensor<2, Int>,
        values: Tensor<2>,
        src_key_padding_mask: Tensor<2, Bool>,
        batch_labels: Option<&Tensor<1, Int>>,
    ) -> Result<Tensor<3>> {
        Ok(self.encode_with_embs(src, values, src_key_padding_mask, batch_labels)?.0)
    }

    fn encode_with_embs(
        &self,
        src: Tensor<2, Int>,
        values: Tensor<2>,
        src_key_padding_mask: Tensor<2, Bool>,
        batch_labels: Option<&Tensor<1, Int>>,
    ) -> Result<(Tensor<3>, Tensor<3>)> {
        self.check_shapes(&src, Some(&values), Some(&src_key_padding_mask))?;
        self.check_batch_labels(batch_labels, src.dims()[0])?;
        let emb = self.embed(src, Some(values), batch_labels)?;
        let out = self
            .transformer_encoder
            .forward(emb.total_embs, Some(src_key_padding_mask));
        Ok((out, emb.gene_embs))
    }

    /// `_get_cell_emb_from_layer`. `weights` (the raw input values) is needed for w-pool.
    pub fn cell_emb_from_layer(&self, out: Tensor<3>, weights: Option<Tensor<2>>) -> Result<Tensor<2>> {
        let [b, _, d] = out.dims();
        Ok(match self.config.cell_emb_style {
            CellEmbStyle::Cls => out.slice([0..b, 0..1, 0..d]).reshape([b, d]),
            // Over all L positions: the original does not exclude padding.
            CellEmbStyle::AvgPool => out.mean_dim(1).reshape([b, d]),
            CellEmbStyle::WPool => {
                let w = weights.ok_or_else(|| ModelError::input("values", "w-pool needs the input values as weights"))?;
                let s = (out * w.unsqueeze_dim::<3>(2)).sum_dim(1).reshape([b, d]);
                l2_normalize(s)
            }
        })
    }

    fn batch_emb(&self, batch_labels: Option<&Tensor<1, Int>>) -> Option<Tensor<2>> {
        let enc = self.batch_encoder.as_ref()?;
        let labels = batch_labels?.clone();
        let b = labels.dims()[0];
        let d = self.config.d_model;
        Some(enc.forward(labels.unsqueeze_dim::<2>(1)).reshape([b, d]))
    }

    /// The expression decoder on the transformer output, with the batch embedding
    /// concatenated onto every position when `use_batch_labels`.
    fn decode_expr(&self, out: Tensor<3>, batch_emb: Option<&Tensor<2>>) -> (Tensor<2>, Option<Tensor<2>>) {
        let x = match batch_emb {
            Some(be) => {
                let [b, l, d] = out.dims();
                let be = be.clone().unsqueeze_dim::<3>(1).expand([b, l, d]);
                Tensor::cat(vec![out, be], 2)
            }
            None => out,
        };
        self.decoder.forward(x)
    }

    /// The original's `forward`.
    pub fn forward(&self, input: ModelInput, flags: ForwardFlags) -> Result<ModelOutput> {
        let ModelInput { src, values, src_key_padding_mask, batch_labels } = input;
        let labels = batch_labels.as_ref();
        let (out, gene_embs) =
            self.encode_with_embs(src.clone(), values.clone(), src_key_padding_mask.clone(), labels)?;
        let batch_emb = if self.config.use_batch_labels { self.batch_emb(labels) } else { None };

        let (pred, zero_probs) = self.decode_expr(out.clone(), batch_emb.as_ref());
        let explicit = self.config.explicit_zero_prob;
        let mlm_output = match (&zero_probs, explicit && flags.do_sample) {
            (Some(z), true) => bernoulli(z.clone()) * pred,
            _ => pred,
        };

        let cell_emb = self.cell_emb_from_layer(out.clone(), Some(values.clone()))?;

        let cls_output = flags.cls.then(|| self.cls_decoder.forward(cell_emb.clone()));

        let loss_cce = if flags.cce {
            // A second encoder pass (different dropout mask in training). The original calls
            // `_get_cell_emb_from_layer` without weights here, so w-pool fails there too.
            let out2 = self.encode(src, values, src_key_padding_mask, labels)?;
            let cell2 = self.cell_emb_from_layer(out2, None)?;
            Some(contrastive_loss(cell_emb.clone(), cell2, 0.5))
        } else {
            None
        };

        let (mvc_output, mvc_zero_probs) = if flags.mvc {
            let dec = self.mvc_decoder.as_ref().ok_or_else(|| {
                ModelError::input("flags.mvc", "the model was built without do_mvc")
            })?;
            let c = match &batch_emb {
                Some(be) => Tensor::cat(vec![cell_emb.clone(), be.clone()], 1),
                None => cell_emb.clone(),
            };
            let (p, z) = dec.forward(c, gene_embs);
            let p = match (&z, explicit && flags.do_sample) {
                (Some(z), true) => bernoulli(z.clone()) * p,
                _ => p,
            };
            (Some(p), z)
        } else {
            (None, None)
        };

        let loss_ecs = flags
            .ecs
            .then(|| elastic_cell_similarity(cell_emb.clone(), self.config.ecs_threshold));

        let dab_output = self
            .grad_reverse_discriminator
            .as_ref()
            .map(|d| d.forward(cell_emb.clone()));

        Ok(ModelOutput {
            transformer_output: out,
            mlm_output,
            mlm_zero_probs: if explicit { zero_probs } else { None },
            cell_emb,
            cls_output,
            loss_cce,
            mvc_output,
            mvc_zero_probs,
            loss_ecs,
            dab_output,
        })
    }

    /// The original's `generate`: embed `src` (+ `values`), overwrite position 0 with
    /// `cell_emb`, run the encoder (unmasked unless a mask is given) and return the expression
    /// prediction `[B, L]`. A single pass, as in the original.
    pub fn generate(
        &self,
        cell_emb: Tensor<2>,
        src: Tensor<2, Int>,
        values: Option<Tensor<2>>,
        src_key_padding_mask: Option<Tensor<2, Bool>>,
        batch_labels: Option<Tensor<1, Int>>,
    ) -> Result<Tensor<2>> {
        self.check_shapes(&src, values.as_ref(), src_key_padding_mask.as_ref())?;
        let [b, l] = src.dims();
        // The original substitutes zeros (with a warning) when labels are required but absent.
        let batch_labels = match batch_labels {
            None if self.config.use_batch_labels || self.config.domain_spec_batchnorm != BatchNormStyle::None => {
                Some(Tensor::<1, Int>::zeros([b], &self.device()))
            }
            other => other,
        };
        let labels = batch_labels.as_ref();
        let emb = self.embed(src, values, labels)?;
        let d = self.config.d_model;
        let total = emb
            .total_embs
            .slice_assign([0..b, 0..1, 0..d], cell_emb.reshape([b, 1, d]));
        let mask = src_key_padding_mask
            .unwrap_or_else(|| Tensor::<2, Bool>::from_data(TensorData::new(vec![false; b * l], [b, l]), &self.device()));
        let out = self.transformer_encoder.forward(total, Some(mask));
        let batch_emb = if self.config.use_batch_labels { self.batch_emb(labels) } else { None };
        Ok(self.decode_expr(out, batch_emb.as_ref()).0)
    }

    /// The original's `encode_batch`: `_encode` in chunks of `batch_size`, returning either the
    /// whole output `[N, L, d]` or one position `[N, d]` (`time_step`, 0 for the cell embedding).
    pub fn encode_batch(
        &self,
        input: &ModelInput,
        batch_size: usize,
        time_step: Option<usize>,
    ) -> Result<Tensor<3>> {
        if batch_size == 0 {
            return Err(ModelError::input("batch_size", "must be > 0"));
        }
        let [n, l] = input.src.dims();
        let d = self.config.d_model;
        let mut chunks = Vec::new();
        for start in (0..n).step_by(batch_size) {
            let end = (start + batch_size).min(n);
            let labels = input.batch_labels.as_ref().map(|b| b.clone().slice([start..end]));
            let out = self.encode(
                input.src.clone().slice([start..end, 0..l]),
                input.values.clone().slice([start..end, 0..l]),
                input.src_key_padding_mask.clone().slice([start..end, 0..l]),
                labels.as_ref(),
            )?;
            let out = match time_step {
                Some(t) if t < l => out.slice([0..end - start, t..t + 1, 0..d]),
                Some(t) => return Err(ModelError::input("time_step", format!("{t} >= sequence length {l}"))),
                None => out,
            };
            chunks.push(out.detach());
        }
        Ok(Tensor::cat(chunks, 0))
    }
}

/// `F.normalize(x, p=2, dim=1)`: x / max(‖x‖, 1e-12).
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Samples Bernoulli(p) elementwise as 0/1 floats.
fn bernoulli(p: Tensor<2>) -> Tensor<2> {
    let u = p.random_like(Distribution::Uniform(0.0, 1.0));
    u.lower(p.detach()).float()
}

/// CCE: `cos(c1_i, c2_j) / temp` for all pairs, cross-entropy against the diagonal
/// (SimCSE-style). Single-process; the original all-gathers across ranks first.
pub fn contrastive_loss(c1: Tensor<2>, c2: Tensor<2>, temp: f64) -> Tensor<1> {
    let b = c1.dims()[0];
    // nn.CosineSimilarity(eps=1e-8) clamps each norm separately.
    let n1 = c1.clone().square().sum_dim(1).sqrt().clamp_min(1e-8);
    let n2 = c2.clone().square().sum_dim(1).sqrt().clamp_min(1e-8);
    let cos = (c1 / n1).matmul((c2 / n2).transpose()).div_scalar(temp); // [B, B]
    let logp = log_softmax(cos, 1);
    let eye = Tensor::<2>::eye(b, &logp.device());
    (logp * eye).sum().neg().div_scalar(b as f64).reshape([1])
}

/// ECS: `mean(1 − (relu(S with zero diagonal) − θ)²)` over all B×B entries, `S` the cosine
/// similarity of the L2-normalised cell embeddings.
pub fn elastic_cell_similarity(cell_emb: Tensor<2>, threshold: f64) -> Tensor<1> {
    let b = cell_emb.dims()[0];
    let c = l2_normalize(cell_emb);
    let s = c.clone().matmul(c.transpose());
    let eye = Tensor::<2>::eye(b, &s.device()).bool();
    let s = burn::tensor::activation::relu(s.mask_fill(eye, 0.0));
    (s.sub_scalar(threshold).square().neg().add_scalar(1.0)).mean()
}
