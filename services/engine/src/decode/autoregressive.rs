//! One token per step: sample from the logits of the last committed position, then one forward
//! of that token writes its keys/values and gives the next logits.

use std::time::Instant;

use super::{
    prefill, stop_ids, Decoder, DecodingParams, FinishReason, Progress, Row, RowReader, Sampler,
    StepFuture,
};
use crate::error::Result;
use crate::model::{LogitRows, Model, SequenceCache};

pub struct AutoregressiveDecoder<'m> {
    model: &'m Model,
    cache: Box<dyn SequenceCache + 'm>,
    last_logits: Row,
    reader: RowReader,
    max_new_tokens: usize,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    banned: Option<u32>,
    progress: Progress,
}

impl<'m> AutoregressiveDecoder<'m> {
    /// Prefills the prompt (one causal forward into `cache`, which starts empty).
    pub async fn new_in(
        model: &'m Model,
        prompt: &[u32],
        params: &DecodingParams,
        mut cache: Box<dyn SequenceCache + 'm>,
    ) -> Result<Self> {
        let banned = super::rows::never_chosen(model.config());
        let reader = RowReader::new(model.device().is_cuda(), params, banned);
        let (last_logits, stats) = prefill(model, prompt, cache.as_mut(), &reader).await?;
        Ok(Self {
            model,
            cache,
            last_logits,
            reader,
            max_new_tokens: params.max_new_tokens,
            sampler: Sampler::new(params),
            stop_ids: stop_ids(model, params),
            banned,
            progress: Progress {
                stats,
                ..Progress::default()
            },
        })
    }

    /// Continues after `committed` completion tokens: prompt and committed tokens are one causal
    /// prefix, exactly what the token-by-token run cached (into `cache`, which starts empty).
    pub async fn resume_in(
        model: &'m Model,
        prompt: &[u32],
        committed: &[u32],
        params: &DecodingParams,
        cache: Box<dyn SequenceCache + 'm>,
    ) -> Result<Self> {
        let sequence: Vec<u32> = prompt.iter().chain(committed).copied().collect();
        let mut decoder = Self::new_in(model, &sequence, params, cache).await?;
        decoder.progress.completion = committed.to_vec();
        Ok(decoder)
    }
}

impl AutoregressiveDecoder<'_> {
    async fn advance(&mut self) -> Result<Vec<u32>> {
        if self.progress.finish.is_some() {
            return Ok(Vec::new());
        }
        let start = Instant::now();
        let token = self.sampler.choose(&self.last_logits, self.banned).token;
        self.progress.stats.steps += 1;
        if self.stop_ids.contains(&token) {
            self.progress.finish = Some(FinishReason::Stop);
            return Ok(Vec::new());
        }
        self.progress.completion.push(token);
        if self.progress.completion.len() >= self.max_new_tokens {
            self.progress.finish = Some(FinishReason::Length);
        } else {
            let logits = self
                .cache
                .forward(self.model, &[token], 1, 1, LogitRows::All)
                .await?;
            self.progress.stats.commit_forwards += 1;
            self.last_logits = self.reader.read_last(&logits)?;
        }
        self.progress.stats.decode_seconds += start.elapsed().as_secs_f64();
        Ok(vec![token])
    }
}

impl Decoder for AutoregressiveDecoder<'_> {
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
