//! Noise schedulers, built from `scheduler_config.json` the way diffusers builds them.
//!
//! Each scheduler computes its timesteps and sigmas exactly as its diffusers namesake
//! (timestep_spacing leading/trailing/linspace, steps_offset, epsilon and v_prediction),
//! so that easel and diffusers walk the same trajectory from the same init latents.

mod ddim;
mod dpmpp;
mod euler;
mod flow_match;
mod lcm;

use candle_core::{DType, Device, Tensor};

use crate::config::SchedulerConfig;
use crate::error::{EngineError, Result};

pub use ddim::Ddim;
pub use dpmpp::DpmSolverPp;
pub use euler::{Euler, EulerAncestral};
pub use flow_match::{calculate_shift, FlowMatchEuler};
pub use lcm::Lcm;

/// The schedulers easel offers under `--scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Euler,
    EulerAncestral,
    Ddim,
    DpmPp2m,
    DpmPp2mKarras,
    /// Flow matching (FLUX); its schedule depends on the image size.
    FlowMatchEuler,
    /// Latent consistency (LCM-distilled UNets and LCM-LoRAs).
    Lcm,
}

impl SchedulerKind {
    /// All kinds with their CLI names.
    pub const ALL: [(&'static str, SchedulerKind); 7] = [
        ("euler", SchedulerKind::Euler),
        ("euler-a", SchedulerKind::EulerAncestral),
        ("ddim", SchedulerKind::Ddim),
        ("dpmpp-2m", SchedulerKind::DpmPp2m),
        ("dpmpp-2m-karras", SchedulerKind::DpmPp2mKarras),
        ("flow-match-euler", SchedulerKind::FlowMatchEuler),
        ("lcm", SchedulerKind::Lcm),
    ];

    /// Parses a CLI/API scheduler name.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, k)| *k).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|(n, _)| *n).collect();
            EngineError::param("scheduler", format!("unknown scheduler `{name}`; expected one of {}", names.join(", ")))
        })
    }

    /// The CLI name of this kind.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, k)| *k == self).map(|(n, _)| *n).unwrap_or("euler")
    }

    /// The kind a model's own `scheduler_config.json` asks for, if easel implements it.
    pub fn from_config(config: &SchedulerConfig) -> Option<Self> {
        match config.class_name.as_deref()? {
            "EulerDiscreteScheduler" => Some(Self::Euler),
            "EulerAncestralDiscreteScheduler" => Some(Self::EulerAncestral),
            "DDIMScheduler" => Some(Self::Ddim),
            "DPMSolverMultistepScheduler" if config.use_karras_sigmas == Some(true) => Some(Self::DpmPp2mKarras),
            "DPMSolverMultistepScheduler" => Some(Self::DpmPp2m),
            "FlowMatchEulerDiscreteScheduler" => Some(Self::FlowMatchEuler),
            "LCMScheduler" => Some(Self::Lcm),
            _ => None,
        }
    }

    /// Whether this is a flow-matching scheduler (for FLUX-like models only).
    pub fn is_flow_matching(self) -> bool {
        self == Self::FlowMatchEuler
    }

    /// Builds the scheduler for `steps` denoising steps from the model's config;
    /// `image_seq_len` (latent tokens) matters only to flow matching with dynamic shifting.
    pub fn build(self, config: &SchedulerConfig, steps: usize, image_seq_len: usize) -> Result<Box<dyn Scheduler>> {
        let common = || Common::new(config);
        Ok(match self {
            Self::Euler => Box::new(Euler::new(common()?, config, steps)?),
            Self::EulerAncestral => Box::new(EulerAncestral::new(common()?, config, steps)?),
            Self::Ddim => Box::new(Ddim::new(common()?, config, steps)?),
            Self::DpmPp2m => Box::new(DpmSolverPp::new(common()?, config, steps, false)?),
            Self::DpmPp2mKarras => Box::new(DpmSolverPp::new(common()?, config, steps, true)?),
            Self::FlowMatchEuler => Box::new(FlowMatchEuler::new(config, steps, image_seq_len)?),
            Self::Lcm => Box::new(Lcm::new(common()?, config, steps)?),
        })
    }
}

/// Source of the fresh noise that ancestral schedulers add at each step.
pub trait NoiseSource {
    /// A standard normal tensor of the given shape.
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
}

/// One denoising schedule for a fixed number of steps.
pub trait Scheduler: Send {
    /// The timesteps the model is evaluated at, in order.
    fn timesteps(&self) -> &[f64];
    /// What init noise is multiplied by before the first step.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the latents before the model sees them at `step` (by default, not at all).
    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// Noises clean latents to the level the schedule has at `step`, where an image-to-image run
    /// starts (diffusers' `add_noise`, or `scale_noise` for flow matching, with the begin index
    /// set to `step`).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor>;
    /// Advances `sample` from `step` to the next one given the model's prediction.
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor>;
    /// The sigmas, where the scheduler has them (for tests and diagnostics).
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// How inference timesteps are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

/// The parts every scheduler shares: the training noise schedule and the config knobs.
#[derive(Debug, Clone)]
pub struct Common {
    pub num_train_timesteps: usize,
    pub alphas_cumprod: Vec<f64>,
    pub prediction: Prediction,
    pub steps_offset: usize,
}

impl Common {
    fn new(c: &SchedulerConfig) -> Result<Self> {
        let n = c.num_train_timesteps.unwrap_or(1000);
        if n == 0 {
            return Err(bad("num_train_timesteps", "must be positive"));
        }
        let (b0, b1) = (c.beta_start.unwrap_or(0.0001), c.beta_end.unwrap_or(0.02));
        let mut betas: Vec<f64> = match (&c.trained_betas, c.beta_schedule.as_deref().unwrap_or("linear")) {
            (Some(b), _) if !b.is_empty() => b.clone(),
            (_, "linear") => linspace(b0, b1, n),
            (_, "scaled_linear") => linspace(b0.sqrt(), b1.sqrt(), n).into_iter().map(|b| b * b).collect(),
            (_, "squaredcos_cap_v2") => {
                let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                (0..n).map(|i| (1.0 - alpha_bar((i + 1) as f64 / n as f64) / alpha_bar(i as f64 / n as f64)).min(0.999)).collect()
            }
            (_, other) => return Err(bad("beta_schedule", &format!("`{other}` is not supported"))),
        };
        // diffusers computes the schedule in float32; rounding here keeps the sigmas bit-close.
        for b in betas.iter_mut() {
            *b = *b as f32 as f64;
        }
        let mut alphas_cumprod = Vec::with_capacity(n);
        let mut acc = 1f32;
        for b in &betas {
            acc *= 1.0 - *b as f32;
            alphas_cumprod.push(acc as f64);
        }
        if c.rescale_betas_zero_snr == Some(true) {
            rescale_zero_terminal_snr(&mut alphas_cumprod);
        }
        let prediction = match c.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            other => return Err(bad("prediction_type", &format!("`{other}` is not supported (epsilon, v_prediction)"))),
        };
        Ok(Self { num_train_timesteps: n, alphas_cumprod, prediction, steps_offset: c.steps_offset.unwrap_or(0) })
    }

    /// `sqrt(a_t) x + sqrt(1 - a_t) noise` at training timestep `t` (DDIM's and LCM's
    /// `add_noise`; diffusers takes the square roots in the latents' float32).
    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        let alpha = self.alphas_cumprod[t] as f32;
        Ok(((original * alpha.sqrt() as f64)? + (noise * (1.0 - alpha).sqrt() as f64)?)?)
    }

    /// `sqrt((1 - a) / a)` for every training timestep.
    fn train_sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
    }
}

fn rescale_zero_terminal_snr(alphas_cumprod: &mut [f64]) {
    let mut sqrt_ac: Vec<f64> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_ac[0], sqrt_ac[sqrt_ac.len() - 1]);
    for v in sqrt_ac.iter_mut() {
        *v = (*v - last) * first / (first - last);
    }
    for (a, s) in alphas_cumprod.iter_mut().zip(sqrt_ac) {
        *a = (s * s).max(2f64.powi(-24));
    }
}

pub(crate) fn bad(field: &str, message: &str) -> EngineError {
    EngineError::BadConfig { path: "scheduler/scheduler_config.json".into(), message: format!("field `{field}`: {message}") }
}

pub(crate) fn spacing(c: &SchedulerConfig, default: Spacing) -> Result<Spacing> {
    match c.timestep_spacing.as_deref() {
        None => Ok(default),
        Some("leading") => Ok(Spacing::Leading),
        Some("trailing") => Ok(Spacing::Trailing),
        Some("linspace") => Ok(Spacing::Linspace),
        Some(other) => Err(bad("timestep_spacing", &format!("`{other}` is not supported (leading, trailing, linspace)"))),
    }
}

/// `np.linspace(start, end, n)`.
pub(crate) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => (0..n).map(|i| start + (end - start) * i as f64 / (n - 1) as f64).collect(),
    }
}

/// `np.arange(start, stop, step)` for a negative step, as floats.
pub(crate) fn arange_down(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let n = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..n).map(|i| start + step * i as f64).collect()
}

/// numpy's round-half-to-even.
pub(crate) fn round_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// `np.interp(x, arange(len(ys)), ys)`.
pub(crate) fn interp(x: f64, ys: &[f64]) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    ys[i] * (1.0 - w) + ys[i + 1] * w
}

/// Karras et al. (2022) sigmas between the extremes of `in_sigmas` (descending).
pub(crate) fn karras_sigmas(in_sigmas: &[f64], steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let (sigma_min, sigma_max) = (in_sigmas[in_sigmas.len() - 1], in_sigmas[0]);
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, steps).into_iter().map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho)).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of a sigma.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let low = log_sigmas.iter().filter(|&&ls| log_sigma - ls >= 0.0).count();
    // cumsum(dists >= 0).argmax(): the index of the last non-negative distance (log_sigmas ascend).
    let low_idx = low.saturating_sub(1).min(n - 2);
    let high_idx = low_idx + 1;
    let (lo, hi) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// The ancestral sampling noise drawn from a seeded RNG.
pub struct SeededNoise {
    rng: rand::rngs::StdRng,
}

impl SeededNoise {
    /// Noise reproducible from `seed`.
    pub fn new(seed: u64) -> Self {
        use rand::SeedableRng;
        Self { rng: rand::rngs::StdRng::seed_from_u64(seed) }
    }

    /// Standard normal samples.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        use rand_distr::Distribution;
        let d = rand_distr::StandardNormal;
        (0..n).map(|_| d.sample(&mut self.rng)).collect()
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.normal_vec(n), shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?)
    }
}

/// Noise replayed from a recorded tensor `[draws, ...shape]` (parity tests against diffusers).
pub struct ReplayNoise {
    draws: Vec<Tensor>,
    next: usize,
}

impl ReplayNoise {
    /// Replays the draws stacked along the first dimension of `recorded`.
    pub fn new(recorded: &Tensor) -> Result<Self> {
        let n = recorded.dim(0)?;
        let draws = (0..n).map(|i| recorded.get(i)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { draws, next: 0 })
    }
}

impl NoiseSource for ReplayNoise {
    fn randn(&mut self, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.draws.get(self.next).ok_or_else(|| EngineError::Unsupported("replayed noise exhausted".into()))?;
        self.next += 1;
        Ok(t.reshape(shape)?.to_dtype(dtype)?.to_device(device)?)
    }
}
