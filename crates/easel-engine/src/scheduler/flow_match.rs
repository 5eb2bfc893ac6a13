//! `FlowMatchEulerDiscreteScheduler` as diffusers' FluxPipeline configures it (sigmas spaced
//! linearly from 1 to 1/steps, shifted statically (`shift`) or by image size (`mu`, dynamic
//! shifting)) and as StableDiffusion3Pipeline does ([`FlowMatchEuler::sd3`]), and Euler steps
//! along the predicted velocity.

use candle_core::Tensor;

use super::{bad, linspace, NoiseSource, Scheduler};
use crate::config::SchedulerConfig;
use crate::error::Result;

/// diffusers' `calculate_shift`: `mu` grows linearly with the image's token count.
pub fn calculate_shift(image_seq_len: usize, config: &SchedulerConfig) -> f64 {
    let base_len = config.base_image_seq_len.unwrap_or(256) as f64;
    let max_len = config.max_image_seq_len.unwrap_or(4096) as f64;
    let (base_shift, max_shift) = (config.base_shift.unwrap_or(0.5), config.max_shift.unwrap_or(1.15));
    let m = (max_shift - base_shift) / (max_len - base_len);
    image_seq_len as f64 * m + (base_shift - m * base_len)
}

/// Flow-matching Euler: `x <- x + (sigma_next - sigma) * v`.
pub struct FlowMatchEuler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl FlowMatchEuler {
    /// The schedule for `steps` steps; `image_seq_len` (packed latent tokens) sets `mu` when the
    /// config asks for dynamic shifting.
    pub fn new(config: &SchedulerConfig, steps: usize, image_seq_len: usize) -> Result<Self> {
        if steps == 0 {
            return Err(bad("steps", "must be positive"));
        }
        let n = config.num_train_timesteps.unwrap_or(1000) as f64;
        // FluxPipeline passes these sigmas; diffusers holds them in float32.
        let base: Vec<f64> = linspace(1.0, 1.0 / steps as f64, steps).into_iter().map(|s| s as f32 as f64).collect();
        let sigmas: Vec<f64> = if config.use_dynamic_shifting.unwrap_or(false) {
            let mu = calculate_shift(image_seq_len, config);
            base.iter().map(|&s| mu.exp() / (mu.exp() + (1.0 / s - 1.0))).collect()
        } else {
            let shift = config.shift.unwrap_or(1.0);
            if !(shift.is_finite() && shift > 0.0) {
                return Err(bad("shift", "must be a positive number"));
            }
            base.iter().map(|&s| shift * s / (1.0 + (shift - 1.0) * s)).collect()
        };
        Ok(Self::from_sigmas(sigmas, n))
    }

    /// The schedule StableDiffusion3Pipeline gets (no sigmas passed, static `shift`): timesteps
    /// spaced linearly between the shifted training schedule's ends, then shifted again, as
    /// diffusers' `set_timesteps` does (so the last sigma is shifted twice).
    pub fn sd3(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(bad("steps", "must be positive"));
        }
        if config.use_dynamic_shifting.unwrap_or(false) {
            return Err(bad("use_dynamic_shifting", "SD 3.5 schedules use a static shift"));
        }
        let n = config.num_train_timesteps.unwrap_or(1000) as f64;
        let shift = config.shift.unwrap_or(1.0);
        if !(shift.is_finite() && shift > 0.0) {
            return Err(bad("shift", "must be a positive number"));
        }
        // The training schedule is shifted in float32 (torch), its ends read back as floats.
        let shift32 = |s: f32| shift as f32 * s / (1.0 + (shift as f32 - 1.0) * s);
        let (sigma_max, sigma_min) = (shift32(1.0) as f64, shift32(1.0 / n as f32) as f64);
        let sigmas = linspace(sigma_max * n, sigma_min * n, steps).into_iter().map(|t| t / n).map(|s| shift * s / (1.0 + (shift - 1.0) * s)).collect();
        Ok(Self::from_sigmas(sigmas, n))
    }

    /// Sigmas held in float32 as diffusers holds them, timesteps `sigma * n`, and a final 0.
    fn from_sigmas(mut sigmas: Vec<f64>, n: f64) -> Self {
        sigmas.iter_mut().for_each(|s| *s = *s as f32 as f64);
        let timesteps = sigmas.iter().map(|s| (s * n) as f32 as f64).collect();
        sigmas.push(0.0);
        Self { timesteps, sigmas }
    }
}

impl Scheduler for FlowMatchEuler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let sigma = self.sigmas[step];
        Ok(((noise * sigma)? + (original * (1.0 - sigma))?)?)
    }

    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let dt = self.sigmas[step + 1] - self.sigmas[step];
        let dtype = model_output.dtype();
        let out = (sample.to_dtype(candle_core::DType::F32)? + (model_output.to_dtype(candle_core::DType::F32)? * dt)?)?;
        Ok(out.to_dtype(dtype)?)
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
}
