//! `sdlm bench --target ADDR --concurrency LIST`: a load generator over gRPC. Each level runs
//! every prompt through `GenerateStream` from that many concurrent clients and prints
//! throughput, latency percentiles, time to first block, and what the services add to each
//! request: its latency at the client minus the time the worker's engine spent decoding it
//! (reported in `usage`), both of the same request, so the machine's noise between runs does
//! not enter. With `--model` as well, the same prompts are first decoded in this process with the
//! same parameters, for the whole in-process latency and for what the services add over an
//! in-process caller (who also tokenizes, detokenizes and starts a decoder): once over a lone
//! decoder, and once through a step batcher as the worker's engine thread runs it, which leaves
//! only what the gateway, the scheduler and the gRPC hops add. A benchmark prints measurements;
//! it asserts nothing.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use sdlm_engine::decode::{decoder_for, DecodingParams, StepBatcher};
use sdlm_engine::kv::PagePool;
use sdlm_engine::{open_model, Device, Model};
use sdlm_proto::v1::generation_client::GenerationClient;
use sdlm_proto::v1::{DecodingParams as WireParams, GenerateRequest};

pub struct Load<'a> {
    pub target: &'a str,
    pub prompts: &'a [String],
    pub concurrency: &'a [usize],
    pub max_new_tokens: usize,
    pub model: Option<&'a Path>,
    pub json: bool,
}

/// One request as the client saw it.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    seconds: f64,
    first_block: Option<f64>,
    tokens: u32,
    forwards: u32,
    /// The worker's decoding time for this request (from `usage`).
    engine: f64,
}

pub fn run(load: Load<'_>) -> anyhow::Result<()> {
    let baseline = match load.model {
        Some(model) => Some(in_process(model, load.prompts, load.max_new_tokens)?),
        None => None,
    };
    let levels = crate::cluster::runtime()?.block_on(async {
        let mut levels = Vec::new();
        for &c in load.concurrency {
            levels.push((c, level(&load, c.max(1)).await?));
        }
        anyhow::Ok(levels)
    })?;
    report(&load, baseline.as_ref(), &levels);
    Ok(())
}

/// One prompt decoded in this process.
#[derive(Clone, Copy, Debug)]
struct InProcess {
    /// Tokenizing, decoding and detokenizing, as the gateway does them.
    seconds: f64,
    /// The decoder's own time (prefill and steps), measured as the worker measures it.
    engine: f64,
}

/// The in-process baselines: each prompt decoded by a lone decoder, and by a step batcher.
struct Baselines {
    decoder: Vec<InProcess>,
    batcher: Vec<InProcess>,
}

/// Every prompt decoded here, one after another, both ways.
fn in_process(
    model: &Path,
    prompts: &[String],
    max_new_tokens: usize,
) -> anyhow::Result<Baselines> {
    let (model, tokenizer) = open_model(model, &Device::Cpu)?;
    let params = DecodingParams {
        max_new_tokens,
        ..DecodingParams::for_model(model.config())
    };
    let encode = |prompt: &str| {
        tokenizer
            .encode(prompt, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| anyhow::anyhow!("tokenizing a prompt: {e}"))
    };
    let detokenize = |ids: &[u32]| {
        tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("detokenizing: {e}"))
    };
    let mut decoder = Vec::new();
    for prompt in prompts {
        let start = Instant::now();
        let ids = encode(prompt)?;
        let mut d = decoder_for(&model, &ids, &params)?;
        while d.finished().is_none() {
            if !d.step()?.is_empty() {
                detokenize(d.completion())?;
            }
        }
        let stats = d.stats();
        decoder.push(InProcess {
            seconds: start.elapsed().as_secs_f64(),
            engine: stats.prefill_seconds + stats.decode_seconds,
        });
    }
    let mut batcher = worker_like_batcher(&model, &params)?;
    let mut batched = Vec::new();
    for prompt in prompts {
        let start = Instant::now();
        let id = batcher.add(encode(prompt)?, params.clone());
        let mut completion = Vec::new();
        let stats = loop {
            let Some(out) = batcher.step().into_iter().find(|o| o.id == id) else {
                continue;
            };
            if let Some(e) = out.error {
                anyhow::bail!("in-process step batcher: {e}");
            }
            if !out.tokens.is_empty() {
                completion.extend_from_slice(&out.tokens);
                detokenize(&completion)?;
            }
            if out.finish.is_some() {
                break out.stats;
            }
        };
        batched.push(InProcess {
            seconds: start.elapsed().as_secs_f64(),
            engine: stats.prefill_seconds + stats.decode_seconds,
        });
        // As the worker's engine thread does while it waits for the next request.
        batcher.release_finished();
    }
    Ok(Baselines {
        decoder,
        batcher: batched,
    })
}

/// A step batcher with the worker's page size and token budget, and pages for two sequences of
/// the model's whole context (one runs at a time; the other's worth keeps the prefix cache).
fn worker_like_batcher<'m>(
    model: &'m Model,
    params: &DecodingParams,
) -> anyhow::Result<StepBatcher<'m>> {
    let page_tokens = sdlm_worker::DEFAULT_PAGE_TOKENS;
    let per_sequence =
        (model.config().max_position_embeddings + params.block_size).div_ceil(page_tokens);
    Ok(
        StepBatcher::new(model, PagePool::new(2 * per_sequence, page_tokens))?
            .with_max_batch_tokens(sdlm_engine::decode::DEFAULT_MAX_BATCH_TOKENS),
    )
}

/// Every prompt through `concurrency` clients; samples in prompt order and the wall time.
async fn level(load: &Load<'_>, concurrency: usize) -> anyhow::Result<(Vec<Sample>, f64)> {
    let queue: Arc<Mutex<VecDeque<(usize, String)>>> = Arc::new(Mutex::new(
        load.prompts.iter().cloned().enumerate().collect(),
    ));
    let samples = Arc::new(Mutex::new(vec![Sample::default(); load.prompts.len()]));
    let start = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..concurrency {
        let queue = Arc::clone(&queue);
        let samples = Arc::clone(&samples);
        let target = format!("http://{}", load.target);
        let max_new = load.max_new_tokens as u32;
        clients.push(tokio::spawn(async move {
            let mut client = GenerationClient::connect(target.clone())
                .await
                .with_context(|| format!("connecting to {target}"))?;
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                let Some((i, prompt)) = next else {
                    return anyhow::Ok(());
                };
                let sample = request(&mut client, prompt, max_new).await?;
                if let Ok(mut s) = samples.lock() {
                    s[i] = sample;
                }
            }
        }));
    }
    for c in clients {
        c.await??;
    }
    let wall = start.elapsed().as_secs_f64();
    let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
    Ok((samples, wall))
}

async fn request(
    client: &mut GenerationClient<tonic::transport::Channel>,
    prompt: String,
    max_new_tokens: u32,
) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut stream = client
        .generate_stream(GenerateRequest {
            prompt,
            params: Some(WireParams {
                max_new_tokens: Some(max_new_tokens),
                ..WireParams::default()
            }),
            ..GenerateRequest::default()
        })
        .await?
        .into_inner();
    let mut sample = Sample::default();
    while let Some(message) = stream.message().await? {
        if sample.first_block.is_none() && message.block_tokens > 0 {
            sample.first_block = Some(start.elapsed().as_secs_f64());
        }
        if let Some(usage) = message.usage {
            sample.tokens = usage.completion_tokens;
            sample.forwards = usage.forward_passes;
            sample.engine = usage.engine_seconds;
        }
    }
    sample.seconds = start.elapsed().as_secs_f64();
    Ok(sample)
}

/// The q-quantile by nearest rank.
fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn report(load: &Load<'_>, baseline: Option<&Baselines>, levels: &[(usize, (Vec<Sample>, f64))]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !load.json {
        println!(
            "target {}, {} prompts, max_new_tokens {}, client on {} ({} cores, shared with the server)",
            load.target,
            load.prompts.len(),
            load.max_new_tokens,
            cpu_name(),
            cores
        );
        println!(
            "{:>11} {:>8} {:>9} {:>9} {:>9} {:>13} {:>8} {:>14} {:>14}",
            "concurrency",
            "requests",
            "tokens/s",
            "p50 ms",
            "p99 ms",
            "1st block ms",
            "tok/fwd",
            "added p50 ms",
            "added p99 ms"
        );
    }
    for (c, (samples, wall)) in levels {
        let latency: Vec<f64> = samples.iter().map(|s| s.seconds * 1e3).collect();
        let first: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.first_block.map(|t| t * 1e3))
            .collect();
        let tokens: u64 = samples.iter().map(|s| s.tokens as u64).sum();
        let forwards: u64 = samples.iter().map(|s| s.forwards as u64).sum();
        let tps = tokens as f64 / wall.max(1e-9);
        let tpf = tokens as f64 / forwards.max(1) as f64;
        let added: Vec<f64> = samples
            .iter()
            .map(|s| (s.seconds - s.engine) * 1e3)
            .collect();
        if load.json {
            println!(
                "{}",
                serde_json::json!({
                    "mode": "grpc", "target": load.target, "concurrency": c,
                    "requests": samples.len(), "tokens": tokens, "seconds": wall,
                    "tokens_per_second": tps, "latency_p50_ms": quantile(&latency, 0.5),
                    "latency_p99_ms": quantile(&latency, 0.99),
                    "time_to_first_block_p50_ms": quantile(&first, 0.5),
                    "tokens_per_forward": tpf,
                    "added_by_services_p50_ms": quantile(&added, 0.5),
                    "added_by_services_p99_ms": quantile(&added, 0.99),
                })
            );
        } else {
            println!(
                "{:>11} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>13.1} {:>8.2} {:>14.2} {:>14.2}",
                c,
                samples.len(),
                tps,
                quantile(&latency, 0.5),
                quantile(&latency, 0.99),
                quantile(&first, 0.5),
                tpf,
                quantile(&added, 0.5),
                quantile(&added, 0.99)
            );
        }
    }
    let Some(baseline) = baseline else { return };
    let Some((_, (serial, _))) = levels.iter().find(|(c, _)| *c == 1) else {
        if !load.json {
            println!("(include concurrency 1 to compare with the in-process baseline)");
        }
        return;
    };
    // What the services add over an in-process caller: each request's time outside the engine
    // through gRPC, minus the same prompt's time outside the engine in-process (tokenizing,
    // detokenizing, starting the decoder), so neither run's engine speed enters.
    let over = |base: &[InProcess]| -> Vec<f64> {
        serial
            .iter()
            .zip(base)
            .map(|(s, b)| ((s.seconds - s.engine) - (b.seconds - b.engine)) * 1e3)
            .collect()
    };
    let (over_decoder, over_batcher) = (over(&baseline.decoder), over(&baseline.batcher));
    let added: Vec<f64> = serial
        .iter()
        .zip(&baseline.decoder)
        .map(|(s, b)| (s.seconds - b.seconds) * 1e3)
        .collect();
    let outside = |base: &[InProcess]| -> Vec<f64> {
        base.iter().map(|b| (b.seconds - b.engine) * 1e3).collect()
    };
    let base_ms: Vec<f64> = baseline.decoder.iter().map(|b| b.seconds * 1e3).collect();
    let engine_ms: Vec<f64> = serial.iter().map(|s| s.engine * 1e3).collect();
    if load.json {
        println!(
            "{}",
            serde_json::json!({
                "mode": "in-process", "concurrency": 1, "requests": baseline.decoder.len(),
                "latency_p50_ms": quantile(&base_ms, 0.5),
                "worker_engine_p50_ms": quantile(&engine_ms, 0.5),
                "grpc_minus_in_process_p50_ms": quantile(&added, 0.5),
                "outside_decoder_in_process_p50_ms": quantile(&outside(&baseline.decoder), 0.5),
                "outside_batcher_in_process_p50_ms": quantile(&outside(&baseline.batcher), 0.5),
                "added_over_in_process_p50_ms": quantile(&over_decoder, 0.5),
                "added_over_in_process_p99_ms": quantile(&over_decoder, 0.99),
                "added_over_in_process_batcher_p50_ms": quantile(&over_batcher, 0.5),
                "added_over_in_process_batcher_p99_ms": quantile(&over_batcher, 0.99),
            })
        );
    } else {
        println!(
            "in-process, same prompts and parameters, run before: p50 {:.1} ms (the worker's engine at concurrency 1: p50 {:.1} ms); gRPC minus in-process, request by request across the two runs: p50 {:.2} ms",
            quantile(&base_ms, 0.5),
            quantile(&engine_ms, 0.5),
            quantile(&added, 0.5),
        );
        println!(
            "time outside the engine in-process: p50 {:.2} ms over a lone decoder, {:.2} ms through a step batcher",
            quantile(&outside(&baseline.decoder), 0.5),
            quantile(&outside(&baseline.batcher), 0.5),
        );
        println!(
            "added over in-process (each side's time outside its engine, request by request): over a lone decoder p50 {:.2} ms, p99 {:.2} ms; over a step batcher (the worker's engine) p50 {:.2} ms, p99 {:.2} ms",
            quantile(&over_decoder, 0.5),
            quantile(&over_decoder, 0.99),
            quantile(&over_batcher, 0.5),
            quantile(&over_batcher, 0.99),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn nearest_rank_quantiles() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&v, 0.5), 3.0);
        assert_eq!(quantile(&v, 0.99), 5.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
