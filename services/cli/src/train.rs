//! `sdlm train`: block-diffusion training of a small code model from a preset.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use sdlm_trainer::{python_stdlib, run, RunOptions, Settings};

/// Trains a Qwen3-layout block-diffusion model on a source-code corpus (default: this machine's
/// CPython standard library) with the two-stage curriculum, and exports it as an HF-layout
/// directory under OUT/model. Ctrl-C checkpoints and stops; --resume continues exactly.
#[derive(clap::Args)]
pub struct Args {
    /// smoke (under a minute), tiny-code (the shipped model's base), or tiny-code-step-reduction
    /// (stage 3 alone, from --init).
    #[arg(long, default_value = "smoke", env = "SDLM_PRESET")]
    preset: String,
    /// Run directory (data, checkpoint, log, model); default runs/PRESET.
    #[arg(long, env = "SDLM_OUT")]
    out: Option<PathBuf>,
    /// Corpus directories (repeatable); default: python3's stdlib without site-packages.
    #[arg(long)]
    corpus: Vec<PathBuf>,
    /// File extensions to train on (repeatable).
    #[arg(long = "ext", default_value = "py")]
    extensions: Vec<String>,
    /// Continue the run in OUT from its checkpoint.
    #[arg(long)]
    resume: bool,
    /// Start a new run from this trained model directory (its weights and tokenizer) instead
    /// of random weights; tiny-code-step-reduction needs it.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Override the preset's optimiser steps.
    #[arg(long)]
    steps: Option<usize>,
    /// Override the preset's windows per micro-batch.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Override the preset's micro-batches per step.
    #[arg(long)]
    accumulation: Option<usize>,
    /// Override the preset's seed (data order, corruption; the first weights unless --init).
    #[arg(long)]
    seed: Option<u64>,
    /// Override any setting of the preset, KEY=VALUE (repeatable; the keys are those of a run
    /// directory's settings.json).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Stop (with a checkpoint) after this many steps of this session.
    #[arg(long)]
    session_steps: Option<usize>,
    /// Only redraw OUT/loss.png from OUT/log.jsonl.
    #[arg(long)]
    plot_only: bool,
    /// Print the run report as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

pub fn run_cli(args: Args) -> anyhow::Result<()> {
    keep_freed_memory();
    if args.plot_only {
        let dir = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&args.preset));
        let curve = sdlm_trainer::read_log(&dir.join("log.jsonl"))?;
        let title = format!("sdlm {}: block-diffusion training", args.preset);
        sdlm_trainer::plot_loss(&curve, &dir.join("loss.png"), &title)?;
        return Ok(());
    }
    let mut settings = Settings::preset(&args.preset)?;
    if let Some(steps) = args.steps {
        settings.steps = steps;
    }
    if let Some(n) = args.batch_size {
        settings.batch_size = n;
    }
    if let Some(n) = args.accumulation {
        settings.accumulation = n;
    }
    if let Some(seed) = args.seed {
        settings.seed = seed;
    }
    let settings = settings.with_overrides(&args.overrides)?;
    let corpus = if args.corpus.is_empty() {
        vec![python_stdlib()?]
    } else {
        args.corpus.clone()
    };
    let run_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&args.preset));
    static STOP: AtomicBool = AtomicBool::new(false);
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: checkpointing after this step");
        STOP.store(true, Ordering::SeqCst);
    })
    .context("installing the Ctrl-C handler")?;
    let report = run(RunOptions {
        run_dir: run_dir.clone(),
        settings: (!args.resume).then_some(settings),
        resume: args.resume,
        init: args.init.clone(),
        corpus,
        extensions: args.extensions.clone(),
        stop: &STOP,
        session_steps: args.session_steps,
        progress: std::io::stderr().is_terminal(),
    })?;
    if report.finished {
        if let Some(e) = &report.final_eval {
            eprintln!(
                "{} steps, {} tokens, {:.0} s; held-out AR {:.4} bits/byte, diffusion bound (B=32) {:.4} bits/byte; model in {}",
                report.steps,
                report.tokens_seen,
                report.elapsed_s,
                e.ar_bits_per_byte,
                e.diffusion_bits_per_byte,
                run_dir.join("model").display()
            );
        }
    } else {
        eprintln!(
            "stopped at step {}; continue with: sdlm train --out {} --resume",
            report.steps,
            run_dir.display()
        );
    }
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(obj) = v.as_object_mut() {
            obj.remove("losses");
        }
        println!("{v}");
    }
    Ok(())
}

/// Training allocates and frees the same large activation tensors every step. glibc returns
/// blocks above its mmap threshold to the kernel on free, so each step page-faults and zeroes
/// them afresh; measured on the tiny-code preset (2 cores), that was a fifth of the wall time in
/// the kernel. Raising the thresholds keeps freed blocks for reuse: 490 instead of 390 tokens/s.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only sets allocator parameters; called before any training allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
