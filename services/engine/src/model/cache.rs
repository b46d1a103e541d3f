//! A dense per-sequence KV cache: each layer's keys and values of the committed tokens. Only
//! committed tokens enter it (a block being denoised is recomputed each step and written once,
//! at commit). The paged cache of the worker replaces it under batching.

use std::future::Future;
use std::pin::Pin;

use candle_core::Tensor;

#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Committed tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn layers(&self) -> &[(Tensor, Tensor)] {
        &self.layers
    }

    pub(crate) fn replace(&mut self, layers: Vec<(Tensor, Tensor)>, len: usize) {
        self.layers = layers;
        self.len = len;
    }
}

/// A forward's logits, as a future: ready at once from a dense cache; under the step batcher it
/// waits until the batcher has run the forwards of every stepping sequence together.
pub type ForwardFuture<'a> =
    Pin<Box<dyn Future<Output = crate::error::Result<crate::decode::Logits>> + Send + 'a>>;

/// Where a decoder's forwards run: its own dense cache (one sequence at a time), or a step
/// batcher that runs the forwards of many sequences as one over the paged cache.
pub trait SequenceCache: Send {
    /// Leading tokens of the sequence whose K/V the cache already holds before its first
    /// forward: a prompt prefix shared with an earlier sequence, or prompt chunks the step
    /// batcher ran in earlier iterations. The decoder's prefill runs only the rest.
    fn held(&self) -> usize {
        0
    }

    /// Logits for the next n tokens of the sequence (at positions after the committed ones,
    /// seeing all of them, and each other by the query-block rule), `[rows, vocab]` for the rows
    /// `logits` names; the first `commit` of the tokens join the cache.
    fn forward<'a>(
        &'a mut self,
        model: &'a super::Model,
        tokens: &'a [u32],
        query_block: usize,
        commit: usize,
        logits: super::LogitRows,
    ) -> ForwardFuture<'a>;

    /// A prefill: `tokens` run causally and all join the cache; only the last one's logits
    /// (`[1, vocab]`) come back, which lets a cache skip the LM head for the others.
    fn prefill<'a>(&'a mut self, model: &'a super::Model, tokens: &'a [u32]) -> ForwardFuture<'a> {
        self.forward(model, tokens, 1, tokens.len(), super::LogitRows::Last)
    }
}

impl SequenceCache for KvCache {
    fn forward<'a>(
        &'a mut self,
        model: &'a super::Model,
        tokens: &'a [u32],
        query_block: usize,
        commit: usize,
        logits: super::LogitRows,
    ) -> ForwardFuture<'a> {
        // The forward runs now; the future only hands its result over.
        let result = model.forward_cached_rows(tokens, self, query_block, commit, logits);
        Box::pin(std::future::ready(result.map(crate::decode::Logits::from)))
    }
}
