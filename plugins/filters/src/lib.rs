//! The pixel math of imgflow's built-in filters.
//!
//! Plain, dependency-free Rust over 8-bit RGBA buffers (row-major, 4 bytes a
//! pixel, straight alpha). The built-in plugins (`grayscale`, `blur`,
//! `sharpen`, `resize`, `crop`, `rotate`, `flip`) are thin component
//! wrappers around these functions; the host's tests and
//! benchmarks compile the very same code natively to compare against.

#![forbid(unsafe_code)]

mod blur;
mod geometry;
mod grayscale;
mod pixels;
mod sharpen;

pub use blur::{
    blur_error, exact_gaussian_blur, gaussian_blur, gaussian_kernel, BlurError, MAX_SIGMA,
    RECURSIVE_FROM,
};
pub use geometry::{
    crop, flip, resize, rotate, Filter, Fit, Flip, GeometryError, Rgba, Rotation, MAX_SIDE,
};
pub use grayscale::{grayscale_in_place, luma};
pub use sharpen::{sharpen, MAX_AMOUNT};
