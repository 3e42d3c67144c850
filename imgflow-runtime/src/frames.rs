//! An image file's frames, read from its structure without decoding a
//! pixel: how many there are, and that each lies inside the canvas its
//! header declares.
//!
//! A header's dimensions are what the size limits and the decoding budget
//! are checked against, but GIF, animated PNG and WebP files hold frames
//! (and WebP bitstreams) with dimensions of their own, and a decoder
//! allocates for those: a 146 KB GIF whose screen says 1x1 can hold a first
//! frame of 14000x14000, 784 MB decoded. So every frame's rectangle (and
//! every WebP bitstream's own dimensions) is checked against the canvas
//! here, before anything is allocated: a frame that does not fit is
//! refused as corrupt. Only the first frame is decoded
//! ([`crate::codec`]); the others are checked and counted.
//!
//! The walk is linear in the file's size and allocates nothing.

/// What the walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frames {
    /// How many frames the file holds (1 for a still image).
    pub count: u32,
    /// The first frame's width and height (the canvas's, unless the
    /// format lets a frame be smaller).
    pub first: (u32, u32),
    /// Whether the decoder composes the first frame on a canvas of its own
    /// (a GIF frame that does not span the screen's width, an animated
    /// WebP): it then holds the frame and the canvas at once.
    pub composed: bool,
    /// For WebP: whether the first frame is lossless (VP8L).
    pub lossless: bool,
}

impl Frames {
    fn still(canvas: (u32, u32)) -> Frames {
        Frames {
            count: 1,
            first: canvas,
            composed: false,
            lossless: false,
        }
    }
}

/// How an image's frames are stored: the containers that can hold
/// several, and the still ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    /// GIF: frames placed on the logical screen.
    Gif,
    /// PNG, animated (APNG) or not.
    Png,
    /// WebP, animated or not.
    Webp,
    /// One image, its canvas (JPEG).
    Still,
}

/// Why a file's frames cannot be accepted: one lies outside its canvas,
/// or the container cannot be read (the codec reports it as a corrupt
/// image).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FrameError(pub String);

/// Walks `bytes` (already known to be in `container`, with a `canvas` from
/// its header) and checks every frame against the canvas.
pub fn walk(bytes: &[u8], container: Container, canvas: (u32, u32)) -> Result<Frames, FrameError> {
    match container {
        Container::Gif => gif(bytes, canvas),
        Container::Png => png(bytes, canvas),
        Container::Webp => webp(bytes, canvas),
        Container::Still => Ok(Frames::still(canvas)),
    }
}

fn corrupt(message: String) -> FrameError {
    FrameError(message)
}

/// Checks frame `n` (from 1), `w`x`h` at (`x`, `y`), against the canvas.
fn inside(
    n: u32,
    (x, y, w, h): (u32, u32, u32, u32),
    canvas: (u32, u32),
) -> Result<(), FrameError> {
    let fits = w > 0
        && h > 0
        && u64::from(x) + u64::from(w) <= u64::from(canvas.0)
        && u64::from(y) + u64::from(h) <= u64::from(canvas.1);
    if fits {
        Ok(())
    } else {
        Err(corrupt(format!(
            "frame {n} is {w}x{h} at ({x}, {y}), outside the {}x{} canvas the header declares",
            canvas.0, canvas.1
        )))
    }
}

/// A cursor over the file that fails as "truncated" rather than panicking.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16le(&mut self) -> Option<u32> {
        self.take(2)
            .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])))
    }
}

/// GIF: the logical screen is the canvas; each image descriptor is a frame
/// with its own rectangle.
fn gif(bytes: &[u8], canvas: (u32, u32)) -> Result<Frames, FrameError> {
    let truncated = || corrupt("the GIF ends inside a block".into());
    let mut c = Cursor { bytes, at: 0 };
    c.take(6).ok_or_else(truncated)?;
    c.take(4).ok_or_else(truncated)?;
    let packed = c.byte().ok_or_else(truncated)?;
    c.take(2).ok_or_else(truncated)?;
    if packed & 0x80 != 0 {
        c.take(3 << ((packed & 7) + 1)).ok_or_else(truncated)?;
    }
    let mut frames = Frames::still(canvas);
    let mut count = 0u32;
    loop {
        match c.byte() {
            // The trailer, or a file cut after its last frame (decoders
            // accept that).
            Some(0x3b) | None => break,
            Some(0x21) => {
                c.byte().ok_or_else(truncated)?;
                skip_sub_blocks(&mut c).ok_or_else(truncated)?;
            }
            Some(0x2c) => {
                let x = c.u16le().ok_or_else(truncated)?;
                let y = c.u16le().ok_or_else(truncated)?;
                let w = c.u16le().ok_or_else(truncated)?;
                let h = c.u16le().ok_or_else(truncated)?;
                let packed = c.byte().ok_or_else(truncated)?;
                count += 1;
                inside(count, (x, y, w, h), canvas)?;
                if count == 1 {
                    frames.first = (w, h);
                    // The decoder reads straight into the canvas only when
                    // the frame spans its whole width from the left edge.
                    frames.composed = !(x == 0 && w == canvas.0);
                }
                if packed & 0x80 != 0 {
                    c.take(3 << ((packed & 7) + 1)).ok_or_else(truncated)?;
                }
                c.byte().ok_or_else(truncated)?;
                skip_sub_blocks(&mut c).ok_or_else(truncated)?;
            }
            Some(other) => {
                return Err(corrupt(format!(
                    "the GIF has an unknown block 0x{other:02x} after frame {count}"
                )))
            }
        }
    }
    if count == 0 {
        return Err(corrupt("the GIF has no frame".into()));
    }
    frames.count = count;
    Ok(frames)
}

fn skip_sub_blocks(c: &mut Cursor<'_>) -> Option<()> {
    loop {
        let n = c.byte()?;
        if n == 0 {
            return Some(());
        }
        c.take(usize::from(n))?;
    }
}

/// PNG: IHDR is the canvas; each `fcTL` of an animated PNG is a frame with
/// its own rectangle (the first one, when it describes the IDAT image,
/// must be the whole canvas).
fn png(bytes: &[u8], canvas: (u32, u32)) -> Result<Frames, FrameError> {
    let mut at = 8usize;
    let mut frames = Frames::still(canvas);
    let mut fctl = 0u32;
    while let Some(header) = bytes.get(at..at + 8) {
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = &header[4..8];
        let data = at + 8;
        if kind == b"fcTL" {
            let d = bytes
                .get(data..data + 20)
                .ok_or_else(|| corrupt("the PNG ends inside an fcTL chunk".into()))?;
            let be = |i: usize| u32::from_be_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]]);
            let (w, h, x, y) = (be(4), be(8), be(12), be(16));
            fctl += 1;
            inside(fctl, (x, y, w, h), canvas)?;
        }
        if kind == b"IEND" {
            break;
        }
        at = match data.checked_add(length).and_then(|end| end.checked_add(4)) {
            Some(next) => next,
            None => break,
        };
    }
    frames.count = fctl.max(1);
    Ok(frames)
}

/// The most a PNG's colour profile (`iCCP`) may inflate to. Real profiles
/// are a few kilobytes, the largest LUT profiles about a megabyte; the
/// PNG decoder inflates the profile while reading the header, before any
/// reservation, up to 512 MiB, so a 0.5 MB file could make it hold half a
/// gigabyte outside `API_DECODE_MEMORY_MB`.
pub const MAX_PROFILE_BYTES: usize = 4 * 1024 * 1024;

/// Checks what a decoder would inflate from a file's header chunks before
/// it reads any pixels: a PNG's `iCCP` profile must inflate to at most
/// [`MAX_PROFILE_BYTES`] (inflated here with that bound, so checking costs
/// no more). Other containers hold nothing compressed in their headers.
pub fn header_chunks(bytes: &[u8], container: Container) -> Result<(), FrameError> {
    if container != Container::Png {
        return Ok(());
    }
    let mut at = 8usize;
    while let Some(header) = bytes.get(at..at + 8) {
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = &header[4..8];
        let data = at + 8;
        if kind == b"IDAT" || kind == b"IEND" {
            break;
        }
        if kind == b"iCCP" {
            let chunk = data
                .checked_add(length)
                .and_then(|end| bytes.get(data..end))
                .ok_or_else(|| corrupt("the PNG ends inside its iCCP chunk".into()))?;
            // The profile's name (up to 79 bytes), a zero, the method byte,
            // then the zlib stream.
            let stream = chunk
                .iter()
                .position(|&b| b == 0)
                .and_then(|name_end| chunk.get(name_end + 2..))
                .ok_or_else(|| corrupt("the PNG's iCCP chunk has no profile".into()))?;
            miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(stream, MAX_PROFILE_BYTES)
                .map_err(|e| match e.status {
                    miniz_oxide::inflate::TINFLStatus::HasMoreOutput => corrupt(format!(
                        "the PNG's colour profile (iCCP) inflates to more than {} MiB",
                        MAX_PROFILE_BYTES / (1024 * 1024)
                    )),
                    status => corrupt(format!(
                        "the PNG's colour profile (iCCP) is not zlib data: {status:?}"
                    )),
                })?;
        }
        at = match data.checked_add(length).and_then(|end| end.checked_add(4)) {
            Some(next) => next,
            None => break,
        };
    }
    Ok(())
}

/// WebP: the canvas is the VP8X chunk's (or, for a simple file, its one
/// bitstream's); each `ANMF` frame has a rectangle, and every bitstream
/// (`VP8 `, `VP8L`) declares its own dimensions, which must be those of
/// its frame, so the decoder never allocates for a bitstream larger than
/// what was checked.
fn webp(bytes: &[u8], canvas: (u32, u32)) -> Result<Frames, FrameError> {
    let mut frames = Frames::still(canvas);
    let mut count = 0u32;
    let mut at = 12usize;
    let chunk = |at: usize| -> Option<(&[u8], &[u8], usize)> {
        let header = bytes.get(at..at + 8)?;
        let length = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let data = bytes.get(at + 8..(at + 8).checked_add(length)?.min(bytes.len()))?;
        Some((&header[..4], data, at + 8 + length + (length & 1)))
    };
    while let Some((kind, data, next)) = chunk(at) {
        match kind {
            b"ANMF" => {
                if data.len() < 16 {
                    return Err(corrupt("the WebP has a short ANMF chunk".into()));
                }
                let u24 = |i: usize| {
                    u32::from(data[i]) | u32::from(data[i + 1]) << 8 | u32::from(data[i + 2]) << 16
                };
                let (x, y) = (u24(0) * 2, u24(3) * 2);
                let (w, h) = (u24(6) + 1, u24(9) + 1);
                count += 1;
                inside(count, (x, y, w, h), canvas)?;
                // The frame's own bitstream (after an optional ALPH chunk).
                let mut inner = 16usize;
                let mut lossless = false;
                while let Some(header) = data.get(inner..inner + 8) {
                    let length =
                        u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
                    let body = data.get(inner + 8..).unwrap_or_default();
                    match &header[..4] {
                        b"VP8 " | b"VP8L" => {
                            lossless = &header[..4] == b"VP8L";
                            let dims = bitstream_dimensions(&header[..4], body)?;
                            if dims != (w, h) {
                                return Err(corrupt(format!(
                                    "frame {count}'s bitstream is {}x{}, not the {w}x{h} its frame declares",
                                    dims.0, dims.1
                                )));
                            }
                            break;
                        }
                        _ => {
                            inner = match (inner + 8).checked_add(length + (length & 1)) {
                                Some(n) => n,
                                None => break,
                            }
                        }
                    }
                }
                if count == 1 {
                    frames.first = (w, h);
                    frames.composed = true;
                    frames.lossless = lossless;
                }
            }
            b"VP8 " | b"VP8L" => {
                let dims = bitstream_dimensions(kind, data)?;
                if dims != canvas {
                    return Err(corrupt(format!(
                        "the WebP's bitstream is {}x{}, not the {}x{} its header declares",
                        dims.0, dims.1, canvas.0, canvas.1
                    )));
                }
                frames.lossless = kind == b"VP8L";
            }
            _ => {}
        }
        if next <= at {
            break;
        }
        at = next;
    }
    frames.count = count.max(1);
    Ok(frames)
}

/// The dimensions a `VP8 ` (key frame header) or `VP8L` bitstream
/// declares.
fn bitstream_dimensions(kind: &[u8], data: &[u8]) -> Result<(u32, u32), FrameError> {
    let short = || corrupt("the WebP's bitstream is too short to hold its dimensions".into());
    if kind == b"VP8L" {
        let d = data.get(..5).ok_or_else(short)?;
        if d[0] != 0x2f {
            return Err(corrupt("the WebP's VP8L bitstream has no signature".into()));
        }
        let bits = u32::from_le_bytes([d[1], d[2], d[3], d[4]]);
        Ok(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
    } else {
        let d = data.get(..10).ok_or_else(short)?;
        if d[3..6] != [0x9d, 0x01, 0x2a] {
            return Err(corrupt(
                "the WebP's VP8 bitstream is not a key frame".into(),
            ));
        }
        let w = u32::from(u16::from_le_bytes([d[6], d[7]]) & 0x3fff);
        let h = u32::from(u16::from_le_bytes([d[8], d[9]]) & 0x3fff);
        Ok((w, h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1x1 PNG whose iCCP chunk holds `profile` zero bytes, compressed.
    fn png_with_profile(profile: usize) -> Vec<u8> {
        fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(kind);
            out.extend_from_slice(data);
            out.extend_from_slice(&[0; 4]); // the walk does not check CRCs
        }
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        chunk(&mut png, b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 6, 0, 0, 0]);
        let mut iccp = b"icc\0\0".to_vec();
        iccp.extend(miniz_oxide::deflate::compress_to_vec_zlib(
            &vec![0; profile],
            9,
        ));
        chunk(&mut png, b"iCCP", &iccp);
        chunk(&mut png, b"IEND", &[]);
        png
    }

    #[test]
    fn a_png_profile_is_inflated_only_within_its_bound() {
        assert_eq!(
            header_chunks(&png_with_profile(3_144), Container::Png),
            Ok(())
        );
        assert_eq!(
            header_chunks(&png_with_profile(MAX_PROFILE_BYTES), Container::Png),
            Ok(())
        );
        let refused = header_chunks(&png_with_profile(MAX_PROFILE_BYTES + 1), Container::Png);
        assert!(
            refused.as_ref().is_err_and(|e| e.0.contains("iCCP")),
            "{refused:?}"
        );
        let mut not_zlib = png_with_profile(10);
        let at = not_zlib.len() - 12 - 4 - 4; // inside the iCCP stream
        not_zlib[at] ^= 0xff;
        assert!(header_chunks(&not_zlib, Container::Png).is_err());
    }

    /// A GIF with a `screen` and one frame `frame` = (x, y, w, h), whose
    /// image data is an empty LZW stream (enough for the walk).
    pub(crate) fn gif_with(screen: (u16, u16), frame: (u16, u16, u16, u16)) -> Vec<u8> {
        let mut g = b"GIF89a".to_vec();
        g.extend(screen.0.to_le_bytes());
        g.extend(screen.1.to_le_bytes());
        g.extend([0, 0, 0]);
        g.push(0x2c);
        for v in [frame.0, frame.1, frame.2, frame.3] {
            g.extend(v.to_le_bytes());
        }
        g.extend([0, 2, 0]);
        g.push(0x3b);
        g
    }

    #[test]
    fn a_gif_frame_larger_than_its_screen_is_refused() {
        let bomb = gif_with((1, 1), (0, 0, 14000, 14000));
        let e = walk(&bomb, Container::Gif, (1, 1)).unwrap_err();
        assert!(e.to_string().contains("outside the 1x1 canvas"), "{e}");
        let off = gif_with((10, 10), (5, 5, 6, 5));
        assert!(walk(&off, Container::Gif, (10, 10)).is_err());
        let ok = walk(&gif_with((10, 10), (2, 3, 4, 5)), Container::Gif, (10, 10)).unwrap();
        assert_eq!((ok.count, ok.first, ok.composed), (1, (4, 5), true));
        let whole = walk(
            &gif_with((10, 10), (0, 0, 10, 10)),
            Container::Gif,
            (10, 10),
        )
        .unwrap();
        assert!(!whole.composed);
    }

    #[test]
    fn real_files_walk() {
        use image::{ImageFormat as F, RgbaImage};
        let img = RgbaImage::from_pixel(7, 5, image::Rgba([1, 2, 3, 255]));
        for (format, ours) in [
            (F::Png, Container::Png),
            (F::Gif, Container::Gif),
            (F::WebP, Container::Webp),
        ] {
            let mut out = std::io::Cursor::new(Vec::new());
            img.write_to(&mut out, format).unwrap();
            let frames = walk(out.get_ref(), ours, (7, 5)).unwrap();
            assert_eq!(frames.count, 1, "{ours:?}");
            assert_eq!(frames.first, (7, 5), "{ours:?}");
        }
    }
}
