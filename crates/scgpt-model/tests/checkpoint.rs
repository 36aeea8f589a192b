//! Native checkpoints (`save_native` / `load_native`): bit-exact round trips, BatchNorm
//! running statistics right after a training step, atomic replacement, and clear errors for
//! damaged directories.

mod common;

use std::path::Path;

use common::*;
use scgpt_model::burn::tensor::{Device, Distribution, Tensor};
use scgpt_model::io::checkpoint::{NATIVE_CONFIG, NATIVE_WEIGHTS, VOCAB_FILE};
use scgpt_model::{load_native, load_pretrained, save_native, BatchNormStyle, ModelConfig, ModelError, ModelInput};

#[test]
fn native_round_trip_is_bit_exact_for_every_fixture() {
    let vocab = fixture_vocab();
    for name in ["continuous", "category_cls", "dsbn_batch", "scaling_bn", "generative"] {
        let device = Device::flex();
        let mut config = fixture_config(name);
        if name == "generative" {
            config.use_generative_training = true;
        }
        let mut model = config.init(&device).unwrap();
        load_pretrained(&mut model, data(&format!("{name}.pt"))).unwrap();
        let dir = scratch(name);
        save_native(&model, &vocab, &dir).unwrap();
        for f in [NATIVE_WEIGHTS, NATIVE_CONFIG, VOCAB_FILE] {
            assert!(dir.join(f).is_file(), "{name}: {f}");
        }
        let back = load_native(&dir, &device).unwrap();
        assert_eq!(back.model.config, model.config, "{name}");
        assert_eq!(back.vocab_json, vocab);
        assert_eq!(all_tensors(&back.model), all_tensors(&model), "{name}: tensors");
        // Same tensors → same outputs; checked anyway, bit for bit, padding included.
        let json = fixture_json(if name == "generative" { "continuous" } else { name });
        let input = fixture_input(&json, &device);
        let flags = fixture_flags(&json);
        assert_eq!(all_outputs(&back.model, &input, flags), all_outputs(&model, &input, flags), "{name}: outputs");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A DSBN model on an autodiff device after one training-mode forward: the running
/// statistics the save writes must be the updated ones, not the pre-step values burn's
/// `RunningState` still reports before it is synced.
#[test]
fn native_save_after_a_training_step_keeps_updated_running_stats() {
    let device = Device::flex().autodiff();
    let mut config = ModelConfig::new(NTOKEN, 16, 2, 24, 1).with_pad_token_id(PAD_ID);
    config.domain_spec_batchnorm = BatchNormStyle::Dsbn;
    config.num_batch_labels = Some(2);
    config.dropout = 0.0;
    let model = config.init(&device).unwrap();
    let before = all_tensors(&model)["dsbn.bns.1.running_mean"].clone();
    let (b, l) = (3, 5);
    let src = Tensor::<1, scgpt_model::burn::tensor::Int>::arange(0..(b * l) as i64, &device).reshape([b, l]);
    let input = ModelInput {
        src,
        values: Tensor::<2>::random([b, l], Distribution::Uniform(0.0, 50.0), &device),
        src_key_padding_mask: Tensor::<2>::zeros([b, l], &device).bool(),
        batch_labels: Some(Tensor::from_data([1i64, 1, 1], &device)),
    };
    let out = model.forward(input, scgpt_model::ForwardFlags::default()).unwrap();
    let _ = out.mlm_output.sum().backward();

    // Save straight after the step: nothing has synced the running state yet.
    let dir = scratch("train-step");
    save_native(&model, &fixture_vocab(), &dir).unwrap();
    let back = load_native(&dir, &Device::flex()).unwrap();

    let want = model.dsbn.as_ref().unwrap().bns[1].running_mean.value_sync();
    let want = values(want.inner()).1;
    assert_ne!(before.2, want.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(), "the step should have moved the running mean");
    let got = values(back.model.dsbn.as_ref().unwrap().bns[1].running_mean.value()).1;
    assert_eq!(got, want);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn native_save_replaces_only_a_checkpoint_directory() {
    let device = Device::flex();
    let config = fixture_config("scaling_bn");
    let vocab = fixture_vocab();
    let a = config.init(&device).unwrap();
    let b = config.init(&device).unwrap();
    // In a parent of its own: other tests write temp directories beside theirs concurrently.
    let parent = scratch("replace");
    std::fs::create_dir_all(&parent).unwrap();
    let dir = parent.join("ckpt");
    save_native(&a, &vocab, &dir).unwrap();
    save_native(&b, &vocab, &dir).unwrap();
    let back = load_native(&dir, &device).unwrap();
    assert_eq!(all_tensors(&back.model), all_tensors(&b));
    // No temp or backup directories left beside it.
    let stray: Vec<_> = std::fs::read_dir(&parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-") || n.contains(".old-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");

    // A directory holding anything else is not replaced.
    std::fs::write(dir.join("notes.txt"), "keep me").unwrap();
    let err = save_native(&a, &vocab, &dir).unwrap_err().to_string();
    assert!(err.contains("notes.txt") && err.contains("refusing"), "{err}");
    assert!(dir.join("notes.txt").is_file());
    // Nor a file.
    let file = scratch("a-file");
    std::fs::write(&file, "x").unwrap();
    assert!(save_native(&a, &vocab, &file).is_err());
    std::fs::remove_file(&file).unwrap();
    // A vocabulary that contradicts the model is refused before anything is written.
    let bad = scratch("bad-vocab");
    let err = save_native(&a, r#"{"<pad>": 3}"#, &bad).unwrap_err().to_string();
    assert!(err.contains("pad_token_id"), "{err}");
    assert!(!bad.exists());
    std::fs::remove_dir_all(&parent).unwrap();
}

fn expect_error_naming(dir: &Path, file: &str, device: &Device) -> String {
    let err = load_native(dir, device).expect_err("load must fail");
    let msg = err.to_string();
    let path = dir.join(file).display().to_string();
    assert!(msg.contains(&path), "error does not name {path}: {msg}");
    msg
}

#[test]
fn damaged_native_checkpoints_are_clear_errors() {
    let device = Device::flex();
    let config = fixture_config("dsbn_batch");
    let model = config.init(&device).unwrap();
    let dir = scratch("damaged");
    save_native(&model, &fixture_vocab(), &dir).unwrap();
    let weights = dir.join(NATIVE_WEIGHTS);
    let good = std::fs::read(&weights).unwrap();

    // Truncated anywhere (header length, header, data) and garbage.
    let n = good.len();
    let mut cuts = vec![0, 1, 7, 8, 9, 100, n / 3, n / 2, n - 4, n - 1];
    cuts.dedup();
    for cut in cuts {
        std::fs::write(&weights, &good[..cut]).unwrap();
        let msg = expect_error_naming(&dir, NATIVE_WEIGHTS, &device);
        assert!(matches!(load_native(&dir, &device).unwrap_err(), ModelError::Checkpoint { .. }), "cut {cut}: {msg}");
    }
    let mut garbage = good.clone();
    for b in garbage.iter_mut().skip(8).take(64) {
        *b = b'#';
    }
    std::fs::write(&weights, &garbage).unwrap();
    expect_error_naming(&dir, NATIVE_WEIGHTS, &device);
    std::fs::remove_file(&weights).unwrap();
    let msg = expect_error_naming(&dir, NATIVE_WEIGHTS, &device);
    assert!(msg.contains("cannot read"), "{msg}");
    std::fs::write(&weights, &good).unwrap();
    assert!(load_native(&dir, &device).is_ok());

    // Weights of a different model: named as missing/unexpected tensors.
    let other_dir = scratch("other");
    let other = fixture_config("scaling_bn").init(&device).unwrap();
    save_native(&other, &fixture_vocab(), &other_dir).unwrap();
    std::fs::copy(other_dir.join(NATIVE_WEIGHTS), &weights).unwrap();
    let msg = expect_error_naming(&dir, NATIVE_WEIGHTS, &device);
    assert!(msg.contains("dsbn.bns.0.running_mean"), "{msg}");
    std::fs::write(&weights, &good).unwrap();

    // config.json: truncated, wrong format tag, bad field.
    let cfg = dir.join(NATIVE_CONFIG);
    let cfg_text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, &cfg_text[..cfg_text.len() / 2]).unwrap();
    expect_error_naming(&dir, NATIVE_CONFIG, &device);
    std::fs::write(&cfg, cfg_text.replace("scgpt-rs-native", "something-else")).unwrap();
    let msg = expect_error_naming(&dir, NATIVE_CONFIG, &device);
    assert!(msg.contains("`format`"), "{msg}");
    std::fs::write(&cfg, cfg_text.replace("\"nhead\": 4", "\"nhead\": 5")).unwrap();
    let msg = expect_error_naming(&dir, NATIVE_CONFIG, &device);
    assert!(msg.contains("nheads"), "{msg}");
    std::fs::write(&cfg, &cfg_text).unwrap();

    // vocab.json: not JSON, an id outside the model.
    let voc = dir.join(VOCAB_FILE);
    std::fs::write(&voc, "{\"a\": ").unwrap();
    expect_error_naming(&dir, VOCAB_FILE, &device);
    std::fs::write(&voc, "{\"a\": 1000}").unwrap();
    let msg = expect_error_naming(&dir, VOCAB_FILE, &device);
    assert!(msg.contains("outside"), "{msg}");

    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&other_dir).unwrap();
}
