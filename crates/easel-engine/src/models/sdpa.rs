//! Scaled dot-product attention, `softmax(Q Kᵀ · scale) V`, the one place the UNets', FLUX's and
//! the VAE's attention is computed, so the kernel is chosen per device in one place:
//!
//! - CUDA, f16/bf16, built with `--features flash-attn`: FlashAttention-2 (candle-flash-attn),
//!   which never materialises the tokens x tokens score matrix. Its 53 kernels take hours to
//!   compile on a small machine, so tools/gpu/build.sh builds it only with `--flash-attn`.
//! - The CPU in f32: one fused kernel ([`FusedCpuAttention`]), parallel over batch, head and
//!   block of query rows, each task holding one block of scores in its thread's buffer (candle
//!   wrote, scaled and copied whole score matrices: most of a bundled-model UNet step).
//! - Other devices, while the scores for every batch and head fit [`SCORE_BUDGET`] elements:
//!   two matrix products around a softmax, as diffusers' default processor.
//! - Beyond that: tiled attention with an online softmax (FlashAttention's recurrence, in
//!   candle ops). Queries go in row blocks and keys in column blocks so that one block of scores
//!   holds at most the budget; a running row maximum and row sum rescale the partial outputs.
//!   Without it one 2048x2048 SD request asks for the whole `[b, heads, n, n]` matrix at once
//!   (tens of GiB) and the allocator aborts the process.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use super::vector_math::softmax_in_place;

/// Score elements one attention block may hold.
pub const SCORE_BUDGET: usize = 64 << 20;
/// Those scores' bytes in f32 (256 MiB), for memory estimates.
pub const SCORE_BLOCK_BYTES: u64 = SCORE_BUDGET as u64 * 4;

/// Attention over `q` `[b, heads, n, d]`, `k` and `v` `[b, heads, m, d]` (any strides); returns
/// `[b, heads, n, d]` (on the CPU, a view of `[b, n, heads, d]` storage, which is the layout the
/// callers' output projections read).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "flash-attn")]
    if let Some(out) = flash(q, k, v, scale)? {
        return Ok(out);
    }
    if [q, k, v].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32) {
        return q.apply_op3_no_bwd(k, v, &FusedCpuAttention { scale: scale as f32 })?.transpose(1, 2);
    }
    attention_within(&q.contiguous()?, &k.contiguous()?, v, scale, SCORE_BUDGET)
}

/// The CPU kernel: for each batch, head and block of query rows (one rayon task each), the block
/// of scores `Q_blk Kᵀ · scale` into a per-thread buffer, the vectorised softmax in place, then
/// `P V` into the output: three steps on data in cache, never more than a block's scores per
/// thread, no copies of Q, K or V (the GEMMs read them through their strides).
#[derive(Debug)]
struct FusedCpuAttention {
    scale: f32,
}

/// Scores one task's block may hold (1 MiB of f32), within which query blocks are 16 to 128 rows.
const TASK_SCORES: usize = 1 << 18;

thread_local! {
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A strided 4-D operand: its storage from its start offset, and its strides.
struct Operand<'a> {
    data: &'a [f32],
    stride: [usize; 4],
}

fn operand<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<Operand<'a>> {
    let data = &storage.as_slice::<f32>()?[layout.start_offset()..];
    let s = layout.stride();
    if s.len() != 4 {
        candle_core::bail!("attention: expected 4-D q, k and v, got {:?}", layout.dims());
    }
    // The last element any stride can reach must be inside the storage: the GEMMs read raw.
    let last: usize = layout.dims().iter().zip(s).map(|(&d, &st)| d.saturating_sub(1) * st).sum();
    if layout.dims().iter().all(|&d| d > 0) && last >= data.len() {
        candle_core::bail!("attention: the layout {:?} reaches past its storage", layout.dims());
    }
    Ok(Operand { data, stride: [s[0], s[1], s[2], s[3]] })
}

impl CustomOp3 for FusedCpuAttention {
    fn name(&self) -> &'static str {
        "easel-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, n, d) = l1.shape().dims4()?;
        let (kb, kh, m, kd) = l2.shape().dims4()?;
        let (vb, vh, vm, dv) = l3.shape().dims4()?;
        if (kb, kh, kd) != (b, h, d) || (vb, vh, vm) != (b, h, m) {
            candle_core::bail!("attention: q {:?}, k {:?} and v {:?} do not fit", l1.dims(), l2.dims(), l3.dims());
        }
        if m == 0 {
            candle_core::bail!("attention over zero keys");
        }
        let (q, k, v) = (operand(s1, l1)?, operand(s2, l2)?, operand(s3, l3)?);
        // Output storage [b, n, h, dv]: row r of head `head` is at ((batch*n + r)*h + head)*dv.
        let mut out = vec![0f32; b * n * h * dv];
        let rows = (TASK_SCORES / m).clamp(16, 128).min(n.max(1));
        let blocks = n.div_ceil(rows);
        let out_ptr = OutPtr(out.as_mut_ptr());
        let scale = self.scale;
        (0..b * h * blocks).into_par_iter().for_each(|task| {
            let (plane, block) = (task / blocks, task % blocks);
            let (batch, head) = (plane / h, plane % h);
            let r0 = block * rows;
            let len = rows.min(n - r0);
            SCORES.with(|cell| {
                let mut scores = cell.borrow_mut();
                if scores.len() < len * m {
                    scores.resize(len * m, 0.0);
                }
                let scores = &mut scores[..len * m];
                let q0 = batch * q.stride[0] + head * q.stride[1] + r0 * q.stride[2];
                let k0 = batch * k.stride[0] + head * k.stride[1];
                let v0 = batch * v.stride[0] + head * v.stride[1];
                let o0 = ((batch * n + r0) * h + head) * dv;
                // SAFETY: the operands' last reachable elements are inside their storage
                // (checked in `operand`); the scores buffer is len x m; the output rows of this
                // task, o0 + i*h*dv + j for i < len, j < dv, belong to this (batch, head, block)
                // only, so no two tasks write the same element.
                unsafe {
                    // scores[len, m] = scale * Q_blk[len, d] Kᵀ[d, m]
                    gemm::gemm(
                        len, m, d,
                        scores.as_mut_ptr(), 1, m as isize, false,
                        q.data.as_ptr().add(q0), q.stride[3] as isize, q.stride[2] as isize,
                        k.data.as_ptr().add(k0), k.stride[2] as isize, k.stride[3] as isize,
                        0.0, scale, false, false, false, gemm::Parallelism::None,
                    );
                    for row in scores.chunks_mut(m) {
                        softmax_in_place(row);
                    }
                    // out[len, dv] = P[len, m] V[m, dv]
                    gemm::gemm(
                        len, dv, m,
                        out_ptr.at(o0), 1, (h * dv) as isize, false,
                        scores.as_ptr(), 1, m as isize,
                        v.data.as_ptr().add(v0), v.stride[3] as isize, v.stride[2] as isize,
                        0.0, 1.0, false, false, false, gemm::Parallelism::None,
                    );
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n, h, dv))))
    }
}

/// The output pointer shared by the tasks, each of which writes its own rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks write disjoint elements (see `cpu_fwd`), and the buffer outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element at `offset` (a method, so closures capture the whole `Send` wrapper).
    ///
    /// # Safety
    /// `offset` must be inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut f32 {
        unsafe { self.0.add(offset) }
    }
}

/// Attention through candle's operations (devices without a fused kernel), holding at most
/// `budget` score elements at a time (the tiled form beyond it). `q` and `k` must be contiguous.
pub fn attention_within(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, budget: usize) -> Result<Tensor> {
    let (b, h, n, _) = q.dims4()?;
    let m = k.dim(2)?;
    let planes = b * h;
    let v = v.contiguous()?;
    if planes * n * m <= budget {
        return direct(q, k, &v, scale);
    }
    // Whole key rows per query block where at least 64 query rows fit; else key blocks too.
    let (q_rows, k_cols) = match budget / (planes * m) {
        rows if rows >= 64 => (rows.min(n), m),
        _ => {
            let rows = n.min(64);
            (rows, (budget / (planes * rows)).clamp(1, m))
        }
    };
    let mut blocks = Vec::with_capacity(n.div_ceil(q_rows));
    for start in (0..n).step_by(q_rows) {
        let qb = q.narrow(2, start, q_rows.min(n - start))?;
        blocks.push(if k_cols == m { direct(&qb, k, &v, scale)? } else { online_softmax_block(&qb, k, &v, scale, k_cols)? });
    }
    Tensor::cat(&blocks, 2)
}

/// Two matrix products around a softmax, all keys at once.
fn direct(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?.matmul(v)
}

/// One query block against every key, `k_cols` keys at a time, with the online softmax:
/// `out = Σ_j exp(s_j - max) v_j / Σ_j exp(s_j - max)`, the maximum and sums carried in f32.
fn online_softmax_block(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, k_cols: usize) -> Result<Tensor> {
    let m = k.dim(2)?;
    let dtype = q.dtype();
    let mut row_max: Option<Tensor> = None;
    let mut row_sum: Option<Tensor> = None;
    let mut acc: Option<Tensor> = None;
    for start in (0..m).step_by(k_cols) {
        let len = k_cols.min(m - start);
        let kb = k.narrow(2, start, len)?;
        let vb = v.narrow(2, start, len)?.to_dtype(DType::F32)?;
        let scores = (q.matmul(&kb.t()?)?.to_dtype(DType::F32)? * scale)?;
        let block_max = scores.max_keepdim(D::Minus1)?;
        let new_max = match &row_max {
            Some(prev) => prev.maximum(&block_max)?,
            None => block_max,
        };
        let p = scores.broadcast_sub(&new_max)?.exp()?;
        let p_sum = p.sum_keepdim(D::Minus1)?;
        let pv = p.matmul(&vb)?;
        (row_sum, acc) = match (row_sum, acc, &row_max) {
            (Some(sum), Some(out), Some(prev)) => {
                let correction = (prev - &new_max)?.exp()?;
                (Some((sum * &correction)?.add(&p_sum)?), Some(out.broadcast_mul(&correction)?.add(&pv)?))
            }
            _ => (Some(p_sum), Some(pv)),
        };
        row_max = Some(new_max);
    }
    match (acc, row_sum) {
        (Some(out), Some(sum)) => out.broadcast_div(&sum)?.to_dtype(dtype),
        _ => candle_core::bail!("attention over zero keys"),
    }
}

/// FlashAttention-2 where it applies (CUDA, half precision, head size a multiple of 8 up to 256).
#[cfg(feature = "flash-attn")]
fn flash(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let head = q.dim(3)?;
    let half = matches!(q.dtype(), DType::F16 | DType::BF16);
    if !q.device().is_cuda() || !half || head % 8 != 0 || head > 256 {
        return Ok(None);
    }
    // candle-flash-attn takes `[b, n, heads, d]`.
    let bnhd = |t: &Tensor| t.transpose(1, 2)?.contiguous();
    let out = candle_flash_attn::flash_attn(&bnhd(q)?, &bnhd(k)?, &bnhd(v)?, scale as f32, false)?;
    Ok(Some(out.transpose(1, 2)?))
}
