//! Block-wise parallel decoding (ALGORITHMS.md steps 1–6): open a block of [MASK] tokens after
//! the committed ones, denoise it with forwards that see the cache and the whole block, unmask
//! every position whose confidence reaches the threshold (at least one per step), optionally
//! revise decoded positions. When no mask is left the block is final: its tokens are emitted at
//! once, and its keys/values are written by the next forward, which runs the finished block (seeing
//! only itself and the cache, as a commit forward would) ahead of the next block's masks, so
//! committing costs no forward of its own. Committed blocks never change.

use std::time::Instant;

use sdlm_kernels::reference::select_unmask;

use super::{
    prefill, softmax, stop_ids, Decoder, DecodingParams, FinishReason, Logits, Progress, Row,
    RowReader, Sampler, StepFuture,
};
use crate::error::{EngineError, Result};
use crate::model::{LogitRows, Model, SequenceCache};

pub struct DiffusionDecoder<'m> {
    model: &'m Model,
    params: DecodingParams,
    mask_id: u32,
    /// Position i predicts token i + 1 (true) or itself (false).
    shift: bool,
    cache: Box<dyn SequenceCache + 'm>,
    /// Logits of the last committed position (used when `shift`).
    last_logits: Row,
    reader: RowReader,
    block: Vec<u32>,
    masked: Vec<bool>,
    /// The last finished block, emitted but not yet in the cache (written by the next forward).
    pending: Vec<u32>,
    steps_in_block: usize,
    edits_in_block: usize,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    progress: Progress,
}

impl<'m> DiffusionDecoder<'m> {
    /// Prefills the prompt as one causal prefix, into `cache` (which starts empty).
    pub async fn new_in(
        model: &'m Model,
        prompt: &[u32],
        params: &DecodingParams,
        mut cache: Box<dyn SequenceCache + 'm>,
    ) -> Result<Self> {
        let config = model.config();
        let mask_id = config.diffusion.mask_token_id.ok_or_else(|| {
            EngineError::Input("diffusion decoding needs the model's mask_token_id".into())
        })?;
        let banned = super::rows::never_chosen(config);
        let reader = RowReader::new(model.device().is_cuda(), params, banned);
        let (last_logits, stats) = prefill(model, prompt, cache.as_mut(), &reader).await?;
        Ok(Self {
            model,
            params: params.clone(),
            mask_id,
            shift: config.diffusion.logits_shift.unwrap_or(true),
            cache,
            last_logits,
            reader,
            block: Vec::new(),
            masked: Vec::new(),
            pending: Vec::new(),
            steps_in_block: 0,
            edits_in_block: 0,
            sampler: Sampler::new(params),
            stop_ids: stop_ids(model, params),
            progress: Progress {
                stats,
                ..Progress::default()
            },
        })
    }

    /// Continues after `committed` completion tokens, whole blocks of `block_size` (only a
    /// generation's last block is shorter, and a finished generation is never resumed). The
    /// committed blocks before the last are written into the cache by one forward, each its own
    /// query block; the last one is left pending, as the first run leaves a finished block, so
    /// the next block's first forward commits it. `cache` starts empty.
    pub async fn resume_in(
        model: &'m Model,
        prompt: &[u32],
        committed: &[u32],
        params: &DecodingParams,
        cache: Box<dyn SequenceCache + 'm>,
    ) -> Result<Self> {
        let mut decoder = Self::new_in(model, prompt, params, cache).await?;
        let block = params.block_size;
        let last_start = committed.len().saturating_sub(1) / block * block;
        if last_start > 0 {
            let start = Instant::now();
            decoder
                .cache
                .forward(
                    model,
                    &committed[..last_start],
                    block,
                    last_start,
                    LogitRows::None,
                )
                .await?;
            decoder.progress.stats.prefill_forwards += 1;
            decoder.progress.stats.prefill_seconds += start.elapsed().as_secs_f64();
        }
        decoder.pending = committed[last_start..].to_vec();
        decoder.progress.completion = committed.to_vec();
        Ok(decoder)
    }

    fn open_block(&mut self) {
        let len = self
            .params
            .block_size
            .min(self.params.max_new_tokens - self.progress.completion.len());
        self.block = vec![self.mask_id; len];
        self.masked = vec![true; len];
        self.steps_in_block = 0;
        self.edits_in_block = 0;
        self.progress.stats.blocks += 1;
    }

    /// The logits row that predicts each block position.
    async fn predictions(&mut self) -> Result<Vec<Row>> {
        let len = self.block.len();
        if self.shift && self.pending.is_empty() && len == 1 {
            // Block position 0 is predicted by the last committed position: no forward needed.
            return Ok(vec![self.last_logits.clone()]);
        }
        let logits = self.forward_block().await?;
        if self.masked_rows_only() {
            // Rows came for the masked positions only, in order; the others are never read.
            let got = self.reader.read(&logits)?;
            let wanted = self.masked.iter().filter(|&&m| m).count();
            if got.len() != wanted {
                return Err(EngineError::Input(format!(
                    "the forward returned {} logits rows for {wanted} masked positions",
                    got.len()
                )));
            }
            let mut got = got.into_iter();
            return Ok(self
                .masked
                .iter()
                .map(|&m| match m {
                    true => got.next().unwrap_or_default(),
                    false => Row::default(),
                })
                .collect());
        }
        let mut rows = self.reader.read(&logits)?;
        if self.shift {
            // Row i predicts position i + 1; position 0 reads the last committed token's row.
            let first = self.last_logits.clone();
            rows.truncate(len - 1);
            rows.insert(0, first);
        }
        Ok(rows)
    }

    /// Whether a step reads only the masked positions' predictions: no self-correction, and
    /// each position predicted by its own row (with `shift` a masked position's row is the one
    /// before it, and the LM head runs over the whole block).
    fn masked_rows_only(&self) -> bool {
        !self.params.refine && !self.shift
    }

    /// One forward of the open block over the cache, with the pending finished block (if any)
    /// ahead of it and committed by the same forward. Returns the open block's logits: every
    /// row, or the masked positions' rows only when that is all a step reads.
    async fn forward_block(&mut self) -> Result<Logits> {
        let len = self.block.len();
        self.progress.stats.denoise_forwards += 1;
        let pending = std::mem::take(&mut self.pending);
        let (masked_only, mask_id) = (self.masked_rows_only(), self.mask_id);
        let open_rows = |first: usize| match masked_only {
            true => LogitRows::Masked { first, mask_id },
            false => LogitRows::From(first),
        };
        if pending.is_empty() {
            let wanted = open_rows(0);
            return self
                .cache
                .forward(self.model, &self.block, len, 0, wanted)
                .await;
        }
        // The finished block is query block 0 and the open one block 1: only the final block of
        // a generation is shorter than the one before it, so the open block never spills over.
        // Of the finished block only its last row's logits are read, and only when it predicts
        // the next token.
        let p = pending.len();
        debug_assert!(len <= p);
        let mut tokens = pending;
        tokens.extend_from_slice(&self.block);
        let first = if self.shift { p - 1 } else { p };
        let wanted = open_rows(first);
        let logits = self
            .cache
            .forward(self.model, &tokens, p, p, wanted)
            .await?;
        if self.shift {
            self.last_logits = self.reader.read_last(&logits.narrow(0, 1)?)?;
            return logits.narrow(1, len);
        }
        Ok(logits)
    }

    /// One denoising step over the open block.
    async fn denoise(&mut self) -> Result<()> {
        let preds = self.predictions().await?;
        let len = self.block.len();
        let was_masked = self.masked.clone();
        let mut picks = vec![(self.mask_id, 0f32); len];
        for j in (0..len).filter(|&j| self.masked[j]) {
            let p = self.sampler.choose(&preds[j], Some(self.mask_id));
            picks[j] = (p.token, p.confidence);
        }
        let n_masked = self.masked.iter().filter(|&&m| m).count();
        // With a step budget, unmask enough to finish in time; always at least one.
        let min_unmask = match self.params.max_steps_per_block {
            Some(budget) => n_masked.div_ceil(budget.saturating_sub(self.steps_in_block).max(1)),
            None => 1,
        };
        let confidence: Vec<f32> = picks.iter().map(|p| p.1).collect();
        let chosen = select_unmask(
            &confidence,
            &self.masked,
            &[0, len as i32],
            &[min_unmask as i32],
            self.params.threshold,
        )
        .map_err(|e| EngineError::Input(e.to_string()))?;
        for j in (0..len).filter(|&j| chosen[j]) {
            self.block[j] = picks[j].0;
            self.masked[j] = false;
        }
        if self.params.refine {
            self.revise(&preds, &was_masked);
        }
        self.steps_in_block += 1;
        self.progress.stats.steps += 1;
        Ok(())
    }

    /// Self-correction: a token decoded in an earlier step is replaced when the model now gives
    /// another token probability >= edit_threshold and the current one < 1 - edit_threshold.
    fn revise(&mut self, preds: &[Row], was_masked: &[bool]) {
        let tau = self.params.edit_threshold;
        for j in 0..self.block.len() {
            if was_masked[j] || self.edits_in_block >= self.params.max_edits() {
                continue;
            }
            let probs = softmax(preds[j].logits(), self.params.temperature);
            let best = (0..probs.len()).filter(|&t| t as u32 != self.mask_id).fold(
                None,
                |b: Option<usize>, t| match b {
                    Some(b) if probs[b] >= probs[t] => Some(b),
                    _ => Some(t),
                },
            );
            if let Some(best) = best {
                let current = self.block[j] as usize;
                if best != current && probs[best] >= tau && probs[current] < 1.0 - tau {
                    self.block[j] = best as u32;
                    self.edits_in_block += 1;
                    self.progress.stats.edits += 1;
                }
            }
        }
    }

    /// Appends the finished block to the completion, cut at the first stop token, and leaves
    /// its keys/values to the next forward (none is needed if the generation ends here).
    fn commit(&mut self) -> Result<Vec<u32>> {
        let len = self.block.len();
        let cut = self.block.iter().position(|t| self.stop_ids.contains(t));
        let kept = self.block[..cut.unwrap_or(len)].to_vec();
        self.progress.completion.extend_from_slice(&kept);
        if cut.is_some() {
            self.progress.finish = Some(FinishReason::Stop);
        } else if self.progress.completion.len() >= self.params.max_new_tokens {
            self.progress.finish = Some(FinishReason::Length);
        }
        self.pending = std::mem::take(&mut self.block);
        self.masked.clear();
        Ok(kept)
    }
}

impl DiffusionDecoder<'_> {
    /// One step: a denoising forward, and the block's commit when it has no mask left.
    async fn advance(&mut self) -> Result<Vec<u32>> {
        if self.progress.finish.is_some() {
            return Ok(Vec::new());
        }
        let start = Instant::now();
        if self.block.is_empty() {
            self.open_block();
        }
        self.denoise().await?;
        let committed = if self.masked.iter().any(|&m| m) {
            Vec::new()
        } else {
            self.commit()?
        };
        self.progress.stats.decode_seconds += start.elapsed().as_secs_f64();
        Ok(committed)
    }
}

impl Decoder for DiffusionDecoder<'_> {
    fn step_async(&mut self) -> StepFuture<'_, Vec<u32>> {
        Box::pin(self.advance())
    }

    fn progress(&self) -> &Progress {
        &self.progress
    }

    fn progress_mut(&mut self) -> &mut Progress {
        &mut self.progress
    }
}
