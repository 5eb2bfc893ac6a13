//! Scaled dot-product attention, `softmax(Q Kᵀ · scale) V`, the one place the UNets' and FLUX's
//! attention is computed, so the kernel is chosen per device in one place:
//!
//! - CUDA, f16/bf16, built with `--features flash-attn`: FlashAttention-2 (candle-flash-attn),
//!   which never materialises the tokens x tokens score matrix. Its 53 kernels take hours to
//!   compile on a small machine, so tools/gpu/build.sh builds it only with `--flash-attn`.
//! - Everywhere else: two matrix products around a softmax, as diffusers' default processor.

use candle_core::{Result, Tensor};

/// Attention over `q` `[b, heads, n, d]`, `k` and `v` `[b, heads, m, d]`; returns `[b, heads, n, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    #[cfg(feature = "flash-attn")]
    if let Some(out) = flash(q, k, v, scale)? {
        return Ok(out);
    }
    let scores = (q.matmul(&k.t()?)? * scale)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v.contiguous()?)
}

/// FlashAttention-2 where it applies (CUDA, half precision, head size a multiple of 8 up to 256).
#[cfg(feature = "flash-attn")]
fn flash(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    use candle_core::DType;
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
