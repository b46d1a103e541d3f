//! sdlm: the one user-facing binary.

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
    Perplexity(perplexity::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Perplexity(args) => perplexity::run(args),
    }
}
