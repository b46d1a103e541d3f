//! Teacher-forced scoring: the negative log-likelihood of every token after the first, given the
//! tokens before it (autoregressive scoring, whichever logit convention the model has). Texts longer than the window are scored in sliding
//! windows: each window holds up to `context` tokens, advances by `stride`, and scores only the
//! tokens no earlier window scored, so every token is scored once with at least
//! `context - stride` tokens of history (except near the start).

use std::time::Instant;

use candle_core::{Device, Tensor, D};

use crate::error::{EngineError, Result};
use crate::mask::MaskRule;
use crate::model::Model;

#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    pub scored_tokens: usize,
    /// Sum over scored tokens of -ln p(token | history), in nats.
    pub total_nll: f64,
    pub seconds: f64,
    /// Per scored token (tokens[1..]), in order.
    pub tokens: Vec<TokenScore>,
}

/// One scored token: what the model predicted there, and the token's NLL.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenScore {
    /// The most likely token at this position (lowest id among equals).
    pub argmax: u32,
    pub nll: f64,
}

impl Score {
    pub fn mean_nll(&self) -> f64 {
        self.total_nll / self.scored_tokens.max(1) as f64
    }

    pub fn bits_per_byte(&self, bytes: usize) -> f64 {
        self.total_nll / std::f64::consts::LN_2 / bytes.max(1) as f64
    }

    pub fn tokens_per_second(&self) -> f64 {
        self.scored_tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Scores `tokens` with `model`. See the module docs for the windows.
pub fn score_tokens(model: &Model, tokens: &[u32], context: usize, stride: usize) -> Result<Score> {
    let max = model.config().max_position_embeddings;
    if context < 2 || context > max {
        return Err(EngineError::Input(format!(
            "context is {context}; it must be between 2 and the model's max_position_embeddings = {max}"
        )));
    }
    if stride == 0 || stride > context - 1 {
        return Err(EngineError::Input(format!(
            "stride is {stride}; it must be between 1 and context - 1 = {}",
            context - 1
        )));
    }
    let start = Instant::now();
    let device = model.device().clone();
    let mut scored = Vec::with_capacity(tokens.len().saturating_sub(1));
    let mut scored_to = 1; // tokens[..scored_to] have been scored (the first never is)
    let mut begin = 0;
    while scored_to < tokens.len() {
        let end = (begin + context).min(tokens.len());
        let window = &tokens[begin..end];
        scored.extend(window_scores(model, window, scored_to - begin, &device)?);
        scored_to = end;
        if end == tokens.len() {
            break;
        }
        begin += stride;
        // Never leave a gap: the next window must reach back to the first unscored token.
        begin = begin.min(scored_to - 1);
    }
    Ok(Score {
        scored_tokens: scored.len(),
        total_nll: scored.iter().map(|t| t.nll).sum(),
        seconds: start.elapsed().as_secs_f64(),
        tokens: scored,
    })
}

/// Scores of window[first..]. A next-token model (logits_shift true or unset) reads the window
/// causally and predicts each token from the logits one position before. An in-place model
/// (logits_shift = false, our block-diffusion models) predicts a token at its own position from
/// a mask there: it reads [MASK]×len ‖ window with one block per position (each mask sees the
/// clean tokens before it and itself), which is autoregressive scoring in one forward.
fn window_scores(
    model: &Model,
    window: &[u32],
    first: usize,
    device: &Device,
) -> Result<Vec<TokenScore>> {
    let len = window.len();
    let logits = match in_place_mask(model)? {
        None => {
            let input = Tensor::new(window, device)?.unsqueeze(0)?;
            let positions: Vec<u32> = (0..len as u32).collect();
            let mask = MaskRule::Causal.additive(len, device)?;
            let logits = model.forward(&input, &positions, &mask)?.squeeze(0)?; // [len, vocab]
                                                                                // Row i − 1 predicts token i: shift by one so row i predicts token i.
            Tensor::cat(&[logits.narrow(0, 0, 1)?, logits.narrow(0, 0, len - 1)?], 0)?
        }
        Some(mask_id) => {
            let mut ids = vec![mask_id; len];
            ids.extend_from_slice(window);
            let input = Tensor::new(ids.as_slice(), device)?.unsqueeze(0)?;
            let positions: Vec<u32> = (0..len as u32).chain(0..len as u32).collect();
            let blocks: Vec<usize> = (0..len).collect();
            let mask = crate::mask::twin_mask(&blocks, device)?;
            model
                .forward(&input, &positions, &mask)?
                .squeeze(0)?
                .narrow(0, 0, len)?
        }
    };
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let rows = log_probs.to_vec2::<f32>()?;
    Ok((first.max(1)..len)
        .map(|i| {
            let row = &rows[i];
            let argmax = (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            TokenScore {
                argmax: argmax as u32,
                nll: -(row[window[i] as usize] as f64),
            }
        })
        .collect())
}

/// The mask token of an in-place model, None for a next-token model; an in-place model without
/// a mask token cannot be scored.
fn in_place_mask(model: &Model) -> Result<Option<u32>> {
    let d = &model.config().diffusion;
    match (d.logits_shift, d.mask_token_id) {
        (Some(false), Some(mask)) => Ok(Some(mask)),
        (Some(false), None) => Err(EngineError::Input(
            "this model predicts in place (logits_shift = false) but has no mask_token_id to \
             score with"
                .into(),
        )),
        _ => Ok(None),
    }
}
