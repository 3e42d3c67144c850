//! The pixel math of imgflow's built-in filters.
//!
//! Plain, dependency-free Rust over 8-bit RGBA buffers (row-major, 4 bytes a
//! pixel, straight alpha). The `grayscale` and `blur` plugins are thin
//! component wrappers around these functions; the host's tests and
//! benchmarks compile the very same code natively to compare against.

#![forbid(unsafe_code)]

mod blur;
mod grayscale;

pub use blur::{
    blur_error, exact_gaussian_blur, gaussian_blur, gaussian_kernel, BlurError, MAX_SIGMA,
    RECURSIVE_FROM,
};
pub use grayscale::{grayscale_in_place, luma};
