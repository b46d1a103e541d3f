//! The model against HF transformers: logits for tiny random checkpoints written by
//! tests/fixtures/make_fixtures.py (Qwen2 with bias and tied embeddings in bf16, Qwen3 with an
//! explicit head_dim and q/k norm in f16, Llama in two f32 shards), for a causal pass and for a
//! block-causal pass whose mask transformers received as a 4D tensor.

mod common;

use common::{expected, fixture, fixture_rule, logits, max_abs_diff};
use sdlm_engine::{load_model, DType, Device, MaskRule};

const TOLERANCE: f32 = 1e-4;

fn check(name: &str) {
    let model = load_model(&fixture(name), &Device::Cpu, DType::F32).expect("fixture loads");
    let (ids, want) = expected(&format!("{name}/expected.safetensors"));

    let diff = max_abs_diff(
        &logits(&model, &ids, MaskRule::Causal),
        &want["causal_logits"],
    );
    eprintln!("{name} causal: max |Δlogit| = {diff:e}");
    assert!(diff <= TOLERANCE, "{name} causal: max |Δlogit| = {diff}");

    let rule = fixture_rule(&want);
    let allow = want["block_causal_allow"].to_vec2::<u8>().unwrap();
    for (q, row) in allow.iter().enumerate() {
        for (k, &a) in row.iter().enumerate() {
            assert_eq!(
                rule.allows(q, k),
                a == 1,
                "{name}: mask differs at ({q}, {k})"
            );
        }
    }
    let diff = max_abs_diff(&logits(&model, &ids, rule), &want["block_causal_logits"]);
    eprintln!("{name} block-causal: max |Δlogit| = {diff:e}");
    assert!(
        diff <= TOLERANCE,
        "{name} block-causal: max |Δlogit| = {diff}"
    );
}

#[test]
fn qwen2_with_bias_and_tied_embeddings_in_bf16_matches_transformers() {
    check("qwen2-tied-bf16");
}

#[test]
fn qwen3_with_explicit_head_dim_and_qk_norm_in_f16_matches_transformers() {
    check("qwen3-headdim-f16");
}

#[test]
fn llama_from_two_f32_shards_matches_transformers() {
    check("llama-sharded-f32");
}
