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

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use rayon::prelude::*;

/// A convolution with weights `[cout, cin, k, k]` and a bias.
#[derive(Debug, Clone)]
pub enum Conv2d {
    /// f32 on the CPU, stride 1, "same" padding: the per-tap GEMMs (the weights live only here).
    Taps(std::sync::Arc<TapConv>),
    /// Everything else: candle's.
    Candle(candle_nn::Conv2d),
}

/// Loads `weight` and `bias` under `vb` (diffusers' `nn.Conv2d` names).
pub fn conv2d(cin: usize, cout: usize, kernel: usize, cfg: Conv2dConfig, vb: VarBuilder) -> Result<Conv2d> {
    let same = cfg.stride == 1 && cfg.dilation == 1 && cfg.groups == 1 && kernel % 2 == 1 && cfg.padding == kernel / 2;
    let inner = candle_nn::conv2d(cin, cout, kernel, cfg, vb)?;
    let weight = inner.weight();
    if !(same && weight.device().is_cpu() && weight.dtype() == DType::F32) {
        return Ok(Conv2d::Candle(inner));
    }
    // [cout, cin, kh, kw] -> [kh, kw, cout, cin]
    let by_tap = weight.permute((2, 3, 0, 1))?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let bias = inner.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
    Ok(Conv2d::Taps(std::sync::Arc::new(TapConv { by_tap, bias, cout, cin, kernel })))
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Taps(taps) => {
                if !xs.device().is_cpu() || xs.dtype() != DType::F32 {
                    candle_core::bail!("conv2d: the weights are f32 on the CPU, the input is {:?} on {:?}", xs.dtype(), xs.device());
                }
                xs.contiguous()?.apply_op1_no_bwd(taps.as_ref())
            }
            Self::Candle(conv) => conv.forward(xs),
        }
    }
}

/// The CPU path: a "same" convolution as a sum of per-tap GEMMs over a padded input.
#[derive(Debug)]
pub struct TapConv {
    by_tap: Vec<f32>,
    bias: Option<Vec<f32>>,
    cout: usize,
    cin: usize,
    kernel: usize,
}

impl CustomOp1 for TapConv {
    fn name(&self) -> &'static str {
        "easel-tap-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, cin, h, w) = layout.shape().dims4()?;
        if cin != self.cin {
            candle_core::bail!("conv2d: input has {cin} channels, the weights expect {}", self.cin);
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("conv2d: input must be contiguous");
        };
        let src = &storage.as_slice::<f32>()?[start..end];
        let (k, pad, cout) = (self.kernel, self.kernel / 2, self.cout);
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
            match &self.bias {
                Some(bias) => wide.par_chunks_mut(n).zip(bias.par_iter()).for_each(|(row, &v)| row.fill(v)),
                None => wide.fill(0.0),
            }
            for dy in 0..k {
                for dx in 0..k {
                    let tap = &self.by_tap[(dy * k + dx) * cout * cin..(dy * k + dx + 1) * cout * cin];
                    let offset = dy * wp + dx;
                    // SAFETY: dst is cout x n (row stride n); lhs is cout x cin (row stride cin);
                    // rhs is cin x n at row stride rhs_rs from `offset`, whose last element,
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
                            tap.as_ptr(),
                            1,
                            cin as isize,
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
