//! `easel`: generate images locally, serve the API, run workers, manage models, price them.

mod bench;
mod bundled;
mod cost;
mod executor;
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

fn main() {
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
