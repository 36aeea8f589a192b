//! A copy of the input h5ad with a classifier's results added, everything else kept:
//! `obs["scgpt_label"]` (categorical), `obs["scgpt_confidence"]`, `obsm["scgpt_probs"]`
//! (cells × classes) and `uns["scgpt_classes"]` (the column order). Written to a temp file and
//! renamed, so a failure leaves no half file.

use std::path::Path;

use anyhow::Context;
use hdf5::types::VarLenUnicode;

use crate::sink::{copy_writable, encoding, str_attr, string_array, vlen, Temp};

pub struct Predictions<'a> {
    pub labels: &'a [String],
    pub confidence: &'a [f32],
    /// Row-major cells × classes.
    pub probs: &'a [f32],
    pub classes: &'a [String],
}

fn group_or_create(file: &hdf5::File, name: &str) -> hdf5::Result<hdf5::Group> {
    if file.link_exists(name) {
        file.group(name)
    } else {
        let g = file.create_group(name)?;
        encoding(&g, "dict", "0.1.0")?;
        Ok(g)
    }
}

fn replace(g: &hdf5::Group, name: &str) -> hdf5::Result<()> {
    if g.link_exists(name) {
        g.unlink(name)?;
    }
    Ok(())
}

/// A categorical obs column (anndata ≥ 0.8 encoding), categories in first-seen-sorted order.
fn categorical(obs: &hdf5::Group, name: &str, values: &[String]) -> hdf5::Result<()> {
    let mut cats: Vec<String> = values.to_vec();
    cats.sort();
    cats.dedup();
    let codes: Vec<i32> = values.iter().map(|v| cats.binary_search(v).expect("a category") as i32).collect();
    replace(obs, name)?;
    let g = obs.create_group(name)?;
    encoding(&g, "categorical", "0.2.0")?;
    g.new_attr::<bool>().shape(()).create("ordered")?.write_scalar(&false)?;
    g.new_dataset::<i32>().shape(codes.len()).create("codes")?.write_raw(&codes)?;
    string_array(&g, "categories", &cats)
}

/// Appends `names` to the obs dataframe's `column-order` attribute (once each).
fn add_to_column_order(obs: &hdf5::Group, names: &[&str]) -> hdf5::Result<()> {
    let mut order: Vec<String> = match obs.attr("column-order") {
        Ok(a) => a.read_raw::<VarLenUnicode>().map(|v| v.iter().map(|s| s.as_str().to_string()).collect()).unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    for n in names {
        if !order.iter().any(|o| o == n) {
            order.push(n.to_string());
        }
    }
    if obs.attr("column-order").is_ok() {
        obs.delete_attr("column-order")?;
    }
    let v: Vec<VarLenUnicode> = order.iter().map(|s| vlen(s)).collect();
    obs.new_attr::<VarLenUnicode>().shape(v.len()).create("column-order")?.write_raw(&v)
}

pub fn write(input: &Path, output: &Path, p: &Predictions) -> anyhow::Result<()> {
    let n = p.labels.len();
    let k = p.classes.len();
    let mut temp = Temp::new(output);
    copy_writable(input, &temp.tmp)?;
    let e = |what: &str| format!("{}: {what}", output.display());
    let file = hdf5::File::open_rw(&temp.tmp).with_context(|| e("cannot open the copy read-write"))?;
    {
        let obs = file.group("obs").with_context(|| e("no obs dataframe"))?;
        categorical(&obs, "scgpt_label", p.labels).with_context(|| e("writing obs/scgpt_label"))?;
        replace(&obs, "scgpt_confidence")?;
        let ds = obs.new_dataset::<f32>().shape(n).create("scgpt_confidence").with_context(|| e("writing obs/scgpt_confidence"))?;
        ds.write_raw(p.confidence)?;
        encoding(&ds, "array", "0.2.0")?;
        add_to_column_order(&obs, &["scgpt_label", "scgpt_confidence"]).with_context(|| e("obs column-order"))?;
        if obs.attr("encoding-type").is_err() {
            encoding(&obs, "dataframe", "0.2.0")?;
            str_attr(&obs, "_index", "_index")?;
        }

        let obsm = group_or_create(&file, "obsm")?;
        replace(&obsm, "scgpt_probs")?;
        let ds = obsm.new_dataset::<f32>().shape([n, k]).create("scgpt_probs").with_context(|| e("writing obsm/scgpt_probs"))?;
        if n > 0 {
            ds.write_raw(p.probs)?;
        }
        encoding(&ds, "array", "0.2.0")?;

        let uns = group_or_create(&file, "uns")?;
        replace(&uns, "scgpt_classes")?;
        string_array(&uns, "scgpt_classes", p.classes).with_context(|| e("writing uns/scgpt_classes"))?;
    }
    file.close().with_context(|| e("closing"))?;
    temp.commit()
}
