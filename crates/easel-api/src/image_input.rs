//! Images that arrive with a request (image-to-image's `image`), decoded under limits so that
//! bytes that are not an image, an image over 4096x4096 or a decompression bomb are a 400
//! naming the field, never a panic or an allocation that aborts the process.
//!
//! Why here, in the candle-free crate: the gateway checks and normalises the image before the
//! job is queued (an accepted job must be runnable), and the CLI applies the same rules. What
//! is queued is the image already at the request's size, re-encoded as PNG.

use base64::Engine as _;
use image::{DynamicImage, ImageDecoder as _, ImageReader, Limits, RgbImage};


use crate::error::ApiError;

/// The largest width or height an input image may have.
pub const MAX_INPUT_SIDE: u32 = 4096;
/// What decoding may allocate: a 4096x4096 RGBA image at 16 bits per channel, and no more.
const MAX_DECODE_BYTES: u64 = 4096 * 4096 * 8;

/// An input image as RGB8, row-major; it always holds `width * height * 3` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct InputImage {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

/// Decodes PNG, JPEG or WebP bytes under the size and allocation limits.
pub fn decode_image(field: &str, bytes: &[u8]) -> Result<InputImage, ApiError> {
    // Alpha is dropped (transparent pixels keep their colour), as diffusers' convert("RGB").
    let rgb = decode_dynamic(field, bytes)?.to_rgb8();
    Ok(InputImage { width: rgb.width(), height: rgb.height(), rgb: rgb.into_raw() })
}

fn decode_dynamic(field: &str, bytes: &[u8]) -> Result<DynamicImage, ApiError> {
    let not_image = |why: String| ApiError::invalid(field, format!("{field} is not a PNG, JPEG or WebP image: {why}"));
    let open = || ImageReader::new(std::io::Cursor::new(bytes)).with_guessed_format().map_err(|e| not_image(e.to_string()));
    let mut reader = open()?;
    if reader.format().is_none() {
        return Err(not_image("unrecognised bytes".into()));
    }
    // The header's size, read before any pixel is decoded.
    let (width, height) = open()?.into_dimensions().map_err(|e| not_image(e.to_string()))?;
    if width > MAX_INPUT_SIDE || height > MAX_INPUT_SIDE {
        return Err(ApiError::invalid(field, format!("{field} is {width}x{height}; images may be at most {MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}")));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_INPUT_SIDE);
    limits.max_image_height = Some(MAX_INPUT_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    // Phone pictures store their rotation in EXIF; diffusers' load_image applies it too.
    let mut decoder = reader.into_decoder().map_err(|e| not_image(e.to_string()))?;
    // The pixel buffer is allocated at once: refuse it before, as ImageReader::decode does.
    if decoder.total_bytes() > MAX_DECODE_BYTES {
        return Err(not_image(format!("decoding would take {} bytes, over the {MAX_DECODE_BYTES}-byte limit", decoder.total_bytes())));
    }
    let orientation = decoder.orientation().unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| not_image(e.to_string()))?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Decodes a mask as OpenAI's edits take it: a picture whose fully transparent pixels mark the
/// region to edit, as easel's mask (white there, black elsewhere). A mask without an alpha
/// channel marks nothing, so it is refused.
pub fn decode_openai_mask(field: &str, bytes: &[u8]) -> Result<InputImage, ApiError> {
    let image = decode_dynamic(field, bytes)?;
    if !image.color().has_alpha() {
        return Err(ApiError::invalid(field, format!("{field} must have an alpha channel: its fully transparent pixels mark where to edit")));
    }
    let rgba = image.to_rgba8();
    let rgb = rgba.pixels().flat_map(|p| if p.0[3] == 0 { [255u8; 3] } else { [0u8; 3] }).collect();
    Ok(InputImage { width: rgba.width(), height: rgba.height(), rgb })
}

/// Decodes a base64 string or a `data:image/...;base64,` URL, then the image in it.
pub fn decode_base64_image(field: &str, text: &str) -> Result<InputImage, ApiError> {
    let payload = match text.strip_prefix("data:") {
        Some(rest) => rest.split_once(";base64,").map(|(_, b)| b).ok_or_else(|| ApiError::invalid(field, format!("{field} is a data URL without ;base64,")))?,
        None => text,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::invalid(field, format!("{field} must be a base64 image or a data URL: {e}")))?;
    decode_image(field, &bytes)
}

impl InputImage {
    /// An image from RGB8 bytes; `None` unless there are exactly `width * height * 3`.
    pub fn new(width: u32, height: u32, rgb: Vec<u8>) -> Option<Self> {
        (rgb.len() as u64 == width as u64 * height as u64 * 3).then_some(Self { width, height, rgb })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// RGB8, row-major.
    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }

    /// The image at `width` x `height`: itself when it already is, else resized with a Lanczos
    /// filter, as diffusers' image processor resizes.
    pub fn resized(self, width: u32, height: u32) -> InputImage {
        if (self.width, self.height) == (width, height) {
            return self;
        }
        let rgb = RgbImage::from_raw(self.width, self.height, self.rgb).expect("an InputImage holds width * height * 3 bytes");
        let out = image::imageops::resize(&rgb, width, height, image::imageops::FilterType::Lanczos3);
        InputImage { width, height, rgb: out.into_raw() }
    }

    /// Grey levels, a byte per pixel, as PIL's `convert("L")` computes them (ITU-R 601-2 luma
    /// in 16-bit fixed point), which is what diffusers reads a mask as.
    pub fn luma(&self) -> Vec<u8> {
        self.rgb.chunks_exact(3).map(|p| ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8).collect()
    }

    /// The image as PNG bytes (how a job carries it through the queue).
    pub fn to_png(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let encoder = image::codecs::png::PngEncoder::new(&mut out);
        use image::ImageEncoder as _;
        // Encoding a well-formed RGB8 buffer into memory cannot fail.
        let _ = encoder.write_image(&self.rgb, self.width, self.height, image::ExtendedColorType::Rgb8);
        out
    }

    /// The image as base64 PNG.
    pub fn to_base64_png(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.to_png())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        InputImage::new(width, height, vec![128; (width * height * 3) as usize]).unwrap().to_png()
    }

    #[test]
    fn decodes_png_and_base64_and_data_urls() {
        let bytes = png(24, 16);
        let a = decode_image("image", &bytes).unwrap();
        assert_eq!((a.width, a.height, a.rgb.len()), (24, 16, 24 * 16 * 3));
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        assert_eq!(decode_base64_image("image", &b64).unwrap(), a);
        assert_eq!(decode_base64_image("image", &format!("data:image/png;base64,{b64}")).unwrap(), a);
    }

    #[test]
    fn bad_bytes_oversized_images_and_bombs_are_400s_naming_the_field() {
        let e = decode_image("image", b"hello, not an image").unwrap_err();
        assert_eq!((e.status, e.body.param.as_deref()), (400, Some("image")));
        let e = decode_base64_image("image", "%%%").unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("image"));
        // A 5000x8 PNG is over the side limit, refused from its header.
        let e = decode_image("image", &png(5000, 8)).unwrap_err();
        assert!(e.body.message.contains("5000x8"), "{}", e.body.message);
        // A decompression bomb: a PNG header claiming 4096x4096 16-bit RGBA... within the side
        // limit, but a truncated body must fail cleanly, not allocate and abort.
        let mut bomb = png(4096, 4096);
        bomb.truncate(200);
        let e = decode_image("image", &bomb).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("image"));
    }

    #[test]
    fn openai_masks_mark_transparent_pixels_and_need_alpha() {
        let mut rgba = image::RgbaImage::from_pixel(4, 2, image::Rgba([10, 20, 30, 255]));
        rgba.put_pixel(1, 0, image::Rgba([10, 20, 30, 0]));
        rgba.put_pixel(2, 1, image::Rgba([10, 20, 30, 128]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        rgba.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        let mask = decode_openai_mask("mask", bytes.get_ref()).unwrap();
        let white: Vec<usize> = mask.luma().iter().enumerate().filter(|(_, &v)| v == 255).map(|(i, _)| i).collect();
        assert_eq!(white, vec![1], "only the fully transparent pixel is edited");
        let e = decode_openai_mask("mask", &png(4, 2)).unwrap_err();
        assert!(e.body.message.contains("alpha"), "{}", e.body.message);
    }

    #[test]
    fn resizing_keeps_an_image_at_its_size_and_changes_others() {
        let a = decode_image("image", &png(24, 16)).unwrap();
        assert_eq!(a.clone().resized(24, 16), a);
        let b = a.resized(8, 8);
        assert_eq!((b.width, b.height, b.rgb.len()), (8, 8, 8 * 8 * 3));
        assert!(b.rgb().iter().all(|&v| (126..=130).contains(&v)), "a flat image stays flat");
    }
}
