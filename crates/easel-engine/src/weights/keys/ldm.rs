//! Single-file Stable Diffusion checkpoints (SD 1.x, 2.x, SDXL) as A1111, ComfyUI and civitai
//! publish them, in the original latent-diffusion (LDM) names, split into diffusers' components
//! and renamed to diffusers' names, which easel's UNet, VAE and CLIP mirror:
//!
//! - `model.diffusion_model.*`: the UNet (`input_blocks`/`middle_block`/`output_blocks`);
//! - `first_stage_model.*`: the VAE (`encoder.down.N.block.M`, `decoder.up.N` in reverse order);
//! - `cond_stage_model.transformer.*` (SD 1.x) and `conditioner.embedders.0.transformer.*`
//!   (SDXL's CLIP-L): transformers' CLIP names already;
//! - `cond_stage_model.model.*` (SD 2.x) and `conditioner.embedders.1.model.*` (SDXL's CLIP-G):
//!   OpenCLIP's names, with q/k/v fused in `in_proj_weight` and `text_projection` transposed.
//!
//! The UNet's block structure is read off the tensors (a downsampler's `op` ends a down block),
//! so no config is needed to rename; the config only decides the shapes that are then checked.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use crate::error::{EngineError, Result};

/// Which model a single file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LdmFamily {
    /// SD 1.x: CLIP-L in transformers' names.
    Sd1,
    /// SD 2.x: OpenCLIP-H.
    Sd2,
    /// SDXL base: CLIP-L and OpenCLIP-bigG.
    Sdxl,
}

/// What [`detect`] reads off a checkpoint's tensor names and shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LdmArchitecture {
    pub family: LdmFamily,
    /// The UNet's `conv_in` takes 9 channels (latents, mask, masked-image latents).
    pub inpainting: bool,
}

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const SD1_CLIP: &str = "cond_stage_model.transformer.";
const SD2_CLIP: &str = "cond_stage_model.model.";
const SDXL_CLIP_L: &str = "conditioner.embedders.0.transformer.";
const SDXL_CLIP_G: &str = "conditioner.embedders.1.model.";
/// Every component's prefix; other tensors (EMA copies, the noise schedule) are never read.
const COMPONENTS: [&str; 6] = [UNET, VAE, SD1_CLIP, SD2_CLIP, SDXL_CLIP_L, SDXL_CLIP_G];

/// Whether a tensor belongs to one of the components [`split`] keeps.
pub fn is_component(name: &str) -> bool {
    COMPONENTS.iter().any(|p| name.starts_with(p))
}

/// Reads the family off the names, or says why the file is not an SD single file.
pub fn detect(path: &Path, shapes: &HashMap<String, Vec<usize>>) -> Result<LdmArchitecture> {
    let has = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
    let bad = |message: String| EngineError::BadWeights { path: path.to_path_buf(), message };
    // FLUX's and SD 3.5's files may share the UNet's prefix (ComfyUI's, Stability's).
    let transformer = shapes.keys().any(|k| {
        let k = k.strip_prefix(UNET).unwrap_or(k);
        k.starts_with("double_blocks.") || k.starts_with("joint_blocks.")
    });
    if transformer {
        return Err(bad("a FLUX or SD 3.5 transformer, not a Stable Diffusion single-file checkpoint: it goes in --transformer with a diffusers folder as --model".into()));
    }
    if !has(UNET) {
        return Err(bad(format!("not a Stable Diffusion single-file checkpoint: no `{UNET}*` tensors")));
    }
    let family = if has(SDXL_CLIP_G) && has(SDXL_CLIP_L) {
        LdmFamily::Sdxl
    } else if has("conditioner.embedders.0.model.") {
        return Err(EngineError::Unsupported(format!("{}: an SDXL refiner checkpoint (CLIP-G only); easel runs SDXL base models", path.display())));
    } else if has(SD2_CLIP) {
        LdmFamily::Sd2
    } else if has(SD1_CLIP) {
        LdmFamily::Sd1
    } else {
        return Err(bad(format!("no text encoder found (expected `{SD1_CLIP}*`, `{SD2_CLIP}*` or `conditioner.embedders.*`)")));
    };
    if !has(VAE) {
        return Err(bad(format!("no VAE found (expected `{VAE}*` tensors)")));
    }
    let conv_in = shapes.get(&format!("{UNET}input_blocks.0.0.weight")).ok_or_else(|| bad(format!("tensor `{UNET}input_blocks.0.0.weight` is missing")))?;
    Ok(LdmArchitecture { family, inpainting: conv_in.get(1) == Some(&9) })
}

/// A single file's tensors in diffusers' components and names.
pub struct LdmComponents {
    pub unet: HashMap<String, Tensor>,
    pub vae: HashMap<String, Tensor>,
    /// CLIP-L (SD 1.x, SDXL) or OpenCLIP-H (SD 2.x).
    pub text_encoder: HashMap<String, Tensor>,
    /// SDXL's OpenCLIP-bigG.
    pub text_encoder_2: Option<HashMap<String, Tensor>>,
}

/// Splits and renames a checkpoint's tensors; tensors of no component (EMA copies, the noise
/// schedule) are dropped.
pub fn split(path: &Path, family: LdmFamily, tensors: HashMap<String, Tensor>) -> Result<LdmComponents> {
    let mut groups: HashMap<&str, HashMap<String, Tensor>> = HashMap::new();
    for (name, t) in tensors {
        if let Some(prefix) = COMPONENTS.iter().find(|p| name.starts_with(**p)) {
            groups.entry(prefix).or_default().insert(name[prefix.len()..].to_string(), t);
        }
    }
    let mut take = |prefix: &str| groups.remove(prefix).unwrap_or_default();
    let unet = unet(path, take(UNET))?;
    let vae = vae(take(VAE));
    let (text_encoder, text_encoder_2) = match family {
        LdmFamily::Sd1 => (clip(take(SD1_CLIP)), None),
        // SD 2.x files carry OpenCLIP's projection, which its pipeline never uses (diffusers
        // drops it too); kept, it would make the encoder a `...WithProjection`.
        LdmFamily::Sd2 => {
            let mut te = open_clip(path, take(SD2_CLIP))?;
            te.remove("text_projection.weight");
            (te, None)
        }
        LdmFamily::Sdxl => (clip(take(SDXL_CLIP_L)), Some(open_clip(path, take(SDXL_CLIP_G))?)),
    };
    Ok(LdmComponents { unet, vae, text_encoder, text_encoder_2 })
}

/// The block index and the rest of a name under `prefix` (`input_blocks.4.1.proj_in.weight` ->
/// `(4, "1.proj_in.weight")`).
fn indexed<'a>(name: &'a str, prefix: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(prefix)?;
    let (index, rest) = rest.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

/// ResBlock names (LDM) to ResnetBlock2D's (diffusers).
fn resnet(rest: &str) -> String {
    const RENAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (from, to) in RENAMES {
        if let Some(tail) = rest.strip_prefix(from) {
            return format!("{to}{tail}");
        }
    }
    rest.to_string()
}

/// An MLP's `0.`/`2.` (Linear, SiLU, Linear) to diffusers' `linear_1.`/`linear_2.`.
fn linear_pair(rest: &str) -> String {
    match rest.split_once('.') {
        Some(("0", tail)) => format!("linear_1.{tail}"),
        Some(("2", tail)) => format!("linear_2.{tail}"),
        _ => rest.to_string(),
    }
}

fn unet(path: &Path, tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    // Where each input block lands: walk them in order; `N.0.op` is a down block's downsampler.
    let inputs = tensors.keys().filter_map(|k| indexed(k, "input_blocks.")).map(|(i, _)| i).max().unwrap_or(0);
    let downsamplers: std::collections::HashSet<usize> =
        tensors.keys().filter_map(|k| indexed(k, "input_blocks.")).filter(|(_, rest)| rest.starts_with("0.op.")).map(|(i, _)| i).collect();
    let mut input_target: HashMap<usize, (usize, Option<usize>)> = HashMap::new();
    let (mut block, mut layer) = (0, 0);
    for i in 1..=inputs {
        if downsamplers.contains(&i) {
            input_target.insert(i, (block, None));
            block += 1;
            layer = 0;
        } else {
            input_target.insert(i, (block, Some(layer)));
            layer += 1;
        }
    }
    // The last down block has no downsampler: its layer count is the UNet's layers per block.
    let layers_per_block = layer.max(1);
    let mut out = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let new = if let Some(rest) = name.strip_prefix("time_embed.") {
            format!("time_embedding.{}", linear_pair(rest))
        } else if let Some(rest) = name.strip_prefix("label_emb.0.") {
            format!("add_embedding.{}", linear_pair(rest))
        } else if let Some(rest) = name.strip_prefix("input_blocks.0.0.") {
            format!("conv_in.{rest}")
        } else if let Some(rest) = name.strip_prefix("out.0.") {
            format!("conv_norm_out.{rest}")
        } else if let Some(rest) = name.strip_prefix("out.2.") {
            format!("conv_out.{rest}")
        } else if let Some((i, rest)) = indexed(&name, "input_blocks.") {
            let bad = || EngineError::BadWeights { path: path.to_path_buf(), message: format!("unexpected UNet tensor `model.diffusion_model.{name}`") };
            match (input_target.get(&i).ok_or_else(bad)?, rest.split_once('.').ok_or_else(bad)?) {
                ((b, None), (_, tail)) => format!("down_blocks.{b}.downsamplers.0.conv.{}", tail.strip_prefix("op.").ok_or_else(bad)?),
                ((b, Some(l)), ("0", tail)) => format!("down_blocks.{b}.resnets.{l}.{}", resnet(tail)),
                ((b, Some(l)), (_, tail)) => format!("down_blocks.{b}.attentions.{l}.{tail}"),
            }
        } else if let Some((i, rest)) = indexed(&name, "middle_block.") {
            match i {
                0 => format!("mid_block.resnets.0.{}", resnet(rest)),
                1 => format!("mid_block.attentions.0.{rest}"),
                _ => format!("mid_block.resnets.1.{}", resnet(rest)),
            }
        } else if let Some((i, rest)) = indexed(&name, "output_blocks.") {
            let (b, l) = (i / (layers_per_block + 1), i % (layers_per_block + 1));
            match rest.split_once('.') {
                Some(("0", tail)) => format!("up_blocks.{b}.resnets.{l}.{}", resnet(tail)),
                Some((_, tail)) if tail.starts_with("conv.") => format!("up_blocks.{b}.upsamplers.0.{tail}"),
                Some((_, tail)) => format!("up_blocks.{b}.attentions.{l}.{tail}"),
                None => name.clone(),
            }
        } else {
            name.clone()
        };
        out.insert(new, t);
    }
    Ok(out)
}

/// A ControlNet single file in LDM names (lllyasviel's `control_model.*`, or the same without
/// the prefix as ComfyUI's fp16 copies and thibaud's SD 2.1 ones ship it) to diffusers'
/// `ControlNetModel` names, as diffusers' `convert_controlnet_checkpoint` maps them: the UNet
/// copy as the UNet's encoder half; `input_hint_block.N` (convolutions at even N, SiLU between)
/// to the conditioning embedding's `conv_in`, `blocks` and `conv_out` (the last);
/// `zero_convs.N.0` to `controlnet_down_blocks.N`, `middle_block_out.0` to
/// `controlnet_mid_block`. A file already in diffusers' names is returned as it is.
pub fn controlnet(path: &Path, tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    if tensors.contains_key("time_embedding.linear_1.weight") {
        return Ok(tensors);
    }
    let tensors: HashMap<String, Tensor> = tensors.into_iter().map(|(k, t)| (k.strip_prefix("control_model.").map(str::to_string).unwrap_or(k), t)).collect();
    if !tensors.contains_key("time_embed.0.weight") {
        return Err(EngineError::BadWeights { path: path.to_path_buf(), message: "not a ControlNet: neither `time_embed.0.weight` (LDM names) nor `time_embedding.linear_1.weight` (diffusers')".into() });
    }
    let mut hint: Vec<usize> = tensors.keys().filter_map(|k| indexed(k, "input_hint_block.")).map(|(i, _)| i).collect();
    hint.sort_unstable();
    hint.dedup();
    let last_hint = hint.last().copied().unwrap_or(0);
    let (mut own, mut unet_part) = (HashMap::new(), HashMap::new());
    for (name, t) in tensors {
        let renamed = if let Some((i, rest)) = indexed(&name, "input_hint_block.") {
            Some(match i {
                0 => format!("controlnet_cond_embedding.conv_in.{rest}"),
                i if i == last_hint => format!("controlnet_cond_embedding.conv_out.{rest}"),
                i => format!("controlnet_cond_embedding.blocks.{}.{rest}", hint.iter().position(|&h| h == i).unwrap_or(1) - 1),
            })
        } else if let Some((i, rest)) = indexed(&name, "zero_convs.") {
            Some(format!("controlnet_down_blocks.{i}.{}", rest.strip_prefix("0.").unwrap_or(rest)))
        } else {
            name.strip_prefix("middle_block_out.0.").map(|rest| format!("controlnet_mid_block.{rest}"))
        };
        match renamed {
            Some(new) => own.insert(new, t),
            None => unet_part.insert(name, t),
        };
    }
    own.extend(unet(path, unet_part)?);
    Ok(own)
}

/// The VAE: LDM's `down.N.block.M`/`up.N.block.M`/`mid.block_1` to diffusers' blocks (the
/// decoder's `up` list runs from the lowest resolution in diffusers, the highest in LDM).
fn vae(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let ups = tensors.keys().filter_map(|k| indexed(k, "decoder.up.")).map(|(i, _)| i + 1).max().unwrap_or(0);
    let vae_resnet = |rest: &str| rest.replacen("nin_shortcut.", "conv_shortcut.", 1);
    let mid = |rest: &str| -> String {
        if let Some(r) = rest.strip_prefix("block_1.") {
            return format!("mid_block.resnets.0.{}", vae_resnet(r));
        }
        if let Some(r) = rest.strip_prefix("block_2.") {
            return format!("mid_block.resnets.1.{}", vae_resnet(r));
        }
        let attention = rest.strip_prefix("attn_1.").unwrap_or(rest);
        const RENAMES: [(&str, &str); 5] = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")];
        let renamed = RENAMES.iter().find_map(|(from, to)| attention.strip_prefix(from).map(|t| format!("{to}{t}")));
        format!("mid_block.attentions.0.{}", renamed.unwrap_or_else(|| attention.to_string()))
    };
    let mut out = HashMap::with_capacity(tensors.len());
    for (name, t) in tensors {
        let new = match name.split_once('.') {
            Some((side @ ("encoder" | "decoder"), rest)) => {
                let body = if let Some(r) = rest.strip_prefix("mid.") {
                    mid(r)
                } else if let Some(r) = rest.strip_prefix("norm_out.") {
                    format!("conv_norm_out.{r}")
                } else if let Some((i, r)) = indexed(rest, "down.") {
                    match r.strip_prefix("downsample.") {
                        Some(conv) => format!("down_blocks.{i}.downsamplers.0.{conv}"),
                        None => format!("down_blocks.{i}.resnets.{}", vae_resnet(r.strip_prefix("block.").unwrap_or(r))),
                    }
                } else if let Some((i, r)) = indexed(rest, "up.") {
                    let b = ups - 1 - i;
                    match r.strip_prefix("upsample.") {
                        Some(conv) => format!("up_blocks.{b}.upsamplers.0.{conv}"),
                        None => format!("up_blocks.{b}.resnets.{}", vae_resnet(r.strip_prefix("block.").unwrap_or(r))),
                    }
                } else {
                    rest.to_string()
                };
                format!("{side}.{body}")
            }
            _ => name.clone(),
        };
        out.insert(new, t);
    }
    out
}

/// transformers' CLIP names, under `text_model.` (older exports leave that level out).
fn clip(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .map(|(name, t)| if name.starts_with("text_model.") || name == "text_projection.weight" { (name, t) } else { (format!("text_model.{name}"), t) })
        .collect()
}

/// OpenCLIP's text tower to transformers' `CLIPTextModel(WithProjection)` names.
fn open_clip(path: &Path, tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(tensors.len() + 8);
    for (name, t) in tensors {
        let layer = |i: usize, rest: &str| format!("text_model.encoder.layers.{i}.{rest}");
        match name.as_str() {
            "token_embedding.weight" => _ = out.insert("text_model.embeddings.token_embedding.weight".into(), t),
            "positional_embedding" => _ = out.insert("text_model.embeddings.position_embedding.weight".into(), t),
            "ln_final.weight" | "ln_final.bias" => _ = out.insert(name.replacen("ln_final.", "text_model.final_layer_norm.", 1), t),
            "text_projection" => _ = out.insert("text_projection.weight".into(), t.t()?.contiguous()?),
            _ => {
                let Some((i, rest)) = indexed(&name, "transformer.resblocks.") else { continue };
                if let Some(kind) = rest.strip_prefix("attn.in_proj_") {
                    let rows = t.dim(0)? / 3;
                    if rows * 3 != t.dim(0)? {
                        return Err(EngineError::BadWeights { path: path.to_path_buf(), message: format!("`{name}` has {} rows, not a multiple of 3", t.dim(0)?) });
                    }
                    for (j, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                        out.insert(layer(i, &format!("self_attn.{proj}.{kind}")), t.narrow(0, j * rows, rows)?.contiguous()?);
                    }
                    continue;
                }
                const RENAMES: [(&str, &str); 5] =
                    [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")];
                if let Some(renamed) = RENAMES.iter().find_map(|(from, to)| rest.strip_prefix(from).map(|tail| format!("{to}{tail}"))) {
                    out.insert(layer(i, &renamed), t);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensors(names: &[&str]) -> HashMap<String, Tensor> {
        names.iter().map(|n| (n.to_string(), Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu).unwrap())).collect()
    }

    #[test]
    fn unet_blocks_are_read_off_the_downsamplers() {
        // Two layers per block, three blocks: input 1-2 block 0, 3 its downsampler, 4-5 block 1, 6 op, 7-8 block 2.
        let names = [
            "input_blocks.1.0.in_layers.0.weight",
            "input_blocks.2.1.proj_in.weight",
            "input_blocks.3.0.op.weight",
            "input_blocks.5.0.skip_connection.weight",
            "input_blocks.6.0.op.bias",
            "input_blocks.8.0.emb_layers.1.weight",
            "output_blocks.2.1.conv.weight",
            "output_blocks.5.2.conv.weight",
            "output_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
            "output_blocks.8.0.out_layers.3.bias",
            "middle_block.2.in_layers.2.weight",
            "label_emb.0.2.bias",
        ];
        let out = unet(Path::new("x"), tensors(&names)).unwrap();
        let mut got: Vec<_> = out.keys().cloned().collect();
        got.sort();
        let mut want = vec![
            "down_blocks.0.resnets.0.norm1.weight",
            "down_blocks.0.attentions.1.proj_in.weight",
            "down_blocks.0.downsamplers.0.conv.weight",
            "down_blocks.1.resnets.1.conv_shortcut.weight",
            "down_blocks.1.downsamplers.0.conv.bias",
            "down_blocks.2.resnets.1.time_emb_proj.weight",
            "up_blocks.0.upsamplers.0.conv.weight",
            "up_blocks.1.upsamplers.0.conv.weight",
            "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q.weight",
            "up_blocks.2.resnets.2.conv2.bias",
            "mid_block.resnets.1.conv1.weight",
            "add_embedding.linear_2.bias",
        ];
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn vae_up_blocks_run_in_reverse() {
        let names = ["decoder.up.0.block.1.nin_shortcut.weight", "decoder.up.2.upsample.conv.bias", "encoder.mid.attn_1.proj_out.weight", "encoder.down.1.downsample.conv.weight", "decoder.norm_out.bias"];
        let mut got: Vec<_> = vae(tensors(&names)).into_keys().collect();
        got.sort();
        let mut want = vec![
            "decoder.up_blocks.2.resnets.1.conv_shortcut.weight",
            "decoder.up_blocks.0.upsamplers.0.conv.bias",
            "encoder.mid_block.attentions.0.to_out.0.weight",
            "encoder.down_blocks.1.downsamplers.0.conv.weight",
            "decoder.conv_norm_out.bias",
        ];
        want.sort();
        assert_eq!(got, want);
    }
}
