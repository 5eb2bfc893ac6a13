//! `easel cost`: the break-even calculator, self-hosting against a closed API.

use anyhow::{bail, Result};
use clap::Args;
use easel_router::cost::BreakEven;
use easel_router::PriceTable;

#[derive(Args, Debug)]
pub struct CostArgs {
    /// Images generated per day.
    #[arg(long)]
    images_per_day: f64,
    /// One GPU machine's price per hour, USD (cloud on-demand, or hardware amortised plus power).
    #[arg(long, default_value_t = 2.5)]
    gpu_hourly_usd: f64,
    /// One machine's measured throughput, images per second (`easel bench http --mode unique`
    /// reports requests_per_s; multiply by images per request).
    #[arg(long, conflicts_with = "seconds_per_image")]
    images_per_second: Option<f64>,
    /// ... or its measured seconds per image.
    #[arg(long)]
    seconds_per_image: Option<f64>,
    /// Share of each machine's hours that can be used (peaks, warm-up, idle capacity).
    #[arg(long, default_value_t = 0.6)]
    utilisation: f64,
    /// The closed API's price per image, USD ...
    #[arg(long, conflicts_with = "provider")]
    api_usd: Option<f64>,
    /// ... or a provider from the price table (openai, bfl, fal, replicate, stability) ...
    #[arg(long, requires = "model")]
    provider: Option<String>,
    /// ... and its model, e.g. flux-pro-1.1, gpt-image-1, fal-ai/flux/dev.
    #[arg(long)]
    model: Option<String>,
    /// Quality level for providers that price by it (low, medium, high, standard, hd).
    #[arg(long)]
    quality: Option<String>,
    /// Image size for per-megapixel and size-tiered prices.
    #[arg(long, default_value = "1024x1024")]
    size: String,
    /// Fixed monthly cost of self-hosting beyond GPUs (engineering and ops time, storage), USD.
    #[arg(long, default_value_t = 0.0)]
    overhead_monthly_usd: f64,
    #[arg(long, default_value_t = 30.0)]
    days_per_month: f64,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
}

fn positive(name: &str, v: f64) -> Result<f64> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        bail!("--{name} must be a finite number > 0, got {v}")
    }
}

pub fn run(a: CostArgs) -> Result<()> {
    let (w, h) = a.size.split_once('x').and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?))).ok_or_else(|| anyhow::anyhow!("--size must be WIDTHxHEIGHT, got `{}`", a.size))?;
    let throughput = match (a.images_per_second, a.seconds_per_image) {
        (Some(ips), None) => positive("images-per-second", ips)?,
        (None, Some(spi)) => 1.0 / positive("seconds-per-image", spi)?,
        _ => bail!("give the machine's measured throughput: --images-per-second or --seconds-per-image (from `easel bench`)"),
    };
    let (api, api_name) = match (a.api_usd, &a.provider, &a.model) {
        (Some(p), _, _) => (p, format!("${p}/image")),
        (None, Some(provider), Some(model)) => {
            let table = PriceTable::default();
            let p = table.image_usd(provider, model, a.quality.as_deref(), w, h).ok_or_else(|| {
                let known: Vec<String> = table.entries().iter().filter(|e| &e.provider == provider).map(|e| e.model.clone()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
                anyhow::anyhow!("no price for {provider}/{model}; priced {provider} models: {}", if known.is_empty() { "none (unknown provider)".into() } else { known.join(", ") })
            })?;
            (p, format!("{provider}/{model} at {}x{} (${p:.4}/image, list price as of {})", w, h, easel_router::price::DEFAULTS_AS_OF))
        }
        _ => bail!("give the closed API's price: --api-usd PRICE, or --provider P --model M"),
    };
    if !(a.utilisation > 0.0 && a.utilisation <= 1.0) {
        bail!("--utilisation must be in (0, 1], got {}", a.utilisation);
    }
    let inputs = BreakEven {
        images_per_day: positive("images-per-day", a.images_per_day)?,
        gpu_hourly_usd: positive("gpu-hourly-usd", a.gpu_hourly_usd)?,
        images_per_second: throughput,
        utilisation: a.utilisation,
        api_usd_per_image: api,
        self_host_overhead_monthly_usd: if a.overhead_monthly_usd.is_finite() && a.overhead_monthly_usd >= 0.0 { a.overhead_monthly_usd } else { bail!("--overhead-monthly-usd must be >= 0") },
        days_per_month: positive("days-per-month", a.days_per_month)?,
    };
    let r = inputs.compute();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("{:.0} images/day, {:.0} days/month; closed API: {api_name}", a.images_per_day, a.days_per_month);
    println!(
        "self-hosted: {} GPU(s) at ${}/h, {:.3} images/s each at {:.0}% utilisation ({:.0} images/GPU/day), overhead ${:.0}/month",
        r.gpus_needed,
        a.gpu_hourly_usd,
        throughput,
        a.utilisation * 100.0,
        r.images_per_gpu_day,
        a.overhead_monthly_usd
    );
    println!();
    println!("{:<14} {:>14} {:>16}", "option", "per month", "per image");
    println!("{:<14} {:>14} {:>16}", "closed API", format!("${:.2}", r.api_monthly_usd), format!("${:.5}", r.api_usd_per_image));
    println!("{:<14} {:>14} {:>16}", "self-hosted", format!("${:.2}", r.self_host_monthly_usd), format!("${:.5}", r.self_host_usd_per_image));
    println!("(GPU time alone: ${:.5} per image = hourly price / 3600 / throughput / utilisation)", r.gpu_usd_per_image);
    println!();
    match r.break_even_images_per_day {
        Some(v) => println!("self-hosting breaks even above {v:.0} images/day (then wins by ${:.5} per extra image)", r.api_usd_per_image - r.gpu_usd_per_image),
        None => println!("self-hosting never breaks even: the GPU time per image alone costs more than the API"),
    }
    if r.self_host_monthly_usd < r.api_monthly_usd {
        println!("at {:.0} images/day, self-hosting saves ${:.2}/month", a.images_per_day, r.api_monthly_usd - r.self_host_monthly_usd);
    } else {
        println!("at {:.0} images/day, the closed API is cheaper by ${:.2}/month", a.images_per_day, r.self_host_monthly_usd - r.api_monthly_usd);
    }
    Ok(())
}
