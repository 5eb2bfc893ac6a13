//! SD 3 / 3.5 transformer weight names: diffusers' layout (`transformer_blocks.N.attn.to_q`,
//! ...) to Stability's (`joint_blocks.N.x_block.attn.qkv`, ...), which easel's MMDiT uses and
//! which Stability's single files (`sd3.5_large.safetensors`, under `model.diffusion_model.`)
//! and the community's GGUF files already have. diffusers splits what Stability fuses (q/k/v)
//! and orders the final modulation and the last context block's (scale, shift) where Stability
//! has (shift, scale).

use super::{fuse, move_tensor, swap_halves, Layout, RowMap};
use crate::error::{EngineError, Result};
use crate::weights::store::Weights;

/// Prefixes single-file checkpoints put before Stability's names.
const PREFIXES: [&str; 2] = ["model.diffusion_model.", "diffusion_model."];

/// One-to-one renames outside the blocks (without `.weight`/`.bias`), diffusers to Stability.
const TOP_RENAMES: [(&str, &str); 7] = [
    ("pos_embed.proj", "x_embedder.proj"),
    ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
    ("context_embedder", "context_embedder"),
    ("proj_out", "final_layer.linear"),
];

/// One-to-one renames within a joint block (the last block's `norm1_context` is swapped, not
/// renamed: see [`to_sai`]).
const BLOCK_RENAMES: [(&str, &str); 15] = [
    ("norm1.linear", "x_block.adaLN_modulation.1"),
    ("norm1_context.linear", "context_block.adaLN_modulation.1"),
    ("attn.to_out.0", "x_block.attn.proj"),
    ("attn.to_add_out", "context_block.attn.proj"),
    ("attn2.to_out.0", "x_block.attn2.proj"),
    ("ff.net.0.proj", "x_block.mlp.fc1"),
    ("ff.net.2", "x_block.mlp.fc2"),
    ("ff_context.net.0.proj", "context_block.mlp.fc1"),
    ("ff_context.net.2", "context_block.mlp.fc2"),
    ("attn.norm_q", "x_block.attn.ln_q"),
    ("attn.norm_k", "x_block.attn.ln_k"),
    ("attn.norm_added_q", "context_block.attn.ln_q"),
    ("attn.norm_added_k", "context_block.attn.ln_k"),
    ("attn2.norm_q", "x_block.attn2.ln_q"),
    ("attn2.norm_k", "x_block.attn2.ln_k"),
];

/// Per block, the q/k/v projections diffusers splits, and the fused weight they form.
const FUSED: [([&str; 3], &str); 3] = [
    (["attn.to_q", "attn.to_k", "attn.to_v"], "x_block.attn.qkv"),
    (["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"], "context_block.attn.qkv"),
    (["attn2.to_q", "attn2.to_k", "attn2.to_v"], "x_block.attn2.qkv"),
];

/// Detects the layout and renames to Stability's names in place.
pub fn to_sai(w: &mut Weights) -> Result<Layout> {
    for prefix in PREFIXES {
        w.strip_prefix(prefix);
    }
    let has = |w: &Weights, p: &str| w.names().any(|n| n.starts_with(p));
    if has(w, "joint_blocks.") {
        return Ok(Layout::Reference);
    }
    if !has(w, "transformer_blocks.") {
        let sample: Vec<_> = w.names().take(3).cloned().collect();
        return Err(EngineError::BadWeights {
            path: w.origin().to_path_buf(),
            message: format!("not an SD3 transformer: neither Stability's names (joint_blocks.*) nor diffusers' (transformer_blocks.*) found; first names: {sample:?}"),
        });
    }
    let blocks = w.names().filter_map(|n| n.strip_prefix("transformer_blocks.")?.split('.').next()?.parse::<usize>().ok()).map(|i| i + 1).max().unwrap_or(0);
    for p in ["weight", "bias"] {
        for (d, s) in TOP_RENAMES {
            move_tensor(w, &format!("{d}.{p}"), format!("{s}.{p}"))?;
        }
        swap_halves(w, &format!("norm_out.linear.{p}"), format!("final_layer.adaLN_modulation.1.{p}"))?;
    }
    move_tensor(w, "pos_embed.pos_embed", "pos_embed".into())?;
    for i in 0..blocks {
        let (d, s) = (format!("transformer_blocks.{i}"), format!("joint_blocks.{i}"));
        if i + 1 == blocks {
            for p in ["weight", "bias"] {
                swap_halves(w, &format!("{d}.norm1_context.linear.{p}"), format!("{s}.context_block.adaLN_modulation.1.{p}"))?;
            }
        }
        for (from, to) in BLOCK_RENAMES {
            for p in ["weight", "bias"] {
                move_tensor(w, &format!("{d}.{from}.{p}"), format!("{s}.{to}.{p}"))?;
            }
        }
        for (parts, to) in FUSED {
            if !w.names().any(|n| n.starts_with(&format!("{d}.{}.", parts[0]))) {
                continue;
            }
            for p in ["weight", "bias"] {
                fuse(w, &parts.map(|x| format!("{d}.{x}.{p}")), format!("{s}.{to}.{p}"))?;
            }
        }
    }
    Ok(Layout::Diffusers)
}

/// Where a diffusers module's output rows live in Stability's weights (for LoRAs in diffusers'
/// SD3 naming): split q/k/v land in row ranges of fused weights; the final modulation's and
/// the last context block's halves swap (`blocks` tells which block is last).
pub fn diffusers_module_to_sai(module: &str, hidden: usize, blocks: usize) -> Option<(String, Vec<RowMap>)> {
    let whole = |m: String| Some((m, vec![(None, None)]));
    let swapped = |m: String| Some((m, vec![(Some((0, hidden)), Some((hidden, hidden))), (Some((hidden, hidden)), Some((0, hidden)))]));
    if module == "norm_out.linear" {
        return swapped("final_layer.adaLN_modulation.1".into());
    }
    if let Some((_, s)) = TOP_RENAMES.iter().find(|(d, _)| *d == module) {
        return whole(s.to_string());
    }
    let rest = module.strip_prefix("transformer_blocks.")?;
    let (i, tail) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let b = format!("joint_blocks.{i}");
    if tail == "norm1_context.linear" && i + 1 == blocks {
        return swapped(format!("{b}.context_block.adaLN_modulation.1"));
    }
    if let Some((_, to)) = BLOCK_RENAMES.iter().find(|(d, _)| *d == tail) {
        return whole(format!("{b}.{to}"));
    }
    FUSED.iter().find_map(|(parts, to)| {
        let k = parts.iter().position(|p| *p == tail)?;
        Some((format!("{b}.{to}"), vec![(None, Some((k * hidden, hidden)))]))
    })
}
