//! Plain `pread`s of 1-D HDF5 datasets stored without filters.
//!
//! For a contiguous or chunked dataset with no compression or other filter and a little-endian
//! 4-byte element, element `i` sits at a known file offset, so a range of it can be read
//! straight into the caller's buffer: no HDF5 call (HDF5 serialises every read behind one
//! lock and copies through its own buffers, ~5% of data-prep's CPU), and reads of several
//! datasets or ranges can run at once. Anything else (gzip, LZF, shuffle, big-endian, other
//! widths, unallocated chunks) returns `None` at open and is read through HDF5 as before.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use hdf5::types::{FloatSize, IntSize, TypeDescriptor};
use hdf5::Dataset;

/// The element types read directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    I32,
    U32,
}

/// Where each element of a dataset lies in its file.
#[derive(Debug)]
pub struct DirectDataset {
    file: File,
    pub elem: Elem,
    len: usize,
    /// File offset of each chunk in logical order (one entry for contiguous storage).
    chunk_offsets: Vec<u64>,
    /// Elements per chunk (`len` for contiguous storage).
    chunk_elems: usize,
}

const ELEM_BYTES: usize = 4;

impl DirectDataset {
    /// The layout of `ds` if it can be read directly, else `None`.
    pub fn open(path: &Path, ds: &Dataset) -> Option<Self> {
        let dtype = ds.dtype().ok()?;
        if dtype.byte_order() != hdf5::datatype::ByteOrder::LittleEndian {
            return None;
        }
        let elem = match dtype.to_descriptor().ok()? {
            TypeDescriptor::Float(FloatSize::U4) => Elem::F32,
            TypeDescriptor::Integer(IntSize::U4) => Elem::I32,
            TypeDescriptor::Unsigned(IntSize::U4) => Elem::U32,
            _ => return None,
        };
        if ds.ndim() != 1 || !ds.filters().is_empty() {
            return None;
        }
        let len = ds.shape()[0];
        let file = File::open(path).ok()?;
        let (chunk_elems, chunk_offsets) = if let Some(offset) = ds.offset() {
            (len.max(1), vec![offset])
        } else {
            let chunk = *ds.chunk()?.first()?;
            if chunk == 0 {
                return None;
            }
            let n = len.div_ceil(chunk);
            let mut offsets = Vec::with_capacity(n);
            for k in 0..n {
                offsets.push(chunk_address(ds, (k * chunk) as u64, chunk)?);
            }
            (chunk, offsets)
        };
        // Every byte must be inside the file (a truncated file falls back to HDF5's errors).
        let file_len = file.metadata().ok()?.len();
        let end = chunk_offsets.iter().map(|&o| o + (chunk_elems * ELEM_BYTES) as u64).max().unwrap_or(0);
        if end > file_len {
            return None;
        }
        Some(DirectDataset { file, elem, len, chunk_offsets, chunk_elems })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `a..b` as raw 4-byte words.
    pub fn read_words(&self, a: usize, b: usize) -> std::io::Result<Vec<u32>> {
        if b <= a {
            return Ok(Vec::new());
        }
        if b > self.len {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("range {a}..{b} past the dataset's {} elements", self.len)));
        }
        let mut out = vec![0u32; b - a];
        let mut i = a;
        while i < b {
            let k = i / self.chunk_elems;
            let end = ((k + 1) * self.chunk_elems).min(b);
            let at = self.chunk_offsets[k] + ((i - k * self.chunk_elems) * ELEM_BYTES) as u64;
            self.file.read_exact_at(as_bytes_mut(&mut out[i - a..end - a]), at)?;
            i = end;
        }
        if cfg!(target_endian = "big") {
            out.iter_mut().for_each(|w| *w = u32::from_le(*w));
        }
        Ok(out)
    }
}

/// The file address of the chunk starting at element `start`, if it is allocated and whole.
fn chunk_address(ds: &Dataset, start: u64, chunk: usize) -> Option<u64> {
    use hdf5_sys::h5d::H5Dget_chunk_info_by_coord;
    let coord = [start];
    let (mut mask, mut addr, mut size) = (0u32, 0u64, 0u64);
    // By coordinate: a B-tree lookup (H5Dget_chunk_info by index walks every chunk before it).
    let status = hdf5::sync::sync(|| unsafe { H5Dget_chunk_info_by_coord(ds.id(), coord.as_ptr(), &mut mask, &mut addr, &mut size) });
    let undefined = addr == u64::MAX;
    (status >= 0 && !undefined && mask == 0 && size as usize == chunk * ELEM_BYTES).then_some(addr)
}

fn as_bytes_mut(words: &mut [u32]) -> &mut [u8] {
    // SAFETY: u32 has no padding and any byte pattern is a valid u32; the length is scaled by
    // the element size and the alignment of u8 is 1.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_reads_equal_hdf5_reads_and_filtered_data_is_left_to_hdf5() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.h5");
        let n = 10_007usize; // not a multiple of the chunk: a partial last chunk
        let floats: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
        let ints: Vec<i32> = (0..n as i32).map(|i| i * 3 - 100).collect();
        {
            let f = hdf5::File::create(&path).unwrap();
            f.new_dataset_builder().with_data(&floats).create("contiguous").unwrap();
            f.new_dataset::<i32>().chunk(1000).shape(n).create("chunked").unwrap().write(&ints).unwrap();
            f.new_dataset::<f32>().chunk(1000).lzf().shape(n).create("lzf").unwrap().write(&floats).unwrap();
            f.new_dataset::<f64>().shape(n).create("wide").unwrap();
        }
        let f = hdf5::File::open(&path).unwrap();
        let contiguous = DirectDataset::open(&path, &f.dataset("contiguous").unwrap()).expect("contiguous f32 is direct");
        let chunked = DirectDataset::open(&path, &f.dataset("chunked").unwrap()).expect("unfiltered chunks are direct");
        assert_eq!((contiguous.elem, chunked.elem), (Elem::F32, Elem::I32));
        assert!(DirectDataset::open(&path, &f.dataset("lzf").unwrap()).is_none(), "filtered data goes through HDF5");
        assert!(DirectDataset::open(&path, &f.dataset("wide").unwrap()).is_none(), "8-byte elements go through HDF5");
        for (a, b) in [(0, n), (999, 1001), (1000, 2000), (5, 6), (9_990, n), (3, 3)] {
            let w = contiguous.read_words(a, b).unwrap();
            assert_eq!(w.iter().map(|&x| f32::from_bits(x)).collect::<Vec<_>>(), floats[a..b]);
            let w = chunked.read_words(a, b).unwrap();
            assert_eq!(w.iter().map(|&x| x as i32).collect::<Vec<_>>(), ints[a..b]);
        }
        assert!(chunked.read_words(0, n + 1).is_err(), "a range past the end is an error");
    }
}
