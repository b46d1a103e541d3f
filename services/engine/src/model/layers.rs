//! The layers of [`super::Model`], each a `new(config, vb)` and a `forward`.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{linear_b, linear_no_bias, Linear, RmsNorm, VarBuilder};
use sdlm_kernels::reference::RopeTable;

use crate::config::ModelConfig;
use crate::error::EngineError;

/// cos/sin tables for every position the model supports, from the kernels' RopeTable so that the
/// CPU and CUDA paths rotate by the same numbers.
pub(super) struct Rotary {
    cos: Tensor,
    sin: Tensor,
    max_position: usize,
}

impl Rotary {
    pub(super) fn new(config: &ModelConfig, device: &Device) -> Result<Self> {
        let table = RopeTable::new(
            config.head_dim,
            config.rope_theta as f32,
            config.max_position_embeddings,
        );
        let half = config.head_dim / 2;
        let shape = (config.max_position_embeddings, half);
        Ok(Self {
            cos: Tensor::from_vec(table.cos, shape, device)?,
            sin: Tensor::from_vec(table.sin, shape, device)?,
            max_position: config.max_position_embeddings,
        })
    }

    /// `[len, head_dim / 2]` cos and sin rows for these positions.
    pub(super) fn at(
        &self,
        positions: &[u32],
    ) -> std::result::Result<(Tensor, Tensor), EngineError> {
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= self.max_position) {
            return Err(EngineError::Input(format!(
                "position {p} is beyond the model's max_position_embeddings = {}",
                self.max_position
            )));
        }
        let idx = Tensor::new(positions, self.cos.device())?;
        Ok((
            self.cos.index_select(&idx, 0)?,
            self.sin.index_select(&idx, 0)?,
        ))
    }
}

struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(c: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gate_proj: linear_no_bias(c.hidden_size, c.intermediate_size, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(c.hidden_size, c.intermediate_size, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(c.intermediate_size, c.hidden_size, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(c: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let (h, kvh, d) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let qk_norm = |name: &str| -> Result<Option<RmsNorm>> {
            match c.qk_norm {
                true => Ok(Some(candle_nn::rms_norm(d, c.rms_norm_eps, vb.pp(name))?)),
                false => Ok(None),
            }
        };
        Ok(Self {
            q_proj: linear_b(c.hidden_size, h * d, c.attention_bias, vb.pp("q_proj"))?,
            k_proj: linear_b(c.hidden_size, kvh * d, c.attention_bias, vb.pp("k_proj"))?,
            v_proj: linear_b(c.hidden_size, kvh * d, c.attention_bias, vb.pp("v_proj"))?,
            o_proj: linear_no_bias(h * d, c.hidden_size, vb.pp("o_proj"))?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            heads: h,
            kv_heads: kvh,
            head_dim: d,
        })
    }

    /// `[b, len, heads * d]` → `[b, heads, len, d]`, normed per head when the model does that.
    fn split_heads(&self, x: Tensor, heads: usize, norm: Option<&RmsNorm>) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        let x = x.reshape((b, len, heads, self.head_dim))?;
        let x = match norm {
            Some(n) => n.forward(&x)?,
            None => x,
        };
        x.transpose(1, 2)?.contiguous()
    }

    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        let q = self.split_heads(self.q_proj.forward(x)?, self.heads, self.q_norm.as_ref())?;
        let k = self.split_heads(self.k_proj.forward(x)?, self.kv_heads, self.k_norm.as_ref())?;
        let v = self.split_heads(self.v_proj.forward(x)?, self.kv_heads, None)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        let k = repeat_kv(k, self.heads / self.kv_heads)?;
        let v = repeat_kv(v, self.heads / self.kv_heads)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?; // [b, heads, len, d]
        let out = out
            .transpose(1, 2)?
            .reshape((b, len, self.heads * self.head_dim))?;
        self.o_proj.forward(&out)
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
    pub(super) fn new(c: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: Attention::new(c, vb.pp("self_attn"))?,
            mlp: Mlp::new(c, vb.pp("mlp"))?,
            input_layernorm: candle_nn::rms_norm(
                c.hidden_size,
                c.rms_norm_eps,
                vb.pp("input_layernorm"),
            )?,
            post_attention_layernorm: candle_nn::rms_norm(
                c.hidden_size,
                c.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
        })
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, cos, sin, mask)?;
        let x = (x + h)?;
        let h = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?)?;
        x + h
    }
}
