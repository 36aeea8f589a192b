//! Buffers of 4-byte words (`u32` column indices, `f32` values) for row blocks, recycled.
//!
//! Data-prep reads a few MB per array per block and drops the block once it is binned. Freed
//! buffers of that size tend to go back to the kernel, so every read faulted in and zeroed
//! fresh pages (`clear_page` was 7.6% of a prep run's CPU, perf on 200k cells). Dropped large
//! buffers wait in a small pool instead and the next read takes one.

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::Mutex;

/// `u32` or `f32`: four bytes, any bit pattern valid, so a buffer can hold either in turn.
pub trait Word: Copy + sealed::Sealed {}
impl Word for u32 {}
impl Word for f32 {}
mod sealed {
    pub trait Sealed {}
    impl Sealed for u32 {}
    impl Sealed for f32 {}
}

/// Buffers smaller than this (in words) are simply freed.
const POOLED_MIN_WORDS: usize = 1 << 18;
/// Enough for the gene-filter pass's blocks in flight (two arrays of up to 19 blocks); the pool
/// never holds more memory than was in use at the peak.
const POOL_MAX: usize = 40;

/// Large buffers waiting for reuse.
struct Pool(Mutex<Vec<Vec<u32>>>);

static POOL: Pool = Pool(Mutex::new(Vec::new()));

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u32>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty buffer with room for at least `words`, pooled when one fits. New buffers get
    /// an eighth more room, so blocks of slightly different sizes can reuse each other's.
    fn take(&self, words: usize) -> Vec<u32> {
        if words < POOLED_MIN_WORDS {
            return Vec::with_capacity(words);
        }
        let mut pool = self.lock();
        match pool.iter().position(|v| v.capacity() >= words) {
            Some(i) => pool.swap_remove(i),
            None => Vec::with_capacity(words + words / 8),
        }
    }

    fn put(&self, mut v: Vec<u32>) {
        if v.capacity() < POOLED_MIN_WORDS {
            return;
        }
        v.clear();
        let mut pool = self.lock();
        if pool.len() == POOL_MAX {
            // Keep the larger buffers: they fit any request the smaller ones do.
            let smallest = (0..pool.len()).min_by_key(|&i| pool[i].capacity()).expect("full pool");
            if pool[smallest].capacity() >= v.capacity() {
                return;
            }
            pool.swap_remove(smallest);
        }
        pool.push(v);
    }
}

/// An empty buffer with room for at least `words`, from the pool when one fits.
pub fn take_buffer(words: usize) -> Vec<u32> {
    POOL.take(words)
}

/// Frees every pooled buffer: after a phase with larger blocks, so the next one's smaller
/// buffers do not sit beside idle large ones.
pub fn clear_pool() {
    POOL.lock().clear();
}

/// The same allocation seen as another 4-byte word type.
fn cast<A: Word, B: Word>(v: Vec<A>) -> Vec<B> {
    const { assert!(std::mem::size_of::<A>() == 4 && std::mem::align_of::<A>() == 4) };
    const { assert!(std::mem::size_of::<B>() == 4 && std::mem::align_of::<B>() == 4) };
    let mut v = ManuallyDrop::new(v);
    // SAFETY: A and B have the same size and alignment (checked above) and every bit pattern
    // is a valid B, so the allocation, length and capacity carry over unchanged.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<B>(), v.len(), v.capacity()) }
}

/// A vector whose first `head` elements are not part of it: a read lands at an aligned address
/// ahead of the first element asked for, and this keeps it there without a copy to the front.
/// Its buffer goes back to the pool when dropped.
#[derive(Debug, Clone, Default)]
pub struct OffsetVec<T: Word> {
    vec: Vec<T>,
    head: usize,
}

impl<T: Word> OffsetVec<T> {
    /// `vec` without its first `head` elements.
    pub fn new(vec: Vec<T>, head: usize) -> Self {
        assert!(head <= vec.len(), "head {head} past the end of {} elements", vec.len());
        OffsetVec { vec, head }
    }

    /// Appends `more` (after a read of a later file run).
    pub fn extend_from_slice(&mut self, more: &[T]) {
        self.vec.extend_from_slice(more);
    }

    /// The same words as another type (u32 bit patterns as f32), without touching them.
    pub fn cast<U: Word>(mut self) -> OffsetVec<U> {
        OffsetVec { vec: cast(std::mem::take(&mut self.vec)), head: self.head }
    }
}

impl<T: Word> From<Vec<T>> for OffsetVec<T> {
    fn from(vec: Vec<T>) -> Self {
        OffsetVec { vec, head: 0 }
    }
}

impl<T: Word> Drop for OffsetVec<T> {
    fn drop(&mut self) {
        POOL.put(cast(std::mem::take(&mut self.vec)));
    }
}

impl<T: Word> Deref for OffsetVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.vec[self.head..]
    }
}

impl<T: Word> DerefMut for OffsetVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.vec[self.head..]
    }
}

impl<T: Word + PartialEq> PartialEq for OffsetVec<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_skip_the_head_and_casts_keep_the_bits() {
        let w = OffsetVec::new((0..10u32).map(|i| i * 2).collect(), 3);
        assert_eq!((w.len(), w[0], w[1]), (7, 6, 8));
        let f: OffsetVec<f32> = w.cast();
        assert_eq!(f[0].to_bits(), 6, "the bits are reinterpreted, not converted");
        assert_eq!(f, OffsetVec::from(vec![6u32, 8, 10, 12, 14, 16, 18]).cast::<f32>());
    }

    #[test]
    fn the_pool_reuses_large_buffers_and_keeps_the_largest() {
        let pool = Pool(Mutex::new(Vec::new())); // a private pool: the global one is shared by tests
        let mut v = pool.take(POOLED_MIN_WORDS);
        assert!(v.capacity() >= POOLED_MIN_WORDS + POOLED_MIN_WORDS / 8, "new buffers get headroom");
        v.extend(0..100u32);
        let ptr = v.as_ptr();
        pool.put(v);
        let again = pool.take(POOLED_MIN_WORDS + 10);
        assert_eq!((again.as_ptr(), again.len()), (ptr, 0), "the same memory, emptied");
        pool.put(Vec::with_capacity(10));
        assert!(pool.lock().is_empty(), "small buffers are freed, not pooled");
        for k in 0..POOL_MAX + 3 {
            pool.put(Vec::with_capacity(POOLED_MIN_WORDS + k));
        }
        let caps: Vec<usize> = pool.lock().iter().map(|b| b.capacity()).collect();
        assert_eq!(caps.len(), POOL_MAX);
        assert!(caps.iter().all(|&c| c >= POOLED_MIN_WORDS + 3), "a full pool drops its smallest: {caps:?}");
    }
}
