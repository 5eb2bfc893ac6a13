//! What a locally generated image costs, and when self-hosting beats a closed API.

use serde::{Deserialize, Serialize};

/// How a deployment prices its own machines.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LocalCost {
    /// What the machine costs per hour, whether busy or idle (cloud price, or hardware
    /// amortised plus power).
    pub hourly_usd: f64,
    /// The share of paid hours that do useful work (0-1]. Idle warm GPUs still cost money,
    /// so the honest per-image figure divides by this.
    pub utilisation: f64,
    /// A fixed cost added to every image (storage, egress, ops), in USD.
    pub per_image_overhead_usd: f64,
}

impl Default for LocalCost {
    fn default() -> Self {
        Self { hourly_usd: 0.0, utilisation: 1.0, per_image_overhead_usd: 0.0 }
    }
}

impl LocalCost {
    /// Amortised cost of one image that took `gpu_seconds` of engine time (a batch's time is
    /// shared among its images by the caller).
    pub fn image_usd(&self, gpu_seconds: f64) -> f64 {
        let util = self.utilisation.clamp(1e-3, 1.0);
        gpu_seconds.max(0.0) * self.hourly_usd / 3600.0 / util + self.per_image_overhead_usd
    }
}

/// The inputs of the break-even calculation (`easel cost`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BreakEven {
    pub images_per_day: f64,
    /// One GPU machine's hourly price.
    pub gpu_hourly_usd: f64,
    /// Measured throughput of one machine, images per second (from `easel bench`).
    pub images_per_second: f64,
    /// Share of each machine's hours that can be used (peaks, warm-up, idle).
    pub utilisation: f64,
    /// The closed provider's price per image.
    pub api_usd_per_image: f64,
    /// Fixed monthly cost of running it yourself beyond the GPUs (engineering, ops, storage).
    pub self_host_overhead_monthly_usd: f64,
    pub days_per_month: f64,
}

/// What [`BreakEven::compute`] finds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BreakEvenReport {
    pub inputs: BreakEven,
    pub gpus_needed: u64,
    pub self_host_monthly_usd: f64,
    pub api_monthly_usd: f64,
    pub self_host_usd_per_image: f64,
    pub api_usd_per_image: f64,
    /// The marginal GPU cost of an image at this utilisation (no fixed overhead).
    pub gpu_usd_per_image: f64,
    /// Images per day above which self-hosting is cheaper (None: never, per-image GPU cost
    /// at or above the API price).
    pub break_even_images_per_day: Option<f64>,
    /// Images per day one GPU can make at this utilisation.
    pub images_per_gpu_day: f64,
}

impl BreakEven {
    pub fn compute(&self) -> BreakEvenReport {
        let util = self.utilisation.clamp(1e-3, 1.0);
        let per_gpu_day = self.images_per_second.max(1e-9) * 86_400.0 * util;
        let gpus = (self.images_per_day / per_gpu_day).ceil().max(1.0);
        let gpu_monthly = self.gpu_hourly_usd * 24.0 * self.days_per_month;
        let self_host_monthly = gpus * gpu_monthly + self.self_host_overhead_monthly_usd;
        let monthly_images = (self.images_per_day * self.days_per_month).max(1e-9);
        let api_monthly = monthly_images * self.api_usd_per_image;
        let gpu_per_image = self.gpu_hourly_usd / 3600.0 / self.images_per_second.max(1e-9) / util;
        // Self-hosting costs whole GPUs: find the first volume where it wins, GPU by GPU.
        let mut break_even = None;
        if gpu_per_image < self.api_usd_per_image && self.api_usd_per_image > 0.0 {
            for n in 1..=1_000_000u64 {
                let fixed = n as f64 * gpu_monthly + self.self_host_overhead_monthly_usd;
                let volume = fixed / (self.days_per_month * self.api_usd_per_image);
                if volume <= n as f64 * per_gpu_day {
                    break_even = Some(volume.max((n - 1) as f64 * per_gpu_day));
                    break;
                }
            }
        }
        BreakEvenReport {
            inputs: *self,
            gpus_needed: gpus as u64,
            self_host_monthly_usd: self_host_monthly,
            api_monthly_usd: api_monthly,
            self_host_usd_per_image: self_host_monthly / monthly_images,
            api_usd_per_image: self.api_usd_per_image,
            gpu_usd_per_image: gpu_per_image,
            break_even_images_per_day: break_even,
            images_per_gpu_day: per_gpu_day,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_cost_is_amortised_by_utilisation() {
        let c = LocalCost { hourly_usd: 3.6, utilisation: 0.5, per_image_overhead_usd: 0.0001 };
        // 2 s at $0.001/s, doubled for 50% utilisation, plus overhead.
        assert!((c.image_usd(2.0) - 0.0041).abs() < 1e-12);
        assert_eq!(LocalCost::default().image_usd(10.0), 0.0);
    }

    fn h100(images_per_day: f64, overhead: f64, api: f64) -> BreakEven {
        BreakEven {
            images_per_day,
            gpu_hourly_usd: 2.5,
            images_per_second: 0.5,
            utilisation: 0.6,
            api_usd_per_image: api,
            self_host_overhead_monthly_usd: overhead,
            days_per_month: 30.0,
        }
    }

    #[test]
    fn break_even_without_overhead_is_one_gpu_day_over_the_api_price() {
        let r = h100(100_000.0, 0.0, 0.04).compute();
        // 2.5 * 24 / 0.04 = 1500 images a day pays for one GPU.
        assert!((r.break_even_images_per_day.unwrap() - 1500.0).abs() < 1e-6, "{r:?}");
        assert_eq!(r.gpus_needed, 4, "0.5 img/s at 60% is 25,920 a day per GPU");
        assert!(r.self_host_usd_per_image < r.api_usd_per_image);
        assert!((r.gpu_usd_per_image - 2.5 / 3600.0 / 0.5 / 0.6).abs() < 1e-12);
    }

    #[test]
    fn overhead_moves_break_even_to_the_lessons_50k_a_day() {
        // An engineer's time on the service (~$25k a month) against $0.02 API images.
        let r = h100(50_000.0, 25_000.0, 0.02).compute();
        let v = r.break_even_images_per_day.unwrap();
        assert!((40_000.0..60_000.0).contains(&v), "{v}");
    }

    #[test]
    fn an_api_cheaper_than_the_gpu_never_breaks_even() {
        assert_eq!(h100(1e6, 0.0, 0.001).compute().break_even_images_per_day, None);
    }
}
