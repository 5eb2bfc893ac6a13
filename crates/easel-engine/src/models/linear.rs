//! Linear weights laid out for the CPU's GEMM: `[out, in]` is stored as a contiguous `[in, out]`
//! and held as its `.t()` view, so `x W^T` hands the `gemm` crate a row-major right operand.
//! Why: with `W` as stored, the crate repacks a transposed view on every call; FLUX-sized
//! projections ran at 92-166 GFLOP/s that way and 164-201 laid out (2 AVX-512 cores), and a
//! FLUX-shaped evaluation took a quarter less time. The transformer store reads its weights
//! straight into this layout ([`crate::weights::read_tensors_laid_out`]); the UNets' linear
//! layers were no faster with it and keep the stored layout. Other devices and dtypes too.

use super::vector_math::contiguous_f32;
use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;

/// The same `[n, k]` values, as the transposed view of a contiguous `[k, n]` copy when `w` is a
/// contiguous f32 matrix on the CPU.
pub fn for_cpu_gemm(w: Tensor) -> Result<Tensor> {
    if !w.device().is_cpu() || w.dtype() != DType::F32 || w.rank() != 2 || !w.is_contiguous() {
        return Ok(w);
    }
    let (n, k) = w.dims2()?;
    let transposed = {
        let (storage, layout) = w.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else { return Ok(w.clone()) };
        transpose(contiguous_f32(cpu, layout, "linear", "weight")?, n, k, true)
    };
    Tensor::from_vec(transposed, (k, n), w.device())?.t()
}

/// `src` `[n, k]` row-major, transposed to `[k, n]` row-major (on rayon's threads if `parallel`).
pub(crate) fn transpose(src: &[f32], n: usize, k: usize, parallel: bool) -> Vec<f32> {
    const TILE: usize = 256;
    const STRIP: usize = 16;
    let mut dst = Vec::with_capacity(n * k);
    if n * k == 0 || src.len() != n * k {
        return dst;
    }
    // Per task, 256 rows of the copy; per step, 16 source rows' 1 KiB runs into a strip on the
    // stack, then written out 16 values (one cache line) per row. Why: rows whose byte stride is
    // a multiple of 4 KiB share one L1 set, so element-wise scatters missed L1.
    let fill = |(block, rows): (usize, &mut [std::mem::MaybeUninit<f32>])| {
        let (k0, rows_here) = (block * TILE, rows.len() / n);
        let mut strip = [0f32; STRIP * TILE];
        for j0 in (0..n).step_by(STRIP) {
            let width = STRIP.min(n - j0);
            for jj in 0..width {
                let at = (j0 + jj) * k + k0;
                strip[jj * TILE..jj * TILE + rows_here].copy_from_slice(&src[at..at + rows_here]);
            }
            for i in 0..rows_here {
                for (jj, out) in rows[i * n + j0..i * n + j0 + width].iter_mut().enumerate() {
                    out.write(strip[jj * TILE + i]);
                }
            }
        }
    };
    match parallel {
        true => dst.spare_capacity_mut().par_chunks_mut(TILE * n).enumerate().for_each(fill),
        false => dst.spare_capacity_mut().chunks_mut(TILE * n).enumerate().for_each(fill),
    }
    // SAFETY: the chunks cover all `n * k` elements and the loops above wrote each one.
    unsafe { dst.set_len(n * k) };
    dst
}

/// Whether `name` is a linear layer's 2-D weight rather than an embedding table (which
/// `index_select` reads, and which must stay contiguous).
pub fn is_linear_weight(name: &str, dims: &[usize]) -> bool {
    let layer = name.strip_suffix(".weight").map(|n| n.rsplit('.').next().unwrap_or(n));
    dims.len() == 2 && layer.is_some_and(|l| !l.contains("embed") && l != "shared" && l != "relative_attention_bias")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Shapes no tile or strip divides, one row, one column: the laid-out weight holds exactly
    /// the stored values, and both ways of transposing agree.
    #[test]
    fn laid_out_weights_hold_exactly_the_stored_values() -> Result<()> {
        for (n, k) in [(1, 1), (1, 300), (300, 1), (5, 513), (300, 17), (33, 260)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
            let laid_out = for_cpu_gemm(w.clone())?;
            assert_eq!(laid_out.dims(), &[n, k]);
            assert!(laid_out.t()?.is_contiguous(), "[{n}, {k}]");
            assert_eq!(laid_out.flatten_all()?.to_vec1::<f32>()?, w.flatten_all()?.to_vec1::<f32>()?, "[{n}, {k}]");
            let sequential = transpose(&w.flatten_all()?.to_vec1::<f32>()?, n, k, false);
            assert_eq!(sequential, w.t()?.flatten_all()?.to_vec1::<f32>()?, "[{n}, {k}]");
        }
        Ok(())
    }
}
