//! Where layer weights come from. Layers ask by their HF checkpoint name
//! ("model.layers.0.self_attn.q_proj"), so the model code reads like the checkpoint whatever the
//! file format; each source maps the name to its own file.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, RmsNorm, VarBuilder};

/// Rows of input above which a quantized projection multiplies by its dequantized f32 weight
/// (candle's tiled gemm) instead of quantized dot products (candle's row-tiled quantized matmul,
/// which reads each weight block once per tile of rows). Measured with `sdlm bench --mode
/// autoregressive --concurrency 1,4,8,16` on Qwen2.5-Coder-0.5B (Q5_0, whose few-row path uses
/// a Q8_0 copy), 2 cores: with every multi-row input on the f32 gemm, 4 sequences ran at 10.7
/// tokens/s against 12.9 for one (streaming 2 GB of f32 weights per forward); with up to 64
/// rows quantized, 4 ran at 15.8 but 16 at 18.7 against 26.3 through the gemm. Up to 8 rows:
/// 16.5, 19.1 and 28.3 tokens/s at 4, 8 and 16. Scoring windows (hundreds of rows) take the
/// gemm, with llama.cpp's activation rounding.
const DEQUANTIZE_ABOVE_ROWS: usize = 8;

/// A projection: dense (safetensors, in the model's dtype) or quantized (GGUF, through candle's
/// quantized matmul), with an optional bias.
pub(crate) enum Proj {
    Dense(Linear),
    Quantized {
        weight: QMatMul,
        /// The f32 weight, made on first use by a many-row input.
        dense: std::sync::OnceLock<Tensor>,
        qtensor: std::sync::Arc<QTensor>,
        /// How llama.cpp would round the activations for this weight format; the many-row path
        /// does the same, so that scoring a GGUF file agrees with llama.cpp's.
        rounding: ActivationRounding,
        bias: Option<Tensor>,
    },
}

use super::ggml_rounding::ActivationRounding;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};

/// Formats whose dot products candle runs without SIMD (scalar code, several times slower on
/// x86): the few-row path multiplies by a Q8_0 copy instead, which has an AVX2 path; scoring and
/// prefill windows still use the exact dequantized weights.
const SLOW_DOT_FORMATS: &[GgmlDType] = &[GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

impl Proj {
    pub(crate) fn quantized(qtensor: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let qtensor = std::sync::Arc::new(qtensor);
        let few_rows = if SLOW_DOT_FORMATS.contains(&qtensor.dtype()) {
            let dense = qtensor.dequantize(&candle_core::Device::Cpu)?;
            std::sync::Arc::new(QTensor::quantize(&dense, GgmlDType::Q8_0)?)
        } else {
            qtensor.clone()
        };
        Ok(Proj::Quantized {
            weight: QMatMul::from_arc(few_rows)?,
            dense: std::sync::OnceLock::new(),
            rounding: ActivationRounding::for_weight(qtensor.dtype()),
            qtensor,
            bias,
        })
    }
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => l.forward(x),
            Proj::Quantized {
                weight,
                dense,
                qtensor,
                rounding,
                bias,
            } => {
                let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
                let y = if rows > DEQUANTIZE_ABOVE_ROWS {
                    let w = match dense.get() {
                        Some(w) => w,
                        None => {
                            let w = qtensor.dequantize(x.device())?;
                            dense.get_or_init(|| w)
                        }
                    };
                    rounding.apply(x)?.broadcast_matmul(&w.t()?)?
                } else {
                    weight.forward(x)?
                };
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

pub(crate) trait WeightSource {
    /// `name.weight` `[out, in]` and, when `bias`, `name.bias` `[out]`.
    fn linear(&self, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Proj>;
    fn rms_norm(&self, name: &str, size: usize, eps: f64) -> Result<RmsNorm>;
    /// The embedding table `[vocab, hidden]`, dense.
    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Tensor>;
    /// The LM head when it shares the embedding's weights.
    fn tied_head(&self, embedding_name: &str, vocab: usize, hidden: usize) -> Result<Proj>;
}

/// Safetensors through candle's VarBuilder, names as they are.
pub(crate) struct Safetensors<'a>(pub VarBuilder<'a>);

impl WeightSource for Safetensors<'_> {
    fn linear(&self, name: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Proj> {
        Ok(Proj::Dense(candle_nn::linear_b(
            in_dim,
            out_dim,
            bias,
            self.0.pp(name),
        )?))
    }

    fn rms_norm(&self, name: &str, size: usize, eps: f64) -> Result<RmsNorm> {
        candle_nn::rms_norm(size, eps, self.0.pp(name))
    }

    fn embedding(&self, name: &str, vocab: usize, hidden: usize) -> Result<Tensor> {
        // The hint only matters for a fresh VarMap (training from scratch), as candle_nn's own
        // embedding initialises.
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        self.0
            .pp(name)
            .get_with_hints((vocab, hidden), "weight", init)
    }

    fn tied_head(&self, embedding_name: &str, vocab: usize, hidden: usize) -> Result<Proj> {
        Ok(Proj::Dense(Linear::new(
            self.embedding(embedding_name, vocab, hidden)?,
            None,
        )))
    }
}
