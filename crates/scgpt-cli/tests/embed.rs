//! `scgpt embed` end to end: the built binary on the fixtures of `tests/data/embed/` (written by
//! `tests/gen/embed/gen_embed_reference.py` with the ORIGINAL scGPT 0.2.4 `embed_data`; see
//! `tests/data/embed/README.md`). No torch needed: the committed expected embeddings are the
//! truth. Outputs are read back with the hdf5 crate, and with anndata / pyarrow / numpy from
//! `SCGPT_PYTHON` or `<repo>/.venv/bin/python` (`launch/setup.sh` creates it) to prove that the
//! Python stack opens them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use scgpt_data::h5ad::{Column, Frame, H5adWriter};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn data(name: &str) -> PathBuf {
    repo().join("tests/data/embed").join(name)
}

fn model() -> PathBuf {
    data("model")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// HDF5 locks files with flock(), and a child process forked by one test thread inherits the
/// descriptors (and locks) of the files another thread has open at that moment; a child that
/// then opens such a file finds it locked. The children of these tests do not lock.
const NO_HDF5_LOCKS: (&str, &str) = ("HDF5_USE_FILE_LOCKING", "FALSE");

fn scgpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scgpt"))
        .args(args)
        .env(NO_HDF5_LOCKS.0, NO_HDF5_LOCKS.1)
        .current_dir(repo())
        .output()
        .expect("run scgpt")
}

fn embed(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let m = model();
    let mut args = vec!["embed", "--model", s(&m), "--input", s(input), "--output", s(output), "--quiet"];
    args.extend_from_slice(extra);
    scgpt(&args)
}

fn ok(out: Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scgpt failed:\n{text}");
    text
}

fn err(out: Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "scgpt should have failed:\n{text}");
    assert!(!text.contains("panicked"), "a panic instead of an error:\n{text}");
    text
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data("expected.json")).unwrap()).unwrap()
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

/// obsm/X_scGPT of an h5ad, read with the hdf5 crate.
fn read_obsm(path: &Path) -> Vec<Vec<f32>> {
    let f = hdf5::File::open(path).unwrap();
    let ds = f.dataset("obsm/X_scGPT").unwrap();
    let shape = ds.shape();
    let flat: Vec<f32> = ds.read_raw().unwrap();
    let enc = ds.attr("encoding-type").unwrap().read_scalar::<hdf5::types::VarLenUnicode>().unwrap();
    assert_eq!(enc.as_str(), "array");
    flat.chunks(shape[1]).map(|c| c.to_vec()).collect()
}

fn read_npy(path: &Path) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    let shape = header.split("'shape': (").nth(1).unwrap().split(')').next().unwrap();
    let dims: Vec<usize> = shape.split(',').filter(|x| !x.trim().is_empty()).map(|x| x.trim().parse().unwrap()).collect();
    let vals: Vec<f32> = bytes[10 + hlen..].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert_eq!(vals.len(), dims[0] * dims[1]);
    vals.chunks(dims[1]).map(|c| c.to_vec()).collect()
}

fn assert_close(what: &str, got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len(), "{what}: number of cells");
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: width");
        for (j, (a, b)) in g.iter().zip(w).enumerate() {
            let e = (a - b).abs();
            worst = worst.max(e);
            assert!(e <= TOL, "{what}: cell {i} dim {j}: got {a}, the original {b} (|diff| {e:.2e})");
        }
        let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{what}: cell {i} not L2-normalised ({norm})");
    }
    eprintln!("{what}: worst |diff| vs the original {worst:.2e}");
}

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("SCGPT_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo().join(".venv/bin/python");
    assert!(venv.exists(), "these tests read the outputs with Python (anndata, pyarrow): run `bash launch/setup.sh` or set SCGPT_PYTHON");
    venv
}

fn run_python(code: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(code)
        .args(args)
        .env(NO_HDF5_LOCKS.0, NO_HDF5_LOCKS.1)
        .current_dir(repo())
        .output()
        .expect("run python");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("OK"), "python check failed:\n{text}");
    text
}

#[test]
fn matches_the_original_embed_data_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let want = rows(&expected()["deterministic"]);
    // var index = Ensembl ids: bridged to the symbols of the vocabulary.
    let out = dir.path().join("a.h5ad");
    let text = ok(embed(&data("wu30.h5ad"), &out, &["--deterministic", "--batch-size", "7"]));
    assert!(text.contains("genes: 400 of 470 genes in the var index (X) matched"), "{text}");
    assert!(text.contains("via Ensembl ids"), "{text}");
    assert_close("h5ad, Ensembl index", &read_obsm(&out), &want);
    // Symbols from a var column: the same genes, the same embeddings.
    let out2 = dir.path().join("b.h5ad");
    let text = ok(embed(&data("wu30.h5ad"), &out2, &["--deterministic", "--gene-col", "feature_name"]));
    assert!(text.contains("genes: 400 of 470 genes in var column `feature_name` (X) matched"), "{text}");
    assert!(!text.contains("via Ensembl"), "{text}");
    assert_close("h5ad, feature_name", &read_obsm(&out2), &want);
    // One cell per batch: no padding anywhere, so the encoder runs without a mask.
    let out3 = dir.path().join("c.npy");
    ok(embed(&data("wu30.h5ad"), &out3, &["--deterministic", "--batch-size", "1"]));
    assert_close("h5ad, unpadded batches", &read_npy(&out3), &want);
}

#[test]
fn tie_free_cells_match_the_original_in_random_mode() {
    let dir = tempfile::tempdir().unwrap();
    let want = rows(&expected()["tiefree"]);
    let a = dir.path().join("a.npy");
    ok(embed(&data("wu30_tiefree.h5ad"), &a, &["--seed", "5"]));
    let got = read_npy(&a);
    assert_close("tie-free, random mode", &got, &want);
    // Without ties the two modes bin identically, so they agree exactly.
    let b = dir.path().join("b.npy");
    ok(embed(&data("wu30_tiefree.h5ad"), &b, &["--deterministic"]));
    assert_eq!(got, read_npy(&b));
    let ids = std::fs::read_to_string(dir.path().join("a.cell_ids.txt")).unwrap();
    let want_ids: Vec<String> = expected()["cell_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(ids.lines().collect::<Vec<_>>(), want_ids);
}

#[test]
fn deterministic_output_is_bit_identical_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let p = dir.path().join(name);
        ok(embed(&data("wu30.h5ad"), &p, extra));
        std::fs::read(&p).unwrap()
    };
    // --max-seq-len 64 subsamples most cells (71..433 genes): the deterministic rule is exercised.
    let det = ["--deterministic", "--max-seq-len", "64", "--batch-size", "4"];
    let a = run("d1.npy", &det);
    let b = run("d2.npy", &det);
    assert_eq!(a, b, "--deterministic must give identical bytes");
    let text = ok(embed(&data("wu30.h5ad"), &dir.path().join("d3.npy"), &det));
    assert!(text.contains("were subsampled (kept the highest-valued genes)"), "{text}");
    // Seeded random mode is reproducible too, and the seed matters (wu30 has ties).
    let r1 = run("r1.npy", &["--seed", "1", "--max-seq-len", "64"]);
    let r2 = run("r2.npy", &["--seed", "1", "--max-seq-len", "64"]);
    let r3 = run("r3.npy", &["--seed", "2", "--max-seq-len", "64"]);
    assert_eq!(r1, r2);
    assert_ne!(r1, r3);
    assert_ne!(a, r1);
}

#[test]
fn anndata_pyarrow_and_numpy_read_the_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let h5 = dir.path().join("e.h5ad");
    let pq = dir.path().join("e.parquet");
    let npy = dir.path().join("e.npy");
    for out in [&h5, &pq, &npy] {
        ok(embed(&data("wu30.h5ad"), out, &["--deterministic"]));
    }
    // Embedding an output again replaces obsm["X_scGPT"] in place of adding a second one.
    let again = dir.path().join("again.h5ad");
    ok(embed(&h5, &again, &["--deterministic"]));
    let code = r#"
import sys, anndata, numpy as np, pyarrow.parquet as pq
src, h5, parq, npy, again = sys.argv[1:6]
a = anndata.read_h5ad(src)
b = anndata.read_h5ad(h5)
e = b.obsm["X_scGPT"]
assert e.dtype == np.float32 and e.shape == (a.n_obs, 32), (e.dtype, e.shape)
assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
assert list(b.obs_names) == list(a.obs_names) and list(b.var_names) == list(a.var_names)
assert (a.X != b.X).nnz == 0, "X changed"
assert list(b.var["feature_name"]) == list(a.var["feature_name"])
assert set(b.obsm.keys()) == {"X_dummy", "X_scGPT"}, b.obsm.keys()
t = pq.read_table(parq)
assert t.column_names == ["cell_id", "X_scGPT"], t.column_names
assert t.column("cell_id").to_pylist() == list(a.obs_names)
m = np.stack(t.column("X_scGPT").to_numpy(zero_copy_only=False))
assert np.array_equal(m, e)
assert np.array_equal(np.load(npy), e)
c = anndata.read_h5ad(again)
assert set(c.obsm.keys()) == {"X_dummy", "X_scGPT"} and np.array_equal(c.obsm["X_scGPT"], e)
print("OK")
"#;
    run_python(code, &[s(&data("wu30.h5ad")), s(&h5), s(&pq), s(&npy), s(&again)]);
    // No temp files left next to the outputs.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn shard_set_input_is_remapped_to_the_model_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let want = rows(&expected()["deterministic"]);
    let h5 = dir.path().join("s.h5ad");
    let text = ok(embed(&data("shards"), &h5, &["--deterministic"]));
    // The shard vocabulary (built from the file) has 470 genes, 400 of them in the model's.
    assert!(text.contains("genes: 400 of 470 genes of the shard vocabulary"), "{text}");
    assert_close("shards -> h5ad", &read_obsm(&h5), &want);
    let pq = dir.path().join("s.parquet");
    ok(embed(&data("shards"), &pq, &["--deterministic", "--batch-size", "5"]));
    let code = r#"
import sys, json, anndata, numpy as np, pyarrow.parquet as pq
h5, parq, expected = sys.argv[1:4]
want = json.load(open(expected))
a = anndata.read_h5ad(h5)
assert list(a.obs_names) == want["cell_ids"], list(a.obs_names)[:3]
assert list(a.obs["dataset"].unique()) == ["wu30"]
assert a.shape == (30, 0) and a.obsm["X_scGPT"].shape == (30, 32)
t = pq.read_table(parq)
assert t.column_names == ["cell_id", "dataset", "X_scGPT"], t.column_names
m = np.stack(t.column("X_scGPT").to_numpy(zero_copy_only=False))
assert np.abs(m - np.array(want["deterministic"], dtype=np.float32)).max() < 1e-4
print("OK")
"#;
    run_python(code, &[s(&h5), s(&pq), s(&data("expected.json"))]);
}

/// A small h5ad: `names` as the var index, optional var columns, CSR rows.
fn write_h5ad(path: &Path, names: &[String], cols: Vec<(String, Column)>, cells: &[Vec<(u32, f32)>]) {
    let mut w = H5adWriter::create(path, names.len()).unwrap();
    for c in cells {
        let idx: Vec<u32> = c.iter().map(|p| p.0).collect();
        let val: Vec<f32> = c.iter().map(|p| p.1).collect();
        w.append_rows(&[0, c.len()], &idx, &val).unwrap();
    }
    let obs = Frame { index: (0..cells.len()).map(|i| format!("cell{i}")).collect(), columns: vec![] };
    let var = Frame { index: names.to_vec(), columns: cols };
    w.finish(&obs, &var).unwrap();
}

fn vocab_genes() -> Vec<String> {
    let v: serde_json::Map<String, Value> = serde_json::from_str(&std::fs::read_to_string(model().join("vocab.json")).unwrap()).unwrap();
    let mut g: Vec<(u64, String)> = v.into_iter().map(|(k, id)| (id.as_u64().unwrap(), k)).collect();
    g.sort();
    g.into_iter().map(|(_, k)| k).filter(|k| !k.starts_with('<')).collect()
}

#[test]
fn unmatched_gene_names_are_a_clear_error_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let symbols: Vec<String> = vocab_genes().into_iter().take(60).collect();
    // Ensembl-like ids the shipped table does not know (mouse-style), symbols in feature_name.
    let ids: Vec<String> = (0..symbols.len()).map(|i| format!("ENSMUSG{:011}", 90_000_000 + i)).collect();
    let cells: Vec<Vec<(u32, f32)>> = (0..5).map(|c| (0..20).map(|g| ((g * 2 + c) as u32, (g + c + 1) as f32)).collect()).collect();
    let input = dir.path().join("mouse_ids.h5ad");
    write_h5ad(&input, &ids, vec![("feature_name".into(), Column::Strings(symbols))], &cells);
    let out = dir.path().join("out.h5ad");
    let e = err(embed(&input, &out, &[]));
    assert!(e.contains(s(&input)), "names the file: {e}");
    assert!(e.contains("only 0 of 60 genes in the var index"), "{e}");
    assert!(e.contains("look like Ensembl ids"), "{e}");
    assert!(e.contains("--gene-col feature_name"), "gives the fix: {e}");
    assert!(!out.exists());
    let text = ok(embed(&input, &out, &["--gene-col", "feature_name"]));
    assert!(text.contains("genes: 60 of 60"), "{text}");
    // A missing --gene-col column lists the available ones.
    let e = err(embed(&input, &out, &["--gene-col", "gene_symbols"]));
    assert!(e.contains("gene_symbols") && e.contains("feature_name"), "{e}");
}

#[test]
fn bad_values_and_bad_paths_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let genes: Vec<String> = vocab_genes().into_iter().take(10).collect();
    let input = dir.path().join("neg.h5ad");
    write_h5ad(&input, &genes, vec![], &[vec![(0, 1.0), (1, 2.0)], vec![(2, 3.0), (4, -1.5)]]);
    let out = dir.path().join("out.h5ad");
    let e = err(embed(&input, &out, &[]));
    assert!(e.contains(s(&input)) && e.contains("cell1") && e.contains(&genes[4]) && e.contains("negative"), "{e}");
    assert!(!out.exists());
    let leftovers =
        std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with(".tmp-")).count();
    assert_eq!(leftovers, 0, "a failed run leaves no temp file");

    let e = err(embed(&dir.path().join("none.h5ad"), &out, &[]));
    assert!(e.contains("none.h5ad") && e.contains("not found"), "{e}");
    let e = err(embed(&data("wu30.h5ad"), &dir.path().join("out.csv"), &[]));
    assert!(e.contains("out.csv") && e.contains("--format"), "{e}");
    let e = err(scgpt(&["embed", "--model", s(dir.path()), "--input", s(&data("wu30.h5ad")), "--output", s(&out)]));
    assert!(e.contains("best_model.pt") || e.contains("vocab.json"), "{e}");
    let garbage = dir.path().join("garbage.h5ad");
    std::fs::write(&garbage, b"not hdf5").unwrap();
    let e = err(embed(&garbage, &out, &[]));
    assert!(e.contains("garbage.h5ad") && e.contains("not an HDF5"), "{e}");
    let e = err(embed(dir.path(), &out, &[]));
    assert!(e.contains("manifest.json"), "{e}");
    // The default build is CPU only: a GPU device names what this build has and how to get one.
    let e = err(embed(&data("wu30.h5ad"), &out, &["--device", "cuda"]));
    assert!(e.contains("--device") && e.contains("\"cuda\"") && e.contains("--features cuda"), "{e}");
}

#[test]
fn cells_without_vocabulary_genes_get_the_cls_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let mut names: Vec<String> = vocab_genes().into_iter().take(10).collect();
    names.push("NOT_A_GENE".into());
    let input = dir.path().join("empty_cell.h5ad");
    // cell0: only the unknown gene; cell1: nothing at all; cell2: ordinary.
    write_h5ad(&input, &names, vec![], &[vec![(10, 4.0)], vec![], vec![(0, 1.0), (3, 5.0), (10, 2.0)]]);
    let out = dir.path().join("e.npy");
    let text = ok(embed(&input, &out, &[]));
    assert!(text.contains("2 cell(s) express no gene of the vocabulary"), "{text}");
    let e = read_npy(&out);
    assert_eq!(e[0], e[1], "both are <cls> alone");
    assert_ne!(e[0], e[2]);
    for r in &e {
        assert!(r.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn scaled_x_points_to_raw_counts() {
    // pbmc68k_reduced (scanpy's dataset): X is scaled (negative values), raw/X holds the data.
    let dir = tempfile::tempdir().unwrap();
    let input = repo().join("tests/data/pbmc68k_reduced.h5ad");
    let out = dir.path().join("p.h5ad");
    let e = err(embed(&input, &out, &["--min-gene-match", "0.1"]));
    assert!(e.contains("pbmc68k_reduced.h5ad") && e.contains("is negative") && e.contains("--use-raw"), "{e}");
    let text = ok(embed(&input, &out, &["--min-gene-match", "0.1", "--use-raw"]));
    assert!(text.contains("genes: 129 of 765 genes in the var index (raw/X) matched"), "{text}");
    let e = read_obsm(&out);
    assert_eq!((e.len(), e[0].len()), (700, 32));
}

/// original folder -> native checkpoint -> exported original folder: the embeddings from the
/// exported folder are bit-identical to those of the folder it came from.
#[test]
fn convert_then_export_round_trips_to_identical_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let native = dir.path().join("native");
    let exported = dir.path().join("exported");
    ok(scgpt(&["convert", "--model", s(&model()), "--output", s(&native)]));
    assert!(native.join("model.safetensors").is_file() && native.join("config.json").is_file());
    ok(scgpt(&["export", "--checkpoint", s(&native), "--output", s(&exported)]));
    for f in ["best_model.pt", "vocab.json", "args.json"] {
        assert!(exported.join(f).is_file(), "{f} written");
    }
    let run = |m: &Path, out: &str| {
        let o = dir.path().join(out);
        ok(scgpt(&["embed", "--model", s(m), "--input", s(&data("wu30.h5ad")), "--output", s(&o), "--deterministic", "--quiet"]));
        read_npy(&o)
    };
    assert_eq!(run(&model(), "orig.npy"), run(&exported, "exported.npy"));
    let e = err(scgpt(&["export", "--checkpoint", s(&dir.path().join("nothing")), "--output", s(&exported)]));
    assert!(e.contains("nothing"), "{e}");
}
