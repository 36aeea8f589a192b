//! The GRN pictures: a program's network and the activity heatmap decode as PNGs of a sensible
//! size, are not blank (nodes, edges and cells drawn in their colours), and bad input is an
//! error that leaves no file behind.

use std::path::Path;

use scgpt_eval::grn::{write_activity_heatmap_png, write_program_network_png, ActivityTable, GeneEmbeddings, MAX_NETWORK_GENES};

/// Width, height, samples per pixel and the pixels.
fn decode(path: &Path) -> (u32, u32, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, info.color_type.samples(), buf)
}

fn count(buf: &[u8], samples: usize, keep: impl Fn(&[u8]) -> bool) -> usize {
    buf.chunks(samples).filter(|p| keep(&p[..3])).count()
}

/// 12 genes: two groups of 6 with similar vectors (cosine > 0.9 within, about 0 across).
fn embedding() -> GeneEmbeddings {
    let genes: Vec<String> = (0..12).map(|i| if i == 5 { "A-VERY-LONG-GENE-NAME-AS1".to_string() } else { format!("GENE{i}") }).collect();
    let mut v = Vec::new();
    for i in 0..12 {
        let jitter = i as f32 * 0.03;
        if i < 6 {
            v.extend([1.0, jitter, 0.0, 0.1]);
        } else {
            v.extend([0.0, 0.1, 1.0, jitter]);
        }
    }
    GeneEmbeddings::new(genes, v, 4).unwrap()
}

#[test]
fn network_picture_draws_nodes_edges_and_labels() {
    let emb = embedding();
    let dir = tempfile::tempdir().unwrap();
    let genes: Vec<usize> = (0..12).collect();
    let p = write_program_network_png(dir.path(), "program_0.png", &emb, &genes, 0.4, "program 0").unwrap();
    let (w, h, s, buf) = decode(&p);
    assert!(w >= 700 && h >= 700, "{w}×{h}");
    let red = count(&buf, s, |p| p == [214, 39, 40]);
    let blue_edges = count(&buf, s, |p| p[2] > 120 && p[0] < 150 && p[2] > p[0] + 40);
    let dark_text = count(&buf, s, |p| p.iter().all(|&c| c < 80));
    println!("{w}×{h}: node pixels {red}, edge pixels {blue_edges}, text pixels {dark_text}");
    assert!(red > 12 * 60, "nodes drawn");
    assert!(blue_edges > 1000, "edges drawn");
    assert!(dark_text > 500, "labels drawn");
    // No edge above a threshold of 0.99 except near-identical genes: still a picture.
    let p2 = write_program_network_png(dir.path(), "sparse.png", &emb, &genes[..3], 0.999, "three genes").unwrap();
    assert!(decode(&p2).0 > 0);
    let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names.len(), 2, "no temporary files: {names:?}");
}

#[test]
fn heatmap_draws_cells_and_greys_constant_rows() {
    let table = ActivityTable {
        programs: vec!["0: CD3E, CD3D, LCK".into(), "1".into(), "2 (constant)".into()],
        cell_types: vec!["B cell".into(), "CD4 T".into(), "Monocyte".into(), "NK".into()],
        n_cells: vec![10, 10, 10, 10],
        mean: vec![vec![0.1, 0.9, 0.2, 0.5], vec![0.7, 0.1, 0.3, 0.2], vec![0.4, 0.4, 0.4, 0.4]],
    };
    let dir = tempfile::tempdir().unwrap();
    let p = write_activity_heatmap_png(dir.path(), "activity.png", &table, "program activity by cell type", true).unwrap();
    let (w, h, s, buf) = decode(&p);
    assert!(w > 300 && h > 200, "{w}×{h}");
    let grey = count(&buf, s, |p| p == [210, 210, 210]);
    let light = count(&buf, s, |p| p == [222, 245, 229]);
    let dark = count(&buf, s, |p| p == [11, 4, 5]);
    println!("{w}×{h}: grey {grey}, lightest {light}, darkest {dark}");
    assert!(grey > 1000, "the constant row is grey when rows are scaled");
    assert!(light > 100 && dark > 100, "scaled rows reach both ends of the colour map");
    let p2 = write_activity_heatmap_png(dir.path(), "raw.png", &table, "raw", false).unwrap();
    let (_, _, s2, buf2) = decode(&p2);
    assert_eq!(count(&buf2, s2, |p| p == [210, 210, 210]), 0, "no grey without scaling");
}

#[test]
fn bad_input_is_an_error_and_writes_nothing() {
    let emb = embedding();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(write_program_network_png(d, "a.png", &emb, &[], 0.4, "t").is_err());
    assert!(write_program_network_png(d, "a.png", &emb, &[0, 12], 0.4, "t").is_err());
    assert!(write_program_network_png(d, "a.png", &emb, &[0, 0], 0.4, "t").is_err());
    assert!(write_program_network_png(d, "a.png", &emb, &[0, 1], f64::NAN, "t").is_err());
    assert!(write_program_network_png(d, "a.png", &emb, &[0, 1], 1.0, "t").is_err());
    let many: Vec<usize> = (0..=MAX_NETWORK_GENES).collect();
    let big = GeneEmbeddings::new((0..=MAX_NETWORK_GENES).map(|i| format!("G{i}")).collect(), vec![1.0; MAX_NETWORK_GENES + 1], 1).unwrap();
    assert!(write_program_network_png(d, "a.png", &big, &many, 0.4, "t").is_err());
    let empty = ActivityTable { programs: vec![], cell_types: vec!["x".into()], n_cells: vec![1], mean: vec![] };
    assert!(write_activity_heatmap_png(d, "h.png", &empty, "t", true).is_err());
    let ragged =
        ActivityTable { programs: vec!["0".into()], cell_types: vec!["x".into(), "y".into()], n_cells: vec![1, 1], mean: vec![vec![0.5]] };
    assert!(write_activity_heatmap_png(d, "h.png", &ragged, "t", true).is_err());
    let nan = ActivityTable { programs: vec!["0".into()], cell_types: vec!["x".into()], n_cells: vec![1], mean: vec![vec![f64::NAN]] };
    assert!(write_activity_heatmap_png(d, "h.png", &nan, "t", true).is_err());
    assert_eq!(std::fs::read_dir(d).unwrap().count(), 0, "nothing written");
}
