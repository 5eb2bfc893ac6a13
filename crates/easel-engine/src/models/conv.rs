//! 2-D convolution, with a CPU path for the convolutions diffusion models are made of (3x3 or
//! 1x1, stride 1, "same" padding, f32).
//!
//! Why: candle's CPU convolution builds an im2col matrix nine times the input's size with a
//! single-threaded, channel-strided gather, then multiplies. At 1024x1024 the VAE's last
//! upsampling convolution alone asks for 9.7 GB, and the gather, not the arithmetic, is most of
//! the time. Here the input is copied once into a zero-padded buffer and the convolution is the
//! sum over the kernel's taps of `W_tap [cout, cin] x shifted input [cin, pixels]`, each a plain
//! GEMM over a contiguous slice of that buffer: computing on the padded width makes every
//! shift a constant offset (the two padding columns per row are computed and dropped). Memory
//! is the padded input plus the output; the GEMMs are the `gemm` crate's, which candle's own
//! matmul uses, multi-threaded. Other devices, dtypes and shapes go to candle.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use super::vector_math::contiguous_f32;

/// Peak bytes per output pixel of one "same" convolution with its input and output: on the CPU
/// in f32 (the tap path) the input, its padded copy and the output at padded width; elsewhere
/// candle's im2col buffer (9 x the input) besides.
pub fn conv_bytes_per_pixel(cin: u64, cout: u64, dtype: DType, device: &candle_core::Device) -> u64 {
    if device.is_cpu() && dtype == DType::F32 {
        (2 * cin + 2 * cout) * 4
    } else {
        (11 * cin + 2 * cout) * dtype.size_in_bytes() as u64
    }
}

/// A convolution with weights `[cout, cin, k, k]` and a bias.
#[derive(Debug, Clone)]
pub enum Conv2d {
    /// f32 on the CPU, stride 1, "same" padding: the per-tap GEMMs, reading candle's weight
    /// tensor in place (no copy, no reordering at load).
    Taps { weight: Tensor, bias: Tensor },
    /// Everything else: candle's.
    Candle(candle_nn::Conv2d),
}

/// Loads `weight` and `bias` under `vb` (diffusers' `nn.Conv2d` names).
pub fn conv2d(cin: usize, cout: usize, kernel: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    let same = cfg.stride == 1 && cfg.dilation == 1 && cfg.groups == 1 && kernel % 2 == 1 && cfg.padding == kernel / 2;
    let inner = candle_nn::conv2d(cin, cout, kernel, cfg, vb)?;
    let weight = inner.weight();
    match inner.bias() {
        Some(bias) if same && weight.device().is_cpu() && weight.dtype() == DType::F32 => {
            Ok(Conv2d::Taps { weight: weight.contiguous()?, bias: bias.contiguous()? })
        }
        _ => Ok(Conv2d::Candle(inner)),
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Taps { weight, bias } => {
                if !xs.device().is_cpu() || xs.dtype() != DType::F32 {
                    candle_core::bail!("conv2d: the weights are f32 on the CPU, the input is {:?} on {:?}", xs.dtype(), xs.device());
                }
                xs.contiguous()?.apply_op3_no_bwd(weight, bias, &TapConv)
            }
            Self::Candle(conv) => conv.forward(xs),
        }
    }
}

/// The CPU path: a "same" convolution as a sum of per-tap GEMMs over a padded input
/// (input `[b, cin, h, w]`, weight `[cout, cin, k, k]`, bias `[cout]`, all contiguous f32).
#[derive(Debug)]
struct TapConv;

impl CustomOp3 for TapConv {
    fn name(&self) -> &'static str {
        "easel-tap-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, cin, h, w) = l1.shape().dims4()?;
        let (cout, wcin, kh, kw) = l2.shape().dims4()?;
        if wcin != cin || kh != kw || kh % 2 == 0 {
            candle_core::bail!("conv2d: input {:?} does not fit weights {:?}", l1.dims(), l2.dims());
        }
        let (src, weight, bias) = (contiguous_f32(s1, l1, "conv2d", "input")?, contiguous_f32(s2, l2, "conv2d", "weight")?, contiguous_f32(s3, l3, "conv2d", "bias")?);
        if b * h * w == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from((b, cout, h, w))));
        }
        if cin == 0 {
            // No input channels: the bias alone (and no pointer arithmetic on empty buffers).
            let out = (0..b * cout).flat_map(|i| std::iter::repeat(bias[i % cout]).take(h * w)).collect();
            return Ok((CpuStorage::F32(out), Shape::from((b, cout, h, w))));
        }
        let (k, pad) = (kh, kh / 2);
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        // One channel of one image, padded, plus 2*pad so the last tap's slice stays in bounds.
        let plane = hp * wp + 2 * pad;
        // The padded input is laid out [cin][b][plane], so each tap is one GEMM over the whole
        // batch: its columns run through every image's rows at padded width, and the columns
        // between images (the padding rows) are computed and dropped with the padding columns.
        let row = b * plane;
        let n = (b - 1) * plane + h * wp;
        let padded = if pad == 0 && b == 1 {
            Vec::new()
        } else {
            let mut padded = vec![0f32; cin * row];
            padded.par_chunks_mut(plane).enumerate().for_each(|(index, dst)| {
                let (channel, batch) = (index / b, index % b);
                let chan = &src[(batch * cin + channel) * h * w..][..h * w];
                for y in 0..h {
                    let start = (y + pad) * wp + pad;
                    dst[start..start + w].copy_from_slice(&chan[y * w..(y + 1) * w]);
                }
            });
            padded
        };
        let rhs = if padded.is_empty() { src } else { &padded[..] };
        let mut wide = vec![0f32; cout * n];
        wide.par_chunks_mut(n).zip(bias.par_iter()).for_each(|(row, &v)| row.fill(v));
        let parallelism = match candle_core::utils::get_num_threads() {
            0 | 1 => gemm::Parallelism::None,
            threads => gemm::Parallelism::Rayon(threads),
        };
        for dy in 0..k {
            for dx in 0..k {
                let tap = dy * k + dx;
                let offset = dy * wp + dx;
                // SAFETY: dst is cout x n (row stride n); lhs is weight[:, :, dy, dx], cout x cin
                // at row stride cin*k*k and column stride k*k from `tap`; rhs is cin x n at row
                // stride `row` from `offset`. Its last element is (cin-1)*row + offset + n - 1,
                // and offset + n - 1 is at most 2*pad*(wp+1) + (b-1)*plane + h*wp - 1, which is
                // b*plane - 1 = row - 1 by `plane`'s construction, so it is inside the buffer
                // (for an unpadded 1x1 kernel on one image, the input itself: n = h*w = row).
                unsafe {
                    gemm::gemm(
                        cout,
                        n,
                        cin,
                        wide.as_mut_ptr(),
                        1,
                        n as isize,
                        true,
                        weight.as_ptr().add(tap),
                        (k * k) as isize,
                        (cin * k * k) as isize,
                        rhs.as_ptr().add(offset),
                        1,
                        row as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
            }
        }
        // Drop the padding: row y of channel o of image `batch` is
        // wide[o][batch*plane + y*wp ..][..w].
        let mut out = vec![0f32; b * cout * h * w];
        out.par_chunks_mut(h * w).enumerate().for_each(|(index, dst)| {
            let (batch, channel) = (index / cout, index % cout);
            let src = &wide[channel * n + batch * plane..];
            for y in 0..h {
                dst[y * w..(y + 1) * w].copy_from_slice(&src[y * wp..y * wp + w]);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, cout, h, w))))
    }
}
