//! Where layer weights come from. Layers ask by their HF checkpoint name
//! ("model.layers.0.self_attn.q_proj"), so the model code reads like the checkpoint whatever the
//! file format; each source maps the name to its own file.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, RmsNorm, VarBuilder};

/// Rows of input a quantized projection multiplies by its weights' 8-bit copy
/// ([`super::q8_matmul`], which reads each weight once per forward whatever the number of rows);
/// one row takes candle's quantized matmul (tuned for a single row) unless candle has no SIMD dot
/// product for the format (`SLOW_DOT_FORMATS`), more rows than this the
/// dequantized f32 weights (candle's tiled gemm, which wins once the work is compute-bound;
/// scoring windows and prompt chunks). Before the 8-bit path, with rows above 8 on the gemm and
/// up to 8 on candle's quantized matmul (which streams the weights once per row), AR decoding of
/// Qwen2.5-Coder-0.5B (Q5_0) ran at 13.1, 16.5, 19.1 and 28.3 tokens/s at 1, 4, 8 and 16
/// sequences on the 2-core machine.
const INT8_ROWS: std::ops::RangeInclusive<usize> = 2..=64;

/// A projection: dense (safetensors, in the model's dtype) or quantized (GGUF, through candle's
/// quantized matmul), with an optional bias.
pub(crate) enum Proj {
    Dense(Linear),
    /// A weight also packed in bf16 AMX tiles (`--matmul-precision bf16`; a quantized one
    /// dequantized first): inputs on the CPU that carry no gradient take the tiles, whatever
    /// their number of rows, so that a row gets the same numbers in a prefill, a block or a
    /// batch; others the projection the tiles were made from, which `F32` restores.
    Bf16 {
        tiles: super::amx_bf16::Bf16Tiles,
        from: Box<Proj>,
    },
    Quantized {
        weight: QMatMul,
        /// The f32 weight, made on first use by a many-row input.
        dense: std::sync::OnceLock<Tensor>,
        /// The Q8_0 copy for few-row inputs, made on first use.
        int8: std::sync::OnceLock<super::q8_matmul::Q8Rows>,
        qtensor: std::sync::Arc<QTensor>,
        /// How llama.cpp would round the activations for this weight format; the many-row path
        /// does the same, so that scoring a GGUF file agrees with llama.cpp's.
        rounding: ActivationRounding,
        bias: Option<Tensor>,
    },
    /// Only while `set_precision` moves a projection into or out of `Bf16`.
    Empty,
}

use super::ggml_rounding::ActivationRounding;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};

/// Formats whose dot products candle runs without SIMD (scalar code, several times slower on
/// x86): even a single row goes through the 8-bit copy, which has an AVX2 path; scoring and
/// prefill windows still use the exact dequantized weights.
const SLOW_DOT_FORMATS: &[GgmlDType] = &[GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1];

impl Proj {
    /// Packs the weight for the bf16 matmul, or goes back to the projection it was packed
    /// from for `F32`.
    ///
    /// A quantized weight is packed from its dequantized values: the step batcher's rows of a
    /// GGUF model then take the AMX tiles instead of the 8-bit dot products, which on 2 cores
    /// are bound by their instruction count (docs/benchmarks.md, Qwen2.5-Coder through the step
    /// batcher).
    pub(crate) fn set_precision(&mut self, precision: super::MatmulPrecision) -> Result<()> {
        let packing = matches!(precision, super::MatmulPrecision::Bf16);
        let weight = match (&*self, packing) {
            (Proj::Dense(linear), true) => linear.weight().to_dtype(candle_core::DType::F32)?,
            (Proj::Quantized { qtensor, .. }, true) => {
                qtensor.dequantize(&candle_core::Device::Cpu)?
            }
            (Proj::Bf16 { .. }, false) => {
                if let Proj::Bf16 { from, .. } = std::mem::replace(self, Proj::Empty) {
                    *self = *from;
                }
                return Ok(());
            }
            _ => return Ok(()),
        };
        let (out, inp) = weight.dims2()?;
        let values = weight.flatten_all()?.to_vec1::<f32>()?;
        let tiles = super::amx_bf16::Bf16Tiles::pack(&values, out, inp);
        let from = Box::new(std::mem::replace(self, Proj::Empty));
        *self = Proj::Bf16 { tiles, from };
        Ok(())
    }

    fn bias(&self) -> Option<&Tensor> {
        match self {
            Proj::Dense(linear) => linear.bias(),
            Proj::Quantized { bias, .. } => bias.as_ref(),
            Proj::Bf16 { from, .. } => from.bias(),
            Proj::Empty => None,
        }
    }

    pub(crate) fn quantized(qtensor: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let qtensor = std::sync::Arc::new(qtensor);
        Ok(Proj::Quantized {
            weight: QMatMul::from_arc(qtensor.clone())?,
            dense: std::sync::OnceLock::new(),
            int8: std::sync::OnceLock::new(),
            rounding: ActivationRounding::for_weight(qtensor.dtype()),
            qtensor,
            bias,
        })
    }
}

/// Whether `rows` input rows multiply a weight of this format through its 8-bit copy.
fn takes_int8(dtype: GgmlDType, rows: usize, cols: usize) -> bool {
    let quantized = !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    let few = INT8_ROWS.contains(&rows) || (rows == 1 && SLOW_DOT_FORMATS.contains(&dtype));
    quantized && few && cols.is_multiple_of(super::q8_matmul::BLOCK)
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => match super::f32_rows::matmul_t(x, l.weight())? {
                Some(y) => match l.bias() {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                },
                None => l.forward(x),
            },
            Proj::Bf16 { tiles, from } => {
                let takes_tiles = x.device().is_cpu()
                    && x.dtype() == candle_core::DType::F32
                    && !x.track_op()
                    && x.dim(candle_core::D::Minus1)? == tiles.inputs();
                if !takes_tiles {
                    return from.forward(x);
                }
                let y = through_rows(x, tiles.outputs(), |v, rows| tiles.matmul_on_lines(v, rows))?;
                match from.bias() {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            Proj::Empty => candle_core::bail!("a projection used while its precision changed"),
            Proj::Quantized {
                weight,
                dense,
                int8,
                qtensor,
                rounding,
                bias,
            } => {
                let cols = x.dim(candle_core::D::Minus1)?;
                let rows = x.elem_count() / cols.max(1);
                let y = if takes_int8(qtensor.dtype(), rows, cols) && x.device().is_cpu() {
                    let w = match int8.get() {
                        Some(w) => w,
                        None => {
                            let w = int8_copy(qtensor)?;
                            int8.get_or_init(|| w)
                        }
                    };
                    if cols != w.cols() {
                        candle_core::bail!(
                            "input of size {cols} for a weight of {} inputs",
                            w.cols()
                        );
                    }
                    through_rows(x, w.rows(), |v, rows| (w.matmul(v, rows), 0))?
                } else if rows > *INT8_ROWS.end() {
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

/// The Q8_0 copy of a quantized weight `[out, in]`, `in` a multiple of 32 (its values
/// dequantized, then requantized: exact for Q8_0 files, a small extra rounding for the 4-, 5-
/// and 6-bit formats).
fn int8_copy(qtensor: &QTensor) -> Result<super::q8_matmul::Q8Rows> {
    let (out, inp) = qtensor.shape().dims2()?;
    let values = qtensor
        .dequantize(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(super::q8_matmul::Q8Rows::quantize(&values, out, inp))
}

/// `x [..., in]` on the CPU as f32 rows through `matmul(values, rows)`, which gives
/// `[rows, out]` as `(v, start)`, the outputs `v[start..]`; back in `x`'s shape and dtype with
/// `out` last (a view from `start`, not a copy).
fn through_rows(
    x: &Tensor,
    out: usize,
    matmul: impl Fn(&[f32], usize) -> (Vec<f32>, usize),
) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let inp = dims.pop().unwrap_or(0);
    let rows = x.elem_count() / inp.max(1);
    let x32 = x.to_dtype(candle_core::DType::F32)?.contiguous()?;
    // The input's own storage, not a copy (a step batcher's round read each product's input
    // twice that way: 2.5% of a 16-sequence round's samples on the 2-core Xeon).
    let (y, start) = {
        let (storage, layout) = x32.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("a CPU product's input is on {:?}", x.device().location())
        };
        matmul(super::contiguous_f32("product", cpu, layout)?, rows)
    };
    dims.push(out);
    let len = y.len();
    Tensor::from_vec(y, len, x.device())?
        .narrow(0, start, rows * out)?
        .reshape(dims)?
        .to_dtype(x.dtype())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::{assert_rows_independent_of_batch, matrix};

    #[test]
    fn a_q5_0_row_gives_the_same_output_alone_as_in_a_batch() {
        // One row and a few rows take the same 8-bit path for a format candle has no SIMD dot
        // for, so a sequence's logits do not depend on how many others share its forward.
        let (out, inp, m) = (48, 256, 5);
        let q = QTensor::quantize(&matrix(out, inp, 1), GgmlDType::Q5_0).unwrap();
        let proj = Proj::quantized(q, None).unwrap();
        assert_rows_independent_of_batch(&matrix(m, inp, 2), |x| proj.forward(x).unwrap());
    }

    #[test]
    fn the_8_bit_path_takes_quantized_weights_of_few_rows_whose_width_splits_into_blocks() {
        assert!(takes_int8(GgmlDType::Q8_0, 16, 896));
        assert!(
            !takes_int8(GgmlDType::Q8_0, 1, 896),
            "one row: candle's SIMD dot"
        );
        assert!(
            takes_int8(GgmlDType::Q5_0, 1, 896),
            "one row: candle has no SIMD dot"
        );
        assert!(
            !takes_int8(GgmlDType::Q8_0, 65, 896),
            "many rows: the f32 gemm"
        );
        assert!(!takes_int8(GgmlDType::F16, 16, 896), "not quantized");
        assert!(
            !takes_int8(GgmlDType::Q8_0, 16, 900),
            "900 is not a multiple of 32"
        );
    }
}
