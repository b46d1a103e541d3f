//! Teacher-forced scoring against the transformers logits of the fixtures, and the sliding
//! windows against a brute-force definition: every token scored once, with up to context - 1
//! tokens of history.

mod common;

use common::{fixture, log_softmax_f64, logits};
use sdlm_engine::{load_model, score_tokens, DType, Device, MaskRule, Model};

#[test]
fn one_window_nll_matches_transformers_logits() {
    let name = "llama-sharded-f32";
    let model = load_model(&fixture(name), &Device::Cpu, DType::F32).unwrap();
    let want =
        candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let ids: Vec<u32> = want["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let logits = want["causal_logits"].to_vec2::<f32>().unwrap();
    let reference: f64 = (1..ids.len())
        .map(|i| -log_softmax_f64(&logits[i - 1])[ids[i] as usize])
        .sum();
    let score = score_tokens(&model, &ids, ids.len(), ids.len() / 2).unwrap();
    assert_eq!(score.scored_tokens, ids.len() - 1);
    assert!(
        (score.total_nll - reference).abs() <= 1e-4,
        "{} vs {reference}",
        score.total_nll
    );
}

/// -ln p(tokens[i] | tokens[i - context + 1 .. i]) by one forward of exactly that window.
fn brute_force_nll(model: &Model, tokens: &[u32], i: usize, context: usize) -> f64 {
    let window = &tokens[i.saturating_sub(context - 1)..=i];
    let rows = logits(model, window, MaskRule::Causal)
        .to_vec2::<f32>()
        .unwrap();
    -log_softmax_f64(&rows[window.len() - 2])[tokens[i] as usize]
}

#[test]
fn sliding_windows_give_each_token_the_full_history_the_window_allows() {
    let model = load_model(&fixture("qwen2-tied-bf16"), &Device::Cpu, DType::F32).unwrap();
    let tokens: Vec<u32> = (0..40u32).map(|i| (i * 37 + 11) % 128).collect();
    let context = 12;
    // Stride 1: each token i is scored with exactly min(i, context - 1) tokens of history.
    let want: f64 = (1..tokens.len())
        .map(|i| brute_force_nll(&model, &tokens, i, context))
        .sum();
    let got = score_tokens(&model, &tokens, context, 1).unwrap();
    assert_eq!(got.scored_tokens, tokens.len() - 1);
    assert!(
        (got.total_nll - want).abs() <= 1e-3,
        "{} vs {want}",
        got.total_nll
    );
    // Larger strides score every token once too (less history, so a different total).
    for stride in [4, 11] {
        let s = score_tokens(&model, &tokens, context, stride).unwrap();
        assert_eq!(s.scored_tokens, tokens.len() - 1);
        assert!(s.total_nll.is_finite() && s.total_nll > 0.0);
    }
}

#[test]
fn windows_are_checked_against_the_model() {
    let model = load_model(&fixture("qwen2-tied-bf16"), &Device::Cpu, DType::F32).unwrap();
    let err = score_tokens(&model, &[1, 2, 3], 65, 8)
        .unwrap_err()
        .to_string();
    assert!(err.contains("context") && err.contains("64"), "{err}");
    let err = score_tokens(&model, &[1, 2, 3], 16, 16)
        .unwrap_err()
        .to_string();
    assert!(err.contains("stride"), "{err}");
}

#[test]
fn an_in_place_model_is_scored_from_a_mask_at_each_position() {
    // The same weights read as an in-place model (logits_shift = false, mask token 7): token i's
    // NLL must come from a causal forward of tokens[..i] ‖ [MASK], read at the mask.
    let name = "qwen3-headdim-f16";
    let mask = 7;
    let model = load_model(&fixture(name), &Device::Cpu, DType::F32)
        .unwrap()
        .with_diffusion(sdlm_engine::DiffusionConfig {
            block_size: Some(4),
            mask_token_id: Some(mask),
            logits_shift: Some(false),
        });
    let tokens: Vec<u32> = (0..11u32).map(|i| (i * 37 + 3) % 120).collect();
    let score = score_tokens(&model, &tokens, tokens.len(), 5).unwrap();
    assert_eq!(score.scored_tokens, tokens.len() - 1);
    for i in 1..tokens.len() {
        let mut prefix = tokens[..i].to_vec();
        prefix.push(mask);
        let rows = logits(&model, &prefix, MaskRule::Causal)
            .to_vec2::<f32>()
            .unwrap();
        let want = -log_softmax_f64(&rows[i])[tokens[i] as usize];
        let got = score.tokens[i - 1].nll;
        assert!((got - want).abs() <= 1e-4, "token {i}: {got} vs {want}");
    }
}
