//! The models' elementwise math on the CPU, vectorised: the row softmax of
//! [`super::sdpa`]'s fused attention, `exp`, the SiLU that [`super::group_norm`] fuses,
//! GEGLU's `a * gelu(gate)` with the exact (erf) GELU, and the tanh-approximated GELU of FLUX's
//! and SD3's MLPs.
//!
//! Why: attention's softmax is most of a UNet step at large sizes (an SD-1.5 UNet at 1024x1024
//! takes 4 billion exponentials per self-attention layer), and candle's CPU softmax, SiLU and
//! GELUs call the scalar `expf`/`erff`/`tanhf` once per element (the softmax after a separate
//! pass that multiplies the scores by the scale; `tanhf` was 11% of a FLUX-shaped evaluation's
//! CPU time). Here `exp` is Cephes' `expf` (range reduction by powers
//! of two and a degree-6 polynomial, about 1 ulp) and `erf` is Abramowitz and Stegun's 7.1.26
//! (absolute error under 1.5e-7), both branch-free so that the compiler vectorises them. Each
//! kernel is compiled for AVX-512, for AVX2 with FMA and for the baseline target, and chosen at
//! run time. Other devices and dtypes use candle's operations.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The f32 elements of a contiguous CPU operand (`op` and `what` name it in the error).
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str, what: &str) -> Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: the {what} must be contiguous");
    };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// GEGLU's activation: `xs` `[..., 2 * inner]` is `a | gate`; returns `a * gelu_erf(gate)`
/// `[..., inner]` (diffusers' `GEGLU`, whose projection output this is).
pub fn geglu(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && xs.rank() > 0 && xs.dims()[xs.rank() - 1] % 2 == 0 {
        return xs.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    let halves = xs.chunk(2, candle_core::D::Minus1)?;
    &halves[0] * halves[1].gelu_erf()?
}

/// The tanh-approximated GELU (PyTorch's `gelu(approximate="tanh")`, candle's `gelu`), as
/// `x * sigmoid(2u)` with `u = sqrt(2/pi) (x + 0.044715 x³)`, which equals `0.5 x (1 + tanh u)`
/// and needs one `exp`.
pub fn gelu_tanh(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        return xs.contiguous()?.apply_op1_no_bwd(&GeluTanh);
    }
    xs.gelu()
}

#[derive(Debug)]
struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "easel-gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, "gelu", "input")?;
        let mut dst = src.to_vec();
        dst.par_chunks_mut(16 * 1024).for_each(gelu_tanh_in_place);
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

#[derive(Debug)]
struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "easel-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = contiguous_f32(storage, layout, "geglu", "input")?;
        let mut dims = layout.dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        let inner = width / 2;
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        let mut dst = vec![0f32; src.len() / 2];
        if inner > 0 {
            let rows_per_task = (4096 / inner).max(1);
            dst.par_chunks_mut(inner * rows_per_task).zip(src.par_chunks(width * rows_per_task)).for_each(|(dst, src)| {
                for (dst, src) in dst.chunks_mut(inner).zip(src.chunks(width)) {
                    let (a, gate) = src.split_at(inner);
                    geglu_row(a, gate, dst);
                }
            });
        }
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}

/// Defines `$name(args)` calling the `#[inline(always)]` function `$inline(args)` compiled three
/// times, for AVX-512F, for AVX2 with FMA, and for the baseline target, and picks one at run
/// time (feature detection is cached by std).
macro_rules! runtime_simd {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) => $inline:ident) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) {
                    $inline($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $inline($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F, checked just above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $inline($($arg),*)
        }
    };
}

runtime_simd! {
    /// `dst = a * gelu_erf(gate)`.
    fn geglu_row(a: &[f32], gate: &[f32], dst: &mut [f32]) => geglu_row_inline
}

runtime_simd! {
    /// `xs[i] = gelu_tanh(xs[i])`.
    fn gelu_tanh_in_place(xs: &mut [f32]) => gelu_tanh_in_place_inline
}

runtime_simd! {
    /// `xs = softmax(xs)`, for one row.
    pub fn softmax_in_place(xs: &mut [f32]) => softmax_in_place_inline
}

runtime_simd! {
    /// `xs[i] = exp(xs[i])`.
    pub fn exp_in_place(xs: &mut [f32]) => exp_in_place_inline
}

runtime_simd! {
    /// `xs[i] = silu(xs[i]) = xs[i] / (1 + exp(-xs[i]))`.
    pub fn silu_in_place(xs: &mut [f32]) => silu_in_place_inline
}

#[inline(always)]
fn softmax_in_place_inline(xs: &mut [f32]) {
    // A row whose maximum is infinite gives NaN (inf - inf), as candle's and PyTorch's do.
    let max = max_lanes(xs);
    for x in xs.iter_mut() {
        *x -= max;
    }
    exp_in_place_inline(xs);
    let inv = 1.0 / sum_lanes(xs);
    for x in xs.iter_mut() {
        *x *= inv;
    }
}

/// The maximum of `xs`, vectorisable through independent lanes.
#[inline(always)]
fn max_lanes(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = if x > *lane { x } else { *lane };
        }
    }
    chunks.remainder().iter().chain(lanes.iter()).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

#[inline(always)]
fn sum_lanes(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = xs.chunks_exact(16);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane += x;
        }
    }
    chunks.remainder().iter().chain(lanes.iter()).sum()
}

#[inline(always)]
fn exp_in_place_inline(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp_poly(*x);
    }
}

#[inline(always)]
fn silu_in_place_inline(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x /= 1.0 + exp_poly(-*x);
    }
}

#[inline(always)]
fn geglu_row_inline(a: &[f32], gate: &[f32], dst: &mut [f32]) {
    for ((d, &a), &g) in dst.iter_mut().zip(a).zip(gate) {
        *d = a * 0.5 * g * (1.0 + erf_poly(g * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn gelu_tanh_in_place_inline(xs: &mut [f32]) {
    const TWO_SQRT_2_OVER_PI: f32 = 2.0 * 0.797_884_6;
    for x in xs.iter_mut() {
        let v = *x;
        *x = v / (1.0 + exp_poly(-TWO_SQRT_2_OVER_PI * (v + 0.044_715 * v * v * v)));
    }
}

/// Abramowitz and Stegun 7.1.26, branch-free: `erf(|x|) = 1 - t(a1 + t(a2 + ...)) exp(-x²)` with
/// `t = 1 / (1 + p|x|)`, and the sign put back.
#[inline(always)]
fn erf_poly(x: f32) -> f32 {
    let ax = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * ax);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let magnitude = 1.0 - poly * exp_poly(-ax * ax);
    magnitude.copysign(x)
}

/// Cephes' `expf`, branch-free and cast-free so that a loop of it vectorises: `exp(x) = 2^n exp(r)`
/// with `n = round(x / ln 2)`, `r = x - n ln 2` (ln 2 in two parts for precision), and `exp(r)`
/// by a degree-6 polynomial. `n` is rounded by adding 1.5 * 2^23, which leaves it in the low
/// mantissa bits, and `2^n` is those bits plus the exponent bias shifted into the exponent
/// field (a float-to-int `as` cast would saturate, which compiles to scalar code). Inputs are
/// clamped to where the result is a normal f32 (below, it is about 1e-38 instead of 0 or a
/// denormal: far below what a softmax sum or a SiLU can see).
#[inline(always)]
fn exp_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUNDER: f32 = 12_582_912.0;
    let unclamped = x;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    // The low 9 bits of `shifted` are n mod 512; n + 127 is in 1..=254 after the clamp.
    let e = e * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    // Above the clamp, overflow to infinity as expf does (so silu(-1e38) is -0, not -1.4).
    if unclamped > 88.3 {
        f32::INFINITY
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn polynomial_exp_is_within_2e_7_relative_of_libm_and_saturates_like_it() {
        let mut worst = 0f32;
        let xs: Vec<f32> = (0..200_000).map(|i| -87.0 + i as f32 * (175.0 / 200_000.0)).collect();
        let mut ours = xs.clone();
        exp_in_place(&mut ours);
        for (&x, &e) in xs.iter().zip(&ours) {
            worst = worst.max(((e - x.exp()) / x.exp()).abs());
        }
        assert!(worst < 2e-7, "worst relative error {worst:e}");
        let mut tiny = [f32::NEG_INFINITY, -1000.0];
        exp_in_place(&mut tiny);
        assert!(tiny.iter().all(|&e| (0.0..1e-37).contains(&e)), "{tiny:?}");
        let mut huge = [100.0, f32::INFINITY, f32::NAN];
        exp_in_place(&mut huge);
        assert!(huge[0] == f32::INFINITY && huge[1] == f32::INFINITY && huge[2].is_nan(), "{huge:?}");
        let mut silu = [-1e38f32, -100.0, 100.0];
        silu_in_place(&mut silu);
        assert!(silu[0] == 0.0 && silu[1].abs() < 1e-40 && silu[2] == 100.0, "{silu:?}");
    }

    #[test]
    fn gelu_tanh_equals_candles_gelu_within_1e_6_relative() -> Result<()> {
        let dev = Device::Cpu;
        for dims in [vec![2, 7, 64], vec![1, 300, 4100]] {
            let xs = Tensor::randn(0f32, 3.0, dims.as_slice(), &dev)?;
            let theirs = xs.gelu()?;
            let ours = gelu_tanh(&xs)?;
            let size = xs.abs()?.maximum(1e-3)?;
            let err = ((ours - theirs)?.abs()? / size)?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            println!("gelu_tanh {dims:?}: worst relative error {err:e}");
            assert!(err < 1e-6, "dims {dims:?}: worst relative error {err:e}");
        }
        Ok(())
    }

    /// The error is `a * 0.5 * gate * (erf's error)`, so it is measured relative to
    /// `|a| * (1 + |gate|)`: A&S's erf error is under 1.5e-7, plus f32 rounding (measured: 2.1e-7).
    #[test]
    fn geglu_equals_candles_a_times_gelu_erf_of_gate_within_4e_7_relative() -> Result<()> {
        let dev = Device::Cpu;
        for dims in [vec![2, 7, 64], vec![1, 300, 2560], vec![3, 2]] {
            let xs = Tensor::randn(0f32, 3.0, dims.as_slice(), &dev)?;
            let halves = xs.chunk(2, candle_core::D::Minus1)?;
            let theirs = (&halves[0] * halves[1].gelu_erf()?)?;
            let ours = geglu(&xs)?;
            assert_eq!(ours.dims(), theirs.dims());
            let size = (halves[0].abs()? * (halves[1].abs()? + 1.0)?)?.maximum(1e-3)?;
            let err = ((ours - theirs)?.abs()? / size)?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            println!("geglu {dims:?}: worst relative error {err:e}");
            assert!(err < 4e-7, "dims {dims:?}: worst relative error {err:e}");
        }
        Ok(())
    }

    #[test]
    fn row_softmax_equals_candles_softmax_within_1e_6() -> Result<()> {
        let dev = Device::Cpu;
        for dims in [vec![2, 3, 5, 77], vec![1, 4, 300], vec![7, 1], vec![3, 2, 4, 4100]] {
            let xs = Tensor::randn(0f32, 8.0, dims.as_slice(), &dev)?;
            let row = dims[dims.len() - 1];
            let mut ours = xs.flatten_all()?.to_vec1::<f32>()?;
            ours.chunks_mut(row).for_each(softmax_in_place);
            let theirs = candle_nn::ops::softmax_last_dim(&xs)?.flatten_all()?.to_vec1::<f32>()?;
            let err = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            println!("dims {dims:?}: max difference {err:e}");
            assert!(err < 1e-6, "dims {dims:?}: max difference {err:e}");
        }
        Ok(())
    }
}
