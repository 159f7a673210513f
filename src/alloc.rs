//! The extension's allocator: mimalloc, called the way C's `malloc` is
//! wherever that gives the alignment asked for.
//!
//! The `mimalloc` crate's `GlobalAlloc` passes every allocation to
//! `mi_malloc_aligned`, alignment 1 included. mimalloc 3 serves that from
//! its fast path only for small sizes and power-of-two blocks; any other
//! size (a 9 KB read buffer, a 300-byte header map) goes through its
//! over-allocating fallback, some 300-400 instructions where `mi_malloc`
//! takes well under 100. (Known upstream: purpleprotocol/mimalloc_rust#170.)
//! `mi_malloc` aligns every block to `MI_MAX_ALIGN_SIZE` (16 bytes), or to
//! its size when smaller, as C's `malloc` must; so a layout whose alignment
//! is at most 16 and at most its size goes to the plain functions, and any
//! other to the aligned ones. This is the test the standard library's own
//! `System` allocator makes.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every `mi_malloc` block has (when at least its size).
const MAX_ALIGN: usize = 16;

pub struct MiMalloc;

#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= MAX_ALIGN && align <= size
}

// SAFETY: every pointer handed out comes from mimalloc with at least the
// layout's alignment (see the module), and is freed or reallocated by it.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_malloc(layout.size()).cast()
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if plain(layout.align(), layout.size()) {
            mi::mi_zalloc(layout.size()).cast()
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if plain(layout.align(), new_size) {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every size up to 64 KiB that matters (each bin edge and either side
    /// of it) with every alignment up to 4 KiB: the block is aligned, fully
    /// writable, zeroed when asked, and keeps its bytes when grown.
    #[test]
    fn blocks_have_the_alignment_asked_for() {
        let a = MiMalloc;
        let mut sizes: Vec<usize> = (1..=260).collect();
        for shift in 9..=16 {
            let edge = 1usize << shift;
            sizes.extend([edge - 1, edge, edge + 1, edge + edge / 2, edge * 9 / 8 + 3]);
        }
        for &size in &sizes {
            for shift in 0..=12 {
                let align = 1usize << shift;
                let layout = Layout::from_size_align(size, align).unwrap();
                unsafe {
                    let p = a.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size}, align {align}");
                    std::ptr::write_bytes(p, 0xA5, size);
                    let grown = size * 2 + 7;
                    let q = a.realloc(p, layout, grown);
                    assert_eq!(q as usize % align, 0, "grown {grown}, align {align}");
                    assert!(std::slice::from_raw_parts(q, size)
                        .iter()
                        .all(|&b| b == 0xA5));
                    a.dealloc(q, Layout::from_size_align(grown, align).unwrap());
                    let z = a.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0, "zeroed {size}, align {align}");
                    assert!(std::slice::from_raw_parts(z, size).iter().all(|&b| b == 0));
                    a.dealloc(z, layout);
                }
            }
        }
    }

    #[test]
    fn the_plain_functions_serve_what_they_align() {
        assert!(plain(1, 1));
        assert!(plain(8, 8));
        assert!(plain(16, 16));
        assert!(plain(1, 9000));
        assert!(!plain(16, 8)); // an 8-byte block is only 8-aligned
        assert!(!plain(32, 64));
        assert!(!plain(4096, 4096));
    }
}
