//! sdlm: the one user-facing binary.

mod bench;
mod generate;
mod parse_rate;
mod perplexity;
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
    /// Autoregressive vs diffusion decoding of one model on a prompt file.
    Bench(bench::Args),
    /// Complete a prompt (block diffusion or autoregressive).
    Generate(generate::Args),
    /// Teacher-forced scoring of a text file.
    Perplexity(perplexity::Args),
    /// Train a block-diffusion code model (two-stage curriculum) from a preset.
    Train(train::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(args) => bench::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Train(args) => train::run_cli(args),
    }
}
