//! The model against HF transformers: logits for tiny random checkpoints written by
//! tests/fixtures/make_fixtures.py (Qwen2 with bias and tied embeddings in bf16, Qwen3 with an
//! explicit head_dim and q/k norm in f16, Llama in two f32 shards), for a causal pass and for a
//! block-causal pass whose mask transformers received as a 4D tensor.

use std::collections::HashMap;
use std::path::PathBuf;

use sdlm_engine::{load_model, DType, Device, MaskRule, Tensor};

const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)
        .expect("fixture expected.safetensors")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn check(name: &str) {
    let model = load_model(&fixture(name), &Device::Cpu, DType::F32).expect("fixture loads");
    let want = expected(name);
    let ids: Vec<u32> = want["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    let len = ids.len();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let positions: Vec<u32> = (0..len as u32).collect();

    let causal = MaskRule::Causal.additive(len, &Device::Cpu).unwrap();
    let got = model
        .forward(&input, &positions, &causal)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = max_abs_diff(&got, &want["causal_logits"]);
    eprintln!("{name} causal: max |Δlogit| = {diff:e}");
    assert!(diff <= TOLERANCE, "{name} causal: max |Δlogit| = {diff}");

    let pb = want["prefix_block"].to_vec1::<i64>().unwrap();
    let rule = MaskRule::BlockCausal {
        prefix: pb[0] as usize,
        block: pb[1] as usize,
    };
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
    let mask = rule.additive(len, &Device::Cpu).unwrap();
    let got = model
        .forward(&input, &positions, &mask)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let diff = max_abs_diff(&got, &want["block_causal_logits"]);
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
