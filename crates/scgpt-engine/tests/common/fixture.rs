//! The JSON tensor format of the PyTorch fixtures in tests/data/engine (`{"shape", "data"}`
//! objects and plain lists), shared by the parity tests.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// tests/data/engine, or `SCGPT_TEST_DATA_ENGINE`.
pub fn data_dir() -> PathBuf {
    match std::env::var_os("SCGPT_TEST_DATA_ENGINE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/engine"),
    }
}

pub fn shape_of(v: &Value) -> Vec<usize> {
    v["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

pub fn ints(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

pub fn bools(v: &Value) -> Vec<bool> {
    v.as_array().unwrap().iter().map(|x| x.as_bool().unwrap()).collect()
}
