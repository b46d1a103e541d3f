//! A dense per-sequence KV cache: each layer's keys and values of the committed tokens. Only
//! committed tokens enter it (a block being denoised is recomputed each step and written once,
//! at commit). The paged cache of the worker replaces it under batching.

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
