//! The GEARS perturbation picture: it decodes, has its size, shows its markers, and bad input is
//! an error that writes nothing.

use std::path::Path;

use scgpt_eval::perturbation_plot::{de_plot_size, write_de_plot, DePlot, EXTRA_COLOUR, PREDICTED_COLOUR};

/// Width, height, samples per pixel and the pixels.
fn decode(path: &Path) -> (u32, u32, usize, Vec<u8>) {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, info.color_type.samples(), buf)
}

fn count(buf: &[u8], samples: usize, rgb: [u8; 3]) -> usize {
    buf.chunks(samples).filter(|p| p[..3] == rgb).count()
}

/// 20 genes, 60 cells each, spread around a gene-dependent shift, with a few outliers.
fn example() -> (Vec<String>, Vec<Vec<f32>>, Vec<f64>, Vec<f64>) {
    let genes: Vec<String> =
        (0..20).map(|g| if g == 3 { "AVERYLONGGENESYMBOL-AS1-WITH-MORE".to_string() } else { format!("GENE{g}") }).collect();
    let truth: Vec<Vec<f32>> = (0..20)
        .map(|g| {
            let shift = (g as f32 - 8.0) * 0.15;
            (0..60).map(|c| shift + ((c * 37 + g * 11) % 29) as f32 / 29.0 - 0.5 + if c == 0 { 3.0 } else { 0.0 }).collect()
        })
        .collect();
    let predicted: Vec<f64> = (0..20).map(|g| (g as f64 - 8.0) * 0.14).collect();
    let baseline: Vec<f64> = (0..20).map(|g| 0.8 - g as f64 * 0.05).collect();
    (genes, truth, predicted, baseline)
}

#[test]
fn draws_the_gears_picture() {
    let (genes, truth, predicted, _) = example();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("FOSB+ctrl.png");
    let plot = DePlot { condition: "FOSB+ctrl", genes: &genes, truth: &truth, predicted: &predicted, extra: None };
    write_de_plot(&plot, &path).unwrap();
    let (w, h, samples, buf) = decode(&path);
    println!("{w} x {h}");
    assert_eq!((w, h), de_plot_size(&plot));
    // 20 genes × 56 pixels plus 124 for the axes; 530 high without a legend.
    assert_eq!((w, h), (20 * 56 + 124, 530));
    let red = count(&buf, samples, [PREDICTED_COLOUR.0, PREDICTED_COLOUR.1, PREDICTED_COLOUR.2]);
    assert!(red > 20 * 40, "{red} red pixels for 20 dots");
    assert_eq!(count(&buf, samples, [EXTRA_COLOUR.0, EXTRA_COLOUR.1, EXTRA_COLOUR.2]), 0);
    // Box lines and text in black, the dashed zero line in green.
    assert!(count(&buf, samples, [0, 0, 0]) > 2_000);
    assert!(count(&buf, samples, [0, 128, 0]) > 300);
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn a_second_series_gets_its_markers_and_a_legend() {
    let (genes, truth, predicted, baseline) = example();
    let dir = tempfile::tempdir().unwrap();
    // A folder that does not exist yet is created.
    let path = dir.path().join("plots").join("de.png");
    let plot =
        DePlot { condition: "FOSB+ctrl", genes: &genes, truth: &truth, predicted: &predicted, extra: Some(("mean baseline", &baseline)) };
    write_de_plot(&plot, &path).unwrap();
    let (w, h, samples, buf) = decode(&path);
    assert_eq!((w, h), de_plot_size(&plot));
    assert_eq!((w, h), (20 * 56 + 124, 530 + 28));
    let red = count(&buf, samples, [PREDICTED_COLOUR.0, PREDICTED_COLOUR.1, PREDICTED_COLOUR.2]);
    let blue = count(&buf, samples, [EXTRA_COLOUR.0, EXTRA_COLOUR.1, EXTRA_COLOUR.2]);
    assert!(red > 20 * 40, "{red} red pixels");
    assert!(blue > 20 * 20, "{blue} blue pixels");
    // The legend's markers lie below the gene names.
    let row = |y: u32| &buf[(y * w) as usize * samples..((y + 1) * w) as usize * samples];
    let legend_rows = (530..h).map(row);
    let (mut r, mut b) = (0, 0);
    for line in legend_rows {
        r += count(line, samples, [255, 0, 0]);
        b += count(line, samples, [EXTRA_COLOUR.0, EXTRA_COLOUR.1, EXTRA_COLOUR.2]);
    }
    assert!(r > 20 && b > 10, "legend markers: {r} red, {b} blue");
}

#[test]
fn one_gene_and_empty_truth_still_draw() {
    let genes = vec!["ONLY".to_string()];
    let truth = vec![Vec::new()];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.png");
    let plot = DePlot { condition: "A+B", genes: &genes, truth: &truth, predicted: &[0.0], extra: None };
    write_de_plot(&plot, &path).unwrap();
    let (w, h, samples, buf) = decode(&path);
    assert_eq!((w, h), (280 + 124, 530));
    assert!(count(&buf, samples, [255, 0, 0]) > 40);
}

#[test]
fn bad_input_is_an_error_and_writes_nothing() {
    let (genes, truth, predicted, baseline) = example();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.png");
    let ok = DePlot { condition: "FOSB+ctrl", genes: &genes, truth: &truth, predicted: &predicted, extra: None };
    let err = |plot: DePlot| write_de_plot(&plot, &path).unwrap_err().to_string();

    assert!(err(DePlot { genes: &[], truth: &[], predicted: &[], ..ok }).contains("no genes"));
    assert!(err(DePlot { truth: &truth[..19], ..ok }).contains("truth"));
    assert!(err(DePlot { predicted: &predicted[..19], ..ok }).contains("predicted"));
    assert!(err(DePlot { extra: Some(("baseline", &baseline[..3])), ..ok }).contains("baseline"));

    let mut nan_truth = truth.clone();
    nan_truth[5][7] = f32::NAN;
    let e = err(DePlot { truth: &nan_truth, ..ok });
    assert!(e.contains("GENE5") && e.contains("true"), "{e}");
    let mut inf_pred = predicted.clone();
    inf_pred[2] = f64::INFINITY;
    let e = err(DePlot { predicted: &inf_pred, ..ok });
    assert!(e.contains("GENE2") && e.contains("predicted"), "{e}");
    let mut nan_base = baseline.clone();
    nan_base[11] = f64::NAN;
    let e = err(DePlot { extra: Some(("baseline", &nan_base)), ..ok });
    assert!(e.contains("GENE11") && e.contains("baseline"), "{e}");
    assert!(write_de_plot(&ok, &dir.path().join("bad.jpg")).is_err());

    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}
