//! Helpers shared by the checkpoint, export and perturbation tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use scgpt_model::burn::module::Module;
use scgpt_model::burn::store::burn_pack::Tensor as PackTensor;
use scgpt_model::burn::store::ModuleSnapshot;
use scgpt_model::burn::tensor::{Bool, Bytes, DType, Device, Int, Tensor, TensorData};
use scgpt_model::{ForwardFlags, ModelConfig, ModelInput, TransformerModel};
use serde_json::Value;

pub const NTOKEN: usize = 100;
pub const PAD_ID: usize = 97;

/// The fixtures; `SCGPT_TEST_DATA` overrides the build-time path (test binaries carried to
/// another machine by `launch/gpu_selftest.sh`).
pub fn data_dir() -> PathBuf {
    match std::env::var_os("SCGPT_TEST_DATA") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/model"),
    }
}

pub fn data(name: &str) -> PathBuf {
    data_dir().join(name)
}

pub fn fixture_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(data(&format!("{name}.json"))).unwrap()).unwrap()
}

pub fn fixture_config(name: &str) -> ModelConfig {
    ModelConfig::from_args_json(data(&format!("{name}.args.json")), NTOKEN).unwrap().with_pad_token_id(PAD_ID)
}

/// The fixtures' vocabulary: 97 genes, then `<pad>` 97, `<cls>` 98, `<eoc>` 99.
pub fn fixture_vocab() -> String {
    let mut m = serde_json::Map::new();
    for i in 0..97 {
        m.insert(format!("GENE{i}"), Value::from(i));
    }
    m.insert("<pad>".into(), Value::from(97));
    m.insert("<cls>".into(), Value::from(98));
    m.insert("<eoc>".into(), Value::from(99));
    serde_json::to_string(&Value::Object(m)).unwrap()
}

pub fn shape_of(v: &Value) -> Vec<usize> {
    v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

pub fn ints(v: &Value) -> Vec<i64> {
    v["data"].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

pub fn bools(v: &Value) -> Vec<bool> {
    v.as_array().unwrap().iter().map(|x| x.as_bool().unwrap()).collect()
}

/// The fixture's `inputs` as a `ModelInput`.
pub fn fixture_input(json: &Value, device: &Device) -> ModelInput {
    let inp = &json["inputs"];
    let shape = shape_of(&inp["src"]);
    let (b, l) = (shape[0], shape[1]);
    let labels = inp["batch_labels"].as_array().map(|a| {
        let v: Vec<i64> = a.iter().map(|x| x.as_i64().unwrap()).collect();
        Tensor::<1, Int>::from_data(TensorData::new(v, [b]), device)
    });
    ModelInput {
        src: Tensor::<2, Int>::from_data(TensorData::new(ints(&inp["src"]), [b, l]), device),
        values: Tensor::<2>::from_data(TensorData::new(floats(&inp["values"]), [b, l]), device),
        src_key_padding_mask: Tensor::<2, Bool>::from_data(TensorData::new(bools(&inp["src_key_padding_mask"]), [b, l]), device),
        batch_labels: labels,
    }
}

pub fn fixture_flags(json: &Value) -> ForwardFlags {
    let fl = &json["flags"];
    ForwardFlags {
        cls: fl["CLS"].as_bool().unwrap(),
        cce: fl["CCE"].as_bool().unwrap(),
        mvc: fl["MVC"].as_bool().unwrap(),
        ecs: fl["ECS"].as_bool().unwrap(),
        do_sample: false,
    }
}

pub fn values<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f32>) {
    let shape = t.dims().to_vec();
    (shape, t.into_data().convert::<f32>().try_into_vec().unwrap())
}

/// Every output of `forward` (plus `generate` from its cell embedding), by name.
pub fn all_outputs(model: &TransformerModel, input: &ModelInput, flags: ForwardFlags) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let out = model.forward(input.clone(), flags).unwrap();
    let generated = model
        .generate(
            out.cell_emb.clone(),
            input.src.clone(),
            Some(input.values.clone()),
            Some(input.src_key_padding_mask.clone()),
            input.batch_labels.clone(),
        )
        .unwrap();
    let mut m = BTreeMap::new();
    m.insert("transformer_output".into(), values(out.transformer_output));
    m.insert("mlm_output".into(), values(out.mlm_output));
    m.insert("cell_emb".into(), values(out.cell_emb));
    m.insert("generate".into(), values(generated));
    let opt2 = [
        ("mlm_zero_probs", out.mlm_zero_probs),
        ("cls_output", out.cls_output),
        ("mvc_output", out.mvc_output),
        ("mvc_zero_probs", out.mvc_zero_probs),
        ("dab_output", out.dab_output),
    ];
    for (k, v) in opt2 {
        if let Some(v) = v {
            m.insert(k.into(), values(v));
        }
    }
    for (k, v) in [("loss_ecs", out.loss_ecs), ("loss_cce", out.loss_cce)] {
        if let Some(v) = v {
            m.insert(k.into(), values(v));
        }
    }
    m
}

/// Every tensor of a module (burn names) with its dtype, shape and raw bytes.
pub fn all_tensors<M: ModuleSnapshot>(m: &M) -> BTreeMap<String, (DType, Vec<usize>, Vec<u8>)> {
    m.collect(None, None, false)
        .into_iter()
        .map(|t| {
            let name = t.name.clone();
            let (dtype, shape) = (t.dtype, t.shape.to_vec());
            (name, (dtype, shape, t.into_bytes().unwrap().to_vec()))
        })
        .collect()
}

/// A fresh, unique scratch directory path (not created).
pub fn scratch(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let base = std::env::temp_dir().join("scgpt-model-tests");
    std::fs::create_dir_all(&base).unwrap();
    base.join(format!("{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

/// Deterministic pseudo-random numbers in [0, 1) (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Perturbs every float tensor of `m` (parameters and BatchNorm buffers) so that no value
/// sits at a symmetric default (LayerNorm 1/0, running stats 0/1): a transposed or swapped
/// tensor then changes the outputs. Running variances stay positive.
pub fn randomise<M: ModuleSnapshot>(m: &mut M, seed: u64) {
    let mut rng = Rng::new(seed);
    let tensors: Vec<PackTensor> = m
        .collect(None, None, false)
        .into_iter()
        .map(|t| {
            let name = t.name.clone();
            let shape = t.shape.clone();
            let dtype = t.dtype;
            assert_eq!(dtype, DType::F32, "{name}");
            let bytes = t.into_bytes().unwrap();
            let vals: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .map(|v| {
                    let u = rng.next_f32();
                    if name.ends_with("running_var") {
                        0.5 + u
                    } else if name.ends_with("running_mean") {
                        0.6 * u - 0.3
                    } else {
                        v + 0.2 * u - 0.1
                    }
                })
                .collect();
            let out: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            PackTensor::new(name, dtype, shape, None, Bytes::from_bytes_vec(out))
        })
        .collect();
    let r = m.apply(tensors, None, None, false);
    assert!(r.errors.is_empty() && r.missing.is_empty(), "{r}");
}

pub fn device_of(m: &TransformerModel) -> Device {
    m.devices()[0].clone()
}

/// The device the parity tests run on: `SCGPT_TEST_DEVICE` = `cpu` (default, Flex), or
/// `vulkan` / `wgpu` / `cuda` in a build with that feature (`launch/gpu_selftest.sh`).
pub fn test_device() -> Device {
    let name = std::env::var("SCGPT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    match name.as_str() {
        "cpu" | "flex" => Device::flex(),
        #[cfg(feature = "vulkan")]
        "vulkan" => Device::vulkan(scgpt_model::burn::tensor::DeviceKind::DiscreteGpu(0)),
        // Vulkan on a CPU device (Mesa's lavapipe): the GPU kernels, checked without a GPU.
        #[cfg(feature = "vulkan")]
        "vulkan-cpu" => Device::vulkan(scgpt_model::burn::tensor::DeviceKind::Cpu),
        #[cfg(feature = "wgpu")]
        "wgpu" => Device::wgpu(scgpt_model::burn::tensor::DeviceKind::DiscreteGpu(0)),
        #[cfg(feature = "cuda")]
        "cuda" => Device::cuda(0),
        other => panic!("SCGPT_TEST_DEVICE={other}: not in this build (build the tests with --features {other})"),
    }
}

/// A gradient against PyTorch's (`transpose`: burn's `[in, out]` Linear weight against
/// PyTorch's `[out, in]`). They differ only by summation order: relative to the tensor's largest
/// entry, so tiny entries of a large gradient are not held to a tighter bound.
#[allow(dead_code)]
pub fn assert_grad<const D: usize>(what: &str, got: Option<Tensor<D>>, want: &Value, transpose: bool) {
    let got = got.unwrap_or_else(|| panic!("{what}: no gradient"));
    let got: Tensor<D> = if transpose { got.swap_dims(0, 1) } else { got };
    assert_eq!(got.dims().to_vec(), shape_of(want), "{what}: shape");
    let got: Vec<f32> = got.into_data().convert::<f32>().try_into_vec().unwrap();
    let want = floats(want);
    let scale = want.iter().fold(0f32, |m, w| m.max(w.abs())).max(1e-6);
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / scale).fold(0f32, f32::max);
    assert!(worst <= 1e-4, "{what}: worst error {worst:.2e} of max |grad| {scale:.3e}");
}
