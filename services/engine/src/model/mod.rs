//! A Qwen2/Qwen3/Llama-layout decoder (RMSNorm, RoPE, SwiGLU MLP, grouped-query attention,
//! optional q/k/v bias, optional per-head q/k norm, tied or separate LM head), in the shape of
//! candle's `qwen2.rs`: weight names come from `vb.pp(...)`, so the code reads like the
//! checkpoint. The forward takes explicit positions and an explicit mask, because block
//! diffusion needs both: training feeds a corrupted and a clean copy of a sequence at the same
//! positions, and decoding attends bidirectionally inside a block.

mod amx_bf16;
mod bf16_lines;
mod bf16_round;
mod cache;
mod compute_dtype;
mod f32_rows;
mod ggml_rounding;
mod layers;
mod logit_rows;
mod masked_attention;
mod on_workers;
mod op_inputs;
mod paged;
mod precision;
mod q8_matmul;
mod residual_add;
mod rms_norm_grad;
mod rms_norm_rows;
mod rope_grad;
mod row_tasks;
pub(crate) mod source;
mod swiglu;
#[cfg(test)]
mod test_support;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, RmsNorm, VarBuilder};

use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use layers::{DecoderLayer, Ops, Rotary};
use source::{Proj, Safetensors, WeightSource};

pub use cache::{ForwardFuture, KvCache, SequenceCache};
pub use compute_dtype::ComputeDtype;
pub use logit_rows::LogitRows;
pub(crate) use op_inputs::contiguous_f32;
pub use paged::PagedSeq;
pub use precision::MatmulPrecision;

pub struct Model {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Proj,
    rotary: Rotary,
    config: ModelConfig,
    matmul_precision: MatmulPrecision,
}

impl Model {
    /// From safetensors, through candle's VarBuilder.
    pub fn new(config: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let device = vb.device().clone();
        Self::from_source(config, &Safetensors(vb), &device)
    }

    pub(crate) fn from_source(
        config: &ModelConfig,
        w: &dyn WeightSource,
        device: &Device,
    ) -> Result<Self> {
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        let embed_tokens =
            Embedding::new(w.embedding("model.embed_tokens", vocab, hidden)?, hidden);
        let rotary = Rotary::new(config, device, embed_tokens.embeddings().dtype())?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(config, w, &format!("model.layers.{i}")))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = w.rms_norm("model.norm", hidden, config.rms_norm_eps)?;
        let lm_head = if config.tie_word_embeddings {
            w.tied_head("model.embed_tokens", vocab, hidden)?
        } else {
            w.linear("lm_head", hidden, vocab, false)?
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
            config: config.clone(),
            matmul_precision: MatmulPrecision::F32,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// How CPU forwards multiply by the dense weights from now on (see [`MatmulPrecision`]);
    /// an error naming what is missing where this machine cannot run it.
    pub fn set_matmul_precision(&mut self, precision: MatmulPrecision) -> Result<()> {
        precision.check(self.device())?;
        for layer in &mut self.layers {
            for proj in layer.projections_mut() {
                proj.set_precision(precision)?;
            }
        }
        self.lm_head.set_precision(precision)?;
        self.matmul_precision = precision;
        Ok(())
    }

    pub fn matmul_precision(&self) -> MatmulPrecision {
        self.matmul_precision
    }

    /// The same weights with other diffusion settings (mask token, block size, logits shift):
    /// an AR checkpoint can be decoded block-wise, and tests can pick the convention.
    pub fn with_diffusion(mut self, diffusion: crate::config::DiffusionConfig) -> Self {
        self.config.diffusion = diffusion;
        self
    }

    /// Logits `[batch, len, vocab]` (f32) for `input_ids` `[batch, len]` (u32) at `positions`
    /// (one per column, shared by the batch) under `mask` (`[len, len]` additive, see
    /// [`crate::MaskRule::additive`]).
    pub fn forward(&self, input_ids: &Tensor, positions: &[u32], mask: &Tensor) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        if positions.len() != len {
            return Err(EngineError::Input(format!(
                "{} positions for {len} tokens",
                positions.len()
            )));
        }
        if mask.dims() != [len, len] {
            return Err(EngineError::Input(format!(
                "mask is {:?}; expected [{len}, {len}]",
                mask.dims()
            )));
        }
        let all: Vec<usize> = (0..len).collect();
        self.run(input_ids, positions, mask, None, &all)
            .map(|(logits, _)| logits)
    }

    /// [`Model::forward`] through differentiable ops only, so a loss on its logits can be
    /// backpropagated to every weight (for training).
    pub fn forward_train(
        &self,
        input_ids: &Tensor,
        positions: &[u32],
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        self.forward_train_rows(input_ids, positions, mask, 0..len)
    }

    /// [`Model::forward_train`] with logits for the columns `rows` only: the block-diffusion
    /// loss reads the corrupted half of a corrupted ‖ clean sequence, and the LM head over the
    /// clean half would be wasted work.
    pub fn forward_train_rows(
        &self,
        input_ids: &Tensor,
        positions: &[u32],
        mask: &Tensor,
        rows: std::ops::Range<usize>,
    ) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        if rows.end > len || rows.is_empty() {
            return Err(EngineError::Input(format!(
                "rows {rows:?} for {len} tokens"
            )));
        }
        let hidden = self.train_hidden(input_ids, positions, mask)?;
        let hidden = hidden.narrow(1, rows.start, rows.len())?;
        Ok(self.lm_head.forward(&hidden)?.to_dtype(DType::F32)?)
    }

    /// [`Model::forward_train`] with logits for the chosen `rows` (u32 indices into the flattened
    /// `[batch · len]` input) only, `[rows, vocab]`: the block-diffusion loss reads the corrupted
    /// positions that carry loss (about half of them in its first stage).
    pub fn forward_train_select(
        &self,
        input_ids: &Tensor,
        positions: &[u32],
        mask: &Tensor,
        rows: &Tensor,
    ) -> Result<Tensor> {
        let (batch, len) = input_ids.dims2()?;
        let hidden = self
            .train_hidden(input_ids, positions, mask)?
            .reshape((batch * len, self.config.hidden_size))?
            .index_select(rows, 0)?;
        Ok(self.lm_head.forward(&hidden)?.to_dtype(DType::F32)?)
    }

    /// The final-norm hidden states `[batch, len, hidden]` through differentiable ops, after
    /// checking that `positions` and `mask` fit the input.
    fn train_hidden(&self, input_ids: &Tensor, positions: &[u32], mask: &Tensor) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        if positions.len() != len || mask.dims() != [len, len] {
            return Err(EngineError::Input(format!(
                "{} positions and a {:?} mask for {len} tokens",
                positions.len(),
                mask.dims()
            )));
        }
        let ops = Ops::Differentiable;
        let (x, _) = self.layers_out(input_ids, positions, mask, None, ops)?;
        Ok(layers::rms_norm(&self.norm, &x, ops)?)
    }

    /// Logits `[n, vocab]` for `tokens`, the next n tokens of the sequence whose committed
    /// tokens `cache` holds: they sit at positions cache.len().., see every cached token, and see
    /// each other by the block rule (token i sees token j iff j / query_block <= i / query_block;
    /// 1 is causal, >= n bidirectional). With `commit`, their keys and values join the cache;
    /// without, the cache is untouched (a denoising step over a block that is not final).
    pub fn forward_cached(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        query_block: usize,
        commit: bool,
    ) -> Result<Tensor> {
        let commit_len = if commit { tokens.len() } else { 0 };
        self.forward_cached_committing(tokens, cache, query_block, commit_len)
    }

    /// [`Model::forward_cached`] that writes only the first `commit_len` tokens' keys and values
    /// into the cache. A decoder passes a finished block followed by the next block's masks: the
    /// finished block (its own query block, seeing only itself and the cache) is committed by the
    /// same forward that takes the first denoising step of the next one.
    pub fn forward_cached_committing(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        query_block: usize,
        commit_len: usize,
    ) -> Result<Tensor> {
        self.forward_cached_rows(tokens, cache, query_block, commit_len, LogitRows::All)
    }

    /// [`Model::forward_cached_committing`] returning logits only for the rows `logits` names
    /// (`[rows, vocab]`); the LM head runs over those rows only.
    pub fn forward_cached_rows(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        query_block: usize,
        commit_len: usize,
        logits: LogitRows,
    ) -> Result<Tensor> {
        let (ctx, n) = (cache.len(), tokens.len());
        if n == 0 || commit_len > n {
            return Err(EngineError::Input(format!(
                "{n} tokens to run, {commit_len} of them to commit"
            )));
        }
        let device = self.device().clone();
        let input = Tensor::new(tokens, &device)?.unsqueeze(0)?;
        let positions: Vec<u32> = (ctx as u32..(ctx + n) as u32).collect();
        let rule = crate::MaskRule::BlockCausal {
            prefix: ctx,
            block: query_block.max(1),
        };
        let mask = rule.additive_rows(ctx..ctx + n, ctx + n, &device)?;
        let past = Some(cache.layers());
        let (logits, kv) = self.run(&input, &positions, &mask, past, &logits.rows(tokens))?;
        if commit_len == n {
            cache.replace(kv, ctx + n);
        } else if commit_len > 0 {
            let kept = kv
                .into_iter()
                .map(|(k, v)| {
                    Ok((
                        k.narrow(2, 0, ctx + commit_len)?,
                        v.narrow(2, 0, ctx + commit_len)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            cache.replace(kept, ctx + commit_len);
        }
        Ok(logits.squeeze(0)?)
    }

    /// One inference forward of new tokens over optional past keys/values per layer; logits for
    /// the new tokens `rows` only.
    fn run(
        &self,
        input_ids: &Tensor,
        positions: &[u32],
        mask: &Tensor,
        past: Option<&[(Tensor, Tensor)]>,
        rows: &[usize],
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        on_workers::on_workers(self.device(), || {
            let (x, kv) = self.layers_out(input_ids, positions, mask, past, Ops::Fast)?;
            Ok((self.logits_of(&x, rows)?, kv))
        })
    }

    /// Logits `[b, rows, vocab]` (f32) of the new tokens `rows` from the last layer's output
    /// `x` (`[b, n, hidden]`): the final norm and the LM head run over those rows only. Shared by
    /// the dense and the paged forward.
    fn logits_of(&self, x: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let (batch, vocab) = (x.dim(0)?, self.config.vocab_size);
        if rows.is_empty() {
            return Ok(Tensor::zeros((batch, 0, vocab), DType::F32, x.device())?);
        }
        let normed = layers::rms_norm(&self.norm, &pick_rows(x, rows)?, Ops::Fast)?;
        Ok(self.lm_head.forward(&normed)?.to_dtype(DType::F32)?)
    }

    /// The last decoder layer's output (before the final norm), and each layer's keys/values
    /// of past and new tokens.
    fn layers_out(
        &self,
        input_ids: &Tensor,
        positions: &[u32],
        mask: &Tensor,
        past: Option<&[(Tensor, Tensor)]>,
        ops: Ops,
    ) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let (cos, sin) = self.rotary.at(positions)?;
        let mut x = self.embed_tokens.forward(input_ids)?;
        // The additive mask joins the scores in the model's dtype (a no-op for f32).
        let mask = &mask.to_dtype(x.dtype())?;
        let mut kv = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_past = past.and_then(|p| p.get(i));
            let (y, layer_kv) = layer.forward(&x, &cos, &sin, mask, layer_past, ops)?;
            x = y;
            kv.push(layer_kv);
        }
        Ok((x, kv))
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.embeddings().device()
    }

    /// The dtype the model computes in: its weights' as loaded (`load_model`'s `dtype`).
    pub fn dtype(&self) -> DType {
        self.embed_tokens.embeddings().dtype()
    }
}

/// Rows `rows` (at least one) of `x` `[batch, tokens, hidden]` along the tokens: consecutive
/// rows (all of them, a block, the last) as a view, others copied.
fn pick_rows(x: &Tensor, rows: &[usize]) -> candle_core::Result<Tensor> {
    match rows.first() {
        Some(&first) if rows.windows(2).all(|w| w[1] == w[0] + 1) => x.narrow(1, first, rows.len()),
        _ => {
            let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            x.index_select(&Tensor::new(idx.as_slice(), x.device())?, 1)
        }
    }
}
