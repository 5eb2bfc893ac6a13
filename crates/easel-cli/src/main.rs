//! `easel`: generate images locally, serve the API, run workers, manage models, price them.

mod bench;
mod bundled;
mod cost;
mod generate;
mod hub;
mod models;
mod serve;

use clap::{Parser, Subcommand};

/// easel: own your image generation.
#[derive(Parser)]
#[command(name = "easel", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt with a local model.
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-compatible images API and async jobs, with an in-process worker.
    Serve(serve::ServeArgs),
    /// Run jobs from the shared queue (beside an `easel serve --workers 0` API node).
    Worker(serve::WorkerArgs),
    /// Model tools: weight memory per type, GGUF quantization of FLUX transformers.
    Models(models::ModelsArgs),
    /// Break-even calculator: self-hosting against a closed API, per month and per image.
    Cost(cost::CostArgs),
    /// Benchmarks (compared with PyTorch by the harnesses in tools/bench).
    Bench(bench::BenchArgs),
}

/// Every candle op on the CPU allocates its output; glibc hands buffers above its mmap threshold
/// straight back to the kernel, so the next step's same-sized buffer page-faults in afresh
/// (measured: 5-8% of an SD-1.5 UNet step in page faults). Raising the threshold to its 32 MiB
/// maximum and keeping freed memory lets steps reuse their buffers: SD-1.5 UNet steps at
/// 256x256 took 5.4-5.6 s instead of 6.3-8.0 s on the 2-core development machine.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_buffers() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_buffers() {}

/// candle runs large elementwise operations on its own thread pool besides rayon's, and by
/// default each of its workers spins 25,000 times after every operation before it sleeps. The
/// GEMMs and easel's kernels run on rayon's threads meanwhile, so a spinning candle worker takes
/// a core from them: profiling the bundled model on 2 cores, the spinning worker took 15% of
/// the CPU samples by default and 1.2% with 100 spins. A value the user sets is kept.
fn short_candle_spins() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        // Called first in `main`, before any other thread exists to read the environment.
        std::env::set_var(VAR, "100");
    }
}

fn main() {
    short_candle_spins();
    keep_freed_buffers();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("EASEL_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Worker(args) => serve::run_worker(args),
        Command::Cost(args) => cost::run(args),
        Command::Models(args) => models::run(args),
    };
    if let Err(e) = result {
        // One line: the error and its causes, never a panic or a backtrace.
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}
