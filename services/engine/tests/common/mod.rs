//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

pub mod mixed;
pub mod paged_script;

use std::collections::HashMap;
use std::path::PathBuf;

use sdlm_engine::{Device, MaskRule, Model, Tensor};

/// A path under the workspace's tests/fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(rel)
}

/// An expected.safetensors of the fixtures: its input ids and every tensor by name.
pub fn expected(rel: &str) -> (Vec<u32>, HashMap<String, Tensor>) {
    let want = candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("fixture tensors");
    let ids = want["input_ids"]
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    (ids, want)
}

/// The model inputs for one sequence at positions 0..len under `rule`: ids `[1, len]`,
/// positions, additive mask.
pub fn inputs(ids: &[u32], rule: MaskRule) -> (Tensor, Vec<u32>, Tensor) {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let positions: Vec<u32> = (0..ids.len() as u32).collect();
    let mask = rule.additive(ids.len(), &Device::Cpu).unwrap();
    (input, positions, mask)
}

/// Logits `[len, vocab]` of one sequence at positions 0..len under `rule`.
pub fn logits(model: &Model, ids: &[u32], rule: MaskRule) -> Tensor {
    let (input, positions, mask) = inputs(ids, rule);
    model
        .forward(&input, &positions, &mask)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// ‖a − b‖ / ‖b‖ over all elements.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let norm = |t: &Tensor| -> f32 {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    norm(&(a - b).unwrap()) / norm(b)
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
    d.max(0).unwrap().to_scalar().unwrap()
}

pub fn log_softmax_f64(row: &[f32]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&x| x as f64 - z).collect()
}

/// A block-causal rule from a fixture's `prefix_block` tensor.
pub fn fixture_rule(want: &HashMap<String, Tensor>) -> MaskRule {
    let pb = want["prefix_block"].to_vec1::<i64>().unwrap();
    MaskRule::BlockCausal {
        prefix: pb[0] as usize,
        block: pb[1] as usize,
    }
}
