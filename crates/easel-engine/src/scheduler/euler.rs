//! `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`.

use candle_core::Tensor;

use super::{
    arange_down, bad, interp, karras_sigmas, linspace, round_even, sigma_to_t, spacing, Common, NoiseSource,
    Prediction, Scheduler, Spacing,
};
use crate::config::SchedulerConfig;
use crate::error::Result;

/// Timesteps and sigmas (with the final 0) shared by both Euler variants.
fn euler_schedule(common: &Common, config: &SchedulerConfig, steps: usize, karras: bool) -> Result<(Vec<f64>, Vec<f64>, f64)> {
    let n = common.num_train_timesteps as f64;
    let spacing = spacing(config, Spacing::Linspace)?;
    let mut timesteps: Vec<f64> = match spacing {
        Spacing::Linspace => linspace(0.0, n - 1.0, steps).into_iter().rev().collect(),
        Spacing::Leading => {
            let ratio = (common.num_train_timesteps / steps) as f64;
            (0..steps).rev().map(|i| round_even(i as f64 * ratio) + common.steps_offset as f64).collect()
        }
        Spacing::Trailing => arange_down(n, 0.0, -(n / steps as f64)).into_iter().map(|t| round_even(t) - 1.0).collect(),
    };
    // diffusers keeps these timesteps in float32.
    timesteps.iter_mut().for_each(|t| *t = *t as f32 as f64);
    let train = common.train_sigmas();
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train)).collect();
    if karras {
        let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
        sigmas = karras_sigmas(&sigmas, steps);
        timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64).collect();
    }
    let last = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
        "zero" => 0.0,
        "sigma_min" => train[0],
        other => return Err(bad("final_sigmas_type", &format!("`{other}` is not supported (zero, sigma_min)"))),
    };
    sigmas.push(last);
    let sigmas: Vec<f64> = sigmas.into_iter().map(|s| s as f32 as f64).collect();
    let max = sigmas.iter().cloned().fold(0.0, f64::max);
    let init = match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    };
    Ok((timesteps, sigmas, init))
}

fn predict_x0(prediction: Prediction, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok(match prediction {
        Prediction::Epsilon => (sample - (model_output * sigma)?)?,
        Prediction::VPrediction => {
            let c = sigma * sigma + 1.0;
            ((model_output * (-sigma / c.sqrt()))? + (sample / c)?)?
        }
    })
}

/// `original + noise * sigma`, as both Euler schedulers' `add_noise`.
fn add_sigma_noise(original: &Tensor, noise: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok((original + (noise * sigma)?)?)
}

fn scale_by_sigma(sample: &Tensor, sigma: f64) -> Result<Tensor> {
    Ok((sample / (sigma * sigma + 1.0).sqrt())?)
}

/// Euler's method on the probability-flow ODE (k-diffusion's `sample_euler`).
pub struct Euler {
    common: Common,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

impl Euler {
    pub fn new(common: Common, config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let (timesteps, sigmas, init_noise_sigma) =
            euler_schedule(&common, config, steps, config.use_karras_sigmas == Some(true))?;
        Ok(Self { common, timesteps, sigmas, init_noise_sigma })
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        scale_by_sigma(sample, self.sigmas[step])
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        add_sigma_noise(original, noise, self.sigmas[step])
    }
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let (sigma, next) = (self.sigmas[step], self.sigmas[step + 1]);
        let x0 = predict_x0(self.common.prediction, model_output, sample, sigma)?;
        let derivative = ((sample - x0)? / sigma)?;
        Ok((sample + (derivative * (next - sigma))?)?)
    }
}

/// Ancestral Euler (k-diffusion's `sample_euler_ancestral`): adds fresh noise each step.
pub struct EulerAncestral {
    common: Common,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

impl EulerAncestral {
    pub fn new(common: Common, config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let (timesteps, sigmas, init_noise_sigma) = euler_schedule(&common, config, steps, false)?;
        Ok(Self { common, timesteps, sigmas, init_noise_sigma })
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        scale_by_sigma(sample, self.sigmas[step])
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        add_sigma_noise(original, noise, self.sigmas[step])
    }
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let (from, to) = (self.sigmas[step], self.sigmas[step + 1]);
        let x0 = predict_x0(self.common.prediction, model_output, sample, from)?;
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = ((sample - x0)? / from)?;
        let prev = (sample + (derivative * (sigma_down - from))?)?;
        let z = noise.randn(sample.dims(), sample.dtype(), sample.device())?;
        Ok((prev + (z * sigma_up)?)?)
    }
}
