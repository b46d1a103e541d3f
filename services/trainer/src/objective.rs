//! The vectorised block-diffusion objective (BD3-LM form, ALGORITHMS.md): the model reads the
//! corrupted sequence followed by its clean twin (2L tokens, both halves at positions 0..L) under
//! one attention mask, and its logits over the corrupted half are scored against the clean
//! tokens, weighted per position (1/t where masked).

use candle_core::{Device, Tensor};
use sdlm_engine::Model;

use crate::blocks::Blocks;
use crate::corrupt::{corrupt, Stage};
use crate::cross_entropy::token_nll;
use crate::error::TrainerError;
use crate::rng::TrainRng;

/// Effectively −∞ for the mask token's logit in stage 2: exp() of it is exactly 0 in f32, and
/// unlike −∞ it cannot turn a 0 weight into NaN.
const MASK_LOGIT_FLOOR: f32 = -1e9;

/// Positions of a corrupted ‖ clean input of 2·`len` tokens: 0..len twice.
pub fn twin_positions(len: usize) -> Vec<u32> {
    (0..len as u32).chain(0..len as u32).collect()
}

/// The `[2L, 2L]` additive mask (0 = attends, −∞ = not) of a corrupted ‖ clean input under
/// `blocks`: the engine's [`sdlm_engine::twin_mask`], which serving's scoring shares.
pub fn training_mask(len: usize, blocks: &Blocks, device: &Device) -> Result<Tensor, TrainerError> {
    let ids: Vec<usize> = (0..len).map(|p| blocks.block_of(p)).collect();
    Ok(sdlm_engine::twin_mask(&ids, device)?)
}

/// A batch ready for the model: B sequences of L clean tokens, corrupted under one partition.
/// `targets`, `weights` and `masked` are per corrupted position, `[B · L]` row-major.
pub struct Batch {
    pub len: usize,
    pub inputs: Tensor,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    pub masked: Vec<bool>,
    pub positions: Vec<u32>,
    pub mask: Tensor,
    pub stage: Stage,
    pub edits: usize,
    pub levenshtein: usize,
}

impl Batch {
    pub fn new(
        clean: &[Vec<u32>],
        blocks: &Blocks,
        stage: Stage,
        mask_id: u32,
        suffix_share: f64,
        rng: &mut TrainRng,
        device: &Device,
    ) -> Result<Self, TrainerError> {
        let len = clean.first().map_or(0, Vec::len);
        if len == 0 || clean.iter().any(|c| c.len() != len) {
            return Err(TrainerError::Input(
                "a batch needs sequences of one non-zero length".into(),
            ));
        }
        let (mut inputs, mut targets, mut weights, mut masked) = (vec![], vec![], vec![], vec![]);
        let (mut edits, mut levenshtein) = (0, 0);
        for seq in clean {
            let c = corrupt(seq, blocks, stage, mask_id, suffix_share, rng);
            inputs.extend_from_slice(&c.tokens);
            inputs.extend_from_slice(seq);
            targets.extend_from_slice(seq);
            weights.extend_from_slice(&c.weights);
            masked.extend_from_slice(&c.masked);
            edits += c.edits;
            levenshtein += c.levenshtein;
        }
        let b = clean.len();
        Ok(Self {
            len,
            inputs: Tensor::from_vec(inputs, (b, 2 * len), device)?,
            targets,
            weights,
            masked,
            positions: twin_positions(len),
            mask: training_mask(len, blocks, device)?,
            stage,
            edits,
            levenshtein,
        })
    }

    pub fn sequences(&self) -> usize {
        self.inputs.dims()[0]
    }
}

/// The loss of one batch: `total` (differentiable, the weighted sum over positions divided by the
/// number of positions) and its mask and edit parts as numbers.
pub struct Loss {
    pub total: Tensor,
    pub mask: f64,
    pub edit: f64,
    /// Σ weight·nll over the batch, for evaluations that sum over many batches.
    pub weighted_sum: f64,
}

/// The positions that carry loss (weight ≠ 0): in stage 1 only the masked ones, about half.
/// The LM head and the cross-entropy run over these rows only.
struct Scored {
    /// Row of each in the model's `[B · 2L]` flattened input (the corrupted half of its window).
    rows: Vec<u32>,
    targets: Vec<u32>,
    weights: Vec<f32>,
    masked: Vec<f32>,
}

impl Scored {
    fn of(batch: &Batch) -> Self {
        let mut s = Self {
            rows: vec![],
            targets: vec![],
            weights: vec![],
            masked: vec![],
        };
        for (p, &w) in batch.weights.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let (seq, i) = (p / batch.len, p % batch.len);
            s.rows.push((seq * 2 * batch.len + i) as u32);
            s.targets.push(batch.targets[p]);
            s.weights.push(w);
            s.masked.push(f32::from(u8::from(batch.masked[p])));
        }
        s
    }
}

pub fn loss(model: &Model, batch: &Batch, mask_id: u32) -> Result<Loss, TrainerError> {
    let device = batch.inputs.device();
    let positions = (batch.sequences() * batch.len) as f64;
    let scored = Scored::of(batch);
    if scored.rows.is_empty() {
        // Nothing carries loss (possible only in tiny batches): a zero, whose missing gradients
        // the optimiser reads as zeros.
        return Ok(Loss {
            total: Tensor::new(0f32, device)?,
            mask: 0.0,
            edit: 0.0,
            weighted_sum: 0.0,
        });
    }
    let rows = Tensor::new(scored.rows.as_slice(), device)?;
    let logits = model.forward_train_select(&batch.inputs, &batch.positions, &batch.mask, &rows)?;
    let floor = (batch.stage == Stage::Edit).then_some((mask_id, MASK_LOGIT_FLOOR));
    let nll = token_nll(&logits, &scored.targets, floor)?;
    let weighted = nll.mul(&Tensor::new(scored.weights.as_slice(), device)?)?;
    let sum = weighted.sum_all()?;
    let total = (&sum / positions)?;
    let mask_sum: f32 = weighted
        .mul(&Tensor::new(scored.masked.as_slice(), device)?)?
        .sum_all()?
        .to_scalar()?;
    let all: f32 = sum.to_scalar()?;
    Ok(Loss {
        total,
        mask: mask_sum as f64 / positions,
        edit: (all - mask_sum) as f64 / positions,
        weighted_sum: all as f64,
    })
}
