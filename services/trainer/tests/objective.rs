//! The vectorised objective's attention mask against an explicitly built reference, and the
//! objective's AR special case against the engine's causal forward.

use candle_core::{Device, Tensor};
use sdlm_engine::{MaskRule, ModelConfig};
mod common;

use common::tiny_settings;
use sdlm_trainer::{hf_config, training_mask, Blocks, Learner, MASK_ID, PAD_ID};

/// The mask spelt out from the description: enumerate the blocks as position ranges, then for
/// every (query, key) pair of the 2L sequence decide by which half and which range each is in.
fn reference_mask(len: usize, size: usize, offset: usize) -> Vec<Vec<bool>> {
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    let first = offset % size;
    if first > 0 {
        ranges.push(0..first.min(len));
        start = first;
    }
    while start < len {
        ranges.push(start..(start + size).min(len));
        start += size;
    }
    let block = |p: usize| ranges.iter().position(|r| r.contains(&p)).unwrap();
    let mut m = vec![vec![false; 2 * len]; 2 * len];
    for (q, row) in m.iter_mut().enumerate() {
        for (k, cell) in row.iter_mut().enumerate() {
            let (q_clean, k_clean) = (q >= len, k >= len);
            let (bq, bk) = (block(q % len), block(k % len));
            *cell = match (q_clean, k_clean) {
                (false, false) => bq == bk,
                (false, true) => bk < bq,
                (true, true) => bk <= bq,
                (true, false) => false,
            };
        }
    }
    m
}

#[test]
fn the_vectorised_mask_equals_an_explicit_reference() {
    for len in [1, 5, 16, 37] {
        for size in [1, 2, 4, 8, 16, 32] {
            for offset in [0, 1, size / 2 + 1, size - 1] {
                let got = training_mask(len, &Blocks::new(size, offset), &Device::Cpu)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap();
                let want = reference_mask(len, size, offset);
                for q in 0..2 * len {
                    for k in 0..2 * len {
                        let sees = got[q][k] == 0.0;
                        assert!(sees || got[q][k] == f32::NEG_INFINITY);
                        assert_eq!(
                            sees, want[q][k],
                            "len {len} B {size} offset {offset} q {q} k {k}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn block_size_one_with_every_position_masked_is_causal_scoring() {
    // Position i of the corrupted half sees the clean tokens before i and its own [MASK]: the
    // same as a causal forward of clean[..i] ‖ [MASK] read at its last position. This is what
    // makes the held-out AR bits/byte an autoregressive score.
    let s = tiny_settings();
    let config = ModelConfig::from_json(
        &hf_config(&s, MASK_ID, 0, PAD_ID).to_string(),
        std::path::Path::new("config.json"),
    )
    .unwrap();
    let learner = Learner::new(&config, &s, MASK_ID, 9).unwrap();
    let clean: Vec<u32> = (0..12u32).map(|i| 6 + (i * 7) % 50).collect();
    let len = clean.len();
    let mut inputs = vec![MASK_ID; len];
    inputs.extend_from_slice(&clean);
    let dev = Device::Cpu;
    let input = Tensor::new(inputs.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let positions = sdlm_trainer::twin_positions(len);
    let mask = training_mask(len, &Blocks::new(1, 0), &dev).unwrap();
    let twin = learner
        .model
        .forward(&input, &positions, &mask)
        .unwrap()
        .squeeze(0)
        .unwrap();
    for i in 0..len {
        let mut seq = clean[..i].to_vec();
        seq.push(MASK_ID);
        let ids = Tensor::new(seq.as_slice(), &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let pos: Vec<u32> = (0..=i as u32).collect();
        let causal = MaskRule::Causal.additive(i + 1, &dev).unwrap();
        let want = learner
            .model
            .forward(&ids, &pos, &causal)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .get(i)
            .unwrap();
        let got = twin.get(i).unwrap();
        let d: f32 = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-4, "position {i}: {d}");
    }
}
