//! Agreement with a diffusers reference: a reference file (written by tools/fixtures) holds the
//! init latents, any recorded noise, the init image of an image-to-image run, the final latents
//! and the decoded image of one diffusers run, with its parameters as metadata. The parity tests and `easel bench parity` (which runs
//! them on any device and dtype, for tools/gpu/check.sh) both measure through here.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::scheduler::{NoiseSource, ReplayNoise};
use crate::{GenerateParams, Generated, InitImage, Pipeline, SchedulerKind, SkipLayerGuidance};

/// One diffusers run: its tensors and its string metadata.
pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub meta: HashMap<String, String>,
}

/// How close easel's output is to a reference.
#[derive(Debug, Clone, Copy)]
pub struct Agreement {
    /// ||easel - diffusers|| / ||diffusers|| of the final latents.
    pub latents_rel_l2: f64,
    /// PSNR of the decoded images, in dB (pixel values in [0, 1]).
    pub image_psnr_db: f64,
}

impl Reference {
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |message: String| EngineError::BadWeights { path: path.to_path_buf(), message };
        let tensors = crate::read_tensors(path)?;
        let bytes = std::fs::read(path).map_err(|source| EngineError::Io { path: path.to_path_buf(), source })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        Ok(Self { tensors, meta: header.metadata().clone().unwrap_or_default() })
    }

    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| EngineError::Unsupported(format!("reference lacks tensor `{name}`")))
    }

    fn field<T: std::str::FromStr>(&self, key: &'static str) -> Result<T> {
        let raw = self.meta.get(key).ok_or_else(|| EngineError::Unsupported(format!("reference lacks `{key}`")))?;
        raw.parse().map_err(|_| EngineError::param(key, format!("reference value `{raw}`")))
    }

    /// Skip-layer guidance as the reference ran it (SD 3.5), if it did.
    fn skip_layer_guidance(&self) -> Result<Option<SkipLayerGuidance>> {
        let Some(layers) = self.meta.get("skip_guidance_layers").filter(|l| !l.is_empty()) else { return Ok(None) };
        let layers = layers
            .split(',')
            .map(|l| l.trim().parse().map_err(|_| EngineError::param("skip_guidance_layers", format!("reference value `{layers}`"))))
            .collect::<Result<Vec<usize>>>()?;
        Ok(Some(SkipLayerGuidance {
            layers,
            scale: self.field("skip_layer_guidance_scale")?,
            start: self.field("skip_layer_guidance_start")?,
            stop: self.field("skip_layer_guidance_stop")?,
        }))
    }

    /// The request diffusers ran, starting from its init latents.
    pub fn params(&self) -> Result<GenerateParams> {
        let scheduler = self.meta.get("scheduler").map(|s| SchedulerKind::parse(s)).transpose()?;
        let batch = match self.meta.get("num_images_per_prompt") {
            Some(_) => self.field("num_images_per_prompt")?,
            None => 1,
        };
        Ok(GenerateParams {
            prompt: self.meta.get("prompt").cloned().unwrap_or_default(),
            negative_prompt: self.meta.get("negative_prompt").filter(|n| !n.is_empty()).cloned(),
            width: self.field("width")?,
            height: self.field("height")?,
            steps: self.field("steps")?,
            guidance: self.field("guidance")?,
            seed: 0,
            batch,
            scheduler,
            init_latents: Some(self.tensor("init_latents")?.clone()),
            skip_layer_guidance: self.skip_layer_guidance()?,
            step_cache: None,
            controlnets: Vec::new(),
            ip_adapter: None,
            init_image: match self.tensors.get("init_image") {
                Some(pixels) => Some(InitImage { pixels: pixels.clone(), strength: self.field("strength")?, mask: self.tensors.get("mask").cloned() }),
                None => None,
            },
        })
    }

    /// Runs the reference's request on `pipe` (replaying diffusers' noise where it was recorded)
    /// and measures the agreement.
    pub fn check(&self, pipe: &Pipeline) -> Result<Agreement> {
        self.agreement(&self.generate(pipe, &self.params()?)?)
    }

    /// Runs `params` (the reference's request with whatever a test adds to it, such as
    /// ControlNets) on `pipe`, replaying diffusers' noise where it was recorded.
    pub fn generate(&self, pipe: &Pipeline, params: &GenerateParams) -> Result<Generated> {
        let mut replay = self.tensors.get("noise").map(ReplayNoise::new).transpose()?;
        pipe.generate(params, replay.as_mut().map(|r| r as &mut dyn NoiseSource), &mut |_| true)
    }

    /// How close an output is to the reference's.
    pub fn agreement(&self, out: &Generated) -> Result<Agreement> {
        Ok(Agreement { latents_rel_l2: rel_l2(&out.latents, self.tensor("latents")?)?, image_psnr_db: psnr(&out.decoded, self.tensor("image")?)? })
    }
}

fn f64_cpu(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?)
}

/// ||a - b|| / ||b||.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(EngineError::Unsupported(format!("shapes differ: {:?} and {:?}", a.dims(), b.dims())));
    }
    let (a, b) = (f64_cpu(a)?, f64_cpu(b)?);
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(diff / norm.max(1e-12))
}

/// PSNR in dB of two images with values in [0, 1].
pub fn psnr(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (f64_cpu(a)?, f64_cpu(b)?);
    let mse = (&a - &b)?.sqr()?.mean_all()?.to_scalar::<f64>()?;
    Ok(if mse == 0.0 { f64::INFINITY } else { 10.0 * (1.0 / mse).log10() })
}
