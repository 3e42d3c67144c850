//! Rec. 709 luma.

/// The Rec. 709 luma of one sRGB pixel, rounded to the nearest integer.
///
/// `Y = 0.2126 R + 0.7152 G + 0.0722 B`, computed exactly in integers as
/// `(2126 R + 7152 G + 722 B + 5000) / 10000`: the weights sum to 10000, so the
/// result is the real-valued formula rounded half up, never above 255, and the
/// same on every platform (no floating point involved).
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    let y = (2126 * u32::from(r) + 7152 * u32::from(g) + 722 * u32::from(b) + 5000) / 10_000;
    // The weights sum to 10000, so y <= 255.
    y as u8
}

/// Replaces red, green and blue of every RGBA pixel by its [`luma`], keeping
/// alpha. A trailing partial pixel (length not a multiple of 4) is left as is.
pub fn grayscale_in_place(rgba: &mut [u8]) {
    for px in rgba.chunks_exact_mut(4) {
        let y = luma(px[0], px[1], px[2]);
        px[0] = y;
        px[1] = y;
        px[2] = y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primaries_match_the_rec709_weights() {
        assert_eq!(luma(0, 0, 0), 0);
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(255, 0, 0), 54); // 54.213
        assert_eq!(luma(0, 255, 0), 182); // 182.376
        assert_eq!(luma(0, 0, 255), 18); // 18.411
    }

    #[test]
    fn rounds_half_up() {
        // 0.2126 * 10 + 0.7152 * 10 + 0.0722 * 10 = 10 exactly.
        assert_eq!(luma(10, 10, 10), 10);
        // 0.7152 * 3 + 0.2126 * 1 = 2.3582 -> 2; 0.7152 * 3 + 0.2126 * 2 + 0.0722 * 1 = 2.6430 -> 3.
        assert_eq!(luma(1, 3, 0), 2);
        assert_eq!(luma(2, 3, 1), 3);
    }

    #[test]
    fn agrees_with_the_real_valued_formula_everywhere() {
        for r in (0..=255u8).step_by(5) {
            for g in (0..=255u8).step_by(3) {
                for b in (0..=255u8).step_by(7) {
                    let exact =
                        0.2126 * f64::from(r) + 0.7152 * f64::from(g) + 0.0722 * f64::from(b);
                    assert!((f64::from(luma(r, g, b)) - exact).abs() <= 0.5 + 1e-9);
                }
            }
        }
    }

    #[test]
    fn keeps_alpha_and_ignores_a_partial_pixel() {
        let mut px = vec![255, 0, 0, 7, 0, 0, 255, 200, 9];
        grayscale_in_place(&mut px);
        assert_eq!(px, vec![54, 54, 54, 7, 18, 18, 18, 200, 9]);
    }
}
