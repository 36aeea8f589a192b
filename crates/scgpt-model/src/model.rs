//! `TransformerModel`: the original's model (scgpt 0.2.4 `scgpt/model/model.py`), plus the
//! `dev-temp` `flag_encoder` when built for generative pretraining.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Bool, Device, Distribution, Int, Tensor, TensorData};

use crate::config::{BatchNormStyle, CellEmbStyle, InputEmbStyle, ModelConfig, MvcDecoderStyle};
use crate::error::{ModelError, Result};
use crate::layers::{
    AdversarialDiscriminator, BatchNorm1d, ClsDecoder, ContinuousValueEncoder, DomainSpecificBatchNorm, EmbeddingNorm, ExprDecoder,
    GeneEncoder, MvcDecoder, TransformerEncoder, ValueEncoder,
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
    /// With CCE: the two views' cell embeddings `[B, d]` (for a loss gathered across ranks).
    pub cce_views: Option<(Tensor<2>, Tensor<2>)>,
    pub mvc_output: Option<Tensor<2>>,
    pub mvc_zero_probs: Option<Tensor<2>>,
    pub loss_ecs: Option<Tensor<1>>,
    pub dab_output: Option<Tensor<2>>,
}

pub(crate) struct Heads {
    pub cls_output: Option<Tensor<2>>,
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
    /// Builds a freshly initialised model (original initialisation, see `layers/`).
    pub fn init(&self, device: &Device) -> Result<TransformerModel> {
        self.validate()?;
        let d = self.d_model;
        let p = self.dropout;
        let value_encoder = match self.input_emb_style {
            InputEmbStyle::Continuous => Some(ValueEncoder::Continuous(ContinuousValueEncoder::new(d, p, device))),
            InputEmbStyle::Category => {
                Some(ValueEncoder::Category(EmbeddingNorm::new(self.category_rows(), d, Some(self.pad_value as usize), device)))
            }
            InputEmbStyle::Scaling => None,
        };
        let n_batch = self.num_batch_labels.unwrap_or(0);
        let d_in = if self.use_batch_labels { 2 * d } else { d };
        Ok(TransformerModel {
            encoder: GeneEncoder::new(self.ntoken, d, self.pad_token_id, device),
            flag_encoder: self.use_generative_training.then(|| EmbeddingConfig::new(2, d).init(device)),
            value_encoder,
            batch_encoder: self.use_batch_labels.then(|| EmbeddingNorm::new(n_batch, d, None, device)),
            dsbn: (self.domain_spec_batchnorm == BatchNormStyle::Dsbn).then(|| DomainSpecificBatchNorm::new(d, n_batch, device)),
            bn: (self.domain_spec_batchnorm == BatchNormStyle::BatchNorm).then(|| BatchNorm1d::new(d, true, device)),
            transformer_encoder: TransformerEncoder::new(d, self.nhead, self.d_hid, p, self.nlayers, self.identical_layer_init, device),
            decoder: ExprDecoder::new(d, d_in, self.explicit_zero_prob, device),
            cls_decoder: ClsDecoder::new(d, self.n_cls, self.nlayers_cls, device),
            mvc_decoder: self.do_mvc.then(|| {
                MvcDecoder::new(d, d_in, self.explicit_zero_prob, self.mvc_decoder_style == MvcDecoderStyle::InnerProductDetach, device)
            }),
            grad_reverse_discriminator: self.do_dab.then(|| AdversarialDiscriminator::new(d, n_batch, 3, true, device)),
            config: self.clone(),
        })
    }
}

/// Reads a small integer tensor to the host (batch labels, value ranges).
pub(crate) fn host_ints<const D: usize>(t: &Tensor<D, Int>) -> Vec<i64> {
    t.clone().into_data().convert::<i64>().try_into_vec::<i64>().expect("converted to i64 above")
}

impl TransformerModel {
    /// The model computing training steps with attention `mode` (`run.attention`).
    pub fn with_attention(mut self, mode: crate::layers::AttentionMode) -> Self {
        self.transformer_encoder = self.transformer_encoder.with_attention(mode);
        self
    }

    pub fn device(&self) -> Device {
        self.encoder.embedding.weight.lazy_device()
    }

    pub(crate) fn check_shapes(&self, src: &Tensor<2, Int>, values: Option<&Tensor<2>>, mask: Option<&Tensor<2, Bool>>) -> Result<()> {
        let dims = src.dims();
        if let Some(v) = values {
            if v.dims() != dims {
                return Err(ModelError::input("values", format!("shape {:?} differs from src {:?}", v.dims(), dims)));
            }
        }
        if let Some(m) = mask {
            if m.dims() != dims {
                return Err(ModelError::input("src_key_padding_mask", format!("shape {:?} differs from src {:?}", m.dims(), dims)));
            }
        }
        if dims[0] == 0 || dims[1] == 0 {
            return Err(ModelError::input("src", format!("empty batch {dims:?}")));
        }
        Ok(())
    }

    /// The original's `_check_batch_labels`, plus range checks PyTorch would only report as
    /// an opaque index error.
    pub(crate) fn check_batch_labels(&self, batch_labels: Option<&Tensor<1, Int>>, batch: usize) -> Result<()> {
        let c = &self.config;
        let needed = c.use_batch_labels || c.domain_spec_batchnorm != BatchNormStyle::None;
        match (needed, batch_labels) {
            (true, None) => Err(ModelError::input("batch_labels", "required when use_batch_labels or domain_spec_batchnorm is on")),
            (false, Some(_)) => {
                Err(ModelError::input("batch_labels", "should only be provided when use_batch_labels or domain_spec_batchnorm is on"))
            }
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
    pub fn embed(&self, src: Tensor<2, Int>, values: Option<Tensor<2>>, batch_labels: Option<&Tensor<1, Int>>) -> Result<Embedded> {
        let gene_embs = self.encoder.forward(src);
        let total = match values {
            None => gene_embs.clone(),
            Some(values) => self.add_values(gene_embs.clone(), values)?,
        };
        let total = self.batch_norm(total, batch_labels)?;
        Ok(Embedded { total_embs: total, gene_embs })
    }

    /// Gene embedding ⊕ value embedding by `input_emb_style`: + ContinuousValueEncoder,
    /// + CategoryValueEncoder, or × value ("scaling").
    pub(crate) fn add_values(&self, gene_embs: Tensor<3>, values: Tensor<2>) -> Result<Tensor<3>> {
        Ok(match &self.value_encoder {
            Some(ValueEncoder::Continuous(enc)) => gene_embs + enc.forward(values),
            Some(ValueEncoder::Category(enc)) => {
                // `values.long()`: truncation toward zero, then a table lookup that must be in
                // range (PyTorch raises an opaque index error otherwise).
                let ids = values.int();
                let rows = enc.num_embeddings() as i64;
                let lo = host_ints(&ids.clone().min())[0];
                let hi = host_ints(&ids.clone().max())[0];
                if lo < 0 || hi >= rows {
                    return Err(ModelError::input("values", format!("category input needs integer values in 0..{rows}, got {lo}..={hi}")));
                }
                gene_embs + enc.forward(ids)
            }
            None => gene_embs * values.unsqueeze_dim::<3>(2),
        })
    }

    /// DSBN (domain = first label of the minibatch, the sampler guarantees one domain per
    /// batch) or plain BatchNorm over `[B, L, d]`, if the model has one.
    pub(crate) fn batch_norm(&self, total: Tensor<3>, batch_labels: Option<&Tensor<1, Int>>) -> Result<Tensor<3>> {
        Ok(if let Some(dsbn) = &self.dsbn {
            let labels = batch_labels.ok_or_else(|| ModelError::input("batch_labels", "required by DSBN"))?;
            let domain = host_ints(&labels.clone().slice(0..1))[0] as usize;
            let bn = dsbn
                .bns
                .get(domain)
                .ok_or_else(|| ModelError::input("batch_labels", format!("domain {domain} >= number of domains {}", dsbn.bns.len())))?;
            bn.forward(total.swap_dims(1, 2)).swap_dims(1, 2)
        } else if let Some(bn) = &self.bn {
            bn.forward(total.swap_dims(1, 2)).swap_dims(1, 2)
        } else {
            total
        })
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
        let out = self.transformer_encoder.forward(emb.total_embs, Some(src_key_padding_mask));
        Ok((out, emb.gene_embs))
    }

    /// `_get_cell_emb_from_layer`. `weights` (the raw input values) is needed for w-pool.
    pub fn cell_emb_from_layer(&self, out: Tensor<3>, weights: Option<Tensor<2>>) -> Result<Tensor<2>> {
        cell_emb_from_layer(self.config.cell_emb_style, out, weights)
    }

    pub(crate) fn batch_emb(&self, batch_labels: Option<&Tensor<1, Int>>) -> Option<Tensor<2>> {
        let enc = self.batch_encoder.as_ref()?;
        let labels = batch_labels?.clone();
        let b = labels.dims()[0];
        let d = self.config.d_model;
        Some(enc.forward(labels.unsqueeze_dim::<2>(1)).reshape([b, d]))
    }

    /// The expression decoder on the transformer output, with the batch embedding
    /// concatenated onto every position when `use_batch_labels`.
    pub(crate) fn decode_expr(&self, out: Tensor<3>, batch_emb: Option<&Tensor<2>>) -> (Tensor<2>, Option<Tensor<2>>) {
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
        let (out, gene_embs) = self.encode_with_embs(src.clone(), values.clone(), src_key_padding_mask.clone(), labels)?;
        let batch_emb = if self.config.use_batch_labels { self.batch_emb(labels) } else { None };

        let (pred, zero_probs) = self.decode_expr(out.clone(), batch_emb.as_ref());
        let explicit = self.config.explicit_zero_prob;
        let mlm_output = match (&zero_probs, explicit && flags.do_sample) {
            (Some(z), true) => bernoulli(z.clone()) * pred,
            _ => pred,
        };

        let cell_emb = self.cell_emb_from_layer(out.clone(), Some(values.clone()))?;

        let (loss_cce, cce_views) = if flags.cce {
            // A second encoder pass (different dropout mask in training). The original calls
            // `_get_cell_emb_from_layer` without weights here, so w-pool fails there too.
            let out2 = self.encode(src, values, src_key_padding_mask, labels)?;
            let cell2 = self.cell_emb_from_layer(out2, None)?;
            (Some(contrastive_loss(cell_emb.clone(), cell2.clone(), 0.5)), Some((cell_emb.clone(), cell2)))
        } else {
            (None, None)
        };

        let heads = self.heads(&cell_emb, gene_embs, batch_emb.as_ref(), flags)?;
        Ok(ModelOutput {
            transformer_output: out,
            mlm_output,
            mlm_zero_probs: if explicit { zero_probs } else { None },
            cell_emb,
            cls_output: heads.cls_output,
            loss_cce,
            cce_views,
            mvc_output: heads.mvc_output,
            mvc_zero_probs: heads.mvc_zero_probs,
            loss_ecs: heads.loss_ecs,
            dab_output: heads.dab_output,
        })
    }

    /// The heads that read the cell embedding (the original's `_extend_output` in `dev-temp`):
    /// CLS, MVC (with the batch embedding concatenated onto the cell embedding), ECS, DAB.
    pub(crate) fn heads(
        &self,
        cell_emb: &Tensor<2>,
        gene_embs: Tensor<3>,
        batch_emb: Option<&Tensor<2>>,
        flags: ForwardFlags,
    ) -> Result<Heads> {
        let cls_output = flags.cls.then(|| self.cls_decoder.forward(cell_emb.clone()));
        let (mvc_output, mvc_zero_probs) = if flags.mvc {
            let dec = self.mvc_decoder.as_ref().ok_or_else(|| ModelError::input("flags.mvc", "the model was built without do_mvc"))?;
            let c = match batch_emb {
                Some(be) => Tensor::cat(vec![cell_emb.clone(), be.clone()], 1),
                None => cell_emb.clone(),
            };
            let (p, z) = dec.forward(c, gene_embs);
            let p = match (&z, self.config.explicit_zero_prob && flags.do_sample) {
                (Some(z), true) => bernoulli(z.clone()) * p,
                _ => p,
            };
            (Some(p), z)
        } else {
            (None, None)
        };
        let loss_ecs = flags.ecs.then(|| elastic_cell_similarity(cell_emb.clone(), self.config.ecs_threshold));
        // The original runs the discriminator whenever it exists, without a flag.
        let dab_output = self.grad_reverse_discriminator.as_ref().map(|d| d.forward(cell_emb.clone()));
        Ok(Heads { cls_output, mvc_output, mvc_zero_probs, loss_ecs, dab_output })
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
        let total = emb.total_embs.slice_assign([0..b, 0..1, 0..d], cell_emb.reshape([b, 1, d]));
        let mask = src_key_padding_mask
            .unwrap_or_else(|| Tensor::<2, Bool>::from_data(TensorData::new(vec![false; b * l], [b, l]), &self.device()));
        let out = self.transformer_encoder.forward(total, Some(mask));
        let batch_emb = if self.config.use_batch_labels { self.batch_emb(labels) } else { None };
        Ok(self.decode_expr(out, batch_emb.as_ref()).0)
    }

    /// The original's `encode_batch` without `time_step`: `_encode` in chunks of `batch_size`
    /// (no gradient), `[N, L, d]`.
    pub fn encode_batch(&self, input: &ModelInput, batch_size: usize) -> Result<Tensor<3>> {
        let chunks = self.encode_chunks(input, batch_size, Ok)?;
        Ok(Tensor::cat(chunks, 0))
    }

    /// The original's `encode_batch(..., time_step=t)`: position `t` of every output, `[N, d]`
    /// (`t = 0` is the `<cls>` cell embedding the zero-shot pipeline L2-normalises).
    pub fn encode_batch_at(&self, input: &ModelInput, batch_size: usize, time_step: usize) -> Result<Tensor<2>> {
        let [_, l] = input.src.dims();
        if time_step >= l {
            return Err(ModelError::input("time_step", format!("{time_step} >= sequence length {l}")));
        }
        let d = self.config.d_model;
        let chunks = self.encode_chunks(input, batch_size, |out| {
            let b = out.dims()[0];
            Ok(out.slice([0..b, time_step..time_step + 1, 0..d]).reshape([b, d]))
        })?;
        Ok(Tensor::cat(chunks, 0))
    }

    fn encode_chunks<const D: usize>(
        &self,
        input: &ModelInput,
        batch_size: usize,
        mut take: impl FnMut(Tensor<3>) -> Result<Tensor<D>>,
    ) -> Result<Vec<Tensor<D>>> {
        if batch_size == 0 {
            return Err(ModelError::input("batch_size", "must be > 0"));
        }
        let [n, l] = input.src.dims();
        let mut chunks = Vec::new();
        for start in (0..n).step_by(batch_size) {
            let end = (start + batch_size).min(n);
            let labels = input.batch_labels.as_ref().map(|b| b.clone().slice(start..end));
            let out = self.encode(
                input.src.clone().slice([start..end, 0..l]),
                input.values.clone().slice([start..end, 0..l]),
                input.src_key_padding_mask.clone().slice([start..end, 0..l]),
                labels.as_ref(),
            )?;
            chunks.push(take(out.detach())?);
        }
        Ok(chunks)
    }
}

/// `_get_cell_emb_from_layer` (shared by `TransformerModel` and `TransformerGenerator`).
pub(crate) fn cell_emb_from_layer(style: CellEmbStyle, out: Tensor<3>, weights: Option<Tensor<2>>) -> Result<Tensor<2>> {
    let [b, _, d] = out.dims();
    Ok(match style {
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

/// `F.normalize(x, p=2, dim=1)`: x / max(‖x‖, 1e-12).
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(1e-12);
    x / norm
}

/// Samples Bernoulli(p) elementwise as 0/1 floats.
pub(crate) fn bernoulli(p: Tensor<2>) -> Tensor<2> {
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
