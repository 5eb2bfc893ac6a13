//! Scaled dot-product attention, `softmax(Q Kᵀ · scale) V`, the one place the UNets', FLUX's and
//! the VAE's attention is computed, so the kernel is chosen per device in one place:
//!
//! - CUDA, f16/bf16, built with `--features flash-attn`: FlashAttention-2 (candle-flash-attn),
//!   which never materialises the tokens x tokens score matrix. Its 53 kernels take hours to
//!   compile on a small machine, so tools/gpu/build.sh builds it only with `--flash-attn`.
//! - Everywhere else, while the scores for every batch and head fit [`SCORE_BUDGET`] elements:
//!   two matrix products around a softmax, as diffusers' default processor (the fastest form).
//! - Beyond that: tiled attention with an online softmax (FlashAttention's recurrence, in
//!   candle ops). Queries go in row blocks and keys in column blocks so that one block of scores
//!   holds at most the budget; a running row maximum and row sum rescale the partial outputs.
//!   Without it one 2048x2048 SD request asks for the whole `[b, heads, n, n]` matrix at once
//!   (tens of GiB) and the allocator aborts the process.

use candle_core::{DType, Result, Tensor, D};

/// Score elements one attention block may hold.
pub const SCORE_BUDGET: usize = 64 << 20;
/// Those scores' bytes in f32 (256 MiB), for memory estimates.
pub const SCORE_BLOCK_BYTES: u64 = SCORE_BUDGET as u64 * 4;

/// Attention over `q` `[b, heads, n, d]`, `k` and `v` `[b, heads, m, d]`; returns `[b, heads, n, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "flash-attn")]
    if let Some(out) = flash(q, k, v, scale)? {
        return Ok(out);
    }
    attention_within(q, k, v, scale, SCORE_BUDGET)
}

/// [`attention`] holding at most `budget` score elements at a time (the tiled form beyond it).
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

/// Two matrix products around candle's fused softmax, all keys at once.
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
