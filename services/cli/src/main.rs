//! sdlm: the one user-facing binary.

mod generate;
mod perplexity;

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
    /// Complete a prompt (block diffusion or autoregressive).
    Generate(generate::Args),
    /// Teacher-forced scoring of a text file.
    Perplexity(perplexity::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate(args) => generate::run(args),
        Command::Perplexity(args) => perplexity::run(args),
    }
}
