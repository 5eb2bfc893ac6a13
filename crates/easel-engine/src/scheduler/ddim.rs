//! `DDIMScheduler` with eta = 0 (deterministic), as the Stable Diffusion pipelines run it.

use candle_core::Tensor;

use super::{arange_down, linspace, round_even, spacing, Common, NoiseSource, Prediction, Scheduler, Spacing};
use crate::config::SchedulerConfig;
use crate::error::Result;

/// Denoising diffusion implicit models (Song et al., 2020).
pub struct Ddim {
    common: Common,
    timesteps: Vec<f64>,
    step_ratio: usize,
    final_alpha_cumprod: f64,
    clip_sample: Option<f64>,
}

impl Ddim {
    pub fn new(common: Common, config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let n = common.num_train_timesteps;
        let timesteps: Vec<f64> = match spacing(config, Spacing::Leading)? {
            Spacing::Leading => {
                let ratio = (n / steps) as f64;
                (0..steps).rev().map(|i| round_even(i as f64 * ratio) + common.steps_offset as f64).collect()
            }
            Spacing::Trailing => {
                arange_down(n as f64, 0.0, -(n as f64 / steps as f64)).into_iter().map(|t| round_even(t) - 1.0).collect()
            }
            Spacing::Linspace => linspace(0.0, (n - 1) as f64, steps).into_iter().rev().map(round_even).collect(),
        };
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { common.alphas_cumprod[0] };
        let clip_sample = config.clip_sample.unwrap_or(true).then(|| config.clip_sample_range.unwrap_or(1.0));
        Ok(Self { step_ratio: n / steps, common, timesteps, final_alpha_cumprod, clip_sample })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        self.common.add_noise_at(original, noise, self.timesteps[step] as usize)
    }
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let t = self.timesteps[step] as i64;
        let prev_t = t - self.step_ratio as i64;
        let alpha_t = self.common.alphas_cumprod[t as usize];
        let alpha_prev = if prev_t >= 0 { self.common.alphas_cumprod[prev_t as usize] } else { self.final_alpha_cumprod };
        let beta_t = 1.0 - alpha_t;
        let (mut x0, eps) = match self.common.prediction {
            Prediction::Epsilon => {
                let x0 = ((sample - (model_output * beta_t.sqrt())?)? / alpha_t.sqrt())?;
                (x0, model_output.clone())
            }
            Prediction::VPrediction => {
                let x0 = ((sample * alpha_t.sqrt())? - (model_output * beta_t.sqrt())?)?;
                let eps = ((model_output * alpha_t.sqrt())? + (sample * beta_t.sqrt())?)?;
                (x0, eps)
            }
        };
        if let Some(range) = self.clip_sample {
            x0 = x0.clamp(-range, range)?;
        }
        Ok(((x0 * alpha_prev.sqrt())? + (eps * (1.0 - alpha_prev).sqrt())?)?)
    }
}
