//! The API's memory allocator: mimalloc for the many small buffers of a
//! submission, the C library's `mmap` path for every large one.
//!
//! `API_DECODE_MEMORY_MB` bounds what decoding submitted images holds by
//! reserving each decode's pixels before it starts and releasing them when
//! it ends. That bound holds in the process's RSS only if a freed image
//! buffer leaves the process when it is freed. mimalloc keeps freed large
//! blocks a while to reuse them (its purge delay), so the next decode,
//! admitted the moment the previous one released its reservation, could
//! find the old buffer still resident beside its own: 40 decode bombs of
//! 512 MiB under a 600 MiB budget peaked at 1,147 MiB in one run of two.
//! Allocations of [`LARGE`] or more therefore go to the C library, told at
//! the first one (`mallopt(M_MMAP_THRESHOLD)`, which also stops glibc from
//! raising the threshold by itself) to map each on its own and unmap it on
//! free.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

use mimalloc::MiMalloc;

/// The size from which an allocation is mapped on its own and returned to
/// the kernel when freed: 1 MiB, the size below which the API decodes an
/// image without reserving it (`codec::INLINE_BYTES`).
pub const LARGE: usize = 1024 * 1024;

/// Whether glibc has been told to map every allocation of [`LARGE`] or more.
static MAPPED: AtomicBool = AtomicBool::new(false);

/// mimalloc below [`LARGE`], the C library's `mmap` at and above it. Set
/// as the API binary's `#[global_allocator]`.
#[derive(Debug, Default)]
pub struct Allocator;

impl Allocator {
    /// Whether a block of `size` bytes belongs to the C library.
    fn large(size: usize) -> bool {
        size >= LARGE
    }

    /// Tells glibc, once, to map each allocation of [`LARGE`] or more on its
    /// own (and to keep that threshold).
    fn map_large() {
        if !MAPPED.load(Ordering::Relaxed) {
            // SAFETY: mallopt only sets an allocator parameter; glibc
            // serialises it with its own lock.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE as libc::c_int);
            }
            MAPPED.store(true, Ordering::Relaxed);
        }
    }
}

// SAFETY: each block is freed and resized by the allocator that made it:
// which one is decided by the block's size, which `dealloc` and `realloc`
// are given exactly as it was allocated.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::large(layout.size()) {
            Self::map_large();
            unsafe { System.alloc(layout) }
        } else {
            unsafe { MiMalloc.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::large(layout.size()) {
            Self::map_large();
            unsafe { System.alloc_zeroed(layout) }
        } else {
            unsafe { MiMalloc.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if Self::large(layout.size()) {
            unsafe { System.dealloc(ptr, layout) }
        } else {
            unsafe { MiMalloc.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match (Self::large(layout.size()), Self::large(new_size)) {
            (true, true) => unsafe { System.realloc(ptr, layout, new_size) },
            (false, false) => unsafe { MiMalloc.realloc(ptr, layout, new_size) },
            // Crossing the line: a new block from the other allocator, the
            // bytes both hold copied, the old block freed by its own.
            _ => {
                // SAFETY: the caller guarantees `new_size`, rounded up to
                // the alignment, does not overflow `isize`.
                let new_layout =
                    unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
                let new = unsafe { self.alloc(new_layout) };
                if !new.is_null() {
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_keep_their_bytes_across_the_line() {
        let a = Allocator;
        unsafe {
            let small = Layout::from_size_align(64, 8).unwrap();
            let p = a.alloc(small);
            assert!(!p.is_null());
            for i in 0..64 {
                *p.add(i) = i as u8;
            }
            // Small to large: copied into a mapped block.
            let q = a.realloc(p, small, 2 * LARGE);
            assert!(!q.is_null());
            assert!((0..64).all(|i| *q.add(i) == i as u8));
            *q.add(2 * LARGE - 1) = 7;
            // Large to small: copied back into mimalloc.
            let big = Layout::from_size_align(2 * LARGE, 8).unwrap();
            let r = a.realloc(q, big, 32);
            assert!(!r.is_null());
            assert!((0..32).all(|i| *r.add(i) == i as u8));
            a.dealloc(r, Layout::from_size_align(32, 8).unwrap());
            let z = a.alloc_zeroed(big);
            assert!((0..2 * LARGE).step_by(4096).all(|i| *z.add(i) == 0));
            a.dealloc(z, big);
        }
    }
}
