//! `sdlm perplexity`: teacher-forced scoring of a text file.

use std::path::PathBuf;

use anyhow::{bail, Context};
use sdlm_engine::{load_model, load_tokenizer, score_tokens, DType, Device};

/// Scores every token of FILE after the first, given all earlier tokens (causal attention; no
/// BOS is added unless the tokenizer adds one). Files longer than --context tokens are scored in
/// sliding windows of --context tokens that advance by --stride: each token is scored once, with
/// at least context - stride tokens of history once the first window is past.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, env = "SDLM_MODEL")]
    model: PathBuf,
    /// Text file to score.
    #[arg(long)]
    file: PathBuf,
    /// Window length in tokens (default: the model's context, at most 2048).
    #[arg(long, env = "SDLM_CONTEXT")]
    context: Option<usize>,
    /// Tokens a window advances by (default: half the window).
    #[arg(long)]
    stride: Option<usize>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let model = load_model(&args.model, &device, DType::F32)?;
    let tokenizer = load_tokenizer(&args.model)?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("{}: cannot read as UTF-8 text", args.file.display()))?;
    let encoding = tokenizer
        .encode(text.as_str(), true)
        .map_err(|e| anyhow::anyhow!("{}: tokenizing failed: {e}", args.file.display()))?;
    let tokens = encoding.get_ids();
    if tokens.len() < 2 {
        bail!(
            "{}: has {} tokens; scoring needs at least 2",
            args.file.display(),
            tokens.len()
        );
    }
    let context = args
        .context
        .unwrap_or(model.config().max_position_embeddings.min(2048));
    let stride = args.stride.unwrap_or((context / 2).max(1));
    let score = score_tokens(&model, tokens, context, stride)?;
    // Bytes of the scored text: everything after the first token's span.
    let first_end = encoding.get_offsets().first().map_or(0, |o| o.1);
    let bytes = text.len().saturating_sub(first_end);
    println!(
        "scored {} tokens: mean NLL {:.4} nats/token, {:.4} bits/byte, {:.1} tokens/s",
        score.scored_tokens,
        score.mean_nll(),
        score.bits_per_byte(bytes),
        score.tokens_per_second()
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "scored_tokens": score.scored_tokens,
                "mean_nll": score.mean_nll(),
                "bits_per_byte": score.bits_per_byte(bytes),
                "tokens_per_second": score.tokens_per_second(),
                "context": context,
                "stride": stride,
                "bytes": bytes,
            })
        );
    }
    Ok(())
}
