//! UMAP: the attraction/repulsion curve against umap-learn 0.5.12's `find_ab_params`
//! (`tests/data/eval/umap_reference.json`, written by `tests/gen/eval/gen_umap_reference.py`),
//! and the two-panel picture on real cells: pbmc68k_reduced's PCA (from the scIB fixture) laid
//! out, written, decoded, and its cell types kept together in 2-D.

use std::path::Path;

use scgpt_eval::neighbors::exact_knn;
use scgpt_eval::umap::{find_ab_params, umap, write_umap_png, Colouring, UmapOptions};
use serde_json::Value;

fn json(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/eval").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

#[test]
fn ab_params_match_umap_learn() {
    // scipy's curve_fit stops at its own tolerance (ftol 1.5e-8 on the cost); ours converges
    // further, so the two agree to the fit's flatness, far below what a picture shows.
    for case in json("umap_reference.json")["find_ab_params"].as_array().unwrap() {
        let f = |k: &str| case[k].as_f64().unwrap();
        let (a, b) = find_ab_params(f("spread"), f("min_dist")).unwrap();
        println!("spread {} min_dist {}: a {a:.6} ({:.6}) b {b:.6} ({:.6})", f("spread"), f("min_dist"), f("a"), f("b"));
        assert!((a - f("a")).abs() <= 1e-4 * f("a"), "a {a} vs {}", f("a"));
        assert!((b - f("b")).abs() <= 1e-4 * f("b"), "b {b} vs {}", f("b"));
    }
}

#[test]
fn picture_of_real_cells_is_written_and_decodes() {
    let fx = json("scib_reference.json");
    let inputs = &fx["inputs"];
    let dim = fx["emb_dims"].as_u64().unwrap() as usize;
    let x: Vec<f32> = inputs["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let labels: Vec<String> = inputs["labels"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let batches: Vec<String> = inputs["batches"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    let y = umap(&x, dim, &UmapOptions { n_epochs: Some(200), ..Default::default() }).unwrap();
    let n = labels.len();
    assert_eq!(y.len(), 2 * n);
    // Cell types that share neighbours in the embedding share them in the layout too: the
    // 2-D kNN label agreement stays close to the embedding's own.
    let agree = |pts: &[f32], d: usize| -> f64 {
        let knn = exact_knn(pts, d, 11).unwrap();
        (0..n).map(|i| knn.row(i).0[1..].iter().filter(|&&j| labels[j as usize] == labels[i]).count() as f64 / 10.0).sum::<f64>() / n as f64
    };
    let (hi, lo) = (agree(&x, dim), agree(&y, 2));
    println!("kNN label agreement: embedding {hi:.4}, 2-D layout {lo:.4}");
    assert!(lo > hi - 0.1, "{lo} vs {hi}");

    let dir = tempfile::tempdir().unwrap();
    let panels = [Colouring { title: "label", values: &labels }, Colouring { title: "batch", values: &batches }];
    let path = write_umap_png(dir.path(), "umap.png", &y, "UMAP of a test embedding", &panels).unwrap();
    assert_eq!(path, dir.path().join("umap.png"));
    let decoder = png::Decoder::new(std::fs::File::open(&path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    println!("{} x {} {:?}", info.width, info.height, info.color_type);
    // Two 560-pixel panels side by side with legends.
    assert!(info.width > 2 * 560 && info.height > 560);
    // Both panels' colours are there: tab10's first colour (label 0 and batch b0).
    let px = info.color_type.samples();
    let blue = buf[..info.buffer_size()].chunks(px).filter(|p| p[..3] == [31, 119, 180]).count();
    assert!(blue > 100, "{blue} pixels of the first category colour");
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}
