//! `LCMScheduler`: latent consistency models' multistep sampling, for LCM-distilled UNets and
//! LCM-LoRAs (4-8 steps at guidance 1-2).
//!
//! Each step predicts the clean sample, applies the consistency boundary condition
//! (`c_skip * x + c_out * x0`), and, except after the last step, noises the result afresh to the
//! next timestep's level; the timesteps are picked evenly (by index) from the distillation's
//! own schedule of `original_inference_steps`.

use candle_core::Tensor;

use super::{bad, Common, NoiseSource, Prediction, Scheduler};
use crate::config::SchedulerConfig;
use crate::error::Result;

/// Latent consistency sampling (Luo et al., 2023).
pub struct Lcm {
    common: Common,
    timesteps: Vec<f64>,
    final_alpha_cumprod: f64,
    timestep_scaling: f64,
    clip_sample: Option<f64>,
}

impl Lcm {
    pub fn new(common: Common, config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let n = common.num_train_timesteps;
        let original = config.original_inference_steps.unwrap_or(50);
        if original == 0 || original > n {
            return Err(bad("original_inference_steps", &format!("{original} must be between 1 and num_train_timesteps ({n})")));
        }
        if steps > original {
            return Err(crate::error::EngineError::param("steps", format!("{steps} is more than this LCM schedule's {original} distillation steps")));
        }
        let k = n / original;
        // The distillation's timesteps, descending: k*original - 1, ..., 2k - 1, k - 1.
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        let timesteps = (0..steps).map(|i| origin[(i as f64 * origin.len() as f64 / steps as f64).floor() as usize] as f64).collect();
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { common.alphas_cumprod[0] };
        // LCMScheduler's defaults: no clipping, unlike DDIM's.
        let clip_sample = config.clip_sample.unwrap_or(false).then(|| config.clip_sample_range.unwrap_or(1.0));
        Ok(Self { common, timesteps, final_alpha_cumprod, timestep_scaling: config.timestep_scaling.unwrap_or(10.0), clip_sample })
    }

    /// `(c_skip, c_out)` of the consistency boundary condition at timestep `t`.
    fn scalings(&self, t: f64) -> (f64, f64) {
        let sigma_data2 = 0.25;
        let scaled = t * self.timestep_scaling;
        (sigma_data2 / (scaled * scaled + sigma_data2), scaled / (scaled * scaled + sigma_data2).sqrt())
    }
}

impl Scheduler for Lcm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        self.common.add_noise_at(original, noise, self.timesteps[step] as usize)
    }

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let t = self.timesteps[step];
        let alpha_t = self.common.alphas_cumprod[t as usize];
        let beta_t = 1.0 - alpha_t;
        let mut x0 = match self.common.prediction {
            Prediction::Epsilon => ((sample - (model_output * beta_t.sqrt())?)? / alpha_t.sqrt())?,
            Prediction::VPrediction => ((sample * alpha_t.sqrt())? - (model_output * beta_t.sqrt())?)?,
        };
        if let Some(range) = self.clip_sample {
            x0 = x0.clamp(-range, range)?;
        }
        let (c_skip, c_out) = self.scalings(t);
        let denoised = ((x0 * c_out)? + (sample * c_skip)?)?;
        let Some(&next) = self.timesteps.get(step + 1) else {
            return Ok(denoised);
        };
        let alpha_prev = if next >= 0.0 { self.common.alphas_cumprod[next as usize] } else { self.final_alpha_cumprod };
        let z = noise.randn(sample.dims(), sample.dtype(), sample.device())?;
        Ok(((denoised * alpha_prev.sqrt())? + (z * (1.0 - alpha_prev).sqrt())?)?)
    }
}
