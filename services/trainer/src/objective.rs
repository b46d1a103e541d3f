//! The vectorised block-diffusion objective (BD3-LM form, ALGORITHMS.md): the model reads the
//! corrupted sequence followed by its clean twin (2L tokens, both halves at positions 0..L) under
//! one attention mask, and its logits over the corrupted half are scored against the clean
//! tokens, weighted per position (1/t where masked).

use candle_core::{Device, Tensor, D};
use sdlm_engine::Model;

use crate::blocks::Blocks;
use crate::corrupt::{corrupt, Stage};
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
pub struct Batch {
    pub len: usize,
    pub inputs: Tensor,
    pub targets: Tensor,
    pub weights: Tensor,
    pub masked: Tensor,
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
            let c = corrupt(seq, blocks, stage, mask_id, rng);
            inputs.extend_from_slice(&c.tokens);
            inputs.extend_from_slice(seq);
            targets.extend_from_slice(seq);
            weights.extend_from_slice(&c.weights);
            masked.extend(c.masked.iter().map(|&m| f32::from(u8::from(m))));
            edits += c.edits;
            levenshtein += c.levenshtein;
        }
        let b = clean.len();
        Ok(Self {
            len,
            inputs: Tensor::from_vec(inputs, (b, 2 * len), device)?,
            targets: Tensor::from_vec(targets, (b, len), device)?,
            weights: Tensor::from_vec(weights, (b, len), device)?,
            masked: Tensor::from_vec(masked, (b, len), device)?,
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

/// Per-position negative log-likelihood `[B, L]` of the clean tokens under the model's logits for
/// the corrupted half.
pub fn position_nll(model: &Model, batch: &Batch, mask_id: u32) -> Result<Tensor, TrainerError> {
    let logits =
        model.forward_train_rows(&batch.inputs, &batch.positions, &batch.mask, 0..batch.len)?;
    let logits = if batch.stage == Stage::Edit {
        let vocab = logits.dim(D::Minus1)?;
        let mut floor = vec![0f32; vocab];
        if let Some(f) = floor.get_mut(mask_id as usize) {
            *f = MASK_LOGIT_FLOOR;
        }
        logits.broadcast_add(&Tensor::from_vec(floor, vocab, logits.device())?)?
    } else {
        logits
    };
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    Ok(log_probs
        .gather(&batch.targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?
        .neg()?)
}

pub fn loss(model: &Model, batch: &Batch, mask_id: u32) -> Result<Loss, TrainerError> {
    let nll = position_nll(model, batch, mask_id)?;
    let weighted = nll.mul(&batch.weights)?;
    let positions = (batch.sequences() * batch.len) as f64;
    let sum = weighted.sum_all()?;
    let total = (&sum / positions)?;
    let mask_sum: f32 = weighted.mul(&batch.masked)?.sum_all()?.to_scalar()?;
    let all: f32 = sum.to_scalar()?;
    Ok(Loss {
        total,
        mask: mask_sum as f64 / positions,
        edit: (all - mask_sum) as f64 / positions,
        weighted_sum: all as f64,
    })
}
