//! Time and size of each list column of a shard under this project's encoders (list_pages)
//! and the parquet crate's writer with different encodings, on real shard data: `encode_bench <shard.parquet> [row_groups]`. One thread, each column alone, each
//! setting written three times (best kept), so the ratios hold on a busy machine. A third
//! argument `ours` times only this project's encoders (for profiling them).
use std::sync::Arc;
use std::time::Instant;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::Schema;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};

fn main() -> anyhow::Result<()> {
    // As the binaries run: freed buffers reused, not page-faulted in again.
    scgpt_data::alloc::tune_for_tensors();
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).ok_or_else(|| anyhow::anyhow!("usage: encode_bench <shard.parquet> [row_groups]"))?;
    let groups: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(4);
    let ours_only = args.get(3).is_some_and(|a| a == "ours");
    let file = std::fs::File::open(path)?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.with_row_groups((0..groups).collect()).with_batch_size(2048).build()?;
    let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>()?;
    for col in ["genes", "expressions", "bins"] {
        let parts: Vec<ArrayRef> = batches.iter().map(|b| b.column_by_name(col).expect("shard column").clone()).collect();
        let field = batches[0].schema().field_with_name(col)?.clone();
        let schema = Arc::new(Schema::new(vec![field]));
        let values: usize = parts.iter().map(|a| a.to_data().child_data()[0].len()).sum();
        let item = parquet::schema::types::ColumnPath::from(vec![col.to_string(), "list".into(), "item".into()]);
        let zstd = Compression::ZSTD(ZstdLevel::try_new(1)?);
        let settings: Vec<(&str, Encoding, bool, Compression)> = vec![
            ("plain", Encoding::PLAIN, false, Compression::UNCOMPRESSED),
            ("plain+zstd1", Encoding::PLAIN, false, zstd),
            ("delta", Encoding::DELTA_BINARY_PACKED, false, Compression::UNCOMPRESSED),
            ("delta+zstd1", Encoding::DELTA_BINARY_PACKED, false, zstd),
            ("split+zstd1", Encoding::BYTE_STREAM_SPLIT, false, zstd),
            ("dict", Encoding::PLAIN, true, Compression::UNCOMPRESSED),
            ("dict+zstd1", Encoding::PLAIN, true, zstd),
        ];
        {
            // This project's encoders (scgpt_prep::io::list_pages), as the shard writer uses them.
            let pschema = parquet::arrow::ArrowSchemaConverter::new().convert(&schema)?;
            let descr = pschema.column(0);
            let mut best = f64::INFINITY;
            let mut bytes = 0;
            for _ in 0..3 {
                let t = Instant::now();
                bytes = 0;
                for a in &parts {
                    use arrow_array::cast::AsArray;
                    let list = a.as_list::<i32>();
                    let offsets: Vec<i32> = list.value_offsets().iter().map(|o| o - list.value_offsets()[0]).collect();
                    let v = list.values();
                    let chunk = match v.data_type() {
                        arrow_schema::DataType::Int32 => scgpt_prep::io::list_pages::encode_delta_i32(
                            descr.clone(),
                            &offsets,
                            &v.as_primitive::<arrow_array::types::Int32Type>().values()[..].into(),
                        ),
                        arrow_schema::DataType::UInt8 => scgpt_prep::io::list_pages::encode_identity_dictionary_u8(
                            descr.clone(),
                            &offsets,
                            &v.as_primitive::<arrow_array::types::UInt8Type>().values()[..].into(),
                        ),
                        _ => scgpt_prep::io::list_pages::encode_f32(
                            descr.clone(),
                            &offsets,
                            &v.as_primitive::<arrow_array::types::Float32Type>().values()[..].into(),
                        ),
                    }?;
                    bytes += chunk.bytes.len();
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{col:12} {:12} {:6.2} ns/value {:5.3} B/value  list_pages",
                "ours",
                best * 1e9 / values as f64,
                bytes as f64 / values as f64
            );
        }
        for (name, enc, dict, comp) in settings {
            if ours_only {
                break;
            }
            if (enc == Encoding::DELTA_BINARY_PACKED && col == "expressions")
                || (enc == Encoding::BYTE_STREAM_SPLIT && col != "expressions")
            {
                continue;
            }
            let mut b = WriterProperties::builder()
                .set_compression(comp)
                .set_max_row_group_row_count(Some(2048))
                .set_dictionary_enabled(dict)
                .set_column_statistics_enabled(item.clone(), EnabledStatistics::None);
            if !dict {
                b = b.set_column_encoding(item.clone(), enc);
            }
            let props = b.build();
            let mut best = f64::INFINITY;
            let mut bytes = 0;
            for _ in 0..3 {
                let t = Instant::now();
                let mut w = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props.clone()))?;
                for a in &parts {
                    w.write(&RecordBatch::try_new(schema.clone(), vec![a.clone()])?)?;
                }
                let out = w.into_inner()?;
                best = best.min(t.elapsed().as_secs_f64());
                bytes = out.len();
            }
            println!("{col:12} {name:12} {:6.2} ns/value {:5.3} B/value  arrow", best * 1e9 / values as f64, bytes as f64 / values as f64);
            let (t, n) = low_level(&schema, &parts, props.clone())?;
            println!(
                "{col:12} {name:12} {:6.2} ns/value {:5.3} B/value  levels by hand",
                t * 1e9 / values as f64,
                n as f64 / values as f64
            );
        }
    }
    Ok(())
}

/// The same column through the typed column writer with levels computed by hand (every list
/// non-empty: def 1 everywhere, rep 0 at a cell's first value).
fn low_level(schema: &Arc<Schema>, parts: &[ArrayRef], props: WriterProperties) -> anyhow::Result<(f64, usize)> {
    use arrow_array::cast::AsArray;
    use parquet::data_type::{FloatType, Int32Type};
    let pschema = parquet::arrow::ArrowSchemaConverter::new().convert(schema)?;
    let props = Arc::new(props);
    let mut best = f64::INFINITY;
    let mut bytes = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let mut w = parquet::file::writer::SerializedFileWriter::new(Vec::new(), pschema.root_schema_ptr(), props.clone())?;
        let (mut def, mut rep) = (Vec::new(), Vec::new());
        for a in parts {
            let list = a.as_list::<i32>();
            def.clear();
            rep.clear();
            let offs = list.value_offsets();
            for c in offs.windows(2) {
                rep.push(0i16);
                rep.extend(std::iter::repeat_n(1i16, (c[1] - c[0]) as usize - 1));
            }
            def.resize(rep.len(), 1i16);
            let mut rg = w.next_row_group()?;
            let mut col = rg.next_column()?.expect("one column");
            let v = list.values();
            match v.data_type() {
                arrow_schema::DataType::Int32 => {
                    col.typed::<Int32Type>().write_batch(
                        v.as_primitive::<arrow_array::types::Int32Type>().values(),
                        Some(&def),
                        Some(&rep),
                    )?;
                }
                arrow_schema::DataType::UInt8 => {
                    let x: Vec<i32> = v.as_primitive::<arrow_array::types::UInt8Type>().values().iter().map(|&b| b as i32).collect();
                    col.typed::<Int32Type>().write_batch(&x, Some(&def), Some(&rep))?;
                }
                _ => {
                    col.typed::<FloatType>().write_batch(
                        v.as_primitive::<arrow_array::types::Float32Type>().values(),
                        Some(&def),
                        Some(&rep),
                    )?;
                }
            }
            col.close()?;
            rg.close()?;
        }
        let out = w.into_inner()?;
        best = best.min(t.elapsed().as_secs_f64());
        bytes = out.len();
    }
    Ok((best, bytes))
}
