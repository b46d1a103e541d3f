//! The training loop's properties: it can fit a fixed batch, a resumed run repeats the
//! uninterrupted one exactly, and the exported directory serves the logits it trained.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use sdlm_engine::ModelConfig;
use sdlm_trainer::{
    hf_config, learning_rate, run, Batch, Blocks, Learner, RunOptions, Settings, Stage, TrainRng,
    MASK_ID, PAD_ID,
};

fn config(s: &Settings) -> ModelConfig {
    ModelConfig::from_json(
        &hf_config(s, MASK_ID, 0, PAD_ID).to_string(),
        Path::new("config.json"),
    )
    .unwrap()
}

#[test]
fn training_overfits_a_fixed_small_batch() {
    let mut s = common::tiny_settings();
    // No decay and no cosine: memorising needs the weights free to grow.
    s.learning_rate = 1e-2;
    s.weight_decay = 0.0;
    let mut learner = Learner::new(&config(&s), &s, MASK_ID, 3).unwrap();
    let mut rng = TrainRng::new(5);
    // Both sequences start with <|endoftext|>, as documents do after the one before, and the
    // first block is that one token: every later block has clean context. (A fully masked block
    // with no context cannot be learnt: its positions hold identical tokens and see identical
    // values, so they get identical outputs whatever their targets.)
    let clean: Vec<Vec<u32>> = (0..2)
        .map(|_| {
            std::iter::once(0)
                .chain((0..15).map(|_| 6 + rng.below(58) as u32))
                .collect()
        })
        .collect();
    let batch = Batch::new(
        &clean,
        &Blocks::new(4, 1),
        Stage::Mask,
        MASK_ID,
        0.0,
        &mut rng,
        &Device::Cpu,
    )
    .unwrap();
    let steps = 300;
    let mut losses = Vec::new();
    for step in 0..steps {
        let lr = learning_rate(step, 20, steps, s.learning_rate, 1.0);
        losses.push(learner.step(std::slice::from_ref(&batch), lr).unwrap().loss);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(
        first > 2.0,
        "the untrained loss {first} should be near ln(64)·share masked"
    );
    assert!(
        last < 0.05,
        "after {steps} steps the loss is {last} (from {first})"
    );
}

/// An empty scratch directory for one test, with the synthetic corpus in it.
fn scratch(name: &str) -> (PathBuf, PathBuf) {
    let tmp = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let corpus = corpus(&tmp);
    (tmp, corpus)
}

fn corpus(dir: &Path) -> PathBuf {
    // A small synthetic Python corpus: enough files that both sides of the split get some.
    let root = dir.join("corpus");
    for i in 0..400 {
        let text = format!(
            "def f{i}(x, y={i}):\n    \"\"\"Return x plus {i}.\"\"\"\n    total = x + y * {}\n    if total > {i}:\n        return total - 1\n    return total\n",
            i % 7
        );
        let path = root.join(format!("pkg{}/mod{i}.py", i % 5));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    root
}

fn small_run_settings() -> Settings {
    let mut s = common::tiny_settings();
    s.vocab_size = 300;
    s.seq_len = 24;
    s.batch_size = 2;
    s.accumulation = 2;
    s.steps = 10;
    s.ar_stage_share = 0.25;
    s.mask_stage_share = 0.6;
    s.eval_every = 4;
    s.eval_tokens = 64;
    s.checkpoint_every = 3;
    s.max_files = 0;
    s
}

/// The log's step rows (those with a loss), in order.
fn step_rows(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["loss"].is_f64())
        .collect()
}

fn step_losses(run_dir: &Path) -> Vec<f64> {
    step_rows(run_dir)
        .iter()
        .filter_map(|v| v["loss"].as_f64())
        .collect()
}

/// One integer field of every step row of the log.
fn step_values(run_dir: &Path, field: &str) -> Vec<u64> {
    step_rows(run_dir)
        .iter()
        .filter_map(|v| v[field].as_u64())
        .collect()
}

fn options<'a>(
    dir: &Path,
    corpus: &Path,
    stop: &'a AtomicBool,
    resume: bool,
    session: Option<usize>,
) -> RunOptions<'a> {
    let settings = (!resume).then(small_run_settings);
    run_options(dir, corpus, stop, settings, None, session)
}

/// A new run with `settings`, or (None) the resumption of the one in `dir`.
fn run_options<'a>(
    dir: &Path,
    corpus: &Path,
    stop: &'a AtomicBool,
    settings: Option<Settings>,
    init: Option<PathBuf>,
    session: Option<usize>,
) -> RunOptions<'a> {
    RunOptions {
        run_dir: dir.to_path_buf(),
        resume: settings.is_none(),
        settings,
        init,
        corpus: vec![corpus.to_path_buf()],
        extensions: vec!["py".into()],
        stop,
        session_steps: session,
        progress: false,
    }
}

#[test]
fn a_time_budget_lowers_the_steps_once_and_the_run_keeps_to_them() {
    let (tmp, corpus) = scratch("sdlm-train-budget");
    let stop = AtomicBool::new(false);
    let mut settings = small_run_settings();
    settings.steps = 30;
    settings.eval_every = 100;
    // Far too little time for 30 steps: the run takes one past the measured ones.
    settings.time_budget_s = 1e-6;
    let dir = tmp.join("budget");
    let report = run(run_options(
        &dir,
        &corpus,
        &stop,
        Some(settings),
        None,
        None,
    ))
    .unwrap();
    let fitted = Settings::BUDGET_MEASURED_STEPS + 1;
    assert!(report.finished, "the lowered count is the run's end");
    assert_eq!(report.steps, fitted);
    assert_eq!(step_losses(&dir).len(), fitted);
    let saved: Settings =
        serde_json::from_str(&std::fs::read_to_string(dir.join("settings.json")).unwrap()).unwrap();
    assert_eq!(saved.steps, fitted, "kept for --resume");
    let decisions: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["time_budget"].is_object())
        .collect();
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0]["time_budget"]["planned_steps"], 30);
    assert_eq!(decisions[0]["step"], Settings::BUDGET_MEASURED_STEPS);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn resume_continues_exactly_and_the_export_serves_the_trained_logits() {
    let (tmp, corpus) = scratch("sdlm-train");
    let stop = AtomicBool::new(false);

    // Uninterrupted: 10 steps, all three stages (3 autoregressive, 3 masked, 4 with edits).
    let whole = tmp.join("whole");
    let report = run(options(&whole, &corpus, &stop, false, None)).unwrap();
    assert!(report.finished && report.steps == 10);
    let want = step_losses(&whole);
    assert_eq!(want.len(), 10);
    assert_eq!(step_values(&whole, "stage"), [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]);
    assert!(
        step_values(&whole, "block_size")[..3]
            .iter()
            .all(|&b| b == 1),
        "the autoregressive stage trains blocks of one token"
    );

    // 4 steps, stop, then resume for the other 6 (the checkpoint on stop is between the periodic
    // ones, so this also checks that stopping saves exactly where it stopped).
    let split = tmp.join("split");
    let first = run(options(&split, &corpus, &stop, false, Some(4))).unwrap();
    assert!(!first.finished && first.steps == 4);
    let err = run(options(&split, &corpus, &stop, false, None))
        .unwrap_err()
        .to_string();
    assert!(err.contains("--resume"), "{err}");
    let second = run(options(&split, &corpus, &stop, true, None)).unwrap();
    assert!(second.finished && second.steps == 10);
    let got = step_losses(&split);
    assert_eq!(got.len(), 10, "the log has each step once");
    for (i, (a, b)) in want.iter().zip(&got).enumerate() {
        assert!((a - b).abs() <= 1e-6, "step {}: {a} vs {b}", i + 1);
    }

    // The exported directory loads in the engine with the logits of the trained weights.
    let model_dir = whole.join("model");
    let (served, _tokenizer) = sdlm_engine::open_model(&model_dir, &Device::Cpu).unwrap();
    assert_eq!(served.config().diffusion.mask_token_id, Some(MASK_ID));
    assert_eq!(served.config().diffusion.logits_shift, Some(false));
    let s = small_run_settings();
    let mut trained = Learner::new(&config(&s), &s, MASK_ID, 77).unwrap();
    trained
        .varmap
        .load(whole.join("checkpoint/model.safetensors"))
        .unwrap();
    let ids: Vec<u32> = (0..20u32).map(|i| 6 + (i * 13) % 280).collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let positions: Vec<u32> = (0..20).collect();
    let mask = sdlm_engine::MaskRule::BlockCausal {
        prefix: 4,
        block: 8,
    }
    .additive(20, &Device::Cpu)
    .unwrap();
    let a = served.forward(&input, &positions, &mask).unwrap();
    let b = trained
        .model
        .forward_train(&input, &positions, &mask)
        .unwrap();
    let d: f32 = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d <= 1e-4, "served vs trained logits differ by {d}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// The greedy continuation of `prefix` by the model in `dir` to `len` tokens in all, through
/// the engine's single-sequence decoder (not the step batcher the trainer uses), with the
/// end-of-text token not ending it (as in stage 3).
fn greedy_reference(dir: &Path, prefix: &[u32], len: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut config = ModelConfig::from_json(&text, &dir.join("config.json")).unwrap();
    config.eos_token_ids.clear();
    // Safety: a file this test wrote and nothing else touches.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            candle_core::DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let model = sdlm_engine::Model::new(&config, vb).unwrap();
    let params = sdlm_engine::decode::DecodingParams {
        mode: sdlm_engine::decode::Mode::Autoregressive,
        block_size: 1,
        max_new_tokens: len - prefix.len(),
        ..Default::default()
    };
    let mut d = sdlm_engine::decode::decoder_for(&model, prefix, &params).unwrap();
    while d.finished().is_none() {
        d.step().unwrap();
    }
    d.completion().to_vec()
}

#[test]
fn step_reduction_trains_on_the_init_models_own_greedy_continuations() {
    let (tmp, corpus) = scratch("sdlm-train-sr");
    let stop = AtomicBool::new(false);
    let base = tmp.join("base");
    run(options(&base, &corpus, &stop, false, None)).unwrap();
    let init = base.join("model");
    // Freshly initialised weights in place of the 10 trained steps, whose greedy continuations
    // are one token repeated whatever the weights: random ones write varied text, so the test
    // can tell which weights decoded which round.
    let fresh = Learner::new(
        &config(&small_run_settings()),
        &small_run_settings(),
        MASK_ID,
        11,
    )
    .unwrap();
    fresh.varmap.save(init.join("model.safetensors")).unwrap();

    let mut s = small_run_settings();
    s.steps = 6;
    s.ar_stage_share = 0.0;
    s.step_reduction_share = 1.0;
    s.step_reduction_prompts = 4;
    s.step_reduction_rounds = 2;
    // Large enough steps that the second round's weights write differently from the first's.
    s.warmup_steps = 0;
    s.learning_rate = 2e-2;
    let sr = tmp.join("sr");
    let opts =
        |settings, init_dir, session| run_options(&sr, &corpus, &stop, settings, init_dir, session);
    // Without a model to start from, stage 3 from the first step has nothing to decode with.
    let err = run(opts(Some(s.clone()), None, None))
        .expect_err("refused without --init")
        .to_string();
    assert!(err.contains("--init"), "{err}");
    let _ = std::fs::remove_dir_all(&sr);

    // Stopped after 3 steps, where the second round begins, and resumed: the same continuations
    // and losses as the whole run. The weights at the stop are the ones round 2 decodes with.
    let first = run(opts(Some(s.clone()), Some(init.clone()), Some(3))).unwrap();
    assert!(!first.finished);
    let round_two = tmp.join("round-two");
    std::fs::create_dir_all(&round_two).unwrap();
    std::fs::copy(init.join("config.json"), round_two.join("config.json")).unwrap();
    std::fs::copy(
        sr.join("checkpoint/model.safetensors"),
        round_two.join("model.safetensors"),
    )
    .unwrap();
    let report = run(opts(None, Some(init.clone()), None)).unwrap();
    assert!(report.finished && report.steps == 6);
    assert_eq!(step_values(&sr, "stage"), [3; 6]);
    let whole = tmp.join("sr-whole");
    std::fs::create_dir_all(&whole).unwrap();
    let whole_report = run(RunOptions {
        run_dir: whole.clone(),
        ..opts(Some(s.clone()), Some(init.clone()), None)
    })
    .unwrap();
    assert!(whole_report.finished);
    for (a, b) in step_losses(&sr).iter().zip(&step_losses(&whole)) {
        assert!((a - b).abs() <= 1e-6, "resumed {a} vs whole {b}");
    }
    assert_eq!(
        std::fs::read(base.join("tokenizer.json")).unwrap(),
        std::fs::read(sr.join("tokenizer.json")).unwrap(),
        "the run tokenizes with the init model's tokenizer"
    );

    // Every window of a round's data is a prefix of the training shard followed by the greedy
    // continuation of it by the model as it was when the round began.
    let train = sdlm_trainer::read_shard(&sr.join("train.bin")).unwrap();
    for (round, weights) in [(0, &init), (1, &round_two)] {
        let path = sr.join(format!("step-reduction-{round}.bin"));
        let own = sdlm_trainer::read_shard(&path).unwrap();
        assert_eq!(own.len(), 4 * s.seq_len);
        let uninterrupted = whole.join(format!("step-reduction-{round}.bin"));
        assert_eq!(own, sdlm_trainer::read_shard(&uninterrupted).unwrap());
        let mut init_would_differ = false;
        for doc in own.chunks(s.seq_len) {
            let prefix = (s.seq_len / 8..=s.seq_len / 2).find(|&p| {
                train.windows(p).any(|w| w == &doc[..p])
                    && greedy_reference(weights, &doc[..p], s.seq_len) == doc[p..]
            });
            let Some(p) = prefix else {
                panic!("round {round}: {doc:?} is no training prefix with its greedy continuation")
            };
            init_would_differ |= greedy_reference(&init, &doc[..p], s.seq_len) != doc[p..];
        }
        // Else this test could not tell which weights decoded the second round.
        assert_eq!(init_would_differ, round == 1, "round {round}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn init_refuses_a_model_of_another_shape() {
    let (tmp, corpus) = scratch("sdlm-train-init");
    let stop = AtomicBool::new(false);
    let mut other = small_run_settings();
    other.architecture.hidden_size *= 2;
    let model = tmp.join("other");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        hf_config(&other, MASK_ID, 0, PAD_ID).to_string(),
    )
    .unwrap();
    let err = run(RunOptions {
        init: Some(model),
        ..options(&tmp.join("run"), &corpus, &stop, false, None)
    })
    .expect_err("a model of another shape is refused")
    .to_string();
    assert!(err.contains("hidden_size"), "{err}");
    let _ = std::fs::remove_dir_all(&tmp);
}
