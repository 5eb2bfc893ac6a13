//! LoRA files in the formats people publish, mapped onto a loaded model's weights.
//!
//! Formats: diffusers/PEFT (`unet.X.lora_A.weight`, `lora_B`, alphas in the
//! `lora_adapter_metadata` header or `.alpha` tensors; ComfyUI's `diffusion_model.X`) and kohya (`lora_unet_*`, `lora_te_*`,
//! `lora_te1_*`, `lora_te2_*` with `lora_down`/`lora_up`/`alpha`; SDXL's original
//! `input_blocks` names; FLUX's BFL names), linear and LoCon-style convolution layers.
//! A LoRA becomes a list of [`Adapter`]s: low-rank updates of named weights (a row range of a
//! fused weight where the format splits what the model fuses). Pipelines merge them into
//! full-precision weights, or run them beside quantized ones.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::store::{Param, Weights};
use crate::error::{EngineError, Result};

/// The networks a LoRA can touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    Transformer,
    TextEncoder,
    TextEncoder2,
}

impl Component {
    /// The diffusers folder name.
    pub fn name(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Transformer => "transformer",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// One entry of a stack: a LoRA file and its strength.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

/// A low-rank update `scale * up @ down` of `rows` of a weight (all rows when `None`).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub component: Component,
    /// The weight's name within its component (`...to_q.weight`).
    pub target: String,
    /// `(first row, count)` of a fused weight this update covers.
    pub rows: Option<(usize, usize)>,
    /// `[r, in]` or `[r, in, kh, kw]`.
    pub down: Tensor,
    /// `[out, r]` (1x1 convolution shapes are flattened).
    pub up: Tensor,
    /// `alpha / r` times the stack entry's scale.
    pub scale: f64,
}

/// What a model offers LoRAs: each component's weight names and shapes, and how its family
/// names modules.
pub struct LoraTargets {
    pub family: TargetFamily,
    pub weights: HashMap<Component, HashMap<String, Vec<usize>>>,
}

/// Naming schemes that differ by family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFamily {
    /// SD 1.x/2.x: diffusers UNet names (kohya writes them with underscores).
    StableDiffusion,
    /// SDXL: kohya may use the original `input_blocks`/`middle_block`/`output_blocks` names.
    StableDiffusionXl,
    /// FLUX: the transformer uses BFL names; diffusers-format LoRAs are mapped onto them.
    Flux { hidden: usize, mlp: usize },
    /// SD 3.5: the transformer uses Stability's names; diffusers-format LoRAs (diffusers' SD3
    /// naming) are mapped onto them.
    Sd3 { hidden: usize, blocks: usize },
}

impl TargetFamily {
    /// FLUX's naming for a transformer config (its width and MLP width place split q/k/v).
    pub fn flux(c: &crate::config::FluxTransformerConfig) -> Self {
        TargetFamily::Flux { hidden: c.hidden_size(), mlp: c.hidden_size() * 4 }
    }
}

const FORMATS_TRIED: &str = "diffusers/PEFT (unet.*/transformer.*/text_encoder*.* with lora_A/lora_B) and kohya (lora_unet_*/lora_te*_* with lora_down/lora_up/alpha)";

fn bad(path: &Path, message: String) -> EngineError {
    EngineError::BadWeights { path: path.to_path_buf(), message }
}

/// A LoRA stack read and mapped onto one model, its adapters in stack order.
pub struct LoadedStack {
    adapters: Vec<Adapter>,
}

impl LoadedStack {
    /// Reads every file of `stack` and maps it onto `targets`.
    pub fn load(stack: &[LoraSpec], targets: &LoraTargets) -> Result<Self> {
        let mut adapters = vec![];
        for spec in stack {
            adapters.extend(load_adapters(spec, targets)?);
        }
        Ok(Self { adapters })
    }

    /// The adapters for one component, in stack order.
    pub fn for_component(&self, c: Component) -> Vec<&Adapter> {
        self.adapters.iter().filter(|a| a.component == c).collect()
    }
}

/// Reads a LoRA file and maps it onto `targets`, with the stack entry's `scale`.
pub fn load_adapters(spec: &LoraSpec, targets: &LoraTargets) -> Result<Vec<Adapter>> {
    let path = &spec.path;
    if !spec.scale.is_finite() {
        return Err(EngineError::param("lora", format!("scale of {} must be a finite number", path.display())));
    }
    let tensors = crate::read_tensors(path)?;
    let metadata = read_metadata(path);
    // Group tensors by module: (down, up, alpha).
    let mut modules: HashMap<String, (Option<Tensor>, Option<Tensor>, Option<f64>)> = HashMap::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for key in names {
        let t = &tensors[key];
        let (module, slot) = if let Some(m) = key.strip_suffix(".lora_A.weight").or_else(|| key.strip_suffix(".lora_down.weight")) {
            (m, 0)
        } else if let Some(m) = key.strip_suffix(".lora_B.weight").or_else(|| key.strip_suffix(".lora_up.weight")) {
            (m, 1)
        } else if let Some(m) = key.strip_suffix(".alpha") {
            (m, 2)
        } else if key.ends_with(".dora_scale") {
            return Err(bad(path, format!("tensor `{key}`: DoRA is not supported")));
        } else {
            return Err(bad(path, format!("tensor `{key}` is not a LoRA tensor; formats tried: {FORMATS_TRIED}")));
        };
        let entry = modules.entry(module.to_string()).or_default();
        match slot {
            0 => entry.0 = Some(t.to_dtype(DType::F32)?),
            1 => entry.1 = Some(t.to_dtype(DType::F32)?),
            _ => entry.2 = Some(t.to_dtype(DType::F64)?.flatten_all()?.get(0)?.to_scalar::<f64>()?),
        }
    }
    if modules.is_empty() {
        return Err(bad(path, format!("no LoRA tensors found; formats tried: {FORMATS_TRIED}")));
    }
    let lookup = Lookup::new(targets);
    let mut keys: Vec<_> = modules.keys().cloned().collect();
    keys.sort();
    let mut adapters = vec![];
    for module in keys {
        let (down, up, alpha) = modules.remove(&module).unwrap_or_default();
        let (Some(down), Some(up)) = (down, up) else {
            return Err(bad(path, format!("LoRA module `{module}` lacks its down (lora_A) or up (lora_B) matrix")));
        };
        let (component, placements) = lookup.resolve(&module).ok_or_else(|| {
            bad(path, format!("LoRA module `{module}` matches no layer of this model; is it for another model family? (formats tried: {FORMATS_TRIED})"))
        })?;
        let rank = down.dim(0)?;
        let alpha = alpha.or_else(|| metadata_alpha(&metadata, &module));
        if rank == 0 || alpha.is_some_and(|a| !a.is_finite()) {
            return Err(bad(path, format!("LoRA module `{module}` has rank {rank} and alpha {alpha:?}; rank must be positive and alpha finite")));
        }
        let base_scale = alpha.map(|a| a / rank as f64).unwrap_or(1.0);
        let up = up.flatten_from(1)?;
        for (target, src, rows) in placements {
            let up_part = match src {
                Some((start, len)) => up.narrow(0, start, len)?,
                None => up.clone(),
            };
            check_shape(path, &module, targets, component, &target, rows, &down, &up_part)?;
            adapters.push(Adapter { component, target, rows, down: down.clone(), up: up_part, scale: base_scale * spec.scale });
        }
    }
    Ok(adapters)
}

#[allow(clippy::too_many_arguments)]
fn check_shape(path: &Path, module: &str, targets: &LoraTargets, c: Component, target: &str, rows: Option<(usize, usize)>, down: &Tensor, up: &Tensor) -> Result<()> {
    let shape = &targets.weights[&c][target];
    let out = rows.map(|r| r.1).unwrap_or(shape[0]);
    let mut want_down = vec![down.dim(0)?];
    want_down.extend_from_slice(&shape[1..]);
    let fits = up.dims() == [out, down.dim(0)?] && down.dims() == want_down.as_slice() && rows.is_none_or(|(s, n)| s + n <= shape[0]);
    if !fits {
        return Err(bad(
            path,
            format!(
                "LoRA module `{module}` (down {:?}, up {:?}) does not fit `{}.{target}` of shape {shape:?}; is it for another model or size?",
                down.dims(),
                up.dims(),
                c.name()
            ),
        ));
    }
    Ok(())
}

/// The safetensors header's `__metadata__` (reading the header only).
fn read_metadata(path: &Path) -> HashMap<String, String> {
    use std::io::Read;
    let read = || -> Option<HashMap<String, String>> {
        let mut f = std::fs::File::open(path).ok()?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).ok()?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return None;
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header).ok()?;
        let json: serde_json::Value = serde_json::from_slice(&header).ok()?;
        serde_json::from_value(json.get("__metadata__")?.clone()).ok()
    };
    read().unwrap_or_default()
}

/// PEFT's alpha for a diffusers-format module, from the `lora_adapter_metadata` header: the
/// `alpha_pattern` entry whose key ends the module's path, else `lora_alpha`.
fn metadata_alpha(metadata: &HashMap<String, String>, module: &str) -> Option<f64> {
    let json: serde_json::Value = serde_json::from_str(metadata.get("lora_adapter_metadata")?).ok()?;
    let (prefix, path) = module.split_once('.')?;
    if let Some(patterns) = json.get(format!("{prefix}.alpha_pattern")).and_then(|p| p.as_object()) {
        let hit = patterns.iter().filter(|(k, _)| path == k.as_str() || path.ends_with(&format!(".{k}"))).max_by_key(|(k, _)| k.len());
        if let Some(alpha) = hit.and_then(|(_, v)| v.as_f64()) {
            return Some(alpha);
        }
    }
    json.get(format!("{prefix}.lora_alpha"))?.as_f64()
}

/// Where a LoRA module lands: the component, and each `(weight, source rows of up, target rows)`.
type Placement = (Component, Vec<(String, Option<(usize, usize)>, Option<(usize, usize)>)>);

/// Module-name lookups for one model.
struct Lookup<'a> {
    targets: &'a LoraTargets,
    /// Per component: module path with `_` for `.` (kohya's spelling) -> module path.
    underscored: HashMap<Component, HashMap<String, String>>,
}

impl<'a> Lookup<'a> {
    fn new(targets: &'a LoraTargets) -> Self {
        let underscored = targets
            .weights
            .iter()
            .map(|(c, w)| (*c, w.keys().filter_map(|k| k.strip_suffix(".weight")).map(|m| (m.replace('.', "_"), m.to_string())).collect()))
            .collect();
        Self { targets, underscored }
    }

    fn whole(&self, c: Component, module: &str) -> Option<Placement> {
        let w = format!("{module}.weight");
        self.targets.weights.get(&c)?.contains_key(&w).then(|| (c, vec![(w, None, None)]))
    }

    fn resolve(&self, key: &str) -> Option<Placement> {
        let denoiser = if self.targets.weights.contains_key(&Component::Transformer) { Component::Transformer } else { Component::Unet };
        if let Some(rest) = key.strip_prefix("lora_unet_") {
            let rest = match self.targets.family {
                TargetFamily::StableDiffusionXl => sgm_to_diffusers(rest).unwrap_or_else(|| rest.to_string()),
                _ => rest.to_string(),
            };
            return self.whole(denoiser, self.underscored.get(&denoiser)?.get(&rest)?);
        }
        for (prefix, c) in [("lora_te1_", Component::TextEncoder), ("lora_te2_", Component::TextEncoder2), ("lora_te_", Component::TextEncoder)] {
            if let Some(rest) = key.strip_prefix(prefix) {
                return self.whole(c, self.underscored.get(&c)?.get(rest)?);
            }
        }
        // ComfyUI's spelling: the denoiser's own module names under `diffusion_model.`.
        if let Some(rest) = key.strip_prefix("diffusion_model.") {
            return self.whole(denoiser, rest);
        }
        for (prefix, c) in [("text_encoder_2.", Component::TextEncoder2), ("text_encoder.", Component::TextEncoder), ("unet.", Component::Unet)] {
            if let Some(rest) = key.strip_prefix(prefix) {
                return self.whole(c, rest);
            }
        }
        let rest = key.strip_prefix("transformer.")?;
        let (module, parts) = match self.targets.family {
            TargetFamily::Flux { hidden, mlp } => super::keys::flux::diffusers_module_to_bfl(rest, hidden, mlp)?,
            TargetFamily::Sd3 { hidden, blocks } => super::keys::sd3::diffusers_module_to_sai(rest, hidden, blocks)?,
            _ => return None,
        };
        let w = format!("{module}.weight");
        self.targets.weights.get(&Component::Transformer)?.contains_key(&w).then(|| (Component::Transformer, parts.into_iter().map(|(src, dst)| (w.clone(), src, dst)).collect()))
    }
}

/// SDXL's original (SGM) UNet block names, underscored as kohya writes them, to diffusers'.
fn sgm_to_diffusers(rest: &str) -> Option<String> {
    const PER_BLOCK: usize = 3; // SDXL: two layers and a down/upsampler per block
    let resnet = |tail: &str| -> String {
        for (sgm, diffusers) in [("in_layers_2", "conv1"), ("out_layers_3", "conv2"), ("emb_layers_1", "time_emb_proj"), ("skip_connection", "conv_shortcut"), ("in_layers_0", "norm1"), ("out_layers_0", "norm2")] {
            if tail == sgm {
                return diffusers.to_string();
            }
        }
        tail.to_string()
    };
    let mut parts = rest.splitn(4, '_');
    let (a, b) = (parts.next()?, parts.next()?);
    match (a, b) {
        ("input", "blocks") | ("output", "blocks") => {
            let rest: Vec<&str> = rest.splitn(5, '_').collect();
            let (index, layer, tail) = (rest.get(2)?.parse::<usize>().ok()?, rest.get(3)?.parse::<usize>().ok()?, *rest.get(4)?);
            let (blocks, i) = if a == "input" { ("down_blocks", index.checked_sub(1)?) } else { ("up_blocks", index) };
            let (block, j) = (i / PER_BLOCK, i % PER_BLOCK);
            Some(match layer {
                0 => format!("{blocks}_{block}_resnets_{j}_{}", resnet(tail)),
                _ => format!("{blocks}_{block}_attentions_{j}_{tail}"),
            })
        }
        ("middle", "block") => {
            let rest: Vec<&str> = rest.splitn(4, '_').collect();
            let (index, tail) = (rest.get(2)?.parse::<usize>().ok()?, *rest.get(3)?);
            Some(match index {
                1 => format!("mid_block_attentions_0_{tail}"),
                i => format!("mid_block_resnets_{}_{}", i / 2, resnet(tail)),
            })
        }
        _ => None,
    }
}

/// Merges `adapters` into copies of the affected `base` weights (the others are shared).
pub fn merge(base: &HashMap<String, Tensor>, adapters: &[&Adapter]) -> Result<HashMap<String, Tensor>> {
    let mut out = base.clone();
    let mut by_target: HashMap<&str, Vec<&Adapter>> = HashMap::new();
    for a in adapters {
        by_target.entry(a.target.as_str()).or_default().push(a);
    }
    for (target, list) in by_target {
        let Some(w) = base.get(target) else { continue };
        let mut merged = w.to_dtype(DType::F32)?;
        for a in list {
            let delta = full_delta(a, w.dims(), w.device())?;
            merged = (merged + delta)?;
        }
        out.insert(target.to_string(), merged.to_dtype(w.dtype())?);
    }
    Ok(out)
}

/// `scale * up @ down`, shaped like the whole weight (zero outside the adapter's rows).
fn full_delta(a: &Adapter, shape: &[usize], device: &Device) -> Result<Tensor> {
    let down = a.down.flatten_from(1)?.to_device(device)?;
    let delta = (a.full_up(shape[0], device)?.matmul(&down)? * a.scale)?;
    Ok(delta.reshape(shape)?)
}

impl Adapter {
    /// The up matrix `[rows, r]` of the whole weight: zero outside the rows this update covers.
    pub fn full_up(&self, rows: usize, device: &Device) -> Result<Tensor> {
        let up = self.up.to_device(device)?;
        let Some((start, n)) = self.rows else { return Ok(up) };
        let r = up.dim(1)?;
        let mut parts = vec![];
        if start > 0 {
            parts.push(Tensor::zeros((start, r), DType::F32, device)?);
        }
        parts.push(up);
        if start + n < rows {
            parts.push(Tensor::zeros((rows - start - n, r), DType::F32, device)?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

impl Weights {
    /// These weights with LoRA `adapters`: merged into copies of the affected full-precision
    /// weights; kept beside quantized ones and applied at run time (low-rank, no dequantizing).
    pub fn with_adapters(&self, adapters: &[&Adapter]) -> Result<Self> {
        let mut out = self.clone();
        let mut dense: HashMap<String, Tensor> = HashMap::new();
        let mut dense_adapters = vec![];
        for a in adapters {
            match self.params.get(&a.target) {
                Some(Param::Dense(t)) => {
                    dense.insert(a.target.clone(), t.clone());
                    dense_adapters.push(*a);
                }
                Some(p @ (Param::Quantized(_) | Param::Tiled(_))) => {
                    let up = a.full_up(p.dims()[0], &self.device)?;
                    let down = a.down.flatten_from(1)?.to_device(&self.device)?;
                    out.low_rank.entry(a.target.clone()).or_default().push(super::store::LowRank { down, up, scale: a.scale });
                }
                None => {}
            }
        }
        for (k, t) in merge(&dense, &dense_adapters)? {
            out.params.insert(k, Param::Dense(t));
        }
        Ok(out)
    }
}

/// A stack's identity for caches and batching: the files and scales, in order.
pub fn stack_key(stack: &[LoraSpec]) -> String {
    stack.iter().map(|s| format!("{}:{}", s.path.display(), s.scale)).collect::<Vec<_>>().join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_original_block_names_map_to_diffusers() {
        assert_eq!(sgm_to_diffusers("input_blocks_4_1_transformer_blocks_0_attn1_to_q").as_deref(), Some("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"));
        assert_eq!(sgm_to_diffusers("input_blocks_2_0_in_layers_2").as_deref(), Some("down_blocks_0_resnets_1_conv1"));
        assert_eq!(sgm_to_diffusers("output_blocks_5_0_out_layers_3").as_deref(), Some("up_blocks_1_resnets_2_conv2"));
        assert_eq!(sgm_to_diffusers("middle_block_1_proj_in").as_deref(), Some("mid_block_attentions_0_proj_in"));
        assert_eq!(sgm_to_diffusers("middle_block_2_emb_layers_1").as_deref(), Some("mid_block_resnets_1_time_emb_proj"));
        assert_eq!(sgm_to_diffusers("down_blocks_0_attentions_0_proj_in"), None);
    }

    #[test]
    fn flux_names_resolve_from_every_spelling() {
        let weights = [("double_blocks.0.img_attn.qkv.weight", vec![96, 32]), ("single_blocks.0.linear1.weight", vec![224, 32])];
        let targets = LoraTargets {
            family: TargetFamily::Flux { hidden: 32, mlp: 128 },
            weights: HashMap::from([(Component::Transformer, weights.into_iter().map(|(k, v)| (k.to_string(), v)).collect())]),
        };
        let lookup = Lookup::new(&targets);
        let qkv = |key: &str| lookup.resolve(key).map(|(c, p)| (c, p[0].0.clone(), p[0].2));
        let whole = Some((Component::Transformer, "double_blocks.0.img_attn.qkv.weight".to_string(), None));
        assert_eq!(qkv("lora_unet_double_blocks_0_img_attn_qkv"), whole);
        assert_eq!(qkv("diffusion_model.double_blocks.0.img_attn.qkv"), whole);
        assert_eq!(qkv("transformer.transformer_blocks.0.attn.to_k").map(|t| t.2), Some(Some((32, 32))));
        assert_eq!(qkv("transformer.single_transformer_blocks.0.proj_mlp").map(|t| t.2), Some(Some((96, 128))));
        assert_eq!(qkv("lora_unet_down_blocks_0_attentions_0_proj_in"), None);
    }
}
