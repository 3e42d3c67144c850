//! Decoding and encoding images in the host.
//!
//! Plugins only ever see 8-bit RGBA pixels; the host turns the client's file
//! into pixels and the plugin's pixels back into a file. Input may be PNG,
//! JPEG, WebP or GIF (its first frame). The output uses the input's format
//! unless another is asked for.
//!
//! Dimensions are read from the file's header and checked against
//! [`ImageLimits`] **before** any pixel is decoded, so a tiny file claiming to
//! be 100000 x 100000 pixels costs nothing; every frame of an animated
//! file is checked against that header's canvas too ([`crate::frames`]),
//! and what decoding will hold is known beforehand ([`decode_cost`]) and
//! imposed on the decoder.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// The decoded image every codec function takes and returns.
pub use image::RgbaImage;
use image::{DynamicImage, ImageReader};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Limits on image dimensions, applied to inputs (from their header) and to
/// plugin outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageLimits {
    /// The largest width or height, in pixels.
    pub max_side: u32,
    /// The largest `width * height`.
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    /// 16384 pixels a side and 64 megapixels.
    fn default() -> Self {
        ImageLimits {
            max_side: 16_384,
            max_pixels: 64 * 1024 * 1024,
        }
    }
}

impl ImageLimits {
    /// Checks `width x height` against the limits.
    pub fn check(&self, width: u32, height: u32) -> Result<(), CodecError> {
        if width == 0 || height == 0 {
            return Err(CodecError::Corrupt(format!(
                "image has no pixels ({width}x{height})"
            )));
        }
        if width > self.max_side
            || height > self.max_side
            || u64::from(width) * u64::from(height) > self.max_pixels
        {
            return Err(CodecError::TooLarge {
                width,
                height,
                limits: *self,
            });
        }
        Ok(())
    }
}

/// An image file format the host reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// PNG (lossless, keeps alpha).
    Png,
    /// JPEG (lossy, quality 90; alpha is dropped).
    Jpeg,
    /// WebP (keeps alpha; lossless, or lossy with a `quality`).
    Webp,
    /// GIF (first frame only on input; written as one frame with a palette).
    Gif,
}

impl ImageFormat {
    /// Every supported format.
    pub const ALL: [ImageFormat; 4] = [
        ImageFormat::Png,
        ImageFormat::Jpeg,
        ImageFormat::Webp,
        ImageFormat::Gif,
    ];

    /// The format's name as used by the `format` option (`png`, `jpeg`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Webp => "webp",
            ImageFormat::Gif => "gif",
        }
    }

    /// The MIME type, for `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
            ImageFormat::Gif => "image/gif",
        }
    }

    /// How the format stores its frames.
    pub fn container(self) -> crate::frames::Container {
        use crate::frames::Container;
        match self {
            ImageFormat::Png => Container::Png,
            ImageFormat::Jpeg => Container::Still,
            ImageFormat::Webp => Container::Webp,
            ImageFormat::Gif => Container::Gif,
        }
    }

    /// The usual file extension.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            other => other.name(),
        }
    }

    /// Parses a format name, MIME type or extension (`png`, `image/jpeg`,
    /// `jpg`, ...), ignoring case.
    pub fn parse(text: &str) -> Option<ImageFormat> {
        let t = text.trim().to_ascii_lowercase();
        let t = t.strip_prefix("image/").unwrap_or(&t);
        match t {
            "png" => Some(ImageFormat::Png),
            "jpeg" | "jpg" => Some(ImageFormat::Jpeg),
            "webp" => Some(ImageFormat::Webp),
            "gif" => Some(ImageFormat::Gif),
            _ => None,
        }
    }

    fn from_image(format: image::ImageFormat) -> Option<ImageFormat> {
        match format {
            image::ImageFormat::Png => Some(ImageFormat::Png),
            image::ImageFormat::Jpeg => Some(ImageFormat::Jpeg),
            image::ImageFormat::WebP => Some(ImageFormat::Webp),
            image::ImageFormat::Gif => Some(ImageFormat::Gif),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an image could not be read or written.
#[derive(Debug, Error)]
pub enum CodecError {
    /// Not a PNG, JPEG, WebP or GIF file.
    #[error("unsupported image format: {0} (supported: PNG, JPEG, WebP, GIF)")]
    Unsupported(String),
    /// The file claims a supported format but cannot be decoded.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// The dimensions exceed the limits.
    #[error(
        "image is {width}x{height} pixels, over the limit of {} pixels a side and {} pixels in all",
        limits.max_side,
        limits.max_pixels
    )]
    TooLarge {
        /// The image's width.
        width: u32,
        /// The image's height.
        height: u32,
        /// The limits it broke.
        limits: ImageLimits,
    },
    /// Encoding the result failed.
    #[error("could not encode the result as {format}: {message}")]
    Encode {
        /// The output format.
        format: ImageFormat,
        /// The encoder's message.
        message: String,
    },
}

impl From<CodecError> for crate::code::Failure {
    fn from(e: CodecError) -> crate::code::Failure {
        crate::code::Failure::new(e.code(), e.to_string())
    }
}

impl From<crate::frames::FrameError> for CodecError {
    fn from(e: crate::frames::FrameError) -> CodecError {
        CodecError::Corrupt(e.0)
    }
}

impl CodecError {
    /// The error's stable code.
    pub fn code(&self) -> crate::code::ErrorCode {
        use crate::code::ErrorCode;
        match self {
            CodecError::Unsupported(_) => ErrorCode::UnsupportedFormat,
            CodecError::Corrupt(_) => ErrorCode::CorruptImage,
            CodecError::TooLarge { .. } => ErrorCode::ImageTooLarge,
            CodecError::Encode { .. } => ErrorCode::EncodeFailed,
        }
    }
}

/// What the header of an image file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The file's format.
    pub format: ImageFormat,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// A reader over an in-memory file.
type MemReader<'a> = ImageReader<Cursor<&'a [u8]>>;

fn reader(bytes: &[u8]) -> Result<(MemReader<'_>, ImageFormat), CodecError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| CodecError::Corrupt(e.to_string()))?;
    let format = match reader.format() {
        Some(f) => {
            ImageFormat::from_image(f).ok_or_else(|| CodecError::Unsupported(format!("{f:?}")))?
        }
        None => {
            return Err(CodecError::Unsupported(
                "unrecognised file signature".into(),
            ))
        }
    };
    // Before any decoder reads the header: what it would inflate there.
    crate::frames::header_chunks(bytes, format.container())?;
    Ok((reader, format))
}

/// Reads the format and dimensions from the header and checks them against
/// `limits`, without decoding pixels.
pub fn probe(bytes: &[u8], limits: &ImageLimits) -> Result<Probe, CodecError> {
    let (reader, format) = reader(bytes)?;
    let (width, height) =
        guard(|| reader.into_dimensions())?.map_err(|e| CodecError::Corrupt(e.to_string()))?;
    limits.check(width, height)?;
    Ok(Probe {
        format,
        width,
        height,
    })
}

/// What decoding an image costs in memory, read from its structure
/// without decoding a pixel ([`decode_cost`]). Callers reserve it from
/// their memory budget before decoding, and the decoder is held to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeCost {
    /// The header's format and canvas.
    pub probe: Probe,
    /// The file's frames, each checked against the canvas
    /// ([`crate::frames`]); only the first is decoded.
    pub frames: crate::frames::Frames,
    /// The most bytes [`validate`] holds at once: the decoded canvas in the
    /// file's own pixel type (16-bit RGBA is 8 bytes a pixel), and the
    /// decoder's working buffers (a GIF frame composed onto the canvas, an
    /// animated WebP's canvas and frame, a progressive JPEG's coefficients,
    /// a lossy WebP's YUV planes).
    pub validate_bytes: u64,
    /// The most bytes [`decode_with`] holds at once: that, plus the 8-bit
    /// RGBA copy and the copy an EXIF rotation makes.
    pub decode_bytes: u64,
}

/// Images whose decoding holds at most this much ([`DecodeCost`]), or
/// whose pixels are at most this much to encode, are cheap enough (well
/// under a millisecond) for callers to decode and encode on the thread they
/// are on, rather than hand them to a blocking thread.
pub const INLINE_BYTES: u64 = 1024 * 1024;

/// Room for a decoder's fixed state (tables, a zlib window, row buffers).
const DECODER_SLACK: u64 = 256 * 1024;

/// The memory decoding `bytes` takes ([`DecodeCost`]), from its header and
/// the walk of its frames: the header is checked against `limits`, and
/// every frame against the canvas (a frame outside it is refused as
/// corrupt), before anything is allocated.
pub fn decode_cost(bytes: &[u8], limits: &ImageLimits) -> Result<DecodeCost, CodecError> {
    use image::ImageDecoder as _;
    let probe = probe(bytes, limits)?;
    let frames = crate::frames::walk(bytes, probe.format.container(), (probe.width, probe.height))?;
    let (reader, _) = reader(bytes)?;
    let decoder =
        guard(|| reader.into_decoder())?.map_err(|e| CodecError::Corrupt(e.to_string()))?;
    let native = decoder.total_bytes();
    let canvas = u64::from(probe.width) * u64::from(probe.height);
    let first = u64::from(frames.first.0) * u64::from(frames.first.1);
    let working = match probe.format {
        // Two rows of filtering.
        ImageFormat::Png => native / u64::from(probe.height.max(1)) * 2,
        // A progressive file's coefficients: an i16 for every sample.
        ImageFormat::Jpeg => native * 2,
        // A frame that does not span the screen is decoded apart, then
        // composed onto it.
        ImageFormat::Gif if frames.composed => first * 4,
        ImageFormat::Gif => 0,
        // An animation's canvas (RGBA), and the frame: lossless decodes to
        // RGBA (plus an RGBA copy without alpha), lossy to YUV planes and
        // then RGB(A).
        ImageFormat::Webp => {
            let composed = if frames.composed { canvas * 4 } else { 0 };
            let frame = if frames.lossless {
                first * 8
            } else {
                first * 6
            };
            composed + frame
        }
    };
    let validate_bytes = native + working + DECODER_SLACK;
    Ok(DecodeCost {
        probe,
        frames,
        validate_bytes,
        decode_bytes: validate_bytes + canvas * 8,
    })
}

/// Decodes the whole image, to check that it is not corrupt, and keeps
/// nothing: it holds at most [`DecodeCost::validate_bytes`] while it runs.
pub fn validate(bytes: &[u8], limits: &ImageLimits) -> Result<Probe, CodecError> {
    let (probe, decoded, _) = decode_native(bytes, limits)?;
    drop(decoded);
    Ok(probe)
}

/// Decodes an image to 8-bit RGBA after checking its header against `limits`,
/// turned upright by its EXIF orientation (JPEG, WebP, PNG `eXIf`), as
/// [`decode_with`] with `auto_orient`.
pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<(RgbaImage, ImageFormat), CodecError> {
    decode_with(bytes, limits, true)
}

/// Decodes an image to 8-bit RGBA after checking its header against `limits`.
/// Higher bit depths are scaled to 8 bits; for GIF, the first frame is used.
/// With `auto_orient`, the EXIF orientation is applied (a phone photo stored
/// sideways comes out upright; a quarter turn swaps width and height);
/// without, the pixels are as stored. Colour profiles are not applied: the
/// pixel values are taken as sRGB and the ICC profile is not carried to the
/// result.
pub fn decode_with(
    bytes: &[u8],
    limits: &ImageLimits,
    auto_orient: bool,
) -> Result<(RgbaImage, ImageFormat), CodecError> {
    let (probe, decoded, orientation) = decode_native(bytes, limits)?;
    let mut decoded = decoded;
    if auto_orient {
        decoded.apply_orientation(orientation);
    }
    Ok((decoded.into_rgba8(), probe.format))
}

/// Decodes an image in its own pixel type, after checking its header
/// against `limits`, and checks that the data agree with the header.
/// Returns its EXIF orientation too (`NoTransforms` when it has none or an
/// unreadable one).
fn decode_native(
    bytes: &[u8],
    limits: &ImageLimits,
) -> Result<(Probe, DynamicImage, image::metadata::Orientation), CodecError> {
    use image::ImageDecoder as _;
    let cost = decode_cost(bytes, limits)?;
    let probe = cost.probe;
    let (reader, _) = reader(bytes)?;
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    // No buffer the decoder allocates may be larger than what its caller
    // reserved for the whole decode.
    decoder_limits.max_alloc = Some(cost.validate_bytes);
    let decoded = guard(|| -> image::ImageResult<_> {
        let mut decoder = reader.into_decoder()?;
        decoder.set_limits(decoder_limits)?;
        let orientation = decoder
            .orientation()
            .unwrap_or(image::metadata::Orientation::NoTransforms);
        Ok((DynamicImage::from_decoder(decoder)?, orientation))
    })?;
    let (decoded, orientation) = decoded.map_err(|e| CodecError::Corrupt(e.to_string()))?;
    if (decoded.width(), decoded.height()) != (probe.width, probe.height) {
        return Err(CodecError::Corrupt(format!(
            "header says {}x{} but the data decodes to {}x{}",
            probe.width,
            probe.height,
            decoded.width(),
            decoded.height()
        )));
    }
    Ok((probe, decoded, orientation))
}

/// The GIF palette quantizer's speed (1 slowest to 30 fastest): how sparsely
/// NeuQuant samples the image. At 10, a 768x512 photo encodes 3 to 5 times
/// faster than at the encoder's default of 1 (about 0.1 s against 0.4 to
/// 0.5 s; see docs/BENCHMARKS.md), with a palette learnt from a tenth of
/// the pixels.
pub const GIF_SPEED: i32 = 10;

/// How hard PNG output is compressed (`PNG_COMPRESSION`), defined with the
/// other settings.
pub use imgflow_settings::PngCompression;

/// The PNG colour type that holds these RGBA pixels exactly, with the
/// fewest channels: grey when every pixel has `r == g == b`, without alpha
/// when every alpha is 255. (A grayscale filter's result is written as grey.)
pub fn smallest_png_colour(image: &RgbaImage) -> image::ExtendedColorType {
    let (mut grey, mut opaque) = (true, true);
    for px in image.as_raw().chunks_exact(4) {
        grey &= px[0] == px[1] && px[1] == px[2];
        opaque &= px[3] == 255;
        if !grey && !opaque {
            break;
        }
    }
    match (grey, opaque) {
        (true, true) => image::ExtendedColorType::L8,
        (true, false) => image::ExtendedColorType::La8,
        (false, true) => image::ExtendedColorType::Rgb8,
        (false, false) => image::ExtendedColorType::Rgba8,
    }
}

/// Writes `image` as PNG in its [smallest colour type](smallest_png_colour).
fn encode_png(
    image: &RgbaImage,
    compression: PngCompression,
    out: &mut Cursor<Vec<u8>>,
) -> image::ImageResult<()> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    use image::ImageEncoder as _;
    let level = match compression {
        PngCompression::Fast => CompressionType::Fast,
        PngCompression::Default => CompressionType::Default,
        PngCompression::Best => CompressionType::Best,
    };
    let encoder = PngEncoder::new_with_quality(out, level, FilterType::Adaptive);
    let (w, h) = image.dimensions();
    let colour = smallest_png_colour(image);
    let channels = match colour {
        image::ExtendedColorType::L8 => 1,
        image::ExtendedColorType::La8 => 2,
        image::ExtendedColorType::Rgb8 => 3,
        _ => 4,
    };
    if channels == 4 {
        return encoder.write_image(image.as_raw(), w, h, colour);
    }
    let keep: &[usize] = match channels {
        1 => &[0],
        2 => &[0, 3],
        _ => &[0, 1, 2],
    };
    let packed: Vec<u8> = image
        .as_raw()
        .chunks_exact(4)
        .flat_map(|px| keep.iter().map(move |&c| px[c]))
        .collect();
    encoder.write_image(&packed, w, h, colour)
}

/// JPEG quality when a job does not set `quality`.
pub const DEFAULT_JPEG_QUALITY: u8 = 90;

/// Encodes RGBA pixels as `format`, PNG at [`PngCompression::Fast`], JPEG
/// at [`DEFAULT_JPEG_QUALITY`]. JPEG drops alpha; the others keep it.
pub fn encode(image: &RgbaImage, format: ImageFormat) -> Result<Vec<u8>, CodecError> {
    encode_with(image, format, PngCompression::default(), None)
}

/// Encodes RGBA pixels as `format`: PNG at `png` compression in its
/// smallest colour type; JPEG at `quality` (1 to 100, default
/// [`DEFAULT_JPEG_QUALITY`]), without alpha; WebP lossless, or lossy at
/// `quality` when one is given (libwebp), with alpha either way; GIF with
/// alpha (a 256-colour palette; `quality` does not apply).
pub fn encode_with(
    image: &RgbaImage,
    format: ImageFormat,
    png: PngCompression,
    quality: Option<u8>,
) -> Result<Vec<u8>, CodecError> {
    let mut out = Cursor::new(Vec::new());
    let result = match format {
        ImageFormat::Png => encode_png(image, png, &mut out),
        ImageFormat::Webp => match quality {
            None => image.write_to(&mut out, image::ImageFormat::WebP),
            Some(q) => {
                return webp::Encoder::from_rgba(image.as_raw(), image.width(), image.height())
                    .encode_simple(false, f32::from(q.clamp(1, 100)))
                    .map(|encoded| encoded.to_vec())
                    .map_err(|e| CodecError::Encode {
                        format,
                        message: format!("lossy WebP: {e:?}"),
                    })
            }
        },
        // The GIF encoder's default (speed 1) learns its palette from every
        // pixel; speed 10 from a tenth of them (see GIF_SPEED).
        ImageFormat::Gif => image::codecs::gif::GifEncoder::new_with_speed(&mut out, GIF_SPEED)
            .encode(
                image.as_raw(),
                image.width(),
                image.height(),
                image::ExtendedColorType::Rgba8,
            ),
        ImageFormat::Jpeg => {
            let rgb = DynamicImage::ImageRgba8(image.clone()).into_rgb8();
            let quality = quality.unwrap_or(DEFAULT_JPEG_QUALITY).clamp(1, 100);
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
            rgb.write_with_encoder(encoder)
        }
    };
    result.map_err(|e| CodecError::Encode {
        format,
        message: e.to_string(),
    })?;
    Ok(out.into_inner())
}

/// Runs a decoder step, turning a panic inside a codec (a bug there, but one
/// an input could reach) into a [`CodecError::Corrupt`] instead of a crash.
fn guard<T>(f: impl FnOnce() -> T) -> Result<T, CodecError> {
    catch_unwind(AssertUnwindSafe(f))
        .map_err(|_| CodecError::Corrupt("the decoder rejected the data".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RgbaImage {
        RgbaImage::from_fn(5, 3, |x, y| {
            image::Rgba([x as u8 * 40, y as u8 * 80, 7, 200])
        })
    }

    #[test]
    fn webp_with_a_quality_is_lossy_and_keeps_alpha() {
        let img = RgbaImage::from_fn(64, 48, |x, y| {
            image::Rgba([
                (x * 4) as u8,
                (y * 5) as u8,
                ((x * y) % 256) as u8,
                if x < 32 { 255 } else { 128 },
            ])
        });
        let small =
            encode_with(&img, ImageFormat::Webp, PngCompression::default(), Some(10)).unwrap();
        let large =
            encode_with(&img, ImageFormat::Webp, PngCompression::default(), Some(95)).unwrap();
        assert!(
            small.len() < large.len(),
            "{} vs {}",
            small.len(),
            large.len()
        );
        let (back, detected) = decode(&large, &ImageLimits::default()).unwrap();
        assert_eq!(detected, ImageFormat::Webp);
        assert_eq!(back.dimensions(), (64, 48));
        assert!(back.get_pixel(50, 10)[3].abs_diff(128) <= 2, "alpha kept");
        let lossless =
            encode_with(&img, ImageFormat::Webp, PngCompression::default(), None).unwrap();
        assert_eq!(decode(&lossless, &ImageLimits::default()).unwrap().0, img);
    }

    #[test]
    fn round_trips_every_format() {
        let img = sample();
        for format in ImageFormat::ALL {
            let bytes = encode(&img, format).unwrap();
            let (back, detected) = decode(&bytes, &ImageLimits::default()).unwrap();
            assert_eq!(detected, format);
            assert_eq!(back.dimensions(), (5, 3));
            if matches!(format, ImageFormat::Png | ImageFormat::Webp) {
                assert_eq!(back, img, "{format} is lossless");
            }
        }
    }

    #[test]
    fn png_uses_the_smallest_colour_type_and_stays_lossless() {
        let grey = RgbaImage::from_fn(4, 2, |x, _| image::Rgba([x as u8, x as u8, x as u8, 255]));
        let grey_alpha = RgbaImage::from_fn(4, 2, |x, _| image::Rgba([9, 9, 9, x as u8]));
        let rgb = RgbaImage::from_fn(4, 2, |x, _| image::Rgba([x as u8, 1, 2, 255]));
        for (img, colour) in [
            (grey, image::ColorType::L8),
            (grey_alpha, image::ColorType::La8),
            (rgb, image::ColorType::Rgb8),
            (sample(), image::ColorType::Rgba8),
        ] {
            for level in [
                PngCompression::Fast,
                PngCompression::Default,
                PngCompression::Best,
            ] {
                let bytes = encode_with(&img, ImageFormat::Png, level, None).unwrap();
                let written = image::load_from_memory(&bytes).unwrap();
                assert_eq!(written.color(), colour);
                assert_eq!(written.to_rgba8(), img, "{colour:?} {level:?}");
            }
        }
    }

    #[test]
    fn checks_dimensions_before_decoding() {
        let bytes = encode(&sample(), ImageFormat::Png).unwrap();
        let tight = ImageLimits {
            max_side: 4,
            max_pixels: 100,
        };
        let err = decode(&bytes, &tight).unwrap_err();
        assert_eq!(err.code().as_str(), "image_too_large", "{err}");
        let few = ImageLimits {
            max_side: 100,
            max_pixels: 14,
        };
        assert_eq!(
            probe(&bytes, &few).unwrap_err().code().as_str(),
            "image_too_large"
        );
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        assert_eq!(
            decode(b"hello", &ImageLimits::default())
                .unwrap_err()
                .code(),
            crate::code::ErrorCode::UnsupportedFormat
        );
        let bytes = encode(&sample(), ImageFormat::Png).unwrap();
        let err = decode(&bytes[..bytes.len() / 2], &ImageLimits::default()).unwrap_err();
        assert_eq!(err.code().as_str(), "corrupt_image", "{err}");
    }

    #[test]
    fn parses_format_names() {
        assert_eq!(ImageFormat::parse("JPG"), Some(ImageFormat::Jpeg));
        assert_eq!(ImageFormat::parse("image/webp"), Some(ImageFormat::Webp));
        assert_eq!(ImageFormat::parse("tiff"), None);
    }
}
