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

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("conv2d: the {what} must be contiguous");
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

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
        let (src, weight, bias) = (f32_slice(s1, l1, "input")?, f32_slice(s2, l2, "weight")?, f32_slice(s3, l3, "bias")?);
        let (k, pad) = (kh, kh / 2);
        let (hp, wp) = (h + 2 * pad, w + 2 * pad);
        // One channel of the padded input, plus 2*pad so the last tap's slice stays in bounds.
        let plane = hp * wp + 2 * pad;
        let n = h * wp;
        let mut out = vec![0f32; b * cout * h * w];
        let mut padded = vec![0f32; if pad == 0 { 0 } else { cin * plane }];
        let mut wide = vec![0f32; cout * n];
        let parallelism = match candle_core::utils::get_num_threads() {
            0 | 1 => gemm::Parallelism::None,
            threads => gemm::Parallelism::Rayon(threads),
        };
        for batch in 0..b {
            let input = &src[batch * cin * h * w..(batch + 1) * cin * h * w];
            let (rhs, rhs_rs) = if pad == 0 {
                (input, h * w)
            } else {
                padded.par_chunks_mut(plane).zip(input.par_chunks(h * w)).for_each(|(dst, chan)| {
                    for y in 0..h {
                        let row = (y + pad) * wp + pad;
                        dst[row..row + w].copy_from_slice(&chan[y * w..(y + 1) * w]);
                    }
                });
                (&padded[..], plane)
            };
            wide.par_chunks_mut(n).zip(bias.par_iter()).for_each(|(row, &v)| row.fill(v));
            for dy in 0..k {
                for dx in 0..k {
                    let tap = dy * k + dx;
                    let offset = dy * wp + dx;
                    // SAFETY: dst is cout x n (row stride n); lhs is weight[:, :, dy, dx], cout x
                    // cin at row stride cin*k*k and column stride k*k from `tap`; rhs is cin x n
                    // at row stride rhs_rs from `offset`, whose last element,
                    // (cin-1)*rhs_rs + offset + n - 1, is inside the padded buffer by `plane`'s
                    // construction (or is the unpadded input itself for a 1x1 kernel).
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
                            rhs_rs as isize,
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
            // Drop the padding columns: row y of channel o is wide[o][y*wp .. y*wp + w].
            out[batch * cout * h * w..(batch + 1) * cout * h * w].par_chunks_mut(h * w).zip(wide.par_chunks(n)).for_each(|(dst, src)| {
                for y in 0..h {
                    dst[y * w..(y + 1) * w].copy_from_slice(&src[y * wp..y * wp + w]);
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((b, cout, h, w))))
    }
}
