//! A training run from start (or checkpoint) to the exported model: the step loop with its
//! curriculum, schedule, logging, periodic evaluation and checkpoints.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Device;
use sdlm_engine::ModelConfig;
use serde::Serialize;

use crate::blocks::Blocks;
use crate::checkpoint::{self, TrainState};
use crate::corrupt::Stage;
use crate::data::{DataPosition, TokenShard, Windows};
use crate::error::TrainerError;
use crate::eval::{evaluate, token_bytes, HeldOut};
use crate::init;
use crate::learner::{hf_config, Learner, StepStats};
use crate::objective::Batch;
use crate::optim::learning_rate;
use crate::prepare::{prepare, write, Prepared, RunPaths, MASK_ID, PAD_ID};
use crate::rng::TrainRng;
use crate::settings::Settings;
use crate::shards::{read_shard, write_tokens};
use crate::step_reduction;

pub struct RunOptions<'a> {
    pub run_dir: PathBuf,
    /// Settings of a new run; a resumed run reads its own from the run directory.
    pub settings: Option<Settings>,
    pub resume: bool,
    /// A trained model directory a new run starts from (weights and tokenizer).
    pub init: Option<PathBuf>,
    pub corpus: Vec<PathBuf>,
    pub extensions: Vec<String>,
    /// Set (by Ctrl-C) to checkpoint and stop after the current step.
    pub stop: &'a AtomicBool,
    /// Stop (with a checkpoint) after this many steps in this session: for tests of resume.
    pub session_steps: Option<usize>,
    pub progress: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub stage: u8,
    pub block_size: usize,
    pub lr: f64,
    /// Loss, its mask and edit parts, gradient norm, edits and their Levenshtein distance.
    #[serde(flatten)]
    pub stats: StepStats,
    pub tokens_per_s: f64,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
}

#[derive(Debug, Serialize)]
pub struct RunReport {
    /// The trained model the run started from (`--init`), if any.
    pub init: Option<PathBuf>,
    pub steps: usize,
    pub finished: bool,
    pub losses: Vec<f64>,
    pub final_eval: Option<HeldOut>,
    pub prepared: Prepared,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    pub parameters: usize,
}

pub fn run(opts: RunOptions) -> Result<RunReport, TrainerError> {
    let paths = RunPaths(opts.run_dir.clone());
    let mut settings = resolve_settings(&paths, &opts)?;
    let config_json = hf_config(&settings, MASK_ID, 0, PAD_ID);
    let init = opts.init.as_deref().filter(|_| !opts.resume);
    if let Some(dir) = init {
        init::check_shape(dir, &config_json)?;
        if !paths.tokenizer().exists() {
            let from = dir.join("tokenizer.json");
            std::fs::copy(&from, paths.tokenizer()).map_err(|e| TrainerError::file(&from, e))?;
        }
    } else if settings.step_reduction_from() == 0 && !opts.resume {
        return Err(TrainerError::Input(format!(
            "preset {}: step_reduction_share = 1 decodes with the model in training from the first step; pass --init with a trained model",
            settings.preset
        )));
    }
    let extensions: Vec<&str> = opts.extensions.iter().map(String::as_str).collect();
    let prepared = prepare(&paths, &settings, &opts.corpus, &extensions)?;
    let tokenizer = tokenizers::Tokenizer::from_file(paths.tokenizer())
        .map_err(|e| TrainerError::file(paths.tokenizer(), e))?;
    let config = ModelConfig::from_json(&config_json.to_string(), &paths.0.join("config.json"))?;
    let mut learner = Learner::new(&config, &settings, MASK_ID, settings.seed)?;
    if let Some(dir) = init {
        init::load_weights(dir, &learner)?;
    }
    let parameters: usize = learner
        .optimizer
        .params()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let mut state = if opts.resume {
        checkpoint::load(&paths.checkpoint(), &mut learner)?
    } else {
        TrainState {
            step: 0,
            rng: TrainRng::new(settings.seed.wrapping_mul(0x2545_f491_4f6c_dd1d)),
            data: Default::default(),
            step_reduction_data: Default::default(),
            tokens_seen: 0,
            elapsed_s: 0.0,
        }
    };
    let mut log = open_log(&paths, state.step)?;
    let mut windows = Windows::new(
        TokenShard::open(&paths.train_shard())?,
        settings.seq_len,
        settings.seed,
    )?;
    let held_out = read_shard(&paths.held_out_shard())?;
    let bytes_of = token_bytes(&tokenizer);
    let device = Device::Cpu;
    let bar = progress_bar(opts.progress, settings.steps, state.step);
    let mut losses = Vec::new();
    let session_start = state.step;
    let mut interrupted = false;
    // Stage 3's windows (and their round): the model's own continuations, decoded when each
    // round begins.
    let mut own: Option<(usize, Windows)> = None;

    while state.step < settings.steps {
        if opts.stop.load(Ordering::SeqCst)
            || opts
                .session_steps
                .is_some_and(|n| state.step - session_start >= n)
        {
            interrupted = true;
            break;
        }
        let stage = settings.stage_of(state.step);
        if stage == Stage::StepReduction {
            let round = settings.step_reduction_round(state.step);
            if own.as_ref().map(|(r, _)| *r) != Some(round) {
                if state.step == settings.step_reduction_round_start(round) {
                    state.step_reduction_data = DataPosition::default();
                }
                let (data, seconds) = own_continuations(
                    &paths, &learner, &config, &windows, &settings, &state, &mut log,
                )?;
                own = Some((round, data));
                state.elapsed_s += seconds;
            }
        }
        let started = Instant::now();
        let size = match settings.block_sizes(stage) {
            [one] => *one,
            sizes => sizes[state.rng.below(sizes.len())],
        };
        let blocks = Blocks::new(size, state.rng.below(size));
        let mut micro = Vec::with_capacity(settings.accumulation);
        for _ in 0..settings.accumulation {
            let mut clean = Vec::with_capacity(settings.batch_size);
            for _ in 0..settings.batch_size {
                let (source, at) = match (stage, own.as_mut()) {
                    (Stage::StepReduction, Some((_, own))) => (own, &mut state.step_reduction_data),
                    _ => (&mut windows, &mut state.data),
                };
                let (w, next) = source.next(*at);
                clean.push(w);
                *at = next;
            }
            micro.push(Batch::new(
                &clean,
                &blocks,
                stage,
                MASK_ID,
                settings.step_reduction_suffix_share,
                &mut state.rng,
                &device,
            )?);
        }
        let lr = learning_rate(
            state.step,
            settings.warmup_steps,
            settings.steps,
            settings.learning_rate,
            settings.min_lr_ratio,
        );
        let stats = learner.step(&micro, lr)?;
        let seconds = started.elapsed().as_secs_f64();
        state.step += 1;
        state.tokens_seen += settings.tokens_per_step() as u64;
        state.elapsed_s += seconds;
        losses.push(stats.loss);
        let row = StepLog {
            step: state.step,
            stage: stage.number(),
            block_size: size,
            lr,
            stats,
            tokens_per_s: settings.tokens_per_step() as f64 / seconds,
            tokens_seen: state.tokens_seen,
            elapsed_s: state.elapsed_s,
        };
        append(
            &mut log,
            &paths,
            &serde_json::to_value(&row).unwrap_or_default(),
        )?;
        if let Some(bar) = &bar {
            bar.set_position(state.step as u64);
            bar.set_message(format!(
                "stage {} loss {:.3} {:.0} tok/s",
                row.stage, row.stats.loss, row.tokens_per_s
            ));
        }
        if state.step == Settings::BUDGET_MEASURED_STEPS {
            fit_time_budget(&paths, &mut settings, &state, &mut log)?;
            if let Some(bar) = &bar {
                bar.set_length(settings.steps as u64);
            }
        }
        if state.step % settings.eval_every == 0 && state.step < settings.steps {
            let n = settings.eval_tokens.min(held_out.len());
            let e = score_held_out(&learner, &held_out[..n], &bytes_of, &settings)?;
            append(
                &mut log,
                &paths,
                &serde_json::json!({"step": state.step, "eval": e}),
            )?;
        }
        if state.step % settings.checkpoint_every == 0 {
            checkpoint::save(&paths.checkpoint(), &learner, &state)?;
        }
    }
    checkpoint::save(&paths.checkpoint(), &learner, &state)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let finished = !interrupted && state.step >= settings.steps;
    let mut final_eval = None;
    if finished {
        let e = score_held_out(&learner, &held_out, &bytes_of, &settings)?;
        append(
            &mut log,
            &paths,
            &serde_json::json!({"step": state.step, "eval": e, "final": true}),
        )?;
        export(&paths, &learner, &config_json)?;
        let curve = crate::plot::read_log(&paths.log())?;
        let title = format!("sdlm {}: block-diffusion training", settings.preset);
        crate::plot::plot_loss(&curve, &paths.0.join("loss.png"), &title)?;
        final_eval = Some(e);
    }
    let report = RunReport {
        init: opts.init.clone(),
        steps: state.step,
        finished,
        losses,
        final_eval,
        prepared,
        tokens_seen: state.tokens_seen,
        elapsed_s: state.elapsed_s,
        parameters,
    };
    if finished {
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| TrainerError::file(&paths.0, e))?;
        write(&paths.0.join("summary.json"), text.as_bytes())?;
    }
    Ok(report)
}

/// The data of the stage-3 round that `state`'s step is in: the run's file of the model's own
/// continuations, decoded now (from the weights at the round's first step) unless an earlier
/// session of the run wrote it; and the seconds that took.
fn own_continuations(
    paths: &RunPaths,
    learner: &Learner,
    config: &ModelConfig,
    windows: &Windows,
    settings: &Settings,
    state: &TrainState,
    log: &mut std::fs::File,
) -> Result<(Windows, f64), TrainerError> {
    let round = settings.step_reduction_round(state.step);
    let path = paths.step_reduction_shard(round);
    let started = Instant::now();
    if !path.with_extension("json").exists() {
        let round_seed = (round as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut rng = TrainRng::new(settings.seed ^ 0x5eed_0fa1_105e_1f00 ^ round_seed);
        let prefixes = step_reduction::draw_prefixes(
            windows.shard(),
            settings.seq_len,
            settings.step_reduction_prompts,
            &mut rng,
        );
        let prompt_tokens: usize = prefixes.iter().map(Vec::len).sum();
        let docs = step_reduction::continue_greedily(learner, config, &prefixes, settings.seq_len)?;
        let tokens: Vec<u32> = docs.concat();
        let seconds = started.elapsed().as_secs_f64();
        append(
            log,
            paths,
            &serde_json::json!({"step": state.step, "step_reduction": {
                "round": round,
                "prefixes": prefixes.len(),
                "prefix_tokens": prompt_tokens,
                "decoded_tokens": tokens.len() - prompt_tokens,
                "seconds": seconds,
                "decoded_tokens_per_s": (tokens.len() - prompt_tokens) as f64 / seconds.max(1e-9),
            }}),
        )?;
        write_tokens(&path, &tokens, settings.vocab_size, docs.len(), 0)?;
    }
    let windows = Windows::new(TokenShard::open(&path)?, settings.seq_len, settings.seed)?;
    Ok((windows, started.elapsed().as_secs_f64()))
}

/// Held-out evaluation of the model in training, in the run's window and batch.
fn score_held_out(
    learner: &Learner,
    tokens: &[u32],
    bytes_of: &[usize],
    settings: &Settings,
) -> Result<HeldOut, TrainerError> {
    evaluate(
        &learner.model,
        tokens,
        bytes_of,
        settings.seq_len,
        settings.batch_size,
        MASK_ID,
    )
}

/// The run's settings: a new run's (refusing a directory that already holds another run), or
/// the ones a resumed run started with.
fn resolve_settings(paths: &RunPaths, opts: &RunOptions) -> Result<Settings, TrainerError> {
    let saved = std::fs::read_to_string(paths.settings()).ok();
    let settings = match (opts.resume, saved, &opts.settings) {
        (true, Some(text), _) => {
            serde_json::from_str(&text).map_err(|e| TrainerError::file(paths.settings(), e))?
        }
        (true, None, _) => {
            return Err(TrainerError::file(
                &paths.0,
                "has no run to resume (no settings.json)",
            ))
        }
        (false, Some(_), _) if paths.checkpoint().exists() => {
            return Err(TrainerError::file(
                &paths.0,
                "already holds a run; pass --resume to continue it or choose another --out",
            ))
        }
        (false, _, Some(s)) => s.clone(),
        (false, _, None) => return Err(TrainerError::Input("a new run needs settings".into())),
    };
    settings.validate()?;
    std::fs::create_dir_all(&paths.0).map_err(|e| TrainerError::file(&paths.0, e))?;
    save_settings(paths, &settings)?;
    Ok(settings)
}

/// The run's settings.json, what `--resume` reads.
fn save_settings(paths: &RunPaths, settings: &Settings) -> Result<(), TrainerError> {
    let text = serde_json::to_string_pretty(settings)
        .map_err(|e| TrainerError::file(paths.settings(), e))?;
    write(&paths.settings(), text.as_bytes())
}

/// Lowers `settings.steps` to what the time budget holds at the speed of the steps so far (see
/// `Settings::time_budget_s`), and keeps the new count in settings.json for `--resume`; the log
/// records the decision.
fn fit_time_budget(
    paths: &RunPaths,
    settings: &mut Settings,
    state: &TrainState,
    log: &mut std::fs::File,
) -> Result<(), TrainerError> {
    let seconds_per_step = state.elapsed_s / state.step.max(1) as f64;
    let steps = settings.steps_within_budget(seconds_per_step);
    if steps == settings.steps {
        return Ok(());
    }
    let planned = settings.steps;
    settings.steps = steps;
    settings.validate()?;
    save_settings(paths, settings)?;
    append(
        log,
        paths,
        &serde_json::json!({"step": state.step, "time_budget": {
            "seconds": settings.time_budget_s, "seconds_per_step": seconds_per_step,
            "planned_steps": planned, "steps": steps,
        }}),
    )
}

/// The HF-layout model directory: config.json, model.safetensors, tokenizer.json.
fn export(
    paths: &RunPaths,
    learner: &Learner,
    config: &serde_json::Value,
) -> Result<(), TrainerError> {
    let dir = paths.model();
    std::fs::create_dir_all(&dir).map_err(|e| TrainerError::file(&dir, e))?;
    let text = serde_json::to_string_pretty(config).map_err(|e| TrainerError::file(&dir, e))?;
    write(&dir.join("config.json"), text.as_bytes())?;
    let weights = dir.join("model.safetensors");
    learner
        .varmap
        .save(&weights)
        .map_err(|e| TrainerError::file(&weights, e))?;
    std::fs::copy(paths.tokenizer(), dir.join("tokenizer.json"))
        .map_err(|e| TrainerError::file(dir.join("tokenizer.json"), e))?;
    Ok(())
}

/// The log, cut back to `step` (a resumed run rewrites what followed its checkpoint).
fn open_log(paths: &RunPaths, step: usize) -> Result<std::fs::File, TrainerError> {
    let path = paths.log();
    let kept: String = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step && step > 0)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write(&path, kept.as_bytes())?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(|e| TrainerError::file(&path, e))
}

fn append(
    log: &mut std::fs::File,
    paths: &RunPaths,
    row: &serde_json::Value,
) -> Result<(), TrainerError> {
    writeln!(log, "{row}").map_err(|e| TrainerError::file(paths.log(), e))
}

fn progress_bar(show: bool, steps: usize, at: usize) -> Option<indicatif::ProgressBar> {
    if !show {
        return None;
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_position(at as u64);
    Some(bar)
}
