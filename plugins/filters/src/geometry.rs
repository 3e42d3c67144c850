//! Geometry: crop, rotate by right angles, flip, and resize.
//!
//! Crop, rotate and flip move whole pixels, so their results are exact.
//! Resize resamples with a separable filter (Lanczos3, or the faster
//! triangle filter), vertical pass then horizontal, in `f32` on
//! premultiplied RGBA so transparent pixels lend no colour to their
//! neighbours; a filter's support is widened by the scale when shrinking, so
//! downscaling averages every source pixel instead of skipping some.

use std::fmt;

use crate::pixels::{clamp_u8_range, is_opaque, samples_f32};

/// The largest width or height [`resize`] produces (the host's own image
/// limits may be lower; its check still applies).
pub const MAX_SIDE: u32 = 16_384;

/// The largest result a geometry filter makes, in pixels: the host's
/// default `MAX_IMAGE_PIXELS` (64 megapixels). A larger one is refused
/// before anything is allocated (its working buffers would not fit a
/// 32-bit address space, and the host would refuse it anyway).
pub const MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Why a geometry operation refused its input.
#[derive(Debug, Clone, PartialEq)]
pub enum GeometryError {
    /// The buffer is not `width * height * 4` bytes long.
    BufferLength {
        /// `width * height * 4`.
        expected: usize,
        /// The length passed in.
        actual: usize,
    },
    /// A parameter is out of range for this image (the message says which).
    Invalid(String),
}

impl fmt::Display for GeometryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GeometryError::BufferLength { expected, actual } => write!(
                f,
                "pixel buffer holds {actual} bytes, expected width x height x 4 = {expected}"
            ),
            GeometryError::Invalid(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for GeometryError {}

/// An RGBA image: width, height and its pixels.
pub type Rgba = (u32, u32, Vec<u8>);

fn check(width: u32, height: u32, rgba: &[u8]) -> Result<(), GeometryError> {
    let expected = width as usize * height as usize * 4;
    if rgba.len() != expected {
        return Err(GeometryError::BufferLength {
            expected,
            actual: rgba.len(),
        });
    }
    Ok(())
}

/// The `cw` x `ch` rectangle whose top-left corner is (`x`, `y`); it must
/// lie inside the image and not be empty.
pub fn crop(
    width: u32,
    height: u32,
    rgba: &[u8],
    x: u32,
    y: u32,
    cw: u32,
    ch: u32,
) -> Result<Rgba, GeometryError> {
    check(width, height, rgba)?;
    if cw == 0 || ch == 0 {
        return Err(GeometryError::Invalid(
            "the crop's width and height must be at least 1".into(),
        ));
    }
    if u64::from(x) + u64::from(cw) > u64::from(width)
        || u64::from(y) + u64::from(ch) > u64::from(height)
    {
        return Err(GeometryError::Invalid(format!(
            "the crop {cw}x{ch} at ({x}, {y}) does not fit in the {width}x{height} image"
        )));
    }
    let mut out = Vec::with_capacity(cw as usize * ch as usize * 4);
    for row in y..y + ch {
        let start = (row as usize * width as usize + x as usize) * 4;
        out.extend_from_slice(&rgba[start..start + cw as usize * 4]);
    }
    Ok((cw, ch, out))
}

/// A clockwise rotation by a right angle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// A quarter turn clockwise.
    Cw90,
    /// A half turn.
    Cw180,
    /// Three quarters clockwise (a quarter counter-clockwise).
    Cw270,
}

impl Rotation {
    /// The rotation by `degrees` clockwise: 90, 180 or 270 (negative
    /// values turn counter-clockwise: -90 is 270).
    pub fn from_degrees(degrees: i64) -> Option<Rotation> {
        match degrees.rem_euclid(360) {
            90 => Some(Rotation::Cw90),
            180 => Some(Rotation::Cw180),
            270 => Some(Rotation::Cw270),
            _ => None,
        }
    }
}

/// The image turned clockwise by `rotation`.
pub fn rotate(
    width: u32,
    height: u32,
    rgba: &[u8],
    rotation: Rotation,
) -> Result<Rgba, GeometryError> {
    check(width, height, rgba)?;
    let (w, h) = (width as usize, height as usize);
    let (ow, oh) = match rotation {
        Rotation::Cw180 => (w, h),
        Rotation::Cw90 | Rotation::Cw270 => (h, w),
    };
    let mut out = vec![0u8; rgba.len()];
    for y in 0..h {
        for x in 0..w {
            let (ox, oy) = match rotation {
                Rotation::Cw90 => (h - 1 - y, x),
                Rotation::Cw180 => (w - 1 - x, h - 1 - y),
                Rotation::Cw270 => (y, w - 1 - x),
            };
            let from = (y * w + x) * 4;
            let to = (oy * ow + ox) * 4;
            out[to..to + 4].copy_from_slice(&rgba[from..from + 4]);
        }
    }
    Ok((ow as u32, oh as u32, out))
}

/// Which way [`flip`] mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flip {
    /// Left and right swap.
    Horizontal,
    /// Top and bottom swap.
    Vertical,
}

/// The image mirrored.
pub fn flip(width: u32, height: u32, rgba: &[u8], direction: Flip) -> Result<Rgba, GeometryError> {
    check(width, height, rgba)?;
    let row = width as usize * 4;
    let mut out = Vec::with_capacity(rgba.len());
    match direction {
        Flip::Vertical => {
            for line in rgba.chunks_exact(row).rev() {
                out.extend_from_slice(line);
            }
        }
        Flip::Horizontal => {
            for line in rgba.chunks_exact(row) {
                for px in line.chunks_exact(4).rev() {
                    out.extend_from_slice(px);
                }
            }
        }
    }
    Ok((width, height, out))
}

/// How [`resize`] fits the image to a width and a height given together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The largest size within both, the aspect ratio kept (one side may
    /// come out smaller than asked).
    Contain,
    /// Exactly the size asked: scaled to cover it, aspect kept, the
    /// overflow cropped evenly from both sides.
    Cover,
    /// Exactly the size asked, stretched.
    Fill,
}

/// The resampling filter of [`resize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Windowed sinc over 3 lobes: sharp, the usual choice.
    Lanczos3,
    /// Linear interpolation (a tent): about three times faster, softer.
    Triangle,
}

impl Filter {
    fn support(self) -> f32 {
        match self {
            Filter::Lanczos3 => 3.0,
            Filter::Triangle => 1.0,
        }
    }

    fn weight(self, x: f32) -> f32 {
        let x = x.abs();
        match self {
            Filter::Triangle => (1.0 - x).max(0.0),
            Filter::Lanczos3 if x < 3.0 => sinc(x) * sinc(x / 3.0),
            Filter::Lanczos3 => 0.0,
        }
    }
}

fn sinc(x: f32) -> f32 {
    if x == 0.0 {
        1.0
    } else {
        let a = x * std::f32::consts::PI;
        a.sin() / a
    }
}

/// A width and a height.
type Size = (u32, u32);

/// The output size of a resize: `width` and/or `height` (at least one), with
/// `fit` when both are given. Returns the size the image is scaled to and,
/// for `Cover`, the size then cropped to.
fn target_size(
    (sw, sh): Size,
    width: Option<u32>,
    height: Option<u32>,
    fit: Fit,
) -> Result<(Size, Size), GeometryError> {
    let scaled = |w: f64, h: f64| -> Size {
        (
            (w.round() as u32).clamp(1, MAX_SIDE),
            (h.round() as u32).clamp(1, MAX_SIDE),
        )
    };
    let (sw_f, sh_f) = (f64::from(sw), f64::from(sh));
    let size = match (width, height) {
        (None, None) => {
            return Err(GeometryError::Invalid(
                "give a width, a height, or both".into(),
            ))
        }
        (Some(w), None) => scaled(f64::from(w), sh_f * f64::from(w) / sw_f),
        (None, Some(h)) => scaled(sw_f * f64::from(h) / sh_f, f64::from(h)),
        (Some(w), Some(h)) => match fit {
            Fit::Fill => (w, h),
            Fit::Contain => {
                let k = (f64::from(w) / sw_f).min(f64::from(h) / sh_f);
                scaled(sw_f * k, sh_f * k)
            }
            Fit::Cover => {
                let k = (f64::from(w) / sw_f).max(f64::from(h) / sh_f);
                let (cw, ch) = scaled(sw_f * k, sh_f * k);
                return Ok(((cw.max(w), ch.max(h)), (w, h)));
            }
        },
    };
    Ok((size, size))
}

/// The image resized to `width` and/or `height` (a missing one keeps the
/// aspect ratio; with both, `fit` decides), with `filter`. Sizes are
/// 1..=[`MAX_SIDE`].
pub fn resize(
    src_width: u32,
    src_height: u32,
    rgba: &[u8],
    width: Option<u32>,
    height: Option<u32>,
    fit: Fit,
    filter: Filter,
) -> Result<Rgba, GeometryError> {
    check(src_width, src_height, rgba)?;
    for (name, side) in [("width", width), ("height", height)] {
        if let Some(side) = side {
            if !(1..=MAX_SIDE).contains(&side) {
                return Err(GeometryError::Invalid(format!(
                    "{name} must be 1 to {MAX_SIDE}, got {side}"
                )));
            }
        }
    }
    if src_width == 0 || src_height == 0 {
        return Err(GeometryError::Invalid("the image is empty".into()));
    }
    let ((tw, th), (cw, ch)) = target_size((src_width, src_height), width, height, fit)?;
    for (w, h) in [(tw, th), (cw, ch)] {
        if u64::from(w) * u64::from(h) > MAX_PIXELS {
            return Err(GeometryError::Invalid(format!(
                "the result would be {w}x{h}, over {MAX_PIXELS} pixels"
            )));
        }
    }
    let opaque = is_opaque(rgba);
    let mut planes = samples_f32(rgba);
    if !opaque {
        for px in planes.chunks_exact_mut(4) {
            let a = px[3] / 255.0;
            px[0] *= a;
            px[1] *= a;
            px[2] *= a;
        }
    }
    let (sw, sh) = (src_width as usize, src_height as usize);
    let (tw, th) = (tw as usize, th as usize);
    let vertical = resample_columns(&planes, sw, sh, th, filter);
    let both = resample_rows(&vertical, sw, th, tw, filter);
    // Cover: crop the overflow evenly.
    let (cw, ch) = (cw as usize, ch as usize);
    let (x0, y0) = ((tw - cw) / 2, (th - ch) / 2);
    let mut out = vec![0u8; cw * ch * 4];
    for (y, dst) in (y0..y0 + ch).zip(out.chunks_exact_mut(cw * 4)) {
        let row = &both[(y * tw + x0) * 4..(y * tw + x0 + cw) * 4];
        finish_row(row, opaque, dst);
    }
    Ok((cw as u32, ch as u32, out))
}

/// One row of resampled samples back to 8-bit straight alpha: divided by
/// alpha unless `opaque`; four pixels a turn when opaque (compiled to
/// WebAssembly, a loop of one sample a turn spent most of its time on the
/// deadline check every loop makes).
#[inline(never)]
fn finish_row(row: &[f32], opaque: bool, out: &mut [u8]) {
    if opaque {
        let done = out.len() / 16 * 16;
        let mut blocks = out.chunks_exact_mut(16);
        for (o, r) in (&mut blocks).zip(row.chunks_exact(16)) {
            for j in 0..16 {
                o[j] = to_u8(r[j]);
            }
        }
        for (o, &r) in blocks.into_remainder().iter_mut().zip(&row[done..]) {
            *o = to_u8(r);
        }
        return;
    }
    for (px, o) in row.chunks_exact(4).zip(out.chunks_exact_mut(4)) {
        let a = px[3].clamp(0.0, 255.0);
        let scale = if a == 0.0 { 1.0 } else { 255.0 / a };
        o[0] = to_u8(px[0] * scale);
        o[1] = to_u8(px[1] * scale);
        o[2] = to_u8(px[2] * scale);
        o[3] = to_u8(a);
    }
}

/// Rounds to the nearest integer, halves away from zero, within `0..=255`:
/// what `v.round().clamp(0.0, 255.0) as u8` gives, in operations that
/// compile to vector instructions (WebAssembly has no `round`, which was a
/// library call per sample, and `as u8` a saturating conversion with
/// branches): adding 2^23 rounds to the nearest integer, halves to even,
/// and leaves it in the low mantissa bits; a half that went down to even
/// is then taken up.
#[inline]
fn to_u8(v: f32) -> u8 {
    const MAGIC: f32 = 8_388_608.0;
    let v = clamp_u8_range(v);
    let even = (v + MAGIC) - MAGIC;
    let r = if v - even == 0.5 { even + 1.0 } else { even };
    (r + MAGIC).to_bits() as u8
}

/// For each output position along an axis of `from` samples resized to
/// `to`: the first source index and the normalised weights.
fn weights(from: usize, to: usize, filter: Filter) -> Vec<(usize, Vec<f32>)> {
    let ratio = from as f32 / to as f32;
    let scale = ratio.max(1.0);
    let support = filter.support() * scale;
    (0..to)
        .map(|i| {
            let centre = (i as f32 + 0.5) * ratio;
            let left = ((centre - support).floor().max(0.0)) as usize;
            let right = ((centre + support).ceil() as usize).min(from);
            let mut w: Vec<f32> = (left..right)
                .map(|j| filter.weight((j as f32 + 0.5 - centre) / scale))
                .collect();
            let sum: f32 = w.iter().sum();
            if sum != 0.0 {
                for v in &mut w {
                    *v /= sum;
                }
            }
            (left, w)
        })
        .collect()
}

/// Resizes each column of a `w` x `h` RGBA plane to `to` rows.
fn resample_columns(src: &[f32], w: usize, h: usize, to: usize, filter: Filter) -> Vec<f32> {
    let row = w * 4;
    let mut out = vec![0.0f32; row * to];
    for (y, (left, taps)) in weights(h, to, filter).into_iter().enumerate() {
        let dst = &mut out[y * row..(y + 1) * row];
        for (k, weight) in taps.into_iter().enumerate() {
            let line = &src[(left + k) * row..(left + k + 1) * row];
            add_scaled(dst, line, weight);
        }
    }
    out
}

/// `dst += line * weight`, element-wise, sixteen samples a turn (a loop of
/// one vector a turn, compiled to WebAssembly, reloaded the weight and
/// checked the deadline for every four samples).
#[inline(never)]
fn add_scaled(dst: &mut [f32], line: &[f32], weight: f32) {
    let n = dst.len().min(line.len());
    let (dst, line) = (&mut dst[..n], &line[..n]);
    let done = n / 16 * 16;
    let mut blocks = dst.chunks_exact_mut(16);
    for (d, s) in (&mut blocks).zip(line.chunks_exact(16)) {
        for j in 0..16 {
            d[j] += s[j] * weight;
        }
    }
    for (d, &s) in blocks.into_remainder().iter_mut().zip(&line[done..]) {
        *d += s * weight;
    }
}

/// Resizes each row of a `w` x `h` RGBA plane to `to` columns.
fn resample_rows(src: &[f32], w: usize, h: usize, to: usize, filter: Filter) -> Vec<f32> {
    let taps = weights(w, to, filter);
    let mut out = vec![0.0f32; to * h * 4];
    for y in 0..h {
        let line = &src[y * w * 4..(y + 1) * w * 4];
        let dst = &mut out[y * to * 4..(y + 1) * to * 4];
        for (x, (left, ws)) in taps.iter().enumerate() {
            let mut acc = [0.0f32; 4];
            let taps = &line[left * 4..(left + ws.len()) * 4];
            // Four taps a turn, in order: the sums stay in registers for
            // them (a loop of one tap a turn, compiled to WebAssembly,
            // stored and reloaded them around its deadline check).
            let mut quads = ws.chunks_exact(4);
            let mut pixels = taps.chunks_exact(16);
            for (w4, p4) in (&mut quads).zip(&mut pixels) {
                for t in 0..4 {
                    for c in 0..4 {
                        acc[c] += p4[t * 4 + c] * w4[t];
                    }
                }
            }
            for (weight, p) in quads
                .remainder()
                .iter()
                .zip(pixels.remainder().chunks_exact(4))
            {
                for c in 0..4 {
                    acc[c] += p[c] * weight;
                }
            }
            dst[x * 4..x * 4 + 4].copy_from_slice(&acc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3x2 image whose pixels are numbered 0..6 (in every channel).
    fn numbered() -> Vec<u8> {
        (0..6u8).flat_map(|i| [i, i, i, 255]).collect()
    }

    fn ids(px: &[u8]) -> Vec<u8> {
        px.chunks_exact(4).map(|p| p[0]).collect()
    }

    #[test]
    fn crop_takes_the_rectangle_and_checks_bounds() {
        let (w, h, px) = crop(3, 2, &numbered(), 1, 0, 2, 2).unwrap();
        assert_eq!((w, h, ids(&px)), (2, 2, vec![1, 2, 4, 5]));
        assert!(crop(3, 2, &numbered(), 2, 0, 2, 1).is_err());
        assert!(crop(3, 2, &numbered(), 0, 0, 0, 1).is_err());
        assert!(crop(3, 2, &numbered(), u32::MAX, 0, 2, 1).is_err());
    }

    #[test]
    fn rotations_and_flips_move_pixels_where_expected() {
        // 0 1 2      90: 3 0   180: 5 4 3   270: 2 5
        // 3 4 5          4 1        2 1 0        1 4
        //                5 2                     0 3
        let rot = |r| {
            let (w, h, px) = rotate(3, 2, &numbered(), r).unwrap();
            (w, h, ids(&px))
        };
        assert_eq!(rot(Rotation::Cw90), (2, 3, vec![3, 0, 4, 1, 5, 2]));
        assert_eq!(rot(Rotation::Cw180), (3, 2, vec![5, 4, 3, 2, 1, 0]));
        assert_eq!(rot(Rotation::Cw270), (2, 3, vec![2, 5, 1, 4, 0, 3]));
        assert_eq!(Rotation::from_degrees(-90), Some(Rotation::Cw270));
        assert_eq!(Rotation::from_degrees(45), None);
        let fl = |d| ids(&flip(3, 2, &numbered(), d).unwrap().2);
        assert_eq!(fl(Flip::Horizontal), vec![2, 1, 0, 5, 4, 3]);
        assert_eq!(fl(Flip::Vertical), vec![3, 4, 5, 0, 1, 2]);
    }

    #[test]
    fn resize_sizes_follow_the_fit() {
        let px = vec![255u8; 40 * 20 * 4];
        let size = |w, h, fit| {
            let (w, h, _) = resize(40, 20, &px, w, h, fit, Filter::Triangle).unwrap();
            (w, h)
        };
        assert_eq!(size(Some(10), None, Fit::Contain), (10, 5));
        assert_eq!(size(None, Some(10), Fit::Contain), (20, 10));
        assert_eq!(size(Some(10), Some(10), Fit::Contain), (10, 5));
        assert_eq!(size(Some(10), Some(10), Fit::Cover), (10, 10));
        assert_eq!(size(Some(10), Some(10), Fit::Fill), (10, 10));
        assert!(resize(40, 20, &px, None, None, Fit::Fill, Filter::Triangle).is_err());
        assert!(resize(40, 20, &px, Some(0), None, Fit::Fill, Filter::Triangle).is_err());
        assert!(resize(
            40,
            20,
            &px,
            Some(MAX_SIDE + 1),
            None,
            Fit::Fill,
            Filter::Triangle
        )
        .is_err()); // A result over MAX_PIXELS is refused before anything is allocated.
        let refused = resize(
            16,
            16,
            &[0; 16 * 16 * 4],
            Some(MAX_SIDE),
            None,
            Fit::Fill,
            Filter::Triangle,
        );
        assert!(matches!(refused, Err(GeometryError::Invalid(m)) if m.contains("over")));
    }

    #[test]
    fn resize_keeps_flat_colour_and_ignores_transparent_colour() {
        // Opaque red beside transparent green: no green leaks into red.
        let mut px = Vec::new();
        for x in 0..8 {
            px.extend_from_slice(if x < 4 {
                &[255, 0, 0, 255]
            } else {
                &[0, 255, 0, 0]
            });
        }
        for filter in [Filter::Lanczos3, Filter::Triangle] {
            let (_, _, out) = resize(8, 1, &px, Some(3), Some(1), Fit::Fill, filter).unwrap();
            for p in out.chunks_exact(4).filter(|p| p[3] > 0) {
                assert_eq!((p[0], p[1], p[2]), (255, 0, 0), "{filter:?}: {out:?}");
            }
        }
        let flat = [7u8, 77, 177, 255].repeat(30 * 30);
        let (_, _, out) = resize(
            30,
            30,
            &flat,
            Some(13),
            None,
            Fit::Contain,
            Filter::Lanczos3,
        )
        .unwrap();
        assert!(out.chunks_exact(4).all(|p| p == [7, 77, 177, 255]));
    }
}
