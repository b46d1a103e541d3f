//! Decoding against references that share none of its caching: transformers' greedy generate,
//! and decoders that recompute the whole sequence without a cache at every step.

mod common;

use common::{expected, fixture, logits};
use sdlm_engine::decode::{decoder_for, DecodingParams, FinishReason, Mode, Sampler};
use sdlm_engine::{load_model, DType, Device, DiffusionConfig, MaskRule, Model};
use sdlm_kernels::reference::select_unmask;

const MASK: u32 = 127;

fn model(name: &str, shift: bool) -> Model {
    load_model(&fixture(name), &Device::Cpu, DType::F32)
        .unwrap()
        .with_diffusion(DiffusionConfig {
            block_size: Some(4),
            mask_token_id: Some(MASK),
            logits_shift: Some(shift),
        })
}

fn run(
    model: &Model,
    prompt: &[u32],
    params: &DecodingParams,
) -> (Vec<u32>, sdlm_engine::decode::DecodeStats, FinishReason) {
    let mut d = decoder_for(model, prompt, params).unwrap();
    while d.finished().is_none() {
        d.step().unwrap();
    }
    (
        d.completion().to_vec(),
        d.stats().clone(),
        d.finished().unwrap(),
    )
}

/// AR by recomputing the whole sequence each step (causal mask, no cache).
fn reference_ar(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let mut sampler = Sampler::new(&DecodingParams::default());
    for _ in 0..n {
        let rows = logits(model, &seq, MaskRule::Causal)
            .to_vec2::<f32>()
            .unwrap();
        seq.push(sampler.pick(&rows[seq.len() - 1], Some(MASK)).token);
    }
    seq[prompt.len()..].to_vec()
}

/// Block diffusion by recomputing prompt + committed blocks + the open block each step, with the
/// block-causal mask over the whole sequence.
fn reference_diffusion(model: &Model, prompt: &[u32], p: &DecodingParams, shift: bool) -> Vec<u32> {
    let mut done: Vec<u32> = Vec::new();
    let mut sampler = Sampler::new(p);
    while done.len() < p.max_new_tokens {
        let len = p.block_size.min(p.max_new_tokens - done.len());
        let mut block = vec![MASK; len];
        let mut masked = vec![true; len];
        while masked.iter().any(|&m| m) {
            let seq: Vec<u32> = prompt.iter().chain(&done).chain(&block).copied().collect();
            let rule = MaskRule::BlockCausal {
                prefix: prompt.len(),
                block: p.block_size,
            };
            let rows = logits(model, &seq, rule).to_vec2::<f32>().unwrap();
            let start = prompt.len() + done.len();
            let mut picks = vec![(MASK, 0f32); len];
            for j in (0..len).filter(|&j| masked[j]) {
                let row = if shift {
                    &rows[start + j - 1]
                } else {
                    &rows[start + j]
                };
                let pick = sampler.pick(row, Some(MASK));
                picks[j] = (pick.token, pick.confidence);
            }
            let conf: Vec<f32> = picks.iter().map(|x| x.1).collect();
            let chosen =
                select_unmask(&conf, &masked, &[0, len as i32], &[1], p.threshold).unwrap();
            for j in (0..len).filter(|&j| chosen[j]) {
                block[j] = picks[j].0;
                masked[j] = false;
            }
        }
        done.extend(block);
    }
    done
}

const PROMPT: &[u32] = &[5, 77, 31, 100, 9]; // 5 tokens: not a multiple of any block size used

#[test]
fn ar_greedy_equals_transformers_generate() {
    for name in ["qwen2-tied-bf16", "qwen3-headdim-f16"] {
        let m = load_model(&fixture(name), &Device::Cpu, DType::F32).unwrap();
        let (_, want) = expected(&format!("{name}/expected.safetensors"));
        let greedy: Vec<u32> = want["greedy_ids"]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&x| x as u32)
            .collect();
        let (prompt, new) = greedy.split_at(5);
        let params = DecodingParams {
            max_new_tokens: new.len(),
            ..DecodingParams::default()
        };
        let (got, stats, _) = run(&m, prompt, &params);
        assert_eq!(got, new, "{name}");
        assert_eq!(
            stats.forward_passes(),
            new.len(),
            "{name}: prefill + one per token but the last"
        );
    }
}

#[test]
fn cached_ar_equals_recomputing_the_sequence() {
    let m = model("qwen3-headdim-f16", true);
    let params = DecodingParams {
        max_new_tokens: 20,
        ..DecodingParams::default()
    };
    assert_eq!(run(&m, PROMPT, &params).0, reference_ar(&m, PROMPT, 20));
}

#[test]
fn cached_diffusion_equals_recomputing_the_sequence() {
    for shift in [false, true] {
        for block_size in [1, 4, 32] {
            for threshold in [0.9, 0.02] {
                let m = model("qwen2-tied-bf16", shift);
                let p = DecodingParams {
                    mode: Mode::Diffusion,
                    block_size,
                    threshold,
                    max_new_tokens: 37,
                    ..DecodingParams::default()
                };
                let (got, _, _) = run(&m, PROMPT, &p);
                let want = reference_diffusion(&m, PROMPT, &p, shift);
                assert_eq!(got, want, "shift {shift}, B {block_size}, τ {threshold}");
            }
        }
    }
}

#[test]
fn diffusion_with_block_one_equals_autoregressive() {
    let m = model("llama-sharded-f32", true);
    let ar = DecodingParams {
        max_new_tokens: 24,
        ..DecodingParams::default()
    };
    let diff = DecodingParams {
        mode: Mode::Diffusion,
        block_size: 1,
        ..ar.clone()
    };
    let (a, sa, _) = run(&m, PROMPT, &ar);
    let (d, sd, _) = run(&m, PROMPT, &diff);
    assert_eq!(a, d);
    // Block size one costs exactly what AR costs: the prefill and one forward per token after
    // the first (each commits the token before it and predicts the next).
    assert_eq!(sd.forward_passes(), sa.forward_passes(), "{sa:?} {sd:?}");
}

#[test]
fn threshold_above_every_confidence_commits_one_token_per_step() {
    let m = model("qwen2-tied-bf16", false);
    let p = DecodingParams {
        mode: Mode::Diffusion,
        block_size: 8,
        threshold: 1.0,
        max_new_tokens: 24,
        ..DecodingParams::default()
    };
    let (tokens, s, _) = run(&m, PROMPT, &p);
    assert_eq!(tokens.len(), 24);
    assert_eq!(s.steps, 24);
    // Each finished block is committed by the next block's first forward: no commit forwards.
    assert_eq!(
        (s.prefill_forwards, s.denoise_forwards, s.commit_forwards),
        (1, 24, 0)
    );
}

#[test]
fn tiny_threshold_commits_each_block_in_one_step() {
    let m = model("qwen2-tied-bf16", false);
    let p = DecodingParams {
        mode: Mode::Diffusion,
        block_size: 8,
        threshold: 1e-9,
        max_new_tokens: 24,
        ..DecodingParams::default()
    };
    let (tokens, s, _) = run(&m, PROMPT, &p);
    assert_eq!(tokens.len(), 24);
    assert_eq!((s.steps, s.blocks), (3, 3));
    assert_eq!(s.forward_passes(), 1 + 3);
}

#[test]
fn max_new_tokens_inside_a_block_is_respected() {
    let m = model("qwen2-tied-bf16", false);
    let p = DecodingParams {
        mode: Mode::Diffusion,
        block_size: 8,
        threshold: 0.5,
        max_new_tokens: 13,
        ..DecodingParams::default()
    };
    let (tokens, s, finish) = run(&m, PROMPT, &p);
    assert_eq!(
        (tokens.len(), s.blocks, finish),
        (13, 2, FinishReason::Length)
    );
}

#[test]
fn a_stop_token_truncates_the_completion() {
    for mode in [Mode::Autoregressive, Mode::Diffusion] {
        let m = model("qwen2-tied-bf16", true);
        let p = DecodingParams {
            mode,
            block_size: 4,
            max_new_tokens: 30,
            ..DecodingParams::default()
        };
        let (full, _, _) = run(&m, PROMPT, &p);
        // A token whose first occurrence is not at the start.
        let k = (1..full.len())
            .find(|&k| !full[..k].contains(&full[k]))
            .unwrap();
        let stop = DecodingParams {
            stop_token_ids: vec![full[k]],
            ..p
        };
        let (cut, _, finish) = run(&m, PROMPT, &stop);
        assert_eq!(cut, full[..k], "{mode:?}");
        assert_eq!(finish, FinishReason::Stop);
    }
}

#[test]
fn self_correction_revises_decoded_tokens_within_its_budget() {
    let m = model("qwen2-tied-bf16", false);
    // One token per step, and an edit rule that accepts any disagreement, so positions decoded
    // early are re-predicted with more of the block decoded and get revised.
    let p = DecodingParams {
        mode: Mode::Diffusion,
        block_size: 16,
        threshold: 1.0,
        max_new_tokens: 16,
        refine: true,
        edit_threshold: 1e-6,
        max_edits_per_block: Some(2),
        ..DecodingParams::default()
    };
    let (_, s, _) = run(&m, PROMPT, &p);
    assert!(s.edits >= 1, "no edit made: {s:?}");
    assert!(s.edits <= 2, "over the budget: {s:?}");
}

#[test]
fn bad_parameters_name_the_field_and_the_limit() {
    let m = model("qwen2-tied-bf16", false);
    let cases = [
        (
            DecodingParams {
                block_size: 0,
                ..DecodingParams::default()
            },
            "block_size",
        ),
        (
            DecodingParams {
                threshold: 0.0,
                ..DecodingParams::default()
            },
            "threshold",
        ),
        (
            DecodingParams {
                max_new_tokens: 0,
                ..DecodingParams::default()
            },
            "max_new_tokens",
        ),
        (
            DecodingParams {
                max_new_tokens: 60,
                ..DecodingParams::default()
            },
            "context of 64",
        ),
        (
            DecodingParams {
                top_p: 1.5,
                ..DecodingParams::default()
            },
            "top_p",
        ),
    ];
    for (p, want) in cases {
        let err = decoder_for(&m, PROMPT, &p)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn a_step_budget_finishes_each_block_in_that_many_steps() {
    let m = model("qwen2-tied-bf16", false);
    // τ = 1 alone would take 16 steps per block; the budget forces 16 / 4 = 4 per step.
    let p = DecodingParams {
        mode: Mode::Diffusion,
        block_size: 16,
        threshold: 1.0,
        max_new_tokens: 32,
        max_steps_per_block: Some(4),
        ..DecodingParams::default()
    };
    let (tokens, s, _) = run(&m, PROMPT, &p);
    assert_eq!(tokens.len(), 32);
    assert_eq!((s.blocks, s.steps), (2, 8));
}

#[test]
fn committing_a_prefix_of_a_forward_equals_committing_it_alone() {
    // A finished block run ahead of the next block's masks, with only the finished block
    // committed, must leave the cache as a forward of the finished block alone would.
    let m = model("qwen3-headdim-f16", false);
    let prompt: Vec<u32> = (0..7u32).map(|i| (i * 11 + 2) % 120).collect();
    let finished = [5u32, 9, 13, 17];
    let probe = [21u32, MASK, MASK];
    let mut alone = sdlm_engine::KvCache::new();
    m.forward_cached(&prompt, &mut alone, 1, true).unwrap();
    let mut fused = sdlm_engine::KvCache::new();
    m.forward_cached(&prompt, &mut fused, 1, true).unwrap();
    m.forward_cached(&finished, &mut alone, 4, true).unwrap();
    let masks = [MASK; 4];
    let tokens: Vec<u32> = finished.iter().chain(&masks).copied().collect();
    m.forward_cached_committing(&tokens, &mut fused, 4, 4)
        .unwrap();
    assert_eq!((alone.len(), fused.len()), (11, 11));
    // Same cache, same logits for whatever comes next.
    let a = m.forward_cached(&probe, &mut alone, 3, false).unwrap();
    let b = m.forward_cached(&probe, &mut fused, 3, false).unwrap();
    let d = common::max_abs_diff(&a, &b);
    assert!(d <= 1e-5, "{d}");
    // Committing more tokens than were run is refused.
    assert!(m
        .forward_cached_committing(&probe, &mut fused, 3, 4)
        .is_err());
}

#[test]
fn logits_for_some_rows_are_those_rows_of_the_full_forward() {
    // A decoder asks for the open block's rows only, or its still-masked ones (and a prefill
    // for its last): the LM head runs over those, and they must be the rows a forward of every
    // row returns, with the same cache left behind.
    use sdlm_engine::LogitRows;
    let m = model("qwen2-tied-bf16", false);
    let prompt: Vec<u32> = (0..9u32).map(|i| (i * 13 + 4) % 120).collect();
    let tokens = [7u32, 8, 9, 10, MASK, 11, MASK];
    let masked = |first| LogitRows::Masked {
        first,
        mask_id: MASK,
    };
    for (rows, want_rows) in [
        (LogitRows::All, vec![0, 1, 2, 3, 4, 5, 6]),
        (LogitRows::From(4), vec![4, 5, 6]),
        (LogitRows::From(3), vec![3, 4, 5, 6]),
        (LogitRows::Last, vec![6]),
        (LogitRows::None, vec![]),
        (masked(4), vec![4, 6]),
        (masked(5), vec![6]),
    ] {
        let (mut all, mut some) = (sdlm_engine::KvCache::new(), sdlm_engine::KvCache::new());
        m.forward_cached(&prompt, &mut all, 1, true).unwrap();
        m.forward_cached(&prompt, &mut some, 1, true).unwrap();
        let want = m
            .forward_cached_committing(&tokens, &mut all, 4, 4)
            .unwrap();
        let got = m
            .forward_cached_rows(&tokens, &mut some, 4, 4, rows)
            .unwrap();
        let vocab = want.dim(1).unwrap();
        assert_eq!(got.dims(), [want_rows.len(), vocab], "{rows:?}");
        if !want_rows.is_empty() {
            let idx: Vec<u32> = want_rows.iter().map(|&r| r as u32).collect();
            let idx = sdlm_engine::Tensor::new(idx.as_slice(), &Device::Cpu).unwrap();
            let d = common::max_abs_diff(&got, &want.index_select(&idx, 0).unwrap());
            assert!(d <= 1e-5, "{rows:?}: {d}");
        }
        let probe = [MASK, MASK];
        let a = m.forward_cached(&probe, &mut all, 2, false).unwrap();
        let b = m.forward_cached(&probe, &mut some, 2, false).unwrap();
        assert!(
            common::max_abs_diff(&a, &b) <= 1e-5,
            "{rows:?}: the caches differ"
        );
    }
}

/// A sequence moved to another worker after any number of committed blocks continues exactly
/// as the uninterrupted run: the replay rebuilds the cache with the masks the first run used.
#[test]
fn resuming_after_committed_blocks_continues_the_uninterrupted_run() {
    use sdlm_engine::decode::decoder_resuming;
    for shift in [false, true] {
        let m = model("qwen2-tied-bf16", shift);
        for (mode, block_size) in [
            (Mode::Diffusion, 4),
            (Mode::Diffusion, 1),
            (Mode::Autoregressive, 4),
        ] {
            let p = DecodingParams {
                mode,
                block_size,
                max_new_tokens: 22,
                ..DecodingParams::default()
            };
            let (whole, _, _) = run(&m, PROMPT, &p);
            let step = if mode == Mode::Diffusion {
                block_size
            } else {
                1
            };
            for cut in (step..whole.len()).step_by(step * 2) {
                let mut d = decoder_resuming(&m, PROMPT, &whole[..cut], &p).unwrap();
                while d.finished().is_none() {
                    d.step().unwrap();
                }
                assert_eq!(
                    d.completion(),
                    &whole[..],
                    "shift {shift}, {mode:?}, B {block_size}, resumed after {cut}"
                );
            }
        }
    }
}

/// The fixture model with bf16 matmuls, or `None` (and a note) on a CPU without AMX-BF16.
fn bf16_model(name: &str, shift: bool) -> Option<Model> {
    if let Err(e) = sdlm_engine::MatmulPrecision::Bf16.check(&Device::Cpu) {
        eprintln!("skipped: {e}");
        return None;
    }
    let mut m = model(name, shift);
    m.set_matmul_precision(sdlm_engine::MatmulPrecision::Bf16)
        .unwrap();
    Some(m)
}

#[test]
fn with_bf16_matmuls_cached_decoding_equals_recomputing_the_sequence() {
    // The bf16 matmul takes every row count (a prefill, a block, the reference's whole
    // sequence) and a row's outputs do not depend on the others, so the cache changes nothing.
    for shift in [false, true] {
        let Some(m) = bf16_model("qwen2-tied-bf16", shift) else {
            return;
        };
        for block_size in [1, 4, 32] {
            let p = DecodingParams {
                mode: Mode::Diffusion,
                block_size,
                max_new_tokens: 37,
                ..DecodingParams::default()
            };
            let want = reference_diffusion(&m, PROMPT, &p, shift);
            assert_eq!(run(&m, PROMPT, &p).0, want, "shift {shift}, B {block_size}");
        }
    }
    let m = bf16_model("qwen3-headdim-f16", true).unwrap();
    let params = DecodingParams {
        max_new_tokens: 20,
        ..DecodingParams::default()
    };
    assert_eq!(run(&m, PROMPT, &params).0, reference_ar(&m, PROMPT, 20));
}

#[test]
fn bf16_matmuls_change_logits_by_about_bf16_rounding() {
    let Some(bf16) = bf16_model("qwen3-headdim-f16", false) else {
        return;
    };
    let f32 = model("qwen3-headdim-f16", false);
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 + 11) % 120).collect();
    let (a, b) = (
        logits(&f32, &ids, MaskRule::Causal),
        logits(&bf16, &ids, MaskRule::Causal),
    );
    let scale = common::max_abs_diff(&a, &a.zeros_like().unwrap());
    let diff = common::max_abs_diff(&a, &b);
    // bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.002 per operand); through the
    // layers the logits move by a few times that, and a broken matmul by their whole size.
    assert!(diff > 0.0, "bf16 matmuls should round");
    assert!(
        diff <= 0.05 * scale,
        "max |Δlogit| {diff} against max |logit| {scale}"
    );
    eprintln!("max |Δlogit| {diff}, max |logit| {scale}");
}

#[test]
fn a_precision_names_its_field_and_choices() {
    let e = "fp8".parse::<sdlm_engine::MatmulPrecision>().unwrap_err();
    assert!(e.to_string().contains("matmul_precision"), "{e}");
    assert!(e.to_string().contains("f32 or bf16"), "{e}");
}
