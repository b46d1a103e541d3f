//! `sdlm perplexity`: teacher-forced scoring of a text file.

use std::path::PathBuf;

use anyhow::{bail, Context};
use sdlm_engine::{open_model, score_tokens, Device};

/// Scores every token of FILE after the first, given all earlier tokens (causal attention; no
/// BOS is added unless the tokenizer adds one). Files longer than --context tokens are scored in
/// sliding windows of --context tokens that advance by --stride: each token is scored once, with
/// at least context - stride tokens of history once the first window is past.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory (config.json, model.safetensors, tokenizer.json) or one .gguf file.
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
    /// Score these token ids (a JSON array) instead of tokenizing FILE, which still gives the
    /// byte count; for comparing engines on identical tokens.
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Write one JSON line per scored token: index, token, the model's arg max there, NLL.
    #[arg(long)]
    predictions: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let (model, tokenizer) = open_model(&args.model, &device)?;
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("{}: cannot read as UTF-8 text", args.file.display()))?;
    let encoding = tokenizer
        .encode(text.as_str(), true)
        .map_err(|e| anyhow::anyhow!("{}: tokenizing failed: {e}", args.file.display()))?;
    let given: Option<Vec<u32>> = match &args.tokens {
        Some(path) => Some(
            serde_json::from_str(
                &std::fs::read_to_string(path)
                    .with_context(|| format!("{}: cannot read", path.display()))?,
            )
            .with_context(|| format!("{}: not a JSON array of token ids", path.display()))?,
        ),
        None => None,
    };
    let tokens = given.as_deref().unwrap_or(encoding.get_ids());
    let vocab = model.config().vocab_size;
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        bail!("token id {bad} is outside the model's vocabulary of {vocab}");
    }
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
    if let Some(path) = &args.predictions {
        let mut out = String::new();
        for (i, t) in score.tokens.iter().enumerate() {
            out.push_str(&serde_json::json!({"index": i + 1, "token": tokens[i + 1], "argmax": t.argmax, "nll": t.nll}).to_string());
            out.push('\n');
        }
        std::fs::write(path, out).with_context(|| format!("{}: cannot write", path.display()))?;
    }
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
