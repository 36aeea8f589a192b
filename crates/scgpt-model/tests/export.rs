//! `export_original`: the written `best_model.pt` + `args.json` + `vocab.json` load back
//! through this crate's own `load_pretrained` (burn's PytorchStore reader) to a bit-identical
//! model, with the original's key names, and the archive has torch's layout.
//!
//! With `SCGPT_EXPORT_CHECK_DIR=<dir>`, `export_for_the_torch_check` also leaves the exported
//! directories and the Rust outputs there for `tests/gen/model/check_export_in_torch.py`, which
//! loads them into the original scGPT under PyTorch.

mod common;

use std::collections::BTreeSet;

use common::*;
use scgpt_model::burn::store::{ModuleStore, PytorchStore};
use scgpt_model::burn::tensor::Device;
use scgpt_model::io::checkpoint::{ORIGINAL_ARGS, ORIGINAL_WEIGHTS, VOCAB_FILE};
use scgpt_model::io::torch_zip::crc32;
use scgpt_model::{export_original, load_pretrained, ModelConfig, ModelError, TransformerModel};
use serde_json::{json, Value};

const VARIANTS: [&str; 5] = ["continuous", "category_cls", "dsbn_batch", "scaling_bn", "generative"];

/// The fixture whose inputs/flags a variant runs on.
fn inputs_of(variant: &str) -> &str {
    if variant == "generative" {
        "continuous"
    } else {
        variant
    }
}

/// Exports `model`, reads the directory back the way a user of this crate would (config from
/// args.json, weights through `load_pretrained`) and checks it is the same model.
fn export_and_reload(model: &TransformerModel, dir: &std::path::Path) -> TransformerModel {
    let report = export_original(model, &model.config, &fixture_vocab(), dir).unwrap();
    for f in [ORIGINAL_WEIGHTS, ORIGINAL_ARGS, VOCAB_FILE] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert_eq!(std::fs::read_to_string(dir.join(VOCAB_FILE)).unwrap(), fixture_vocab());
    let config = ModelConfig::from_args_json(dir.join(ORIGINAL_ARGS), NTOKEN).unwrap().with_pad_token_id(PAD_ID);
    assert_eq!(config, model.config, "args.json must read back to the same config");
    let mut back = config.init(&device_of(model)).unwrap();
    let load = load_pretrained(&mut back, dir.join(ORIGINAL_WEIGHTS)).unwrap();
    assert!(load.missing.is_empty(), "{load}");
    // Only PyTorch's BatchNorm counters have no slot here.
    assert!(load.skipped.iter().all(|s| s.key.ends_with(".num_batches_tracked")), "{load}");
    assert_eq!(load.loaded.len() + load.skipped.len(), report.tensors.len());
    assert_eq!(all_tensors(&back), all_tensors(model), "tensors differ");
    back
}

#[test]
fn exported_fixtures_reload_bit_exact() {
    for name in VARIANTS {
        let device = Device::flex();
        let mut model = fixture_config(name).init(&device).unwrap();
        load_pretrained(&mut model, data(&format!("{name}.pt"))).unwrap();
        let dir = scratch(&format!("export-{name}"));
        let back = export_and_reload(&model, &dir);
        let json = fixture_json(inputs_of(name));
        let input = fixture_input(&json, &device);
        let flags = fixture_flags(&json);
        assert_eq!(all_outputs(&back, &input, flags), all_outputs(&model, &input, flags), "{name}: outputs");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The exported key set is the original's: for the whole-human layout (generative model) it
/// is exactly the keys of a torch-written whole-human-style checkpoint plus the `cls_decoder`
/// that 0.2.4 always builds; DSBN exports PyTorch's three BatchNorm buffers per domain.
#[test]
fn exported_keys_use_the_original_names() {
    let device = Device::flex();
    let keys = |path: &std::path::Path| -> BTreeSet<String> {
        let mut store = PytorchStore::from_file(path).map_indices_contiguous(false);
        store.get_all_tensors().unwrap().keys().cloned().collect()
    };
    let mut model = fixture_config("generative").init(&device).unwrap();
    load_pretrained(&mut model, data("generative.pt")).unwrap();
    let dir = scratch("keys");
    let report = export_original(&model, &model.config, &fixture_vocab(), &dir).unwrap();
    let exported = keys(&dir.join(ORIGINAL_WEIGHTS));
    let listed: BTreeSet<String> = report.tensors.iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(exported, listed);
    let mut want = keys(&data("generative.pt"));
    for k in [
        "_decoder.0.weight",
        "_decoder.0.bias",
        "_decoder.2.weight",
        "_decoder.2.bias",
        "_decoder.3.weight",
        "_decoder.3.bias",
        "_decoder.5.weight",
        "_decoder.5.bias",
        "out_layer.weight",
        "out_layer.bias",
    ] {
        want.insert(format!("cls_decoder.{k}"));
    }
    assert_eq!(exported, want);
    // PyTorch layouts: Wqkv [3d, d], value_encoder.linear1 [d, 1].
    let shape = |k: &str| report.tensors.iter().find(|(n, _)| n == k).map(|(_, s)| s.clone()).unwrap();
    assert_eq!(shape("transformer_encoder.layers.0.self_attn.Wqkv.weight"), [96, 32]);
    assert_eq!(shape("value_encoder.linear1.weight"), [32, 1]);
    assert_eq!(shape("decoder.fc.4.weight"), [1, 32]);
    std::fs::remove_dir_all(&dir).unwrap();

    let mut model = fixture_config("dsbn_batch").init(&device).unwrap();
    load_pretrained(&mut model, data("dsbn_batch.pt")).unwrap();
    let dir = scratch("keys-dsbn");
    let report = export_original(&model, &model.config, &fixture_vocab(), &dir).unwrap();
    let names: Vec<&str> = report.tensors.iter().map(|(k, _)| k.as_str()).collect();
    let i = names.iter().position(|k| *k == "dsbn.bns.1.running_mean").unwrap();
    assert_eq!(&names[i..i + 3], ["dsbn.bns.1.running_mean", "dsbn.bns.1.running_var", "dsbn.bns.1.num_batches_tracked"]);
    assert!(names.contains(&"grad_reverse_discriminator._decoder.5.bias"));
    assert!(names.contains(&"decoder.zero_logit.4.weight"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// torch 2.15's archive layout: entry order, stored entries whose data start on 64-byte
/// boundaries, valid CRCs, the folder named after the file stem.
#[test]
fn exported_archive_has_torch_layout() {
    let device = Device::flex();
    let model = fixture_config("scaling_bn").init(&device).unwrap();
    let dir = scratch("layout");
    let report = export_original(&model, &model.config, &fixture_vocab(), &dir).unwrap();
    let bytes = std::fs::read(dir.join(ORIGINAL_WEIGHTS)).unwrap();
    let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]) as usize;
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    let mut names = Vec::new();
    let mut i = 0;
    while u32_at(i) == 0x0403_4b50 {
        assert_eq!(u16_at(i + 6), 0x0808);
        assert_eq!(u16_at(i + 8), 0, "stored");
        let (nl, el) = (u16_at(i + 26), u16_at(i + 28));
        let name = String::from_utf8(bytes[i + 30..i + 30 + nl].to_vec()).unwrap();
        assert_eq!(&bytes[i + 30 + nl..i + 32 + nl], b"FB");
        let start = i + 30 + nl + el;
        assert_eq!(start % 64, 0, "{name} data at {start}");
        // Data descriptor: signature, crc, sizes.
        let mut end = start;
        while u32_at(end) != 0x0807_4b50 {
            end += 1;
        }
        let (crc, size) = (u32_at(end + 4), u32_at(end + 8) as usize);
        assert_eq!(end - start, size, "{name}");
        assert_eq!(crc32(&bytes[start..end]), crc, "{name}");
        names.push(name);
        i = end + 16;
    }
    let n = report.tensors.len();
    let mut want: Vec<String> =
        ["data.pkl", ".format_version", ".storage_alignment", "byteorder"].iter().map(|s| format!("best_model/{s}")).collect();
    want.extend((0..n).map(|k| format!("best_model/data/{k}")));
    want.push("best_model/version".into());
    want.push("best_model/.data/serialization_id".into());
    assert_eq!(names, want);
    assert_eq!(u32_at(bytes.len() - 22), 0x0605_4b50, "end of central directory");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn export_refuses_inconsistent_inputs() {
    let device = Device::flex();
    let model = fixture_config("continuous").init(&device).unwrap();
    let dir = scratch("refuse");
    let mut other = model.config.clone();
    other.nlayers = 3;
    let err = export_original(&model, &other, &fixture_vocab(), &dir).unwrap_err();
    assert!(matches!(err, ModelError::Config { .. }), "{err}");
    assert!(err.to_string().contains("nlayers"), "{err}");
    let err = export_original(&model, &model.config, r#"{"GENE": 100}"#, &dir).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    assert!(!dir.exists());
    // A config that differs only in non-architectural fields is written as given.
    let mut tweaked = model.config.clone();
    tweaked.dropout = 0.0;
    export_original(&model, &tweaked, &fixture_vocab(), &dir).unwrap();
    let args: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(ORIGINAL_ARGS)).unwrap()).unwrap();
    assert_eq!(args["dropout"], json!(0.0));
    assert_eq!(args["embsize"], json!(32));
    assert_eq!(args["pad_value"], json!(-2));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tensor_json(shape: &[usize], data: &[f32]) -> Value {
    json!({"shape": shape, "data": data})
}

/// Models initialised and randomised in Rust (so the weights never came from PyTorch),
/// exported and reloaded bit-exact. With `SCGPT_EXPORT_CHECK_DIR` set, the exports and the Rust
/// outputs are kept there for `check_export_in_torch.py`.
#[test]
fn export_for_the_torch_check() {
    let keep = std::env::var_os("SCGPT_EXPORT_CHECK_DIR").map(std::path::PathBuf::from);
    for (k, name) in VARIANTS.iter().enumerate() {
        let device = Device::flex();
        let mut model = fixture_config(name).init(&device).unwrap();
        randomise(&mut model, 7000 + k as u64);
        let dir = match &keep {
            Some(d) => d.join(name),
            None => scratch(&format!("torch-check-{name}")),
        };
        let back = export_and_reload(&model, &dir);
        let json = fixture_json(inputs_of(name));
        let input = fixture_input(&json, &device);
        let flags = fixture_flags(&json);
        let outputs = all_outputs(&model, &input, flags);
        assert_eq!(all_outputs(&back, &input, flags), outputs, "{name}");
        match &keep {
            Some(d) => {
                let expected = json!({
                    "variant": name,
                    "export_dir": name,
                    "ntoken": NTOKEN,
                    "pad_token_id": PAD_ID,
                    "flags": json["flags"],
                    "inputs": json["inputs"],
                    "outputs": outputs
                        .iter()
                        .map(|(k, (s, v))| (k.clone(), tensor_json(s, v)))
                        .collect::<serde_json::Map<String, Value>>(),
                });
                std::fs::write(d.join(format!("{name}.expected.json")), serde_json::to_string(&expected).unwrap()).unwrap();
            }
            None => std::fs::remove_dir_all(&dir).unwrap(),
        }
    }
}
