//! Pixel conversions the filters share, written for the sandbox: each
//! loop handles a block of samples a turn, because compiled to WebAssembly
//! every loop header carries the sandbox's deadline check (a call on its
//! slow path), around which the compiler keeps live values in memory; a
//! loop of one sample or one vector a turn spent most of its time there.

/// Whether every alpha of `rgba` is 255, sixteen pixels at a time (a loop
/// of one pixel a turn, compiled to WebAssembly, spent most of its time on
/// the deadline check every loop makes).
pub fn is_opaque(rgba: &[u8]) -> bool {
    let mut blocks = rgba.chunks_exact(64);
    let all = blocks.all(|b| b.chunks_exact(4).fold(255, |m, px| m & px[3]) == 255);
    all && blocks.remainder().chunks_exact(4).all(|px| px[3] == 255)
}

/// Every sample of `rgba` as an `f32`.
pub fn samples_f32(rgba: &[u8]) -> Vec<f32> {
    let mut planes = vec![0.0f32; rgba.len()];
    to_f32(rgba, &mut planes, true);
    planes
}

/// The pixels `rgba` as `f32` in the 0..=255 scale into `planes` (as long),
/// premultiplied unless `opaque`; sixteen samples a turn (for the same
/// reason as [`is_opaque`]).
pub fn to_f32(rgba: &[u8], planes: &mut [f32], opaque: bool) {
    let done = rgba.len() / 16 * 16;
    let mut blocks = planes.chunks_exact_mut(16);
    for (p, v) in (&mut blocks).zip(rgba.chunks_exact(16)) {
        for j in 0..16 {
            p[j] = f32::from(v[j]);
        }
    }
    for (p, &v) in blocks.into_remainder().iter_mut().zip(&rgba[done..]) {
        *p = f32::from(v);
    }
    if !opaque {
        for px in planes.chunks_exact_mut(4) {
            let k = px[3] * (1.0 / 255.0);
            px[0] *= k;
            px[1] *= k;
            px[2] *= k;
        }
    }
}

/// `v` within `0.0..=255.0` (`NaN` gives 0), written as comparisons and
/// selects, which compile to single vector instructions, where `clamp`'s
/// NaN rules compile to several in WebAssembly.
#[inline]
pub fn clamp_u8_range(v: f32) -> f32 {
    let v = if v > 0.0 { v } else { 0.0 };
    if v < 255.0 {
        v
    } else {
        255.0
    }
}
