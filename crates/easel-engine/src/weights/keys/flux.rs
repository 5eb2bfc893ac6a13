//! The one place that maps FLUX transformer weight names between the diffusers layout
//! (`transformer_blocks.N.attn.to_q`, ...) and Black Forest Labs' (`double_blocks.N.img_attn.qkv`,
//! ...), which easel's transformer uses. diffusers splits projections that BFL fuses (q/k/v, and
//! q/k/v plus the MLP input in single blocks) and orders the final modulation (scale, shift)
//! where BFL has (shift, scale).

use super::{fuse, move_tensor, swap_halves, Layout, RowMap};
use crate::error::{EngineError, Result};
use crate::weights::store::Weights;

/// Prefixes single-file checkpoints put before BFL names (ComfyUI's full checkpoints).
const BFL_PREFIXES: [&str; 2] = ["model.diffusion_model.", "diffusion_model."];

/// Detects the layout and renames to BFL names in place.
pub fn to_bfl(w: &mut Weights) -> Result<Layout> {
    for prefix in BFL_PREFIXES {
        w.strip_prefix(prefix);
    }
    let has = |w: &Weights, p: &str| w.names().any(|n| n.starts_with(p));
    if has(w, "double_blocks.") || has(w, "img_in.") {
        return Ok(Layout::Reference);
    }
    if !(has(w, "transformer_blocks.") || has(w, "x_embedder.")) {
        let sample: Vec<_> = w.names().take(3).cloned().collect();
        return Err(EngineError::BadWeights {
            path: w.origin().to_path_buf(),
            message: format!("not a FLUX transformer: neither BFL names (double_blocks.*) nor diffusers names (transformer_blocks.*) found; first names: {sample:?}"),
        });
    }
    let blocks = |w: &Weights, prefix: &str| -> usize {
        w.names().filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok()).map(|i| i.saturating_add(1)).max().unwrap_or(0)
    };
    let (double, single) = (blocks(w, "transformer_blocks."), blocks(w, "single_transformer_blocks."));
    let renames = renames(double, single);
    for (diffusers, bfl) in &renames {
        for p in ["weight", "bias"] {
            move_tensor(w, &format!("{diffusers}.{p}"), format!("{bfl}.{p}"))?;
        }
    }
    for i in 0..double {
        let (d, b) = (format!("transformer_blocks.{i}"), format!("double_blocks.{i}"));
        for p in ["weight", "bias"] {
            fuse(w, &["to_q", "to_k", "to_v"].map(|x| format!("{d}.attn.{x}.{p}")), format!("{b}.img_attn.qkv.{p}"))?;
            fuse(w, &["add_q_proj", "add_k_proj", "add_v_proj"].map(|x| format!("{d}.attn.{x}.{p}")), format!("{b}.txt_attn.qkv.{p}"))?;
        }
        for (dn, bn) in [("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"), ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")] {
            move_tensor(w, &format!("{d}.attn.{dn}.weight"), format!("{b}.{bn}.scale"))?;
        }
    }
    for i in 0..single {
        let (d, b) = (format!("single_transformer_blocks.{i}"), format!("single_blocks.{i}"));
        for p in ["weight", "bias"] {
            let parts = [format!("{d}.attn.to_q.{p}"), format!("{d}.attn.to_k.{p}"), format!("{d}.attn.to_v.{p}"), format!("{d}.proj_mlp.{p}")];
            fuse(w, &parts, format!("{b}.linear1.{p}"))?;
        }
        move_tensor(w, &format!("{d}.attn.norm_q.weight"), format!("{b}.norm.query_norm.scale"))?;
        move_tensor(w, &format!("{d}.attn.norm_k.weight"), format!("{b}.norm.key_norm.scale"))?;
    }
    // A ControlNet has no output layer; a transformer without one fails the shape check later.
    if w.names().any(|n| n == "norm_out.linear.weight") {
        for p in ["weight", "bias"] {
            swap_halves(w, &format!("norm_out.linear.{p}"), format!("final_layer.adaLN_modulation.1.{p}"))?;
        }
    }
    Ok(Layout::Diffusers)
}

/// One-to-one renames outside the blocks (without `.weight`/`.bias`), diffusers to BFL.
const TOP_RENAMES: [(&str, &str); 9] = [
    ("x_embedder", "img_in"),
    ("context_embedder", "txt_in"),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("proj_out", "final_layer.linear"),
];

/// One-to-one renames within double-stream blocks.
const DOUBLE_RENAMES: [(&str, &str); 8] = [
    ("norm1.linear", "img_mod.lin"),
    ("norm1_context.linear", "txt_mod.lin"),
    ("attn.to_out.0", "img_attn.proj"),
    ("attn.to_add_out", "txt_attn.proj"),
    ("ff.net.0.proj", "img_mlp.0"),
    ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"),
    ("ff_context.net.2", "txt_mlp.2"),
];

/// One-to-one renames within single-stream blocks.
const SINGLE_RENAMES: [(&str, &str); 2] = [("norm.linear", "modulation.lin"), ("proj_out", "linear2")];

/// One-to-one renames (without `.weight`/`.bias`), diffusers to BFL.
fn renames(double: usize, single: usize) -> Vec<(String, String)> {
    let mut r: Vec<(String, String)> = TOP_RENAMES.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    for i in 0..double {
        r.extend(DOUBLE_RENAMES.iter().map(|(d, b)| (format!("transformer_blocks.{i}.{d}"), format!("double_blocks.{i}.{b}"))));
    }
    for i in 0..single {
        r.extend(SINGLE_RENAMES.iter().map(|(d, b)| (format!("single_transformer_blocks.{i}.{d}"), format!("single_blocks.{i}.{b}"))));
    }
    r
}

/// Where a diffusers module's output rows live in BFL's weights (for LoRAs in diffusers
/// format): the BFL module and how rows map. Split q/k/v land in row ranges of fused weights;
/// the final modulation's two halves swap.
pub fn diffusers_module_to_bfl(module: &str, hidden: usize, mlp: usize) -> Option<(String, Vec<RowMap>)> {
    let whole = |m: String| Some((m, vec![(None, None)]));
    let slice = |m: String, start: usize, n: usize| Some((m, vec![(None, Some((start, n)))]));
    if module == "norm_out.linear" {
        let h = hidden;
        return Some(("final_layer.adaLN_modulation.1".into(), vec![(Some((0, h)), Some((h, h))), (Some((h, h)), Some((0, h)))]));
    }
    if let Some((_, b)) = TOP_RENAMES.iter().find(|(d, _)| *d == module) {
        return whole(b.to_string());
    }
    let block = |prefix: &str| -> Option<(usize, &str)> {
        let rest = module.strip_prefix(prefix)?;
        let (i, tail) = rest.split_once('.')?;
        Some((i.parse().ok()?, tail))
    };
    if let Some((i, tail)) = block("single_transformer_blocks.") {
        let b = format!("single_blocks.{i}");
        if let Some((_, to)) = SINGLE_RENAMES.iter().find(|(d, _)| *d == tail) {
            return whole(format!("{b}.{to}"));
        }
        return match tail {
            "attn.to_q" => slice(format!("{b}.linear1"), 0, hidden),
            "attn.to_k" => slice(format!("{b}.linear1"), hidden, hidden),
            "attn.to_v" => slice(format!("{b}.linear1"), 2 * hidden, hidden),
            "proj_mlp" => slice(format!("{b}.linear1"), 3 * hidden, mlp),
            _ => None,
        };
    }
    if let Some((i, tail)) = block("transformer_blocks.") {
        let b = format!("double_blocks.{i}");
        if let Some((_, to)) = DOUBLE_RENAMES.iter().find(|(d, _)| *d == tail) {
            return whole(format!("{b}.{to}"));
        }
        let (stream, k) = match tail {
            "attn.to_q" => ("img", 0),
            "attn.to_k" => ("img", 1),
            "attn.to_v" => ("img", 2),
            "attn.add_q_proj" => ("txt", 0),
            "attn.add_k_proj" => ("txt", 1),
            "attn.add_v_proj" => ("txt", 2),
            _ => return None,
        };
        return slice(format!("{b}.{stream}_attn.qkv"), k * hidden, hidden);
    }
    None
}
