//! Allocator settings for the binaries: the tensor workloads allocate and free buffers of tens
//! of MB many times a step (attention scores at batch 16 × 8 heads × 257² are 34 MB). glibc
//! serves anything above its mmap threshold (at most 32 MB with the dynamic threshold) with a
//! fresh mmap and returns it on free, so every such buffer is page-faulted and zeroed by the
//! kernel again: ~10% of a CPU training step was `clear_page` and page-fault handling. Keeping
//! freed memory in the heap for reuse cut the step's system time from 8.9 s to 3.4 s
//! (docs/benchmarks.md). Peak RSS is unchanged: the same buffers are reused, not added.

/// Call once at the start of `main`, before threads start. No-op off glibc.
pub fn tune_for_tensors() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        // Every buffer from the heap (no mmap, whatever its size), and freed heap never
        // returned (-1 disables trimming): at batch 64 × 8 heads × 513² one score tensor is
        // 540 MB and a step's peak ~12 GB, so a 2 GiB trim threshold still gave most of a
        // step's memory back to the kernel to fault in again (31% of an integration step in
        // kernel time; the same settings through GLIBC_TUNABLES took 4 steps' kernel time from
        // 48-60 s to 15.5 s, docs/benchmarks.md).
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        // Few arenas: buffers freed by one rayon worker are reused by the others.
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
