//! `scgpt grn embedding` end to end on a planted network: a tiny model whose gene embeddings
//! are planted in 6 groups of 8 genes (a group vector + small noise), the bundled PBMC cells
//! as the data. The programs must be the planted groups, the cosine edges must rank a planted
//! reference network (every ordered pair within a group) far above chance and above random
//! edges, and every output must read back (Parquet with pyarrow, the TSVs, the pictures).

use std::path::{Path, PathBuf};
use std::process::Command;

use scgpt_data::h5ad::{H5adReader, MatrixChoice};
use scgpt_model::burn::module::Param;
use scgpt_model::burn::tensor::{Device, Tensor, TensorData};
use scgpt_model::{export_original, ModelConfig};
use serde_json::Value;

mod common;
use common::{pbmc, python, scgpt};

const GROUPS: usize = 6;
const PER_GROUP: usize = 8;

/// The planted genes (the first 48 of the data's genes) and a tiny model over all of them.
fn planted_model(dir: &Path) -> (PathBuf, Vec<Vec<String>>) {
    let genes = H5adReader::open(&pbmc(), MatrixChoice::RawThenX).unwrap().var_names(None).unwrap();
    let mut vocab = serde_json::Map::new();
    for g in &genes {
        vocab.insert(g.clone(), Value::from(vocab.len()));
    }
    for t in ["<pad>", "<cls>", "<eoc>"] {
        vocab.insert(t.into(), Value::from(vocab.len()));
    }
    let (n, d) = (vocab.len(), 16);
    let config = ModelConfig::new(n, d, 2, 16, 1).with_pad_token_id(n - 3);
    let device = Device::flex();
    let mut model = config.init(&device).unwrap();
    // Group g's genes: a random group direction + 10% noise; the other genes random.
    let mut state = 12345u64;
    let mut rand = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let centres: Vec<Vec<f32>> = (0..GROUPS).map(|_| (0..d).map(|_| rand()).collect()).collect();
    let mut w = Vec::with_capacity(n * d);
    for i in 0..n {
        for k in 0..d {
            let noise = rand();
            w.push(if i < GROUPS * PER_GROUP { centres[i / PER_GROUP][k] + 0.1 * noise } else { noise });
        }
    }
    model.encoder.embedding.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, [n, d]), &device));
    let out = dir.join("model");
    export_original(&model, &config, &serde_json::to_string(&Value::Object(vocab)).unwrap(), &out).unwrap();
    let groups = (0..GROUPS).map(|g| genes[g * PER_GROUP..(g + 1) * PER_GROUP].to_vec()).collect();
    (out, groups)
}

#[test]
fn planted_programs_and_edges_are_recovered_and_outputs_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, groups) = planted_model(tmp.path());
    // The planted genes plus 52 others: the network's genes.
    let all = H5adReader::open(&pbmc(), MatrixChoice::RawThenX).unwrap().var_names(None).unwrap();
    let gene_file = tmp.path().join("genes.txt");
    std::fs::write(&gene_file, all[..100].join("\n")).unwrap();
    let mut reference = String::from("regulator\ttarget\n");
    for g in &groups {
        for a in g {
            for b in g.iter().filter(|b| *b != a) {
                reference.push_str(&format!("{a}\t{b}\n"));
            }
        }
    }
    let ref_file = tmp.path().join("reference.tsv");
    std::fs::write(&ref_file, reference).unwrap();
    let gmt = tmp.path().join("sets.gmt");
    std::fs::write(&gmt, format!("PLANTED_0\tgroup 0\t{}\nOTHER\tunrelated\t{}\n", groups[0].join("\t"), all[60..80].join("\t"))).unwrap();

    let out = tmp.path().join("grn");
    let o = scgpt(&[
        "grn",
        "embedding",
        "--model",
        model.to_str().unwrap(),
        "--input",
        pbmc().to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--use-raw",
        "--genes",
        gene_file.to_str().unwrap(),
        "--label-col",
        "bulk_labels",
        "--tsv",
        "--reference",
        ref_file.to_str().unwrap(),
        "--gmt",
        gmt.to_str().unwrap(),
        "--resolution",
        "1.0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Programs: each planted group is one program.
    let programs = std::fs::read_to_string(out.join("programs.tsv")).unwrap();
    let mut by_gene = std::collections::HashMap::new();
    for line in programs.lines().skip(1) {
        let (p, g) = line.split_once('\t').unwrap();
        by_gene.insert(g.to_string(), p.to_string());
    }
    for g in &groups {
        let p = by_gene.get(&g[0]).unwrap_or_else(|| panic!("{} in no program: {programs}", g[0]));
        assert!(g.iter().all(|x| by_gene.get(x) == Some(p)), "group {g:?} split: {programs}");
    }
    // Edges against the planted network, beside the baselines.
    let scores: Value = serde_json::from_str(&std::fs::read_to_string(out.join("reference_scores.json")).unwrap()).unwrap();
    let auroc = scores["model"]["auroc"].as_f64().unwrap_or_else(|| panic!("{scores}"));
    let random = scores["baselines"]["random"]["auroc"].as_f64().unwrap();
    assert!(scores["baselines"]["coexpression"]["auroc"].as_f64().is_some(), "{scores}");
    assert!(scores["verdict"].as_str().unwrap().contains("co-expression"), "{scores}");
    eprintln!("planted network: AUROC {auroc:.3} (random {random:.3}); {scores}");
    assert!(auroc > 0.95 && auroc > random + 0.3, "{scores}");
    // Enrichment: the planted group's program is enriched for PLANTED_0 first.
    let enrich = std::fs::read_to_string(out.join("enrichment.tsv")).unwrap();
    let program = &by_gene[&groups[0][0]];
    let first = enrich.lines().find(|l| l.starts_with(&format!("{program}\t"))).unwrap();
    assert!(first.contains("PLANTED_0"), "{enrich}");

    for f in [
        "program_activity.csv",
        "program_activity_by_cell_type.csv",
        "program_activity_by_cell_type.png",
        "program_network.png",
        "edges.tsv",
        "gene_embeddings.tsv",
        "summary.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The Parquet tables read back with pyarrow: columns in order, 20 edges per gene.
    let script = r#"
import sys, pyarrow.parquet as pq
e = pq.read_table(sys.argv[1] + "/edges.parquet")
v = pq.read_table(sys.argv[1] + "/gene_embeddings.parquet")
assert e.column_names == ["source", "target", "cosine"], e.column_names
assert v.column_names == ["gene", "vector"], v.column_names
print(e.num_rows, v.num_rows, len(v.column("vector")[0]))
"#;
    let o = Command::new(python()).arg("-c").arg(script).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let counts: Vec<usize> = String::from_utf8_lossy(&o.stdout).split_whitespace().map(|s| s.parse().unwrap()).collect();
    assert_eq!(counts, vec![100 * 20, 100, 16]);
}

#[test]
fn too_few_genes_in_the_vocabulary_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = planted_model(tmp.path());
    let gene_file = tmp.path().join("genes.txt");
    std::fs::write(&gene_file, "NOTAGENE1\nNOTAGENE2\n").unwrap();
    let o = scgpt(&[
        "grn",
        "embedding",
        "--model",
        model.to_str().unwrap(),
        "--input",
        pbmc().to_str().unwrap(),
        "--use-raw",
        "--output",
        tmp.path().join("o").to_str().unwrap(),
        "--genes",
        gene_file.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("at least 10"), "{e}");
}

#[test]
fn scaled_data_is_refused_with_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = planted_model(tmp.path());
    let out = tmp.path().join("o");
    // pbmc68k_reduced's X is scanpy's scaled matrix (z-scores down to -2.03); .raw is log-normalised.
    let o = scgpt(&[
        "grn",
        "embedding",
        "--model",
        model.to_str().unwrap(),
        "--input",
        pbmc().to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("negative values") && e.contains("--use-raw") && e.contains("pbmc68k_reduced.h5ad"), "{e}");
    assert!(!out.exists(), "no output after an error");
}
