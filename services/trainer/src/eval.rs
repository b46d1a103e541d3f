//! Held-out evaluation through the training objective's own forward: autoregressive bits per
//! byte (block size 1 with every position masked: each token sees exactly the clean tokens before
//! it, which is AR scoring) and the diffusion bound per token at block size 32 (the 1/t-weighted
//! masked loss, an upper bound on the negative log-likelihood in expectation).

use candle_core::{Device, Tensor};
use sdlm_engine::Model;
use serde::Serialize;

use crate::blocks::Blocks;
use crate::corrupt::Stage;
use crate::error::TrainerError;
use crate::objective::{loss, training_mask, twin_positions, Batch};
use crate::rng::TrainRng;
use crate::tokenizer::SPECIAL_TOKENS;

/// The block size of the diffusion bound (the B = 32).
pub const BOUND_BLOCK: usize = 32;

#[derive(Clone, Debug, Serialize)]
pub struct HeldOut {
    pub tokens: usize,
    pub bytes: usize,
    pub ar_nats_per_token: f64,
    pub ar_bits_per_byte: f64,
    pub diffusion_nats_per_token: f64,
    pub diffusion_bits_per_byte: f64,
}

/// Bytes each token id stands for: byte-level BPE spells every byte as one character, so a
/// token's length in characters is its length in bytes; special tokens stand for none.
pub fn token_bytes(tokenizer: &tokenizers::Tokenizer) -> Vec<usize> {
    let vocab = tokenizer.get_vocab_size(true);
    (0..vocab as u32)
        .map(|id| match tokenizer.id_to_token(id) {
            Some(t) if !SPECIAL_TOKENS.contains(&t.as_str()) => t.chars().count(),
            _ => 0,
        })
        .collect()
}

/// A batch of `clean` windows with every corrupted position masked, block size 1, weight 1.
fn fully_masked(clean: &[Vec<u32>], mask_id: u32, device: &Device) -> Result<Batch, TrainerError> {
    let len = clean[0].len();
    let b = clean.len();
    let mut inputs = Vec::with_capacity(b * 2 * len);
    for seq in clean {
        inputs.extend(std::iter::repeat_n(mask_id, len));
        inputs.extend_from_slice(seq);
    }
    Ok(Batch {
        len,
        inputs: Tensor::from_vec(inputs, (b, 2 * len), device)?,
        targets: clean.concat(),
        weights: vec![1.0; b * len],
        masked: vec![true; b * len],
        positions: twin_positions(len),
        mask: training_mask(len, &Blocks::new(1, 0), device)?,
        stage: Stage::Mask,
        edits: 0,
        levenshtein: 0,
    })
}

/// Scores `tokens` in windows of `seq_len` (the last one shorter), `batch` windows at a time.
pub fn evaluate(
    model: &Model,
    tokens: &[u32],
    bytes_of: &[usize],
    seq_len: usize,
    batch: usize,
    mask_id: u32,
) -> Result<HeldOut, TrainerError> {
    let device = model.device().clone();
    let windows: Vec<Vec<u32>> = tokens.chunks(seq_len).map(<[u32]>::to_vec).collect();
    // Windows of one length go together; only the last can be shorter.
    let mut groups: Vec<Vec<Vec<u32>>> = Vec::new();
    for w in windows {
        match groups.last_mut() {
            Some(g) if g.len() < batch && g[0].len() == w.len() => g.push(w),
            _ => groups.push(vec![w]),
        }
    }
    let mut rng = TrainRng::new(0x5eed);
    let bound_blocks = Blocks::new(BOUND_BLOCK, 0);
    let (mut ar, mut bound) = (0f64, 0f64);
    for group in &groups {
        ar += loss(model, &fully_masked(group, mask_id, &device)?, mask_id)?.weighted_sum;
        let b = Batch::new(
            group,
            &bound_blocks,
            Stage::Mask,
            mask_id,
            0.0,
            &mut rng,
            &device,
        )?;
        bound += loss(model, &b, mask_id)?.weighted_sum;
    }
    let n = tokens.len().max(1) as f64;
    let bytes: usize = tokens
        .iter()
        .map(|&t| bytes_of.get(t as usize).copied().unwrap_or(0))
        .sum();
    let per_byte = |nats: f64| nats / std::f64::consts::LN_2 / bytes.max(1) as f64;
    Ok(HeldOut {
        tokens: tokens.len(),
        bytes,
        ar_nats_per_token: ar / n,
        ar_bits_per_byte: per_byte(ar),
        diffusion_nats_per_token: bound / n,
        diffusion_bits_per_byte: per_byte(bound),
    })
}
