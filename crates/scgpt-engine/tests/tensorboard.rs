//! Checks `EventWriter`'s files with TensorBoard's own reader (tests/py/read_tensorboard.py), so a
//! bug shared by the writer and its unit-test decoder cannot pass unnoticed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use scgpt_engine::tensorboard::EventWriter;

const SETUP_HINT: &str = "run launch/setup.sh (or `.venv/bin/pip install -r tests/py/requirements.txt`) \
     to install the Python test readers, or point SCGPT_PYTHON at a python with `tensorboard`";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
    match std::env::var_os("SCGPT_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => workspace().join(".venv/bin/python"),
    }
}

/// Runs the TensorBoard reader on `dir`; fails (never skips) when it cannot be run.
fn read_with_tensorboard(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let py = python();
    let script = workspace().join("tests/py/read_tensorboard.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(dir)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}; {SETUP_HINT}", py.display()));
    assert!(
        out.status.success(),
        "{} {} failed ({}):\n{}\n{SETUP_HINT}",
        py.display(),
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("reader printed invalid JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
}

/// {tag: [(step, value)]} from the reader's JSON, mapping its "nan"/"inf" strings back to floats.
fn scalars(json: &serde_json::Value) -> BTreeMap<String, Vec<(u64, f32)>> {
    let value = |v: &serde_json::Value| -> f32 {
        match v {
            serde_json::Value::Number(n) => n.as_f64().unwrap() as f32,
            serde_json::Value::String(s) if s == "nan" => f32::NAN,
            serde_json::Value::String(s) if s == "inf" => f32::INFINITY,
            serde_json::Value::String(s) if s == "-inf" => f32::NEG_INFINITY,
            other => panic!("unexpected value {other}"),
        }
    };
    json.as_object()
        .expect("reader JSON is an object")
        .iter()
        .map(|(tag, points)| {
            let points = points.as_array().unwrap().iter().map(|p| (p[0].as_u64().unwrap(), value(&p[1]))).collect();
            (tag.clone(), points)
        })
        .collect()
}

/// Equality at f32 precision, with NaN equal to NaN (the writer must keep NaNs, not drop them).
fn assert_points(tag: &str, got: &[(u64, f32)], want: &[(u64, f64)]) {
    let want: Vec<(u64, f32)> = want.iter().map(|&(s, v)| (s, v as f32)).collect();
    let same = got.len() == want.len() && got.iter().zip(&want).all(|(g, w)| g.0 == w.0 && (g.1 == w.1 || (g.1.is_nan() && w.1.is_nan())));
    assert!(same, "tag {tag}:\n got  {got:?}\n want {want:?}");
}

#[test]
fn scalars_round_trip_through_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    let mut want: BTreeMap<&str, Vec<(u64, f64)>> = BTreeMap::new();
    {
        let mut w = EventWriter::create(dir.path()).unwrap();
        assert!(w.path().starts_with(dir.path()));
        for step in 0..50u64 {
            let loss = match step {
                3 => 0.1,
                17 => f64::NAN,
                _ => 10.0 / (step as f64 + 1.0),
            };
            let lr = if step == 0 { 1e-8 } else { 1e-4 * (step as f64).sqrt() };
            w.scalars(step, &[("train/loss", loss), ("train/lr", lr)]).unwrap();
            want.entry("train/loss").or_default().push((step, loss));
            want.entry("train/lr").or_default().push((step, lr));
            if step % 10 == 9 {
                let acc = step as f64 / 100.0;
                w.scalar("eval/acc", step, acc).unwrap();
                want.entry("eval/acc").or_default().push((step, acc));
            }
        }
        w.scalar("big", 7, 123_456_789.123).unwrap();
        want.entry("big").or_default().push((7, 123_456_789.123));
        w.flush().unwrap();
    }

    let got = scalars(&read_with_tensorboard(dir.path(), &[]));
    let got_tags: Vec<&str> = got.keys().map(String::as_str).collect();
    let want_tags: Vec<&str> = want.keys().copied().collect();
    assert_eq!(got_tags, want_tags);
    for (tag, points) in &want {
        assert_points(tag, &got[*tag], points);
    }
}

/// A resumed run marks its restart step; TensorBoard must then show the crashed run's points
/// only below it and the resumed run's from it on.
#[test]
fn session_start_supersedes_later_steps_of_earlier_files() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.session_start(0).unwrap();
        for step in 0..30u64 {
            w.scalar("loss", step, step as f64).unwrap();
        }
    }
    {
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.session_start(20).unwrap();
        for step in 20..25u64 {
            w.scalar("loss", step, -(step as f64)).unwrap();
        }
    }
    let got = scalars(&read_with_tensorboard(dir.path(), &[]));
    let want: Vec<(u64, f64)> = (0..20).map(|s| (s, s as f64)).chain((20..25).map(|s| (s, -(s as f64)))).collect();
    assert_points("loss", &got["loss"], &want);
}

#[test]
fn text_round_trips_through_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    let config = "# run\n`lr = 1e-4`, ünïcode";
    {
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.text("config", 0, config).unwrap();
        w.text("note", 5, "").unwrap();
        w.scalar("loss", 1, 1.0).unwrap();
    }
    let got = read_with_tensorboard(dir.path(), &["--text"]);
    assert_eq!(got, serde_json::json!({ "config": [[0, config]], "note": [[5, ""]] }));
}
