//! q8_0 and q4_0 linear weights regrouped for an integer AVX2 kernel, so that a GGUF's q8_0
//! or q4_0 FLUX runs faster than its f32 original on CPUs without AVX-512 VNNI.
//!
//! Why: candle tiles q8_0 only for VNNI CPUs and q4_0 never, so on AVX2 both took its generic
//! path, one dot product per output value: q8_0 ran 3.9x and q4_0 4.8x slower than f32 on a
//! FLUX-shaped model (2-core AMD EPYC, 2026-12-02). Here eight output rows share each 32-byte
//! load (`[8 rows][4 k-values]`), four activation rows share each weight load, and a 32-value
//! block is summed in integers before its two scales are applied once.
//!
//! - q8_0 uses the sign trick (`maddubs(|w|, a * sign(w))`), because `maddubs` wants one
//!   unsigned operand and both are signed.
//! - q4_0's nibbles (0..15) are already unsigned: a whole block's products fit in 16 bits, so
//!   it needs two instructions per four k-values where q8_0 needs four, and it adds
//!   `-8 * sum(a)` per block for the nibbles' offset.
//!
//! Activations are quantized per 32 values to 8 bits as ggml's `quantize_row_q8_0` does
//! (the error candle's generic path has), with an f32 scale.
//!
//! A tiled weight holds the same bytes as the blocks it came from (a record is 8 rows' f16
//! scales, then their values) and gives them back exactly ([`QuantTiles::blocks`]). This module
//! knows no candle: [`crate::weights::store`] converts at load and runs it.

use rayon::prelude::*;

/// Rows of the weight that one record (and one AVX2 register) covers.
const ROWS: usize = 8;
/// Values per quantization block.
const BLOCK: usize = 32;
/// Activation rows one kernel call multiplies against each weight load.
const MAX_M: usize = 4;
/// Row groups one rayon task takes (their records stay in L2 while it sweeps every
/// activation row).
const GROUPS_PER_TASK: usize = 4;
/// Multiply-adds below which a product runs on the calling thread.
const SERIAL_BELOW: usize = 1 << 18;

/// Which GGML block type the values came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// `{ d: f16, qs: [i8; 32] }`, value `d * q`.
    Q8_0,
    /// `{ d: f16, qs: [u8; 16] }`, value `d * (nibble - 8)`; byte `j` holds values `j` (low)
    /// and `j + 16` (high).
    Q4_0,
}

impl QuantKind {
    /// Bytes of one GGML block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q8_0 => 2 + BLOCK,
            QuantKind::Q4_0 => 2 + BLOCK / 2,
        }
    }

    const fn value_bytes(self) -> usize {
        self.block_bytes() - 2
    }

    const fn record_bytes(self) -> usize {
        ROWS * self.block_bytes()
    }
}

/// An `[n, k]` weight in records of 8 rows by one block: `[n / 8][k / 32]`, each the 8 rows'
/// scales (f16 bits) then their values. q8_0 values are `[8 steps][8 rows][4]` (step `s` holds
/// k-values `4s..4s+4`); q4_0 values are `[4 steps][8 rows][4 bytes]`, the rows' own bytes
/// `4s..4s+4` (low nibbles: k-values `4s..`, high: `16 + 4s..`).
pub struct QuantTiles {
    kind: QuantKind,
    n: usize,
    k: usize,
    records: Vec<u8>,
}

/// Whether this CPU runs the kernel (AVX2 with FMA and F16C).
pub fn cpu_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl QuantTiles {
    /// Regroups `[n, k]` GGML blocks (row-major, `k / 32` blocks per row); `None` when the
    /// shape doesn't tile (`n` a multiple of 8, `k` of 32) or the byte count is wrong.
    pub fn from_blocks(kind: QuantKind, n: usize, k: usize, blocks: &[u8]) -> Option<Self> {
        let kb = k / BLOCK;
        let bb = kind.block_bytes();
        if n == 0 || k == 0 || n % ROWS != 0 || k % BLOCK != 0 || blocks.len() != n * kb * bb {
            return None;
        }
        let mut records = vec![0u8; blocks.len()];
        records.par_chunks_mut(kb * kind.record_bytes()).enumerate().for_each(|(group, out)| {
            for (b, record) in out.chunks_mut(kind.record_bytes()).enumerate() {
                let (scales, values) = record.split_at_mut(2 * ROWS);
                for r in 0..ROWS {
                    let block = &blocks[((group * ROWS + r) * kb + b) * bb..][..bb];
                    scales[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
                    for step in 0..kind.value_bytes() / 4 {
                        values[(step * ROWS + r) * 4..][..4].copy_from_slice(&block[2 + 4 * step..][..4]);
                    }
                }
            }
        });
        Some(Self { kind, n, k, records })
    }

    /// The GGML blocks this was made from, byte for byte.
    pub fn blocks(&self) -> Vec<u8> {
        let (kb, bb) = (self.k / BLOCK, self.kind.block_bytes());
        let mut blocks = vec![0u8; self.records.len()];
        for (group, records) in self.records.chunks(kb * self.kind.record_bytes()).enumerate() {
            for (b, record) in records.chunks(self.kind.record_bytes()).enumerate() {
                let (scales, values) = record.split_at(2 * ROWS);
                for r in 0..ROWS {
                    let block = &mut blocks[((group * ROWS + r) * kb + b) * bb..][..bb];
                    block[..2].copy_from_slice(&scales[2 * r..2 * r + 2]);
                    for step in 0..self.kind.value_bytes() / 4 {
                        block[2 + 4 * step..][..4].copy_from_slice(&values[(step * ROWS + r) * 4..][..4]);
                    }
                }
            }
        }
        blocks
    }

    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    /// `[n, k]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.n, self.k]
    }

    pub fn bytes(&self) -> usize {
        self.records.len()
    }

    /// `x W^T` for `x` `[m, k]` row-major; `[m, n]` row-major. Callers check
    /// [`cpu_supported`] first (the store tiles weights only then).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "activation length");
        assert!(cpu_supported(), "QuantTiles::matmul needs AVX2, FMA and F16C");
        let acts = Activations::quantize(x, m, self.k);
        let mut y = vec![0f32; m * self.n];
        let kb = self.k / BLOCK;
        let group_bytes = kb * self.kind.record_bytes();
        let y_addr = y.as_mut_ptr() as usize;
        let tasks = (self.n / ROWS).div_ceil(GROUPS_PER_TASK);
        let task = |task: usize| {
            let groups = task * GROUPS_PER_TASK..((task + 1) * GROUPS_PER_TASK).min(self.n / ROWS);
            let mut out = [[0f32; ROWS]; MAX_M];
            for m0 in (0..m).step_by(MAX_M) {
                let rows = MAX_M.min(m - m0);
                for group in groups.clone() {
                    let records = &self.records[group * group_bytes..][..group_bytes];
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: `cpu_supported` was asserted; `records` holds `kb` records and
                    // `acts` rows `m0..m0 + rows` hold `kb` blocks each.
                    unsafe {
                        avx2::run(self.kind, records, kb, &acts, m0, rows, &mut out)
                    }
                    for (i, values) in out[..rows].iter().enumerate() {
                        // SAFETY: each task writes only its own groups' columns of `y`, which
                        // outlives the parallel loop; rows `m0 + i < m`, columns `< n`.
                        let dst = unsafe { std::slice::from_raw_parts_mut((y_addr as *mut f32).add((m0 + i) * self.n + group * ROWS), ROWS) };
                        dst.copy_from_slice(values);
                    }
                }
            }
        };
        // Products of tiny layers (test models) are not worth waking the thread pool for.
        match m * self.n * self.k < SERIAL_BELOW {
            true => (0..tasks).for_each(task),
            false => (0..tasks).into_par_iter().for_each(task),
        }
        y
    }
}

/// `[m, k]` activations as 8-bit blocks: values, one scale per block, and each block's sum of
/// values (q4_0's offset term).
struct Activations {
    values: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
    k: usize,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, k: usize) -> Self {
        let kb = k / BLOCK;
        let mut values = vec![0i8; m * k];
        let mut scales = vec![0f32; m * kb];
        let mut sums = vec![0f32; m * kb];
        let block = |(((q, d), s), x): (((&mut [i8], &mut f32), &mut f32), &[f32])| {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            *d = amax / 127.0;
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in q.iter_mut().zip(x) {
                *q = (v * inv).round() as i8;
                sum += *q as i32;
            }
            *s = sum as f32;
        };
        match m * k < SERIAL_BELOW / 64 {
            true => values.chunks_mut(BLOCK).zip(scales.iter_mut()).zip(sums.iter_mut()).zip(x.chunks(BLOCK)).for_each(block),
            false => values.par_chunks_mut(BLOCK).zip(scales.par_iter_mut()).zip(sums.par_iter_mut()).zip(x.par_chunks(BLOCK)).for_each(block),
        }
        Self { values, scales, sums, k }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Activations, QuantKind, BLOCK, MAX_M, ROWS};
    use std::arch::x86_64::*;

    /// Four activation values from row `row` at column `at`, in every 32-bit lane.
    #[inline(always)]
    unsafe fn broadcast4(acts: &Activations, row: usize, at: usize) -> __m256i {
        _mm256_set1_epi32(std::ptr::read_unaligned(acts.values.as_ptr().add(row * acts.k + at) as *const i32))
    }

    /// Rows `m0..m0 + rows` of `acts` times one group's records, into `out[i][r]`. The row
    /// count is a constant in each kernel, so their accumulators stay in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run(kind: QuantKind, records: &[u8], kb: usize, acts: &Activations, m0: usize, rows: usize, out: &mut [[f32; ROWS]; MAX_M]) {
        match (kind, rows) {
            (QuantKind::Q8_0, 1) => q8_0::<1>(records, kb, acts, m0, out),
            (QuantKind::Q8_0, 2) => q8_0::<2>(records, kb, acts, m0, out),
            (QuantKind::Q8_0, 3) => q8_0::<3>(records, kb, acts, m0, out),
            (QuantKind::Q8_0, _) => q8_0::<MAX_M>(records, kb, acts, m0, out),
            (QuantKind::Q4_0, 1) => q4_0::<1>(records, kb, acts, m0, out),
            (QuantKind::Q4_0, 2) => q4_0::<2>(records, kb, acts, m0, out),
            (QuantKind::Q4_0, 3) => q4_0::<3>(records, kb, acts, m0, out),
            (QuantKind::Q4_0, _) => q4_0::<MAX_M>(records, kb, acts, m0, out),
        }
    }

    /// q8_0: `R` activation rows against one group. (Widening the 16-bit pair sums without
    /// `madd` — shifts, and one separation per block — was slower: it traded one multiply for
    /// three other operations, and the operation count, not the multiplier, is the limit.)
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0<const R: usize>(records: &[u8], kb: usize, acts: &Activations, m0: usize, out: &mut [[f32; ROWS]; MAX_M]) {
        let bytes = QuantKind::Q8_0.record_bytes();
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            let record = records.as_ptr().add(b * bytes);
            let mut sum = [_mm256_setzero_si256(); R];
            for step in 0..BLOCK / 4 {
                let w = _mm256_loadu_si256(record.add(2 * ROWS + step * 32) as *const __m256i);
                let w_abs = _mm256_abs_epi8(w);
                for i in 0..R {
                    let a = broadcast4(acts, m0 + i, b * BLOCK + 4 * step);
                    let pairs = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(a, w));
                    sum[i] = _mm256_add_epi32(sum[i], _mm256_madd_epi16(pairs, ones));
                }
            }
            let w_scale = _mm256_cvtph_ps(_mm_loadu_si128(record as *const __m128i));
            for i in 0..R {
                let scale = _mm256_mul_ps(w_scale, _mm256_set1_ps(acts.scales[(m0 + i) * kb + b]));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i]), scale, acc[i]);
            }
        }
        for i in 0..R {
            _mm256_storeu_ps(out[i].as_mut_ptr(), acc[i]);
        }
    }

    /// q4_0: the same. A block's products stay within 16 bits (16 products of at
    /// most 15 * 127 per lane), so it is summed in 16 bits and widened once.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0<const R: usize>(records: &[u8], kb: usize, acts: &Activations, m0: usize, out: &mut [[f32; ROWS]; MAX_M]) {
        let bytes = QuantKind::Q4_0.record_bytes();
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..kb {
            let record = records.as_ptr().add(b * bytes);
            let mut sum = [_mm256_setzero_si256(); R];
            for step in 0..BLOCK / 8 {
                let packed = _mm256_loadu_si256(record.add(2 * ROWS + step * 32) as *const __m256i);
                let w_low = _mm256_and_si256(packed, low);
                let w_high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                for i in 0..R {
                    let a_low = broadcast4(acts, m0 + i, b * BLOCK + 4 * step);
                    let a_high = broadcast4(acts, m0 + i, b * BLOCK + BLOCK / 2 + 4 * step);
                    let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(w_low, a_low), _mm256_maddubs_epi16(w_high, a_high));
                    sum[i] = _mm256_add_epi16(sum[i], pairs);
                }
            }
            let w_scale = _mm256_cvtph_ps(_mm_loadu_si128(record as *const __m128i));
            for i in 0..R {
                let at = (m0 + i) * kb + b;
                let total = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sum[i], ones)), _mm256_set1_ps(8.0 * acts.sums[at]));
                let scale = _mm256_mul_ps(w_scale, _mm256_set1_ps(acts.scales[at]));
                acc[i] = _mm256_fmadd_ps(total, scale, acc[i]);
            }
        }
        for i in 0..R {
            _mm256_storeu_ps(out[i].as_mut_ptr(), acc[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn values(n: usize, salt: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32 * 12.9898 + salt).sin() * 43758.547).fract() - 0.5).collect()
    }

    /// `x W^T` from the same 8-bit activations and the weight's blocks, in f64: what the
    /// kernel computes, with exact integer sums and no rounding of its own.
    fn reference(kind: QuantKind, blocks: &[u8], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let acts = Activations::quantize(x, m, k);
        let (kb, bb) = (k / BLOCK, kind.block_bytes());
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for b in 0..kb {
                    let block = &blocks[(j * kb + b) * bb..][..bb];
                    let d = half::f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f64();
                    let dot: i64 = (0..BLOCK)
                        .map(|t| {
                            let w = match kind {
                                QuantKind::Q8_0 => block[2 + t] as i8 as i64,
                                QuantKind::Q4_0 => (if t < 16 { block[2 + t] & 15 } else { block[2 + t - 16] >> 4 }) as i64 - 8,
                            };
                            w * acts.values[i * k + b * BLOCK + t] as i64
                        })
                        .sum();
                    y[i * n + j] += d * acts.scales[i * kb + b] as f64 * dot as f64;
                }
            }
        }
        y
    }

    /// Tiles hold ggml's blocks exactly, and their product equals the exact sum of the same
    /// 8-bit products to f32 rounding. Row counts around the kernel's 4 and across tasks,
    /// widths of one to many blocks, a weight with a fully negative block (q8_0's -128 edge
    /// comes from quantizing, never; the sign trick is checked on both signs).
    #[test]
    fn tiled_products_equal_the_exact_integer_sums_of_ggml_blocks() -> candle_core::Result<()> {
        if !cpu_supported() {
            println!("skipped: this CPU lacks AVX2, FMA or F16C");
            return Ok(());
        }
        for (kind, dtype) in [(QuantKind::Q8_0, GgmlDType::Q8_0), (QuantKind::Q4_0, GgmlDType::Q4_0)] {
            for (m, n, k) in [(1, 8, 32), (3, 16, 64), (4, 40, 96), (5, 24, 256), (9, 72, 160), (2, 8, 1024)] {
                let mut w = values(n * k, 0.3);
                w[..32].iter_mut().for_each(|v| *v = -v.abs() - 0.1);
                let x = values(m * k, 1.7);
                let q = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu)?, dtype)?;
                let blocks = q.data()?.to_vec();
                let tiles = QuantTiles::from_blocks(kind, n, k, &blocks).expect("tiles");
                assert_eq!(tiles.blocks(), blocks, "{kind:?} [{n}, {k}]");
                let y = tiles.matmul(&x, m);
                let want = reference(kind, &blocks, &x, m, n, k);
                let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
                let err = y.iter().zip(&want).fold(0f64, |a, (y, w)| a.max((*y as f64 - w).abs())) / scale;
                println!("{kind:?} m {m} n {n} k {k}: max error {err:.2e} of the largest output");
                assert!(err < 1e-6, "{kind:?} m {m} n {n} k {k}: {err}");
            }
        }
        Ok(())
    }

    #[test]
    fn shapes_that_do_not_tile_are_refused() {
        assert!(QuantTiles::from_blocks(QuantKind::Q8_0, 12, 32, &[0; 12 * 34]).is_none());
        assert!(QuantTiles::from_blocks(QuantKind::Q4_0, 8, 48, &[0; 8 * 18]).is_none());
        assert!(QuantTiles::from_blocks(QuantKind::Q4_0, 8, 32, &[0; 8 * 18 - 1]).is_none());
    }
}
