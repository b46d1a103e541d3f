//! sdlm: the one user-facing binary.

mod batch;
mod batched_bench;
mod bench;
mod cluster;
mod completer;
mod eval;
mod generate;
mod load;
mod parse_rate;
mod perplexity;
mod serve;
mod threads;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sdlm",
    version,
    about = "Block-diffusion language models for code"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// An offline job: every prompt of a JSONL file through the API, resumable.
    Batch(batch::Args),
    /// Autoregressive vs diffusion decoding of one model on a prompt file.
    Bench(bench::Args),
    /// Complete a prompt (block diffusion or autoregressive).
    Generate(generate::Args),
    /// Teacher-forced scoring of a text file.
    Perplexity(perplexity::Args),
    /// Serve a model over gRPC: gateway, scheduler and one worker in one process.
    Serve(serve::Args),
    /// The public gRPC gateway of a cluster.
    Gateway(cluster::GatewayArgs),
    /// The scheduler of a cluster.
    Scheduler(cluster::SchedulerArgs),
    /// A worker of a cluster (one engine).
    Worker(cluster::WorkerArgs),
    /// Evaluate by execution: HumanEval pass@k, or infilling of its solutions.
    #[command(subcommand)]
    Eval(eval::Suite),
    /// Train a block-diffusion code model (two-stage curriculum) from a preset.
    Train(train::Args),
}

fn main() -> anyhow::Result<()> {
    threads::pin_candle_thread_count();
    match Cli::parse().command {
        Command::Batch(args) => batch::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Gateway(args) => cluster::gateway(args),
        Command::Scheduler(args) => cluster::scheduler(args),
        Command::Worker(args) => cluster::worker(args),
        Command::Train(args) => train::run_cli(args),
        Command::Eval(suite) => eval::run(suite),
    }
}
