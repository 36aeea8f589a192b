//! Plain `pread`s of 1-D HDF5 datasets stored without filters.
//!
//! For a contiguous or chunked dataset with no compression or other filter and a little-endian
//! 4-byte element, element `i` sits at a known file offset, so a range of it can be read
//! straight into the caller's buffer: no HDF5 call (HDF5 serialises every read behind one
//! lock and copies through its own buffers, ~5% of data-prep's CPU), and reads of several
//! datasets or ranges can run at once. Anything else (gzip, LZF, shuffle, big-endian, other
//! widths, unallocated chunks) returns `None` at open and is read through HDF5 as before.
//!
//! With [`DirectDataset::use_direct_io`], reads use `O_DIRECT`: the disk DMAs into our buffer,
//! past the page cache. Data-prep reads each file twice (gene filter, then binning) and a
//! corpus file is rarely still cached by its second pass; through the cache, a cold 1M-cell
//! file (16.6 GB) cost 73 s of kernel time on the benchmark VM, directly 3 s
//! (docs/benchmarks.md). Stretches the page cache does hold are copied from it, not reread
//! from the disk ([`super::direct_io::PageCacheMap`]).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use hdf5::types::{FloatSize, IntSize, TypeDescriptor};
use hdf5::Dataset;

use scgpt_data::words::take_buffer;
pub use scgpt_data::words::OffsetVec;

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
    /// The same file opened with `O_DIRECT`, when asked for.
    unbuffered: Option<File>,
    /// Which of the file's pages the page cache holds: those are read from it instead.
    cache: Option<super::direct_io::PageCacheMap>,
    /// Cleared when the file system refuses an `O_DIRECT` read (alignment it does not accept).
    unbuffered_ok: AtomicBool,
    pub elem: Elem,
    len: usize,
    /// File offset of each chunk in logical order (one entry for contiguous storage).
    chunk_offsets: Vec<u64>,
    /// Elements per chunk (`len` for contiguous storage).
    chunk_elems: usize,
}

const ELEM_BYTES: usize = 4;

/// `O_DIRECT` reads at least this long are issued as two concurrent requests.
const SPLIT_BYTES: usize = 4 << 20;

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
            let offsets = match walked_chunk_offsets(&file, ds, n, chunk) {
                Some(offsets) => offsets,
                // Another chunk index: one HDF5 lookup per chunk (quadratic in HDF5 1.10).
                None => (0..n).map(|k| chunk_address(ds, (k * chunk) as u64, chunk)).collect::<Option<Vec<u64>>>()?,
            };
            (chunk, offsets)
        };
        // Every byte must be inside the file (a truncated file falls back to HDF5's errors).
        let file_len = file.metadata().ok()?.len();
        let end = chunk_offsets.iter().map(|&o| o + (chunk_elems * ELEM_BYTES) as u64).max().unwrap_or(0);
        if end > file_len {
            return None;
        }
        Some(DirectDataset {
            file,
            unbuffered: None,
            cache: None,
            unbuffered_ok: AtomicBool::new(true),
            elem,
            len,
            chunk_offsets,
            chunk_elems,
        })
    }

    /// Reads this dataset with `O_DIRECT` from now on, if the file system allows it (tmpfs may
    /// not) and its storage starts on 4-byte boundaries. Returns whether it will.
    pub fn use_direct_io(&mut self, path: &Path) -> bool {
        if self.chunk_offsets.iter().any(|o| o % ELEM_BYTES as u64 != 0) {
            return false;
        }
        self.unbuffered = super::direct_io::open_read(path);
        self.cache = self.unbuffered.as_ref().and_then(|_| super::direct_io::PageCacheMap::new(&self.file));
        self.unbuffered.is_some()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `a..b` as raw 4-byte words.
    pub fn read_words(&self, a: usize, b: usize) -> std::io::Result<OffsetVec<u32>> {
        if b <= a {
            return Ok(OffsetVec::default());
        }
        if b > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("range {a}..{b} past the dataset's {} elements", self.len),
            ));
        }
        let runs = self.file_runs(a, b);
        if let Some(f) = self.unbuffered.as_ref().filter(|_| self.unbuffered_ok.load(Ordering::Relaxed)) {
            let how = Unbuffered { direct: f, buffered: &self.file, cache: self.cache.as_ref() };
            match read_runs_unbuffered(&how, &runs) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.unbuffered_ok.store(false, Ordering::Relaxed),
                r => return r.map(from_le),
            }
        }
        let mut out = take_buffer(b - a);
        for (at, n) in runs {
            // SAFETY: `pread_into` writes exactly `n` words into the spare capacity or fails.
            unsafe {
                pread_into(self.file.as_raw_fd(), out.as_mut_ptr().add(out.len()).cast(), n * ELEM_BYTES, at, 1)?;
                out.set_len(out.len() + n);
            }
        }
        Ok(from_le(OffsetVec::from(out)))
    }

    /// Where elements `a..b` lie: (file offset, elements) per run of chunks stored back to
    /// back (a writer appending many chunks at once lays them out so).
    fn file_runs(&self, a: usize, b: usize) -> Vec<(u64, usize)> {
        let mut runs: Vec<(u64, usize)> = Vec::new();
        let mut i = a;
        while i < b {
            let k = i / self.chunk_elems;
            let end = ((k + 1) * self.chunk_elems).min(b);
            let at = self.chunk_offsets[k] + ((i - k * self.chunk_elems) * ELEM_BYTES) as u64;
            match runs.last_mut() {
                Some((start, n)) if *start + (*n * ELEM_BYTES) as u64 == at => *n += end - i,
                _ => runs.push((at, end - i)),
            }
            i = end;
        }
        runs
    }
}

/// The handles of an unbuffered read: `O_DIRECT`, ordinary (for pages already cached), and
/// the residency map that picks between them.
struct Unbuffered<'a> {
    direct: &'a File,
    buffered: &'a File,
    cache: Option<&'a super::direct_io::PageCacheMap>,
}

/// The runs read with `O_DIRECT`; the first lands in place, any later one is copied after it.
fn read_runs_unbuffered(how: &Unbuffered, runs: &[(u64, usize)]) -> std::io::Result<OffsetVec<u32>> {
    let later: usize = runs[1..].iter().map(|r| r.1).sum();
    let mut out = read_unbuffered(how, runs[0].0, runs[0].1, later)?;
    for &(at, n) in &runs[1..] {
        let more = read_unbuffered(how, at, n, 0)?;
        out.extend_from_slice(&more);
    }
    Ok(out)
}

/// Above this many stretches of cached and uncached pages in one read, it all goes past the
/// cache: a scattered cache would cost a system call per stretch.
const MAX_CACHE_STRETCHES: usize = 32;

/// `n` words at file offset `at` (a multiple of 4) through an `O_DIRECT` handle: the file range
/// is widened to 4 KiB boundaries and read into a 4 KiB-aligned spot of one allocation, and
/// the words asked for start `head` elements in, so nothing is copied after the read. `extra`
/// words of room are left after them. Stretches of pages the page cache holds are copied from
/// it with ordinary reads instead.
fn read_unbuffered(how: &Unbuffered, at: u64, n: usize, extra: usize) -> std::io::Result<OffsetVec<u32>> {
    use super::direct_io::ALIGN;
    let file_start = at & !(ALIGN as u64 - 1);
    let lead = (at - file_start) as usize; // bytes before the first word, a multiple of 4
    let bytes = (lead + n * ELEM_BYTES).div_ceil(ALIGN) * ALIGN;
    let mut vec = take_buffer(bytes / ELEM_BYTES + ALIGN / ELEM_BYTES + extra);
    let pad = vec.as_ptr().cast::<u8>().align_offset(ALIGN) / ELEM_BYTES;
    let head = pad + lead / ELEM_BYTES;
    let len = lead + n * ELEM_BYTES;
    let stretches = how.cache.map(|c| page_stretches(&c.resident(file_start, bytes))).filter(|s| s.len() <= MAX_CACHE_STRETCHES);
    let stretches = stretches.unwrap_or_else(|| vec![(false, 0, bytes / ALIGN)]);
    // SAFETY: every read stays inside the capacity (pad + bytes/4 words), the padding in front
    // is zeroed, and `len` covers only words written by the reads (the stretches cover all
    // pages) or the zeroing.
    unsafe {
        let base = vec.as_mut_ptr();
        std::ptr::write_bytes(base, 0, pad);
        let dst = base.add(pad).cast::<u8>();
        for (cached, first, pages) in stretches {
            let (from, to) = (first * ALIGN, ((first + pages) * ALIGN).min(len));
            if cached {
                pread_into(how.buffered.as_raw_fd(), dst.add(from), to - from, file_start + from as u64, 1)?;
            } else {
                read_direct(how.direct.as_raw_fd(), dst.add(from), to - from, file_start + from as u64)?;
            }
        }
        vec.set_len(head + n);
    }
    Ok(OffsetVec::new(vec, head))
}

/// (cached, first page, pages) for each stretch of pages alike in `resident`.
fn page_stretches(resident: &[bool]) -> Vec<(bool, usize, usize)> {
    let mut out: Vec<(bool, usize, usize)> = Vec::new();
    for (page, &r) in resident.iter().enumerate() {
        match out.last_mut() {
            Some((c, _, pages)) if *c == r => *pages += 1,
            _ => out.push((r, page, 1)),
        }
    }
    out
}

/// `len` bytes at `offset` (a multiple of [`super::direct_io::ALIGN`]) through an `O_DIRECT`
/// descriptor into aligned `dst`.
///
/// # Safety
/// `dst` must be aligned and valid for writes of `len` rounded up to the alignment.
unsafe fn read_direct(fd: i32, dst: *mut u8, len: usize, offset: u64) -> std::io::Result<()> {
    use super::direct_io::ALIGN;
    // A large read goes as two requests at once: the disk serves two in flight faster
    // than one (3.3 GB in 3.3 s with four 8 MB streams, 3.9 s with one or two).
    let split = if len >= SPLIT_BYTES { len / 2 / ALIGN * ALIGN } else { len };
    let (dst_addr, rest) = (dst as usize, len - split);
    std::thread::scope(|s| -> std::io::Result<()> {
        let second = (rest > 0).then(|| s.spawn(move || pread_into(fd, (dst_addr + split) as *mut u8, rest, offset + split as u64, ALIGN)));
        pread_into(fd, dst, split, offset, ALIGN)?;
        second.map_or(Ok(()), |h| h.join().expect("read thread panicked"))
    })
}

/// Reads `len` bytes at `offset` into `dst`, asking for whole multiples of `block` bytes
/// (`O_DIRECT` needs them; 1 for a buffered file) and retrying short reads; end of file before
/// `len` bytes is an error.
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes rounded up to a multiple of `block`.
unsafe fn pread_into(fd: i32, dst: *mut u8, len: usize, offset: u64, block: usize) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let want = (len - done).div_ceil(block) * block;
        let r = libc::pread(fd, dst.add(done).cast(), want, (offset + done as u64) as libc::off_t);
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("file ends {} bytes short of the dataset", len - done),
            ));
        }
        done += r as usize;
    }
    Ok(())
}

fn from_le(mut w: OffsetVec<u32>) -> OffsetVec<u32> {
    if cfg!(target_endian = "big") {
        w.iter_mut().for_each(|w| *w = u32::from_le(*w));
    }
    w
}

/// The file address of the chunk starting at element `start`, if it is allocated and whole.
/// The offsets of the `n` chunks of `chunk` elements, from one walk of the chunk index
/// ([`super::h5_chunks`]), if it is one the walker reads and every chunk is stored whole and
/// unfiltered. The first and last are checked against HDF5's own lookup.
fn walked_chunk_offsets(file: &File, ds: &Dataset, n: usize, chunk: usize) -> Option<Vec<u64>> {
    let mut info = hdf5_sys::h5o::H5O_info1_t::default();
    #[allow(deprecated)] // H5Oget_info1 is the call every supported HDF5 version has
    // SAFETY: a valid dataset id and a pointer to a live info struct, under HDF5's lock.
    let status = hdf5::sync::sync(|| unsafe { hdf5_sys::h5o::H5Oget_info1(ds.id(), &mut info) });
    if status < 0 {
        return None;
    }
    let entries = super::h5_chunks::chunk_entries(file, info.addr)?;
    let whole = entries.len() == n
        && entries
            .iter()
            .enumerate()
            .all(|(k, e)| e.start == (k * chunk) as u64 && e.size as usize == chunk * ELEM_BYTES && e.filter_mask == 0);
    if !whole || n == 0 {
        return None;
    }
    let offsets: Vec<u64> = entries.iter().map(|e| e.addr).collect();
    let agrees = |k: usize| chunk_address(ds, (k * chunk) as u64, chunk) == Some(offsets[k]);
    (agrees(0) && agrees(n - 1)).then_some(offsets)
}

fn chunk_address(ds: &Dataset, start: u64, chunk: usize) -> Option<u64> {
    use hdf5_sys::h5d::H5Dget_chunk_info_by_coord;
    let coord = [start];
    let (mut mask, mut addr, mut size) = (0u32, 0u64, 0u64);
    // By coordinate: a B-tree lookup (H5Dget_chunk_info by index walks every chunk before it).
    // SAFETY: a valid dataset id, a coordinate array of the dataset's rank (1) and pointers to
    // live locals, under HDF5's lock.
    let status = hdf5::sync::sync(|| unsafe { H5Dget_chunk_info_by_coord(ds.id(), coord.as_ptr(), &mut mask, &mut addr, &mut size) });
    let undefined = addr == u64::MAX;
    (status >= 0 && !undefined && mask == 0 && size as usize == chunk * ELEM_BYTES).then_some(addr)
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

    #[test]
    fn the_chunk_index_walk_finds_what_hdf5_finds_in_every_file_format() {
        use hdf5::file::LibraryVersion;
        let dir = tempfile::tempdir().unwrap();
        // 700 chunks: a B-tree of several levels (64 entries per node by default).
        let (n, chunk) = (700 * 64 + 5, 64usize);
        let ints: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        let formats =
            [("earliest", LibraryVersion::Earliest, true), ("v18", LibraryVersion::V18, true), ("latest", LibraryVersion::latest(), false)];
        for (name, low, walkable) in formats {
            let path = dir.path().join(format!("{name}.h5"));
            {
                let f = hdf5::File::with_options().with_fapl(|p| p.libver_bounds(low, LibraryVersion::latest())).create(&path).unwrap();
                // Attributes and a second dataset first, so the header holds more than the layout.
                f.new_attr::<i32>().create("note").unwrap().write_scalar(&7).unwrap();
                f.new_dataset::<u32>().chunk(chunk).shape(n).create("other").unwrap().write(&ints).unwrap();
                let ds = f.new_dataset::<u32>().chunk(chunk).shape(0..).create("x").unwrap();
                ds.resize(n).unwrap();
                ds.write(&ints).unwrap();
                ds.new_attr::<u64>().create("shape").unwrap().write_scalar(&(n as u64)).unwrap();
            }
            let f = hdf5::File::open(&path).unwrap();
            let ds = f.dataset("x").unwrap();
            let file = File::open(&path).unwrap();
            let n_chunks = n.div_ceil(chunk);
            let walked = walked_chunk_offsets(&file, &ds, n_chunks, chunk);
            assert_eq!(walked.is_some(), walkable, "{name}");
            if let Some(offsets) = walked {
                let looked_up: Vec<u64> = (0..n_chunks).map(|k| chunk_address(&ds, (k * chunk) as u64, chunk).unwrap()).collect();
                assert_eq!(offsets, looked_up, "{name}");
            }
            let direct = DirectDataset::open(&path, &ds).expect("unfiltered chunks are direct");
            assert_eq!(&direct.read_words(0, n).unwrap()[..], &ints[..], "{name}");
        }
    }

    #[test]
    fn unbuffered_reads_equal_buffered_ones_at_every_alignment() {
        // The dataset is the last thing in the file, so the widened reads run past its end.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap(); // a disk, not tmpfs
        let path = dir.path().join("d.h5");
        let n = 300_001usize;
        let ints: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761)).collect();
        hdf5::File::create(&path).unwrap().new_dataset_builder().with_data(&ints).create("x").unwrap();
        let f = hdf5::File::open(&path).unwrap();
        let mut ds = DirectDataset::open(&path, &f.dataset("x").unwrap()).unwrap();
        let file_len = std::fs::metadata(&path).unwrap().len();
        // ext4 and xfs take O_DIRECT; where the file system does not, the buffered path is checked.
        let direct = ds.use_direct_io(&path);
        if !direct {
            eprintln!("O_DIRECT not available under {}: buffered reads checked only", dir.path().display());
        }
        let ranges = [(0, n), (0, 1), (1, 1025), (1023, 1025), (4095, 8193), (n - 1, n), (n - 1500, n), (12_345, 250_000)];
        for (a, b) in ranges {
            let w = ds.read_words(a, b).unwrap();
            assert_eq!(&w[..], &ints[a..b], "range {a}..{b}");
        }
        assert!(!direct || ds.unbuffered_ok.load(Ordering::Relaxed), "no read fell back to the page cache");
        assert!(!file_len.is_multiple_of(4096) || !ds.chunk_offsets[0].is_multiple_of(4096), "the test needs an unaligned layout");
    }

    #[test]
    fn reads_take_cached_pages_from_the_cache_and_the_rest_past_it() {
        use crate::io::direct_io::{PageCacheMap, ALIGN};
        assert_eq!(page_stretches(&[true, true, false, true]), vec![(true, 0, 2), (false, 2, 1), (true, 3, 1)]);
        assert_eq!(page_stretches(&[]), vec![]);
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap(); // a disk, not tmpfs
        let path = dir.path().join("d.h5");
        let n = 1_000_003usize;
        let ints: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761) ^ 0xa5a5).collect();
        hdf5::File::create(&path).unwrap().new_dataset_builder().with_data(&ints).create("x").unwrap();
        let f = hdf5::File::open(&path).unwrap();
        let mut ds = DirectDataset::open(&path, &f.dataset("x").unwrap()).unwrap();
        if !ds.use_direct_io(&path) {
            eprintln!("O_DIRECT not available under {}: nothing to split", dir.path().display());
            return;
        }
        // Evict the file, then cache alternate 64-page stretches of it with ordinary reads.
        let file = File::open(&path).unwrap();
        file.sync_all().unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: plain fadvise and pread calls on a descriptor we own, into a buffer we own.
        // (No readahead, or the reads below would cache the stretches between them too.)
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
        }
        let map = PageCacheMap::new(&file).unwrap();
        let stretch = 64 * ALIGN;
        let mut page = vec![0u8; stretch];
        for at in (0..len).step_by(2 * stretch) {
            // SAFETY: pread into `page`, which has room for `stretch` bytes, on our own descriptor.
            unsafe { libc::pread(file.as_raw_fd(), page.as_mut_ptr().cast(), stretch, at as libc::off_t) };
        }
        let resident = map.resident(0, len);
        let cached = resident.iter().filter(|r| **r).count();
        if cached == 0 {
            eprintln!("the kernel reports no page cache residency here: every read went past the cache");
        } else {
            let wanted: Vec<bool> = (0..resident.len()).map(|p| p / 64 % 2 == 0).collect();
            assert_eq!(resident, wanted, "the stretches read are cached, the others not");
        }
        for (a, b) in [(0, n), (1, 70_000), (16_383, 16_385), (65_530, 200_000), (n - 33_000, n), (123_457, 987_653)] {
            assert_eq!(&ds.read_words(a, b).unwrap()[..], &ints[a..b], "range {a}..{b} ({cached} pages cached)");
        }
        assert!(ds.unbuffered_ok.load(Ordering::Relaxed), "no read fell back to the page cache");
        if cached > 0 {
            assert_eq!(map.resident(0, len), resident, "the uncached stretches were read past the cache, not into it");
        }
        // Past the end of the file, pages are absent rather than an error.
        assert!(map.resident(((len / ALIGN + 1) * ALIGN) as u64, 3 * ALIGN).iter().all(|r| !r));
    }

    #[test]
    fn unbuffered_reads_join_chunks_stored_apart() {
        // Two chunked datasets appended in turn, as a streaming writer does: runs of adjacent
        // chunks alternate between them, so a range spans several file runs.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("c.h5");
        // Chunks above the 1 MiB chunk cache are written (and placed) as they fill.
        let (chunk, appends, per_append) = (300_000usize, 4usize, 350_000usize);
        let n = appends * per_append;
        let ints: Vec<u32> = (0..n as u32).map(|i| i ^ 0x5555).collect();
        {
            let f = hdf5::File::create(&path).unwrap();
            let a = f.new_dataset::<u32>().chunk(chunk).shape(0..).create("a").unwrap();
            let b = f.new_dataset::<u32>().chunk(chunk).shape(0..).create("b").unwrap();
            for k in 0..appends {
                let r = k * per_append..(k + 1) * per_append;
                for ds in [&a, &b] {
                    ds.resize(r.end).unwrap();
                    ds.write_slice(&ints[r.clone()], r.clone()).unwrap();
                }
            }
        }
        let f = hdf5::File::open(&path).unwrap();
        let mut ds = DirectDataset::open(&path, &f.dataset("a").unwrap()).expect("unfiltered chunks are direct");
        let runs = ds.file_runs(0, n).len();
        assert!(runs > 1 && runs < n.div_ceil(chunk), "adjacent chunks merge into runs, apart ones do not ({runs} runs)");
        let direct = ds.use_direct_io(&path);
        for (a, b) in [(0, n), (299_999, 300_001), (340_000, 710_000), (n - 1, n), (17, n - 17)] {
            assert_eq!(&ds.read_words(a, b).unwrap()[..], &ints[a..b], "range {a}..{b}, O_DIRECT {direct}");
        }
    }
}
