//! `sdlm generate`: one completion, printed block by block as blocks commit.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use sdlm_engine::decode::{decoder_for, stop_string_cut, DecodingParams, FinishReason, Mode};
use sdlm_engine::{device_named, open_model_in};

/// Completes PROMPT (or standard input when PROMPT is absent or "-"). Diffusion decoding is the
/// default for models with a mask token, autoregressive otherwise.
#[derive(clap::Args)]
pub struct Args {
    /// Model directory or .gguf file.
    #[arg(long, env = "SDLM_MODEL")]
    model: PathBuf,
    /// autoregressive | diffusion (default: the model's)
    #[arg(long)]
    mode: Option<Mode>,
    /// Tokens per diffusion block (default: the model's block_size, else 32).
    #[arg(long)]
    block_size: Option<usize>,
    /// Unmask positions whose confidence reaches this, in (0, 1].
    #[arg(long, default_value_t = 0.9)]
    threshold: f32,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Self-correction of decoded tokens inside the open block.
    #[arg(long)]
    refine: bool,
    /// Print one JSON object as the last line instead of streaming.
    #[arg(long)]
    json: bool,
    /// cpu, cuda or cuda:N (cuda needs an sdlm built with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Matmuls on the CPU: f32 (exact) or bf16 (inputs and weights rounded to bf16, f32 sums,
    /// on the AMX tiles of an Intel Xeon Sapphire Rapids or later; a GGUF model's weights are
    /// dequantized first).
    #[arg(long, default_value = "f32")]
    matmul_precision: sdlm_engine::MatmulPrecision,
    /// What the model computes in on a GPU: f32, bf16 or f16 (bf16 and f16 take the
    /// tensor-core attention kernel; on the CPU the model computes in f32).
    #[arg(long, default_value = "f32")]
    dtype: sdlm_engine::ComputeDtype,
    prompt: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let prompt = match args.prompt.as_deref() {
        None | Some("-") => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from standard input")?;
            s
        }
        Some(p) => p.to_string(),
    };
    let (mut model, tokenizer) =
        open_model_in(&args.model, &device_named(&args.device)?, args.dtype)?;
    model.set_matmul_precision(args.matmul_precision)?;
    let defaults = DecodingParams::for_model(model.config());
    let params = DecodingParams {
        mode: args.mode.unwrap_or(defaults.mode),
        block_size: args.block_size.unwrap_or(defaults.block_size),
        threshold: args.threshold,
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        stop: args.stop.clone(),
        refine: args.refine,
        ..defaults
    };
    let encoding = tokenizer
        .encode(prompt.as_str(), true)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let prompt_ids = encoding.get_ids();
    let mut decoder = decoder_for(&model, prompt_ids, &params)?;
    let detok = |ids: &[u32]| {
        tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("detokenizing: {e}"))
    };

    let mut printed = 0;
    let mut text = String::new();
    let mut stdout = std::io::stdout();
    while decoder.finished().is_none() {
        if decoder.step()?.is_empty() {
            continue;
        }
        text = detok(decoder.completion())?;
        if let Some(cut) = stop_string_cut(&text, &params.stop) {
            text.truncate(cut);
            decoder.finish(FinishReason::StopString);
        }
        if !args.json && text.len() > printed && text.is_char_boundary(printed) {
            write!(stdout, "{}", &text[printed..])?;
            stdout.flush()?;
            printed = text.len();
        }
    }
    let stats = decoder.stats();
    let tokens = decoder.completion().len();
    let forwards = stats.forward_passes();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "text": text,
                "tokens": tokens,
                "prompt_tokens": prompt_ids.len(),
                "forward_passes": forwards,
                "tokens_per_forward": tokens as f64 / forwards.max(1) as f64,
                "steps": stats.steps,
                "edits": stats.edits,
                "elapsed_ms": (stats.prefill_seconds + stats.decode_seconds) * 1e3,
                "finish_reason": decoder.finished().map(|f| f.as_str()),
                "mode": format!("{:?}", params.mode).to_lowercase(),
                "block_size": params.block_size,
            })
        );
    } else {
        println!();
    }
    Ok(())
}
