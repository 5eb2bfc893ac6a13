//! CLIP text encoder, mirroring transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`
//! module tree so weight names map one to one. The encoder layers are shared with the vision
//! tower ([`super::clip_vision`]), which differs only in its embeddings and in having no mask.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder};

use crate::config::ClipTextConfig;

#[derive(Debug, Clone, Copy)]
pub(super) enum Activation {
    QuickGelu,
    GeluErf,
    GeluTanh,
}

impl Activation {
    pub(super) fn from_name(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => candle_core::bail!("CLIP hidden_act `{other}` is not supported"),
        }
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::GeluErf => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
        }
    }
}

/// The widths one encoder layer is built from, shared by the text and vision towers.
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
}

impl LayerShape {
    fn of_text(c: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_attention_heads: c.num_attention_heads,
            layer_norm_eps: c.layer_norm_eps,
            activation: Activation::from_name(&c.hidden_act)?,
        })
    }
}

#[derive(Debug)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, c: &LayerShape) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: linear(d, d, vb.pp("q_proj"))?,
            k_proj: linear(d, d, vb.pp("k_proj"))?,
            v_proj: linear(d, d, vb.pp("v_proj"))?,
            out_proj: linear(d, d, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim: d / c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, s, d) = xs.dims3()?;
        let split = |t: Tensor| t.reshape((b, s, self.heads, self.head_dim))?.transpose(1, 2)?.contiguous();
        let q = split((self.q_proj.forward(xs)? * (self.head_dim as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(xs)?)?;
        let v = split(self.v_proj.forward(xs)?)?;
        let attn = q.matmul(&k.t()?)?;
        let attn = match mask {
            Some(mask) => attn.broadcast_add(mask)?,
            None => attn,
        };
        let attn = candle_nn::ops::softmax_last_dim(&attn)?;
        let out = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, s, d))?;
        self.out_proj.forward(&out)
    }
}

#[derive(Debug)]
pub(super) struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    activation: Activation,
}

impl ClipEncoderLayer {
    pub(super) fn new(vb: VarBuilder, c: &LayerShape) -> Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), c)?,
            layer_norm1: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: linear(c.hidden_size, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: linear(c.intermediate_size, c.hidden_size, vb.pp("mlp").pp("fc2"))?,
            layer_norm2: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            activation: c.activation,
        })
    }

    pub(super) fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let xs = (xs + self.self_attn.forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        let h = self.activation.apply(&self.fc1.forward(&self.layer_norm2.forward(&xs)?)?)?;
        xs + self.fc2.forward(&h)?
    }
}

/// What a text encoder pass yields.
#[derive(Debug)]
pub struct ClipOutput {
    /// The last layer's states after the final layer norm (SD 1.x/2.x conditioning).
    pub last_hidden_state: Tensor,
    /// The input to the last layer, `hidden_states[-2]` (SDXL conditioning).
    pub penultimate: Tensor,
    /// The pooled EOS state, projected where the model has `text_projection` (SDXL's `text_embeds`).
    pub pooled: Tensor,
}

/// `CLIPTextModel` (and `...WithProjection` when `text_projection` exists).
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    eos_token_id: Option<u32>,
}

impl ClipTextModel {
    /// Builds the model; `vb` is rooted at the checkpoint's top level.
    pub fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        let shape = LayerShape::of_text(c)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(tm.pp("encoder").pp("layers").pp(i), &shape))
            .collect::<Result<Vec<_>>>()?;
        let with_projection = c.architectures.iter().flatten().any(|a| a.contains("WithProjection"))
            || vb.contains_tensor("text_projection.weight");
        let text_projection = if with_projection {
            let proj = c.projection_dim.unwrap_or(c.hidden_size);
            Some(linear_no_bias(c.hidden_size, proj, vb.pp("text_projection"))?)
        } else {
            None
        };
        Ok(Self {
            token_embedding: embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: embedding(c.max_position_embeddings, c.hidden_size, emb.pp("position_embedding"))?,
            layers,
            final_layer_norm: layer_norm(c.hidden_size, c.layer_norm_eps, tm.pp("final_layer_norm"))?,
            text_projection,
            eos_token_id: c.eos_token_id,
        })
    }

    fn causal_mask(len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
        let mask: Vec<f32> =
            (0..len).flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
        Tensor::from_vec(mask, (len, len), device)?.to_dtype(dtype)
    }

    /// Encodes token ids `[batch, seq]` (u32).
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipOutput> {
        let (b, s) = input_ids.dims2()?;
        let positions = Tensor::arange(0u32, s as u32, input_ids.device())?;
        let xs = self.token_embedding.forward(input_ids)?.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(s, xs.dtype(), xs.device())?;
        let mut xs = xs;
        let mut penultimate = xs.clone();
        for layer in &self.layers {
            penultimate = xs.clone();
            xs = layer.forward(&xs, Some(&mask))?;
        }
        let last = self.final_layer_norm.forward(&xs)?;
        // Pool at the first EOS token (transformers' rule for eos_token_id != 2), else argmax of ids.
        let ids = input_ids.to_vec2::<u32>()?;
        let mut rows = Vec::with_capacity(b);
        for (i, row) in ids.iter().enumerate() {
            let pos = match self.eos_token_id.filter(|&e| e != 2) {
                Some(eos) => row.iter().position(|&t| t == eos).unwrap_or(0),
                None => row.iter().enumerate().max_by_key(|(i, t)| (**t, std::cmp::Reverse(*i))).map(|(i, _)| i).unwrap_or(0),
            };
            rows.push(last.get(i)?.get(pos)?);
        }
        let pooled = Tensor::stack(&rows, 0)?;
        let pooled = match &self.text_projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(ClipOutput { last_hidden_state: last, penultimate, pooled })
    }

    /// Hidden size of the states this model returns.
    pub fn hidden_size(&self) -> Result<usize> {
        Ok(self.final_layer_norm.weight().dim(0)?)
    }
}
