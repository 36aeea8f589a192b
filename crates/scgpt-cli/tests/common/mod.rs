//! Shared by the scgpt-train test binaries: the workspace root and shards of the bundled data
//! made by the real scgpt-prep binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// target/<profile>/scgpt-prep next to scgpt-train (built by `cargo test --workspace`).
pub fn prep_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_scgpt-train")).with_file_name("scgpt-prep")
}

/// wu2020_200 (200 T cells) to shards of 64 cells with the `cluster_orig` labels.
pub fn prep(out: &Path) {
    assert!(prep_bin().is_file(), "{} not built: run `cargo test --workspace`", prep_bin().display());
    let status = Command::new(prep_bin())
        .arg("--input")
        .arg(root().join("tests/data/wu2020_200.h5ad"))
        .arg("--out")
        .arg(out)
        .args(["--shard-cells", "64", "--obs-cols", "cluster_orig", "--deterministic", "--quiet"])
        .status()
        .expect("run scgpt-prep");
    assert!(status.success());
}

/// The Python with the independent readers (anndata, numpy): `SCGPT_PYTHON` or `.venv`.
pub fn python() -> PathBuf {
    std::env::var_os("SCGPT_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"))
}

/// The bundled pbmc68k_reduced (700 cells, 10 `bulk_labels`, log-normalised raw/X).
pub fn pbmc() -> PathBuf {
    root().join("tests/data/pbmc68k_reduced.h5ad")
}

/// The `scgpt` binary, without HDF5 file locks.
pub fn scgpt(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_scgpt")).args(args).env("HDF5_USE_FILE_LOCKING", "FALSE").output().expect("run scgpt")
}

/// `scgpt-train --config configs/finetune_perturbation.toml` from scratch on `screen` into
/// `run`, with `sets` (`section.key=value`) after the run, input and no-init settings.
pub fn train_perturbation<S: AsRef<str>>(run: &Path, screen: &Path, sets: &[S]) {
    let mut c = Command::new(PathBuf::from(env!("CARGO_BIN_EXE_scgpt-train")));
    c.arg("--config").arg(root().join("configs/finetune_perturbation.toml")).arg("--quiet");
    c.args(["--set", &format!("run.dir=\"{}\"", run.display())]);
    c.args(["--set", &format!("data.input=\"{}\"", screen.display())]);
    c.args(["--set", "model.init_from=\"\"", "--set", "model.init_prefixes=[]"]);
    for s in sets {
        c.arg("--set").arg(s.as_ref());
    }
    let out = c.env("HDF5_USE_FILE_LOCKING", "FALSE").output().expect("run scgpt-train");
    assert!(out.status.success(), "scgpt-train: {}", String::from_utf8_lossy(&out.stderr));
}
