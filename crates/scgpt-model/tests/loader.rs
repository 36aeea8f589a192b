//! `load_pretrained` on bad input: every failure is an error that names the file, never a
//! panic, and a failed load leaves the model as it was.

use std::path::{Path, PathBuf};

use scgpt_model::burn::tensor::Device;
use scgpt_model::{load_pretrained, ModelConfig, ModelError, TransformerModel};

fn data(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/model").join(name)
}

fn config(name: &str) -> ModelConfig {
    ModelConfig::from_args_json(data(&format!("{name}.args.json")), 100).unwrap().with_pad_token_id(97)
}

fn model(c: &ModelConfig) -> TransformerModel {
    c.init(&Device::flex()).unwrap()
}

fn embedding_values(m: &TransformerModel) -> Vec<f32> {
    m.encoder.embedding.weight.val().into_data().convert::<f32>().try_into_vec().unwrap()
}

fn tmp_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("scgpt-model-loader-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn expect_checkpoint_error(path: &Path, m: &mut TransformerModel) -> String {
    let before = embedding_values(m);
    let err = load_pretrained(m, path).expect_err("loading must fail");
    assert!(matches!(err, ModelError::Checkpoint { .. } | ModelError::RequiredKeys { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "error does not name the file: {msg}");
    assert_eq!(before, embedding_values(m), "a failed load changed the model");
    msg
}

#[test]
fn truncated_checkpoints_are_errors() {
    // Both container formats: zip (torch >= 1.6 default) and the legacy pickle stream.
    for name in ["continuous.pt", "scaling_bn.pt"] {
        let src = data(name);
        let bytes = std::fs::read(&src).unwrap();
        let c = config(name.trim_end_matches(".pt"));
        let mut m = model(&c);
        let n = bytes.len();
        let mut cuts: Vec<usize> = vec![0, 1, 8, 64, 512, n / 3, n / 2, n - 4096, n - 100, n - 22, n - 1];
        cuts.extend((1..40).map(|i| i * n / 40));
        for cut in cuts {
            let p = tmp_file(&format!("trunc-{cut}-{name}"), &bytes[..cut]);
            let msg = expect_checkpoint_error(&p, &mut m);
            assert!(msg.contains("checkpoint"), "{msg}");
            std::fs::remove_file(p).unwrap();
        }
    }
}

#[test]
fn garbage_and_non_checkpoint_files_are_errors() {
    let c = config("continuous");
    let mut m = model(&c);
    let junk: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let p = tmp_file("junk.pt", &junk);
    expect_checkpoint_error(&p, &mut m);
    // A JSON file is not a checkpoint either.
    let msg = expect_checkpoint_error(&data("continuous.json"), &mut m);
    assert!(msg.contains("continuous.json"), "{msg}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let c = config("continuous");
    let mut m = model(&c);
    let p = data("does-not-exist.pt");
    let err = load_pretrained(&mut m, &p).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("does-not-exist.pt"));
}

#[test]
fn wrong_dimensions_fail_on_required_keys() {
    // A model twice as wide: every encoder/transformer tensor mismatches, so this must not
    // "succeed" with random attention weights as the original's shape filter would.
    let mut c = config("continuous");
    c.d_model = 64;
    let mut m = model(&c);
    let msg = expect_checkpoint_error(&data("continuous.pt"), &mut m);
    assert!(msg.contains("transformer_encoder.layers.0.self_attn.Wqkv.weight (shape [96, 32] in the file"), "{msg}");
}

#[test]
fn a_layer_absent_from_the_file_is_an_error() {
    let mut c = config("continuous");
    c.nlayers = 3;
    let mut m = model(&c);
    let msg = expect_checkpoint_error(&data("continuous.pt"), &mut m);
    assert!(msg.contains("transformer_encoder.layers.2.linear1.weight (absent)"), "{msg}");
    assert!(!msg.contains("layers.1."), "{msg}");
}

#[test]
fn generative_model_takes_the_flag_encoder() {
    let mut c = config("continuous");
    c.use_generative_training = true;
    let mut m = model(&c);
    let report = load_pretrained(&mut m, data("continuous.pt")).unwrap();
    assert!(report.loaded.iter().any(|k| k == "flag_encoder.weight"), "{report}");
    assert!(report.skipped.is_empty(), "{report}");
}

#[test]
fn head_shape_changes_are_skipped_not_fatal() {
    // Fine-tuning with a different class count: like the original's non-strict load, the
    // resized head is left at its initial values and reported.
    let mut c = config("category_cls");
    c.n_cls = 4;
    let mut m = model(&c);
    let report = load_pretrained(&mut m, data("category_cls.pt")).unwrap();
    let skipped: Vec<&str> = report.skipped.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(skipped, ["cls_decoder.out_layer.bias", "cls_decoder.out_layer.weight"], "{report}");
    assert_eq!(report.missing, ["cls_decoder.out_layer.bias", "cls_decoder.out_layer.weight"]);
    assert!(report.to_string().contains("shape [7] in the file, the model has [4]"), "{report}");
}
