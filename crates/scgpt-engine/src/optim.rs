//! Adam / AdamW with PyTorch's semantics, global-norm clipping, and the warmup + cosine schedule.
//!
//! Why not burn's optimisers: burn clips per tensor (scGPT clips the global norm), AdamW's
//! default eps is 1e-5 (PyTorch 1e-8), and burn keys optimiser state by `ParamId`, which a model
//! reloaded from a checkpoint does not keep. Here state is keyed by the parameter's module path
//! (`transformer_encoder.layers.3.self_attn.Wqkv.weight`), so a resumed run continues with
//! exactly the moments it saved, and the update is PyTorch's `torch.optim.Adam` formula step by
//! step: `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `p ← p − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε)`.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, Context};
use scgpt_model::burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use scgpt_model::burn::optim::GradientsParams;
use scgpt_model::burn::tensor::{DType, Tensor, TensorData};
use serde::{Deserialize, Serialize};

/// One trainable float parameter: its module path, id and shape, in visiting order.
#[derive(Debug, Clone)]
pub struct ParamEntry {
    pub path: String,
    pub id: ParamId,
    pub shape: Vec<usize>,
}

impl ParamEntry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Tracks the module path while visiting or mapping.
#[derive(Default)]
struct PathStack(Vec<String>);

impl PathStack {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn path(&self) -> String {
        self.0.join(".")
    }
}

struct ParamLister {
    path: PathStack,
    out: Vec<ParamEntry>,
}

impl ModuleVisitor for ParamLister {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.push(ParamEntry { path: self.path.path(), id: param.id, shape: param.lazy_shape().dims::<D>().to_vec() });
    }
}

/// The model's float parameters in a fixed order (the order of the module tree), with unique
/// paths: the layout of flattened gradient buffers and of the optimiser state.
pub fn list_params<M: Module>(model: &M) -> anyhow::Result<Vec<ParamEntry>> {
    let mut v = ParamLister { path: PathStack::default(), out: Vec::new() };
    model.visit(&mut v);
    let mut seen = std::collections::HashSet::new();
    for e in &v.out {
        if !seen.insert(e.path.clone()) {
            bail!("two parameters share the module path {:?}; optimiser state could not be keyed", e.path);
        }
    }
    Ok(v.out)
}

fn to_vec_f32<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("float tensor data")
}

/// Squared L2 norm of every gradient, summed in f64 (PyTorch's `clip_grad_norm_` total norm,
/// squared). Parameters without a gradient count as zero.
pub fn grad_sq_norm(grads: &GradientsParams, params: &[ParamEntry]) -> f64 {
    let mut parts: Vec<Tensor<1>> = Vec::with_capacity(params.len());
    for p in params {
        if let Some(g) = get_flat(grads, p) {
            parts.push(g.square().sum());
        }
    }
    if parts.is_empty() {
        return 0.0;
    }
    // One host transfer for all the partial sums, then an f64 total.
    let all = Tensor::cat(parts, 0);
    to_vec_f32(all).iter().map(|&x| x as f64).sum()
}

/// A parameter's gradient as a 1-D tensor, whatever its rank.
pub(crate) fn get_flat(grads: &GradientsParams, p: &ParamEntry) -> Option<Tensor<1>> {
    let n = p.numel();
    match p.shape.len() {
        1 => grads.get::<1>(p.id),
        2 => grads.get::<2>(p.id).map(|g| g.reshape([n])),
        3 => grads.get::<3>(p.id).map(|g| g.reshape([n])),
        4 => grads.get::<4>(p.id).map(|g| g.reshape([n])),
        _ => None,
    }
}

/// Registers a 1-D gradient under `p`, reshaped to the parameter's shape.
pub(crate) fn register_flat(grads: &mut GradientsParams, p: &ParamEntry, flat: Tensor<1>) {
    let s = &p.shape;
    match s.len() {
        1 => grads.register::<1>(p.id, flat),
        2 => grads.register::<2>(p.id, flat.reshape([s[0], s[1]])),
        3 => grads.register::<3>(p.id, flat.reshape([s[0], s[1], s[2]])),
        4 => grads.register::<4>(p.id, flat.reshape([s[0], s[1], s[2], s[3]])),
        _ => {}
    }
}

struct ParamCollector {
    out: Vec<f32>,
}

impl ModuleVisitor for ParamCollector {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out.extend_from_slice(&to_vec_f32(param.val()));
    }
}

/// Every float parameter in one host buffer, in [`list_params`] order (the data-parallel
/// start: rank 0's initial values are broadcast).
pub fn flatten_params<M: Module>(model: &M, params: &[ParamEntry]) -> Vec<f32> {
    let total: usize = params.iter().map(ParamEntry::numel).sum();
    let mut c = ParamCollector { out: Vec::with_capacity(total) };
    model.visit(&mut c);
    c.out
}

struct ParamLoader<'a> {
    flat: &'a [f32],
    off: usize,
    device: &'a scgpt_model::burn::tensor::Device,
}

impl ModuleMapper for ParamLoader<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let dims = tensor.dims();
        let n: usize = dims.iter().product();
        let data = TensorData::new(self.flat[self.off..self.off + n].to_vec(), dims);
        self.off += n;
        let mut t = Tensor::<D>::from_data(data, (self.device, tensor.dtype()));
        if require_grad {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

/// Replaces every float parameter with the values of `flat` ([`flatten_params`] layout).
pub fn load_flat_params<M: Module>(model: M, params: &[ParamEntry], flat: &[f32], device: &scgpt_model::burn::tensor::Device) -> M {
    debug_assert_eq!(flat.len(), params.iter().map(ParamEntry::numel).sum::<usize>());
    let mut l = ParamLoader { flat, off: 0, device };
    model.map(&mut l)
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW (decoupled decay) instead of Adam's L2 term.
    pub decoupled: bool,
}

/// Adam's moments, keyed by parameter path, stored flat.
pub struct Adam {
    pub config: AdamConfig,
    /// Optimiser steps taken (PyTorch's per-parameter `step`; all parameters step together).
    pub t: u64,
    moments: HashMap<String, (Tensor<1>, Tensor<1>)>,
}

struct AdamMapper<'a> {
    path: PathStack,
    adam: &'a mut Adam,
    grads: &'a mut GradientsParams,
    lr: f64,
    grad_scale: f64,
    t: u64,
}

impl ModuleMapper for AdamMapper<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let require_grad = tensor.is_require_grad();
        let dims = tensor.dims();
        let n: usize = dims.iter().product();
        let c = self.adam.config;
        let p: Tensor<1> = tensor.inner().reshape([n]);
        let mut g: Tensor<1> = grad.reshape([n]);
        if self.grad_scale != 1.0 {
            g = g.mul_scalar(self.grad_scale);
        }
        if !c.decoupled && c.weight_decay != 0.0 {
            g = g + p.clone().mul_scalar(c.weight_decay);
        }
        let key = self.path.path();
        // Moments loaded as f32 follow the gradients' dtype (bf16-pure); a same-dtype cast is
        // skipped, as a cast that changes nothing need not touch the tensor.
        let to_grad = |t: Tensor<1>| if t.dtype() == g.dtype() { t } else { t.cast(g.dtype()) };
        let (m, v) = match self.adam.moments.remove(&key).map(|(m, v)| (to_grad(m), to_grad(v))) {
            Some((m, v)) => {
                (m.mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1), v.mul_scalar(c.beta2) + g.square().mul_scalar(1.0 - c.beta2))
            }
            None => (g.clone().mul_scalar(1.0 - c.beta1), g.square().mul_scalar(1.0 - c.beta2)),
        };
        let t = self.t as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let mut p = p;
        if c.decoupled && c.weight_decay != 0.0 {
            p = p.mul_scalar(1.0 - self.lr * c.weight_decay);
        }
        let denom = v.clone().sqrt().div_scalar(bc2.sqrt()).add_scalar(c.eps);
        let p = p - (m.clone() / denom).mul_scalar(self.lr / bc1);
        self.adam.moments.insert(key, (m, v));
        let mut updated = Tensor::<D>::from_inner(p.reshape(dims));
        if require_grad {
            updated = updated.require_grad();
        }
        Param::from_mapped_value(id, updated, mapper)
    }
}

impl Adam {
    pub fn new(config: AdamConfig) -> Self {
        Adam { config, t: 0, moments: HashMap::new() }
    }

    /// One update of every parameter that has a gradient. `grad_scale` multiplies the
    /// gradients first (the clipping coefficient).
    pub fn step<M: Module>(&mut self, model: M, mut grads: GradientsParams, lr: f64, grad_scale: f64) -> M {
        self.t += 1;
        let t = self.t;
        let mut mapper = AdamMapper { path: PathStack::default(), adam: self, grads: &mut grads, lr, grad_scale, t };
        model.map(&mut mapper)
    }

    /// Writes `t`, the config and every moment (raw little-endian f32 after a JSON index):
    /// exact, so a resumed run continues bit for bit.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut index = BTreeMap::new();
        let mut data: Vec<u8> = Vec::new();
        let mut keys: Vec<&String> = self.moments.keys().collect();
        keys.sort();
        for k in keys {
            let (m, v) = &self.moments[k];
            let m = to_vec_f32(m.clone());
            let v = to_vec_f32(v.clone());
            index.insert(k.clone(), (data.len() / 4, m.len()));
            for x in m.iter().chain(v.iter()) {
                data.extend_from_slice(&x.to_le_bytes());
            }
        }
        let header = serde_json::to_vec(&OptimHeader { format: OPTIM_FORMAT.into(), t: self.t, config: self.config, index })?;
        scgpt_data::atomic::write_with(path, |f| {
            f.write_all(&(header.len() as u64).to_le_bytes())?;
            f.write_all(&header)?;
            f.write_all(&data)
        })
        .with_context(|| format!("{}: cannot write the optimiser state", path.display()))?;
        Ok(())
    }

    /// Reads [`save`](Self::save)'s file; every moment must match a parameter of `params`.
    pub fn load(path: &Path, params: &[ParamEntry], device: &scgpt_model::burn::tensor::Device) -> anyhow::Result<Self> {
        let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open the optimiser state", path.display()))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).with_context(|| format!("{}: truncated optimiser state", path.display()))?;
        let hlen = u64::from_le_bytes(len) as usize;
        anyhow::ensure!(hlen < 1 << 30, "{}: not an optimiser state file", path.display());
        let mut header = vec![0u8; hlen];
        f.read_exact(&mut header).with_context(|| format!("{}: truncated optimiser state", path.display()))?;
        let header: OptimHeader =
            serde_json::from_slice(&header).with_context(|| format!("{}: optimiser index is not valid", path.display()))?;
        anyhow::ensure!(header.format == OPTIM_FORMAT, "{}: format {:?}, expected {OPTIM_FORMAT:?}", path.display(), header.format);
        let mut data = Vec::new();
        f.read_to_end(&mut data)?;
        let floats: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let sizes: HashMap<&str, usize> = params.iter().map(|p| (p.path.as_str(), p.numel())).collect();
        let mut moments = HashMap::new();
        for (k, (off, n)) in header.index {
            match sizes.get(k.as_str()) {
                Some(&want) if want == n => {}
                Some(&want) => bail!("{}: moments of {k} have {n} values, the model's parameter has {want}", path.display()),
                None => bail!("{}: moments for {k}, which the model does not have", path.display()),
            }
            anyhow::ensure!(off + 2 * n <= floats.len(), "{}: truncated optimiser state (at {k})", path.display());
            // Saved as f32 and loaded as f32 whatever the device's default (mixed bf16 keeps fp32
            // moments); a step casts them to the gradients' dtype.
            let m = Tensor::<1>::from_data(TensorData::new(floats[off..off + n].to_vec(), [n]), (device, DType::F32));
            let v = Tensor::<1>::from_data(TensorData::new(floats[off + n..off + 2 * n].to_vec(), [n]), (device, DType::F32));
            moments.insert(k, (m, v));
        }
        Ok(Adam { config: header.config, t: header.t, moments })
    }
}

const OPTIM_FORMAT: &str = "scgpt-rs-adam-1";

#[derive(Serialize, Deserialize)]
struct OptimHeader {
    format: String,
    t: u64,
    config: AdamConfig,
    /// path → (offset in floats, numel); m then v.
    index: BTreeMap<String, (usize, usize)>,
}

/// The learning rate at optimizer step `step` (0-based: the rate used for the first update is
/// `lr(0)`), as transformers' `get_cosine_schedule_with_warmup`, which the original steps once
/// per batch: linear from 0 over `warmup`, then half a cosine down to 0 at `total`.
pub fn lr_at(base: f64, step: u64, warmup: u64, total: u64, cosine: bool) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    if !cosine {
        return base;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    base * (0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())).max(0.0)
}

/// Removes the gradients of `frozen` parameters, so they are neither clipped, counted in the
/// norm nor updated (PyTorch's `requires_grad=False`).
pub fn drop_grads(grads: &mut GradientsParams, frozen: &[ParamEntry]) {
    for p in frozen {
        match p.shape.len() {
            1 => drop(grads.remove::<1>(p.id)),
            2 => drop(grads.remove::<2>(p.id)),
            3 => drop(grads.remove::<3>(p.id)),
            4 => drop(grads.remove::<4>(p.id)),
            _ => {}
        }
    }
}

/// `clip_grad_norm_`'s coefficient for a total norm (1 when within `max_norm` or clipping is
/// off).
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (total_norm + 1e-6)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_matches_transformers() {
        // get_cosine_schedule_with_warmup(warmup=10, total=110): lambda(step)
        assert_eq!(lr_at(1.0, 0, 10, 110, true), 0.0);
        assert!((lr_at(1.0, 5, 10, 110, true) - 0.5).abs() < 1e-12);
        assert!((lr_at(1.0, 10, 10, 110, true) - 1.0).abs() < 1e-12);
        assert!((lr_at(1.0, 60, 10, 110, true) - 0.5).abs() < 1e-12);
        assert!(lr_at(1.0, 110, 10, 110, true).abs() < 1e-12);
        assert!((lr_at(2.0, 60, 10, 110, false) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn clip_coefficient_is_torch_s() {
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
        assert!((clip_coefficient(4.0, 1.0) - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
        assert_eq!(clip_coefficient(100.0, 0.0), 1.0);
    }
}
