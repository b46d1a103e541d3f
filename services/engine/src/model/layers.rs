//! The layers of [`super::Model`], each a `new(config, vb)` and a `forward`.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::RmsNorm;
use sdlm_kernels::reference::RopeTable;

use super::on_workers::side_by_side;
use super::source::{Proj, WeightSource};

/// Which implementation of RMSNorm, RoPE and softmax a forward uses: fused ops with no backward
/// pass (candle's on a GPU; on the CPU the engine's row loops where it has them), or the same
/// math composed of differentiable tensor ops (for training; about the same numbers, more memory
/// and time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ops {
    Fast,
    Differentiable,
}

pub(super) fn rms_norm(norm: &RmsNorm, x: &Tensor, ops: Ops) -> Result<Tensor> {
    match ops {
        Ops::Fast => {
            super::rms_norm_rows::rms_norm_rows(x, norm.weight(), norm.eps(), || norm.forward(x))
        }
        Ops::Differentiable => {
            super::rms_norm_grad::rms_norm_differentiable(x, norm.weight(), norm.eps(), || {
                norm.forward_diff(x)
            })
        }
    }
}

/// `a + b` on the residual stream: at inference on the CPU on rayon's workers (see
/// `residual_add`), candle's differentiable add for training.
fn add(a: &Tensor, b: &Tensor, ops: Ops) -> Result<Tensor> {
    match ops {
        Ops::Fast => super::residual_add::residual_add(a, b),
        Ops::Differentiable => a + b,
    }
}

/// The residual stream after a sub-layer (`residual + h`) and its norm. On a GPU at inference,
/// one kernel does both and writes the sum into the stream's own storage (one launch and
/// allocation fewer than an add and a norm); `residual` is the forward's own stream.
/// `SDLM_UNFUSED_NORM=1` composes candle's add and norm instead, to measure the difference.
fn add_then_norm(
    residual: &Tensor,
    h: &Tensor,
    norm: &RmsNorm,
    ops: Ops,
) -> Result<(Tensor, Tensor)> {
    if ops == Ops::Fast && residual.device().is_cuda() && !crate::switches::UNFUSED_NORM.on() {
        let fused = crate::cuda_ops::add_rms_norm_in_place(residual, h, norm.weight(), norm.eps())
            .map_err(|e| candle_core::Error::Msg(format!("residual_rmsnorm: {e}")))?;
        if let Some(pair) = fused {
            return Ok(pair);
        }
    }
    let sum = add(residual, h, ops)?;
    let normed = rms_norm(norm, &sum, ops)?;
    Ok((sum, normed))
}

use crate::config::ModelConfig;
use crate::error::EngineError;

/// cos/sin tables for every position the model supports, from the kernels' RopeTable so that the
/// CPU and CUDA paths rotate by the same numbers, in the model's dtype (candle's rope takes one
/// dtype for all three); the f32 table itself too, for rotating rows in place (the paged
/// forward: on the CPU, and on a GPU from a copy there).
pub(super) struct Rotary {
    cos: Tensor,
    sin: Tensor,
    table: RopeTable,
    on_device: crate::cuda_ops::DeviceRope,
}

impl Rotary {
    pub(super) fn new(config: &ModelConfig, device: &Device, dtype: DType) -> Result<Self> {
        let table = RopeTable::new(
            config.head_dim,
            config.rope_theta as f32,
            config.max_position_embeddings,
        );
        let half = config.head_dim / 2;
        let shape = (config.max_position_embeddings, half);
        Ok(Self {
            cos: Tensor::from_slice(&table.cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_slice(&table.sin, shape, device)?.to_dtype(dtype)?,
            table,
            on_device: Default::default(),
        })
    }

    pub(super) fn table(&self) -> &RopeTable {
        &self.table
    }

    /// Rows `[tokens, heads, head_dim]` on the device rotated by the positions of `batch`'s
    /// tokens, in place where the rows' buffer is their own.
    fn rotate_on_device(
        &self,
        x: &Tensor,
        batch: &crate::kv::DeviceBatch,
        heads: usize,
    ) -> std::result::Result<Tensor, EngineError> {
        self.on_device.rotate(&self.table, x, batch, heads)
    }

    /// An error naming the first position the tables do not reach.
    pub(super) fn check(&self, positions: &[u32]) -> std::result::Result<(), EngineError> {
        match positions
            .iter()
            .find(|&&p| p as usize >= self.table.max_position)
        {
            Some(p) => Err(EngineError::Input(format!(
                "position {p} is beyond the model's max_position_embeddings = {}",
                self.table.max_position
            ))),
            None => Ok(()),
        }
    }

    /// `[len, head_dim / 2]` cos and sin rows for these positions.
    pub(super) fn at(
        &self,
        positions: &[u32],
    ) -> std::result::Result<(Tensor, Tensor), EngineError> {
        self.check(positions)?;
        let idx = Tensor::new(positions, self.cos.device())?;
        Ok((
            self.cos.index_select(&idx, 0)?,
            self.sin.index_select(&idx, 0)?,
        ))
    }
}

struct Mlp {
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
}

impl Mlp {
    fn new(c: &ModelConfig, w: &dyn WeightSource, name: &str) -> Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            gate_proj: w.linear(&format!("{name}.gate_proj"), h, i, false)?,
            up_proj: w.linear(&format!("{name}.up_proj"), h, i, false)?,
            down_proj: w.linear(&format!("{name}.down_proj"), i, h, false)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (gate, up) = side_by_side(x, || self.gate_proj.forward(x), || self.up_proj.forward(x));
        let gated = super::swiglu::swiglu(&gate?, &up?)?;
        self.down_proj.forward(&gated)
    }
}

struct Attention {
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    rope_interleaved: bool,
}

impl Attention {
    fn new(c: &ModelConfig, w: &dyn WeightSource, name: &str) -> Result<Self> {
        let (h, kvh, d, hidden) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.hidden_size,
        );
        let qk_norm = |part: &str| -> Result<Option<RmsNorm>> {
            match c.qk_norm {
                true => Ok(Some(w.rms_norm(
                    &format!("{name}.{part}"),
                    d,
                    c.rms_norm_eps,
                )?)),
                false => Ok(None),
            }
        };
        let bias = c.attention_bias;
        Ok(Self {
            q_proj: w.linear(&format!("{name}.q_proj"), hidden, h * d, bias)?,
            k_proj: w.linear(&format!("{name}.k_proj"), hidden, kvh * d, bias)?,
            v_proj: w.linear(&format!("{name}.v_proj"), hidden, kvh * d, bias)?,
            o_proj: w.linear(&format!("{name}.o_proj"), h * d, hidden, false)?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            rope_interleaved: c.rope_interleaved,
        })
    }

    /// `[b, len, heads * d]` → `[b, heads, len, d]`, normed per head when the model does that.
    fn split_heads(
        &self,
        x: Tensor,
        heads: usize,
        norm: Option<&RmsNorm>,
        ops: Ops,
    ) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        let x = x.reshape((b, len, heads, self.head_dim))?;
        let x = match norm {
            Some(n) => rms_norm(n, &x, ops)?,
            None => x,
        };
        x.transpose(1, 2)?.contiguous()
    }

    /// The q, k and v projections of `x` (`[b, len, hidden]`), each `[b, len, heads · d]`.
    fn projections(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        // q against k and v: about half the outputs each.
        let (q, (k, v)) = side_by_side(
            x,
            || self.q_proj.forward(x),
            || side_by_side(x, || self.k_proj.forward(x), || self.v_proj.forward(x)),
        );
        Ok((q?, k?, v?))
    }

    /// Queries, keys and values of `x` (`[b, len, hidden]`), each `[b, heads, len, d]`, with
    /// RoPE applied to q and k.
    fn qkv(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        ops: Ops,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = self.projections(x)?;
        let q = self.split_heads(q, self.heads, self.q_norm.as_ref(), ops)?;
        let k = self.split_heads(k, self.kv_heads, self.k_norm.as_ref(), ops)?;
        let v = self.split_heads(v, self.kv_heads, None, ops)?;
        // GGUF's llama layout permutes q/k rows so that RoPE rotates adjacent pairs.
        use candle_nn::rotary_emb::{rope, rope_i, rope_i_slow, rope_slow};
        let rotate = |x: &Tensor| match (self.rope_interleaved, ops) {
            (true, Ops::Fast) => rope_i(x, cos, sin),
            (false, Ops::Fast) => rope(x, cos, sin),
            (true, Ops::Differentiable) => rope_i_slow(x, cos, sin),
            (false, Ops::Differentiable) => {
                super::rope_grad::rope_differentiable(x, cos, sin, || rope_slow(x, cos, sin))
            }
        };
        Ok((rotate(&q)?, rotate(&k)?, v))
    }

    /// Attention of the new tokens `x` over `past` keys/values (if any) and their own. Returns
    /// the output and the keys/values of past and new tokens together (`[b, kv_heads, all, d]`,
    /// after RoPE), which a caller may keep as the cache.
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        ops: Ops,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let (b, len, _) = x.dims3()?;
        let (q, k, v) = self.qkv(x, cos, sin, ops)?;
        let (k_all, v_all) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // On the CPU the one-op attention, for training and decoding alike: it walks only the
        // keys the mask allows and skips the composed form's repeat_kv copies and its small
        // threaded matmuls (decoding the shipped model: AR +13–14%, diffusion B 4 +10–11%).
        let fused = q.device().is_cpu() && q.dtype() == candle_core::DType::F32 && mask.rank() == 2;
        let out = if fused {
            super::masked_attention::masked_attention(&q, &k_all, &v_all, mask, scale)?
        } else {
            let k = repeat_kv(k_all.clone(), self.heads / self.kv_heads)?;
            let v = repeat_kv(v_all.clone(), self.heads / self.kv_heads)?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
            let probs = match ops {
                Ops::Fast => candle_nn::ops::softmax_last_dim(&scores)?,
                Ops::Differentiable => candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?,
            };
            probs.matmul(&v)? // [b, heads, len, d]
        };
        let out = out
            .transpose(1, 2)?
            .reshape((b, len, self.heads * self.head_dim))?;
        Ok((self.o_proj.forward(&out)?, (k_all, v_all)))
    }
}

/// What a paged forward needs besides the hidden states and the pages: the batch's layout over
/// the cache.
pub(super) struct PagedStep<'a> {
    pub batch: sdlm_kernels::RaggedBatch<'a>,
    pub shape: sdlm_kernels::AttentionShape,
    /// The batch on the device, when the pages are there.
    pub device: Option<&'a crate::kv::DeviceBatch>,
    /// Each new token's position (checked against the tables), and the model's rotation
    /// tables, for RoPE on rows.
    pub positions: &'a [i32],
    pub rotary: &'a Rotary,
    /// The positions' cos/sin rows for candle's rope, made the first time a layer takes that
    /// path (GGUF's interleaved rotation): the rows' own RoPE reads the table itself.
    pub cos_sin: std::cell::OnceCell<(Tensor, Tensor)>,
}

impl PagedStep<'_> {
    fn cos_sin(&self) -> Result<(&Tensor, &Tensor)> {
        if self.cos_sin.get().is_none() {
            let positions = self
                .positions
                .iter()
                .map(|&p| u32::try_from(p))
                .collect::<std::result::Result<Vec<u32>, _>>()
                .map_err(|e| candle_core::Error::Msg(format!("positions: {e}")))?;
            let made = self
                .rotary
                .at(&positions)
                .map_err(|e| candle_core::Error::Msg(format!("rope: {e}")))?;
            let _ = self.cos_sin.set(made);
        }
        let (cos, sin) = self
            .cos_sin
            .get()
            .ok_or_else(|| candle_core::Error::Msg("rope: no cos/sin rows".into()))?;
        Ok((cos, sin))
    }
}

/// Where a paged forward's layers find the K/V pages.
pub(super) enum LayerPages<'a> {
    /// Pages in host memory, only read while the forward runs: each layer hands back its new
    /// tokens' keys and values ([`NewKv`]) and the forward writes the committed ones once the
    /// whole batch is through (so that parts of a batch can run side by side, `paged.rs`).
    Host(&'a crate::kv::KvStorage),
    /// Pages on the device, which the attention kernel reads and writes as it goes.
    Device(&'a mut crate::kv::DevicePages),
}

/// A layer's keys and values of the batch's new tokens, rows `[tokens, kv_heads, d]` each.
pub(super) type NewKv = (Vec<f32>, Vec<f32>);

impl Attention {
    /// Queries, keys and values of the ragged batch `x` (`[1, tokens, hidden]`) as f32 rows
    /// `[tokens, heads, d]`, the layout paged attention reads, with RoPE applied to q and k.
    ///
    /// The projections' outputs are already rows: each is normed per head where the model does
    /// that and rotated in place (`rope_inplace`, the same products and sums as candle's rope, so
    /// the same bits). [`Attention::qkv`]'s head-major tensors, which candle's rope and attention
    /// want, would be copied there and back, three passes over q and k per layer: 0.4–0.5 ms of
    /// a 16-sequence round of 4 ms on the shipped model (2-core Xeon). GGUF's interleaved
    /// rotation and non-f32 activations keep that path.
    fn qkv_rows(&self, x: &Tensor, step: &PagedStep<'_>) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        use candle_core::DType::F32;
        if self.rope_interleaved || x.dtype() != F32 {
            let (cos, sin) = step.cos_sin()?;
            let (q, k, v) = self.qkv(x, cos, sin, Ops::Fast)?;
            // [1, heads, tokens, d] → [tokens, heads, d].
            let rows = |t: Tensor| -> Result<Vec<f32>> {
                t.transpose(1, 2)?
                    .to_dtype(F32)?
                    .contiguous()?
                    .flatten_all()?
                    .to_vec1::<f32>()
            };
            return Ok((rows(q)?, rows(k)?, rows(v)?));
        }
        let (q, k, v) = self.head_rows(x)?;
        let rows = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (mut q, mut k, v) = (rows(q)?, rows(k)?, rows(v)?);
        let rotate = |x: &mut [f32], heads: usize| {
            sdlm_kernels::reference::rope_inplace(x, step.positions, step.rotary.table(), heads)
                .map_err(|e| candle_core::Error::Msg(format!("rope: {e}")))
        };
        rotate(&mut q, self.heads)?;
        rotate(&mut k, self.kv_heads)?;
        Ok((q, k, v))
    }

    /// The projections of `x` (`[1, tokens, hidden]`) as rows `[tokens, heads, d]` (q and k
    /// normed per head where the model does that), not yet rotated: views of the projections'
    /// outputs unless a norm made new ones.
    fn head_rows(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = self.projections(x)?;
        let rows = |t: Tensor, heads: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let (_, len, _) = t.dims3()?;
            let t = t.reshape((len, heads, self.head_dim))?;
            match norm {
                Some(n) => rms_norm(n, &t, Ops::Fast),
                None => Ok(t),
            }
        };
        Ok((
            rows(q, self.heads, self.q_norm.as_ref())?,
            rows(k, self.kv_heads, self.k_norm.as_ref())?,
            rows(v, self.kv_heads, None)?,
        ))
    }

    /// [`Attention::qkv_rows`] on the device: rows `[tokens, heads, d]` in the model's dtype,
    /// q and k rotated there by the kernels' `rope_inplace`. GGUF's interleaved rotation keeps
    /// candle's rope on head-major tensors, and comes back to rows.
    fn qkv_rows_on_device(
        &self,
        x: &Tensor,
        step: &PagedStep<'_>,
        batch: &crate::kv::DeviceBatch,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        if self.rope_interleaved {
            let (cos, sin) = step.cos_sin()?;
            let (q, k, v) = self.qkv(x, cos, sin, Ops::Fast)?;
            // [1, heads, tokens, d] → [tokens, heads, d].
            let rows = |t: Tensor| t.squeeze(0)?.transpose(0, 1)?.contiguous();
            return Ok((rows(q)?, rows(k)?, rows(v)?));
        }
        let (q, k, v) = self.head_rows(x)?;
        let rotate = |t: &Tensor, heads: usize| {
            step.rotary
                .rotate_on_device(t, batch, heads)
                .map_err(|e| candle_core::Error::Msg(format!("rope: {e}")))
        };
        Ok((rotate(&q, self.heads)?, rotate(&k, self.kv_heads)?, v))
    }

    /// Attention of a ragged batch `x` (`[1, tokens, hidden]`, each sequence's tokens at their
    /// own positions) over the paged cache of `layer`. Device pages get the committed rows' K/V
    /// as the kernel runs; from host pages the new tokens' K/V come back to be written, and
    /// with `queries` only those tokens attend (the output has their rows).
    fn forward_paged(
        &self,
        x: &Tensor,
        step: &PagedStep<'_>,
        pages: &mut LayerPages<'_>,
        layer: usize,
        queries: Option<&[usize]>,
    ) -> Result<(Tensor, Option<NewKv>)> {
        let (_, len, _) = x.dims3()?;
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let storage = match pages {
            LayerPages::Device(pages) => {
                let batch = step.device.ok_or_else(|| {
                    candle_core::Error::Msg("paged attention: device pages, no device batch".into())
                })?;
                let (q, k, v) = self.qkv_rows_on_device(x, step, batch)?;
                let out = pages
                    .attend_and_commit(layer, batch, &q, &k, &v, scale)
                    .map_err(|e| candle_core::Error::Msg(format!("paged attention: {e}")))?;
                let out = out.reshape((1, len, self.heads * self.head_dim))?;
                return Ok((self.o_proj.forward(&out.to_dtype(x.dtype())?)?, None));
            }
            LayerPages::Host(storage) => storage,
        };
        let (q, k, v) = self.qkv_rows(x, step)?;
        let rows = queries.map_or(len, <[usize]>::len);
        let mut out = vec![0f32; rows * self.heads * self.head_dim];
        let (k_pages, v_pages) = storage.layer(layer).ok_or_else(|| {
            candle_core::Error::Msg(format!("layer {layer}: no KV pages in host memory"))
        })?;
        crate::kv::paged_attention(
            &step.shape,
            &step.batch,
            &q,
            &k,
            &v,
            k_pages,
            v_pages,
            scale,
            queries,
            &mut out,
        )
        .map_err(|e| candle_core::Error::Msg(format!("paged attention: {e}")))?;
        let out = Tensor::from_vec(out, (1, rows, self.heads * self.head_dim), x.device())?
            .to_dtype(x.dtype())?;
        Ok((self.o_proj.forward(&out)?, Some((k, v))))
    }
}

/// `[b, kv_heads, len, d]` → `[b, kv_heads * n_rep, len, d]`, each kv head serving n_rep query
/// heads in order (head h uses kv head h / n_rep).
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kvh, len, d) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, kvh, n_rep, len, d))?
        .reshape((b, kvh * n_rep, len, d))
}

pub(super) struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    pub(super) fn projections_mut(&mut self) -> [&mut Proj; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [
            &mut a.q_proj,
            &mut a.k_proj,
            &mut a.v_proj,
            &mut a.o_proj,
            &mut m.gate_proj,
            &mut m.up_proj,
            &mut m.down_proj,
        ]
    }

    pub(super) fn new(c: &ModelConfig, w: &dyn WeightSource, name: &str) -> Result<Self> {
        let norm =
            |part: &str| w.rms_norm(&format!("{name}.{part}"), c.hidden_size, c.rms_norm_eps);
        Ok(Self {
            self_attn: Attention::new(c, w, &format!("{name}.self_attn"))?,
            mlp: Mlp::new(c, w, &format!("{name}.mlp"))?,
            input_layernorm: norm("input_layernorm")?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
        })
    }

    /// [`DecoderLayer::forward`] for a ragged batch over the paged cache (inference only),
    /// with the new tokens' K/V when the pages are in host memory. With `rows` (host pages
    /// only), every token's K/V are made but only those tokens go on through attention and the
    /// MLP, and the output has their rows, in that order: the last layer's other rows would
    /// feed nothing (no layer after it reads them, and their logits are not wanted). None of
    /// them is an output of no rows.
    pub(super) fn forward_paged(
        &self,
        x: &Tensor,
        step: &PagedStep<'_>,
        pages: &mut LayerPages<'_>,
        layer: usize,
        rows: Option<&[usize]>,
    ) -> Result<(Tensor, Option<NewKv>)> {
        let normed = rms_norm(&self.input_layernorm, x, Ops::Fast)?;
        if let (Some([]), LayerPages::Host(_)) = (rows, &pages) {
            let (_, k, v) = self.self_attn.qkv_rows(&normed, step)?;
            let hidden = x.dim(2)?;
            return Ok((
                Tensor::zeros((1, 0, hidden), x.dtype(), x.device())?,
                Some((k, v)),
            ));
        }
        let rows = rows.filter(|_| matches!(pages, LayerPages::Host(_)));
        let (h, kv) = self
            .self_attn
            .forward_paged(&normed, step, pages, layer, rows)?;
        let x = match rows {
            Some(rows) => super::pick_rows(x, rows)?,
            None => x.clone(),
        };
        let (x, normed) = add_then_norm(&x, &h, &self.post_attention_layernorm, Ops::Fast)?;
        Ok((add(&x, &self.mlp.forward(&normed)?, Ops::Fast)?, kv))
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        ops: Ops,
    ) -> Result<(Tensor, (Tensor, Tensor))> {
        let normed = rms_norm(&self.input_layernorm, x, ops)?;
        let (h, kv) = self.self_attn.forward(&normed, cos, sin, mask, past, ops)?;
        let (x, normed) = add_then_norm(x, &h, &self.post_attention_layernorm, ops)?;
        Ok((add(&x, &self.mlp.forward(&normed)?, ops)?, kv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::values;

    #[test]
    fn rotating_rows_in_place_gives_candles_rope_bit_for_bit() {
        // The paged forward rotates [tokens, heads, d] rows with the kernels' reference; the
        // dense forward rotates [1, heads, tokens, d] with candle's rope. Same bits, or a
        // sequence's logits would depend on which path ran it.
        let (tokens, heads, d) = (7, 3, 64);
        let table = RopeTable::new(d, 10_000.0, 512);
        let positions: Vec<i32> = (0..tokens as i32).map(|t| 17 * t + 5).collect();
        let x = values(tokens * heads * d, 9);
        let mut rows = x.clone();
        sdlm_kernels::reference::rope_inplace(&mut rows, &positions, &table, heads).unwrap();

        let dev = Device::Cpu;
        let half = d / 2;
        let cos = Tensor::from_slice(&table.cos, (512, half), &dev).unwrap();
        let sin = Tensor::from_slice(&table.sin, (512, half), &dev).unwrap();
        let idx: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let idx = Tensor::new(idx.as_slice(), &dev).unwrap();
        let (cos, sin) = (
            cos.index_select(&idx, 0).unwrap(),
            sin.index_select(&idx, 0).unwrap(),
        );
        let head_major = Tensor::from_vec(x, (1, tokens, heads, d), &dev)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let rotated = candle_nn::rotary_emb::rope(&head_major, &cos, &sin)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&rows), bits(&rotated));
    }
}
