//! `sdlm bench --model PATH --prompts FILE --concurrency LIST`: the prompts through the engine's
//! step batcher, at most `concurrency` sequences in flight (a new one joins as one finishes),
//! for each mode; tokens/s at each level and its ratio to concurrency 1 of the same mode,
//! measured in the same run. A benchmark prints measurements; it asserts nothing.

use std::time::Instant;

use sdlm_engine::decode::{DecodingParams, Mode, StepBatcher};
use sdlm_engine::kv::{KvStorage, PagePool};
use sdlm_engine::Model;

pub struct Level {
    pub mode: Mode,
    pub block_size: usize,
    pub concurrency: usize,
    pub tokens: usize,
    pub forwards: usize,
    pub seconds: f64,
    pub iterations: usize,
    /// Of `seconds`, the batcher's rounds: its batched forwards and the greedy choices.
    pub round_seconds: f64,
}

/// Every prompt through a batcher keeping `concurrency` sequences in flight.
pub fn run_level(
    model: &Model,
    prompts: &[Vec<u32>],
    params: &DecodingParams,
    concurrency: usize,
    pool: PagePool,
    max_batch_tokens: usize,
) -> anyhow::Result<Level> {
    let mut batcher = StepBatcher::new(model, pool)?.with_max_batch_tokens(max_batch_tokens);
    let mut next = 0;
    let (mut tokens, mut forwards, mut iterations) = (0, 0, 0);
    let start = Instant::now();
    while next < prompts.len() || !batcher.is_empty() {
        while batcher.len() < concurrency.max(1) && next < prompts.len() {
            batcher.add(prompts[next].clone(), params.clone());
            next += 1;
        }
        iterations += 1;
        for out in batcher.step() {
            if let Some(e) = out.error {
                anyhow::bail!("prompt failed: {e}");
            }
            tokens += out.tokens.len();
            if out.finish.is_some() {
                forwards += out.stats.forward_passes();
            }
        }
    }
    Ok(Level {
        mode: params.mode,
        block_size: params.block_size,
        concurrency,
        tokens,
        forwards,
        seconds: start.elapsed().as_secs_f64(),
        iterations,
        round_seconds: batcher.round_seconds(),
    })
}

/// Prints one mode's levels, each with its ratio to the first (concurrency 1 when listed).
pub fn report(model: &Model, page_tokens: usize, levels: &[Level], json: bool) {
    let kv_bytes = KvStorage::bytes_per_token(model);
    let base = levels
        .first()
        .map(|l| l.tokens as f64 / l.seconds.max(1e-9));
    for l in levels {
        let tps = l.tokens as f64 / l.seconds.max(1e-9);
        let ratio = base.map(|b| tps / b.max(1e-9)).unwrap_or(f64::NAN);
        let tpf = l.tokens as f64 / l.forwards.max(1) as f64;
        let per_iteration_ms = |s: f64| s * 1e3 / l.iterations.max(1) as f64;
        let (round_ms, rest_ms) = (
            per_iteration_ms(l.round_seconds),
            per_iteration_ms(l.seconds - l.round_seconds),
        );
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "mode": format!("{:?}", l.mode).to_lowercase(), "block_size": l.block_size, "concurrency": l.concurrency,
                    "tokens": l.tokens, "seconds": l.seconds, "tokens_per_second": tps,
                    "ratio_to_first_level": ratio, "tokens_per_forward": tpf,
                    "engine_iterations": l.iterations, "kv_bytes_per_token": kv_bytes,
                    "round_ms_per_iteration": round_ms, "rest_ms_per_iteration": rest_ms,
                    "page_tokens": page_tokens,
                })
            );
        } else {
            println!(
                "{:>14} {:>6} {:>11} {:>9.1} {:>9.2}x {:>8.2} {:>10} {:>9.3} {:>9.3}",
                format!("{:?}", l.mode).to_lowercase(),
                l.block_size,
                l.concurrency,
                tps,
                ratio,
                tpf,
                l.iterations,
                round_ms,
                rest_ms
            );
        }
    }
}
