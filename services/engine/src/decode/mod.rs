//! Decoding: an autoregressive decoder and a block-diffusion decoder behind one interface that
//! advances a sequence by one step and reports the tokens it committed (ALGORITHMS.md,
//! "Decoding"). The one idea both rest on: committed tokens never change, so only they enter the
//! KV cache; an open diffusion block is recomputed at each step and written once, at commit.

mod autoregressive;
mod batcher;
mod diffusion;
mod futures;
mod greedy;
mod logits;
mod params;
mod rows;
mod sampling;

pub use autoregressive::AutoregressiveDecoder;
pub use batcher::{SeqId, StepBatcher, StepOutput, DEFAULT_MAX_BATCH_TOKENS};
pub use diffusion::DiffusionDecoder;
pub use futures::{now, StepFuture};
pub use logits::{Chosen, Logits};
pub use params::{DecodingParams, Mode, ModelLimits, DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE};
pub use sampling::{softmax, Pick, Sampler};

use rows::{Row, RowReader};

use crate::error::{EngineError, Result};
use crate::model::{KvCache, Model, SequenceCache};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// max_new_tokens reached.
    Length,
    /// An end-of-sequence or stop token was decoded (it is not part of the completion).
    Stop,
    /// A stop string appeared in the text (the caller cuts the text before it).
    StopString,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::StopString => "stop_string",
        }
    }
}

/// Counters every decode reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodeStats {
    pub prefill_forwards: usize,
    pub denoise_forwards: usize,
    pub commit_forwards: usize,
    /// Denoising steps (diffusion), or tokens sampled (AR).
    pub steps: usize,
    pub blocks: usize,
    pub edits: usize,
    /// Prompt tokens found in the paged cache's prefix cache (shared with an earlier sequence),
    /// so they were not run; set by the step batcher.
    pub cached_prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl DecodeStats {
    pub fn forward_passes(&self) -> usize {
        self.prefill_forwards + self.denoise_forwards + self.commit_forwards
    }
}

/// What every decoder tracks of its sequence: the committed completion, the counters, and why
/// it stopped.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub completion: Vec<u32>,
    pub stats: DecodeStats,
    pub finish: Option<FinishReason>,
}

pub trait Decoder: Send {
    /// Advances the sequence by one step; returns the tokens this step committed (often none
    /// for diffusion until a block completes). Does nothing once finished.
    fn step(&mut self) -> Result<Vec<u32>> {
        now(self.step_async())
    }
    /// [`Decoder::step`] as a future that awaits its forward: under the step batcher the
    /// forward waits for the other sequences' to run with them.
    fn step_async(&mut self) -> StepFuture<'_, Vec<u32>>;
    fn progress(&self) -> &Progress;
    fn progress_mut(&mut self) -> &mut Progress;

    fn finished(&self) -> Option<FinishReason> {
        self.progress().finish
    }
    fn completion(&self) -> &[u32] {
        &self.progress().completion
    }
    fn stats(&self) -> &DecodeStats {
        &self.progress().stats
    }
    /// Ends the generation early (a stop string, a cancelled request).
    fn finish(&mut self, reason: FinishReason) {
        self.progress_mut().finish = Some(reason);
    }
}

/// The decoder `params` ask for, over its own dense cache. Autoregressive decoding of a model
/// whose positions predict themselves (logits_shift = false) is diffusion with blocks of one
/// token.
pub fn decoder_for<'m>(
    model: &'m Model,
    prompt: &[u32],
    params: &DecodingParams,
) -> Result<Box<dyn Decoder + 'm>> {
    now(decoder_resuming_in(
        model,
        prompt,
        &[],
        params,
        Box::new(KvCache::new()),
    ))
}

/// The decoder of a sequence that has already committed `committed` tokens (on a worker that
/// died or drained): the prompt and the committed blocks are replayed into a new cache with the
/// attention masks the first run used (the prompt causal, each committed block bidirectional
/// inside itself), so the continuation is the one the first run would have written, up to
/// floating-point differences between one wide forward and several narrow ones. Sampling with a
/// temperature restarts its random stream from `seed`, so only greedy decoding continues
/// token for token.
pub fn decoder_resuming<'m>(
    model: &'m Model,
    prompt: &[u32],
    committed: &[u32],
    params: &DecodingParams,
) -> Result<Box<dyn Decoder + 'm>> {
    now(decoder_resuming_in(
        model,
        prompt,
        committed,
        params,
        Box::new(KvCache::new()),
    ))
}

/// [`decoder_resuming`] (nothing committed: [`decoder_for`]) over the given empty cache: a step
/// batcher hands each decoder a cache whose forwards it batches, and awaits the start.
pub async fn decoder_resuming_in<'m>(
    model: &'m Model,
    prompt: &[u32],
    committed: &[u32],
    params: &DecodingParams,
    cache: Box<dyn SequenceCache + 'm>,
) -> Result<Box<dyn Decoder + 'm>> {
    params
        .validate(model.config(), prompt.len())
        .map_err(EngineError::Input)?;
    if !committed.is_empty() && committed.len() >= params.max_new_tokens {
        return Err(EngineError::Input(format!(
            "{} tokens are already committed; max_new_tokens is {}, so nothing is left to decode",
            committed.len(),
            params.max_new_tokens
        )));
    }
    let shift = model.config().diffusion.logits_shift.unwrap_or(true);
    Ok(match params.mode {
        Mode::Autoregressive if shift => Box::new(
            AutoregressiveDecoder::resume_in(model, prompt, committed, params, cache).await?,
        ),
        Mode::Autoregressive => {
            let p = DecodingParams {
                block_size: 1,
                ..params.clone()
            };
            Box::new(DiffusionDecoder::resume_in(model, prompt, committed, &p, cache).await?)
        }
        Mode::Diffusion => {
            Box::new(DiffusionDecoder::resume_in(model, prompt, committed, params, cache).await?)
        }
    })
}

/// Where `text` must be cut for the first stop string it holds (the earliest occurrence of
/// any), if any. Stop strings are matched on text, so callers detokenize after each committed
/// block and finish the decoder with [`FinishReason::StopString`] when this says so.
pub fn stop_string_cut(text: &str, stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}

/// Token ids that end a generation: the params' and the model's end-of-sequence ids.
pub(crate) fn stop_ids(model: &Model, params: &DecodingParams) -> Vec<u32> {
    let mut ids = params.stop_token_ids.clone();
    ids.extend(model.config().eos_token_ids.iter().copied());
    ids
}

/// Runs the prompt as one causal prefix into the cache (after the part it already holds);
/// returns the logits of the prompt's last position (what an AR step or a shifted block reads
/// first), and the counters.
pub(crate) async fn prefill(
    model: &Model,
    prompt: &[u32],
    cache: &mut dyn SequenceCache,
    reader: &RowReader,
) -> Result<(Row, DecodeStats)> {
    let start = std::time::Instant::now();
    let held = cache.held();
    if held >= prompt.len() {
        // The last prompt token must run: its logits are what decoding starts from.
        return Err(EngineError::Input(format!(
            "the cache holds {held} tokens of a {}-token prompt; at most {} may be cached",
            prompt.len(),
            prompt.len().saturating_sub(1)
        )));
    }
    let logits = cache.prefill(model, &prompt[held..]).await?;
    let last_logits = reader.read_last(&logits)?;
    let stats = DecodeStats {
        prefill_forwards: 1,
        prefill_seconds: start.elapsed().as_secs_f64(),
        ..DecodeStats::default()
    };
    Ok((last_logits, stats))
}

#[cfg(test)]
mod tests {
    use super::stop_string_cut;

    #[test]
    fn the_earliest_stop_string_wins_and_empty_ones_are_ignored() {
        let stops = vec!["\ndef".to_string(), "\n#".to_string(), String::new()];
        assert_eq!(stop_string_cut("x = 1\n# c\ndef f", &stops), Some(5));
        assert_eq!(stop_string_cut("x = 1", &stops), None);
    }
}
