//! Files read and written past the page cache (`O_DIRECT`), where the file system allows it.
//!
//! Data-prep streams every byte once: a shard is written and not read again by this process,
//! so a buffered write only pays for a copy into the cache and the kernel's writeback later.
//! That copy was the largest single cost of a prep run (12-16% of its CPU, perf on 200k cells,
//! docs/benchmarks.md). Here the disk DMAs straight from an aligned user buffer.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// `O_DIRECT` needs buffer addresses, file offsets and lengths in multiples of the device's
/// logical block; 4 KiB covers every common disk.
pub const ALIGN: usize = 4096;

/// Bytes buffered between writes: large enough that each write is one efficient disk request.
const BLOCK: usize = 4 << 20;

/// `path` opened for reading with `O_DIRECT`, or `None` where the file system refuses it (tmpfs).
pub fn open_read(path: &Path) -> Option<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok()
}

/// Which pages of a file are in the page cache, from `mincore` over a read-only mapping that is
/// never touched (so asking faults nothing in).
///
/// An `O_DIRECT` read goes to the disk even for bytes the cache already holds: a file just
/// downloaded or written (the 1M-cell benchmark file right after `simulate`) was read from the
/// disk twice over while its pages sat in memory. Reads split by residency take cached pages
/// from the cache and the rest past it. Where the kernel does not report residency (since
/// Linux 5.0 only for files the caller may write), every page reads as absent: `O_DIRECT` as
/// before.
#[derive(Debug)]
pub struct PageCacheMap {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is only passed to `mincore` and `munmap`, never read through.
unsafe impl Send for PageCacheMap {}
// SAFETY: as for Send: `mincore` only reads the kernel's page table for the mapping.
unsafe impl Sync for PageCacheMap {}

impl PageCacheMap {
    /// `None` for an empty file, a failed mapping, or pages other than [`ALIGN`] bytes.
    pub fn new(file: &File) -> Option<Self> {
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        // SAFETY: sysconf has no preconditions.
        if len == 0 || unsafe { libc::sysconf(libc::_SC_PAGESIZE) } != ALIGN as libc::c_long {
            return None;
        }
        // SAFETY: a fresh read-only shared mapping of a file we hold open; it is never read.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        (addr != libc::MAP_FAILED).then_some(PageCacheMap { addr, len })
    }

    /// Residency of the pages covering bytes `at..at + len` (`at` a multiple of [`ALIGN`]);
    /// pages past the end of the file read as absent.
    pub fn resident(&self, at: u64, len: usize) -> Vec<bool> {
        let pages = len.div_ceil(ALIGN);
        let mut out = vec![false; pages];
        let Ok(at) = usize::try_from(at) else { return out };
        if at >= self.len || at % ALIGN != 0 {
            return out;
        }
        let inside = pages.min((self.len - at).div_ceil(ALIGN));
        let mut vec = vec![0u8; inside];
        // SAFETY: the range lies inside the mapping and `vec` has one byte per page of it.
        let ok = unsafe { libc::mincore(self.addr.cast::<u8>().add(at).cast(), inside * ALIGN, vec.as_mut_ptr()) } == 0;
        if ok {
            out.iter_mut().zip(&vec).for_each(|(o, v)| *o = v & 1 == 1);
        }
        out
    }
}

impl Drop for PageCacheMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// A new file that counts and BLAKE3-hashes its bytes and writes them in aligned 4 MiB blocks
/// with `O_DIRECT`; where that is refused it falls back to ordinary writes of the same blocks.
/// Hashing and writing run on a thread of their own, so the producer only copies bytes into a
/// block: a shard writer never waits for the disk or the hash unless two blocks are queued.
/// Bytes reach the file in order; [`HashedFileWriter::finish`] writes the tail and fsyncs.
pub struct HashedFileWriter {
    block: AlignedBlock,
    /// Full blocks to the disk thread; `None` once it has stopped (on an error).
    to_disk: Option<crossbeam_channel::Sender<(AlignedBlock, bool)>>,
    /// Written blocks back from the disk thread, for reuse.
    free: crossbeam_channel::Receiver<AlignedBlock>,
    disk: Option<std::thread::JoinHandle<io::Result<(File, [u8; 32])>>>,
    bytes: u64,
}

/// `BLOCK` bytes at a 4 KiB-aligned address inside one allocation, `len` of them in use.
struct AlignedBlock {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBlock {
    fn new() -> Self {
        let mem = vec![0u8; BLOCK + ALIGN];
        let start = mem.as_ptr().align_offset(ALIGN);
        AlignedBlock { mem, start, len: 0 }
    }
    fn bytes(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
}

/// Blocks a writer allocates at most: one filling, one queued, one being written.
const BLOCKS: usize = 3;

impl HashedFileWriter {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        Self::create_with(path, true)
    }

    /// As [`HashedFileWriter::create`], with `O_DIRECT` only when `direct` (tests use false
    /// to take the path of a file system that refuses it).
    fn create_with(path: &Path, direct: bool) -> io::Result<Self> {
        let open = |flags| OpenOptions::new().write(true).create(true).truncate(true).custom_flags(flags).open(path);
        let (file, direct) = match direct.then(|| open(libc::O_DIRECT)) {
            Some(Ok(f)) => (f, true),
            _ => (open(0)?, false),
        };
        let (to_disk, queued) = crossbeam_channel::bounded::<(AlignedBlock, bool)>(1);
        let (give_back, free) = crossbeam_channel::bounded(BLOCKS);
        let disk = std::thread::Builder::new().name("shard-disk".into()).spawn(move || {
            let mut disk = DiskWriter { file, direct, hasher: blake3::Hasher::new() };
            for (block, last) in queued {
                disk.hasher.update(block.bytes());
                disk.write(block.bytes(), last)?;
                let _ = give_back.try_send(block);
            }
            Ok((disk.file, *disk.hasher.finalize().as_bytes()))
        })?;
        Ok(HashedFileWriter { block: AlignedBlock::new(), to_disk: Some(to_disk), free, disk: Some(disk), bytes: 0 })
    }

    /// Hands the full block to the disk thread and takes an empty one.
    fn send_block(&mut self) -> io::Result<()> {
        let mut next = self.free.try_recv().unwrap_or_else(|_| AlignedBlock::new());
        next.len = 0;
        let full = std::mem::replace(&mut self.block, next);
        if self.to_disk.as_ref().is_some_and(|tx| tx.send((full, false)).is_ok()) {
            return Ok(());
        }
        // The disk thread stopped on an error: that error is the one to report.
        self.to_disk = None;
        Err(self.join_disk().err().unwrap_or_else(|| io::Error::other("shard disk thread stopped early")))
    }

    fn join_disk(&mut self) -> io::Result<(File, [u8; 32])> {
        match self.disk.take() {
            Some(h) => h.join().map_err(|_| io::Error::other("shard disk thread panicked"))?,
            None => Err(io::Error::other("shard file already finished or failed")),
        }
    }

    /// Writes what is buffered and returns the file, its length and BLAKE3 hash; with `sync`, fsyncs
    /// it first.
    pub fn finish(mut self, sync: bool) -> io::Result<(File, u64, [u8; 32])> {
        let block = std::mem::replace(&mut self.block, AlignedBlock { mem: Vec::new(), start: 0, len: 0 });
        let sent = self.to_disk.take().is_some_and(|tx| tx.send((block, true)).is_ok());
        let (file, hash) = self.join_disk()?;
        if !sent {
            return Err(io::Error::other("shard disk thread stopped before the end"));
        }
        if sync {
            file.sync_all()?;
        }
        Ok((file, self.bytes, hash))
    }
}

impl Write for HashedFileWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.block.len == BLOCK {
            self.send_block()?;
        }
        let n = buf.len().min(BLOCK - self.block.len);
        let at = self.block.start + self.block.len;
        self.block.mem[at..at + n].copy_from_slice(&buf[..n]);
        self.block.len += n;
        self.bytes += n as u64;
        Ok(n)
    }

    /// Nothing to do: blocks are written when full and the tail by `finish`, which a partial
    /// `O_DIRECT` block has to wait for.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for HashedFileWriter {
    fn drop(&mut self) {
        // An unfinished writer (an error upstream): stop the disk thread and wait for it, so
        // the caller can remove the temp file with nothing still writing to it.
        self.to_disk = None;
        if let Some(h) = self.disk.take() {
            let _ = h.join();
        }
    }
}

/// The disk thread's end: whole aligned blocks with `O_DIRECT`, the last partial one through
/// the page cache.
struct DiskWriter {
    file: File,
    direct: bool,
    hasher: blake3::Hasher,
}

impl DiskWriter {
    fn write(&mut self, bytes: &[u8], last: bool) -> io::Result<()> {
        let mut done = 0;
        while done < bytes.len() {
            let want = if self.direct { (bytes.len() - done) / ALIGN * ALIGN } else { bytes.len() - done };
            if want == 0 {
                debug_assert!(last, "only the last block is partial");
                // A partial block at the end: O_DIRECT cannot write it, the page cache can.
                self.stop_direct()?;
                continue;
            }
            match self.file.write(&bytes[done..done + want]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the disk took no bytes")),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => self.stop_direct()?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Switches the descriptor to ordinary writes, for a partial block or a refusing device.
    fn stop_direct(&mut self) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: plain fcntl calls on a descriptor this struct owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.direct = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_byte_in_order_with_its_hash() {
        // A disk directory (tmpfs refuses O_DIRECT and would only test the fallback).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let sizes = [0usize, 1, ALIGN - 1, ALIGN, BLOCK - 3, BLOCK, BLOCK + ALIGN + 17, 3 * BLOCK + 5];
        for (n, direct) in sizes.into_iter().flat_map(|n| [(n, true), (n, false)]) {
            let data: Vec<u8> = (0..n).map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8).collect();
            let path = dir.path().join(format!("f{n}-{direct}"));
            // Without O_DIRECT: the path taken where the file system refuses it.
            let mut w = HashedFileWriter::create_with(&path, direct).unwrap();
            // Odd-sized writes, as the Parquet writer makes them.
            for piece in data.chunks(10_007) {
                w.write_all(piece).unwrap();
            }
            let (_, bytes, hash) = w.finish(true).unwrap();
            assert_eq!(bytes, n as u64);
            assert_eq!(std::fs::read(&path).unwrap(), data, "{n} bytes, direct {direct}");
            assert_eq!(hash, *blake3::hash(&data).as_bytes(), "{n} bytes");
        }
        // The published test vector: BLAKE3("abc"), as `b3sum` and Python's `blake3` print it.
        let path = dir.path().join("abc");
        let mut w = HashedFileWriter::create_with(&path, true).unwrap();
        w.write_all(b"abc").unwrap();
        let (_, _, hash) = w.finish(false).unwrap();
        assert_eq!(scgpt_data::vocab::hex(&hash), "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85");
    }
}
