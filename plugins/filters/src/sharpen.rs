//! Unsharp masking: each colour channel pushed away from its Gaussian blur.

use crate::blur::{gaussian_blur, BlurError};

/// The largest `amount` [`sharpen`] accepts.
pub const MAX_AMOUNT: f64 = 10.0;

/// `in + amount * (in - blur(in, sigma))` on each colour channel, rounded
/// and clamped; alpha is kept. The blur is [`gaussian_blur`] (alpha-correct,
/// edges clamped), so a flat area stays flat and transparent pixels lend no
/// colour. `amount` is 0 to [`MAX_AMOUNT`].
pub fn sharpen(
    width: u32,
    height: u32,
    rgba: &[u8],
    sigma: f64,
    amount: f64,
) -> Result<Vec<u8>, BlurError> {
    if !(0.0..=MAX_AMOUNT).contains(&amount) {
        return Err(BlurError::InvalidAmount {
            amount,
            max: MAX_AMOUNT,
        });
    }
    let blurred = gaussian_blur(width, height, rgba, sigma)?;
    let amount = amount as f32;
    let mut out = rgba.to_vec();
    for (px, soft) in out.chunks_exact_mut(4).zip(blurred.chunks_exact(4)) {
        for c in 0..3 {
            let v = f32::from(px[c]);
            let sharp = v + amount * (v - f32::from(soft[c]));
            px[c] = sharp.round().clamp(0.0, 255.0) as u8;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_get_steeper_and_flat_areas_stay() {
        // A step from 100 to 150 grey: the dark side darkens, the light side
        // lightens next to the edge; far away nothing changes.
        let mut px = Vec::new();
        for x in 0..20 {
            let v = if x < 10 { 100 } else { 150 };
            px.extend_from_slice(&[v, v, v, 255]);
        }
        let out = sharpen(20, 1, &px, 1.0, 1.0).unwrap();
        assert!(out[9 * 4] < 100 && out[10 * 4] > 150, "{out:?}");
        assert_eq!(&out[..4], &[100, 100, 100, 255]);
        assert_eq!(&out[19 * 4..], &[150, 150, 150, 255]);
        assert_eq!(sharpen(20, 1, &px, 1.0, 0.0).unwrap(), px);
        assert!(sharpen(20, 1, &px, 1.0, 11.0).is_err());
    }
}
