//! llama.cpp never multiplies a quantized weight by f32 activations: it first quantizes each row
//! of activations to the weight format's "vec dot" partner (8-bit blocks for the integer dot
//! products, f16 for an f16 weight) and multiplies those. Our many-row path multiplies by the
//! dequantized f32 weight instead, which is more exact but not what a GGUF user compares against:
//! the two disagree on near-ties of the arg max. Rounding the activations the way llama.cpp's CPU
//! backend does, then multiplying by the dequantized weight, gives llama.cpp's products up to the
//! order of float summation.
//!
//! The rules are ggml's `quantize_row_q8_0` / `q8_1` (x86 SIMD: scale amax/127 stored as f16,
//! multiplier 127/amax, round half to even) and `quantize_row_q8_K_ref` (blocks of 256, scale
//! −max/127 by the signed extreme, stored as f32, round half to even, clamp at 127).

use candle_core::quantized::GgmlDType;
use candle_core::{Result, Tensor};
use half::f16;

/// How the activations of a matmul with a weight of this format are rounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ActivationRounding {
    /// The weight is f32: activations stay f32.
    None,
    /// An f16 weight: activations converted to f16.
    F16,
    /// 8-bit blocks of 32 with an f16 scale (`block_q8_0`, and `block_q8_1`, whose extra sum term
    /// only reorders the same product).
    Q8Block32,
    /// 8-bit blocks of 256 with an f32 scale (`block_q8_K`), the k-quants' partner.
    Q8K,
}

impl ActivationRounding {
    /// ggml's `vec_dot_type` of a weight format, as its CPU backend sets it.
    pub(crate) fn for_weight(dtype: GgmlDType) -> Self {
        use GgmlDType::*;
        match dtype {
            F32 => Self::None,
            F16 | BF16 => Self::F16,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q8_1 => Self::Q8Block32,
            Q2K | Q3K | Q4K | Q5K | Q6K | Q8K => Self::Q8K,
        }
    }

    /// `x` (f32, any shape) with every row of its last dimension rounded.
    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor> {
        let block = match self {
            Self::None => return Ok(x.clone()),
            Self::F16 => return x.to_dtype(candle_core::DType::F16)?.to_dtype(x.dtype()),
            Self::Q8Block32 => 32,
            Self::Q8K => 256,
        };
        let row = x.dim(candle_core::D::Minus1)?;
        if row % block != 0 {
            candle_core::bail!("activation rows of {row} are not whole blocks of {block}");
        }
        let dtype = x.dtype();
        let mut values = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for chunk in values.chunks_mut(block) {
            match self {
                Self::Q8Block32 => round_q8_block32(chunk),
                _ => round_q8_k(chunk),
            }
        }
        Tensor::from_vec(values, x.shape(), x.device())?.to_dtype(dtype)
    }
}

/// `quantize_row_q8_0` (x86), then back to f32.
fn round_q8_block32(block: &mut [f32]) {
    let mut q = [0i8; 32];
    let d = quantize_q8_block32(block, &mut q[..block.len()]);
    for (v, &q) in block.iter_mut().zip(&q) {
        *v = q as f32 * d;
    }
}

/// `quantize_row_q8_0` (x86) of one block into `q`: returns the scale, rounded to f16 as ggml
/// stores it (the values are divided by the unrounded one).
pub(crate) fn quantize_q8_block32(block: &[f32], q: &mut [i8]) -> f32 {
    // A plain compare (no NaN rule) lets the loop vectorise; ggml's max_ps behaves the same way.
    let amax = block
        .iter()
        .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
    let d = f16::from_f32(amax / 127.0).to_f32();
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(block) {
        *q = round_half_even(v * id) as i8;
    }
    d
}

/// Round half to even for |x| < 2^22, as ggml's `nearest_int` does: adding 1.5·2^23 leaves no
/// fraction bits, so the float add itself rounds. (`f32::round_ties_even` is a libm call on
/// x86-64 without SSE4.1, ten times slower on this hot path.)
fn round_half_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// `quantize_row_q8_K_ref`, then back to f32.
fn round_q8_k(block: &mut [f32]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in block.iter() {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        block.fill(0.0);
        return;
    }
    let iscale = -127.0 / max;
    let d = 1.0 / iscale;
    for v in block.iter_mut() {
        *v = round_half_even(*v * iscale).min(127.0) * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0};
    use candle_core::quantized::GgmlType;

    /// Our Q8_0 rounding against candle's own Q8_0 blocks (scalar ggml reference: half away from
    /// zero), on values with no exact half ties, where the two conventions agree.
    #[test]
    fn q8_block_rounding_matches_candles_q8_0_blocks() {
        let x: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.3) * 0.013)
            .collect();
        let mut blocks = vec![BlockQ8_0::zeros(); x.len() / 32];
        BlockQ8_0::from_float(&x, &mut blocks);
        let mut reference = vec![0f32; x.len()];
        BlockQ8_0::to_float(&blocks, &mut reference);
        let mut ours = x.clone();
        ours.chunks_mut(32).for_each(round_q8_block32);
        for (a, b) in ours.iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }

    /// Q8_K against candle's Q8_K blocks (the same rule as ggml's reference), on values with no
    /// exact half ties.
    #[test]
    fn q8_k_rounding_matches_candles_q8_k_blocks() {
        let x: Vec<f32> = (0..512)
            .map(|i| ((i * 53 % 97) as f32 - 40.3) * 0.1)
            .collect();
        let mut blocks = vec![BlockQ8K::zeros(); x.len() / 256];
        BlockQ8K::from_float(&x, &mut blocks);
        let mut reference = vec![0f32; x.len()];
        BlockQ8K::to_float(&blocks, &mut reference);
        let mut ours = x.clone();
        ours.chunks_mut(256).for_each(round_q8_k);
        for (a, b) in ours.iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
        }
    }
}
