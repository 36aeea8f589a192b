//! Parquet column chunks for the shards' three list columns, encoded by hand.
//!
//! The parquet crate's generic column writer spends 8–15 ns per value on levels, statistics and
//! its encoders, and zstd over 4-byte values cost as much again: most of data-prep's CPU. These
//! lists have a fixed shape (non-null list of non-null items, one list per cell), so their
//! levels are a few run-length runs per cell, and each value column has an encoding that needs
//! no general-purpose compressor:
//!
//! - gene ids: `DELTA_BINARY_PACKED` (sorted-ish small deltas, ~0.86 B/value; zstd saved 10%);
//! - bins: `RLE_DICTIONARY` over the identity dictionary `0..=max`, so the bins are the indices,
//!   bit-packed at 6 bits for 51 bins (entropy of uniform bins is 5.6 bits: zstd can't do better);
//! - expressions: `RLE_DICTIONARY` over the chunk's distinct values (integer counts: a few
//!   hundred, 7–9 bits each), or `BYTE_STREAM_SPLIT` + zstd when a chunk has more than
//!   [`MAX_FLOAT_DICTIONARY`] distinct values (log-normalised input).
//!
//! Pages (format v1) break at cell boundaries. The chunks are spliced into the row group with
//! `SerializedRowGroupWriter::append_column`, so the file's schema, footer and Arrow metadata
//! are the parquet crate's own; any Parquet reader decodes them (tested with the parquet crate
//! here and pyarrow in data-prep's end-to-end tests).

use std::collections::HashMap;

use bytes::Bytes;
use parquet::basic::{Compression, Encoding, EncodingMask, ZstdLevel};
use parquet::column::page::{CompressedPage, Page, PageWriteSpec, PageWriter};
use parquet::column::writer::ColumnCloseResult;
use parquet::file::metadata::ColumnChunkMetaData;
use parquet::file::writer::{SerializedPageWriter, TrackedWrite};
use parquet::schema::types::ColumnDescPtr;

use scgpt_data::small_int;

mod bit_pack;
mod small_ints;

use bit_pack::*;
use small_ints::*;

/// Values per data page, at most (pages end at the first cell boundary past it).
const PAGE_VALUES: usize = 1 << 18;

/// Above this many distinct expression values in a chunk, dictionary indices stop paying.
pub const MAX_FLOAT_DICTIONARY: usize = 1 << 16;

/// One encoded column chunk, ready for `append_column`.
pub struct ListChunk {
    pub bytes: ChunkPieces,
    pub close: ColumnCloseResult,
}

/// A column chunk's bytes as the buffers they were written in (page headers, page bodies),
/// read as one sequence: splicing it into a file copies each body once, not twice.
#[derive(Clone, Default, Debug)]
pub struct ChunkPieces {
    pieces: Vec<Bytes>,
    /// Offset of each piece's first byte.
    starts: Vec<u64>,
    len: u64,
}

impl ChunkPieces {
    fn new(pieces: Vec<Bytes>) -> Self {
        let pieces: Vec<Bytes> = pieces.into_iter().filter(|p| !p.is_empty()).collect();
        let mut starts = Vec::with_capacity(pieces.len());
        let mut len = 0;
        for p in &pieces {
            starts.push(len);
            len += p.len() as u64;
        }
        ChunkPieces { pieces, starts, len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// All the bytes in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        self.pieces.concat()
    }

    /// The pieces from byte `start` on, the first cut to start there.
    fn from(&self, start: u64) -> parquet::errors::Result<std::collections::VecDeque<Bytes>> {
        if start > self.len {
            return Err(parquet::errors::ParquetError::EOF(format!("offset {start} past a chunk of {} bytes", self.len)));
        }
        let first = self.starts.partition_point(|&s| s <= start).saturating_sub(1);
        let mut out: std::collections::VecDeque<Bytes> = self.pieces[first.min(self.pieces.len())..].iter().cloned().collect();
        if let Some(p) = out.front_mut() {
            *p = p.slice((start - self.starts[first]) as usize..);
        }
        Ok(out)
    }
}

impl parquet::file::reader::Length for ChunkPieces {
    fn len(&self) -> u64 {
        self.len
    }
}

impl parquet::file::reader::ChunkReader for ChunkPieces {
    type T = PiecesReader;

    fn get_read(&self, start: u64) -> parquet::errors::Result<PiecesReader> {
        Ok(PiecesReader(self.from(start)?))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let mut out = Vec::with_capacity(length);
        std::io::Read::read_to_end(&mut std::io::Read::take(self.get_read(start)?, length as u64), &mut out)?;
        if out.len() < length {
            return Err(parquet::errors::ParquetError::EOF(format!("{length} bytes at {start} past a chunk of {} bytes", self.len)));
        }
        Ok(Bytes::from(out))
    }
}

/// Reads [`ChunkPieces`] in order from an offset.
pub struct PiecesReader(std::collections::VecDeque<Bytes>);

impl std::io::Read for PiecesReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while let Some(p) = self.0.front_mut() {
            if p.is_empty() {
                self.0.pop_front();
                continue;
            }
            let n = buf.len().min(p.len());
            buf[..n].copy_from_slice(&p[..n]);
            bytes::Buf::advance(p, n);
            return Ok(n);
        }
        Ok(0)
    }
}

/// Where the page writer writes a chunk: runs of small writes (the page headers) are copied,
/// and a write of exactly the body announced with [`PieceSink::expect`] keeps that buffer
/// instead (copying every page into one buffer was 2% of a prep run). Any other write is
/// copied, so the bytes are right whichever path a write takes.
#[derive(Default)]
struct PieceSink {
    pieces: Vec<Bytes>,
    small: Vec<u8>,
    body: Option<Bytes>,
}

impl PieceSink {
    fn expect(&mut self, body: Bytes) {
        self.body = Some(body);
    }

    fn cut(&mut self) {
        if !self.small.is_empty() {
            self.pieces.push(Bytes::from(std::mem::take(&mut self.small)));
        }
    }

    fn finish(mut self) -> ChunkPieces {
        self.cut();
        ChunkPieces::new(self.pieces)
    }
}

impl std::io::Write for PieceSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.body.take() {
            Some(body) if std::ptr::eq(buf.as_ptr(), body.as_ptr()) && buf.len() == body.len() => {
                self.cut();
                self.pieces.push(body);
            }
            body => {
                self.body = body;
                self.small.extend_from_slice(buf);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A column's values in consecutive parts (the binned chunks of a row group), encoded as one
/// sequence without first being copied together: that copy was 7.5% of a prep run's binning
/// pass, on the one writer thread.
pub struct Segments<'a, T> {
    parts: Vec<&'a [T]>,
    /// Index of each part's first value.
    starts: Vec<usize>,
    len: usize,
}

impl<'a, T: Copy> Segments<'a, T> {
    pub fn new(parts: impl IntoIterator<Item = &'a [T]>) -> Self {
        let parts: Vec<&[T]> = parts.into_iter().filter(|p| !p.is_empty()).collect();
        let mut starts = Vec::with_capacity(parts.len());
        let mut len = 0;
        for p in &parts {
            starts.push(len);
            len += p.len();
        }
        Segments { parts, starts, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn parts(&self) -> &[&'a [T]] {
        &self.parts
    }

    /// Values `a..b` in order, handed to `f` as slices whose lengths are multiples of `unit`
    /// (the last may be shorter): borrowed from the parts, with only the units that straddle
    /// two parts gathered into `stage`. Encoders that work a group of `unit` at a time see the
    /// sequence as if it were one slice, without the copy of every page that spans parts
    /// (2.5% of a prep run).
    fn for_each_run(&self, a: usize, b: usize, unit: usize, stage: &mut Vec<T>, mut f: impl FnMut(&[T])) {
        if a >= b {
            return;
        }
        stage.clear();
        let first = self.starts.partition_point(|&s| s <= a) - 1;
        for (p, &s) in self.parts[first..].iter().zip(&self.starts[first..]) {
            if s >= b {
                break;
            }
            let mut piece = &p[a.max(s) - s..b.min(s + p.len()) - s];
            if !stage.is_empty() {
                let take = (unit - stage.len()).min(piece.len());
                stage.extend_from_slice(&piece[..take]);
                piece = &piece[take..];
                if stage.len() < unit {
                    continue;
                }
                f(stage);
                stage.clear();
            }
            let whole = piece.len() / unit * unit;
            if whole > 0 {
                f(&piece[..whole]);
            }
            stage.extend_from_slice(&piece[whole..]);
        }
        if !stage.is_empty() {
            f(stage);
        }
    }

    /// Values `a..b`: borrowed when one part holds them, else gathered into `scratch`.
    fn slice<'s>(&'s self, a: usize, b: usize, scratch: &'s mut Vec<T>) -> &'s [T] {
        if a >= b {
            return &[];
        }
        let first = self.starts.partition_point(|&s| s <= a) - 1;
        let local = a - self.starts[first];
        if local + (b - a) <= self.parts[first].len() {
            return &self.parts[first][local..local + (b - a)];
        }
        scratch.clear();
        for (p, &s) in self.parts[first..].iter().zip(&self.starts[first..]) {
            if s >= b {
                break;
            }
            scratch.extend_from_slice(&p[a.max(s) - s..b.min(s + p.len()) - s]);
        }
        scratch
    }
}

impl<'a, T: Copy> From<&'a [T]> for Segments<'a, T> {
    fn from(values: &'a [T]) -> Self {
        Segments::new([values])
    }
}

/// Gene ids: `DELTA_BINARY_PACKED`, uncompressed.
pub fn encode_delta_i32(descr: ColumnDescPtr, offsets: &[i32], values: &Segments<i32>) -> parquet::errors::Result<ListChunk> {
    let mut chunk = ChunkBuilder::new(descr, Compression::UNCOMPRESSED)?;
    let mut stage = Vec::new();
    for (a, b) in page_ranges(offsets) {
        let (va, vb) = (offsets[a] as usize, offsets[b] as usize);
        let mut buf = chunk.levels(&offsets[a..=b]);
        let first = values.slice(va, (va + 1).min(vb), &mut stage).first().copied();
        let mut delta = DeltaPacker::start(first, vb - va, &mut buf);
        values.for_each_run(va + 1, vb, DELTA_BLOCK, &mut stage, |run| delta.blocks(run, &mut buf));
        chunk.data_page(buf, Encoding::DELTA_BINARY_PACKED, &offsets[a..=b])?;
    }
    chunk.finish()
}

/// Bins: `RLE_DICTIONARY` over the identity dictionary `0..=max(bins)`, uncompressed.
pub fn encode_identity_dictionary_u8(descr: ColumnDescPtr, offsets: &[i32], values: &Segments<u8>) -> parquet::errors::Result<ListChunk> {
    let size = values.parts().iter().filter_map(|p| p.iter().copied().max()).max().map_or(1, |m| m as usize + 1);
    let plain: Vec<u8> = (0..size as i32).flat_map(i32::to_le_bytes).collect();
    encode_dictionary(descr, offsets, plain, size, values, byte_pack)
}

/// Expressions: `RLE_DICTIONARY` over the distinct values, uncompressed; `BYTE_STREAM_SPLIT`
/// with zstd when there are too many of them.
pub fn encode_f32(descr: ColumnDescPtr, offsets: &[i32], values: &Segments<f32>) -> parquet::errors::Result<ListChunk> {
    if let Some((dict, rank)) = small_integer_dictionary(values) {
        let indices = |run: &[f32], width: u8, buf: &mut Vec<u8>| small_int_pack(run, &rank, width, buf);
        return encode_dictionary(descr, offsets, plain_f32(&dict), dict.len(), values, indices);
    }
    let Some((dict, indices)) = float_dictionary(values) else {
        return encode_byte_stream_split_zstd(descr, offsets, values);
    };
    let copy = |run: &[u32], width: u8, buf: &mut Vec<u8>| pack_indices(run.iter().copied(), run.len(), width, buf);
    encode_dictionary(descr, offsets, plain_f32(&dict), dict.len(), &Segments::from(&indices[..]), copy)
}

/// A dictionary page (`plain`, `entries` values in PLAIN encoding), then data pages of the
/// dictionary indices of `values`, which `pack` bit-packs at a width for a run of values (a
/// whole number of groups of 8, but for a page's last run).
fn encode_dictionary<V: Copy>(
    descr: ColumnDescPtr,
    offsets: &[i32],
    plain: Vec<u8>,
    entries: usize,
    values: &Segments<V>,
    pack: impl Fn(&[V], u8, &mut Vec<u8>),
) -> parquet::errors::Result<ListChunk> {
    let mut chunk = ChunkBuilder::new(descr, Compression::UNCOMPRESSED)?;
    chunk.dictionary_page(plain, entries)?;
    let width = bit_width(entries as u64 - 1);
    let mut stage = Vec::new();
    for (a, b) in page_ranges(offsets) {
        let (va, vb) = (offsets[a] as usize, offsets[b] as usize);
        let mut buf = chunk.levels(&offsets[a..=b]);
        indices_header(vb - va, width, &mut buf);
        values.for_each_run(va, vb, 8, &mut stage, |run| pack(run, width, &mut buf));
        chunk.data_page(buf, Encoding::RLE_DICTIONARY, &offsets[a..=b])?;
    }
    chunk.finish()
}

fn plain_f32(dict: &[f32]) -> Vec<u8> {
    dict.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn encode_byte_stream_split_zstd(descr: ColumnDescPtr, offsets: &[i32], values: &Segments<f32>) -> parquet::errors::Result<ListChunk> {
    let level = ZstdLevel::try_new(1)?;
    let mut chunk = ChunkBuilder::new(descr, Compression::ZSTD(level))?;
    let mut zstd =
        zstd::bulk::Compressor::new(level.compression_level()).map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
    let mut scratch = Vec::new();
    for (a, b) in page_ranges(offsets) {
        let (va, vb) = (offsets[a] as usize, offsets[b] as usize);
        let mut buf = chunk.levels(&offsets[a..=b]);
        let page = values.slice(va, vb, &mut scratch);
        for byte in 0..4 {
            buf.extend(page.iter().map(|v| v.to_le_bytes()[byte]));
        }
        let uncompressed = buf.len();
        let compressed = zstd.compress(&buf).map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))?;
        chunk.data_page_compressed(compressed, uncompressed, Encoding::BYTE_STREAM_SPLIT, &offsets[a..=b])?;
    }
    chunk.finish()
}

/// Distinct values in first-seen order and each value's index, or `None` past the limit.
fn float_dictionary(values: &Segments<f32>) -> Option<(Vec<f32>, Vec<u32>)> {
    // Keyed by bit pattern, so -0.0 and NaN payloads keep their own entries.
    let mut slots: HashMap<u32, u32> = HashMap::new();
    let mut dict = Vec::new();
    let mut indices = Vec::with_capacity(values.len());
    for &v in values.parts().iter().flat_map(|p| p.iter()) {
        let next = dict.len() as u32;
        let slot = *slots.entry(v.to_bits()).or_insert(next);
        if slot == next {
            if dict.len() == MAX_FLOAT_DICTIONARY {
                return None;
            }
            dict.push(v);
        }
        indices.push(slot);
    }
    if dict.is_empty() {
        dict.push(0.0);
    }
    Some((dict, indices))
}

/// Cell ranges `[a, b)` of the pages: each at least one cell, ending at the first cell
/// boundary at or past [`PAGE_VALUES`] values.
fn page_ranges(offsets: &[i32]) -> Vec<(usize, usize)> {
    let cells = offsets.len() - 1;
    let mut out = Vec::new();
    let mut a = 0;
    while a < cells {
        let mut b = a + 1;
        while b < cells && ((offsets[b] - offsets[a]) as usize) < PAGE_VALUES {
            b += 1;
        }
        out.push((a, b));
        a = b;
    }
    if out.is_empty() {
        out.push((0, 0));
    }
    out
}

/// Accumulates the pages of one column chunk in memory and their metadata.
struct ChunkBuilder {
    descr: ColumnDescPtr,
    codec: Compression,
    sink: TrackedWrite<PieceSink>,
    encodings: Vec<Encoding>,
    values: i64,
    uncompressed: i64,
    compressed: i64,
    data_offset: Option<i64>,
    dict_offset: Option<i64>,
    rows: u64,
}

impl ChunkBuilder {
    fn new(descr: ColumnDescPtr, codec: Compression) -> parquet::errors::Result<Self> {
        if descr.max_def_level() != 1 || descr.max_rep_level() != 1 {
            return Err(parquet::errors::ParquetError::General(format!(
                "column {}: expected a required list of required items (levels 1/1), got {}/{}",
                descr.path(),
                descr.max_def_level(),
                descr.max_rep_level()
            )));
        }
        Ok(ChunkBuilder {
            descr,
            codec,
            sink: TrackedWrite::new(PieceSink::default()),
            encodings: vec![Encoding::RLE],
            values: 0,
            uncompressed: 0,
            compressed: 0,
            data_offset: None,
            dict_offset: None,
            rows: 0,
        })
    }

    /// A page buffer holding the repetition then definition levels of cells `offsets`, each
    /// with its 4-byte length, as format v1 lays them out. A cell of n > 0 values is rep
    /// 0,1×(n-1) and def 1×n; an empty cell is one entry with rep 0, def 0.
    fn levels(&self, offsets: &[i32]) -> Vec<u8> {
        let values = (offsets[offsets.len() - 1] - offsets[0]) as usize;
        let mut buf = Vec::with_capacity(values * 2 + 16 * offsets.len() + 64);
        let mut rep = RunWriter::default();
        let mut def = RunWriter::default();
        for c in offsets.windows(2) {
            let n = (c[1] - c[0]) as u64;
            if n == 0 {
                rep.run(0, 1);
                def.run(0, 1);
            } else {
                rep.run(0, 1);
                rep.run(1, n - 1);
                def.run(1, n);
            }
        }
        for levels in [rep.finish(), def.finish()] {
            buf.extend_from_slice(&(levels.len() as u32).to_le_bytes());
            buf.extend_from_slice(&levels);
        }
        buf
    }

    fn level_count(offsets: &[i32]) -> u32 {
        offsets.windows(2).map(|c| (c[1] - c[0]).max(1) as u32).sum()
    }

    fn dictionary_page(&mut self, plain: Vec<u8>, entries: usize) -> parquet::errors::Result<()> {
        let len = plain.len();
        let page =
            Page::DictionaryPage { buf: Bytes::from(plain), num_values: entries as u32, encoding: Encoding::PLAIN, is_sorted: false };
        self.encodings.push(Encoding::PLAIN);
        let spec = self.write(CompressedPage::new(page, len))?;
        self.dict_offset = Some(spec.offset as i64);
        Ok(())
    }

    fn data_page(&mut self, buf: Vec<u8>, encoding: Encoding, offsets: &[i32]) -> parquet::errors::Result<()> {
        let len = buf.len();
        self.data_page_compressed(buf, len, encoding, offsets)
    }

    fn data_page_compressed(
        &mut self,
        buf: Vec<u8>,
        uncompressed: usize,
        encoding: Encoding,
        offsets: &[i32],
    ) -> parquet::errors::Result<()> {
        let num_values = Self::level_count(offsets);
        let page = Page::DataPage {
            buf: Bytes::from(buf),
            num_values,
            encoding,
            def_level_encoding: Encoding::RLE,
            rep_level_encoding: Encoding::RLE,
            statistics: None,
        };
        if !self.encodings.contains(&encoding) {
            self.encodings.push(encoding);
        }
        let spec = self.write(CompressedPage::new(page, uncompressed))?;
        self.data_offset.get_or_insert(spec.offset as i64);
        self.values += num_values as i64;
        self.rows += (offsets.len() - 1) as u64;
        Ok(())
    }

    fn write(&mut self, page: CompressedPage) -> parquet::errors::Result<PageWriteSpec> {
        self.sink.inner_mut().expect(page.compressed_page().buffer().clone());
        let spec = SerializedPageWriter::new(&mut self.sink).write_page(page)?;
        self.uncompressed += spec.uncompressed_size as i64;
        self.compressed += spec.compressed_size as i64;
        Ok(spec)
    }

    fn finish(self) -> parquet::errors::Result<ListChunk> {
        let metadata = ColumnChunkMetaData::builder(self.descr.clone())
            .set_compression(self.codec)
            .set_encodings_mask(EncodingMask::new_from_encodings(self.encodings.iter()))
            .set_total_compressed_size(self.compressed)
            .set_total_uncompressed_size(self.uncompressed)
            .set_num_values(self.values)
            .set_data_page_offset(self.data_offset.unwrap_or(0))
            .set_dictionary_page_offset(self.dict_offset)
            .build()?;
        let bytes = self.sink.into_inner()?.finish();
        let close = ColumnCloseResult {
            bytes_written: bytes.len(),
            rows_written: self.rows,
            metadata,
            bloom_filter: None,
            column_index: None,
            offset_index: None,
        };
        Ok(ListChunk { bytes, close })
    }
}

/// The RLE half of Parquet's RLE/bit-packed hybrid at bit width 1: merged runs of equal levels.
#[derive(Default)]
struct RunWriter {
    out: Vec<u8>,
    value: u8,
    count: u64,
}

impl RunWriter {
    fn run(&mut self, value: u8, count: u64) {
        if count == 0 {
            return;
        }
        if self.count > 0 && value != self.value {
            self.flush();
        }
        self.value = value;
        self.count += count;
    }
    fn flush(&mut self) {
        // Run lengths are stored as `len << 1` in 32 bits by common readers: split long runs.
        while self.count > 0 {
            let n = self.count.min(u32::MAX as u64 >> 1);
            uleb128(n << 1, &mut self.out);
            self.out.push(self.value);
            self.count -= n;
        }
    }
    fn finish(mut self) -> Vec<u8> {
        self.flush();
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_read_as_one_sequence() {
        let parts: [&[u32]; 5] = [&[0, 1, 2], &[], &[3], &[4, 5, 6, 7], &[]];
        let seg = Segments::new(parts);
        assert_eq!((seg.len(), seg.parts().len()), (8, 3));
        let mut scratch = vec![99];
        for a in 0..=8 {
            for b in a..=8 {
                assert_eq!(seg.slice(a, b, &mut scratch), (a as u32..b as u32).collect::<Vec<_>>(), "{a}..{b}");
            }
        }
        // Inside one part nothing is copied.
        scratch.clear();
        assert_eq!(seg.slice(4, 7, &mut scratch).as_ptr(), parts[3][0..].as_ptr());
        assert!(scratch.is_empty());
        // Runs: the same sequence, in whole units but for the last run.
        let (sizes, total) = ([5usize, 0, 1, 17, 3, 8, 30, 2], 66);
        let mut next = 0u32;
        let owned: Vec<Vec<u32>> = sizes
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| {
                        next += 1;
                        next - 1
                    })
                    .collect()
            })
            .collect();
        let seg = Segments::new(owned.iter().map(|p| &p[..]));
        for unit in [1usize, 3, 8] {
            for a in 0..=total {
                for b in a..=total {
                    let mut runs = Vec::new();
                    seg.for_each_run(a, b, unit, &mut scratch, |r| runs.push(r.to_vec()));
                    assert_eq!(runs.concat(), (a as u32..b as u32).collect::<Vec<_>>(), "unit {unit}, {a}..{b}");
                    assert!(runs.iter().rev().skip(1).all(|r| r.len() % unit == 0 && !r.is_empty()), "unit {unit}, {a}..{b}: {runs:?}");
                }
            }
        }
    }

    #[test]
    fn chunk_pieces_read_as_one_buffer_and_keep_announced_bodies() {
        use parquet::file::reader::ChunkReader;
        use std::io::{Read, Write};
        let body = Bytes::from((0..20_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let mut sink = PieceSink::default();
        sink.write_all(b"head").unwrap();
        sink.write_all(&body[..10]).unwrap(); // not the announced body: copied
        sink.expect(body.clone());
        sink.write_all(b"er").unwrap();
        sink.write_all(&body).unwrap();
        sink.write_all(b"tail").unwrap();
        let chunk = sink.finish();
        let want: Vec<u8> = [&b"head"[..], &body[..10], b"er", &body[..], b"tail"].concat();
        assert_eq!(chunk.to_vec(), want);
        assert!(chunk.pieces.iter().any(|p| p.as_ptr() == body.as_ptr()), "the body is kept, not copied");
        assert_eq!(chunk.len(), want.len() as u64);
        for start in [0usize, 3, 4, 14, 16, 17, 20_015, 20_016, want.len()] {
            let mut rest = Vec::new();
            chunk.get_read(start as u64).unwrap().read_to_end(&mut rest).unwrap();
            assert_eq!(rest, want[start..], "from {start}");
            let n = (want.len() - start).min(5000);
            assert_eq!(chunk.get_bytes(start as u64, n).unwrap(), want[start..start + n], "{n} at {start}");
        }
        assert!(chunk.get_read(want.len() as u64 + 1).is_err());
        assert!(chunk.get_bytes(10, want.len()).is_err());
    }

    #[test]
    fn encoders_read_parts_as_one_slice() {
        // Pages (three: over PAGE_VALUES) of values split among parts at every kind of place
        // give the bytes of one slice.
        let values: Vec<i32> = (0..600_000i64).map(|i| ((i * 7919) % 60_000 - (i % 13) * 1000) as i32).collect();
        let offsets: Vec<i32> = (0..=600).map(|c| c * 1000).collect();
        assert!(page_ranges(&offsets).len() >= 3);
        let mut cut = 1usize;
        let mut parts = Vec::new();
        let mut at = 0;
        while at < values.len() {
            let n = cut.min(values.len() - at);
            parts.push(&values[at..at + n]);
            at += n;
            cut = cut * 5 % 3331 + 1;
        }
        let split = Segments::new(parts.iter().copied());
        let whole = Segments::from(&values[..]);
        let descr = || {
            parquet::arrow::ArrowSchemaConverter::new()
                .convert(&arrow_schema::Schema::new(vec![arrow_schema::Field::new(
                    "g",
                    arrow_schema::DataType::List(std::sync::Arc::new(arrow_schema::Field::new(
                        "item",
                        arrow_schema::DataType::Int32,
                        false,
                    ))),
                    false,
                )]))
                .unwrap()
                .column(0)
        };
        let bytes = |s: &Segments<i32>| encode_delta_i32(descr(), &offsets, s).unwrap().bytes.to_vec();
        assert_eq!(bytes(&split), bytes(&whole));
        let small: Vec<u8> = values.iter().map(|&v| (v.unsigned_abs() % 51) as u8).collect();
        let small_parts: Vec<&[u8]> = parts
            .iter()
            .scan(0, |at, p| {
                let r = &small[*at..*at + p.len()];
                *at += p.len();
                Some(r)
            })
            .collect();
        let bins = |s: &Segments<u8>| encode_identity_dictionary_u8(descr(), &offsets, s).unwrap().bytes.to_vec();
        assert_eq!(bins(&Segments::new(small_parts.iter().copied())), bins(&Segments::from(&small[..])));
    }

    #[test]
    fn pages_end_at_cell_boundaries_and_cover_every_cell() {
        let offsets: Vec<i32> = (0..=10).map(|i| i * (PAGE_VALUES as i32 / 3)).collect();
        let pages = page_ranges(&offsets);
        assert_eq!(pages.first().unwrap().0, 0);
        assert_eq!(pages.last().unwrap().1, 10);
        assert!(pages.windows(2).all(|w| w[0].1 == w[1].0));
        assert!(pages.iter().all(|&(a, b)| b > a && (offsets[b - 1] - offsets[a]) < PAGE_VALUES as i32));
    }
}
