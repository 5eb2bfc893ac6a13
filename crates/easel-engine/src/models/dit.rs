//! Pieces the diffusion transformers (FLUX's and SD 3.5's MMDiT) share, computed as their
//! reference implementations compute them (norms in f32).

use candle_core::{DType, Tensor, D};

use crate::error::Result;

const EPS: f64 = 1e-6;

/// Sinusoidal embedding `[cos, sin]` of `t * scale` (diffusers' `Timesteps` with
/// `flip_sin_to_cos=True, downscale_freq_shift=0`; BFL's `timestep_embedding` with scale 1000).
pub fn timestep_embedding(t: &Tensor, dim: usize, scale: f64, dtype: DType) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half).map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = (t.to_dtype(DType::F32)? * scale)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Ok(Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(dtype)?)
}

/// LayerNorm without affine parameters, eps 1e-6 (computed in f32).
pub fn layer_norm(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let h = x.dim(D::Minus1)?;
    let ones = Tensor::ones(h, DType::F32, x.device())?;
    let zeros = Tensor::zeros(h, DType::F32, x.device())?;
    Ok(candle_nn::ops::layer_norm(&x.to_dtype(DType::F32)?.contiguous()?, &ones, &zeros, EPS as f32)?.to_dtype(dtype)?)
}

/// RMS norm over the last dimension with a learned `weight`, eps 1e-6 (computed in f32): the
/// query and key norms.
pub fn rms_norm(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?.contiguous()?;
    Ok(candle_nn::ops::rms_norm(&x32, &weight.to_dtype(DType::F32)?, EPS as f32)?.to_dtype(dtype)?)
}

/// `(1 + scale) * x + shift`, with `shift`/`scale` `[B, 1, H]`.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)?)
}
