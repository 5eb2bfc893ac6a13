//! Step previews: after each denoising step, a picture of what each image is becoming,
//! without running the VAE. With a tiny autoencoder for the model (TAESD, TAESDXL, TAEF1:
//! [`crate::models::autoencoder_tiny`]) the preview is full size and close to the final image.
//! Without one, the latent channels are mapped to RGB by a fixed linear map per latent format
//! (the "latent RGB factors" ComfyUI publishes in `comfy/latent_formats.py`, fitted to each
//! family's VAE), at latent resolution, in well under a millisecond.

use candle_core::{DType, Device, Tensor};

use crate::Result;

/// A linear map of one latent format's channels to RGB in [-1, 1].
pub struct LatentRgb {
    /// One row per latent channel: its weights for R, G and B.
    pub factors: &'static [[f32; 3]],
    pub bias: [f32; 3],
}

/// SD 1.x and 2.x (4 channels).
pub const SD15: LatentRgb = LatentRgb {
    factors: &[[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
    bias: [0.0; 3],
};

/// SDXL (4 channels, another VAE).
pub const SDXL: LatentRgb = LatentRgb {
    factors: &[[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
    bias: [0.1084, -0.0175, -0.0011],
};

/// FLUX.1 (16 channels).
pub const FLUX: LatentRgb = LatentRgb {
    factors: &[
        [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
        [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
        [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
        [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778],
    ],
    bias: [-0.0329, -0.0718, -0.0851],
};

/// SD 3 and 3.5 (16 channels, another VAE than FLUX's).
pub const SD3: LatentRgb = LatentRgb {
    factors: &[
        [-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458], [0.0856, 0.0339, 0.0902],
        [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309], [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358],
        [-0.0194, 0.0020, 0.0669], [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
        [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293], [-0.1448, -0.1463, -0.1189],
    ],
    bias: [0.2394, 0.2135, 0.1925],
};

/// An RGB picture, 8 bits a channel, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Preview {
    /// The picture as PNG bytes.
    pub fn png(&self) -> Result<Vec<u8>> {
        let img = image::RgbImage::from_raw(self.width as u32, self.height as u32, self.rgb.clone())
            .ok_or_else(|| crate::EngineError::param("preview", "preview buffer does not match its size"))?;
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).map_err(|e| crate::EngineError::param("preview", e.to_string()))?;
        Ok(out.into_inner())
    }
}

/// Where denoising stands after a step: steps done of the total, and the latents so far, for
/// a preview of any batch row on demand.
pub struct Step<'a> {
    pub done: usize,
    pub total: usize,
    latents: &'a Tensor,
    format: &'static LatentRgb,
    /// FLUX keeps latents packed as tokens: the token grid to unpack them from.
    packed_grid: Option<(usize, usize)>,
}

impl<'a> Step<'a> {
    /// Latents laid out `[B, C, h, w]`.
    pub fn new(done: usize, total: usize, latents: &'a Tensor, format: &'static LatentRgb) -> Self {
        Self { done, total, latents, format, packed_grid: None }
    }

    /// FLUX's packed latents `[B, h*w, 4C]` on an `h x w` token grid.
    pub fn packed(done: usize, total: usize, latents: &'a Tensor, grid: (usize, usize)) -> Self {
        Self { done, total, latents, format: &FLUX, packed_grid: Some(grid) }
    }

    /// The latents of batch row `row` (in the order the batch's images were asked for) as
    /// `[1, C, h, w]`, unpacked if the model packs them.
    pub fn latents(&self, row: usize) -> Result<Tensor> {
        let latent = self.latents.get(row)?.unsqueeze(0)?;
        Ok(match self.packed_grid {
            Some((h, w)) => crate::pipelines::flux::unpack(&latent, h, w)?,
            None => latent,
        })
    }

    /// A preview of batch row `row`: decoded by `decoder` when there is one, else the linear map.
    pub fn preview_with(&self, row: usize, decoder: Option<&crate::models::autoencoder_tiny::TinyDecoder>) -> Result<Preview> {
        let Some(decoder) = decoder else { return self.preview(row) };
        let image = decoder.decode(&self.latents(row)?)?.squeeze(0)?.to_device(&Device::Cpu)?;
        let (c, h, w) = image.dims3()?;
        if c != 3 {
            return Err(crate::EngineError::param("preview", format!("the preview decoder made {c} channels, not 3")));
        }
        let pixels = (image.permute((1, 2, 0))? * 255.0)?.round()?.clamp(0.0, 255.0)?.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
        Ok(Preview { width: w, height: h, rgb: pixels })
    }

    /// A preview of batch row `row` by the linear map, at latent resolution.
    pub fn preview(&self, row: usize) -> Result<Preview> {
        let latent = self.latents(row)?.squeeze(0)?.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let (c, h, w) = latent.dims3()?;
        let values = latent.flatten_all()?.to_vec1::<f32>()?;
        let factors = self.format.factors;
        let mut rgb = vec![0u8; h * w * 3];
        for p in 0..h * w {
            for (k, out) in rgb[p * 3..p * 3 + 3].iter_mut().enumerate() {
                let mut v = self.format.bias[k];
                for (ch, f) in factors.iter().enumerate().take(c) {
                    v += values[ch * h * w + p] * f[k];
                }
                *out = (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        Ok(Preview { width: w, height: h, rgb })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preview_maps_each_latent_pixel_through_the_formats_factors() {
        // Two rows, 4 channels, 1x2 pixels: row 1 has channel 0 = 1 at pixel 0, else 0.
        let mut data = vec![0f32; 2 * 4 * 2];
        data[8] = 1.0;
        let latents = Tensor::from_vec(data, (2, 4, 1, 2), &Device::Cpu).unwrap();
        let p = Step::new(3, 10, &latents, &SD15).preview(1).unwrap();
        assert_eq!((p.width, p.height), (2, 1));
        let byte = |v: f32| (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
        assert_eq!(&p.rgb[..3], &[byte(0.3512), byte(0.2297), byte(0.3227)]);
        assert_eq!(&p.rgb[3..], &[128, 128, 128], "zero latents are mid-grey");
        assert_eq!(&p.png().unwrap()[1..4], b"PNG");
    }

    #[test]
    fn packed_flux_latents_preview_on_their_unpacked_grid() {
        // [1, 2x3 tokens, 64] unpacks to 16 channels of 4x6.
        let latents = Tensor::zeros((1, 6, 64), DType::F32, &Device::Cpu).unwrap();
        let p = Step::packed(1, 4, &latents, (2, 3)).preview(0).unwrap();
        assert_eq!((p.width, p.height, p.rgb.len()), (6, 4, 72));
        let grey = |v: f32| (((v + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
        assert_eq!(&p.rgb[..3], &[grey(FLUX.bias[0]), grey(FLUX.bias[1]), grey(FLUX.bias[2])]);
    }
}
