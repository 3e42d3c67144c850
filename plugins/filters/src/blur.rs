//! Gaussian blur with correct alpha handling and clamped edges.

use std::fmt;

/// The largest `sigma` the blur accepts, in pixels.
pub const MAX_SIGMA: f64 = 50.0;

/// Why [`gaussian_blur`] refused its input.
#[derive(Debug, Clone, PartialEq)]
pub enum BlurError {
    /// `sigma` is not in `(0, MAX_SIGMA]` (or is not a finite number).
    InvalidSigma(f64),
    /// The buffer is not `width * height * 4` bytes long.
    BufferLength {
        /// `width * height * 4`.
        expected: usize,
        /// The length passed in.
        actual: usize,
    },
}

impl fmt::Display for BlurError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlurError::InvalidSigma(s) => {
                write!(f, "sigma must be in (0, {MAX_SIGMA}], got {s}")
            }
            BlurError::BufferLength { expected, actual } => write!(
                f,
                "pixel buffer holds {actual} bytes, expected width x height x 4 = {expected}"
            ),
        }
    }
}

impl std::error::Error for BlurError {}

/// `e^x` for `x <= 0`, from additions, multiplications and divisions only.
///
/// The platform `exp` differs between native targets and WebAssembly in the
/// last bit now and then; building the kernel from basic IEEE operations makes
/// the plugin's output identical to this code compiled natively.
fn exp_nonpositive(x: f64) -> f64 {
    debug_assert!(x <= 0.0);
    if x < -700.0 {
        return 0.0;
    }
    // e^x = (e^(x / 2^k))^(2^k) with |x / 2^k| <= 1/2, then a Taylor series.
    let mut k = 0;
    let mut y = x;
    while y < -0.5 {
        y /= 2.0;
        k += 1;
    }
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 1..=20 {
        term *= y / f64::from(n);
        sum += term;
    }
    for _ in 0..k {
        sum *= sum;
    }
    sum
}

/// The normalised 1-D Gaussian kernel for `sigma`: `2r + 1` weights that sum
/// to 1, with radius `r = ceil(3 sigma)` (the weights beyond 3 sigma hold less
/// than 0.3% of the total).
pub fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil().max(1.0) as i64;
    let weights: Vec<f64> = (-radius..=radius)
        .map(|i| {
            let d = i as f64;
            exp_nonpositive(-(d * d) / (2.0 * sigma * sigma))
        })
        .collect();
    let total: f64 = weights.iter().sum();
    weights.iter().map(|w| (w / total) as f32).collect()
}

/// Blurs an RGBA image with a Gaussian of standard deviation `sigma` pixels.
///
/// - Alpha is handled correctly: colours are premultiplied by alpha before
///   blurring and divided by the blurred alpha after, so transparent pixels do
///   not bleed their (invisible) colour into their neighbours.
/// - Edges are clamped: pixels beyond the border repeat the nearest edge pixel.
/// - The blur is separable (a horizontal then a vertical pass, in `f32`) and
///   written as whole-row multiply-adds, which compile to SIMD on WebAssembly
///   (`+simd128`) as well as natively.
pub fn gaussian_blur(
    width: u32,
    height: u32,
    rgba: &[u8],
    sigma: f64,
) -> Result<Vec<u8>, BlurError> {
    if !(sigma > 0.0 && sigma <= MAX_SIGMA) {
        return Err(BlurError::InvalidSigma(sigma));
    }
    let (w, h) = (width as usize, height as usize);
    let expected = w * h * 4;
    if rgba.len() != expected {
        return Err(BlurError::BufferLength {
            expected,
            actual: rgba.len(),
        });
    }
    if expected == 0 {
        return Ok(Vec::new());
    }
    let kernel = gaussian_kernel(sigma);
    let radius = kernel.len() / 2;
    let row_len = w * 4;

    // Premultiplied RGBA as f32, in the 0..=255 scale.
    let premultiplied: Vec<f32> = rgba
        .chunks_exact(4)
        .flat_map(|px| {
            let a = f32::from(px[3]);
            let k = a / 255.0;
            [
                f32::from(px[0]) * k,
                f32::from(px[1]) * k,
                f32::from(px[2]) * k,
                a,
            ]
        })
        .collect();

    // Horizontal pass: pad each row with its edge pixels, then accumulate the
    // shifted rows weight by weight.
    let mut horizontal = vec![0.0f32; expected];
    let mut padded = vec![0.0f32; (w + 2 * radius) * 4];
    for (src, dst) in premultiplied
        .chunks_exact(row_len)
        .zip(horizontal.chunks_exact_mut(row_len))
    {
        let first = [src[0], src[1], src[2], src[3]];
        let last = [
            src[row_len - 4],
            src[row_len - 3],
            src[row_len - 2],
            src[row_len - 1],
        ];
        for i in 0..radius {
            padded[i * 4..i * 4 + 4].copy_from_slice(&first);
            let j = radius + w + i;
            padded[j * 4..j * 4 + 4].copy_from_slice(&last);
        }
        padded[radius * 4..(radius + w) * 4].copy_from_slice(src);
        for (k, &weight) in kernel.iter().enumerate() {
            axpy(dst, weight, &padded[k * 4..k * 4 + row_len]);
        }
    }

    // Vertical pass: each output row is the weighted sum of clamped rows.
    let mut out = Vec::with_capacity(expected);
    let mut acc = vec![0.0f32; row_len];
    for y in 0..h {
        acc.fill(0.0);
        for (k, &weight) in kernel.iter().enumerate() {
            let sy = (y + k).saturating_sub(radius).min(h - 1);
            axpy(
                &mut acc,
                weight,
                &horizontal[sy * row_len..(sy + 1) * row_len],
            );
        }
        for px in acc.chunks_exact(4) {
            let a = px[3];
            if a <= 0.0 {
                out.extend_from_slice(&[0, 0, 0, 0]);
                continue;
            }
            let k = 255.0 / a;
            out.extend_from_slice(&[
                to_u8(px[0] * k),
                to_u8(px[1] * k),
                to_u8(px[2] * k),
                to_u8(a),
            ]);
        }
    }
    Ok(out)
}

/// `dst += weight * src`, element-wise.
#[inline]
fn axpy(dst: &mut [f32], weight: f32, src: &[f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += weight * s;
    }
}

/// Rounds to the nearest integer and clamps to `0..=255`.
#[inline]
fn to_u8(v: f32) -> u8 {
    (v + 0.5).clamp(0.0, 255.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_the_platform_closely() {
        for i in 0..2000 {
            let x = -(i as f64) / 20.0;
            let ours = exp_nonpositive(x);
            let theirs = x.exp();
            assert!(
                (ours - theirs).abs() <= 1e-12 * theirs.max(1e-300) + 1e-300,
                "x={x}: {ours} vs {theirs}"
            );
        }
    }

    #[test]
    fn kernel_is_normalised_and_symmetric() {
        for sigma in [0.1, 0.5, 2.0, 7.3, 50.0] {
            let k = gaussian_kernel(sigma);
            assert_eq!(k.len() % 2, 1);
            let sum: f32 = k.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4, "sigma {sigma}: sum {sum}");
            for i in 0..k.len() / 2 {
                assert_eq!(k[i], k[k.len() - 1 - i]);
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat() {
        let img: Vec<u8> = [10u8, 200, 30, 255].repeat(7 * 5);
        assert_eq!(gaussian_blur(7, 5, &img, 3.0).unwrap(), img);
    }

    #[test]
    fn blurs_an_impulse_symmetrically() {
        let (w, h) = (9u32, 9u32);
        let mut img = [0u8, 0, 0, 255].repeat(81);
        img[(4 * 9 + 4) * 4..(4 * 9 + 4) * 4 + 3].copy_from_slice(&[255, 255, 255]);
        let out = gaussian_blur(w, h, &img, 1.0).unwrap();
        let at = |x: usize, y: usize| out[(y * 9 + x) * 4];
        assert!(at(4, 4) < 255 && at(4, 4) > at(3, 4));
        assert_eq!(at(3, 4), at(5, 4));
        assert_eq!(at(4, 3), at(4, 5));
        assert_eq!(at(3, 4), at(4, 3));
        assert_eq!(at(0, 0), 0);
    }

    #[test]
    fn transparent_pixels_do_not_bleed_colour() {
        // Left half opaque red, right half fully transparent *green*.
        let (w, h) = (8u32, 2u32);
        let mut img = Vec::new();
        for _ in 0..h {
            for x in 0..w {
                img.extend_from_slice(if x < 4 {
                    &[255, 0, 0, 255]
                } else {
                    &[0, 255, 0, 0]
                });
            }
        }
        let out = gaussian_blur(w, h, &img, 1.5).unwrap();
        for px in out.chunks_exact(4) {
            if px[3] > 0 {
                assert_eq!(px[1], 0, "green leaked into {px:?}");
                assert!(px[0] >= 254, "red lost in {px:?}");
            }
        }
        // Alpha itself is blurred across the boundary.
        assert!(out[3 * 4 + 3] < 255 && out[4 * 4 + 3] > 0);
    }

    #[test]
    fn edges_are_clamped() {
        // A 1-pixel-wide column: clamping makes every pixel its own neighbour.
        let img = [50u8, 60, 70, 255].repeat(3);
        assert_eq!(gaussian_blur(1, 3, &img, 5.0).unwrap(), img);
    }

    #[test]
    fn rejects_bad_sigma_and_bad_buffers() {
        let img = vec![0u8; 16];
        for s in [0.0, -1.0, 50.0001, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                gaussian_blur(2, 2, &img, s),
                Err(BlurError::InvalidSigma(_))
            ));
        }
        assert!(gaussian_blur(2, 2, &img, 50.0).is_ok());
        assert_eq!(
            gaussian_blur(3, 2, &img, 1.0),
            Err(BlurError::BufferLength {
                expected: 24,
                actual: 16
            })
        );
    }
}
