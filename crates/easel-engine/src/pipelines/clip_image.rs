//! transformers' `CLIPImageProcessor`, the way IP-Adapter pipelines prepare the reference
//! picture for the image encoder: RGB, the shorter side resized to the encoder's size with
//! Pillow's bicubic filter, a centre crop to a square, then scaled to `[0, 1]` and normalised
//! with CLIP's mean and deviation.
//!
//! The resize is a port of Pillow's own (`libImaging/Resample.c`): fixed-point 8-bit weights,
//! a horizontal pass then a vertical one, each rounding to bytes. Any other bicubic (the
//! `image` crate's Catmull-Rom, a float one) moves pixels by a level here and there, and the
//! encoder sees different pictures than it does under diffusers.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// CLIP's normalisation (OpenAI's; transformers' `OPENAI_CLIP_MEAN` / `_STD`), as Python
/// floats: numpy rounds them to f32 from these doubles.
const MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Pillow's fixed-point precision for 8-bit images.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// An RGB picture, row-major, three bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbPicture {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Pillow's bicubic kernel (`a = -0.5`, support 2).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output position: the first input index and the fixed-point weights (`precompute_coeffs`
/// and `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|x| {
            let center = (x as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let weights: Vec<f64> = (xmin..xmax).map(|j| bicubic((j as f64 - center + 0.5) / filter_scale)).collect();
            let sum: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if sum != 0.0 { w / sum } else { *w } * (1i64 << PRECISION_BITS) as f64;
                    // C's (int) truncation after adding ±0.5: rounding half away from zero.
                    (if w < 0.0 { w - 0.5 } else { w + 0.5 }) as i32
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One pass along rows (`horizontal`) or columns, as Pillow's `ImagingResampleHorizontal_8bpc`
/// and `..Vertical_8bpc`.
fn resample_pass(src: &RgbPicture, out_len: usize, horizontal: bool) -> RgbPicture {
    let (width, height) = if horizontal { (out_len, src.height) } else { (src.width, out_len) };
    let coeffs = coefficients(if horizontal { src.width } else { src.height }, out_len);
    let mut pixels = vec![0u8; width * height * 3];
    for y in 0..height {
        for x in 0..width {
            let (start, weights) = &coeffs[if horizontal { x } else { y }];
            for c in 0..3 {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (k, w) in weights.iter().enumerate() {
                    let (sx, sy) = if horizontal { (start + k, y) } else { (x, start + k) };
                    acc += src.pixels[(sy * src.width + sx) * 3 + c] as i32 * w;
                }
                pixels[(y * width + x) * 3 + c] = clip8(acc);
            }
        }
    }
    RgbPicture { width, height, pixels }
}

/// Pillow's `Image.resize(size, Image.BICUBIC)` on an RGB picture (no `reducing_gap`): the
/// horizontal pass, then the vertical, each skipped when that side keeps its length.
pub fn resize_bicubic(src: &RgbPicture, width: usize, height: usize) -> RgbPicture {
    let mut out = src.clone();
    if width != src.width {
        out = resample_pass(&out, width, true);
    }
    if height != src.height {
        out = resample_pass(&out, height, false);
    }
    out
}

/// The processor's output for one picture: `[1, 3, size, size]` f32 `pixel_values`.
pub fn pixel_values(picture: &RgbPicture, size: usize, device: &Device) -> Result<Tensor> {
    // `shortest_edge`: the short side becomes `size`, the long one `int(size * long / short)`.
    let (w, h) = (picture.width, picture.height);
    let (new_w, new_h) = if w <= h { (size, size * h / w) } else { (size * w / h, size) };
    let resized = if (new_w, new_h) == (w, h) { picture.clone() } else { resize_bicubic(picture, new_w, new_h) };
    let (top, left) = ((new_h - size) / 2, (new_w - size) / 2);
    let mut data = vec![0f32; 3 * size * size];
    for c in 0..3 {
        for y in 0..size {
            for x in 0..size {
                let byte = resized.pixels[((top + y) * new_w + left + x) * 3 + c];
                let scaled = (byte as f64 * (1.0 / 255.0)) as f32;
                data[(c * size + y) * size + x] = (scaled - MEAN[c] as f32) / STD[c] as f32;
            }
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, size, size), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_weights_sum_to_one_in_fixed_point_within_rounding() {
        for (i, o) in [(80, 45), (33, 32), (10, 37), (7, 7)] {
            for (_, w) in coefficients(i, o) {
                let sum: i32 = w.iter().sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= w.len() as i32, "{i}->{o}: {sum}");
            }
        }
    }

    #[test]
    fn a_flat_picture_stays_flat_through_resize() {
        let flat = RgbPicture { width: 9, height: 5, pixels: [10u8, 200, 77].repeat(45) };
        let out = resize_bicubic(&flat, 4, 13);
        assert_eq!(out.pixels, [10u8, 200, 77].repeat(52));
    }
}
