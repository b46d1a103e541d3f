//! `sdlm bench`: autoregressive and diffusion decoding of the same model on the same prompts in
//! one process, every configuration in turn, then the time of one forward over n tokens next to
//! this machine's floor for it. With `--target`, a load generator over gRPC instead (`load.rs`);
//! with `--concurrency`, the step batcher at each level (`batched_bench.rs`).
//! A benchmark prints measurements; it asserts nothing.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use sdlm_engine::decode::{decoder_for, Decoder, DecodingParams, Mode};
use sdlm_engine::{device_named, open_model_in, Device, KvCache, Model, ModelConfig};

use crate::parse_rate::{first_definition, parses};

#[derive(clap::Args)]
pub struct Args {
    /// The model to decode in this process (with --target: the in-process baseline).
    #[arg(long, env = "SDLM_MODEL", required_unless_present = "target")]
    model: Option<PathBuf>,
    /// A gateway (or `sdlm serve`) address: run the prompts over gRPC at each --concurrency.
    #[arg(long)]
    target: Option<String>,
    /// Concurrent clients for --target, e.g. 1,4,16. With --model alone, anything but 1 runs
    /// the prompts through the engine's step batcher with that many sequences in flight.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    concurrency: Vec<usize>,
    /// KV cache pages of 16 tokens for the step batcher (--model with --concurrency).
    #[arg(long, default_value_t = 4096)]
    kv_pages: usize,
    /// Tokens one step-batcher iteration runs at most (--model with --concurrency).
    #[arg(long, default_value_t = sdlm_engine::decode::DEFAULT_MAX_BATCH_TOKENS, value_parser = crate::cluster::at_least_one)]
    max_batch_tokens: usize,
    /// JSON lines, each with a "prompt" string.
    #[arg(long)]
    prompts: PathBuf,
    /// Modes to run (default: autoregressive, and diffusion when the model has a mask token).
    #[arg(long, value_delimiter = ',')]
    mode: Vec<Mode>,
    #[arg(long, value_delimiter = ',', default_value = "4,8,32")]
    block_size: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "0.9")]
    threshold: Vec<f32>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Denoising steps a diffusion block may take at most; the last one unmasks the rest.
    #[arg(long)]
    max_steps_per_block: Option<usize>,
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
    /// Use only the first N prompts.
    #[arg(long)]
    limit: Option<usize>,
    /// One JSON object per configuration instead of a table.
    #[arg(long)]
    json: bool,
}

struct Row {
    mode: Mode,
    block_size: usize,
    threshold: f32,
    tokens: usize,
    forwards: usize,
    steps: usize,
    seconds: f64,
    parsed: usize,
    prompts: usize,
}

/// The "prompt" of each JSON line of `path`, the first `limit` of them.
pub fn read_prompts(path: &std::path::Path, limit: Option<usize>) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        match v.get("prompt").and_then(|p| p.as_str()) {
            Some(p) => prompts.push(p.to_string()),
            None => bail!("{}:{}: no \"prompt\" string", path.display(), i + 1),
        }
    }
    prompts.truncate(limit.unwrap_or(usize::MAX));
    if prompts.is_empty() {
        bail!("{}: no prompts", path.display());
    }
    Ok(prompts)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let prompts = read_prompts(&args.prompts, args.limit)?;
    if let Some(target) = &args.target {
        return crate::load::run(crate::load::Load {
            target,
            prompts: &prompts,
            concurrency: &args.concurrency,
            max_new_tokens: args.max_new_tokens,
            model: args.model.as_deref(),
            json: args.json,
        });
    }
    let Some(model_path) = args.model.clone() else {
        bail!("give --model PATH (or --target ADDR for a gRPC load test)");
    };
    let device = device_named(&args.device)?;
    let (mut model, tokenizer) = open_model_in(&model_path, &device, args.dtype)?;
    model.set_matmul_precision(args.matmul_precision)?;
    let has_mask = model.config().diffusion.mask_token_id.is_some();
    let modes = if args.mode.is_empty() {
        if has_mask {
            vec![Mode::Autoregressive, Mode::Diffusion]
        } else {
            vec![Mode::Autoregressive]
        }
    } else {
        args.mode.clone()
    };
    if args.concurrency != [1] {
        let ids = prompts
            .iter()
            .map(|p| {
                tokenizer
                    .encode(p.as_str(), true)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| anyhow::anyhow!("tokenizing a prompt: {e}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        return batched(&args, &model, &ids, &modes);
    }
    let mut configs = Vec::new();
    for &mode in &modes {
        match mode {
            Mode::Autoregressive => configs.push((mode, 1, 1.0)),
            Mode::Diffusion => {
                for &b in &args.block_size {
                    for &t in &args.threshold {
                        configs.push((mode, b, t));
                    }
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (mode, block_size, threshold) in configs {
        let params = DecodingParams {
            mode,
            block_size,
            threshold,
            max_new_tokens: args.max_new_tokens,
            max_steps_per_block: args.max_steps_per_block,
            ..DecodingParams::for_model(model.config())
        };
        let mut row = Row {
            mode,
            block_size,
            threshold,
            tokens: 0,
            forwards: 0,
            steps: 0,
            seconds: 0.0,
            parsed: 0,
            prompts: prompts.len(),
        };
        // One untimed decode first: a GPU compiles candle's kernels on their first launch (seconds
        // in all), and the first configuration would otherwise pay for every later one.
        let encode = |prompt: &str| {
            tokenizer
                .encode(prompt, true)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| anyhow::anyhow!("tokenizing a prompt: {e}"))
        };
        if let Some(first) = prompts.first() {
            decode(&model, &encode(first)?, &params)?;
        }
        for prompt in &prompts {
            let d = decode(&model, &encode(prompt)?, &params)?;
            let s = d.stats();
            row.tokens += d.completion().len();
            row.forwards += s.forward_passes();
            row.steps += s.steps;
            row.seconds += s.prefill_seconds + s.decode_seconds;
            let completion = tokenizer
                .decode(d.completion(), true)
                .map_err(|e| anyhow::anyhow!("detokenizing: {e}"))?;
            row.parsed += parses(&first_definition(prompt, &completion)) as usize;
        }
        rows.push(row);
    }
    report(&args, &model_path, &model, &rows)?;
    forward_floor(&model, &model_path)
}

/// `prompt` decoded to the end with `params`.
fn decode<'m>(
    model: &'m Model,
    prompt: &[u32],
    params: &DecodingParams,
) -> anyhow::Result<Box<dyn Decoder + 'm>> {
    let mut d = decoder_for(model, prompt, params)?;
    while d.finished().is_none() {
        d.step()?;
    }
    Ok(d)
}

fn report(args: &Args, path: &std::path::Path, model: &Model, rows: &[Row]) -> anyhow::Result<()> {
    let ar_tps = rows
        .iter()
        .find(|r| r.mode == Mode::Autoregressive)
        .map(|r| r.tokens as f64 / r.seconds.max(1e-9));
    if !args.json {
        println!(
            "model {} ({} layers, hidden {}), {} prompts, max_new_tokens {}{}, {}, concurrency 1",
            path.display(),
            model.config().num_hidden_layers,
            model.config().hidden_size,
            rows.first().map_or(0, |r| r.prompts),
            args.max_new_tokens,
            args.max_steps_per_block
                .map_or(String::new(), |n| format!(", max_steps_per_block {n}")),
            device_words(model),
        );
        println!(
            "{:<15} {:>5} {:>6} {:>9} {:>8} {:>9} {:>8} {:>10} {:>7}",
            "mode", "block", "tau", "tokens/s", "vs AR", "tok/fwd", "forwards", "steps", "parse"
        );
    }
    for r in rows {
        let tps = r.tokens as f64 / r.seconds.max(1e-9);
        let tpf = r.tokens as f64 / r.forwards.max(1) as f64;
        let parse_rate = r.parsed as f64 / r.prompts.max(1) as f64;
        let mode = format!("{:?}", r.mode).to_lowercase();
        if args.json {
            println!(
                "{}",
                serde_json::json!({
                    "mode": mode, "block_size": r.block_size, "threshold": r.threshold, "concurrency": 1,
                    "tokens_per_second": tps, "tokens_per_forward": tpf, "forward_passes": r.forwards,
                    "steps": r.steps, "tokens": r.tokens, "parse_rate": parse_rate,
                    "speedup_vs_autoregressive": ar_tps.map(|a| tps / a),
                    "matmul_precision": model.matmul_precision().to_string(),
                    "dtype": model.dtype().as_str(),
                })
            );
        } else {
            let vs = ar_tps.map_or("-".to_string(), |a| format!("{:.2}x", tps / a));
            println!(
                "{:<15} {:>5} {:>6} {:>9.1} {:>8} {:>9.2} {:>8} {:>10} {:>6.0}%",
                mode,
                r.block_size,
                r.threshold,
                tps,
                vs,
                tpf,
                r.forwards,
                r.steps,
                100.0 * parse_rate
            );
        }
    }
    Ok(())
}

/// Parameters of a decoder of this shape (embedding, layers, final norm, untied head).
fn parameters(c: &ModelConfig) -> f64 {
    let (h, i, d) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.head_dim as f64,
    );
    let (heads, kv) = (c.num_attention_heads as f64, c.num_key_value_heads as f64);
    let attn = h * heads * d * 2.0 + h * kv * d * 2.0;
    let layer = attn + 3.0 * h * i + 2.0 * h;
    let head = if c.tie_word_embeddings {
        0.0
    } else {
        h * c.vocab_size as f64
    };
    c.vocab_size as f64 * h + c.num_hidden_layers as f64 * layer + h + head
}

/// How a report names the device: the CPU with its threads and matmul precision, or the CUDA
/// device with the dtype the model computes in.
fn device_words(model: &Model) -> String {
    match model.device() {
        Device::Cpu => format!(
            "CPU, {} threads, {} matmuls",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            model.matmul_precision()
        ),
        other => format!("{:?}, {}", other.location(), model.dtype().as_str()),
    }
}

/// One forward over n tokens against the floor: the slower of reading every weight byte once
/// at the measured copy bandwidth and 2 x params x n FLOPs at the measured f32 matmul rate, both
/// measured on the model's device.
fn forward_floor(model: &Model, path: &std::path::Path) -> anyhow::Result<()> {
    let device = model.device();
    let measured_flops = measure_matmul_flops(device)?;
    let bandwidth = match device {
        Device::Cpu => measure_copy_bandwidth()?,
        _ => measure_device_copy_bandwidth(device)?,
    };
    let params = parameters(model.config());
    let bf16 = model.matmul_precision() == sdlm_engine::MatmulPrecision::Bf16;
    let weight_bytes = if path.is_file() {
        std::fs::metadata(path)?.len() as f64
    } else if bf16 {
        params * 2.0
    } else {
        params * 4.0
    };
    // The AMX rate is not measured: with bf16 matmuls the floor is the weights' reading alone.
    let flops = if bf16 { f64::INFINITY } else { measured_flops };
    println!(
        "forward over n tokens (measured here: {} matmul {:.1} GFLOP/s, copy {:.1} GB/s; {:.0}M parameters, {:.0} MB of weights)",
        if bf16 { "f32 (bf16 not measured; floor: weights only)" } else { "f32" },
        measured_flops / 1e9,
        bandwidth / 1e9,
        params / 1e6,
        weight_bytes / 1e6
    );
    println!(
        "{:>5} {:>10} {:>10} {:>8}",
        "n", "ms", "floor ms", "x floor"
    );
    let context = model.config().max_position_embeddings;
    for n in [1usize, 8, 32, 128].into_iter().filter(|&n| n <= context) {
        let tokens: Vec<u32> = (0..n as u32)
            .map(|i| (i * 7 + 3) % model.config().vocab_size as u32)
            .collect();
        let mut times = Vec::new();
        for _ in 0..5 {
            let mut cache = KvCache::new();
            let start = Instant::now();
            model.forward_cached(&tokens, &mut cache, n, false)?;
            device.synchronize()?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        let floor = (weight_bytes / bandwidth).max(2.0 * params * n as f64 / flops);
        println!(
            "{:>5} {:>10.2} {:>10.2} {:>8.1}",
            n,
            t * 1e3,
            floor * 1e3,
            t / floor
        );
    }
    Ok(())
}

fn measure_matmul_flops(device: &Device) -> anyhow::Result<f64> {
    let (n, reps) = match device {
        Device::Cpu => (1024, 5),
        _ => (4096, 20),
    };
    let a = candle_core::Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = candle_core::Tensor::randn(0f32, 1.0, (n, n), device)?;
    a.matmul(&b)?; // warm-up
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..reps {
        a.matmul(&b)?;
    }
    device.synchronize()?;
    Ok(2.0 * (n * n * n * reps) as f64 / start.elapsed().as_secs_f64())
}

/// Device-to-device copy rate (bytes read + written per second) of a 1 GiB tensor.
fn measure_device_copy_bandwidth(device: &Device) -> anyhow::Result<f64> {
    let src = candle_core::Tensor::zeros(1usize << 28, candle_core::DType::F32, device)?;
    src.copy()?; // warm-up
    device.synchronize()?;
    let start = Instant::now();
    let reps = 10;
    for _ in 0..reps {
        std::hint::black_box(src.copy()?);
    }
    device.synchronize()?;
    Ok(2.0 * (4usize << 28) as f64 * reps as f64 / start.elapsed().as_secs_f64())
}

fn measure_copy_bandwidth() -> anyhow::Result<f64> {
    let src = vec![1u8; 256 << 20];
    let mut dst = vec![0u8; 256 << 20];
    dst.copy_from_slice(&src); // fault the pages in
    let start = Instant::now();
    let reps = 4;
    for _ in 0..reps {
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
    }
    Ok(2.0 * (src.len() * reps) as f64 / start.elapsed().as_secs_f64())
}

/// Each mode (diffusion at the first block size and threshold) through the step batcher at each
/// concurrency.
fn batched(args: &Args, model: &Model, ids: &[Vec<u32>], modes: &[Mode]) -> anyhow::Result<()> {
    use crate::batched_bench::{report, run_level};
    const PAGE_TOKENS: usize = 16;
    if !args.json {
        println!(
            "model {}, {} prompts, max_new_tokens {}, {}, step batcher, {} KV pages of {PAGE_TOKENS} tokens, max_batch_tokens {}",
            args.model.as_deref().map(|p| p.display().to_string()).unwrap_or_default(),
            ids.len(),
            args.max_new_tokens,
            device_words(model),
            args.kv_pages,
            args.max_batch_tokens,
        );
        println!(
            "{:>14} {:>6} {:>11} {:>9} {:>10} {:>8} {:>10} {:>9} {:>9}",
            "mode",
            "block",
            "concurrency",
            "tokens/s",
            "vs first",
            "tok/fwd",
            "iterations",
            "round ms",
            "rest ms"
        );
        println!("(round ms: per iteration, the batched forward and the greedy choices; rest ms: the decoders' steps and the batcher's bookkeeping)");
    }
    for &mode in modes {
        let params = DecodingParams {
            mode,
            block_size: match mode {
                Mode::Autoregressive => 1,
                Mode::Diffusion => args.block_size.first().copied().unwrap_or(32),
            },
            threshold: args.threshold.first().copied().unwrap_or(0.9),
            max_new_tokens: args.max_new_tokens,
            max_steps_per_block: args.max_steps_per_block,
            ..DecodingParams::for_model(model.config())
        };
        // Untimed first, as in the unbatched table: kernel compilation stays out of level 1.
        let warm_pool = sdlm_engine::kv::PagePool::new(args.kv_pages, PAGE_TOKENS);
        run_level(
            model,
            &ids[..ids.len().min(1)],
            &params,
            1,
            warm_pool,
            args.max_batch_tokens,
        )?;
        let mut levels = Vec::new();
        for &c in &args.concurrency {
            let pool = sdlm_engine::kv::PagePool::new(args.kv_pages, PAGE_TOKENS);
            levels.push(run_level(
                model,
                ids,
                &params,
                c,
                pool,
                args.max_batch_tokens,
            )?);
        }
        report(model, PAGE_TOKENS, &levels, args.json);
    }
    Ok(())
}
