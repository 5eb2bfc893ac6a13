//! `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`, `solver_order=2`:
//! DPM++ 2M, optionally with Karras sigmas.

use candle_core::Tensor;

use super::{
    arange_down, bad, interp, karras_sigmas, linspace, round_even, sigma_to_t, spacing, Common, NoiseSource,
    Prediction, Scheduler, Spacing,
};
use crate::config::SchedulerConfig;
use crate::error::Result;

/// DPM-Solver++ (Lu et al., 2022), second-order multistep.
pub struct DpmSolverPp {
    common: Common,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    /// The data predictions of the last two steps, newest last.
    previous_x0: Option<Tensor>,
    lower_order_nums: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
}

impl DpmSolverPp {
    pub fn new(common: Common, config: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self> {
        if let Some(a) = config.algorithm_type.as_deref() {
            if a != "dpmsolver++" && a != "dpmsolver" {
                // The pipeline asks for dpmpp-2m explicitly; other variants are overridden like diffusers' from_config.
                tracing::debug!("scheduler algorithm_type {a} replaced by dpmsolver++");
            }
        }
        let n = common.num_train_timesteps;
        let mut timesteps: Vec<f64> = match spacing(config, Spacing::Linspace)? {
            Spacing::Linspace => {
                let v = linspace(0.0, (n - 1) as f64, steps + 1);
                v.into_iter().rev().take(steps).map(round_even).collect()
            }
            Spacing::Leading => {
                let ratio = (n / (steps + 1)) as f64;
                (1..=steps).rev().map(|i| round_even(i as f64 * ratio) + common.steps_offset as f64).collect()
            }
            Spacing::Trailing => {
                arange_down(n as f64, 0.0, -(n as f64 / steps as f64)).into_iter().map(|t| round_even(t) - 1.0).collect()
            }
        };
        let train = common.train_sigmas();
        let mut sigmas: Vec<f64> = if karras {
            let log_sigmas: Vec<f64> = train.iter().map(|s| s.ln()).collect();
            let flipped: Vec<f64> = train.iter().rev().cloned().collect();
            let s = karras_sigmas(&flipped, steps);
            timesteps = s.iter().map(|&x| round_even(sigma_to_t(x, &log_sigmas))).collect();
            s
        } else {
            timesteps.iter().map(|&t| interp(t, &train)).collect()
        };
        let final_sigma_zero = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => true,
            "sigma_min" => false,
            other => return Err(bad("final_sigmas_type", &format!("`{other}` is not supported (zero, sigma_min)"))),
        };
        sigmas.push(if final_sigma_zero { 0.0 } else { train[0] });
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        let timesteps = timesteps.into_iter().map(|t| t.trunc()).collect();
        Ok(Self {
            common,
            timesteps,
            sigmas,
            previous_x0: None,
            lower_order_nums: 0,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_zero,
        })
    }
}

/// (alpha_t, sigma_t, lambda_t) of a Karras-style sigma.
fn alpha_sigma_lambda(sigma: f64) -> (f64, f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sigma_t = sigma * alpha;
    (alpha, sigma_t, alpha.ln() - sigma_t.ln())
}

impl Scheduler for DpmSolverPp {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[step]);
        Ok(((original * alpha)? + (noise * sigma)?)?)
    }
    fn step(&mut self, model_output: &Tensor, step: usize, sample: &Tensor, _noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let len = self.timesteps.len();
        let (alpha_s0, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[step]);
        let x0 = match self.common.prediction {
            Prediction::Epsilon => ((sample - (model_output * sigma_s0)?)? / alpha_s0)?,
            Prediction::VPrediction => ((sample * alpha_s0)? - (model_output * sigma_s0)?)?,
        };
        let lower_order_final = step == len - 1
            && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_sigma_zero);
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[step + 1]);
        let h = lambda_t - lambda_s0;
        let decay = (-h).exp() - 1.0;
        let first_order = self.lower_order_nums < 1 || lower_order_final;
        let prev = match (&self.previous_x0, first_order) {
            (Some(m1), false) => {
                let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[step - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let d1 = ((&x0 - m1)? * (1.0 / r0))?;
                ((sample * (sigma_t / sigma_s0))? - (&x0 * (alpha_t * decay))? - (d1 * (0.5 * alpha_t * decay))?)?
            }
            _ => ((sample * (sigma_t / sigma_s0))? - (&x0 * (alpha_t * decay))?)?,
        };
        self.previous_x0 = Some(x0);
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        Ok(prev)
    }
}
