//! Writing images to disk: PNG with the generation parameters in text chunks, JPEG, WebP.

use std::io::BufWriter;
use std::path::Path;

use serde::Serialize;

use crate::error::{EngineError, Result};

/// Everything needed to reproduce an image; stored in the PNG's text chunks.
#[derive(Debug, Clone, Serialize)]
pub struct ImageMetadata {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub seed: u64,
    pub steps: usize,
    pub scheduler: String,
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub model: String,
    /// Position within a batch generated from one seed.
    pub batch_index: usize,
}

impl ImageMetadata {
    /// The A1111-style human-readable `parameters` text.
    pub fn parameters_text(&self) -> String {
        let mut s = self.prompt.clone();
        if let Some(n) = &self.negative_prompt {
            s.push_str(&format!("\nNegative prompt: {n}"));
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}, Batch index: {}",
            self.steps, self.scheduler, self.guidance, self.seed, self.width, self.height, self.model, self.batch_index
        ));
        s
    }
}

/// Image container formats easel writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Webp,
}

impl ImageFormat {
    /// The format a path's extension names.
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(Self::Png),
            Some("jpg") | Some("jpeg") => Ok(Self::Jpeg),
            Some("webp") => Ok(Self::Webp),
            _ => Err(EngineError::param("output", format!("{} must end in .png, .jpg or .webp", path.display()))),
        }
    }
}

/// Encodes `img` in `format`; PNGs carry `meta` as `parameters` and `easel` text chunks.
pub fn encode_image(img: &image::RgbImage, format: ImageFormat, meta: Option<&ImageMetadata>, jpeg_quality: u8) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        ImageFormat::Png => {
            let mut enc = png::Encoder::new(&mut out, img.width(), img.height());
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            if let Some(m) = meta {
                let json = serde_json::to_string(m).map_err(|e| EngineError::Image(e.to_string()))?;
                enc.add_itxt_chunk("parameters".into(), m.parameters_text()).map_err(|e| EngineError::Image(e.to_string()))?;
                enc.add_itxt_chunk("easel".into(), json).map_err(|e| EngineError::Image(e.to_string()))?;
            }
            let mut w = enc.write_header().map_err(|e| EngineError::Image(e.to_string()))?;
            w.write_image_data(img.as_raw()).map_err(|e| EngineError::Image(e.to_string()))?;
            w.finish().map_err(|e| EngineError::Image(e.to_string()))?;
        }
        ImageFormat::Jpeg => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, jpeg_quality.clamp(1, 100));
            img.write_with_encoder(enc).map_err(|e| EngineError::Image(e.to_string()))?;
        }
        ImageFormat::Webp => {
            let enc = image::codecs::webp::WebPEncoder::new_lossless(&mut out);
            img.write_with_encoder(enc).map_err(|e| EngineError::Image(e.to_string()))?;
        }
    }
    Ok(out)
}

/// Writes `img` to `path` in the format its extension names.
pub fn save_image(img: &image::RgbImage, path: &Path, meta: Option<&ImageMetadata>) -> Result<()> {
    let bytes = encode_image(img, ImageFormat::from_path(path)?, meta, 90)?;
    let io = |e| EngineError::Io { path: path.to_path_buf(), source: e };
    let f = std::fs::File::create(path).map_err(io)?;
    let mut w = BufWriter::new(f);
    std::io::Write::write_all(&mut w, &bytes).map_err(io)?;
    std::io::Write::flush(&mut w).map_err(io)
}

/// The text chunks of a PNG (tEXt and iTXt), as (keyword, text) pairs.
pub fn png_text_chunks(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().map_err(|e| EngineError::Image(e.to_string()))?;
    let info = reader.info();
    let mut chunks: Vec<(String, String)> = info.uncompressed_latin1_text.iter().map(|c| (c.keyword.clone(), c.text.clone())).collect();
    for c in &info.utf8_text {
        chunks.push((c.keyword.clone(), c.get_text().map_err(|e| EngineError::Image(e.to_string()))?));
    }
    Ok(chunks)
}
