//! Grouped-query attention under an additive mask as one differentiable candle op, for training
//! and for decoding without the paged cache on the CPU. Composed of tensor ops, the attention of a 512-token corrupted ‖ clean window
//! materialises `[batch, heads, 512, 512]` scores and runs a dozen element-wise passes over them
//! forward and backward, most of them over positions the mask forbids (the twin mask lets a query
//! see about a quarter of the keys). This op walks only the allowed key spans of each query row,
//! keeps one row of scores at a time, and writes the gradients of q, k and v in one backward pass
//! (the flash-attention backward: recompute the row's probabilities, then dS = P ∘ (dP − rowsum(dO ∘ O))).
//!
//! Same math as `softmax(scale · q kᵀ + mask) v`; a row whose keys are all masked gives zeros
//! (the composed form gives NaN there).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::op_inputs::{contiguous_f32, host_values};
use crate::simd::{axpy, dispatch, dot_row, exp_shifted, wide_simd, Build};

/// The mask as the op needs it: the additive values, and per query row the spans of keys whose
/// value is finite (the only keys that row attends to).
struct RowMask {
    keys: usize,
    bias: Vec<f32>,
    spans: Vec<Vec<(usize, usize)>>,
}

impl RowMask {
    fn new(mask: &Tensor) -> Result<Self> {
        let (rows, keys) = mask.dims2()?;
        let bias = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let spans = (0..rows)
            .map(|i| {
                let row = &bias[i * keys..(i + 1) * keys];
                let mut spans = Vec::new();
                let mut j = 0;
                while j < keys {
                    if row[j] == f32::NEG_INFINITY {
                        j += 1;
                        continue;
                    }
                    let start = j;
                    while j < keys && row[j] != f32::NEG_INFINITY {
                        j += 1;
                    }
                    spans.push((start, j));
                }
                spans
            })
            .collect();
        Ok(Self { keys, bias, spans })
    }

    fn allowed(&self, row: usize) -> impl Iterator<Item = usize> + '_ {
        self.spans[row].iter().flat_map(|&(a, b)| a..b)
    }
}

/// The dimensions of one call: q is `[batch, heads, rows, dim]`, k and v `[batch, kv_heads,
/// keys, dim]`.
#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    rows: usize,
    keys: usize,
    dim: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

struct MaskedAttention {
    mask: Arc<RowMask>,
    scale: f32,
}

/// `softmax(scale · q kᵀ + mask) v` with q `[b, heads, n, d]`, k and v `[b, kv_heads, m, d]`
/// (heads a multiple of kv_heads) and mask `[n, m]` additive (−∞ = not attended). f32, CPU.
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let op = MaskedAttention {
        mask: Arc::new(RowMask::new(mask)?),
        scale: scale as f32,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

impl MaskedAttention {
    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
        let bad = |why: String| candle_core::Error::Msg(format!("masked attention: {why}"));
        let (&[batch, heads, rows, dim], &[kb, kv_heads, keys, kd]) = (q, k) else {
            return Err(bad(format!("q {q:?} and k {k:?} must both be rank 4")));
        };
        if v != k || kb != batch || kd != dim || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(bad(format!("q {q:?}, k {k:?}, v {v:?} do not fit")));
        }
        if self.mask.spans.len() != rows || self.mask.keys != keys {
            return Err(bad(format!(
                "the mask is [{}, {}] for {rows} query rows and {keys} keys",
                self.mask.spans.len(),
                self.mask.keys
            )));
        }
        Ok(Dims {
            heads,
            kv_heads,
            rows,
            keys,
            dim,
        })
    }

    /// The softmax over the allowed keys of one query row, into `p` (indexed by key); returns
    /// false when the row attends to nothing.
    #[inline(always)]
    fn probabilities(&self, row: usize, q: &[f32], k: &[f32], dim: usize, p: &mut [f32]) -> bool {
        let bias = &self.mask.bias[row * self.mask.keys..];
        let spans = &self.mask.spans[row];
        let mut max = f32::NEG_INFINITY;
        for &(a, b) in spans {
            for j in a..b {
                let s = self.scale * dot_row(q, &k[j * dim..(j + 1) * dim]) + bias[j];
                p[j] = s;
                max = max.max(s);
            }
        }
        if max == f32::NEG_INFINITY {
            return false;
        }
        let sum: f32 = spans
            .iter()
            .map(|&(a, b)| exp_shifted(&mut p[a..b], max))
            .sum();
        for &(a, b) in spans {
            for x in &mut p[a..b] {
                *x /= sum;
            }
        }
        true
    }
}

impl CustomOp3 for MaskedAttention {
    fn name(&self) -> &'static str {
        "masked-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1.dims(), l2.dims(), l3.dims())?;
        let slice = |s, l| contiguous_f32("masked attention", s, l);
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let out = self.outputs(dims, (q, k, v), wide_simd());
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = self.dims(q.dims(), k.dims(), v.dims())?;
        let flat = host_values;
        let (qs, ks, vs, os, dos) = (flat(q)?, flat(k)?, flat(v)?, flat(out)?, flat(grad_out)?);
        let (dq, dk, dv) = self.gradients(dims, (&qs, &ks, &vs), &os, &dos);
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

/// One task's share of the inputs: the queries of its sequence, and the keys and values of its
/// (sequence, kv head).
struct Task<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    /// The first query head of the group, within the sequence's queries.
    first_head: usize,
}

impl<'a> Task<'a> {
    fn new(dims: Dims, task: usize, q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> Self {
        let (b, kvh) = (task / dims.kv_heads, task % dims.kv_heads);
        let kv = (b * dims.kv_heads + kvh) * dims.keys * dims.dim;
        let seq = dims.heads * dims.rows * dims.dim;
        Self {
            q: &q[b * seq..(b + 1) * seq],
            k: &k[kv..kv + dims.keys * dims.dim],
            v: &v[kv..kv + dims.keys * dims.dim],
            first_head: kvh * dims.group(),
        }
    }

    /// Query row `i` of head `g` of the group, in a `[heads, rows, dim]` array of the sequence.
    fn at(&self, dims: Dims, g: usize, i: usize) -> usize {
        ((self.first_head + g) * dims.rows + i) * dims.dim
    }
}

impl MaskedAttention {
    /// Output rows of one (sequence, kv head): `out` is its group's `[group, rows, dim]`.
    ///
    /// # Safety
    /// The CPU must have `B`'s features.
    #[inline(always)]
    unsafe fn forward_task<B: Build>(&self, dims: Dims, t: &Task, out: &mut [f32], p: &mut [f32]) {
        B::run(|| {
            for g in 0..dims.group() {
                for i in 0..dims.rows {
                    let qi = &t.q[t.at(dims, g, i)..][..dims.dim];
                    let oi = &mut out[(g * dims.rows + i) * dims.dim..][..dims.dim];
                    if self.probabilities(i, qi, t.k, dims.dim, p) {
                        for j in self.mask.allowed(i) {
                            axpy(oi, p[j], &t.v[j * dims.dim..(j + 1) * dims.dim]);
                        }
                    }
                }
            }
        })
    }

    /// Gradients of one (sequence, kv head): its query heads' dq rows (`[group, rows, dim]`) and
    /// its keys' dk and dv rows, which no other task writes.
    ///
    /// # Safety
    /// The CPU must have `B`'s features.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn backward_task<B: Build>(
        &self,
        dims: Dims,
        t: &Task,
        o: &[f32],
        d_o: &[f32],
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
        p: &mut [f32],
    ) {
        let d = dims.dim;
        B::run(|| {
            for g in 0..dims.group() {
                for i in 0..dims.rows {
                    let at = t.at(dims, g, i);
                    let (qi, oi, doi) = (&t.q[at..][..d], &o[at..][..d], &d_o[at..][..d]);
                    if !self.probabilities(i, qi, t.k, d, p) {
                        continue;
                    }
                    let dqi = &mut dq[(g * dims.rows + i) * d..][..d];
                    let row_dot = dot_row(doi, oi);
                    for j in self.mask.allowed(i) {
                        let (kj, vj) = (&t.k[j * d..(j + 1) * d], &t.v[j * d..(j + 1) * d]);
                        let ds = p[j] * (dot_row(doi, vj) - row_dot) * self.scale;
                        axpy(dqi, ds, kj);
                        axpy(&mut dk[j * d..(j + 1) * d], ds, qi);
                        axpy(&mut dv[j * d..(j + 1) * d], p[j], doi);
                    }
                }
            }
        })
    }

    /// The attention outputs, one task per (sequence, kv head), whose query heads' rows are
    /// contiguous.
    fn outputs(&self, dims: Dims, (q, k, v): (&[f32], &[f32], &[f32]), wide: bool) -> Vec<f32> {
        let mut out = vec![0f32; q.len()];
        out.par_chunks_mut(dims.group() * dims.rows * dims.dim)
            .enumerate()
            .for_each_init(
                || vec![0f32; dims.keys],
                |p, (task, out)| {
                    let inputs = Task::new(dims, task, q, k, v);
                    dispatch!(wide, self.forward_task(dims, &inputs, out, p));
                },
            );
        out
    }

    /// dq, dk, dv from the inputs, the output and its gradient, one task per (sequence, kv head).
    fn gradients(
        &self,
        dims: Dims,
        (q, k, v): (&[f32], &[f32], &[f32]),
        o: &[f32],
        d_o: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        let wide = wide_simd();
        let kv_rows = dims.keys * dims.dim;
        dq.par_chunks_mut(dims.group() * dims.rows * dims.dim)
            .zip(dk.par_chunks_mut(kv_rows))
            .zip(dv.par_chunks_mut(kv_rows))
            .enumerate()
            .for_each_init(
                || vec![0f32; dims.keys],
                |p, (task, ((dq, dk), dv))| {
                    let inputs = Task::new(dims, task, q, k, v);
                    let seq = dims.heads * dims.rows * dims.dim;
                    let b = task / dims.kv_heads;
                    let (o, d_o) = (&o[b * seq..(b + 1) * seq], &d_o[b * seq..(b + 1) * seq]);
                    dispatch!(
                        wide,
                        self.backward_task(dims, &inputs, o, d_o, (dq, dk, dv), p)
                    );
                },
            );
        (dq, dk, dv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The composed form the op replaces: repeat the kv heads, scores, mask, softmax, values.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
        let group = q.dim(1)? / k.dim(1)?;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let (b, h, n, d) = t.dims4()?;
            t.unsqueeze(2)?
                .expand((b, h, group, n, d))?
                .reshape((b, h * group, n, d))
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?.matmul(&v)
    }

    fn random(shape: &[usize], seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..shape.iter().product::<usize>())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY)
    }

    #[test]
    fn output_and_gradients_equal_the_composed_attention_under_a_block_mask() -> Result<()> {
        // 16 takes the dot product of any width, 64 and 128 the fixed-width ones.
        for d in [16, 64, 128] {
            equal_to_the_composed_attention(d)?;
        }
        Ok(())
    }

    fn equal_to_the_composed_attention(d: usize) -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, kvh, n) = (2, 4, 2, 24);
        // A twin-style mask: rows attend to a block-causal pattern with a finite bias here and
        // there, so the additive values matter too.
        let block = 5;
        let mut mask = vec![f32::NEG_INFINITY; n * n];
        for i in 0..n {
            for j in 0..n {
                if j / block <= i / block {
                    mask[i * n + j] = if (i + j) % 7 == 0 { -0.5 } else { 0.0 };
                }
            }
        }
        let mask = Tensor::from_vec(mask, (n, n), &dev)?;
        let q = Var::from_vec(random(&[b, h, n, d], 1), (b, h, n, d), &dev)?;
        let k = Var::from_vec(random(&[b, kvh, n, d], 2), (b, kvh, n, d), &dev)?;
        let v = Var::from_vec(random(&[b, kvh, n, d], 3), (b, kvh, n, d), &dev)?;
        let weight = Tensor::from_vec(random(&[b, h, n, d], 4), (b, h, n, d), &dev)?;
        let scale = 1.0 / (d as f64).sqrt();

        let fused = masked_attention(&q, &k, &v, &mask, scale)?;
        let reference = composed(&q, &k, &v, &mask, scale)?;
        assert!(max_diff(&fused, &reference) < 1e-5, "d {d}");

        let fused_grads = (fused * &weight)?.sum_all()?.backward()?;
        let reference_grads = (reference * &weight)?.sum_all()?.backward()?;
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (a, r) = (
                fused_grads.get(var).expect("fused gradient"),
                reference_grads.get(var).expect("reference gradient"),
            );
            let diff = max_diff(a, r);
            assert!(diff < 1e-5, "d{name} differs by {diff} at width {d}");
        }
        Ok(())
    }

    #[test]
    fn the_portable_and_widest_builds_give_identical_outputs() -> Result<()> {
        for d in [20, 64] {
            builds_agree(d)?;
        }
        Ok(())
    }

    fn builds_agree(d: usize) -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, kvh, n) = (1, 2, 1, 9);
        let mask = Tensor::zeros((n, n), DType::F32, &dev)?;
        let op = MaskedAttention {
            mask: Arc::new(RowMask::new(&mask)?),
            scale: 0.3,
        };
        let dims = op.dims(&[b, h, n, d], &[b, kvh, n, d], &[b, kvh, n, d])?;
        let (q, k, v) = (
            random(&[b, h, n, d], 5),
            random(&[b, kvh, n, d], 6),
            random(&[b, kvh, n, d], 7),
        );
        let portable = op.outputs(dims, (&q, &k, &v), false);
        let native = op.outputs(dims, (&q, &k, &v), wide_simd());
        assert!(portable
            .iter()
            .zip(&native)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        Ok(())
    }

    #[test]
    fn mismatched_mask_is_an_error_naming_the_sizes() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).expect("q");
        let mask = Tensor::zeros((3, 4), DType::F32, &dev).expect("mask");
        let err = masked_attention(&q, &q, &q, &mask, 1.0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("[3, 4]") && err.contains("4 query rows"),
            "{err}"
        );
    }
}
