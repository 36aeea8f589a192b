//! The generative pretraining forward of the `dev-temp` branch (reference §2.2), the code that
//! trained the released checkpoints: "pcpt" tokens carry expression values and see each other;
//! "gen" tokens carry only gene + `flag_encoder[1]` and see all pcpt tokens plus themselves.

use burn::tensor::{Bool, Int, Tensor};

use crate::config::{BatchNormStyle, InputEmbStyle};
use crate::error::{ModelError, Result};
use crate::model::{bernoulli, ForwardFlags, TransformerModel};

/// One generative minibatch (collator `data_style="both"`).
#[derive(Debug, Clone)]
pub struct GenerativeInput {
    /// `[B, P]`, `<cls>` first.
    pub pcpt_genes: Tensor<2, Int>,
    /// `[B, P]` binned values (−2 at `<cls>` and padding).
    pub pcpt_values: Tensor<2>,
    /// `[B, P]`, true = padding.
    pub pcpt_key_padding_mask: Tensor<2, Bool>,
    /// `[B, G]`; `None` runs the pcpt stream alone.
    pub gen_genes: Option<Tensor<2, Int>>,
    /// `[B, G]`, true = padding; `None` = no padding.
    pub gen_key_padding_mask: Option<Tensor<2, Bool>>,
    pub batch_labels: Option<Tensor<1, Int>>,
    /// `[B, d]`: replaces the `<cls>` input embedding (the cell-prompt second pass).
    pub input_cell_emb: Option<Tensor<2>>,
}

/// The original's `generative_forward` dict.
#[derive(Debug, Clone)]
pub struct GenerativeOutput {
    /// `[B, P + G, d]`: pcpt outputs then gen outputs.
    pub transformer_output: Tensor<3>,
    /// `[B, P]`.
    pub pcpt_preds: Tensor<2>,
    /// `[B, G]`, present when gen tokens were given.
    pub gen_preds: Option<Tensor<2>>,
    /// `[B, P + G]` with explicit_zero_prob.
    pub zero_probs: Option<Tensor<2>>,
    /// `[B, d]` from the concatenated output (position 0 = pcpt `<cls>` for "cls").
    pub cell_emb: Tensor<2>,
    pub cls_output: Option<Tensor<2>>,
    /// `[B, P + G]`, queried with the pcpt and gen gene embeddings.
    pub mvc_output: Option<Tensor<2>>,
    pub mvc_zero_probs: Option<Tensor<2>>,
    pub loss_ecs: Option<Tensor<1>>,
    pub dab_output: Option<Tensor<2>>,
}

impl TransformerModel {
    /// The `dev-temp` `generative_forward`. Requires a model built with
    /// `use_generative_training` (it owns `flag_encoder`). `flags.cce` is ignored, as in the
    /// original.
    pub fn generative_forward(&self, input: GenerativeInput, flags: ForwardFlags) -> Result<GenerativeOutput> {
        let flag_encoder = self
            .flag_encoder
            .as_ref()
            .ok_or_else(|| ModelError::input("generative_forward", "the model was built without use_generative_training"))?;
        if self.config.input_emb_style == InputEmbStyle::Scaling {
            return Err(ModelError::input("generative_forward", "the original asserts input_emb_style != scaling"));
        }
        if self.config.domain_spec_batchnorm == BatchNormStyle::BatchNorm {
            return Err(ModelError::input(
                "generative_forward",
                "plain batchnorm is not part of the original's generative model (only DSBN)",
            ));
        }
        let GenerativeInput {
            pcpt_genes,
            pcpt_values,
            pcpt_key_padding_mask,
            gen_genes,
            gen_key_padding_mask,
            batch_labels,
            input_cell_emb,
        } = input;
        self.check_shapes(&pcpt_genes, Some(&pcpt_values), Some(&pcpt_key_padding_mask))?;
        let [b, p] = pcpt_genes.dims();
        let d = self.config.d_model;
        if let Some(g) = &gen_genes {
            if g.dims()[0] != b {
                return Err(ModelError::input("gen_genes", format!("batch {} differs from pcpt batch {b}", g.dims()[0])));
            }
            self.check_shapes(g, None, gen_key_padding_mask.as_ref())?;
        } else if gen_key_padding_mask.is_some() {
            return Err(ModelError::input("gen_key_padding_mask", "given without gen_genes"));
        }
        if let Some(c) = &input_cell_emb {
            if c.dims() != [b, d] {
                return Err(ModelError::input("input_cell_emb", format!("shape {:?}, expected [{b}, {d}]", c.dims())));
            }
        }
        let labels = batch_labels.as_ref();
        self.check_batch_labels(labels, b)?;

        let pcpt_embs = self.encoder.forward(pcpt_genes);
        let pcpt_total = self.add_values(pcpt_embs.clone(), pcpt_values)?;
        // DSBN normalises each stream on its own (separate batch statistics in training).
        let mut pcpt_total = self.batch_norm(pcpt_total, labels)?;
        if let Some(c) = input_cell_emb {
            pcpt_total = pcpt_total.slice_assign([0..b, 0..1, 0..d], c.reshape([b, 1, d]));
        }

        let (out, gene_embs, gen_len) = match gen_genes {
            Some(gen_genes) => {
                let g = gen_genes.dims()[1];
                let gen_embs = self.encoder.forward(gen_genes);
                // flag_encoder row 1 marks "to be generated"; row 0 is never used.
                let flag = flag_encoder.weight.val().slice([1..2, 0..d]).reshape([1, 1, d]);
                let gen_total = self.batch_norm(gen_embs.clone() + flag, labels)?;
                // Without padding the masks only cost time (mask_fill over [B, H, L, L]).
                let pcpt_mask = pcpt_key_padding_mask.clone().any().into_scalar::<bool>().then_some(pcpt_key_padding_mask);
                let (po, go) = self.transformer_encoder.forward_generative(pcpt_total, gen_total, pcpt_mask, gen_key_padding_mask);
                (Tensor::cat(vec![po, go], 1), Tensor::cat(vec![pcpt_embs, gen_embs], 1), g)
            }
            None => (self.transformer_encoder.forward(pcpt_total, Some(pcpt_key_padding_mask)), pcpt_embs, 0),
        };

        let batch_emb = if self.config.use_batch_labels { self.batch_emb(labels) } else { None };
        let (pred, zero_probs) = self.decode_expr(out.clone(), batch_emb.as_ref());
        let pred = match (&zero_probs, self.config.explicit_zero_prob && flags.do_sample) {
            (Some(z), true) => bernoulli(z.clone()) * pred,
            _ => pred,
        };
        let pcpt_preds = pred.clone().slice([0..b, 0..p]);
        let gen_preds = (gen_len > 0).then(|| pred.slice([0..b, p..p + gen_len]));

        // No weights here in the original either, so w-pool is an error in this mode.
        let cell_emb = self.cell_emb_from_layer(out.clone(), None)?;
        let heads = self.heads(&cell_emb, gene_embs, batch_emb.as_ref(), flags)?;
        Ok(GenerativeOutput {
            transformer_output: out,
            pcpt_preds,
            gen_preds,
            zero_probs,
            cell_emb,
            cls_output: heads.cls_output,
            mvc_output: heads.mvc_output,
            mvc_zero_probs: heads.mvc_zero_probs,
            loss_ecs: heads.loss_ecs,
            dab_output: heads.dab_output,
        })
    }
}
